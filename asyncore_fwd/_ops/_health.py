"""Active health checks: a TCP connect to each of a rule's targets, every ``health_check_interval`` s.

Strategy: everything on the loop's timers and in its map, nothing that
blocks.  A round starts at once, then every interval: each target whose
last check has ended gets a ``_Probe``, a small dispatcher that makes a
non-blocking connect to the target's addresses in turn and closes it as
soon as it is made (with a reset: no TIME_WAIT piles up on either side).
The check passes when one address answers; it fails when none did, each
refusing or silent for the rule's ``connect_timeout`` (a timer per address,
as for a client's connect).  The verdict goes to the ``TargetSet`` (up or
down, whatever the clients' failed connects said).  Out of descriptors, a
check gives no verdict: our own lack is not the target's fault.

A check never reaches the forwarder's own listener: an address that leads
back there fails the check, as it fails a client's connect (``_loopback``).
``stop()`` (the forwarder closes, stops accepting, or hands its port to a
reloaded rule) cancels the timer and closes every probe: nothing of it is
left in the map.
"""

from __future__ import annotations

import errno
import socket
from typing import Dict, List, Optional, Tuple

from .._eventloop import _loop
from .._eventloop._dispatcher import Dispatcher
from .._eventloop._timers import Timer, timers_for
from .._net import LINGER_ABORT, OUT_OF_RESOURCES, SockAddr, SocketMap, bind_source, os_error, pending_error
from .._relay._loopback import LEADS_BACK, LoopbackGuard
from .._values._rules import Rule
from ._balance import TargetSet, TargetState

__all__ = ["HealthChecks"]


class HealthChecks:
    """The active checks of one forwarder's targets, on its map's timers."""

    def __init__(self, targets: TargetSet, map: SocketMap, interval: float, timeout: float,
                 guard: LoopbackGuard) -> None:
        self.targets = targets
        self.interval = interval
        self.timeout = timeout
        self._map = map
        self._guard = guard
        self._timer: Optional[Timer] = None
        #: The check under way of each target (one at a time per target).
        self.probes: Dict[TargetState, _Probe] = {}

    @classmethod
    def for_rule(cls, rule: Rule, targets: Optional[TargetSet], map: SocketMap,
                 guard: LoopbackGuard) -> Optional[HealthChecks]:
        """The checks of ``rule``'s targets, or None when it has none (``health_check_interval`` 0)."""
        if targets is None or not rule.health_check_interval:
            return None
        return cls(targets, map, rule.health_check_interval, rule.connect_timeout, guard)

    @property
    def running(self) -> bool:
        return self._timer is not None

    def start(self) -> None:
        """Check every target now, then every interval (nothing if already started)."""
        if self._timer is None:
            self._timer = timers_for(self._map).call_later(0, self._round)

    def stop(self) -> None:
        """No more checks: cancel the timer and close the probes under way."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for probe in list(self.probes.values()):
            probe.end()
        self.probes.clear()

    def _round(self) -> None:
        self._timer = timers_for(self._map).call_later(self.interval, self._round)
        for target in self.targets:
            if target not in self.probes:
                probe = _Probe(self, target)
                self.probes[target] = probe
                probe.try_next(None)

    def _verdict(self, probe: _Probe, error: Optional[OSError], skipped: bool = False) -> None:
        """``probe`` ended: passed (``error`` None), failed, or ``skipped`` (no descriptor for it)."""
        if self.probes.get(probe.target) is not probe:
            return  # stopped meanwhile
        del self.probes[probe.target]
        if skipped:
            return
        if error is None:
            self.targets.check_passed(probe.target)
        else:
            self.targets.check_failed(probe.target, error)


class _Probe(Dispatcher):
    """One check of one target: a connect to each of its addresses in turn, closed once made."""

    def __init__(self, checks: HealthChecks, target: TargetState) -> None:
        super().__init__(map=checks._map)
        self.checks = checks
        self.target = target
        self._left: List[Tuple[int, SockAddr]] = list(target.addresses.current())
        #: The connect timeout of the address under way.
        self._timer: Optional[Timer] = None
        self._ended = False

    # -- select() predicates --------------------------------------------

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        """Wait for the connect."""
        return self.connecting

    # -- event handlers ---------------------------------------------------

    def handle_connect_event(self) -> None:
        """Called on the first write event while connecting: did the connect work?"""
        code = pending_error(self.socket)
        if code:
            self.try_next(os_error(code))
            return
        try:
            peer, local = self.socket.getpeername(), self.socket.getsockname()
        except OSError:
            return  # not connected yet: a stale event for a reused descriptor (see the Sender)
        if peer == local:  # a simultaneous open with itself: nobody listens there
            self.try_next(os_error(errno.ECONNREFUSED))
        elif self.checks._guard.leads_back_here(peer, local):
            self.checks._guard.turn_back(local, peer)  # reset when our listener accepts it
            self.try_next(os_error(errno.ELOOP, LEADS_BACK))
        else:
            self._finish(None)

    def handle_write(self) -> None:
        """Called after each write event: nothing to write (the connect was all)."""

    def handle_read(self) -> None:
        """Never reads: a byte the server sends at once is left unread, and the reset drops it."""

    def handle_close(self) -> None:
        if self._ended:
            return  # the write event of this same poll round ended the check
        if self.connecting:
            # A refused connect comes as a write event and a hang-up: the write
            # event has already started the next address on a new socket, so
            # only that socket's pending error counts (as for the Sender).
            self.handle_connect_event()
        else:
            self.try_next(os_error(pending_error(self.socket) or errno.ECONNREFUSED))

    def handle_error(self) -> None:
        self.try_next(os_error(pending_error(self.socket) or errno.EIO))

    # -- helpers ----------------------------------------------------------

    def try_next(self, error: Optional[OSError]) -> None:
        """Connect to the next address, for ``connect_timeout`` at most; the check fails with
        ``error`` when none is left."""
        self._cancel_timer()
        self._close_socket()
        while self._left and not self._ended:
            family, address = self._left.pop(0)
            if self.checks._guard.leads_back_here(address):
                error = os_error(errno.ELOOP, LEADS_BACK)
                continue
            try:
                self.create_socket(family, socket.SOCK_STREAM)
                _loop.check_watchable(self._map, self.socket)
                source = self.checks.targets.rule.source
                if source is not None:  # from where the clients' connects come: the same firewall rules
                    bind_source(self.socket, source)
                self._timer = timers_for(self._map).call_later(self.checks.timeout, self._timed_out)
                self.connect(address)  # may complete at once: then handle_connect_event has run
                return
            except OSError as failure:
                self._cancel_timer()
                self._close_socket()
                if failure.errno in OUT_OF_RESOURCES:
                    self._finish(None, skipped=True)
                    return
                error = failure
        if not self._ended:
            self._finish(error or os_error(errno.EHOSTUNREACH))

    def _timed_out(self) -> None:
        self._timer = None
        self.try_next(os_error(errno.ETIMEDOUT, f"no answer within {self.checks.timeout:g} s"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _finish(self, error: Optional[OSError], skipped: bool = False) -> None:
        if self._ended:
            return
        self.end()
        self.checks._verdict(self, error, skipped)

    def end(self) -> None:
        """Close the socket and cancel the timeout."""
        self._ended = True
        self._left = []
        self._cancel_timer()
        self._close_socket()

    def _close_socket(self) -> None:
        if self.socket is not None:
            try:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
            except OSError:
                pass
        self.close()
