"""What the lesson pages show as output, produced by running the real code.

    python examples/lessons/outputs.py ID      print the output the pages show for ID
    python examples/lessons/outputs.py --list  the IDs

The documentation's build (docs/hooks/include.py) replaces each line
``<!-- output: ID -->`` of a page with what this prints for ID, in a text
block, and ``<!-- count: stepNN -->`` inside a line with the pass and xfail
counts of ``pytest tests/test_lessons.py -k stepNN``.  So a page cannot show
an output that the code no longer prints: a change to the code changes the
page at the next build, and a recipe that fails fails the build.

Each recipe is a function of no argument returning the text, registered
under its ID by ``@recipe``.  It runs the step the way the page says
(its tests with pytest, a race with race.py, a client scripted round by
round) and makes the result stable: ``normalise`` replaces what differs from
one run to the next (ports, object addresses, paths, durations).  Where the
outcome itself is a matter of luck, the recipe measures a rate instead of
showing one run.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

LESSONS = Path(__file__).resolve().parent
ROOT = LESSONS.parent.parent
RECIPES: Dict[str, Callable[[], str]] = {}
#: How many runs a rate on a page is measured over.
RACE_RUNS = 20
#: The last lesson step (stepNN_*.py).
LAST_STEP = max(int(path.name[4:6]) for path in LESSONS.glob("step[0-9][0-9]_*.py"))

#: A port the kernel picks (Linux's ephemeral range starts at 32768); the fixed ports of the pages stay.
EPHEMERAL = r"(?:3276[89]|327[7-9]\d|32[89]\d\d|3[3-9]\d{3}|[45]\d{4}|6[0-5]\d{3})\b"
#: What differs from one run to the next, and what the pages show instead.
UNSTABLE = [
    (re.compile(r"\b(127\.0\.0\.1|::1|localhost):" + EPHEMERAL), r"\1:PORT"),  # ephemeral ports
    (re.compile(r"\bport " + EPHEMERAL), "port PORT"),                               # ... as the logs say them
    (re.compile(r"\bat 0x[0-9a-f]+"), "at 0x..."),                      # object addresses in reprs
    (re.compile(r"\.\.\.[0-9a-f]*>"), "...>"),                            # ... cut short by pytest
    (re.compile(r"[^\s\[\]|()<>\"']*/python[23]\.\d+/(site-packages/)?"), ".../"),  # the interpreter's files
    (re.compile(re.escape(str(ROOT)) + "/"), ""),                      # the checkout
    (re.compile(r" in \d+\.\d+s\b"), ""),                               # pytest's durations
    (re.compile(r"\b\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\b"), "YYYY-MM-DD hh:mm:ss,mmm"),  # log times
]


def normalise(text: str) -> str:
    """``text`` with what changes from run to run replaced (see ``UNSTABLE``)."""
    for pattern, replacement in UNSTABLE:
        text = pattern.sub(replacement, text)
    return text


def recipe(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    """Register the decorated function as the recipe for ``name``."""
    def register(func: Callable[[], str]) -> Callable[[], str]:
        RECIPES[name] = func
        return func
    return register


# -- the tests: counts, the -v listing, the failures the next step fixes ------


def run_pytest(args: List[str], keep: Optional[Callable[[object], bool]] = None) -> str:
    """Run pytest on tests/test_lessons.py in this process; return what it printed.

    ``keep`` (an item -> bool), if given, deselects the other collected tests.
    """
    import pytest

    class Select:
        @pytest.hookimpl(trylast=True)
        def pytest_collection_modifyitems(self, items: list, config: object) -> None:
            if keep is not None:
                items[:] = [item for item in items if keep(item)]

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pytest.main(["-p", "no:cacheprovider", "--rootdir", str(ROOT), "tests/test_lessons.py", *args],
                     plugins=[Select()])
    return out.getvalue()


def collected(step: int) -> list:
    """The tests ``-k stepNN`` selects, collected but not run."""
    items: list = []

    def keep(item: object) -> bool:
        items.append(item)
        return False

    run_pytest(["--collect-only", "-q", "-k", f"step{step:02d}"], keep)
    return items


def counts(step: int) -> str:
    """``N passed, M xfailed`` of ``pytest tests/test_lessons.py -k stepNN``.

    The xfails are the tests marked so (strict, from FIXED_IN): the suite
    fails if one of them passes, or if another one does not.
    """
    items = collected(step)
    xfailed = sum(1 for item in items if item.get_closest_marker("xfail") is not None)  # type: ignore[attr-defined]
    passed = len(items) - xfailed
    return f"{passed} passed, {xfailed} xfailed" if xfailed else f"{passed} passed"


def verbose(step: int) -> str:
    """The result lines of ``pytest tests/test_lessons.py -v -k stepNN``."""
    printed = run_pytest(["-v", "-k", f"step{step:02d}"])
    return "\n".join(line for line in printed.splitlines() if line.startswith("tests/test_lessons.py::"))


def failures(step: int, test: str = "", captured: bool = False) -> str:
    """How the tests that step ``step`` fixes fail at the step before, with ``--runxfail``.

    One line per failure (the first ``E`` line of its traceback), then the
    ``FAILED`` lines of the short summary.  ``test`` keeps only the tests
    whose name starts with it; ``captured`` adds, before each ``E`` line,
    what the step printed or logged (``error: ...``, ``WARNING ...``).
    """
    fixed_here = f"fixed in step{step:02d}"

    def keep(item: object) -> bool:
        marker = item.get_closest_marker("xfail")  # type: ignore[attr-defined]
        return (marker is not None and str(marker.kwargs.get("reason", "")).endswith(fixed_here)
                and item.name.startswith(test))  # type: ignore[attr-defined]

    printed = run_pytest(["-q", "--runxfail", "--tb=short", "-rf", "-k", f"step{step - 1:02d}"], keep)
    blocks: Dict[str, List[str]] = {}
    failed: List[str] = []
    block = ""
    for line in printed.splitlines():
        heading = re.match(r"_+ (\S+) _+$", line)
        if heading:
            block = heading.group(1)
            blocks[block] = []
        elif line.startswith("E   ") and block and not any(seen.startswith("E   ") for seen in blocks[block]):
            blocks[block].append(line.rstrip())
        elif captured and block and line.startswith(("error: ", "WARNING ")):
            blocks[block].insert(len(blocks[block]) - 1 if blocks[block] else 0, line)
        elif line.startswith("FAILED "):
            failed.append(line.split(" - ")[0])
    return "\n".join([line for lines in blocks.values() for line in lines] + failed)


for _step in range(0, LAST_STEP + 1):
    recipe(f"counts-step{_step:02d}")(lambda step=_step: counts(step))
    recipe(f"tests-step{_step:02d}")(lambda step=_step: verbose(step))
    if _step:
        recipe(f"failures-step{_step:02d}")(lambda step=_step: failures(step))
recipe("failure-step08-none")(lambda: failures(8, "test_keeps_accepting_after_accept_returns_none", captured=True))
recipe("failure-step08-emfile")(lambda: failures(8, "test_pauses_accepting_while_out_of_descriptors", captured=True))
recipe("failure-step10-logged")(lambda: failures(10, captured=True))


# -- races, as rates ------------------------------------------------------------


def race(step: int, scenario: str) -> str:
    """``race.py STEP SCENARIO -n 20`` and what it prints, as on a terminal."""
    args = [f"{step:02d}", scenario, "-n", str(RACE_RUNS)]
    done = subprocess.run([sys.executable, str(LESSONS / "race.py"), *args],
                          capture_output=True, text=True, timeout=300, check=True)
    return f"$ python examples/lessons/race.py {' '.join(args)}\n{done.stdout.strip()}"


for _step, _scenario in [(0, "curl"), (0, "nc"), (1, "curl"), (1, "nc"), (4, "nc"), (5, "nc"), (6, "nc"),
                         (7, "nc"), (7, "curl"), (5, "big"), (6, "big"), (7, "big")]:
    recipe(f"race-step{_step:02d}-{_scenario}")(lambda step=_step, scenario=_scenario: race(step, scenario))


def asyncore_source(name: str) -> str:
    """The source of one of asyncore's functions, in the asyncore this Python imports."""
    import inspect
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import asyncore
    return inspect.getsource(getattr(asyncore, name))


recipe("asyncore-readwrite")(lambda: asyncore_source("readwrite"))


# -- CPU over an interval -------------------------------------------------------


def cpu_while_waiting(step: int) -> str:
    """cpu.py on the step while a half-closed client waits for a slow server, and what it says."""
    sys.path.insert(0, str(LESSONS))
    import cpu
    import race

    def slow(conn: socket.socket) -> None:
        with conn:
            while conn.recv(4096):
                pass
            race.time.sleep(3)

    with race.server(slow) as server_port, race.forwarder(step, server_port) as (port, process):
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"hello\n")
            client.shutdown(socket.SHUT_WR)
            race.time.sleep(0.5)
            share = cpu.busy_share(process.pid, 1.0)
    name = race.step_file(step).stem
    return f"$ python examples/lessons/cpu.py $(pgrep -f {name})\n{share:.0%} of one CPU over 1.0 s"


for _step in (4, 5, 6):
    recipe(f"cpu-step{_step:02d}")(lambda step=_step: cpu_while_waiting(step))


# -- traces, driven round by round ----------------------------------------------


def load_step(step: int) -> object:
    """Import step ``step``'s script as a module (its main block does not run)."""
    import importlib.util

    path = next(LESSONS.glob(f"step{step:02d}_*.py"))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def out_of_the_way(sock: socket.socket, fd: int) -> socket.socket:
    """``sock`` moved to descriptor ``fd``, so that the step's own get 3, 4, 5 as when run alone."""
    import os

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
    import warnings

    import asyncore_fwd.trace as trace

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


def send_request(scene: Scene) -> None:
    scene.client.sendall(REQUEST)


def half_close(scene: Scene) -> None:
    scene.client.shutdown(socket.SHUT_WR)


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


def connect(scene: Scene) -> None:
    scene.connect()


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


def server_answers_big_and_closes(scene: Scene) -> None:
    """The server reads the request to its EOF, sends 100,000 bytes and closes at once."""
    scene.accept()
    assert scene.server is not None
    while scene.server.recv(4096):
        pass
    scene.server.sendall(b"x" * BIG_REPLY)
    scene.server.close()


def nothing(scene: Scene) -> None:
    """No move: the round has what the step itself left to do."""


def step00_on_python3(*python_options: str) -> str:
    """What the article's code prints on this Python 3 when a client sends a request (stdout and stderr)."""
    sys.path.insert(0, str(LESSONS))
    import race

    script = race.step_file(0).relative_to(ROOT)
    with race.server(race.reply_after_eof) as server_port:
        port = race.free_port()
        process = subprocess.Popen([sys.executable, "-u", *python_options, str(script), "-l", "127.0.0.1",
                                    "-p", str(port), "-r", "127.0.0.1", "-P", str(server_port)],
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + race.WAIT
            while True:
                try:
                    race.fetch(port, half_close=True)
                    break
                except ConnectionRefusedError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            time.sleep(0.2)
        finally:
            process.terminate()
            printed, _ = process.communicate(timeout=race.WAIT)
    return printed


recipe("error-step00-python3")(lambda: step00_on_python3())
recipe("error-step00")(lambda: step00_on_python3("-W", "ignore"))


#: An nc -N request: accept, the request, the client's EOF.
HALF_CLOSING_CLIENT = [connect, send_request, half_close]
#: A curl request: accept, the request, the connect completes and the request goes out, the reply, the server's EOF.
CURL = [connect, send_request, nothing, server_replies, server_closes]

#: An nc -N request to a slow server: the loop goes round (spinning or waiting) until the server answers.
SLOW_SERVER = [connect, send_request, nothing, half_close, nothing, nothing, nothing, server_answers_and_closes]

recipe("trace-step05-spin")(lambda: traced(5, SLOW_SERVER, first=6, last=7))
recipe("trace-step05-end")(lambda: traced(5, SLOW_SERVER, rounds=lambda number, final: number == final))
#: The slow server answers, and closes a round later.
ANSWER_THEN_FIN = [connect, send_request, half_close, server_answers, nothing, server_closes]
recipe("trace-step06-slow")(lambda: traced(6, ANSWER_THEN_FIN, first=3, last=5))
recipe("trace-step06-fin")(lambda: traced(6, ANSWER_THEN_FIN, first=6))
recipe("trace-step06-together")(lambda: traced(6, [connect, send_request, half_close, server_answers_and_closes],
                                               first=3))
#: A half-closed request, answered with 100,000 bytes and the server's FIN right behind them.
BIG_THEN_FIN = [connect, send_request, half_close, server_answers_big_and_closes, finish]
recipe("trace-step07-fails")(lambda: traced(6, BIG_THEN_FIN, first=4))
recipe("trace-step07-hup")(lambda: traced(7, BIG_THEN_FIN, first=4, last=5))
recipe("trace-step07-end")(lambda: traced(7, BIG_THEN_FIN, rounds=lambda number, final: number >= final - 1))
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


def around_first(text: str, needle: str, before: int = 1, after: int = 0) -> str:
    """The rounds of ``text`` (a trace) from ``before`` before the first round with ``needle`` to ``after`` after."""
    first = next(int(line.split()[0][1:]) for line in text.splitlines() if needle in line)
    return only_rounds(text, lambda number, final: first - before <= number <= first + after)


def buffer_for_client_full(scene: Scene) -> bool:
    """Whether the step holds BUFFER_LIMIT bytes for the client (its sender is about to stop reading)."""
    return any(isinstance(obj, scene.lesson.receiver) and len(obj.to_remote_buffer) >= scene.lesson.BUFFER_LIMIT
               for obj in scene.lesson.asyncore.socket_map.values())


def client_reads_some(scene: Scene) -> None:
    """The slow client reads a little (16 KiB at most)."""
    scene.client.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        for _ in range(4):
            scene.client.recv(4096)


recipe("trace-step03-limit")(lambda: around_first(traced(3, [slow_client, send_request, nothing, Until(
    server_keeps_sending, buffer_for_client_full), client_reads_some, nothing]), "sender#1 readable() -> False",
    before=1, after=1))
recipe("trace-step04-curl")(lambda: traced(4, CURL, last=2, listener=True))
recipe("trace-step09")(lambda: traced(9, [connect, send_request], last=2, logs=True))
recipe("trace-step10")(lambda: traced(10, [connect, send_request], listener=True, logs=True))
recipe("trace-step10-quiet")(lambda: traced(10, [connect, send_request]))
recipe("trace-step02-download")(lambda: traced(2, [connect, send_request, nothing, server_sends_big,
                                                   nothing, nothing, nothing], first=5, last=7))
recipe("trace-step00")(lambda: traced(0, [connect, send_request], listener=True))
recipe("trace-step00-nc-z")(lambda: traced(0, [connect, half_close], first=2))
recipe("trace-step01-nc")(lambda: traced(1, HALF_CLOSING_CLIENT))
recipe("trace-step01-curl")(lambda: traced(1, CURL, first=4))


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


def only_rounds(text: str, keep: Callable[[int, int], bool]) -> str:
    """The lines of ``text`` (a trace) of the rounds ``keep(number, last)`` chooses."""
    numbered = [(re.match(r"r(\d+) ", line), line) for line in text.splitlines()]
    final = max((int(found.group(1)) for found, _ in numbered if found), default=0)
    return "\n".join(line for found, line in numbered if not found or keep(int(found.group(1)), final))


def without_predicates(text: str) -> str:
    """``text`` (a trace) without the readable()/writable() lines."""
    return "\n".join(line for line in text.splitlines() if not re.search(r" (readable|writable)\(\) -> ", line))


recipe("trace-step08-pause")(lambda: only_rounds(trace_out_of_descriptors(), lambda number, final: 3 <= number <= 4))
recipe("trace-step08-resume")(lambda: without_predicates(only_rounds(trace_out_of_descriptors(),
                                                                     lambda number, final: number >= final - 2)))


# -- a step run as a reader runs it --------------------------------------------


def run_script(step: int, remote_port: int, *args: str) -> str:
    """What the step's script prints (stdout and stderr) when one client sends a request and half-closes.

    The script listens on a free port (``-p 0``) and says which: "listening
    on port N" (steps 01-08) or its "forwarding ... port N" log line.
    """
    sys.path.insert(0, str(LESSONS))
    import race

    script = race.step_file(step).relative_to(ROOT)
    process = subprocess.Popen([sys.executable, "-u", "-W", "ignore", str(script), "-l", "127.0.0.1", "-p", "0",
                                "-r", "127.0.0.1", "-P", str(remote_port), *args],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        port = re.search(r"port (\d+)", first)
        if port is None:
            raise RuntimeError(f"{script}: no port in its first line: {first!r}")
        race.fetch(int(port.group(1)), half_close=True)
        time.sleep(0.3)
    finally:
        process.terminate()
        rest, _ = process.communicate(timeout=race.WAIT)
    return first + rest


def script_help(step: int) -> str:
    """``python stepNN_*.py --help``."""
    sys.path.insert(0, str(LESSONS))
    import race

    script = race.step_file(step)
    done = subprocess.run([sys.executable, "-W", "ignore", str(script), "--help"], capture_output=True, text=True,
                          timeout=60, check=True, env=dict(os.environ, COLUMNS="80"))  # optparse's width
    return done.stdout


def lines_from(text: str, start: str, count: int) -> str:
    """``count`` lines of ``text`` from the first that contains ``start``."""
    lines = text.splitlines()
    first = next(number for number, line in enumerate(lines) if start in line)
    return "\n".join(lines[first:first + count])


def many_clients(step: int, count: int = 600) -> List[str]:
    """The 600-client run of step 04's page: [what the clients print, what the forwarder prints].

    The step runs with 4096 descriptors allowed; its server side is a
    listening socket that never accepts, so that the step's connects stay
    in its backlog and use no descriptor of this process.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    sys.path.insert(0, str(LESSONS))
    import race

    def more_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))

    script = race.step_file(step).relative_to(ROOT)
    with socket.create_server(("127.0.0.1", 0), backlog=count + 100) as server:
        process = subprocess.Popen([sys.executable, "-u", "-W", "ignore", str(script), "-l", "127.0.0.1", "-p", "0",
                                    "-r", "127.0.0.1", "-P", str(server.getsockname()[1])], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   preexec_fn=more_descriptors)
        clients: List[socket.socket] = []
        try:
            assert process.stdout is not None
            first = process.stdout.readline()
            port = int(re.search(r"port (\d+)", first).group(1))  # type: ignore[union-attr]
            said = f"{count} clients connected"
            for number in range(count):
                try:
                    clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                except OSError as error:
                    said = f"client {number + 1}: {error}"
                    break
                time.sleep(0.003)  # the step accepts one client a round: do not overflow its backlog of 5
            time.sleep(1)
        finally:
            process.terminate()
            rest, _ = process.communicate(timeout=race.WAIT)
            for client in clients:
                client.close()
    return [said, first + rest]


def evidence(script: str, *args: str) -> str:
    """What one of the Chinese pages' evidence scripts (docs/zh/evidence/) prints."""
    done = subprocess.run([sys.executable, "-W", "ignore", f"docs/zh/evidence/{script}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


def emfile_evidence(step_script: str) -> List[str]:
    """docs/zh/evidence/emfile.sh against a web server of this run: [what it prints, the step's log]."""
    import tempfile

    sys.path.insert(0, str(LESSONS))
    import race

    web = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
                            "--directory", str(ROOT / "docs" / "zh" / "evidence")],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert web.stdout is not None
        server_port = re.search(r"port (\d+)", web.stdout.readline()).group(1)  # type: ignore[union-attr]
        with tempfile.TemporaryDirectory() as scratch:
            log = Path(scratch) / "step.log"
            env = dict(os.environ, PORT=str(race.free_port()), SERVER=server_port, LOG=str(log),
                       PYTHON=sys.executable)
            done = subprocess.run(["bash", "docs/zh/evidence/emfile.sh", step_script], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=120, check=True)
            return [done.stdout, log.read_text()]
    finally:
        web.kill()
        web.wait()


recipe("emfile-step07")(lambda: emfile_evidence("step07_poll_hangup.py")[0])
recipe("emfile-step07-log")(lambda: emfile_evidence("step07_poll_hangup.py")[1])
recipe("emfile-step08")(lambda: emfile_evidence("step08_accept.py")[0])
def three_clients_and_a_fourth(step: int) -> List[str]:
    """Step 08's page: the step with 8 descriptors, three clients holding on for 2 s, a request 3 s in.

    Returns [what the step printed, what the fourth client got].
    """
    import resource

    sys.path.insert(0, str(LESSONS))
    import race

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (8, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    script = race.step_file(step).relative_to(ROOT)
    with race.server(race.reply_after_eof) as server_port:
        process = subprocess.Popen([sys.executable, "-u", "-W", "ignore", str(script), "-l", "127.0.0.1", "-p", "0",
                                    "-r", "127.0.0.1", "-P", str(server_port)], cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, preexec_fn=few_descriptors)
        holding: List[socket.socket] = []
        try:
            assert process.stdout is not None
            first = process.stdout.readline()
            port = int(re.search(r"port (\d+)", first).group(1))  # type: ignore[union-attr]
            for _ in range(3):
                holding.append(socket.create_connection(("127.0.0.1", port)))
            time.sleep(2)
            for client in holding:
                with contextlib.suppress(OSError):  # the one the step could not take was reset
                    client.shutdown(socket.SHUT_WR)
            time.sleep(1)
            try:
                fourth = race.fetch(port, half_close=True).decode() or "(nothing)"
            except ConnectionError as error:
                fourth = f"({error})"
            time.sleep(0.3)
        finally:
            process.terminate()
            rest, _ = process.communicate(timeout=race.WAIT)
            for client in holding:
                client.close()
    return [first + rest, fourth]


recipe("ulimit8-step07")(lambda: three_clients_and_a_fourth(7)[0])
recipe("ulimit8-step07-fourth")(lambda: three_clients_and_a_fourth(7)[1])
recipe("ulimit8-step08-fourth")(lambda: three_clients_and_a_fourth(8)[1])
def resident_kib(pid: int) -> int:
    """VmRSS of ``pid``, in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]


def memory_of_a_slow_client(step: int, megabytes: int, wait: float) -> List[int]:
    """[VmRSS before, VmRSS ``wait`` s after] a client that reads nothing asks for ``megabytes`` MB."""
    sys.path.insert(0, str(LESSONS))
    import race

    def send_megabytes(conn: socket.socket) -> None:
        chunk = b"x" * 65536
        with contextlib.suppress(OSError), conn:
            conn.recv(4096)
            for _ in range(megabytes * 16):
                conn.sendall(chunk)

    with race.server(send_megabytes) as server_port, race.forwarder(step, server_port) as (port, process):
        before = resident_kib(process.pid)
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")
            time.sleep(wait)
            after = resident_kib(process.pid)
    return [before, after]


def memory_table() -> str:
    """Step 03's English page: steps 02 and 03, before and 2 s into a 20 MB download nobody reads."""
    rows = []
    for step, name in ((2, "step02_buffers"), (3, "step03_backpressure")):
        before, after = memory_of_a_slow_client(step, 20, 2.0)
        rows.append(f"{name + ':':21}{before:6d} -> {after} KiB")
    return "\n".join(rows)


recipe("memory-steps02-03")(memory_table)
recipe("vmrss-step02")(lambda: f"VmRSS:\t{memory_of_a_slow_client(2, 300, 2.0)[1]:8d} kB")
recipe("vmrss-step03")(lambda: f"VmRSS:\t{memory_of_a_slow_client(3, 300, 2.0)[1]:8d} kB")
def run_python(*args: str) -> str:
    """What ``python ARGS`` prints, run from the repository root."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=True).stdout


recipe("copy-cost")(lambda: run_python("examples/lessons/copy_cost.py"))
recipe("timeit-bytes")(lambda: run_python("-m", "timeit", "-s", "buf = b'x' * 10_000_000", "buf[4096:]"))
recipe("timeit-bytearray")(lambda: run_python("-m", "timeit", "-s", "buf = bytearray(b'x' * 10_000_000)",
                                              "del buf[:4096]; buf += b'x' * 4096"))
recipe("select-limit-step03")(lambda: evidence("select_limit.py", "examples/lessons", "step03_backpressure"))
recipe("select-limit-step04")(lambda: evidence("select_limit.py", "examples/lessons", "step04_poll"))
recipe("many-clients-step03-client")(lambda: many_clients(3)[0])
recipe("many-clients-step03")(lambda: many_clients(3)[1])
recipe("many-clients-step04-client")(lambda: many_clients(4)[0])


#: A port where nothing listens on this machine (discard), as on the pages.
NOBODY = 9

recipe("run-step08-refused")(lambda: run_script(8, NOBODY))
recipe("run-step09-refused")(lambda: run_script(9, NOBODY))
recipe("help-step08-remote")(lambda: lines_from(script_help(8), "--remote-ip", 4))
recipe("help-step09")(lambda: script_help(9))


def main(argv: List[str]) -> int:
    if argv == ["--list"]:
        print("\n".join(sorted(RECIPES)))
        return 0
    if len(argv) != 1 or argv[0] not in RECIPES:
        print(f"usage: outputs.py ID | --list  (unknown: {' '.join(argv)})", file=sys.stderr)
        return 2
    print(normalise(RECIPES[argv[0]]()).rstrip("\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
