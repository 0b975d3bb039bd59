"""The UDP load clients of benchmarks/loadgen.py (its udp-rr and udp-oneway
subcommands), standard library only.

  udp-rr      C clients, each a connected UDP socket of its own (so a
              forwarder sees C client addresses), send one SIZE-byte datagram
              and wait for its reply, then the next: requests/s, p50 and p99
              latency.  A reply not back within --timeout is counted lost and
              the client sends the next one; UDP may drop, so losses are a
              figure, never a hang.  Measuring starts --warm-up seconds after
              every client has had its first reply (at most SETUP_LIMIT s
              after the start): socat forks a process per client address on
              its first datagram, a forwarder opens its sessions.  What is
              lost, late or misdelivered before is counted apart.
  udp-oneway  one connected socket sends SIZE-byte datagrams as fast as it can
              (no pacing) for --seconds, through the forwarder to the counting
              sink of echo_server.py; the sink is asked directly (not through
              the forwarder) how many arrived: MB/s and datagrams/s received,
              and the loss rate.

Each datagram of udp-rr carries its client's number and a sequence number, so
a late reply (of a request already counted lost) or one delivered to the wrong
client is counted as such, not as a reply.
"""

from __future__ import annotations

import errno
import json
import selectors
import socket
import statistics
import struct
import time
from typing import Callable, Dict, List, Optional, Set

HOST = "127.0.0.1"
HEADER = struct.Struct("!IQ")  # client number, sequence number
SETUP_LIMIT = 5.0  # seconds: measure from then on even if some client never had a reply


def _percentile(values: List[float], fraction: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class _Client:
    """One UDP client of udp-rr: its socket and the request it waits for."""

    def __init__(self, number: int, port: int, size: int) -> None:
        self.number = number
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect((HOST, port))  # replies from any other address are not ours
        self.sock.setblocking(False)
        self.padding = b"x" * (size - HEADER.size)
        self.seq = 0
        self.sent_at = 0.0
        self.waiting = False

    def send_next(self, now: float) -> Optional[str]:
        """Send the next request; the error's name if the send failed (the
        time-out then counts it lost and sends again: no busy retry)."""
        self.seq += 1
        self.sent_at, self.waiting = now, True
        try:
            self.sock.send(HEADER.pack(self.number, self.seq) + self.padding)
        except OSError as error:
            return errno.errorcode.get(error.errno or 0, type(error).__name__)
        return None


def udp_rr(port: int, clients: int, size: int, seconds: float, warm_up: float, timeout: float,
           dead: Callable[[], bool]) -> Dict:
    """Request/response through ``port``: set-up, ``warm_up``, then ``seconds`` measured."""
    size = max(size, HEADER.size)
    selector = selectors.DefaultSelector()
    pool = [_Client(number, port, size) for number in range(clients)]
    counts = dict.fromkeys(("lost", "late", "misdelivered", "lost_warm_up", "late_warm_up", "misdelivered_warm_up",
                            "errors"), 0)
    first_error = ""
    latencies: List[float] = []

    def failed(why: Optional[str]) -> None:
        nonlocal first_error
        if why:
            counts["errors"] += 1
            first_error = first_error or why

    started = time.perf_counter()
    measure_from = stop_sending = float("inf")  # set once every client has had a reply
    answered: Set[int] = set()
    for client in pool:
        selector.register(client.sock, selectors.EVENT_READ, client)
        failed(client.send_next(time.perf_counter()))
    next_scan = started + timeout / 4
    # Bounded: after stop_sending no new request goes out, and every one out
    # is answered or lost within ``timeout``.
    while not dead():
        now = time.perf_counter()
        if measure_from == float("inf") and (len(answered) == clients or now - started > SETUP_LIMIT):
            measure_from = now + warm_up
            stop_sending = measure_from + seconds
        if now >= stop_sending and (now > stop_sending + timeout + 1 or not any(c.waiting for c in pool)):
            break
        for key, _ in selector.select(min(0.05, timeout / 4)):
            client = key.data
            for _ in range(8):  # a few queued datagrams at most: late replies
                try:
                    reply = client.sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as error:  # ECONNREFUSED: an ICMP error for an earlier send
                    failed(errno.errorcode.get(error.errno or 0, type(error).__name__))
                    break
                now = time.perf_counter()
                number, seq = HEADER.unpack_from(reply) if len(reply) >= HEADER.size else (-1, 0)
                phase = "" if now >= measure_from else "_warm_up"
                if number != client.number or len(reply) != size:
                    counts["misdelivered" + phase] += 1
                elif not client.waiting or seq != client.seq:
                    counts["late" + phase] += 1
                else:
                    client.waiting = False
                    answered.add(client.number)
                    if client.sent_at >= measure_from:
                        latencies.append(now - client.sent_at)
                    if now < stop_sending:
                        failed(client.send_next(now))
        now = time.perf_counter()
        if now >= next_scan:
            next_scan = now + timeout / 4
            for client in pool:
                if client.waiting and now - client.sent_at > timeout:
                    counts["lost" if client.sent_at >= measure_from else "lost_warm_up"] += 1
                    client.waiting = False
                    if now < stop_sending:
                        failed(client.send_next(now))
    counts["lost"] += sum(1 for c in pool if c.waiting and c.sent_at >= measure_from)
    for client in pool:
        client.sock.close()
    done = len(latencies)
    return {"requests": done, "seconds": seconds, "rps": done / seconds, "clients": clients, "size": size,
            "p50_ms": statistics.median(latencies) * 1000 if latencies else None,
            "p99_ms": _percentile(latencies, 0.99) * 1000 if latencies else None,
            "loss_pct": 100 * counts["lost"] / (done + counts["lost"]) if done + counts["lost"] else 0.0,
            **counts, "first_error": first_error, "forwarder_gone": dead()}


# --- one-way ------------------------------------------------------------------

def _ask_sink(sink: socket.socket, word: bytes) -> Dict:
    """Send a control word to the sink and return its answer (a few tries:
    the sink's queue may be full of the blast's datagrams)."""
    for _ in range(10):
        sink.send(word)
        try:
            answer = sink.recv(4096)
        except socket.timeout:
            continue
        if answer.startswith(b"ok"):
            return json.loads(answer[2:]) if len(answer) > 2 else {}
    raise OSError(f"the UDP sink did not answer {word.decode()!r}")


def _sink_counts(sink: socket.socket) -> Dict:
    """The sink's counts once they stop growing (what the forwarder still
    held has arrived), at most 3 s after the blast."""
    counts = _ask_sink(sink, b"!stats")
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        time.sleep(0.2)
        again = _ask_sink(sink, b"!stats")
        if again == counts:
            break
        counts = again
    return counts


def udp_oneway(port: int, sink_port: int, size: int, seconds: float, dead: Callable[[], bool]) -> Dict:
    """Blast ``size``-byte datagrams through ``port`` for ``seconds``; count what reaches the sink."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.connect((HOST, sink_port))
    sink.settimeout(0.5)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect((HOST, port))
    sender.settimeout(1.0)  # a UDP send waits only for socket buffer space: never long
    payload = b"x" * size
    errors = 0
    first_error = ""
    try:
        # A few datagrams first, from the same socket: the forwarder opens its
        # session (socat forks its child) before the measured run starts.
        for _ in range(10):
            try:
                sender.send(payload)
            except OSError:
                pass
        time.sleep(0.3)
        _ask_sink(sink, b"!reset")
        sent = 0
        started = time.perf_counter()
        stop = started + seconds
        while time.perf_counter() < stop and not dead():
            for _ in range(256):
                try:
                    sender.send(payload)
                    sent += 1
                except OSError as error:  # ECONNREFUSED (nobody at the port), ENOBUFS, a time-out
                    errors += 1
                    first_error = first_error or errno.errorcode.get(error.errno or 0, type(error).__name__)
        elapsed = time.perf_counter() - started
        counts = _sink_counts(sink)
    finally:
        sender.close()
        sink.close()
    received = counts["datagrams"]
    return {"sent": sent, "received": received, "bytes": counts["bytes"], "seconds": elapsed, "size": size,
            "MBps": counts["bytes"] / elapsed / 1e6, "dps": received / elapsed, "sent_dps": sent / elapsed,
            "loss_pct": 100 * (1 - received / sent) if sent else 0.0, "send_errors": errors,
            "first_error": first_error, "forwarder_gone": dead()}
