"""The lessons in examples/lessons: each step fixes what it says, and no more.

Every defect of the article's recipe (the numbers 1-11 of the README's list)
has a test here, run against every step from step01 to step11.  ``FIXED_IN``
says which step fixes it; at the steps before, the test is a strict xfail,
so the lessons, their README and this table cannot drift apart.  Each test
injects its condition (accept() returning None or raising EMFILE, a slow
resolver, descriptors above 1023, a descriptor reused within one round...)
rather than waiting for it to happen.

The steps are standalone scripts: a test loads one as a module and drives
its loop (the global asyncore map) one round at a time through its
``serve(timeout, count)``, between the client's and the server's moves, all
in this thread.  step00 (the article, Python 2) runs as a child process.

step11 is the forwarder on asyncio: no asyncore map, so its ``serve()`` runs
the asyncio loop for ``count`` slices of ``timeout`` s, and its objects are
found through the loop's transports.  Where a test injects an asyncore-only
condition, the step11 branch injects asyncio's counterpart (a socket's
send() and sendmsg() held back, the loop's create_connection() failing, the
loop's select() calls counted); the table on docs/lessons/step11.md names
each one.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import pytest

from conftest import ROOT, WAIT, EchoServer, free_port, needs_ipv6, payload, raise_fd_limit, recv_all, recv_exactly

LESSONS = ROOT / "examples" / "lessons"
STEP_FILES: Dict[int, Path] = {int(path.name[4:6]): path for path in sorted(LESSONS.glob("step[0-9][0-9]_*.py"))}
LAST_STEP = max(STEP_FILES)

#: (defect number, short name) -> the first step that passes its test.
#: The one place that says which lesson fixes what (the README's table says
#: the same in words).  Defect 3 has two halves, 7 and 8 three parts each.
FIXED_IN: Dict[Tuple[int, str], int] = {
    (1, "str vs bytes"): 1,
    (3, "buffer copied on every send"): 2,
    (3, "no backpressure"): 3,
    (4, "select() fails past descriptor 1023"): 4,
    (2, "reply lost after the client's EOF"): 5,
    (2, "buffered data lost at the server's EOF"): 5,
    (9, "busy loop after EOF"): 6,
    (10, "POLLHUP drops data still queued"): 7,
    (5, "accept() returning None"): 8,
    (6, "EMFILE closes the listener"): 8,
    (6, "EMFILE for the server socket strands the client's"): 8,
    (7, "name lookup inside the loop"): 9,
    (7, "no connect timeout"): 9,
    (7, "a traceback per refused connect"): 9,
    (8, "IPv4 only"): 9,
    (8, "no connection log"): 9,
    (8, "wrong -r help text"): 9,
    (11, "events for a reused descriptor"): 10,
}


def defect(number: int, name: str, first_step: int = 1) -> pytest.MarkDecorator:
    """Run the test once per step; a strict xfail at the steps before the fix."""
    fixed = FIXED_IN[number, name]
    params = []
    for step_number in range(first_step, LAST_STEP + 1):
        marks = []
        if step_number < fixed:
            marks.append(pytest.mark.xfail(strict=True, reason=f"defect {number}: {name}, fixed in step{fixed:02d}"))
        params.append(pytest.param(step_number, id=f"step{step_number:02d}", marks=marks))
    return pytest.mark.parametrize("step_number", params)


# -- fixtures and helpers --------------------------------------------------


def load_step(step_number: int) -> types.ModuleType:
    """Import the step's file as a fresh module (its main block does not run)."""
    path = STEP_FILES[step_number]
    spec = importlib.util.spec_from_file_location(f"lesson_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def step(step_number: int) -> Iterator[types.ModuleType]:
    """The step as a module; whatever it left in asyncore's global map (or its asyncio loop) is closed at teardown."""
    module = load_step(step_number)
    if on_asyncio(module):
        yield from asyncio_step(module)
        return
    channels = module.asyncore.socket_map
    assert not channels, f"channels left over by an earlier test: {channels}"
    yield module
    module.asyncore.close_all(ignore_all=True)


def on_asyncio(step: types.ModuleType) -> bool:
    """Whether the step runs on asyncio (step11) rather than on asyncore's map."""
    return not hasattr(step, "asyncore")


def asyncio_step(module: types.ModuleType) -> Iterator[types.ModuleType]:
    """An asyncio step whose forwarders are recorded; its listeners, transports, tasks and loop closed at teardown."""
    made: List[object] = []

    # asyncio keeps no list of listening sockets: the tests need one, to find and close them.
    class recorded(module.forwarder):
        def __init__(self, *args: object) -> None:
            super().__init__(*args)
            made.append(self)

    recorded.__name__ = "forwarder"
    module.forwarder = recorded
    module.forwarders_made = made
    yield module
    loop = module.loop
    if loop is None:
        return
    for transport in live_transports(loop):
        transport.abort()
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()

    async def cancelled_and_lost() -> None:
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # the aborted transports' connection_lost() calls

    loop.run_until_complete(cancelled_and_lost())
    loop.run_until_complete(loop.shutdown_default_executor())
    for fwd in made:  # after the last run: a paused listener's call_later() must not fire
        if fwd.socket.fileno() != -1:
            loop.remove_reader(fwd.socket)
            fwd.socket.close()
    loop.close()


def live_transports(loop: asyncio.AbstractEventLoop) -> list:
    """The loop's socket transports not yet closing (asyncio has no public list of them)."""
    return [transport for transport in list(loop._transports.values())
            if transport is not None and not transport.is_closing()]


def socket_of(transport: asyncio.BaseTransport) -> socket.socket:
    """The socket.socket under an asyncio transport (its extra info gives only a wrapper)."""
    return transport._sock


def limit_sends(monkeypatch: pytest.MonkeyPatch, sock: socket.socket, limit: List[int]) -> None:
    """send() and sendmsg() on ``sock`` take at most ``limit[0]`` bytes a call (0: EAGAIN), whatever the kernel says."""
    real_send = socket.socket.send

    def send(self: socket.socket, data: bytes, *args: int) -> int:
        if self is not sock:
            return real_send(self, data, *args)
        if limit[0] == 0:
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        return real_send(self, memoryview(data)[:limit[0]], *args)

    real_sendmsg = socket.socket.sendmsg

    def sendmsg(self: socket.socket, buffers: Iterable[bytes], *args: object) -> int:
        if self is not sock:
            return real_sendmsg(self, buffers, *args)
        return send(self, next(iter(buffers)))

    monkeypatch.setattr(socket.socket, "send", send)
    monkeypatch.setattr(socket.socket, "sendmsg", sendmsg)


@pytest.fixture
def sockets() -> Iterator[List[socket.socket]]:
    """Sockets to close at teardown."""
    opened: List[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def pump(step: types.ModuleType, done: Callable[[], object], timeout: float = 2.0, what: str = "condition") -> None:
    """Run the step's loop one round at a time until ``done()``; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        step.serve(0.01, 1)


class Reader:
    """What a non-blocking socket has received so far; read between loop rounds."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = bytearray()
        self.eof = False

    def poll(self) -> bool:
        """Read what is there; return True once EOF (or a reset) has been seen."""
        while not self.eof:
            try:
                chunk = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except ConnectionError:
                self.eof = True
                break
            if chunk:
                self.data += chunk
            else:
                self.eof = True
        return self.eof


def channels_of(step: types.ModuleType, cls: type) -> list:
    """The step's live objects of ``cls``: dispatchers in asyncore's map, or an asyncio step's protocols."""
    if not on_asyncio(step):
        return [obj for obj in step.asyncore.socket_map.values() if isinstance(obj, cls)]
    if cls is step.forwarder:
        return [fwd for fwd in step.forwarders_made if fwd.socket.fileno() != -1]
    if step.loop is None:
        return []
    protocols = [transport.get_protocol() for transport in live_transports(step.loop)]
    return [protocol for protocol in protocols if isinstance(protocol, cls)]


def start(step: types.ModuleType, remote_port: int, remote_host: str = "127.0.0.1",
          local_host: str = "127.0.0.1") -> Tuple[str, int]:
    """Create the step's forwarder on port 0; return the address it listens on."""
    fwd = step.forwarder(local_host, 0, remote_host, remote_port)
    return fwd.socket.getsockname()[:2]


def client_of(address: Tuple[str, int], sockets: List[socket.socket]) -> socket.socket:
    client = socket.create_connection(address, timeout=WAIT)
    client.setblocking(False)
    sockets.append(client)
    return client


def round_trip(step: types.ModuleType, client: socket.socket, message: bytes = b"ping") -> bytes:
    """Send ``message`` through to an echo server; what came back before EOF or ``message``'s length."""
    client.sendall(message)
    reader = Reader(client)
    pump(step, lambda: reader.poll() or len(reader.data) >= len(message), what="echo")
    return bytes(reader.data)


def through(step: types.ModuleType, sockets: List[socket.socket]) -> Tuple[socket.socket, socket.socket]:
    """A client connected through the step to a server socket of our own: (client, server side)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    sockets.append(listener)
    client = client_of(start(step, listener.getsockname()[1]), sockets)
    accepted: List[socket.socket] = []

    def server_accepted() -> bool:
        try:
            accepted.append(listener.accept()[0])
        except BlockingIOError:
            pass
        return bool(accepted)

    pump(step, server_accepted, what="connection to the server")
    server = accepted[0]
    server.setblocking(False)
    sockets.append(server)
    return client, server


def half_close_request(step: types.ModuleType, client: socket.socket, server: socket.socket) -> bytes:
    """The client sends a request and shuts down its write side; what the server got before EOF."""
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    request = Reader(server)
    pump(step, request.poll, what="EOF at the server")
    return bytes(request.data)


# -- defect 1: str vs bytes -------------------------------------------------


@pytest.fixture
def run_script() -> Iterator[Callable[..., Tuple[subprocess.Popen, Tuple[str, int]]]]:
    """``run_script(python, path, remote_port)`` starts a step as a reader would; killed at teardown."""
    started: List[subprocess.Popen] = []

    def run(python: str, path: Path, remote_port: int,
            env: Optional[Dict[str, str]] = None) -> Tuple[subprocess.Popen, Tuple[str, int]]:
        port = free_port()
        process = subprocess.Popen(
            [python, str(path), "-l", "127.0.0.1", "-p", str(port), "-r", "127.0.0.1", "-P", str(remote_port)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
        started.append(process)
        deadline = time.monotonic() + WAIT
        while True:  # listening yet?
            try:
                socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
                return process, ("127.0.0.1", port)
            except ConnectionRefusedError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{path.name} did not start: {process.communicate(timeout=WAIT)}")
                time.sleep(0.02)

    yield run
    for process in started:
        process.kill()
        process.communicate(timeout=WAIT)


@defect(1, "str vs bytes", first_step=0)
def test_script_relays_bytes_both_ways(step_number: int, run_script, echo_server: EchoServer) -> None:
    """Run as a script under this Python, the step passes a message to the server and back."""
    _, address = run_script(sys.executable, STEP_FILES[step_number], echo_server.port)
    with socket.create_connection(address, timeout=WAIT) as client:
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"


def test_step00_fails_at_the_first_recv_on_python3(run_script, echo_server: EchoServer) -> None:
    """The article's '' += bytes raises TypeError at the first read; asyncore closes the client."""
    process, address = run_script(sys.executable, STEP_FILES[0], echo_server.port)
    with socket.create_connection(address, timeout=WAIT) as client:
        client.sendall(b"ping")
        assert recv_all(client) == b""
    process.kill()
    out, _ = process.communicate(timeout=WAIT)
    assert "TypeError" in out and 'concatenate str (not "bytes")' in out, out


def test_step11_runs_without_asyncore(run_script, echo_server: EchoServer, tmp_path: Path) -> None:
    """Where no asyncore can be imported (3.12+ without the backport), step11 still relays."""
    (tmp_path / "asyncore.py").write_text("raise ImportError('no asyncore here')\n")
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    _, address = run_script(sys.executable, STEP_FILES[11], echo_server.port, env={"PYTHONPATH": pythonpath})
    with socket.create_connection(address, timeout=WAIT) as client:
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"


@pytest.mark.parametrize("step_number", [11])
def test_step11_passes_a_reset_on_as_a_reset(step: types.ModuleType, sockets: List[socket.socket]) -> None:
    """The client resets its connection: the server's recv() fails with ECONNRESET, not a clean EOF."""
    client, server = through(step, sockets)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    outcome: List[object] = []

    def server_saw_the_end() -> bool:
        try:
            outcome.append(server.recv(1024))
        except BlockingIOError:
            pass
        except ConnectionResetError as error:
            outcome.append(error)
        return bool(outcome)

    pump(step, server_saw_the_end, what="the end at the server")
    assert isinstance(outcome[0], ConnectionResetError), outcome


def find_python27() -> Optional[str]:
    candidates = ["python2.7", "python2"]
    try:
        prefix = subprocess.run(["pyenv", "prefix", "2.7"], capture_output=True, text=True, timeout=WAIT).stdout
        if prefix.strip():
            candidates.insert(0, os.path.join(prefix.strip(), "bin", "python"))
    except (OSError, subprocess.SubprocessError):
        pass
    for candidate in candidates:
        try:
            probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[0])"],
                                   capture_output=True, text=True, timeout=WAIT)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0 and probe.stdout.strip() == "2":
            return candidate
    return None


def test_step00_relays_on_python27(run_script, echo_server: EchoServer) -> None:
    """The article's code as printed works where it was written for: Python 2.7."""
    python27 = find_python27()
    if python27 is None:
        pytest.skip("no Python 2.7 installed")
    _, address = run_script(python27, STEP_FILES[0], echo_server.port)
    with socket.create_connection(address, timeout=WAIT) as client:
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"


# -- defect 3: the copy per send, and no backpressure -----------------------


@defect(3, "buffer copied on every send")
def test_send_consumes_the_buffer_in_place(step: types.ModuleType, sockets: List[socket.socket]) -> None:
    """A partial send leaves the rest where it was: no copy of everything still waiting."""
    if on_asyncio(step):
        return receiver_keeps_no_buffer_on_asyncio(step)
    ours, theirs = socket.socketpair()
    sockets += [ours, theirs]
    side = step.receiver(ours)
    side.sender = types.SimpleNamespace(eof=False, write_closed=False)  # no server side needed here
    side.to_remote_buffer += b"x" * 100_000
    buffer = side.to_remote_buffer
    side.send = lambda data: 1000  # the client took 1000 bytes of it
    side.handle_write()
    assert len(side.to_remote_buffer) == 99_000
    assert side.to_remote_buffer is buffer, "the rest was copied into a new buffer"


def receiver_keeps_no_buffer_on_asyncio(step: types.ModuleType) -> None:
    """asyncio: the receiver keeps no buffer to copy; each chunk goes to the sender's transport as it came.

    What a partial send leaves is then the transport's to keep (the step's
    page says how each Python keeps it).
    """
    side = step.receiver("127.0.0.1", 9)
    written: List[bytes] = []
    side.sender = types.SimpleNamespace(transport=types.SimpleNamespace(write=written.append))
    chunk = payload(100_000)
    side.data_received(chunk)
    assert len(written) == 1 and written[0] is chunk, "the chunk was copied before the transport got it"
    kept = [name for name, value in vars(side).items() if isinstance(value, (bytes, bytearray, memoryview))]
    assert kept == [], f"the receiver keeps bytes of its own: {kept}"


@defect(3, "no backpressure")
def test_stops_reading_while_the_server_takes_nothing(step: types.ModuleType, sockets: List[socket.socket],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """While the server side takes nothing, the client's bytes wait in the kernel, not in our buffer."""
    client, _ = through(step, sockets)
    if on_asyncio(step):
        # The sender's transport holds what waits; asyncio reads up to max_size
        # bytes at a time, and pauses the client's side once past the limit.
        sender, = channels_of(step, step.sender)
        limit_sends(monkeypatch, socket_of(sender.transport), [0])  # the server's window stays shut
        buffered = sender.transport.get_write_buffer_size
        bound = step.BUFFER_LIMIT + sender.transport.max_size
    else:
        monkeypatch.setattr(step.sender, "send", lambda self, data: 0)  # the server's window stays shut
        receiver, = channels_of(step, step.receiver)
        buffered = lambda: len(receiver.from_remote_buffer)  # noqa: E731
        bound = 256 * 1024
    data = payload(1 << 20)
    sent, most, last_progress = 0, 0, time.monotonic()
    deadline = last_progress + 2.0
    # Until nothing moves for 0.2 s: neither the client's sends nor our buffer.
    while most <= bound and time.monotonic() - last_progress < 0.2 and time.monotonic() < deadline:
        try:
            if sent < len(data):
                sent += client.send(data[sent:sent + (1 << 16)])
                last_progress = time.monotonic()
        except BlockingIOError:
            pass
        step.serve(0.01, 1)
        if buffered() > most:
            most = buffered()
            last_progress = time.monotonic()
    assert sent > bound, "the client could not even send enough to tell"
    assert most <= bound, f"{most} bytes buffered for a server that takes nothing"


# -- defect 4: select() and descriptor 1024 --------------------------------


@defect(4, "select() fails past descriptor 1023")
def test_relays_on_descriptors_above_1023(step: types.ModuleType, sockets: List[socket.socket]) -> None:
    """With every descriptor of the connection above 1023, bytes still pass."""
    if raise_fd_limit(2048) < 1100:
        pytest.skip("cannot open 1100 descriptors")
    fillers: List[int] = []
    try:
        while not fillers or fillers[-1] < 1030:  # what opens next gets a number above 1023
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        client, server = through(step, sockets)
        assert min(client.fileno(), server.fileno()) > 1023
        client.sendall(b"ping")
        got = Reader(server)
        pump(step, lambda: got.poll() or len(got.data) >= 4, what="data at the server")
        assert got.data == b"ping"
    finally:
        for fd in fillers:
            os.close(fd)


# -- defects 2, 9, 10: half-close ------------------------------------------


@defect(2, "reply lost after the client's EOF")
def test_client_that_half_closes_still_gets_the_reply(step: types.ModuleType, sockets: List[socket.socket]) -> None:
    """printf 'request' | nc -N: the request reaches the server, EOF after it, and the reply comes back."""
    client, server = through(step, sockets)
    assert half_close_request(step, client, server) == b"request"
    server.sendall(b"reply")
    reply = Reader(client)
    pump(step, lambda: reply.poll() or reply.data == b"reply", what="reply")
    assert reply.data == b"reply"


@defect(2, "buffered data lost at the server's EOF")
def test_data_buffered_when_the_server_closes_still_reaches_the_client(
        step: types.ModuleType, sockets: List[socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    """The client takes 1000 bytes per send, so the reply is still buffered at the server's FIN: all of it arrives."""
    client, server = through(step, sockets)
    if on_asyncio(step):
        receiver, = channels_of(step, step.receiver)
        limit_sends(monkeypatch, socket_of(receiver.transport), [1000])
    else:
        dispatcher_send = step.asyncore.dispatcher.send
        monkeypatch.setattr(step.receiver, "send", lambda self, data: dispatcher_send(self, data[:1000]))
    reply = payload(32 * 1024)
    server.setblocking(True)
    server.settimeout(WAIT)
    server.sendall(reply)
    server.shutdown(socket.SHUT_WR)
    got = Reader(client)
    pump(step, got.poll, what="EOF at the client")
    assert len(got.data) == len(reply) and got.data == reply


@defect(9, "busy loop after EOF")
def test_half_closed_connection_waits_without_spinning(step: types.ModuleType,
                                                       sockets: List[socket.socket]) -> None:
    """While the server thinks, after the client's EOF, the loop sleeps (and the reply still comes)."""
    client, server = through(step, sockets)
    half_close_request(step, client, server)
    rounds = loop_rounds_in(step, 0.3)
    server.sendall(b"reply")
    reply = Reader(client)
    pump(step, lambda: reply.poll() or reply.data == b"reply", what="reply")
    assert reply.data == b"reply"
    assert rounds < 30, f"{rounds} loop rounds in 0.3 s with nothing to do"


@defect(10, "POLLHUP drops data still queued")
def test_whole_reply_arrives_when_the_server_closes_right_after_it(step: types.ModuleType,
                                                                    sockets: List[socket.socket]) -> None:
    """A reply of many recv() chunks, then the server's FIN, all queued at once: the client gets all of it."""
    client, server = through(step, sockets)
    half_close_request(step, client, server)
    reply = payload(32 * 1024)  # eight of the steps' 4096-byte reads
    server.setblocking(True)
    server.settimeout(WAIT)
    server.sendall(reply)
    server.shutdown(socket.SHUT_WR)  # both ways of the forwarder's socket are now shut: POLLHUP
    got = Reader(client)
    pump(step, got.poll, what="EOF at the client")
    assert len(got.data) == len(reply) and got.data == reply


def loop_rounds_in(step: types.ModuleType, seconds: float) -> int:
    """The rounds the step's loop makes in ``seconds`` with nothing to do: a few if it sleeps; thousands if it spins."""
    if not on_asyncio(step):
        rounds, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            step.serve(0.05, 1)
            rounds += 1
        return rounds
    # serve() runs asyncio's loop for a whole slice: count its select() calls.
    selector = step.loop._selector
    real_select = selector.select
    calls: List[int] = []

    def select(timeout: Optional[float] = None) -> list:
        calls.append(1)
        return real_select(timeout)

    selector.select = select
    try:
        step.serve(seconds, 1)
    finally:
        del selector.select
    return len(calls)


# -- defects 5, 6: accept --------------------------------------------------


@defect(5, "accept() returning None")
def test_keeps_accepting_after_accept_returns_none(step: types.ModuleType, sockets: List[socket.socket],
                                                   echo_server: EchoServer, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """asyncore's accept() returns None when the client has gone; no error, and the next client is served."""
    caplog.set_level(logging.INFO)
    address = start(step, echo_server.port)
    original = step.forwarder.accept
    calls: List[int] = []

    def accept_none_first(self):
        calls.append(1)
        return None if len(calls) == 1 else original(self)

    monkeypatch.setattr(step.forwarder, "accept", accept_none_first)
    client = client_of(address, sockets)
    assert round_trip(step, client) == b"ping"
    assert len(calls) >= 2
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert errors == []


@defect(6, "EMFILE closes the listener")
def test_pauses_accepting_while_out_of_descriptors(step: types.ModuleType, sockets: List[socket.socket],
                                                   echo_server: EchoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """accept() fails with EMFILE for 0.3 s: the listener waits (no spin), then serves the client."""
    address = start(step, echo_server.port)
    monkeypatch.setattr(step, "ACCEPT_PAUSE", 0.05, raising=False)
    original = step.forwarder.accept
    out_of_descriptors_until = time.monotonic() + 0.3
    calls: List[int] = []

    def accept_emfile(self):
        calls.append(1)
        if time.monotonic() < out_of_descriptors_until:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return original(self)

    monkeypatch.setattr(step.forwarder, "accept", accept_emfile)
    client = client_of(address, sockets)
    assert round_trip(step, client) == b"ping"
    assert len(calls) < 30, f"accept() called {len(calls)} times in 0.3 s: a busy loop"


@defect(6, "EMFILE for the server socket strands the client's")
def test_out_of_descriptors_for_the_server_socket_leaves_nothing_behind(
        step: types.ModuleType, sockets: List[socket.socket], echo_server: EchoServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's socket is accepted, the server's cannot be made: the client's side leaves the map."""
    start(step, echo_server.port)
    monkeypatch.setattr(step, "ACCEPT_PAUSE", 0.05, raising=False)
    failures: List[int] = []

    def create_socket_emfile(self, *args: object) -> None:
        failures.append(1)
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    if on_asyncio(step):
        # The socket is made inside the loop's create_connection(), which raises what socket() raised.
        async def create_connection_emfile(*args: object, **kwargs: object) -> None:
            create_socket_emfile(None)

        monkeypatch.setattr(step.loop, "create_connection", create_connection_emfile)
    else:
        monkeypatch.setattr(step.sender, "create_socket", create_socket_emfile)
    listener = channels_of(step, step.forwarder)[0]
    client_of(listener.socket.getsockname()[:2], sockets)
    pump(step, lambda: failures, what="the failed server socket")
    step.serve(0.01, 3)
    assert channels_of(step, step.receiver) == []


# -- defect 7: connecting to the server -------------------------------------


def is_numeric(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            pass
    return False


@defect(7, "name lookup inside the loop")
def test_slow_name_lookup_does_not_stall_the_loop(step: types.ModuleType, sockets: List[socket.socket],
                                                   echo_server: EchoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The remote is a host name that takes 0.5 s to look up: no loop round takes that long."""
    real_getaddrinfo = socket.getaddrinfo
    real_connect_ex = socket.socket.connect_ex

    def slow_getaddrinfo(host, *args, **kwargs):
        if host == "slow.invalid":
            time.sleep(0.5)
            host = "127.0.0.1"
        return real_getaddrinfo(host, *args, **kwargs)

    def connect_ex(self, address):
        # connect_ex() looks a name up in C; send it through the slow resolver.
        if not is_numeric(address[0]):
            address = socket.getaddrinfo(address[0], address[1], self.family, self.type)[0][4]
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    address = start(step, echo_server.port, remote_host="slow.invalid")  # a lookup at start is fine
    client = client_of(address, sockets)
    client.sendall(b"ping")
    echo = Reader(client)
    longest, deadline = 0.0, time.monotonic() + 2.0
    while not (echo.poll() or len(echo.data) >= 4) and time.monotonic() < deadline:
        began = time.monotonic()
        step.serve(0.01, 1)
        longest = max(longest, time.monotonic() - began)
    assert echo.data == b"ping"
    assert longest < 0.25, f"one loop round took {longest:.2f} s"


@defect(7, "no connect timeout")
def test_gives_up_on_a_server_that_does_not_answer(step: types.ModuleType, sockets: List[socket.socket],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's accept queue is full, so its SYNs go unanswered: the client is closed after the timeout."""
    silent = socket.create_server(("127.0.0.1", 0), backlog=0)
    sockets.append(silent)
    sockets.append(socket.create_connection(silent.getsockname(), timeout=WAIT))  # fills the accept queue
    monkeypatch.setattr(step, "CONNECT_TIMEOUT", 0.1, raising=False)
    client = client_of(start(step, silent.getsockname()[1]), sockets)
    client.sendall(b"ping")
    closed = Reader(client)
    pump(step, closed.poll, timeout=1.0, what="EOF at the client")
    assert closed.data == b""


@defect(7, "a traceback per refused connect")
def test_refused_connect_is_one_log_line(step: types.ModuleType, sockets: List[socket.socket],
                                         caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    """The server refuses: the client is closed, with one warning logged and no traceback printed."""
    refusing = socket.socket()  # bound, not listening: a connect gets RST
    refusing.bind(("127.0.0.1", 0))
    sockets.append(refusing)
    caplog.set_level(logging.INFO)
    client = client_of(start(step, refusing.getsockname()[1]), sockets)
    client.sendall(b"ping")
    closed = Reader(client)
    pump(step, closed.poll, what="EOF at the client")
    printed = "".join(capsys.readouterr())
    assert "Traceback" not in printed and "uncaptured python exception" not in printed, printed
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "refused" in warnings[0], warnings


# -- defect 8: IPv6, logging, help text --------------------------------------


@needs_ipv6
@defect(8, "IPv4 only")
def test_relays_between_ipv6_addresses(step: types.ModuleType, sockets: List[socket.socket]) -> None:
    """-l ::1 -r ::1 works."""
    server = EchoServer("::1")
    try:
        client = client_of(start(step, server.port, remote_host="::1", local_host="::1"), sockets)
        assert round_trip(step, client) == b"ping"
    finally:
        server.close()


@defect(8, "no connection log")
def test_logs_each_connection(step: types.ModuleType, sockets: List[socket.socket], echo_server: EchoServer,
                              caplog: pytest.LogCaptureFixture) -> None:
    """A log record names the client's port."""
    caplog.set_level(logging.INFO)
    client = client_of(start(step, echo_server.port), sockets)
    assert round_trip(step, client) == b"ping"
    client_port = str(client.getsockname()[1])
    assert any(client_port in record.getMessage() for record in caplog.records), caplog.text


@defect(8, "wrong -r help text")
def test_help_describes_the_remote_address(step_number: int) -> None:
    """--help says that -r is the remote address to connect to (the article: 'Local IP address to bind to')."""
    result = subprocess.run([sys.executable, "-W", "error", str(STEP_FILES[step_number]), "--help"],
                            capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())
    remote_help = re.search(r"--remote-ip=REMOTE_IP (.*?) -P", help_text)
    assert remote_help, help_text
    assert "Local" not in remote_help.group(1) and "connect" in remote_help.group(1), remote_help.group(1)


# -- defect 11: a descriptor reused within one round ------------------------


@defect(11, "events for a reused descriptor")
def test_event_for_a_closed_socket_does_not_reach_its_successor(
        step: types.ModuleType, sockets: List[socket.socket], echo_server: EchoServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """python/cpython#75114: in one round, a pair closes and a new client gets its descriptor numbers.

    The old client's data makes its socket readable in that round; the
    event must not go to the new client's socket (a recv() of nothing,
    EAGAIN, which dropped the new client).
    """
    if on_asyncio(step):
        return stale_event_goes_nowhere_on_asyncio(step, sockets, echo_server, monkeypatch)
    address = start(step, echo_server.port)
    first = client_of(address, sockets)
    assert round_trip(step, first) == b"ping"
    old_receiver, = channels_of(step, step.receiver)
    old_sender, = channels_of(step, step.sender)
    reused_fd = old_receiver.socket.fileno()
    second = client_of(address, sockets)  # waits in the listener's backlog
    first.sendall(b"stale")  # makes the old client's socket readable
    fillers: List[int] = []
    try:
        top = max(reused_fd, old_sender.socket.fileno())
        while True:  # fill the lower gaps: the pair's numbers are the next free ones
            fd = os.open(os.devnull, os.O_RDONLY)
            if fd > top:
                os.close(fd)
                break
            fillers.append(fd)
        original = step.forwarder.handle_accept
        new_fds: List[int] = []

        def close_first_pair_then_accept(self):
            # As if another handler had closed the pair earlier in this round.
            if old_receiver.socket is not None:
                old_receiver.close()
                old_sender.close()
            original(self)
            new_fds.extend(side.socket.fileno() for side in channels_of(step, step.receiver))

        monkeypatch.setattr(step.forwarder, "handle_accept", close_first_pair_then_accept)
        step.serve(0.01, 1)  # the listener first (it is first in the map), then the old socket's event
    finally:
        for fd in fillers:
            os.close(fd)
    assert new_fds == [reused_fd], "the new client did not get the old one's descriptor number"
    assert round_trip(step, second) == b"ping"


def stale_event_goes_nowhere_on_asyncio(step: types.ModuleType, sockets: List[socket.socket],
                                        echo_server: EchoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same round on asyncio: the listener's accept() closes the old pair first, and the new client gets its number.

    asyncio queues an event as the handle registered for the socket, and
    closing the transport cancels that handle: the old socket's event
    reaches neither the old receiver nor the new one.
    """
    address = start(step, echo_server.port)
    first = client_of(address, sockets)
    assert round_trip(step, first) == b"ping"
    old_receiver, = channels_of(step, step.receiver)
    old_sender, = channels_of(step, step.sender)
    old_sockets = [socket_of(old_receiver.transport), socket_of(old_sender.transport)]
    reused_fd = old_sockets[0].fileno()
    old_reads: List[bytes] = []
    monkeypatch.setattr(old_receiver, "data_received", old_reads.append)
    second = client_of(address, sockets)  # waits in the listener's backlog
    first.sendall(b"stale")  # makes the old client's socket readable
    fillers: List[int] = []
    new_fds: List[int] = []
    try:
        top = max(sock.fileno() for sock in old_sockets)
        while True:  # fill the lower gaps: the pair's numbers are the next free ones
            fd = os.open(os.devnull, os.O_RDONLY)
            if fd > top:
                os.close(fd)
                break
            fillers.append(fd)

        original = step.forwarder.accept

        def close_first_pair_then_accept(self):
            # As if another callback had closed the pair earlier in this round
            # (abort() closes the socket only in a later round: close it now).
            if old_sockets[0].fileno() != -1:
                for side, sock in zip((old_receiver, old_sender), old_sockets):
                    side.transport.abort()
                    sock.close()
            pair = original(self)
            if pair is not None:
                new_fds.append(pair[0].fileno())
            return pair

        monkeypatch.setattr(step.forwarder, "accept", close_first_pair_then_accept)
        wait_until_readable = time.monotonic() + WAIT
        while not new_fds and time.monotonic() < wait_until_readable:
            step.serve(0.01, 1)  # the first select() has both events: the listener's, then the old socket's
    finally:
        for fd in fillers:
            os.close(fd)
    assert new_fds[:1] == [reused_fd], "the new client did not get the old one's descriptor number"
    assert old_reads == [], "the closed receiver was called for the old socket's data"
    assert round_trip(step, second) == b"ping"
