"""``--workers N``: processes sharing the port, supervised, stopped together."""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Callable, List

import pytest

from asyncore_fwd import _workers
from conftest import WAIT, ForwarderProcess, recv_all, wait_for

pytestmark = pytest.mark.skipif(not _workers.AVAILABLE, reason="no SO_REUSEPORT or fork() here")

MODULE = [sys.executable, "-m", "asyncore_fwd"]


def start_workers(spawn: Callable[..., ForwarderProcess], remote_port: int, count: int = 2) -> ForwarderProcess:
    proc = spawn(MODULE + ["-p", "0", "-r", "127.0.0.1", "-P", str(remote_port), "--workers", str(count), "-v"])
    for index in range(count):
        proc.wait_line(rf"worker {index} started \(pid \d+\)")
    return proc


def worker_pids(proc: ForwarderProcess) -> List[int]:
    return [int(line.rsplit("pid ", 1)[1].rstrip(")")) for line in proc.lines if " started (pid " in line]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def echo_through(port: int, message: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
        client.sendall(message)
        client.shutdown(socket.SHUT_WR)
        return recv_all(client)


def test_workers_share_the_port_and_each_serves_connections(spawn, echo_server) -> None:
    """With two workers, connections are spread over both and all are relayed."""
    proc = start_workers(spawn, echo_server.port)
    port = proc.start_port()
    for index in range(40):
        assert echo_through(port, b"message %d" % index) == b"message %d" % index
    wait_for(lambda: {w for w in ("w0", "w1") if any(f" {w} #" in line and "accepted" in line
                                                     for line in proc.lines)} == {"w0", "w1"},
             what="both workers to accept connections")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_parent_stops_every_worker(spawn, echo_server, signum) -> None:
    """SIGINT or SIGTERM: the parent stops the workers, then exits 0; no worker is left."""
    proc = start_workers(spawn, echo_server.port)
    port = proc.start_port()
    assert echo_through(port, b"hi") == b"hi"
    pids = worker_pids(proc)
    assert len(pids) == 2
    assert proc.stop(signum) == 0
    assert not any(alive(pid) for pid in pids)
    assert "Traceback" not in proc.stderr


def test_a_worker_that_dies_is_started_again(spawn, echo_server) -> None:
    """A worker killed from outside is replaced, and the port keeps serving."""
    proc = start_workers(spawn, echo_server.port)
    port = proc.start_port()
    victim = worker_pids(proc)[0]
    os.kill(victim, signal.SIGKILL)
    proc.wait_line(rf"worker 0 \(pid {victim}\) exited \(killed by SIGKILL\); starting it again")
    wait_for(lambda: len(worker_pids(proc)) == 3, what="a new worker")
    for index in range(20):
        assert echo_through(port, b"after %d" % index) == b"after %d" % index
    assert proc.stop(signal.SIGTERM) == 0


def test_workers_report_setup_errors_before_forking(spawn) -> None:
    """An unknown remote host with --workers: one line, exit 1, no worker started."""
    proc = spawn(MODULE + ["-p", "0", "-r", "no-such-host.invalid", "-P", "80", "--workers", "2"])
    assert proc.process.wait(timeout=WAIT) == 1
    proc.kill()
    assert len(proc.lines) == 1 and "no-such-host.invalid" in proc.lines[0]
    assert "worker" not in proc.stderr


def test_port_in_use_with_workers_is_a_runtime_error(spawn) -> None:
    """A port held by a socket without SO_REUSEPORT: one line, exit 1."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = spawn(MODULE + ["-p", str(port), "-r", "127.0.0.1", "-P", "80", "--workers", "2"])
        assert proc.process.wait(timeout=WAIT) == 1
    proc.kill()
    assert len(proc.lines) == 1 and "in use" in proc.lines[0].lower()


@pytest.mark.parametrize("count", ["0", "-1", "abc", "257"])
def test_bad_worker_count_is_a_usage_error(spawn, count) -> None:
    """--workers outside 1..256 is bad usage: exit 2, one line naming the flag."""
    proc = spawn(MODULE + ["-p", "0", "-r", "127.0.0.1", "-P", "80", "--workers", count])
    assert proc.process.wait(timeout=WAIT) == 2
    proc.kill()
    assert len(proc.lines) == 1 and "--workers" in proc.lines[0]
