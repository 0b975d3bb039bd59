"""A loopback test server for the benchmarks: echo, sink or source.

Runs in its own process so that it has its own CPU time and descriptor limit
(9,000 held connections cost it 9,000 descriptors, apart from the client's and
the forwarder's).  One selectors loop, any number of connections.

Modes:
  echo    send back whatever arrives (small messages: burst, held, ping-pong);
  sink    read and discard until EOF, then close (bulk upload fallback);
  source  send --bytes bytes to each client, then close (bulk download fallback).

Prints the bound port on stdout, then serves until SIGTERM/SIGINT or until
--max-seconds have passed (so a forgotten server still goes away).

Usage: python benchmarks/echo_server.py [--mode echo] [--port 0] [--bytes N]
"""

from __future__ import annotations

import argparse
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("echo", "sink", "source"), default="echo")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--bytes", type=int, default=1 << 30, help="bytes per client in source mode")
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args()
    raise_fd_limit()
    server = Server(args.mode, args.port, args.bytes)
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    print(server.port, flush=True)
    server.serve(args.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
