"""Active health checks: a target that goes away is marked down with no client, and up when it is back."""

from __future__ import annotations

import logging
import socket
import time
from typing import Iterator, List, Tuple

import pytest

from asyncore_fwd import Forwarder
from asyncore_fwd._eventloop._timers import existing_timers
from asyncore_fwd._ops._balance import TargetSet, TargetState
from asyncore_fwd._ops._health import _Probe
from conftest import WAIT, EchoServer, connect_until_reset, dead_port, recv_all, wait_for

LOCAL = "127.0.0.1"


def target_lines(caplog: pytest.LogCaptureFixture) -> List[Tuple[str, str, str]]:
    """(target, state, reason) of each ``target`` event logged."""
    return [(record.details["target"], record.details["state"], record.details["reason"])  # type: ignore
            for record in caplog.records if getattr(record, "event", None) == "target"]


class Backend:
    """A listening port that can go away and come back on the same port."""

    def __init__(self) -> None:
        self.sock = self._listen(0)
        self.port = self.sock.getsockname()[1]

    @staticmethod
    def _listen(port: int) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOCAL, port))
        sock.listen(64)
        return sock

    def go_away(self) -> None:
        self.sock.close()

    def come_back(self) -> None:
        self.sock = self._listen(self.port)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def backend() -> Iterator[Backend]:
    server = Backend()
    yield server
    server.close()


def test_a_target_that_goes_away_is_marked_down_without_any_client_and_up_when_back(
        backend: Backend, echo_server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    fwd = Forwarder(LOCAL, 0, LOCAL, backend.port, targets=[(LOCAL, echo_server.port)], map={},
                    health_check_interval=0.05, connect_timeout=0.5)
    assert fwd.targets is not None
    first = fwd.targets[0]
    with fwd.running():
        time.sleep(0.2)  # a few checks pass: no line
        assert first.up and target_lines(caplog) == []
        backend.go_away()
        wait_for(lambda: not first.up, what="the check to mark it down")
        backend.come_back()
        wait_for(lambda: first.up, what="the check to mark it up")
    name = f"{LOCAL}:{backend.port}"
    assert target_lines(caplog) == [(name, "down", "health check failed: Connection refused"),
                                    (name, "up", "health check passed")]
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
    assert first.connect_failures == 0  # the checks are not the clients' connects


def test_a_check_that_gets_no_answer_gives_up_after_connect_timeout(echo_server: EchoServer,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    listener = socket.socket()
    listener.bind((LOCAL, 0))
    listener.listen(0)
    fillers = [socket.socket() for _ in range(4)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
    time.sleep(0.1)  # the accept queue is full: the kernel drops further SYNs
    try:
        fwd = Forwarder(LOCAL, 0, LOCAL, listener.getsockname()[1], targets=[(LOCAL, echo_server.port)], map={},
                        health_check_interval=0.05, connect_timeout=0.2)
        with fwd.running():
            wait_for(lambda: fwd.targets is not None and not fwd.targets[0].up, what="the check to time out")
    finally:
        for sock in fillers + [listener]:
            sock.close()
    assert target_lines(caplog)[0][1:] == ("down", "health check failed: no answer within 0.2 s")


def test_a_target_a_check_found_down_is_not_tried_by_clients_first(backend: Backend,
                                                                   echo_server: EchoServer) -> None:
    backend.go_away()
    fwd = Forwarder(LOCAL, 0, LOCAL, backend.port, targets=[(LOCAL, echo_server.port)], map={},
                    health_check_interval=0.05)
    assert fwd.targets is not None
    with fwd.running():
        wait_for(lambda: fwd.targets is not None and not fwd.targets[0].up, what="the check to mark it down")
        with socket.create_connection(fwd.address, timeout=WAIT) as client:
            client.sendall(b"ping")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"ping"
    assert fwd.targets[0].connect_failures == 0  # never tried


def test_a_passing_check_marks_up_a_target_the_clients_marked_down(backend: Backend,
                                                                   echo_server: EchoServer) -> None:
    """Whatever the failed connects said: the check's verdict wins."""
    fwd = Forwarder(LOCAL, 0, LOCAL, backend.port, targets=[(LOCAL, echo_server.port)], map={},
                    health_check_interval=0.05)
    assert fwd.targets is not None
    first = fwd.targets[0]
    with fwd.running():
        backend.go_away()
        with socket.create_connection(fwd.address, timeout=WAIT) as client:  # fails over: the first is down
            client.sendall(b"ping")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"ping"
        wait_for(lambda: not first.up, what="the first target down")
        backend.come_back()
        wait_for(lambda: first.up, what="a check to mark it up")  # long before fail_timeout (10 s)


def test_checks_stop_when_the_forwarder_closes_leaving_nothing_in_the_map(echo_server: EchoServer) -> None:
    listener = socket.socket()
    listener.bind((LOCAL, 0))
    listener.listen(0)
    fillers = [socket.socket() for _ in range(4)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
    time.sleep(0.1)
    sock_map: dict = {}
    try:
        fwd = Forwarder(LOCAL, 0, LOCAL, echo_server.port, targets=[(LOCAL, listener.getsockname()[1])],
                        map=sock_map, health_check_interval=0.05, connect_timeout=WAIT)
        assert fwd.health is not None
        with fwd.running():
            wait_for(lambda: any(isinstance(channel, _Probe) for channel in list(sock_map.values())),
                     what="a check under way")  # with no answer, until its connect_timeout (10 s)
        assert sock_map == {}
        timers = existing_timers(sock_map)
        assert timers is None or len(timers) == 0
        assert not fwd.health.running and not fwd.health.probes
    finally:
        for sock in fillers + [listener]:
            sock.close()


def test_checks_stop_when_the_forwarder_stops_accepting(echo_server: EchoServer) -> None:
    """A forwarder a reload replaced keeps its connections, not its checks."""
    fwd = Forwarder(LOCAL, 0, LOCAL, echo_server.port, targets=[(LOCAL, dead_port())], map={},
                    health_check_interval=0.05)
    assert fwd.health is not None and fwd.health.running
    listener = fwd.release_listener()
    try:
        assert not fwd.health.running and not fwd.health.probes
        fwd.take_over(listener)  # given back (the new rule could not start): checks again
        assert fwd.health.running
    finally:
        fwd.close()
    assert not fwd.health.running and fwd._map == {}


def test_a_rule_with_one_target_may_have_checks(backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    """Its state is logged and kept; its close line is today's."""
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    fwd = Forwarder(LOCAL, 0, LOCAL, backend.port, map={}, health_check_interval=0.05)
    assert fwd.targets is not None and len(fwd.targets) == 1
    with fwd.running():
        backend.go_away()
        wait_for(lambda: fwd.targets is not None and not fwd.targets[0].up, what="the check to mark it down")
    assert target_lines(caplog)[0][:2] == (f"{LOCAL}:{backend.port}", "down")


def test_a_rule_with_one_target_and_checks_keeps_its_close_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="asyncore_fwd")
    dead = dead_port()
    fwd = Forwarder(LOCAL, 0, LOCAL, dead, map={}, health_check_interval=60)
    with fwd.running():
        assert connect_until_reset(fwd.address) == b""
        wait_for(lambda: caplog.records, what="the close line")
    (line,) = [record.getMessage() for record in caplog.records]
    assert f" -> {LOCAL}:{dead} 0/0 - " in line
    assert line.endswith(f"forwarder closed first: cannot connect to {LOCAL}:{dead}: Connection refused")


def record_verdicts(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    """The checks' verdicts, in order: "passed" or "failed: REASON"."""
    verdicts: List[str] = []
    passed, failed = TargetSet.check_passed, TargetSet.check_failed

    def check_passed(targets: TargetSet, target: TargetState) -> None:
        verdicts.append("passed")
        passed(targets, target)

    def check_failed(targets: TargetSet, target: TargetState, error: OSError) -> None:
        verdicts.append(f"failed: {error}")
        failed(targets, target, error)

    monkeypatch.setattr(TargetSet, "check_passed", check_passed)
    monkeypatch.setattr(TargetSet, "check_failed", check_failed)
    return verdicts


def test_a_check_whose_first_address_refuses_passes_on_the_next(
        echo_server: EchoServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """As for localhost -> ::1 first, with the service on 127.0.0.1 only."""
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    fwd = Forwarder(LOCAL, 0, LOCAL, echo_server.port, map={}, health_check_interval=0.05, connect_timeout=WAIT)
    assert fwd.targets is not None
    fwd.targets[0].addresses._addresses = [(socket.AF_INET, (LOCAL, dead_port())),
                                           (socket.AF_INET, (LOCAL, echo_server.port))]
    verdicts = record_verdicts(monkeypatch)
    with fwd.running():
        wait_for(lambda: len(verdicts) >= 3, what="three checks")
    assert set(verdicts) == {"passed"}
    assert fwd.targets[0].up and target_lines(caplog) == []


def test_a_check_whose_first_address_is_silent_passes_on_the_next_after_connect_timeout(
        echo_server: EchoServer, blackhole: int, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The timeout is per address, as for a client's connect."""
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    fwd = Forwarder(LOCAL, 0, LOCAL, echo_server.port, map={}, health_check_interval=0.05, connect_timeout=0.2)
    assert fwd.targets is not None
    fwd.targets[0].addresses._addresses = [(socket.AF_INET, (LOCAL, blackhole)),
                                           (socket.AF_INET, (LOCAL, echo_server.port))]
    verdicts = record_verdicts(monkeypatch)
    started = time.monotonic()
    with fwd.running():
        wait_for(lambda: len(verdicts) >= 2, what="two checks")
    assert set(verdicts) == {"passed"}
    assert time.monotonic() - started >= 0.4  # each waited connect_timeout for the silent address first
    assert fwd.targets[0].up and target_lines(caplog) == []
