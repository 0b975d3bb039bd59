#!/usr/bin/env python3
"""How exact the toxics are: latency at 1,000 messages a second, and bandwidth.

    python benchmarks/toxics.py [--seconds 5] [--latency 0.05] [--rate 1M]

Starts the echo server (benchmarks/echo_server.py) and two forwarders, each
in its own process: one with no toxic, one with the toxic under test.  In
the same run it then measures:

* latency: 16-byte messages at 1,000 a second (one every millisecond, each
  sent whether or not the last came back) through both forwarders; the
  figure is each message's round trip through the toxic forwarder, minus
  the median round trip through the plain one, minus the latency asked for;
* bandwidth: bytes sent up through a forwarder whose downstream direction is
  limited to the rate, and echoed back; the figure is the rate seen by the
  client, against the rate asked for.

Nothing here fails on a slow result; it prints what it measured.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

HERE = Path(__file__).resolve().parent

FORWARDER = """
import sys
from asyncore_fwd import Forwarder
from asyncore_fwd.toxics import parse_toxic_spec
fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", int(sys.argv[1]), map={})
for spec in sys.argv[2:]:
    fwd.add_toxic(*parse_toxic_spec(spec))
print(fwd.address[1], flush=True)
fwd.serve_forever()
"""


def start(command: List[str]) -> Tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise SystemExit(f"could not start {command!r}")
    return proc, int(line)


def forwarder(server_port: int, *toxics: str) -> Tuple[subprocess.Popen, int]:
    return start([sys.executable, "-c", FORWARDER, str(server_port), *toxics])


def round_trips(port: int, seconds: float, interval: float = 0.001) -> List[float]:
    """Send a stamped 16-byte message every ``interval`` s for ``seconds``; each one's round trip."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    trips: List[float] = []
    received = bytearray()
    count = int(seconds / interval)
    started = time.perf_counter()
    sent = 0
    deadline = started + seconds + 5
    while len(trips) < count and time.perf_counter() < deadline:
        now = time.perf_counter()
        while sent < count and started + sent * interval <= now:
            sock.sendall(struct.pack("!dQ", now, sent))
            sent += 1
        next_send = started + sent * interval if sent < count else deadline
        for _ in selector.select(max(0.0, next_send - time.perf_counter())):
            received += sock.recv(65536)
            arrived = time.perf_counter()
            while len(received) >= 16:
                stamp, _ = struct.unpack("!dQ", received[:16])
                del received[:16]
                trips.append(arrived - stamp)
    sock.close()
    return trips


def received_rate(port: int, size: int) -> float:
    """Bytes per second seen by a client that sends ``size`` bytes and reads their echo."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    payload, sent, got = b"r" * 65536, 0, 0
    first: Optional[float] = None
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    deadline = time.perf_counter() + 120
    while got < size and time.perf_counter() < deadline:
        for _, events in selector.select(1.0):
            if events & selectors.EVENT_WRITE and sent < size:
                try:
                    sent += sock.send(payload[:size - sent])
                except BlockingIOError:
                    pass
                if sent >= size:
                    selector.modify(sock, selectors.EVENT_READ)
            if events & selectors.EVENT_READ:
                chunk = sock.recv(1 << 20)
                if chunk and first is None:
                    first = time.perf_counter()  # the rate from the first byte on
                got += len(chunk)
    sock.close()
    assert first is not None
    return (got - 1) / (time.perf_counter() - first)


def parse_rate(text: str) -> int:
    units = {"K": 1024, "M": 1024 ** 2}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1:].upper() in units else int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the latency run (default 5)")
    parser.add_argument("--latency", type=float, default=0.05, help="latency asked for, s (default 0.05)")
    parser.add_argument("--rate", default="1M", help="bandwidth asked for, bytes/s with K or M (default 1M)")
    args = parser.parse_args()
    rate = parse_rate(args.rate)
    procs = []
    try:
        server, server_port = start([sys.executable, str(HERE / "echo_server.py"), "--mode", "echo",
                                     "--max-seconds", "600"])
        procs.append(server)
        plain, plain_port = forwarder(server_port)
        delayed, delayed_port = forwarder(server_port, f"downstream:latency={args.latency}")
        limited, limited_port = forwarder(server_port, f"downstream:bandwidth={rate}")
        procs += [plain, delayed, limited]

        base = round_trips(plain_port, args.seconds)
        trips = round_trips(delayed_port, args.seconds)
        baseline = statistics.median(base)
        errors_ms = sorted((trip - baseline - args.latency) * 1000 for trip in trips)
        p = lambda q: errors_ms[min(len(errors_ms) - 1, int(q * len(errors_ms)))]  # noqa: E731
        print(f"latency {args.latency * 1000:g} ms at 1000 messages/s for {args.seconds:g} s "
              f"({len(trips)} of {int(args.seconds * 1000)} messages back)")
        print(f"  round trip without the toxic: median {baseline * 1000:.3f} ms")
        print(f"  error (round trip - baseline - latency asked): median {statistics.median(errors_ms):+.3f} ms, "
              f"p90 {p(0.90):+.3f} ms, p99 {p(0.99):+.3f} ms, max {errors_ms[-1]:+.3f} ms")

        size = max(rate * 3, 1 << 20)
        seen = received_rate(limited_port, size)
        print(f"bandwidth {rate} B/s downstream, {size} bytes echoed: client saw {seen:.0f} B/s "
              f"({(seen / rate - 1) * 100:+.1f} %)")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
