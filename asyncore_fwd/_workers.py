"""Several worker processes serving one port, under a supervising parent.

Each worker is a forked copy of the forwarder with its own listening socket,
bound with SO_REUSEPORT to the same address, so the kernel spreads new
connections over the workers and each runs its own loop on its own core.
The parent only watches: it restarts a worker that dies, and on SIGINT or
SIGTERM passes SIGTERM on to every worker and waits for them.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from typing import Callable, Dict, List, Tuple

__all__ = ["AVAILABLE", "reserve_port", "supervise"]

log = logging.getLogger("asyncore_fwd")

#: True where several sockets may listen on one port (Linux, the BSDs).
AVAILABLE = hasattr(socket, "SO_REUSEPORT") and hasattr(os, "fork")

#: Seconds the workers get to finish after SIGTERM before they are killed.
STOP_GRACE = 5.0
#: Seconds to wait for every worker to listen before announcing the service anyway.
START_WAIT = 10.0
#: A worker that dies this many times within RESTART_WINDOW seconds is not restarted again.
RESTART_LIMIT = 5
RESTART_WINDOW = 10.0


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) a SO_REUSEPORT socket on ``host:port``.

    It holds the port for the workers, which bind the same one: with
    ``port=0`` it is how they all learn which port the kernel picked.  Not
    listening, it is never handed a connection.
    """
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]
    reserve = socket.socket(family, socket.SOCK_STREAM)
    try:
        reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserve.bind(address)
    except BaseException:
        reserve.close()
        raise
    return reserve


def supervise(count: int, run_worker: Callable[[int, Callable[[], None]], int],
              on_ready: Callable[[], None]) -> int:
    """Fork ``count`` workers running ``run_worker(index, ready)``; keep them running
    until SIGINT/SIGTERM.  Each worker calls ``ready()`` once it listens; when all
    have (or after START_WAIT s), ``on_ready()`` runs.  Returns 0 after a
    requested stop, 1 if a worker kept dying."""
    workers: Dict[int, int] = {}  # pid -> index
    deaths: Dict[int, List[float]] = {}
    stopping: List[int] = []  # the signal that asked us to stop, once it came

    def request_stop(signum: int, frame: object) -> None:
        stopping.append(signum)

    previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    failed = False
    ready_reader, ready_writer = os.pipe()
    try:
        for index in range(count):
            _spawn(index, run_worker, workers, ready_writer)
        _wait_ready(ready_reader, count)
        if not stopping:
            on_ready()
        while workers and not stopping:
            pid, status = _reap()
            if not pid:
                time.sleep(0.05)
                continue
            index = workers.pop(pid)
            recent = [t for t in deaths.get(index, []) if time.monotonic() - t < RESTART_WINDOW]
            deaths[index] = recent + [time.monotonic()]
            if len(deaths[index]) > RESTART_LIMIT:
                log.error("worker %d keeps exiting (%s); stopping", index, _describe(status))
                failed = True
                break
            log.warning("worker %d (pid %d) exited (%s); starting it again", index, pid, _describe(status))
            _spawn(index, run_worker, workers, ready_writer)
        if stopping:
            log.info("%s: stopping %d workers", signal.Signals(stopping[0]).name, len(workers))
        _stop_all(workers)
    finally:
        os.close(ready_reader)
        os.close(ready_writer)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 1 if failed else 0


def _wait_ready(ready_reader: int, count: int) -> None:
    """Wait until ``count`` workers have said they listen (one byte each), within START_WAIT s."""
    deadline = time.monotonic() + START_WAIT
    received = 0
    while received < count:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([ready_reader], [], [], left)[0]:
            log.warning("only %d of %d workers are listening after %g s", received, count, START_WAIT)
            return
        received += len(os.read(ready_reader, count - received))


def _spawn(index: int, run_worker: Callable[[int, Callable[[], None]], int], workers: Dict[int, int],
           ready_writer: int) -> None:
    pid = os.fork()
    if pid:
        workers[pid] = index
        log.debug("worker %d started (pid %d)", index, pid)
        return
    # In the child: its own signal handling (run_worker installs it), never
    # return into the parent's code.
    status = 1
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        status = run_worker(index, lambda: os.write(ready_writer, b"."))
    except BaseException:
        log.exception("worker %d failed", index)
    finally:
        logging.shutdown()
        os._exit(status)


def _reap() -> Tuple[int, int]:
    try:
        return os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return 0, 0


def _stop_all(workers: Dict[int, int]) -> None:
    """SIGTERM every worker, wait up to STOP_GRACE s, then SIGKILL what is left."""
    for pid in workers:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    while workers and time.monotonic() < deadline:
        pid, _ = _reap()
        if pid:
            workers.pop(pid, None)
        else:
            time.sleep(0.05)
    for pid in list(workers):
        log.warning("worker %d (pid %d) did not stop in %g s: killing it", workers[pid], pid, STOP_GRACE)
        _signal(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        del workers[pid]


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"status {os.waitstatus_to_exitcode(status)}"
