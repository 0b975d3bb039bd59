"""The copy relay: a connection's two sides.

Both halves are the same idea -- "what I read, my peer writes" -- so they
share one base class, ``_Pipe``, as in Twisted's ``portforward.Proxy``.  The
``Connection`` that owns a pair (``_connection``) is the one place where it
is created and closed.  The zero-copy relay (``_splice``) subclasses these
sides and changes only how bytes move.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
from typing import Any, Callable, Dict, Optional

from .._compat import asyncore
from .._eventloop import _loop
from .._eventloop._timers import Timer, timers_for
from .._net import (
    LINGER_ABORT,
    OUT_OF_RESOURCES,
    SocketMap,
    acknowledge_urgent,
    describe_error,
    os_error,
    pending_error,
    tune,
)
from ._connection import STOPPED, STOPPED_BY_ERROR, Connection, cut
from ._loopback import LEADS_BACK
from ._targets import Target, TargetChoice

__all__ = ["STOPPED", "STOPPED_BY_ERROR", "Connection", "Receiver", "Sender", "cut"]

log = logging.getLogger("asyncore_fwd")

#: The most a diverted read takes at once (``divert_reads``): a header's worth.  What the
#: taker passes on to the peer then stays small next to any high-water mark.
DIVERTED_READ = 4096


class _Dispatcher(asyncore.dispatcher):
    """asyncore's dispatcher, with its messages sent to ``logging`` instead of stdout."""

    # What asyncore sets on every dispatcher and its type stubs leave out (or
    # optional, though ours always have a socket while in a map).
    _map: SocketMap
    _fileno: Optional[int]
    socket: Any
    addr: Any

    _LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

    def log_info(self, message: str, type: str = "info") -> None:
        log.log(self._LEVELS.get(type, logging.INFO), "%r: %s", self, message)

    # An epoll loop keeps registrations between rounds: tell it at once when
    # a socket joins or leaves the map, rather than wait for its next sweep.
    def add_channel(self, map: Optional[SocketMap] = None) -> None:
        super().add_channel(map)
        _loop.channel_changed(self)

    def del_channel(self, map: Optional[SocketMap] = None) -> None:
        fd = self._fileno
        super().del_channel(map)
        _loop.channel_removed(self, fd)


class _Pipe(_Dispatcher):
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
    _diverted: Optional[_Diverted] = None

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

    def queue_first(self, data: bytes) -> None:
        """Queue ``data`` ahead of anything the peer reads (the pair does not relay yet):
        sent, and counted in ``bytes_sent``, once this side is connected."""
        self.outgoing += data

    def divert_reads(self, received: Optional[Callable[[bytes], None]]) -> None:
        """Hand what this socket reads to ``received(data)`` (b"" at EOF) instead of the peer,
        whether the pair relays or not; None gives the reads back.

        For a step that reads the client before the server connect: like a
        toxic, it takes the place of two methods of this side only.
        """
        if self._diverted is not None:
            self._diverted.give_back()
            del self._diverted
        if received is not None:
            self._diverted = _Diverted(self, received)
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


class _Diverted:
    """The reads of one side, taken for someone else (see ``_Pipe.divert_reads``)."""

    _METHODS = ("readable", "handle_read")

    def __init__(self, side: _Pipe, received: Callable[[bytes], None]) -> None:
        self.side, self.received, self.ended = side, received, False
        # What it replaces may be another taker's (a toxic's): put that back after.
        self.replaced: Dict[str, Any] = {name: side.__dict__[name] for name in self._METHODS if name in side.__dict__}
        side.readable, side.handle_read = self.readable, self.handle_read  # type: ignore[method-assign]

    def give_back(self) -> None:
        for name in self._METHODS:
            self.side.__dict__.pop(name, None)
        self.side.__dict__.update(self.replaced)

    def readable(self) -> bool:
        """Until EOF, while the pair is open."""
        return not self.ended and not self.side.conn.closed

    def handle_read(self) -> None:
        side = self.side
        if not self.readable():
            return
        scratch = side.conn.forwarder.scratch
        try:
            count = side.socket.recv_into(scratch, min(DIVERTED_READ, len(scratch)))
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


class Sender(_Pipe):
    """The server's side of a connection (the article's ``sender``).

    Connects to each target its choice gives (the remote's addresses, in
    turn) until one answers within the connect timeout; if none does, the
    client is reset.
    """

    role = "server"

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        #: Whom to connect to: asked of the forwarder when the connect starts.
        self._choice: Optional[TargetChoice] = None
        #: The target of the connect under way.
        self._target: Optional[Target] = None
        self._giving_up = False
        self._connect_timer: Optional[Timer] = None
        self._last_error: Optional[OSError] = None

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
            if self.conn.forwarder.loopback.connected(self, peer, local):
                # Our own listener took it: relayed, it would be forwarded again
                # and again.  It waits in the backlog, to be reset there.
                self.connect_next(os_error(errno.ELOOP, LEADS_BACK))
                return
        # asyncore's handle_connect_event() would read SO_ERROR again: a reset
        # arriving just now would then be consumed there, unseen by us.
        self._cancel_connect_timer()
        self.connected, self.connecting = True, False
        if self._choice is not None and self._target is not None:
            self._choice.succeeded(self._target)
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
        """Start connecting to the next target; reset the client when none is left.

        ``error`` is why the last one failed (None for the first).  A reset,
        not a FIN, whether or not the client has sent anything: an EOF would
        tell it that the server accepted and closed at once.
        """
        if self._choice is None:
            self._choice = self.conn.forwarder.target_choice(self.conn)
        if error is not None:
            self._last_error = error
            if self._target is not None:
                self._choice.failed(self._target, error)
        self._target = None
        self._cancel_connect_timer()
        self.conn.forwarder.loopback.forget(self)
        asyncore.dispatcher.close(self)  # the failed attempt's socket, if any
        while not self.conn.closed and not self._giving_up:
            target = self._choice.next_target()
            if target is None:
                break
            family, address = target
            try:
                self.create_socket(family, socket.SOCK_STREAM)
                _loop.check_watchable(self._map, self.socket)
                tune(self.socket)
                self._connect_timer = timers_for(self._map).call_later(
                    self.conn.rule.connect_timeout, self._connect_timed_out)
                self.connect(address)
                self._target = target
                self.conn.forwarder.loopback.connecting(self, address)  # maybe to this very forwarder
                return
            except OSError as failure:
                self._cancel_connect_timer()
                if failure.errno in OUT_OF_RESOURCES:
                    self.conn.forwarder.pause_accepting(failure)
                    self._last_error = failure  # in its own words: select()'s limit has some
                else:
                    self._last_error = os_error(failure.errno) if failure.errno else failure
                self._target = None
                self._choice.failed(target, self._last_error)
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
        self.conn.forwarder.loopback.forget(self)
        super().close_socket()

    def reached_its_own_forwarder(self) -> None:
        """The forwarder accepted this very connect: try the next address, or reset
        the client.  (Relaying to itself, it would connect again and again.)"""
        if not self.connecting:  # it already relays (a case the connect could not tell): give up
            self._giving_up = True
        self.connect_next(os_error(errno.ELOOP, LEADS_BACK))

    def _connect_timed_out(self) -> None:
        self._connect_timer = None
        if self.connecting:
            timeout = self.conn.rule.connect_timeout
            self.connect_next(os_error(errno.ETIMEDOUT, f"connect timed out after {timeout:g} s"))

    def _cancel_connect_timer(self) -> None:
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None


