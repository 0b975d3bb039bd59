"""One forwarded connection: the pair of sides it owns, and what happened to them.

A ``Connection`` is the one place where a pair is created and closed, and it
keeps what the logs report (addresses, bytes each way, duration, who closed
first, why it ended early).  ``cut()`` ends many at once, with resets.

Strategy: a connection knows nothing of what acts on it.  What it needs
from whoever accepted its client is a ``ConnectionOwner`` (a ``Forwarder``
is one); counters, limits, timeouts and toxics are ``ConnectionObserver``
objects of the owner, told of each connection's life as it happens (never
per byte), before the owner's own hooks, which only log.  Between accept
and the server connect, the owner's ``AdmissionStep`` objects may turn the
client away, or hold the connect (to read a header from the client first).
"""

from __future__ import annotations

import itertools
import socket
import time
from typing import Callable, Iterable, MutableSet, Optional, Protocol, Sequence

from .._eventloop._runner import STOPPED  # why connections still open were cut: a stop() or close()
from .._eventloop._timers import Timer, timers_for
from .._net import SockAddr, SocketMap, describe_error, format_address
from .._values._rules import Rule
from ._loopback import LoopbackGuard
from ._sides import ServerSide, Side
from ._targets import TargetChoice

__all__ = ["STOPPED", "AdmissionStep", "Connection", "ConnectionObserver", "ConnectionOwner",
           "cut"]


class ConnectionObserver:
    """Follows the life of every connection of an owner: counters, limits, timeouts, toxics.

    A connection tells each of its owner's ``observers``, in order, before
    the owner's hook of the same moment (``connection_opened``...), so what
    an observer keeps is right whether or not a subclass's hook calls the
    base method.  Called in the loop's thread; the defaults do nothing.
    """

    __slots__ = ()

    def opened(self, conn: Connection) -> None:
        """A client was accepted and its connection made; the server connect has not started."""

    def established(self, conn: Connection) -> None:
        """The server connect succeeded: bytes may flow both ways."""

    def half_closed(self, conn: Connection) -> None:
        """One direction passed its EOF on; the other still relays."""

    def closed(self, conn: Connection) -> None:
        """The pair closed (once), whatever ended it."""

    def holds(self, conn: Connection) -> bool:
        """Whether this observer holds bytes of ``conn`` that it has not passed on: a timeout
        then resets the pair, as for bytes still queued (a toxic's latency, say)."""
        return False


class AdmissionStep:
    """A step between accept and the server connect: who may connect, how many, what comes first.

    The owner asks its ``admission`` steps in order.  ``refusal`` comes
    before anything is made for the client: a reason turns it away with a
    reset, logged as a refusal and counted (``refused_acl`` for "acl" and
    "accept_proxy", ``refused_limit`` for any other reason).  ``admit`` comes
    once its ``Connection`` is open, before the server connect: False holds
    the connect until the step calls ``conn.let_go()`` (the next steps, then
    the connect), ``conn.refuse(reason)`` or ``conn.turn_away(reason)``, for
    the rule's connect timeout at most (then ``timed_out``).  The defaults
    let everyone in.
    """

    __slots__ = ()

    def refusal(self, client_address: SockAddr, open_connections: int) -> Optional[str]:
        """Why the client must be turned away (a short reason for the logs and counters), or None."""
        return None

    def admit(self, conn: Connection) -> bool:
        """True to go on; False to hold the connect (``conn.read_client()`` reads the client meanwhile)."""
        return True

    def timed_out(self, conn: Connection) -> None:
        """This step held the connect for the rule's connect timeout: the client must go."""
        conn.refuse(f"admission timed out after {conn.rule.connect_timeout:g} s")


class ConnectionOwner(Protocol):
    """What a connection needs of whoever accepted its client (a ``Forwarder``)."""

    @property
    def rule(self) -> Rule: ...

    @property
    def _map(self) -> SocketMap:
        """The asyncore map the sides join (asyncore's name for a dispatcher's map)."""

    @property
    def scratch(self) -> memoryview:
        """The read buffer every side shares: the loop runs one handler at a time."""

    @property
    def receiver_class(self) -> Callable[[Connection, socket.socket], Side]: ...

    @property
    def sender_class(self) -> Callable[[Connection], ServerSide]: ...

    @property
    def connections(self) -> MutableSet[Connection]:
        """The live connections: each joins when made and leaves when closed."""

    @property
    def observers(self) -> Sequence[ConnectionObserver]: ...

    @property
    def admission(self) -> Sequence[AdmissionStep]: ...

    def target_choice(self, conn: Connection) -> TargetChoice:
        """Whom ``conn`` connects to: asked once, when its server connect starts."""

    @property
    def loopback(self) -> LoopbackGuard:
        """Keeps the server connects from leading back to the owner's own listener."""

    def pause_accepting(self, error: BaseException) -> None:
        """Out of descriptors (or memory): stop taking clients for a while."""

    def client_refused(self, client_address: SockAddr, reason: str) -> None:
        """A step turned a client away (``turn_away``): count and log it as refused at accept."""

    # The hooks, told after the observers: they log.
    def connection_opened(self, conn: Connection) -> None: ...

    def connection_established(self, conn: Connection) -> None: ...

    def connection_closed(self, conn: Connection) -> None: ...


class Connection:
    """One forwarded connection: a ``Receiver``, a ``Sender`` and what happened to them.

    Created by the forwarder for each accepted client; then admitted (the
    owner's admission steps, which may hold it), connected, and closed once,
    by ``close()``.  Its observers, then the forwarder's hooks, hear of each.
    """

    _ids = itertools.count(1)
    # (Class attributes: a connection without a PROXY header or a step's hold pays nothing for them.)
    #: The front balancer's address when a PROXY header named the client (``proxied``), else None.
    proxied_by: Optional[SockAddr] = None
    #: True once a step turned the client away as a refusal (``turn_away``): its close line is DEBUG.
    turned_away = False
    _proxied_to: Optional[SockAddr] = None
    _holding: Optional[AdmissionStep] = None

    def __init__(self, forwarder: ConnectionOwner, sock: socket.socket, client_address: SockAddr) -> None:
        self.id = next(self._ids)
        self.forwarder = forwarder
        self.rule = forwarder.rule
        self.client_address = client_address
        #: The server address actually connected to, once connected.
        self.server_address: Optional[SockAddr] = None
        #: The target that served it, "host:port" as configured, on a rule with several targets
        #: or active checks (None on a rule with one target, or before the connect).
        self.target: Optional[str] = None
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
        # A close asked for while the opening is told (a toxic that cuts at
        # once) waits for it: nobody hears of the close before the opening.
        self._opening, self._close_asked = True, False
        #: True while an admission step holds the server connect (for the connect timeout at most).
        self.held = False
        self._hold_timer: Optional[Timer] = None
        self._steps_passed, self._connect_started, self._reading_client = 0, False, False
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
        try:
            for observer in forwarder.observers:
                observer.opened(self)
            forwarder.connection_opened(self)
            self._opening = False
            if self._close_asked:
                self.close()
            else:
                self.let_go()
        except BaseException as error:  # a hook, an observer or a step raised: end the pair, then say so
            self._opening = False
            if not self.closed:
                self.error = describe_error(error) if isinstance(error, OSError) else "internal error"
                self.reset_on_close()
                self.close()
            raise

    def __repr__(self) -> str:
        return f"<Connection #{self.id} from {format_address(self.client_address)}>"

    @property
    def bytes_to_server(self) -> int:
        return self.sender.bytes_sent

    @property
    def bytes_to_client(self) -> int:
        return self.receiver.bytes_sent

    def local_address(self) -> SockAddr:
        """The address the client connected to: its socket's own end (asked, not kept), or the one
        a front balancer's PROXY header named (``proxied``)."""
        if self._proxied_to is not None:
            return self._proxied_to
        assert self.receiver.socket is not None
        return self.receiver.socket.getsockname()

    def proxied(self, source: SockAddr, destination: SockAddr) -> None:
        """A balancer's PROXY header named the client, before the connect: ``source`` is the client from
        now on, ``destination`` the address it connected to; ``proxied_by`` keeps the balancer's."""
        self.proxied_by, self.client_address, self._proxied_to = self.client_address, source, destination

    @property
    def duration(self) -> float:
        """Seconds from accept to close (or until now, while open)."""
        return (self.closed_at or time.monotonic()) - self.opened_at

    def established_to(self, address: SockAddr) -> None:
        """The server side connected: from now on both sides relay."""
        self.server_address = address
        self.established = True
        self.connected_at = time.monotonic()
        for observer in self.forwarder.observers:
            observer.established(self)
        self.forwarder.connection_established(self)

    def direction_ended(self) -> None:
        """One direction passed its EOF on; the other still relays."""
        for observer in self.forwarder.observers:
            observer.half_closed(self)

    def let_go(self) -> None:
        """Go on towards the server connect: the admission steps left, then the connect.

        A step's ``admit`` returning False holds it; that step calls
        ``let_go()`` to go on (the client's reads are then its own again).
        """
        if self.closed or self._connect_started:
            return
        if self._reading_client:
            self.read_client(None)
        steps = self.forwarder.admission
        while self._steps_passed < len(steps):
            step = steps[self._steps_passed]
            self._steps_passed += 1
            if not step.admit(self):
                self.held = not (self._connect_started or self.closed)  # (unless it let go or refused at once)
                self._holding = step
                if self.held and self._hold_timer is None:
                    self._hold_timer = timers_for(self.forwarder._map).call_later(
                        self.rule.connect_timeout, self._held_too_long)
                return
        if self.closed or self._connect_started:  # a step refused, or let go from within admit()
            return
        self._stop_holding()
        self._connect_started = True
        self.sender.connect_next()

    def _held_too_long(self) -> None:
        # A step that never decides (a client that sends nothing) must not keep
        # the pair, and a place under the limits, for ever: it gets the connect timeout.
        self._hold_timer = None
        if self.held and not self.closed and self._holding is not None:
            self._holding.timed_out(self)
            if self.held and not self.closed and self._hold_timer is None:  # its verdict must end the hold
                AdmissionStep.timed_out(self._holding, self)

    def _stop_holding(self) -> None:
        self.held = False
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None

    def refuse(self, reason: str) -> None:
        """Turn the client away before the server connect: reset it, and close the pair with
        ``reason`` in its close line (a step holding the connect gives its verdict)."""
        self.close_early(reason)

    def turn_away(self, reason: str) -> None:
        """Refuse the client as at accept, from a step holding the connect: a reset, counted and
        logged (rate-limited) by the owner as a refusal; the close line adds nothing (DEBUG)."""
        if self.closed:
            return
        self.turned_away = True
        self.forwarder.client_refused(self.client_address, reason)
        self.close_early(reason)

    def read_client(self, received: Optional[Callable[[bytes], None]],
                    wanted: Optional[Callable[[], int]] = None) -> None:
        """While a step holds the connect: hand what the client sends to ``received(data)``
        (b"" at EOF) instead of queuing it for the server; None, or ``let_go()``, ends it.

        What ``received`` does not keep, it passes on with ``queue_for_server``.
        ``wanted()``, if given, is the most each read takes (a few KiB if not):
        what the step does not need stays in the socket, for the relay.
        """
        self._reading_client = received is not None
        self.receiver.divert_reads(received, wanted)

    def queue_for_server(self, data: bytes) -> None:
        """Send ``data`` to the server ahead of anything the client sends (a PROXY header).

        Only before the pair relays: from an observer's ``opened``, the
        ``connection_opened`` hook, or an admission step.  Copy and splice
        relays alike, whatever the high-water mark (with splice, no more than
        the kernel pipe holds, a page at least: ValueError beyond); the bytes
        count in ``bytes_to_server``.
        """
        if self.established or self.closed:
            raise RuntimeError(f"{self!r}: bytes go to the server ahead of the client's only before it relays")
        self.sender.queue_first(data)

    def side_finished(self, side: Side) -> None:
        """Record which side closed first (sent EOF or failed)."""
        if self.closed_first is None:
            self.closed_first = side.role

    def abort(self, side: Side, error: BaseException) -> None:
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

        Bytes an observer still holds (a toxic's latency longer than the timeout) are lost too.
        """
        lost = (len(self.receiver.outgoing) or len(self.sender.outgoing)
                or any(observer.holds(self) for observer in self.forwarder.observers))
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
        """Close both sockets (once) and tell the observers and the forwarder."""
        if self.closed:
            return
        if self._opening:
            self._close_asked = True
            return
        self.closed = True
        self.closed_at = time.monotonic()
        self.established = False
        self._stop_holding()
        self.receiver.close_socket()
        self.sender.close_socket()
        self.forwarder.connections.discard(self)
        for observer in self.forwarder.observers:
            observer.closed(self)
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
