"""``python -m asyncore_fwd.trace SCRIPT [ARGS...]``: a script run as Python would, traced."""

from __future__ import annotations

import os
import runpy
import sys
from typing import Optional, Sequence

from ._capture import disable
from ._text import enable

__all__ = ["USAGE", "main"]

USAGE = "usage: python -m asyncore_fwd.trace SCRIPT [ARGS...]\n" \
        "Runs SCRIPT as __main__ with ARGS, writing a trace of its asyncore loop to stderr.\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a script as ``__main__`` with tracing on; return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        (sys.stdout if args else sys.stderr).write(USAGE)
        return 0 if args else 2
    script = args[0]
    if not os.path.isfile(script):
        sys.stderr.write(f"python -m asyncore_fwd.trace: no such file: {script}\n")
        return 2
    # What `python SCRIPT ARGS` would have: its arguments, and its directory first on the path.
    sys.argv = args
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    enable(sys.stderr)
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        disable()
    return 0
