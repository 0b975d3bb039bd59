#!/usr/bin/env python3
"""Soak test: mixed, faulty traffic through the forwarder for a long time.

    python benchmarks/soak.py                  # 30 minutes
    python benchmarks/soak.py --minutes 5 --splice --fd-limit 512

Runs ``python -m asyncore_fwd`` as a child process, with a low
RLIMIT_NOFILE, in front of a threaded server in this process, and drives it
from worker threads with random transfers: echoes of random sizes and chunk
sizes, slow readers (backpressure), urgent bytes, half-closes with the server
answering after the client's EOF, server resets, client resets and early
closes.  Faults on top: a share of the server's accepts greet and reset at
once, the server stops listening now and then (refused connects), and a pool
of idle connections rises past the forwarder's descriptor limit and falls
back, again and again (EMFILE).

Every transfer is checked byte for byte (SHA-256 of what arrived against the
same length of what was sent): a clean EOF must come after all of it, a
reset must never arrive as a clean EOF, a connection must never be cut once
bytes flow.  The server checks the client's bytes the same way.

Every 10 s it samples the forwarder's RSS and open descriptors from
/proc/PID.  After a warm-up, the run is cut in thirds; at the start and at
the end of each third the traffic stops, every connection closes, and the
forwarder's descriptors must come back to what it had at start (a
"checkpoint").  The run passes (exit 0) when no check failed, every
checkpoint is back to the start, the median RSS of the last third is within
--rss-tolerance (plus --rss-slack-mib) of the first third's, and so is the RSS
at the last checkpoint against the first one, and the descriptors beyond two
(or six, with --splice) per open client connection stay within --fd-slack of
the first third's.  It prints a summary table and writes every sample to JSON.
Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from benchlib import BENCH, HOST, ROOT, raise_fd_limit, status_kib

from asyncore_fwd._net import reset  # close with RST

GREETING = b"GREETING-THEN-RESET\n" * 50  # what a server that resets at once sends first
KINDS = {  # transfer kind: weight
    "echo": 35, "slow-echo": 15, "urgent-echo": 10, "reply-after-eof": 15, "server-reset": 10,
    "client-reset": 10, "client-close": 5,
}


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def port_below_ephemeral_range() -> int:
    """A free port the kernel never picks for a connect (so the server's port cannot self-connect)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
        first = int(ports.read().split()[0])
    for port in random.sample(range(10000, first), 500):
        with socket.socket() as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                continue
            return port
    raise SystemExit("soak: no free port below the ephemeral range")


class Report:
    """Counters and failures shared by every thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Dict[str, Dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.failures: List[Dict[str, Any]] = []
        self.failure_count = 0

    def count(self, kind: str, outcome: str, amount: int = 1) -> None:
        with self.lock:
            self.counts[kind][outcome] += amount

    def fail(self, kind: str, what: str, **details: Any) -> None:
        with self.lock:
            self.failure_count += 1
            self.counts[kind]["FAILED"] += 1
            if len(self.failures) < 50:
                self.failures.append({"time": time.time(), "kind": kind, "what": what, **details})
        print(f"soak: FAILED {kind}: {what} {details}", file=sys.stderr, flush=True)


# -- the server behind the forwarder ---------------------------------------------------


class Server:
    """A thread per connection: reads a header line, then echoes, resets or answers after EOF.

    Headers: ``IDLE``; ``ECHO seed size``; ``RESET seed size after``;
    ``AFTER seed size reply_seed reply_size``.  What follows the header is
    checked against ``payload(seed, size)``.
    """

    def __init__(self, report: Report, greet_reset_share: float, rng: random.Random) -> None:
        self.report, self.greet_reset_share, self.rng = report, greet_reset_share, rng
        self.port = port_below_ephemeral_range()
        self.running = True
        self.lock = threading.Lock()
        self.connections: set = set()
        self.listener: Optional[socket.socket] = None
        self.listening = threading.Event()
        self.outages = 0
        self._listen()
        self.thread = threading.Thread(target=self._accept_loop, name="server", daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self.port))
        listener.listen(1024)
        listener.settimeout(0.2)
        self.listener = listener
        self.listening.set()

    def outage(self, seconds: float) -> None:
        """Stop listening for ``seconds`` (connects are refused meanwhile), then listen again."""
        self.listening.clear()
        self.outages += 1
        time.sleep(0.3)  # let the accept loop leave the old listener
        assert self.listener is not None
        self.listener.close()
        time.sleep(seconds)
        self._listen()

    def _accept_loop(self) -> None:
        while self.running:
            if not self.listening.wait(0.2):
                continue
            listener = self.listener
            try:
                conn, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            if not self.listening.is_set():  # accepted in the last instant before an outage
                reset(conn)
                continue
            with self.lock:
                self.connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(120)
            if self.rng.random() < self.greet_reset_share:
                self.report.count("server", "greeted and reset")
                conn.sendall(GREETING)
                reset(conn)
                return
            self._session(conn)
        except OSError:
            pass  # a reset or a timeout: the client side decides whether that was right
        finally:
            with self.lock:
                self.connections.discard(conn)
            conn.close()

    def _read_header(self, conn: socket.socket) -> Tuple[List[str], bytes]:
        buffered = b""
        while b"\n" not in buffered:
            chunk = conn.recv(256)
            if not chunk:
                return [], b""
            buffered += chunk
            if b"\n" not in buffered and len(buffered) > 200:
                raise OSError("no header line")
        line, rest = buffered.split(b"\n", 1)
        return line.decode().split(), rest

    def _session(self, conn: socket.socket) -> None:
        words, first = self._read_header(conn)
        if not words:
            return
        if words[0] == "IDLE":
            conn.settimeout(3600)
            while conn.recv(65536):
                pass
            return
        seed, size = int(words[1]), int(words[2])
        expected = payload(seed, size)
        reset_after = int(words[3]) if words[0] == "RESET" else None
        echo = words[0] in ("ECHO", "RESET")
        got = 0
        chunk = first
        while True:
            if chunk:
                if expected[got:got + len(chunk)] != chunk:
                    self.report.fail("server", "bytes from the client differ from what it sent",
                                     offset=got, length=len(chunk))
                    reset(conn)
                    return
                got += len(chunk)
                if echo:
                    conn.sendall(chunk)
                if reset_after is not None and got >= reset_after:
                    reset(conn)
                    return
            try:
                chunk = conn.recv(65536)
            except ConnectionResetError:
                return  # the client (or the forwarder for it) reset: fine at any point
            if not chunk:
                break
        if got != size:
            self.report.fail("server", "clean EOF from the client before all its bytes", got=got, size=size)
            return
        if words[0] == "AFTER":
            conn.sendall(payload(int(words[3]), int(words[4])))
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(10)
        while conn.recv(65536):  # wait for the client's close
            pass

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        if self.listener is not None:
            self.listener.close()
        with self.lock:
            for conn in list(self.connections):
                conn.close()


# -- clients ----------------------------------------------------------------------------


class Traffic:
    """Worker threads doing random transfers, an idle-connection pool, backend outages."""

    def __init__(self, args: argparse.Namespace, address: Tuple[str, int], server: Server, report: Report,
                 capacity: int) -> None:
        self.args, self.address, self.server, self.report = args, address, server, report
        self.capacity = capacity  # connections the forwarder can hold at its descriptor limit
        self.stop = threading.Event()
        self.quiet = threading.Event()  # set: finish the current transfer and wait
        self.lock = threading.Lock()
        self.open_connections = 0  # client sockets open now (the forwarder holds a pair for each)
        self.busy = 0  # transfers in progress
        self.idle: List[socket.socket] = []
        self.started_at = time.monotonic()
        self.threads = [threading.Thread(target=self._worker, args=(args.seed * 1000 + i,), daemon=True,
                                         name=f"worker-{i}") for i in range(args.workers)]
        self.threads.append(threading.Thread(target=self._idle_pool, daemon=True, name="idle-pool"))
        self.threads.append(threading.Thread(target=self._outages, daemon=True, name="outages"))

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _opened(self, delta: int) -> None:
        with self.lock:
            self.open_connections += delta

    # -- transfers ----------------------------------------------------------

    def _worker(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            if self.quiet.is_set():
                time.sleep(0.05)
                continue
            with self.lock:
                self.busy += 1
            try:
                self._transfer(rng)
            except Exception as error:  # a bug here must not end the run quietly
                self.report.fail("harness", f"{type(error).__name__}: {error}")
            finally:
                with self.lock:
                    self.busy -= 1

    def _transfer(self, rng: random.Random) -> None:
        kind = rng.choices(list(KINDS), list(KINDS.values()))[0]
        size = int(math.exp(rng.uniform(0, math.log(self.args.max_size))))
        seed = rng.getrandbits(62)
        data = payload(seed, size)
        expected = data
        if kind == "reply-after-eof":
            reply_seed, reply_size = rng.getrandbits(62), int(math.exp(rng.uniform(0, math.log(self.args.max_size))))
            header = f"AFTER {seed} {size} {reply_seed} {reply_size}\n"
            expected = payload(reply_seed, reply_size)
        elif kind == "server-reset":
            size = max(size, 2)
            data = expected = payload(seed, size)
            header = f"RESET {seed} {size} {rng.randint(1, size - 1)}\n"
        elif kind == "client-close":
            # It closes after part of its bytes, which the header announces:
            # the server must see all of them, then a clean EOF (or a reset).
            size = rng.randint(0, size)
            data = expected = payload(seed, size)
            header = f"ECHO {seed} {size}\n"
        else:
            header = f"ECHO {seed} {size}\n"
        out = memoryview(header.encode() + data)
        stop_at = len(out)  # where the client stops sending (and half-closes, resets or closes)
        if kind == "client-reset":  # the server must never take the reset for a clean EOF
            stop_at = len(header) + rng.randint(0, size)
        urgent_at = len(header) + rng.randrange(size) if kind == "urgent-echo" and size else -1
        slow = kind == "slow-echo"

        sock = socket.socket()
        if slow:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        try:
            sock.connect(self.address)
        except OSError as error:
            sock.close()
            self.report.count(kind, f"connect failed ({type(error).__name__})")
            return
        self._opened(1)
        try:
            self._exchange(rng, kind, sock, out, stop_at, urgent_at, slow, expected, len(header))
        finally:
            sock.close()
            self._opened(-1)

    def _exchange(self, rng: random.Random, kind: str, sock: socket.socket, out: memoryview, stop_at: int,
                  urgent_at: int, slow: bool, expected: bytes, header_size: int) -> None:
        sock.setblocking(False)
        received = bytearray()
        sent = 0
        shut = False
        ending: Optional[str] = None  # "eof", "reset", or "client" (it ended the connection itself)
        next_read = 0.0
        deadline = time.monotonic() + self.args.transfer_timeout
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while ending is None:
                now = time.monotonic()
                if now > deadline:
                    self.report.fail(kind, "stalled", sent=sent, received=len(received), stop_at=stop_at)
                    reset(sock)
                    return
                want = 0 if now < next_read else selectors.EVENT_READ
                if sent < stop_at:
                    want |= selectors.EVENT_WRITE
                if not want:
                    time.sleep(min(0.02, next_read - now))
                    continue
                selector.modify(sock, want)
                ready = selector.select(0.1)
                events = ready[0][1] if ready else 0
                if events & selectors.EVENT_WRITE:
                    try:
                        if sent == urgent_at:
                            sent += sock.send(out[sent:sent + 1], socket.MSG_OOB)
                        else:
                            limit = urgent_at if sent < urgent_at else stop_at
                            sent += sock.send(out[sent:min(limit, sent + rng.randint(1, 256 * 1024))])
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        ending = "reset"
                        break
                if sent >= stop_at and not shut:
                    shut = True
                    if kind == "client-reset":
                        reset(sock)
                        ending = "client"
                        break
                    if kind == "client-close":
                        sock.close()
                        ending = "client"
                        break
                    try:
                        sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass  # reset already: the next read says so, after what came before it
                if events & selectors.EVENT_READ:
                    try:
                        chunk = sock.recv(16 * 1024 if slow else 256 * 1024)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        ending = "reset"
                        break
                    if not chunk:
                        ending = "eof"
                        break
                    received += chunk
                    if slow:
                        next_read = time.monotonic() + rng.uniform(0.001, 0.02)
        self._judge(kind, ending, bytes(received), expected, header_size)

    def _judge(self, kind: str, ending: str, received: bytes, expected: bytes, header_size: int) -> None:
        """Check what arrived against what was sent, and how the stream ended."""
        self.report.count(kind, "bytes received", len(received))
        if digest(received) != digest(expected[:len(received)]) and GREETING.startswith(received):
            if ending == "eof":
                self.report.fail(kind, "the server's reset after its greeting arrived as a clean EOF")
            else:
                self.report.count(kind, "greeting, then reset")
            return
        if digest(received) != digest(expected[:len(received)]):
            self.report.fail(kind, "bytes differ from those sent (lost, doubled, moved or changed)",
                             received=len(received))
            return
        if ending == "client":
            self.report.count(kind, "ok")
        elif ending == "eof":
            if kind == "server-reset":
                self.report.fail(kind, "the server's reset arrived as a clean EOF", received=len(received))
            elif len(received) != len(expected):
                self.report.fail(kind, "clean EOF before all the bytes", received=len(received),
                                 expected=len(expected))
            else:
                self.report.count(kind, "ok")
        elif kind == "server-reset":
            self.report.count(kind, "ok")
        elif not received:
            self.report.count(kind, "refused (reset before any byte)")
        else:
            self.report.fail(kind, "reset in the middle of the stream", received=len(received),
                             expected=len(expected))

    # -- faults -------------------------------------------------------------

    def _idle_pool(self) -> None:
        """Idle connections: a saw-tooth from 20% to 110% of what the forwarder can hold."""
        rng = random.Random(self.args.seed + 7)
        period = self.args.pressure_period
        while not self.stop.is_set():
            self.stop.wait(0.2)
            if self.quiet.is_set():
                self._close_idle(len(self.idle), rng)
                continue
            phase = ((time.monotonic() - self.started_at) % period) / period
            target = int(self.capacity * (0.2 + 0.9 * phase))
            self._close_idle(max(0, len(self.idle) - target), rng)
            for _ in range(min(25, target - len(self.idle))):
                sock = socket.socket()
                sock.settimeout(2)
                try:
                    sock.connect(self.address)
                    sock.sendall(b"IDLE\n")
                except OSError:
                    sock.close()
                    self.report.count("idle", "connect failed")
                    break
                sock.setblocking(False)
                self.idle.append(sock)
                self._opened(1)
                self.report.count("idle", "opened")
            for sock in list(self.idle):  # drop those refused, reset or greeted (an idle one expects nothing)
                try:
                    sock.recv(1, socket.MSG_PEEK)
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                self.idle.remove(sock)
                sock.close()
                self._opened(-1)
                self.report.count("idle", "refused or ended")

    def _close_idle(self, count: int, rng: random.Random) -> None:
        for _ in range(count):
            sock = self.idle.pop(rng.randrange(len(self.idle)))
            if rng.random() < 0.3:
                reset(sock)
            else:
                sock.close()
            self._opened(-1)

    def _outages(self) -> None:
        """Now and then the server stops listening for a moment."""
        rng = random.Random(self.args.seed + 11)
        while not self.stop.wait(rng.uniform(20, 60)):
            if not self.quiet.is_set():
                self.server.outage(rng.uniform(0.5, 3))

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(self.args.transfer_timeout + 10)
        self._close_idle(len(self.idle), random.Random(0))


# -- the forwarder and its figures ---------------------------------------------------


def start_forwarder(args: argparse.Namespace, server_port: int, log_path: Path) -> Tuple[subprocess.Popen, int]:
    command = [sys.executable, "-m", "asyncore_fwd", "-p", "0", "-r", HOST, "-P", str(server_port),
               "--high-water", args.high_water, "--loop", args.loop] + (["--splice"] if args.splice else [])
    limit = args.fd_limit

    def lower_fd_limit() -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

    log = open(log_path, "w")
    process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                               preexec_fn=lower_fd_limit, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        match = re.search(r"forwarding \S+:(\d+) to ", log_path.read_text())
        if match:
            return process, int(match.group(1))
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise SystemExit(f"soak: the forwarder did not start:\n{log_path.read_text()}")


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def median(values: List[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the run (default 30)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds before the figures count (default 10%% of the run, 30 to 120)")
    parser.add_argument("--workers", type=int, default=8, help="threads doing transfers (default 8)")
    parser.add_argument("--fd-limit", type=int, default=256, help="the forwarder's RLIMIT_NOFILE (default 256)")
    parser.add_argument("--splice", action="store_true", help="run the forwarder with --splice")
    parser.add_argument("--loop", default="auto", help="the forwarder's --loop (default auto)")
    parser.add_argument("--high-water", default="64K", help="the forwarder's --high-water (default 64K)")
    parser.add_argument("--max-size", type=int, default=2 << 20, help="largest transfer, bytes (default 2 MiB)")
    parser.add_argument("--greet-reset-share", type=float, default=0.02,
                        help="share of server accepts that greet and reset at once (default 0.02)")
    parser.add_argument("--pressure-period", type=float, default=60.0,
                        help="seconds per rise and fall of the idle connections (default 60)")
    parser.add_argument("--transfer-timeout", type=float, default=60.0, help="a transfer taking longer failed")
    parser.add_argument("--sample-interval", type=float, default=10.0, help="seconds between samples (default 10)")
    parser.add_argument("--rss-tolerance", type=float, default=0.05, help="allowed RSS growth, a fraction (0.05)")
    parser.add_argument("--rss-slack-mib", type=float, default=2.0, help="allowed RSS growth on top, MiB (2)")
    parser.add_argument("--fd-slack", type=int, default=4, help="allowed growth of unexplained descriptors (4)")
    parser.add_argument("--seed", type=int, default=483732)
    parser.add_argument("--json", default=None,
                        help="where to write the figures (default benchmarks/results/soak-TIME.json)")
    args = parser.parse_args()

    duration = args.minutes * 60
    warmup = args.warmup if args.warmup is not None else min(120.0, max(30.0, duration * 0.1))
    if duration <= warmup + 30:
        parser.error("--minutes too short for the warm-up and three thirds")
    raise_fd_limit()  # this process holds the other end of every connection, and more
    # Stopped early (Ctrl-C, or SIGTERM, also when started in the background):
    # still stop the forwarder and report what was seen.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results = BENCH / "results"
    results.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    json_path = Path(args.json) if args.json else results / f"soak-{stamp}.json"
    log_path = results / f"soak-{stamp}-forwarder.log"

    report = Report()
    server = Server(report, args.greet_reset_share, random.Random(args.seed + 3))
    process, port = start_forwarder(args, server.port, log_path)
    pid = process.pid
    time.sleep(0.5)
    start_fds = fd_count(pid)
    per_connection = 6 if args.splice else 2
    capacity = (args.fd_limit - start_fds - 8) // per_connection
    print(f"soak: forwarder pid {pid} on {HOST}:{port} -> {HOST}:{server.port}, RLIMIT_NOFILE {args.fd_limit}, "
          f"{start_fds} descriptors at start, room for ~{capacity} connections; {args.minutes:g} min "
          f"(warm-up {warmup:g} s); log {log_path}", flush=True)
    traffic = Traffic(args, (HOST, port), server, report, capacity)
    samples: List[Dict[str, Any]] = []
    checkpoints: List[Dict[str, Any]] = []
    began = time.monotonic()

    def sample(phase: str) -> Dict[str, Any]:
        with traffic.lock:
            open_connections = traffic.open_connections
        fds = fd_count(pid)
        return {"t": round(time.monotonic() - began, 1), "phase": phase, "rss_kib": status_kib(pid, "VmRSS"),
                "fds": fds, "client_connections": open_connections,
                "unexplained_fds": fds - start_fds - per_connection * open_connections}

    def checkpoint(name: str) -> None:
        """Stop the traffic, wait for every connection to close, take the figures, resume."""
        traffic.quiet.set()
        deadline = time.monotonic() + args.transfer_timeout + 30
        while time.monotonic() < deadline:
            with traffic.lock:
                idle = traffic.busy == 0 and not traffic.idle
            if idle and fd_count(pid) <= start_fds:
                break
            time.sleep(0.1)
        figures = sample("checkpoint")
        figures["name"] = name
        figures["back_to_start"] = figures["fds"] <= start_fds
        checkpoints.append(figures)
        print(f"soak: checkpoint {name} at {figures['t']:.0f} s: {figures['fds']} descriptors "
              f"(start {start_fds}), RSS {figures['rss_kib']} KiB", flush=True)
        traffic.quiet.clear()

    third = (duration - warmup) / 3
    edges = [warmup + third * i for i in range(1, 4)]
    traffic.start()
    next_sample = began
    warm = False
    try:
        while edges and time.monotonic() - began < duration + 2 * (args.transfer_timeout + 30):
            if process.poll() is not None:
                report.fail("forwarder", f"exited with status {process.returncode}")
                break
            elapsed = time.monotonic() - began
            if not warm and elapsed >= warmup:
                warm = True
                checkpoint("after warm-up")
            elif warm and elapsed >= edges[0]:
                edges.pop(0)
                checkpoint(f"third {3 - len(edges)}")
            if time.monotonic() >= next_sample:
                samples.append(sample("warm-up" if not warm else "run"))
                last = samples[-1]
                print(f"soak: {last['t']:6.0f} s  RSS {last['rss_kib']:7d} KiB  {last['fds']:4d} fds  "
                      f"{last['client_connections']:4d} client connections  failures {report.failure_count}",
                      flush=True)
                next_sample = time.monotonic() + args.sample_interval
            time.sleep(0.1)
    except KeyboardInterrupt:
        report.fail("harness", "interrupted")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second signal must not skip stopping the forwarder
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        traffic.join()
        alive = process.poll() is None
        if alive:
            process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            status = process.wait(10)
        server.close()
    if alive and status != 0:
        report.fail("forwarder", f"exit status {status} after SIGTERM")

    # -- verdict -----------------------------------------------------------------------
    run = [s for s in samples if s["phase"] == "run"]
    first = [s for s in run if s["t"] < warmup + third]
    last_third = [s for s in run if s["t"] >= warmup + 2 * third]
    rss_first, rss_last = median([s["rss_kib"] for s in first]), median([s["rss_kib"] for s in last_third])
    extra_first = median([s["unexplained_fds"] for s in first])
    extra_last = median([s["unexplained_fds"] for s in last_third])
    slack_kib = args.rss_slack_mib * 1024
    problems = []
    if report.failure_count:
        problems.append(f"{report.failure_count} integrity checks failed")
    if not first or not last_third:
        problems.append("too few samples in the first or last third")
    elif rss_last > rss_first * (1 + args.rss_tolerance) + slack_kib:
        problems.append(f"RSS grew: median {rss_first:.0f} KiB in the first third, {rss_last:.0f} KiB in the last")
    if len(checkpoints) < 2 or not all(c["back_to_start"] for c in checkpoints):
        problems.append("descriptors did not come back to the start at every checkpoint")
    if checkpoints and checkpoints[-1]["rss_kib"] > checkpoints[0]["rss_kib"] * (1 + args.rss_tolerance) + slack_kib:
        problems.append(f"RSS at rest grew: {checkpoints[0]['rss_kib']} KiB -> {checkpoints[-1]['rss_kib']} KiB")
    if extra_last - extra_first > args.fd_slack:
        problems.append(f"unexplained descriptors grew: median {extra_first:g} -> {extra_last:g}")
    ok_transfers = sum(counts.get("ok", 0) for kind, counts in report.counts.items() if kind in KINDS)
    if not ok_transfers:
        problems.append("no transfer succeeded")

    print()
    print(f"{'transfer':<16} {'ok':>7} {'refused':>8} {'greeted':>8} {'failed':>7} {'MiB in':>9}  other")
    shown = {"ok", "refused (reset before any byte)", "greeting, then reset", "FAILED", "bytes received"}
    for kind in list(KINDS) + ["idle", "server", "forwarder"]:
        counts = report.counts.get(kind)
        if not counts:
            continue
        other = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()) if k not in shown)
        print(f"{kind:<16} {counts.get('ok', 0):>7} {counts.get('refused (reset before any byte)', 0):>8} "
              f"{counts.get('greeting, then reset', 0):>8} {counts.get('FAILED', 0):>7} "
              f"{counts.get('bytes received', 0) / 2**20:>9.1f}  {other}")
    print()
    print(f"{'figure':<34} {'first third':>12} {'last third':>12}")
    print(f"{'RSS, median (KiB)':<34} {rss_first:>12.0f} {rss_last:>12.0f}")
    print(f"{'descriptors, median':<34} {median([s['fds'] for s in first]):>12.0f} "
          f"{median([s['fds'] for s in last_third]):>12.0f}")
    print(f"{'client connections, median':<34} {median([s['client_connections'] for s in first]):>12.0f} "
          f"{median([s['client_connections'] for s in last_third]):>12.0f}")
    print(f"{'unexplained descriptors, median':<34} {extra_first:>12g} {extra_last:>12g}")
    print(f"{'samples':<34} {len(first):>12} {len(last_third):>12}")
    print("checkpoints (at rest): " + "; ".join(f"{c['name']}: {c['fds']} fds, {c['rss_kib']} KiB"
                                                  for c in checkpoints) + f" (start: {start_fds} fds)")
    print(f"server outages: {server.outages}; peak descriptors: {max((s['fds'] for s in samples), default=0)} "
          f"of {args.fd_limit}")
    verdict = "PASS" if not problems else "FAIL: " + "; ".join(problems)
    print(f"soak: {verdict}")

    json_path.write_text(json.dumps({
        "settings": {k: v for k, v in vars(args).items()}, "warmup_s": warmup, "start_fds": start_fds,
        "capacity_connections": capacity, "forwarder_status": status,
        "counts": {kind: dict(counts) for kind, counts in report.counts.items()}, "failures": report.failures,
        "samples": samples, "checkpoints": checkpoints,
        "summary": {"rss_kib_first_third": rss_first, "rss_kib_last_third": rss_last,
                    "unexplained_fds_first_third": extra_first, "unexplained_fds_last_third": extra_last},
        "verdict": verdict, "problems": problems,
    }, indent=1))
    print(f"soak: figures in {json_path}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
