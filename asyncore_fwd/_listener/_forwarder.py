"""The forwarder: the article's listening dispatcher, made correct.

The article's design is kept: a listening ``Forwarder`` accepts a client,
wraps it in a ``Receiver`` (talks to the client) and pairs it with a
``Sender`` (talks to the server).  Those two sides, and the ``Connection``
that owns them, are the relay (``_relay``, which tells how backpressure and
half-close work); ``_splice`` has a zero-copy variant of the sides.

Strategy, in the order the loop sees it:

* **Accepting.**  Up to ``ACCEPTS_PER_EVENT`` clients per readiness event;
  the loop-back guard and the admission steps (access control first) may
  turn one away before anything is made for it.  Out of descriptors, the
  listener pauses (``_pause``) instead of spinning.
* **Timers.**  ``_timers`` keeps a deadline heap per map (connect timeouts,
  the pause); our loops end each wait at the next one, and under a plain
  ``asyncore.loop`` the listener's ``readable()``, asked every round, runs them.
* **Operations.**  What acts on connections observes them at events, never
  per byte (``ConnectionObserver``, set up for the rule by ``_owner``); the
  hooks here only log.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import sys
from typing import Any, Iterator, Optional, Tuple, Type

from .._compat import asyncore
from .._eventloop import _loop
from .._eventloop._dispatcher import Dispatcher
from .._eventloop._runner import LoopRunner
from .._eventloop._timers import forget, timers_for
from .._net import OUT_OF_RESOURCES, SockAddr, SocketMap, describe_error, format_address, os_error, pending_error, reset
from .._ops._access import warn_if_open
from .._ops._health import HealthChecks
from .._ops._stats import RuleStats
from .._relay._connection import STOPPED, Connection, cut
from .._relay._copy import Receiver
from .._relay._loopback import LoopbackGuard
from .._relay._sender import Sender
from .._values._rules import DEFAULT_BACKLOG, DEFAULT_CONNECT_TIMEOUT, DEFAULT_HIGH_WATER, DEFAULT_READ_SIZE, Rule
from ..toxics._controls import FaultControls, FaultInjection
from ._listening import ListeningSocket
from ._owner import ConnectionOwnerBase
from ._pause import AcceptPause

__all__ = ["Forwarder", "Receiver", "Sender", "Connection", "Rule", "forwarder", "receiver", "sender"]

log = logging.getLogger("asyncore_fwd")

#: How long the listener stops accepting when the process is out of descriptors.
ACCEPT_PAUSE = 0.5
#: After a logged pause, further pauses are counted and summed up in one line at most this often (seconds).
PAUSE_LOG_INTERVAL = 5.0
#: How long ``Forwarder.running()`` waits for its loop to start.
START_TIMEOUT = 10.0
#: Connections taken from the backlog per readiness event of the listener.
ACCEPTS_PER_EVENT = 128


class Forwarder(Dispatcher, ListeningSocket, ConnectionOwnerBase, FaultInjection):
    """Listens on ``ip:port`` and forwards each client to ``remoteip:remoteport``.

    Keeps the article's signature.  The remote may be a hostname or an IPv4/
    IPv6 address; it is resolved now, so an unknown host raises ``OSError``
    here, as does a port already in use.  ``port=0`` binds a free port: see
    ``address``.  ``map`` is the asyncore map to join (the global one by
    default, as in asyncore); run it with ``serve_forever()`` or with your own
    ``asyncore.loop(use_poll=True, map=...)``.  ``splice=True`` relays with
    os.splice() (Linux) instead of copying through Python; ``reuse_port=True``
    lets other processes listen on the same port (see ``--workers``).
    The other keyword arguments are the operations fields of ``Rule``:
    ``name``, ``allow``, ``deny``, ``max_connections``, ``max_per_client``,
    ``idle_timeout``, ``half_closed_timeout``, ``send_proxy``, ``accept_proxy``, ``source`` (an IP address to connect
    from: ``OSError`` here if it is not this machine's, or if a remote hostname has no address of its
    family) and ``tcp_keepalive`` (``from_rule`` takes a ``Rule``).

    Several targets: ``remoteip:remoteport`` stays the first, and
    ``targets=[(host, port), ...]`` lists the targets after it; ``balance``
    ("first", "roundrobin", "leastconn"), ``max_fails``, ``fail_timeout`` and
    ``health_check_interval`` say how connections are spread over them and
    when one is down (see ``Rule``; ``targets`` holds their state).

    A ``Forwarder`` serves TCP: ``proto="udp"`` raises ``ValueError``, as a UDP
    rule is served by a ``Service`` (with a datagram listener of its own).
    """

    #: The classes of a connection's two sides (splice=True swaps in others).
    receiver_class: Type[Receiver] = Receiver
    sender_class: Type[Sender] = Sender

    def __init__(self, ip: str, port: int, remoteip: str, remoteport: int, backlog: int = DEFAULT_BACKLOG, *,
                 map: Optional[SocketMap] = None, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 high_water: int = DEFAULT_HIGH_WATER, read_size: int = DEFAULT_READ_SIZE, splice: bool = False,
                 reuse_port: bool = False, seed: Optional[int] = None, **options: Any) -> None:
        # ``options``: the other fields of ``Rule`` (name, allow, deny, limits, timeouts).
        self._start(Rule(ip, port, remoteip, remoteport, backlog, connect_timeout, high_water, read_size, splice,
                         reuse_port, **options), map, seed=seed)

    @classmethod
    def from_rule(cls, rule: Rule, map: Optional[SocketMap] = None, *, stats: Optional[RuleStats] = None,
                  listener: Optional[socket.socket] = None, scratch: Optional[memoryview] = None) -> Forwarder:
        """A forwarder for ``rule``, listening now.

        ``stats`` continues another forwarder's counters, and ``listener``
        takes over its listening socket (see ``release_listener``): how a
        reload changes a rule without closing its port.  ``scratch``, a
        writable byte buffer, is the read buffer to share with the other
        forwarders run by the same loop thread (one read at a time uses it);
        one smaller than ``rule.read_size`` is not used.
        """
        fwd = cls.__new__(cls)
        fwd._start(rule, map, stats=stats, listener=listener, scratch=scratch)
        return fwd

    def _start(self, rule: Rule, map: Optional[SocketMap], *, seed: Optional[int] = None,
               stats: Optional[RuleStats] = None, listener: Optional[socket.socket] = None,
               scratch: Optional[memoryview] = None) -> None:
        if rule.proto != "tcp":  # (a listener of another kind: _listener._udp)
            raise ValueError("a Forwarder serves TCP rules: serve a UDP rule (proto='udp') with Service([rule])")
        self._own_connections(rule, stats, scratch)
        #: Toxics and down() (fault injection): see ``add_toxic``.
        self._faults = FaultControls(self, seed)
        super().__init__(map=map)
        #: Runs the loop for ``serve_forever``, ``stop`` and ``running``.
        self._runner = LoopRunner(self._map, self)
        self._timers = timers_for(self._map)
        self._pause = AcceptPause(self, self._timers, PAUSE_LOG_INTERVAL)
        #: The active checks of the targets (None: the rule has none); they run while it listens.
        self.health: Optional[HealthChecks] = None
        self._set_up_operations(self._timers)
        if listener is not None:
            self.take_over(listener)
        else:
            self._listen()
        self._sockaddr: SockAddr = self.socket.getsockname()  # whole: an IPv6 scope id too, to bind again
        self._address: Tuple[str, int] = self._sockaddr[:2]
        self.addr = self._address  # asyncore's repr shows it: the real port, not 0
        # The rule's label, with the port bound after port 0: logs name the port clients use.
        self._label = self.rule.name or format_address((self.rule.local_host, self._address[1]))
        self.refusals.label = self._label  # made before the port was known
        #: Keeps our connects from leading back to this very listener.
        self.loopback = LoopbackGuard(self, rule.reuse_port)
        self.health = HealthChecks.for_rule(rule, self.targets, self._map, self.loopback)
        try:
            if self.targets is None:
                self.loopback.refuse_remote(self._remote.last_answer,
                                            f"{self._label}: cannot forward to {self.rule.remote}")
            else:
                self.targets.label = self._label
                for target in self.targets:
                    self.loopback.refuse_remote(target.addresses.last_answer,
                                                f"{self._label}: cannot forward to {target.name}")
        except OSError:
            if listener is not None:
                self.release_listener()  # still the caller's, to serve the old rule
            else:
                self.close()
            raise
        if self.health is not None:
            self.health.start()
        warn_if_open(rule, self._address, self._label)

    def take_over(self, listener: socket.socket) -> None:
        """Listen on ``listener``, a listening socket handed over by ``release_listener``:
        a successor's at a reload, or this forwarder's own given back when that failed."""
        self.set_socket(listener)
        self.accepting = True
        if self.targets is not None:  # given back after a failed reload: down times go on
            self.targets.resume()
        if self.health is not None:  # (and checks again)
            self.health.start()
        try:
            listener.listen(self.rule.backlog)  # the backlog may have changed
        except OSError:
            pass

    @property
    def address(self) -> Tuple[str, int]:
        """The (host, port) actually bound: the port to use after ``port=0``."""
        return self._address

    @property
    def label(self) -> str:
        """The name in its log lines: the rule's name, or where it listens (the port bound, after port 0)."""
        return self._label

    def leads_back_here(self, peer: SockAddr, local: Optional[SockAddr] = None) -> bool:
        """Whether a connect to ``peer`` (from ``local``, once known) reaches this listener."""
        return self.loopback.leads_back_here(peer, local)

    def turn_back(self, local: SockAddr, peer: SockAddr) -> None:
        """A connect of ours from ``local`` led back to ``peer`` here: reset it when it is accepted."""
        self.loopback.turn_back(local, peer)

    # -- running ----------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5, loop: str = "auto") -> None:
        """Run the loop on this forwarder's map until ``stop()``, then ``close()``.

        ``loop`` is ``"epoll"``, ``"poll"``, ``"select"`` or ``"auto"`` (the
        best the platform has).  select() cannot watch descriptors past 1023:
        a client that would need one is reset, as when descriptors run out;
        epoll's cost follows the active connections, not the open ones.  ``stop()``
        takes effect within ``poll_interval`` seconds.
        """
        self._runner.serve(poll_interval, loop)

    def stop(self) -> None:
        """Ask ``serve_forever`` to return, at once, closing everything (see ``close()``).
        Safe from another thread or a signal handler."""
        self._runner.stop()

    @contextlib.contextmanager
    def running(self, loop: str = "auto", *, stop_timeout: float = 10.0) -> Iterator[Forwarder]:
        """Serve in a background thread for the ``with`` block; on exit, stop and join.

        When the block ends the listening port is closed, every connection
        is closed and no thread is left, once the loop stops.  The join waits
        ``stop_timeout`` seconds at most: a loop stuck in a handler is logged
        as a warning and left to finish in its (daemon) thread, rather than
        hang the caller; until it does, the port and its connections stay open.
        An error of the loop itself reaches the caller: before the block if
        the loop cannot start (a ``loop`` this platform lacks), else at its end
        (unless the block raised).  A forwarder runs once: after the block it
        is closed, and ``running()`` again raises RuntimeError.
        """
        if self._fileno is None or self._runner.stop_requested:
            raise RuntimeError(f"{self.label}: this forwarder was stopped (stop(), or the end of a "
                               f"running() block); make a new one")
        with self._runner.running(lambda: self.serve_forever(loop=loop), label=self.label,
                                  thread_name=f"asyncore_fwd {format_address(self.address)}",
                                  stop_timeout=stop_timeout, start_timeout=START_TIMEOUT):
            yield self

    def between_rounds(self, poll_interval: float) -> Optional[float]:
        """Called by the loop of ``serve_forever`` before each wait: nothing to do but wait."""
        return poll_interval

    def close(self, reason: str = STOPPED) -> None:
        """Stop listening and close every connection this forwarder made.

        A connection still open has not finished both ways: it is cut with
        resets (``reason`` in its close line), so that no peer takes the
        end of a cut-short stream for a complete one.
        """
        self.stop_accepting()
        cut(self.connections, reason)
        self.refusals.close()
        if not self._map:
            forget(self._map)

    def stop_accepting(self) -> None:
        """Close the listening socket; the connections go on (to drain them).  The active checks
        and the targets' down timers stop."""
        asyncore.dispatcher.close(self)
        self._pause.cancel()
        if self.health is not None:
            self.health.stop()
        if self.targets is not None:
            self.targets.retire()

    def release_listener(self) -> socket.socket:
        """Stop accepting and hand the listening socket, still open, to a successor."""
        listener = self.socket
        self.del_channel()
        self.socket = None
        self.accepting = False
        self._pause.cancel()
        if self.health is not None:
            self.health.stop()
        if self.targets is not None:
            self.targets.retire()
        return listener

    @property
    def accept_paused(self) -> bool:
        """True during a pause of accepting: out of descriptors (or after an accept error)."""
        return self._pause.timer is not None

    # -- select() predicates --------------------------------------------

    def readable(self) -> bool:
        """Accept, except during a pause after running out of descriptors."""
        # asyncore's own loops ask this every round: run the timers that are
        # due, for a map served by a plain asyncore.loop() that knows nothing
        # of them (asyncore_fwd's loops run them too; the second call is one
        # comparison).  It is safe to close connections here: a connection
        # joins the map after its listener, so the first listener in the map
        # is asked before any connection's descriptor is collected this round.
        self._timers.run_due()
        return self._pause.timer is None and not self._faults.is_down

    def writable(self) -> bool:
        return False

    # -- event handlers ---------------------------------------------------

    def handle_accept(self) -> None:
        """Called when clients wait in the backlog: take up to ``ACCEPTS_PER_EVENT``."""
        for _ in range(ACCEPTS_PER_EVENT):
            try:
                accepted = self.accept()  # None when the client already left
            except OSError as error:
                if error.errno in OUT_OF_RESOURCES:
                    self.pause_accepting(error)
                else:
                    log.warning("accept on %s failed: %s", format_address(self.address), describe_error(error))
                return
            if accepted is None:
                return
            self.handle_accepted(*accepted)
            if self._pause.timer is not None:
                return

    def handle_accepted(self, sock: socket.socket, addr: SockAddr) -> None:
        """Called with each new client socket: pair it with a connection to the remote."""
        if (self.loopback.own_ends or self.loopback.turned_back) and self.loopback.came_back(sock, addr):
            return  # the remote led back here: do not forward it again
        for step in self.admission:
            reason = step.refusal(addr, len(self.connections))
            if reason is not None:
                self.refuse(sock, addr, reason)
                return
        try:
            _loop.check_watchable(self._map, sock)
            Connection(self, sock, addr)
        except OSError as error:
            reset(sock)  # refused, not served: a reset says so
            if error.errno in OUT_OF_RESOURCES:
                self.pause_accepting(error)
            else:
                details = {"rule": self._label, "client": format_address(addr), "reason": "resources"}
                log.warning("dropped client %s: %s", format_address(addr), describe_error(error),
                            extra={"event": "refused", "details": details})

    def handle_close(self) -> None:
        """Called on an error flag on the listener: never close it, just pause."""
        self.pause_accepting(os_error(pending_error(self.socket) or errno.EIO))

    def handle_error(self) -> None:
        """Called when a handler raised: keep listening, pause so a repeat cannot spin."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            self.pause_accepting(error)
        else:
            log.exception("%r: internal error", self)
            self.pause_accepting(RuntimeError("internal error"))

    # -- helpers ----------------------------------------------------------

    def refuse(self, sock: socket.socket, addr: SockAddr, reason: str) -> None:
        """Turn a client away with a reset, count it, and log it (rate-limited)."""
        self.stats.refused(reason)  # first: the client may look at the stats once reset
        reset(sock)
        self.refusals.refused(addr, reason)

    def pause_accepting(self, error: BaseException) -> None:
        """Stop accepting for ``ACCEPT_PAUSE`` s (out of descriptors, or an error): see ``AcceptPause``."""
        self._pause.start(error, ACCEPT_PAUSE)


# The article's lowercase names, for code written against it.
forwarder = Forwarder
receiver = Receiver
sender = Sender
