"""The trace mode: a line for every loop round and every dispatcher call.

Each test switches tracing on with the ``traced`` fixture (the lines go to a
string) or runs a traced process, and reads the lines back.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest

from asyncore_fwd import EpollLoop, Forwarder, trace
from asyncore_fwd._compat import asyncore
from asyncore_fwd._eventloop._loop import AsyncoreLoop
from asyncore_fwd.trace._capture import _subclasses, enable_with
from asyncore_fwd.trace._events import END, TraceEvent
from asyncore_fwd.trace._text import TextRenderer
from conftest import (
    ROOT,
    WAIT,
    EchoServer,
    ForwarderProcess,
    RunningForwarder,
    ScriptedServer,
    payload,
    recv_all,
    recv_exactly,
    wait_for,
)


@pytest.fixture
def traced() -> Iterator[io.StringIO]:
    """Tracing on, written to a string; off again (everything put back) at teardown."""
    lines = io.StringIO()
    trace.enable(lines)
    yield lines
    trace.disable()


def in_order(lines: List[str], *patterns: str) -> None:
    """Each pattern matches a line after the line the previous pattern matched."""
    start = 0
    for pattern in patterns:
        for index in range(start, len(lines)):
            if re.search(pattern, lines[index]):
                start = index + 1
                break
        else:
            pytest.fail(f"no line matching {pattern!r} after line {start}; trace:\n" + "\n".join(lines))


# -- a forwarded connection, under each loop ----------------------------------


def reply_after_eof(conn: socket.socket) -> None:
    """Server: read the request up to the client's EOF, reply, close."""
    conn.sendall(b"reply to " + recv_all(conn))


def forward_one_session(server: ScriptedServer, loop_kind: str) -> None:
    """One client through a forwarder: it sends, half-closes, reads the reply; then the pair closes."""
    fwd = RunningForwarder("127.0.0.1", 0, "127.0.0.1", server.port, loop=loop_kind)
    try:
        with fwd.connect() as client:
            client.sendall(b"hello")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"reply to hello"
        wait_for(lambda: not fwd.forwarder.connections, what="the pair to close")
    finally:
        fwd.stop()


def test_a_forwarded_session_is_traced_in_order(
        traced: io.StringIO, loop_kind: str, scripted_server: Callable[..., ScriptedServer]) -> None:
    """Accept, connect event, reads, EOF passed on each way, close: in that order, under each loop."""
    forward_one_session(scripted_server(reply_after_eof), loop_kind)
    in_order(traced.getvalue().splitlines(),
             rf"^r\d+ {loop_kind}\(timeout=0\.05\) -> 1 event: fd\d+ r$",
             r"^r\d+ +fd\d+ Forwarder#1 handle_accept\(\)$",
             r"^r\d+ +fd\d+ Forwarder#1 handle_accepted\(fd\d+, 127\.0\.0\.1:\d+\)$",
             r"^r\d+ fd\d+ Sender#1 writable\(\) -> True \(connecting\)$",
             r"^r\d+ +fd\d+ Sender#1 handle_connect_event\(\)$",
             r"^r\d+ fd\d+ Receiver#1 readable\(\) -> True$",
             r"^r\d+ +fd\d+ Receiver#1 handle_read\(\) -> read 5B$",
             r"^r\d+ +fd\d+ Receiver#1 handle_read\(\) -> EOF, EOF passed on$",
             r"^r\d+ fd\d+ Receiver#1 readable\(\) -> False \(EOF received\)$",
             r"^r\d+ +fd\d+ Sender#1 handle_read\(\) -> read 14B$",
             r"^r\d+ +fd\d+ Receiver#1 close\(\)$",
             r"^r\d+ +fd\d+ Sender#1 close\(\)$",
             r"^r\d+ +fd\d+ Sender#1 handle_read\(\) -> EOF, EOF passed on, pair closed$",
             r"^r- fd\d+ Forwarder#1 close\('stopped'\)$")


def test_a_side_held_back_by_its_peer_says_why(
        traced: io.StringIO, scripted_server: Callable[..., ScriptedServer]) -> None:
    """A server side not read because the client does not read: readable() -> False with the reason."""

    def flood(conn: socket.socket) -> None:
        try:
            conn.sendall(payload(16 * 1024 * 1024))
        except OSError:
            pass  # the forwarder closed the connection at the end of the test

    server = scripted_server(flood)
    fwd = RunningForwarder("127.0.0.1", 0, "127.0.0.1", server.port, loop="poll", high_water=64 * 1024)
    try:
        with fwd.connect():  # reads nothing
            wait_for(lambda: re.search(r"^r\d+ fd\d+ Sender#1 readable\(\) -> False "
                                       r"\(peer holds \d+(\.\d)?K >= high water\)$",
                                       traced.getvalue(), re.MULTILINE),
                     what="the server side to be held back")
    finally:
        fwd.stop()


def pump(channels: dict, until: Callable[[], object], what: str) -> None:
    """Run our own loop one round at a time until ``until()``."""
    deadline = time.monotonic() + WAIT
    while not until():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        asyncore.loop(timeout=0.01, use_poll=True, map=channels, count=1)


def test_a_side_says_why_it_does_not_read(
        scripted_server: Callable[..., ScriptedServer], sock_map: dict, splice: bool) -> None:
    """The relay's own reasons, as the trace shows them: connecting, EOF, a full pipe, closed."""
    release = threading.Event()

    def answer_when_released(conn: socket.socket) -> None:
        request = recv_all(conn)
        release.wait(WAIT)
        conn.sendall(b"reply to " + request)

    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", scripted_server(answer_when_released).port,
                    map=sock_map, splice=splice)
    with socket.create_connection(fwd.address, timeout=WAIT) as client:
        pump(sock_map, lambda: fwd.connections, what="accept")
        (conn,) = fwd.connections
        assert conn.receiver.why_not_readable() == "server not connected yet"
        pump(sock_map, lambda: conn.established, what="connect")
        assert conn.receiver.readable() and conn.receiver.why_not_readable() is None
        if splice:  # a pipe full of small segments, though under its capacity
            conn.receiver.outgoing.blocked = True
            assert conn.sender.why_not_readable() == "peer's pipe is full"
            conn.receiver.outgoing.blocked = False
        client.sendall(b"hello")
        client.shutdown(socket.SHUT_WR)
        pump(sock_map, lambda: conn.receiver.eof_received, what="EOF")
        assert conn.receiver.why_not_readable() == "EOF received"
        release.set()
        pump(sock_map, lambda: conn.closed, what="the pair to close")
        assert conn.sender.why_not_readable() == "pair closed"
        assert recv_all(client) == b"reply to hello"


# -- another renderer ---------------------------------------------------------


class JsonLines:
    """A renderer writing each event as a line of JSON, and passing it on to the text trace."""

    def __init__(self, text: TextRenderer) -> None:
        self.text = text
        self.lines: List[str] = []
        self.closed = False

    def wants_events(self) -> bool:
        return True

    def event(self, event: TraceEvent) -> None:
        self.lines.append(json.dumps(event._asdict()))
        self.text.event(event)

    def close(self) -> None:
        self.closed = True
        self.text.close()


def text_of(events: List[TraceEvent], name: str) -> str:
    """The text trace of ``events``, written by a renderer of its own."""
    lines = io.StringIO()
    renderer = TextRenderer(logging.getLogger(name), lines)
    for event in events:
        renderer.event(event)
    renderer.close()
    return lines.getvalue()


def test_a_renderer_plugged_into_capture_gets_every_event_as_plain_data(
        loop_kind: str, scripted_server: Callable[..., ScriptedServer]) -> None:
    """Events are plain data (JSON lines of them read back the same), and the text
    trace is a function of them alone: replayed, they give the same lines."""
    live = io.StringIO()
    renderer = JsonLines(TextRenderer(logging.getLogger("test_trace.live"), live))
    enable_with(renderer)
    try:
        forward_one_session(scripted_server(reply_after_eof), loop_kind)
    finally:
        trace.disable()
    assert renderer.closed
    events = [TraceEvent(**dict(fields, ready=tuple(map(tuple, fields["ready"]))))
              for fields in map(json.loads, renderer.lines)]
    assert any(event.kind == END and event.object == "Receiver#1" and event.call == "readable"
               and event.result == "False" and event.why == "EOF received" and isinstance(event.round, int)
               for event in events)
    assert text_of(events, "test_trace.replay") == live.getvalue()
    in_order(live.getvalue().splitlines(),
             r"^r\d+ +fd\d+ Forwarder#1 handle_accepted\(fd\d+, 127\.0\.0\.1:\d+\)$",
             r"^r\d+ +fd\d+ Receiver#1 handle_read\(\) -> read 5B$",
             r"^r\d+ fd\d+ Receiver#1 readable\(\) -> False \(EOF received\)$",
             r"^r\d+ +fd\d+ Sender#1 handle_read\(\) -> EOF, EOF passed on, pair closed$")


# -- any asyncore program -----------------------------------------------------


def load_article() -> object:
    """examples/article_forwarder.py as a module (its main block does not run)."""
    spec = importlib.util.spec_from_file_location("traced_article", ROOT / "examples" / "article_forwarder.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_articles_classes_are_traced(traced: io.StringIO, echo_server: EchoServer) -> None:
    """Plain asyncore.dispatcher subclasses, defined after tracing started, get their lines too."""
    article = load_article()
    listener = article.forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port)  # type: ignore[attr-defined]
    try:
        with socket.create_connection(listener.socket.getsockname(), timeout=WAIT) as client:
            client.sendall(b"ping")
            client.setblocking(False)
            echoed = b""
            deadline = time.monotonic() + WAIT
            while echoed != b"ping" and time.monotonic() < deadline:
                asyncore.loop(timeout=0.01, count=1)  # the article uses asyncore's global map
                try:
                    echoed += client.recv(4 - len(echoed))
                except BlockingIOError:
                    pass
            assert echoed == b"ping"
    finally:
        for channel in list(asyncore.socket_map.values()):
            if type(channel).__module__ == "traced_article":
                channel.close()
    in_order(traced.getvalue().splitlines(),
             r"^r\d+ select\(timeout=0\.01\) -> 1 event: fd\d+ r$",
             r"^r\d+ fd\d+ forwarder#1 handle_accept\(\)$",
             r"^r\d+ fd\d+ receiver#1 handle_read\(\)$",
             r"^r\d+ fd\d+ sender#1 writable\(\) -> True$",
             r"^r\d+ fd\d+ sender#1 handle_write\(\)$",
             r"^r\d+ fd\d+ sender#1 handle_read\(\)$",
             r"^r\d+ fd\d+ receiver#1 handle_write\(\)$")


def test_an_exception_in_a_handler_is_traced(traced: io.StringIO, sock_map: dict) -> None:
    """The handler's line says what it raised; handle_error() says what it handles."""

    class Failing(asyncore.dispatcher):
        def handle_read(self) -> None:
            raise ValueError("boom")

        def handle_error(self) -> None:
            self.close()

    mine, theirs = socket.socketpair()
    with theirs:
        Failing(mine, map=sock_map)
        theirs.sendall(b"x")
        asyncore.loop(timeout=WAIT, map=sock_map, count=1)
    in_order(traced.getvalue().splitlines(),
             r"^r1 fd\d+ Failing#1 handle_read\(\) raised ValueError: boom$",
             r"^r1 fd\d+ Failing#1 handle_error\(after ValueError: boom\)$",
             r"^r1   fd\d+ Failing#1 close\(\)$")


# -- off means off ------------------------------------------------------------


def test_disable_puts_back_every_original_function() -> None:
    """After disable(), every wrapped function is the original object again, for old and new classes."""
    def handle_read(self: object) -> None:
        pass

    owners = [asyncore, EpollLoop, AsyncoreLoop] + _subclasses(asyncore.dispatcher)
    names = trace.TRACED_METHODS + ("poll", "poll2", "poll3", "select", "__init_subclass__")
    before = {(owner, name): vars(owner).get(name) for owner in owners for name in names}
    trace.enable(io.StringIO())
    try:
        assert asyncore.poll is not before[asyncore, "poll"]
        assert EpollLoop.poll is not before[EpollLoop, "poll"]
        assert AsyncoreLoop.poll is not before[AsyncoreLoop, "poll"]
        assert asyncore.dispatcher.readable is not before[asyncore.dispatcher, "readable"]
        later = type("Later", (asyncore.dispatcher,), {"handle_read": handle_read})
        assert later.handle_read is not handle_read
    finally:
        trace.disable()
    after = {(owner, name): vars(owner).get(name) for owner in owners for name in names}
    changed = [key for key in before if after[key] is not before[key]]
    assert changed == []
    assert vars(later)["handle_read"] is handle_read


# -- the runner and the command line ------------------------------------------

SCRIPT = '''\
import socket
import sys
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import asyncore

import sibling  # found in the script's own directory


class Reader(asyncore.dispatcher):
    def writable(self):
        return False

    def handle_read(self):
        self.recv(100)  # b"" at EOF: asyncore then calls handle_close()


mine, theirs = socket.socketpair()
Reader(mine)
theirs.sendall(b"hi")
theirs.close()
asyncore.loop(timeout=0.1, count=10)
print("arguments:", sys.argv[1:], sibling.NAME)
'''


def run_traced_script(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    (tmp_path / "sibling.py").write_text("NAME = 'sibling'\n")
    script = tmp_path / "reader.py"
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, "-W", "error", "-m", "asyncore_fwd.trace", str(script), *arguments],
                          capture_output=True, text=True, timeout=WAIT, cwd=ROOT)


def test_runner_traces_the_script_on_stderr(tmp_path: Path) -> None:
    """python -m asyncore_fwd.trace SCRIPT: the script's own dispatcher is traced, round by round."""
    result = run_traced_script(tmp_path)
    assert result.returncode == 0, result.stderr
    in_order(result.stderr.splitlines(),
             r"^r1 fd\d+ Reader#1 readable\(\) -> True$",
             r"^r1 fd\d+ Reader#1 writable\(\) -> False$",
             r"^r1 select\(timeout=0\.1\) -> 1 event: fd\d+ r$",
             r"^r1 fd\d+ Reader#1 handle_read\(\)$",
             r"^r\d+ fd\d+ Reader#1 handle_read\(\)$",
             r"^r\d+   fd\d+ Reader#1 handle_close\(\)$",
             r"^r\d+     fd\d+ Reader#1 close\(\)$")


def test_runner_runs_the_script_as_python_would(tmp_path: Path) -> None:
    """The script gets its arguments, and its directory first on the module path."""
    result = run_traced_script(tmp_path, "one", "two")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "arguments: ['one', 'two'] sibling\n"


def test_cli_trace_flag_traces_the_forwarder(
        spawn: Callable[..., ForwarderProcess], echo_server: EchoServer) -> None:
    """asyncore-fwd --trace writes trace lines for a connection to stderr, and still stops on SIGINT."""
    fwd = spawn([sys.executable, "-W", "error", "-m", "asyncore_fwd", "--trace", "--loop", "epoll",
                 "-p", "0", "-r", "127.0.0.1", "-P", str(echo_server.port)])
    with socket.create_connection(("127.0.0.1", fwd.start_port()), timeout=WAIT) as client:
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
    fwd.wait_line(r"^r\d+ epoll\(timeout=0\.5\) -> 1 event: fd\d+ r$")
    fwd.wait_line(r"^r\d+ +fd\d+ Forwarder#1 handle_accepted\(fd\d+, 127\.0\.0\.1:\d+\)$")
    fwd.wait_line(r"^r\d+ +fd\d+ Receiver#1 handle_read\(\) -> read 4B$")
    assert fwd.stop(signal.SIGINT) == 0


# -- trace version 2: times, bytes, EOF and reset, filter, summary, hand loops, JSON lines ---------

TWO_READERS = '''\
import socket
import time
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import asyncore


class Reader(asyncore.dispatcher):
    def writable(self):
        return False

    def handle_read(self):
        self.recv(100)


class Other(Reader):
    pass


mine, theirs = socket.socketpair()
other, its_peer = socket.socketpair()
Reader(mine)
Other(other)
theirs.sendall(b"hi")
asyncore.loop(timeout=0.1, count=1)
time.sleep(0.3)  # a pause the times show
theirs.close()
its_peer.close()
asyncore.loop(timeout=0.1, count=5)
'''

LINE = re.compile(r"^(?P<time>\+\d+\.\d{3} )?r(?P<round>\d+|-) ")


def run_script(tmp_path: Path, script: str, *options: str) -> subprocess.CompletedProcess:
    path = tmp_path / "script.py"
    path.write_text(script)
    return subprocess.run([sys.executable, "-W", "error", "-m", "asyncore_fwd.trace", *options, str(path)],
                          capture_output=True, text=True, timeout=WAIT, cwd=ROOT)


def test_times_begin_every_line_and_show_a_pause(tmp_path: Path) -> None:
    """--times: each trace line begins with its offset, never going back; a 0.3 s sleep is a 0.3 s step."""
    result = run_script(tmp_path, TWO_READERS, "--times")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("summary: ")]
    offsets = []
    for line in lines:
        found = LINE.match(line)
        assert found and found.group("time"), line
        offsets.append(float(found.group("time")))
    assert offsets == sorted(offsets)
    # In whole milliseconds, as printed: 0.469 - 0.169 is 0.29999999999999993 in floats.
    assert max(round(1000 * (later - earlier)) for earlier, later in zip(offsets, offsets[1:])) >= 300


def test_lines_have_no_times_unless_asked(tmp_path: Path) -> None:
    """Without --times the lines are as before: round first."""
    result = run_script(tmp_path, TWO_READERS)
    assert result.returncode == 0, result.stderr
    assert all(LINE.match(line) and not LINE.match(line).group("time")  # type: ignore[union-attr]
               for line in result.stderr.splitlines() if not line.startswith("summary: "))


def test_any_dispatchers_reads_show_bytes_then_eof(tmp_path: Path) -> None:
    """A plain asyncore.dispatcher's recv() gets a line: the bytes read, then EOF, under its handler."""
    result = run_script(tmp_path, TWO_READERS)
    in_order(result.stderr.splitlines(),
             r"^r1 fd\d+ Reader#1 handle_read\(\)$",
             r"^r1   fd\d+ Reader#1 recv\(100\) -> read 2B$",
             r"^r\d+ fd\d+ Reader#1 handle_read\(\)$",
             r"^r\d+   fd\d+ Reader#1 recv\(100\) -> EOF$",
             r"^r\d+   fd\d+ Reader#1 handle_close\(\)$")


def test_a_reset_is_marked(traced: io.StringIO, sock_map: dict) -> None:
    """A peer that resets the connection: the read says reset, with the error."""

    class Writer(asyncore.dispatcher):
        def handle_read(self) -> None:
            self.recv(100)

    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname(), timeout=WAIT) as peer:
        mine, _ = listener.accept()
        Writer(mine, map=sock_map)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        peer.close()  # linger 0: RST
        pump(sock_map, lambda: not sock_map, what="the reset to close it")
    assert re.search(r"^r\d+   fd\d+ Writer#1 recv\(100\) -> reset$", traced.getvalue(), re.MULTILINE), \
        traced.getvalue()


def test_own_sides_bytes_stay_in_their_handlers_line(traced: io.StringIO, loop_kind: str,
                                                     scripted_server: Callable[..., ScriptedServer]) -> None:
    """asyncore_fwd's sides say "read 5B" in their handler's line: no extra recv line for them."""
    forward_one_session(scripted_server(reply_after_eof), loop_kind)
    text = traced.getvalue()
    assert re.search(r"Receiver#1 handle_read\(\) -> read 5B$", text, re.MULTILINE)
    assert not re.search(r"(Receiver|Sender)#\d+ (recv|recv_into|send)\(", text)


def test_filter_keeps_the_named_dispatchers_and_every_round(tmp_path: Path) -> None:
    """--filter Other: Reader's lines are gone; Other's and the kernel's stay."""
    result = run_script(tmp_path, TWO_READERS, "--filter", "Other")
    lines = result.stderr.splitlines()
    assert not any("Reader#" in line for line in lines)
    in_order(lines, r"^r1 fd\d+ Other#1 readable\(\) -> True$", r"^r1 select\(timeout=0\.1\)")


@contextlib.contextmanager
def tracing(**options: Any) -> Iterator[io.StringIO]:
    """Tracing on with these options, written to a string; off again at the end."""
    lines = io.StringIO()
    trace.enable(lines, **options)
    try:
        yield lines
    finally:
        trace.disable()


def test_filter_by_descriptor(sock_map: dict) -> None:
    """A filter by fd keeps that descriptor's dispatcher only."""
    mine, theirs = socket.socketpair()
    other, its_peer = socket.socketpair()
    fd = other.fileno()
    with theirs, its_peer, tracing(only=f"fd{fd}") as lines:
        reader = type("Reader", (asyncore.dispatcher,), {"writable": lambda self: False})
        first, second = reader(mine, map=sock_map), reader(other, map=sock_map)
        asyncore.loop(timeout=0.01, map=sock_map, count=1)
        first.close()
        second.close()
    assert f"r1 fd{fd} Reader#2 readable() -> True" in lines.getvalue().splitlines()
    assert "Reader#1" not in lines.getvalue()


def test_filter_can_leave_the_listener_out(scripted_server: Callable[..., ScriptedServer]) -> None:
    """no-listener: the Forwarder's lines are gone, its connection's stay."""
    with tracing(only="no-listener") as lines:
        forward_one_session(scripted_server(reply_after_eof), "poll")
    assert "Forwarder#" not in lines.getvalue()
    assert re.search(r"Receiver#1 handle_read\(\) -> read 5B$", lines.getvalue(), re.MULTILINE)


@pytest.mark.parametrize("bad", ["", "#3", "a b", "Reader#x"])
def test_a_bad_filter_is_one_line_and_exit_2(tmp_path: Path, bad: str) -> None:
    result = run_script(tmp_path, TWO_READERS, "--filter", bad)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "bad trace filter term" in result.stderr, result.stderr


def test_summary_ends_the_trace(tmp_path: Path) -> None:
    """The runner ends with rounds per second and each dispatcher's bytes, EOF and pause."""
    result = run_script(tmp_path, TWO_READERS)
    lines = result.stderr.splitlines()
    summary = [line for line in lines if line.startswith("summary: ")]
    assert lines[-len(summary):] == summary
    assert re.match(r"^summary: [1-6] rounds in \d+\.\d{3}s, [\d.]+ rounds/s$", summary[0]), summary
    assert any(re.match(r"^summary: fd\d+ Reader#1 read 2B, sent 0B, EOF; paused 0\.000s$", line)
               for line in summary), summary


def test_summary_counts_the_time_a_side_is_paused(sock_map: dict) -> None:
    """A dispatcher whose readable() says False for 0.2 s is paused for about that long."""

    class Sleepy(asyncore.dispatcher):
        paused = True

        def readable(self) -> bool:
            return not self.paused

        def writable(self) -> bool:
            return False

    mine, theirs = socket.socketpair()
    with theirs, tracing(summary=True) as lines:
        sleepy = Sleepy(mine, map=sock_map)
        asyncore.loop(timeout=0.01, map=sock_map, count=1)
        time.sleep(0.2)
        sleepy.paused = False
        asyncore.loop(timeout=0.01, map=sock_map, count=1)
        sleepy.close()
    (line,) = [line for line in lines.getvalue().splitlines() if "Sleepy#1" in line and line.startswith("summary")]
    paused = float(re.search(r"paused (\d+\.\d+)s", line).group(1))  # type: ignore[union-attr]
    assert 0.2 <= paused < 0.2 + WAIT


HAND_LOOP = '''\
import select
import socket
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import asyncore


class Reader(asyncore.dispatcher):
    def writable(self):
        return False

    def handle_read(self):
        self.recv(100)


mine, theirs = socket.socketpair()
Reader(mine)
theirs.sendall(b"hi")
channels = asyncore.socket_map
for _ in range(2):  # a loop written by hand, as step 10's
    wanted = [fd for fd, obj in list(channels.items()) if obj.readable()]
    if KIND == "select":
        ready = select.select(wanted, [], [], 0.1)[0]
    else:
        poller = select.poll() if KIND == "poll" else select.epoll()
        for fd in wanted:
            poller.register(fd, select.POLLIN)
        ready = [fd for fd, _ in poller.poll(100 if KIND == "poll" else 0.1)]
    for fd in ready:
        asyncore.read(channels[fd])
    theirs.close()
'''


@pytest.mark.parametrize("kind", ["select", "poll", "epoll"])
def test_a_loop_written_by_hand_is_traced_in_rounds(tmp_path: Path, kind: str) -> None:
    """A loop on the select module itself: each round's question, the kernel's answer, the handler."""
    result = run_script(tmp_path, f"KIND = {kind!r}\n" + HAND_LOOP)
    assert result.returncode == 0, result.stderr
    in_order(result.stderr.splitlines(),
             r"^r1 fd\d+ Reader#1 readable\(\) -> True$",
             rf"^r1 {kind}\(timeout=0\.1\) -> 1 event: fd\d+ r$",
             r"^r1 fd\d+ Reader#1 handle_read\(\)$",
             r"^r1   fd\d+ Reader#1 recv\(100\) -> read 2B$",
             r"^r2 fd\d+ Reader#1 readable\(\) -> True$",
             rf"^r2 {kind}\(timeout=0\.1\) -> 1 event: fd\d+ r(\|hup)?$",
             r"^r2   fd\d+ Reader#1 recv\(100\) -> EOF$")


def test_step10s_own_poll_loop_is_traced(tmp_path: Path) -> None:
    """The lesson's serve(), its own poll loop: numbered rounds with the kernel's answer in each."""
    events = [json.loads(line) for line in record_lesson(10, tmp_path).read_text().splitlines()]
    waits = [event for event in events if event["kind"] == "wait"]
    assert waits and all(event["call"] == "poll" and isinstance(event["round"], int) for event in waits)
    rounds = [event["round"] for event in waits]
    assert rounds == sorted(set(rounds))  # one wait per round
    assert any(event["kind"] == "io" and event["obj"] == "receiver#2" and event["result"] == "EOF"
               for event in events)
    # The stale event: the round whose wait reported the first pair's descriptor readable,
    # and whose accept gave that number to the second client: no handle_read() for it.
    first, second = [event for event in events if event["kind"] == "start" and event["call"] == "handle_accepted"]
    in_round = [event for event in events if event.get("round") == second["round"]]
    reused = int(second["args"].split(",")[0].removeprefix("fd"))
    (wait,) = [event for event in in_round if event["kind"] == "wait"]
    assert [reused, "r"] in wait["ready"]
    assert not [event for event in in_round if event["call"] == "handle_read"]


def record_lesson(step: int, into: Path) -> Path:
    """examples/lessons/record_traces.py's recording of the step, in ``into``."""
    spec = importlib.util.spec_from_file_location("record_traces", ROOT / "examples" / "lessons" / "record_traces.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = into / f"step{step:02d}.jsonl"
    module.record(step, path)  # type: ignore[attr-defined]
    return path


def test_a_wait_in_a_thread_that_asks_no_dispatcher_is_not_a_round() -> None:
    """A helper thread's own poll() (a supervisor's, a test server's) is not taken for a loop's round."""
    mine, theirs = socket.socketpair()
    with mine, theirs, tracing() as lines:
        theirs.sendall(b"x")
        poller = select.poll()
        poller.register(mine, select.POLLIN)
        assert poller.poll(WAIT * 1000)
        assert select.select([mine], [], [], WAIT)[0]
    assert lines.getvalue() == ""


def test_cli_trace_format_jsonl_writes_json_events_then_the_summary(
        spawn: Callable[..., ForwarderProcess], echo_server: EchoServer) -> None:
    """asyncore-fwd --trace --trace-format jsonl: JSON events on stderr; at SIGINT, the summary line."""
    fwd = spawn([sys.executable, "-W", "error", "-m", "asyncore_fwd", "--trace", "--trace-format", "jsonl",
                 "--loop", "poll", "-p", "0", "-r", "127.0.0.1", "-P", str(echo_server.port)])
    with socket.create_connection(("127.0.0.1", fwd.start_port()), timeout=WAIT) as client:
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
    found = fwd.wait_line(r'^\{"v":1,"kind":"end",.*"obj":"Receiver#1","call":"handle_read".*"result":"read 4B"')
    assert json.loads(found.string)["round"] >= 1
    assert fwd.stop(signal.SIGINT) == 0
    summary = json.loads(fwd.wait_line(r'^\{"v":1,"kind":"summary"').string)
    assert any(entry["obj"] == "Receiver#1" and entry["read"] == 4 for entry in summary["objects"])


def test_cli_bad_trace_filter_is_one_line_and_exit_2() -> None:
    result = subprocess.run([sys.executable, "-m", "asyncore_fwd", "--trace", "--trace-filter", "a b",
                             "-p", "0", "-r", "127.0.0.1", "-P", "9"],
                            capture_output=True, text=True, timeout=WAIT, cwd=ROOT)
    assert result.returncode == 2
    assert "bad trace filter term 'a b'" in result.stderr.splitlines()[-1]


def test_runner_writes_json_lines_to_a_file(tmp_path: Path) -> None:
    """--format jsonl --output FILE: meta first, then the events (version 1, time offsets), summary last."""
    output = tmp_path / "trace.jsonl"
    result = run_script(tmp_path, TWO_READERS, "--format", "jsonl", "--output", str(output))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    events = [json.loads(line) for line in output.read_text().splitlines()]
    assert [events[0]["kind"], events[-1]["kind"]] == ["meta", "summary"]
    assert all(event["v"] == 1 for event in events)
    offsets = [event["t"] for event in events]
    assert offsets == sorted(offsets)
    assert {"kind": "io", "obj": "Reader#1", "call": "recv", "result": "read 2B", "bytes": 2}.items() <= next(
        event for event in events if event["kind"] == "io").items()


def test_runner_rejects_an_unknown_format(tmp_path: Path) -> None:
    result = run_script(tmp_path, TWO_READERS, "--format", "xml")
    assert result.returncode == 2
    assert result.stderr == "python -m asyncore_fwd.trace: bad --format 'xml': expected text or jsonl\n"
