"""The forwarder: the article's listening dispatcher, made correct.

The article's design is kept: a listening ``Forwarder`` accepts a client,
wraps it in a ``Receiver`` (talks to the client) and pairs it with a
``Sender`` (talks to the server).  Those two sides, and the ``Connection``
that owns them, are the copy relay (``_relay``); ``_splice`` has a
zero-copy variant of the sides.

Strategy, in the order the loop sees it:

* **Backpressure.**  A side is ``readable()`` only while the bytes waiting
  for its peer are under ``high_water``.  When the slow side cannot keep up,
  the fast side simply stops being asked for reads, and the kernel's own
  buffers push back on the sender.  Memory per connection is bounded.
* **Half-close.**  EOF on one side is not the end of the connection: first
  everything already read from that side is written to the other one, then
  the EOF is passed on with ``shutdown(SHUT_WR)``.  The pair closes when both
  directions have done this, or at once on an error.  A side that has seen
  EOF stops asking for read events, so the loop does not spin on it.
* **Timers.**  asyncore has no timer API; ``_timers`` adds a deadline
  heap per map, for the connect timeout and the pause after EMFILE.  Our
  loop backends end each wait when the next timer is due; under a plain
  ``asyncore.loop`` the listener's ``readable()``, which asyncore asks every
  round, runs the timers that are due.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
from typing import Any, List, Optional, Tuple

from . import _loop
from ._compat import asyncore
from ._net import (OUT_OF_RESOURCES, RemoteAddresses, SockAddr, SocketMap, describe_error, format_address,
                   listen_address, os_error, pending_error, reset)
from ._access import AccessControl, is_loopback
from ._relay import Connection, Receiver, Sender, _Dispatcher
from ._rules import DEFAULT_BACKLOG, DEFAULT_CONNECT_TIMEOUT, DEFAULT_HIGH_WATER, DEFAULT_READ_SIZE, Rule
from ._stats import RuleStats, close_details, format_close
from ._timers import Timer, forget, timers_for

__all__ = ["Forwarder", "Receiver", "Sender", "Connection", "Rule", "forwarder", "receiver", "sender"]

log = logging.getLogger("asyncore_fwd")

#: How long the listener stops accepting when the process is out of descriptors.
ACCEPT_PAUSE = 0.5
#: Connections taken from the backlog per readiness event of the listener.
ACCEPTS_PER_EVENT = 128


class Forwarder(_Dispatcher):
    """Listens on ``ip:port`` and forwards each client to ``remoteip:remoteport``.

    Keeps the article's signature.  The remote may be a hostname or an IPv4/
    IPv6 address; it is resolved now, so an unknown host raises ``OSError``
    here, as does a port already in use.  ``port=0`` binds a free port: see
    ``address``.  ``map`` is the asyncore map to join (the global one by
    default, as in asyncore); run it with ``serve_forever()`` or with your own
    ``asyncore.loop(use_poll=True, map=...)``.  ``splice=True`` relays with
    os.splice() (Linux) instead of copying through Python; ``reuse_port=True``
    lets other processes listen on the same port (see ``--workers``).
    """

    #: The classes of a connection's two sides (splice=True swaps in others).
    receiver_class: type = Receiver
    sender_class: type = Sender

    def __init__(self, ip: str, port: int, remoteip: str, remoteport: int, backlog: int = DEFAULT_BACKLOG, *,
                 map: Optional[SocketMap] = None,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 high_water: int = DEFAULT_HIGH_WATER,
                 read_size: int = DEFAULT_READ_SIZE,
                 splice: bool = False,
                 reuse_port: bool = False,
                 **options: Any) -> None:
        # ``options``: the other fields of ``Rule`` (name, allow, deny, limits, timeouts).
        self._start(Rule(ip, port, remoteip, remoteport, backlog, connect_timeout, high_water, read_size, splice,
                         reuse_port, **options), map)

    @classmethod
    def from_rule(cls, rule: Rule, map: Optional[SocketMap] = None, *, stats: Optional[RuleStats] = None,
                  listener: Optional[socket.socket] = None) -> Forwarder:
        """A forwarder for ``rule``, listening now.

        ``stats`` continues another forwarder's counters, and ``listener``
        takes over its listening socket (see ``release_listener``): how a
        reload changes a rule without closing its port.
        """
        fwd = cls.__new__(cls)
        fwd._start(rule, map, stats, listener)
        return fwd

    def _start(self, rule: Rule, map: Optional[SocketMap], stats: Optional[RuleStats] = None,
               listener: Optional[socket.socket] = None) -> None:
        self.rule = rule
        if self.rule.splice:
            from ._splice import SpliceReceiver, SpliceSender
            self.receiver_class, self.sender_class = SpliceReceiver, SpliceSender
        #: The live connections, for stats and for closing them all.
        self.connections: set[Connection] = set()
        #: The counters of this rule (``stats.snapshot(self.connections)``).
        self.stats = stats if stats is not None else RuleStats()
        #: One read buffer for every connection: the loop runs one handler at a time.
        self.scratch = memoryview(bytearray(self.rule.read_size))
        self._remote = RemoteAddresses(self.rule.remote_host, self.rule.remote_port)
        self._accept_pause: Optional[Timer] = None
        self._stop_requested = False
        super().__init__(map=map)
        self._timers = timers_for(self._map)
        #: Allow/deny lists and limits; None when the rule has none (nothing to check).
        self.access = AccessControl.for_rule(self.rule, self._timers)
        if listener is not None:
            self._take_over(listener)
        else:
            self._listen()
        self._address: Tuple[str, int] = self.socket.getsockname()[:2]
        self.addr = self._address  # asyncore's repr shows it: the real port, not 0
        if not self.rule.allow and not is_loopback(self._address[0]):
            log.warning("%s: listening on %s with no allow list: anyone who can reach it may connect",
                        self.rule.label, format_address(self._address))

    def _listen(self) -> None:
        family, address = listen_address(self.rule.local_host, self.rule.local_port)
        self.create_socket(family, socket.SOCK_STREAM)
        try:
            self.set_reuse_addr()
            if self.rule.reuse_port:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self.bind(address)
            self.listen(self.rule.backlog)
        except OSError as error:
            self.close()
            where = format_address((self.rule.local_host, self.rule.local_port))
            raise OSError(error.errno, f"cannot listen on {where}: {describe_error(error)}") from None
        except BaseException:
            self.close()
            raise

    def _take_over(self, listener: socket.socket) -> None:
        self.set_socket(listener)
        self.accepting = True
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
        """The rule's name in logs and stats: its name, or where it listens."""
        return self.rule.label

    def remote_addresses(self) -> List[Tuple[int, SockAddr]]:
        """(family, sockaddr) of the remote to try, in order."""
        return self._remote.current()

    # -- running ----------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5, loop: str = "auto") -> None:
        """Run the loop on this forwarder's map until ``stop()``, then ``close()``.

        ``loop`` is ``"epoll"``, ``"poll"``, ``"select"`` or ``"auto"`` (the
        best the platform has).  select() fails past descriptor 1023; epoll's
        cost follows the active connections, not the open ones.  ``stop()``
        takes effect within ``poll_interval`` seconds.
        """
        backend = _loop.open_loop(loop, self._map)
        try:
            while not self._stop_requested and self._map:
                backend.poll(poll_interval)
        finally:
            self.close()
            backend.close()

    def stop(self) -> None:
        """Ask ``serve_forever`` to return.  Safe from another thread or a signal handler."""
        self._stop_requested = True

    def close(self) -> None:
        """Stop listening and close every connection this forwarder made."""
        self.stop_accepting()
        for conn in list(self.connections):
            conn.close()
        if self.access is not None:
            self.access.refusals.close()
        if not self._map:
            forget(self._map)

    def stop_accepting(self) -> None:
        """Close the listening socket; the connections go on (to drain them)."""
        asyncore.dispatcher.close(self)
        self._cancel_accept_pause()

    def release_listener(self) -> socket.socket:
        """Stop accepting and hand the listening socket, still open, to a successor."""
        listener = self.socket
        self.del_channel()
        self.socket = None
        self.accepting = False
        self._cancel_accept_pause()
        return listener

    def _cancel_accept_pause(self) -> None:
        if self._accept_pause is not None:
            self._accept_pause.cancel()
            self._accept_pause = None

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
        return self._accept_pause is None

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
            if self._accept_pause is not None:
                return

    def handle_accepted(self, sock: socket.socket, addr: SockAddr) -> None:
        """Called with each new client socket: pair it with a connection to the remote."""
        if self.access is not None:
            reason = self.access.refusal(addr, len(self.connections))
            if reason is not None:
                self.refuse(sock, addr, reason)
                return
        try:
            Connection(self, sock, addr)
        except OSError as error:
            reset(sock)  # refused, not served: a reset says so
            if error.errno in OUT_OF_RESOURCES:
                self.pause_accepting(error)
            else:
                log.warning("dropped client %s: %s", format_address(addr), describe_error(error))

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
        if self.access is not None:
            self.access.refusals.refused(addr, reason)

    def pause_accepting(self, error: BaseException) -> None:
        """Stop accepting for ``ACCEPT_PAUSE`` s (out of descriptors, or an error)."""
        if self._accept_pause is not None:
            self._accept_pause.cancel()
        else:
            log.warning("not accepting on %s for %g s: %s", format_address(self.address),
                        ACCEPT_PAUSE, describe_error(error))
        self._accept_pause = self._timers.call_later(ACCEPT_PAUSE, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._accept_pause = None
        log.info("accepting connections again on %s", format_address(self.address))
        _loop.channel_changed(self)

    # -- events: override to log, count or trace differently ---------------
    # (call the base method: it keeps the counters and the limits)

    def connection_opened(self, conn: Connection) -> None:
        """A client was accepted; the server connect starts."""
        self.stats.accepted += 1
        if self.access is not None:
            self.access.opened(conn)
        log.debug("#%d accepted from %s", conn.id, format_address(conn.client_address))

    def connection_established(self, conn: Connection) -> None:
        """The server side connected; bytes flow both ways."""
        assert conn.server_address is not None
        log.debug("#%d connected to %s (%s)", conn.id, self.rule.remote, format_address(conn.server_address))

    def connection_closed(self, conn: Connection) -> None:
        """The pair closed: count it, and log one line with what it moved and why it ended.

        DEBUG for a clean close, INFO when the forwarder ended it (a timeout,
        a drain cut short), WARNING for an error.  The line's format is in ``_stats``.
        """
        self.stats.closed(conn)
        if self.access is not None:
            self.access.closed(conn)
        details = close_details(conn, self.rule.label)
        level = logging.DEBUG if not conn.error else logging.INFO if conn.cut else logging.WARNING
        if log.isEnabledFor(level):
            log.log(level, "%s", format_close(details), extra={"event": "close", "details": details})


# The article's lowercase names, for code written against it.
forwarder = Forwarder
receiver = Receiver
sender = Sender
