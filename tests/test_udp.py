"""UDP rules with real sockets: sessions, whole datagrams, expiry, limits, lists, floods, ICMP errors, balance."""

from __future__ import annotations

import logging
import random
import socket
import time
from typing import Dict, Iterator, List

import pytest
from udp_helpers import RunningUdp, UdpEcho, ask, client, free_udp_port, no_reply, own_ipv4, own_ipv6, udp_rule

from asyncore_fwd import Forwarder, Rule, Service
from asyncore_fwd._listener import _udp
from asyncore_fwd._net import RemoteAddresses
from conftest import dead_udp_port, needs_dual_stack, needs_ipv6, open_fds, payload, wait_for


@pytest.fixture
def udp_echo() -> Iterator[UdpEcho]:
    server = UdpEcho()
    yield server
    server.close()


@pytest.fixture
def running() -> Iterator[List[RunningUdp]]:
    """Services to stop at teardown."""
    services: List[RunningUdp] = []
    yield services
    for service in services:
        service.stop()


def start(running: List[RunningUdp], *rules: Rule, loop: str = "auto") -> RunningUdp:
    service = RunningUdp(list(rules), loop)
    running.append(service)
    return service


# -- the relay ------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["epoll", "poll", "select"])
def test_hundreds_of_clients_each_get_exactly_their_own_replies_whole_from_the_address_they_sent_to(
        loop: str, udp_echo: UdpEcho, running: List[RunningUdp]) -> None:
    """200 clients, 3 datagrams each of random sizes: every reply whole, in order, to its own client,
    from the listening address."""
    service = start(running, udp_rule("dns", udp_echo.port), loop=loop)
    address = service.address("dns")
    rng = random.Random(17)
    clients = [client() for _ in range(200)]
    sent: Dict[int, List[bytes]] = {}
    try:
        for round_ in range(3):
            for index, sock in enumerate(clients):
                data = bytes([index % 256, round_]) + payload(rng.randrange(0, 3000))
                sent.setdefault(index, []).append(data)
                sock.sendto(data, address)
            for index, sock in enumerate(clients):  # each waits for its reply before its next datagram
                reply, sender = sock.recvfrom(65535)
                assert reply == sent[index][round_]
                assert sender[:2] == address
        assert service.stats("dns")["active"] == 200
        wait_for(lambda: service.stats("dns")["datagrams_to_client"] == 600, what="the last reply counted")
        counters = service.stats("dns")
        assert counters["datagrams_to_server"] == counters["datagrams_to_client"] == 600
        assert counters["bytes_to_server"] == counters["bytes_to_client"] == sum(map(len, sum(sent.values(), [])))
    finally:
        for sock in clients:
            sock.close()


def test_empty_and_65507_byte_datagrams_pass_whole(udp_echo: UdpEcho, running: List[RunningUdp]) -> None:
    service = start(running, udp_rule("u", udp_echo.port))
    with client() as sock:
        for size in (0, 1, 65507, 0):
            reply, sender = ask(sock, service.address("u"), payload(size))
            assert (len(reply), reply, sender) == (size, payload(size), service.address("u"))


@needs_ipv6
def test_an_ipv6_listener_forwards_to_an_ipv6_target(running: List[RunningUdp]) -> None:
    echo = UdpEcho("::1")
    try:
        service = start(running, Rule("::1", 0, "::1", echo.port, name="v6", proto="udp"))
        with client(socket.AF_INET6, "::1") as sock:
            assert ask(sock, service.address("v6"), b"six") == (b"six", service.address("v6"))
    finally:
        echo.close()


@needs_dual_stack
def test_a_dual_stack_listener_answers_an_ipv4_client_from_the_address_it_sent_to(
        udp_echo: UdpEcho, running: List[RunningUdp]) -> None:
    service = start(running, Rule("::", 0, "127.0.0.1", udp_echo.port, name="dual", proto="udp",
                                  allow=["127.0.0.0/8", "::1"]))
    port = service.address("dual")[1]
    with client() as sock:
        assert ask(sock, ("127.0.0.1", port), b"four") == (b"four", ("127.0.0.1", port))


def test_a_wildcard_listener_answers_each_client_from_the_address_it_sent_to(
        udp_echo: UdpEcho, running: List[RunningUdp]) -> None:
    """127.0.0.2 is this host's too (127/8 on lo): a client that sent there hears from there, not from
    the address the route back would pick (127.0.0.1)."""
    service = start(running, Rule("0.0.0.0", 0, "127.0.0.1", udp_echo.port, name="u", proto="udp"))
    port = service.address("u")[1]
    with client() as second, client() as first:
        for _ in range(2):
            assert ask(second, ("127.0.0.2", port), b"to .2") == (b"to .2", ("127.0.0.2", port))
            assert ask(first, ("127.0.0.1", port), b"to .1") == (b"to .1", ("127.0.0.1", port))


@needs_dual_stack
def test_a_dual_stack_listener_answers_an_ipv4_client_from_the_address_it_sent_to_among_several(
        udp_echo: UdpEcho, running: List[RunningUdp]) -> None:
    service = start(running, Rule("::", 0, "127.0.0.1", udp_echo.port, name="u", proto="udp"))
    port = service.address("u")[1]
    with client() as sock:
        assert ask(sock, ("127.0.0.2", port), b"mapped") == (b"mapped", ("127.0.0.2", port))


@needs_ipv6
def test_an_ipv6_wildcard_listener_answers_from_the_address_the_client_sent_to(
        udp_echo: UdpEcho, running: List[RunningUdp]) -> None:
    """A client on ::1 sending to this host's other IPv6 address hears from that one, not from ::1."""
    own = own_ipv6()
    if own is None:
        pytest.skip("no non-loopback IPv6 address")
    service = start(running, Rule("::", 0, "127.0.0.1", udp_echo.port, name="u", proto="udp"))
    port = service.address("u")[1]
    with client(socket.AF_INET6, "::1") as sock:
        assert ask(sock, (own, port), b"v6") == (b"v6", (own, port))


def test_a_session_keeps_its_client_port_at_the_target_and_each_client_has_its_own(
        udp_echo: UdpEcho, running: List[RunningUdp]) -> None:
    service = start(running, udp_rule("u", udp_echo.port))
    with client() as one, client() as two:
        for sock in (one, two, one, two):
            ask(sock, service.address("u"), b"x")
    assert len(udp_echo.peers) == 2
    assert service.stats("u")["accepted"] == 2


# -- expiry ------------------------------------------------------------------------------


def test_an_idle_session_ends_and_its_socket_is_closed(udp_echo: UdpEcho, running: List[RunningUdp],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    service = start(running, udp_rule("u", udp_echo.port, idle_timeout=1.0))  # twenty asks fit well within it
    with client() as warm_up:  # the loop is running (its own descriptors made), and one session came and went
        ask(warm_up, service.address("u"), b"up?")
    wait_for(lambda: service.stats("u")["active"] == 0, what="the first session to idle out")
    caplog.set_level(logging.DEBUG, logger="asyncore_fwd")
    before = open_fds()
    clients = [client() for _ in range(20)]
    try:
        for sock in clients:
            ask(sock, service.address("u"), b"ping")
        assert open_fds() == before + 40  # each client's socket, and its session's
        wait_for(lambda: service.stats("u")["active"] == 0, what="the sessions to idle out")
        assert open_fds() == before + 20
    finally:
        for sock in clients:
            sock.close()
    ends = [record for record in caplog.records if getattr(record, "event", None) == "close"]
    assert len(ends) == 20
    assert ends[0].details["reason"] == "idle"
    assert (ends[0].details["datagrams_to_server"], ends[0].details["bytes_to_client"]) == (1, 4)
    assert " udp 4/4 bytes 1/1 datagrams " in ends[0].getMessage()


def test_many_sessions_idling_out_at_once_end_over_several_rounds(
        udp_echo: UdpEcho, running: List[RunningUdp], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_udp, "EXPIRIES_PER_ROUND", 3)
    service = start(running, udp_rule("u", udp_echo.port, idle_timeout=0.2))
    clients = [client() for _ in range(10)]
    try:
        for sock in clients:
            ask(sock, service.address("u"), b"x")
        wait_for(lambda: service.stats("u")["active"] == 0, what="every session to idle out")
    finally:
        for sock in clients:
            sock.close()


def test_a_session_active_either_way_does_not_idle_out(udp_echo: UdpEcho, running: List[RunningUdp]) -> None:
    service = start(running, udp_rule("u", udp_echo.port, idle_timeout=1.0))
    with client() as sock:
        for _ in range(16):  # 1.6 s in all, longer than the timeout; 0.1 s gaps, far shorter
            ask(sock, service.address("u"), b"still here")
            time.sleep(0.1)
        assert service.stats("u")["accepted"] == 1
        assert service.stats("u")["active"] == 1


def test_a_read_event_with_no_reply_leaves_the_session_in_its_place_for_expiry(
        udp_echo: UdpEcho, running: List[RunningUdp]) -> None:
    """A wake-up of a session's socket that reads nothing is no activity: the sweep's order stays."""
    service = start(running, udp_rule("u", udp_echo.port))
    with client() as older, client() as newer:
        ask(older, service.address("u"), b"1")
        ask(newer, service.address("u"), b"2")
        wait_for(lambda: service.stats("u")["datagrams_to_client"] == 2, what="the loop done with the replies")
        listener = service.listener("u")
        first, second = list(listener.sessions.values())
        first.handle_read()  # (from this thread: nothing waits on its socket, the loop's reads are done)
        assert list(listener.sessions.values()) == [first, second]


def test_a_udp_rule_idle_timeout_of_0_is_60_seconds() -> None:
    assert Rule("127.0.0.1", 0, "127.0.0.1", 53, proto="udp").idle_timeout == 60
    assert Rule("127.0.0.1", 0, "127.0.0.1", 53, proto="udp", idle_timeout=0).idle_timeout == 60
    assert Rule("127.0.0.1", 0, "127.0.0.1", 53, proto="udp", idle_timeout=5).idle_timeout == 5
    assert Rule("127.0.0.1", 0, "127.0.0.1", 53).idle_timeout == 0


# -- limits and lists ---------------------------------------------------------------------


def test_the_datagram_that_would_start_one_session_too_many_is_dropped_counted_and_logged(
        udp_echo: UdpEcho, running: List[RunningUdp], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    service = start(running, udp_rule("u", udp_echo.port, max_connections=2))
    with client() as one, client() as two, client() as three:
        ask(one, service.address("u"), b"1")
        ask(two, service.address("u"), b"2")
        for _ in range(3):
            three.sendto(b"3", service.address("u"))
        assert no_reply(three)
        assert ask(one, service.address("u"), b"still served")[0] == b"still served"
    counters = service.stats("u")
    assert (counters["active"], counters["dropped_limit"], counters["refused_limit"]) == (2, 3, 3)
    refused = [record for record in caplog.records if getattr(record, "event", None) == "refused"]
    assert len(refused) == 1 and refused[0].details["reason"] == "max_connections"


def test_max_per_client_caps_the_sessions_of_one_ip(udp_echo: UdpEcho, running: List[RunningUdp]) -> None:
    service = start(running, udp_rule("u", udp_echo.port, max_per_client=2))
    socks = [client() for _ in range(3)]
    try:
        ask(socks[0], service.address("u"), b"a")
        ask(socks[1], service.address("u"), b"b")
        socks[2].sendto(b"c", service.address("u"))
        assert no_reply(socks[2])
        wait_for(lambda: service.stats("u")["dropped_limit"] == 1, what="the drop to be counted")
    finally:
        for sock in socks:
            sock.close()


def test_deny_drops_the_datagrams_of_a_denied_source(udp_echo: UdpEcho, running: List[RunningUdp]) -> None:
    service = start(running, udp_rule("u", udp_echo.port, deny=["127.0.0.1"]))
    with client() as sock:
        sock.sendto(b"no", service.address("u"))
        assert no_reply(sock)
    wait_for(lambda: service.stats("u")["dropped_acl"] == 1, what="the drop to be counted")
    counters = service.stats("u")
    assert (counters["dropped_acl"], counters["refused_acl"], counters["accepted"], udp_echo.received) == (1, 1, 0, 0)


def test_allow_serves_the_sources_it_lists(udp_echo: UdpEcho, running: List[RunningUdp]) -> None:
    allowed = start(running, udp_rule("in", udp_echo.port, allow=["127.0.0.0/8"]))
    other = start(running, udp_rule("out", udp_echo.port, allow=["10.0.0.0/8"]))
    with client() as sock:
        assert ask(sock, allowed.address("in"), b"yes")[0] == b"yes"
        sock.sendto(b"no", other.address("out"))
        assert no_reply(sock)
    wait_for(lambda: other.stats("out")["dropped_acl"] == 1, what="the drop to be counted")


def test_a_flood_from_thousands_of_ports_stays_within_the_cap_and_a_client_is_still_served(
        udp_echo: UdpEcho, running: List[RunningUdp], caplog: pytest.LogCaptureFixture) -> None:
    """3000 source ports, 100 sessions at most: the rest dropped and counted, two log lines at most,
    descriptors bounded, and a client with a session served all along."""
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    service = start(running, udp_rule("u", udp_echo.port, max_connections=100, idle_timeout=30))
    address = service.address("u")
    with client() as legit:
        ask(legit, address, b"first")
        before = open_fds()  # the loop's, the legitimate client's socket and its session's
        for _ in range(6):  # 500 at a time: each a new source port
            flood = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(500)]
            for sock in flood:
                sock.sendto(b"\xff" * random.randrange(0, 600), address)
            for sock in flood:
                sock.close()
            assert ask(legit, address, b"still here")[0] == b"still here"
        # Each datagram is relayed or dropped (a closed socket's port may come again, to its session).
        wait_for(lambda: service.stats("u")["dropped_limit"] + service.stats("u")["datagrams_to_server"] == 3007,
                 what="every flood datagram to be read")
        assert open_fds() <= before + 99
    counters = service.stats("u")
    assert counters["active"] == counters["accepted"] == 100
    assert counters["dropped_limit"] > 2800
    refusals = [record for record in caplog.records if getattr(record, "event", None) == "refused"]
    assert 1 <= len(refusals) <= 2


# -- targets ---------------------------------------------------------------------------------


def test_an_icmp_error_marks_the_target_down_and_the_clients_next_datagram_goes_to_another(
        udp_echo: UdpEcho, running: List[RunningUdp], caplog: pytest.LogCaptureFixture) -> None:
    """A closed target port: ECONNREFUSED on the session's socket counts as a failed connect and marks
    the target down; that session ends, so the client's retry starts one on the next target."""
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    dead = dead_udp_port()
    service = start(running, udp_rule("u", dead, targets=[("127.0.0.1", udp_echo.port)], max_fails=1))
    with client() as first, client() as second:
        first.sendto(b"anyone?", service.address("u"))
        wait_for(lambda: service.stats("u")["failed_connects"] >= 1, what="the ICMP error")
        assert ask(first, service.address("u"), b"again")[0] == b"again"
        assert ask(second, service.address("u"), b"hello")[0] == b"hello"
        targets = service.service.target_stats()["u"]
        assert targets[f"127.0.0.1:{dead}"]["up"] == 0
        assert targets[f"127.0.0.1:{dead}"]["connect_failures"] >= 1
        assert (targets[f"127.0.0.1:{dead}"]["active"], targets[f"127.0.0.1:{udp_echo.port}"]["active"]) == (0, 2)
        assert (service.stats("u")["active"], service.stats("u")["accepted"]) == (2, 3)
    assert any(getattr(record, "event", None) == "target" and record.details["state"] == "down"
               for record in caplog.records)


def test_a_steady_client_leaves_a_target_marked_down_for_a_live_one(
        udp_echo: UdpEcho, running: List[RunningUdp]) -> None:
    """A client retrying every 0.2 s, never quiet for idle_timeout: its session on the dead first
    target ends once that is down, and a retry is answered by the other."""
    dead = dead_udp_port()
    service = start(running, udp_rule("u", dead, targets=[("127.0.0.1", udp_echo.port)], balance="first",
                                      max_fails=1, fail_timeout=30, idle_timeout=5))
    with client() as sock:
        replies = 0
        for _ in range(10):
            sock.sendto(b"retry", service.address("u"))
            replies += not no_reply(sock, 0.2)
        assert replies >= 8


def test_a_session_whose_only_target_refuses_before_any_reply_ends(running: List[RunningUdp]) -> None:
    """No reply yet and no other address: the session ends at the ICMP error, not at its idle timeout."""
    service = start(running, udp_rule("u", dead_udp_port(), idle_timeout=60))
    with client() as sock:
        sock.sendto(b"anyone?", service.address("u"))
        wait_for(lambda: service.stats("u")["failed_connects"] == 1, what="the ICMP error")
        wait_for(lambda: service.stats("u")["active"] == 0, what="the session to end")
        assert service.stats("u")["accepted"] == 1


@needs_ipv6
def test_a_target_name_whose_first_address_refuses_moves_the_session_to_the_next_one(
        running: List[RunningUdp], monkeypatch: pytest.MonkeyPatch) -> None:
    """"localhost" as ::1 then 127.0.0.1, the server on 127.0.0.1 only: the ICMP error from ::1 moves the
    session, the client's retry is answered, and a new client's session starts at 127.0.0.1."""
    echo = UdpEcho("127.0.0.1")
    real = socket.getaddrinfo

    def resolve(host: str, *args: object, **kwargs: object) -> list:
        if host == "dual.test":
            return real("::1", *args, **kwargs) + real("127.0.0.1", *args, **kwargs)  # type: ignore[arg-type]
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    # Held for the test, as dead_udp_port() holds its port: ::1 at the echo's port refuses datagrams.
    refusing = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        refusing.bind(("::1", echo.port))
        refusing.connect(("::1", 9))
        service = start(running, Rule("127.0.0.1", 0, "dual.test", echo.port, name="d", proto="udp",
                                      idle_timeout=30))
        with client() as first, client() as second:
            first.sendto(b"lost", service.address("d"))
            wait_for(lambda: service.stats("d")["failed_connects"] == 1, what="the ICMP error from ::1")
            assert ask(first, service.address("d"), b"retry") == (b"retry", service.address("d"))
            assert ask(second, service.address("d"), b"new") == (b"new", service.address("d"))
        assert service.stats("d")["failed_connects"] == 1
        assert {session.server_address[0] for session in service.listener("d").sessions.values()} == {"127.0.0.1"}
    finally:
        refusing.close()
        echo.close()


def test_a_target_that_never_answers_leaves_sessions_that_idle_out(udp_echo: UdpEcho,
                                                                  running: List[RunningUdp]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never read
        silent.bind(("127.0.0.1", 0))
        service = start(running, udp_rule("mute", silent.getsockname()[1], idle_timeout=0.3),
                        udp_rule("echo", udp_echo.port))
        with client() as sock:
            for _ in range(50):
                sock.sendto(b"hello?", service.address("mute"))
            assert no_reply(sock)
            assert ask(sock, service.address("echo"), b"other rule")[0] == b"other rule"
            wait_for(lambda: service.stats("mute")["active"] == 0, what="the session to idle out")
        assert service.stats("mute")["datagrams_to_server"] == 50


def test_roundrobin_spreads_the_sessions_over_the_targets(running: List[RunningUdp]) -> None:
    echoes = [UdpEcho(), UdpEcho()]
    try:
        service = start(running, udp_rule("u", echoes[0].port, targets=[("127.0.0.1", echoes[1].port)],
                                          balance="roundrobin"))
        socks = [client() for _ in range(6)]
        for sock in socks:
            for _ in range(2):  # a session stays on its target
                ask(sock, service.address("u"), b"rr")
        assert [len(echo.peers) for echo in echoes] == [3, 3]
        for sock in socks:
            sock.close()
    finally:
        for echo in echoes:
            echo.close()


def test_a_target_that_is_the_listener_itself_is_refused_at_start() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(OSError, match="this forwarder's own listening address"):
        Service([Rule("127.0.0.1", port, "127.0.0.1", port, proto="udp")])


def test_a_target_on_this_hosts_own_address_and_the_listeners_port_is_refused_at_start() -> None:
    """A wildcard listener receives on every address of the host: a target there is the listener itself."""
    own = own_ipv4()
    if own is None:
        pytest.skip("no non-loopback IPv4 address")
    port = free_udp_port()
    with pytest.raises(OSError, match="this forwarder's own listening address"):
        Service([Rule("0.0.0.0", port, own, port, proto="udp")], map={})


def test_with_reuse_port_a_loopback_target_on_the_listeners_port_is_refused_at_start() -> None:
    """The port's other sockets are this forwarder's own workers: the datagrams would come back here."""
    port = free_udp_port()
    with pytest.raises(OSError, match="this forwarder's own listening address"):
        Service([Rule("0.0.0.0", port, "127.0.0.1", port, proto="udp", reuse_port=True)], map={})


@needs_ipv6
def test_an_address_of_the_target_that_is_this_host_on_the_listeners_port_is_skipped(
        running: List[RunningUdp], monkeypatch: pytest.MonkeyPatch) -> None:
    """A name with this host's own address and another: the session skips the one that leads back
    here, and the client's datagram makes one session, not a table full."""
    own = own_ipv4()
    if own is None:
        pytest.skip("no non-loopback IPv4 address")
    port = free_udp_port()
    echo = UdpEcho("::1", port)
    real = socket.getaddrinfo

    def resolve(host: str, *args: object, **kwargs: object) -> list:
        if host == "both.test":
            return real(own, *args, **kwargs) + real("::1", *args, **kwargs)  # type: ignore[arg-type]
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    try:
        service = start(running, Rule("0.0.0.0", port, "both.test", port, name="u", proto="udp",
                                      max_connections=50))
        with client() as sock:
            assert ask(sock, ("127.0.0.1", port), b"once")[0] == b"once"
        assert service.stats("u")["accepted"] == 1
        assert [session.server_address[0] for session in service.listener("u").sessions.values()] == ["::1"]
    finally:
        echo.close()


def test_a_datagram_whose_forged_source_is_this_hosts_own_address_and_port_starts_no_session(
        udp_echo: UdpEcho) -> None:
    """On a wildcard listener, (own address, its port) is the listener: the reply would come back here."""
    own = own_ipv4()
    if own is None:
        pytest.skip("no non-loopback IPv4 address")
    service = Service([Rule("0.0.0.0", 0, "127.0.0.1", udp_echo.port, name="u", proto="udp")], map={})
    try:
        listener = service.forwarders["u"]
        assert listener._start_session((own, listener.address[1]), time.monotonic()) is None
        assert service.stats()["u"]["dropped_acl"] == 1
    finally:
        service.close()


def test_a_datagram_from_a_sessions_own_end_starts_no_session(udp_echo: UdpEcho) -> None:
    """A session sending to the listener's port elsewhere (127.0.0.2 here) whose datagram comes back to
    the listener (a redirect): it is ours, not a new client."""
    service = Service([Rule("127.0.0.1", 0, "127.0.0.1", udp_echo.port, name="u", proto="udp")], map={})
    try:
        listener = service.forwarders["u"]
        listener.paths._remote = RemoteAddresses("127.0.0.2", listener.address[1])  # its port elsewhere
        session = listener._start_session(("127.0.0.1", 40000), time.monotonic())
        assert session is not None
        assert listener._start_session(session.socket.getsockname(), time.monotonic()) is None
        assert service.stats()["u"]["dropped_acl"] == 1
    finally:
        service.close()


def test_a_target_that_cannot_be_connected_to_counts_as_a_failed_connect(running: List[RunningUdp]) -> None:
    """A broadcast target (EACCES at the session's connect): each datagram dropped as an error and counted
    as a failed connect, as a TCP connect that no address took."""
    service = start(running, Rule("127.0.0.1", 0, "255.255.255.255", 9, name="b", proto="udp"))
    with client() as sock:
        for _ in range(3):
            sock.sendto(b"x", service.address("b"))
        wait_for(lambda: service.stats("b")["dropped_error"] == 3, what="the drops")
    assert (service.stats("b")["failed_connects"], service.stats("b")["accepted"]) == (3, 0)


def test_a_datagram_the_target_socket_cannot_take_now_is_dropped_and_counted(
        udp_echo: UdpEcho, running: List[RunningUdp]) -> None:
    """EAGAIN on the session's socket: that datagram is dropped (counted "full"), the next goes."""
    service = start(running, udp_rule("u", udp_echo.port))
    with client() as sock:
        ask(sock, service.address("u"), b"open")
        session = next(iter(service.listener("u").sessions.values()))
        real = session.socket

        class Full:
            def send(self, data: object) -> int:
                raise BlockingIOError(11, "Resource temporarily unavailable")

            def __getattr__(self, name: str) -> object:
                return getattr(real, name)

        session.socket = Full()
        sock.sendto(b"lost", service.address("u"))
        wait_for(lambda: service.stats("u")["dropped_full"] == 1, what="the drop")
        session.socket = real
        assert ask(sock, service.address("u"), b"next")[0] == b"next"


def test_a_datagram_whose_forged_source_is_the_listener_itself_starts_no_session(udp_echo: UdpEcho) -> None:
    """Answering it would send the reply to this very socket, as a new client, again and again.
    (A forged source needs raw sockets: the listener is asked directly, as its handler would.)"""
    service = Service([udp_rule("u", udp_echo.port)], map={})
    try:
        listener = service.forwarders["u"]
        assert listener._start_session(listener.address, time.monotonic()) is None
        assert listener._start_session(("127.0.0.1", listener.address[1] ^ 1), time.monotonic()) is not None
        assert (service.stats()["u"]["dropped_acl"], service.stats()["u"]["accepted"]) == (1, 1)
    finally:
        service.close()


def test_a_forwarder_refuses_a_udp_rule_and_names_service() -> None:
    with pytest.raises(ValueError, match=r"Service\(\[rule\]\)"):
        Forwarder("127.0.0.1", 0, "127.0.0.1", 53, map={}, proto="udp")


def test_a_source_address_is_where_the_target_sees_the_session_from(
        udp_echo: UdpEcho, running: List[RunningUdp]) -> None:
    service = start(running, udp_rule("u", udp_echo.port, source="127.0.0.2"))
    with client() as sock:
        assert ask(sock, service.address("u"), b"from")[0] == b"from"
    assert {host for host, _ in udp_echo.peers} == {"127.0.0.2"}

