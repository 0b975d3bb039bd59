"""A TCP forwarder written the way a Python user would write it with asyncio.

The benchmarks' reference point for "plain Python, no asyncore": asyncio
streams, one task per direction, ``drain()`` for backpressure and
``write_eof()`` to pass a half-close on.  Nothing tuned.

Prints its bound port on stdout, then serves until SIGINT/SIGTERM.

Usage: python benchmarks/asyncio_forwarder.py --listen-port 0 --remote-port 6379
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--listen-port", type=int, default=0)
    parser.add_argument("--remote-host", default="127.0.0.1")
    parser.add_argument("--remote-port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.listen_host, args.listen_port, args.remote_host, args.remote_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
