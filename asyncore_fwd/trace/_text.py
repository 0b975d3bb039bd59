"""The trace as lines of text: one renderer of the captured events.

Strategy: a call is shown once, when it ends, with what it came to; a call
that other shown lines are made from is shown first when the first of them
is, so that they appear indented under it, and again, with its result, when
it ends (if it has one to say).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Dict, List, Optional, TextIO

from ._events import END, IDLE, IO, START, WAIT, TraceEvent
from ._summary import Summary

__all__ = ["TextRenderer", "line", "log"]

log = logging.getLogger("asyncore_fwd.trace")


def line(event: TraceEvent) -> str:
    """What an event says, without its round and indentation: ``fd8 Sender#1 handle_read() -> read 24B``."""
    if event.kind == IDLE:
        return "nothing to watch"
    if event.kind == WAIT:
        text = f"{event.call}({event.arguments})"
        if event.error:
            return f"{text} raised {event.error}"
        count, plural = len(event.ready), "" if len(event.ready) == 1 else "s"
        fds = ", ".join(f"fd{fd} {names}" for fd, names in event.ready)
        return f"{text} -> {count} event{plural}" + (f": {fds}" if fds else "")
    text = f"fd{'-' if event.fd is None else event.fd} {event.object} {event.call}({event.arguments})"
    if event.kind == IO:
        return f"{text} -> {event.result}"
    if event.error:
        return f"{text} raised {event.error}"
    if event.kind == END and event.result:
        return f"{text} -> {event.result}" + (f" ({event.why})" if event.why else "")
    return text


class _Pending:
    """A call in progress, and whether its line was shown already (a call made from it had one)."""

    __slots__ = ("event", "shown")

    def __init__(self, event: TraceEvent) -> None:
        self.event, self.shown = event, False


class TextRenderer:
    """The events as lines logged at DEBUG level: ``r5   fd8 Sender#1 handle_read() -> read 24B``.

    With a ``stream``, the logger writes bare lines to it, and only there,
    until ``close()``.  With ``times``, each line begins with the seconds since
    tracing began (``+0.012``); with ``summary``, ``close()`` writes the summary.
    """

    def __init__(self, logger: logging.Logger, stream: Optional[TextIO] = None, times: bool = False,
                 summary: bool = False) -> None:
        self.logger = logger
        self.origin = time.time()
        self.times = times
        self.summary = Summary() if summary else None
        self._handler: Optional[logging.Handler] = None
        self._saved_logger_state = (logger.level, logger.propagate)
        if stream is not None:
            self._handler = logging.StreamHandler(stream)
            self._handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(self._handler)
            logger.setLevel(logging.DEBUG)
            logger.propagate = False
        #: Each thread's calls in progress, outermost first.
        self._pending: Dict[int, List[_Pending]] = {}
        self._lock = threading.Lock()

    def wants_events(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)

    def event(self, event: TraceEvent) -> None:
        if self.summary is not None:
            self.summary.add(event)
        if event.kind == IO and event.quiet:
            return  # asyncore_fwd's sides: their handler's line says what they moved
        pending = self._pending.get(event.thread)
        if pending is None:
            with self._lock:
                pending = self._pending.setdefault(event.thread, [])
        if event.kind == START:
            pending.append(_Pending(event))  # shown when it ends, or when a call it makes is
            return
        if event.kind == END:
            call = pending.pop()
            if not (event.error or event.result) and call.shown:
                return  # shown at its start, and it has nothing to add
        # Lines of the calls this one is made from come first, once each.
        for outer in pending:
            if not outer.shown:
                outer.shown = True
                self._write(event, outer.event.depth, line(outer.event))
        self._write(event, event.depth, line(event))

    def _write(self, now: TraceEvent, depth: int, text: str) -> None:
        where = "r-" if now.round is None else f"r{now.round}"
        if self.times:
            where = f"+{now.time - self.origin:.3f} {where}"
        self.logger.debug("%s %s%s", where, "  " * depth, text)

    def close(self) -> None:
        if self.summary is not None:
            for text in self.summary.lines():
                self.logger.debug("%s", text)
        if self._handler is not None:
            self.logger.removeHandler(self._handler)
            self.logger.level, self.logger.propagate = self._saved_logger_state
