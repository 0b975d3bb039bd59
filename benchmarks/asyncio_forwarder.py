"""A TCP forwarder written the way a Python user would write it with asyncio.

The benchmarks' reference point for "plain Python, no asyncore": asyncio
streams, one task per direction, ``drain()`` for backpressure and
``write_eof()`` to pass a half-close on.  Nothing tuned.

With --udp it forwards UDP instead, the same plain way: one listening
datagram endpoint; per client address a session, a datagram endpoint
connected to the remote whose replies go back through the listening one; a
session idle for --idle-timeout seconds is closed.

Prints its bound port on stdout, then serves until SIGINT/SIGTERM.

Usage: python benchmarks/asyncio_forwarder.py --listen-port 0 --remote-port 6379 [--udp]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Dict, List, Optional, Tuple


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction until EOF, then half-close the other side."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        # A reset on either side: the other direction will notice too.
        writer.transport.abort()


async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                 remote_host: str, remote_port: int) -> None:
    try:
        remote_reader, remote_writer = await asyncio.open_connection(remote_host, remote_port)
    except OSError:
        client_writer.close()
        return
    try:
        await asyncio.gather(pipe(client_reader, remote_writer), pipe(remote_reader, client_writer))
    finally:
        remote_writer.close()
        client_writer.close()


async def serve(listen_host: str, listen_port: int, remote_host: str, remote_port: int) -> None:
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, remote_host, remote_port), listen_host, listen_port)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()  # open connections are cancelled by asyncio.run() on return


Address = Tuple[str, int]


class UdpSession(asyncio.DatagramProtocol):
    """One client address: its own endpoint connected to the remote."""

    def __init__(self, listener: asyncio.DatagramTransport, client: Address) -> None:
        self.listener = listener
        self.client = client
        self.transport: Optional[asyncio.DatagramTransport] = None
        self.pending: List[bytes] = []  # datagrams that came while the endpoint was being made
        self.last = asyncio.get_running_loop().time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        for data in self.pending:
            self.transport.sendto(data)
        self.pending.clear()

    def send(self, data: bytes) -> None:
        self.last = asyncio.get_running_loop().time()
        if self.transport is None:
            self.pending.append(data)
        else:
            self.transport.sendto(data)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.last = asyncio.get_running_loop().time()
        self.listener.sendto(data, self.client)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error from the remote: that datagram is lost, as UDP allows


class UdpListener(asyncio.DatagramProtocol):
    """The listening endpoint: a session per client address, made on its first datagram."""

    def __init__(self, remote: Address) -> None:
        self.remote = remote
        self.sessions: Dict[Address, UdpSession] = {}
        self.transport: Optional[asyncio.DatagramTransport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        session = self.sessions.get(addr)
        if session is None and self.transport is not None:
            session = self.sessions[addr] = UdpSession(self.transport, addr)
            asyncio.ensure_future(self.open(session))
        if session is not None:
            session.send(data)

    async def open(self, session: UdpSession) -> None:
        try:
            await asyncio.get_running_loop().create_datagram_endpoint(lambda: session, remote_addr=self.remote)
        except OSError:
            self.sessions.pop(session.client, None)

    def expire(self, idle: float) -> None:
        now = asyncio.get_running_loop().time()
        for addr, session in list(self.sessions.items()):
            if now - session.last > idle and session.transport is not None:
                session.transport.close()
                del self.sessions[addr]


async def serve_udp(listen_host: str, listen_port: int, remote_host: str, remote_port: int, idle: float) -> None:
    loop = asyncio.get_running_loop()
    transport, listener = await loop.create_datagram_endpoint(
        lambda: UdpListener((remote_host, remote_port)), local_addr=(listen_host, listen_port))
    print(transport.get_extra_info("sockname")[1], flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=min(idle, 5.0))
        except asyncio.TimeoutError:
            listener.expire(idle)
    transport.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--listen-port", type=int, default=0)
    parser.add_argument("--remote-host", default="127.0.0.1")
    parser.add_argument("--remote-port", type=int, required=True)
    parser.add_argument("--udp", action="store_true", help="forward UDP instead of TCP")
    parser.add_argument("--idle-timeout", type=float, default=60.0, help="UDP: close a session idle this long")
    args = parser.parse_args()
    if args.udp:
        asyncio.run(serve_udp(args.listen_host, args.listen_port, args.remote_host, args.remote_port,
                              args.idle_timeout))
    else:
        asyncio.run(serve(args.listen_host, args.listen_port, args.remote_host, args.remote_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
