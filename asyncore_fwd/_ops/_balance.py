"""Several targets for one rule: which one a new connection tries first, and which are down.

Strategy: one ``TargetSet`` per forwarder of a rule with more than one
target (or with active checks), made only then: a rule with one target
keeps the relay's plain ``InOrder`` choice and pays nothing.  For each new
connection the set makes a ``TargetTry``, the relay's ``TargetChoice``: the
targets in the balance's order -- the first that is up (``first``), each in
turn (``roundrobin``), the fewest open connections (``leastconn``; among as
few, the one chosen longest ago: round robin, as HAProxy and nginx do) --
the targets that are up first, then those marked down, each once (a down mark is
a preference, never a refusal: when all are down a client still tries them
all).  Within one target's try, each of its addresses is tried in turn (a
hostname resolves like the remote, ``_net.RemoteAddresses``); the target has
failed when every one of them failed.

Passive health, as nginx's ``max_fails``/``fail_timeout``: ``max_fails``
failed connects within ``fail_timeout`` seconds mark a target down for
``fail_timeout`` seconds, after which it is up again, for the next client to
try: on probation, as in nginx, so that one more failed connect (before a
success) marks it down again at once.  Active checks (``_health``) mark targets down and up through
``check_passed``/``check_failed``.  Every change of state is one INFO line,
event ``target``.

The set also observes the rule's connections: a connection counts in its
target's ``active`` from the moment it starts connecting to it until that
target fails or the pair closes, whenever that happens (a client that left
mid-connect included), which is what ``leastconn`` compares.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from .._eventloop._timers import Timer, Timers
from .._net import OUT_OF_RESOURCES, RemoteAddresses, SockAddr, describe_error, family_of, format_address
from .._relay._connection import Connection, ConnectionObserver
from .._relay._targets import Target
from .._values._rules import Rule

__all__ = ["TARGET_COUNTERS", "TargetSet", "TargetState", "TargetTry"]

log = logging.getLogger("asyncore_fwd")

#: The keys of a target's snapshot, in the order they are reported.
TARGET_COUNTERS = ("up", "active", "connect_failures")


class TargetState:
    """One target of a rule: its addresses, whether it is up, and what went through it.

    ``connect_failures`` counts the clients' failed connects to it (every
    address failed), passive and total; the active checks do not count there.
    The count is kept by name in ``failures``, which a reloaded rule's
    forwarders share (``RuleStats.target_failures``): it never goes back.
    """

    __slots__ = ("name", "index", "addresses", "up", "active", "failures", "_recent_failures",
                 "_down_timer", "_probation", "_first_at")

    def __init__(self, index: int, addresses: RemoteAddresses, failures: Dict[str, int]) -> None:
        #: "host:port" as configured: in log lines, the ``target`` event and the metrics.
        self.name = format_address((addresses.host, addresses.port))
        #: Its place in the rule's list (0: the first target).
        self.index = index
        #: Its socket addresses, resolved at start and again once stale.
        self.addresses = addresses
        #: False while marked down (failed connects, or a failed active check).
        self.up = True
        #: Connections connecting to it or relaying through it now.
        self.active = 0
        #: Failed connects of clients, by target name, in all (not the active checks).
        self.failures = failures
        self._recent_failures: List[float] = []
        self._down_timer: Optional[Timer] = None
        #: Up again after a down time: the next failed connect marks it down at once.
        self._probation = False
        #: ``leastconn``: the set's turn when a connection last tried it first (0: never).
        self._first_at = 0

    @property
    def connect_failures(self) -> int:
        """Failed connects of clients to it, in all (not the active checks)."""
        return self.failures.get(self.name, 0)

    def __repr__(self) -> str:
        return f"<TargetState {self.name} {'up' if self.up else 'down'} active={self.active}>"


class TargetSet(ConnectionObserver):
    """The targets of one forwarder's rule, their state, and the balance that orders them."""

    __slots__ = ("rule", "label", "targets", "_timers", "_turn", "_serving", "_retired")

    def __init__(self, rule: Rule, timers: Timers, first: Optional[RemoteAddresses] = None,
                 failures: Optional[Dict[str, int]] = None) -> None:
        self.rule = rule
        #: The rule's name in the log lines (the forwarder sets it once its port is known).
        self.label = rule.label
        # Only the addresses of the source's family, with a source (OSError: an unknown host, or none of them).
        family = socket.AF_UNSPEC if rule.source is None else family_of(rule.source)
        addresses = [first or RemoteAddresses(rule.remote_host, rule.remote_port, family)]
        addresses += [RemoteAddresses(host, port, family) for host, port in rule.targets]
        #: Every target, in the rule's order.
        failures = {} if failures is None else failures  # a reloaded rule's counts go on
        self.targets: Tuple[TargetState, ...] = tuple(TargetState(index, each, failures)
                                                      for index, each in enumerate(addresses))
        self._timers = timers
        self._turn = 0  # roundrobin's next start; leastconn's count of choices
        #: The target each connection counts in (while connecting to it or relaying through it).
        self._serving: Dict[Connection, TargetState] = {}
        #: None while the forwarder accepts; once it stops, the targets whose down time it cut short.
        self._retired: Optional[List[TargetState]] = None

    @classmethod
    def for_rule(cls, rule: Rule, timers: Timers, first: Optional[RemoteAddresses] = None,
                 failures: Optional[Dict[str, int]] = None) -> Optional[TargetSet]:
        """The targets of ``rule``, or None when it has one and no active checks (the plain path).
        ``failures`` keeps the failed connects per target name (a reloaded rule's go on)."""
        if not rule.targets and not rule.health_check_interval:
            return None
        return cls(rule, timers, first, failures)

    def __iter__(self) -> Iterator[TargetState]:
        return iter(self.targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> TargetState:
        return self.targets[index]

    def snapshot(self) -> Dict[str, Dict[str, int]]:
        """Per target, by name: ``TARGET_COUNTERS`` now (up as 1 or 0)."""
        return {target.name: {"up": int(target.up), "active": target.active,
                              "connect_failures": target.connect_failures} for target in self.targets}

    # -- the choice of each connection ---------------------------------------

    def choice(self, conn: Connection) -> TargetTry:
        """The targets ``conn`` tries, in order (see the module docstring)."""
        return TargetTry(self, conn, self.order())

    def order(self) -> List[TargetState]:
        """The targets in the order a new connection tries them: those up, in the balance's order, then the rest."""
        up = [target for target in self.targets if target.up]
        down = [target for target in self.targets if not target.up]
        balance = self.rule.balance
        if balance == "roundrobin" and up:
            start = self._turn % len(up)
            self._turn = start + 1
            up = up[start:] + up[:start]
        elif balance == "leastconn" and up:
            # Ties go to the one tried first longest ago: round robin among them.
            up.sort(key=lambda target: (target.active, target._first_at))
            self._turn += 1
            up[0]._first_at = self._turn
        return up + down

    def started(self, conn: Connection, target: TargetState) -> None:
        """``conn`` starts connecting to ``target``: it counts there until that fails or the pair closes."""
        self._leave(conn)
        self._serving[conn] = target
        target.active += 1

    def connect_failed(self, conn: Connection, target: TargetState, error: OSError) -> None:
        """Every address of ``target`` failed for ``conn``: count it, maybe mark the target down.
        (Not for our own lack of descriptors or memory: that is no fault of the target's.)"""
        self._leave(conn)
        self.failure(target, error)

    def failure(self, target: TargetState, error: OSError) -> None:
        """``target`` failed a client, connection or not (a UDP session's ICMP error): count it,
        maybe mark it down (not for our own lack of descriptors or memory)."""
        if error.errno in OUT_OF_RESOURCES:
            return
        target.failures[target.name] = target.connect_failures + 1
        if not self.rule.max_fails or not target.up or self._retired is not None:
            return
        now = time.monotonic()
        window = self.rule.fail_timeout
        recent = [when for when in target._recent_failures if now - when < window] + [now]
        target._recent_failures = recent
        if target._probation:
            self._mark_down(target, f"a failed connect after its down time: {describe_error(error)}", window)
        elif len(recent) >= self.rule.max_fails:
            count = f"{len(recent)} failed connects" if len(recent) > 1 else "a failed connect"
            self._mark_down(target, f"{count} within {window:g} s, the last: {describe_error(error)}", window)

    def connected(self, conn: Connection, target: TargetState) -> None:
        """``conn`` relays through ``target``: name it on the connection (the close line, the metrics)."""
        conn.target = target.name
        target._probation = False

    def closed(self, conn: Connection) -> None:
        """Every close of the rule's connections (a client gone mid-connect too): leave its target's count."""
        self._leave(conn)

    def _leave(self, conn: Connection) -> None:
        target = self._serving.pop(conn, None)
        if target is not None:
            target.active -= 1

    # -- health ----------------------------------------------------------------

    def check_passed(self, target: TargetState) -> None:
        """An active check reached ``target``: up, whatever the failed connects said."""
        target._recent_failures = []
        target._probation = False
        if not target.up:
            self._mark_up(target, "health check passed")

    def check_failed(self, target: TargetState, error: OSError) -> None:
        """An active check could not reach ``target``: down until a check passes."""
        if target.up:
            self._mark_down(target, f"health check failed: {describe_error(error)}", None)
        elif target._down_timer is not None:  # down for a while after failed connects: now until a check passes
            target._down_timer.cancel()
            target._down_timer = None

    def _mark_down(self, target: TargetState, reason: str, for_seconds: Optional[float]) -> None:
        target.up = False
        target._recent_failures = []
        target._probation = False
        if target._down_timer is not None:
            target._down_timer.cancel()
            target._down_timer = None
        if for_seconds is not None and self._retired is None:
            target._down_timer = self._timers.call_later(for_seconds, self._down_time_over, target)
        self._log(target, reason)

    def _down_time_over(self, target: TargetState) -> None:
        target._down_timer = None
        if not target.up:
            target._probation = True
            self._mark_up(target, f"down for fail_timeout ({self.rule.fail_timeout:g} s): to be tried again")

    def _mark_up(self, target: TargetState, reason: str) -> None:
        target.up = True
        if target._down_timer is not None:
            target._down_timer.cancel()
            target._down_timer = None
        self._log(target, reason)

    def _log(self, target: TargetState, reason: str) -> None:
        state = "up" if target.up else "down"
        details = {"rule": self.label, "target": target.name, "state": state, "reason": reason}
        log.info("%s: target %s is %s: %s", self.label, target.name, state, reason,
                 extra={"event": "target", "details": details})

    def retire(self) -> None:
        """The forwarder stops accepting (a reload, a drain, its close): no timer of ours is
        left, and no state changes or lines come from it; its open connections still count."""
        if self._retired is not None:
            return
        self._retired = []
        for target in self.targets:
            if target._down_timer is not None:
                target._down_timer.cancel()
                target._down_timer = None
                self._retired.append(target)

    def resume(self) -> None:
        """The forwarder accepts again (its listener given back): the down times cut short start over."""
        retired, self._retired = self._retired or [], None
        for target in retired:
            if not target.up and target._down_timer is None:
                target._down_timer = self._timers.call_later(self.rule.fail_timeout, self._down_time_over, target)


class TargetTry:
    """One connection's ``TargetChoice`` over a ``TargetSet``: each target once, in the order given,
    each of a target's addresses in turn; the errors of the failed ones make the close line's reason."""

    __slots__ = ("_set", "_conn", "_order", "_index", "_addresses", "_failures")

    def __init__(self, targets: TargetSet, conn: Connection, order: Sequence[TargetState]) -> None:
        self._set = targets
        self._conn = conn
        self._order = order
        self._index = -1
        self._addresses: List[Tuple[int, SockAddr]] = []
        #: (target, error) of each target that failed, in the order tried.
        self._failures: List[Tuple[TargetState, OSError]] = []

    def next_target(self) -> Optional[Target]:
        while not self._addresses:
            self._index += 1
            if self._index >= len(self._order):
                return None
            self._addresses = list(self._order[self._index].addresses.current())
            if self._addresses:
                self._set.started(self._conn, self._order[self._index])
        return self._addresses.pop(0)

    def failed(self, target: Target, error: OSError) -> None:
        if not self._addresses:  # the target's last address: the target failed
            current = self._order[self._index]
            self._failures.append((current, error))
            self._set.connect_failed(self._conn, current, error)

    def succeeded(self, target: Target) -> None:
        self._addresses = []
        self._set.connected(self._conn, self._order[self._index])

    def describe_failure(self, last: OSError) -> str:
        """Why the client is reset: every target tried, and how each failed (one target: as without checks)."""
        if len(self._order) == 1:
            return f"cannot connect to {self._order[0].name}: {describe_error(last)}"
        tried = "; ".join(f"{target.name}: {describe_error(error)}" for target, error in self._failures)
        return f"cannot connect to any target ({tried or describe_error(last)})"
