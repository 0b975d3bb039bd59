"""Toxics: faults injected into a forwarder's connections, to test clients.

Put a ``Forwarder`` between a client under test and its server, then add
toxics while it runs::

    from asyncore_fwd import Forwarder
    from asyncore_fwd.toxics import Latency

    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", server_port, map={}, seed=1)
    with fwd.running():
        with fwd.toxic(Latency(0.2), direction="downstream"):
            ...   # every reply now arrives 200 ms late
        with fwd.down():
            ...   # connects are refused, open connections reset

A toxic acts on one direction of each connection: ``"upstream"`` (client to
server), ``"downstream"`` (server to client) or ``"both"``; ``toxicity`` is
the share of connections it applies to, drawn with the forwarder's ``seed``
so that a failing test can be replayed.  It acts on open connections and new
ones from the moment ``add_toxic`` returns, until it is removed.

How it works: a connection with toxics gets a ``_Link`` per direction, which
takes the place of five methods *of that connection's sides only*
(``forward``, ``shutdown_write`` and ``handle_write`` of the side that
writes, ``readable`` and ``read_room`` of the side that reads), passing
bytes and EOF through the toxics in order.
Connections without toxics run the plain relay: nothing is checked per byte.
Bytes a toxic holds count towards backpressure, so memory stays bounded;
a toxic lets bytes out only while the writing side has room, so a peer
that does not read costs no wakeups.
Toxics need the copy relay: with ``splice=True`` bytes never enter Python.
"""

from __future__ import annotations

import collections
import functools
import random
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from ._eventloop import _loop
from ._eventloop._timers import Timer, timers_for
from ._values._parse import parse_decimal, parse_duration, parse_size, shorten

if TYPE_CHECKING:
    from ._relay._copy import Connection, _Pipe

__all__ = ["Bandwidth", "Latency", "LimitData", "ResetPeer", "SlowClose", "Slicer", "Timeout", "Toxic",
           "DIRECTIONS"]

#: The directions a toxic can act on.
DIRECTIONS = ("upstream", "downstream", "both")

Deliver = Callable[[bytes], None]
DeliverEof = Callable[[], None]


def _number(name: str, value: object, lowest: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lowest <= value < float("inf"):
        raise ValueError(f"{name} must be a number >= {lowest:g}, not {value!r}")
    return float(value)


class Toxic:
    """A fault for one direction of a connection; this base passes everything on unchanged.

    Its hooks run in the loop's thread, once per ``_Link`` (one direction of
    one connection); per-link state goes in ``link.state[self]``.
    """

    def __init__(self, toxicity: float = 1.0) -> None:
        if _number("toxicity", toxicity) > 1:
            raise ValueError(f"toxicity must be from 0 to 1, not {toxicity!r}")
        self.toxicity = float(toxicity)

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({fields})"

    def attached(self, link: _Link) -> None:
        """Called when the toxic starts acting on ``link``."""

    def data(self, link: _Link, data: bytes, deliver: Deliver) -> None:
        """Called with bytes on their way; ``deliver`` passes them on (now or later)."""
        deliver(data)

    def eof(self, link: _Link, deliver_eof: DeliverEof) -> None:
        """Called when the EOF reaches this toxic, after every byte before it."""
        deliver_eof()

    def detached(self, link: _Link) -> None:
        """Called when the toxic is removed: pass on at once what it still holds."""


#: What an entry of a toxic's queue costs besides its bytes: the bytes object's
#: header, the (due, data) tuple, a float, the deque's slot.  Counted as held:
#: else a stream of tiny segments would hold many times high_water.
_ENTRY_COST = sys.getsizeof(b"") + sys.getsizeof((0.0, b"")) + sys.getsizeof(0.0) + 8


def _cost(data: bytes) -> int:
    return len(data) + _ENTRY_COST


def _cancel_timer(toxic: Toxic, link: _Link) -> None:
    """``detached`` of a toxic whose state on a link is one pending timer (or nothing)."""
    timer: Optional[Timer] = link.state.pop(toxic, None)
    if timer is not None:
        timer.cancel()


class _Queue(Toxic):
    """A toxic that holds bytes in order and lets them out on its timers.

    Its state on a link: ``queue`` of (due, bytes) entries, the first one
    let out from ``offset`` on; ``timer``, what lets the next bytes out (a
    ``Timer``, or a wait for the writer to have room); ``eof``, the EOF held
    until the queue is empty.
    """

    def attached(self, link: _Link) -> None:
        link.state[self] = {"queue": collections.deque(), "offset": 0, "timer": None, "eof": None}

    def data(self, link: _Link, data: bytes, deliver: Deliver) -> None:
        state = link.state[self]
        state["queue"].append(self._enqueue(link, data))
        link.hold(_cost(data))
        if state["timer"] is None:
            self._schedule(link, deliver)

    def eof(self, link: _Link, deliver_eof: DeliverEof) -> None:
        state = link.state[self]
        if state["queue"] or state["timer"] is not None:
            state["eof"] = deliver_eof  # after the last byte
        else:
            deliver_eof()

    def detached(self, link: _Link) -> None:
        state = link.state.pop(self, None)
        if state is None:
            return  # detached already (closing the connection while flushing)
        if state["timer"] is not None:
            state["timer"].cancel()
        # Emptied first: this may run inside one of our own timers (a send
        # failed and closed the connection), whose loop then finds nothing left.
        entries, offset = list(state["queue"]), state["offset"]
        state["queue"].clear()
        for _, data in entries:
            link.release(_cost(data))
            link.pass_on(self, data[offset:])
            offset = 0
        if state["eof"] is not None:
            state["eof"]()

    def _enqueue(self, link: _Link, data: bytes) -> Tuple[float, bytes]:
        raise NotImplementedError

    def _schedule(self, link: _Link, deliver: Deliver) -> None:
        """Set the timer that calls ``_due`` when the next bytes may go."""
        raise NotImplementedError

    def _let_out(self, link: _Link, state: Dict[str, Any], deliver: Deliver) -> None:
        """Pass on what may go now (while the writer has room), with ``_take`` and ``deliver``."""
        raise NotImplementedError

    def _due(self, link: _Link, deliver: Deliver) -> None:
        """The timer: let out what may go, and set the next one."""
        state = link.state.get(self)
        if state is None:
            return
        state["timer"] = None
        if link.writer_full():
            # The peer is not reading: firing on time would find no room, again
            # and again.  Start again once the writer has sent what it holds.
            state["timer"] = link.when_written(self._schedule, link, deliver)
            return
        self._let_out(link, state, deliver)
        if self not in link.state:
            return  # a send failed and closed the connection, which detached this toxic
        if state["queue"]:
            self._schedule(link, deliver)
        self._drained(link)

    def _take(self, link: _Link, state: Dict[str, Any], size: int) -> bytes:
        """Up to ``size`` bytes from the front of the queue.

        The rest of an entry stays in place, from ``offset``: cutting it off
        would copy it again for every segment.  So the entry is held, and
        counted, until its last byte goes.
        """
        queue = state["queue"]
        data, start = queue[0][1], state["offset"]
        if start + size < len(data):
            state["offset"] = start + size
            return data[start:start + size]
        queue.popleft()
        state["offset"] = 0
        link.release(_cost(data))
        return data[start:]  # the entry itself if it goes whole

    def _drained(self, link: _Link) -> None:
        state = link.state.get(self)
        if state is not None and not state["queue"] and state["eof"] is not None:
            deliver_eof, state["eof"] = state["eof"], None
            deliver_eof()


class Latency(_Queue):
    """Delay every byte by ``seconds`` (plus or minus up to ``jitter``), keeping their order."""

    def __init__(self, seconds: float, jitter: float = 0.0, toxicity: float = 1.0) -> None:
        super().__init__(toxicity)
        self.seconds = _number("seconds", seconds)
        self.jitter = _number("jitter", jitter)

    def _enqueue(self, link: _Link, data: bytes) -> Tuple[float, bytes]:
        due = link.now() + self.seconds + (link.rng.uniform(-self.jitter, self.jitter) if self.jitter else 0.0)
        queue = link.state[self]["queue"]
        return (max(due, queue[-1][0]) if queue else due), data  # never overtake

    def _schedule(self, link: _Link, deliver: Deliver) -> None:
        state = link.state[self]
        state["timer"] = link.timers.call_at(state["queue"][0][0], self._due, link, deliver)

    def _let_out(self, link: _Link, state: Dict[str, Any], deliver: Deliver) -> None:
        queue, now = state["queue"], link.now()
        while queue and queue[0][0] <= now and not link.writer_full():
            deliver(self._take(link, state, len(queue[0][1])))


class Bandwidth(_Queue):
    """Let at most ``bytes_per_second`` through."""

    #: How often the queue is let out: small enough to be smooth, big enough to be cheap.
    TICK = 0.01

    def __init__(self, bytes_per_second: float, toxicity: float = 1.0) -> None:
        super().__init__(toxicity)
        self.bytes_per_second = _number("bytes_per_second", bytes_per_second, lowest=1.0)

    def attached(self, link: _Link) -> None:
        super().attached(link)
        link.state[self]["allowance"], link.state[self]["since"] = 0.0, link.now()

    def _enqueue(self, link: _Link, data: bytes) -> Tuple[float, bytes]:
        return 0.0, data

    def _schedule(self, link: _Link, deliver: Deliver) -> None:
        state = link.state[self]
        state["since"] = max(state["since"], link.now() - self.TICK)  # no credit saved while idle
        state["timer"] = link.timers.call_later(self.TICK, self._due, link, deliver)

    def _let_out(self, link: _Link, state: Dict[str, Any], deliver: Deliver) -> None:
        now = link.now()
        allowance = state["allowance"] + (now - state["since"]) * self.bytes_per_second
        state["since"] = now
        queue = state["queue"]
        while queue and allowance >= 1 and not link.writer_full():
            data = self._take(link, state, int(allowance))
            allowance -= len(data)
            deliver(data)
        state["allowance"] = allowance if queue else 0.0  # no credit saved while idle


class Slicer(_Queue):
    """Cut the stream into segments of about ``average_size`` bytes, ``delay`` seconds apart."""

    def __init__(self, average_size: int, size_variation: int = 0, delay: float = 0.0,
                 toxicity: float = 1.0) -> None:
        super().__init__(toxicity)
        if isinstance(average_size, bool) or not isinstance(average_size, int) or average_size < 1:
            raise ValueError(f"average_size must be a positive integer, not {average_size!r}")
        if isinstance(size_variation, bool) or not isinstance(size_variation, int) or \
                not 0 <= size_variation < average_size:
            raise ValueError(f"size_variation must be an integer from 0 to average_size - 1, not {size_variation!r}")
        self.average_size, self.size_variation = average_size, size_variation
        self.delay = _number("delay", delay)

    def _enqueue(self, link: _Link, data: bytes) -> Tuple[float, bytes]:
        return 0.0, data

    def _schedule(self, link: _Link, deliver: Deliver) -> None:
        state = link.state[self]
        state["timer"] = link.timers.call_later(self.delay, self._due, link, deliver)

    def _let_out(self, link: _Link, state: Dict[str, Any], deliver: Deliver) -> None:
        queue = state["queue"]
        while queue and not link.writer_full():
            size = self.average_size + link.rng.randint(-self.size_variation, self.size_variation)
            deliver(self._take(link, state, size))
            if self.delay:
                break  # one segment per delay


class Timeout(Toxic):
    """Stop relaying: drop the bytes, and close the connection after ``seconds`` (never with 0)."""

    def __init__(self, seconds: float, toxicity: float = 1.0) -> None:
        super().__init__(toxicity)
        self.seconds = _number("seconds", seconds)

    def attached(self, link: _Link) -> None:
        if self.seconds:
            link.state[self] = link.timers.call_later(self.seconds, link.conn.close)

    def data(self, link: _Link, data: bytes, deliver: Deliver) -> None:
        pass  # dropped, as on a dead network path

    def eof(self, link: _Link, deliver_eof: DeliverEof) -> None:
        pass

    detached = _cancel_timer


class LimitData(Toxic):
    """Pass on ``bytes`` bytes, then close the connection cleanly (after writing them)."""

    def __init__(self, bytes: int, toxicity: float = 1.0) -> None:
        super().__init__(toxicity)
        if isinstance(bytes, bool) or not isinstance(bytes, int) or bytes < 0:
            raise ValueError(f"bytes must be an integer >= 0, not {bytes!r}")
        self.bytes = bytes

    def attached(self, link: _Link) -> None:
        link.state[self] = self.bytes
        if not self.bytes:
            link.close_when_written()

    def data(self, link: _Link, data: bytes, deliver: Deliver) -> None:
        left = link.state[self]
        if left <= 0:
            return
        link.state[self] = left - len(data)
        deliver(data[:left])
        if left <= len(data):
            link.close_when_written()


class ResetPeer(Toxic):
    """Reset the connection (RST to both peers) ``after`` seconds."""

    def __init__(self, after: float = 0.0, toxicity: float = 1.0) -> None:
        super().__init__(toxicity)
        self.after = _number("after", after)

    def attached(self, link: _Link) -> None:
        link.state[self] = link.timers.call_later(self.after, link.reset)

    detached = _cancel_timer


class SlowClose(Toxic):
    """Delay the EOF by ``seconds``."""

    def __init__(self, seconds: float, toxicity: float = 1.0) -> None:
        super().__init__(toxicity)
        self.seconds = _number("seconds", seconds)

    def eof(self, link: _Link, deliver_eof: DeliverEof) -> None:
        link.state[self] = (link.timers.call_later(self.seconds, deliver_eof), deliver_eof)

    def detached(self, link: _Link) -> None:
        held: Optional[Tuple[Timer, DeliverEof]] = link.state.pop(self, None)
        if held is not None and not held[0].cancelled:
            held[0].cancel()
            held[1]()  # the EOF goes on now


class _Wait:
    """A call to make once the writer has sent all it holds; ``cancel()`` drops it, as a Timer's does."""

    __slots__ = ("callback", "args", "cancelled")

    def __init__(self, callback: Callable[..., Any], args: Tuple[Any, ...]) -> None:
        self.callback, self.args, self.cancelled = callback, args, False

    def cancel(self) -> None:
        self.cancelled = True


#: How many bytes the kernel may keep unsent for the writer of a link
#: (TCP_NOTSENT_LOWAT): beyond that, a send takes no more and the writer's
#: own queue fills, which is how a link sees a peer that does not read.
#: Without it, the kernel's send buffer (up to 4 MiB on Linux) would take a
#: slow toxic's output for minutes, every segment waking the loop.
UNSENT_LIMIT = 64 * 1024

_NOTSENT_LOWAT: Optional[int] = getattr(socket, "TCP_NOTSENT_LOWAT", None)


class _Link:
    """One direction of one connection with toxics: from ``reader`` to ``writer``."""

    def __init__(self, conn: Connection, reader: _Pipe, writer: _Pipe, rng: random.Random) -> None:
        self.conn, self.reader, self.writer, self.rng = conn, reader, writer, rng
        self.timers = timers_for(conn.forwarder._map)
        self.toxics: List[Toxic] = []
        self.state: Dict[Toxic, Any] = {}
        #: What the toxics hold, in bytes of memory (``_cost``): at most high_water.
        self.held = 0
        #: Set by ``close_when_written``: read no more; close once the writer is done.
        self.blocked = False
        self._eof_started = self._eof_through = False
        self.installed = False
        self._waits: List[_Wait] = []
        self._unsent_limited = False

    def install(self) -> None:
        """Take the place of five methods of these two sides only."""
        self.writer.forward = self._forward  # type: ignore[method-assign]
        self.writer.shutdown_write = self._shutdown_write  # type: ignore[method-assign]
        self.writer.handle_write = self._handle_write  # type: ignore[method-assign]
        self.reader.readable = self._readable  # type: ignore[method-assign]
        self.reader.read_room = self._read_room  # type: ignore[method-assign]
        self.installed = True

    def now(self) -> float:
        return time.monotonic()

    def add(self, toxic: Toxic) -> None:
        if not self.installed:
            self.install()
        self.toxics.append(toxic)
        toxic.attached(self)

    def remove(self, toxic: Toxic) -> None:
        toxic.detached(self)  # may close the connection (its flushed EOF fails): then drop() ran
        if toxic in self.toxics:
            self.toxics.remove(toxic)
        self.state.pop(toxic, None)
        if not self.toxics and not self.conn.closed and not self.held and not self.blocked:
            self.uninstall()

    def uninstall(self) -> None:
        """Give the sides their plain methods back."""
        for side, name in ((self.writer, "forward"), (self.writer, "shutdown_write"), (self.writer, "handle_write"),
                           (self.reader, "readable"), (self.reader, "read_room")):
            side.__dict__.pop(name, None)
        self.installed = False
        if self._unsent_limited:
            self._limit_unsent(0)  # the system's default again
        if self._eof_started and not self._eof_through and not self.conn.closed:
            self._eof_through = True
            self._final_eof()

    def drop(self) -> None:
        """The connection closed: stop every timer (what they would pass on goes nowhere)."""
        for toxic in list(self.toxics):
            toxic.detached(self)
        self.toxics.clear()

    # -- the four methods --------------------------------------------------------

    def _forward(self, data: bytes | memoryview) -> None:
        self.pass_on(None, bytes(data))  # a copy: the read buffer is reused

    def _handle_write(self) -> None:
        type(self.writer).handle_write(self.writer)
        if self.writer.outgoing or self.conn.closed:
            return
        if self.blocked:
            self.conn.close()  # close_when_written: all of it is written now
            return
        waits, self._waits = self._waits, []
        for wait in waits:
            if not wait.cancelled:
                wait.cancelled = True
                wait.callback(*wait.args)

    def _readable(self) -> bool:
        return self._read_room() > 0

    def _read_room(self) -> int:
        # The toxic's own high-water mark: what it holds, like what waits to be written.
        # A read is one more entry in a toxic's queue: its cost is part of the room.
        if self.blocked:
            return 0
        return min(type(self.reader).read_room(self.reader), self.conn.rule.high_water - self.held - _ENTRY_COST)

    def _shutdown_write(self) -> None:
        if self._eof_through:
            type(self.writer).shutdown_write(self.writer)
        elif not self._eof_started:
            self._eof_started = True
            self._eof_after(None)

    # -- passing along the toxics ---------------------------------------------------

    def pass_on(self, after: Optional[Toxic], data: bytes) -> None:
        """Hand ``data`` to the toxic after ``after`` (the first if None), or to the writer."""
        if self.conn.closed:
            return
        index = 0 if after is None else self.toxics.index(after) + 1
        if index < len(self.toxics):
            toxic = self.toxics[index]
            toxic.data(self, data, functools.partial(self.pass_on, toxic))
            return
        if not self._unsent_limited:
            self._limit_unsent(UNSENT_LIMIT)  # once connected: the first bytes come only then
        type(self.writer).forward(self.writer, data)
        _loop.channel_changed(self.writer)
        _loop.channel_changed(self.reader)

    def _eof_after(self, after: Optional[Toxic]) -> None:
        if self.conn.closed:
            return
        index = 0 if after is None else self.toxics.index(after) + 1
        if index < len(self.toxics):
            toxic = self.toxics[index]
            toxic.eof(self, functools.partial(self._eof_after_if_present, toxic))
            return
        self._eof_through = True
        self._final_eof()

    def _eof_after_if_present(self, toxic: Toxic) -> None:
        if toxic in self.toxics:  # not if it was removed meanwhile (its removal passed the EOF on)
            self._eof_after(toxic)

    def _final_eof(self) -> None:
        if not self.writer.outgoing:
            type(self.writer).shutdown_write(self.writer)
        _loop.channel_changed(self.writer)

    def hold(self, count: int) -> None:
        self.held += count

    def release(self, count: int) -> None:
        self.held -= count
        _loop.channel_changed(self.reader)

    # -- waiting for the writer ----------------------------------------------------

    def writer_full(self) -> bool:
        """True while the writer holds bytes its socket would not take: the peer is not reading."""
        return bool(self.writer.outgoing)

    def when_written(self, callback: Callable[..., Any], *args: Any) -> _Wait:
        """Call ``callback(*args)`` once the writer has sent all it holds (its own write
        events tell: nothing polls)."""
        wait = _Wait(callback, args)
        self._waits.append(wait)
        return wait

    def _limit_unsent(self, limit: int) -> None:
        self._unsent_limited = bool(limit)
        if _NOTSENT_LOWAT is not None:
            try:
                self.writer.socket.setsockopt(socket.IPPROTO_TCP, _NOTSENT_LOWAT, limit)
            except OSError:
                pass  # not TCP (a test's socketpair), or an old kernel: the send buffer bounds it

    # -- ending the connection ------------------------------------------------------

    def close_when_written(self) -> None:
        """Stop reading; close the pair (cleanly) once the writer has sent what it has.

        With bytes still queued, the close waits on the writer's own sends
        (``_handle_write``): a peer that never reads costs no wakeups until
        the connection ends some other way.
        """
        self.blocked = True
        if self.conn.closed:
            return
        _loop.channel_changed(self.reader)  # readable() just turned false
        if not self.writer.outgoing:
            self.conn.close()

    def reset(self) -> None:
        """Reset both peers at once."""
        self.conn.close_early("toxic: reset_peer")


class ToxicHandle:
    """What ``add_toxic`` returns: the toxic and the direction it acts on."""

    def __init__(self, toxic: Toxic, direction: str) -> None:
        self.toxic, self.direction = toxic, direction

    def __repr__(self) -> str:
        return f"<{self.toxic!r} {self.direction}>"


class ToxicSet:
    """A forwarder's toxics, and the links they act through.  Used in the loop's thread only."""

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

    def connection_opened(self, conn: Connection) -> None:
        for handle in self.handles:
            self._apply(handle, conn)

    def connection_closed(self, conn: Connection) -> None:
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
                reader, writer = ((conn.receiver, conn.sender) if direction == "upstream"
                                  else (conn.sender, conn.receiver))
                link = links[direction] = _Link(conn, reader, writer, self.rng)
            link.add(handle.toxic)



# -- toxics from the command line: --toxic SPEC --------------------------------------

class _Spec(NamedTuple):
    """How a spec names one toxic: its class and the kind of each parameter (a key of ``_KINDS``)."""

    cls: type
    main: str  # the parameter that NAME=VALUE sets
    kinds: Dict[str, str]
    main_required: bool = True  # False where NAME alone will do: the class has a default for it


#: name in a spec -> how it is spelt
_SPECS: Dict[str, _Spec] = {
    "latency": _Spec(Latency, "seconds", {"seconds": "time", "jitter": "time"}),
    "bandwidth": _Spec(Bandwidth, "bytes_per_second", {"bytes_per_second": "size"}),
    "slicer": _Spec(Slicer, "average_size", {"average_size": "size", "size_variation": "bytes", "delay": "time"}),
    "timeout": _Spec(Timeout, "seconds", {"seconds": "time"}),
    "limit_data": _Spec(LimitData, "bytes", {"bytes": "bytes"}),
    "reset_peer": _Spec(ResetPeer, "after", {"after": "time"}, main_required=False),
    "slow_close": _Spec(SlowClose, "seconds", {"seconds": "time"}),
}
#: the parameters every toxic takes (those of ``Toxic``)
_COMMON_KINDS = {"toxicity": "share"}


def _share(text: str) -> float:
    try:
        return parse_decimal(text)  # its range is the toxic's to check
    except ValueError:
        raise ValueError("expected a number from 0 to 1, like 0.5") from None


#: kind of parameter -> its parser: a value from its text, or ValueError saying what was expected
_KINDS: Dict[str, Callable[[str], float]] = {"time": parse_duration, "size": parse_size,
                                             "bytes": functools.partial(parse_size, zero_ok=True), "share": _share}


def parse_toxic_spec(text: str) -> Tuple[Toxic, str]:
    """``[DIRECTION:]NAME[=VALUE][,KEY=VALUE...]`` as (toxic, direction), e.g.

    ``downstream:latency=100ms,jitter=10ms``, ``upstream:bandwidth=64K``,
    ``both:reset_peer=2s,toxicity=0.5``.  The direction defaults to
    downstream; ValueError with a one-line message if the spec is bad.
    """
    shown = shorten(repr(text))
    direction, _, body = text.rpartition(":")
    direction = direction or "downstream"
    if direction not in DIRECTIONS:
        raise ValueError(f"bad toxic {shown}: direction must be one of {', '.join(DIRECTIONS)}, "
                         f"not {shorten(repr(direction))}")
    first, *options = body.split(",")
    name, _, main_value = first.partition("=")
    if name not in _SPECS:
        raise ValueError(f"bad toxic {shown}: unknown toxic {shorten(repr(name))} (one of {', '.join(_SPECS)})")
    spec = _SPECS[name]
    kinds = {**spec.kinds, **_COMMON_KINDS}
    arguments: Dict[str, Any] = {}
    for key, value in [(spec.main, main_value)] * bool(main_value) + [option.partition("=")[::2] for option in options]:
        if key not in kinds:
            raise ValueError(f"bad toxic {shown}: {name} has no option {shorten(repr(key))} "
                             f"(it takes {', '.join(kinds)})")
        if key in arguments:
            raise ValueError(f"bad toxic {shown}: {key} given twice")
        try:
            arguments[key] = _KINDS[kinds[key]](value)
        except ValueError as error:
            raise ValueError(f"bad toxic {shown}: {key}: {error}, not {shorten(repr(value))}") from None
    if spec.main_required and spec.main not in arguments:
        raise ValueError(f"bad toxic {shown}: give its {spec.main}, as in {name}=VALUE")
    try:
        return spec.cls(**arguments), direction
    except ValueError as error:
        raise ValueError(f"bad toxic {shown}: {error}") from None
