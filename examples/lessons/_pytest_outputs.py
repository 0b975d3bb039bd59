"""The lesson tests' outputs for the pages: counts, the -v listing, the failures a step fixes.

pytest runs in this process, on tests/test_lessons.py, with a small plugin
that keeps only the tests a page is about; what it prints is captured and
cut down to the lines the pages show.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent.parent


def run_pytest(args: List[str], keep: Optional[Callable[[object], bool]] = None) -> str:
    """Run pytest on tests/test_lessons.py in this process; return what it printed.

    ``keep`` (an item -> bool), if given, deselects the other collected tests.
    """
    import pytest

    class Select:
        @pytest.hookimpl(trylast=True)
        def pytest_collection_modifyitems(self, items: list, config: object) -> None:
            if keep is not None:
                items[:] = [item for item in items if keep(item)]

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pytest.main(["-p", "no:cacheprovider", "--rootdir", str(ROOT), "tests/test_lessons.py", *args],
                     plugins=[Select()])
    return out.getvalue()


def collected(step: int) -> list:
    """The tests ``-k stepNN`` selects, collected but not run."""
    items: list = []

    def keep(item: object) -> bool:
        items.append(item)
        return False

    run_pytest(["--collect-only", "-q", "-k", f"step{step:02d}"], keep)
    return items


def counts(step: int) -> str:
    """``N passed, M xfailed`` of ``pytest tests/test_lessons.py -k stepNN``.

    The xfails are the tests marked so (strict, from FIXED_IN): the suite
    fails if one of them passes, or if another one does not.
    """
    items = collected(step)
    xfailed = sum(1 for item in items if item.get_closest_marker("xfail") is not None)  # type: ignore[attr-defined]
    passed = len(items) - xfailed
    return f"{passed} passed, {xfailed} xfailed" if xfailed else f"{passed} passed"


def verbose(step: int) -> str:
    """The result lines of ``pytest tests/test_lessons.py -v -k stepNN``."""
    printed = run_pytest(["-v", "-k", f"step{step:02d}"])
    return "\n".join(line for line in printed.splitlines() if line.startswith("tests/test_lessons.py::"))


def failures(step: int, test: str = "", captured: bool = False) -> str:
    """How the tests that step ``step`` fixes fail at the step before, with ``--runxfail``.

    One line per failure (the first ``E`` line of its traceback), then the
    ``FAILED`` lines of the short summary.  ``test`` keeps only the tests
    whose name starts with it; ``captured`` adds, before each ``E`` line,
    what the step printed or logged (``error: ...``, ``WARNING ...``).
    """
    fixed_here = f"fixed in step{step:02d}"

    def keep(item: object) -> bool:
        marker = item.get_closest_marker("xfail")  # type: ignore[attr-defined]
        return (marker is not None and str(marker.kwargs.get("reason", "")).endswith(fixed_here)
                and item.name.startswith(test))  # type: ignore[attr-defined]

    printed = run_pytest(["-q", "--runxfail", "--tb=short", "-rf", "-k", f"step{step - 1:02d}"], keep)
    blocks: Dict[str, List[str]] = {}
    failed: List[str] = []
    block = ""
    for line in printed.splitlines():
        heading = re.match(r"_+ (\S+) _+$", line)
        if heading:
            block = heading.group(1)
            blocks[block] = []
        elif line.startswith("E   ") and block and not any(seen.startswith("E   ") for seen in blocks[block]):
            blocks[block].append(line.rstrip())
        elif captured and block and line.startswith(("error: ", "WARNING ")):
            blocks[block].insert(len(blocks[block]) - 1 if blocks[block] else 0, line)
        elif line.startswith("FAILED "):
            failed.append(line.split(" - ")[0])
    return "\n".join([line for lines in blocks.values() for line in lines] + failed)
