"""Resets, TCP urgent data and failed connects: what each peer sees.

Every test runs under each loop (epoll, poll, select) and each relay (copy,
splice), and drives the loop a fixed number of rounds: each event must be
handled in the round in which it arrives, never left for a periodic sweep.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from typing import Any, Callable, Dict, Iterator, List

import pytest

import asyncore_fwd
from asyncore_fwd import Forwarder, Receiver
from asyncore_fwd._net import reset  # close with RST, as a crashing or aborting peer does
from asyncore_fwd._relay import _splice
from conftest import WAIT, dead_port, open_fds, recv_all, recv_until_reset, wait_for

KiB = 1024
URGENT = b"\xff"


class Relay:
    """A forwarder on its own map, a client, and (once connected) the server's socket."""

    def __init__(self, kind: str, splice: bool, sock_map: Dict[int, Any], remote_port: int = 0,
                 **options: Any) -> None:
        self.kind, self.map = kind, sock_map
        self.backend = socket.create_server(("127.0.0.1", 0))
        self.backend.settimeout(WAIT)
        self.fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", remote_port or self.backend.getsockname()[1],
                             map=sock_map, splice=splice, **options)
        self.client = socket.create_connection(self.fwd.address, timeout=WAIT)
        self.server: socket.socket | None = None

    def rounds(self, count: int, timeout: float = 0.05) -> None:
        asyncore_fwd.loop(timeout, map=self.map, count=count, kind=self.kind)

    def connect(self) -> socket.socket:
        """Accept the forwarder's connect and let it see that it is established."""
        self.rounds(1)
        self.server, _ = self.backend.accept()
        self.server.settimeout(WAIT)
        self.rounds(2)
        assert [conn.established for conn in self.fwd.connections] == [True]
        return self.server

    def read_while_relaying(self, sock: socket.socket, timeout: float = WAIT) -> bytes:
        """Read ``sock`` to EOF while the loop runs, one round at a time."""
        sock.setblocking(False)
        chunks: List[bytes] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.rounds(1, 0.01)
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
        pytest.fail(f"no EOF within {timeout} s")

    def fill_until_paused(self, sender: socket.socket, side: Callable[[], Any]) -> int:
        """Send from ``sender`` until the forwarder stops reading the ``side()`` it arrives on."""
        sender.setblocking(False)
        sent = 0
        deadline = time.monotonic() + WAIT
        while side().readable():
            assert time.monotonic() < deadline, "the side never paused"
            try:
                sent += sender.send(b"a" * 64 * KiB)
            except BlockingIOError:
                pass
            self.rounds(1, 0.01)
        return sent

    def close(self) -> None:
        for sock in (self.client, self.server, self.backend):
            if sock is not None:
                sock.close()
        self.fwd.close()


@pytest.fixture
def relay(loop_kind: str, splice: bool, sock_map: Dict[int, Any]) -> Iterator[Callable[..., Relay]]:
    made: List[Relay] = []

    def make(**options: Any) -> Relay:
        made.append(Relay(loop_kind, splice, sock_map, **options))
        return made[-1]

    yield make
    for each in made:
        each.close()


# -- resets -------------------------------------------------------------------


def test_server_reset_right_after_accepting_reaches_the_client_after_its_greeting(relay) -> None:
    """The server greets and resets before the forwarder sees the connect: greeting, then a reset."""
    pair = relay()
    pair.rounds(1)  # accept: the connect starts
    server, _ = pair.backend.accept()
    server.sendall(b"hello\n")
    reset(server)
    time.sleep(0.05)
    pair.rounds(4)
    assert recv_until_reset(pair.client) == b"hello\n"


def test_reset_arriving_with_an_urgent_byte_reaches_the_client_as_a_reset(relay) -> None:
    """Bytes, an urgent byte and a reset arrive together: all the bytes, then a reset."""
    pair = relay()
    server = pair.connect()
    server.sendall(b"a" * 100)
    server.send(b"X", socket.MSG_OOB)
    reset(server)
    time.sleep(0.1)
    pair.rounds(6)
    assert recv_until_reset(pair.client) == b"a" * 100 + b"X"


def test_urgent_byte_toward_a_server_that_reset_does_not_hide_the_reset(relay) -> None:
    """The server resets while its side is paused; an urgent byte from the client: still a reset."""
    pair = relay(high_water=64 * KiB)
    server = pair.connect()
    pair.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
    (conn,) = pair.fwd.connections
    pair.fill_until_paused(server, lambda: conn.sender)
    reset(server)
    pair.server = None
    time.sleep(0.1)
    pair.client.send(b"!", socket.MSG_OOB)
    time.sleep(0.1)
    pair.rounds(4)
    assert conn.closed and conn.error == "server: Connection reset by peer"
    pair.client.setblocking(True)
    recv_until_reset(pair.client)


# -- urgent data: relayed in line, once, in its place ---------------------------


def test_urgent_byte_with_data_behind_it_is_relayed_in_its_place(relay) -> None:
    """An urgent byte followed by data: every byte arrives, the urgent one in its place."""
    pair = relay()
    server = pair.connect()
    server.sendall(b"a" * 100)
    time.sleep(0.05)
    pair.rounds(3)
    server.send(b"X", socket.MSG_OOB)
    server.sendall(b"b" * 100)
    time.sleep(0.05)
    pair.rounds(3)
    server.shutdown(socket.SHUT_WR)
    pair.rounds(3)
    assert recv_all(pair.client) == b"a" * 100 + b"X" + b"b" * 100


def test_two_urgent_bytes_in_quick_succession_each_arrive_once_in_place(relay, splice: bool) -> None:
    """The second urgent byte comes before the reads reach the first: neither is lost, moved or doubled."""
    # A small read size (or pipe) makes a read stop short of the first mark.
    pair = relay(**({"high_water": 1000} if splice else {"read_size": 1000}))
    server = pair.connect()
    server.sendall(b"a" * 5000)
    server.send(URGENT, socket.MSG_OOB)
    time.sleep(0.05)
    pair.rounds(1)  # part of the a's
    server.sendall(b"b" * 10)
    server.send(URGENT, socket.MSG_OOB)
    server.sendall(b"c" * 10)
    time.sleep(0.05)
    pair.rounds(20)
    server.shutdown(socket.SHUT_WR)
    pair.rounds(5)
    assert recv_all(pair.client) == b"a" * 5000 + URGENT + b"b" * 10 + URGENT + b"c" * 10


def test_urgent_byte_from_a_paused_side_waits_in_place_without_spinning(relay) -> None:
    """A paused side's urgent byte: the loop keeps waiting calmly, the byte arrives in its place later."""
    pair = relay(high_water=64 * KiB)
    server = pair.connect()
    (conn,) = pair.fwd.connections
    sent = pair.fill_until_paused(pair.client, lambda: conn.receiver)
    pair.client.setblocking(True)
    pair.client.send(URGENT, socket.MSG_OOB)
    time.sleep(0.05)
    started = time.monotonic()
    pair.rounds(8, 0.05)  # nothing can move: each round should wait its whole timeout
    assert time.monotonic() - started >= 0.25, "the loop spun on the paused side's urgent byte"
    pair.client.sendall(b"b" * 1024)
    pair.client.shutdown(socket.SHUT_WR)
    data = pair.read_while_relaying(server)
    assert data.count(URGENT) == 1 and data.index(URGENT) == sent
    assert len(data) == sent + 1 + 1024


def test_urgent_byte_on_a_paused_side_is_acknowledged_once_under_asyncores_select_loop(
        sock_map: Dict[int, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncore's select loop watches writable sides for urgent data too: it must not report it every round."""
    pair = Relay("select", False, sock_map, high_water=64 * KiB)
    calls = []
    original = Receiver.handle_expt
    monkeypatch.setattr(Receiver, "handle_expt", lambda self: (calls.append(1), original(self)))
    try:
        pair.connect()
        (conn,) = pair.fwd.connections
        pair.fill_until_paused(pair.client, lambda: conn.receiver)
        conn.receiver.outgoing += b"y" * (4 << 20)  # keeps the client side writable
        pair.client.send(URGENT, socket.MSG_OOB)
        time.sleep(0.05)
        for _ in range(20):
            asyncore_fwd._compat.asyncore.loop(timeout=0.01, use_poll=False, map=sock_map, count=1)
        assert 1 <= len(calls) <= 2
    finally:
        pair.close()


# -- failed connects -------------------------------------------------------------


@pytest.mark.parametrize("client_sent", [False, True], ids=["client-silent", "client-sent-data"])
def test_client_is_reset_when_the_server_cannot_be_reached(relay, client_sent: bool) -> None:
    """A refused connect resets the client, whether or not it had sent anything."""
    pair = relay(remote_port=dead_port())
    if client_sent:
        pair.client.sendall(b"request")
        time.sleep(0.05)
    pair.rounds(5)
    assert not pair.fwd.connections
    assert recv_until_reset(pair.client) == b""


# -- splice: descriptors for the pipes are taken at accept -----------------------


def test_splice_out_of_descriptors_for_pipes_refuses_the_new_client_and_spares_live_ones(
        loop_kind: str, sock_map: Dict[int, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """EMFILE making a new client's pipes: that client is reset, accepting pauses, live pairs relay on."""
    if not _splice.AVAILABLE:
        pytest.skip("no os.splice() on this platform")
    pair = Relay(loop_kind, True, sock_map)
    try:
        server = pair.connect()
        pair.client.sendall(b"q" * 64 * KiB)
        got = bytearray()
        deadline = time.monotonic() + WAIT
        server.setblocking(False)
        while len(got) < 64 * KiB and time.monotonic() < deadline:
            pair.rounds(1, 0.01)
            try:
                got += server.recv(1 << 20)
            except BlockingIOError:
                pass
        assert bytes(got) == b"q" * 64 * KiB

        def no_descriptors(flags: int) -> None:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(_splice.os, "pipe2", no_descriptors)
        before = open_fds()
        late = socket.create_connection(pair.fwd.address, timeout=WAIT)
        pair.rounds(2)
        assert len(pair.fwd.connections) == 1 and pair.fwd.accept_paused
        assert recv_until_reset(late) == b""
        late.close()
        monkeypatch.undo()
        server.setblocking(True)
        server.sendall(b"reply")  # the direction that has not relayed yet
        server.shutdown(socket.SHUT_WR)
        pair.rounds(3)
        assert recv_all(pair.client) == b"reply"
        wait_for(lambda: open_fds() <= before, what="no descriptor left behind")
    finally:
        pair.close()


def test_many_clients_of_a_server_that_resets_at_once_all_end_promptly(start_forwarder, scripted_server) -> None:
    """Resets racing the connect event (one in a few dozen lands between two SO_ERROR reads): no pair hangs."""
    resetter = scripted_server(lambda conn: conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                           struct.pack("ii", 1, 0)))
    fwd = start_forwarder(resetter.port)
    for _ in range(400):
        try:
            with socket.create_connection(fwd.address, timeout=WAIT) as client:
                client.settimeout(2)
                while client.recv(100):
                    pass
        except socket.timeout:
            pytest.fail("a client waited 2 s: its pair hangs")
        except OSError:
            pass  # the reset (possibly before connect() returned)
    wait_for(lambda: not fwd.forwarder.connections, timeout=2, what="every pair to close")
