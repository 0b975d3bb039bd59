"""Calling into a running loop from another thread.

asyncore's dispatchers belong to the thread that runs their loop: another
thread must not touch them.  ``LoopCalls`` lets it ask instead: the call is
queued, the loop is woken at once through a pipe that is part of its map
(so a wait of half a second does not delay it), and the loop thread runs
it between two rounds.

    calls = LoopCalls.open(map)        # by whoever runs the loop, in its thread
    calls.call(conn.close)             # from any thread: runs in the loop, waits
    calls.close()
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Any, Callable, Deque, Dict, Optional, Tuple

from .._compat import asyncore
from .._net import PerMap

__all__ = ["LoopCalls"]


class LoopCalls(asyncore.file_dispatcher):
    """The read end of a wake-up pipe in the map, and the queue of calls it runs."""

    _map: Dict[int, Any]
    _fileno: Optional[int]

    # The LoopCalls of each map.
    _by_map: PerMap[LoopCalls] = PerMap()

    def __init__(self, map: Dict[int, Any]) -> None:
        read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            super().__init__(read_fd, map=map)  # keeps a dup of read_fd
        finally:
            os.close(read_fd)
        self._queue: Deque[Tuple[Callable[[], Any], threading.Event, list]] = collections.deque()
        self._loop_thread = threading.get_ident()

    @classmethod
    def open(cls, map: Dict[int, Any]) -> LoopCalls:
        """The calls of ``map``, made now if needed; the calling thread runs the loop."""
        calls = cls.of(map)
        if calls is None:
            calls = cls._by_map.set(map, cls(map))
        calls._loop_thread = threading.get_ident()
        return calls

    @classmethod
    def of(cls, map: Dict[int, Any]) -> Optional[LoopCalls]:
        """The calls of ``map`` if a loop runs it with them, else None."""
        calls = cls._by_map.get(map)
        return calls if calls is not None and calls._fileno is not None else None

    def call(self, function: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``function()`` in the loop's thread and return its result (or raise its error)."""
        if threading.get_ident() == self._loop_thread:
            return function()
        done = threading.Event()
        outcome: list = []
        self._queue.append((function, done, outcome))
        self.wake()
        if not done.wait(timeout):
            raise TimeoutError(f"the loop did not run {function!r} within {timeout:g} s")
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def wake(self) -> None:
        """Make the loop's current wait end now.  Safe from any thread or a signal handler."""
        try:
            os.write(self._write_fd, b"\0")
        except OSError:
            pass  # the pipe is full (it will be read) or closed (no loop to wake)

    # -- the dispatcher side, in the loop thread --------------------------------

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def handle_read(self) -> None:
        """Called when woken: empty the pipe, then run the queued calls."""
        try:
            while self.recv(4096):
                pass
        except BlockingIOError:
            pass
        while self._queue:
            function, done, outcome = self._queue.popleft()
            try:
                outcome.append(function())
            except BaseException as error:  # handed to the calling thread
                outcome.append(error)
            done.set()

    def handle_close(self) -> None:
        self.close()

    def close(self) -> None:
        self._by_map.forget(self._map, self)
        super().close()
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1
        while self._queue:  # nobody will run them now
            _, done, outcome = self._queue.popleft()
            outcome.append(RuntimeError("the loop stopped"))
            done.set()
