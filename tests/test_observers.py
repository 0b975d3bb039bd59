"""Connection observers: what follows every connection (counters, limits, timeouts, toxics, a feature of yours).

The forwarder's hooks only log: what must stay right whatever a subclass does
is kept by the observers, which a connection tells first.
"""

from __future__ import annotations

import socket
from typing import List, Tuple

from asyncore_fwd import Connection, Forwarder
from asyncore_fwd._relay._connection import ConnectionObserver
from conftest import WAIT, EchoServer, recv_all, wait_for


class QuietForwarder(Forwarder):
    """Hooks that log nothing and never call the base methods."""

    def connection_opened(self, conn: Connection) -> None:
        pass

    def connection_established(self, conn: Connection) -> None:
        pass

    def connection_closed(self, conn: Connection) -> None:
        pass


def echo_once(address: Tuple[str, int], data: bytes) -> bytes:
    with socket.create_connection(address, timeout=WAIT) as client:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        return recv_all(client)


def test_hooks_that_do_not_call_the_base_methods_leave_counters_and_limits_right(echo_server: EchoServer) -> None:
    """With max_per_client=1, a client whose connection closed may open another; every one is counted."""
    fwd = QuietForwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={}, max_per_client=1)
    with fwd.running():
        for number in range(3):
            assert echo_once(fwd.address, b"ping %d" % number) == b"ping %d" % number
            wait_for(lambda: not fwd.connections, what="the pair to close")
        assert fwd.access is not None and fwd.access.per_client == {}
        counters = fwd.stats.snapshot(fwd.connections)
    assert counters["accepted"] == 3 and counters["refused_limit"] == 0
    assert counters["bytes_to_server"] == counters["bytes_to_client"] == 3 * len(b"ping 0")


class Recorder(ConnectionObserver):
    """An observer as a feature would add one: it notes each moment of each connection's life."""

    def __init__(self, events: List[str]) -> None:
        self.events = events

    def opened(self, conn: Connection) -> None:
        self.events.append(f"opened #{conn.id}, not yet connected: {conn.server_address}")

    def established(self, conn: Connection) -> None:
        self.events.append(f"established #{conn.id}")

    def half_closed(self, conn: Connection) -> None:
        self.events.append(f"half-closed #{conn.id}")

    def closed(self, conn: Connection) -> None:
        self.events.append(f"closed #{conn.id}: {conn.bytes_to_server}/{conn.bytes_to_client}")


class HookedForwarder(Forwarder):
    """Hooks that note when they are called, after the base method."""

    events: List[str]

    def connection_opened(self, conn: Connection) -> None:
        super().connection_opened(conn)
        self.events.append("hook: opened")

    def connection_established(self, conn: Connection) -> None:
        super().connection_established(conn)
        self.events.append("hook: established")

    def connection_closed(self, conn: Connection) -> None:
        super().connection_closed(conn)
        self.events.append("hook: closed")


def test_an_observer_hears_each_moment_of_a_connection_before_the_hooks(echo_server: EchoServer) -> None:
    """opened, established, half-closed (the client's EOF passed on), closed: each before its hook."""
    events: List[str] = []
    fwd = HookedForwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={})
    fwd.events = events
    fwd.add_observer(Recorder(events))
    with fwd.running():
        assert echo_once(fwd.address, b"hello") == b"hello"
        wait_for(lambda: "hook: closed" in events, what="the pair to close")
    (conn_id,) = {event.split("#")[1].split(",")[0].split(":")[0] for event in events if "#" in event}
    assert events == [f"opened #{conn_id}, not yet connected: None", "hook: opened",
                      f"established #{conn_id}", "hook: established",
                      f"half-closed #{conn_id}",
                      f"closed #{conn_id}: 5/5", "hook: closed"]
