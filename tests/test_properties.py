"""Properties of the relay under random interleavings: no byte lost or doubled, a reset stays a reset.

Hypothesis writes the scripts: chunk sizes, which peer acts when, readers
that pause (with a small high-water mark, so backpressure engages), urgent
bytes, half-closes, closes and resets on either side in any order, resets
right after the accept, unreachable servers and descriptor shortages, under
each loop (epoll, poll, select) and relay (copy, splice).  The forwarder runs
in this thread one loop round at a time, so a failing example replays the
same way.  After each example every pair is closed, no descriptor is left
behind, and the forwarder still accepts and relays.

At the end, a fuzz of the configuration: random and mutated TOML files,
``-L`` specs and ``--toxic`` specs either give rules that run or one error
line (exit 2) -- never a traceback, never another exception.

The profile "ci" (the default, set in conftest.py) is short and
reproducible; ``HYPOTHESIS_PROFILE=long`` searches much further (ten times
the examples, a fresh random seed each run).  The fuzz's examples are parsed
in this process, a few milliseconds each, with a deadline of 2 s each in
every profile.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import math
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest

from conftest import ROOT, WAIT, dead_port, open_fds

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import event as note_event  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import asyncore_fwd._listener._forwarder as forwarder_module  # noqa: E402
from asyncore_fwd import Forwarder, Rule, Sender, cli  # noqa: E402
from asyncore_fwd._eventloop._loop import open_loop  # noqa: E402
from asyncore_fwd._relay import _splice
from asyncore_fwd._values._config import KEYS, ConfigError, describe_rule, parse_forward_spec  # noqa: E402
from asyncore_fwd.toxics import DIRECTIONS, Toxic, parse_toxic_spec  # noqa: E402

KiB = 1024
#: Random bytes: a byte lost, doubled or moved anywhere changes what arrives.
STREAM = random.Random(483732).randbytes(16 << 20)
#: Where each peer's bytes start in STREAM (one direction never needs 8 MiB).
STREAM_START = {"client": 0, "server": 8 << 20}

loop_kinds = st.sampled_from(["epoll", "poll", "select"])
relays = st.sampled_from(["copy", "splice"] if _splice.AVAILABLE else ["copy"])


def unread_bytes(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive queue (closing it now would send a reset)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


class Peer:
    """One end the test drives, never blocking: the client, or the server behind the forwarder.

    Keeps what the kernel took from it (``sent``), what it read
    (``received``), and how the stream toward it ended: ``eof`` (clean) or
    ``reset``.  ``fin_sent`` is set once it ended its own stream cleanly.
    """

    def __init__(self, name: str, sock: socket.socket, echo: bool = False) -> None:
        sock.setblocking(False)
        self.name, self.sock, self.echo = name, sock, echo
        self.next_byte = STREAM_START.get(name, 0)
        self.queued: List[List[Any]] = []  # [data, send flags] the kernel has not taken yet
        self.sent = bytearray()
        self.received = bytearray()
        self.eof = self.reset = False
        self.want_shutdown = self.fin_sent = self.closed = False
        self.paused = 0  # loop rounds left before it reads again

    def __repr__(self) -> str:
        state = [word for word, on in (("eof", self.eof), ("reset", self.reset), ("fin_sent", self.fin_sent),
                                       ("want_shutdown", self.want_shutdown), ("closed", self.closed)) if on]
        return (f"<{self.name} sent={len(self.sent)} queued={sum(len(d) for d, _ in self.queued)} "
                f"received={len(self.received)} {' '.join(state)}>")

    @property
    def writing(self) -> bool:
        return not (self.closed or self.reset or self.want_shutdown or self.fin_sent)

    def write(self, size: int, urgent: bool = False) -> None:
        """Queue the next ``size`` bytes of its stream (one byte sent MSG_OOB if ``urgent``)."""
        if self.writing:
            data = STREAM[self.next_byte:self.next_byte + size]
            self.next_byte += len(data)
            self.queued.append([data, socket.MSG_OOB if urgent else 0])

    def pump(self) -> None:
        """Read what has arrived (unless paused), send what is queued, shut down once asked and flushed."""
        if self.closed:
            return
        if not self.paused and not (self.eof or self.reset):
            self._read()
        self._flush()
        if self.want_shutdown and not self.queued and not (self.fin_sent or self.reset):
            try:
                self.sock.shutdown(socket.SHUT_WR)
                self.fin_sent = True
            except OSError:
                self.reset = True

    def _read(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(256 * KiB)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionResetError:
                self.reset = True
                return
            if not chunk:
                self.eof = True
                if self.echo:
                    self.want_shutdown = True
                return
            self.received += chunk
            if self.echo and not self.fin_sent:
                self.queued.append([chunk, 0])

    def _flush(self) -> None:
        while self.queued and not self.reset:
            data, flags = self.queued[0]
            try:
                count = self.sock.send(data, flags)
            except (BlockingIOError, InterruptedError):
                return
            except (ConnectionResetError, BrokenPipeError):
                self.reset = True
                return
            self.sent += data[:count]
            if count == len(data):
                self.queued.pop(0)
            else:
                self.queued[0][0] = data[count:]

    def close(self, abort: bool = False) -> None:
        """Close; with ``abort`` (or unread bytes, as the kernel does) the peer gets a reset."""
        if self.closed:
            return
        if abort:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif not self.reset and unread_bytes(self.sock) == 0:
            self.fin_sent = True  # a FIN follows what the kernel already holds
        self.queued = []
        self.sock.close()
        self.closed = True

    @property
    def done(self) -> bool:
        """Nothing more to see: the stream toward it ended, and its own was ended (or cut)."""
        return self.closed or self.reset or (self.eof and self.fin_sent)


class Relay:
    """A forwarder on its own map, stepped by this thread, in front of a backend listener."""

    def __init__(self, kind: str, relay: str, remote_port: Optional[int] = None, small_buffers: bool = False,
                 **options: Any) -> None:
        self.small_buffers = small_buffers
        #: Set once a side stopped reading because its peer held high_water bytes.
        self.backpressure = False
        self.map: Dict[int, Any] = {}
        self.backend = socket.socket()
        self.clients: List[socket.socket] = []
        self.loop: Any = None
        self.fwd: Optional[Forwarder] = None
        try:
            self._tune(self.backend)  # accepted sockets inherit the buffer sizes
            self.backend.bind(("127.0.0.1", 0))
            self.backend.listen(64)
            self.backend.settimeout(WAIT)
            self.fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", remote_port or self.backend.getsockname()[1],
                                 map=self.map, splice=relay == "splice", **options)
            if small_buffers:  # the forwarder's sockets too, so that backpressure engages early
                self._tune(self.fwd.socket)  # its client sides inherit them
                self.fwd.sender_class = self._small_buffers(self.fwd.sender_class)
            self.loop = open_loop(kind, self.map)
        except BaseException:
            self.close()
            raise

    def _tune(self, sock: socket.socket) -> None:
        if self.small_buffers:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, 4 * KiB)

    def _small_buffers(self, sender_class: type) -> type:
        relay = self

        class SmallBufferSender(sender_class):  # type: ignore[misc, valid-type]
            def create_socket(self, family: int, type: int) -> None:
                super().create_socket(family, type)
                relay._tune(self.socket)

        return SmallBufferSender

    def rounds(self, count: int, timeout: float = 0.0) -> None:
        for _ in range(count):
            self.loop.poll(timeout)
            if not self.backpressure:
                self.backpressure = any(conn.established and not side.eof_received and not side.readable()
                                        for conn in self.fwd.connections for side in (conn.receiver, conn.sender))

    def connect_client(self) -> Peer:
        """A client connected to the forwarder's listener (not accepted yet)."""
        sock = socket.socket()
        self.clients.append(sock)
        self._tune(sock)
        sock.settimeout(WAIT)
        sock.connect(self.fwd.address)
        return Peer("client", sock)

    def accept_server(self, name: str = "server", echo: bool = False) -> Optional[Peer]:
        """The forwarder's connection to the backend, if one is waiting."""
        self.backend.setblocking(False)
        try:
            sock, _ = self.backend.accept()
        except BlockingIOError:
            return None
        self.clients.append(sock)
        return Peer(name, sock, echo=echo)

    def open_pair(self) -> Tuple[Peer, Peer]:
        """A client, accepted by the forwarder, and the server side of its connect.

        The forwarder has not seen its connect complete yet: the script decides when.
        """
        client = self.connect_client()
        settle(self, [client], lambda: self.fwd.connections, "the forwarder to accept")
        self.backend.settimeout(WAIT)
        sock, _ = self.backend.accept()
        self.clients.append(sock)
        server = Peer("server", sock)
        return client, server

    def close(self) -> None:
        for sock in self.clients:
            sock.close()
        if self.fwd is not None:
            self.fwd.close()
        if self.loop is not None:
            self.loop.close()
        self.backend.close()


def settle(relay: Relay, peers: Sequence[Peer], finished: Callable[[], object], what: str,
           timeout: float = WAIT) -> None:
    """Pump the peers and step the loop until ``finished()``; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not finished():
        if time.monotonic() > deadline:
            conns = [(c, c.receiver, c.sender) for c in relay.fwd.connections] if relay.fwd else []
            pytest.fail(f"timed out after {timeout} s waiting for {what}: peers {list(peers)}, forwarder {conns}")
        for peer in peers:
            peer.pump()
        relay.rounds(1, 0.002)


def finish(relay: Relay, peers: Sequence[Peer]) -> None:
    """Let every peer read to the end and end its own stream, close each once done, then the pair."""
    for peer in peers:
        peer.paused = 0
        peer.want_shutdown = True

    def all_closed() -> bool:
        for peer in peers:
            if peer.done:
                peer.close()
        return all(peer.closed for peer in peers)

    settle(relay, peers, all_closed, "both peers to see the end of their streams")
    settle(relay, [], lambda: not relay.fwd.connections, "the forwarder to close the pair")


def check_stream(sender: Peer, receiver: Peer) -> None:
    """What ``receiver`` read is the start of what ``sender`` sent; a clean EOF means all of it."""
    got, sent = bytes(receiver.received), bytes(sender.sent)
    if not sent.startswith(got):
        where = next((i for i, (a, b) in enumerate(zip(got, sent)) if a != b), min(len(got), len(sent)))
        pytest.fail(f"{sender.name} -> {receiver.name}: {len(got)} bytes read of {len(sent)} sent, "
                    f"differing from byte {where} (lost, doubled or moved)")
    if receiver.eof:
        assert sender.fin_sent, f"{receiver.name} saw a clean EOF, but {sender.name} reset"
        assert got == sent, f"{receiver.name} saw a clean EOF after {len(got)} of {len(sent)} bytes"


def check_no_leak_and_still_relays(relay: Relay, descriptors: int) -> None:
    """Every descriptor of the finished pairs is closed; a new client is relayed both ways."""
    settle(relay, [], lambda: open_fds() == descriptors, f"{descriptors} open descriptors (now {open_fds()})")
    client, server = relay.open_pair()
    client.write(100)
    server.write(200)
    finish(relay, [client, server])
    assert client.eof and server.eof and not (client.reset or server.reset)
    check_stream(client, server)
    check_stream(server, client)
    relay.clients.clear()
    settle(relay, [], lambda: open_fds() == descriptors, f"{descriptors} open descriptors (now {open_fds()})")


# -- the main property: any interleaving -----------------------------------------------

sides = st.sampled_from(["client", "server"])
script_events = st.one_of(
    st.tuples(st.just("send"), sides, st.integers(1, 64 * KiB)),
    st.tuples(st.just("send"), sides, st.integers(64 * KiB, 256 * KiB)),
    st.tuples(st.just("send"), sides, st.integers(1, 512)),
    st.tuples(st.just("urgent"), sides),
    st.tuples(st.just("pause"), sides, st.integers(1, 10)),
    # Much more than the buffers hold, toward a reader that pauses for a while.
    st.tuples(st.just("flood"), sides, st.integers(256 * KiB, 1024 * KiB), st.integers(1, 64)),
    st.tuples(st.just("rounds"), st.integers(1, 4)),
)
#: How each peer ends: "half" = shutdown(SHUT_WR), read to EOF, then close;
#: "close" = close() at once (a reset if bytes are unread); "reset" = RST;
#: "half, then reset" = shutdown, then a reset at the end of the script.
endings = st.sampled_from(["half", "half", "close", "reset", "half, then reset"])


@st.composite
def scripts(draw: Callable[..., Any]) -> Tuple[List[tuple], Dict[str, Tuple[str, int]]]:
    """Script events, and for each side how it ends: after the script, or before one of its events."""
    events = draw(st.lists(script_events, max_size=30))
    ends = {side: (draw(endings), draw(st.integers(0, len(events))) if draw(st.booleans()) else len(events))
            for side in ("client", "server")}
    return events, ends


def flood(side: str, rounds: int = 64) -> tuple:
    return ("flood", side, 512 * KiB, rounds)


HALF_CLOSES = {"client": ("half", 1), "server": ("half", 1)}


@given(script=scripts(), kind=loop_kinds, relay_kind=relays,
       high_water=st.sampled_from([512, 4 * KiB, 64 * KiB]), read_size=st.sampled_from([500, 4 * KiB, 64 * KiB]),
       small_buffers=st.booleans())
# Cases the search may take long to reach: backpressure each way, then ends of
# every kind while it holds, with an urgent byte in the flood.
@example(([flood("client")], HALF_CLOSES), "epoll", "copy", 4 * KiB, 4 * KiB, True)
@example(([flood("server")], HALF_CLOSES), "poll", "splice", 4 * KiB, 4 * KiB, True)
@example(([flood("client"), ("urgent", "client"), ("send", "client", 1000), flood("client")], HALF_CLOSES),
         "select", "splice", 512, 500, True)
@example(([flood("server"), ("urgent", "server"), ("send", "server", 1000), flood("server")], HALF_CLOSES),
         "epoll", "copy", 512, 500, True)
@example(([flood("client", 40)], {"client": ("half", 1), "server": ("reset", 1)}),
         "epoll", "splice", 4 * KiB, 500, True)
@example(([flood("server", 40)], {"client": ("close", 1), "server": ("half, then reset", 1)}), "poll", "copy",
         64 * KiB, 4 * KiB, True)
@example(([flood("client", 40)], {"client": ("reset", 1), "server": ("half", 1)}), "select", "copy", 512, 4 * KiB, True)
# The client's EOF arrives while bytes still wait for the paused server.
@example(([("pause", "server", 60), ("send", "client", 40 * KiB), ("rounds", 40)],
          {"client": ("half", 2), "server": ("half", 3)}), "epoll", "copy", 64 * KiB, 4 * KiB, True)
@example(([("pause", "client", 60), ("send", "server", 40 * KiB), ("rounds", 40)],
          {"client": ("half", 3), "server": ("half", 2)}), "poll", "splice", 64 * KiB, 4 * KiB, True)
def test_every_byte_arrives_once_in_order_and_a_reset_never_reads_as_a_clean_end(
        script: Tuple[List[tuple], Dict[str, Tuple[str, int]]], kind: str, relay_kind: str, high_water: int,
        read_size: int, small_buffers: bool) -> None:
    """Any interleaving of sends, urgent bytes, pauses, half-closes, closes and resets on both sides."""
    events, ends = script
    relay = Relay(kind, relay_kind, high_water=high_water, read_size=read_size, small_buffers=small_buffers)
    try:
        descriptors = open_fds()
        client, server = relay.open_pair()
        peers = {"client": client, "server": server}

        def step(rounds: int) -> None:
            for _ in range(rounds):
                for peer in peers.values():
                    peer.pump()
                    peer.paused = max(0, peer.paused - 1)
                relay.rounds(1)
        for index in range(len(events) + 1):
            for side, (ending, at) in ends.items():
                peer = peers[side]
                if at == index:
                    if ending.startswith("half"):
                        peer.want_shutdown = True
                    else:
                        peer.close(abort=ending == "reset")
                if index == len(events) and ending == "half, then reset":
                    peer.pump()  # the shutdown first, if it can go now
                    peer.close(abort=True)
            if index < len(events):
                event = events[index]
                if event[0] == "send":
                    peers[event[1]].write(event[2])
                elif event[0] == "urgent":
                    peers[event[1]].write(1, urgent=True)
                elif event[0] == "pause":
                    peers[event[1]].paused = event[2]
                elif event[0] == "flood":
                    peers["server" if event[1] == "client" else "client"].paused = event[3]
                    peers[event[1]].write(event[2])
                    step(event[3])
                else:
                    step(event[1])
            for peer in peers.values():
                peer.pump()
        finish(relay, [client, server])
        for peer in (client, server):
            seen = "EOF" if peer.eof else "a reset" if peer.reset else "nothing (closed first)"
            note_event(f"{peer.name} saw {seen}")
        note_event(f"backpressure engaged: {relay.backpressure}")
        check_stream(client, server)
        check_stream(server, client)
        if ends["client"][0] == ends["server"][0] == "half":
            # Nobody closed early or reset: everything arrives both ways, then a clean EOF.
            assert client.eof and server.eof and not (client.reset or server.reset), (client, server)
        check_no_leak_and_still_relays(relay, descriptors)
    finally:
        relay.close()


# -- resets right after the accept ---------------------------------------------------------


@given(kind=loop_kinds, relay_kind=relays, greeting=st.sampled_from([0, 1, 1000, 200 * KiB]),
       rounds_before_reset=st.integers(0, 3), request=st.integers(0, 20 * KiB), client_half_closes=st.booleans())
def test_server_that_greets_and_resets_at_once_is_a_reset_for_the_client(
        kind: str, relay_kind: str, greeting: int, rounds_before_reset: int, request: int,
        client_half_closes: bool) -> None:
    """The server resets before or as the forwarder sees its connect: the greeting's start, then a reset."""
    relay = Relay(kind, relay_kind)
    try:
        descriptors = open_fds()
        client, server = relay.open_pair()
        client.write(request)
        client.want_shutdown = client_half_closes
        server.write(greeting)
        client.pump()
        server.pump()
        relay.rounds(rounds_before_reset)
        server.close(abort=True)
        finish(relay, [client])
        check_stream(server, client)
        assert client.reset and not client.eof, client
        check_no_leak_and_still_relays(relay, descriptors)
    finally:
        relay.close()


# -- servers that cannot be reached -------------------------------------------------------


@given(kind=loop_kinds, relay_kind=relays, requests=st.lists(st.integers(0, 20 * KiB), min_size=1, max_size=3),
       client_half_closes=st.booleans(), rounds_between=st.integers(0, 3))
def test_client_of_an_unreachable_server_is_reset_and_the_forwarder_keeps_accepting(
        kind: str, relay_kind: str, requests: List[int], client_half_closes: bool, rounds_between: int) -> None:
    """Connects refused one after another: each client is reset, with nothing read, and nothing is left open."""
    relay = Relay(kind, relay_kind, remote_port=dead_port())
    try:
        descriptors = open_fds()
        for request in requests:
            client = relay.connect_client()
            client.write(request)
            client.want_shutdown = client_half_closes
            client.pump()
            relay.rounds(rounds_between)
            finish(relay, [client])
            assert client.reset and not client.eof and not client.received, client
        relay.clients.clear()
        settle(relay, [], lambda: open_fds() == descriptors, f"{descriptors} open descriptors (now {open_fds()})")
    finally:
        relay.close()


# -- running out of descriptors -------------------------------------------------------------


@given(kind=loop_kinds, relay_kind=relays, faults=st.lists(st.booleans(), min_size=1, max_size=24),
       requests=st.lists(st.integers(0, 32 * KiB), min_size=1, max_size=5))
def test_running_out_of_descriptors_refuses_new_clients_but_never_cuts_a_relaying_one(
        kind: str, relay_kind: str, faults: List[bool], requests: List[int]) -> None:
    """accept(), pipe2() and the server socket fail with EMFILE now and then: each client served in full or reset."""
    relay = Relay(kind, relay_kind)
    try:
        descriptors = open_fds()
        schedule = iter(faults)
        listener = relay.fwd.socket
        real_accept, real_pipe2, real_create_socket = socket.socket.accept, _splice.os.pipe2, Sender.create_socket

        def out_of_descriptors(call: Callable[..., Any]) -> Callable[..., Any]:
            def failing(*args: Any) -> Any:
                if next(schedule, False):
                    raise OSError(errno.EMFILE, "Too many open files")
                return call(*args)
            return failing

        def accept(sock: socket.socket) -> Any:
            return (out_of_descriptors(real_accept) if sock is listener else real_accept)(sock)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(forwarder_module, "ACCEPT_PAUSE", 0.01)
            patch.setattr(socket.socket, "accept", accept)
            patch.setattr(_splice.os, "pipe2", out_of_descriptors(real_pipe2))
            patch.setattr(Sender, "create_socket", out_of_descriptors(real_create_socket))
            clients = [relay.connect_client() for _ in requests]
            for client, request in zip(clients, requests):
                client.write(request)
                client.want_shutdown = True
            everyone = list(clients)  # and the echoing servers, as the forwarder connects

            def all_clients_done() -> bool:
                server = relay.accept_server(echo=True)
                if server is not None:
                    everyone.append(server)
                for peer in everyone:
                    if peer.done:
                        peer.close()
                return all(client.closed for client in clients)

            settle(relay, everyone, all_clients_done, "every client to be served or refused")
            finish(relay, everyone[len(clients):])
        for client in clients:
            if client.reset:
                assert not client.received, f"a relaying client was cut: {client}"
            else:
                assert client.eof and client.received == client.sent, client
        relay.clients.clear()
        check_no_leak_and_still_relays(relay, descriptors)
    finally:
        relay.close()


def test_connect_that_reaches_its_own_socket_resets_the_client() -> None:
    """The kernel picks the remote's own port as the connect's local port: no server, so the client is reset."""
    probe = socket.socket()  # held while the relay binds its own ports, then released: the sender binds it
    try:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        relay = Relay("epoll", "copy", remote_port=port)
    finally:
        probe.close()
    try:
        sender_class = relay.fwd.sender_class

        class SelfConnectingSender(sender_class):  # type: ignore[misc, valid-type]
            """Binds the port the kernel could have chosen, by chance, for the connect."""

            def create_socket(self, family: int, type: int) -> None:
                super().create_socket(family, type)
                self.socket.bind(("127.0.0.1", port))

        relay.fwd.sender_class = SelfConnectingSender
        client = relay.connect_client()
        client.write(100)
        finish(relay, [client])
        assert client.reset and not client.received, client
    finally:
        relay.close()


# -- no config can crash the forwarder: random and mutated TOML, -L and --toxic specs -----------------
#
# The only outcomes are rules that run (each described in one line) or one error line (exit 2).
# The examples are parsed in this process, through the functions the command uses
# (``cli.load_rules`` for -c and -L, ``parse_toxic_spec`` for --toxic): milliseconds each.
# A few fixed examples go through the command itself, below.

#: In-process parsing is quick: the profile's examples, each well within a deadline.
fuzz_settings = settings(deadline=timedelta(seconds=2),
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                HealthCheck.large_base_example])

HUGE_DIGITS = st.integers(300, 5000).map(lambda n: "9" * n)
ADDRESSES = st.sampled_from(["127.0.0.1:0", "[::1]:0", "0.0.0.0:0", "localhost:80", "127.0.0.1:8080", "h:1",
                             "127.0.0.1", "::1:80", "[::1]", ":80", "h:0", "h:65536", "h:http", "h:8\u00b2"])
NUMBER_TEXTS = st.sampled_from(["0", "1", "-1", "-0", "-0.0", "0.5", ".25", "1e3", "1_0", "nan", "inf",
                                "1K", "512k", "1M", "2G", "1T", "1KM", "K", "1.5K", "65536", "\u0661\u0662",
                                "100ms", "1.5s", "0s", "8589934592G", "9223372036854775807",
                                "9223372036854775808"])
TEXTS = st.one_of(NUMBER_TEXTS, ADDRESSES, HUGE_DIGITS, st.text(max_size=20),
                  st.sampled_from(["10.0.0.0/8", "::1", "192.0.2.7", "10.0.0.300", "web", "my web", ""]))
KEY_NAMES = st.one_of(st.sampled_from(list(KEYS) * 3 + ["listn", "rule", "defaults", "x"]),
                      st.text(min_size=1, max_size=8))


def toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else json.dumps(key)


def toml_float(number: float) -> str:
    return "nan" if math.isnan(number) else repr(number)  # repr() writes inf, -inf and 1e+300 as TOML does


toml_scalars = st.one_of(
    st.integers(-10 ** 6, 10 ** 6).map(str), st.integers().map(str), HUGE_DIGITS,
    st.floats().map(toml_float), TEXTS.map(json.dumps), st.sampled_from(["true", "false", "1979-05-27"]))
toml_values = st.one_of(
    toml_scalars,
    st.recursive(toml_scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda items: "[" + ", ".join(items) + "]"),
        st.lists(st.tuples(KEY_NAMES.map(toml_key), inner), max_size=3).map(
            lambda pairs: "{" + ", ".join(f"{key} = {value}" for key, value in pairs) + "}")), max_leaves=8),
    st.integers(1, 60000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 6000).map(lambda n: "{a = " * n + "1" + "}" * n))


@st.composite
def toml_documents(draw: st.DrawFn) -> str:
    """A config file, mostly well-formed: [defaults], rules with listen and connect, random keys and values."""
    def pairs(keys: st.SearchStrategy[str]) -> str:
        return "".join(f"{toml_key(key)} = {value}\n" for key, value in draw(
            st.dictionaries(keys, toml_values, max_size=4)).items())

    text = pairs(KEY_NAMES) if draw(st.integers(0, 9)) == 0 else ""  # top-level keys: an error
    if draw(st.booleans()):
        text += "[defaults]\n" + pairs(KEY_NAMES)
    for index in range(draw(st.integers(0, 3))):
        text += "[[rule]]\n"
        if draw(st.integers(0, 4)):
            text += f'name = "r{index}"\nlisten = {json.dumps(draw(ADDRESSES))}\n' \
                    f'connect = {json.dumps(draw(ADDRESSES))}\n'
        text += pairs(KEY_NAMES.filter(lambda key: key not in ("name", "listen", "connect")))
    if draw(st.integers(0, 9)) == 0:
        text += f"[{toml_key(draw(KEY_NAMES))}]\n" + pairs(KEY_NAMES)
    return text


BASE_DOCUMENT = (ROOT / "examples" / "fwd.toml").read_text(encoding="utf-8")
FRAGMENTS = st.one_of(st.sampled_from(["[", "]", "{", "}", "=", '"', "'", "\n", ",", "#", "[[rule]]\n", "\x00",
                                       "\u00e9", "\\", "-", ".", "0x", "1e999", "nan", "\t"]),
                      HUGE_DIGITS, st.integers(1, 50000).map(lambda n: "[" * n), st.text(max_size=10))


@st.composite
def mutated_documents(draw: st.DrawFn) -> str:
    """The example config with a few spans deleted, replaced, repeated or inserted."""
    text = BASE_DOCUMENT
    for _ in range(draw(st.integers(1, 5))):
        start = draw(st.integers(0, len(text)))
        end = min(len(text), start + draw(st.integers(0, 12)))
        operation = draw(st.sampled_from(["delete", "replace", "insert", "repeat"]))
        piece = text[start:end] * draw(st.integers(2, 4)) if operation == "repeat" else \
            "" if operation == "delete" else draw(FRAGMENTS)
        text = text[:start] + piece + text[start if operation == "insert" else end:]
    return text


@st.composite
def forward_specs(draw: st.DrawFn) -> str:
    """-L specs: [BIND:]PORT:HOST:HOSTPORT and options, from plausible and absurd parts (or any text)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=40))
    ports = st.one_of(st.sampled_from(["0", "1", "8080", "65535", "65536", "-1", "", "http", "8\u00b2"]),
                      HUGE_DIGITS)
    hosts = st.sampled_from(["127.0.0.1", "[::1]", "::1", "localhost", "h", "", "[::1", "0.0.0.0"])
    parts = ([draw(hosts)] if draw(st.booleans()) else []) + [draw(ports), draw(hosts), draw(ports)]
    options = [f"{draw(KEY_NAMES)}={draw(TEXTS)}" for _ in range(draw(st.integers(0, 4)))]
    return ",".join([":".join(parts)] + options)


@st.composite
def toxic_specs(draw: st.DrawFn) -> str:
    """--toxic specs: [DIRECTION:]NAME[=VALUE][,KEY=VALUE...] from plausible and absurd parts (or any text)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=40))
    names = ["latency", "bandwidth", "slicer", "timeout", "limit_data", "reset_peer", "slow_close", "poison"]
    options = ["seconds", "jitter", "bytes_per_second", "average_size", "size_variation", "delay", "bytes",
               "after", "toxicity", "x"]
    values = st.one_of(NUMBER_TEXTS, HUGE_DIGITS, HUGE_DIGITS.map(lambda digits: digits + "ms"),
                       st.text(max_size=6))
    spec = draw(st.sampled_from(["", "upstream:", "downstream:", "both:", "sideways:", "::"]))
    spec += draw(st.sampled_from(names))
    if draw(st.booleans()):
        spec += "=" + draw(values)
    for _ in range(draw(st.integers(0, 3))):
        spec += f",{draw(st.sampled_from(options))}={draw(values)}"
    return spec


def check_one_line(text: str, error: bool = True) -> None:
    """One line; for an error message (``asyncore-fwd: error: MESSAGE``), a readable one: long values cut short."""
    assert text and not (error and len(text) > 600), text
    assert not any(char in text for char in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), repr(text)


def load_or_error(argv: List[str]) -> Optional[List[Rule]]:
    """``cli.load_rules`` for the rules of ``argv``: the rules, each described in one line, or None after
    checking its error is one line.  Anything else it raises fails the example."""
    args = cli.build_parser().parse_args(argv)
    try:
        rules = cli.load_rules(args)
    except ConfigError as error:
        check_one_line(str(error))
        return None
    for rule in rules:
        check_one_line(describe_rule(rule), error=False)  # the rule as it will run: every value in full
    return rules


@fuzz_settings
@given(text=st.one_of(toml_documents(), mutated_documents()))
@example(text=BASE_DOCUMENT)
@example(text=BASE_DOCUMENT + "idle_timeout = " + "9" * 400 + "\n")
@example(text=BASE_DOCUMENT + "allow = " + "[" * 50000 + "]" * 50000 + "\n")
@example(text=BASE_DOCUMENT + "x = " + "{a=" * 5000 + "1" + "}" * 5000 + "\n")
@example(text=BASE_DOCUMENT + "max_connections = " + "9" * 5000 + "\n")
@example(text=BASE_DOCUMENT + 'high_water = "' + "9" * 5000 + '"\n')
@example(text='"a\\nb" = 1\n')
def test_any_config_file_gives_rules_or_one_error_line(text: str) -> None:
    """Random and mutated TOML: rules, or a ConfigError of one line; never another exception."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "fwd.toml")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as config:
            config.write(text)
        outcome = load_or_error(["-c", path])
    note_event("rules" if outcome else "error")


@fuzz_settings
@given(specs=st.lists(forward_specs(), min_size=1, max_size=3))
@example(specs=["8080:127.0.0.1:80,max_connections=" + "9" * 5000])
@example(specs=["8080:127.0.0.1:" + "9" * 5000])
def test_any_forward_spec_gives_rules_or_one_error_line(specs: List[str]) -> None:
    """Random -L specs: rules, or a ConfigError of one line; never another exception."""
    outcome = load_or_error([f"--forward={spec}" for spec in specs])
    note_event("rules" if outcome else "error")


@fuzz_settings
@given(spec=toxic_specs())
@example(spec="limit_data=1M")
@example(spec="slicer=1K,size_variation=512")
@example(spec="bandwidth=" + "9" * 5000)
@example(spec="latency=" + "9" * 5000 + "ms")
def test_any_toxic_spec_gives_a_toxic_or_one_error_line(spec: str) -> None:
    """Random --toxic specs: a toxic, or a ValueError of one line (argparse's usage line); never another exception."""
    try:
        toxic, direction = parse_toxic_spec(spec)
    except ValueError as error:
        check_one_line(str(error))
        note_event("error")
    else:
        assert isinstance(toxic, Toxic) and direction in DIRECTIONS
        check_one_line(repr(toxic), error=False)
        note_event("toxic")


#: A flag, and the key of a rule that takes the same kind of value.
SAME_KIND = [("--high-water", "high_water"), ("--connect-timeout", "connect_timeout"), ("--backlog", "backlog"),
             ("--drain-timeout", "idle_timeout")]


@fuzz_settings
@given(flag_and_key=st.sampled_from(SAME_KIND), text=TEXTS.filter(lambda text: "," not in text))
@example(flag_and_key=("--high-water", "high_water"), text="1M")
@example(flag_and_key=("--connect-timeout", "connect_timeout"), text="-0")
@example(flag_and_key=("--drain-timeout", "idle_timeout"), text="-0")
def test_a_value_means_the_same_as_a_flag_and_as_a_forward_option(flag_and_key: Tuple[str, str], text: str) -> None:
    """One reading of each kind of value: a flag takes a text if and only if the key of a -L option (and of a config
    file) does, and reads the same value from it."""
    flag, key = flag_and_key
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            from_flag = getattr(cli.build_parser().parse_args([f"{flag}={text}"]), flag[2:].replace("-", "_"))
    except SystemExit:
        from_flag = None
    try:
        from_option = getattr(parse_forward_spec(f"0:127.0.0.1:80,{key}={text}"), key)
    except ConfigError:
        from_option = None
    assert from_flag == from_option


@pytest.mark.parametrize("argv", [
    ["-c", "{config}"],
    ["-c", "{config}", "--check-config"],
    ["-L", "0:127.0.0.1:" + "9" * 5000],
    ["-L", "0:127.0.0.1:80,idle_timeout=" + "9" * 5000, "--check-config"],
    ["-p", "9" * 5000, "-r", "127.0.0.1", "-P", "80"],
    ["-p", "0", "-r", "127.0.0.1", "-P", "80", "--toxic", "slicer=" + "9" * 5000],
    ["-p", "0", "-r", "127.0.0.1", "-P", "80", "--toxic", "latency=" + "9" * 5000 + "ms"],
], ids=["config", "config-check", "forward-port", "forward-option", "port", "toxic-size", "toxic-time"])
def test_the_command_reports_absurd_values_in_one_line_and_exits_2(argv: List[str], tmp_path: Path) -> None:
    """Through the command itself (a child process): exit 2, one line ``asyncore-fwd: error: ...``."""
    config = tmp_path / "fwd.toml"
    config.write_text(BASE_DOCUMENT + "idle_timeout = " + "9" * 400 + "\nallow = " + "[" * 50000 + "]" * 50000)
    result = subprocess.run([sys.executable, "-m", "asyncore_fwd", *(arg.format(config=config) for arg in argv)],
                            capture_output=True, text=True, timeout=WAIT)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr.startswith("asyncore-fwd: error: ") and result.stderr.count("\n") == 1, result.stderr
