"""The copy relay: a connection's two sides, and the connection that owns them.

Both halves are the same idea -- "what I read, my peer writes" -- so they
share one base class, ``_Pipe``, as in Twisted's ``portforward.Proxy``.  A
``Connection`` owns the pair: it is the one place where a pair is created
and closed, and it keeps what the logs report (addresses, bytes each way,
duration, who closed first).  The zero-copy relay (``_splice``) subclasses
these sides and changes only how bytes move.
"""

from __future__ import annotations

import errno
import itertools
import logging
import socket
import sys
import time
from typing import TYPE_CHECKING, Iterable, Optional, Tuple

from .._compat import asyncore
from .._eventloop import _loop
from .._eventloop._dispatcher import Dispatcher
from .._eventloop._runner import STOPPED  # why connections still open were cut: a stop() or close()
from .._eventloop._timers import Timer, timers_for
from .._net import (
    LINGER_ABORT,
    OUT_OF_RESOURCES,
    SockAddr,
    acknowledge_urgent,
    describe_error,
    end_key,
    format_address,
    os_error,
    pending_error,
    tune,
)
from .._ops._timeouts import Timeouts

if TYPE_CHECKING:
    from .._listener._forwarder import Forwarder

__all__ = ["Connection", "Receiver", "Sender", "cut"]

log = logging.getLogger("asyncore_fwd")



class Connection:
    """One forwarded connection: a ``Receiver``, a ``Sender`` and what happened to them.

    Created by the forwarder for each accepted client; closed once, by
    ``close()``, which tells the forwarder.
    """

    _ids = itertools.count(1)

    def __init__(self, forwarder: Forwarder, sock: socket.socket, client_address: SockAddr) -> None:
        self.id = next(self._ids)
        self.forwarder = forwarder
        self.rule = forwarder.rule
        self.client_address = client_address
        #: The server address actually connected to, once connected.
        self.server_address: Optional[SockAddr] = None
        self.opened_at = time.monotonic()
        #: When the server connect succeeded (None until then).
        self.connected_at: Optional[float] = None
        self.closed_at: Optional[float] = None
        #: True from the server connect until the pair closes: both sides may relay.
        self.established = False
        self.closed = False
        #: "client" or "server": the first side to send EOF or fail.
        self.closed_first: Optional[str] = None
        #: Why the pair closed early (reset, refused, timeout...), or None.
        self.error: Optional[str] = None
        #: True if the server could not be reached.
        self.connect_failed = False
        #: True if that was for lack of descriptors (or memory): the accept pause's line tells it.
        self.out_of_resources = False
        #: True if the forwarder closed the pair on purpose (a timeout, a drain).
        self.cut = False
        #: The idle and half-closed timeouts, if the rule sets any.
        self.timeouts: Optional[Timeouts] = None
        self.receiver = forwarder.receiver_class(self, sock)
        try:
            self.sender = forwarder.sender_class(self)
        except BaseException:
            self.receiver.close_socket()
            raise
        self.receiver.peer, self.sender.peer = self.sender, self.receiver
        # The loop asks each side again after the other's events: its readiness follows the other's buffer.
        self.receiver.partner, self.sender.partner = self.sender, self.receiver
        forwarder.connections.add(self)
        forwarder.connection_opened(self)
        self.sender.connect_next()

    def __repr__(self) -> str:
        return f"<Connection #{self.id} from {format_address(self.client_address)}>"

    @property
    def bytes_to_server(self) -> int:
        return self.sender.bytes_sent

    @property
    def bytes_to_client(self) -> int:
        return self.receiver.bytes_sent

    @property
    def duration(self) -> float:
        """Seconds from accept to close (or until now, while open)."""
        return (self.closed_at or time.monotonic()) - self.opened_at

    def established_to(self, address: SockAddr) -> None:
        """The server side connected: from now on both sides relay."""
        self.server_address = address
        self.established = True
        self.connected_at = time.monotonic()
        self.timeouts = Timeouts.start(self)
        self.forwarder.connection_established(self)

    def direction_ended(self) -> None:
        """One direction passed its EOF on; the other still relays."""
        if self.timeouts is not None:
            self.timeouts.direction_ended()

    def side_finished(self, side: _Pipe) -> None:
        """Record which side closed first (sent EOF or failed)."""
        if self.closed_first is None:
            self.closed_first = side.role

    def abort(self, side: _Pipe, error: BaseException) -> None:
        """``side`` failed: close both at once, resetting the other side.

        A reset is passed on as a reset: a clean FIN would tell the other
        peer that the stream ended normally when it was cut short.
        """
        if self.closed:
            return
        self.side_finished(side)
        self.error = f"{side.role}: {describe_error(error)}"
        side.peer.reset_on_close()
        self.close()

    def time_out(self, reason: str) -> None:
        """A timeout expired: close with FINs if no data is lost, else with resets.

        Bytes a toxic still holds (a latency longer than the timeout) are lost too.
        """
        toxics = self.forwarder._toxics
        lost = (len(self.receiver.outgoing) or len(self.sender.outgoing)
                or (toxics is not None and toxics.holds(self)))
        self.close_early(reason, reset=bool(lost))

    def close_early(self, reason: str, reset: bool = True) -> None:
        """The forwarder ends the pair (a timeout, a drain cut short, an injected fault):
        reset both sides if ``reset``."""
        if self.closed:
            return
        self.error, self.cut = reason, True
        if reset:
            self.reset_on_close()
        self.close()

    def reset_on_close(self) -> None:
        """Make the coming close reset both sides instead of sending them a FIN."""
        self.receiver.reset_on_close()
        self.sender.reset_on_close()

    def close(self) -> None:
        """Close both sockets (once) and tell the forwarder."""
        if self.closed:
            return
        self.closed = True
        self.closed_at = time.monotonic()
        self.established = False
        if self.timeouts is not None:
            self.timeouts.cancel()
        self.receiver.close_socket()
        self.sender.close_socket()
        self.forwarder.connections.discard(self)
        if self.forwarder._toxics is not None:
            self.forwarder._toxics.connection_closed(self)
        self.forwarder.connection_closed(self)


def cut(connections: Iterable[Connection], reason: str) -> int:
    """End ``connections`` now, each with a reset on both sides; return how many.

    The one way the forwarder ends connections that have not finished both
    ways (a drain's timeout, a stop, an error that ends the loop): a FIN
    would tell a peer that a cut-short stream is complete.  Every socket is
    set to reset before any is closed, so that should a close raise, the
    rest still end with resets when the process exits.
    """
    conns = list(connections)
    for conn in conns:
        conn.reset_on_close()
    for conn in conns:
        conn.close_early(reason)
    return len(conns)


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
    reset_error: Optional[OSError] = None

    def __init__(self, conn: Connection, sock: Optional[socket.socket] = None) -> None:
        self.conn = conn
        self.outgoing = bytearray()
        self.eof_received = False
        self.write_closed = False
        self.bytes_sent = 0
        super().__init__(sock, map=conn.forwarder._map)
        if sock is not None:
            tune(sock)

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

    def handle_read(self) -> None:
        """Called when the socket has data or EOF: hand the bytes to the peer."""
        # Read no more than the room under the peer's high-water mark: what
        # waits for the peer never exceeds it, however large a read may be.
        room = self.read_room()
        if room <= 0 and not self.readable():
            return  # a stale event (the pair closed, or the peer filled up this round)
        # (No room, yet readable: a subclass's readable() lets the read
        # through.  Fill the buffer, as asyncore_fwd did before it bounded reads.)
        scratch = self.conn.forwarder.scratch
        try:
            count = self.socket.recv_into(scratch, room if 0 < room < len(scratch) else 0)
        except (BlockingIOError, InterruptedError):
            return  # spurious readiness: nothing to read after all
        except OSError as error:
            self.conn.abort(self, error)
            return
        if count:
            self.peer.forward(scratch[:count])
        else:
            self.handle_eof()

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

    def forward(self, data: bytes | memoryview) -> None:
        """Queue bytes read by the peer; send at once if nothing is queued."""
        if not self.outgoing:
            # The common case on a fast path: one send straight from the read
            # buffer saves a copy and a round of the loop.
            try:
                sent = self.socket.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as error:
                self.conn.abort(self, error)
                return
            self.bytes_sent += sent
            if sent == len(data):
                return
            data = data[sent:]
        self.outgoing += data

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


class Receiver(_Pipe):
    """The client's side of a connection (the article's ``receiver``)."""

    role = "client"


#: Why a connect is given up when it reached the forwarder's own listener.
LEADS_BACK = "it leads back to this forwarder"


class Sender(_Pipe):
    """The server's side of a connection (the article's ``sender``).

    Connects to each address of the remote in turn until one answers within
    the connect timeout; if none does, the client is reset.
    """

    role = "server"

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        self._candidates = list(conn.forwarder.remote_addresses())
        self._connect_timer: Optional[Timer] = None
        self._last_error: Optional[OSError] = None
        #: This socket's (host, port) while it connects to the forwarder's own
        #: port: a client arriving from there is the forwarder itself.
        self.own_end: Optional[Tuple[str, int]] = None

    # -- select() predicates --------------------------------------------

    def writable(self) -> bool:
        """While connecting: wait for the connect."""
        return self.connecting or bool(self.outgoing)

    # -- event handlers ---------------------------------------------------

    def handle_connect_event(self) -> None:
        """Called on the first write event while connecting: did the connect work?"""
        code = pending_error(self.socket)
        if code == errno.ECONNRESET:
            # A refused connect reads ECONNREFUSED: this one succeeded, and the
            # server reset it at once.  What it sent first is relayed, then
            # the reset (reading SO_ERROR cleared it: see handle_eof).
            self.reset_error = os_error(code)
        elif code:
            self.connect_next(os_error(code))
            return
        else:
            try:
                peer = self.socket.getpeername()
            except OSError:
                # Not connected yet: a stale event meant for a closed socket whose
                # descriptor number we reuse (python/cpython#75114).  Keep waiting.
                return
            local = self.socket.getsockname()
            if peer == local:
                # Connected to itself: a connect to a local port that nothing
                # listens on, which the kernel happened to pick as this socket's
                # own port, is a TCP "simultaneous open".  Nobody is there.
                self.connect_next(os_error(errno.ECONNREFUSED))
                return
            if self.own_end is not None and self.conn.forwarder.leads_back_here(peer, local):
                # Our own listener took it: relayed, it would be forwarded again
                # and again.  It waits in the backlog, to be reset there.
                self.conn.forwarder.turn_back(local, peer)
                self.connect_next(os_error(errno.ELOOP, LEADS_BACK))
                return
        # asyncore's handle_connect_event() would read SO_ERROR again: a reset
        # arriving just now would then be consumed there, unseen by us.
        self._cancel_connect_timer()
        self.connected, self.connecting = True, False
        self.handle_connect()
        self.conn.established_to(self.addr)

    def handle_connect(self) -> None:
        """Called once the connect to the server succeeds, before relaying starts."""

    def handle_close(self) -> None:
        if self.connecting:
            # Only a pending error counts: after a retry earlier in this same
            # poll round the flag may belong to the previous attempt's socket.
            self.handle_connect_event()
        else:
            super().handle_close()

    def handle_error(self) -> None:
        error = sys.exc_info()[1]
        if self.connecting and isinstance(error, OSError):
            self.connect_next(error)
        else:
            super().handle_error()

    # -- helpers ----------------------------------------------------------

    def connect_next(self, error: Optional[OSError] = None) -> None:
        """Start connecting to the next address; reset the client when none is left.

        A reset, not a FIN, whether or not the client has sent anything: an
        EOF would tell it that the server accepted and closed at once.
        """
        if error is not None:
            self._last_error = error
        self._cancel_connect_timer()
        self._forget_own_end()
        asyncore.dispatcher.close(self)  # the failed attempt's socket, if any
        while self._candidates and not self.conn.closed:
            family, address = self._candidates.pop(0)
            try:
                self.create_socket(family, socket.SOCK_STREAM)
                _loop.check_watchable(self._map, self.socket)
                tune(self.socket)
                self._connect_timer = timers_for(self._map).call_later(
                    self.conn.rule.connect_timeout, self._connect_timed_out)
                self.connect(address)
                if address[1] == self.conn.forwarder.address[1]:  # maybe this very forwarder
                    self.own_end = end_key(self.socket.getsockname())
                    self.conn.forwarder.own_ends[self.own_end] = self
                return
            except OSError as failure:
                self._cancel_connect_timer()
                if failure.errno in OUT_OF_RESOURCES:
                    self.conn.forwarder.pause_accepting(failure)
                    self._last_error = failure  # in its own words: select()'s limit has some
                else:
                    self._last_error = os_error(failure.errno) if failure.errno else failure
                asyncore.dispatcher.close(self)
        if not self.conn.closed:
            last = self._last_error or os_error(errno.EHOSTUNREACH)
            self.conn.error = f"cannot connect to {self.conn.rule.remote}: {describe_error(last)}"
            self.conn.connect_failed = True
            self.conn.out_of_resources = last.errno in OUT_OF_RESOURCES
            self.conn.receiver.reset_on_close()
            self.conn.close()

    def close_socket(self) -> None:
        self._cancel_connect_timer()
        self._forget_own_end()
        super().close_socket()

    def reached_its_own_forwarder(self) -> None:
        """The forwarder accepted this very connect: try the next address, or reset
        the client.  (Relaying to itself, it would connect again and again.)"""
        if not self.connecting:  # it already relays (a case the connect could not tell): give up
            self._candidates.clear()
        self.connect_next(os_error(errno.ELOOP, LEADS_BACK))

    def _forget_own_end(self) -> None:
        if self.own_end is not None:
            if self.conn.forwarder.own_ends.get(self.own_end) is self:
                del self.conn.forwarder.own_ends[self.own_end]
            self.own_end = None

    def _connect_timed_out(self) -> None:
        self._connect_timer = None
        if self.connecting:
            timeout = self.conn.rule.connect_timeout
            self.connect_next(os_error(errno.ETIMEDOUT, f"connect timed out after {timeout:g} s"))

    def _cancel_connect_timer(self) -> None:
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None


