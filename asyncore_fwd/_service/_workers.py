"""Several worker processes serving the same ports, under a supervising parent.

Each worker is a forked copy of the service with its own listening sockets,
bound with SO_REUSEPORT to the same addresses, so the kernel spreads new
connections over the workers and each runs its own loop on its own core.
The parent only watches: it restarts a worker that dies, passes SIGHUP and
SIGUSR1 on, and on SIGINT or SIGTERM passes SIGTERM on to every worker and
waits for their drain before it kills anything.  Workers outlive a parent
killed with SIGKILL only for their drain: each watches a pipe that only the
parent can write to (``SupervisorWatch``), which reads EOF once it is gone.

Strategy for the ports: SO_REUSEPORT lets any process of the same user join
a listening port, so two separate commands on one port would silently split
its traffic.  The parent therefore first binds a reserving socket on each
address *without* SO_REUSEPORT (and with SO_REUSEADDR, so that connections
of an earlier run in TIME_WAIT do not block it).  Linux lets the workers'
SO_REUSEPORT sockets bind and listen next to it, since it never listens;
but once they listen, another command's reserving socket, lacking
SO_REUSEPORT, conflicts with them and fails with "address in use", so the
second command stops before it forks anything.  (Two commands started in the
same few milliseconds, before either listens, are not told apart.)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import signal
import socket
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .._compat import asyncore
from .._eventloop import _loop
from .._net import describe_error, format_address, listen_address
from .._values._rules import Rule

__all__ = ["AVAILABLE", "Reservations", "SupervisorWatch", "reserve_port", "supervise"]

log = logging.getLogger("asyncore_fwd")

#: True where several sockets may listen on one port (Linux, the BSDs).
AVAILABLE = hasattr(socket, "SO_REUSEPORT") and hasattr(os, "fork")

#: Seconds the workers get after their drain timeout before they are killed.
STOP_MARGIN = 3.0
#: Seconds to wait for every worker to listen before announcing the service anyway.
START_WAIT = 10.0
#: How often the start's wait looks for workers that exited before they listened (seconds).
READY_CHECK = 0.1
#: A worker that dies this many times within RESTART_WINDOW seconds is not restarted again.
RESTART_LIMIT = 5
RESTART_WINDOW = 10.0


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) a socket on ``host:port`` that holds it for the workers.

    SO_REUSEADDR but not SO_REUSEPORT: see the module's docstring.  With
    ``port=0`` it is how the workers all learn which port the kernel picked.
    Not listening, it is never handed a connection.  OSError with a one-line
    message.
    """
    family, address = listen_address(host, port)
    reserve = socket.socket(family, socket.SOCK_STREAM)
    try:
        reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reserve.bind(address)
    except OSError as error:
        reserve.close()
        raise OSError(error.errno, f"cannot listen on {format_address((host, port))}: {describe_error(error)}") \
            from None
    except BaseException:
        reserve.close()
        raise
    return reserve


class Reservations:
    """The parent's reserving sockets, one per rule, and the ports they hold."""

    def __init__(self) -> None:
        self._held: Dict[Tuple[str, object], socket.socket] = {}
        self._ports: Dict[Tuple[str, object], int] = {}

    @staticmethod
    def _key(rule: Rule) -> Tuple[str, object]:
        # Port 0 is a new free port per rule: such a rule is known by its label.
        return (rule.local_host, rule.local_port) if rule.local_port else ("label", rule.label)

    def hold(self, rules: Sequence[Rule]) -> List[Rule]:
        """Reserve every rule's address (keeping those already held, releasing the others);
        return the rules with the held ports and ``reuse_port=True``."""
        held: Dict[Tuple[str, object], socket.socket] = {}
        try:
            for rule in rules:
                key = self._key(rule)
                held[key] = self._held.get(key) or reserve_port(rule.local_host, rule.local_port)
        except BaseException:
            for key, sock in held.items():
                if self._held.get(key) is not sock:
                    sock.close()
            raise
        for key, sock in self._held.items():
            if held.get(key) is not sock:
                sock.close()
        self._held = held
        self._ports = {key: sock.getsockname()[1] for key, sock in held.items()}
        return self.apply(rules)

    def apply(self, rules: Sequence[Rule]) -> List[Rule]:
        """The rules with the ports held (as last known) and ``reuse_port=True``, reserving nothing."""
        return [dataclasses.replace(rule, local_port=self._ports.get(self._key(rule), rule.local_port),
                                    reuse_port=True) for rule in rules]

    def close(self) -> None:
        for sock in self._held.values():
            sock.close()
        self._held = {}


class SupervisorWatch(asyncore.file_dispatcher):
    """In a worker, on its loop: calls ``on_gone()`` once the supervisor is gone.

    ``lifeline`` is the read end of a pipe whose write end only the
    supervisor holds (see ``supervise``): nothing is ever written to it, so
    it reads EOF exactly when the supervisor has exited, however it died.
    """

    _map: Dict[int, Any]
    _fileno: Optional[int]

    def __init__(self, lifeline: int, map: Dict[int, Any], on_gone: Callable[[], None]) -> None:
        super().__init__(lifeline, map=map)  # keeps a dup of it:
        os.close(lifeline)  # else the pipe outlives this watch, and an epoll loop would see its EOF forever
        self._on_gone: Optional[Callable[[], None]] = on_gone

    def add_channel(self, map: Optional[Dict[int, Any]] = None) -> None:
        super().add_channel(map)
        _loop.channel_changed(self)

    def del_channel(self, map: Optional[Dict[int, Any]] = None) -> None:
        fd = self._fileno
        super().del_channel(map)
        _loop.channel_removed(self, fd)

    def writable(self) -> bool:
        return False

    def handle_read(self) -> None:
        self.recv(1)  # EOF: asyncore's recv() calls handle_close()

    def handle_error(self) -> None:
        """The pipe cannot be watched (select() past descriptor 1023): serve on without the watch."""
        error = sys.exc_info()[1]
        log.warning("cannot watch the supervisor (%s): a killed supervisor will not stop this worker",
                    describe_error(error) if isinstance(error, OSError) else error)
        self._on_gone = None
        self.close()

    def handle_close(self) -> None:
        """Called on EOF (or a hang-up): the supervisor is gone."""
        self.close()
        on_gone, self._on_gone = self._on_gone, None
        if on_gone is not None:  # a poll loop reports the hang-up too, in the same event
            on_gone()


def supervise(count: int, run_worker: Callable[[int, Callable[[], None], int], int],
              on_ready: Callable[[], None], drain_timeout: float = 10.0,
              on_hangup: Optional[Callable[[], bool]] = None,
              idle: Callable[[float], None] = time.sleep,
              on_exit: Optional[Callable[[int], None]] = None) -> int:
    """Fork ``count`` workers running ``run_worker(index, ready, lifeline)``; keep
    them running until SIGINT/SIGTERM.  Each worker calls ``ready()`` once it
    listens; when all have (or after START_WAIT s), ``on_ready()`` runs; it
    watches ``lifeline`` with a ``SupervisorWatch``.  SIGHUP runs ``on_hangup()``
    and, if it returns True, is passed on to every worker; SIGUSR1 is passed on.
    A stop passes SIGTERM on and gives the workers ``drain_timeout`` seconds
    (and a margin) before killing them; a second stop signal is passed on too
    (the workers then stop at once).  Returns 0 after a requested stop, 1 if a
    worker kept dying.

    Between two checks the parent calls ``idle(seconds)`` (a short wait: one
    round of its own loop, for instance); ``on_exit(pid)`` runs for each
    worker that exited, once it is reaped."""
    workers: Dict[int, int] = {}  # pid -> index
    deaths: Dict[int, List[float]] = {}
    received: List[int] = []  # signals not handled yet, in order

    def note(signum: int, frame: object) -> None:
        received.append(signum)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)
    previous = {signum: signal.signal(signum, note) for signum in handled}
    failed = False
    stop_signal: Optional[int] = None
    ready_reader, ready_writer = os.pipe()
    # Only this process holds the write end: the workers close theirs at once.
    lifeline = os.pipe()
    try:
        for index in range(count):
            _spawn(index, run_worker, workers, ready_writer, lifeline)
        _wait_ready(ready_reader, workers)
        try:
            if not any(signum in (signal.SIGINT, signal.SIGTERM) for signum in received):
                on_ready()
        except BaseException:
            _stop_all(workers, 0.0, on_exit=on_exit)
            raise
        while workers:
            stop_signal = _pass_on(received, workers, on_hangup)
            if stop_signal is not None:
                break
            pid, status = _reap()
            if not pid:
                idle(0.05)
                continue
            index = workers.pop(pid)
            if on_exit is not None:
                on_exit(pid)
            recent = [t for t in deaths.get(index, []) if time.monotonic() - t < RESTART_WINDOW]
            deaths[index] = recent + [time.monotonic()]
            if len(deaths[index]) > RESTART_LIMIT:
                log.error("worker %d keeps exiting (%s); stopping", index, _describe(status))
                failed = True
                break
            log.warning("worker %d (pid %d) exited (%s); starting it again", index, pid, _describe(status))
            _spawn(index, run_worker, workers, ready_writer, lifeline)
        if stop_signal is not None:
            name = signal.Signals(stop_signal).name
            log.info("%s: stopping %d workers; open connections get %g s to finish (%s again: at once)",
                     name, len(workers), drain_timeout, name, extra={"event": "drain", "details": {
                         "signal": name, "workers": len(workers), "timeout_s": drain_timeout}})
        _stop_all(workers, drain_timeout, received, idle, on_exit)
    finally:
        for fd in (ready_reader, ready_writer, *lifeline):
            os.close(fd)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 1 if failed else 0


def _pass_on(received: List[int], workers: Dict[int, int], on_hangup: Optional[Callable[[], bool]]) -> Optional[int]:
    """Handle the signals received so far; the stop signal if one came."""
    while received:
        signum = received.pop(0)
        if signum in (signal.SIGINT, signal.SIGTERM):
            return signum
        if signum == signal.SIGHUP and (on_hangup is None or not on_hangup()):
            continue
        for pid in workers:
            _signal(pid, signum)
    return None


def _wait_ready(ready_reader: int, workers: Dict[int, int]) -> None:
    """Wait until every worker of ``workers`` has said it listens (one byte each), within
    START_WAIT s; one that exits first is not waited for (the loop then replaces it)."""
    count = len(workers)
    deadline = time.monotonic() + START_WAIT
    received = 0
    # poll(), not select(): with a reserving socket per rule, the pipe may be past descriptor 1023.
    poller = select.poll()
    poller.register(ready_reader, select.POLLIN)
    while received < count:
        left = deadline - time.monotonic()
        if left <= 0:
            log.warning("only %d of %d workers are listening after %g s", received, count, START_WAIT)
            return
        if poller.poll(min(left, READY_CHECK) * 1000):
            received += len(os.read(ready_reader, count - received))
        elif received + sum(_exited(pid) for pid in workers) >= count:
            return


def _exited(pid: int) -> bool:
    """Whether the child ``pid`` has exited, without reaping it: its status is the loop's to read."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _say_ready(ready_writer: int) -> None:
    os.write(ready_writer, b".")


def _spawn(index: int, run_worker: Callable[[int, Callable[[], None], int], int], workers: Dict[int, int],
           ready_writer: int, lifeline: Tuple[int, int]) -> None:
    pid = os.fork()
    if pid:
        workers[pid] = index
        log.debug("worker %d started (pid %d)", index, pid)
        return
    # In the child: its own signal handling (run_worker installs it), never
    # return into the parent's code.
    status = 1
    try:
        os.close(lifeline[1])
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # Ctrl-C reaches the whole process group: the parent passes it on as
        # SIGTERM.  SIGHUP and SIGUSR1 wait for run_worker's handlers (their
        # default would kill a worker that is still starting).
        for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_IGN)
        status = run_worker(index, lambda: _say_ready(ready_writer), lifeline[0])
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


def _stop_all(workers: Dict[int, int], drain_timeout: float, received: Optional[List[int]] = None,
              idle: Callable[[float], None] = time.sleep, on_exit: Optional[Callable[[int], None]] = None) -> None:
    """SIGTERM every worker and wait for their drain (``drain_timeout`` s and a
    margin), calling ``idle`` meanwhile; a stop signal meanwhile is passed on;
    then SIGKILL what is left.  ``on_exit(pid)`` for each one reaped."""
    for pid in workers:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + drain_timeout + STOP_MARGIN
    while workers and time.monotonic() < deadline:
        if received and any(signum in (signal.SIGINT, signal.SIGTERM) for signum in received):
            received.clear()  # a second stop: the workers stop at once on a second SIGTERM
            for pid in workers:
                _signal(pid, signal.SIGTERM)
        pid, _ = _reap()
        if pid:
            if workers.pop(pid, None) is not None and on_exit is not None:
                on_exit(pid)
        else:
            idle(0.05)
    for pid in list(workers):
        log.warning("worker %d (pid %d) did not stop in %g s: killing it", workers[pid], pid,
                    drain_timeout + STOP_MARGIN)
        _signal(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        del workers[pid]
        if on_exit is not None:
            on_exit(pid)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"status {os.waitstatus_to_exitcode(status)}"
