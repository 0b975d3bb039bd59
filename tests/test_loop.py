"""The epoll loop: a drop-in for asyncore's loops whose cost follows the active connections.

``EpollLoop`` keeps descriptors registered between rounds and asks a
dispatcher's ``readable()``/``writable()`` again only after it handled an
event, when one of ours joins the map, and in a sweep of the whole map (every
``sweep_interval`` seconds, and after a round with no event).  These tests
hold it to asyncore's dispatcher contract, for foreign dispatchers as much as
for ours, and check that idle dispatchers are left alone.

Most tests pump the loop in the test thread, one round at a time, on
socketpairs: the kernel delivers at once, so rounds are deterministic.  A
"rally" (two dispatchers bouncing one byte) keeps every round busy, so that
only the interval sweep, not the idle-round one, can change a registration.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import sys
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from asyncore_fwd import Forwarder
from asyncore_fwd._compat import asyncore
from asyncore_fwd._eventloop import _dispatcher, _loop
from asyncore_fwd._eventloop._dispatcher import Dispatcher
from asyncore_fwd._eventloop._loop import AsyncoreLoop, EpollLoop, best_loop_kind, open_loop
from asyncore_fwd._eventloop._runner import STOPPED, STOPPED_BY_ERROR, LoopRunner
from asyncore_fwd._listener import _forwarder
from conftest import WAIT, DatagramEcho, EchoServer, RunningForwarder, payload, raise_fd_limit, recv_until_reset

SocketMap = Dict[int, asyncore.dispatcher]
MakePair = Callable[..., Tuple[socket.socket, socket.socket]]


# -- helpers ---------------------------------------------------------------


@pytest.fixture
def socketpair() -> Iterator[MakePair]:
    """``socketpair(fd=None)`` makes a connected AF_UNIX pair, closed at teardown.

    With ``fd``, a descriptor number just freed, one end of the pair gets that
    number (Linux hands out the lowest free one; ``dup2`` makes sure of it).
    """
    made: List[socket.socket] = []

    def make(fd: Optional[int] = None) -> Tuple[socket.socket, socket.socket]:
        first, second = socket.socketpair()
        made.extend((first, second))
        if fd is not None and first.fileno() != fd:
            if second.fileno() == fd:
                first, second = second, first
            else:
                os.dup2(first.fileno(), fd)
                moved = socket.socket(fileno=fd)
                first.close()
                first = moved
                made.append(moved)
        return first, second

    yield make
    for sock in made:
        sock.close()


def record_sweeps(loop: EpollLoop) -> List[int]:
    """Note each sweep of ``loop`` over its whole map; ``len()`` of the result counts them."""
    sweeps: List[int] = []
    sweep = loop._sweep

    def noted() -> None:
        sweeps.append(len(sweeps) + 1)
        sweep()

    loop._sweep = noted  # type: ignore[method-assign]
    return sweeps


def pump(loop, until: Callable[[], object], what: str, timeout: float = 0.01) -> int:
    """Run ``loop.poll(timeout)`` until ``until()``; fail after ``WAIT`` s; return the rounds run."""
    deadline = time.monotonic() + WAIT
    rounds = 0
    while not until():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT} s waiting for {what}")
        loop.poll(timeout)
        rounds += 1
    return rounds


def take(sock: socket.socket, into: bytearray) -> bytearray:
    """Add what ``sock`` has ready now (without waiting) to ``into``; return it."""
    readable, _, _ = select.select([sock], [], [], 0)
    if readable:
        into += sock.recv(1 << 16)
    return into


class Probe(asyncore.dispatcher):
    """A foreign dispatcher on a socketpair end: counts what the loop asks and calls."""

    def __init__(self, sock: socket.socket, map: SocketMap, want_read: bool = True,
                 on_read: Optional[Callable[[Probe], None]] = None) -> None:
        super().__init__(sock, map=map)
        self.want_read = want_read
        self.on_read = on_read
        self.readable_calls = 0
        self.writable_calls = 0
        self.reads = 0
        self.closes = 0
        self.received = bytearray()

    def readable(self) -> bool:
        self.readable_calls += 1
        return self.want_read

    def writable(self) -> bool:
        self.writable_calls += 1
        return False

    def handle_read(self) -> None:
        self.reads += 1
        try:
            self.received += self.socket.recv(1 << 16)
        except BlockingIOError:
            pass  # called with nothing to read: ``reads`` shows it
        if self.on_read is not None:
            self.on_read(self)

    def handle_close(self) -> None:
        self.closes += 1  # counted, not acted on: a spin shows as a large count

    def handle_error(self) -> None:
        raise


class Rally(asyncore.dispatcher):
    """One end of a socketpair that sends back each byte it gets: with a byte in
    flight between two of them, every round of the loop has exactly one event."""

    def __init__(self, sock: socket.socket, map: SocketMap,
                 on_hit: Optional[Callable[[Rally], None]] = None) -> None:
        super().__init__(sock, map=map)
        self.on_hit = on_hit
        self.hits = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def handle_read(self) -> None:
        self.socket.recv(16)
        self.hits += 1
        if self.on_hit is not None:
            self.on_hit(self)
        self.socket.send(b".")

    def handle_error(self) -> None:
        raise


def rally(map: SocketMap, socketpair: MakePair,
          on_hit: Optional[Callable[[Rally], None]] = None) -> Tuple[Rally, Rally]:
    """Two ``Rally`` ends with a byte already in flight."""
    one, other = socketpair()
    left, right = Rally(one, map, on_hit), Rally(other, map, on_hit)
    left.socket.send(b".")
    return left, right


def blackhole() -> Tuple[socket.socket, List[socket.socket]]:
    """A listener whose accept queue is full: the kernel drops further SYNs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    time.sleep(0.1)  # let the fillers' handshakes fill the queue
    return listener, fillers


# -- 1: a drop-in for asyncore.loop, for any dispatcher ----------------------


class EchoHandler(asyncore.dispatcher_with_send):
    """asyncore's textbook echo handler, counting what it echoed."""

    def __init__(self, sock: socket.socket, map: SocketMap, handlers: List[EchoHandler]) -> None:
        super().__init__(sock, map=map)
        self.echoed = 0
        self.closes = 0
        handlers.append(self)

    def handle_read(self) -> None:
        data = self.recv(1 << 16)
        if data:
            self.echoed += len(data)
            self.send(data)

    def handle_close(self) -> None:
        self.closes += 1
        self.close()

    def handle_error(self) -> None:
        raise


class EchoListener(asyncore.dispatcher):
    """Accepts ``clients`` connections, each with an ``EchoHandler``, then closes."""

    def __init__(self, map: SocketMap, clients: int) -> None:
        super().__init__(map=map)
        self.create_socket(socket.AF_INET, socket.SOCK_STREAM)
        self.set_reuse_addr()
        self.bind(("127.0.0.1", 0))
        self.listen(16)
        self.address = self.socket.getsockname()
        self.remaining = clients
        self.handlers: List[EchoHandler] = []

    def handle_accepted(self, sock: socket.socket, addr: object) -> None:
        EchoHandler(sock, self._map, self.handlers)
        self.remaining -= 1
        if not self.remaining:
            self.close()

    def handle_error(self) -> None:
        raise


class EchoClient(asyncore.dispatcher_with_send):
    """Sends its message once connected; closes once the whole echo is back."""

    def __init__(self, address: Tuple[str, int], message: bytes, map: SocketMap) -> None:
        super().__init__(map=map)
        self.message = message
        self.received = bytearray()
        self.connects = 0
        self.create_socket(socket.AF_INET, socket.SOCK_STREAM)
        self.connect(address)

    def handle_connect(self) -> None:
        self.connects += 1
        self.send(self.message)

    def handle_read(self) -> None:
        self.received += self.recv(1 << 16)
        if len(self.received) >= len(self.message):
            self.close()

    def handle_close(self) -> None:
        self.close()

    def handle_error(self) -> None:
        raise


# Sizes from one byte to several 64 KiB sends of dispatcher_with_send.
MESSAGES = [payload(size)[::-1] + bytes([i]) for i, size in enumerate((0, 999, 70_000, 300_000))]


@pytest.mark.parametrize("kind", ["epoll", "poll", "select"])
def test_foreign_dispatchers_run_to_the_same_end_under_every_loop(kind: str, sock_map: SocketMap) -> None:
    """Plain asyncore echo server and clients finish with the same results under epoll, poll and select."""
    listener = EchoListener(sock_map, len(MESSAGES))
    clients = [EchoClient(listener.address, message, sock_map) for message in MESSAGES]

    _loop.loop(timeout=0.05, map=sock_map, kind=kind, count=400)

    assert not sock_map, f"still open after 400 rounds: {list(sock_map.values())}"
    results = {
        "echoes": [bytes(client.received) == client.message for client in clients],
        "connects": [client.connects for client in clients],
        "accepted": len(listener.handlers),
        "echoed": sorted(handler.echoed for handler in listener.handlers),
        "server closes": [handler.closes for handler in listener.handlers],
    }
    assert results == {
        "echoes": [True] * len(MESSAGES),
        "connects": [1] * len(MESSAGES),
        "accepted": len(MESSAGES),
        "echoed": sorted(len(message) for message in MESSAGES),
        "server closes": [1] * len(MESSAGES),
    }


class OwnReadEvent(Probe):
    """A dispatcher with its own ``handle_read_event``, which the loop must call."""

    read_events = 0

    def handle_read_event(self) -> None:
        self.read_events += 1
        super().handle_read_event()


def test_epoll_loop_calls_a_dispatchers_own_handle_read_event(sock_map: SocketMap, socketpair: MakePair) -> None:
    """The loop's shortcut to handle_read() is not taken by a class that overrides handle_read_event()."""
    sock, peer = socketpair()
    own = OwnReadEvent(sock, sock_map)
    peer.sendall(b"data")
    with EpollLoop(sock_map) as loop:
        pump(loop, lambda: own.received == b"data", "the data")
    assert own.read_events == own.reads == 1


def test_epoll_loop_calls_a_handle_read_event_patched_on_the_instance(sock_map: SocketMap,
                                                                      socketpair: MakePair) -> None:
    """A handle_read_event set on one dispatcher (as mock.patch.object does) is called, not skipped."""
    sock, peer = socketpair()
    probe = Probe(sock, sock_map)
    calls: List[str] = []

    def handle_read_event() -> None:
        calls.append("handle_read_event")
        Probe.handle_read_event(probe)

    probe.handle_read_event = handle_read_event  # type: ignore[method-assign]
    peer.sendall(b"data")
    with EpollLoop(sock_map) as loop:
        pump(loop, lambda: probe.received == b"data", "the data")
    assert calls == ["handle_read_event"]


class FailingRead(Probe):
    """Raises ``error`` from ``handle_read``; records which handler asyncore's rules then call."""

    def __init__(self, sock: socket.socket, map: SocketMap, error: BaseException) -> None:
        super().__init__(sock, map)
        self.error = error
        self.handled: List[str] = []

    def handle_read(self) -> None:
        raise self.error

    def handle_close(self) -> None:
        self.handled.append("handle_close")
        self.close()

    def handle_error(self) -> None:
        self.handled.append(f"handle_error {type(sys.exc_info()[1]).__name__}")
        self.close()


@pytest.mark.parametrize("kind", ["epoll", "poll"])
@pytest.mark.parametrize("error, handled", [
    (ConnectionResetError(errno.ECONNRESET, "reset"), "handle_close"),
    (OSError(errno.EINVAL, "invalid"), "handle_error OSError"),
    (ValueError("bug"), "handle_error ValueError"),
])
def test_error_in_handle_read_is_handled_as_asyncore_does(kind: str, error: BaseException, handled: str,
                                                          sock_map: SocketMap, socketpair: MakePair) -> None:
    """A disconnect error from handle_read() calls handle_close(); any other error, handle_error()."""
    sock, peer = socketpair()
    failing = FailingRead(sock, sock_map, error)
    peer.sendall(b"data")
    backend = open_loop(kind, sock_map)
    try:
        pump(backend, lambda: failing.handled, "a handler")
    finally:
        backend.close()
    assert failing.handled == [handled]


class Unwatchable(Probe):
    """A probe that records the errors it is handed (and closes), instead of raising them."""

    def __init__(self, sock: socket.socket, map: SocketMap) -> None:
        super().__init__(sock, map)
        self.errors: List[Optional[BaseException]] = []

    def handle_error(self) -> None:
        self.errors.append(sys.exc_info()[1])
        self.close()


def test_select_loop_fails_a_dispatcher_past_its_limit_and_serves_the_others(sock_map: SocketMap,
                                                                            socketpair: MakePair) -> None:
    """A dispatcher on a descriptor select() cannot watch gets handle_error() (EMFILE, as if out of
    descriptors) instead of every round raising ValueError; the others are served as usual."""
    if raise_fd_limit(_loop.SELECT_LIMIT + 64) < _loop.SELECT_LIMIT + 64:
        pytest.skip(f"cannot open {_loop.SELECT_LIMIT + 64} descriptors here")
    far_sock, far_peer = socketpair(_loop.SELECT_LIMIT + 10)
    near_sock, near_peer = socketpair()
    far, near = Unwatchable(far_sock, sock_map), Probe(near_sock, sock_map)
    far_peer.sendall(b"unseen")
    near_peer.sendall(b"data")
    loop = AsyncoreLoop(sock_map, use_poll=False)
    try:
        pump(loop, lambda: near.received == b"data" and far.errors, "the near read and the far error")
    finally:
        loop.close()
    (error,) = far.errors
    assert isinstance(error, OSError) and error.errno == errno.EMFILE
    assert error.strerror == (f"select() cannot watch descriptor {_loop.SELECT_LIMIT + 10}: its limit is "
                              f"{_loop.SELECT_LIMIT - 1} (poll and epoll have none)")
    assert far not in sock_map.values() and far.reads == 0


def test_keyboard_interrupt_in_handle_read_stops_the_epoll_loop(sock_map: SocketMap, socketpair: MakePair) -> None:
    """KeyboardInterrupt goes through the loop, as asyncore's readwrite() lets it."""
    sock, peer = socketpair()
    failing = FailingRead(sock, sock_map, KeyboardInterrupt())
    peer.sendall(b"data")
    with EpollLoop(sock_map) as loop, pytest.raises(KeyboardInterrupt):
        pump(loop, lambda: failing.handled, "a handler")
    assert failing.handled == []


# -- 2: readable() is obeyed, and its changes are seen by the next sweep ----


def test_unreadable_dispatcher_gets_no_read_event_while_data_waits(sock_map: SocketMap, socketpair: MakePair) -> None:
    """A dispatcher whose readable() is False is not read from, sweep after sweep, though data waits."""
    sock, peer = socketpair()
    shy = Probe(sock, sock_map, want_read=False)
    peer.sendall(b"waiting")
    with EpollLoop(sock_map, sweep_interval=0.05) as loop:
        sweeps = record_sweeps(loop)
        pump(loop, lambda: len(sweeps) >= 5, "five sweeps")
    assert shy.readable_calls >= 5  # it was asked, and said no
    assert shy.reads == 0
    assert shy.received == b""


def test_dispatcher_made_readable_by_another_handler_is_read_after_the_next_sweep(
        sock_map: SocketMap, socketpair: MakePair) -> None:
    """readable() turned True by another dispatcher's handler: read in the round of the next sweep, not before."""
    sock, peer = socketpair()
    seen: Dict[str, int] = {}
    sweeps: List[int] = []

    def first_read(probe: Probe) -> None:
        seen.setdefault("sweeps at read", len(sweeps))

    shy = Probe(sock, sock_map, want_read=False, on_read=first_read)
    peer.sendall(b"held back")

    def wake_on_tenth_hit(player: Rally) -> None:
        if player.hits == 10 and not shy.want_read:
            seen["reads before"] = shy.reads
            seen["sweeps at change"] = len(sweeps)
            shy.want_read = True

    rally(sock_map, socketpair, on_hit=wake_on_tenth_hit)
    with EpollLoop(sock_map, sweep_interval=0.05) as loop:
        sweeps = record_sweeps(loop)
        pump(loop, lambda: shy.received == b"held back", "the woken dispatcher to read")
    assert seen["reads before"] == 0
    assert seen["sweeps at read"] == seen["sweeps at change"] + 1


class Later(Probe):
    """A probe that becomes readable at a given time, like a pause that ends."""

    def __init__(self, sock: socket.socket, map: SocketMap, ready_at: float) -> None:
        super().__init__(sock, map=map)
        self.ready_at = ready_at
        self.first_read_at: Optional[float] = None

    def readable(self) -> bool:
        self.readable_calls += 1
        return time.monotonic() >= self.ready_at

    def handle_read(self) -> None:
        if self.first_read_at is None:
            self.first_read_at = time.monotonic()
        super().handle_read()


def test_dispatcher_made_readable_by_time_is_read_after_a_sweep(sock_map: SocketMap, socketpair: MakePair) -> None:
    """readable() turned True by the clock, with every round busy: the interval sweep finds it."""
    sock, peer = socketpair()
    later = Later(sock, sock_map, ready_at=time.monotonic() + 0.1)
    peer.sendall(b"on time")
    left, right = rally(sock_map, socketpair)
    with EpollLoop(sock_map, sweep_interval=0.05) as loop:
        sweeps = record_sweeps(loop)
        rounds = pump(loop, lambda: later.received == b"on time", "the time-based predicate")
    assert left.hits + right.hits == rounds  # no idle round: the interval sweep did it
    assert len(sweeps) >= 2
    assert later.first_read_at is not None and later.first_read_at >= later.ready_at


# -- 3: cost follows the active connections ----------------------------------

IDLE = 200
ROUNDS = 200


def rally_beside_idle_dispatchers(sock_map: SocketMap, socketpair: MakePair) -> Tuple[List[Probe], Tuple[Rally, Rally]]:
    idle = [Probe(socketpair()[0], sock_map) for _ in range(IDLE)]
    return idle, rally(sock_map, socketpair)


def run_busy_rounds(loop, players: Tuple[Rally, Rally]) -> None:
    """``ROUNDS`` rounds, each with the rally's one event (fails at once on an idle round)."""
    for done in range(1, ROUNDS + 1):
        loop.poll(WAIT)
        if sum(player.hits for player in players) != done:
            pytest.fail(f"round {done} did not carry the rally's event")


def test_epoll_loop_asks_idle_dispatchers_only_in_sweeps(sock_map: SocketMap, socketpair: MakePair) -> None:
    """200 rounds of one busy pair beside 200 idle dispatchers: the idle ones are asked about once, not per round."""
    idle, players = rally_beside_idle_dispatchers(sock_map, socketpair)
    with EpollLoop(sock_map, sweep_interval=10.0) as loop:
        sweeps = record_sweeps(loop)
        run_busy_rounds(loop, players)
    asked = max(max(probe.readable_calls, probe.writable_calls) for probe in idle)
    assert asked <= len(sweeps) + 2
    assert asked * 10 <= ROUNDS
    assert sum(probe.reads for probe in idle) == 0


def test_poll_loop_asks_every_dispatcher_every_round(sock_map: SocketMap, socketpair: MakePair) -> None:
    """The contrast: asyncore's poll() round asks each idle dispatcher both predicates every round."""
    idle, players = rally_beside_idle_dispatchers(sock_map, socketpair)
    run_busy_rounds(AsyncoreLoop(sock_map, use_poll=True), players)
    assert {(probe.readable_calls, probe.writable_calls) for probe in idle} == {(ROUNDS, ROUNDS)}


# -- 4: a descriptor closed and reused within one round ----------------------


class Swapper(Dispatcher):
    """One of ours (it announces joining and leaving the map).  The first of a
    pair to handle a read closes the other and puts a newcomer on its descriptor."""

    def __init__(self, sock: socket.socket, map: SocketMap, scene: Dict[str, object]) -> None:
        super().__init__(sock, map=map)
        self.scene = scene
        self.reads = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def handle_read(self) -> None:
        self.reads += 1
        try:
            self.socket.recv(64)
        except BlockingIOError:
            pass
        if "newcomer" not in self.scene:
            victim = self.scene["other"][self]  # type: ignore[index]
            fd = victim._fileno
            victim.close()
            sock, _ = self.scene["socketpair"](fd)  # type: ignore[operator]
            self.scene["newcomer"] = Swapper(sock, self._map, self.scene)
            self.scene["victim"], self.scene["fd"] = victim, fd

    def handle_error(self) -> None:
        raise


def test_descriptor_reused_in_a_round_does_not_get_the_closed_sockets_event(
        sock_map: SocketMap, socketpair: MakePair) -> None:
    """A handler closes a dispatcher whose event is pending this round and reuses its fd: the newcomer gets no event."""
    scene: Dict[str, object] = {"socketpair": socketpair}
    (one, one_peer), (two, two_peer) = socketpair(), socketpair()
    first, second = Swapper(one, sock_map, scene), Swapper(two, sock_map, scene)
    scene["other"] = {first: second, second: first}
    with EpollLoop(sock_map) as loop:
        loop.poll(0.01)  # registers both: nothing to read yet
        one_peer.sendall(b"a")
        two_peer.sendall(b"b")
        loop.poll(WAIT)  # one round reports both; the first handled closes and replaces the other
    newcomer, victim = scene["newcomer"], scene["victim"]
    assert isinstance(newcomer, Swapper) and isinstance(victim, Swapper)
    assert newcomer._fileno == scene["fd"]
    assert victim.reads == 0
    assert newcomer.reads == 0


# -- 5: dispatchers joining and leaving the map ------------------------------


def test_forwarder_connection_is_relayed_without_waiting_for_a_sweep(echo_server: EchoServer,
                                                                     sock_map: SocketMap) -> None:
    """Our dispatchers register as they join: a client's bytes are relayed with no sweep after the first."""
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map=sock_map)
    echoed = bytearray()
    with EpollLoop(sock_map, sweep_interval=60.0) as loop:
        sweeps = record_sweeps(loop)
        with socket.create_connection(fwd.address, timeout=WAIT) as client:
            client.sendall(b"no sweep needed")
            # Each round waits for the next event: an idle round (which would
            # sweep) only comes if a registration is missing.
            pump(loop, lambda: take(client, echoed) == b"no sweep needed", "the echo", timeout=1.0)
    assert len(sweeps) == 1


def test_foreign_dispatcher_added_during_a_round_is_picked_up_by_the_next_sweep(
        sock_map: SocketMap, socketpair: MakePair) -> None:
    """A foreign dispatcher created in another's handler is registered by the next sweep and read."""
    sock, peer = socketpair()
    peer.sendall(b"joined")
    joined: Dict[str, object] = {}
    sweeps: List[int] = []

    def add_on_fifth_hit(player: Rally) -> None:
        if player.hits == 5 and "probe" not in joined:
            joined["probe"] = Probe(sock, sock_map)
            joined["sweeps"] = len(sweeps)

    rally(sock_map, socketpair, on_hit=add_on_fifth_hit)
    with EpollLoop(sock_map, sweep_interval=0.05) as loop:
        sweeps = record_sweeps(loop)
        pump(loop, lambda: "probe" in joined and joined["probe"].received == b"joined",  # type: ignore[attr-defined]
             "the added dispatcher to read")
        assert loop._registered.get(sock.fileno()) is joined["probe"]
    assert len(sweeps) > joined["sweeps"]  # type: ignore[operator]


def test_closed_foreign_dispatcher_is_dropped_by_the_next_sweep(sock_map: SocketMap, socketpair: MakePair) -> None:
    """A foreign dispatcher closed behind the loop's back is forgotten at the next sweep, without error."""
    gone = Probe(socketpair()[0], sock_map)
    fd = gone._fileno
    with EpollLoop(sock_map, sweep_interval=0.05) as loop:
        sweeps = record_sweeps(loop)
        loop.poll(0.01)
        assert loop._registered.get(fd) is gone
        gone.close()  # asyncore's own close: the loop is not told
        swept = len(sweeps)
        pump(loop, lambda: len(sweeps) > swept, "a sweep")
        assert gone not in loop._registered.values()
        assert fd not in loop._registered


def test_foreign_dispatcher_reusing_a_closed_ones_descriptor_is_read_after_the_next_sweep(
        sock_map: SocketMap, socketpair: MakePair) -> None:
    """A foreign dispatcher closed and replaced by another on its fd, unannounced: the sweep registers the new one."""
    old = Probe(socketpair()[0], sock_map)
    fd = old._fileno
    with EpollLoop(sock_map, sweep_interval=0.05) as loop:
        loop.poll(0.01)
        old.close()
        sock, peer = socketpair(fd)
        new = Probe(sock, sock_map)
        peer.sendall(b"same number")
        pump(loop, lambda: new.received == b"same number", "the new dispatcher to read")
        assert loop._registered.get(fd) is new
    assert old.reads == 0


# -- 6: a dispatcher wanting no events is not registered ---------------------


def test_dispatcher_wanting_no_events_is_not_called_on_its_peers_hang_up(sock_map: SocketMap,
                                                                         socketpair: MakePair) -> None:
    """readable() and writable() False (from the start, or since a sweep): no handle_close spin on EPOLLHUP."""
    first, first_peer = socketpair()
    second, second_peer = socketpair()
    never = Probe(first, sock_map, want_read=False)
    stopped = Probe(second, sock_map, want_read=True)
    with EpollLoop(sock_map, sweep_interval=0.05) as loop:
        sweeps = record_sweeps(loop)
        loop.poll(0.01)
        assert loop._registered.get(second.fileno()) is stopped
        stopped.want_read = False
        swept = len(sweeps)
        pump(loop, lambda: len(sweeps) > swept, "a sweep")
        first_peer.close()
        second_peer.close()  # both now report EPOLLHUP, asked for or not
        for _ in range(30):
            loop.poll(0.01)
    assert (never.closes, stopped.closes) == (0, 0)
    assert (never.reads, stopped.reads) == (0, 0)


# -- 7: choosing a loop --------------------------------------------------------


def test_open_loop_rejects_an_unknown_kind_by_name() -> None:
    """open_loop("bogus") raises ValueError quoting "bogus"."""
    with pytest.raises(ValueError, match="'bogus'"):
        open_loop("bogus", {})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="epoll is Linux's")
def test_best_loop_kind_is_epoll_on_linux() -> None:
    """On Linux the best loop is epoll."""
    assert best_loop_kind() == "epoll"


# -- 8: time-based predicates of the forwarder under epoll -------------------


def test_connect_timeout_fires_under_serve_forever_with_epoll(caplog: pytest.LogCaptureFixture) -> None:
    """A server that never answers the SYN: the client gets a reset after connect_timeout, under loop="epoll"."""
    caplog.set_level(logging.WARNING, logger="asyncore_fwd")
    listener, fillers = blackhole()
    fwd = RunningForwarder("127.0.0.1", 0, "127.0.0.1", listener.getsockname()[1],
                           loop="epoll", connect_timeout=0.3)
    try:
        with fwd.connect() as client:
            assert recv_until_reset(client) == b""
    finally:
        fwd.stop()
        listener.close()
        for filler in fillers:
            filler.close()
    assert "connect timed out after 0.3 s" in caplog.text


def test_accepting_resumes_after_a_pause_under_the_epoll_loop(echo_server: EchoServer, sock_map: SocketMap,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A client arriving during an accept pause is accepted once it ends, not before, and relayed."""
    monkeypatch.setattr(_forwarder, "ACCEPT_PAUSE", 0.2)
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map=sock_map)
    echoed = bytearray()
    with EpollLoop(sock_map, sweep_interval=10.0) as loop:
        loop.poll(0.01)  # registers the listener; no client yet, so an idle round
        fwd.pause_accepting(OSError(errno.EMFILE, "Too many open files"))
        resume_at = time.monotonic() + 0.2
        with socket.create_connection(fwd.address, timeout=WAIT) as client:
            client.sendall(b"after the pause")
            pump(loop, lambda: take(client, echoed) == b"after the pause", "the echo after the pause")
            (conn,) = fwd.connections
            assert conn.opened_at >= resume_at


# -- LoopRunner: a map served until asked to stop, by any owner ---------------


class RunnerEcho(DatagramEcho):
    """A UDP echo on 127.0.0.1 that owns its map's loop through a ``LoopRunner``, as a
    listener of another kind would: ``between_rounds`` and ``close`` are what the runner asks of it."""

    def __init__(self, map: SocketMap, echoes: Optional[int] = None) -> None:
        super().__init__(map=map)
        self.create_socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.bind(("127.0.0.1", 0))
        self.address = self.socket.getsockname()
        self.runner = LoopRunner(map, self)
        #: Serving ends after this many echoes (None: never by itself).
        self.echoes_left = echoes
        self.closed_with: List[str] = []

    def echoed(self) -> None:
        if self.echoes_left is not None:
            self.echoes_left -= 1

    def between_rounds(self, poll_interval: float) -> Optional[float]:
        return None if self.echoes_left == 0 else poll_interval

    def close(self, reason: str = STOPPED) -> None:
        self.closed_with.append(reason)
        super().close()

    def handle_error(self) -> None:
        raise


def echo_once(address: Tuple[str, int], data: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(WAIT)
        client.sendto(data, address)
        return client.recv(2048)


def test_loop_runner_serves_a_datagram_listener_in_a_thread_for_the_block(sock_map: SocketMap) -> None:
    """``running()``: served in a thread during the block; at its end stopped, closed with "stopped", joined."""
    echo = RunnerEcho(sock_map)
    with echo.runner.running(echo.runner.serve, label="echo", thread_name="datagram echo", stop_timeout=WAIT,
                             start_timeout=WAIT):
        assert echo_once(echo.address, b"ping") == b"ping"
        assert echo.closed_with == []
    assert echo.closed_with == [STOPPED]
    assert not [thread for thread in threading.enumerate() if thread.name == "datagram echo"]
    assert sock_map == {}  # the wake-up pipe is closed too


def test_loop_runner_stops_when_its_owner_says_so_between_rounds(sock_map: SocketMap) -> None:
    """``between_rounds`` returning None ends ``serve()``: the owner is closed with "stopped"."""
    echo = RunnerEcho(sock_map, echoes=1)
    thread = threading.Thread(target=echo.runner.serve, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        assert echo_once(echo.address, b"only one") == b"only one"
    finally:
        thread.join(WAIT)
    assert not thread.is_alive()
    assert echo.closed_with == [STOPPED]


def test_loop_runner_closes_its_owner_as_stopped_by_an_error_when_the_loop_raises(
        sock_map: SocketMap, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error that ends the loop reaches the caller of ``serve()``; the owner is closed with that reason."""
    echo = RunnerEcho(sock_map)

    def broken(poll_interval: float) -> Optional[float]:
        raise RuntimeError("broken between rounds")

    monkeypatch.setattr(echo, "between_rounds", broken)
    with pytest.raises(RuntimeError, match="broken between rounds"):
        echo.runner.serve()
    assert echo.closed_with == [STOPPED_BY_ERROR]


def test_loop_runner_stop_before_serve_makes_serve_return_at_once(sock_map: SocketMap) -> None:
    """``stop()`` is for good: a ``serve()`` after it closes the owner without waiting."""
    echo = RunnerEcho(sock_map)
    echo.runner.stop()
    started = time.monotonic()
    echo.runner.serve(poll_interval=WAIT)
    assert time.monotonic() - started < WAIT
    assert echo.closed_with == [STOPPED]


# -- foreign dispatchers doing what asyncore allows ----------------------------


class Replacer(Probe):
    """A foreign dispatcher that swaps its socket for a new one on the same fd
    (asyncore's close(), then set_socket(): a reconnect or re-listen does this)."""

    def __init__(self, sock: socket.socket, map: SocketMap, socketpair: MakePair) -> None:
        super().__init__(sock, map=map)
        self.socketpair = socketpair
        self.new_peer: Optional[socket.socket] = None

    def handle_read(self) -> None:
        super().handle_read()
        if self.new_peer is None:
            fd = self._fileno
            self.close()
            sock, self.new_peer = self.socketpair(fd)
            sock.setblocking(False)
            self.set_socket(sock)
            self.connected = True
            self.received.clear()


def test_dispatcher_replacing_its_socket_on_the_same_descriptor_keeps_getting_events(
        sock_map: SocketMap, socketpair: MakePair) -> None:
    """A foreign dispatcher that swaps its socket in a handler (same fd, same mask) is read at once on the new one."""
    sock, peer = socketpair()
    replacer = Replacer(sock, sock_map, socketpair)
    fd = replacer._fileno
    peer.sendall(b"replace")
    with EpollLoop(sock_map, sweep_interval=10.0) as loop:
        sweeps = record_sweeps(loop)
        pump(loop, lambda: replacer.new_peer is not None, "the socket to be replaced")
        assert replacer._fileno == fd
        swept = len(sweeps)
        replacer.new_peer.sendall(b"on the new socket")
        # A round with no event would sweep: stop after two sweeps if the read never comes.
        pump(loop, lambda: replacer.received == b"on the new socket" or len(sweeps) > swept + 1, "the read")
    assert replacer.received == b"on the new socket"
    assert len(sweeps) == swept


class Side(Dispatcher):
    """A dispatcher of ours that reads only while ``allowed``; what it reads allows its ``partner``
    to read, as a relay side's reads change what its peer may do."""

    def __init__(self, sock: socket.socket, map: SocketMap, allowed: bool) -> None:
        super().__init__(sock, map=map)
        self.allowed = allowed
        self.received = bytearray()

    def readable(self) -> bool:
        return self.allowed

    def writable(self) -> bool:
        return False

    def handle_read(self) -> None:
        self.received += self.recv(1 << 16)
        if isinstance(self.partner, Side):
            self.partner.allowed = True

    def handle_error(self) -> None:
        raise


def test_dispatcher_made_readable_by_its_partners_event_is_read_without_waiting_for_a_sweep(
        sock_map: SocketMap, socketpair: MakePair) -> None:
    """A dispatcher's ``partner`` is asked again after the dispatcher's event: read in the next round, no sweep."""
    opener_sock, opener_peer = socketpair()
    held_sock, held_peer = socketpair()
    opener = Side(opener_sock, sock_map, allowed=True)
    held = Side(held_sock, sock_map, allowed=False)
    opener.partner = held
    held_peer.sendall(b"held back")
    rally(sock_map, socketpair)  # an event every round: no round is idle, so none sweeps for that
    with EpollLoop(sock_map, sweep_interval=3600) as loop:
        sweeps = record_sweeps(loop)
        pump(loop, lambda: len(sweeps) == 1, "the first sweep")
        for _ in range(5):
            loop.poll(0.01)
        assert held.received == b""  # not allowed: left alone
        opener_peer.sendall(b"go")
        rounds = pump(loop, lambda: held.received == b"held back", "the partner to read")
    assert opener.received == b"go"
    assert rounds <= 3  # the opener's round, then the partner's (a third if the two bytes came apart)
    assert len(sweeps) == 1


class RecordingWatcher:
    """Watches a map as a loop backend of another kind would (``ChangeWatcher``): notes what it is told."""

    def __init__(self) -> None:
        self.told: List[Tuple[object, ...]] = []

    def added(self, channel: asyncore.dispatcher) -> None:
        self.told.append(("added", channel))

    def removed(self, fd: int, channel: asyncore.dispatcher) -> None:
        self.told.append(("removed", fd, channel))


def test_a_change_watcher_is_told_when_our_dispatchers_join_and_leave_its_map(sock_map: SocketMap,
                                                                              socketpair: MakePair) -> None:
    """``watch(map, watcher)``: our dispatchers tell the watcher as they join and leave; once unwatched, not."""
    watcher = RecordingWatcher()
    _dispatcher.watch(sock_map, watcher)
    try:
        side = Side(socketpair()[0], sock_map, allowed=True)
        fd = side._fileno
        side.close()
    finally:
        _dispatcher.unwatch(sock_map, watcher)
    Side(socketpair()[0], sock_map, allowed=True).close()
    assert watcher.told == [("added", side), ("removed", fd, side)]


class Addressed(Probe):
    """A foreign dispatcher that keeps its peer's address in ``self.peer`` (or ``self.partner``)."""

    def __init__(self, sock: socket.socket, map: SocketMap, attribute: str) -> None:
        super().__init__(sock, map=map)
        setattr(self, attribute, ("127.0.0.1", 8080))


@pytest.mark.parametrize("attribute", ["peer", "partner"])
def test_foreign_dispatcher_with_its_own_peer_attribute_is_served(attribute: str, sock_map: SocketMap,
                                                                   socketpair: MakePair) -> None:
    """A foreign dispatcher whose ``peer`` or ``partner`` attribute is not a dispatcher is served like any other."""
    sock, peer = socketpair()
    addressed = Addressed(sock, sock_map, attribute)
    peer.sendall(b"hello")
    with EpollLoop(sock_map) as loop:
        pump(loop, lambda: addressed.received == b"hello", "the read")
        pump(loop, lambda: addressed.readable_calls >= 2, "the predicates asked again")


# -- asyncore.loop's own signature; regular files, which epoll refuses -------


def test_loop_takes_asyncores_arguments_in_asyncores_order() -> None:
    """``loop``'s first parameters are ``asyncore.loop``'s, by name, order and default."""
    import inspect

    ours = list(inspect.signature(_loop.loop).parameters.values())
    theirs = list(inspect.signature(asyncore.loop).parameters.values())
    assert [(p.name, p.default, p.kind) for p in ours[:len(theirs)]] == \
        [(p.name, p.default, p.kind) for p in theirs]


@pytest.mark.parametrize("use_poll", [False, True])
def test_loop_called_with_positional_arguments_runs_the_map_to_the_end(use_poll: bool, sock_map: SocketMap) -> None:
    """``loop(timeout, use_poll, map, count)``, as asyncore code calls it, serves the map."""
    listener = EchoListener(sock_map, 1)
    client = EchoClient(listener.address, MESSAGES[1], sock_map)

    _loop.loop(0.05, use_poll, sock_map, 400)

    assert bytes(client.received) == client.message
    assert not sock_map, f"still open after 400 rounds: {list(sock_map.values())}"


class FileReader(asyncore.file_dispatcher):
    """Reads a regular file; at its end, closes or (``keep_open``) stops wanting to read."""

    def __init__(self, path: str, map: SocketMap, keep_open: bool = False) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            super().__init__(fd, map=map)  # dups fd
        finally:
            os.close(fd)
        self.keep_open = keep_open
        self.at_end = False
        self.data = bytearray()

    def readable(self) -> bool:
        return not self.at_end

    def writable(self) -> bool:
        return False

    def handle_read(self) -> None:
        chunk = self.recv(1 << 16)  # asyncore's recv calls handle_close at the end of the file
        self.data += chunk

    def handle_close(self) -> None:
        self.at_end = True
        if not self.keep_open:
            self.close()

    def handle_error(self) -> None:
        raise


@pytest.mark.parametrize("kind", ["epoll", "poll", "select"])
def test_dispatcher_on_a_regular_file_is_read_to_its_end_under_every_loop(kind: str, sock_map: SocketMap,
                                                                           tmp_path) -> None:
    """A ``file_dispatcher`` on a regular file (which epoll refuses) is served as poll() serves it."""
    path = tmp_path / "content"
    path.write_bytes(payload(100_000))
    reader = FileReader(str(path), sock_map)

    _loop.loop(0.05, False, sock_map, 20, kind=kind)

    assert bytes(reader.data) == payload(100_000)
    assert not sock_map


class RecordingEpoll:
    """Wraps an ``epoll`` object and notes the timeout of each wait."""

    def __init__(self, epoll: select.epoll) -> None:
        self.epoll = epoll
        self.timeouts: List[float] = []

    def poll(self, timeout: float = -1) -> list:
        self.timeouts.append(timeout)
        return self.epoll.poll(timeout)

    def __getattr__(self, name: str) -> object:
        return getattr(self.epoll, name)


@pytest.mark.parametrize("at_end", ["closes", "stops reading"])
def test_epoll_loop_waits_again_once_no_regular_file_wants_serving(at_end: str, sock_map: SocketMap,
                                                                   socketpair: MakePair, tmp_path) -> None:
    """The epoll wait is 0 while a regular file is wanted, the caller's timeout once it is not."""
    path = tmp_path / "content"
    path.write_bytes(b"one read")
    reader = FileReader(str(path), sock_map, keep_open=at_end == "stops reading")
    Probe(socketpair()[0], sock_map)  # keeps the map, and so the loop, going
    with EpollLoop(sock_map) as loop:
        recording = loop._epoll = RecordingEpoll(loop._epoll)  # type: ignore[assignment]
        for _ in range(3):  # read, read the end, wait
            loop.poll(0.01)
    assert reader.data == b"one read" and reader.at_end
    assert recording.timeouts == [0, 0, 0.01]
