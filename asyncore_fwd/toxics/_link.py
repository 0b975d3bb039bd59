"""How toxics act on a connection: the hooks of a ``Toxic``, and the ``_Link`` that calls them.

A connection with toxics gets a ``_Link`` per direction.  The link takes the
place of five methods of that connection's two sides only, and passes the
bytes and the EOF of its direction through its toxics in order; what they
hold counts towards backpressure (``_cost``), and they let bytes out only
while the writer has room (``writer_full``, ``when_written``).
"""

from __future__ import annotations

import functools
import random
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from .._eventloop import _loop
from .._eventloop._timers import timers_for

if TYPE_CHECKING:
    from .._relay._connection import Connection
    from .._relay._copy import _Pipe

__all__ = ["Deliver", "DeliverEof", "Toxic", "UNSENT_LIMIT"]

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
        self._predicates_changed()

    def _predicates_changed(self) -> None:
        # The loop asks both sides again: a quiet read of the other direction would not.
        _loop.channel_changed(self.writer)
        _loop.channel_changed(self.reader)

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
        self._predicates_changed()
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

    def _forward(self, data: bytes | memoryview) -> bool:
        self.pass_on(None, bytes(data))  # a copy: the read buffer is reused
        return False  # held or sent by the toxics: the loop asks both sides again

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

