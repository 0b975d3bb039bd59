"""Where asyncore comes from, and the names the package keeps from the article.

The import checks run in child processes: this process has imported
``asyncore_fwd`` already, and its warning filters are pytest's.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import resources
from typing import List

import pytest

import asyncore_fwd
from asyncore_fwd import _compat
from conftest import WAIT


def python(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``sys.executable`` with ``args`` (bounded by ``WAIT``)."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=WAIT)


def test_import_raises_no_warning_even_with_warnings_as_errors() -> None:
    """``python -W error -c 'import asyncore_fwd'`` succeeds silently (no asyncore DeprecationWarning)."""
    result = python("-W", "error", "-c", "import asyncore_fwd")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_silencing_the_asyncore_warning_leaves_the_callers_filters_alone() -> None:
    """After the import, a DeprecationWarning elsewhere is still an error under ``-W error``."""
    result = python("-W", "error", "-c",
                    "import asyncore_fwd, warnings; warnings.warn('elsewhere', DeprecationWarning)")
    assert result.returncode != 0
    assert result.stderr.splitlines()[-1] == "DeprecationWarning: elsewhere"


def test_compat_asyncore_is_the_imported_asyncore_module() -> None:
    """``_compat.asyncore`` is ``sys.modules['asyncore']``, with the API the package uses."""
    assert _compat.asyncore is sys.modules["asyncore"]
    for name in ("dispatcher", "loop", "poll2"):
        assert callable(getattr(_compat.asyncore, name)), name


def test_missing_asyncore_fails_with_an_import_error_naming_the_fix() -> None:
    """Without asyncore, importing the package fails with "pip install pyasyncore" in the error."""
    result = python("-c", "import sys; sys.modules['asyncore'] = None; import asyncore_fwd")
    assert result.returncode != 0
    last = result.stderr.splitlines()[-1]
    assert last.startswith("ImportError: "), result.stderr
    assert "pip install pyasyncore" in last


def test_article_lowercase_names_are_the_classes() -> None:
    """``forwarder``, ``receiver`` and ``sender`` import, and are ``Forwarder``, ``Receiver``, ``Sender``."""
    from asyncore_fwd import Forwarder, Receiver, Sender, forwarder, receiver, sender

    assert forwarder is Forwarder
    assert receiver is Receiver
    assert sender is Sender


def test_all_lists_the_classes_and_only_existing_names() -> None:
    """``__all__`` has Forwarder, Receiver and Sender, and every name in it exists."""
    assert {"Forwarder", "Receiver", "Sender"} <= set(asyncore_fwd.__all__)
    missing: List[str] = [name for name in asyncore_fwd.__all__ if not hasattr(asyncore_fwd, name)]
    assert missing == []


@pytest.mark.parametrize("name", ["Forwarder", "Receiver", "Sender"])
def test_public_dispatchers_subclass_asyncore_dispatcher(name: str) -> None:
    """Each public dispatcher class is an ``asyncore.dispatcher`` (of the asyncore in use)."""
    assert issubclass(getattr(asyncore_fwd, name), sys.modules["asyncore"].dispatcher)


def test_package_ships_py_typed() -> None:
    """The ``py.typed`` marker is in the installed package."""
    assert resources.files("asyncore_fwd").joinpath("py.typed").is_file()
