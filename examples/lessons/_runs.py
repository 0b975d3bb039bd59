"""Outputs for the pages from a step run as a reader runs it: a script, a client, a measurement.

Each function starts what the page starts (the step's script, race.py, an
evidence script, a web server), with free ports instead of the pages' fixed
ones, plays the page's clients, and returns what was printed or measured.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import cpu
import race

LESSONS = Path(__file__).resolve().parent
ROOT = LESSONS.parent.parent
#: How many runs a rate on a page is measured over.
RACE_RUNS = 20
#: A port where nothing listens on this machine (discard), as on the pages.
NOBODY = 9


def race_rate(step: int, scenario: str) -> str:
    """``race.py STEP SCENARIO -n 20`` and what it prints, as on a terminal."""
    args = [f"{step:02d}", scenario, "-n", str(RACE_RUNS)]
    done = subprocess.run([sys.executable, str(LESSONS / "race.py"), *args],
                          capture_output=True, text=True, timeout=300, check=True)
    return f"$ python examples/lessons/race.py {' '.join(args)}\n{done.stdout.strip()}"


def cpu_while_waiting(step: int) -> str:
    """cpu.py on the step while a half-closed client waits for a slow server, and what it says."""
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


def asyncore_source(name: str) -> str:
    """The source of one of asyncore's functions, in the asyncore this Python imports."""
    import inspect
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import asyncore
    return inspect.getsource(getattr(asyncore, name))


def step00_on_python3(*python_options: str) -> str:
    """What the article's code prints on this Python 3 when a client sends a request (stdout and stderr)."""
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


def run_script(step: int, remote_port: int, *args: str) -> str:
    """What the step's script prints (stdout and stderr) when one client sends a request and half-closes.

    The script listens on a free port (``-p 0``) and says which: "listening
    on port N" (steps 01-08) or its "forwarding ... port N" log line.
    """
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


def three_clients_and_a_fourth(step: int) -> List[str]:
    """Step 08's page: the step with 8 descriptors, three clients holding on for 2 s, a request 3 s in.

    Returns [what the step printed, what the fourth client got].
    """
    import resource

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


def resident_kib(pid: int) -> int:
    """VmRSS of ``pid``, in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]


def memory_of_a_slow_client(step: int, megabytes: int, wait: float) -> List[int]:
    """[VmRSS before, VmRSS ``wait`` s after] a client that reads nothing asks for ``megabytes`` MB."""
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


def run_python(*args: str) -> str:
    """What ``python ARGS`` prints, run from the repository root."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=True).stdout
