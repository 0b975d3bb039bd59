"""Service: many rules on one loop; stop, drain and reload."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable, Iterator, List, Optional, Set, Tuple

import pytest

from asyncore_fwd import Forwarder, Rule, Service
from asyncore_fwd._compat import asyncore
from asyncore_fwd._net import SPLICE_AVAILABLE
from asyncore_fwd._ops._stats import RuleStats
from asyncore_fwd._service import _service
from asyncore_fwd.toxics import Latency
from conftest import (
    WAIT,
    DatagramEcho,
    EchoServer,
    LoopBreaker,
    free_port,
    recv_all,
    recv_exactly,
    recv_until_reset,
    select_limit_reached,
    unless_taken,
    wait_for,
)


class RunningService:
    """A Service served by a thread until ``stop()``."""

    def __init__(self, rules, loop: str) -> None:
        self.service = Service(rules)
        self.thread = threading.Thread(target=self.service.serve_forever,
                                       kwargs={"poll_interval": 0.05, "loop": loop}, daemon=True)
        self.thread.start()

    def address(self, label: str) -> Tuple[str, int]:
        return self.service.forwarders[label].address

    def connect(self, label: str) -> socket.socket:
        return socket.create_connection(self.address(label), timeout=WAIT)

    def stop(self) -> None:
        self.service.stop()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "serve_forever did not return after stop()"


@pytest.fixture
def start_service(loop_kind: str) -> Iterator[Callable[..., RunningService]]:
    """``start_service(rules)`` runs a Service in a thread, once per loop kind."""
    running: List[RunningService] = []

    def start(rules) -> RunningService:
        service = RunningService(rules, loop_kind)
        running.append(service)
        return service

    yield start
    for service in running:
        service.stop()


@pytest.fixture
def second_echo_server() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def rule(name: str, target_port: int, **options) -> Rule:
    return Rule("127.0.0.1", 0, "127.0.0.1", target_port, name=name, **options)


def round_trip(client: socket.socket, data: bytes = b"ping") -> None:
    client.sendall(data)
    assert recv_exactly(client, len(data)) == data


def refuses(address: Tuple[str, int]) -> bool:
    """True if nothing listens at ``address`` any more."""
    try:
        socket.create_connection(address, timeout=WAIT).close()
    except (ConnectionRefusedError, ConnectionResetError):  # reset: queued as the listener closed
        return True
    return False


def events(caplog: pytest.LogCaptureFixture, name: str) -> List[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


# -- start and stop --------------------------------------------------------------


def test_each_rule_forwards_to_its_own_target(start_service, echo_server, second_echo_server) -> None:
    running = start_service([rule("one", echo_server.port), rule("two", second_echo_server.port)])
    for label in ("one", "two"):
        with running.connect(label) as client:
            round_trip(client)
    assert echo_server.accepted == second_echo_server.accepted == 1


def test_start_logs_one_start_event_per_rule(echo_server, caplog) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    service = Service([rule("one", echo_server.port), rule("two", echo_server.port)])
    service.close()
    assert [r.details["rule"] for r in events(caplog, "start")] == ["one", "two"]
    assert events(caplog, "start")[0].details["target"] == f"127.0.0.1:{echo_server.port}"


def test_port_in_use_fails_at_once_and_leaves_nothing_open(echo_server) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        sock_map: dict = {}
        with pytest.raises(OSError, match="cannot listen on 127.0.0.1:"):
            Service([rule("fine", echo_server.port), Rule("127.0.0.1", taken.getsockname()[1], "127.0.0.1",
                                                          echo_server.port)], map=sock_map)
        assert sock_map == {}


@pytest.mark.skipif(not SPLICE_AVAILABLE, reason="needs os.splice")
def test_toxics_a_rule_cannot_take_fail_the_start_and_leave_nothing_open(echo_server) -> None:
    port = free_port()
    with pytest.raises(ValueError, match="toxics need the copy relay"):
        Service([Rule("127.0.0.1", port, "127.0.0.1", echo_server.port, splice=True)], map={},
                toxics=[(Latency(0.1), "both")])
    socket.create_server(("127.0.0.1", port)).close()  # nothing listens there any more


def test_two_rules_with_one_name_are_refused(echo_server) -> None:
    with pytest.raises(ValueError, match="two rules are named 'same'"):
        Service([rule("same", echo_server.port), rule("same", echo_server.port)])


def test_stop_closes_listeners_and_resets_open_connections_on_both_sides(start_service, watching_server,
                                                                          caplog) -> None:
    """stop() with a connection open: both its peers see a reset, as at the drain timeout, never an EOF."""
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    running = start_service([rule("one", watching_server.port)])
    address = running.address("one")
    client = running.connect("one")
    round_trip(client)
    running.stop()
    assert running.service.map == {}
    with client:
        recv_until_reset(client)
    wait_for(lambda: watching_server.ends, what="the server to see the end")
    assert watching_server.ends == ["reset"]
    assert refuses(address)
    (cut,) = [r for r in events(caplog, "drain") if "cut" in r.details]
    assert cut.getMessage() == "stopped: cut 1 connections"
    (closed,) = events(caplog, "close")
    assert closed.details["reason"] == "stopped" and closed.details["closed_first"] == "forwarder"


def test_an_error_that_ends_the_loop_resets_open_connections_on_both_sides(loop_kind, watching_server,
                                                                           caplog) -> None:
    """An exception out of serve_forever: first every open connection is reset on both sides."""
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    service = Service([rule("one", watching_server.port)])
    breaker = LoopBreaker(service.map, lambda: service.serve_forever(poll_interval=0.05, loop=loop_kind),
                          service.stop)
    try:
        with socket.create_connection(service.forwarders["one"].address, timeout=WAIT) as client:
            round_trip(client)
            breaker.fire()
            recv_until_reset(client)
        assert isinstance(breaker.error(), KeyboardInterrupt)
        wait_for(lambda: watching_server.ends, what="the server to see the end")
        assert watching_server.ends == ["reset"]
        (closed,) = events(caplog, "close")
        assert closed.details["reason"] == "stopped by an error"
    finally:
        breaker.close()


# -- drain ------------------------------------------------------------------------


def test_transfer_completes_during_a_drain(start_service, echo_server) -> None:
    running = start_service([rule("one", echo_server.port)])
    address = running.address("one")
    client = running.connect("one")
    round_trip(client)
    running.service.drain(WAIT)
    wait_for(lambda: refuses(address), what="the listener to close")
    with client:
        round_trip(client, b"after the drain started")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
    running.thread.join(WAIT)
    assert not running.thread.is_alive(), "serve_forever did not return once drained"


def test_drain_timeout_cuts_what_is_left_and_logs_how_many(start_service, echo_server, caplog) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    running = start_service([rule("one", echo_server.port)])
    client = running.connect("one")
    round_trip(client)
    started = time.monotonic()
    running.service.drain(0.3)
    with client:
        recv_until_reset(client)  # cut with a reset: the stream did not end cleanly
    assert time.monotonic() - started >= 0.25
    running.thread.join(WAIT)
    assert not running.thread.is_alive()
    (cut,) = [r for r in events(caplog, "drain") if "cut" in r.details]
    assert cut.details["cut"] == 1 and "cut 1 connections" in cut.getMessage()
    (closed,) = events(caplog, "close")
    assert closed.details["reason"] == "drain timeout" and closed.details["closed_first"] == "forwarder"


def test_drain_with_no_connection_returns_at_once(start_service, echo_server) -> None:
    running = start_service([rule("one", echo_server.port)])
    running.service.drain(WAIT)
    running.thread.join(WAIT / 2)
    assert not running.thread.is_alive()


# -- reload -----------------------------------------------------------------------


def test_reload_adds_removes_and_changes_rules_while_an_unchanged_one_flows(
        start_service, echo_server, second_echo_server, caplog) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    running = start_service([rule("kept", echo_server.port), rule("removed", echo_server.port),
                             rule("changed", echo_server.port)])
    service = running.service
    kept = running.connect("kept")
    round_trip(kept)
    kept_forwarder, removed_address = service.forwarders["kept"], running.address("removed")
    removed_forwarder, changed_address = service.forwarders["removed"], running.address("changed")
    service.reload([rule("kept", echo_server.port), rule("changed", second_echo_server.port),
                    rule("added", second_echo_server.port)])
    wait_for(lambda: events(caplog, "reload"), what="the reload")
    assert sorted(service.forwarders) == ["added", "changed", "kept"]
    assert service.forwarders["kept"] is kept_forwarder
    with kept:
        round_trip(kept, b"still flowing")
    assert removed_forwarder not in service.map.values() and removed_forwarder.socket.fileno() == -1
    if running.address("added") != removed_address:  # the kernel may give the freed port to the added rule
        assert refuses(removed_address)
    assert running.address("changed") == changed_address  # the same listening socket
    for label in ("changed", "added"):
        with running.connect(label) as client:
            round_trip(client)
    assert second_echo_server.accepted == 2  # the changed rule now goes to the new target
    (record,) = events(caplog, "reload")
    assert {kind: record.details[kind] for kind in ("added", "removed", "changed", "unchanged", "failed")} == {
        "added": ["added"], "removed": ["removed"], "changed": ["changed"], "unchanged": ["kept"], "failed": []}


def test_connection_of_a_changed_rule_keeps_its_old_target(start_service, echo_server, second_echo_server) -> None:
    running = start_service([rule("changed", echo_server.port)])
    old = running.connect("changed")
    round_trip(old)
    running.service.reload([rule("changed", second_echo_server.port)])
    wait_for(lambda: running.service.retiring, what="the old forwarder to retire")
    with old:
        round_trip(old, b"old settings")
    with running.connect("changed") as new:
        round_trip(new)
    assert (echo_server.accepted, second_echo_server.accepted) == (1, 1)
    stats = running.service.stats()["changed"]
    assert stats["accepted"] == 2  # one rule, counted across the reload


def test_connection_of_a_removed_rule_drains(start_service, echo_server) -> None:
    running = start_service([rule("removed", echo_server.port), rule("other", echo_server.port)])
    client = running.connect("removed")
    round_trip(client)
    running.service.reload([rule("other", echo_server.port)])
    wait_for(lambda: "removed" not in running.service.forwarders, what="the reload")
    with client:
        round_trip(client, b"draining")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
    wait_for(lambda: not running.service.retiring, what="the removed rule to be forgotten")


def test_rule_matched_by_listen_when_unnamed(echo_server, second_echo_server) -> None:
    service = unless_taken(lambda: Service([Rule("127.0.0.1", free_port(), "127.0.0.1", echo_server.port)]))
    port = next(iter(service.forwarders.values())).address[1]
    try:
        service.reload([Rule("127.0.0.1", port, "127.0.0.1", second_echo_server.port, name="named now")])
        assert list(service.forwarders) == ["named now"]
        assert service.forwarders["named now"].address[1] == port
    finally:
        service.close()


def test_reload_with_a_port_that_cannot_be_bound_keeps_the_rest(start_service, echo_server, caplog) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    running = start_service([rule("kept", echo_server.port)])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bad = Rule("127.0.0.1", taken.getsockname()[1], "127.0.0.1", echo_server.port, name="bad")
        running.service.reload([rule("kept", echo_server.port), bad, rule("added", echo_server.port)])
        wait_for(lambda: [r for r in events(caplog, "reload") if "failed" in r.details], what="the reload")
    (failure,) = [r for r in events(caplog, "reload") if "error" in r.details]
    assert failure.levelno == logging.ERROR and failure.details["rule"] == "bad"
    assert sorted(running.service.forwarders) == ["added", "kept"]
    for label in ("kept", "added"):
        with running.connect(label) as client:
            round_trip(client)


def test_changed_rule_that_cannot_bind_its_new_port_keeps_serving_the_old_one(start_service, echo_server,
                                                                             caplog) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    running = start_service([rule("moved", echo_server.port)])
    old_address = running.address("moved")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        moved = Rule("127.0.0.1", taken.getsockname()[1], "127.0.0.1", echo_server.port, name="moved")
        running.service.reload([moved])
        wait_for(lambda: [r for r in events(caplog, "reload") if "failed" in r.details], what="the reload")
    assert running.service.forwarders["moved"].address == old_address
    with socket.create_connection(old_address, timeout=WAIT) as client:
        round_trip(client)


def test_changed_rule_that_would_forward_to_itself_keeps_serving_the_old_one(start_service, echo_server,
                                                                             caplog) -> None:
    """A reload that points a rule at its own port fails for that rule; its port keeps serving the old target."""
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    running = unless_taken(lambda: start_service([Rule("127.0.0.1", free_port(), "127.0.0.1", echo_server.port,
                                                       name="looped")]))
    port = running.address("looped")[1]
    running.service.reload([Rule("127.0.0.1", port, "127.0.0.1", port, name="looped")])
    wait_for(lambda: [r for r in events(caplog, "reload") if "failed" in r.details], what="the reload")
    (failure,) = [r for r in events(caplog, "reload") if "error" in r.details]
    assert "own listening address" in failure.details["error"]
    assert running.service.forwarders["looped"].rule.remote_port == echo_server.port
    with running.connect("looped") as client:
        round_trip(client)


def test_rules_of_a_service_share_one_read_buffer(echo_server, second_echo_server) -> None:
    """Every forwarder of a Service reads into the same memory: one buffer, not one per rule."""
    service = Service([Rule("127.0.0.1", 0, "127.0.0.1", echo_server.port, name="a"),
                       Rule("127.0.0.1", 0, "127.0.0.1", second_echo_server.port, name="b")])
    try:
        first, second = (fwd.scratch for fwd in service.forwarders.values())
        first[0] = 0x2A
        assert second[0] == 0x2A
    finally:
        service.close()


def test_rule_whose_start_raises_anything_fails_alone_and_serving_goes_on(start_service, echo_server, caplog,
                                                                          monkeypatch) -> None:
    """Not only OSError: whatever starting a reloaded rule raises is logged for that rule; the loop goes on."""
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    running = start_service([rule("kept", echo_server.port)])
    start = Service._start

    def failing_start(self: Service, new: Rule, **takeover) -> object:
        if new.name == "bad":
            raise RuntimeError("unforeseen")
        return start(self, new, **takeover)

    monkeypatch.setattr(Service, "_start", failing_start)
    running.service.reload([rule("kept", echo_server.port), rule("bad", echo_server.port),
                            rule("added", echo_server.port)])
    wait_for(lambda: [r for r in events(caplog, "reload") if "failed" in r.details], what="the reload")
    (failure,) = [r for r in events(caplog, "reload") if "error" in r.details]
    assert failure.details == {"rule": "bad", "error": "unforeseen"}
    assert running.thread.is_alive()
    assert sorted(running.service.forwarders) == ["added", "kept"]
    with running.connect("added") as client:
        round_trip(client)


def test_reload_under_select_refuses_a_listener_past_its_descriptor_limit(echo_server, caplog) -> None:
    """Under select(), a rule whose listening socket lands past descriptor 1023 fails to start
    (logged, not reported as added); it does not listen deaf while clients queue in its backlog."""
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    running = RunningService([rule("kept", echo_server.port)], "select")
    try:
        with select_limit_reached(spare=0):
            running.service.reload([rule("kept", echo_server.port), rule("late", echo_server.port)])
            wait_for(lambda: [r for r in events(caplog, "reload") if "failed" in r.details], what="the reload")
        (failure,) = [r for r in events(caplog, "reload") if "error" in r.details]
        assert failure.details["rule"] == "late" and "select() cannot watch descriptor" in failure.details["error"]
        assert sorted(running.service.forwarders) == ["kept"]
        with running.connect("kept") as client:
            round_trip(client)
    finally:
        running.stop()


def test_reload_that_raises_is_logged_and_the_running_rules_stay(start_service, echo_server, caplog,
                                                                 monkeypatch) -> None:
    """A reload that fails as a whole cannot unwind serve_forever: logged, the old rules serve on."""
    running = start_service([rule("kept", echo_server.port)])

    def failing_apply(self: Service, rules: List[Rule]) -> None:
        raise RuntimeError("unforeseen")

    monkeypatch.setattr(Service, "_apply", failing_apply)
    running.service.reload([rule("other", echo_server.port)])
    wait_for(lambda: events(caplog, "reload"), what="the reload")
    (failure,) = events(caplog, "reload")
    assert failure.levelno == logging.ERROR and failure.exc_info is not None
    assert running.thread.is_alive()
    with running.connect("kept") as client:
        round_trip(client)


# -- the listeners the service runs: made by listener_for, used through Listener ----


def test_forwarder_takes_back_the_listener_it_released_and_serves_the_client_queued_meanwhile(
        echo_server) -> None:
    """``release_listener`` then ``take_over``: the port never closes, a client queued in between is served."""
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={})
    listener = fwd.release_listener()
    with socket.create_connection(fwd.address, timeout=WAIT) as client:  # in the backlog, not refused
        fwd.take_over(listener)
        with fwd.running():
            round_trip(client)


class DatagramListener(DatagramEcho):
    """A listener of another kind than a TCP forwarder, as a UDP rule's would be (it only echoes):
    the service reaches it through ``listener_for`` and uses only what ``Listener`` names."""

    def __init__(self, rule: Rule, map: dict, stats: Optional[RuleStats] = None,
                 listener: Optional[socket.socket] = None) -> None:
        super().__init__(map=map)
        self.rule, self.label = rule, rule.name
        self.stats = stats if stats is not None else RuleStats()
        self.connections: Set[object] = set()
        self.closed_with: List[str] = []
        if listener is not None:
            self.take_over(listener)
        else:
            self.create_socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.bind((rule.local_host, rule.local_port))
        self.address = self.socket.getsockname()

    def handle_error(self) -> None:
        raise

    def stop_accepting(self) -> None:
        asyncore.dispatcher.close(self)

    def release_listener(self) -> socket.socket:
        listener = self.socket
        self.del_channel()
        self.socket = None
        return listener

    def take_over(self, listener: socket.socket) -> None:
        self.set_socket(listener)

    def close(self, reason: str = "stopped") -> None:
        self.closed_with.append(reason)
        self.stop_accepting()


def datagram_round_trip(address: Tuple[str, int], data: bytes = b"ping") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(WAIT)
        client.sendto(data, address)
        assert client.recv(2048) == data


def test_service_runs_a_listener_of_another_kind_through_listener_for(echo_server, monkeypatch) -> None:
    """A kind of listener the service does not know (here, for rules named udp-*) is started,
    counted, changed by a reload on the same port, and closed, next to the TCP rules."""
    tcp_listener_for = _service.listener_for

    def listener_for(rule: Rule, map: dict, *, scratch: memoryview, toxics=(), stats=None, listener=None):
        if rule.name.startswith("udp-"):
            return DatagramListener(rule, map, stats=stats, listener=listener)
        return tcp_listener_for(rule, map, scratch=scratch, toxics=toxics, stats=stats, listener=listener)

    monkeypatch.setattr(_service, "listener_for", listener_for)
    running = RunningService([rule("tcp", echo_server.port), rule("udp-echo", 7)], "auto")
    try:
        first = running.service.forwarders["udp-echo"]
        assert isinstance(first, DatagramListener)
        datagram_round_trip(first.address)
        with running.connect("tcp") as client:
            round_trip(client)
        assert running.service.stats()["udp-echo"]["accepted"] == 0
        running.service.reload([rule("tcp", echo_server.port), rule("udp-echo", 9)])  # a new target
        wait_for(lambda: running.service.forwarders["udp-echo"] is not first, what="the reload")
        second = running.service.forwarders["udp-echo"]
        assert (second.address, second.rule.remote_port, second.stats) == (first.address, 9, first.stats)
        assert first.closed_with == ["stopped"]  # retired with no connection left: closed at once
        datagram_round_trip(second.address)
    finally:
        running.stop()
    assert second.closed_with == ["stopped"]
