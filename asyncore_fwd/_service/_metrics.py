"""The service's counters for Prometheus: the text format, and a tiny HTTP endpoint.

Strategy: ``render_prometheus(service)`` turns ``Service.stats()`` into the
text exposition format 0.0.4.  ``MetricsServer`` answers ``GET /metrics``
on the service's own map, so scraping needs no thread and sees the
counters between two rounds of the loop.  It is deliberately small: one
request per connection, a bounded request, a deadline for slow clients,
and any error closes that one connection, never the loop.

It must never starve the forwarding it reports on.  At most
``MAX_REQUESTS`` scrapers are served at once, each for at most
``REQUEST_TIMEOUT`` seconds.  A scraper beyond that, or one that arrives
while fewer than ``DESCRIPTOR_RESERVE`` descriptors are free or while a
forwarder pauses for lack of them, is closed as soon as it is accepted;
when accept() itself runs out of descriptors the server pauses like a
forwarder does.  Listening on anything but loopback logs a warning: the
counters are then anyone's to read.

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
import resource
import socket
import sys
from typing import Any, Dict, List, Optional, Protocol, Set, Tuple

from .._compat import asyncore
from .._eventloop import _loop
from .._eventloop._dispatcher import Dispatcher
from .._eventloop._timers import Timer, timers_for
from .._listener._forwarder import ACCEPT_PAUSE
from .._net import OUT_OF_RESOURCES, SockAddr, SocketMap, describe_error, format_address, listen_address, tune
from .._ops._access import RefusalLog, is_loopback
from .._ops._stats import COUNTERS

__all__ = ["MetricsServer", "StatsReporter", "StatsSource", "WorkerStats", "render_prometheus"]

log = logging.getLogger("asyncore_fwd")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: A request larger than this (line and headers) is refused.
MAX_REQUEST = 8 * 1024
#: A client has this long to send its request and read the answer.
REQUEST_TIMEOUT = 5.0
#: At most this many scrapers are served at once; one more is closed as soon as it is accepted.
MAX_REQUESTS = 16
#: A scraper is closed at once while fewer descriptors than this are free: they are forwarding's.
DESCRIPTOR_RESERVE = 32
#: Seconds between two reports of a worker's counters to the supervisor.
REPORT_INTERVAL = 1.0
#: How long a worker's last report may wait for room in the supervisor's queue.
FINAL_REPORT_WAIT = 2.0
#: The largest report read (a datagram is read whole or cut).
MAX_REPORT = 1 << 20


class StatsSource(Protocol):
    """What ``MetricsServer`` serves: a ``Service``, or the supervisor's ``WorkerStats``."""

    #: The asyncore map the server joins.
    map: SocketMap
    #: Dispatchers closed with the source: the server adds itself.
    attachments: List[Any]

    def stats(self) -> Dict[str, Dict[str, int]]:
        """Per rule label, the counters named in ``_stats.COUNTERS``."""
        ...

# (stats key, metric name, type, help text)
_METRICS: List[Tuple[str, str, str, str]] = [
    ("active", "asyncore_fwd_connections_active", "gauge", "Connections open now."),
    ("accepted", "asyncore_fwd_connections_accepted_total", "counter", "Clients accepted and forwarded."),
    ("refused_acl", "asyncore_fwd_connections_refused_acl_total", "counter",
     "Clients refused by the allow/deny lists."),
    ("refused_limit", "asyncore_fwd_connections_refused_limit_total", "counter",
     "Clients refused by max_connections or max_per_client."),
    ("failed_connects", "asyncore_fwd_connect_failures_total", "counter", "Clients whose server could not be reached."),
    ("bytes_to_server", "asyncore_fwd_bytes_to_server_total", "counter", "Bytes relayed from clients to servers."),
    ("bytes_to_client", "asyncore_fwd_bytes_to_client_total", "counter", "Bytes relayed from servers to clients."),
]


def escape_label(value: str) -> str:
    """A label value as the text format writes it: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_prometheus(service: StatsSource) -> str:
    """The service's per-rule counters in the Prometheus text format 0.0.4."""
    stats: Dict[str, Dict[str, int]] = service.stats()
    lines = []
    for key, name, kind, help_text in _METRICS:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for label, counters in stats.items():
            lines.append(f'{name}{{rule="{escape_label(label)}"}} {counters[key]}')
    return "\n".join(lines) + "\n"


def descriptors_left(sock: socket.socket) -> float:
    """At most how many more descriptors this process can open, judged by ``sock``, just opened.

    The kernel hands out the lowest free number, so every number below a new
    descriptor's is in use: one syscall, where counting /proc/self/fd would
    cost as much as there are connections.
    """
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return float("inf") if soft == resource.RLIM_INFINITY else soft - sock.fileno() - 1


class MetricsServer(Dispatcher):
    """Answers ``GET /metrics`` with ``render_prometheus(service)``, on the service's map.

    ``service`` is a ``Service`` or anything else with ``map``, ``stats()``
    and ``attachments`` (``StatsSource``).

    HTTP/1.0 or 1.1, one response per connection, then close; 404 for any
    other path, 405 for another method, 400 for what is not HTTP.  At most
    ``MAX_REQUESTS`` at once, each closed after ``REQUEST_TIMEOUT`` s.
    ``address`` is where it listens (``port=0`` picks a free one).
    """

    def __init__(self, service: StatsSource, host: str = "127.0.0.1", port: int = 0) -> None:
        self.service = service
        #: The scrapers being served, closed with the server.
        self.requests: Set[_MetricsRequest] = set()
        self._paused: Optional[Timer] = None
        #: Set by an accept() that ran out of descriptors, cleared by one that did not.
        self._out_of_descriptors = False
        #: Scrapers closed at once (too many, too few descriptors): logged at most once per interval.
        #: (The label has a space, so no rule's label can be the same.)
        self.refusals = RefusalLog("metrics endpoint", timers_for(service.map))
        super().__init__(map=service.map)
        family, address = listen_address(host, port)
        self.create_socket(family, socket.SOCK_STREAM)
        try:
            self.set_reuse_addr()
            self.bind(address)
            self.listen(64)
        except OSError as error:
            self.close()
            raise OSError(error.errno, f"cannot listen on {format_address((host, port))} for metrics: "
                                       f"{describe_error(error)}") from None
        self.address: Tuple[str, int] = self.socket.getsockname()[:2]
        self.addr = self.address
        service.attachments.append(self)
        if not is_loopback(self.address[0]):
            log.warning("metrics on %s, not a loopback address: the counters are readable by anyone who can "
                        "reach it", format_address(self.address))

    # -- select() predicates --------------------------------------------

    def readable(self) -> bool:
        """Accept, except for a moment after running out of descriptors."""
        return self._paused is None

    def writable(self) -> bool:
        return False

    # -- event handlers ---------------------------------------------------

    def handle_accepted(self, sock: socket.socket, addr: SockAddr) -> None:
        """Called with each scraper's socket: serve it one response, unless that would take
        what forwarding needs."""
        if len(self.requests) >= MAX_REQUESTS:
            reason = f"{MAX_REQUESTS} requests being served"
        elif descriptors_left(sock) < DESCRIPTOR_RESERVE:
            reason = f"fewer than {DESCRIPTOR_RESERVE} descriptors free"
        elif self.forwarding_paused():
            reason = "forwarding is out of descriptors"
        elif not _loop.watchable(self._map, sock):
            reason = f"select() cannot watch descriptor {sock.fileno()}"
        else:
            self.requests.add(_MetricsRequest(self, sock))
            return
        sock.close()
        self.refusals.refused(addr, reason)

    def handle_accept(self) -> None:
        try:
            super().handle_accept()
        except OSError as error:
            if error.errno not in OUT_OF_RESOURCES:
                raise
            # The pending scraper stays in the backlog, so the listener stays
            # ready: pause, as a forwarder does, or the loop would spin.
            if not self._out_of_descriptors:  # one line per shortage, not one per pause
                log.warning("metrics: not accepting while out of descriptors: %s", describe_error(error))
            self._out_of_descriptors = True
            self._paused = timers_for(self._map).call_later(ACCEPT_PAUSE, self._resume)
        else:
            self._out_of_descriptors = False

    def _resume(self) -> None:
        self._paused = None
        _loop.channel_changed(self)

    def forwarding_paused(self) -> bool:
        """True while a forwarder of the service pauses accepting (out of descriptors, mostly).

        Free descriptors are judged by number in ``descriptors_left``, which
        cannot see the gaps closed connections leave: this sees the shortage
        once forwarding runs into it.
        """
        forwarders = getattr(self.service, "forwarders", {})  # a Service's; WorkerStats forwards nothing
        return any(fwd.accept_paused for fwd in forwarders.values())

    def close(self) -> None:
        """Stop listening, and drop the scrapers being served."""
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        asyncore.dispatcher.close(self)
        self.refusals.close()
        for request in list(self.requests):
            request.close()

    def handle_error(self) -> None:
        """Called when a handler raised: log it, keep listening."""
        log.warning("metrics: %s", describe_error(sys.exc_info()[1] or RuntimeError("unknown error")))


class _MetricsRequest(Dispatcher):
    """One scraper's connection: read a request line and headers, answer, close."""

    _deadline: Optional[Timer] = None

    def __init__(self, server: MetricsServer, sock: socket.socket) -> None:
        self.server = server
        self.request = bytearray()
        self.response = b""
        #: Set once the response is sent: what the client still sends is read and dropped.
        self.answered = False
        super().__init__(sock, map=server._map)
        tune(sock)
        self._deadline: Optional[Timer] = timers_for(self._map).call_later(REQUEST_TIMEOUT, self.close)

    def readable(self) -> bool:
        return not self.response

    def writable(self) -> bool:
        return bool(self.response)

    def handle_read(self) -> None:
        """Called when the request arrives: answer once the headers are complete."""
        data = self.recv(MAX_REQUEST + 1 - len(self.request) if not self.answered else 65536)
        if not data:
            self.close()
            return
        if self.answered:
            return  # closing now with unread bytes would reset the response away
        self.request += data
        end = self.request.find(b"\r\n\r\n")
        if end < 0:
            end = self.request.find(b"\n\n")
        if end >= 0:
            self.answer(bytes(self.request[:end]))
        elif len(self.request) > MAX_REQUEST:
            self.respond(431, "Request Header Fields Too Large", "request too large\n")

    def answer(self, head: bytes) -> None:
        """The request's head arrived: pick the response."""
        parts = head.split(b"\n", 1)[0].strip().split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self.respond(400, "Bad Request", "bad request\n")
        elif parts[0] not in (b"GET", b"HEAD"):
            self.respond(405, "Method Not Allowed", "only GET\n")
        elif parts[1].split(b"?", 1)[0] != b"/metrics":
            self.respond(404, "Not Found", "not found: try /metrics\n")
        else:
            self.respond(200, "OK", render_prometheus(self.server.service), head_only=parts[0] == b"HEAD")

    def respond(self, status: int, reason: str, body: str, head_only: bool = False) -> None:
        payload = body.encode("utf-8")
        content_type = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
        head = (f"HTTP/1.0 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode("ascii")
        self.response = head if head_only else head + payload
        self.handle_write()

    def handle_write(self) -> None:
        """Called when the socket can take more of the response; close once it is sent."""
        try:
            sent = self.socket.send(self.response)
        except (BlockingIOError, InterruptedError):
            return
        self.response = self.response[sent:]
        if not self.response:
            # FIN, then wait for the client's: a close() now, with the rest of
            # an oversized request unread, would send a reset that may destroy
            # the response before the client reads it.
            self.answered = True
            self.socket.shutdown(socket.SHUT_WR)

    def handle_close(self) -> None:
        self.close()

    def handle_error(self) -> None:
        """Called when a handler raised (a reset, a bad request): drop this connection only."""
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            log.warning("metrics: internal error: %s", describe_error(error or RuntimeError("unknown error")))
        self.close()

    def close(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.server.requests.discard(self)
        asyncore.dispatcher.close(self)


# -- the counters of several worker processes ---------------------------------


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
            stats = {str(label): {key: int(counters.get(key, 0)) for key in COUNTERS}
                     for label, counters in report["stats"].items()}
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            log.warning("metrics: bad report from a worker (%s): %s", describe_error(error), data[:80])
            return
        self.latest[pid] = stats

    def worker_exited(self, pid: int) -> None:
        """The worker ``pid`` exited: its counters become retired totals (its last report may still be queued)."""
        if self._reader.connected:
            self._reader.handle_read()
        for label, counters in self.latest.pop(pid, {}).items():
            retired = self.retired.setdefault(label, dict.fromkeys(COUNTERS, 0))
            for key in COUNTERS:
                if key != "active":
                    retired[key] += counters[key]

    def stats(self) -> Dict[str, Dict[str, int]]:
        """Per rule label: the retired totals plus every live worker's latest report."""
        totals = {label: dict(counters) for label, counters in self.retired.items()}
        for report in list(self.latest.values()):
            for label, counters in report.items():
                total = totals.setdefault(label, dict.fromkeys(COUNTERS, 0))
                for key in COUNTERS:
                    total[key] += counters[key]
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
        report = {"worker": self.worker, "pid": os.getpid(), "stats": self.service.stats()}
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
