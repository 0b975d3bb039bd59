"""Idle and half-closed timeouts: quiet pairs are closed, busy ones are not."""

from __future__ import annotations

import logging
import socket
import threading
import time

from conftest import WAIT, recv_all, recv_exactly, wait_for

TIMEOUT = 0.3
# Generous bounds: the pair must close after the timeout, and not much later.
EARLIEST, LATEST = 0.25, 2.0
# For the pairs that must stay open: bytes move every GAP, far within the timeout even on a loaded
# machine, for longer than the timeout in all.
LONG_TIMEOUT, GAP = 1.0, 0.075


def test_idle_connection_is_closed_after_idle_timeout(start_forwarder, echo_server) -> None:
    fwd = start_forwarder(echo_server.port, idle_timeout=TIMEOUT)
    with fwd.connect() as client:
        client.sendall(b"x")
        assert recv_exactly(client, 1) == b"x"
        quiet_since = time.monotonic()
        assert recv_all(client) == b""  # closed with a FIN: nothing was waiting to be sent
        assert EARLIEST <= time.monotonic() - quiet_since <= LATEST


def test_connection_moving_bytes_outlives_idle_timeout(start_forwarder, echo_server) -> None:
    fwd = start_forwarder(echo_server.port, idle_timeout=LONG_TIMEOUT)
    with fwd.connect() as client:
        started = time.monotonic()
        while time.monotonic() - started < 1.5 * LONG_TIMEOUT:
            client.sendall(b"y")
            assert recv_exactly(client, 1) == b"y"
            time.sleep(GAP)
        assert len(fwd.forwarder.connections) == 1


def test_idle_close_is_logged_with_its_reason(start_forwarder, echo_server, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncore_fwd")
    fwd = start_forwarder(echo_server.port, idle_timeout=TIMEOUT)
    with fwd.connect() as client:
        recv_all(client)
    wait_for(lambda: [r for r in caplog.records if getattr(r, "event", None) == "close"], what="the close line")
    (record,) = [r for r in caplog.records if getattr(r, "event", None) == "close"]
    assert record.levelno == logging.INFO
    assert record.details["reason"] == f"idle for {TIMEOUT:g} s"
    assert record.details["closed_first"] == "forwarder"


def test_half_closed_connection_is_closed_after_half_closed_timeout(start_forwarder, scripted_server) -> None:
    release = threading.Event()

    def server(conn: socket.socket) -> None:  # reads to EOF, then neither answers nor closes
        while conn.recv(1024):
            pass
        release.wait(WAIT)

    fwd = start_forwarder(scripted_server(server).port, half_closed_timeout=TIMEOUT)
    try:
        with fwd.connect() as client:
            client.sendall(b"request")
            client.shutdown(socket.SHUT_WR)
            half_closed_at = time.monotonic()
            assert recv_all(client) == b""
            assert EARLIEST <= time.monotonic() - half_closed_at <= LATEST
    finally:
        release.set()


def test_half_closed_connection_still_sending_survives(start_forwarder, scripted_server) -> None:
    chunks = 20

    def server(conn: socket.socket) -> None:  # answers slowly after the client's EOF
        while conn.recv(1024):
            pass
        for _ in range(chunks):
            conn.sendall(b"z" * 100)
            time.sleep(GAP)

    fwd = start_forwarder(scripted_server(server).port, half_closed_timeout=LONG_TIMEOUT)
    with fwd.connect() as client:
        client.sendall(b"request")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"z" * 100 * chunks  # 1.5 timeouts long, never quiet for one


def test_idle_pair_with_bytes_stuck_in_the_forwarder_is_reset(start_forwarder, scripted_server) -> None:
    release, outcome = threading.Event(), []

    def server(conn: socket.socket) -> None:  # reads only once released: the forwarder's buffer fills up
        release.wait(WAIT)
        try:
            while conn.recv(1 << 20):
                pass
            outcome.append("eof")  # a FIN: the stream would look complete, truncated
        except ConnectionResetError:
            outcome.append("reset")

    fwd = start_forwarder(scripted_server(server).port, idle_timeout=TIMEOUT)
    try:
        with fwd.connect() as client:
            client.setblocking(False)
            deadline = time.monotonic() + WAIT
            try:
                while time.monotonic() < deadline:  # fill every buffer on the way
                    try:
                        client.send(b"q" * 65536)
                    except BlockingIOError:
                        time.sleep(0.05)  # the forwarder may still take some: try once more
                        try:
                            client.send(b"q" * 65536)
                        except BlockingIOError:
                            break
            except ConnectionResetError:  # on a busy machine the timeout may come while still filling
                pass
            wait_for(lambda: not fwd.forwarder.connections, what="the stuck pair to time out")
    finally:
        release.set()
    wait_for(lambda: outcome, what="the server to read to the end")
    assert outcome == ["reset"]
