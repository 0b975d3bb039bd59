"""``--workers N``: processes sharing the port, supervised, stopped together."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Callable, Dict, List, Optional, Sequence

import pytest

from asyncore_fwd._service import _workers
from conftest import (
    WAIT,
    ForwarderProcess,
    dead_port,
    raise_fd_limit,
    recv_all,
    recv_exactly,
    recv_until_reset,
    wait_for,
)

pytestmark = pytest.mark.skipif(not _workers.AVAILABLE, reason="no SO_REUSEPORT or fork() here")

MODULE = [sys.executable, "-m", "asyncore_fwd"]


def start_workers(spawn: Callable[..., ForwarderProcess], remote_port: int, count: int = 2,
                  extra: Sequence[str] = ()) -> ForwarderProcess:
    proc = spawn(MODULE + ["-p", "0", "-r", "127.0.0.1", "-P", str(remote_port), "--workers", str(count), "-v",
                           *extra])
    for index in range(count):
        proc.wait_line(rf"worker {index} started \(pid \d+\)")
    proc.wait_line(rf"with {count} workers$")  # logged once every worker listens
    return proc


def worker_pids(proc: ForwarderProcess) -> List[int]:
    return [int(line.rsplit("pid ", 1)[1].rstrip(")")) for line in proc.lines if " started (pid " in line]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def cpu_seconds(pid: int) -> Optional[float]:
    """The user and system CPU time process ``pid`` has used so far (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def echo_through(port: int, message: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
        client.sendall(message)
        client.shutdown(socket.SHUT_WR)
        return recv_all(client)


def both_workers_accepted(proc: ForwarderProcess) -> bool:
    return {w for w in ("w0", "w1") if any(f" {w} #" in line and "accepted" in line
                                           for line in proc.lines)} == {"w0", "w1"}


def scrape(url: str) -> Dict[str, int]:
    """The samples of the (one rule's) metrics, by metric name."""
    with urllib.request.urlopen(url, timeout=WAIT) as response:
        body = response.read().decode()
    return {name: int(value) for name, value in re.findall(r'^(\w+)\{rule="[^"]*"\} (\d+)$', body, re.MULTILINE)}


def wait_for_counters(url: str, expected: Dict[str, int]) -> None:
    """Scrape until the counters are ``expected`` (the workers report them about once a second)."""
    last: List[Dict[str, int]] = [{}]

    def reached() -> bool:
        last[0] = scrape(url)
        time.sleep(0.05)
        return all(last[0].get(name) == value for name, value in expected.items())

    wait_for(reached, what=f"the counters {expected} (last scrape: {last[0]})")


def test_workers_share_the_port_and_each_serves_connections(spawn, echo_server) -> None:
    """With two workers, connections are spread over both and all are relayed."""
    proc = start_workers(spawn, echo_server.port)
    port = proc.start_port()
    for index in range(40):
        assert echo_through(port, b"message %d" % index) == b"message %d" % index
    wait_for(lambda: both_workers_accepted(proc), what="both workers to accept connections")


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


def test_second_signal_resets_every_open_connection_of_every_worker(spawn, watching_server, splice) -> None:
    """A second SIGTERM to the parent: every worker stops at once and resets each connection still
    open, on the client's side and on the server's; none ends with an EOF."""
    proc = start_workers(spawn, watching_server.port, extra=["--drain-timeout", "60",
                                                             *(["--splice"] if splice else [])])
    port = proc.start_port()
    clients = []
    while not both_workers_accepted(proc) and len(clients) < 40:
        client = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        clients.append(client)
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
        time.sleep(0.01)  # for the accept line
    assert both_workers_accepted(proc)
    proc.process.send_signal(signal.SIGTERM)
    proc.wait_line(r"w0 draining: not accepting")
    proc.wait_line(r"w1 draining: not accepting")
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr
    for client in clients:
        with client:
            recv_until_reset(client)
    wait_for(lambda: len(watching_server.ends) == len(clients), what="the server to see every end")
    assert watching_server.ends == ["reset"] * len(clients)


def test_supervisor_lines_are_start_reload_and_drain_events_in_json(spawn, echo_server, tmp_path) -> None:
    """With --log-format json the supervisor's own lines carry the documented events, not "log"."""
    config = tmp_path / "fwd.toml"
    config.write_text(f'[[rule]]\nname = "web"\nlisten = "127.0.0.1:0"\nconnect = "127.0.0.1:{echo_server.port}"\n')
    proc = spawn(MODULE + ["-c", str(config), "--workers", "2", "--log-format", "json"])
    proc.wait_line(r"with 2 workers")
    proc.process.send_signal(signal.SIGHUP)
    proc.wait_line(r"reloading 2 workers")
    assert proc.stop(signal.SIGTERM) == 0
    supervisor = [entry for entry in map(json.loads, proc.lines) if "worker" not in entry]
    assert [entry["event"] for entry in supervisor] == ["start", "reload", "drain"], supervisor
    start, reload, drain = supervisor
    assert start["rule"] == "web" and start["target"] == f"127.0.0.1:{echo_server.port}" and start["workers"] == 2
    assert reload["config"] == str(config) and reload["rules"] == 1
    assert drain["signal"] == "SIGTERM" and drain["workers"] == 2


def test_a_worker_that_dies_is_started_again(spawn, echo_server) -> None:
    """A worker killed from outside is replaced, and the port keeps serving."""
    proc = start_workers(spawn, echo_server.port)
    port = proc.start_port()
    proc.wait_line(r"with 2 workers")  # all listen: the supervisor now replaces the ones that die
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


def gone_lines(proc: ForwarderProcess) -> int:
    return sum("the supervisor is gone" in line for line in proc.lines)


def test_workers_exit_when_their_supervisor_is_killed(spawn, echo_server) -> None:
    """kill -9 of the supervisor: each worker notices, drains and exits, so the port is free again."""
    proc = start_workers(spawn, echo_server.port, extra=["--drain-timeout", "2"])
    port = proc.start_port()
    pids = worker_pids(proc)
    proc.process.kill()  # SIGKILL, to the supervisor alone
    proc.process.wait(timeout=WAIT)
    wait_for(lambda: not any(alive(pid) for pid in pids), what="the workers to exit")
    with socket.socket() as again:  # no SO_REUSEPORT: this fails while a worker still listens
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()
    wait_for(lambda: gone_lines(proc) == 2, what="one line from each worker")
    assert "Traceback" not in proc.stderr


def test_workers_drain_open_connections_when_their_supervisor_is_killed(spawn, echo_server) -> None:
    """After kill -9 of the supervisor, a connection open through a worker is relayed until it
    ends (within the drain timeout); new clients are refused."""
    proc = start_workers(spawn, echo_server.port, extra=["--drain-timeout", "30"])
    port = proc.start_port()
    pids = worker_pids(proc)
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
        client.sendall(b"before")
        assert recv_exactly(client, 6) == b"before"
        proc.process.kill()
        proc.process.wait(timeout=WAIT)
        wait_for(lambda: gone_lines(proc) == 2, what="one line from each worker")
        client.sendall(b"after")
        assert recv_exactly(client, 5) == b"after"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
        # Draining, they wait for events like any loop: the pipe's EOF is not reported again and again.
        # (The worker with nothing to drain may exit meanwhile: it cannot spin then. The one
        # relaying the connection drains for as long as the connection stays open.)
        used = {pid: cpu_seconds(pid) for pid in pids}
        time.sleep(1.0)
        spent = [after - before for pid, before in used.items()
                 if before is not None and (after := cpu_seconds(pid)) is not None]
        assert spent, "no worker left draining the open connection"
        assert max(spent) < 0.5, f"CPU seconds in 1 s of draining: {spent}"  # a spinning worker takes about 1
    wait_for(lambda: not any(alive(pid) for pid in pids), what="the workers to exit once the connection ended")


SUPERVISE_A_WORKER_THAT_DIES_AT_START = """
import time
from asyncore_fwd._service import _workers

def run_worker(index, ready, lifeline):
    if index == 0:
        return 3  # exits before it listens, every time
    ready()
    time.sleep(30)  # until the supervisor's SIGTERM
    return 0

started = time.monotonic()
status = _workers.supervise(2, run_worker, on_ready=lambda: None, drain_timeout=0.5)
print(status, time.monotonic() - started)
"""


def test_a_worker_that_exits_before_it_listens_does_not_hold_the_start() -> None:
    """The start waits for the workers that listen, not START_WAIT s for one that died; the
    loop then replaces it (here, until it has died too often)."""
    result = subprocess.run([sys.executable, "-c", SUPERVISE_A_WORKER_THAT_DIES_AT_START],
                            capture_output=True, text=True, timeout=60)
    status, seconds = result.stdout.split()
    assert status == "1", result.stderr  # worker 0 kept exiting
    assert float(seconds) < _workers.START_WAIT / 2, result.stderr


def test_readiness_wait_takes_a_pipe_past_descriptor_1023(caplog: pytest.LogCaptureFixture) -> None:
    """The supervisor waits for its workers with poll(): a ready pipe past select()'s limit
    (with a reserving socket per rule, 1100 rules put it there) is read, not a ValueError."""
    if raise_fd_limit(1200) < 1200:
        pytest.skip("cannot open 1200 descriptors here")
    reader, writer = os.pipe()
    try:
        os.dup2(reader, 1100)
        os.write(writer, b"..")
        started = time.monotonic()
        _workers._wait_ready(1100, {os.getpid(): 0, os.getppid(): 1})  # two workers, both ready
        assert time.monotonic() - started < _workers.START_WAIT
    finally:
        for fd in (reader, writer, 1100):
            os.close(fd)
    assert "workers are listening" not in caplog.text


@pytest.mark.parametrize("count", ["0", "-1", "abc", "257"])
def test_bad_worker_count_is_a_usage_error(spawn, count) -> None:
    """--workers outside 1..256 is bad usage: exit 2, one line naming the flag."""
    proc = spawn(MODULE + ["-p", "0", "-r", "127.0.0.1", "-P", "80", "--workers", count])
    assert proc.process.wait(timeout=WAIT) == 2
    proc.kill()
    assert len(proc.lines) == 1 and "--workers" in proc.lines[0]


# -- --metrics with --workers ---------------------------------------------------------------

ACCEPTED = "asyncore_fwd_connections_accepted_total"


def start_workers_with_metrics(spawn: Callable[..., ForwarderProcess], remote_port: int) -> tuple:
    """Two workers and --metrics 0: (process, forwarding port, metrics URL)."""
    proc = start_workers(spawn, remote_port, extra=["--metrics", "0"])
    port = proc.start_port()
    url = proc.wait_line(r"metrics at (http://127\.0\.0\.1:\d+/metrics)").group(1)
    return proc, port, url


def test_metrics_with_workers_count_every_workers_connections(spawn, echo_server) -> None:
    """One endpoint in the parent: its counters are the sums over both workers."""
    proc, port, url = start_workers_with_metrics(spawn, echo_server.port)
    for index in range(20):
        assert echo_through(port, b"message %02d" % index) == b"message %02d" % index
    wait_for(lambda: both_workers_accepted(proc), what="both workers to accept connections")
    wait_for_counters(url, {ACCEPTED: 20, "asyncore_fwd_bytes_to_server_total": 200,
                            "asyncore_fwd_bytes_to_client_total": 200, "asyncore_fwd_connections_active": 0})
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr


def test_metrics_with_workers_keep_the_counts_of_a_worker_that_died(spawn, echo_server) -> None:
    """A worker killed (and started again): the accepted counter does not go down."""
    proc, port, url = start_workers_with_metrics(spawn, echo_server.port)
    for _ in range(20):
        assert echo_through(port, b"x") == b"x"
    wait_for(lambda: both_workers_accepted(proc), what="both workers to accept connections")
    wait_for_counters(url, {ACCEPTED: 20})
    victim = worker_pids(proc)[0]
    os.kill(victim, signal.SIGKILL)
    proc.wait_line(rf"worker 0 \(pid {victim}\) exited \(killed by SIGKILL\); starting it again")
    # Past the new worker's first reports (one at start, then one a second).
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert scrape(url)[ACCEPTED] == 20
        time.sleep(0.05)
    assert echo_through(port, b"y") == b"y"
    wait_for_counters(url, {ACCEPTED: 21})
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr


def test_metrics_with_workers_on_a_wildcard_address_log_one_warning(spawn) -> None:
    """--metrics 0.0.0.0:0 with --workers: the parent warns once that anyone can read the counters."""
    proc = start_workers(spawn, 80, extra=["--metrics", "0.0.0.0:0"])
    proc.wait_line(r"metrics at http://0\.0\.0\.0:\d+/metrics")
    warnings = [line for line in proc.lines if "readable by anyone who can reach it" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], proc.stderr
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr


def test_metrics_port_in_use_with_workers_fails_before_forking(spawn) -> None:
    """--metrics on a port in use with --workers: one line, exit 1, no worker started."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = spawn(MODULE + ["-p", "0", "-r", "127.0.0.1", "-P", "80", "--workers", "2", "--metrics", str(port)])
        assert proc.process.wait(timeout=WAIT) == 1
    proc.kill()
    assert len(proc.lines) == 1 and "metrics" in proc.lines[0] and "in use" in proc.lines[0].lower(), proc.stderr


def test_metrics_with_workers_sum_each_targets_counters(spawn, echo_server) -> None:
    """A rule with a refused first target: the parent's endpoint sums every worker's failed connects
    to it, and shows it down (each worker that met the refusal marked it so)."""
    refused = dead_port()
    proc = spawn(MODULE + ["-L", f"0:127.0.0.1:{refused},connect=127.0.0.1:{echo_server.port},name=web",
                           "--workers", "2", "-v", "--metrics", "0"])
    for index in range(2):
        proc.wait_line(rf"worker {index} started \(pid \d+\)")
    port = proc.start_port()
    url = proc.wait_line(r"metrics at (http://127\.0\.0\.1:\d+/metrics)").group(1)
    for _ in range(20):
        assert echo_through(port, b"x") == b"x"
    wait_for(lambda: both_workers_accepted(proc), what="both workers to accept connections")
    dead, alive = f"127.0.0.1:{refused}", f"127.0.0.1:{echo_server.port}"
    last: List[Dict[tuple, int]] = [{}]

    def summed() -> bool:
        with urllib.request.urlopen(url, timeout=WAIT) as response:
            body = response.read().decode()
        last[0] = {(name, target): int(value) for name, target, value in
                   re.findall(r'^(asyncore_fwd_target_\w+)\{rule="web",target="([^"]*)"\} (\d+)$', body, re.MULTILINE)}
        time.sleep(0.05)
        # max_fails=1: each worker tries the refused target once, then prefers the other.
        return (last[0].get(("asyncore_fwd_target_connect_failures_total", dead)) == 2
                and last[0].get(("asyncore_fwd_target_up", dead)) == 0
                and last[0].get(("asyncore_fwd_target_up", alive)) == 1
                and last[0].get(("asyncore_fwd_target_connections_active", alive)) == 0)

    wait_for(summed, what=f"the summed target counters (last scrape: {last[0]})")
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr
