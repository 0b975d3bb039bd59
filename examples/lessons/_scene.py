"""Traces for the pages, the same at every build: a step driven one loop round at a time.

A ``Scene`` holds a step's forwarder, a client and a server in this process.
A recipe lists *moves* (the client connects, sends, half-closes; the server
answers, closes...); ``traced`` makes each move, then runs one round of the
step's own loop under the trace, so that what happens in a round does not
depend on timing.  The client and server sockets sit on high descriptors,
so that the step's own are numbered as when it runs alone (3 the listener,
4 the receiver, 5 the sender).  ``trace_out_of_descriptors`` does the same
for step 08 with a lowered descriptor limit.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, List, Optional

LESSONS = Path(__file__).resolve().parent


def load_step(step: int) -> object:
    """Import step ``step``'s script as a module (its main block does not run)."""
    path = next(LESSONS.glob(f"step{step:02d}_*.py"))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def out_of_the_way(sock: socket.socket, fd: int) -> socket.socket:
    """``sock`` moved to descriptor ``fd``, so that the step's own get 3, 4, 5 as when run alone."""
    moved = socket.socket(sock.family, sock.type, fileno=os.dup2(sock.fileno(), fd))
    sock.close()
    return moved


class Scene:
    """A step's forwarder, a client and a server in this process, moved one loop round at a time.

    Each move of the client or the server is followed by one round of the
    step's loop (``serve(count=1)``), traced; a move must leave the loop
    something to do, or the round waits its timeout (30 s; 1 s from step 08).  The client and the
    server sit on descriptors 101 and up, so that the step's sockets are
    numbered as when it runs alone: 3 the listener, 4 the receiver, 5 the
    sender.
    """

    def __init__(self, step: int) -> None:
        self.lesson: Any = load_step(step)
        self.listener = out_of_the_way(socket.create_server(("127.0.0.1", 0)), 100)
        self.forwarder = self.lesson.forwarder("127.0.0.1", 0, "127.0.0.1", self.listener.getsockname()[1])
        self.client = out_of_the_way(socket.socket(), 101)
        self.server: Optional[socket.socket] = None
        self.lines = io.StringIO()
        self.rounds = 0
        self.printed = io.StringIO()  # what the step prints (asyncore's error lines): not part of the trace

    def round(self) -> None:
        """One round of the step's loop, after the sockets' moves have reached the kernel."""
        time.sleep(0.02)
        self.rounds += 1
        with contextlib.redirect_stdout(self.printed):
            if hasattr(self.lesson, "serve"):
                self.lesson.serve(count=1)  # with the step's own timeout
            else:  # the article's code has no serve(): its main block calls asyncore.loop()
                self.lesson.asyncore.loop(30, count=1)

    def connect(self) -> None:
        self.client.connect(self.forwarder.socket.getsockname())

    def accept(self) -> None:
        """The server takes the step's connection (it is in the backlog since the step's connect)."""
        conn, _ = self.listener.accept()
        self.server = out_of_the_way(conn, 102)

    def close(self) -> None:
        self.lesson.asyncore.close_all(ignore_all=True)
        for sock in (self.client, self.server, self.listener):
            if sock is not None:
                sock.close()


def traced(step: int, moves: List[Callable[[Scene], object]], first: int = 1, last: int = 0,
           listener: bool = False, rounds: Optional[Callable[[int, int], bool]] = None, logs: bool = False) -> str:
    """The trace of ``moves`` (one round after each), rounds ``first`` to ``last`` (0: to the end).

    ``rounds(number, last_round)``, if given, chooses the rounds to show instead.
    ``logs`` mixes in the step's log lines, formatted as its main block does.

    Without ``listener``, the listener's own readable()/writable() lines are
    left out, as the pages do.
    """
    import asyncore_fwd.trace as trace  # here: pytest, in the same process for other recipes, imports it first

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scene = Scene(step)
    if logs:
        handler = logging.StreamHandler(scene.lines)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
    trace.enable(scene.lines)
    try:
        for move in moves:
            move(scene)
            if move is not finish:
                scene.round()
            while move is finish and len(scene.lesson.asyncore.socket_map) > 1 and scene.rounds < MOST_ROUNDS:
                scene.round()
            while isinstance(move, Until) and not move.done(scene) and scene.rounds < MOST_ROUNDS:
                move.step(scene)
                scene.round()
    finally:
        trace.disable()
        scene.close()
    if rounds is None:
        def rounds(number: int, final: int) -> bool:
            return first <= number and (not last or number <= last)
    traced_lines = scene.lines.getvalue().splitlines()
    final = max((int(found.group(1)) for found in map(re.compile(r"r(\d+) ").match, traced_lines) if found),
                default=0)
    shown = []
    for line in traced_lines:
        number = re.match(r"r(\d+) ", line)
        if number and not rounds(int(number.group(1)), final):
            continue
        if not listener and re.search(r" forwarder#1 (readable|writable)\(\)", line):
            continue
        shown.append(line)
    return "\n".join(shown)


REQUEST = b"GET / HTTP/1.0\r\n\r\n"


def connect(scene: Scene) -> None:
    scene.connect()


def send_request(scene: Scene) -> None:
    scene.client.sendall(REQUEST)


def half_close(scene: Scene) -> None:
    scene.client.shutdown(socket.SHUT_WR)


def nothing(scene: Scene) -> None:
    """No move: the round has what the step itself left to do."""


def finish(scene: Scene) -> None:
    """No move, and rounds until the step has closed the pair (``traced`` knows this move)."""


class Until:
    """A move repeated, a round after each, until ``done(scene)``; then ``rounds_after`` more rounds."""

    def __init__(self, step: Callable[[Scene], object], done: Callable[[Scene], bool]) -> None:
        self.step, self.done = step, done

    def __call__(self, scene: Scene) -> None:
        """The first move: ``traced`` runs the rest."""
        self.step(scene)


#: Where ``finish`` gives up: a step that never closes the pair.
MOST_ROUNDS = 200


#: The big reply of step 07's traces: about 25 reads of 4096 bytes.
BIG_REPLY = 100_000


def server_replies(scene: Scene) -> None:
    """The server reads the request and sends a reply (617 bytes, the size of the lessons' page)."""
    scene.accept()
    assert scene.server is not None
    scene.server.recv(4096)
    scene.server.sendall(b"x" * 616 + b"\n")


def server_answers(scene: Scene) -> None:
    """The server reads the request to its EOF, then sends a line (the slow server of step 05)."""
    scene.accept()
    assert scene.server is not None
    while scene.server.recv(4096):
        pass
    scene.server.sendall(b"reply after 3 s\n")


def server_answers_and_closes(scene: Scene) -> None:
    """The same, and the server closes at once: its reply and its FIN arrive together."""
    server_answers(scene)
    server_closes(scene)


def server_closes(scene: Scene) -> None:
    assert scene.server is not None
    scene.server.close()


def server_answers_big_and_closes(scene: Scene) -> None:
    """The server reads the request to its EOF, sends 100,000 bytes and closes at once."""
    scene.accept()
    assert scene.server is not None
    while scene.server.recv(4096):
        pass
    scene.server.sendall(b"x" * BIG_REPLY)
    scene.server.close()


def server_sends_big(scene: Scene) -> None:
    """The server reads the request and starts a long reply (100,000 bytes), and keeps the connection open."""
    scene.accept()
    assert scene.server is not None
    scene.server.recv(4096)
    scene.server.sendall(b"x" * BIG_REPLY)


def server_keeps_sending(scene: Scene) -> None:
    """The server sends what its socket takes now (the first time: reads the request); it never blocks."""
    if scene.server is None:
        scene.accept()
        assert scene.server is not None
        scene.server.recv(4096)
        scene.server.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        scene.server.send(b"x" * 65536)


def slow_client(scene: Scene) -> None:
    """A client that reads nothing; small kernel buffers on its way (its receive buffer, the send buffer
    the step's accepted socket inherits from the listener), so that the step's own buffer fills soon."""
    scene.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    scene.forwarder.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    scene.connect()


def client_reads_some(scene: Scene) -> None:
    """The slow client reads a little (16 KiB at most)."""
    scene.client.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        for _ in range(4):
            scene.client.recv(4096)


def buffer_for_client_full(scene: Scene) -> bool:
    """Whether the step holds BUFFER_LIMIT bytes for the client (its sender is about to stop reading)."""
    return any(isinstance(obj, scene.lesson.receiver) and len(obj.to_remote_buffer) >= scene.lesson.BUFFER_LIMIT
               for obj in scene.lesson.asyncore.socket_map.values())


def only_rounds(text: str, keep: Callable[[int, int], bool]) -> str:
    """The lines of ``text`` (a trace) of the rounds ``keep(number, last)`` chooses."""
    numbered = [(re.match(r"r(\d+) ", line), line) for line in text.splitlines()]
    final = max((int(found.group(1)) for found, _ in numbered if found), default=0)
    return "\n".join(line for found, line in numbered if not found or keep(int(found.group(1)), final))


def around_first(text: str, needle: str, before: int = 1, after: int = 0) -> str:
    """The rounds of ``text`` (a trace) from ``before`` before the first round with ``needle`` to ``after`` after."""
    first = next(int(line.split()[0][1:]) for line in text.splitlines() if needle in line)
    return only_rounds(text, lambda number, final: first - before <= number <= first + after)


def without_predicates(text: str) -> str:
    """``text`` (a trace) without the readable()/writable() lines."""
    return "\n".join(line for line in text.splitlines() if not re.search(r" (readable|writable)\(\) -> ", line))


def trace_out_of_descriptors() -> str:
    """Step 08 with room for the listener and two connections: a third client, a pause, a close, the third accepted.

    The server runs in a child process, so that its sockets take none of
    this process's descriptors; then the limit is lowered to 8 (0-2, the
    listener, two pairs).
    """
    import resource

    import asyncore_fwd.trace as trace

    child = subprocess.Popen([sys.executable, "-c", SERVER_CHILD, str(LESSONS)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        server_port = int(child.stdout.readline())
        child.stdout.close()  # its descriptor is the one the listener should get
        lesson: Any = load_step(8)
        fwd = lesson.forwarder("127.0.0.1", 0, "127.0.0.1", server_port)
        clients = [out_of_the_way(socket.socket(), 101 + number) for number in range(3)]
        lines, printed = io.StringIO(), io.StringIO()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (8, hard))
        trace.enable(lines)
        rounds = 0

        def one_round() -> None:
            nonlocal rounds
            rounds += 1
            time.sleep(0.05)
            with contextlib.redirect_stdout(printed):
                lesson.serve(count=1)

        try:
            for client in clients:
                client.connect(fwd.socket.getsockname())
                one_round()
            one_round()  # paused: the listener is not watched, nothing else happens
            clients[0].shutdown(socket.SHUT_WR)  # the first client is done
            while not accepted(lesson, clients[2]) and rounds < MOST_ROUNDS:
                one_round()
        finally:
            trace.disable()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            lesson.asyncore.close_all(ignore_all=True)
            for client in clients:
                client.close()
    finally:
        child.kill()
        child.wait()
    return lines.getvalue()


def accepted(lesson: Any, client: socket.socket) -> bool:
    """Whether the step has a receiver for ``client``."""
    return any(isinstance(obj, lesson.receiver) and obj.addr == client.getsockname()
               for obj in lesson.asyncore.socket_map.values())


#: The server of trace_out_of_descriptors, in a child process: race.py's, answering after the client's EOF.
SERVER_CHILD = """
import sys, time
sys.path.insert(0, sys.argv[1])
import race
race.THINK = 0
with race.server(race.reply_after_eof) as port:
    print(port, flush=True)
    time.sleep(60)
"""


#: An nc -N request: accept, the request, the client's EOF.
HALF_CLOSING_CLIENT = [connect, send_request, half_close]


#: A curl request: accept, the request, the connect completes and the request goes out, the reply, the server's EOF.
CURL = [connect, send_request, nothing, server_replies, server_closes]


#: An nc -N request to a slow server: the loop goes round (spinning or waiting) until the server answers.
SLOW_SERVER = [connect, send_request, nothing, half_close, nothing, nothing, nothing, server_answers_and_closes]


#: The slow server answers, and closes a round later.
ANSWER_THEN_FIN = [connect, send_request, half_close, server_answers, nothing, server_closes]


#: A half-closed request, answered with 100,000 bytes and the server's FIN right behind them.
BIG_THEN_FIN = [connect, send_request, half_close, server_answers_big_and_closes, finish]
