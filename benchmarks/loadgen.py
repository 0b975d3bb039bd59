"""Standard-library load clients for the benchmarks (used when no real client
is installed, and for the burst and held workloads, which no installed tool
does).

Each subcommand runs in its own process, so its CPU time and descriptors are
its own, and prints one JSON object on stdout:

  pingpong  C connections each send SIZE bytes and wait for them back (echo
            server), N requests in all: requests/s and median latency;
  burst     N clients connect at once (non-blocking), send 8 bytes, wait for
            the echo: time until all are served, or how many within --cap s;
  hold      open N connections, check each with one request/reply, print how
            many are held, keep them idle until stdin closes (or --max-hold s);
  bulk      move data through one connection for --seconds, up (to a sink
            server) or down (from a source server): MB/s;
  udp-rr, udp-oneway
            UDP request/response and one-way throughput (loadgen_udp.py).

Every loop has a deadline; --watch-pid stops a run early when the process
under test has exited (no point waiting for a dead forwarder).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import selectors
import socket
import statistics
import sys
import time
from typing import Dict, List, Optional

from loadgen_udp import udp_oneway, udp_rr

HOST = "127.0.0.1"
MiB = 1 << 20


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Watch:
    """Is the watched process still running?  Checked at most every 0.2 s."""

    def __init__(self, pid: Optional[int]) -> None:
        self.pid = pid
        self.next_check = 0.0
        self.gone = False

    def dead(self) -> bool:
        if self.pid is None or self.gone:
            return self.gone
        now = time.monotonic()
        if now >= self.next_check:
            self.next_check = now + 0.2
            try:
                with open(f"/proc/{self.pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                self.gone = state in ("Z", "X")
            except OSError:
                self.gone = True
        return self.gone


def emit(result: Dict[str, object]) -> None:
    print(json.dumps(result), flush=True)


# --- pingpong -----------------------------------------------------------------

def pingpong(port: int, conns: int, requests: int, size: int, deadline_s: float, watch: Watch,
             duration: float = 0.0) -> Dict:
    """``requests`` in all; or, with ``duration``, as many as fit in that time."""
    message = b"x" * size
    if duration:
        requests = sys.maxsize
    selector = selectors.DefaultSelector()
    deadline = time.monotonic() + deadline_s
    socks = []
    for _ in range(conns):
        sock = socket.create_connection((HOST, port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        socks.append(sock)
    latencies: List[float] = []
    sent = 0
    errors = 0
    started = time.perf_counter()
    stop_sending = started + duration if duration else float("inf")
    for sock in socks:
        if sent < requests:
            sock.send(message)
            sent += 1
            selector.register(sock, selectors.EVENT_READ, [0, time.perf_counter()])
    while selector.get_map() and time.monotonic() < deadline and not watch.dead():
        for key, _ in selector.select(0.2):
            state = key.data
            sock = key.fileobj
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                errors += 1
                selector.unregister(sock)
                continue
            state[0] += len(data)
            if state[0] < size:
                continue
            now = time.perf_counter()
            latencies.append(now - state[1])
            if sent < requests and now < stop_sending:
                state[0], state[1] = 0, now
                sock.send(message)  # 100 bytes: always fits the send buffer
                sent += 1
            else:
                selector.unregister(sock)
    elapsed = time.perf_counter() - started
    for sock in socks:
        sock.close()
    done = len(latencies)
    return {"requests": done, "wanted": None if duration else requests, "seconds": elapsed, "errors": errors,
            "rps": done / elapsed if elapsed > 0 else 0.0,
            "p50_ms": statistics.median(latencies) * 1000 if latencies else None,
            "complete": done == sent and errors == 0 and (duration > 0 or done == requests),
            "forwarder_gone": watch.gone}


# --- burst --------------------------------------------------------------------

def burst(port: int, clients: int, cap: float, watch: Watch) -> Dict:
    message = b"burst!!\n"
    selector = selectors.DefaultSelector()
    started = time.monotonic()
    served = errors = 0
    last_served = 0.0
    first_error = ""
    for _ in range(clients):
        sock = socket.socket()
        sock.setblocking(False)
        code = sock.connect_ex((HOST, port))
        if code not in (0, errno.EINPROGRESS):
            errors += 1
            first_error = first_error or os.strerror(code)
            sock.close()
            continue
        selector.register(sock, selectors.EVENT_WRITE, [0])
    deadline = started + cap

    def finish(sock: socket.socket, ok: bool, why: str = "") -> None:
        nonlocal served, errors, last_served, first_error
        selector.unregister(sock)
        sock.close()
        if ok:
            served += 1
            last_served = time.monotonic() - started
        else:
            errors += 1
            first_error = first_error or why

    while selector.get_map() and time.monotonic() < deadline and not watch.dead():
        for key, events in selector.select(0.2):
            sock, state = key.fileobj, key.data
            if events & selectors.EVENT_WRITE:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    finish(sock, False, os.strerror(code))
                    continue
                try:
                    sock.send(message)
                except OSError as error:
                    finish(sock, False, error.strerror or str(error))
                    continue
                selector.modify(sock, selectors.EVENT_READ, state)
                continue
            try:
                data = sock.recv(64)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as error:
                finish(sock, False, error.strerror or str(error))
                continue
            if not data:
                finish(sock, False, "closed before the echo")
                continue
            state[0] += len(data)
            if state[0] >= len(message):
                finish(sock, True)
    pending = len(selector.get_map())
    for key in list(selector.get_map().values()):
        key.fileobj.close()
    return {"clients": clients, "served": served, "errors": errors, "pending": pending,
            "seconds": last_served if served == clients else time.monotonic() - started,
            "complete": served == clients, "cap": cap, "first_error": first_error,
            "forwarder_gone": watch.gone}


# --- hold ---------------------------------------------------------------------

def hold(port: int, count: int, probe: bytes, in_flight: int, deadline_s: float,
         max_hold: float, watch: Watch) -> None:
    """Open ``count`` checked connections, report, keep them until stdin closes."""
    selector = selectors.DefaultSelector()
    held: List[socket.socket] = []
    failed = 0
    first_error = ""
    started = time.monotonic()
    deadline = started + deadline_s
    opened = 0

    def fail(sock: socket.socket, why: str) -> None:
        nonlocal failed, first_error
        selector.unregister(sock)
        sock.close()
        failed += 1
        first_error = first_error or why

    # A bounded number in flight: this measures holding connections, not the
    # listen queue (that is the burst workload's business).
    while (opened < count or selector.get_map()) and time.monotonic() < deadline and not watch.dead():
        while opened < count and len(selector.get_map()) < in_flight:
            sock = socket.socket()
            sock.setblocking(False)
            opened += 1
            code = sock.connect_ex((HOST, port))
            if code not in (0, errno.EINPROGRESS):
                failed += 1
                first_error = first_error or os.strerror(code)
                sock.close()
                continue
            selector.register(sock, selectors.EVENT_WRITE)
        for key, events in selector.select(0.2):
            sock = key.fileobj
            if events & selectors.EVENT_WRITE:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    fail(sock, os.strerror(code))
                    continue
                try:
                    sock.send(probe)
                except OSError as error:
                    fail(sock, error.strerror or str(error))
                    continue
                selector.modify(sock, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as error:
                fail(sock, error.strerror or str(error))
                continue
            if not data:
                fail(sock, "closed before the reply")
                continue
            selector.unregister(sock)
            held.append(sock)  # replies are tiny: one recv() gets them whole
    for key in list(selector.get_map().values()):
        key.fileobj.close()
    emit({"wanted": count, "held": len(held), "failed": failed, "first_error": first_error,
          "seconds": time.monotonic() - started, "forwarder_gone": watch.gone})
    # Idle until told to stop (stdin closes) or max_hold passes.
    wait = selectors.DefaultSelector()
    wait.register(sys.stdin, selectors.EVENT_READ)
    stop_at = time.monotonic() + max_hold
    while time.monotonic() < stop_at:
        if wait.select(min(1.0, max(0.0, stop_at - time.monotonic()))):
            if not sys.stdin.buffer.read1(4096):
                break
    for sock in held:
        sock.close()


# --- bulk ---------------------------------------------------------------------

def bulk(port: int, direction: str, seconds: float, deadline_s: float) -> Dict:
    """Send (up) or receive (down) for ``seconds`` through one connection.

    Up: the rate counts until the sink server closes after reading the last
    byte, so nothing still in flight is counted as moved.
    """
    buf = bytearray(MiB)
    sock = socket.create_connection((HOST, port), timeout=deadline_s)
    started = time.perf_counter()
    stop = started + seconds
    moved = 0
    try:
        if direction == "up":
            view = memoryview(os.urandom(MiB))
            while time.perf_counter() < stop:
                moved += sock.send(view)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        else:
            while time.perf_counter() < stop:
                got = sock.recv_into(buf)
                if not got:
                    break
                moved += got
    except OSError as error:
        return {"bytes": moved, "seconds": time.perf_counter() - started, "error": str(error)}
    finally:
        sock.close()
    elapsed = time.perf_counter() - started
    return {"bytes": moved, "seconds": elapsed, "MBps": moved / elapsed / 1e6,
            "complete": elapsed >= seconds * 0.99}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--port", type=int, required=True)
    common.add_argument("--watch-pid", type=int, default=None)
    p = sub.add_parser("pingpong", parents=[common])
    p.add_argument("--conns", type=int, default=1)
    p.add_argument("--requests", type=int, default=10000)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--duration", type=float, default=0.0, help="run this long instead of --requests")
    p.add_argument("--deadline", type=float, default=60.0)
    p = sub.add_parser("burst", parents=[common])
    p.add_argument("--clients", type=int, default=3000)
    p.add_argument("--cap", type=float, default=30.0)
    p = sub.add_parser("hold", parents=[common])
    p.add_argument("--conns", type=int, default=9000)
    p.add_argument("--probe", default="x", help="request sent once on each connection (\\r\\n allowed)")
    p.add_argument("--in-flight", type=int, default=100)
    p.add_argument("--deadline", type=float, default=120.0)
    p.add_argument("--max-hold", type=float, default=300.0)
    p = sub.add_parser("bulk", parents=[common])
    p.add_argument("--direction", choices=("up", "down"), required=True)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--deadline", type=float, default=60.0, help="socket timeout")
    p = sub.add_parser("udp-rr", parents=[common])
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--warm-up", type=float, default=1.0,
                   help="seconds not measured, from when every client has had a reply")
    p.add_argument("--timeout", type=float, default=0.2, help="a reply later than this is counted lost")
    p = sub.add_parser("udp-oneway", parents=[common])
    p.add_argument("--sink-port", type=int, required=True, help="the counting sink, asked directly")
    p.add_argument("--size", type=int, default=1400)
    p.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    raise_fd_limit()
    watch = Watch(args.watch_pid)
    try:
        run(args, watch)
    except OSError as error:  # e.g. the forwarder refused the first connection
        emit({"error": f"{type(error).__name__}: {error.strerror or error}"})
        return 1
    return 0


def run(args: argparse.Namespace, watch: Watch) -> None:
    if args.command == "pingpong":
        emit(pingpong(args.port, args.conns, args.requests, args.size, args.deadline, watch, args.duration))
    elif args.command == "burst":
        emit(burst(args.port, args.clients, args.cap, watch))
    elif args.command == "hold":
        probe = args.probe.replace("\\r", "\r").replace("\\n", "\n").encode()
        hold(args.port, args.conns, probe, args.in_flight, args.deadline, args.max_hold, watch)
    elif args.command == "udp-rr":
        emit(udp_rr(args.port, args.clients, args.size, args.seconds, args.warm_up, args.timeout, watch.dead))
    elif args.command == "udp-oneway":
        emit(udp_oneway(args.port, args.sink_port, args.size, args.seconds, watch.dead))
    else:
        emit(bulk(args.port, args.direction, args.seconds, args.deadline))


if __name__ == "__main__":
    sys.exit(main())
