"""Before the pair relays: bytes for the server ahead of the client's, and admission steps.

What PROXY protocol support will use: a header sent to the server first
(v1/v2), and one read from a load balancer before the server connect starts.
"""

from __future__ import annotations

import socket

import pytest

from asyncore_fwd import Connection, Forwarder
from conftest import WAIT, EchoServer, recv_all, wait_for

HEADER = b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n"


class HeaderFirst(Forwarder):
    """Sends the server a header of its own before the client's bytes, as PROXY v1 would."""

    def connection_opened(self, conn: Connection) -> None:
        super().connection_opened(conn)
        conn.queue_for_server(HEADER)


def test_bytes_queued_for_the_server_go_ahead_of_the_client_s(echo_server: EchoServer, splice: bool) -> None:
    """The echo shows the server got the header, then the client's bytes, with either relay."""
    fwd = HeaderFirst("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={}, splice=splice)
    with fwd.running():
        with socket.create_connection(fwd.address, timeout=WAIT) as client:
            client.sendall(b"the client's own bytes")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == HEADER + b"the client's own bytes"
        wait_for(lambda: not fwd.connections, what="the pair to close")
        counters = fwd.stats.snapshot(fwd.connections)
    assert counters["bytes_to_server"] == len(HEADER + b"the client's own bytes")


def test_bytes_for_the_server_cannot_go_first_once_the_pair_relays(echo_server: EchoServer) -> None:
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={})
    with fwd.running():
        with socket.create_connection(fwd.address, timeout=WAIT):
            wait_for(lambda: any(conn.established for conn in fwd.connections), what="the connect")
            (conn,) = fwd.connections
            with pytest.raises(RuntimeError, match="only before it relays"):
                conn.queue_for_server(HEADER)
