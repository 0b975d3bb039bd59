"""Shared fixtures: loopback servers, a forwarder in a thread, bounded waits.

Every wait here has a deadline, every server and forwarder is stopped at
teardown, and everything binds port 0 on 127.0.0.1 or ::1.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import pytest

from asyncore_fwd import Forwarder
from asyncore_fwd._eventloop._dispatcher import Dispatcher

ROOT = Path(__file__).resolve().parent.parent
WAIT = 10.0  # seconds: the bound on any single wait in the tests
T = TypeVar("T")


def has_ipv6() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")


def has_dual_stack() -> bool:
    """Whether a socket bound to ``::`` takes IPv4 clients too (net.ipv6.bindv6only=0)."""
    if not has_ipv6():
        return False
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
        return not probe.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)


needs_dual_stack = pytest.mark.skipif(not has_dual_stack(), reason="no dual-stack [::] listener")


def wait_for(predicate: Callable[[], object], timeout: float = WAIT, what: str = "condition") -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def recv_all(sock: socket.socket, timeout: float = WAIT) -> bytes:
    """Read until EOF (fails the test if EOF does not come within ``timeout``)."""
    sock.settimeout(timeout)
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        if time.monotonic() > deadline:
            pytest.fail(f"no EOF within {timeout} s")
        try:
            chunk = sock.recv(1 << 20)
        except socket.timeout:
            pytest.fail(f"no EOF within {timeout} s")
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def recv_until_reset(sock: socket.socket, timeout: float = WAIT) -> bytes:
    """Read until the connection is reset; returns what came before.

    Fails the test on a clean EOF (a reset must never look like a normal
    end) or if nothing ends the connection within ``timeout``.
    """
    sock.settimeout(timeout)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return b"".join(chunks)
        except socket.timeout:
            break
        if not chunk:
            pytest.fail(f"clean EOF after {sum(map(len, chunks))} bytes where a reset was expected")
        chunks.append(chunk)
    pytest.fail(f"no reset within {timeout} s")


def stream_end(sock: socket.socket, timeout: float = WAIT) -> str:
    """Read (and drop) until the stream ends: "EOF", "reset", or "open" if it goes on past ``timeout``."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(1 << 20):
                return "EOF"
    except ConnectionResetError:
        return "reset"
    except socket.timeout:
        pass
    return "open"


def connect_until_reset(address: Tuple[str, int], timeout: float = WAIT) -> bytes:
    """Connect and read until the connection is reset; returns what came before.

    On loopback the reset may come before ``connect()`` has even returned,
    which the client sees as ECONNRESET from connect(): that counts too.
    """
    try:
        client = socket.create_connection(address, timeout=timeout)
    except ConnectionResetError:
        return b""
    with client:
        return recv_until_reset(client, timeout)


def recv_exactly(sock: socket.socket, size: int, timeout: float = WAIT) -> bytes:
    """Read exactly ``size`` bytes (fails the test on EOF or timeout)."""
    sock.settimeout(timeout)
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(1 << 20, size - len(data)))
        if not chunk:
            pytest.fail(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


# Sockets that hold the ports handed out by dead_port(), closed when the session ends.
_dead_port_holders: List[socket.socket] = []
_dead_udp_holders: List[socket.socket] = []  # and those of dead_udp_port()
DEAD_PORTS = 4  # how many distinct ports dead_port() hands out, in turn


def dead_port() -> int:
    """A loopback port that refuses every connect until the tests end.

    It is bound, never listened on, and stays bound.  A port merely bound and
    released could be taken again meanwhile, even by the forwarder under test
    (which would then forward to itself), or be picked as a connect's own
    local port (a TCP simultaneous open, which succeeds with nobody listening).
    A few such ports serve the whole session in turn: a test gets a different
    one from each of its first ``DEAD_PORTS`` calls.
    """
    if len(_dead_port_holders) < DEAD_PORTS:
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        _dead_port_holders.append(holder)
    else:
        _dead_port_holders.append(_dead_port_holders.pop(0))
    return _dead_port_holders[-1].getsockname()[1]


def dead_udp_port() -> int:
    """A loopback UDP port whose datagrams get an ICMP error (ECONNREFUSED) until the tests end.

    A UDP socket holds it, bound and connected elsewhere: nobody else can bind
    it, and a datagram from anyone but that peer finds no socket to take it.
    (``dead_port()`` holds only the TCP port of that number.)
    """
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    holder.connect(("127.0.0.1", 9))  # the discard port: nothing is ever sent there
    _dead_udp_holders.append(holder)
    return holder.getsockname()[1]


def free_port() -> int:
    """A loopback port nothing used a moment ago, for what must name its port before binding it.

    Another socket may take it meanwhile; what binds it may try again with another.
    """
    (port,) = free_ports(1)
    return port


def free_ports(count: int) -> List[int]:
    """``count`` different loopback ports, as ``free_port()`` gives one (two calls of it may repeat one)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def unless_taken(make: Callable[[], T]) -> T:
    """``make()``, made again (ten tries at most) while it fails because a free port was taken meanwhile."""
    for _ in range(10):
        try:
            return make()
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
    pytest.fail("ten free ports were each taken before they could be bound")


def pytest_sessionfinish(session: pytest.Session) -> None:
    for holders in (_dead_port_holders, _dead_udp_holders):
        while holders:
            holders.pop().close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def payload(size: int) -> bytes:
    """Bytes that show reordering or corruption (not all one value)."""
    pattern = bytes(range(251))  # a prime length, so it drifts across buffer boundaries
    return (pattern * (size // len(pattern) + 1))[:size]


class DatagramEcho(Dispatcher):
    """A UDP echo in a map: what a listener of another kind than TCP would be, for tests of the seams."""

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def handle_read(self) -> None:
        data, sender = self.socket.recvfrom(2048)
        self.socket.sendto(data, sender)
        self.echoed()

    def echoed(self) -> None:
        """Called after each echo."""


class EchoServer:
    """A selectors-based echo server in a thread: many connections, half-close aware.

    Echoes everything; on EOF from a client, finishes echoing, then shuts down
    its own write side (so the client sees the whole echo, then EOF).
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(4096)
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()[:2]
        self.port = self.address[1]
        self.accepted = 0
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._buffers: dict = {}
        self._running = True
        self._thread = threading.Thread(target=self._run, name="echo-server", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._running:
            for key, events in self._selector.select(0.05):
                sock = key.fileobj
                if sock is self.listener:
                    self._accept()
                    continue
                if events & selectors.EVENT_READ:
                    self._read(sock)
                if events & selectors.EVENT_WRITE and sock in self._buffers:
                    self._write(sock)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()
        self._selector.close()

    def _accept(self) -> None:
        for _ in range(256):
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            self.accepted += 1
            self._buffers[conn] = [bytearray(), False]
            self._selector.register(conn, selectors.EVENT_READ)

    def _read(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = None
        if data is None:
            self._drop(sock)
            return
        state = self._buffers[sock]
        if data:
            state[0] += data
        else:
            state[1] = True
        self._write(sock)

    def _write(self, sock: socket.socket) -> None:
        outgoing, eof = self._buffers[sock]
        try:
            if outgoing:
                sent = sock.send(outgoing)
                del outgoing[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(sock)
            return
        if not outgoing and eof:
            self._drop(sock, graceful=True)
            return
        events = selectors.EVENT_WRITE if outgoing else 0
        # Stop reading while a lot waits, like any well-behaved server.
        if not eof and len(outgoing) < (1 << 20):
            events |= selectors.EVENT_READ
        self._selector.modify(sock, events)

    def _drop(self, sock: socket.socket, graceful: bool = False) -> None:
        self._selector.unregister(sock)
        del self._buffers[sock]
        if graceful:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        sock.close()

    def close(self) -> None:
        self._running = False
        self._thread.join(WAIT)
        self.listener.close()


class ScriptedServer:
    """A server that runs ``handler(conn)`` in a thread for each connection.

    For scenarios an echo cannot play: reply after the client's EOF, send a
    lot and close, reset.  ``connections`` keeps the handlers' sockets.
    """

    def __init__(self, handler: Callable[[socket.socket], None], host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(128)
        self.listener.settimeout(0.05)
        self.address = self.listener.getsockname()[:2]
        self.port = self.address[1]
        self.handler = handler
        self.errors: List[BaseException] = []
        self.connections: List[socket.socket] = []
        self._running = True
        self._threads: List[threading.Thread] = []
        self._thread = threading.Thread(target=self._run, name="scripted-server", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._running:
            try:
                conn, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            conn.settimeout(WAIT)
            self.connections.append(conn)
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except BaseException as error:  # reported by close()
            self.errors.append(error)
        finally:
            conn.close()

    def close(self) -> None:
        self._running = False
        self._thread.join(WAIT)
        for thread in self._threads:
            thread.join(WAIT)
        self.listener.close()


class RunningForwarder:
    """A ``Forwarder`` on its own map, served by a thread until ``stop()``."""

    def __init__(self, *args, loop: str = "auto", **kwargs) -> None:
        kwargs.setdefault("map", {})
        self.forwarder = Forwarder(*args, **kwargs)
        self.address = self.forwarder.address
        self.port = self.address[1]
        self.thread = threading.Thread(target=self.forwarder.serve_forever,
                                        kwargs={"poll_interval": 0.05, "loop": loop},
                                        name="forwarder", daemon=True)
        self.thread.start()

    def connect(self, timeout: float = WAIT) -> socket.socket:
        return socket.create_connection(self.address, timeout=timeout)

    def stop(self) -> None:
        self.forwarder.stop()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "serve_forever did not return after stop()"


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose connects are never answered: a listener with its accept queue full."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    time.sleep(0.1)  # the fillers' handshakes fill the queue
    yield listener.getsockname()[1]
    for sock in fillers + [listener]:
        sock.close()


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def scripted_server() -> Iterator[Callable[..., ScriptedServer]]:
    """``scripted_server(handler)`` starts a ``ScriptedServer``; errors in handlers fail the test."""
    servers: List[ScriptedServer] = []

    def start(handler: Callable[[socket.socket], None], host: str = "127.0.0.1") -> ScriptedServer:
        server = ScriptedServer(handler, host)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
    for server in servers:
        if server.errors:
            raise server.errors[0]


class WatchingServer(ScriptedServer):
    """Echoes the first message of each connection, then reads until the stream ends;
    ``ends`` says how each one ended, as ``stream_end()`` tells it ("EOF" or "reset")."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.ends: List[str] = []
        super().__init__(self._watch, host)

    def _watch(self, conn: socket.socket) -> None:
        conn.sendall(conn.recv(1024))
        self.ends.append(stream_end(conn))


class LoopBreaker:
    """Serves ``serve_forever`` in a thread with, in its map, a socket whose read raises
    KeyboardInterrupt, which the loop lets through: ``fire()`` sets off an error that
    ends the loop, ``error()`` waits for the loop to end and says what ended it."""

    def __init__(self, channels: dict, serve_forever: Callable[[], None], stop: Callable[[], None]) -> None:
        from asyncore_fwd._compat import asyncore

        class Breaking(asyncore.dispatcher):
            def writable(self) -> bool:
                return False

            def handle_read(self) -> None:
                raise KeyboardInterrupt("an error that ends the loop")

        self._trigger, end = socket.socketpair()
        self._dispatcher = Breaking(end, map=channels)
        self._stop = stop
        self._failed: List[BaseException] = []
        self._thread = threading.Thread(target=self._serve, args=(serve_forever,), daemon=True)
        self._thread.start()

    def _serve(self, serve_forever: Callable[[], None]) -> None:
        try:
            serve_forever()
        except BaseException as error:
            self._failed.append(error)

    def fire(self) -> None:
        self._trigger.send(b"!")

    def error(self) -> Optional[BaseException]:
        """What ended the loop (None if it returned); fails the test if it goes on past ``WAIT``."""
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "the loop did not end"
        return self._failed[0] if self._failed else None

    def close(self) -> None:
        if self._thread.is_alive():
            self._stop()
            self._thread.join(WAIT)
        self._dispatcher.close()
        self._trigger.close()


@pytest.fixture
def watching_server() -> Iterator[WatchingServer]:
    server = WatchingServer()
    yield server
    server.close()
    if server.errors:
        raise server.errors[0]


@pytest.fixture(params=["epoll", "poll", "select"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    """Each loop the forwarder can run under (select is limited to 1024 fds)."""
    return request.param


@pytest.fixture(params=[False, True], ids=["copy", "splice"])
def splice(request: pytest.FixtureRequest) -> bool:
    """Relay by copying through Python, or with splice() where the platform has it."""
    from asyncore_fwd._relay._splice import AVAILABLE

    if request.param and not AVAILABLE:
        pytest.skip("no os.splice() on this platform")
    return request.param


@pytest.fixture
def start_forwarder(loop_kind: str, splice: bool) -> Iterator[Callable[..., RunningForwarder]]:
    """``start_forwarder(remote_port, remote_host="127.0.0.1", **options)`` runs a forwarder in a
    thread, once per loop kind and relay mode."""
    running: List[RunningForwarder] = []

    def start(remote_port: int, remote_host: str = "127.0.0.1", local_host: str = "127.0.0.1",
              **options) -> RunningForwarder:
        options.setdefault("loop", loop_kind)
        options.setdefault("splice", splice)
        fwd = RunningForwarder(local_host, 0, remote_host, remote_port, **options)
        running.append(fwd)
        return fwd

    yield start
    for fwd in running:
        fwd.stop()


@pytest.fixture
def sock_map() -> Iterator[dict]:
    """A private asyncore map, closed at teardown."""
    from asyncore_fwd._compat import asyncore

    channels: dict = {}
    yield channels
    asyncore.close_all(channels, ignore_all=True)


class ForwarderProcess:
    """The command in a child process; a thread collects its stderr lines."""

    def __init__(self, command: Sequence[str]) -> None:
        # Its own process group: kill() reaches any worker processes it forked.
        self.process = subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: List[str] = []
        self._reader = threading.Thread(target=self._read, name="stderr-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def _search(self, pattern: re.Pattern[str]) -> Optional[re.Match[str]]:
        for line in list(self.lines):
            match = pattern.search(line)
            if match:
                return match
        return None

    def wait_line(self, pattern: str | re.Pattern[str]) -> re.Match[str]:
        """The first stderr line matching ``pattern``, waiting up to ``WAIT`` s for it."""
        compiled = re.compile(pattern)
        wait_for(lambda: self._search(compiled) or self.process.poll() is not None,
                 what=f"a stderr line matching {compiled.pattern!r}")
        if self.process.poll() is not None:
            self._reader.join(WAIT)
        match = self._search(compiled)
        if match is None:
            pytest.fail(f"no stderr line matching {compiled.pattern!r}; stderr:\n{self.stderr}")
        return match

    def start_port(self) -> int:
        """The local port, from the ``forwarding ADDR to REMOTE`` line logged at start."""
        return int(self.wait_line(r"forwarding \S+:(\d+) to ").group(1))

    def stop(self, signum: int) -> int:
        """Send ``signum``; return the exit status (waited for at most ``WAIT`` s)."""
        self.process.send_signal(signum)
        status = self.process.wait(timeout=WAIT)
        self._reader.join(WAIT)
        return status

    def kill(self) -> None:
        """Kill it and everything it forked; close its stderr."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=WAIT)
        self._reader.join(WAIT)
        assert self.process.stderr is not None
        if not self._reader.is_alive():  # closing under a blocked reader would block too
            self.process.stderr.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., ForwarderProcess]]:
    """``spawn(command)`` starts the command; whatever still runs is killed at teardown."""
    started: List[ForwarderProcess] = []

    def start(command: Sequence[str]) -> ForwarderProcess:
        proc = ForwarderProcess(command)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


class ArticleProcess:
    """The article's example (examples/article_forwarder.py) as a child process."""

    def __init__(self, remote_port: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-W", "error", str(ROOT / "examples" / "article_forwarder.py"),
             "-l", "127.0.0.1", "-p", "0", "-r", "127.0.0.1", "-P", str(remote_port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),  # its asyncore prints must not wait in a buffer
        )
        line = self.process.stdout.readline()  # the bound port, printed at start
        if not line.strip().isdigit():
            self.process.kill()
            pytest.fail(f"article example did not start: {line!r} {self.process.stderr.read()!r}")
        self.port = int(line)
        self.address = ("127.0.0.1", self.port)

    def connect(self, timeout: float = WAIT) -> socket.socket:
        return socket.create_connection(self.address, timeout=timeout)

    def finish(self) -> tuple:
        """Stop it (if still running); return (exit status, stdout, stderr)."""
        if self.process.poll() is None:
            self.process.kill()
        out, err = self.process.communicate(timeout=WAIT)
        return self.process.returncode, out, err


@pytest.fixture
def article() -> Iterator[Callable[[int], ArticleProcess]]:
    """``article(remote_port)`` starts the article's forwarder in front of that port."""
    started: List[ArticleProcess] = []

    def start(remote_port: int) -> ArticleProcess:
        proc = ArticleProcess(remote_port)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.finish()


@contextlib.contextmanager
def descriptors_taken(below: int, spare: int) -> Iterator[None]:
    """Fill the free descriptors below ``below`` (as many as the limit allows)
    with /dev/null, and give ``spare`` of those back, until exit."""
    fillers: List[int] = []
    try:
        for _ in range(below):  # bounded: there are at most this many gaps
            try:
                fd = os.open(os.devnull, os.O_RDONLY)
            except OSError as error:
                if error.errno != errno.EMFILE:
                    raise
                break
            if fd >= below:
                os.close(fd)
                break
            fillers.append(fd)
        for _ in range(spare):
            os.close(fillers.pop())
        yield
    finally:
        for fd in fillers:
            os.close(fd)


@contextlib.contextmanager
def descriptors_exhausted(spare: int) -> Iterator[None]:
    """Leave this process exactly ``spare`` free descriptors until exit, the highest numbers.

    The gaps below the highest descriptor in use are filled with /dev/null,
    and the soft RLIMIT_NOFILE is lowered to leave ``spare`` numbers above
    it, as in a table filled in order.  Everything is undone on exit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(name) for name in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1 + spare, hard))
    try:
        with descriptors_taken(highest + 1, 0):
            yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextlib.contextmanager
def select_limit_reached(spare: int) -> Iterator[None]:
    """Take every free descriptor below select()'s limit but ``spare`` until exit,
    so that the sockets made after those land past it."""
    from asyncore_fwd._eventloop._loop import SELECT_LIMIT

    if raise_fd_limit(SELECT_LIMIT + 64) < SELECT_LIMIT + 64:
        pytest.skip(f"cannot open {SELECT_LIMIT + 64} descriptors here")
    with descriptors_taken(SELECT_LIMIT, spare):
        yield


def raise_fd_limit(wanted: int) -> Optional[int]:
    """Raise RLIMIT_NOFILE to ``wanted`` if the hard limit allows; return the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# Hypothesis profiles: "ci" (the default) is short and reproducible; run
# HYPOTHESIS_PROFILE=long for a deeper local search.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the property tests skip themselves without it
    pass
else:
    settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, database=None,
                              print_blob=False, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("long", max_examples=1000, deadline=None, database=None,
                              print_blob=True, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
