"""Before the pair relays: bytes for the server ahead of the client's, and admission steps.

What PROXY protocol support will use: a header sent to the server first
(v1/v2), and one read from a load balancer before the server connect starts.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from typing import List

import pytest

from asyncore_fwd import Connection, Forwarder
from asyncore_fwd._relay._connection import AdmissionStep
from conftest import WAIT, EchoServer, connect_until_reset, payload, recv_all, stream_end, wait_for

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


class FirstLine(AdmissionStep):
    """Reads one line from the client before the server connect, as a PROXY header from a load
    balancer would come, keeps it, and passes the rest on; refuses a client that ends first."""

    def __init__(self) -> None:
        self.lines: List[bytes] = []

    def admit(self, conn: Connection) -> bool:
        read = bytearray()

        def received(data: bytes) -> None:
            if not data:
                conn.refuse("no header line")
                return
            read.extend(data)
            if b"\n" in read:
                line, rest = bytes(read).split(b"\n", 1)
                self.lines.append(line)
                if rest:
                    conn.queue_for_server(rest)
                conn.let_go()

        conn.read_client(received)
        return False  # held: the connect waits for the line


def test_a_step_that_reads_a_header_line_first_then_lets_the_connect_go(
        echo_server: EchoServer, splice: bool) -> None:
    """The server connect starts once the line is read; every byte after it reaches the server."""
    step = FirstLine()
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={}, splice=splice)
    fwd.add_admission_step(step)
    data = payload(1 << 20)
    with fwd.running():
        with socket.create_connection(fwd.address, timeout=WAIT) as client:
            client.sendall(b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r")
            wait_for(lambda: len(fwd.connections) == 1, what="the client to be accepted")
            time.sleep(0.05)
            (conn,) = fwd.connections
            assert conn.held and not conn.established and echo_server.accepted == 0  # no connect yet
            sender = threading.Thread(target=lambda: (client.sendall(b"\n" + data), client.shutdown(socket.SHUT_WR)))
            sender.start()
            echoed = recv_all(client)
            sender.join(WAIT)
    assert step.lines == [b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r"]
    assert echoed == data and echo_server.accepted == 1


def test_a_step_that_holds_the_connect_can_refuse_the_client_with_a_reset(
        echo_server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    """A client that half-closes before its header line is reset; the server never hears of it."""
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={})
    fwd.add_admission_step(FirstLine())
    with fwd.running():
        with socket.create_connection(fwd.address, timeout=WAIT) as client:
            client.sendall(b"no end of line")
            client.shutdown(socket.SHUT_WR)
            assert stream_end(client) == "reset"
        wait_for(lambda: not fwd.connections, what="the pair to close")
    assert echo_server.accepted == 0
    [line] = [record.getMessage() for record in caplog.records if getattr(record, "event", None) == "close"]
    assert line.endswith("forwarder closed first: no header line")


class NeverDecides(AdmissionStep):
    """Holds every connect and never lets it go: a client that never sends its header."""

    def admit(self, conn: Connection) -> bool:
        return False


def test_a_connect_held_past_the_connect_timeout_is_refused(echo_server: EchoServer) -> None:
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={}, connect_timeout=0.2)
    fwd.add_admission_step(NeverDecides())
    with fwd.running():
        with socket.create_connection(fwd.address, timeout=WAIT) as client:
            started = time.monotonic()
            assert stream_end(client) == "reset"
            assert time.monotonic() - started < 5.0  # the connect timeout (0.2 s), not for ever
        wait_for(lambda: not fwd.connections, what="the pair to close")
    assert echo_server.accepted == 0


class RefusesEveryone(AdmissionStep):
    def refusal(self, client_address, open_connections: int) -> str:
        return "closed for maintenance"


def test_a_step_s_refusal_is_logged_on_a_rule_without_access_control(
        echo_server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={})
    fwd.add_admission_step(RefusesEveryone())
    with fwd.running():
        assert connect_until_reset(fwd.address) == b""  # (on loopback, maybe before connect() returns)
        wait_for(lambda: fwd.stats.refused_limit == 1, what="the refusal to be counted")
    assert any(re.search(r"refused 127\.0\.0\.1:\d+ \(closed for maintenance\)", record.getMessage())
               for record in caplog.records)


class FailsAtOpen(Forwarder):
    def connection_opened(self, conn: Connection) -> None:
        raise RuntimeError("a bug in a hook")


def test_a_hook_that_raises_at_open_leaves_no_connection_behind(echo_server: EchoServer) -> None:
    """The pair is reset and forgotten (its descriptors closed); the listener goes on after its pause."""
    fwd = FailsAtOpen("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={})
    with fwd.running():
        assert connect_until_reset(fwd.address) == b""  # (on loopback, maybe before connect() returns)
        wait_for(lambda: not fwd.connections and len(fwd._map) == 2, what="the pair to leave the map")
    assert echo_server.accepted == 0


class TurnsAwayWhenTimedOut(AdmissionStep):
    """Holds every connect; at the time-out turns the client away as at accept."""

    def admit(self, conn: Connection) -> bool:
        return False

    def timed_out(self, conn: Connection) -> None:
        conn.turn_away("too slow")


class IgnoresItsTimeOut(NeverDecides):
    def timed_out(self, conn: Connection) -> None:
        pass


def test_a_step_decides_what_its_time_out_means(echo_server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    """Turned away: a reset, counted and logged as a refusal (one line), the close line at DEBUG only."""
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={}, connect_timeout=0.2)
    fwd.add_admission_step(TurnsAwayWhenTimedOut())
    with fwd.running():
        with socket.create_connection(fwd.address, timeout=WAIT) as client:
            assert stream_end(client) == "reset"
        wait_for(lambda: not fwd.connections, what="the pair to close")
    assert fwd.stats.refused_limit == 1 and echo_server.accepted == 0
    [line] = [record.getMessage() for record in caplog.records]
    assert re.search(r"refused 127\.0\.0\.1:\d+ \(too slow\)$", line)


def test_a_step_whose_time_out_decides_nothing_still_loses_the_client(echo_server: EchoServer) -> None:
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={}, connect_timeout=0.2)
    fwd.add_admission_step(IgnoresItsTimeOut())
    with fwd.running():
        with socket.create_connection(fwd.address, timeout=WAIT) as client:
            assert stream_end(client) == "reset"
        wait_for(lambda: not fwd.connections, what="the pair to close")
    assert echo_server.accepted == 0
