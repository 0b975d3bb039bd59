"""Fault injection: toxics, running() in a thread, down(), and the controls around them.

Bounds on times are generous (the machines are shared): they check that a
delay happens and is of the right order, never a speed.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import tracemalloc
from typing import Callable, Iterator, List, Tuple

import pytest

from asyncore_fwd import Forwarder, Rule, Service
from asyncore_fwd._compat import asyncore
from asyncore_fwd._eventloop import _loop
from asyncore_fwd._eventloop._wakeup import LoopCalls
from asyncore_fwd._values._parse import shorten
from asyncore_fwd.toxics import (
    Bandwidth,
    Latency,
    LimitData,
    ResetPeer,
    Slicer,
    SlowClose,
    Timeout,
    Toxic,
    parse_toxic_spec,
)
from conftest import WAIT, EchoServer, open_fds, payload, recv_all, recv_exactly, recv_until_reset, wait_for


@pytest.fixture
def proxy(echo_server: EchoServer) -> Iterator[Forwarder]:
    """A forwarder in front of the echo server, serving in a background thread."""
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={}, seed=7)
    with fwd.running():
        yield fwd


def echo_time(client: socket.socket, message: bytes = b"ping") -> float:
    started = time.monotonic()
    client.sendall(message)
    assert recv_exactly(client, len(message)) == message
    return time.monotonic() - started


# -- running in a thread --------------------------------------------------------


def test_running_leaves_no_thread_port_or_descriptor_behind(echo_server: EchoServer) -> None:
    """running(): serves in a thread; on exit the port is closed and the thread is gone."""
    threads, fds = threading.active_count(), open_fds()
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={})
    with fwd.running():
        with socket.create_connection(fwd.address, timeout=WAIT) as client:
            echo_time(client)
    assert threading.active_count() == threads
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(fwd.address, timeout=WAIT)
    wait_for(lambda: open_fds() <= fds, what="descriptors back")


def test_running_raises_the_error_of_a_loop_that_cannot_start(echo_server: EchoServer) -> None:
    """A loop kind that does not exist: running() raises its ValueError before the block, no thread is left."""
    threads = threading.active_count()
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={})
    with pytest.raises(ValueError, match="no-such-loop"):
        with fwd.running(loop="no-such-loop"):
            pytest.fail("the block ran without a loop")
    assert threading.active_count() == threads
    with fwd.running():  # the forwarder is still whole: a good loop serves it
        with socket.create_connection(fwd.address, timeout=WAIT) as client:
            echo_time(client)


def test_running_raises_when_the_loop_does_not_start_in_time(
        echo_server: EchoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop that is not ready within START_TIMEOUT: TimeoutError, not a block whose calls would race it."""
    from asyncore_fwd._listener import _forwarder

    release = threading.Event()
    open_loop = _loop.open_loop

    def slow_open_loop(*args: object, **kwargs: object) -> object:
        release.wait(WAIT)
        return open_loop(*args, **kwargs)

    monkeypatch.setattr(_loop, "open_loop", slow_open_loop)
    monkeypatch.setattr(_forwarder, "START_TIMEOUT", 0.2)
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={})
    thread_name = f"asyncore_fwd 127.0.0.1:{fwd.address[1]}"
    try:
        with pytest.raises(TimeoutError, match="did not start within 0.2 s"):
            with fwd.running(stop_timeout=0.1):
                pytest.fail("the block ran before the loop could take calls")
    finally:
        release.set()
        for thread in threading.enumerate():
            if thread.name == thread_name:
                thread.join(WAIT)
                assert not thread.is_alive()
    with pytest.raises(ConnectionRefusedError):  # the loop started late, saw stop() and closed
        socket.create_connection(fwd.address, timeout=WAIT)


def test_running_a_forwarder_a_second_time_raises(echo_server: EchoServer) -> None:
    """After its block the forwarder is closed: running() again says so at once."""
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={})
    with fwd.running():
        pass
    with pytest.raises(RuntimeError, match="was stopped"):
        with fwd.running():
            pytest.fail("the block ran on a closed forwarder")


@pytest.mark.parametrize("block_raises", [False, True], ids=["loop-error-at-exit", "block-error-kept"])
def test_an_error_of_the_loop_is_raised_at_the_end_of_the_block_unless_the_block_raised(
        echo_server: EchoServer, monkeypatch: pytest.MonkeyPatch, block_raises: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    """The loop's own error reaches the caller when the block ends, or the log if the block raised."""
    broken = threading.Event()
    open_loop = _loop.open_loop

    def breakable_open_loop(*args: object, **kwargs: object) -> object:
        backend = open_loop(*args, **kwargs)
        poll = backend.poll

        def breakable_poll(timeout: float) -> None:
            if broken.is_set():
                raise RuntimeError("the loop broke")
            poll(timeout)

        backend.poll = breakable_poll
        return backend

    monkeypatch.setattr(_loop, "open_loop", breakable_open_loop)
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={})
    expected = (ZeroDivisionError, "the block's own") if block_raises else (RuntimeError, "the loop broke")
    with pytest.raises(expected[0], match=expected[1]):
        with fwd.running(stop_timeout=WAIT):
            broken.set()
            LoopCalls.of(fwd._map).wake()  # type: ignore[union-attr]
            wait_for(lambda: LoopCalls.of(fwd._map) is None, what="the loop to fail and close")
            if block_raises:
                raise ZeroDivisionError("the block's own")
    logged = [r for r in caplog.records if "the loop failed during the block" in r.getMessage()]
    if block_raises:
        [record] = logged
        assert record.levelno == logging.ERROR and record.exc_info and "the loop broke" in str(record.exc_info[1])
    else:
        assert logged == []


def test_stop_wakes_a_loop_waiting_on_a_long_timeout(echo_server: EchoServer) -> None:
    """stop() from another thread ends serve_forever at once, not at the end of its wait."""
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={})
    thread = threading.Thread(target=fwd.serve_forever, kwargs={"poll_interval": 30.0})
    thread.start()
    wait_for(lambda: len(fwd._map) > 1, what="the loop to start")
    started = time.monotonic()
    fwd.stop()
    thread.join(WAIT)
    assert not thread.is_alive() and time.monotonic() - started < 2.0


def test_running_gives_up_on_a_stuck_loop_after_stop_timeout_with_a_warning(
        echo_server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    """A handler that blocks keeps the loop from stopping: running() waits stop_timeout, then warns."""
    entered, release = threading.Event(), threading.Event()

    class Stuck(asyncore.dispatcher):
        def writable(self) -> bool:
            return False

        def handle_read(self) -> None:
            self.recv(1)
            entered.set()
            release.wait(WAIT)

    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={})
    inside, outside = socket.socketpair()
    stuck = Stuck(inside, map=fwd._map)
    thread_name = f"asyncore_fwd 127.0.0.1:{fwd.address[1]}"
    try:
        with caplog.at_level(logging.WARNING, logger="asyncore_fwd"):
            with fwd.running(stop_timeout=0.2):
                outside.send(b"x")
                assert entered.wait(WAIT)
            assert not release.is_set()
        [thread] = [thread for thread in threading.enumerate() if thread.name == thread_name]
        assert thread.is_alive()
        assert f"{fwd.label}: the loop did not stop within 0.2 s" in caplog.text
    finally:
        release.set()
        for thread in threading.enumerate():
            if thread.name == thread_name:
                thread.join(WAIT)
        stuck.close()
        outside.close()


# -- each toxic --------------------------------------------------------------------


def test_latency_delays_the_reply_by_about_the_latency(proxy: Forwarder) -> None:
    with socket.create_connection(proxy.address, timeout=WAIT) as client:
        # 0.5 s: well above what a loaded machine adds to a plain round trip
        assert echo_time(client) < 0.4
        with proxy.toxic(Latency(0.5), direction="downstream"):
            assert 0.49 <= echo_time(client) < 2.0
        assert echo_time(client) < 0.4


def test_latency_with_jitter_keeps_the_bytes_in_order(proxy: Forwarder) -> None:
    messages = [b"%04d," % i for i in range(200)]
    with proxy.toxic(Latency(0.01, jitter=0.01), direction="both"):
        with socket.create_connection(proxy.address, timeout=WAIT) as client:
            for message in messages:
                client.sendall(message)
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"".join(messages)


def test_an_idle_timeout_while_a_latency_holds_the_reply_resets_the_client(echo_server: EchoServer) -> None:
    """The reply waits in the toxic past the idle timeout: it is lost, so the client sees a reset, not an EOF."""
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={}, idle_timeout=0.3)
    with fwd.running(), fwd.toxic(Latency(3.0), direction="downstream"):
        with socket.create_connection(fwd.address, timeout=WAIT) as client:
            client.sendall(b"ping")
            assert recv_until_reset(client) == b""


def test_latency_holds_bytes_within_the_high_water_mark(echo_server: EchoServer) -> None:
    """Bytes held back by a toxic count as buffered: reading pauses, memory stays bounded."""
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={}, high_water=64 * 1024)
    with fwd.running(), fwd.toxic(Latency(0.3), direction="upstream"):
        with socket.create_connection(fwd.address, timeout=WAIT) as client:
            client.setblocking(False)
            sent, deadline = 0, time.monotonic() + 0.25
            while time.monotonic() < deadline:
                try:
                    sent += client.send(b"x" * 65536)
                except BlockingIOError:
                    time.sleep(0.005)
            (conn,) = fwd.connections
            link = fwd._faults.toxic_set._links[conn]["upstream"]  # type: ignore[union-attr]
            assert link.held <= 64 * 1024  # a read takes no more than the room under it
            assert sent > link.held  # the rest waits in the kernel's buffers, not in ours


def test_a_read_never_takes_a_toxic_past_the_high_water_mark(echo_server: EchoServer) -> None:
    """Small reads first fill the toxic to just under the mark; the flood after them tops it up, no more."""
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={}, high_water=64 * 1024)
    with fwd.running(), fwd.toxic(Latency(5.0), direction="upstream"):  # holds everything for the test
        with socket.create_connection(fwd.address, timeout=WAIT) as client:
            wait_for(lambda: fwd.connections, what="the connection")
            (conn,) = fwd.connections
            link = fwd._faults.toxic_set._links[conn]["upstream"]  # type: ignore[union-attr]
            for piece in range(1, 7):  # 60 KiB in reads of 10 KiB
                client.sendall(b"x" * 10240)
                wait_for(lambda piece=piece: link.held >= piece * 10240, what="the piece to be read")
            client.setblocking(False)
            try:  # then a flood, until the kernel's buffers are full: the next read could take 64 KiB
                for _ in range(1000):
                    client.send(b"y" * 65536)
            except BlockingIOError:
                pass
            wait_for(lambda: link.held > 60 * 1024, what="the toxic to take more")
            time.sleep(0.1)  # a read past the mark would come now, if at all
            assert link.held <= 64 * 1024


def test_bandwidth_limits_the_rate(proxy: Forwarder) -> None:
    with proxy.toxic(Bandwidth(200_000), direction="downstream"):
        with socket.create_connection(proxy.address, timeout=WAIT) as client:
            started = time.monotonic()
            client.sendall(b"b" * 100_000)
            assert recv_exactly(client, 100_000) == b"b" * 100_000
            assert time.monotonic() - started >= 0.35  # 100 kB at 200 kB/s: 0.5 s


def test_slicer_delivers_small_segments(proxy: Forwarder) -> None:
    with proxy.toxic(Slicer(10, size_variation=2, delay=0.005), direction="downstream"):
        with socket.create_connection(proxy.address, timeout=WAIT) as client:
            client.sendall(b"s" * 300)
            sizes: List[int] = []
            while sum(sizes) < 300:
                chunk = client.recv(1000)  # the socket's timeout bounds each wait
                assert chunk, f"EOF after {sum(sizes)} of 300 bytes"
                sizes.append(len(chunk))
            assert max(sizes) <= 24 and len(sizes) >= 10


#: What a flooding server sends, made once: its threads allocate nothing while memory is traced.
FLOOD = payload(64 * 1024)


def send_until_closed(conn: socket.socket) -> None:
    """Server: send as fast as the forwarder takes it, until the forwarder closes."""
    try:
        while True:
            conn.sendall(FLOOD)
    except OSError:
        pass  # the forwarder closed the connection


def client_that_does_not_read(address: Tuple[str, int]) -> socket.socket:
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
    client.settimeout(WAIT)
    client.connect(address)
    return client


def test_a_client_closing_while_a_slicer_holds_bytes_logs_no_error(
        scripted_server, caplog: pytest.LogCaptureFixture) -> None:
    """The client goes away; the slicer's next segment fails to send and closes the pair from
    inside the slicer's timer, which must then stop quietly."""
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    server = scripted_server(send_until_closed)
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", server.port, map={}, high_water=64 * 1024)
    with fwd.running(), fwd.toxic(Slicer(100, delay=0.001)):
        with socket.create_connection(fwd.address, timeout=WAIT) as client:
            recv_exactly(client, 1000)
        wait_for(lambda: [r for r in caplog.records if getattr(r, "event", None) == "close"], what="the close")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors


def test_a_slicer_holds_at_most_twice_high_water_for_clients_that_do_not_read(scripted_server) -> None:
    """What a toxic holds counts toward high_water as the memory it takes, a small segment's
    bookkeeping included: every allocation made for a connection stays under 2 x high_water,
    plus the connection's own objects."""
    high_water, count = 16 * 1024, 10
    server = scripted_server(send_until_closed)
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", server.port, map={}, high_water=high_water)
    clients: List[socket.socket] = []
    with fwd.running(), fwd.toxic(Slicer(10, delay=0.001)):
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            clients += [client_that_does_not_read(fwd.address) for _ in range(count)]
            wait_for(lambda: len(fwd.connections) == count, what="the connections")
            time.sleep(2.0)  # segment after segment, while the clients read nothing
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            for client in clients:
                client.close()
    per_connection = (peak - before) // count
    assert per_connection <= 2 * high_water + 16 * 1024


def test_slicers_whose_clients_do_not_read_leave_the_loop_idle(scripted_server) -> None:
    """Once a client's socket is full, its slicer waits for room to write instead of
    waking the loop every millisecond.  A bound on CPU time, far above idle: not a speed."""
    count = 20
    server = scripted_server(send_until_closed)
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", server.port, map={}, high_water=64 * 1024)
    clients: List[socket.socket] = []
    with fwd.running(), fwd.toxic(Slicer(100, delay=0.001)):
        try:
            clients += [client_that_does_not_read(fwd.address) for _ in range(count)]
            wait_for(lambda: len(fwd.connections) == count, what="the connections")
            # The slicers fill what the kernel takes for each client, 100 bytes a time, until
            # each writer holds bytes the kernel refused.
            settled = time.monotonic() + 5.0
            while time.monotonic() < settled and not all(conn.receiver.outgoing for conn in list(fwd.connections)):
                time.sleep(0.05)
            started = time.process_time()
            time.sleep(3.0)
            used = time.process_time() - started
        finally:
            for client in clients:
                client.close()
    # Idle, this is about 0.005 CPU-s; timers firing every millisecond took 0.3 to 0.6.
    assert used < 0.2, f"{used:.2f} CPU-s in 3 s with every client stalled"


@pytest.mark.parametrize("toxic", [Latency(0.01), Bandwidth(4_000_000), Slicer(4096, delay=0.001)],
                         ids=["latency", "bandwidth", "slicer"])
def test_a_toxic_waiting_for_a_client_that_does_not_read_resumes_when_it_reads(
        scripted_server, toxic: Toxic) -> None:
    """Stalled by a full socket, the toxic waits for room; once the client reads, every byte
    comes through in order, then the EOF."""
    sent = payload(1024 * 1024)
    server = scripted_server(lambda conn: conn.sendall(sent))
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", server.port, map={}, high_water=64 * 1024)
    with fwd.running(), fwd.toxic(toxic):
        with client_that_does_not_read(fwd.address) as client:
            wait_for(lambda: fwd.connections, what="the connection")
            (conn,) = fwd.connections
            wait_for(lambda: conn.receiver.outgoing, what="the client's socket to fill")
            assert recv_all(client) == sent


def test_timeout_drops_bytes_then_closes_the_connection(proxy: Forwarder) -> None:
    with proxy.toxic(Timeout(0.3), direction="downstream"):
        with socket.create_connection(proxy.address, timeout=WAIT) as client:
            started = time.monotonic()
            client.sendall(b"lost")
            assert recv_all(client) == b""
            assert 0.25 <= time.monotonic() - started < 3.0


def test_timeout_zero_never_closes_and_removing_it_resumes(proxy: Forwarder) -> None:
    with socket.create_connection(proxy.address, timeout=WAIT) as client:
        handle = proxy.add_toxic(Timeout(0), direction="downstream")
        client.sendall(b"dropped")
        client.settimeout(0.3)
        with pytest.raises(socket.timeout):
            client.recv(100)
        proxy.remove_toxic(handle)
        client.settimeout(WAIT)
        assert echo_time(client, b"after") < 1.0


def test_limit_data_closes_cleanly_after_that_many_bytes(proxy: Forwarder) -> None:
    with proxy.toxic(LimitData(5), direction="downstream"):
        with socket.create_connection(proxy.address, timeout=WAIT) as client:
            client.sendall(b"0123456789")
            assert recv_all(client) == b"01234"


def test_limit_data_waits_for_a_client_that_does_not_read_without_waking_the_loop(scripted_server) -> None:
    """Budget spent, bytes still queued for a client that does not read: no timer polls the queue.

    The loop runs here, round by round, so that its wakeups can be counted;
    once the client reads, it gets exactly the budget, then a clean EOF.
    """
    budget, sent = 256 * 1024, payload(1024 * 1024)

    def send_a_lot(conn: socket.socket) -> None:
        try:
            conn.sendall(sent)
        except OSError:
            pass  # the forwarder closed the connection after the budget

    server = scripted_server(send_a_lot)
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", server.port, map={})
    backend = _loop.open_loop("auto", fwd._map)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
    try:
        fwd.add_toxic(LimitData(budget), direction="downstream")
        client.settimeout(WAIT)
        client.connect(fwd.address)

        def poll_until(predicate: Callable[[], object], what: str) -> None:
            deadline = time.monotonic() + WAIT
            while not predicate():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                backend.poll(0.05)

        poll_until(lambda: fwd.connections, "the connection")
        conn = next(iter(fwd.connections))
        conn.receiver.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        poll_until(lambda: conn.receiver.bytes_sent + len(conn.receiver.outgoing) >= budget, "the budget")
        assert conn.receiver.outgoing and not conn.closed

        rounds, until = 0, time.monotonic() + 0.3
        while time.monotonic() < until and rounds < 1000:
            backend.poll(0.1)
            rounds += 1
        assert rounds <= 10 and not conn.closed  # a 5 ms poll would take about 60

        received: List[bytes] = []
        reader = threading.Thread(target=lambda: received.append(recv_all(client)))
        reader.start()
        poll_until(lambda: conn.closed, "the close")
        reader.join(WAIT)
        assert received == [sent[:budget]]
    finally:
        client.close()
        backend.close()
        fwd.close()


def test_reset_peer_resets_the_client(proxy: Forwarder) -> None:
    with proxy.toxic(ResetPeer(after=0.1), direction="downstream"):
        with socket.create_connection(proxy.address, timeout=WAIT) as client:
            recv_until_reset(client)


@pytest.mark.parametrize("fault", ["reset_peer", "down"])
def test_an_injected_reset_is_logged_as_info_not_as_a_warning(
        proxy: Forwarder, fault: str, caplog: pytest.LogCaptureFixture) -> None:
    """The forwarder ended the pair on purpose: its close line is INFO, as for a timeout, not a WARNING."""
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    with socket.create_connection(proxy.address, timeout=WAIT) as client:
        echo_time(client)
        if fault == "reset_peer":
            with proxy.toxic(ResetPeer(), direction="downstream"):
                recv_until_reset(client)
        else:
            with proxy.down():
                recv_until_reset(client)
    wait_for(lambda: [r for r in caplog.records if getattr(r, "event", None) == "close"], what="the close line")
    [close] = [r for r in caplog.records if getattr(r, "event", None) == "close"]
    assert close.levelno == logging.INFO, close.getMessage()


def test_slow_close_delays_the_eof_not_the_bytes(proxy: Forwarder) -> None:
    with proxy.toxic(SlowClose(1.0), direction="downstream"):
        with socket.create_connection(proxy.address, timeout=WAIT) as client:
            started = time.monotonic()
            client.sendall(b"bye")
            client.shutdown(socket.SHUT_WR)  # the echo server then closes its side
            assert recv_exactly(client, 3) == b"bye"
            assert time.monotonic() - started < 0.8
            assert recv_all(client) == b""
            assert time.monotonic() - started >= 0.95


def test_a_half_closing_client_gets_the_whole_delayed_reply_then_eof(proxy: Forwarder) -> None:
    with proxy.toxic(Latency(0.05), direction="both"):
        with socket.create_connection(proxy.address, timeout=WAIT) as client:
            client.sendall(b"request")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"request"


# -- controls -------------------------------------------------------------------


def test_toxicity_picks_the_same_connections_for_the_same_seed(echo_server: EchoServer) -> None:
    """toxicity=0.5: about half the connections are hit, and the same ones again with the same seed."""
    def hits(seed: int) -> List[bool]:
        fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={}, seed=seed)
        pattern = []
        with fwd.running(), fwd.toxic(LimitData(0, toxicity=0.5), direction="downstream"):
            for _ in range(20):
                try:
                    with socket.create_connection(fwd.address, timeout=WAIT) as client:
                        client.sendall(b"x")
                        client.shutdown(socket.SHUT_WR)
                        pattern.append(recv_all(client) != b"x")  # hit: closed at once
                except OSError:  # hit: reset (for the unread byte) before or during the exchange
                    pattern.append(True)
        return pattern

    first = hits(seed=42)
    assert 3 <= sum(first) <= 17
    assert hits(seed=42) == first


def test_down_refuses_connects_resets_open_connections_and_comes_back(proxy: Forwarder) -> None:
    client = socket.create_connection(proxy.address, timeout=WAIT)
    with client:
        echo_time(client)
        with proxy.down():
            recv_until_reset(client)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(proxy.address, timeout=WAIT)
    with socket.create_connection(proxy.address, timeout=WAIT) as again:
        assert echo_time(again) < 1.0


def test_down_whose_port_was_taken_raises_stays_down_and_comes_up_later(proxy: Forwarder) -> None:
    """Another socket took the port during down(): the exit says so; a later down() block brings it back."""
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{proxy.address[1]}"):
        with proxy.down():
            taken = socket.socket()
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # its closed connection must not hold the port
            taken.bind(proxy.address)
            taken.listen()
    with taken:
        with socket.create_connection(proxy.address, timeout=WAIT):
            taken.settimeout(WAIT)
            taken.accept()[0].close()  # the port is the other socket's, not the forwarder's
    with proxy.down():
        pass
    with socket.create_connection(proxy.address, timeout=WAIT) as again:
        assert echo_time(again) < 1.0


def test_wait_for_connections_and_close_connections(proxy: Forwarder) -> None:
    assert proxy.wait_for_connections(1, timeout=0.1) is False
    with socket.create_connection(proxy.address, timeout=WAIT) as client:
        assert proxy.wait_for_connections(1, timeout=WAIT) is True
        proxy.close_connections()
        assert recv_all(client) == b""


def test_toxics_lists_what_acts_now(proxy: Forwarder) -> None:
    handle = proxy.add_toxic(Latency(0.01), direction="upstream")
    assert proxy.toxics == [handle] and handle.direction == "upstream"
    proxy.remove_toxic(handle)
    assert proxy.toxics == []
    with pytest.raises(ValueError):
        proxy.remove_toxic(handle)


@pytest.mark.parametrize("make, message", [
    (lambda: Latency(-1), "seconds must be a number >= 0"),
    (lambda: Latency(0.1, toxicity=2), "toxicity must be from 0 to 1"),
    (lambda: Bandwidth(0), "bytes_per_second must be a number >= 1"),
    (lambda: Slicer(0), "average_size must be a positive integer"),
    (lambda: Slicer(10, size_variation=10), "size_variation must be an integer from 0"),
    (lambda: LimitData(-1), "bytes must be an integer >= 0"),
    (lambda: ResetPeer(after="soon"), "after must be a number >= 0"),
])
def test_bad_toxic_arguments_are_refused(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_add_toxic_checks_its_direction_and_the_relay(echo_server: EchoServer) -> None:
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={})
    with pytest.raises(ValueError, match="direction must be one of upstream, downstream, both"):
        fwd.add_toxic(Latency(0.1), direction="sideways")
    with pytest.raises(TypeError):
        fwd.add_toxic("latency")  # type: ignore[arg-type]
    fwd.close()
    spliced = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={}, splice=True)
    with pytest.raises(ValueError, match="copy relay"):
        spliced.add_toxic(Toxic())
    spliced.close()


def test_pytest_plugin_fixture_is_installed(asyncore_fwd_proxy, echo_server: EchoServer) -> None:
    """The package's pytest plugin gives every project a running forwarder, stopped at teardown."""
    fwd = asyncore_fwd_proxy("127.0.0.1", echo_server.port)
    with fwd.toxic(Latency(0.1)):
        with socket.create_connection(fwd.address, timeout=WAIT) as client:
            assert echo_time(client) >= 0.09


@pytest.mark.parametrize("spec, toxic, direction", [
    ("downstream:latency=100ms,jitter=10ms", Latency(0.1, jitter=0.01), "downstream"),
    ("latency=1.5", Latency(1.5), "downstream"),
    ("upstream:bandwidth=64K", Bandwidth(65536), "upstream"),
    ("bandwidth=1M", Bandwidth(1024 ** 2), "downstream"),
    ("bandwidth=65536", Bandwidth(65536), "downstream"),
    ("both:slicer=10,size_variation=3,delay=5ms", Slicer(10, 3, 0.005), "both"),
    ("timeout=0", Timeout(0), "downstream"),
    ("limit_data=100", LimitData(100), "downstream"),
    ("reset_peer", ResetPeer(), "downstream"),
    ("both:reset_peer=2s,toxicity=0.5", ResetPeer(2.0, toxicity=0.5), "both"),
    ("slow_close=300ms", SlowClose(0.3), "downstream"),
])
def test_toxic_specs_from_the_command_line(spec: str, toxic: Toxic, direction: str) -> None:
    parsed, parsed_direction = parse_toxic_spec(spec)
    assert (repr(parsed), parsed_direction) == (repr(toxic), direction)


@pytest.mark.parametrize("spec, message", [
    ("sideways:latency=1",
     "direction must be one of upstream, downstream, both, not 'sideways'"),
    ("latency", "give its seconds, as in latency=VALUE"),
    ("latency=soon", "seconds: expected a value like 100ms or 1.5s, not 'soon'"),
    ("latency=-1s", "seconds must be a number >= 0, not -1.0"),
    ("latency=1,foo=2", "latency has no option 'foo' (it takes seconds, jitter, toxicity)"),
    ("latency=1,seconds=2", "seconds given twice"),
    ("bandwidth=1x", "bytes_per_second: expected a positive number of bytes, like 65536, 512K, 1M or 1G, not '1x'"),
    ("slicer=1.5", "average_size: expected a positive number of bytes, like 65536, 512K, 1M or 1G, not '1.5'"),
    ("limit_data=-1", "bytes: expected a number of bytes, like 0, 1500, 64K or 1M, not '-1'"),
    ("slicer=10,size_variation=1T", "size_variation: expected a number of bytes, like 0, 1500, 64K or 1M, not '1T'"),
    # Past what any size can be, a number is as wrong as any other (int() would raise past 4300 digits).
    ("bandwidth=" + "9" * 5000, "bytes_per_second: expected a positive number of bytes, like 65536, 512K, 1M or "
                                "1G, not '" + "9" * 39 + "...' (5000 characters)"),
    ("limit_data=" + "9" * 20, "bytes: expected a number of bytes, like 0, 1500, 64K or 1M, not '" + "9" * 20 + "'"),
    ("poison=1",
     "unknown toxic 'poison' (one of latency, bandwidth, slicer, timeout, limit_data, reset_peer, slow_close)"),
])
def test_bad_toxic_specs_get_one_line_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_toxic_spec(spec)
    assert str(caught.value) == f"bad toxic {shorten(repr(spec))}: {message}"


@pytest.mark.parametrize("spec, toxic", [
    ("limit_data=1M", LimitData(1 << 20)),
    ("limit_data=0", LimitData(0)),
    ("slicer=1K", Slicer(1024)),
    ("slicer=2k,size_variation=1K", Slicer(2048, 1024)),
    ("slicer=1G,size_variation=0", Slicer(1 << 30, 0)),
])
def test_every_size_in_a_spec_takes_k_m_and_g_suffixes(spec: str, toxic: Toxic) -> None:
    """limit_data and slicer's sizes read like bandwidth's and the config file's: bytes, K, M or G."""
    assert repr(parse_toxic_spec(spec)[0]) == repr(toxic)


def test_spec_refuses_a_fractional_size() -> None:
    """Sizes are whole bytes, as in the configuration file: 1.5K is refused, not rounded."""
    with pytest.raises(ValueError) as caught:
        parse_toxic_spec("bandwidth=1.5K")
    assert str(caught.value) == ("bad toxic 'bandwidth=1.5K': bytes_per_second: expected a positive number "
                                 "of bytes, like 65536, 512K, 1M or 1G, not '1.5K'")


@pytest.mark.parametrize("spec", ["limit_data=1\u00b2", "limit_data=\u0661\u0662", "bandwidth=1\u00b2K",
                                  "latency=\uff11s", "latency=1_0ms", "timeout=\u0661", "reset_peer,toxicity=\uff11"])
def test_spec_refuses_digits_that_are_not_ascii(spec: str) -> None:
    """str.isdigit() takes a superscript two (which int() refuses) and Arabic-Indic digits: one-line errors."""
    with pytest.raises(ValueError, match=f"^bad toxic '{spec}': "):
        parse_toxic_spec(spec)


def test_spec_refuses_units_on_toxicity() -> None:
    """toxicity is a share from 0 to 1, not a time: 500ms is not read as 0.5."""
    with pytest.raises(ValueError) as caught:
        parse_toxic_spec("latency=1,toxicity=500ms")
    assert str(caught.value) == ("bad toxic 'latency=1,toxicity=500ms': toxicity: expected a number "
                                 "from 0 to 1, like 0.5, not '500ms'")


# -- with a Service: toxics per rule ------------------------------------------------


@pytest.fixture
def serve() -> Iterator[Callable[..., Service]]:
    """``serve(rules, **options)``: a Service serving in a thread, stopped at teardown."""
    running: List[Tuple[Service, threading.Thread]] = []

    def start(rules: List[Rule], **options: object) -> Service:
        service = Service(rules, map={}, **options)  # type: ignore[arg-type]
        thread = threading.Thread(target=service.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        running.append((service, thread))
        wait_for(lambda: LoopCalls.of(service.map) is not None, what="the loop to take calls")
        return service

    yield start
    for service, thread in running:
        service.stop()
        thread.join(WAIT)


def named(name: str, port: int) -> Rule:
    return Rule("127.0.0.1", 0, "127.0.0.1", port, name=name)


def test_each_rule_of_a_service_has_its_own_toxics(serve, echo_server: EchoServer) -> None:
    service = serve([named("slow", echo_server.port), named("fast", echo_server.port)])
    service.forwarders["slow"].add_toxic(Latency(0.5))
    with socket.create_connection(service.forwarders["fast"].address, timeout=WAIT) as fast, \
            socket.create_connection(service.forwarders["slow"].address, timeout=WAIT) as slow:
        assert echo_time(fast) < 0.4
        assert echo_time(slow) >= 0.49


def test_service_toxics_reach_the_rules_a_reload_adds(serve, echo_server: EchoServer) -> None:
    service = serve([named("first", echo_server.port)], toxics=[(Latency(0.2), "downstream")])
    service.reload([named("first", echo_server.port), named("added", echo_server.port)])
    wait_for(lambda: "added" in service.forwarders, what="the reload")
    with socket.create_connection(service.forwarders["added"].address, timeout=WAIT) as client:
        assert echo_time(client) >= 0.19


def test_a_toxic_added_again_after_removal_acts_again(proxy: Forwarder) -> None:
    """Removing the last toxic gives a connection its plain relay back; a new toxic takes it again."""
    with socket.create_connection(proxy.address, timeout=WAIT) as client:
        with proxy.toxic(Latency(0.5)):
            assert echo_time(client) >= 0.49
        assert echo_time(client) < 0.4
        with proxy.toxic(Latency(0.5)):
            assert echo_time(client) >= 0.49
