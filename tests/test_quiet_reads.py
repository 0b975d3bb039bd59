"""One request at a time: what the epoll loop may skip between a read and the next wait.

A ``handle_read()`` that returns ``QUIET_READ`` (a quiet read) tells ``EpollLoop``
that it changed neither its own predicates nor its partner's, so the loop
does not ask them again; the relay's sides say so when every byte went out
at once and their predicates are the relay's own.  A side whose class has
its own ``readable()``, ``writable()``, ``read_room()``, ``handle_read()`` or
``forward()`` (its own, a base's or a mixin's) is asked after every read, as
before, and so is every side while the trace runs.  The loop keeps the map's timers between rounds and
finds new ones after they were forgotten.

Rounds run in the test thread, one at a time, as in test_loop.py.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

from asyncore_fwd import Forwarder
from asyncore_fwd._compat import asyncore
from asyncore_fwd._eventloop._loop import QUIET_READ, EpollLoop
from asyncore_fwd._eventloop._timers import forget, timers_for
from asyncore_fwd._relay._copy import Receiver
from asyncore_fwd._relay._sender import Sender
from conftest import WAIT

SocketMap = Dict[int, asyncore.dispatcher]


def pump(loop: EpollLoop, until: Callable[[], object], what: str) -> None:
    """Run rounds until ``until()``; fail after ``WAIT`` s."""
    deadline = time.monotonic() + WAIT
    while not until():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT} s waiting for {what}")
        loop.poll(0.01)


def count_refreshes(loop: EpollLoop) -> List[int]:
    """Note each round in which ``loop`` asks predicates again; ``len()`` counts them."""
    refreshes: List[int] = []
    refresh = loop._refresh

    def noted() -> None:
        refreshes.append(len(refreshes) + 1)
        refresh()

    loop._refresh = noted  # type: ignore[method-assign]
    return refreshes


class Reader(asyncore.dispatcher):
    """A socketpair end that reads what comes and returns ``answer`` from ``handle_read``."""

    def __init__(self, sock: socket.socket, map: SocketMap, answer: Any) -> None:
        super().__init__(sock, map=map)
        self.answer = answer
        self.readable_calls = 0
        self.received = bytearray()

    def readable(self) -> bool:
        self.readable_calls += 1
        return True

    def writable(self) -> bool:
        return False

    def handle_read(self) -> Any:
        self.received += self.socket.recv(1 << 16)
        return self.answer

    def handle_error(self) -> None:
        raise


@pytest.fixture
def pair() -> Iterator[Tuple[socket.socket, socket.socket]]:
    one, other = socket.socketpair()
    yield one, other
    one.close()
    other.close()


def asked_after_second_read(answer: Any, sock_map: SocketMap, pair: Tuple[socket.socket, socket.socket]) -> int:
    """How many times the loop asks ``readable()`` in the round after a read that answered ``answer``."""
    mine, theirs = pair
    reader = Reader(mine, sock_map, answer)
    with EpollLoop(sock_map, sweep_interval=3600.0) as loop:
        theirs.sendall(b"1")
        pump(loop, lambda: reader.received == b"1", "the first byte")
        theirs.sendall(b"2")
        pump(loop, lambda: reader.received == b"12", "the second byte")
        asked = reader.readable_calls
        loop.poll(0)  # the round after the read: where the loop would ask again
        return reader.readable_calls - asked


def test_a_quiet_read_is_not_asked_its_predicates_again(sock_map: SocketMap,
                                                        pair: Tuple[socket.socket, socket.socket]) -> None:
    """A handle_read() that returns QUIET_READ keeps its registration: no readable() call after it."""
    assert asked_after_second_read(QUIET_READ, sock_map, pair) == 0


@pytest.mark.parametrize("answer", [None, True, 1, "yes"], ids=["None", "True", "1", "a string"])
def test_a_read_that_returns_anything_but_quiet_read_is_asked_again(answer: Any, sock_map: SocketMap,
                                                                    pair: Tuple[socket.socket, socket.socket]) -> None:
    """asyncore ignores what handle_read() returns, and so does the loop, but QUIET_READ: a dispatcher
    that happens to return True or its byte count is asked again after each of its reads."""
    assert asked_after_second_read(answer, sock_map, pair) == 1


def take(sock: socket.socket, into: bytearray) -> bytearray:
    """Add what ``sock`` has now (without waiting) to ``into``; return it."""
    sock.setblocking(False)
    try:
        into += sock.recv(1 << 16)
    except BlockingIOError:
        pass
    return into


def relayed_rounds(loop: EpollLoop, client: socket.socket, server: socket.socket, requests: int) -> None:
    """``requests`` request/reply round trips, each pumped to its end."""
    for number in range(requests):
        request, reply = b"GET %d\r\n" % number, b"+OK %d\r\n" % number
        client.sendall(request)
        at_server, at_client = bytearray(), bytearray()
        pump(loop, lambda: take(server, at_server) == request, "the request")  # noqa: B023 (called at once)
        server.sendall(reply)
        pump(loop, lambda: take(client, at_client) == reply, "the reply")  # noqa: B023


def opened_pair(fwd: Forwarder, loop: EpollLoop, upstream: socket.socket) -> Tuple[socket.socket, socket.socket]:
    """A client connected through ``fwd`` and the server's end of its connection, relaying."""
    client = socket.create_connection(fwd.address, timeout=WAIT)
    upstream.settimeout(WAIT)
    pump(loop, lambda: fwd.connections and next(iter(fwd.connections)).established, "the server connect")
    server, _ = upstream.accept()
    return client, server


def test_a_relayed_request_costs_the_loop_no_predicate_calls(sock_map: SocketMap) -> None:
    """Request and reply each go out whole: after the connect, no round asks either side again."""
    with socket.create_server(("127.0.0.1", 0)) as upstream, EpollLoop(sock_map, sweep_interval=3600.0) as loop:
        fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", upstream.getsockname()[1], map=sock_map)
        client, server = opened_pair(fwd, loop, upstream)
        with client, server:
            relayed_rounds(loop, client, server, 1)  # the rounds after the connect settle
            refreshes = count_refreshes(loop)
            relayed_rounds(loop, client, server, 20)
        assert refreshes == []


class OneReadReceiver(Receiver):
    """Reads once, then holds the client back: its own readable() (a documented hook)."""

    def readable(self) -> bool:
        return super().readable() and self.bytes_read == 0

    bytes_read = 0

    def handle_read(self) -> Any:
        answer = super().handle_read()
        self.bytes_read += 1
        return answer


def test_a_side_with_its_own_readable_is_asked_after_every_read(sock_map: SocketMap) -> None:
    """A Receiver subclass whose readable() turns False after a read is not read again, though
    everything it read went out at once."""
    assert not OneReadReceiver.plain_predicates and Receiver.plain_predicates and Sender.plain_predicates
    with socket.create_server(("127.0.0.1", 0)) as upstream, EpollLoop(sock_map, sweep_interval=3600.0) as loop:
        fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", upstream.getsockname()[1], map=sock_map)
        fwd.receiver_class = OneReadReceiver
        client, server = opened_pair(fwd, loop, upstream)
        with client, server:
            client.sendall(b"first")
            got = bytearray()
            pump(loop, lambda: take(server, got) == b"first", "the first chunk")
            client.sendall(b"second")
            for _ in range(20):
                loop.poll(0.01)
            assert take(server, got) == b"first"
            (conn,) = fwd.connections
            assert conn.receiver.bytes_read == 1


def test_a_sender_subclass_without_predicates_of_its_own_keeps_quiet_reads() -> None:
    """Only a class that overrides a predicate loses them; one that sets the flag itself keeps its say."""
    class Logged(Sender):
        def handle_connect(self) -> None:
            pass

    class Paced(Sender):
        def writable(self) -> bool:
            return super().writable()

    class PacedButPlain(Paced):
        plain_predicates = True

    assert Logged.plain_predicates and not Paced.plain_predicates and PacedButPlain.plain_predicates


class OneReadMixin:
    """The same hold-back as OneReadReceiver, as a mixin that is no relay side itself."""

    bytes_read = 0

    def readable(self) -> bool:
        return super().readable() and self.bytes_read == 0  # type: ignore[misc]

    def handle_read(self) -> Any:
        answer = super().handle_read()  # type: ignore[misc]
        self.bytes_read += 1
        return answer


class MixedInReceiver(OneReadMixin, Receiver):
    pass


class Logged(Receiver):
    def handle_connect(self) -> None:
        pass


class LoggedAndHeld(Logged, OneReadReceiver):
    """Its first base has no predicate of its own; its readable() comes from the second."""


class Forwards(Receiver):
    def forward(self, data: Any) -> bool:
        return super().forward(data)


def test_plain_predicates_follows_where_each_method_comes_from() -> None:
    """A mixin's or another base's readable() counts as the class's own; so do handle_read and forward."""
    assert Logged.plain_predicates
    assert not MixedInReceiver.plain_predicates
    assert not LoggedAndHeld.plain_predicates
    assert not Forwards.plain_predicates


@pytest.mark.parametrize("receiver_class", [MixedInReceiver, LoggedAndHeld], ids=["mixin", "second base"])
def test_a_side_whose_readable_comes_from_a_mixin_or_base_is_asked_after_every_read(
        receiver_class: type, sock_map: SocketMap) -> None:
    """The hold-back works whichever class in the MRO brings it."""
    with socket.create_server(("127.0.0.1", 0)) as upstream, EpollLoop(sock_map, sweep_interval=3600.0) as loop:
        fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", upstream.getsockname()[1], map=sock_map)
        fwd.receiver_class = receiver_class
        client, server = opened_pair(fwd, loop, upstream)
        with client, server:
            client.sendall(b"first")
            got = bytearray()
            pump(loop, lambda: take(server, got) == b"first", "the first chunk")
            client.sendall(b"second")
            for _ in range(20):
                loop.poll(0.01)
            assert take(server, got) == b"first"


def test_while_tracing_every_side_is_asked_after_every_read(sock_map: SocketMap) -> None:
    """The trace shows every question the loop would ask: no quiet reads while it runs."""
    import io

    from asyncore_fwd import trace

    with socket.create_server(("127.0.0.1", 0)) as upstream, EpollLoop(sock_map, sweep_interval=3600.0) as loop:
        fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", upstream.getsockname()[1], map=sock_map)
        client, server = opened_pair(fwd, loop, upstream)
        with client, server:
            relayed_rounds(loop, client, server, 1)
            trace.enable(io.StringIO())
            try:
                refreshes = count_refreshes(loop)
                relayed_rounds(loop, client, server, 3)
            finally:
                trace.disable()
            assert refreshes != []
            relayed_rounds(loop, client, server, 1)  # the rounds after the trace settle
            quiet_again = count_refreshes(loop)
            relayed_rounds(loop, client, server, 3)
            assert quiet_again == []


def test_the_loop_finds_the_maps_new_timers_after_they_were_forgotten(sock_map: SocketMap) -> None:
    """A loop keeps the map's timers between rounds: once forgotten, the ones made next still run."""
    fired: List[str] = []
    with EpollLoop(sock_map) as loop:
        timers_for(sock_map).call_later(0, fired.append, "first")
        loop.poll(0)
        forget(sock_map)
        timers_for(sock_map).call_later(0, fired.append, "second")
        deadline = time.monotonic() + WAIT
        while len(fired) < 2 and time.monotonic() < deadline:
            loop.poll(0.01)
    assert fired == ["first", "second"]
