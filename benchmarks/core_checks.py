"""Measure the core forwarder's promises on this machine (not a test suite).

Runs ``python -m asyncore_fwd`` as a child process in front of local servers
and reports, for that process:

* memory: peak RSS growth while 1 GiB goes to a client that reads nothing
  for 5 s, then reads everything (and checks every byte arrived);
* scale: N simultaneous connections (default 3000) held open and echoed;
* half-close: ``printf 'GET /file HTTP/1.0\\r\\n\\r\\n' | nc -N`` through it
  against ``python -m http.server``, the reply compared byte for byte (and the
  same through the article's example, for contrast);
* idle cost: CPU used in 10 s with 500 idle connections open.

Usage: python benchmarks/core_checks.py [--connections 3000] [--idle 500]
Everything runs on 127.0.0.1 with ephemeral ports.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
TIMEOUT = 120.0


class Servers:
    """Echo and "send N bytes" servers on one selectors loop in a thread."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.echo_port = self._listen("echo")
        self.source_port = self._listen("source")
        self.block = os.urandom(MiB)
        self.source_size = 1 << 30
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _listen(self, kind: str) -> int:
        listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, ("listen", kind))
        return listener.getsockname()[1]

    def _run(self) -> None:
        while self.running:
            for key, _ in self.selector.select(0.1):
                role, state = key.data
                if role == "listen":
                    self._accept(key.fileobj, state)
                elif role == "echo":
                    self._echo(key.fileobj)
                else:
                    self._source(key.fileobj, state)

    def _accept(self, listener: socket.socket, kind: str) -> None:
        for _ in range(256):
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            if kind == "echo":
                self.selector.register(conn, selectors.EVENT_READ, ("echo", None))
            else:
                self.selector.register(conn, selectors.EVENT_WRITE, ("source", [self.source_size]))

    def _echo(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
            if data:
                conn.sendall(data)  # small messages only: fits the send buffer
                return
        except OSError:
            pass
        self.selector.unregister(conn)
        conn.close()

    def _source(self, conn: socket.socket, left: list) -> None:
        try:
            sent = conn.send(memoryview(self.block)[: min(MiB, left[0])])
        except BlockingIOError:
            return
        except OSError:
            sent, left[0] = 0, 0
        left[0] -= sent
        if left[0] <= 0:
            self.selector.unregister(conn)
            conn.close()

    def stop(self) -> None:
        self.running = False
        self.thread.join(5)


class ForwarderProcess:
    """``python -m asyncore_fwd`` in front of a local port; exposes its /proc figures."""

    def __init__(self, remote_port: int, *extra: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "asyncore_fwd", "-p", "0", "-r", "127.0.0.1", "-P", str(remote_port), *extra],
            stderr=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.process.stderr.readline()
        match = re.search(r"forwarding 127\.0\.0\.1:(\d+)", line)
        if not match:
            self.process.kill()
            raise SystemExit(f"forwarder did not start: {line!r}")
        self.port = int(match.group(1))
        threading.Thread(target=self.process.stderr.read, daemon=True).start()  # keep the pipe drained

    def status_kib(self, field: str) -> int:
        text = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(10)


def check_memory(servers: Servers, pause: float = 5.0) -> str:
    fwd = ForwarderProcess(servers.source_port)
    try:
        base = fwd.status_kib("VmRSS")
        client = socket.create_connection(("127.0.0.1", fwd.port), timeout=TIMEOUT)
        time.sleep(pause)  # the client reads nothing: the forwarder must stop reading too
        paused_peak = fwd.status_kib("VmHWM")
        received, started = 0, time.monotonic()
        while True:
            chunk = client.recv(MiB)
            if not chunk:
                break
            received += len(chunk)
        elapsed = time.monotonic() - started
        client.close()
        peak = fwd.status_kib("VmHWM")
    finally:
        fwd.stop()
    ok = received == servers.source_size
    return (f"1 GiB to a client paused {pause:g} s: received {received} bytes ({'all' if ok else 'INCOMPLETE'}), "
            f"RSS at start {base / 1024:.1f} MiB, peak growth {(paused_peak - base) / 1024:.1f} MiB during the pause, "
            f"{(peak - base) / 1024:.1f} MiB overall; drained at {received / MiB / elapsed:.0f} MiB/s")


def check_scale(servers: Servers, count: int) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * count + 1000)), hard))
    fwd = ForwarderProcess(servers.echo_port, "--backlog", "4096")
    clients = []
    try:
        started = time.monotonic()
        for _ in range(count):
            clients.append(socket.create_connection(("127.0.0.1", fwd.port), timeout=TIMEOUT))
        for index, client in enumerate(clients):
            client.sendall(b"%08d" % index)
        good = sum(client.recv(8) == b"%08d" % index for index, client in enumerate(clients))
        elapsed = time.monotonic() - started
        fds = len(os.listdir(f"/proc/{fwd.process.pid}/fd"))
        rss = fwd.status_kib("VmRSS")
    finally:
        for client in clients:
            client.close()
        fwd.stop()
    return (f"{count} simultaneous connections: {good}/{count} echoed correctly in {elapsed:.2f} s; "
            f"forwarder held {fds} descriptors, RSS {rss / 1024:.1f} MiB")


def check_half_close() -> str:
    if not shutil.which("nc"):
        return "half-close: skipped (no nc; apt-get install netcat-openbsd)"
    with tempfile.TemporaryDirectory() as root:
        body = os.urandom(MiB)
        Path(root, "file").write_bytes(body)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            http_port = probe.getsockname()[1]
        http = subprocess.Popen([sys.executable, "-m", "http.server", "-b", "127.0.0.1", "-d", root, str(http_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results = []
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", http_port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            fwd = ForwarderProcess(http_port)
            article = subprocess.Popen([sys.executable, str(ROOT / "examples" / "article_forwarder.py"),
                                        "-p", "0", "-r", "127.0.0.1", "-P", str(http_port)],
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            article_port = int(article.stdout.readline())
            try:
                for name, port in (("asyncore_fwd", fwd.port), ("article", article_port)):
                    reply = subprocess.run(["nc", "-N", "127.0.0.1", str(port)],
                                           input=b"GET /file HTTP/1.0\r\n\r\n", capture_output=True,
                                           timeout=30).stdout
                    _, _, got = reply.partition(b"\r\n\r\n")
                    verdict = "whole reply, identical" if got == body else f"{len(got)} of {len(body)} body bytes"
                    results.append(f"{name}: {len(reply)} bytes, {verdict} "
                                   f"(sha256 {hashlib.sha256(got).hexdigest()[:12]})")
            finally:
                fwd.stop()
                article.kill()
                article.wait(5)
        finally:
            http.terminate()
            http.wait(5)
    return "half-close, printf 'GET /file HTTP/1.0\\r\\n\\r\\n' | nc -N (1 MiB file): " + "; ".join(results)


def check_idle(servers: Servers, count: int, window: float = 10.0) -> str:
    fwd = ForwarderProcess(servers.echo_port)
    clients = []
    try:
        for _ in range(count):
            client = socket.create_connection(("127.0.0.1", fwd.port), timeout=TIMEOUT)
            client.sendall(b"x")
            assert client.recv(1) == b"x"
            clients.append(client)
        time.sleep(1.0)
        before, started = fwd.cpu_seconds(), time.monotonic()
        time.sleep(window)
        used, elapsed = fwd.cpu_seconds() - before, time.monotonic() - started
        rss = fwd.status_kib("VmRSS")
    finally:
        for client in clients:
            client.close()
        fwd.stop()
    return (f"{count} idle connections: {used:.2f} CPU-s in {elapsed:.1f} s = "
            f"{100 * used / elapsed:.1f} % of one core; "
            f"RSS {rss / 1024:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--idle", type=int, default=500)
    parser.add_argument("--only", choices=["memory", "scale", "half-close", "idle"])
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}")
    servers = Servers()
    try:
        checks = {
            "half-close": check_half_close,
            "memory": lambda: check_memory(servers),
            "scale": lambda: check_scale(servers, args.connections),
            "idle": lambda: check_idle(servers, args.idle),
        }
        for name, check in checks.items():
            if args.only in (None, name):
                print("-", check(), flush=True)
    finally:
        servers.stop()


if __name__ == "__main__":
    main()
