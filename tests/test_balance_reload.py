"""Several targets as the service and the command run them: reload, SIGHUP, -L connect= options, JSON events."""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List

import pytest

from asyncore_fwd import Rule, Service
from conftest import (
    WAIT,
    EchoServer,
    ForwarderProcess,
    dead_port,
    free_port,
    recv_all,
    unless_taken,
    wait_for,
)

LOCAL = "127.0.0.1"
MODULE = [sys.executable, "-m", "asyncore_fwd"]


@pytest.fixture
def echo_servers() -> Iterator[List[EchoServer]]:
    servers = [EchoServer() for _ in range(3)]
    yield servers
    for server in servers:
        server.close()


def test_a_reload_sends_new_connections_to_the_new_targets_and_leaves_open_ones(
        echo_servers: List[EchoServer]) -> None:
    port = free_port()
    old_rule = Rule(LOCAL, port, LOCAL, dead_port(), targets=[(LOCAL, echo_servers[0].port)], name="r")
    service = unless_taken(lambda: Service([old_rule], map={}))
    thread = threading.Thread(target=service.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        address = service.forwarders["r"].address
        with socket.create_connection(address, timeout=WAIT) as old:
            old.sendall(b"old")
            old.settimeout(WAIT)
            assert old.recv(10) == b"old"
            service.reload([Rule(LOCAL, port, LOCAL, echo_servers[1].port, targets=[(LOCAL, echo_servers[2].port)],
                                 name="r", balance="roundrobin")])
            wait_for(lambda: service.forwarders["r"].rule.balance == "roundrobin", what="the reload")
            for _ in range(2):
                with socket.create_connection(address, timeout=WAIT) as new:
                    new.sendall(b"new")
                    new.shutdown(socket.SHUT_WR)
                    assert recv_all(new) == b"new"
            old.sendall(b" still")  # the open one relays through its old target
            assert old.recv(10) == b" still"
    finally:
        service.stop()
        thread.join(WAIT)
    assert [server.accepted for server in echo_servers] == [1, 1, 1]


def test_the_command_takes_connect_options_and_logs_target_events_in_json(
        echo_server: EchoServer, spawn: Callable[..., ForwarderProcess]) -> None:
    dead = dead_port()
    spec = f"0:{LOCAL}:{dead},connect={LOCAL}:{echo_server.port},name=pool"
    proc = spawn(MODULE + ["--log-format", "json", "-L", spec])
    start = json.loads(proc.wait_line(r'"event": "start"').string)
    assert (start["target"], start["targets"], start["balance"]) == (
        f"{LOCAL}:{dead}", [f"{LOCAL}:{dead}", f"{LOCAL}:{echo_server.port}"], "first")
    port = int(start["listen"].rsplit(":", 1)[1])
    with socket.create_connection((LOCAL, port), timeout=WAIT) as client:
        client.sendall(b"json")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"json"
    event = json.loads(proc.wait_line(r'"event": "target"').string)
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr
    assert (event["level"], event["rule"], event["target"], event["state"]) == ("info", "pool", f"{LOCAL}:{dead}",
                                                                               "down")


def test_sighup_sends_new_connections_to_the_new_targets_and_leaves_open_ones(
        echo_servers: List[EchoServer], spawn: Callable[..., ForwarderProcess], tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "fwd.toml"
    rule = f'[[rule]]\nname = "r"\nlisten = "{LOCAL}:{port}"\n'
    config.write_text(rule + f'connect = "{LOCAL}:{echo_servers[0].port}"\n')
    proc = spawn(MODULE + ["-c", str(config)])
    proc.wait_line(r"r: forwarding ")
    with socket.create_connection((LOCAL, port), timeout=WAIT) as old:
        old.sendall(b"old")
        old.settimeout(WAIT)
        assert old.recv(10) == b"old"
        config.write_text(rule + f'connect = ["{LOCAL}:{echo_servers[1].port}", "{LOCAL}:{echo_servers[2].port}"]\n'
                                 'balance = "roundrobin"\n')
        proc.process.send_signal(signal.SIGHUP)
        proc.wait_line(r"reloaded: 0 added, 0 removed, 1 changed")
        for _ in range(2):
            with socket.create_connection((LOCAL, port), timeout=WAIT) as new:
                new.sendall(b"new")
                new.shutdown(socket.SHUT_WR)
                assert recv_all(new) == b"new"
        old.sendall(b" still")
        assert old.recv(10) == b" still"
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr
    assert [server.accepted for server in echo_servers] == [1, 1, 1]


def test_a_forwarder_a_reload_retired_logs_no_target_line_for_its_old_state(
        echo_server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    """Its down timers stop with its listener: no "up" line comes later for a state no one uses,
    while its open connection still relays and counts in its target."""
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    port, dead = free_port(), dead_port()
    rule = Rule(LOCAL, port, LOCAL, dead, targets=[(LOCAL, echo_server.port)], name="r", fail_timeout=1.0)
    service = unless_taken(lambda: Service([rule], map={}))
    thread = threading.Thread(target=service.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        old_forwarder = service.forwarders["r"]
        with socket.create_connection((LOCAL, port), timeout=WAIT) as old:
            old.sendall(b"old")
            old.settimeout(WAIT)
            assert old.recv(10) == b"old"  # failed over: the dead target is down for fail_timeout
            service.reload([Rule(LOCAL, port, LOCAL, dead, targets=[(LOCAL, echo_server.port)], name="r",
                                 fail_timeout=1.0, balance="roundrobin")])
            wait_for(lambda: service.forwarders["r"] is not old_forwarder, what="the reload")
            time.sleep(1.2)  # past the old forwarder's fail_timeout
            assert old_forwarder.targets is not None and old_forwarder.targets[1].active == 1
            old.sendall(b" still")
            assert old.recv(10) == b" still"
    finally:
        service.stop()
        thread.join(WAIT)
    lines = [record.getMessage() for record in caplog.records if getattr(record, "event", None) == "target"]
    assert lines == [f"r: target {LOCAL}:{dead} is down: a failed connect within 1 s, the last: Connection refused"]


def test_a_failed_connect_of_a_forwarder_a_reload_retired_logs_no_target_line(
        echo_server: EchoServer, blackhole: int, caplog: pytest.LogCaptureFixture) -> None:
    """Its client still fails over and is served; the failure counts; the new forwarder owns the state."""
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    port = free_port()
    # connect_timeout: long enough for the reload to come first, on a loaded machine too
    rule = Rule(LOCAL, port, LOCAL, blackhole, targets=[(LOCAL, echo_server.port)], name="r", connect_timeout=1.0)
    service = unless_taken(lambda: Service([rule], map={}))
    thread = threading.Thread(target=service.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        old_forwarder = service.forwarders["r"]
        with socket.create_connection((LOCAL, port), timeout=WAIT) as client:
            wait_for(lambda: old_forwarder.targets is not None and old_forwarder.targets[0].active == 1,
                     what="the connect to the silent target")
            service.reload([Rule(LOCAL, port, LOCAL, blackhole, targets=[(LOCAL, echo_server.port)], name="r",
                                 connect_timeout=1.0, balance="roundrobin")])
            wait_for(lambda: service.forwarders["r"] is not old_forwarder, what="the reload")
            client.sendall(b"ping")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"ping"  # after connect_timeout, from the second target
        assert old_forwarder.targets is not None and old_forwarder.targets[0].connect_failures == 1
    finally:
        service.stop()
        thread.join(WAIT)
    assert [record.getMessage() for record in caplog.records if getattr(record, "event", None) == "target"] == []


def test_a_forwarder_a_failed_reload_gives_back_its_listener_tries_a_down_target_again_after_fail_timeout(
        echo_server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    port, dead = free_port(), dead_port()
    rule = Rule(LOCAL, port, LOCAL, dead, targets=[(LOCAL, echo_server.port)], name="r", fail_timeout=0.3)
    service = unless_taken(lambda: Service([rule], map={}))
    thread = threading.Thread(target=service.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        forwarder = service.forwarders["r"]
        assert forwarder.targets is not None
        with socket.create_connection((LOCAL, port), timeout=WAIT) as client:
            client.sendall(b"ping")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"ping"  # the dead target is down for fail_timeout
        service.reload([Rule(LOCAL, port, "no-such-host.invalid", 80, name="r")])  # cannot start: the old stays
        assert service.forwarders["r"] is forwarder
        wait_for(lambda: forwarder.targets is not None and forwarder.targets[0].up, what="the down time to end")
    finally:
        service.stop()
        thread.join(WAIT)
    states = [record.details["state"] for record in caplog.records  # type: ignore[attr-defined]
              if getattr(record, "event", None) == "target"]
    assert states == ["down", "up"]
