"""Several targets: failover, balance, passive health, the close line, the loop-back guard; real sockets on loopback."""

from __future__ import annotations

import errno
import json
import logging
import socket
import time
from typing import Any, Iterator, List, Tuple

import pytest

from asyncore_fwd import Forwarder, Rule
from asyncore_fwd._eventloop._timers import Timers
from asyncore_fwd._eventloop._wakeup import LoopCalls
from asyncore_fwd._ops._balance import TargetSet
from asyncore_fwd._relay._sender import Sender
from asyncore_fwd.cli._logging import JsonFormatter
from conftest import (
    WAIT,
    EchoServer,
    connect_until_reset,
    dead_port,
    free_port,
    recv_all,
    unless_taken,
    wait_for,
)

LOCAL = "127.0.0.1"


def several(first: int, *others: int, **options: Any) -> Forwarder:
    """A forwarder on its own map to ``first``, then ``others``, on 127.0.0.1."""
    return Forwarder(LOCAL, 0, LOCAL, first, targets=[(LOCAL, port) for port in others], map={}, **options)


def echo_through(fwd: Forwarder, data: bytes = b"ping") -> bytes:
    with socket.create_connection(fwd.address, timeout=WAIT) as client:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        return recv_all(client)


def states(fwd: Forwarder) -> List[Tuple[bool, int, int]]:
    """(up, active, connect_failures) of each target, in order."""
    assert fwd.targets is not None
    return [(target.up, target.active, target.connect_failures) for target in fwd.targets]


def target_lines(caplog: pytest.LogCaptureFixture) -> List[Tuple[str, str]]:
    """(target, state) of each ``target`` event logged."""
    return [(record.details["target"], record.details["state"])  # type: ignore[attr-defined]
            for record in caplog.records if getattr(record, "event", None) == "target"]


@pytest.fixture
def echo_servers() -> Iterator[List[EchoServer]]:
    servers = [EchoServer() for _ in range(3)]
    yield servers
    for server in servers:
        server.close()


# -- failover ------------------------------------------------------------------


def test_a_refused_first_target_fails_over_to_the_second_and_is_marked_down(
        echo_server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    dead = dead_port()
    fwd = several(dead, echo_server.port)
    with fwd.running():
        assert echo_through(fwd) == b"ping"
        wait_for(lambda: not fwd.connections, what="the pair to close")
        assert states(fwd) == [(False, 0, 1), (True, 0, 0)]
        assert echo_through(fwd) == b"ping"  # the down target is not tried first
        wait_for(lambda: not fwd.connections, what="the pair to close")
        assert states(fwd) == [(False, 0, 1), (True, 0, 0)]
    assert target_lines(caplog) == [(f"{LOCAL}:{dead}", "down")]


def test_a_target_that_never_answers_fails_over_after_the_connect_timeout(
        echo_server: EchoServer, blackhole: int) -> None:
    fwd = several(blackhole, echo_server.port, connect_timeout=0.3)
    with fwd.running():
        started = time.monotonic()
        assert echo_through(fwd) == b"ping"
        assert 0.25 < time.monotonic() - started < WAIT
        wait_for(lambda: not fwd.connections, what="the pair to close")
        assert states(fwd) == [(False, 0, 1), (True, 0, 0)]


def test_every_target_failing_resets_the_client_with_one_line_naming_each(
        blackhole: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="asyncore_fwd")
    dead = dead_port()
    fwd = several(dead, blackhole, connect_timeout=0.3)
    with fwd.running():
        assert connect_until_reset(fwd.address) == b""
        wait_for(lambda: fwd.stats.failed_connects == 1, what="the failed connect to be counted")
    (line,) = [record.getMessage() for record in caplog.records]
    assert line.endswith(f"cannot connect to any target ({LOCAL}:{dead}: Connection refused; "
                         f"{LOCAL}:{blackhole}: connect timed out after 0.3 s)")


def test_when_every_target_is_down_a_client_still_tries_them_all(echo_server: EchoServer) -> None:
    """A down mark is a preference: a service that comes back is found by the next client."""
    first = socket.socket()
    first.bind((LOCAL, 0))  # bound, not listening: refuses, until listen()
    try:
        fwd = several(first.getsockname()[1], dead_port())
        with fwd.running():
            assert connect_until_reset(fwd.address) == b""
            wait_for(lambda: states(fwd) == [(False, 0, 1), (False, 0, 1)], what="both down")
            assert connect_until_reset(fwd.address) == b""
            wait_for(lambda: states(fwd) == [(False, 0, 2), (False, 0, 2)], what="both tried again")
            first.listen(8)
            with socket.create_connection(fwd.address, timeout=WAIT) as client:
                first.settimeout(WAIT)
                served, _ = first.accept()
                with served:
                    client.sendall(b"back")
                    served.settimeout(WAIT)
                    assert served.recv(10) == b"back"
            assert fwd.targets is not None and fwd.targets[0].connect_failures == 2
    finally:
        first.close()


# -- passive health ---------------------------------------------------------------


def test_a_down_target_is_tried_again_after_fail_timeout(
        echo_server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    first = socket.socket()
    first.bind((LOCAL, 0))
    try:
        fwd = several(first.getsockname()[1], echo_server.port, fail_timeout=1.0)
        with fwd.running():
            assert echo_through(fwd) == b"ping"  # the first refuses: down
            assert fwd.targets is not None and not fwd.targets[0].up
            first.listen(8)
            wait_for(lambda: fwd.targets is not None and fwd.targets[0].up, what="the down time to end")
            with socket.create_connection(fwd.address, timeout=WAIT):
                first.settimeout(WAIT)
                first.accept()[0].close()  # the next client goes to the first target again
        name = f"{LOCAL}:{first.getsockname()[1]}"
        assert target_lines(caplog) == [(name, "down"), (name, "up")]
        up = next(record for record in caplog.records if getattr(record, "event", None) == "target"
                  and record.details["state"] == "up")  # type: ignore[attr-defined]
        assert up.getMessage().endswith("is up: down for fail_timeout (1 s): to be tried again")
    finally:
        first.close()


def test_max_fails_failed_connects_within_fail_timeout_mark_a_target_down(echo_server: EchoServer) -> None:
    fwd = several(dead_port(), echo_server.port, max_fails=2)
    with fwd.running():
        assert echo_through(fwd) == b"ping"
        wait_for(lambda: not fwd.connections, what="the pair to close")
        assert states(fwd)[0] == (True, 0, 1)
        assert echo_through(fwd) == b"ping"
        wait_for(lambda: not fwd.connections, what="the pair to close")
        assert states(fwd)[0] == (False, 0, 2)


def test_max_fails_0_never_marks_a_target_down(echo_server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    fwd = several(dead_port(), echo_server.port, max_fails=0)
    with fwd.running():
        for _ in range(3):
            assert echo_through(fwd) == b"ping"
        wait_for(lambda: not fwd.connections, what="the pairs to close")
        assert states(fwd) == [(True, 0, 3), (True, 0, 0)]
    assert target_lines(caplog) == []


# -- balance -------------------------------------------------------------------------


def test_first_serves_every_client_from_the_first_target_that_is_up(echo_servers: List[EchoServer]) -> None:
    fwd = several(*(server.port for server in echo_servers))
    with fwd.running():
        for _ in range(4):
            assert echo_through(fwd) == b"ping"
    assert [server.accepted for server in echo_servers] == [4, 0, 0]


def test_roundrobin_spreads_new_connections_over_the_targets_in_turn(echo_servers: List[EchoServer]) -> None:
    fwd = several(*(server.port for server in echo_servers), balance="roundrobin")
    with fwd.running():
        for _ in range(6):
            assert echo_through(fwd) == b"ping"
    assert [server.accepted for server in echo_servers] == [2, 2, 2]


def test_roundrobin_skips_a_target_that_is_down(echo_servers: List[EchoServer]) -> None:
    fwd = several(echo_servers[0].port, dead_port(), echo_servers[1].port, balance="roundrobin")
    with fwd.running():
        for _ in range(5):
            assert echo_through(fwd) == b"ping"
    assert sum(server.accepted for server in echo_servers) == 5
    assert fwd.targets is not None and fwd.targets[1].connect_failures == 1  # tried once, then down


def test_leastconn_sends_a_new_connection_to_the_target_with_the_fewest_open(
        echo_servers: List[EchoServer]) -> None:
    fwd = several(echo_servers[0].port, echo_servers[1].port, balance="leastconn")
    with fwd.running():
        held = [socket.create_connection(fwd.address, timeout=WAIT) for _ in range(3)]
        try:
            wait_for(lambda: [target.active for target in fwd.targets or ()] == [2, 1], what="2 and 1 open")
            held.pop(0).close()  # on the first target
            wait_for(lambda: [target.active for target in fwd.targets or ()] == [1, 1], what="1 and 1 open")
            held.append(socket.create_connection(fwd.address, timeout=WAIT))  # a tie: the one chosen longest ago
            wait_for(lambda: [target.active for target in fwd.targets or ()] == [1, 2], what="1 and 2 open")
            held.append(socket.create_connection(fwd.address, timeout=WAIT))
            wait_for(lambda: [target.active for target in fwd.targets or ()] == [2, 2], what="2 and 2 open")
        finally:
            for client in held:
                client.close()
        wait_for(lambda: not fwd.connections, what="the pairs to close")
        assert [target.active for target in fwd.targets or ()] == [0, 0]
    assert [server.accepted for server in echo_servers[:2]] == [3, 2]


def test_leastconn_spreads_sequential_short_connections_over_every_target(echo_servers: List[EchoServer]) -> None:
    """Each finds every count at 0: the tie goes round, as HAProxy's and nginx's do."""
    fwd = several(*(server.port for server in echo_servers), balance="leastconn")
    with fwd.running():
        for _ in range(9):
            assert echo_through(fwd) == b"ping"
            wait_for(lambda: not fwd.connections, what="the pair to close")
    assert [server.accepted for server in echo_servers] == [3, 3, 3]


def test_a_pair_closed_while_connecting_leaves_its_target_s_count(blackhole: int) -> None:
    """The choice is not told of a close mid-connect (a cut, a drain's end); the target's open count is
    right all the same, and the target is not counted as failed."""
    fwd = several(blackhole, dead_port(), connect_timeout=WAIT, balance="leastconn")
    with fwd.running():
        client = socket.create_connection(fwd.address, timeout=WAIT)
        with client:
            wait_for(lambda: fwd.targets is not None and fwd.targets[0].active == 1, what="the connect to start")
            calls = LoopCalls.of(fwd._map)
            assert calls is not None
            calls.call(lambda: [conn.close_early("cut for the test") for conn in list(fwd.connections)])
            assert states(fwd) == [(True, 0, 0), (True, 0, 0)]


# -- the close line, the library --------------------------------------------------------


def test_the_close_line_names_the_target_that_served_as_configured(
        echo_server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncore_fwd")
    fwd = Forwarder(LOCAL, 0, LOCAL, dead_port(), targets=[("localhost", echo_server.port)], map={})
    with fwd.running():
        assert echo_through(fwd) == b"ping"
        wait_for(lambda: not fwd.connections, what="the pair to close")
    (close,) = [record for record in caplog.records if getattr(record, "event", None) == "close"]
    assert f" -> localhost:{echo_server.port} " in close.getMessage()
    assert close.details["target"] == f"localhost:{echo_server.port}"  # type: ignore[attr-defined]


def connect_at_once(sender: Sender, address: Tuple[str, int]) -> None:
    """``Sender.connect`` as a loopback connect may go on BSD and macOS: the connect event
    comes inside ``connect()`` (a refusal raises)."""
    sender.connected, sender.connecting = False, True
    sender.socket.setblocking(True)
    try:
        sender.socket.connect(address)
    finally:
        sender.socket.setblocking(False)
    sender.addr = address
    sender.handle_connect_event()


def test_a_connect_that_completes_at_once_still_names_its_target(
        echo_servers: List[EchoServer], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Sender, "connect", connect_at_once)
    fwd = several(echo_servers[0].port, echo_servers[1].port, balance="roundrobin")
    with fwd.running():
        for server in echo_servers[:2]:
            with socket.create_connection(fwd.address, timeout=WAIT):
                wait_for(lambda: any(conn.established for conn in fwd.connections), what="the connect")
                (conn,) = fwd.connections
                assert conn.target == f"{LOCAL}:{server.port}"  # the target set was told
            wait_for(lambda: not fwd.connections, what="the pair to close")


def test_a_target_event_is_a_json_line_with_rule_target_state_and_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    dead = dead_port()
    fwd = Forwarder(LOCAL, 0, LOCAL, dead, targets=[(LOCAL, dead_port())], map={}, name="pool")
    with fwd.running():
        connect_until_reset(fwd.address)
        wait_for(lambda: len(target_lines(caplog)) == 2, what="two target lines")
    record = next(record for record in caplog.records if getattr(record, "event", None) == "target")
    entry = json.loads(JsonFormatter().format(record))
    assert (entry["event"], entry["level"], entry["rule"], entry["target"], entry["state"]) == (
        "target", "info", "pool", f"{LOCAL}:{dead}", "down")
    assert entry["reason"] == "a failed connect within 10 s, the last: Connection refused"


def test_a_rule_with_one_target_has_no_target_set() -> None:
    fwd = Forwarder(LOCAL, 0, LOCAL, dead_port(), map={})
    try:
        assert fwd.targets is None and fwd.health is None
    finally:
        fwd.close()


@pytest.mark.parametrize("options, message", [
    ({"targets": [(LOCAL, 0)]}, "targets entries"),
    ({"targets": "h:1"}, "targets must be a list"),
    ({"balance": "random"}, "balance must be"),
    ({"max_fails": -1}, "max_fails must be"),
    ({"fail_timeout": 0}, "fail_timeout must be"),
    ({"health_check_interval": -1}, "health_check_interval must be"),
    ({"targets": [(LOCAL, 80)]}, "127.0.0.1:80 is listed twice"),
    ({"targets": [("h", 81), ("H", 81)]}, "H:81 is listed twice"),
])
def test_bad_target_keywords_are_a_value_error(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Forwarder(LOCAL, 0, LOCAL, 80, map={}, **options)
    with pytest.raises(ValueError, match=message):
        Rule(LOCAL, 0, LOCAL, 80, **options)


def test_rule_all_targets_lists_the_first_then_the_others() -> None:
    rule = Rule(LOCAL, 0, "a", 1, targets=[("[::1]", 2), ["b", 3]])
    assert rule.all_targets == (("a", 1), ("::1", 2), ("b", 3))
    assert rule.connect == "a:1,[::1]:2,b:3"


def test_a_target_that_is_the_listener_itself_is_refused_at_start(echo_server: EchoServer) -> None:
    port = free_port()
    with pytest.raises(OSError) as raised:
        unless_taken(lambda: Forwarder(LOCAL, port, LOCAL, echo_server.port, targets=[(LOCAL, port)], map={}))
    assert raised.value.errno == errno.ELOOP and f"cannot forward to {LOCAL}:{port}" in str(raised.value)


def test_after_its_down_time_one_more_failed_connect_marks_a_target_down_again(echo_server: EchoServer) -> None:
    """As nginx: a target back from its down time is on probation, whatever max_fails says."""
    fwd = several(dead_port(), echo_server.port, max_fails=2, fail_timeout=1.0)
    with fwd.running():
        for _ in range(2):  # both within fail_timeout
            assert echo_through(fwd) == b"ping"
        assert fwd.targets is not None and not fwd.targets[0].up
        wait_for(lambda: fwd.targets is not None and fwd.targets[0].up, what="the down time to end")
        assert echo_through(fwd) == b"ping"
        wait_for(lambda: not fwd.connections, what="the pair to close")
        assert states(fwd)[0] == (False, 0, 3)


def test_our_own_lack_of_descriptors_is_no_fault_of_the_target() -> None:
    """A connect that failed for want of a descriptor neither counts against the target nor marks it down."""
    targets = TargetSet(Rule(LOCAL, 0, LOCAL, 1, targets=[(LOCAL, 2)]), Timers())
    conn: Any = object()
    targets.started(conn, targets[0])
    targets.connect_failed(conn, targets[0], OSError(errno.EMFILE, "Too many open files"))
    assert [(target.up, target.active, target.connect_failures) for target in targets] == [(True, 0, 0)] * 2
    targets.started(conn, targets[0])
    targets.connect_failed(conn, targets[0], OSError(errno.ECONNREFUSED, "Connection refused"))
    assert [(target.up, target.active, target.connect_failures) for target in targets] == [(False, 0, 1), (True, 0, 0)]


def test_a_target_that_leads_back_to_the_forwarder_is_given_up_for_the_next(echo_server: EchoServer) -> None:
    """The loop-back guard works target by target: the connect that came back is never forwarded again."""
    fwd = several(dead_port(), dead_port(), echo_server.port)
    assert fwd.targets is not None
    fwd.targets[1].addresses._addresses = [(socket.AF_INET, fwd.address)]  # a name that resolved to us
    with fwd.running():
        assert echo_through(fwd) == b"ping"
        wait_for(lambda: not fwd.connections and not fwd.loopback.turned_back, what="the pair and the turned back")
        assert fwd.stats.accepted == 1
        assert states(fwd) == [(False, 0, 1), (False, 0, 1), (True, 0, 0)]


def test_a_connect_back_to_the_forwarder_that_completes_at_once_is_given_up_for_the_next(
        echo_server: EchoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Sender, "connect", connect_at_once)
    fwd = several(dead_port(), echo_server.port)
    assert fwd.targets is not None
    fwd.targets[0].addresses._addresses = [(socket.AF_INET, fwd.address)]  # a name that resolved to us
    with fwd.running():
        assert echo_through(fwd) == b"ping"
        wait_for(lambda: not fwd.connections and not fwd.loopback.turned_back, what="the pair and the turned back")
        assert fwd.stats.accepted == 1 and fwd.loopback.own_ends == {}
        assert states(fwd) == [(False, 0, 1), (True, 0, 0)]


def test_a_health_check_never_reaches_the_forwarder_itself(echo_server: EchoServer,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    fwd = several(echo_server.port, dead_port(), health_check_interval=0.05)
    assert fwd.targets is not None
    fwd.targets[1].addresses._addresses = [(socket.AF_INET, fwd.address)]
    with fwd.running():
        wait_for(lambda: fwd.targets is not None and not fwd.targets[1].up, what="the check to fail")
        time.sleep(0.2)  # more checks
    assert fwd.stats.accepted == 0
    assert target_lines(caplog) == [(f"{LOCAL}:{fwd.targets[1].addresses.port}", "down")]
    (line,) = [record.getMessage() for record in caplog.records if getattr(record, "event", None) == "target"]
    assert line.endswith("is down: health check failed: it leads back to this forwarder")
