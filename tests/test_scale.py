"""Scale: select() cannot watch descriptor 1024 or above; the poll() loop must serve well past it."""

from __future__ import annotations

import resource
import socket
from typing import List

import pytest

from conftest import WAIT, EchoServer, RunningForwarder, raise_fd_limit, recv_exactly, wait_for

CONNECTIONS = 1100


def test_serves_more_than_1024_connections_at_once() -> None:
    """1100 clients held open together each get their own message echoed back exactly."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Each connection costs four descriptors in this process: the client, the
    # forwarder's two sockets and the echo server's one.
    if raise_fd_limit(8192) < 6000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        pytest.skip(f"needs 6000 descriptors, RLIMIT_NOFILE hard limit is {hard}")
    echo = EchoServer()
    # A backlog this deep lets the clients connect as fast as they can, with no SYN retries.
    fwd = RunningForwarder("127.0.0.1", 0, "127.0.0.1", echo.port, backlog=1024)
    clients: List[socket.socket] = []
    try:
        for _ in range(CONNECTIONS):
            clients.append(socket.create_connection(fwd.address, timeout=WAIT))
        assert max(client.fileno() for client in clients) > 1024  # past what select() can watch
        messages = [f"message {i:04d} on its own connection".encode() for i in range(CONNECTIONS)]
        for client, message in zip(clients, messages):
            client.sendall(message)
        echoes = [recv_exactly(client, len(message)) for client, message in zip(clients, messages)]
        assert sum(echo == message for echo, message in zip(echoes, messages)) == CONNECTIONS
        assert len(fwd.forwarder.connections) == CONNECTIONS  # all open at once
        for client in clients:
            client.close()
        wait_for(lambda: not fwd.forwarder.connections, what="every connection to close")
    finally:
        for client in clients:
            client.close()
        fwd.stop()
        echo.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
