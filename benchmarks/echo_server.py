"""A loopback test server for the benchmarks: echo, sink or source.

Runs in its own process so that it has its own CPU time and descriptor limit
(9,000 held connections cost it 9,000 descriptors, apart from the client's and
the forwarder's).  One selectors loop, any number of connections; in the UDP
modes, one socket read in a blocking loop.

Modes:
  echo      send back whatever arrives (small messages: burst, held, ping-pong);
  sink      read and discard until EOF, then close (bulk upload fallback);
  source    send --bytes bytes to each client, then close (bulk download fallback);
  udp-echo  UDP: send each datagram back to the address it came from;
  udp-sink  UDP: count the datagrams and bytes that arrive; a datagram
            "!reset" zeroes the counts and "!stats" asks for them (answered
            with "ok" and a JSON object, to the address that asked).

Prints the bound port on stdout, then serves until SIGTERM/SIGINT or until
--max-seconds have passed (so a forgotten server still goes away).

Usage: python benchmarks/echo_server.py [--mode echo] [--port 0] [--bytes N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import signal
import socket
import sys
import time

CHUNK = 1 << 20


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Server:
    def __init__(self, mode: str, port: int, source_bytes: int) -> None:
        self.mode = mode
        self.source_bytes = source_bytes
        self.block = memoryview(os.urandom(CHUNK))
        self.selector = selectors.DefaultSelector()
        # A large backlog: the burst workload connects 3,000 clients at once,
        # and this server must not be the bottleneck being measured.
        self.listener = socket.create_server(("127.0.0.1", port), backlog=4096)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.running = True

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]

    def serve(self, max_seconds: float) -> None:
        deadline = time.monotonic() + max_seconds
        while self.running and time.monotonic() < deadline:
            for key, _events in self.selector.select(0.5):
                if key.data is None:
                    self.accept()
                elif self.mode == "source":
                    self.send_more(key.fileobj, key.data)
                else:
                    self.receive(key.fileobj)

    def accept(self) -> None:
        for _ in range(512):  # bounded: let established connections run too
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE, ECONNABORTED: try again on the next round
                return
            conn.setblocking(False)
            if self.mode == "source":
                self.selector.register(conn, selectors.EVENT_WRITE, [self.source_bytes])
            else:
                self.selector.register(conn, selectors.EVENT_READ, True)

    def receive(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(CHUNK if self.mode == "sink" else 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.drop(conn)
        elif self.mode == "echo":
            try:
                # Messages here are small (<= a few KiB): they fit the send
                # buffer, so a blocking-style sendall never stalls the loop.
                conn.sendall(data)
            except (BlockingIOError, OSError):
                self.drop(conn)

    def send_more(self, conn: socket.socket, left: list) -> None:
        try:
            sent = conn.send(self.block[: min(CHUNK, left[0])])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent, left[0] = 0, 0
        left[0] -= sent
        if left[0] <= 0:
            self.drop(conn)

    def drop(self, conn: socket.socket) -> None:
        self.selector.unregister(conn)
        conn.close()

    def stop(self, *_: object) -> None:
        self.running = False


class UdpServer:
    """One UDP socket: echo or counting sink.  A blocking loop with a short
    timeout: one process, one socket, nothing to multiplex."""

    CONTROL = b"!"  # the blast's datagrams are b"x" * size: never a control word

    def __init__(self, mode: str, port: int) -> None:
        self.mode = mode
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # A deep receive queue (the kernel caps it at net.core.rmem_max):
        # bursts wait here rather than being dropped.  What the sink still
        # loses shows in the direct column of udp-oneway.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(0.5)  # to see self.running go false
        self.datagrams = self.bytes = 0
        self.running = True

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def serve(self, max_seconds: float) -> None:
        deadline = time.monotonic() + max_seconds
        buf = bytearray(65536)
        view = memoryview(buf)
        while self.running and time.monotonic() < deadline:
            try:
                size, address = self.sock.recvfrom_into(buf)
            except (socket.timeout, InterruptedError):
                continue
            except OSError:  # e.g. ECONNREFUSED left by an earlier reply: not this datagram's fault
                continue
            try:
                if self.mode == "udp-echo":
                    self.sock.sendto(view[:size], address)
                elif size and buf[0] == self.CONTROL[0]:
                    self.control(bytes(view[:size]), address)
                else:
                    self.datagrams += 1
                    self.bytes += size
            except OSError:  # the client went away: its reply is lost, as UDP allows
                continue

    def control(self, word: bytes, address: tuple) -> None:
        if word == b"!reset":
            self.datagrams = self.bytes = 0
            self.sock.sendto(b"ok", address)
        elif word == b"!stats":
            self.sock.sendto(b"ok" + json.dumps({"datagrams": self.datagrams, "bytes": self.bytes}).encode(),
                             address)

    def stop(self, *_: object) -> None:
        self.running = False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("echo", "sink", "source", "udp-echo", "udp-sink"), default="echo")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--bytes", type=int, default=1 << 30, help="bytes per client in source mode")
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args()
    raise_fd_limit()
    server = UdpServer(args.mode, args.port) if args.mode.startswith("udp-") else \
        Server(args.mode, args.port, args.bytes)
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    print(server.port, flush=True)
    server.serve(args.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
