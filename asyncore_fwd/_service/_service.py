"""A service: many rules, one process, one loop.

Strategy: one listener per rule (a ``Forwarder``, made by
``_listeners.listener_for``), all on one asyncore map, served by one loop
backend (``LoopRunner``).  What must happen while the loop runs -- a drain, a
reload -- is only *requested* by ``drain()`` and ``reload()``, which are
therefore safe from a signal handler or another thread: the request is
queued, the loop is woken at once (``LoopCalls``), and it carries the
request out between two rounds, where nothing else touches the map.

* **Drain.**  Every listener closes; the open connections go on until
  they end by themselves or the drain timeout cuts them (with resets:
  they did not end cleanly); then ``serve_forever`` returns.
* **Reload.**  A new list of rules is matched with the running ones by
  name, else by where they listen.  Unchanged: untouched.  Removed: stops
  accepting, its connections drain.  New: starts.  Changed: a new
  forwarder serves new clients with the new settings (taking over the
  listening socket when ``listen`` is the same, so no client is refused
  during the switch) while the old connections finish under the old
  settings; the rule's counters go on, and its limits count the
  connections made under the new settings.  A rule that cannot start is
  logged and the others apply (a changed rule then keeps its old settings).

Forwarders that stopped accepting but still have connections are
"retiring": they are served until their last connection closes, and
counted in ``stats()`` under their rule.
"""

from __future__ import annotations

import collections
import errno
import logging
import time
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

from .._eventloop._runner import STOPPED, LoopRunner
from .._eventloop._timers import forget
from .._net import SocketMap, describe_error, format_address
from .._ops._balance import TARGET_COUNTERS
from .._relay._connection import cut
from .._values._rules import DEFAULT_READ_SIZE, Rule
from ..toxics import Toxic
from ._listeners import Listener, listener_for

__all__ = ["Service"]

log = logging.getLogger("asyncore_fwd")


def _check_labels(rules: Sequence[Rule]) -> None:
    seen = set()
    for rule in rules:
        if not isinstance(rule, Rule):
            raise TypeError(f"rules must be Rule objects, not {type(rule).__name__}")
        if rule.label in seen:
            raise ValueError(f"two rules are named {rule.label!r}: give each rule its own name")
        seen.add(rule.label)


class Service:
    """Runs a list of rules on one asyncore map: one Forwarder per rule.

    Every listener is bound here, so a port in use or an unknown host fails
    at once with a one-line ``OSError`` (and nothing is left open).  ``map``
    is the asyncore map to join (a new one by default).
    """

    def __init__(self, rules: Sequence[Rule], *, map: Optional[SocketMap] = None,
                 toxics: Sequence[Tuple[Toxic, str]] = ()) -> None:
        rules = list(rules)
        _check_labels(rules)
        self.map: SocketMap = {} if map is None else map
        #: (toxic, direction) added to every rule's forwarder, reloaded ones too.
        self.toxics = list(toxics)
        #: The running forwarders, by ``rule.label``.
        self.forwarders: Dict[str, Listener] = {}
        #: Forwarders that stopped accepting, served until their last connection closes.
        self.retiring: List[Listener] = []
        #: Other dispatchers closed with the service (e.g. a ``MetricsServer``).
        self.attachments: List[Any] = []
        # Requests from drain() and reload(), carried out by the loop.
        self._requests: Deque[Tuple[str, Any]] = collections.deque()
        #: Runs the loop for ``serve_forever`` and ``stop``; wakes it for the requests.
        self._runner = LoopRunner(self.map, self)
        self._drain_deadline: Optional[float] = None
        # One read buffer for every rule: the loop runs one handler at a time,
        # and a buffer per rule would cost its read size in memory per rule.
        self._scratch = memoryview(bytearray(DEFAULT_READ_SIZE))
        try:
            for rule in rules:
                self.forwarders[rule.label] = self._start(rule)
        except BaseException:
            self.close()
            raise

    def _start(self, rule: Rule, **takeover: Any) -> Listener:
        if rule.read_size > len(self._scratch):
            self._scratch = memoryview(bytearray(rule.read_size))
        try:
            fwd = listener_for(rule, self.map, scratch=self._scratch, toxics=self.toxics, **takeover)
        except OSError as error:
            if error.errno != errno.EADDRINUSE or not self._free_port(rule):
                raise
            fwd = listener_for(rule, self.map, scratch=self._scratch, toxics=self.toxics, **takeover)
        details: Dict[str, Any] = {"rule": fwd.label, "listen": format_address(fwd.address), "target": rule.remote}
        if rule.targets:
            details.update(targets=[format_address(target) for target in rule.all_targets], balance=rule.balance)
        log.info("%s: forwarding %s to %s", fwd.label, details["listen"],
                 f"{rule.connect} ({rule.balance})" if rule.targets else rule.remote,
                 extra={"event": "start", "details": details})
        return fwd

    def _free_port(self, rule: Rule) -> bool:
        """A UDP rule's port is in use: if removed UDP rules still hold it for their sessions, close
        them (cutting those sessions), so that it can bind.  False if none did."""
        holders = [fwd for fwd in self.retiring if rule.proto == fwd.rule.proto == "udp"
                   and rule.local_port and fwd.address[1] == rule.local_port]
        for fwd in holders:
            log.info("%s: closing %s, a removed rule's listener, and its %d sessions: its port is wanted",
                     rule.label, fwd.label, len(fwd.connections),
                     extra={"event": "reload", "details": {"rule": rule.label, "closed": fwd.label}})
            self.retiring.remove(fwd)
            fwd.close("port wanted by a new rule")
        return bool(holders)

    # -- running ----------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5, loop: str = "auto") -> None:
        """Run the loop until ``stop()`` or the end of a drain, then ``close()``.

        ``loop`` is ``"epoll"``, ``"poll"``, ``"select"`` or ``"auto"``.
        ``stop()``, ``drain()`` and ``reload()`` wake the loop: they take
        effect at once, not after ``poll_interval``.
        """
        self._runner.serve(poll_interval, loop)

    def between_rounds(self, poll_interval: float) -> Optional[float]:
        """Called by the loop of ``serve_forever`` before each wait: carry out the requests;
        the wait, up to the drain's deadline, or None once the drain is over."""
        if not (self.retiring or self._requests or self._drain_deadline is not None):
            return poll_interval  # the common round: nothing to do (one call, not three)
        if self.retiring:
            self._forget_retired()
        self._carry_out_requests()
        if self._drain_deadline is not None and self._drained():
            return None
        return self._wait(poll_interval)

    def stop(self) -> None:
        """Ask ``serve_forever`` to return now, closing everything: the open connections
        are cut with resets, as at the drain timeout.  Safe from a signal handler or thread."""
        self._runner.stop()

    def drain(self, timeout: float) -> None:
        """Stop accepting; ``serve_forever`` returns when no connection is left.

        After ``timeout`` seconds the connections still open are cut (with
        resets) and counted in the log; 0 cuts them at once.  Safe from a
        signal handler or another thread.
        """
        self._requests.append(("drain", max(0.0, float(timeout))))
        self._runner.wake()

    def reload(self, rules: Sequence[Rule]) -> None:
        """Apply a new list of rules (see the module docstring).

        While ``serve_forever`` runs, the loop applies it between two rounds;
        otherwise at once.  Raises ``ValueError`` at once for two rules with
        one name; everything else is logged.
        """
        rules = list(rules)
        _check_labels(rules)
        self._requests.append(("reload", rules))
        if self._runner.serving:
            self._runner.wake()
        else:
            self._carry_out_requests()

    def close(self, reason: str = STOPPED) -> None:
        """Close every listener; cut every open connection with resets (``reason`` says why)."""
        self._cut(reason)  # all of them first: a forwarder's close that raises leaves none to a FIN
        for fwd in list(self.forwarders.values()) + self.retiring:
            fwd.close(reason)
        self.retiring = []
        for attachment in self.attachments:
            attachment.close()
        if not self.map:
            forget(self.map)

    # -- stats ------------------------------------------------------------

    def _by_rule(self) -> List[List[Listener]]:
        """Each rule's listeners: the one serving it now, then those retiring after a reload."""
        groups: Dict[str, List[Listener]] = {label: [fwd] for label, fwd in self.forwarders.items()}
        for fwd in list(self.retiring):
            groups.setdefault(fwd.rule.label, []).append(fwd)
        return list(groups.values())

    def stats(self) -> Dict[str, Dict[str, int]]:
        """Per rule, by the label of its log lines: active, accepted, refused_acl, refused_limit,
        failed_connects, bytes_to_server, bytes_to_client (with the live connections' bytes so far)."""
        # Grouped by the rule's own label; shown by the forwarder's, which names
        # the port bound when the rule asked for port 0, as the log lines do.
        return {fwds[0].label: fwds[0].stats.snapshot([conn for fwd in fwds for conn in list(fwd.connections)])
                for fwds in self._by_rule()}

    def target_stats(self) -> Dict[str, Dict[str, Dict[str, int]]]:
        """Per rule with a target set (several targets, or active checks), per target as configured:
        up (1 or 0), active and connect_failures (``TARGET_COUNTERS``)."""
        totals: Dict[str, Dict[str, Dict[str, int]]] = {}
        for fwds in self._by_rule():
            if fwds[0].targets is None:
                continue
            # The serving listener's view of up and down; the retiring ones' open connections still count.
            rule = totals[fwds[0].label] = fwds[0].targets.snapshot()
            for fwd in fwds[1:]:
                for name, counters in (fwd.targets.snapshot() if fwd.targets is not None else {}).items():
                    if name in rule:
                        rule[name]["active"] += counters["active"]
        return totals

    def log_stats(self) -> None:
        """Log one INFO line per rule with its counters (event "stats"), then one per target of a
        rule with several: for SIGUSR1."""
        targets = self.target_stats()
        for label, counters in self.stats().items():
            text = " ".join(f"{key}={value}" for key, value in counters.items())  # COUNTERS, then a UDP rule's
            log.info("%s: %s", label, text, extra={"event": "stats", "details": {"rule": label, **counters}})
            for target, target_counters in targets.get(label, {}).items():
                text = " ".join(f"{key}={target_counters[key]}" for key in TARGET_COUNTERS)
                log.info("%s: target %s %s", label, target, text,
                         extra={"event": "stats", "details": {"rule": label, "target": target, **target_counters}})

    # -- requests, carried out by the loop -------------------------------

    def _carry_out_requests(self) -> None:
        while self._requests:
            kind, argument = self._requests.popleft()
            if kind == "drain":
                self._start_drain(argument)
            elif self._drain_deadline is None:
                try:
                    self._apply(argument)
                except Exception:  # a bug: it must not unwind serve_forever
                    log.exception("reload failed; still serving", extra={"event": "reload"})
            else:  # applying it would start listening again
                log.warning("reload ignored: draining", extra={"event": "reload", "details": {"ignored": True}})

    def _wait(self, poll_interval: float) -> float:
        if self._drain_deadline is None:
            return poll_interval
        return max(0.0, min(poll_interval, self._drain_deadline - time.monotonic()))

    def _all_forwarders(self) -> List[Listener]:
        return list(self.forwarders.values()) + self.retiring

    def _start_drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self._drain_deadline is not None:
            self._drain_deadline = min(self._drain_deadline, deadline)  # a second drain may shorten it
            return
        self._drain_deadline = deadline
        for fwd in self._all_forwarders():
            fwd.stop_accepting()
        open_connections = sum(len(fwd.connections) for fwd in self._all_forwarders())
        log.info("draining: not accepting; %d connections open, cut in %g s", open_connections, timeout,
                 extra={"event": "drain", "details": {"open": open_connections, "timeout_s": timeout}})

    def _drained(self) -> bool:
        """True when the drain is over: no connection left, or the time is up (cut the rest)."""
        assert self._drain_deadline is not None
        if time.monotonic() < self._drain_deadline and any(fwd.connections for fwd in self._all_forwarders()):
            return False
        if not self._cut("drain timeout"):
            log.info("drained: no connection left", extra={"event": "drain", "details": {"cut": 0}})
        return True

    def _cut(self, reason: str) -> int:
        """Cut every open connection with resets (the drain timeout, a stop, an error); log how many."""
        count = cut([conn for fwd in self._all_forwarders() for conn in fwd.connections], reason)
        if count:
            log.warning("%s: cut %d connections", reason, count, extra={"event": "drain", "details": {"cut": count}})
        return count

    def _apply(self, rules: List[Rule]) -> None:
        """Carry out a reload: match the new rules with the running ones, then change what differs."""
        running = dict(self.forwarders)
        # A TCP and a UDP rule may share a listen address: a rule matches the one of its own proto
        # there first, and the other proto's only when none is left (a rule that changes proto).
        by_listen = {(fwd.rule.proto, fwd.rule.listen): label for label, fwd in running.items()}
        matched: List[Tuple[Rule, Optional[Listener]]] = []
        for rule in rules:
            label: Optional[str] = rule.label if rule.label in running else None
            other = "tcp" if rule.proto == "udp" else "udp"
            for key in ((rule.proto, rule.listen), (other, rule.listen)):
                if label is None and by_listen.get(key) in running:  # (not one an earlier rule matched)
                    label = by_listen[key]
            matched.append((rule, running.pop(label) if label is not None else None))
        report: Dict[str, List[str]] = {"added": [], "removed": [], "changed": [], "unchanged": [], "failed": []}
        forwarders: Dict[str, Listener] = {}
        # Removed rules first: their ports may be taken by new ones.
        for label, fwd in running.items():
            self._retire(fwd)
            report["removed"].append(label)
        for rule, old in matched:
            if old is not None and old.rule == rule:
                forwarders[rule.label] = old
                report["unchanged"].append(rule.label)
                continue
            try:
                if old is None:
                    forwarders[rule.label] = self._start(rule)
                    report["added"].append(rule.label)
                else:
                    forwarders[rule.label] = self._change(old, rule)
                    report["changed"].append(rule.label)
            except Exception as error:  # OSError: the port, the remote; anything else is a bug
                log.error("%s: cannot start: %s", rule.label, describe_error(error),
                          exc_info=not isinstance(error, OSError),
                          extra={"event": "reload", "details": {"rule": rule.label, "error": describe_error(error)}})
                report["failed"].append(rule.label)
                if old is not None:
                    forwarders[old.rule.label] = old  # keep serving the old settings
        self.forwarders = forwarders
        summary = ", ".join(f"{len(labels)} {kind}" for kind, labels in report.items())
        log.info("reloaded: %s", summary, extra={"event": "reload", "details": report})

    def _change(self, old: Listener, rule: Rule) -> Listener:
        """Serve ``rule`` in place of ``old``; ``old``'s connections drain with its settings."""
        stats = old.stats if old.rule.label == rule.label else None
        if old.rule.listen == rule.listen and old.rule.reuse_port == rule.reuse_port:
            listener = old.release_listener()
            try:
                new = self._start(rule, stats=stats, listener=listener)
            except BaseException:
                old.take_over(listener)  # e.g. the new remote does not resolve: keep the old one
                raise
        else:
            new = self._start(rule, stats=stats)  # binds first: if that fails, the old one goes on
            old.stop_accepting()
        self._retire(old)
        return new

    def _forget_retired(self) -> None:
        for fwd in [fwd for fwd in self.retiring if not fwd.connections]:
            self.retiring.remove(fwd)
            fwd.close()

    def _retire(self, fwd: Listener) -> None:
        fwd.stop_accepting()
        if fwd.connections:
            self.retiring.append(fwd)
        else:
            fwd.close()
