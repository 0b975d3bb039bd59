#!/usr/bin/env python3
"""The Python and C functions the forwarder calls per request round trip, counted exactly.

    python benchmarks/pycalls.py [epoll|poll|select]

A client and a server socket in this process exchange a 23-byte request and
a 5-byte reply through a ``Forwarder`` whose loop is driven one round at a
time; ``sys.setprofile`` counts the calls made inside the forwarder's rounds
only.  Unlike a time, the count does not depend on the machine's load, so it
shows what a change to the hot path saved.
"""

from __future__ import annotations

import collections
import socket
import sys
from pathlib import Path
from typing import Any, Counter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asyncore_fwd import Forwarder  # noqa: E402
from asyncore_fwd._eventloop._loop import open_loop  # noqa: E402

ROUND_TRIPS = 100
WAIT = 5.0


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else "epoll"
    server = socket.create_server(("127.0.0.1", 0))
    sock_map: dict = {}
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", server.getsockname()[1], map=sock_map)
    loop = open_loop(kind, sock_map)
    client = socket.create_connection(fwd.address, timeout=WAIT)
    for _ in range(5):
        loop.poll(0.05)  # accept, connect, connected
    upstream, _ = server.accept()
    upstream.settimeout(WAIT)
    counts: Counter[str] = collections.Counter()

    def count(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            counts[f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"] += 1
        elif event == "c_call":
            counts[f"C {getattr(arg, '__qualname__', arg)}"] += 1

    def counted_round() -> None:
        sys.setprofile(count)
        try:
            loop.poll(WAIT)
        finally:
            sys.setprofile(None)

    for _ in range(ROUND_TRIPS):
        client.sendall(b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n")
        counted_round()
        assert upstream.recv(100)
        upstream.sendall(b"$-1\r\n")
        counted_round()
        assert client.recv(100)
    counts.pop("C setprofile", None)
    python = sum(n for name, n in counts.items() if not name.startswith("C "))
    print(f"{kind}: {sum(counts.values()) / ROUND_TRIPS:g} calls per round trip, "
          f"{python / ROUND_TRIPS:g} of them Python functions")
    for name, n in counts.most_common():
        print(f"  {n / ROUND_TRIPS:5g}  {name}")
    loop.close()
    fwd.close()


if __name__ == "__main__":
    main()
