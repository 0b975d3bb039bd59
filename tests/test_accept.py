"""Accept robustness: the listener survives whatever accept() throws at it.

The article's ``conn, addr = self.accept()`` dies when asyncore's accept()
returns None, and an accept error (EMFILE above all) kills its listener or
makes it spin.  Here accept() returning None, transient accept errors and
running out of descriptors must all leave the listener open and serving.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time
from typing import Callable, Dict, Iterator, List

import pytest

from asyncore_fwd import Forwarder
from asyncore_fwd._compat import asyncore
from asyncore_fwd._listener import _forwarder
from conftest import (
    WAIT,
    EchoServer,
    RunningForwarder,
    descriptors_exhausted,
    open_fds,
    recv_exactly,
    recv_until_reset,
    select_limit_reached,
    wait_for,
)


def _echoes(fwd: RunningForwarder, message: bytes = b"ping through the forwarder") -> None:
    """One client through ``fwd`` gets its message echoed back."""
    with fwd.connect() as client:
        client.sendall(message)
        assert recv_exactly(client, len(message)) == message


def _count_calls(obj: object, name: str) -> List[int]:
    """Wrap ``obj.name`` so that each call is counted in the returned one-item list."""
    original = getattr(obj, name)
    calls = [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(obj, name, counted)
    return calls


def _pump(channels: Dict[int, object], rounds: int) -> None:
    for _ in range(rounds):
        asyncore.loop(timeout=0.01, count=1, use_poll=True, map=channels)


def _pump_until(channels: Dict[int, object], predicate: Callable[[], object], what: str) -> None:
    """Run the loop one round at a time until ``predicate`` holds (bounded by WAIT)."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT} s waiting for {what}")
        asyncore.loop(timeout=0.01, count=1, use_poll=True, map=channels)


def _pump_echoes(channels: Dict[int, object], clients: List[socket.socket]) -> None:
    """Each client sends a distinct message; pump until every one is echoed back."""
    messages = [f"client {i} says hello".encode() for i in range(len(clients))]
    received = [bytearray() for _ in clients]
    for client, message in zip(clients, messages):
        client.sendall(message)
        client.setblocking(False)

    def all_echoed() -> bool:
        for client, message, got in zip(clients, messages, received):
            if len(got) < len(message):
                try:
                    chunk = client.recv(4096)
                except BlockingIOError:
                    continue
                if not chunk:
                    pytest.fail(f"EOF after {bytes(got)!r}, expected {message!r}")
                got += chunk
        return all(len(got) >= len(message) for got, message in zip(received, messages))

    _pump_until(channels, all_echoed, "the echoes")
    assert [bytes(got) for got in received] == messages


@contextlib.contextmanager
def _connected_clients(address: tuple, count: int) -> Iterator[List[socket.socket]]:
    """``count`` clients connected to ``address`` (waiting in its backlog), closed on exit."""
    clients: List[socket.socket] = []
    try:
        for _ in range(count):
            clients.append(socket.create_connection(address, timeout=WAIT))
        yield clients
    finally:
        for client in clients:
            client.close()


def _connect_until_reset(client: socket.socket, address: tuple) -> bytes:
    """``conftest.connect_until_reset`` with a socket made beforehand."""
    client.settimeout(WAIT)
    try:
        client.connect(address)
    except ConnectionResetError:  # on loopback the reset may come before connect() returns
        return b""
    return recv_until_reset(client)


def _accept_queue_length(port: int) -> int:
    """Connections waiting in the backlog of the IPv4 listener on ``port`` (Linux)."""
    with open("/proc/net/tcp") as table:
        for line in table:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # 0A: LISTEN
                return int(fields[4].split(":")[1], 16)
    return 0


class _FailingAccept:
    """Stands in for the listening socket: the first accept() fails with ``code``."""

    def __init__(self, sock: socket.socket, code: int) -> None:
        self._sock = sock
        self._code = code
        self.failures = 0

    def accept(self):
        if not self.failures:
            self.failures += 1
            raise OSError(self._code, os.strerror(self._code))
        return self._sock.accept()

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


def test_accept_returning_none_keeps_the_listener_serving(
        start_forwarder: Callable[..., RunningForwarder], echo_server: EchoServer,
        caplog: pytest.LogCaptureFixture) -> None:
    """accept() returning None (the client already left) is ignored: no error, the next client is served."""
    fwd = start_forwarder(echo_server.port)
    listener = fwd.forwarder
    real_accept = listener.accept
    nones = [0]

    def accept_once_none():
        if not nones[0]:
            nones[0] += 1
            return None
        return real_accept()

    listener.accept = accept_once_none
    try:
        _echoes(fwd)
    finally:
        del listener.accept
    assert nones[0] == 1
    assert listener.accepting and listener in listener._map.values()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("code", [errno.ECONNABORTED, errno.EPROTO, errno.EPERM],
                         ids=errno.errorcode.get)
def test_transient_accept_error_keeps_the_listener_serving(
        start_forwarder: Callable[..., RunningForwarder], echo_server: EchoServer,
        caplog: pytest.LogCaptureFixture, code: int) -> None:
    """A client-specific accept() error logs at most one plain warning line; the next client is served."""
    fwd = start_forwarder(echo_server.port)
    listener = fwd.forwarder
    real_socket = listener.socket
    failing = _FailingAccept(real_socket, code)
    listener.socket = failing
    try:
        _echoes(fwd)
    finally:
        listener.socket = real_socket
    assert failing.failures == 1
    assert listener.accepting and listener in listener._map.values()
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(problems) <= 1, [r.getMessage() for r in problems]
    for record in problems:
        assert record.levelno == logging.WARNING
        assert record.exc_info is None
        assert "\n" not in record.getMessage()


def test_out_of_descriptors_pauses_accepting_instead_of_spinning(
        echo_server: EchoServer, sock_map: dict, caplog: pytest.LogCaptureFixture) -> None:
    """With no descriptor free, accept is retried once per ACCEPT_PAUSE, not every round."""
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map=sock_map)
    calls = _count_calls(fwd, "handle_accept")
    rounds = 100
    with _connected_clients(fwd.address, 4):
        with descriptors_exhausted(spare=0):
            started = time.monotonic()
            _pump(sock_map, rounds)
            elapsed = time.monotonic() - started
        accepted = len(fwd.connections)
    pauses = [r for r in caplog.records if "not accepting" in r.getMessage()]
    # A spinning listener would be called every round (~100 times); a paused one
    # at most once per pause, however slow the machine made the rounds.
    assert 1 <= calls[0] <= elapsed / _forwarder.ACCEPT_PAUSE + 2, (calls[0], elapsed)
    assert pauses
    for record in pauses:
        assert record.levelno == logging.WARNING and record.exc_info is None
        assert "Too many open files" in record.getMessage()
    assert accepted == 0


def test_out_of_descriptors_logs_the_first_pause_then_one_summary_per_interval(
        echo_server: EchoServer, sock_map: dict, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Pause after pause, the log gets one line, then one line per PAUSE_LOG_INTERVAL counting the others."""
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    monkeypatch.setattr(_forwarder, "ACCEPT_PAUSE", 0.01)
    monkeypatch.setattr(_forwarder, "PAUSE_LOG_INTERVAL", 0.25)
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map=sock_map)
    calls = _count_calls(fwd, "handle_accept")
    with _connected_clients(fwd.address, 4):
        with descriptors_exhausted(spare=0):
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                _pump(sock_map, 1)
        fwd.close()  # sums up the pauses not logged yet
    lines = [r for r in caplog.records if "not accepting on" in r.getMessage()]
    assert calls[0] >= 20, calls[0]  # paused (and accepted again) many times
    first, *summaries = lines
    assert "suppressed" not in first.details
    assert 1 <= len(summaries) <= 1.0 / 0.25 + 2, [r.getMessage() for r in lines]
    assert all("Too many open files" in r.getMessage() and r.levelno == logging.WARNING for r in lines)
    # Every pause is told: the first one, and the others in the summaries' counts.
    assert 1 + sum(r.details["suppressed"] for r in summaries) == calls[0]
    resumes = [r for r in caplog.records if "accepting connections again" in r.getMessage()]
    assert len(resumes) <= len(lines)


def test_accepting_resumes_by_itself_when_descriptors_free_up(
        echo_server: EchoServer, sock_map: dict, caplog: pytest.LogCaptureFixture) -> None:
    """After a pause for EMFILE, clients queued meanwhile are served once descriptors are free again."""
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map=sock_map)
    calls = _count_calls(fwd, "handle_accept")
    with _connected_clients(fwd.address, 4) as clients:
        with descriptors_exhausted(spare=0):
            _pump_until(sock_map, lambda: calls[0], "an accept attempt")
        assert any("not accepting" in r.getMessage() for r in caplog.records)
        assert not fwd.connections
        _pump_echoes(sock_map, clients)
        assert len(fwd.connections) == len(clients)
    assert fwd.accepting and fwd in sock_map.values()
    assert any("accepting connections again" in r.getMessage() for r in caplog.records)


def test_out_of_descriptors_for_the_server_socket_closes_that_client_without_leaking(
        echo_server: EchoServer, sock_map: dict, caplog: pytest.LogCaptureFixture) -> None:
    """EMFILE on the server-side socket resets the client just accepted, pauses, and leaks no descriptor."""
    caplog.set_level(logging.DEBUG, logger="asyncore_fwd")
    start = open_fds()
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map=sock_map)
    calls = _count_calls(fwd, "handle_accept")
    with _connected_clients(fwd.address, 3) as clients:
        with descriptors_exhausted(spare=1):  # room for the accepted client, not for its server
            _pump_until(sock_map, lambda: calls[0], "an accept attempt")
        assert list(sock_map.values()) == [fwd]  # the half-made pair left the map
        assert not fwd.connections
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings  # the pause's: its summaries would tell the next ones
        assert "not accepting" in warnings[0] and "Too many open files" in warnings[0]
        (closed,) = [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "close"]
        assert "cannot connect" in closed and "Too many open files" in closed
        assert recv_until_reset(clients[0]) == b""  # the backlog is first in, first out
        _pump_echoes(sock_map, clients[1:])
    _pump_until(sock_map, lambda: not fwd.connections, "the connections to close")
    fwd.close()
    wait_for(lambda: open_fds() == start, what=f"descriptors back to {start} (now {open_fds()})")


def test_one_readiness_event_accepts_several_waiting_clients(
        echo_server: EchoServer, sock_map: dict) -> None:
    """One loop round takes every client waiting in the backlog, not one per round."""
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, backlog=16, map=sock_map)
    with _connected_clients(fwd.address, 10):
        wait_for(lambda: _accept_queue_length(fwd.address[1]) == 10, what="10 clients in the backlog")
        asyncore.loop(timeout=WAIT, count=1, use_poll=True, map=sock_map)
        assert len(fwd.connections) == 10
        assert _accept_queue_length(fwd.address[1]) == 0


def test_select_loop_resets_a_client_past_its_descriptor_limit_and_keeps_serving(
        echo_server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    """Under select(), a client whose socket lands past descriptor 1023 is reset and accepting
    pauses, as when descriptors run out; the loop goes on, and so do the open connections."""
    fwd = RunningForwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, loop="select")
    try:
        with fwd.connect() as first:
            first.sendall(b"one")
            assert recv_exactly(first, 3) == b"one"
            with socket.socket() as late, select_limit_reached(spare=0):  # made first: its fd is low
                assert _connect_until_reset(late, fwd.address) == b""
                first.sendall(b"two")
                assert recv_exactly(first, 3) == b"two"
            assert fwd.thread.is_alive()
        assert echo_server.accepted == 1  # the late client's server was never connected
    finally:
        fwd.stop()
    (pause,) = [r.getMessage() for r in caplog.records if "not accepting on" in r.getMessage()]
    assert "select() cannot watch descriptor" in pause, pause


def test_select_loop_resets_a_client_whose_server_socket_lands_past_its_descriptor_limit(
        echo_server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    """Under select(), a server socket past descriptor 1023 is given up before it connects:
    the client is reset and accepting pauses, as when descriptors run out."""
    caplog.set_level(logging.DEBUG, logger="asyncore_fwd")
    fwd = RunningForwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, loop="select")
    try:
        with socket.socket() as client, select_limit_reached(spare=1):  # the spare is the accepted client's
            assert _connect_until_reset(client, fwd.address) == b""
        assert fwd.thread.is_alive()
        assert echo_server.accepted == 0
        wait_for(lambda: not fwd.forwarder.connections, what="the connection to close")
    finally:
        fwd.stop()
    (pause,) = [r.getMessage() for r in caplog.records if "not accepting on" in r.getMessage()]
    assert "select() cannot watch descriptor" in pause, pause
    (closed,) = [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "close"]
    assert "cannot connect" in closed and "select() cannot watch descriptor" in closed, closed
