"""Addresses: IPv4 and IPv6 on either side, hostnames resolved off the loop, port 0, checked rules."""

from __future__ import annotations

import errno
import logging
import math
import socket
import threading
from typing import Callable, Iterator, List

import pytest

from asyncore_fwd import Forwarder, Rule, _net
from conftest import (
    WAIT,
    EchoServer,
    RunningForwarder,
    ScriptedServer,
    connect_until_reset,
    dead_port,
    free_port,
    needs_ipv6,
    open_fds,
    payload,
    recv_all,
    recv_exactly,
    unless_taken,
    wait_for,
)

MiB = 1024 * 1024


@pytest.fixture
def echo_server6() -> Iterator[EchoServer]:
    server = EchoServer("::1")
    yield server
    server.close()


def _round_trip(address: tuple, data: bytes) -> bytes:
    """Send ``data`` and EOF to ``address`` from a thread; return all that comes back before EOF."""
    with socket.create_connection(address, timeout=WAIT) as client:
        def send() -> None:
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            return recv_all(client)
        finally:
            sender.join(WAIT)


def _echoes(fwd: RunningForwarder, message: bytes = b"hello over the forwarder") -> None:
    with fwd.connect() as client:
        client.sendall(message)
        assert recv_exactly(client, len(message)) == message


def _warnings(caplog: pytest.LogCaptureFixture) -> List[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def _join_resolver_threads() -> None:
    """Wait for background lookups to finish, so none outlives the test's fake resolver."""
    for thread in threading.enumerate():
        if thread.name.startswith("asyncore_fwd"):
            thread.join(WAIT)
            assert not thread.is_alive(), "a lookup thread did not finish"


class FakeResolver:
    """``socket.getaddrinfo`` for one made-up name: answers 127.0.0.1, or blocks, or fails.

    Lookups of other names, and numeric-only lookups, go to the real resolver.
    """

    name = "slow.test"

    def __init__(self, port: int) -> None:
        self.port = port
        self.real = socket.getaddrinfo
        self.answer = threading.Event()  # cleared: lookups block until it is set
        self.answer.set()
        self.fail = False
        self.started = 0
        self.finished = 0
        self.blocked = threading.Event()

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        if host != self.name or flags & socket.AI_NUMERICHOST:
            return self.real(host, port, family, type, proto, flags)
        self.started += 1
        try:
            if not self.answer.is_set():
                self.blocked.set()
                self.answer.wait(WAIT)
            if self.fail:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", self.port))]
        finally:
            self.finished += 1


@pytest.fixture
def fake_resolver(monkeypatch: pytest.MonkeyPatch, echo_server: EchoServer) -> Iterator[FakeResolver]:
    """Resolves ``slow.test`` to the echo server; refreshes it on every connection."""
    resolver = FakeResolver(echo_server.port)
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    monkeypatch.setattr(_net, "RESOLVE_INTERVAL", 0.0)
    yield resolver
    resolver.answer.set()
    _join_resolver_threads()


@needs_ipv6
def test_ipv6_client_reaches_ipv4_server(
        start_forwarder: Callable[..., RunningForwarder], echo_server: EchoServer) -> None:
    """A client on ::1 is forwarded to a server on 127.0.0.1, 1 MiB intact."""
    fwd = start_forwarder(echo_server.port, local_host="::1")
    data = payload(MiB)
    assert _round_trip(fwd.address, data) == data


@needs_ipv6
def test_ipv4_client_reaches_ipv6_server(
        start_forwarder: Callable[..., RunningForwarder], echo_server6: EchoServer) -> None:
    """A client on 127.0.0.1 is forwarded to a server on ::1, 1 MiB intact."""
    fwd = start_forwarder(echo_server6.port, remote_host="::1")
    data = payload(MiB)
    assert _round_trip(fwd.address, data) == data


@needs_ipv6
def test_ipv6_client_reaches_ipv6_server(
        start_forwarder: Callable[..., RunningForwarder], echo_server6: EchoServer) -> None:
    """IPv6 on both sides, 1 MiB intact."""
    fwd = start_forwarder(echo_server6.port, remote_host="::1", local_host="::1")
    data = payload(MiB)
    assert _round_trip(fwd.address, data) == data


@needs_ipv6
def test_address_is_the_ipv6_address_listened_on(
        start_forwarder: Callable[..., RunningForwarder], echo_server: EchoServer) -> None:
    """Listening on ::1, ``address`` is ("::1", the bound port)."""
    fwd = start_forwarder(echo_server.port, local_host="::1")
    assert fwd.forwarder.address == ("::1", fwd.port)
    assert fwd.port != 0


@needs_ipv6
def test_bracketed_ipv6_hosts_are_accepted(
        start_forwarder: Callable[..., RunningForwarder], echo_server6: EchoServer) -> None:
    """The bracketed form "[::1]" works as the local and as the remote host, as in ``-l [::1]``."""
    fwd = start_forwarder(echo_server6.port, remote_host="[::1]", local_host="[::1]")
    assert fwd.forwarder.address == ("::1", fwd.port)
    assert fwd.forwarder.rule.remote == f"[::1]:{echo_server6.port}"
    _echoes(fwd)


def test_remote_hostname_is_resolved(
        start_forwarder: Callable[..., RunningForwarder], echo_server: EchoServer) -> None:
    """The remote may be a hostname: "localhost" reaches the server."""
    fwd = start_forwarder(echo_server.port, remote_host="localhost")
    _echoes(fwd)


def test_connect_falls_back_to_the_next_address(
        start_forwarder: Callable[..., RunningForwarder], echo_server: EchoServer) -> None:
    """When the remote's first address refuses, the next one is tried and the client is served."""
    dead = dead_port()
    fwd = start_forwarder(echo_server.port)
    fwd.forwarder._remote._addresses = [(socket.AF_INET, ("127.0.0.1", dead)),
                                        (socket.AF_INET, ("127.0.0.1", echo_server.port))]
    _echoes(fwd)


def test_all_addresses_refused_closes_the_client_with_one_warning(
        start_forwarder: Callable[..., RunningForwarder], caplog: pytest.LogCaptureFixture) -> None:
    """No address answers: the client gets a reset and one plain warning names the remote."""
    dead = dead_port()
    fwd = start_forwarder(dead)
    fwd.forwarder._remote._addresses = [(socket.AF_INET, ("127.0.0.1", dead)),
                                        (socket.AF_INET, ("127.0.0.1", dead_port()))]
    assert connect_until_reset(fwd.address) == b""
    wait_for(lambda: _warnings(caplog), what="the warning")
    fwd.stop()
    records = _warnings(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert records[0].levelno == logging.WARNING and records[0].exc_info is None
    assert "cannot connect" in message and f"127.0.0.1:{dead}" in message
    assert "Connection refused" in message and "\n" not in message


def test_slow_lookup_never_stalls_connections(
        start_forwarder: Callable[..., RunningForwarder], fake_resolver: FakeResolver) -> None:
    """A refresh of the remote's name runs off the loop: clients are served while it hangs."""
    fwd = start_forwarder(fake_resolver.port, remote_host=fake_resolver.name)
    assert fake_resolver.finished == 1  # the lookup at start
    fake_resolver.answer.clear()
    _echoes(fwd)  # starts a refresh, which hangs
    wait_for(fake_resolver.blocked.is_set, what="a refresh to start")
    for _ in range(5):
        _echoes(fwd)
    assert (fake_resolver.started, fake_resolver.finished) == (2, 1)  # still hanging, not repeated
    fake_resolver.answer.set()
    wait_for(lambda: fake_resolver.finished == 2, what="the refresh to finish")
    _echoes(fwd)


def test_failed_lookup_keeps_the_old_addresses(
        start_forwarder: Callable[..., RunningForwarder], fake_resolver: FakeResolver,
        caplog: pytest.LogCaptureFixture) -> None:
    """A refresh that fails is logged, and clients keep being served at the old addresses."""
    fwd = start_forwarder(fake_resolver.port, remote_host=fake_resolver.name)
    fake_resolver.fail = True
    _echoes(fwd)  # starts a refresh, which fails
    wait_for(lambda: _warnings(caplog), what="the failed refresh to be logged")
    message = _warnings(caplog)[0].getMessage()
    assert "keeping the old addresses" in message and fake_resolver.name in message
    for _ in range(3):
        _echoes(fwd)
    fwd.stop()
    _join_resolver_threads()
    assert all(r.exc_info is None and "keeping the old addresses" in r.getMessage()
               for r in _warnings(caplog))


def test_refresh_that_cannot_start_a_thread_is_retried_later(
        start_forwarder: Callable[..., RunningForwarder], fake_resolver: FakeResolver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No thread to spare for a refresh: the client is still served and a later connection refreshes."""
    fwd = start_forwarder(fake_resolver.port, remote_host=fake_resolver.name)
    real_start = threading.Thread.start
    refused = [0]

    def start(thread: threading.Thread) -> None:
        if thread.name.startswith("asyncore_fwd") and not refused[0]:
            refused[0] += 1
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    _echoes(fwd)
    assert refused[0] == 1
    _echoes(fwd)
    wait_for(lambda: fake_resolver.finished == 2, what="a refresh after the failed one")


def test_unknown_remote_host_raises_naming_it(monkeypatch: pytest.MonkeyPatch, sock_map: dict) -> None:
    """An unknown remote host fails at construction, with its name in the error and nothing left open."""
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        if host == "no-such-host.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    before = open_fds()
    with pytest.raises(OSError, match="no-such-host.test"):
        Forwarder("127.0.0.1", 0, "no-such-host.test", 80, map=sock_map)
    assert open_fds() == before
    assert sock_map == {}


def test_port_in_use_raises_naming_the_address(sock_map: dict) -> None:
    """Listening on a port already in use fails with the address in the error and nothing left open."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        before = open_fds()
        with pytest.raises(OSError, match=f"127.0.0.1:{port}") as raised:
            Forwarder("127.0.0.1", port, "127.0.0.1", 80, map=sock_map)
        assert open_fds() == before
    assert raised.value.errno == errno.EADDRINUSE
    assert sock_map == {}


@pytest.mark.parametrize("local_host, remote_host", [
    ("127.0.0.1", "127.0.0.1"),
    ("0.0.0.0", "127.0.0.1"),
    pytest.param("::", "127.0.0.1", marks=needs_ipv6, id="dual-stack-wildcard"),
    pytest.param("::1", "::1", marks=needs_ipv6, id="ipv6"),
    pytest.param("127.0.0.1", "::ffff:127.0.0.1", marks=needs_ipv6, id="ipv4-mapped"),
])
def test_forwarding_to_its_own_listening_address_is_refused(
        local_host: str, remote_host: str, sock_map: dict) -> None:
    """A remote that is the forwarder itself would connect to itself until descriptors run out."""
    def forwarder_to_itself() -> Forwarder:
        port = free_port()
        return Forwarder(local_host, port, remote_host, port, map=sock_map)

    before = open_fds()
    with pytest.raises(OSError, match="own listening address") as raised:
        unless_taken(forwarder_to_itself)
    assert raised.value.errno == errno.ELOOP
    assert open_fds() == before
    assert sock_map == {}


def test_an_address_of_the_remote_that_leads_back_is_skipped_for_the_next(
        start_forwarder: Callable[..., RunningForwarder], echo_server: EchoServer) -> None:
    """A name may resolve to this forwarder and to a server: the connect that comes back is turned away."""
    fwd = start_forwarder(echo_server.port)
    fwd.forwarder._remote._addresses = [(socket.AF_INET, ("127.0.0.1", fwd.port)),
                                        (socket.AF_INET, ("127.0.0.1", echo_server.port))]
    _echoes(fwd)
    assert len(fwd.forwarder.connections) == 1
    assert fwd.forwarder.loopback.own_ends == {}
    wait_for(lambda: not fwd.forwarder.loopback.turned_back, what="the connect that led back to be reset")
    assert fwd.forwarder.stats.accepted == 1


def test_a_burst_of_clients_skips_the_address_that_leads_back(
        start_forwarder: Callable[..., RunningForwarder], echo_server: EchoServer, loop_kind: str) -> None:
    """More clients wait than one accept round takes: each still falls through to the next address."""
    if loop_kind == "select":
        pytest.skip("select() cannot watch the 1000-odd descriptors of 300 such clients")
    fwd = start_forwarder(echo_server.port)
    fwd.forwarder._remote._addresses = [(socket.AF_INET, ("127.0.0.1", fwd.port)),
                                        (socket.AF_INET, ("127.0.0.1", echo_server.port))]
    clients = [socket.create_connection(fwd.address, timeout=WAIT) for _ in range(300)]
    try:
        for number, client in enumerate(clients):
            client.sendall(bytes([number % 256]))
        assert [recv_exactly(client, 1) for client in clients] == [bytes([n % 256]) for n in range(300)]
        assert fwd.forwarder.stats.accepted == 300
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("remote_host", ["127.0.0.1", "0.0.0.0"])
def test_a_remote_that_only_leads_back_resets_the_client_once(
        start_forwarder: Callable[..., RunningForwarder], echo_server: EchoServer, remote_host: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """Every address leads back (0.0.0.0 is this host too): the client is reset, with no chain of connects."""
    caplog.set_level(logging.WARNING, logger="asyncore_fwd")
    fwd = start_forwarder(echo_server.port)
    fwd.forwarder._remote._addresses = [(socket.AF_INET, (remote_host, fwd.port))]
    assert connect_until_reset(fwd.address) == b""
    wait_for(lambda: _warnings(caplog), what="the close line")
    wait_for(lambda: not fwd.forwarder.connections, what="the pair to close")
    fwd.stop()
    [line] = [r.getMessage() for r in _warnings(caplog)]
    assert "it leads back to this forwarder" in line
    assert fwd.forwarder.stats.accepted == 1  # the connect that came back was not forwarded again


def test_same_port_on_another_loopback_address_is_not_itself(
        scripted_server: Callable[..., ScriptedServer]) -> None:
    """127.0.0.2 is another address: a server there on the same port is forwarded to."""
    def forwarder_to_the_same_port() -> RunningForwarder:
        port = scripted_server(lambda conn: conn.sendall(b"hello"), host="127.0.0.2").address[1]
        return RunningForwarder("127.0.0.1", port, "127.0.0.2", port)

    fwd = unless_taken(forwarder_to_the_same_port)
    try:
        with fwd.connect() as client:
            assert recv_exactly(client, 5) == b"hello"
    finally:
        fwd.stop()


def test_forwarder_answers_whether_a_connect_leads_back_to_it(sock_map: dict, echo_server: EchoServer) -> None:
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map=sock_map)
    try:
        assert fwd.leads_back_here(fwd.address)
        assert not fwd.leads_back_here(("127.0.0.1", echo_server.port))
        fwd.turn_back(("127.0.0.1", 40000), fwd.address)
        assert (("127.0.0.1", 40000), fwd.address) in fwd.loopback.turned_back
    finally:
        fwd.close()


def test_port_zero_binds_a_free_port(
        start_forwarder: Callable[..., RunningForwarder], echo_server: EchoServer) -> None:
    """Port 0 binds some free port, reported by ``address``, that clients can use."""
    fwd = start_forwarder(echo_server.port)
    assert fwd.forwarder.rule.local_port == 0
    assert fwd.forwarder.address[1] != 0
    _echoes(fwd)


@pytest.mark.parametrize("field, value", [
    ("local_port", -1),
    ("local_port", 65536),
    ("local_port", "80"),
    ("local_port", True),
    ("remote_port", 0),
    ("remote_port", 65536),
    ("remote_port", "80"),
    ("backlog", -1),
    ("connect_timeout", 0),
    ("connect_timeout", -1),
    ("connect_timeout", math.inf),
    ("connect_timeout", math.nan),
    ("high_water", 0),
    ("read_size", 0),
])
def test_rule_rejects_bad_values_naming_them(field: str, value: object) -> None:
    """A bad port, backlog, timeout or size raises ValueError showing the bad value."""
    options = dict(local_host="127.0.0.1", local_port=0, remote_host="127.0.0.1", remote_port=80)
    options[field] = value
    with pytest.raises(ValueError) as raised:
        Rule(**options)
    assert repr(value) in str(raised.value)
