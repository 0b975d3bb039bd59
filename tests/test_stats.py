"""The close line, the counters per rule, and the Prometheus endpoint."""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import threading
import time
from typing import Callable, Iterator, List, Optional

import pytest

from asyncore_fwd import Rule, Service
from asyncore_fwd._eventloop._wakeup import LoopCalls
from asyncore_fwd._listener import _forwarder
from asyncore_fwd._listener._forwarder import ACCEPT_PAUSE
from asyncore_fwd._service._metrics import MAX_REQUEST, REQUEST_TIMEOUT, MetricsServer, render_prometheus
from conftest import (
    WAIT,
    connect_until_reset,
    dead_port,
    descriptors_exhausted,
    needs_ipv6,
    recv_all,
    recv_exactly,
    select_limit_reached,
    wait_for,
)

CLOSE_KEYS = {"rule", "client", "target", "bytes_to_server", "bytes_to_client", "connect_ms", "duration_s",
              "closed_first", "reason"}


def events(caplog: pytest.LogCaptureFixture, name: str) -> List[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


@pytest.fixture
def start_service(loop_kind: str) -> Iterator[Callable[..., Service]]:
    """``start_service(rules)``: a Service served by a thread, stopped at teardown."""
    running = []

    def start(rules) -> Service:
        service = Service(rules)
        thread = threading.Thread(target=service.serve_forever, kwargs={"poll_interval": 0.05, "loop": loop_kind},
                                  daemon=True)
        thread.start()
        running.append((service, thread))
        # Its loop holds its descriptors (epoll, the wake-up pipe) from here on.
        wait_for(lambda: LoopCalls.of(service.map) is not None, what="the loop to take calls")
        return service

    yield start
    for service, thread in running:
        service.stop()
        thread.join(WAIT)
        assert not thread.is_alive()


# -- the close line -----------------------------------------------------------------


def test_clean_close_logs_one_debug_line_with_every_detail(start_forwarder, echo_server, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncore_fwd")
    fwd = start_forwarder(echo_server.port, name="web")
    with fwd.connect() as client:
        client.sendall(b"hello")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"hello"
    wait_for(lambda: events(caplog, "close"), what="the close line")
    (record,) = events(caplog, "close")
    details = record.details
    assert set(details) == CLOSE_KEYS
    assert record.levelno == logging.DEBUG
    assert details["rule"] == "web" and details["target"] == f"127.0.0.1:{echo_server.port}"
    assert details["bytes_to_server"] == details["bytes_to_client"] == 5
    assert details["closed_first"] == "client" and details["reason"] is None
    assert details["connect_ms"] >= 0 and details["duration_s"] >= 0
    assert re.fullmatch(rf"web 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:{echo_server.port} 5/5 [\d.]+ms [\d.]+s "
                        r"client closed first", record.getMessage()), record.getMessage()


def test_failed_connect_logs_a_warning_without_connect_time(start_forwarder, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncore_fwd")
    fwd = start_forwarder(dead_port())
    connect_until_reset(fwd.address)
    wait_for(lambda: events(caplog, "close"), what="the close line")
    (record,) = events(caplog, "close")
    assert record.levelno == logging.WARNING
    assert record.details["connect_ms"] is None and "cannot connect" in record.details["reason"]
    wait_for(lambda: fwd.forwarder.stats.failed_connects == 1, what="the failed connect to be counted")


def test_an_unnamed_rule_on_port_0_names_the_bound_port_in_its_close_line(start_forwarder, echo_server,
                                                                          caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncore_fwd")
    fwd = start_forwarder(echo_server.port)
    with fwd.connect() as client:
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
    wait_for(lambda: events(caplog, "close"), what="the close line")
    (record,) = events(caplog, "close")
    assert record.details["rule"] == f"127.0.0.1:{fwd.port}" != "127.0.0.1:0"
    assert record.getMessage().startswith(f"127.0.0.1:{fwd.port} 127.0.0.1:")


def test_an_unnamed_rule_on_port_0_names_the_bound_port_in_its_start_line(echo_server, caplog) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    service = Service([Rule("127.0.0.1", 0, "127.0.0.1", echo_server.port)])
    try:
        (fwd,) = service.forwarders.values()
        port = fwd.address[1]
        (record,) = events(caplog, "start")
        assert record.getMessage() == f"127.0.0.1:{port}: forwarding 127.0.0.1:{port} to 127.0.0.1:{echo_server.port}"
    finally:
        service.close()


def test_an_unnamed_rule_on_port_0_names_the_bound_port_in_its_stats_and_metrics(echo_server) -> None:
    """Stats and the Prometheus rule label name the port bound, as the log lines do."""
    service = Service([Rule("127.0.0.1", 0, "127.0.0.1", echo_server.port)])
    try:
        (fwd,) = service.forwarders.values()
        label = f"127.0.0.1:{fwd.address[1]}"
        assert list(service.stats()) == [label]
        assert f'rule="{label}"' in render_prometheus(service)
    finally:
        service.close()

# -- counters ------------------------------------------------------------------------


def test_stats_count_live_and_closed_connections(start_service, echo_server) -> None:
    service = start_service([Rule("127.0.0.1", 0, "127.0.0.1", echo_server.port, name="web")])
    client = socket.create_connection(service.forwarders["web"].address, timeout=WAIT)
    client.sendall(b"a" * 100)
    recv_exactly(client, 100)
    # The loop thread counts a send just after it returns: the echo may be here first.
    wait_for(lambda: service.stats()["web"]["bytes_to_client"] == 100, what="the live bytes to be counted")
    live = service.stats()["web"]
    assert (live["active"], live["accepted"], live["bytes_to_server"], live["bytes_to_client"]) == (1, 1, 100, 100)
    client.close()
    wait_for(lambda: service.stats()["web"]["active"] == 0, what="the connection to close")
    closed = service.stats()["web"]
    assert (closed["accepted"], closed["bytes_to_server"], closed["bytes_to_client"]) == (1, 100, 100)
    assert closed["refused_acl"] == closed["refused_limit"] == closed["failed_connects"] == 0


def test_log_stats_writes_one_info_line_per_rule(echo_server, caplog) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    service = Service([Rule("127.0.0.1", 0, "127.0.0.1", echo_server.port, name=name) for name in ("a", "b")])
    try:
        service.log_stats()
    finally:
        service.close()
    records = events(caplog, "stats")
    assert [r.details["rule"] for r in records] == ["a", "b"]
    assert all(r.levelno == logging.INFO and r.details["accepted"] == 0 for r in records)


# -- Prometheus ------------------------------------------------------------------------

# One line of the text format 0.0.4: a comment, or a sample with labels.
HELP = re.compile(r"# HELP (asyncore_fwd_[a-z_]+) \S.*")
TYPE = re.compile(r"# TYPE (asyncore_fwd_[a-z_]+) (counter|gauge)")
LABEL_VALUE = r'"((?:[^"\\\n]|\\[\\"n])*)"'
SAMPLE = re.compile(rf'(asyncore_fwd_[a-z_]+)\{{rule={LABEL_VALUE}(?:,target={LABEL_VALUE})?\}} (\d+)')


def parse_prometheus(text: str) -> dict:
    """{(metric, rule): value}, checking each line against the format."""
    assert text.endswith("\n")
    samples, types = {}, {}
    for line in text.splitlines():
        if HELP.fullmatch(line):
            continue
        typed = TYPE.fullmatch(line)
        if typed:
            types[typed.group(1)] = typed.group(2)
            continue
        sample = SAMPLE.fullmatch(line)
        assert sample, f"not a valid line: {line!r}"
        name = sample.group(1)
        assert name in types, f"{name} has no TYPE line before it"
        assert name.endswith("_total") == (types[name] == "counter")
        assert name.startswith("asyncore_fwd_target_") == (sample.group(3) is not None)
        key = (name, sample.group(2)) if sample.group(3) is None else (name, sample.group(2), sample.group(3))
        samples[key] = int(sample.group(4))
    return samples


def test_prometheus_text_parses_with_escaped_rule_names(echo_server) -> None:
    service = Service([Rule("127.0.0.1", 0, "127.0.0.1", echo_server.port, name='odd "name"\\')])
    try:
        samples = parse_prometheus(render_prometheus(service))
    finally:
        service.close()
    assert samples[("asyncore_fwd_connections_accepted_total", 'odd \\"name\\"\\\\')] == 0
    assert samples[("asyncore_fwd_connections_active", 'odd \\"name\\"\\\\')] == 0
    assert len(samples) == 7


def test_prometheus_text_has_no_target_metrics_for_a_rule_with_one_target(echo_server) -> None:
    service = Service([Rule("127.0.0.1", 0, "127.0.0.1", echo_server.port, name="one")])
    try:
        assert "asyncore_fwd_target_" not in render_prometheus(service)
        assert service.target_stats() == {}
    finally:
        service.close()


def test_target_metrics_count_each_targets_connections_failures_and_state(start_service, echo_server) -> None:
    """A refused first target: the client is served by the second; the first is marked down
    (max_fails=1), its failure counted, and the second holds the open connection."""
    refused = dead_port()
    service = start_service([Rule("127.0.0.1", 0, "127.0.0.1", refused, name="web",
                                  targets=[("127.0.0.1", echo_server.port)])])
    metrics = MetricsServer(service)
    with socket.create_connection(service.forwarders["web"].address, timeout=WAIT) as client:
        client.sendall(b"abc")
        assert recv_exactly(client, 3) == b"abc"
        body = http_get(metrics.address, b"GET /metrics HTTP/1.0\r\n\r\n").partition(b"\r\n\r\n")[2]
        samples = parse_prometheus(body.decode())
    dead, alive = f"127.0.0.1:{refused}", f"127.0.0.1:{echo_server.port}"
    assert samples[("asyncore_fwd_target_up", "web", dead)] == 0
    assert samples[("asyncore_fwd_target_up", "web", alive)] == 1
    assert samples[("asyncore_fwd_target_connect_failures_total", "web", dead)] == 1
    assert samples[("asyncore_fwd_target_connect_failures_total", "web", alive)] == 0
    assert samples[("asyncore_fwd_target_connections_active", "web", dead)] == 0
    assert samples[("asyncore_fwd_target_connections_active", "web", alive)] == 1
    wait_for(lambda: service.target_stats()["web"][alive]["active"] == 0, what="the connection to close")


def test_target_metrics_escape_the_rule_label(echo_server) -> None:
    service = Service([Rule("127.0.0.1", 0, "127.0.0.1", echo_server.port, name='odd "name"\\',
                            targets=[("127.0.0.1", dead_port())], health_check_interval=0)])
    try:
        samples = parse_prometheus(render_prometheus(service))
    finally:
        service.close()
    assert samples[("asyncore_fwd_target_up", 'odd \\"name\\"\\\\', f"127.0.0.1:{echo_server.port}")] == 1


def test_log_stats_adds_one_line_per_target_of_a_rule_with_several(echo_server, caplog) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    second = dead_port()
    service = Service([Rule("127.0.0.1", 0, "127.0.0.1", echo_server.port, name="web",
                            targets=[("127.0.0.1", second)])])
    try:
        service.log_stats()
    finally:
        service.close()
    rule_line, *target_lines = events(caplog, "stats")
    assert rule_line.details["rule"] == "web" and "target" not in rule_line.details
    assert [r.details["target"] for r in target_lines] == [f"127.0.0.1:{echo_server.port}", f"127.0.0.1:{second}"]
    assert target_lines[1].getMessage() == f"web: target 127.0.0.1:{second} up=1 active=0 connect_failures=0"


def http_get(address, request: bytes) -> bytes:
    with socket.create_connection(address, timeout=WAIT) as client:
        client.sendall(request)
        return recv_all(client)


def test_get_metrics_over_a_socket_returns_the_counters(start_service, echo_server) -> None:
    service = start_service([Rule("127.0.0.1", 0, "127.0.0.1", echo_server.port, name="web")])
    metrics = MetricsServer(service)  # joins the map between two rounds: the loop only reads it
    with socket.create_connection(service.forwarders["web"].address, timeout=WAIT) as client:
        client.sendall(b"abc")
        recv_exactly(client, 3)
    response = http_get(metrics.address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n") and b"text/plain; version=0.0.4" in head
    samples = parse_prometheus(body.decode())
    assert samples[("asyncore_fwd_connections_accepted_total", "web")] == 1
    assert samples[("asyncore_fwd_bytes_to_server_total", "web")] == 3


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /other HTTP/1.0\r\n\r\n", b"404"),
    (b"POST /metrics HTTP/1.0\r\n\r\n", b"405"),
    (b"\x00\xffnot http\r\n\r\n", b"400"),
    (b"GET /metrics HTTP/1.0\r\n" + b"X: " + b"y" * MAX_REQUEST + b"\r\n\r\n", b"431"),
])
def test_bad_metrics_request_gets_an_error_and_the_server_goes_on(start_service, echo_server, request_bytes,
                                                                  status) -> None:
    service = start_service([Rule("127.0.0.1", 0, "127.0.0.1", echo_server.port, name="web")])
    metrics = MetricsServer(service)
    assert http_get(metrics.address, request_bytes).startswith(b"HTTP/1.0 " + status)
    assert http_get(metrics.address, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")


def assert_closed_unanswered(client: socket.socket, timeout: float) -> None:
    """The server closed ``client`` (EOF or reset) within ``timeout`` s without a byte of answer."""
    client.settimeout(timeout)
    try:
        data: Optional[bytes] = client.recv(1024)
    except ConnectionResetError:
        return
    except socket.timeout:
        data = None
    if data is None:
        pytest.fail(f"still open after {timeout} s")
    assert data == b""


def test_metrics_close_a_request_beyond_16_at_once_and_serve_the_16_held(start_service, echo_server) -> None:
    """16 unfinished requests are held; the 17th is closed as soon as accepted, not at the deadline."""
    service = start_service([Rule("127.0.0.1", 0, "127.0.0.1", echo_server.port, name="web")])
    metrics = MetricsServer(service)
    held: List[socket.socket] = []
    try:
        for _ in range(16):
            held.append(socket.create_connection(metrics.address, timeout=WAIT))
            held[-1].sendall(b"GET /metrics HTTP/1.1\r\n")  # and not the end of the headers yet
        wait_for(lambda: len(metrics.requests) == 16, what="16 requests held")
        with socket.create_connection(metrics.address, timeout=WAIT) as extra:
            assert_closed_unanswered(extra, timeout=REQUEST_TIMEOUT / 2)
        held[0].sendall(b"\r\n")
        assert recv_all(held[0]).startswith(b"HTTP/1.0 200")
    finally:
        for client in held:
            client.close()


def test_metrics_close_a_request_still_unfinished_at_the_deadline(start_service, echo_server) -> None:
    """A scraper that never ends its request is closed about 5 s after it connected."""
    service = start_service([Rule("127.0.0.1", 0, "127.0.0.1", echo_server.port, name="web")])
    metrics = MetricsServer(service)
    with socket.create_connection(metrics.address, timeout=WAIT) as client:
        started = time.monotonic()
        client.sendall(b"GET /metrics HTTP/1.1\r\n")
        assert_closed_unanswered(client, timeout=WAIT)
        waited = time.monotonic() - started
    assert 4.0 < waited < 8.0, f"closed after {waited:.1f} s"  # generous bounds around the 5 s deadline


def test_metrics_leave_the_last_descriptors_to_forwarding(start_service, echo_server) -> None:
    """With few descriptors free, a scraper is closed at once, and forwarding gets the descriptors."""
    service = start_service([Rule("127.0.0.1", 0, "127.0.0.1", echo_server.port, name="web")])
    metrics = MetricsServer(service)
    with descriptors_exhausted(spare=8):  # enough for a forwarded connection and its echo
        with socket.create_connection(metrics.address, timeout=WAIT) as scraper:
            scraper.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert_closed_unanswered(scraper, timeout=WAIT)
        with socket.create_connection(service.forwarders["web"].address, timeout=WAIT) as client:
            client.sendall(b"ping")
            assert recv_exactly(client, 4) == b"ping"
    assert http_get(metrics.address, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")


def test_metrics_under_select_close_a_scraper_past_its_descriptor_limit_and_serve_on(echo_server, caplog) -> None:
    """Under select(), a scraper whose socket lands past descriptor 1023 is closed at once, saying why;
    the loop lives."""
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    service = Service([Rule("127.0.0.1", 0, "127.0.0.1", echo_server.port, name="web")])
    metrics = MetricsServer(service)
    thread = threading.Thread(target=service.serve_forever, kwargs={"poll_interval": 0.05, "loop": "select"},
                              daemon=True)
    thread.start()
    try:
        wait_for(lambda: LoopCalls.of(service.map) is not None, what="the loop to take calls")
        with socket.socket() as scraper, select_limit_reached(spare=0):  # made first: its fd is low
            scraper.settimeout(WAIT)
            scraper.connect(metrics.address)
            scraper.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert_closed_unanswered(scraper, timeout=WAIT)
        assert thread.is_alive()
        assert http_get(metrics.address, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")
    finally:
        service.stop()
        thread.join(WAIT)
    assert any("metrics endpoint: refused" in r.getMessage() and "select() cannot watch descriptor" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_metrics_yield_while_forwarding_is_out_of_descriptors(start_service, echo_server, monkeypatch) -> None:
    """While a forwarder pauses accepting for lack of descriptors, a scraper is closed at once."""
    monkeypatch.setattr(_forwarder, "ACCEPT_PAUSE", WAIT)  # the pause outlasts the test's steps
    service = start_service([Rule("127.0.0.1", 0, "127.0.0.1", echo_server.port, name="web")])
    metrics = MetricsServer(service)
    fwd = service.forwarders["web"]
    LoopCalls.of(service.map).call(lambda: fwd.pause_accepting(OSError(errno.EMFILE, os.strerror(errno.EMFILE))))
    with socket.create_connection(metrics.address, timeout=WAIT) as scraper:
        scraper.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert_closed_unanswered(scraper, timeout=WAIT)
    assert fwd.accept_paused


def test_metrics_out_of_descriptors_pause_with_one_warning_then_serve(start_service, echo_server, caplog) -> None:
    """accept() failing with EMFILE pauses the endpoint (no spin) and logs one line however long it lasts."""
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    service = start_service([Rule("127.0.0.1", 0, "127.0.0.1", echo_server.port, name="web")])
    metrics = MetricsServer(service)
    scraper = socket.socket()  # made now: connecting takes no new descriptor
    with scraper:
        with descriptors_exhausted(spare=0):
            scraper.settimeout(WAIT)
            scraper.connect(metrics.address)  # the kernel completes it; accept() fails
            scraper.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            time.sleep(4 * ACCEPT_PAUSE)  # several pauses
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "Too many open files" in warnings[0], warnings
        assert recv_all(scraper).startswith(b"HTTP/1.0 200")


def metrics_warnings(host: str, caplog: pytest.LogCaptureFixture) -> List[str]:
    """The warnings logged while a MetricsServer starts on ``host`` (and at once stops)."""
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    service = Service([Rule("127.0.0.1", 0, "127.0.0.1", dead_port())])
    try:
        caplog.clear()
        MetricsServer(service, host)  # closed with the service
    finally:
        service.close()
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("host", ["0.0.0.0", pytest.param("::", marks=needs_ipv6)])
def test_metrics_on_a_wildcard_address_log_one_warning(host, caplog) -> None:
    (warning,) = metrics_warnings(host, caplog)
    assert "metrics" in warning and "not a loopback address" in warning
    assert "readable by anyone who can reach it" in warning


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", pytest.param("::1", marks=needs_ipv6)])
def test_metrics_on_loopback_log_no_warning(host, caplog) -> None:
    assert metrics_warnings(host, caplog) == []


def test_target_failures_go_on_across_a_reload_that_changes_the_rule(start_service, echo_server) -> None:
    """The new forwarder of a changed rule starts with every target up, but its counters go on."""
    refused = dead_port()
    rule = Rule("127.0.0.1", 0, "127.0.0.1", refused, name="web", targets=[("127.0.0.1", echo_server.port)])
    service = start_service([rule])
    address = service.forwarders["web"].address
    dead = f"127.0.0.1:{refused}"

    def one_client() -> None:
        with socket.create_connection(address, timeout=WAIT) as client:
            client.sendall(b"x")
            assert recv_exactly(client, 1) == b"x"

    one_client()
    assert service.target_stats()["web"][dead] == {"up": 0, "active": 0, "connect_failures": 1}
    service.reload([Rule("127.0.0.1", 0, "127.0.0.1", refused, name="web", idle_timeout=60,
                         targets=[("127.0.0.1", echo_server.port)])])
    wait_for(lambda: service.forwarders["web"].rule.idle_timeout == 60, what="the reload")
    assert service.target_stats()["web"][dead]["connect_failures"] == 1
    one_client()  # the new forwarder's targets start up: the refused one is tried first again
    assert service.target_stats()["web"][dead]["connect_failures"] == 2
