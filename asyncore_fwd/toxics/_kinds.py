"""The toxics: the faults a link passes bytes and the EOF through.

Each is a ``Toxic`` whose hooks a ``_Link`` calls, with its state on that
link in ``link.state[toxic]``.  Those that hold bytes (``Latency``,
``Bandwidth``, ``Slicer``) share ``_Queue``: bytes held in order, counted as
held, let out on timers while the writer has room.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from .._eventloop._timers import Timer
from ._link import Deliver, DeliverEof, Toxic, _cost, _number

if TYPE_CHECKING:
    from ._link import _Link

__all__ = ["Bandwidth", "Latency", "LimitData", "ResetPeer", "Slicer", "SlowClose", "Timeout"]


def _cancel_timer(toxic: Toxic, link: _Link) -> None:
    """``detached`` of a toxic whose state on a link is one pending timer (or nothing)."""
    timer: Optional[Timer] = link.state.pop(toxic, None)
    if timer is not None:
        timer.cancel()


class _Queue(Toxic):
    """A toxic that holds bytes in order and lets them out on its timers.

    Its state on a link: ``queue`` of (due, bytes) entries, the first one
    let out from ``offset`` on; ``timer``, what lets the next bytes out (a
    ``Timer``, or a wait for the writer to have room); ``eof``, the EOF held
    until the queue is empty.
    """

    def attached(self, link: _Link) -> None:
        link.state[self] = {"queue": collections.deque(), "offset": 0, "timer": None, "eof": None}

    def data(self, link: _Link, data: bytes, deliver: Deliver) -> None:
        state = link.state[self]
        state["queue"].append(self._enqueue(link, data))
        link.hold(_cost(data))
        if state["timer"] is None:
            self._schedule(link, deliver)

    def eof(self, link: _Link, deliver_eof: DeliverEof) -> None:
        state = link.state[self]
        if state["queue"] or state["timer"] is not None:
            state["eof"] = deliver_eof  # after the last byte
        else:
            deliver_eof()

    def detached(self, link: _Link) -> None:
        state = link.state.pop(self, None)
        if state is None:
            return  # detached already (closing the connection while flushing)
        if state["timer"] is not None:
            state["timer"].cancel()
        # Emptied first: this may run inside one of our own timers (a send
        # failed and closed the connection), whose loop then finds nothing left.
        entries, offset = list(state["queue"]), state["offset"]
        state["queue"].clear()
        for _, data in entries:
            link.release(_cost(data))
            link.pass_on(self, data[offset:])
            offset = 0
        if state["eof"] is not None:
            state["eof"]()

    def _enqueue(self, link: _Link, data: bytes) -> Tuple[float, bytes]:
        raise NotImplementedError

    def _schedule(self, link: _Link, deliver: Deliver) -> None:
        """Set the timer that calls ``_due`` when the next bytes may go."""
        raise NotImplementedError

    def _let_out(self, link: _Link, state: Dict[str, Any], deliver: Deliver) -> None:
        """Pass on what may go now (while the writer has room), with ``_take`` and ``deliver``."""
        raise NotImplementedError

    def _due(self, link: _Link, deliver: Deliver) -> None:
        """The timer: let out what may go, and set the next one."""
        state = link.state.get(self)
        if state is None:
            return
        state["timer"] = None
        if link.writer_full():
            # The peer is not reading: firing on time would find no room, again
            # and again.  Start again once the writer has sent what it holds.
            state["timer"] = link.when_written(self._schedule, link, deliver)
            return
        self._let_out(link, state, deliver)
        if self not in link.state:
            return  # a send failed and closed the connection, which detached this toxic
        if state["queue"]:
            self._schedule(link, deliver)
        self._drained(link)

    def _take(self, link: _Link, state: Dict[str, Any], size: int) -> bytes:
        """Up to ``size`` bytes from the front of the queue.

        The rest of an entry stays in place, from ``offset``: cutting it off
        would copy it again for every segment.  So the entry is held, and
        counted, until its last byte goes.
        """
        queue = state["queue"]
        data, start = queue[0][1], state["offset"]
        if start + size < len(data):
            state["offset"] = start + size
            return data[start:start + size]
        queue.popleft()
        state["offset"] = 0
        link.release(_cost(data))
        return data[start:]  # the entry itself if it goes whole

    def _drained(self, link: _Link) -> None:
        state = link.state.get(self)
        if state is not None and not state["queue"] and state["eof"] is not None:
            deliver_eof, state["eof"] = state["eof"], None
            deliver_eof()


class Latency(_Queue):
    """Delay every byte by ``seconds`` (plus or minus up to ``jitter``), keeping their order."""

    def __init__(self, seconds: float, jitter: float = 0.0, toxicity: float = 1.0) -> None:
        super().__init__(toxicity)
        self.seconds = _number("seconds", seconds)
        self.jitter = _number("jitter", jitter)

    def _enqueue(self, link: _Link, data: bytes) -> Tuple[float, bytes]:
        due = link.now() + self.seconds + (link.rng.uniform(-self.jitter, self.jitter) if self.jitter else 0.0)
        queue = link.state[self]["queue"]
        return (max(due, queue[-1][0]) if queue else due), data  # never overtake

    def _schedule(self, link: _Link, deliver: Deliver) -> None:
        state = link.state[self]
        state["timer"] = link.timers.call_at(state["queue"][0][0], self._due, link, deliver)

    def _let_out(self, link: _Link, state: Dict[str, Any], deliver: Deliver) -> None:
        queue, now = state["queue"], link.now()
        while queue and queue[0][0] <= now and not link.writer_full():
            deliver(self._take(link, state, len(queue[0][1])))


class Bandwidth(_Queue):
    """Let at most ``bytes_per_second`` through."""

    #: How often the queue is let out: small enough to be smooth, big enough to be cheap.
    TICK = 0.01

    def __init__(self, bytes_per_second: float, toxicity: float = 1.0) -> None:
        super().__init__(toxicity)
        self.bytes_per_second = _number("bytes_per_second", bytes_per_second, lowest=1.0)

    def attached(self, link: _Link) -> None:
        super().attached(link)
        link.state[self]["allowance"], link.state[self]["since"] = 0.0, link.now()

    def _enqueue(self, link: _Link, data: bytes) -> Tuple[float, bytes]:
        return 0.0, data

    def _schedule(self, link: _Link, deliver: Deliver) -> None:
        state = link.state[self]
        state["since"] = max(state["since"], link.now() - self.TICK)  # no credit saved while idle
        state["timer"] = link.timers.call_later(self.TICK, self._due, link, deliver)

    def _let_out(self, link: _Link, state: Dict[str, Any], deliver: Deliver) -> None:
        now = link.now()
        allowance = state["allowance"] + (now - state["since"]) * self.bytes_per_second
        state["since"] = now
        queue = state["queue"]
        while queue and allowance >= 1 and not link.writer_full():
            data = self._take(link, state, int(allowance))
            allowance -= len(data)
            deliver(data)
        state["allowance"] = allowance if queue else 0.0  # no credit saved while idle


class Slicer(_Queue):
    """Cut the stream into segments of about ``average_size`` bytes, ``delay`` seconds apart."""

    def __init__(self, average_size: int, size_variation: int = 0, delay: float = 0.0,
                 toxicity: float = 1.0) -> None:
        super().__init__(toxicity)
        if isinstance(average_size, bool) or not isinstance(average_size, int) or average_size < 1:
            raise ValueError(f"average_size must be a positive integer, not {average_size!r}")
        if isinstance(size_variation, bool) or not isinstance(size_variation, int) or \
                not 0 <= size_variation < average_size:
            raise ValueError(f"size_variation must be an integer from 0 to average_size - 1, not {size_variation!r}")
        self.average_size, self.size_variation = average_size, size_variation
        self.delay = _number("delay", delay)

    def _enqueue(self, link: _Link, data: bytes) -> Tuple[float, bytes]:
        return 0.0, data

    def _schedule(self, link: _Link, deliver: Deliver) -> None:
        state = link.state[self]
        state["timer"] = link.timers.call_later(self.delay, self._due, link, deliver)

    def _let_out(self, link: _Link, state: Dict[str, Any], deliver: Deliver) -> None:
        queue = state["queue"]
        while queue and not link.writer_full():
            size = self.average_size + link.rng.randint(-self.size_variation, self.size_variation)
            deliver(self._take(link, state, size))
            if self.delay:
                break  # one segment per delay


class Timeout(Toxic):
    """Stop relaying: drop the bytes, and close the connection after ``seconds`` (never with 0)."""

    def __init__(self, seconds: float, toxicity: float = 1.0) -> None:
        super().__init__(toxicity)
        self.seconds = _number("seconds", seconds)

    def attached(self, link: _Link) -> None:
        if self.seconds:
            link.state[self] = link.timers.call_later(self.seconds, link.conn.close)

    def data(self, link: _Link, data: bytes, deliver: Deliver) -> None:
        pass  # dropped, as on a dead network path

    def eof(self, link: _Link, deliver_eof: DeliverEof) -> None:
        pass

    detached = _cancel_timer


class LimitData(Toxic):
    """Pass on ``bytes`` bytes, then close the connection cleanly (after writing them)."""

    def __init__(self, bytes: int, toxicity: float = 1.0) -> None:
        super().__init__(toxicity)
        if isinstance(bytes, bool) or not isinstance(bytes, int) or bytes < 0:
            raise ValueError(f"bytes must be an integer >= 0, not {bytes!r}")
        self.bytes = bytes

    def attached(self, link: _Link) -> None:
        link.state[self] = self.bytes
        if not self.bytes:
            link.close_when_written()

    def data(self, link: _Link, data: bytes, deliver: Deliver) -> None:
        left = link.state[self]
        if left <= 0:
            return
        link.state[self] = left - len(data)
        deliver(data[:left])
        if left <= len(data):
            link.close_when_written()


class ResetPeer(Toxic):
    """Reset the connection (RST to both peers) ``after`` seconds."""

    def __init__(self, after: float = 0.0, toxicity: float = 1.0) -> None:
        super().__init__(toxicity)
        self.after = _number("after", after)

    def attached(self, link: _Link) -> None:
        link.state[self] = link.timers.call_later(self.after, link.reset)

    detached = _cancel_timer


class SlowClose(Toxic):
    """Delay the EOF by ``seconds``."""

    def __init__(self, seconds: float, toxicity: float = 1.0) -> None:
        super().__init__(toxicity)
        self.seconds = _number("seconds", seconds)

    def eof(self, link: _Link, deliver_eof: DeliverEof) -> None:
        link.state[self] = (link.timers.call_later(self.seconds, deliver_eof), deliver_eof)

    def detached(self, link: _Link) -> None:
        held: Optional[Tuple[Timer, DeliverEof]] = link.state.pop(self, None)
        if held is not None and not held[0].cancelled:
            held[0].cancel()
            held[1]()  # the EOF goes on now
