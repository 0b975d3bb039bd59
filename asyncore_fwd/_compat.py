"""The one place that imports :mod:`asyncore`.

Python 3.10 and 3.11 ship ``asyncore`` in the standard library but warn on
import that it is deprecated; 3.12 removed it, and the ``pyasyncore``
backport installs the very same module under the same name.  Everything else
in this package does ``from ._compat import asyncore`` so that the choice, the
silenced warning and the error message live here only.
"""

import sys
import warnings

__all__ = ["asyncore"]

try:
    with warnings.catch_warnings():
        # The stdlib module warns "asyncore is deprecated" when imported on
        # 3.10/3.11.  We know, and depend on it on purpose: silence that one
        # warning for this one import, so that ``python -W error`` still works.
        warnings.simplefilter("ignore", DeprecationWarning)
        import asyncore
except ImportError:  # pragma: no cover - depends on the interpreter
    raise ImportError(
        f"asyncore_fwd needs the asyncore module, which Python "
        f"{sys.version_info.major}.{sys.version_info.minor} does not have: "
        f"install the backport with 'pip install pyasyncore'"
    ) from None
