"""Loop backends: asyncore's select() and poll() loops, and an epoll() loop.

asyncore's own loops rebuild their whole descriptor list every round: they
ask every dispatcher ``readable()`` and ``writable()``, hand the lot to the
kernel, and look through the answer.  With 9,000 idle connections that is
18,000 predicate calls for every burst of activity on one of them.

Strategy of ``EpollLoop``: keep each descriptor registered with epoll between
rounds and ask its predicates again only when they may have changed:

* after a dispatcher handled an event, and its ``partner`` if it names one
  (``Dispatcher.partner``: a relay side's readiness depends on its peer's buffer),
  unless its ``handle_read()`` returned ``QUIET_READ``, a quiet read: it says
  that it changed neither's answers (a relay side whose bytes all went out at once);
* when a dispatcher joins the map, or a timer changes what it waits for
  (asyncore_fwd's dispatchers say so at once, with ``_dispatcher.channel_changed``;
  any other dispatcher is found by the periodic sweep);
* in a sweep of the whole map, at least every ``sweep_interval`` seconds and
  whenever a round sees no event at all, which is what keeps foreign
  dispatchers (and their time-based predicates) right.

The handlers are called as asyncore's poll loop calls them (its own
``readwrite()``), so any dispatcher works under it; the one shortcut, for
data on a connected socket, calls ``handle_read()`` as ``handle_read_event()``
would, with ``readwrite()``'s error handling.  A round with nothing to ask
again goes from the events straight to the next wait: at one connection the
Python run between a wake-up and the next wait is on the request's path.

Every backend here also serves the map's timers (``_timers``): the wait of a
round ends when the next timer is due, and due timers run after the round's
events.

select() cannot watch a descriptor past ``FD_SETSIZE`` (``SELECT_LIMIT``):
asyncore's select round raises ValueError for the whole round, every round.
Under the select backend, asyncore_fwd's dispatchers refuse such a socket as
they get it (``check_watchable``: a client is reset and accepting pauses, as
when descriptors run out), and the round fails any other dispatcher past the
limit with that same error instead of failing itself.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from typing import Any, Dict, FrozenSet, List, Optional, Set, Tuple

from .._compat import asyncore
from .._eventloop._timers import Timers, existing_timers
from .._net import PerMap, os_error
from ._dispatcher import channel_changed, channel_removed, unwatch, watch

# (channel_changed and channel_removed are _dispatcher's, here for the callers that name them here.)
__all__ = ["QUIET_READ", "AsyncoreLoop", "EpollLoop", "LOOP_KINDS", "SELECT_LIMIT", "ask_after_every_read",
           "best_loop_kind", "channel_changed",
           "channel_removed", "check_select_limit", "check_watchable", "loop", "open_loop"]

LOOP_KINDS = ("select", "poll", "epoll")

#: select() watches descriptors below this, FD_SETSIZE: 1024 on Linux, macOS
#: and the BSDs (Python does not expose it).  poll and epoll have no limit.
SELECT_LIMIT = 1024

# Which maps a select() loop serves: their sockets must stay under SELECT_LIMIT.
_select_loops: PerMap[AsyncoreLoop] = PerMap()


def best_loop_kind() -> str:
    """The most scalable loop this platform has."""
    if hasattr(select, "epoll"):
        return "epoll"
    return "poll" if hasattr(select, "poll") else "select"


def check_watchable(map: Dict[int, Any], sock: socket.socket) -> None:
    """OSError (EMFILE) if the loop serving ``map`` cannot watch ``sock``: a
    descriptor past select()'s limit.  Callers treat it as running out of
    descriptors."""
    if not watchable(map, sock):
        raise _unwatchable(sock.fileno())


def check_select_limit(map: Dict[int, Any]) -> None:
    """OSError (EMFILE) if ``map`` holds a descriptor select() cannot watch: for a
    start with ``--loop select``, which would leave such a listener deaf."""
    past = [fd for fd in map if fd >= SELECT_LIMIT]
    if past:
        raise _unwatchable(min(past))


def watchable(map: Dict[int, Any], sock: socket.socket) -> bool:
    """False if the loop serving ``map`` cannot watch ``sock`` (``check_watchable``)."""
    return sock.fileno() < SELECT_LIMIT or _select_loops.get(map) is None


def _unwatchable(fd: int) -> OSError:
    return os_error(errno.EMFILE, f"select() cannot watch descriptor {fd}: its limit is {SELECT_LIMIT - 1} "
                                  f"(poll and epoll have none)")


class EpollLoop:
    """An asyncore loop over ``map`` whose cost follows the active descriptors.

    Call ``poll(timeout)`` for each round; ``close()`` when done.
    """

    def __init__(self, map: Optional[Dict[int, Any]] = None, sweep_interval: float = 0.5) -> None:
        self.map = asyncore.socket_map if map is None else map
        self.sweep_interval = sweep_interval
        self._epoll = select.epoll()
        self._registered: Dict[int, Any] = {}   # fd -> dispatcher registered for it
        self._sockets: Dict[int, Any] = {}     # fd -> the socket registered (a dispatcher may replace its own)
        self._masks: Dict[int, int] = {}       # fd -> event mask registered
        self._dirty: Set[Any] = set()          # dispatchers whose predicates to ask again
        self._always_ready: Set[int] = set()   # registered fds epoll refuses (regular files), served each round
        self._next_sweep = 0.0
        self._timers: Optional[Timers] = None  # the map's timers, once it has some
        watch(self.map, self)

    def close(self) -> None:
        unwatch(self.map, self)
        self._epoll.close()

    def __enter__(self) -> EpollLoop:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- notifications (ChangeWatcher), from our dispatchers ---------------

    def added(self, channel: Any) -> None:
        self._dirty.add(channel)

    def removed(self, fd: int, channel: Any) -> None:
        if self._registered.get(fd) is channel:
            self._forget(fd)
        self._dirty.discard(channel)

    # -- running ----------------------------------------------------------

    def poll(self, timeout: float = 0.0) -> None:
        """One round: update registrations, wait up to ``timeout`` s, dispatch."""
        now = time.monotonic()
        if now >= self._next_sweep:
            self._sweep()
            self._next_sweep = now + self.sweep_interval
        if self._dirty:
            self._refresh()
        always_ready = self._always_ready
        if always_ready:
            for fd in [fd for fd in always_ready if self.map.get(fd) is not self._registered[fd]]:
                self._forget(fd)  # left the map: its "ready" would keep the wait at 0 until a sweep
        timers = self._timers
        if timers is None or timers.forgotten:  # (kept between rounds: a lookup fewer per round)
            timers = self._timers = existing_timers(self.map)
        if timers is not None and not timers._heap:
            timers = None  # none pending: two calls fewer per round (cancelled ones stay in the heap)
        if timers is not None:
            timeout = timers.wait_limit(timeout)
        try:
            # A wanted regular file is ready now, as poll() would say: no wait.
            events = self._epoll.poll(0 if always_ready else timeout)
        except InterruptedError:
            return
        if always_ready:
            masks = self._masks
            events += [(fd, masks[fd] & (select.EPOLLIN | select.EPOLLOUT)) for fd in always_ready]
        if not events:
            self._next_sweep = 0.0  # idle: a sweep costs nothing that matters now
            if timers is not None:
                timers.run_due()
            return
        # Typed Any: an identity test against what they hold says nothing of its type.
        map_: Any = self.map
        registered: Any = self._registered
        dirty, sockets, quiet = self._dirty, self._sockets, _quiet
        for fd, flags in events:
            channel = map_.get(fd)
            if channel is None or registered.get(fd) is not channel or sockets[fd] is not channel.socket:
                # Closed earlier in this round, and maybe its descriptor number
                # already reused: the event was for the old socket.
                continue
            if (flags == _READ_ONLY and channel.connected and not channel.accepting
                    and getattr(channel.handle_read_event, "__func__", None) is _PLAIN_READ_EVENT):
                # The common event: data on a connected socket.  asyncore's
                # readwrite() and handle_read_event() would end up here, two
                # calls later; a dispatcher with its own handle_read_event (a
                # subclass's, a patched or a traced one) goes the long way.
                # (Its bound method tells both: channel.__dict__ would cost every
                # later attribute read of the dispatcher its fast path.)
                try:
                    if channel.handle_read() is quiet:
                        continue  # a quiet read: its answers and its partner's are as registered
                except BaseException as error:
                    _failed(channel, error)
            else:
                asyncore.readwrite(channel, flags)
            dirty.add(channel)
            partner = getattr(channel, "partner", None)  # Dispatcher.partner, read from any dispatcher
            if getattr(partner, "_map", None) is map_:  # a dispatcher of this map (not some other value)
                dirty.add(partner)
        if timers is not None:
            timers.run_due()

    # -- helpers ----------------------------------------------------------

    def _sweep(self) -> None:
        """Ask every dispatcher again; find ones that joined or left unseen."""
        registered, sockets = self._registered, self._sockets
        for fd in [fd for fd, channel in registered.items()
                   if not _holds(self.map, fd, channel) or channel.socket is not sockets[fd]]:
            self._forget(fd)
        self._dirty.update(self.map.values())

    def _refresh(self) -> None:
        """Bring the epoll registrations of the dirty dispatchers up to date."""
        registered: Any = self._registered
        masks, epoll = self._masks, self._epoll
        # A predicate may change the map (a connect timing out starts the next
        # attempt): what it adds is asked next round.
        dirty, self._dirty = self._dirty, set()
        map_: Any = self.map
        for channel in dirty:
            fd = channel._fileno
            if fd is None or map_.get(fd) is not channel:
                continue
            mask = 0
            if channel.readable():
                mask = select.EPOLLIN | select.EPOLLPRI
            if channel.writable() and not channel.accepting:
                mask |= select.EPOLLOUT
            if registered.get(fd) is not channel or self._sockets[fd] is not channel.socket:
                if fd in registered:
                    self._forget(fd)
                if mask:
                    self._register(fd, channel, mask)
            elif mask != masks[fd]:
                if mask:
                    try:
                        epoll.modify(fd, mask)
                        masks[fd] = mask
                    except OSError:  # closed behind our back: register afresh
                        self._forget(fd)
                        self._register(fd, channel, mask)
                else:
                    self._forget(fd)

    def _register(self, fd: int, channel: Any, mask: int) -> None:
        try:
            self._epoll.register(fd, mask)
        except FileExistsError:  # a closed socket's fd, reused: epoll dropped the old one
            self._epoll.modify(fd, mask)
        except PermissionError:  # EPERM: no poll support (a regular file); poll() says always ready
            self._always_ready.add(fd)
        except OSError:
            return  # not a valid descriptor any more; the sweep will drop it
        self._registered[fd] = channel
        self._sockets[fd] = channel.socket
        self._masks[fd] = mask

    def _forget(self, fd: int) -> None:
        del self._registered[fd]
        del self._sockets[fd]
        del self._masks[fd]
        self._always_ready.discard(fd)
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass  # closed already: the kernel dropped it from the epoll set


_READ_ONLY = select.EPOLLIN
_PLAIN_READ_EVENT = asyncore.dispatcher.handle_read_event


class _Token:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: What a dispatcher's ``handle_read()`` returns to tell ``EpollLoop`` that the read changed
#: neither its own predicates' answers nor its partner's (a relay side whose bytes all went
#: out at once): the loop does not ask them again.  Any other value, True included, is ignored,
#: as asyncore ignores it.
QUIET_READ: Any = _Token("QUIET_READ")
# What EpollLoop takes as a quiet read: QUIET_READ, or while every predicate must be asked
# after every read (``ask_after_every_read``), a token that no handler returns.
_quiet: Any = QUIET_READ


def ask_after_every_read(on: bool) -> None:
    """Make ``EpollLoop`` ask the predicates again after every read, quiet or not (the trace
    turns it on, so that it shows every question the loop would otherwise ask)."""
    global _quiet
    _quiet = _Token("never") if on else QUIET_READ
# What asyncore's readwrite() lets through, and the errors it reads as a disconnect.
_RERAISED: Tuple[type, ...] = asyncore._reraised_exceptions  # type: ignore[attr-defined]
_DISCONNECTED: FrozenSet[int] = asyncore._DISCONNECTED  # type: ignore[attr-defined]


def _failed(channel: Any, error: BaseException) -> None:
    """A handler raised ``error``: what asyncore's ``readwrite()`` does then."""
    if isinstance(error, _RERAISED):
        raise error
    if isinstance(error, OSError) and error.errno in _DISCONNECTED:
        channel.handle_close()
    else:
        channel.handle_error()


def _holds(table: Dict[int, Any], fd: int, channel: Any) -> bool:
    """Whether ``table`` has ``channel`` itself at ``fd`` (not an older or newer dispatcher)."""
    return table.get(fd) is channel


class AsyncoreLoop:
    """asyncore's own poll() round, or its select() round (``select_round``),
    behind ``EpollLoop``'s interface."""

    def __init__(self, map: Optional[Dict[int, Any]] = None, use_poll: bool = True) -> None:
        self.map = asyncore.socket_map if map is None else map
        self._round = asyncore.poll2 if use_poll else select_round
        if not use_poll:
            _select_loops.set(self.map, self)

    def poll(self, timeout: float = 0.0) -> None:
        timers = existing_timers(self.map)
        if timers is None:
            self._round(timeout, self.map)
            return
        self._round(timers.wait_limit(timeout), self.map)
        timers.run_due()

    def close(self) -> None:
        _select_loops.forget(self.map, self)


def select_round(timeout: float, map: Dict[int, Any]) -> None:
    """asyncore's select() round (``asyncore.poll``), except that a dispatcher
    past ``SELECT_LIMIT`` that waits for an event fails with EMFILE, as its
    handlers would fail when out of descriptors, instead of the whole round
    failing with ValueError."""
    r: List[int] = []
    w: List[int] = []
    e: List[int] = []
    beyond: List[Tuple[int, Any]] = []
    for fd, obj in list(map.items()):
        is_r = obj.readable()
        is_w = obj.writable()
        if not (is_r or is_w):
            continue
        if fd >= SELECT_LIMIT:
            beyond.append((fd, obj))
            continue
        if is_r:
            r.append(fd)
        if is_w and not obj.accepting:  # a listener is never writable
            w.append(fd)
        e.append(fd)
    for fd, obj in beyond:
        try:
            raise _unwatchable(fd)
        except OSError as error:
            _failed(obj, error)
    if not e:
        if not beyond:
            time.sleep(timeout)
        return
    try:
        # asyncore's name for the module: asyncore_fwd.trace replaces it to show the answer.
        r, w, e = asyncore.select.select(r, w, e, timeout)  # type: ignore[attr-defined]
    except InterruptedError:
        return
    for fd in r:
        obj = map.get(fd)
        if obj is not None:
            asyncore.read(obj)
    for fd in w:
        obj = map.get(fd)
        if obj is not None:
            asyncore.write(obj)
    for fd in e:
        obj = map.get(fd)
        if obj is not None:
            asyncore._exception(obj)  # type: ignore[attr-defined]


def open_loop(kind: str, map: Optional[Dict[int, Any]] = None) -> Any:
    """The loop backend named ``kind`` ("auto", "epoll", "poll" or "select") over ``map``."""
    if kind == "auto":
        kind = best_loop_kind()
    if kind == "epoll":
        return EpollLoop(map)
    if kind in ("poll", "select"):
        return AsyncoreLoop(map, use_poll=kind == "poll")
    raise ValueError(f"loop must be 'auto' or one of {LOOP_KINDS}, not {kind!r}")


def loop(timeout: float = 30.0, use_poll: bool = False, map: Optional[Dict[int, Any]] = None,
         count: Optional[int] = None, *, kind: str = "auto") -> None:
    """A drop-in for ``asyncore.loop``: rounds until the map is empty, or ``count`` rounds.

    Takes asyncore's arguments in asyncore's order.  The backend is the one
    ``kind`` names; "auto" (the default) is the best one here, epoll on Linux.
    ``use_poll`` is accepted so that asyncore calls work unchanged, and does
    not change the backend: every backend serves every dispatcher as
    asyncore's own loops do (a regular file, which epoll refuses, is served
    as poll() would serve it: always ready).
    """
    backend = open_loop(kind, map)
    try:
        while backend.map and (count is None or count > 0):
            backend.poll(timeout)
            if count is not None:
                count -= 1
    finally:
        backend.close()
