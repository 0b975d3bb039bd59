"""The summary at the end of a trace: rounds per second, and each dispatcher's bytes and pauses.

Strategy: fed every event a renderer writes, it keeps a few numbers per
dispatcher: bytes read and sent, whether it read an EOF or was reset, and
how long it was *paused*: from a ``readable()`` that answered False to the
next that answered True (or to its ``close()``, or the end).  Rounds per
second are the rounds seen over the time from the first event to the last.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from ._events import END, IO, TraceEvent

__all__ = ["Summary"]


class _Totals:
    """One dispatcher's numbers."""

    __slots__ = ("fd", "read", "sent", "eof", "reset", "paused", "paused_since")

    def __init__(self) -> None:
        self.fd: Optional[int] = None
        self.read = self.sent = 0
        self.eof = self.reset = False
        self.paused = 0.0
        self.paused_since: Optional[float] = None


class Summary:
    """What a trace came to, from its events."""

    def __init__(self) -> None:
        self.first: Optional[float] = None
        self.last: Optional[float] = None
        self._rounds: set = set()
        self._objects: Dict[str, _Totals] = {}

    def add(self, event: TraceEvent) -> None:
        if self.first is None:
            self.first = event.time
        self.last = event.time
        if event.round is not None:
            self._rounds.add(event.round)
        if not event.object:
            return
        totals = self._objects.get(event.object)
        if totals is None:
            totals = self._objects[event.object] = _Totals()
        if event.fd is not None:
            totals.fd = event.fd
        if event.kind == IO:
            if event.result == "reset":
                totals.reset = True
            elif event.result == "EOF":
                totals.eof = True
            elif event.call == "send":
                totals.sent += event.nbytes
            else:
                totals.read += event.nbytes
        elif event.kind == END and event.depth == 0 and event.call == "readable" and not event.error:
            if event.result == "False" and totals.paused_since is None:
                totals.paused_since = event.time
            elif event.result == "True":
                self._end_pause(totals, event.time)
        elif event.kind == END and event.call == "close":
            self._end_pause(totals, event.time)

    @staticmethod
    def _end_pause(totals: _Totals, now: float) -> None:
        if totals.paused_since is not None:
            totals.paused += now - totals.paused_since
            totals.paused_since = None

    def as_dict(self) -> Dict[str, Any]:
        """The summary as plain data (the JSON lines' last event)."""
        seconds = (self.last or 0.0) - (self.first or 0.0)
        rounds = len(self._rounds)
        objects: List[Dict[str, Any]] = []
        for name, totals in self._objects.items():
            paused = totals.paused + ((self.last or 0.0) - totals.paused_since
                                      if totals.paused_since is not None else 0.0)
            objects.append({"obj": name, "fd": totals.fd, "read": totals.read, "sent": totals.sent,
                            "eof": totals.eof, "reset": totals.reset, "paused": round(paused, 6)})
        return {"rounds": rounds, "seconds": round(seconds, 6),
                "rounds_per_second": round(rounds / seconds, 1) if seconds > 0 else None, "objects": objects}

    def lines(self) -> List[str]:
        """The summary as lines of text."""
        data = self.as_dict()
        rate = data["rounds_per_second"]
        lines = [f"summary: {data['rounds']} rounds in {data['seconds']:.3f}s"
                 + (f", {rate:g} rounds/s" if rate is not None else "")]
        for entry in data["objects"]:
            what = [f"read {entry['read']}B", f"sent {entry['sent']}B"]
            what += [mark for mark, seen in (("EOF", entry["eof"]), ("reset", entry["reset"])) if seen]
            fd = "-" if entry["fd"] is None else entry["fd"]
            lines.append(f"summary: fd{fd} {entry['obj']} {', '.join(what)}; paused {entry['paused']:.3f}s")
        return lines
