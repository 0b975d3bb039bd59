"""The splice() relay: its kernel pipes as buffers, and their corner cases.

The end-to-end behaviour (bytes, half-close, backpressure, failures) is
tested for both relays through the ``splice`` fixture; these tests cover
what only the pipes have.
"""

from __future__ import annotations

import socket
import threading

import pytest
from test_forwarder import established, pump

from asyncore_fwd import Forwarder, Receiver, Rule, Sender
from asyncore_fwd._compat import asyncore
from asyncore_fwd._relay import _splice
from asyncore_fwd._values import _rules
from conftest import WAIT, RunningForwarder, open_fds, payload, recv_all, wait_for

pytestmark = pytest.mark.skipif(not _splice.AVAILABLE, reason="no os.splice() on this platform")


def test_pipes_are_the_outgoing_buffers(echo_server, sock_map) -> None:
    """With splice=True both sides queue in a KernelPipe, opened when the client is accepted."""
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map=sock_map, splice=True)
    with socket.create_connection(fwd.address, timeout=WAIT) as client:
        conn = established(fwd, sock_map)
        assert isinstance(conn.receiver.outgoing, _splice.KernelPipe)
        assert conn.sender.outgoing.write_fd >= 0 and conn.receiver.outgoing.write_fd >= 0
        client.sendall(b"hello")
        pump(sock_map, lambda: conn.bytes_to_client == 5, what="the echo")
        assert client.recv(5) == b"hello"
        assert conn.sender.outgoing.write_fd >= 0 and len(conn.sender.outgoing) == 0


def test_a_pipe_full_before_its_capacity_stops_reading_instead_of_spinning(sock_map, monkeypatch) -> None:
    """A pipe that takes nothing more (its slots are full) pauses the side that fills it."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the server reads nothing
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", listener.getsockname()[1], map=sock_map, splice=True)
    client = socket.create_connection(fwd.address, timeout=WAIT)
    pump(sock_map, lambda: any(c.established for c in fwd.connections), what="connect")
    listener.settimeout(WAIT)
    server, _ = listener.accept()
    try:
        client.sendall(b"x")
        pump(sock_map, lambda: any(c.sender.outgoing.write_fd >= 0 for c in fwd.connections), what="a pipe")
        (conn,) = fwd.connections
        pipe = conn.sender.outgoing
        pipe.capacity = 64 << 20  # far more than the pipe holds: the kernel says "full" first
        client.setblocking(False)
        chunk = payload(65536)

        def pipe_refuses_more() -> bool:
            try:
                client.send(chunk)
            except BlockingIOError:
                pass
            return pipe.blocked

        pump(sock_map, pipe_refuses_more, what="the pipe to fill")
        reads = []
        original = _splice.SpliceReceiver.handle_read
        monkeypatch.setattr(_splice.SpliceReceiver, "handle_read", lambda self: (reads.append(1), original(self)))
        for _ in range(50):
            asyncore.loop(timeout=0.01, use_poll=True, map=sock_map, count=1)
        assert len(pipe) < pipe.capacity and not conn.receiver.readable()
        assert reads == []
    finally:
        client.close()
        server.close()
        listener.close()


def test_no_descriptor_leaks_with_pipes(echo_server) -> None:
    """Pipes are closed with their connection: descriptors return to where they were."""
    before = open_fds()
    fwd = RunningForwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, splice=True)
    try:
        data = payload(1 << 20)
        for _ in range(5):
            with fwd.connect() as client:
                writer = threading.Thread(target=lambda: (client.sendall(data), client.shutdown(socket.SHUT_WR)))
                writer.start()
                assert recv_all(client) == data
                writer.join(WAIT)
        wait_for(lambda: not fwd.forwarder.connections, what="the pairs to close")
    finally:
        fwd.stop()
    wait_for(lambda: open_fds() <= before, what=f"descriptors to return to {before}")


def test_splice_is_refused_where_the_platform_lacks_it(monkeypatch) -> None:
    """splice=True without os.splice() is a ValueError naming the cause."""
    monkeypatch.setattr(_rules, "SPLICE_AVAILABLE", False)
    with pytest.raises(ValueError, match="splice"):
        Rule("127.0.0.1", 0, "127.0.0.1", 80, splice=True)


def test_a_high_water_mark_past_4_gib_does_not_shrink_the_pipe() -> None:
    """fcntl() takes a C int: 4 GiB + 4 KiB must not wrap round to a one-page pipe."""
    pipe = _splice.KernelPipe((1 << 32) + 4096)
    try:
        assert pipe.capacity >= 65536  # the kernel's default, or the most it would grant
    finally:
        pipe.close()


def test_splice_takes_the_splice_sides_in_place_of_the_copy_relay_s_own(sock_map) -> None:
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", 9, map=sock_map, splice=True)
    assert (fwd.receiver_class, fwd.sender_class) == (_splice.SpliceReceiver, _splice.SpliceSender)
    assert (Forwarder.receiver_class, Forwarder.sender_class) == (Receiver, Sender)  # the class keeps its own


def test_splice_keeps_a_subclass_s_own_splice_sides(sock_map) -> None:
    class CountingSender(_splice.SpliceSender):
        pass

    class Counting(Forwarder):
        sender_class = CountingSender

    fwd = Counting("127.0.0.1", 0, "127.0.0.1", 9, map=sock_map, splice=True)
    assert (fwd.receiver_class, fwd.sender_class) == (_splice.SpliceReceiver, CountingSender)


def test_splice_refuses_a_subclass_s_sides_that_copy_instead_of_replacing_them(sock_map) -> None:
    """A subclass's own copy-relay Sender with splice=True is a ValueError naming it, before any socket."""
    class LoggingSender(Sender):
        pass

    class Logging(Forwarder):
        sender_class = LoggingSender

    before = open_fds()
    with pytest.raises(ValueError, match="LoggingSender is not derived from SpliceSender"):
        Logging("127.0.0.1", 0, "127.0.0.1", 9, map=sock_map, splice=True)
    assert open_fds() == before and sock_map == {}
    assert Logging("127.0.0.1", 0, "127.0.0.1", 9, map=sock_map).sender_class is LoggingSender  # copy: kept
