"""What a forwarder keeps for the connections it makes, apart from listening.

A ``Connection`` asks its owner for what the relay's ``ConnectionOwner``
lists.  ``ConnectionOwnerBase`` keeps most of it for one rule: the side
classes (the splice ones with ``splice=True``), the read buffer the sides
share, the live connections, the rule's observers and admission steps
(counters, limits, timeouts), the remote's addresses and the target
choice (over the rule's targets when it has several: ``_ops._balance``),
and the hooks that log each connection's life.  The listener that accepts
the clients (``Forwarder``) adds the rest: the loop-back guard, the accept
pause and the targets' active checks (``_ops._health``).
"""

from __future__ import annotations

import logging
import socket
from typing import List, Optional, Set, Tuple, Type

from .._eventloop._timers import Timers
from .._net import RemoteAddresses, SockAddr, check_source, family_of, format_address
from .._ops._access import AccessControl, RefusalLog
from .._ops._balance import TargetSet
from .._ops._proxy import ProxyHeader
from .._ops._proxy_accept import ProxyAccept
from .._ops._stats import RuleStats, log_close
from .._ops._timeouts import TimeoutWatch
from .._relay._connection import AdmissionStep, Connection, ConnectionObserver
from .._relay._copy import Receiver
from .._relay._sender import Sender
from .._relay._targets import InOrder, TargetChoice
from .._values._rules import Rule

__all__ = ["ConnectionOwnerBase"]

log = logging.getLogger("asyncore_fwd")


def read_buffer(given: Optional[memoryview], size: int) -> memoryview:
    """The read buffer of ``size`` bytes: ``given`` if it is large enough (shared), else a new one."""
    if given is not None:
        given = memoryview(given)  # the same memory, whatever buffer was given
        if given.readonly or given.itemsize != 1:
            raise ValueError("scratch must be a writable buffer of bytes")
    if given is None or len(given) < size:
        given = memoryview(bytearray(size))
    return given[:size]


class ConnectionOwnerBase:
    """The connection-owning half of a forwarder: what its connections need, but the listening."""

    receiver_class: Type[Receiver]
    sender_class: Type[Sender]
    _label: str  # the listener's name in log lines

    def _own_connections(self, rule: Rule, stats: Optional[RuleStats], scratch: Optional[memoryview]) -> None:
        """What needs no socket: a wrong buffer or side class fails before the port is bound."""
        self.rule = rule
        if rule.splice:  # the splice sides, unless a subclass brought its own (ValueError for copying ones)
            from .._relay._splice import splice_sides
            self.receiver_class, self.sender_class = splice_sides(self.receiver_class, self.sender_class)
        #: The live connections, for stats and for closing them all.
        self.connections: Set[Connection] = set()
        #: The counters of this rule (``stats.snapshot(self.connections)``).
        self.stats = stats if stats is not None else RuleStats()
        #: One read buffer for every connection: the loop runs one handler at a time.
        self.scratch = read_buffer(scratch, rule.read_size)
        if rule.source is not None:  # an address not on this machine fails the start, in one line
            check_source(rule.source)
        self._remote = RemoteAddresses(rule.remote_host, rule.remote_port,
                                       socket.AF_UNSPEC if rule.source is None else family_of(rule.source))

    def _set_up_operations(self, timers: Timers) -> None:
        """The rule's access control (its first admission step), and what observes its connections."""
        #: Allow/deny lists and limits; None when the rule has none (nothing to check).
        self.access = AccessControl.for_rule(self.rule, timers)
        #: The rate-limited log of refused clients (by access control or any other admission step).
        self.refusals = self.access.refusals if self.access is not None else RefusalLog(self.rule.label, timers)
        #: The rule's targets, their state (up, open connections, failed connects) and balance;
        #: None for a rule with one target and no active checks (its connects go to the remote).
        self.targets = TargetSet.for_rule(self.rule, timers, self._remote, self.stats.target_failures)
        #: What follows every connection, told before the hooks: counters, limits, timeouts, the PROXY
        #: header, the targets' counts (toxics join later).
        observers = (self.stats, self.access, TimeoutWatch.for_rule(self.rule), ProxyHeader.for_rule(self.rule),
                     self.targets)
        self.observers: Tuple[ConnectionObserver, ...] = tuple(obs for obs in observers if obs is not None)
        #: The steps between accept and the server connect: the PROXY header of a trusted balancer (which
        #: names the client), who may connect, and how many.
        steps = (ProxyAccept.for_rule(self.rule), self.access)
        self.admission: Tuple[AdmissionStep, ...] = tuple(step for step in steps if step is not None)

    def add_observer(self, observer: ConnectionObserver) -> None:
        """Tell ``observer`` of every connection's life from now on (see ``ConnectionObserver``).

        Call it in the loop's thread.  It hears of the close of connections
        already open, though not of their opening.
        """
        self.observers += (observer,)

    def add_admission_step(self, step: AdmissionStep) -> None:
        """Ask ``step`` about every client from now on, after the steps already there
        (see ``AdmissionStep``).  Call it in the loop's thread."""
        self.admission += (step,)

    def client_refused(self, client_address: SockAddr, reason: str) -> None:
        """A step turned an open connection's client away: counted and logged as refused at accept."""
        self.stats.refused(reason)
        self.refusals.refused(client_address, reason)

    def remote_addresses(self) -> List[Tuple[int, SockAddr]]:
        """(family, sockaddr) of the remote to try, in order."""
        return self._remote.current()

    def target_choice(self, conn: Connection) -> TargetChoice:
        """Whom ``conn`` connects to: the remote's addresses in order (looked up again once stale),
        or, with several targets, the rule's balance over them.  Override to choose differently
        (see ``TargetChoice``)."""
        if self.targets is None:
            return InOrder(self.remote_addresses())
        return self.targets.choice(conn)

    # -- events: override to log, count or trace differently ---------------
    # (the base methods write the log lines; the counters and limits are kept
    # by the observers, told first, whether or not an override calls them)

    def connection_opened(self, conn: Connection) -> None:
        """A client was accepted; the server connect starts."""
        log.debug("#%d accepted from %s", conn.id, format_address(conn.client_address))

    def connection_established(self, conn: Connection) -> None:
        """The server side connected; bytes flow both ways."""
        assert conn.server_address is not None
        log.debug("#%d connected to %s (%s)", conn.id, conn.target or self.rule.remote,
                  format_address(conn.server_address))

    def connection_closed(self, conn: Connection) -> None:
        """The pair closed: log one line with what it moved and why it ended.

        DEBUG for a clean close, INFO when the forwarder ended it (a timeout,
        a drain cut short, an injected fault), WARNING for an error.  The line's format is in ``_stats``.
        DEBUG too for a client reset for lack of descriptors: the accept pause's
        line (rate-limited) tells it, and out of descriptors it would come every pause.
        """
        log_close(conn, self._label)
