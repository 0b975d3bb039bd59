"""A UDP rule's listener: the same loop, another kind of socket.

A datagram socket has no ``accept``: every client's datagrams arrive on the
one listening socket, each with its sender's address.  So the listener
keeps a table of *sessions* (``_sessions``), one per client address: the
first datagram from an address starts one -- after the rule's allow/deny
lists and limits (``_ops._access``) -- connected to the target the balance
picks (``_udptargets``, never to this listener: ``_udploop``); later ones
go to it.  Replies go out of this socket, from the address the client sent
to (on a wildcard address, read per datagram: ``_pktinfo``).

Strategy:

* **Bounded work.**  Up to ``DATAGRAMS_PER_EVENT`` datagrams per readiness
  event, read into the loop's shared buffer and sent from it; a datagram
  that cannot be sent now is dropped and counted, never queued.
* **Bounded memory.**  A datagram that would start a session past a limit,
  or that the lists refuse, is dropped: counted (``dropped_*``) and logged
  rate-limited (``RefusalLog``).  Without ``max_connections`` the sessions
  are capped at half the descriptor limit, leaving the rest to the others.
* **Expiry without a timer per datagram.**  The table is kept in order of
  last activity (a datagram either way moves its session to the end), so
  one timer, set for the first session's deadline, closes the sessions that
  idled out and is set again for the next: its work is the sessions that end.
* **Drain and reload.**  ``stop_accepting`` starts no more sessions but
  keeps the socket, which the open ones need for their replies, until they
  have been quiet for ``DRAIN_QUIET`` seconds (or ``idle_timeout``, if
  shorter).  A reload that keeps the listen address hands the socket to the
  successor (``release_listener``/``take_over``), which *adopts* the open
  sessions: they keep their target, and a changed target serves new ones.
"""

from __future__ import annotations

import collections
import errno
import logging
import socket
import time
import weakref
from typing import Any, Collection, Optional, OrderedDict, Tuple

from .._eventloop import _loop
from .._eventloop._dispatcher import Dispatcher
from .._eventloop._timers import Timer, forget, timers_for
from .._net import (
    OUT_OF_RESOURCES,
    RemoteAddresses,
    SockAddr,
    SocketMap,
    check_source,
    describe_error,
    descriptor_limit,
    family_of,
    format_address,
    listen_address,
)
from .._ops._access import AccessControl, RefusalLog, warn_if_open
from .._ops._balance import TargetSet, TargetState
from .._ops._stats import RuleStats
from .._relay._connection import STOPPED, cut
from .._values._rules import Rule
from . import _pktinfo
from ._sessions import DATAGRAMS_PER_EVENT, MAX_DATAGRAM, Session
from ._udploop import DatagramLoopGuard
from ._udptargets import SessionTargets

__all__ = ["DatagramListener", "give_back"]

log = logging.getLogger("asyncore_fwd")

#: Sessions closed per round of the loop at most, when many idle out at once.
EXPIRIES_PER_ROUND = 1024
#: Once the listener starts no more sessions (a drain, a removed rule), a session ends after
#: this long without a datagram either way.
DRAIN_QUIET = 1.0
#: Without ``max_connections``, a UDP rule's sessions are capped at this share of the descriptor
#: limit (at most ``UNLIMITED_SESSION_CAP`` without one): a flood of spoofed sources leaves the
#: rest to the other rules and to the TCP connections.
DEFAULT_CAP_SHARE = 0.5
UNLIMITED_SESSION_CAP = 1 << 19
#: The receive buffer the listening socket asks for (bytes).
LISTEN_RECEIVE_BUFFER = 4 * 1024 * 1024

# A listening socket handed over by ``release_listener``, with the listener that let it go: its
# successor adopts that one's sessions (weak: a socket nobody took over is not kept open by this).
_released: "weakref.WeakKeyDictionary[socket.socket, DatagramListener]" = weakref.WeakKeyDictionary()


def give_back(sock: socket.socket) -> bool:
    """A released UDP listening socket that no UDP listener takes over (a reload made its rule TCP):
    back to the listener that let it go, to serve its sessions until they end.  False if none did."""
    previous = _released.pop(sock, None)
    if previous is None:
        return False
    previous.take_over(sock)
    return True


def default_session_cap() -> int:
    """The session cap of a UDP rule without ``max_connections``: ``DEFAULT_CAP_SHARE`` of the
    descriptor limit now."""
    limit = descriptor_limit()
    return max(1, int(limit * DEFAULT_CAP_SHARE)) if limit is not None else UNLIMITED_SESSION_CAP


class DatagramListener(Dispatcher):
    """Serves a UDP rule: listens on its address, and keeps a session per client address."""

    def __init__(self, rule: Rule, map: SocketMap, *, scratch: Optional[memoryview] = None,
                 stats: Optional[RuleStats] = None, listener: Optional[socket.socket] = None) -> None:
        self.rule = rule
        #: The counters of this rule; a UDP rule's have the datagram counters too.
        self.stats = stats if stats is not None else RuleStats()
        self.stats.datagram_rule = True
        #: The read buffer: one datagram at a time, the loop's shared one when it is large enough.
        self.scratch = (memoryview(scratch) if scratch is not None and len(scratch) >= MAX_DATAGRAM
                        and not memoryview(scratch).readonly else memoryview(bytearray(MAX_DATAGRAM)))
        #: The sessions, by client address, least recently active first.
        self.sessions: OrderedDict[SockAddr, Session] = collections.OrderedDict()
        #: False once it stops starting sessions (a drain, a removed or changed rule).
        self.serving_new = True
        self._sweep: Optional[Timer] = None
        if rule.source is not None:
            check_source(rule.source)
        self._remote = RemoteAddresses(rule.remote_host, rule.remote_port,
                                       socket.AF_UNSPEC if rule.source is None else family_of(rule.source))
        super().__init__(map=map)
        self._timers = timers_for(self._map)
        self._label = rule.label
        #: Without ``max_connections``: the cap on open sessions, set from the descriptor limit at start.
        self.default_cap = 0 if rule.max_connections else default_session_cap()
        #: Allow/deny lists and limits (None: none); its refusal log is the rule's.
        self.access = AccessControl.for_rule(rule, self._timers)
        self.refusals = self.access.refusals if self.access is not None else RefusalLog(rule.label, self._timers)
        #: The targets, their state and balance (None: one target, whose addresses are tried in order).
        self.targets = TargetSet.for_rule(rule, self._timers, self._remote, self.stats.target_failures)
        #: Keeps a session from sending to this very socket (each datagram would come back as a new client).
        self.loopback = DatagramLoopGuard(self)
        #: Connects the sessions to the targets.
        self.paths = SessionTargets(rule, self._map, self._remote, self.targets, self.loopback)
        #: True on a wildcard address: each datagram's destination is read, to reply from it.
        self.pktinfo = False
        if listener is not None:
            self.take_over(listener)
        else:
            self._listen()
        self._address: Tuple[str, int] = self.socket.getsockname()[:2]
        self.addr = self._address
        self._label = rule.name or format_address((rule.local_host, self._address[1])) + "/udp"
        self.refusals.label = self._label
        try:
            for name, addresses in ([(rule.remote, self._remote.last_answer)] if self.targets is None else
                                    [(target.name, target.addresses.last_answer) for target in self.targets]):
                self.loopback.refuse_remote(addresses, f"{self._label}: cannot forward to {name}")
        except OSError:
            if listener is not None:
                self.release_listener()  # still the caller's, to serve the old rule (and its sessions)
            else:
                self.close()
            raise
        if self.targets is not None:
            self.targets.label = self._label
        warn_if_open(rule, self._address, self._label)

    def _listen(self) -> None:
        family, address = listen_address(self.rule.local_host, self.rule.local_port)
        self.create_socket(family, socket.SOCK_DGRAM)
        try:
            # No SO_REUSEADDR: on a UDP socket it would let a second process bind the same port and
            # take part of the datagrams.  (SO_REUSEPORT, asked for, spreads clients over --workers.)
            if self.rule.reuse_port:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            # Every client's datagrams queue here between two rounds of the loop: room for a burst
            # (the kernel caps it at net.core.rmem_max; past it, the kernel drops, as UDP may).
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTEN_RECEIVE_BUFFER)
            self.bind(address)
            self.pktinfo = _pktinfo.enable(self.socket)
            _loop.check_watchable(self._map, self.socket)
            self.connected = True  # (see take_over)
        except OSError as error:
            where = format_address((self.rule.local_host, address[1]))
            self.close()
            raise OSError(error.errno, f"cannot listen on {where} (udp): {describe_error(error)}") from None

    # -- the Listener protocol ----------------------------------------------

    @property
    def address(self) -> Tuple[str, int]:
        """The (host, port) bound: the port to use after port 0."""
        return self._address

    @property
    def label(self) -> str:
        """The name in its log lines: the rule's name, or where it listens (the port bound)."""
        return self._label

    @property
    def connections(self) -> Collection[Session]:
        """The open sessions (the service counts, drains and cuts them as connections)."""
        return self.sessions.values()

    @property
    def accept_paused(self) -> bool:
        """(Never: a datagram that cannot have a session is dropped, the socket still read.)"""
        return False

    def stop_accepting(self) -> None:
        """Start no more sessions; the socket stays, for the open ones' replies, until they end.
        The targets' down timers stop (``TargetSet.retire``): new sessions are another listener's."""
        self.serving_new = False
        if self.targets is not None:
            self.targets.retire()
        self._cancel_sweep()  # the sessions now end once quiet for DRAIN_QUIET
        self._arm_sweep()

    def release_listener(self) -> socket.socket:
        """Hand the socket, still open, to a successor, which adopts the open sessions (``take_over``)."""
        sock = self.socket
        self.del_channel()
        self.socket = None
        self.serving_new = False
        self._cancel_sweep()
        if self.targets is not None:
            self.targets.retire()
        _released[sock] = self
        return sock

    def take_over(self, listener: socket.socket) -> None:
        """Listen on ``listener``, released by ``release_listener``: its sessions become this one's."""
        previous = _released.pop(listener, None)
        self.set_socket(listener)
        self._address = listener.getsockname()[:2]
        self.pktinfo = _pktinfo.enable(listener)
        # Ready for datagrams as a connected socket is for bytes: the loop's fast path calls
        # handle_read() at once, without asyncore's readwrite() and handle_read_event().
        self.connected = True
        self.serving_new = True
        if self.targets is not None:  # given back after a failed reload: down times go on
            self.targets.resume()
        if previous is not None and previous is not self:
            for client, session in previous.sessions.items():
                session.owner = self
                session.count_in(self.targets)  # its target, if still one of the rule's, counts here now
                self.sessions[client] = session
                if previous.access is not None:
                    previous.access.closed(session)  # type: ignore[arg-type]  # (counted here from now on)
                previous.loopback.forget(session)
                self.loopback.opened(session, session.server_address, session.socket)
                if self.access is not None:
                    self.access.opened(session)  # type: ignore[arg-type]  # (counted for max_per_client)
            previous.sessions = collections.OrderedDict()
        self._arm_sweep()

    def close(self, reason: str = STOPPED) -> None:
        """Stop listening and end the open sessions (``reason`` in their end lines)."""
        cut(list(self.sessions.values()), reason)  # type: ignore[arg-type]
        self._cancel_sweep()
        self.serving_new = False
        super().close()
        self.refusals.close()
        if self.targets is not None:
            self.targets.retire()
        if not self._map:
            forget(self._map)

    # -- select() predicates --------------------------------------------

    def readable(self) -> bool:
        """Always: the open sessions' clients must be heard even when no session may start."""
        self._timers.run_due()  # for a plain asyncore.loop() (see Forwarder.readable)
        return True

    def writable(self) -> bool:
        return False

    # -- datagrams --------------------------------------------------------

    def handle_read(self) -> None:
        """Called when datagrams wait: up to ``DATAGRAMS_PER_EVENT``, each to its client's session."""
        if self.pktinfo:
            _pktinfo.read_with_destinations(self)
            return
        recvfrom_into = self.socket.recvfrom_into
        scratch = self.scratch
        now = time.monotonic()
        for _ in range(DATAGRAMS_PER_EVENT):
            try:
                size, client = recvfrom_into(scratch)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # nothing a client sends causes one; never a reason to stop
                log.debug("%s: recvfrom: %s", self._label, describe_error(error))
                continue
            session = self.session_for(client, now)
            if session is not None:
                session.to_server(scratch[:size], now)

    def to_client(self, session: Session, data: Any) -> bool:
        """Send ``data`` to the session's client from the listening socket (from the address the
        client sent to); False if it was dropped."""
        try:
            if session.reply_ancillary:
                self.socket.sendmsg([data], session.reply_ancillary, 0, session.client_address)
            else:
                self.socket.sendto(data, session.client_address)
        except (BlockingIOError, InterruptedError):
            self.stats.dropped("full")
            return False
        except (OSError, AttributeError):  # (AttributeError: no socket, after a close)
            self.stats.dropped("error")
            return False
        return True

    def handle_close(self) -> None:
        """Called on an error flag: a datagram socket has no end; read the error and go on."""
        try:
            self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            pass

    def handle_error(self) -> None:
        """Called when a handler raised: log it and go on listening (one datagram is lost at most)."""
        log.exception("%s: internal error", self._label)

    # -- sessions ---------------------------------------------------------

    def _drop(self, client: SockAddr, kind: str, reason: str) -> None:
        self.stats.dropped(kind)
        self.refusals.refused(client, reason)

    def session_for(self, client: SockAddr, now: float) -> Optional[Session]:
        """``client``'s session, now last in the expiry order; a new one for a new client
        (None: its datagram is dropped, and was counted)."""
        session = self.sessions.get(client)
        if session is None:
            return self._start_session(client, now)
        self.sessions.move_to_end(client)
        return session

    def _start_session(self, client: SockAddr, now: float) -> Optional[Session]:
        """A datagram from a new client address: its session, or None (dropped, counted, logged rate-limited)."""
        if not self.serving_new:
            self.stats.dropped("draining")
            return None
        if self.loopback.is_ours(client):  # a datagram of ours come back, or a forged source that is us
            self.stats.refused("acl")
            self._drop(client, "acl", "its source is this listener")
            return None
        if self.access is not None:
            reason = self.access.refusal(client, len(self.sessions))
            if reason is not None:
                self.stats.refused(reason)
                self._drop(client, "acl" if reason == "acl" else "limit", reason)
                return None
        if self.default_cap and len(self.sessions) >= self.default_cap:
            self.stats.refused("max_connections")
            self._drop(client, "limit", f"max_connections (by default {self.default_cap}: half the descriptor limit)")
            return None
        try:
            sock, sockaddr, state = self.paths.connect()
        except OSError as error:
            if error.errno in OUT_OF_RESOURCES:
                self._drop(client, "resources", f"no session: {describe_error(error)}")
                return None
            if error.errno != errno.ELOOP:
                self.stats.failed_connects += 1  # (as a TCP connect that no address of the target took)
            self._drop(client, "error", f"no target: {describe_error(error)}")
            return None
        return self._open(client, sock, sockaddr, state, now)

    def answered(self, session: Session) -> None:
        """The session's target address sent its first reply: new sessions of that target start there."""
        self.paths.answered(session)

    def session_failed(self, session: Session) -> None:
        """The session's target answered with an ICMP error: it may move or end (``SessionTargets.failed``)."""
        self.paths.failed(session)

    def _open(self, client: SockAddr, sock: socket.socket, sockaddr: SockAddr, state: Optional[TargetState],
              now: float) -> Session:
        name = state.name if state is not None else self.rule.remote
        session = Session(self, sock, client, sockaddr, name, self.targets, state, now)
        self.sessions[client] = session
        self.loopback.opened(session, sockaddr, sock)
        self.stats.opened(session)  # type: ignore[arg-type]
        if self.access is not None:
            self.access.opened(session)  # type: ignore[arg-type]
        if self.targets is not None and state is not None:
            self.targets.started(session, state)  # type: ignore[arg-type]
        log.debug("#%d udp session from %s to %s (%s)", session.id, format_address(client), name,
                  format_address(sockaddr))
        self._arm_sweep()
        return session

    def session_closed(self, session: Session) -> None:
        """A session ended: out of the table and of the per-client counts."""
        if self.sessions.get(session.client_address) is session:
            del self.sessions[session.client_address]
        self.loopback.forget(session)
        self.stats.closed(session)  # type: ignore[arg-type]
        if self.access is not None:
            self.access.closed(session)  # type: ignore[arg-type]

    # -- idle expiry --------------------------------------------------------

    @property
    def _idle_limit(self) -> float:
        """How long a session may stay quiet: ``idle_timeout``, or at most ``DRAIN_QUIET`` once
        no new session starts here."""
        return self.rule.idle_timeout if self.serving_new else min(self.rule.idle_timeout, DRAIN_QUIET)

    def _arm_sweep(self) -> None:
        if self._sweep is None and self.sessions:
            first = next(iter(self.sessions.values()))
            self._sweep = self._timers.call_at(first.last_active + self._idle_limit, self._expire)

    def _cancel_sweep(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    def _expire(self) -> None:
        """The first session's deadline: close every session idle for ``idle_timeout``, then wait for the next."""
        self._sweep = None
        stale = time.monotonic() - self._idle_limit
        for _ in range(EXPIRIES_PER_ROUND):
            if not self.sessions:
                return
            first = next(iter(self.sessions.values()))
            if first.last_active > stale:
                break
            first.close("idle")
        else:  # more due: the rest in the next round, so that the loop serves the others meanwhile
            self._sweep = self._timers.call_later(0, self._expire)
            return
        self._arm_sweep()
