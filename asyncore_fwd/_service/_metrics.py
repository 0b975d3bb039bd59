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

With ``--workers`` the counters live in the worker processes: the
supervisor's ``MetricsServer`` serves their sums (``_reports``).
"""

from __future__ import annotations

import logging
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
from .._ops._stats import DROP_REASONS

__all__ = ["MetricsServer", "StatsSource", "render_prometheus"]

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


class StatsSource(Protocol):
    """What ``MetricsServer`` serves: a ``Service``, or the supervisor's ``WorkerStats`` (``_reports``)."""

    #: The asyncore map the server joins.
    map: SocketMap
    #: Dispatchers closed with the source: the server adds itself.
    attachments: List[Any]

    def stats(self) -> Dict[str, Dict[str, int]]:
        """Per rule label, the counters named in ``_stats.COUNTERS``."""
        ...

    def target_stats(self) -> Dict[str, Dict[str, Dict[str, int]]]:
        """Per rule label and target name, the counters named in ``_balance.TARGET_COUNTERS``
        (only for rules with several targets, or active checks)."""
        ...


# (stats key, metric name, type, help text)
_METRICS: List[Tuple[str, str, str, str]] = [
    ("active", "asyncore_fwd_connections_active", "gauge", "Connections open now."),
    ("accepted", "asyncore_fwd_connections_accepted_total", "counter", "Clients accepted and forwarded."),
    ("refused_acl", "asyncore_fwd_connections_refused_acl_total", "counter",
     "Clients refused by the allow/deny lists or accept_proxy."),
    ("refused_limit", "asyncore_fwd_connections_refused_limit_total", "counter",
     "Clients refused by max_connections, max_per_client or a missing or bad PROXY header."),
    ("failed_connects", "asyncore_fwd_connect_failures_total", "counter", "Clients whose server could not be reached."),
    ("bytes_to_server", "asyncore_fwd_bytes_to_server_total", "counter", "Bytes relayed from clients to servers."),
    ("bytes_to_client", "asyncore_fwd_bytes_to_client_total", "counter", "Bytes relayed from servers to clients."),
]

# The same for each target of a rule that has several (labels rule and target).
_TARGET_METRICS: List[Tuple[str, str, str, str]] = [
    ("up", "asyncore_fwd_target_up", "gauge", "1 if the target is up (tried first), 0 if marked down."),
    ("active", "asyncore_fwd_target_connections_active", "gauge", "Connections open now through the target."),
    ("connect_failures", "asyncore_fwd_target_connect_failures_total", "counter",
     "Clients' connects to the target that failed (health checks not counted)."),
]


# The same for each UDP rule only (a TCP rule's output is as it was): datagrams each way, and those dropped
# by reason (labels rule and reason).
_DATAGRAM_METRICS: List[Tuple[str, str, str, str]] = [
    ("datagrams_to_server", "asyncore_fwd_datagrams_to_server_total", "counter",
     "Datagrams relayed from clients to servers (UDP rules)."),
    ("datagrams_to_client", "asyncore_fwd_datagrams_to_client_total", "counter",
     "Datagrams relayed from servers to clients (UDP rules)."),
]
_DROPPED = ("asyncore_fwd_datagrams_dropped_total", "counter",
            "Datagrams dropped (UDP rules), by reason: " + ", ".join(DROP_REASONS) + ".")


def escape_label(value: str) -> str:
    """A label value as the text format writes it: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_prometheus(service: StatsSource) -> str:
    """The service's per-rule (and per-target) counters in the Prometheus text format 0.0.4."""
    stats: Dict[str, Dict[str, int]] = service.stats()
    lines = []
    for key, name, kind, help_text in _METRICS:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for label, counters in stats.items():
            lines.append(f'{name}{{rule="{escape_label(label)}"}} {counters[key]}')
    datagram_rules = {label: counters for label, counters in stats.items() if "datagrams_to_server" in counters}
    for key, name, kind, help_text in _DATAGRAM_METRICS if datagram_rules else ():
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for label, counters in datagram_rules.items():
            lines.append(f'{name}{{rule="{escape_label(label)}"}} {counters[key]}')
    if datagram_rules:
        name, kind, help_text = _DROPPED
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for label, counters in datagram_rules.items():
            for reason in DROP_REASONS:
                lines.append(f'{name}{{rule="{escape_label(label)}",reason="{reason}"}} '
                             f'{counters.get(f"dropped_{reason}", 0)}')
    targets = service.target_stats()
    for key, name, kind, help_text in _TARGET_METRICS if targets else ():
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for label, per_target in targets.items():
            for target, counters in per_target.items():
                lines.append(f'{name}{{rule="{escape_label(label)}",target="{escape_label(target)}"}} '
                             f'{counters[key]}')
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
