"""Idle and half-closed timeouts: closing pairs that stopped moving bytes.

Strategy: nothing on the per-byte path.  The sides already count the bytes
they send; a timer looks at those counters now and then.  When it fires it
compares them with what it saw last time: if they moved, the pair is alive
and the timer comes back a quarter of the timeout later; if they have not
moved for the whole timeout, the pair is closed.  So a pair is closed after
between 1 and 1.25 times the timeout of silence, under asyncore_fwd's
loops to within a few milliseconds of that (a plain ``asyncore.loop`` runs
timers once per round: as precise as its own timeout).

* **idle_timeout**: no byte either way for that long.
* **half_closed_timeout**: once one direction has ended (its EOF passed
  on), the other may stay quiet only that long.  This is what keeps
  half-closed pairs -- CLOSE_WAIT sockets on the peer that never closes --
  from piling up.

How a timed-out pair is closed: with FINs if nothing read is still waiting
to be written (no data is lost: like socat ``-T`` and HAProxy's ``timeout
client/server``), else with resets on both sides, so that no peer takes a
truncated stream for a complete one.
"""

from __future__ import annotations

import time
from typing import Dict, Optional

from .._eventloop._timers import Timer, timers_for
from .._relay._connection import Connection, ConnectionObserver
from .._values._rules import Rule

__all__ = ["QuietTimer", "Timeouts", "TimeoutWatch"]

#: A busy pair's counters are looked at this many times per timeout.
CHECKS_PER_TIMEOUT = 4


def _progress(conn: Connection) -> int:
    return conn.receiver.bytes_sent + conn.sender.bytes_sent


class QuietTimer:
    """Closes ``conn`` once its byte counters have not moved for ``timeout`` seconds."""

    __slots__ = ("conn", "timeout", "reason", "_seen", "_quiet_since", "_timer")

    def __init__(self, conn: Connection, timeout: float, reason: str) -> None:
        self.conn = conn
        self.timeout = timeout
        self.reason = reason
        self._seen = _progress(conn)
        #: The last time the counters were seen to have moved (or the start).
        self._quiet_since = time.monotonic()
        self._timer: Optional[Timer] = timers_for(conn.forwarder._map).call_at(
            self._quiet_since + timeout, self._check)

    def _check(self) -> None:
        self._timer = None
        if self.conn.closed:
            return
        now = time.monotonic()
        progress = _progress(self.conn)
        if progress != self._seen:
            self._seen, self._quiet_since = progress, now
            when = now + self.timeout / CHECKS_PER_TIMEOUT
        elif now >= self._quiet_since + self.timeout:
            self.conn.time_out(f"{self.reason} for {self.timeout:g} s")
            return
        else:
            when = self._quiet_since + self.timeout
        self._timer = timers_for(self.conn.forwarder._map).call_at(when, self._check)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Timeouts:
    """The timeouts of one connection, from its rule."""

    __slots__ = ("conn", "idle", "half_closed")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.idle: Optional[QuietTimer] = None
        self.half_closed: Optional[QuietTimer] = None

    @classmethod
    def start(cls, conn: Connection) -> Timeouts:
        """Called when the pair starts relaying: arm the idle timeout, if the rule sets one."""
        timeouts = cls(conn)
        if conn.rule.idle_timeout:
            timeouts.idle = QuietTimer(conn, conn.rule.idle_timeout, "idle")
        return timeouts

    def direction_ended(self) -> None:
        """Called when one direction has passed its EOF on: arm the half-closed timeout."""
        timeout = self.conn.rule.half_closed_timeout
        if timeout and self.half_closed is None:
            self.half_closed = QuietTimer(self.conn, timeout, "half-closed")

    def cancel(self) -> None:
        """Called when the pair closes."""
        for timer in (self.idle, self.half_closed):
            if timer is not None:
                timer.cancel()


class TimeoutWatch(ConnectionObserver):
    """Observes a rule's connections to give each its ``Timeouts``; made only when the rule sets one."""

    __slots__ = ("_running",)

    def __init__(self) -> None:
        self._running: Dict[Connection, Timeouts] = {}

    @classmethod
    def for_rule(cls, rule: Rule) -> Optional[TimeoutWatch]:
        """The watch of ``rule``'s connections, or None when it sets no timeout."""
        return cls() if rule.idle_timeout or rule.half_closed_timeout else None

    def established(self, conn: Connection) -> None:
        self._running[conn] = Timeouts.start(conn)

    def half_closed(self, conn: Connection) -> None:
        timeouts = self._running.get(conn)
        if timeouts is not None:
            timeouts.direction_ended()

    def closed(self, conn: Connection) -> None:
        timeouts = self._running.pop(conn, None)
        if timeouts is not None:
            timeouts.cancel()
