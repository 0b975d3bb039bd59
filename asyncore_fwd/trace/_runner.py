"""``python -m asyncore_fwd.trace [OPTIONS] SCRIPT [ARGS...]``: a script run as Python would, traced.

Strategy: the runner's own options come before SCRIPT and are read by hand
(everything after SCRIPT is the script's, whatever it looks like); then the
script runs as ``__main__`` with tracing on, and tracing stops, with its
summary, however the script ends.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Dict, Optional, Sequence, TextIO

from ._capture import disable
from ._enable import FORMATS, enable
from ._filter import parse_filter

__all__ = ["USAGE", "main"]

PROG = "python -m asyncore_fwd.trace"

USAGE = f"usage: {PROG} [--format text|jsonl] [--times] [--filter TERMS] [--output FILE] SCRIPT [ARGS...]\n" \
        "Runs SCRIPT as __main__ with ARGS, writing a trace of its asyncore loop to stderr, then a summary.\n" \
        "  --format text|jsonl  lines of text (default), or one JSON object per event (for the viewer)\n" \
        "  --times              begin each text line with its time offset, +SECONDS (jsonl always has it)\n" \
        "  --filter TERMS       only these dispatchers: NAME (a class), NAME#N, fdN, and no-listener;\n" \
        "                       comma-separated, e.g. receiver#1,fd8 or no-listener\n" \
        "  --output FILE        write the trace to FILE instead of stderr\n"

_TAKES_VALUE = ("--format", "--filter", "--output")


def _fail(message: str) -> int:
    sys.stderr.write(f"{PROG}: {message}\n")
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a script as ``__main__`` with tracing on; return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        (sys.stdout if args else sys.stderr).write(USAGE)
        return 0 if args else 2
    options: Dict[str, object] = {"--format": "text", "--times": False, "--filter": None, "--output": None}
    while args and args[0].startswith("--"):
        name, _, value = args.pop(0).partition("=")
        if name == "--times" and not value:
            options[name] = True
        elif name in _TAKES_VALUE:
            if not value:
                if not args:
                    return _fail(f"{name} needs a value")
                value = args.pop(0)
            options[name] = value
        else:
            return _fail(f"unknown option {name} (the script's own options go after SCRIPT)")
    if options["--format"] not in FORMATS:
        return _fail(f"bad --format {options['--format']!r}: expected text or jsonl")
    if options["--filter"] is not None:
        try:
            parse_filter(str(options["--filter"]))
        except ValueError as error:
            return _fail(str(error))
    if not args:
        return _fail("no SCRIPT given")
    script = args[0]
    if not os.path.isfile(script):
        return _fail(f"no such file: {script}")
    output: TextIO = sys.stderr
    if options["--output"] is not None:
        try:
            output = open(str(options["--output"]), "w", encoding="utf-8")
        except OSError as error:
            return _fail(f"cannot write {options['--output']}: {error.strerror}")
    # What `python SCRIPT ARGS` would have: its arguments, and its directory first on the path.
    sys.argv = args
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    only = options["--filter"]
    enable(output, format=str(options["--format"]), times=bool(options["--times"]), summary=True,
           only=None if only is None else str(only))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        disable()
        if output is not sys.stderr:
            output.close()
    return 0


