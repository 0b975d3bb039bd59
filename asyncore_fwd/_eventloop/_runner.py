"""Running a loop until asked to stop: what a listener's and a service's ``serve_forever`` share.

Strategy: one thread runs the loop over a map; ``stop()`` may come from any
other thread or from a signal handler, so it only sets a flag and wakes the
loop through the map's wake-up pipe (``LoopCalls``, opened for as long as
the loop runs).  Before each wait the loop asks its owner (``Served``) how
long it may wait, so an owner with work of its own between rounds (a
service's drain and reload) needs no loop of its own.  When the loop ends,
however it ends, the owner closes everything and is told why.

    runner = LoopRunner(map, owner)
    runner.serve(poll_interval=0.5, loop="auto")    # until runner.stop()
    with runner.running(serve, label=..., thread_name=..., stop_timeout=10.0, start_timeout=10.0):
        ...                                         # served in a thread for the block
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Iterator, List, Optional, Protocol

from .._net import SocketMap
from . import _loop
from ._timers import forget
from ._wakeup import LoopCalls

__all__ = ["STOPPED", "STOPPED_BY_ERROR", "LoopRunner", "Served"]

log = logging.getLogger("asyncore_fwd")

#: Why a runner's owner was closed: ``stop()`` (or the owner ended serving), or an error that ended the loop.
STOPPED = "stopped"
STOPPED_BY_ERROR = "stopped by an error"


class Served(Protocol):
    """What a ``LoopRunner`` serves: the owner of the dispatchers in its map (a listener, a service)."""

    def between_rounds(self, poll_interval: float) -> Optional[float]:
        """Called in the loop's thread before each wait: how long the wait may be
        (``poll_interval``, or less for a deadline of its own), or None to stop serving."""
        ...

    def close(self, reason: str) -> None:
        """Called once in the loop's thread when serving ends: close everything.
        ``reason`` is ``STOPPED``, or ``STOPPED_BY_ERROR`` when the loop raised."""
        ...


class LoopRunner:
    """Runs the loop over ``map`` for ``owner`` until ``stop()``, the owner's say, or an empty map."""

    def __init__(self, map: SocketMap, owner: Served) -> None:
        self.map = map
        self.owner = owner
        #: Set by ``stop()``: the loop ends before its next wait, and for good.
        self.stop_requested = False
        #: True while ``serve()`` runs the loop.
        self.serving = False

    def serve(self, poll_interval: float = 0.5, loop: str = "auto") -> None:
        """Run the loop in this thread until it is to stop, then close the owner.

        ``loop`` names the backend (``_loop.open_loop``).  A map left empty
        (no dispatcher, not even the wake-up pipe) ends the loop too: nothing
        could wake it.
        """
        backend = _loop.open_loop(loop, self.map)
        calls = LoopCalls.open(self.map)  # lets stop(), and calls from other threads, wake the loop
        self.serving = True
        reason = STOPPED_BY_ERROR  # unless the loop returns
        try:
            while not self.stop_requested and self.map:
                wait = self.owner.between_rounds(poll_interval)
                if wait is None:
                    break
                backend.poll(wait)
            reason = STOPPED
        finally:
            self.serving = False
            # The owner first, while calls from other threads still queue for
            # this thread rather than run beside its close.
            self.owner.close(reason)
            calls.close()
            backend.close()
            if not self.map:
                forget(self.map)  # its timers: nothing is left to run them

    def stop(self) -> None:
        """Ask ``serve()`` to return at once.  Safe from another thread or a signal handler."""
        self.stop_requested = True
        self.wake()

    def wake(self) -> None:
        """End the loop's current wait now (for a request queued by the owner).  Safe from a signal handler."""
        calls = LoopCalls.of(self.map)
        if calls is not None:
            calls.wake()  # one write() to a pipe

    @contextlib.contextmanager
    def running(self, serve: Callable[[], None], *, label: str, thread_name: str, stop_timeout: float,
                start_timeout: float) -> Iterator[None]:
        """Run ``serve()`` (which calls ``self.serve``) in a daemon thread for the ``with`` block.

        The block starts once the loop takes calls from other threads: an
        error of ``serve()`` before then is raised here, and a loop not ready
        within ``start_timeout`` s is a TimeoutError.  On exit: ``stop()``,
        then a join of at most ``stop_timeout`` s (a loop still running is
        logged and left in its thread); a later error of the loop is raised
        then, or logged if the block raised its own.  ``label`` starts the
        messages.
        """
        failed: List[BaseException] = []

        def run() -> None:
            try:
                serve()
            except BaseException as error:  # raised in the caller's thread
                failed.append(error)

        thread = threading.Thread(target=run, name=thread_name, daemon=True)
        thread.start()
        deadline = time.monotonic() + start_timeout
        while LoopCalls.of(self.map) is None and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.001)  # until the loop can take calls from this thread
        if LoopCalls.of(self.map) is None:
            # Calls made now would run in this thread, beside a loop that may
            # yet start: refuse rather than carry on unsafely.
            if thread.is_alive():
                self.stop()
                thread.join(stop_timeout)
            if failed:
                raise failed[0]
            raise TimeoutError(f"{label}: the loop did not start within {start_timeout:g} s")
        block_failed = False
        try:
            yield
        except BaseException:
            block_failed = True  # its own error goes on, not the loop's
            raise
        finally:
            self.stop()
            thread.join(stop_timeout)
            if thread.is_alive():
                log.warning("%s: the loop did not stop within %g s; its thread %r is left running",
                            label, stop_timeout, thread.name)
            elif failed and not block_failed:
                raise failed[0]
            elif failed:  # the block's own error goes on: say what the loop had
                log.error("%s: the loop failed during the block", label, exc_info=failed[0])
