"""``enable()``: tracing on, in either format, with the options the runner and ``--trace`` offer.

Strategy: pick the renderer for the format (text lines, or JSON lines),
put the filter in front of it if one is asked for, and hand it to capture.
"""

from __future__ import annotations

import logging
from typing import Optional, TextIO, Union

from ._capture import ALREADY_ENABLED, enable_with, is_enabled
from ._events import Renderer
from ._filter import Filtered, parse_filter
from ._jsonl import JsonLinesRenderer
from ._text import TextRenderer, log

__all__ = ["FORMATS", "enable"]

FORMATS = ("text", "jsonl")


def enable(output: Union[None, TextIO, logging.Logger] = None, *, format: str = "text", times: bool = False,
           summary: bool = False, only: Optional[str] = None) -> None:
    """Start tracing every asyncore loop and dispatcher in this process.

    Text lines are logged at DEBUG level to ``output`` if it is a logger; to
    the ``asyncore_fwd.trace`` logger, as plain lines, written to ``output``
    if it is a stream (``sys.stderr``...); or to that logger, as your logging
    set-up has it, if ``output`` is None.  ``times`` begins each line with
    its time offset; ``summary`` ends the trace with rounds per second and
    each dispatcher's bytes and pauses.  ``format="jsonl"`` writes one JSON
    object per event to ``output`` (a stream; stderr if None), always with
    times and the summary.  ``only`` is a filter, ``receiver#1,fd8,no-listener``:
    ValueError if it cannot be read.
    """
    if format not in FORMATS:
        raise ValueError(f"bad trace format {format!r}: expected one of {', '.join(FORMATS)}")
    keep = parse_filter(only) if only else None
    if is_enabled():  # before the logger is changed
        raise RuntimeError(ALREADY_ENABLED)
    renderer: Renderer
    if format == "jsonl":
        if isinstance(output, logging.Logger):
            raise ValueError("the jsonl trace is written to a stream, not a logger")
        renderer = JsonLinesRenderer(output)
    elif isinstance(output, logging.Logger):
        renderer = TextRenderer(output, times=times, summary=summary)
    else:
        renderer = TextRenderer(log, output, times=times, summary=summary)
    enable_with(Filtered(renderer, keep) if keep is not None else renderer)
