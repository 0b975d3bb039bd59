"""Timers in the loop: one deadline heap per asyncore map.

asyncore has no timer API.  This module adds one, for everything that must
happen at a time rather than on a socket event: connect timeouts, the pause
after running out of descriptors, idle and half-closed timeouts, and the
delays of fault injection.

    timer = timers_for(map).call_later(2.5, conn.close)
    timer.cancel()

One facility, two ways to drive it:

* asyncore_fwd's loop backends (``asyncore_fwd.loop``, ``serve_forever``)
  bound each wait by the next deadline and run what is due after the
  round's events, so a timer fires within a few milliseconds of its time;
* under a plain ``asyncore.loop(...)``, which knows nothing of it, the
  forwarder's ``readable()`` -- which asyncore asks every round -- runs what
  is due.  That is as precise as the loop's timeout: coarser, but correct.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from .._net import PerMap

__all__ = ["Throttle", "Timer", "Timers", "timers_for"]

log = logging.getLogger("asyncore_fwd")


class Timer:
    """A call scheduled at ``when`` (a ``time.monotonic()`` value); ``cancel()`` drops it."""

    __slots__ = ("when", "_order", "_callback", "_args", "_timers", "cancelled")

    def __init__(self, timers: Timers, when: float, order: int, callback: Callable[..., Any],
                 args: Tuple[Any, ...]) -> None:
        self.when = when
        self._order = order  # equal deadlines fire in the order they were set
        self._callback = callback
        self._args = args
        self._timers = timers
        self.cancelled = False

    def __lt__(self, other: Timer) -> bool:
        return (self.when, self._order) < (other.when, other._order)

    def cancel(self) -> None:
        """Do not call it (harmless if it already ran or was cancelled)."""
        if not self.cancelled:
            self.cancelled = True
            self._timers._cancelled_one()

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else f"in {self.when - time.monotonic():.3f} s"
        return f"<Timer {getattr(self._callback, '__qualname__', self._callback)} {state}>"


class Timers:
    """The pending timers of one map, in a heap ordered by deadline."""

    # Cancelled timers stay in the heap until they come up; once they are
    # most of it (many connections that closed before their timeouts), the
    # heap is rebuilt without them, so memory follows the live timers.
    _COMPACT_AT = 256

    def __init__(self) -> None:
        self._heap: List[Timer] = []
        self._cancelled = 0
        self._order = itertools.count()
        #: Set once its map's timers are forgotten: a loop that kept this object looks them up again.
        self.forgotten = False

    def __len__(self) -> int:
        return len(self._heap) - self._cancelled

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Call ``callback(*args)`` from the loop once ``time.monotonic()`` reaches ``when``."""
        timer = Timer(self, when, next(self._order), callback, args)
        heapq.heappush(self._heap, timer)
        return timer

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Call ``callback(*args)`` from the loop in ``delay`` seconds."""
        return self.call_at(time.monotonic() + delay, callback, *args)

    def next_deadline(self) -> Optional[float]:
        """When the earliest live timer is due, or None if there is none."""
        heap = self._heap
        while heap and heap[0].cancelled:
            heapq.heappop(heap)
            self._cancelled -= 1
        return heap[0].when if heap else None

    def wait_limit(self, timeout: float) -> float:
        """``timeout`` shortened so that a wait ends when the next timer is due."""
        deadline = self.next_deadline()
        if deadline is None:
            return timeout
        return min(timeout, max(0.0, deadline - time.monotonic()))

    def run_due(self) -> None:
        """Call every timer that is due (those set by a callback for now run next time)."""
        heap = self._heap
        if not heap or heap[0].when > time.monotonic():
            return  # the common case, on every round: one comparison
        now = time.monotonic()
        due = []
        while heap and heap[0].when <= now:
            timer = heapq.heappop(heap)
            if timer.cancelled:
                self._cancelled -= 1
            else:
                due.append(timer)
        for timer in due:
            if timer.cancelled:  # cancelled by an earlier callback of this batch
                self._cancelled -= 1
                continue
            timer.cancelled = True  # it ran: a later cancel() is a no-op
            try:
                timer._callback(*timer._args)
            except Exception:
                log.exception("timer %r failed", timer)

    def _cancelled_one(self) -> None:
        self._cancelled += 1
        if self._cancelled > self._COMPACT_AT and self._cancelled * 2 > len(self._heap):
            self._heap = [timer for timer in self._heap if not timer.cancelled]
            heapq.heapify(self._heap)
            self._cancelled = 0


class Throttle:
    """Lets a burst of events be logged in a few lines: the first at once, the
    rest counted and summed up in one line per ``interval`` s.

    ``allow()`` says whether to log the event at hand; while it says no, the
    events are counted, and when the window ends ``summary(count)`` logs them
    and opens another one (a burst that goes on gets one line per interval;
    a quiet window ends it).
    """

    def __init__(self, timers: Timers, interval: float, summary: Callable[[int], None]) -> None:
        self.interval = interval
        self._timers = timers
        self._summary = summary
        #: While set, events are counted, not logged; it logs the count when it fires.
        self._window: Optional[Timer] = None
        self._suppressed = 0

    def allow(self) -> bool:
        """True: log this event now.  False: it is counted for the next summary."""
        if self._window is not None:
            self._suppressed += 1
            return False
        self._window = self._timers.call_later(self.interval, self._window_ended)
        return True

    def _window_ended(self) -> None:
        self._window = None
        if self._flush():
            self._window = self._timers.call_later(self.interval, self._window_ended)

    def _flush(self) -> bool:
        if not self._suppressed:
            return False
        count, self._suppressed = self._suppressed, 0
        self._summary(count)
        return True

    def close(self) -> None:
        """Log what is still counted, and stop the window."""
        if self._window is not None:
            self._window.cancel()
            self._window = None
        self._flush()


# The timers of each map.
_registry: PerMap[Timers] = PerMap()


def timers_for(map: Dict[int, Any]) -> Timers:
    """The timers of ``map`` (an asyncore socket map), made on first use."""
    timers = _registry.get(map)
    return timers if timers is not None else _registry.set(map, Timers())


#: ``existing_timers(map)``: the timers of ``map`` if any were ever set, else
#: None (no entry is made).  The registry's own method: the loop calls it every round.
existing_timers = _registry.get


def forget(map: Dict[int, Any]) -> None:
    """Drop the timers of ``map`` (its last dispatcher closed)."""
    timers = _registry.get(map)
    if timers is not None:
        timers.forgotten = True
        _registry.forget(map)
