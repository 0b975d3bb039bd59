"""The dispatcher base of asyncore_fwd: asyncore's dispatcher, fit for a server's loop.

Three things asyncore's own ``dispatcher`` lacks.  Its messages (``log_info``)
go to ``logging``, not to stdout.  It tells an epoll loop at once when its
socket joins or leaves the map (``channel_changed``/``channel_removed``), so
that loop need not find out in its next sweep.  And it can name a ``partner``,
a dispatcher whose readiness its events change, for the loop to ask again
after them.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Protocol

from .._compat import asyncore
from .._net import PerMap, SocketMap

__all__ = ["ChangeWatcher", "Dispatcher", "channel_changed", "channel_removed", "unwatch", "watch"]

log = logging.getLogger("asyncore_fwd")


class ChangeWatcher(Protocol):
    """A loop that keeps what it asked of a map's dispatchers between rounds (``EpollLoop``),
    told by ours when to ask again."""

    def added(self, channel: Any) -> None:
        """``channel`` joined the map, or what it waits for changed: ask its predicates again."""

    def removed(self, fd: int, channel: Any) -> None:
        """``channel`` left the map; ``fd`` was its descriptor."""


# Which loop watches which map: lets our dispatchers announce themselves as
# they join or leave a map, with no scan.
_watchers: PerMap[ChangeWatcher] = PerMap()


def watch(map: SocketMap, watcher: ChangeWatcher) -> None:
    """From now on, tell ``watcher`` of the changes of our dispatchers in ``map``."""
    _watchers.set(map, watcher)


def unwatch(map: SocketMap, watcher: ChangeWatcher) -> None:
    """Stop telling ``watcher`` (if it is still the one watching ``map``)."""
    _watchers.forget(map, watcher)


def channel_changed(channel: Any) -> None:
    """Ask ``channel``'s predicates again before the next wait.

    Called by asyncore_fwd's dispatchers when they join a map, and when
    something other than their own events (a timer) changed what they wait for.
    """
    watcher = _watchers.get(channel._map)
    if watcher is not None:
        watcher.added(channel)


def channel_removed(channel: Any, fd: Optional[int]) -> None:
    """Called by asyncore_fwd's dispatchers when they leave a map."""
    watcher = _watchers.get(channel._map)
    if watcher is not None and fd is not None:
        watcher.removed(fd, channel)


class Dispatcher(asyncore.dispatcher):
    """asyncore's dispatcher, with its messages sent to ``logging`` instead of stdout."""

    # What asyncore sets on every dispatcher and its type stubs leave out (or
    # optional, though ours always have a socket while in a map).
    _map: SocketMap
    _fileno: Optional[int]
    socket: Any
    addr: Any

    #: The other dispatcher whose readiness this one's events change, or None: after this
    #: one handled an event, an epoll loop asks that one's ``readable()`` and ``writable()``
    #: again too (a relay side's partner is its peer, whose ``readable()`` follows its buffer).
    partner: Optional[asyncore.dispatcher] = None

    _LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

    def log_info(self, message: str, type: str = "info") -> None:
        log.log(self._LEVELS.get(type, logging.INFO), "%r: %s", self, message)

    # An epoll loop keeps registrations between rounds: tell it at once when
    # a socket joins or leaves the map, rather than wait for its next sweep.
    def add_channel(self, map: Optional[SocketMap] = None) -> None:
        super().add_channel(map)
        channel_changed(self)

    def del_channel(self, map: Optional[SocketMap] = None) -> None:
        fd = self._fileno
        super().del_channel(map)
        channel_removed(self, fd)
