"""The trace's filter: only some dispatchers, by name or descriptor, with or without the listener.

Strategy: a renderer in front of another; it passes on the kernel waits and
the round marks always (they give the rounds), and a dispatcher's events
when they match.  A call's start and end match alike (both carry the
descriptor and the name the call began with), so nesting stays whole.
"""

from __future__ import annotations

import re
from typing import FrozenSet, NamedTuple, Optional

from ._events import IDLE, WAIT, Renderer, TraceEvent

__all__ = ["Filter", "Filtered", "parse_filter"]

_TERM = re.compile(r"^(?:fd(?P<fd>\d+)|(?P<name>[A-Za-z_]\w*(?:#\d+)?)|(?P<no_listener>no-listener))$")


class Filter(NamedTuple):
    """What to keep: these names ("receiver", "Sender#2") and descriptors (none: all), and the listener."""

    names: FrozenSet[str] = frozenset()
    fds: FrozenSet[int] = frozenset()
    listener: bool = True


def parse_filter(text: str) -> Filter:
    """``receiver#1,fd8,no-listener``: names (a class, or one instance), descriptors, and
    ``no-listener``.  ValueError for anything else."""
    names, fds, listener = set(), set(), True
    for term in (part.strip() for part in text.split(",")):
        found = _TERM.match(term)
        if found is None:
            raise ValueError(f"bad trace filter term {term!r}: expected NAME, NAME#N, fdN or no-listener")
        if found.group("no_listener"):
            listener = False
        elif found.group("fd"):
            fds.add(int(found.group("fd")))
        else:
            names.add(found.group("name").lower())
    return Filter(frozenset(names), frozenset(fds), listener)


class Filtered:
    """A renderer that passes on only the events its filter keeps."""

    def __init__(self, renderer: Renderer, keep: Filter) -> None:
        self.renderer, self.keep = renderer, keep

    def wants_events(self) -> bool:
        return self.renderer.wants_events()

    def event(self, event: TraceEvent) -> None:
        if event.kind in (WAIT, IDLE) or self.keeps(event.object, event.fd, event.listener):
            self.renderer.event(event)

    def keeps(self, name: str, fd: Optional[int], listener: bool) -> bool:
        keep = self.keep
        if listener and not keep.listener:
            return False
        if not keep.names and not keep.fds:
            return True
        lowered = name.lower()
        return (fd is not None and fd in keep.fds) or lowered in keep.names or lowered.split("#")[0] in keep.names

    def close(self) -> None:
        self.renderer.close()
