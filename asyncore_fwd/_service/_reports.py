"""The counters of several worker processes, summed for the supervisor's metrics.

With ``--workers`` the counters live in the worker processes.  Each worker
runs a ``StatsReporter``: every ``REPORT_INTERVAL`` seconds (and once more
when its service closes) it sends its ``stats()`` to the supervisor as one
datagram on an AF_UNIX socketpair made before the fork -- a datagram
arrives whole or not at all, so no framing is needed, and a full queue
only skips one report.  The supervisor's ``WorkerStats`` keeps each
worker's latest report and, when a worker exits, moves its counters into
retired totals, so a counter never goes backwards; its ``stats()`` (the sums
per rule) is what the supervisor's ``MetricsServer`` serves, at most about
one report interval old.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
from typing import Any, Dict, List, Optional, Tuple

from .._eventloop._dispatcher import Dispatcher
from .._eventloop._timers import Timer, timers_for
from .._net import SocketMap, describe_error
from .._ops._balance import TARGET_COUNTERS
from .._ops._stats import COUNTERS, DATAGRAM_COUNTERS
from ._metrics import StatsSource

__all__ = ["REPORT_INTERVAL", "StatsReporter", "WorkerStats"]

log = logging.getLogger("asyncore_fwd")

#: Seconds between two reports of a worker's counters to the supervisor.
REPORT_INTERVAL = 1.0
#: How long a worker's last report may wait for room in the supervisor's queue.
FINAL_REPORT_WAIT = 2.0
#: The largest report read (a datagram is read whole or cut).
MAX_REPORT = 1 << 20


def _counters(reported: Dict[str, Any]) -> Dict[str, int]:
    """A rule's counters in a report: ``COUNTERS``, and a UDP rule's ``DATAGRAM_COUNTERS`` when it has them."""
    keys = COUNTERS + DATAGRAM_COUNTERS if "datagrams_to_server" in reported else COUNTERS
    return {key: int(reported.get(key, 0)) for key in keys}


class WorkerStats:
    """The supervisor's view of its workers' counters: sums per rule, for its ``MetricsServer``.

    Holds both ends of the socketpair the workers report on: ``worker_end()``
    is for a forked worker, the other end is read on ``map``.
    """

    def __init__(self, map: Optional[SocketMap] = None) -> None:
        self.map: SocketMap = {} if map is None else map
        #: The MetricsServer, closed with the rest.
        self.attachments: List[Any] = []
        #: The latest report of each live worker, by process id.
        self.latest: Dict[int, Dict[str, Dict[str, int]]] = {}
        #: The counters (all but "active") of the workers that exited, per rule.
        self.retired: Dict[str, Dict[str, int]] = {}
        #: The same for the targets of rules with several: each live worker's latest, and the
        #: failed connects of those that exited, per rule and target.
        self.latest_targets: Dict[int, Dict[str, Dict[str, Dict[str, int]]]] = {}
        self.retired_targets: Dict[str, Dict[str, int]] = {}
        parent_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        worker_end.setblocking(False)  # a worker never waits to report: it skips one
        self._worker_end: Optional[socket.socket] = worker_end
        self._reader = _ReportReader(self, parent_end)

    def worker_end(self) -> socket.socket:
        """In a forked worker: its end of the socketpair; everything else of the supervisor's is closed."""
        worker_end, self._worker_end = self._worker_end, None
        assert worker_end is not None, "worker_end() is called once, in the worker"
        self.close()
        return worker_end

    def receive(self, data: bytes) -> None:
        """A worker's report: keep it as that worker's latest."""
        try:
            report = json.loads(data)
            pid = int(report["pid"])
            stats = {str(label): _counters(counters) for label, counters in report["stats"].items()}
            targets = {str(label): {str(name): {key: int(counters.get(key, 0)) for key in TARGET_COUNTERS}
                                    for name, counters in per_target.items()}
                       for label, per_target in report.get("targets", {}).items()}
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            log.warning("metrics: bad report from a worker (%s): %s", describe_error(error), data[:80])
            return
        self.latest[pid] = stats
        self.latest_targets[pid] = targets

    def worker_exited(self, pid: int) -> None:
        """The worker ``pid`` exited: its counters become retired totals (its last report may still be queued)."""
        if self._reader.connected:
            self._reader.handle_read()
        for label, counters in self.latest.pop(pid, {}).items():
            retired = self.retired.setdefault(label, dict.fromkeys(COUNTERS, 0))
            for key in counters:
                if key != "active":
                    retired[key] = retired.get(key, 0) + counters[key]
        for label, per_target in self.latest_targets.pop(pid, {}).items():
            retired_failures = self.retired_targets.setdefault(label, {})
            for name, counters in per_target.items():
                retired_failures[name] = retired_failures.get(name, 0) + counters["connect_failures"]

    def stats(self) -> Dict[str, Dict[str, int]]:
        """Per rule label: the retired totals plus every live worker's latest report."""
        totals = {label: dict(counters) for label, counters in self.retired.items()}
        for report in list(self.latest.values()):
            for label, counters in report.items():
                total = totals.setdefault(label, dict.fromkeys(COUNTERS, 0))
                for key in counters:
                    total[key] = total.get(key, 0) + counters[key]
        return totals

    def target_stats(self) -> Dict[str, Dict[str, Dict[str, int]]]:
        """Per rule and target: active and connect_failures summed over the workers (with those that
        exited); up only while every live worker has it up (each keeps its own health state)."""
        totals = {label: {name: {"up": 0, "active": 0, "connect_failures": failures}
                          for name, failures in per_target.items()}
                  for label, per_target in self.retired_targets.items()}
        seen: Dict[Tuple[str, str], int] = {}  # how many live workers report each target as up
        reporting: Dict[Tuple[str, str], int] = {}
        for report in list(self.latest_targets.values()):
            for label, per_target in report.items():
                for name, counters in per_target.items():
                    total = totals.setdefault(label, {}).setdefault(name, dict.fromkeys(TARGET_COUNTERS, 0))
                    total["active"] += counters["active"]
                    total["connect_failures"] += counters["connect_failures"]
                    reporting[label, name] = reporting.get((label, name), 0) + 1
                    seen[label, name] = seen.get((label, name), 0) + (1 if counters["up"] else 0)
        for (label, name), count in reporting.items():
            totals[label][name]["up"] = int(seen[label, name] == count)
        return totals

    def close(self) -> None:
        self._reader.close()
        for attachment in self.attachments:
            attachment.close()
        if self._worker_end is not None:
            self._worker_end.close()
            self._worker_end = None


class _ReportReader(Dispatcher):
    """The supervisor's end of the socketpair: one report per datagram."""

    def __init__(self, totals: WorkerStats, sock: socket.socket) -> None:
        self.totals = totals
        super().__init__(sock, map=totals.map)

    def writable(self) -> bool:
        return False

    def handle_read(self) -> None:
        """Called when reports are queued: read every one (a bounded number per round)."""
        for _ in range(1024):
            try:
                data = self.socket.recv(MAX_REPORT)
            except (BlockingIOError, InterruptedError):
                return
            self.totals.receive(data)

    def handle_error(self) -> None:
        log.warning("metrics: %s", describe_error(sys.exc_info()[1] or RuntimeError("unknown error")))


class StatsReporter:
    """In a worker: sends its service's counters to the supervisor every ``interval`` s, and at close."""

    def __init__(self, service: StatsSource, sock: socket.socket, worker: int,
                 interval: float = REPORT_INTERVAL) -> None:
        self.service = service
        self.socket = sock
        self.worker = worker
        self.interval = interval
        self._warned = False
        self._timer: Optional[Timer] = None
        service.attachments.append(self)  # closed with the service: the last report
        self._tick()

    def _tick(self) -> None:
        self.send()
        self._timer = timers_for(self.service.map).call_later(self.interval, self._tick)

    def send(self) -> None:
        """Send one report now; skipped when the supervisor's queue is full."""
        report = {"worker": self.worker, "pid": os.getpid(), "stats": self.service.stats(),
                  "targets": self.service.target_stats()}
        try:
            self.socket.send(json.dumps(report, separators=(",", ":")).encode("utf-8"))
        except (BlockingIOError, InterruptedError):
            pass  # the next report carries the same counters, and more
        except OSError as error:
            if error.errno == errno.ENOBUFS:
                return
            if not self._warned:  # e.g. the supervisor is gone, or too many rules for one datagram
                self._warned = True
                log.warning("metrics: cannot report the counters to the supervisor: %s", describe_error(error))

    def close(self) -> None:
        """Send the last report (after the drain, the final counters) and stop."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            # The last one must not be skipped: wait (a little) for room in the
            # supervisor's queue, which other workers may be filling just now.
            self.socket.settimeout(FINAL_REPORT_WAIT)
            self.send()
        self.socket.close()
