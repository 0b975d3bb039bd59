"""The copy relay: what both sides of a connection do, and the client's side.

Both halves are the same idea -- "what I read, my peer writes" -- so they
share one base class, ``_Pipe``, as in Twisted's ``portforward.Proxy``;
``Receiver`` is the client's side, and ``Sender`` (``_sender``) the
server's, which connects first.  The ``Connection`` that owns a pair
(``_connection``) is the one place where it is created and closed.  The
zero-copy relay (``_splice``) subclasses these sides and changes only how
bytes move.

Strategy:

* **Backpressure.**  A side is ``readable()`` only while the bytes waiting
  for its peer are under ``high_water``.  When the slow side cannot keep up,
  the fast side simply stops being asked for reads, and the kernel's own
  buffers push back on the sender.  Memory per connection is bounded.
* **Half-close.**  EOF on one side is not the end of the connection: first
  everything already read from that side is written to the other one, then
  the EOF is passed on with ``shutdown(SHUT_WR)``.  The pair closes when both
  directions have done this, or at once on an error.  A side that has seen
  EOF stops asking for read events, so the loop does not spin on it.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
from typing import Any, Callable, Dict, Optional

from .._compat import asyncore
from .._eventloop import _loop
from .._eventloop._dispatcher import Dispatcher
from .._eventloop._loop import QUIET_READ
from .._net import LINGER_ABORT, acknowledge_urgent, os_error, pending_error, set_keepalive, tune
from ._connection import STOPPED, Connection, cut

__all__ = ["Receiver"]

log = logging.getLogger("asyncore_fwd")

#: The most a diverted read takes at once (``divert_reads``) when its taker does not say:
#: a header's worth.  What the taker passes on to the peer then stays small.
DIVERTED_READ = 4096

# What decides a quiet read: a class that answers one of them otherwise than the relay
# (``_Pipe`` or a class that vouches for its own, with ``plain_predicates = True`` in its
# body) has its predicates asked after every read.
_PREDICATES = ("readable", "writable", "read_room", "handle_read", "forward")


def _answers_as_the_relay(cls: type) -> bool:
    """Whether each of ``_PREDICATES`` comes, by ``cls``'s MRO, from ``_Pipe`` or a subclass that vouches for it."""
    for name in _PREDICATES:
        owner = next(klass for klass in cls.__mro__ if name in vars(klass))
        if owner is not _Pipe and not vars(owner).get("_vouches", False):
            return False
    return True


class _Pipe(Dispatcher):
    """One socket of a forwarded pair: what it reads goes to its peer.

    ``outgoing`` holds the bytes read from the peer that this socket has not
    sent yet; ``eof_received`` is set when this socket reads EOF;
    ``write_closed`` once the peer's EOF has been passed on here.
    ``reset_error`` holds a reset whose SO_ERROR was read (which clears it)
    before the bytes that came ahead of it: the EOF that follows them is
    that reset, not a clean end.
    """

    role = "?"
    peer: _Pipe
    #: Whether this class's ``readable()``, ``writable()``, ``read_room()``, ``handle_read()``
    #: and ``forward()`` are the relay's own, which a read that went out whole leaves as they
    #: were (``handle_read``).  False for a subclass that overrides one of them (itself, or by a
    #: base or mixin), unless it says True in its own body.  A method put on the class or on an
    #: instance later is not seen: set ``plain_predicates = False`` there too.
    plain_predicates = True
    _vouches = False  # set by __init_subclass__: says plain_predicates = True in its own body
    reset_error: Optional[OSError] = None
    _diverted: Optional[_Diverted] = None

    def __init__(self, conn: Connection, sock: Optional[socket.socket] = None) -> None:
        self.conn = conn
        self.outgoing = bytearray()
        self.eof_received = False
        self.write_closed = False
        self.bytes_sent = 0
        super().__init__(sock, map=conn.forwarder._map)
        if sock is not None:  # the client's (the server's is made by its connect)
            tune(sock)
            if conn.rule.tcp_keepalive:
                set_keepalive(sock, conn.rule.tcp_keepalive)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = vars(cls).get("plain_predicates")
        cls._vouches = declared is True  # its own methods answer as the relay's would
        if declared is None:  # found from where each method comes: mixins and bases included
            cls.plain_predicates = _answers_as_the_relay(cls)

    # -- select() predicates --------------------------------------------

    def readable(self) -> bool:
        """Read while the pair relays, until EOF, and while the peer keeps up."""
        # read_room() > 0, written out: the loop asks this of every side each round.
        return (self.conn.established and not self.eof_received
                and len(self.peer.outgoing) < self.conn.rule.high_water)

    def read_room(self) -> int:
        """How many bytes a read may take now: the room under the peer's high-water
        mark, 0 or less when this side must not read.  ``handle_read`` reads up
        to it: a subclass that holds reads back overrides it and ``readable()``."""
        if not self.conn.established or self.eof_received:
            return 0
        return self.conn.rule.high_water - len(self.peer.outgoing)

    def writable(self) -> bool:
        """Ask for write events only when there is something to send."""
        return bool(self.outgoing)

    # -- event handlers ---------------------------------------------------

    def handle_read(self) -> Any:  # QUIET_READ: a quiet read (EpollLoop); else None
        """Called when the socket has data or EOF: hand the bytes to the peer."""
        # Read no more than the room under the peer's high-water mark: what
        # waits for the peer never exceeds it, however large a read may be.
        room = self.read_room()
        if room <= 0 and not self.readable():
            return None  # a stale event (the pair closed, or the peer filled up this round)
        # (No room, yet readable: a subclass's readable() lets the read
        # through.  Fill the buffer, as asyncore_fwd did before it bounded reads.)
        scratch = self.conn.forwarder.scratch
        try:
            count = self.socket.recv_into(scratch, room if 0 < room < len(scratch) else 0)
        except (BlockingIOError, InterruptedError):
            return None  # spurious readiness: nothing to read after all
        except OSError as error:
            self.conn.abort(self, error)
            return None
        if not count:
            self.handle_eof()
            return None
        # All of it sent at once, nothing queued: neither side's readable() or
        # writable() can have changed, if they are the relay's own.  QUIET_READ
        # tells EpollLoop so, and it does not ask them again (a quiet read).
        peer = self.peer
        if peer.forward(scratch[:count]) and self.plain_predicates and peer.plain_predicates:
            return QUIET_READ
        return None

    def handle_write(self) -> None:
        """Called when the socket can take more: send what the peer read, then its EOF."""
        if self.outgoing:
            try:
                sent = self.socket.send(self.outgoing)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                self.conn.abort(self, error)
                return
            # bytearray deletes from the front without copying the rest.
            del self.outgoing[:sent]
            self.bytes_sent += sent
        if not self.outgoing and self.peer.eof_received:
            self.shutdown_write()

    def handle_close(self) -> None:
        """Called by the poll loop on POLLHUP/POLLERR, and by asyncore on a reset.

        A hang-up is not a reason to drop data: the kernel may still hold
        bytes the peer sent before its FIN or reset, so keep reading (and
        writing) as usual; EOF and errors are handled where they are seen.
        """
        if self.conn.closed:
            return
        code = pending_error(self.socket)
        if code == errno.ECONNRESET and self.readable():
            # Reading SO_ERROR cleared the reset: relay what came before it,
            # then the EOF that recv() now reports is passed on as the reset.
            self.reset_error = os_error(code)
        elif code:
            self.conn.abort(self, os_error(code))
            return
        if self.readable():
            self.handle_read()
        elif self.writable():
            self.handle_write()

    def handle_expt_event(self) -> None:
        """Called on TCP urgent data.

        asyncore's version reads SO_ERROR (clearing it) and then calls
        ``handle_close``: a reset that arrived with the urgent byte would be
        lost and read as a clean EOF.  Errors are left to ``handle_read``.
        """
        self.handle_expt()

    def handle_expt(self) -> None:
        """Urgent bytes stay in line (SO_OOBINLINE): read them in their place.

        A paused side cannot read now, but select() would report the urgent
        byte every round until it is read: acknowledge it where it stands.
        """
        if self.readable():
            self.handle_read()
        elif not self.conn.closed:
            acknowledge_urgent(self.socket)

    def handle_error(self) -> None:
        """Called by the loop when a handler raised: close this pair only."""
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            log.exception("%r: internal error", self.conn)
        self.conn.abort(self, error or RuntimeError("unknown error"))

    # -- helpers ----------------------------------------------------------

    def handle_eof(self) -> None:
        """This socket read EOF: pass it on once everything read from it is written."""
        if self.reset_error is not None:
            self.conn.abort(self, self.reset_error)
            return
        self.eof_received = True
        self.conn.side_finished(self)
        if not self.peer.outgoing:
            self.peer.shutdown_write()

    def forward(self, data: bytes | memoryview) -> bool:
        """Queue bytes read by the peer; send at once if nothing is queued.
        True if all of them went out at once (nothing queued, before or after)."""
        if not self.outgoing:
            # The common case on a fast path: one send straight from the read
            # buffer saves a copy and a round of the loop.
            try:
                sent = self.socket.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as error:
                self.conn.abort(self, error)
                return False
            self.bytes_sent += sent
            if sent == len(data):
                return True
            data = data[sent:]
        self.outgoing += data
        return False

    def queue_first(self, data: bytes) -> None:
        """Queue ``data`` ahead of anything the peer reads (the pair does not relay yet):
        sent, and counted in ``bytes_sent``, once this side is connected."""
        self.outgoing += data

    def divert_reads(self, received: Optional[Callable[[bytes], None]],
                     wanted: Optional[Callable[[], int]] = None) -> None:
        """Hand what this socket reads to ``received(data)`` (b"" at EOF) instead of the peer,
        whether the pair relays or not; None gives the reads back.  ``wanted()``, if given,
        is the most each read takes (the rest stays in the socket); else ``DIVERTED_READ``.

        For a step that reads the client before the server connect: like a
        toxic, it takes the place of two methods of this side only.
        """
        if self._diverted is not None:
            self._diverted.give_back()
            del self._diverted
        if received is not None:
            self._diverted = _Diverted(self, received, wanted)
        _loop.channel_changed(self)

    def shutdown_write(self) -> None:
        """Pass the peer's EOF on; close the pair if the other way is done too."""
        if self.write_closed:
            return
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as error:
            self.conn.abort(self, error)
            return
        self.write_closed = True
        if self.peer.write_closed:
            self.conn.close()
        else:
            self.conn.direction_ended()

    def reset_on_close(self) -> None:
        """Make the coming close send RST instead of FIN (only once connected)."""
        if self.connected:
            try:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
            except OSError:
                pass

    def close_socket(self) -> None:
        """Close this socket and forget its buffer (the pair is closing)."""
        self.outgoing = bytearray()
        asyncore.dispatcher.close(self)

    def close(self) -> None:
        """Closing either side from outside (e.g. ``asyncore.close_all``) cuts the whole pair."""
        cut([self.conn], STOPPED)

    def why_not_readable(self) -> Optional[str]:
        """Why ``readable()`` says False, in a few words; None if no reason is known.

        For the trace mode and other observers: the loop never calls it.
        """
        if self.conn.closed:
            return "pair closed"
        if not self.conn.established:
            return "server not connected yet"
        if self.eof_received:
            return "EOF received"
        held = len(self.peer.outgoing)
        if held >= self.conn.rule.high_water:
            amount = (f"{held}B" if held < 1024 else f"{round(held / 1024, 1):g}K" if held < 1024 * 1024
                      else f"{round(held / (1024 * 1024), 1):g}M")
            return f"peer holds {amount} >= high water"
        if getattr(self.peer.outgoing, "blocked", False):  # a splice side's kernel pipe
            return "peer's pipe is full"
        return None


class _Diverted:
    """The reads of one side, taken for someone else (see ``_Pipe.divert_reads``)."""

    def __init__(self, side: _Pipe, received: Callable[[bytes], None],
                 wanted: Optional[Callable[[], int]] = None) -> None:
        self.side, self.received, self.wanted, self.ended = side, received, wanted, False
        self.installed: Dict[str, Any] = {"readable": self.readable, "handle_read": self.handle_read}
        # What it replaces may be another taker's (a toxic's): put that back after.
        self.replaced = {name: side.__dict__[name] for name in self.installed if name in side.__dict__}
        side.__dict__.update(self.installed)

    def give_back(self) -> None:
        for name, method in self.installed.items():
            if self.side.__dict__.get(name) is method:  # (not if another taker came since)
                del self.side.__dict__[name]
                if name in self.replaced:
                    self.side.__dict__[name] = self.replaced[name]

    def readable(self) -> bool:
        """Until EOF, while the pair is open."""
        return not self.ended and not self.side.conn.closed

    def handle_read(self) -> None:
        side = self.side
        if not self.readable():
            return
        scratch = side.conn.forwarder.scratch
        most = DIVERTED_READ if self.wanted is None else max(1, self.wanted())
        try:
            count = side.socket.recv_into(scratch, min(most, len(scratch)))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            side.conn.abort(side, error)
            return
        if not count and side.reset_error is not None:  # an EOF that stands for a reset
            side.conn.abort(side, side.reset_error)
            return
        self.ended = not count
        self.received(bytes(scratch[:count]))


class Receiver(_Pipe):
    """The client's side of a connection (the article's ``receiver``)."""

    role = "client"
