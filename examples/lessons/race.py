"""Measure a race of the lessons: run one scenario N times through a step, count the lost replies.

    python examples/lessons/race.py STEP SCENARIO [-n 20]

STEP is a step number (00 .. 10); SCENARIO is one of:

  curl   the client sends a request and reads until EOF, without closing its
         side first, like curl; the server replies at once (617 bytes) and
         closes.  The race: the reply and the server's EOF in one round.
  nc     the client sends a request and half-closes, like `nc -N`; the server
         reads until that EOF, thinks a moment, replies and closes.  The
         races: the client's EOF against the request (steps 00-04), the
         server's FIN against the reply (steps 05-06).
  big    as nc, but the server answers at once with 1,000,000 bytes and
         closes: the reply is still arriving when the FIN does, so a step
         that closes on the hang-up (steps 05-06) loses its tail.

The script starts its own server and the step itself (as a reader would,
step 00 with python2.7), runs the scenario N times one after the other, and
prints how many replies came back short, e.g. "18/20 replies came back
short".  The numbers depend on the machine and its load: that is the point
of a race.  From the step that fixes the race on, it must print 0/N.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

LESSONS = Path(__file__).resolve().parent
#: The reply of the curl scenario: the size of the page the lessons fetch from `python3 -m http.server`.
PAGE = b"x" * 616 + b"\n"
#: What the nc scenario's server answers once it has the whole request.
THOUGHT = b"reply after a moment\n"
#: What the big scenario's server answers: more than one round's reads, as the lessons' bulk server.
BIG = bytes(range(256)) * 3906 + b"x" * 64
#: How long the nc scenario's server thinks before it answers (the lessons' slow server takes 3 s).
THINK = 0.05
WAIT = 10.0


def step_file(step: int) -> Path:
    """The script of step ``step`` (examples/lessons/stepNN_*.py)."""
    found = sorted(LESSONS.glob(f"step{step:02d}_*.py"))
    if not found:
        raise SystemExit(f"race.py: no step {step:02d} in {LESSONS}")
    return found[0]


def interpreter(step: int) -> str:
    """The Python that runs the step: the article (step 00) is Python 2 (pyenv's 2.7 first)."""
    if step != 0:
        return sys.executable
    candidates = ["python2.7", "python2"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        prefix = subprocess.run(["pyenv", "prefix", "2.7"], capture_output=True, text=True, timeout=WAIT).stdout
        if prefix.strip():
            candidates.insert(0, os.path.join(prefix.strip(), "bin", "python"))
    for candidate in candidates:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[0])"],
                                   capture_output=True, text=True, timeout=WAIT)
            if probe.returncode == 0 and probe.stdout.strip() == "2":
                return candidate
    raise SystemExit("race.py: step 00 needs Python 2.7 (python2.7 on PATH, or pyenv's 2.7)")


def free_port() -> int:
    """A loopback port free a moment ago (step 00 cannot listen on port 0 and say which it got)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def server(handle: Callable[[socket.socket], None]) -> Iterator[int]:
    """A loopback server that runs ``handle`` for each client in a thread; yields its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def accept_loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        listener.close()


def reply_at_once(conn: socket.socket) -> None:
    """The curl scenario's server: read the request, send the page, close."""
    with conn:
        conn.recv(4096)
        conn.sendall(PAGE)


def reply_after_eof(conn: socket.socket) -> None:
    """The nc scenario's server: read until EOF, think, answer, close."""
    with conn:
        try:
            while conn.recv(4096):
                pass
        except ConnectionError:
            return
        time.sleep(THINK)
        with contextlib.suppress(OSError):
            conn.sendall(THOUGHT)


def reply_big_after_eof(conn: socket.socket) -> None:
    """The big scenario's server: read until EOF, send 1,000,000 bytes at once, close."""
    with conn:
        try:
            while conn.recv(4096):
                pass
            conn.sendall(BIG)
        except ConnectionError:
            return


@contextlib.contextmanager
def forwarder(step: int, server_port: int) -> Iterator[Tuple[int, subprocess.Popen]]:
    """The step's script forwarding a free port to ``server_port``; yields (port, process)."""
    port = free_port()
    command = [interpreter(step), "-W", "ignore", str(step_file(step)),
               "-l", "127.0.0.1", "-p", str(port), "-r", "127.0.0.1", "-P", str(server_port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + WAIT
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"race.py: {step_file(step).name} did not listen on port {port}")
            time.sleep(0.05)
        yield port, process
    finally:
        process.kill()
        process.wait()


def fetch(port: int, half_close: bool) -> bytes:
    """One client: send a request (then half-close, if asked), read until EOF or a reset."""
    reply = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
        # The step may have dropped the client already (reset, or shut down): that is a short reply too.
        with contextlib.suppress(OSError):
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")
            if half_close:
                client.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            while True:
                chunk = client.recv(65536)
                if not chunk:
                    break
                reply += chunk
    return bytes(reply)


SCENARIOS = {"curl": (reply_at_once, False, PAGE), "nc": (reply_after_eof, True, THOUGHT),
             "big": (reply_big_after_eof, True, BIG)}


def measure(step: int, scenario: str, runs: int) -> int:
    """How many of ``runs`` replies came back short."""
    handle, half_close, expected = SCENARIOS[scenario]
    short = 0
    with server(handle) as server_port, forwarder(step, server_port) as (port, _):
        for _ in range(runs):
            if fetch(port, half_close) != expected:
                short += 1
    return short


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description="Count the replies a step loses to a race.")
    parser.add_argument("step", type=int, help="the step, 0 to 10")
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("-n", type=int, default=20, help="how many runs (default 20)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("-n must be at least 1")
    short = measure(args.step, args.scenario, args.n)
    print(f"{short}/{args.n} replies came back short")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main(sys.argv[1:]))
