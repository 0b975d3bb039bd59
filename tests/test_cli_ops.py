"""The command as an operator runs it: many rules, config files, drain, reload, pid file, JSON logs,
metrics and workers -- each on a real child process, every wait bounded by ``WAIT``."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, List

import pytest

from asyncore_fwd._eventloop._loop import SELECT_LIMIT
from asyncore_fwd._service import _pidfile, _workers
from conftest import (
    WAIT,
    EchoServer,
    ForwarderProcess,
    ScriptedServer,
    WatchingServer,
    descriptors_taken,
    free_port,
    free_ports,
    raise_fd_limit,
    recv_all,
    recv_exactly,
    recv_until_reset,
    wait_for,
)

MODULE = [sys.executable, "-m", "asyncore_fwd"]
Spawn = Callable[..., ForwarderProcess]


def rule_port(proc: ForwarderProcess, name: str) -> int:
    """The port rule ``name`` listens on, from its start line."""
    return int(proc.wait_line(rf"^\S+ \S+ INFO (?:w\d+ )?{re.escape(name)}: forwarding \S+:(\d+) to ").group(1))


def echo_through(port: int, message: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
        client.sendall(message)
        client.shutdown(socket.SHUT_WR)
        return recv_all(client)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
    except ConnectionRefusedError:
        return True
    return False


def new_lines(proc: ForwarderProcess, since: int) -> List[str]:
    return proc.lines[since:]


@pytest.fixture
def tagged_server(scripted_server: Callable[..., ScriptedServer]) -> Callable[[bytes], ScriptedServer]:
    """``tagged_server(tag)``: a server that sends ``tag`` to each client, then echoes until EOF."""
    def start(tag: bytes) -> ScriptedServer:
        def handler(conn: socket.socket) -> None:
            conn.sendall(tag)
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)
        return scripted_server(handler)
    return start


def greeting(port: int, size: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
        return recv_exactly(client, size)


# -- many rules -------------------------------------------------------------------------


def test_two_forward_flags_are_served_by_one_process(spawn: Spawn, tagged_server) -> None:
    """-L twice: both rules forward, each to its own server, from one process."""
    one, two = tagged_server(b"one"), tagged_server(b"two")
    proc = spawn(MODULE + ["-L", f"0:127.0.0.1:{one.port},name=one", "-L", f"0:127.0.0.1:{two.port},name=two"])
    assert greeting(rule_port(proc, "one"), 3) == b"one"
    assert greeting(rule_port(proc, "two"), 3) == b"two"
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr


def test_config_file_rules_are_served(spawn: Spawn, tagged_server, tmp_path: Path) -> None:
    """-c FILE: every [[rule]] forwards, with [defaults] applied."""
    one, two = tagged_server(b"one"), tagged_server(b"two")
    config = tmp_path / "fwd.toml"
    config.write_text(f'[defaults]\nidle_timeout = 60\n'
                      f'[[rule]]\nname = "one"\nlisten = "127.0.0.1:0"\nconnect = "127.0.0.1:{one.port}"\n'
                      f'[[rule]]\nname = "two"\nlisten = "127.0.0.1:0"\nconnect = "127.0.0.1:{two.port}"\n')
    proc = spawn(MODULE + ["-c", str(config)])
    assert greeting(rule_port(proc, "one"), 3) == b"one"
    assert greeting(rule_port(proc, "two"), 3) == b"two"
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr


# -- drain --------------------------------------------------------------------------


def test_transfer_in_progress_completes_during_the_drain(spawn: Spawn, echo_server: EchoServer) -> None:
    """SIGTERM mid-transfer: no new client is accepted, the open one gets every byte, then exit 0."""
    proc = spawn(MODULE + ["-L", f"0:127.0.0.1:{echo_server.port},name=echo", "--drain-timeout", "20"])
    port = rule_port(proc, "echo")
    first, rest = b"first half " * 1000, b"second half " * 100_000
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
        client.sendall(first)
        assert recv_exactly(client, len(first)) == first
        proc.process.send_signal(signal.SIGTERM)
        proc.wait_line(r"draining: not accepting; 1 connections open")
        assert refused(port)
        sender = threading.Thread(target=lambda: (client.sendall(rest), client.shutdown(socket.SHUT_WR)))
        sender.start()
        assert recv_all(client) == rest
        sender.join(WAIT)
    assert proc.process.wait(timeout=WAIT) == 0, proc.stderr
    proc.wait_line(r"drained: no connection left")


def test_connection_still_open_at_the_drain_timeout_is_cut_and_counted(spawn: Spawn,
                                                                      echo_server: EchoServer) -> None:
    """A client that stays past --drain-timeout is cut; the log says 1 was cut; exit 0."""
    proc = spawn(MODULE + ["-L", f"0:127.0.0.1:{echo_server.port},name=echo", "--drain-timeout", "0.3"])
    with socket.create_connection(("127.0.0.1", rule_port(proc, "echo")), timeout=WAIT) as client:
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
        assert proc.stop(signal.SIGTERM) == 0, proc.stderr
        try:
            assert client.recv(1024) == b""
        except ConnectionResetError:
            pass
    proc.wait_line(r"drain timeout: cut 1 connections")


def test_second_signal_stops_at_once(spawn: Spawn, echo_server: EchoServer) -> None:
    """A second SIGINT during a long drain stops the process without waiting for the drain timeout."""
    proc = spawn(MODULE + ["-L", f"0:127.0.0.1:{echo_server.port},name=echo", "--drain-timeout", "60"])
    with socket.create_connection(("127.0.0.1", rule_port(proc, "echo")), timeout=WAIT) as client:
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
        proc.process.send_signal(signal.SIGINT)
        proc.wait_line(r"draining: not accepting; 1 connections open, cut in 60 s")
        assert proc.stop(signal.SIGINT) == 0, proc.stderr  # within WAIT, far below the 60 s
    proc.wait_line(r"SIGINT again: stopping at once")


def test_second_signal_resets_every_open_connection_on_both_sides(spawn: Spawn, watching_server: WatchingServer,
                                                                   splice: bool) -> None:
    """A second SIGTERM stops at once: each connection still open is reset, on the client's side
    and on the server's, as the drain timeout does; none ends with an EOF."""
    proc = spawn(MODULE + ["-L", f"0:127.0.0.1:{watching_server.port},name=w", "--drain-timeout", "60",
                           *(["--splice"] if splice else [])])
    port = rule_port(proc, "w")
    clients = [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(3)]
    for client in clients:
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
    proc.process.send_signal(signal.SIGTERM)
    proc.wait_line(r"draining: not accepting; 3 connections open")
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr
    proc.wait_line(r"stopped: cut 3 connections")
    for client in clients:
        with client:
            recv_until_reset(client)
    wait_for(lambda: len(watching_server.ends) == 3, what="the server to see every end")
    assert watching_server.ends == ["reset"] * 3


# -- reload -----------------------------------------------------------------------------


def write_rules(path: Path, rules: List[tuple]) -> None:
    path.write_text("".join(f'[[rule]]\nname = "{name}"\nlisten = "127.0.0.1:{port}"\n'
                            f'connect = "127.0.0.1:{target}"\n' for name, port, target in rules))


def test_sighup_adds_removes_and_changes_rules_while_an_unchanged_rule_keeps_flowing(
        spawn: Spawn, tagged_server, tmp_path: Path) -> None:
    """SIGHUP re-reads -c: a new rule starts, a removed one stops, a changed one goes to its new
    server on the same port, and a connection on an unchanged rule goes on relaying."""
    old, new = tagged_server(b"old"), tagged_server(b"new")
    keep_port, drop_port, change_port, add_port = free_ports(4)
    config = tmp_path / "fwd.toml"
    write_rules(config, [("keep", keep_port, old.port), ("drop", drop_port, old.port),
                         ("change", change_port, old.port)])
    proc = spawn(MODULE + ["-c", str(config)])
    rule_port(proc, "change")
    with socket.create_connection(("127.0.0.1", keep_port), timeout=WAIT) as kept:
        assert recv_exactly(kept, 3) == b"old"
        write_rules(config, [("keep", keep_port, old.port), ("change", change_port, new.port),
                             ("add", add_port, new.port)])
        proc.process.send_signal(signal.SIGHUP)
        proc.wait_line(r"reloaded: 1 added, 1 removed, 1 changed, 1 unchanged, 0 failed")
        kept.sendall(b"still here")
        assert recv_exactly(kept, 10) == b"still here"
    assert refused(drop_port)
    assert greeting(change_port, 3) == b"new"
    assert greeting(add_port, 3) == b"new"
    assert greeting(keep_port, 3) == b"old"
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr


def test_sighup_with_a_bad_config_keeps_the_running_rules(spawn: Spawn, tagged_server, tmp_path: Path) -> None:
    """A config error on SIGHUP: one error line, and the old rules keep forwarding."""
    server = tagged_server(b"old")
    port = free_port()
    config = tmp_path / "fwd.toml"
    write_rules(config, [("web", port, server.port)])
    proc = spawn(MODULE + ["-c", str(config)])
    rule_port(proc, "web")
    config.write_text(config.read_text() + "idle_timeout = \"soon\"\n")
    proc.process.send_signal(signal.SIGHUP)
    line = proc.wait_line(r"ERROR SIGHUP: .*").group(0)
    assert line.endswith(f'SIGHUP: {config}: rule 1 ("web"): idle_timeout: expected a number of seconds >= 0, '
                         f'got "soon"; the running rules stay')
    assert greeting(port, 3) == b"old"
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr
    assert not any("reloaded" in line for line in proc.lines)


@pytest.mark.parametrize("workers", [[], pytest.param(["--workers", "2"], marks=pytest.mark.skipif(
    not _workers.AVAILABLE, reason="no SO_REUSEPORT or fork() here"))], ids=["one-process", "workers"])
@pytest.mark.parametrize("bad, error", [
    ("idle_timeout = " + "9" * 400, 'rule 1 ("web"): idle_timeout: expected a number of seconds >= 0, got 999'),
    ("allow = " + "[" * 50000 + "]" * 50000, "arrays or tables nested too deeply to read"),
    ("max_connections = " + "9" * 5000, "an integer of more than 4300 digits cannot be read"),
], ids=["float-overflow", "deep-nesting", "5000-digits"])
def test_sighup_with_a_value_python_cannot_convert_keeps_the_running_rules(
        spawn: Spawn, tagged_server, tmp_path: Path, workers: List[str], bad: str, error: str) -> None:
    """Values that made Python raise (OverflowError, RecursionError, ValueError) are one error line on
    SIGHUP, as any bad value is: the process (with --workers, the supervisor) serves on."""
    server = tagged_server(b"old")
    port = free_port()
    config = tmp_path / "fwd.toml"
    write_rules(config, [("web", port, server.port)])
    proc = spawn(MODULE + ["-c", str(config), *workers])
    rule_port(proc, "web")
    config.write_text(config.read_text() + bad + "\n")
    proc.process.send_signal(signal.SIGHUP)
    line = proc.wait_line(r"ERROR SIGHUP: .*").group(0)
    assert f"SIGHUP: {config}: {error}" in line and line.endswith("; the running rules stay"), line
    assert greeting(port, 3) == b"old"
    assert proc.process.poll() is None
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def test_sighup_without_a_config_file_says_there_is_nothing_to_re_read(spawn: Spawn,
                                                                       echo_server: EchoServer) -> None:
    """Rules from -L only: SIGHUP logs that there is nothing to re-read and changes nothing."""
    proc = spawn(MODULE + ["-L", f"0:127.0.0.1:{echo_server.port},name=echo"])
    port = rule_port(proc, "echo")
    proc.process.send_signal(signal.SIGHUP)
    proc.wait_line(r"SIGHUP: nothing to re-read")
    assert echo_through(port, b"hi") == b"hi"
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr


def test_sigusr1_logs_the_counters_of_each_rule(spawn: Spawn, echo_server: EchoServer) -> None:
    """SIGUSR1: one line of counters per rule, counting what went through."""
    proc = spawn(MODULE + ["-L", f"0:127.0.0.1:{echo_server.port},name=echo"])
    assert echo_through(rule_port(proc, "echo"), b"12345") == b"12345"
    wait_for(lambda: proc.process.send_signal(signal.SIGUSR1) or
             any(re.search(r"echo: .*accepted=1 .*bytes_to_server=5", line) for line in proc.lines),
             what="a stats line counting the connection")
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr


# -- pid file, JSON logs, metrics -------------------------------------------------------


def spawn_with_pidfile(spawn: Spawn, echo_server: EchoServer, pidfile: Path) -> ForwarderProcess:
    """A forwarder (rule "echo") given ``--pidfile pidfile``, once it has written it."""
    proc = spawn(MODULE + ["-L", f"0:127.0.0.1:{echo_server.port},name=echo", "--pidfile", str(pidfile)])
    rule_port(proc, "echo")
    wait_for(pidfile.exists, what="the pid file")
    return proc


def test_pidfile_is_written_once_listening_and_removed_at_exit(spawn: Spawn, echo_server: EchoServer,
                                                               tmp_path: Path) -> None:
    """--pidfile holds the process id while it serves; it is gone after SIGTERM."""
    pidfile = tmp_path / "fwd.pid"
    proc = spawn_with_pidfile(spawn, echo_server, pidfile)
    assert pidfile.read_text() == f"{proc.process.pid}\n"
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr
    assert not pidfile.exists()


def test_unwritable_pidfile_is_one_line_and_exit_1(spawn: Spawn, echo_server: EchoServer, tmp_path: Path) -> None:
    """A pid file in a directory that does not exist: one line naming it, exit 1."""
    pidfile = tmp_path / "missing" / "fwd.pid"
    proc = spawn(MODULE + ["-q", "-L", f"0:127.0.0.1:{echo_server.port}", "--pidfile", str(pidfile)])
    assert proc.process.wait(timeout=WAIT) == 1
    proc.kill()
    assert proc.lines == [f"asyncore-fwd: cannot write the pid file {pidfile}: No such file or directory"]


def test_pidfile_is_mode_0644_whatever_the_umask(spawn: Spawn, echo_server: EchoServer, tmp_path: Path) -> None:
    """Under umask 000 the pid file is still writable by its owner only."""
    pidfile = tmp_path / "fwd.pid"
    previous = os.umask(0)
    try:
        spawn_with_pidfile(spawn, echo_server, pidfile)
    finally:
        os.umask(previous)
    assert pidfile.stat().st_mode & 0o777 == 0o644


def test_second_instance_refuses_a_pidfile_naming_a_running_one(spawn: Spawn, echo_server: EchoServer,
                                                                tmp_path: Path) -> None:
    """A second forwarder given the first one's pid file: one line, exit 1; the file still names the first."""
    pidfile = tmp_path / "fwd.pid"
    first = spawn_with_pidfile(spawn, echo_server, pidfile)
    second = spawn(MODULE + ["-L", f"0:127.0.0.1:{echo_server.port},name=echo", "--pidfile", str(pidfile)])
    assert second.process.wait(timeout=WAIT) == 1
    second.kill()
    assert second.lines == [f"asyncore-fwd: the pid file {pidfile} names process {first.process.pid}, which is "
                            f"running: stop it first, or remove the file if it is not a forwarder"]
    assert pidfile.read_text() == f"{first.process.pid}\n"
    assert first.stop(signal.SIGTERM) == 0, first.stderr
    assert not pidfile.exists()


def pid_in(pidfile: Path) -> str:
    """What ``pidfile`` holds now; "" while there is none (a stale one is removed, then replaced)."""
    try:
        return pidfile.read_text()
    except FileNotFoundError:
        return ""


def exited_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait(timeout=WAIT)
    return child.pid


@pytest.mark.parametrize("content", [None, "not a pid\n", "", "0\n", "9" * 40],
                         ids=["exited_process", "garbage", "empty", "zero", "too_long"])
def test_stale_pidfile_is_replaced(spawn: Spawn, echo_server: EchoServer, tmp_path: Path, content) -> None:
    """A pid file naming no running process is replaced, and removed at exit."""
    pidfile = tmp_path / "fwd.pid"
    pidfile.write_text(f"{exited_pid()}\n" if content is None else content)
    proc = spawn(MODULE + ["-L", f"0:127.0.0.1:{echo_server.port},name=echo", "--pidfile", str(pidfile)])
    rule_port(proc, "echo")
    wait_for(lambda: pid_in(pidfile) == f"{proc.process.pid}\n", what="the pid file to name the forwarder")
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr
    assert not pidfile.exists()


def test_stale_pidfile_replaced_by_another_instance_meanwhile_is_not_removed(tmp_path: Path) -> None:
    """Judged stale, then replaced by another starting instance: only the file judged stale is removed."""
    pidfile = tmp_path / "fwd.pid"
    pidfile.write_text("not a pid\n")
    found = _pidfile._open_stale(str(pidfile))
    assert found is not None
    pidfile.unlink()
    pidfile.write_text("4242\n")  # the other instance's, written between our judgement and our removal
    _pidfile._remove(str(pidfile), found[0])
    assert pidfile.read_text() == "4242\n"


def test_pidfile_that_is_a_symlink_is_refused_and_its_target_left_alone(spawn: Spawn, echo_server: EchoServer,
                                                                       tmp_path: Path) -> None:
    """A symbolic link at the pid file's name (planted to make us overwrite its target): one line, exit 1."""
    target = tmp_path / "secret.conf"
    target.write_text("settings\n")
    pidfile = tmp_path / "fwd.pid"
    pidfile.symlink_to(target)
    proc = spawn(MODULE + ["-L", f"0:127.0.0.1:{echo_server.port}", "--pidfile", str(pidfile)])
    assert proc.process.wait(timeout=WAIT) == 1
    proc.kill()
    assert proc.lines == [f"asyncore-fwd: cannot write the pid file {pidfile}: it is a symbolic link (not followed)"]
    assert target.read_text() == "settings\n"
    assert pidfile.is_symlink()


def test_pidfile_rewritten_by_another_process_is_left_at_exit(spawn: Spawn, echo_server: EchoServer,
                                                              tmp_path: Path) -> None:
    """At exit the pid file is removed only if it still holds the forwarder's pid."""
    pidfile = tmp_path / "fwd.pid"
    proc = spawn_with_pidfile(spawn, echo_server, pidfile)
    pidfile.write_text("12345\n")  # another instance took it over
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr
    assert pidfile.read_text() == "12345\n"


def test_json_log_lines_are_objects_with_the_contract_keys(spawn: Spawn, echo_server: EchoServer) -> None:
    """--log-format json: every line parses; time, level, event, message, and the event's details."""
    proc = spawn(MODULE + ["-v", "--log-format", "json", "-L", f"0:127.0.0.1:{echo_server.port},name=echo"])
    proc.wait_line(r'"event": "start"')
    port = json.loads(proc.lines[0])["listen"].rsplit(":", 1)[1]
    assert echo_through(int(port), b"json") == b"json"
    proc.wait_line(r'"event": "close"')
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr
    entries = [json.loads(line) for line in proc.lines]
    for entry in entries:
        assert {"time", "level", "event", "message"} <= entry.keys()
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", entry["time"])
    start = next(entry for entry in entries if entry["event"] == "start")
    assert (start["level"], start["rule"], start["target"]) == ("info", "echo", f"127.0.0.1:{echo_server.port}")
    close = next(entry for entry in entries if entry["event"] == "close")
    assert (close["bytes_to_server"], close["bytes_to_client"], close["closed_first"]) == (4, 4, "client")
    stop = next(entry for entry in entries if entry["message"].startswith("SIGTERM: stopping"))
    assert (stop["event"], stop["signal"], stop["timeout_s"]) == ("drain", "SIGTERM", 10)


def test_signal_lines_are_reload_and_drain_events_in_json(spawn: Spawn, echo_server: EchoServer,
                                                         tmp_path: Path) -> None:
    """--log-format json: the lines of SIGHUP (good and bad file) and of two SIGTERMs carry their events."""
    config = tmp_path / "fwd.toml"
    config.write_text(f'[[rule]]\nname = "web"\nlisten = "127.0.0.1:0"\nconnect = "127.0.0.1:{echo_server.port}"\n')
    proc = spawn(MODULE + ["-c", str(config), "--log-format", "json", "--drain-timeout", "30"])
    port = int(json.loads(proc.wait_line(r'"event": "start"').string)["listen"].rsplit(":", 1)[1])
    proc.process.send_signal(signal.SIGHUP)
    proc.wait_line(r"SIGHUP: re-read")
    config.write_text("[[rule]]\nlisten = 1\n")
    proc.process.send_signal(signal.SIGHUP)
    proc.wait_line(r"the running rules stay")
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:  # keeps the drain going
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
        proc.process.send_signal(signal.SIGTERM)
        proc.wait_line(r"SIGTERM: stopping")
        assert proc.stop(signal.SIGTERM) == 0, proc.stderr
    signalled = [entry for entry in map(json.loads, proc.lines) if entry["message"].startswith(("SIGHUP", "SIGTERM"))]
    assert [entry["event"] for entry in signalled] == ["reload", "reload", "drain", "drain"], signalled
    reread, bad, stop, again = signalled
    assert (reread["config"], reread["rules"]) == (str(config), 1)
    assert "fwd.toml" in bad["error"] and bad["level"] == "error"
    assert (stop["signal"], stop["timeout_s"], again["timeout_s"]) == ("SIGTERM", 30, 0)


def test_metrics_answers_get_metrics(spawn: Spawn, echo_server: EchoServer) -> None:
    """--metrics PORT serves Prometheus text at /metrics, counting the rule's connections."""
    proc = spawn(MODULE + ["-L", f"0:127.0.0.1:{echo_server.port},name=echo", "--metrics", "0"])
    assert echo_through(rule_port(proc, "echo"), b"count me") == b"count me"
    address = proc.wait_line(r"metrics at (http://127\.0\.0\.1:\d+/metrics)").group(1)
    with urllib.request.urlopen(address, timeout=WAIT) as response:
        assert response.status == 200
        body = response.read().decode()
    assert re.search(r'^\w+accepted\w*\{rule="echo"\} 1$', body, re.MULTILINE), body
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr


# -- workers ---------------------------------------------------------------------------

needs_workers = pytest.mark.skipif(not _workers.AVAILABLE, reason="no SO_REUSEPORT or fork() here")


@needs_workers
def test_second_workers_command_on_the_same_port_fails_with_address_in_use(
        spawn: Spawn, tagged_server) -> None:
    """Two --workers commands on one port: the second fails (exit 1, "in use"); the first keeps all traffic."""
    first_server, second_server = tagged_server(b"first"), tagged_server(b"other")
    first = spawn(MODULE + ["-L", f"0:127.0.0.1:{first_server.port},name=a", "--workers", "2"])
    port = rule_port(first, "a")
    second = spawn(MODULE + ["-L", f"{port}:127.0.0.1:{second_server.port},name=a", "--workers", "2"])
    assert second.process.wait(timeout=WAIT) == 1
    second.kill()
    assert len(second.lines) == 1 and "in use" in second.lines[0].lower(), second.stderr
    assert {greeting(port, 5) for _ in range(20)} == {b"first"}
    assert first.stop(signal.SIGTERM) == 0, first.stderr


@needs_workers
def test_workers_pidfile_names_the_supervisor_and_is_removed_at_exit(spawn: Spawn, echo_server: EchoServer,
                                                                      tmp_path: Path) -> None:
    pidfile = tmp_path / "fwd.pid"
    pidfile.write_text("not a pid\n")  # stale: replaced
    proc = spawn(MODULE + ["-L", f"0:127.0.0.1:{echo_server.port},name=echo", "--workers", "2",
                           "--pidfile", str(pidfile)])
    proc.wait_line(r"with 2 workers$")
    wait_for(lambda: pid_in(pidfile) == f"{proc.process.pid}\n", what="the pid file to name the supervisor")
    assert pidfile.stat().st_mode & 0o777 == 0o644
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr
    assert not pidfile.exists()


@needs_workers
def test_workers_refuse_a_pidfile_naming_a_running_process(spawn: Spawn, echo_server: EchoServer,
                                                           tmp_path: Path) -> None:
    """With --workers too: one line, exit 1, before any worker starts; the file is left as it was."""
    pidfile = tmp_path / "fwd.pid"
    pidfile.write_text(f"{os.getpid()}\n")  # this test's process: running
    proc = spawn(MODULE + ["-L", f"0:127.0.0.1:{echo_server.port}", "--workers", "2", "--pidfile", str(pidfile)])
    assert proc.process.wait(timeout=WAIT) == 1
    proc.kill()
    assert len(proc.lines) == 1 and f"names process {os.getpid()}, which is running" in proc.lines[0]
    assert pidfile.read_text() == f"{os.getpid()}\n"


@needs_workers
def test_workers_with_a_pidfile_that_cannot_be_written_start_no_worker(spawn: Spawn, echo_server: EchoServer,
                                                                       tmp_path: Path) -> None:
    """The supervisor writes its pid file before it forks: a missing directory is one line, exit 1,
    and no worker ever listens (none could accept a connection only to drop it)."""
    pidfile = tmp_path / "missing" / "fwd.pid"
    proc = spawn(MODULE + ["-L", f"0:127.0.0.1:{echo_server.port}", "--workers", "2", "--pidfile", str(pidfile)])
    assert proc.process.wait(timeout=WAIT) == 1
    proc.kill()
    assert proc.lines == [f"asyncore-fwd: cannot write the pid file {pidfile}: No such file or directory"]


@needs_workers
def test_one_ctrl_c_with_two_workers_prints_one_line(spawn: Spawn, echo_server: EchoServer) -> None:
    """SIGINT to the whole process group (what Ctrl-C does): exit 0 and a single line."""
    proc = spawn(MODULE + ["-L", f"0:127.0.0.1:{echo_server.port},name=echo", "--workers", "2"])
    assert echo_through(rule_port(proc, "echo"), b"hi") == b"hi"
    proc.wait_line(r"with 2 workers$")  # the supervisor's start line comes after the workers' ones
    before = len(proc.lines)
    os.killpg(proc.process.pid, signal.SIGINT)
    assert proc.process.wait(timeout=WAIT) == 0
    proc.kill()
    assert len(new_lines(proc, before)) == 1, proc.stderr
    assert "SIGINT: stopping 2 workers" in proc.lines[-1]


@needs_workers
@pytest.mark.parametrize("ctrl_c", [False, True], ids=["sigterm-to-supervisor", "sigint-to-group"])
def test_workers_drain_before_the_supervisor_kills_anything(spawn: Spawn, echo_server: EchoServer,
                                                            ctrl_c: bool) -> None:
    """SIGTERM to the supervisor, or Ctrl-C to the group, with --workers: an open connection can still
    finish during the drain (Ctrl-C reaching a worker directly must not count as a second signal)."""
    proc = spawn(MODULE + ["-L", f"0:127.0.0.1:{echo_server.port},name=echo", "--workers", "2",
                           "--drain-timeout", "20"])
    port = rule_port(proc, "echo")
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
        client.sendall(b"before")
        assert recv_exactly(client, 6) == b"before"
        if ctrl_c:
            os.killpg(proc.process.pid, signal.SIGINT)
        else:
            proc.process.send_signal(signal.SIGTERM)
        proc.wait_line(r"draining: not accepting; 1 connections open")
        time.sleep(0.2)  # past the kill the supervisor used to send at once
        client.sendall(b"after")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"after"
    assert proc.process.wait(timeout=WAIT) == 0, proc.stderr


@needs_workers
def test_sighup_with_workers_reloads_every_worker(spawn: Spawn, tagged_server, tmp_path: Path) -> None:
    """SIGHUP to the supervisor: it checks the config, then every worker reloads it."""
    old, new = tagged_server(b"old"), tagged_server(b"new")
    port = free_port()
    config = tmp_path / "fwd.toml"
    write_rules(config, [("web", port, old.port)])
    proc = spawn(MODULE + ["-c", str(config), "--workers", "2"])
    rule_port(proc, "web")
    write_rules(config, [("web", port, new.port)])
    proc.process.send_signal(signal.SIGHUP)
    for index in range(2):
        proc.wait_line(rf"w{index} reloaded: 0 added, 0 removed, 1 changed")
    assert {greeting(port, 3) for _ in range(20)} == {b"new"}
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr


def time_wait_on(port: int) -> bool:
    """Whether a TCP socket on local port ``port`` is in TIME_WAIT (state 06 in /proc/net/tcp)."""
    with open("/proc/net/tcp") as table:
        return any(fields[1].endswith(f":{port:04X}") and fields[3] == "06"
                   for fields in (line.split() for line in table.readlines()[1:]))


@needs_workers
def test_workers_start_on_a_port_with_connections_in_time_wait(spawn: Spawn, scripted_server) -> None:
    """Switching from one process to --workers on the same port right away works (SO_REUSEADDR)."""
    server = scripted_server(lambda conn: conn.sendall(b"bye"))  # the server closes first...
    port = free_port()
    single = spawn(MODULE + ["-L", f"{port}:127.0.0.1:{server.port},name=a"])
    rule_port(single, "a")
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
        assert recv_all(client) == b"bye"  # ...so the forwarder's side on `port` ends in TIME_WAIT
    wait_for(lambda: time_wait_on(port), what="a connection in TIME_WAIT on the port")
    assert single.stop(signal.SIGTERM) == 0, single.stderr
    workers = spawn(MODULE + ["-L", f"{port}:127.0.0.1:{server.port},name=a", "--workers", "2"])
    assert rule_port(workers, "a") == port, workers.stderr
    assert workers.stop(signal.SIGTERM) == 0, workers.stderr


def test_select_loop_refuses_to_start_with_a_listener_past_its_descriptor_limit(echo_server: EchoServer) -> None:
    """--loop select, started with 1024 descriptors in use: its listener could never be watched, so the
    start fails in one line, exit 1, instead of listening deaf."""
    if (raise_fd_limit(SELECT_LIMIT + 64) or 0) < SELECT_LIMIT + 64:
        pytest.skip(f"cannot open {SELECT_LIMIT + 64} descriptors here")
    with descriptors_taken(SELECT_LIMIT, spare=0):  # every descriptor below the limit, inherited
        result = subprocess.run(MODULE + ["-q", "--loop", "select", "-L", f"0:127.0.0.1:{echo_server.port}"],
                                pass_fds=range(3, SELECT_LIMIT), capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 1, result
    assert re.fullmatch(r"asyncore-fwd: select\(\) cannot watch descriptor \d+: its limit is 1023 "
                        r"\(poll and epoll have none\)\n", result.stderr), result.stderr
