"""The trace as JSON lines: one JSON object per event, for programs and the browser viewer.

Strategy: each event becomes one object with the schema's version ``v``
and its time offset ``t`` (seconds since tracing began); fields that say
nothing for an event (an empty result, no descriptor) are left out, so a
line holds what it means.  The first line is a ``meta`` event, the last a
``summary``.  The schema is documented with the viewer (docs/trace-viewer.md);
a change that breaks a reader raises ``VERSION``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, Dict, List, Optional, TextIO

from ._events import END, IO, START, WAIT, TraceEvent
from ._summary import Summary

__all__ = ["VERSION", "JsonLinesRenderer", "as_dict"]

#: The schema's version, the ``v`` of every line.
VERSION = 1

_CALL_KINDS = (START, END, IO)


def as_dict(event: TraceEvent, origin: float, thread: int = 1) -> Dict[str, Any]:
    """One event as the JSON object written for it (``thread``: the thread's number in the trace, from 1)."""
    data: Dict[str, Any] = {"v": VERSION, "kind": event.kind, "t": round(event.time - origin, 6),
                            "round": event.round, "thread": thread, "depth": event.depth}
    if event.kind in _CALL_KINDS:
        data.update(fd=event.fd, obj=event.object, call=event.call)
        if event.listener:
            data["listener"] = True
    elif event.kind == WAIT:
        data["call"] = event.call
        data["ready"] = [list(pair) for pair in event.ready]
    for name, value in (("args", event.arguments), ("result", event.result), ("why", event.why),
                        ("error", event.error)):
        if value:
            data[name] = value
    if event.kind == IO:
        data["bytes"] = event.nbytes
        if event.quiet:
            data["quiet"] = True
    return data


class JsonLinesRenderer:
    """Writes each event as a line of JSON to a stream, then a summary line at ``close()``."""

    def __init__(self, stream: Optional[TextIO] = None, argv: Optional[List[str]] = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.origin = time.time()
        self.summary = Summary()
        self._threads: Dict[int, int] = {}  # thread ident -> its number in the trace, from 1
        self._lock = threading.Lock()
        self._write({"v": VERSION, "kind": "meta", "t": 0.0, "started": self.origin,
                     "argv": list(sys.argv if argv is None else argv)})

    def wants_events(self) -> bool:
        return True

    def event(self, event: TraceEvent) -> None:
        self.summary.add(event)
        thread = self._threads.get(event.thread)
        if thread is None:
            with self._lock:
                thread = self._threads.setdefault(event.thread, len(self._threads) + 1)
        self._write(as_dict(event, self.origin, thread))

    def close(self) -> None:
        end = self.summary.last if self.summary.last is not None else time.time()
        self._write({"v": VERSION, "kind": "summary", "t": round(end - self.origin, 6), **self.summary.as_dict()})
        self.stream.flush()

    def _write(self, data: Dict[str, Any]) -> None:
        line = json.dumps(data, separators=(",", ":"), ensure_ascii=False) + "\n"
        with self._lock:  # one whole line at a time, whichever thread writes
            self.stream.write(line)
