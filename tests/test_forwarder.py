"""Relaying, closing, backpressure, connect failures and the pair's life cycle."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time

import pytest

from asyncore_fwd import Forwarder, Receiver, Sender
from asyncore_fwd._compat import asyncore
from asyncore_fwd._listener._forwarder import DEFAULT_READ_SIZE
from conftest import (
    WAIT,
    LoopBreaker,
    connect_until_reset,
    dead_port,
    open_fds,
    payload,
    recv_all,
    recv_exactly,
    recv_until_reset,
    wait_for,
)


def pump(channels: dict, until, timeout: float = WAIT, what: str = "condition") -> None:
    """Run the caller's own asyncore loop one round at a time until ``until()``."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        asyncore.loop(timeout=0.01, use_poll=True, map=channels, count=1)


def established(fwd: Forwarder, channels: dict):
    """Pump until the forwarder's one connection has its server side; return it."""
    pump(channels, lambda: any(c.established for c in fwd.connections), what="connect")
    (conn,) = fwd.connections
    return conn


def blackhole():
    """A listener whose backlog is full: further connects hang in SYN-SENT."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(8):  # fill the accept queue; the kernel then drops SYNs
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    time.sleep(0.1)
    return listener, fillers


# -- 3a: bytes, both ways ----------------------------------------------------


def test_bytes_pass_unchanged_in_both_directions(echo_server, start_forwarder) -> None:
    """4 MiB sent through the forwarder come back from the echo server intact."""
    fwd = start_forwarder(echo_server.port)
    data = payload(4 << 20)
    with fwd.connect() as client:
        sender = threading.Thread(target=lambda: (client.sendall(data), client.shutdown(socket.SHUT_WR)))
        sender.start()
        echoed = recv_all(client)
        sender.join(WAIT)
    assert echoed == data


def test_reads_are_large_and_the_send_buffer_is_consumed_in_place(echo_server, sock_map) -> None:
    """Reads ask for at least 64 KiB; a partial send trims the same bytearray."""
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map=sock_map)
    assert fwd.rule.read_size == DEFAULT_READ_SIZE >= 64 * 1024
    assert len(fwd.scratch) == fwd.rule.read_size
    client = socket.create_connection(fwd.address, timeout=WAIT)
    try:
        conn = established(fwd, sock_map)
        buffer = conn.receiver.outgoing
        buffer += b"x" * (8 << 20)  # more than the socket can take at once
        conn.receiver.handle_write()
        assert conn.receiver.outgoing is buffer
        assert 0 < len(buffer) < 8 << 20
        assert conn.receiver.bytes_sent == (8 << 20) - len(buffer)
    finally:
        client.close()


# -- 3b: no data lost at close; true half-close ------------------------------


def test_reply_is_delivered_after_client_half_closes(scripted_server, start_forwarder) -> None:
    """A client that sends, half-closes, then reads gets the whole reply."""
    reply = payload(1 << 20)

    def server(conn: socket.socket) -> None:
        assert recv_all(conn) == b"GET / HTTP/1.0\r\n\r\n"
        conn.sendall(reply)

    fwd = start_forwarder(scripted_server(server).port)
    with fwd.connect() as client:
        client.sendall(b"GET / HTTP/1.0\r\n\r\n")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == reply


def test_server_data_is_delivered_before_its_eof_to_a_slow_client(scripted_server, start_forwarder) -> None:
    """A server that sends a lot and closes at once loses nothing to a slow client."""
    data = payload(8 << 20)
    server_closed = threading.Event()

    def server(conn: socket.socket) -> None:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        server_closed.set()
        recv_all(conn)

    fwd = start_forwarder(scripted_server(server).port)
    with fwd.connect() as client:
        assert server_closed.wait(WAIT)
        time.sleep(0.2)  # let the forwarder see the server's EOF before the client reads
        assert recv_exactly(client, len(data)) == data
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""


def test_server_half_close_reaches_client_which_can_still_send(scripted_server, start_forwarder) -> None:
    """The server's FIN becomes the client's EOF while the client -> server way stays open."""
    received = []

    def server(conn: socket.socket) -> None:
        conn.sendall(b"banner\n")
        conn.shutdown(socket.SHUT_WR)
        received.append(recv_all(conn))

    server_ = scripted_server(server)
    fwd = start_forwarder(server_.port)
    with fwd.connect() as client:
        assert recv_all(client) == b"banner\n"  # EOF arrived: half-closed, not closed
        client.sendall(b"still talking")
        client.shutdown(socket.SHUT_WR)
        wait_for(lambda: received, what="the server to read the client's bytes")
    assert received == [b"still talking"]


def test_pair_closes_once_both_directions_finished(echo_server, start_forwarder) -> None:
    """After EOF both ways the pair is gone from the forwarder."""
    fwd = start_forwarder(echo_server.port)
    with fwd.connect() as client:
        client.sendall(b"ping")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"ping"
    wait_for(lambda: not fwd.forwarder.connections, what="the pair to close")


def test_side_that_saw_eof_gets_no_more_read_events(scripted_server, sock_map, monkeypatch) -> None:
    """After the client's EOF its socket is not polled for reads (no spin)."""
    release = threading.Event()

    def server(conn: socket.socket) -> None:
        recv_all(conn)
        release.wait(WAIT)  # keep the server -> client way open

    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", scripted_server(server).port, map=sock_map)
    reads = []
    original = Receiver.handle_read
    monkeypatch.setattr(Receiver, "handle_read", lambda self: (reads.append(1), original(self)))
    client = socket.create_connection(fwd.address, timeout=WAIT)
    try:
        client.sendall(b"request")
        client.shutdown(socket.SHUT_WR)
        pump(sock_map, lambda: any(c.receiver.eof_received for c in fwd.connections), what="EOF")
        (conn,) = fwd.connections
        assert not conn.receiver.readable()
        reads.clear()
        for _ in range(50):
            asyncore.loop(timeout=0.01, use_poll=True, map=sock_map, count=1)
        assert reads == []
        assert conn.sender.write_closed
    finally:
        release.set()
        client.close()


def test_poll_hangup_does_not_drop_data_still_queued(scripted_server, sock_map, monkeypatch) -> None:
    """POLLHUP with more than one read of data queued: all of it still arrives.

    The client's EOF is passed on first; then the server sends 16 MiB and
    closes, faster than the slow client lets the forwarder read.  When the
    server's FIN arrives, poll() reports POLLIN|POLLHUP while megabytes still
    wait in the kernel, and asyncore calls handle_close() after one read.
    """
    data = payload(16 << 20)

    def server(conn: socket.socket) -> None:
        assert recv_all(conn) == b"req"
        conn.sendall(data)

    hangups_with_data_left = []
    original = Sender.handle_close
    monkeypatch.setattr(Sender, "handle_close", lambda self: (
        hangups_with_data_left.append(1) if not self.eof_received else None, original(self)))
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", scripted_server(server).port, map=sock_map,
                    high_water=64 * 1024, read_size=64 * 1024)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # before connect: a small window
    client.settimeout(WAIT)
    client.connect(fwd.address)
    try:
        client.sendall(b"req")
        client.shutdown(socket.SHUT_WR)
        client.setblocking(False)
        received = bytearray()

        def read_a_little() -> bool:  # a slow reader: at most 64 KiB per round of the loop
            try:
                chunk = client.recv(64 * 1024)
            except BlockingIOError:
                return False
            received.extend(chunk)
            return not chunk

        pump(sock_map, read_a_little, timeout=60, what="EOF at the client")
        assert len(received) == len(data) and bytes(received) == data
        assert hangups_with_data_left  # the trap was really sprung
    finally:
        client.close()


# -- 3c: bounded memory ------------------------------------------------------


def test_forwarder_stops_reading_while_the_client_does_not_read(scripted_server, start_forwarder) -> None:
    """With a client that reads nothing, the bytes waiting for it never exceed the high-water mark."""
    total = 64 << 20
    sent = [0]
    data = payload(1 << 20)

    def server(conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        while sent[0] < total:
            sent[0] += conn.send(data[: total - sent[0]])
        conn.shutdown(socket.SHUT_WR)
        recv_all(conn)

    high_water = 100_000  # not a multiple of the read size: a full read would overshoot it
    fwd = start_forwarder(scripted_server(server).port, high_water=high_water, read_size=64 * 1024)
    with fwd.connect() as client:
        wait_for(_stalled(lambda: sent[0]), what="the server to be blocked")
        assert sent[0] < total
        (conn,) = fwd.forwarder.connections
        assert high_water - 64 * 1024 < len(conn.receiver.outgoing) <= high_water
        assert not conn.sender.outgoing
        assert not conn.sender.readable()
        client.shutdown(socket.SHUT_WR)
        received = recv_all(client, timeout=60)
    assert len(received) == total and received[: 1 << 20] == data


def _stalled(progress, quiet: float = 0.5):
    """A predicate that is true once ``progress()`` has not moved for ``quiet`` s."""
    state = {"value": None, "since": time.monotonic()}

    def check() -> bool:
        value = progress()
        if value != state["value"]:
            state["value"], state["since"] = value, time.monotonic()
            return False
        return time.monotonic() - state["since"] > quiet

    return check


# -- 3d: connect first, then relay; failures close the client -----------------


def test_client_is_not_read_until_the_server_side_connects(sock_map) -> None:
    """While the connect is pending, nothing is read from the client."""
    listener, fillers = blackhole()
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", listener.getsockname()[1], map=sock_map)
    client = socket.create_connection(fwd.address, timeout=WAIT)
    try:
        client.sendall(b"early bytes")
        pump(sock_map, lambda: fwd.connections, what="accept")
        for _ in range(20):
            asyncore.loop(timeout=0.01, use_poll=True, map=sock_map, count=1)
        (conn,) = fwd.connections
        assert conn.sender.connecting and not conn.established
        assert not conn.receiver.readable()
        assert conn.sender.outgoing == b""
    finally:
        client.close()
        listener.close()
        for filler in fillers:
            filler.close()


def test_refused_connect_closes_the_client_with_one_log_line(start_forwarder, caplog) -> None:
    """A refused connect: the client sees a reset, one warning, no traceback, still serving."""
    fwd = start_forwarder(dead_port())
    with caplog.at_level(logging.WARNING, logger="asyncore_fwd"):
        for _ in range(2):
            assert connect_until_reset(fwd.address) == b""
        wait_for(lambda: len(caplog.records) >= 2, what="two log lines")
    assert len(caplog.records) == 2
    for record in caplog.records:
        assert "cannot connect" in record.getMessage() and "refused" in record.getMessage().lower()
        assert record.exc_info is None
    assert not fwd.forwarder.connections


def test_connect_timeout_closes_the_client(sock_map, caplog) -> None:
    """A remote that never answers: the client is reset after the connect timeout."""
    listener, fillers = blackhole()
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", listener.getsockname()[1], map=sock_map,
                    connect_timeout=0.3)
    client = socket.create_connection(fwd.address, timeout=WAIT)
    client.setblocking(False)
    try:
        with caplog.at_level(logging.WARNING, logger="asyncore_fwd"):
            pump(sock_map, lambda: fwd.connections, what="accept")
            pump(sock_map, lambda: not fwd.connections, what="the connect to time out")
        assert recv_until_reset(client) == b""
        (record,) = caplog.records
        assert "timed out" in record.getMessage()
    finally:
        client.close()
        listener.close()
        for filler in fillers:
            filler.close()


def test_stale_write_event_does_not_mark_a_pending_connect_connected(sock_map) -> None:
    """A write event meant for a reused descriptor does not fake a connect (cpython#75114)."""
    listener, fillers = blackhole()
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", listener.getsockname()[1], map=sock_map)
    client = socket.create_connection(fwd.address, timeout=WAIT)
    try:
        pump(sock_map, lambda: fwd.connections, what="accept")
        (conn,) = fwd.connections
        conn.sender.handle_write_event()  # as if poll() had reported POLLOUT
        assert conn.sender.connecting and not conn.sender.connected
        assert not conn.established and not conn.closed
    finally:
        client.close()
        listener.close()
        for filler in fillers:
            filler.close()


# -- 3e: one pair fails, the rest go on ----------------------------------------


def test_client_reset_is_passed_on_to_the_server_as_a_reset(scripted_server, start_forwarder, caplog) -> None:
    """The client resets: the server's side is reset too; one warning line."""
    outcome = []
    got_request = threading.Event()

    def server(conn: socket.socket) -> None:
        conn.recv(100)
        got_request.set()
        try:
            outcome.append(conn.recv(100))
        except ConnectionResetError:
            outcome.append("reset")

    fwd = start_forwarder(scripted_server(server).port)
    with caplog.at_level(logging.WARNING, logger="asyncore_fwd"):
        client = fwd.connect()
        client.sendall(b"hello")
        assert got_request.wait(WAIT)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        wait_for(lambda: outcome, what="the server to see the reset")
        wait_for(lambda: [r for r in caplog.records if "closed" in r.getMessage()], what="the log line")
    assert outcome == ["reset"]
    (record,) = [r for r in caplog.records if "closed" in r.getMessage()]
    assert "client" in record.getMessage() and record.exc_info is None


def test_events_for_a_closed_pair_are_ignored(echo_server, sock_map) -> None:
    """Handlers called after the pair closed (same poll round) do nothing."""
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map=sock_map)
    client = socket.create_connection(fwd.address, timeout=WAIT)
    try:
        conn = established(fwd, sock_map)
        conn.close()
        for side in (conn.receiver, conn.sender):
            assert not side.readable() and not side.writable()
            side.handle_read()
            side.handle_write()
            side.handle_close()
        assert conn.closed and not fwd.connections
    finally:
        client.close()


def test_no_descriptor_leaks_on_success_refusal_and_reset(echo_server, scripted_server) -> None:
    """Normal, refused and reset connections leave no descriptor behind."""
    from conftest import RunningForwarder

    def reset_server(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    resetter = scripted_server(reset_server)
    refusing = dead_port()
    before = open_fds()
    forwarders = [RunningForwarder("127.0.0.1", 0, "127.0.0.1", port)
                  for port in (echo_server.port, refusing, resetter.port)]
    try:
        for fwd in forwarders:
            for _ in range(5):
                try:
                    with fwd.connect() as client:
                        client.sendall(b"x")
                        client.shutdown(socket.SHUT_WR)
                        recv_all(client)
                except OSError:  # the reset may come first, even before connect() returns
                    pass
        for fwd in forwarders:
            wait_for(lambda fwd=fwd: not fwd.forwarder.connections, what="all pairs to close")
    finally:
        for fwd in forwarders:
            fwd.stop()
    wait_for(lambda: open_fds() <= before, what=f"descriptors to return to {before}")


# -- 3i: embedding: own map, port 0, stop and close ---------------------------


def test_runs_in_the_callers_own_map_and_not_the_global_one(echo_server, sock_map) -> None:
    """With ``map=`` every dispatcher joins that map, never asyncore.socket_map."""
    global_before = dict(asyncore.socket_map)
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map=sock_map)
    client = socket.create_connection(fwd.address, timeout=WAIT)
    try:
        client.sendall(b"own map")
        pump(sock_map, lambda: any(c.bytes_to_client for c in fwd.connections), what="the echo")
        (conn,) = fwd.connections
        assert {id(x) for x in sock_map.values()} == {id(fwd), id(conn.receiver), id(conn.sender)}
        assert asyncore.socket_map == global_before
        assert client.recv(100) == b"own map"
    finally:
        client.close()


def test_stop_from_another_thread_closes_every_socket(echo_server) -> None:
    """stop() from another thread: serve_forever returns, listener and pairs closed."""
    from conftest import RunningForwarder

    fwd = RunningForwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port)
    client = fwd.connect()
    try:
        client.sendall(b"x")
        assert recv_exactly(client, 1) == b"x"
        fwd.stop()
        assert fwd.forwarder.connections == set()
        assert fwd.forwarder.socket.fileno() == -1
        recv_until_reset(client)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(fwd.address, timeout=WAIT).close()
    finally:
        client.close()


def test_stop_resets_open_connections_on_both_sides(watching_server, start_forwarder) -> None:
    """stop() with a connection that has not finished: its client and its server both see a reset."""
    fwd = start_forwarder(watching_server.port)
    with fwd.connect() as client:
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
        fwd.stop()
        recv_until_reset(client)
    wait_for(lambda: watching_server.ends, what="the server to see the end")
    assert watching_server.ends == ["reset"]


def test_close_resets_open_connections_on_both_sides(watching_server, sock_map) -> None:
    """close() with a connection that has not finished: its client and its server both see a reset."""
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", watching_server.port, map=sock_map)
    with socket.create_connection(fwd.address, timeout=WAIT) as client:
        client.sendall(b"ping")
        pump(sock_map, lambda: any(c.bytes_to_client for c in fwd.connections), what="the echo")
        (conn,) = fwd.connections
        fwd.close()
        assert conn.closed and conn.error == "stopped" and sock_map == {}
        recv_until_reset(client)
    wait_for(lambda: watching_server.ends, what="the server to see the end")
    assert watching_server.ends == ["reset"]


def test_an_error_that_ends_the_loop_resets_open_connections_on_both_sides(watching_server) -> None:
    """An exception out of serve_forever: first every open connection is reset on both sides."""
    channels: dict = {}
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", watching_server.port, map=channels)
    breaker = LoopBreaker(channels, lambda: fwd.serve_forever(poll_interval=0.05), fwd.stop)
    try:
        with socket.create_connection(fwd.address, timeout=WAIT) as client:
            client.sendall(b"ping")
            assert recv_exactly(client, 4) == b"ping"
            breaker.fire()
            recv_until_reset(client)
        assert isinstance(breaker.error(), KeyboardInterrupt)
        wait_for(lambda: watching_server.ends, what="the server to see the end")
        assert watching_server.ends == ["reset"]
    finally:
        breaker.close()


@pytest.mark.parametrize("close", ["asyncore.close_all", "a side's close"])
def test_closing_a_side_from_outside_resets_the_pair(watching_server, sock_map, close: str) -> None:
    """asyncore.close_all() on the map, or a side's own close() (what close_all() calls), cuts
    the pair: both peers see a reset."""
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", watching_server.port, map=sock_map)
    with socket.create_connection(fwd.address, timeout=WAIT) as client:
        client.sendall(b"ping")
        pump(sock_map, lambda: any(c.bytes_to_client for c in fwd.connections), what="the echo")
        (conn,) = fwd.connections
        if close == "asyncore.close_all":
            asyncore.close_all(sock_map)
            assert sock_map == {}  # the listener too
        else:
            conn.receiver.close()
        assert conn.closed and not fwd.connections
        recv_until_reset(client)
    wait_for(lambda: watching_server.ends, what="the server to see the end")
    assert watching_server.ends == ["reset"]


def test_urgent_data_on_a_paused_side_does_not_spin_the_select_loop(scripted_server, sock_map, monkeypatch) -> None:
    """Urgent data while a side is paused is consumed at once, not reported every round."""
    release = threading.Event()

    def server(conn: socket.socket) -> None:
        release.wait(WAIT)  # reads nothing: the client side pauses

    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", scripted_server(server).port, map=sock_map,
                    high_water=65536, read_size=65536)
    calls = []
    original = Receiver.handle_expt
    monkeypatch.setattr(Receiver, "handle_expt", lambda self: (calls.append(1), original(self)))
    client = socket.create_connection(fwd.address, timeout=WAIT)
    client.setblocking(False)
    try:
        conn = established(fwd, sock_map)
        conn.receiver.outgoing += b"y" * (4 << 20)  # keeps the client side writable
        chunk = b"x" * 65536
        for _ in range(2000):  # fill the server's buffers until the client side pauses
            if not conn.receiver.readable():
                break
            try:
                client.send(chunk)
            except BlockingIOError:
                pass
            asyncore.loop(timeout=0.01, use_poll=False, map=sock_map, count=1)
        assert not conn.receiver.readable() and conn.receiver.writable()
        client.send(b"!", socket.MSG_OOB)
        for _ in range(100):
            asyncore.loop(timeout=0.01, use_poll=False, map=sock_map, count=1)
        assert 1 <= len(calls) <= 2
    finally:
        release.set()
        client.close()


@pytest.mark.parametrize("scratch", [b"read-only bytes" * 100, memoryview(bytearray(64)).cast("I")])
def test_shared_read_buffer_must_be_writable_bytes(scratch) -> None:
    """from_rule(scratch=) refuses a buffer recv_into() could not fill byte by byte."""
    from asyncore_fwd import Rule

    with pytest.raises(ValueError, match="scratch must be a writable buffer of bytes"):
        Forwarder.from_rule(Rule("127.0.0.1", 0, "127.0.0.1", 9), {}, scratch=scratch)
