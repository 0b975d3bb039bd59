"""The server's side of a connection (the article's ``sender``): it connects, then relays.

Strategy: a non-blocking connect to each target its connection's choice
gives (``_targets``; the remote's addresses, in turn), each with its own
connect timeout on the map's timers, until one answers; every way a
connect can fail leads to ``connect_next``.  A connect that reached the
forwarder's own listener is given up (``_loopback``).  Once connected, it
is a ``_Pipe`` like the client's side.
"""

from __future__ import annotations

import errno
import socket
import sys
from typing import Optional

from .._compat import asyncore
from .._eventloop import _loop
from .._eventloop._timers import Timer, timers_for
from .._net import OUT_OF_RESOURCES, bind_source, describe_error, os_error, pending_error, set_keepalive, tune
from ._connection import Connection
from ._copy import _Pipe
from ._loopback import LEADS_BACK
from ._targets import Target, TargetChoice

__all__ = ["Sender"]


class Sender(_Pipe):
    """The server's side of a connection (the article's ``sender``).

    Connects to each target its choice gives (the remote's addresses, in
    turn) until one answers within the connect timeout; if none does, the
    client is reset.
    """

    role = "server"
    # Its writable() differs from the relay's own only while connecting, before it relays.
    plain_predicates = True

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
                rule = self.conn.rule
                if rule.source is not None:  # (an address gone since the start fails this connect)
                    bind_source(self.socket, rule.source)
                if rule.tcp_keepalive:
                    set_keepalive(self.socket, rule.tcp_keepalive)
                self._connect_timer = timers_for(self._map).call_later(
                    self.conn.rule.connect_timeout, self._connect_timed_out)
                # Before connect(): one that completes at once (a loopback connect on
                # BSD and macOS) runs handle_connect_event inside it.
                self._target = target
                may_lead_back = self.conn.forwarder.loopback.connecting(self, address)
                self.connect(address)
                if may_lead_back:  # maybe to this very forwarder: note our end, now that it has one
                    self.conn.forwarder.loopback.started(self)
                return
            except OSError as failure:
                self.conn.forwarder.loopback.forget(self)
                self._cancel_connect_timer()
                if failure.errno in OUT_OF_RESOURCES:
                    self.conn.forwarder.pause_accepting(failure)
                    self._last_error = failure  # in its own words: select()'s limit has some
                else:
                    # asyncore's connect() words an error as its errno's name (ECONNREFUSED): the system's
                    # words instead.  Other errors keep theirs (a source bind's names the address).
                    code = failure.errno
                    named = code is not None and failure.strerror == errno.errorcode.get(code)
                    self._last_error = os_error(code) if code is not None and named else failure
                self._target = None
                self._choice.failed(target, self._last_error)
                asyncore.dispatcher.close(self)
        if not self.conn.closed:
            last = self._last_error or os_error(errno.EHOSTUNREACH)
            describe = getattr(self._choice, "describe_failure", None)  # a choice may tell it (several targets)
            self.conn.error = (describe(last) if describe is not None
                               else f"cannot connect to {self.conn.rule.remote}: {describe_error(last)}")
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
