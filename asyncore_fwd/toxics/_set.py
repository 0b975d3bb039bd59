"""A forwarder's toxics: the handles ``add_toxic`` returns, and the set that applies them to connections."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from .._relay._connection import ConnectionObserver
from ._link import Toxic, _Link

if TYPE_CHECKING:
    from .._relay._connection import Connection

__all__ = ["DIRECTIONS", "ToxicHandle", "ToxicSet"]

#: The directions a toxic can act on.
DIRECTIONS = ("upstream", "downstream", "both")


class ToxicHandle:
    """What ``add_toxic`` returns: the toxic and the direction it acts on."""

    def __init__(self, toxic: Toxic, direction: str) -> None:
        self.toxic, self.direction = toxic, direction

    def __repr__(self) -> str:
        return f"<{self.toxic!r} {self.direction}>"


class ToxicSet(ConnectionObserver):
    """A forwarder's toxics, and the links they act through (it observes the forwarder's
    connections).  Used in the loop's thread only."""

    def __init__(self, seed: Optional[int]) -> None:
        self.handles: List[ToxicHandle] = []
        self.rng = random.Random(seed)
        self._links: Dict[Connection, Dict[str, _Link]] = {}

    def add(self, handle: ToxicHandle, connections: Any) -> None:
        self.handles.append(handle)
        for conn in list(connections):
            self._apply(handle, conn)

    def remove(self, handle: ToxicHandle) -> None:
        self.handles.remove(handle)
        for links in list(self._links.values()):  # a removal may close a connection
            for link in list(links.values()):
                if handle.toxic in link.toxics:
                    link.remove(handle.toxic)

    def opened(self, conn: Connection) -> None:
        for handle in self.handles:
            self._apply(handle, conn)

    def closed(self, conn: Connection) -> None:
        for link in self._links.pop(conn, {}).values():
            link.drop()

    def holds(self, conn: Connection) -> bool:
        """True while the toxics of ``conn`` hold bytes back that were not yet sent on."""
        return any(link.held for link in self._links.get(conn, {}).values())

    def _apply(self, handle: ToxicHandle, conn: Connection) -> None:
        if conn.closed or self.rng.random() >= handle.toxic.toxicity:
            return
        links = self._links.setdefault(conn, {})
        directions = ("upstream", "downstream") if handle.direction == "both" else (handle.direction,)
        for direction in directions:
            link = links.get(direction)
            if link is None:
                sides: Any = (conn.receiver, conn.sender)  # the copy relay's: toxics refuse splice
                reader, writer = sides if direction == "upstream" else sides[::-1]
                link = links[direction] = _Link(conn, reader, writer, self.rng)
            link.add(handle.toxic)
