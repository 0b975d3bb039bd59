"""The ``asyncore-fwd`` command: usage errors, run-time errors, and the running process.

Usage and run-time errors are checked in-process through ``cli.main``; the
entry points, logging and signal handling are checked on real child
processes, each wait bounded by ``WAIT``.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List, Sequence

import pytest

import asyncore_fwd
from asyncore_fwd import Rule, Service, cli
from asyncore_fwd.cli._run import serve
from conftest import WAIT, EchoServer, ForwarderProcess, free_port, recv_all, recv_exactly, wait_for

PROG = "asyncore-fwd"
CONSOLE_SCRIPT = Path(sys.executable).parent / PROG
MODULE = [sys.executable, "-m", "asyncore_fwd"]
#: Flags that make a valid command line, for tests that vary one of them.
VALID = ["-p", "0", "-r", "127.0.0.1", "-P", "1"]


# -- helpers --------------------------------------------------------------


@pytest.fixture(autouse=True)
def restore_logger() -> Iterator[None]:
    """``main()`` configures the package logger; undo it so other tests see the default."""
    logger = logging.getLogger("asyncore_fwd")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved


@pytest.fixture
def no_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail (instead of hanging) if ``main()`` gets as far as serving."""
    def serve_forever(self: asyncore_fwd.Forwarder, *args: object, **kwargs: object) -> None:
        self.close()
        pytest.fail("main() started serving instead of reporting an error")

    monkeypatch.setattr(asyncore_fwd.Forwarder, "serve_forever", serve_forever)


def usage_error(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``main(argv)``, expect a usage error; return its one stderr line."""
    with pytest.raises(SystemExit) as exited:
        cli.main(list(argv))
    out, err = capsys.readouterr()
    assert exited.value.code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{PROG}: error: ")
    assert lines[0].endswith("(see --help)")
    return lines[0]


def runtime_error(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``main(argv)``, expect a run-time error; return its one stderr line."""
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert status == 1
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{PROG}: ")
    return lines[0]


def console_script() -> List[str]:
    if not CONSOLE_SCRIPT.exists():
        pytest.skip(f"no {PROG} console script next to {sys.executable}")
    return [str(CONSOLE_SCRIPT)]


def check_one_verbose_connection(proc: ForwarderProcess, echo_server: EchoServer) -> None:
    """Send bytes through ``proc`` to the echo server, then check the ``-v`` lines for it."""
    port = proc.start_port()
    message = b"through the forwarder and back"
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
        client.sendall(message)
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == message
    conn_id = proc.wait_line(r"#(\d+) accepted from 127\.0\.0\.1:\d+$").group(1)
    proc.wait_line(rf"#{conn_id} connected to 127\.0\.0\.1:{echo_server.port} \(127\.0\.0\.1:{echo_server.port}\)$")
    proc.wait_line(rf" 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:{echo_server.port} {len(message)}/{len(message)} "
                   rf"[\d.]+ms [\d.]+s client closed first$")


# -- usage errors -----------------------------------------------------------


def test_non_numeric_port_is_a_usage_error_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A local port that is not a number is rejected, naming -p."""
    line = usage_error(["-p", "http", "-r", "127.0.0.1", "-P", "80"], capsys)
    assert "-p/--local-port" in line
    assert "'http'" in line


@pytest.mark.parametrize("argv, flag", [
    (["-p", "-1", "-r", "127.0.0.1", "-P", "80"], "-p/--local-port"),
    (["-p", "65536", "-r", "127.0.0.1", "-P", "80"], "-p/--local-port"),
    (["-p", "0", "-r", "127.0.0.1", "-P", "0"], "-P/--remote-port"),
    (["-p", "0", "-r", "127.0.0.1", "-P", "65536"], "-P/--remote-port"),
], ids=["local-minus-1", "local-65536", "remote-0", "remote-65536"])
def test_out_of_range_port_is_a_usage_error_naming_the_flag(argv: List[str], flag: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Ports outside 0-65535 (1-65535 for the remote) are rejected, naming the flag."""
    assert flag in usage_error(argv, capsys)


HUGE = "9" * 5000  # int() raises ValueError past 4300 digits; float() makes it inf
SHOWN = "'" + "9" * 39 + "...' (5000 characters)"


@pytest.mark.parametrize("flag, message", [
    ("-p", f"argument -p/--local-port: invalid port {SHOWN}: expected an integer from 0 to 65535"),
    ("-P", f"argument -P/--remote-port: invalid port {SHOWN}: expected an integer from 1 to 65535"),
    ("--backlog", f"argument --backlog: invalid backlog {SHOWN}: expected an integer from 0 to 65535"),
    ("--workers", f"argument --workers: invalid worker count {SHOWN}: expected an integer from 1 to 256"),
    ("--high-water", f"argument --high-water: invalid size {SHOWN}: expected a positive number of bytes, "
                     f"like 65536, 512K, 1M or 1G"),
    ("--connect-timeout", f"argument --connect-timeout: invalid time {SHOWN}: expected a positive number of "
                          f"seconds"),
    ("--metrics", f"argument --metrics: invalid address {SHOWN}: expected [HOST:]PORT, like 9100 or "
                  f"127.0.0.1:9100 ([::1]:9100 for IPv6)"),
])
def test_number_too_long_to_convert_is_a_bad_value_naming_the_flag(flag: str, message: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """5000 digits get the line any other bad number gets (not "invalid parse value"), cut short."""
    assert usage_error(VALID + [flag, HUGE], capsys) == f"{PROG}: error: {message} (see --help)"


def test_port_range_limits_are_accepted() -> None:
    """Local port 0 and remote port 65535 (the limits) are valid."""
    args = cli.build_parser().parse_args(["-p", "0", "-r", "127.0.0.1", "-P", "65535"])
    assert (args.local_port, args.remote_port) == (0, 65535)


@pytest.mark.parametrize("missing", ["-p/--local-port", "-r/--remote-ip", "-P/--remote-port"])
def test_missing_required_flag_is_a_usage_error_naming_it(missing: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Each of -p, -r and -P is required."""
    short = missing.split("/")[0]
    index = VALID.index(short)
    argv = VALID[:index] + VALID[index + 2:]
    line = usage_error(argv, capsys)
    assert "required" in line
    assert missing in line


def test_verbose_with_quiet_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """-v and -q are mutually exclusive."""
    line = usage_error(VALID + ["-v", "-q"], capsys)
    assert "-q/--quiet" in line
    assert "-v/--verbose" in line


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "abc"])
def test_bad_connect_timeout_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--connect-timeout must be a finite positive number."""
    line = usage_error(VALID + [f"--connect-timeout={value}"], capsys)
    assert "--connect-timeout" in line
    assert repr(value) in line


def test_fractional_connect_timeout_is_accepted() -> None:
    """--connect-timeout takes fractions of a second."""
    assert cli.build_parser().parse_args(VALID + ["--connect-timeout", "0.25"]).connect_timeout == 0.25


@pytest.mark.parametrize("value", ["-1", "many", "1.5"])
def test_bad_backlog_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--backlog must be an integer >= 0."""
    line = usage_error(VALID + [f"--backlog={value}"], capsys)
    assert "--backlog" in line
    assert repr(value) in line


@pytest.mark.parametrize("value", ["0", "-5", "1T", "1.5M", "K", "lots"])
def test_bad_high_water_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--high-water must be a positive byte count, optionally with K, M or G."""
    line = usage_error(VALID + [f"--high-water={value}"], capsys)
    assert "--high-water" in line
    assert repr(value) in line


@pytest.mark.parametrize("value, size", [("65536", 65536), ("512K", 512 * 1024), ("512k", 512 * 1024),
                                         ("1M", 1024 * 1024), ("1G", 1024 ** 3)])
def test_high_water_accepts_bytes_kibibytes_mebibytes_and_gibibytes(value: str, size: int) -> None:
    """--high-water reads 65536, 512K, 1M and 1G as byte counts."""
    assert cli.build_parser().parse_args(VALID + ["--high-water", value]).high_water == size


def test_local_ip_defaults_to_loopback() -> None:
    """Without -l the forwarder listens on 127.0.0.1 only."""
    assert cli.build_parser().parse_args(VALID).local_ip == "127.0.0.1"


def test_empty_remote_host_is_a_usage_error(capsys: pytest.CaptureFixture[str], no_serving: None) -> None:
    """-r '' is rejected as bad usage, naming -r."""
    assert "-r/--remote-ip" in usage_error(["-p", "0", "-r", "", "-P", "80"], capsys)


def test_empty_pidfile_is_a_usage_error() -> None:
    """--pidfile '' is rejected as bad usage, naming --pidfile (it used to be ignored)."""
    result = subprocess.run(MODULE + VALID + ["--pidfile", ""], capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"{PROG}: error: argument --pidfile: expected a file name, "
                                          f"not an empty string (see --help)"]


def test_huge_backlog_is_a_usage_error() -> None:
    """A backlog too large for listen() is rejected as bad usage, not a traceback."""
    result = subprocess.run(MODULE + VALID + ["--backlog", str(2 ** 40)],
                            capture_output=True, text=True, timeout=WAIT)
    assert "Traceback" not in result.stderr
    assert result.returncode == 2
    assert "--backlog" in result.stderr


# -- --version and --help -----------------------------------------------------


def test_version_prints_the_program_and_version_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints ``asyncore-fwd VERSION`` on stdout."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    out, err = capsys.readouterr()
    assert exited.value.code == 0
    assert out == f"{PROG} {asyncore_fwd.__version__}\n"
    assert err == ""


def help_text(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("flag", ["-l", "--local-ip", "-p", "--local-port", "-r", "--remote-ip",
                                  "-P", "--remote-port", "--backlog", "--connect-timeout", "--high-water",
                                  "-v", "--verbose", "-q", "--quiet", "--version", "-h", "--help",
                                  "-L", "--forward", "-c", "--config", "--check-config", "--drain-timeout",
                                  "--metrics", "--pidfile", "--log-format", "--workers", "--loop", "--splice"])
def test_help_mentions_each_flag(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--help lists every option, short and long."""
    assert re.search(rf"(?:^|[\s,\[]){re.escape(flag)}(?=[\s,\]]|$)", help_text(capsys), re.MULTILINE)


def test_help_lists_exit_codes_and_signals(capsys: pytest.CaptureFixture[str]) -> None:
    """--help ends with what each exit status and each signal means."""
    text = help_text(capsys)
    epilog = text[text.index("signals:"):]
    for signal_name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1"):
        assert re.search(rf"^  .*{signal_name}", epilog, re.MULTILINE), signal_name
    for status in ("0", "1", "2"):
        assert re.search(rf"^  {status}  \S", epilog[epilog.index("exit status:"):], re.MULTILINE), status


def test_remote_ip_help_describes_the_remote_not_the_local_address(capsys: pytest.CaptureFixture[str]) -> None:
    """-r's help is about the remote host, not the article's "Local IP address"."""
    (action,) = [a for a in cli.build_parser()._actions if "--remote-ip" in a.option_strings]
    assert action.option_strings == ["-r", "--remote-ip"]
    description = action.help.lower()
    assert "local ip address" not in description
    assert "remote" in description
    assert action.help in " ".join(help_text(capsys).split())


# -- run-time errors (in-process) -----------------------------------------------


def test_port_in_use_returns_1_with_one_line(capsys: pytest.CaptureFixture[str], no_serving: None) -> None:
    """A local port another socket listens on: exit 1, "in use", no traceback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        line = runtime_error(["-p", str(port), "-r", "127.0.0.1", "-P", "80"], capsys)
    assert "in use" in line.lower()
    assert str(port) in line


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["one-process", "workers"])
def test_forwarding_to_its_own_port_returns_1_with_one_line(
        workers: List[str], capsys: pytest.CaptureFixture[str], no_serving: None) -> None:
    """-r/-P naming the forwarder's own address: exit 1 before serving (or forking), one line."""
    port = str(free_port())
    line = runtime_error(["-p", port, "-r", "127.0.0.1", "-P", port, *workers], capsys)
    assert line.endswith(f"cannot forward to 127.0.0.1:{port}: that is this forwarder's own listening address")


def test_unknown_remote_host_returns_1_naming_it(capsys: pytest.CaptureFixture[str], no_serving: None) -> None:
    """A remote name that does not resolve: exit 1, the line names the host."""
    line = runtime_error(["-p", "0", "-r", "no-such-host.invalid", "-P", "80"], capsys)
    assert "no-such-host.invalid" in line


def test_malformed_remote_host_returns_1_naming_it(capsys: pytest.CaptureFixture[str], no_serving: None) -> None:
    """A remote name that cannot even be encoded for DNS: exit 1, the line names the host."""
    host = "a" * 64 + ".invalid"
    assert host in runtime_error(["-p", "0", "-r", host, "-P", "80"], capsys)


def test_unassignable_local_address_returns_1(capsys: pytest.CaptureFixture[str], no_serving: None) -> None:
    """A local address this host does not have (TEST-NET-1): exit 1, naming the address."""
    line = runtime_error(["-l", "192.0.2.1", "-p", "0", "-r", "127.0.0.1", "-P", "80"], capsys)
    assert "192.0.2.1" in line
    assert os.strerror(errno.EADDRNOTAVAIL).lower() in line.lower()


def low_port_is_privileged() -> bool:
    """Whether binding port 1 fails with EACCES for this process (it may not, with capabilities)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", 1))
        except PermissionError:
            return True
        except OSError:
            return False
    return False


@pytest.mark.skipif(os.geteuid() == 0, reason="root may bind ports below 1024")
def test_privileged_port_returns_1_permission_denied(capsys: pytest.CaptureFixture[str], no_serving: None) -> None:
    """Binding a port below 1024 without privileges: exit 1, "permission denied"."""
    if not low_port_is_privileged():
        pytest.skip("this system lets unprivileged processes bind port 1")
    line = runtime_error(["-p", "1", "-r", "127.0.0.1", "-P", "80"], capsys)
    assert "permission denied" in line.lower()


def test_an_error_in_a_signal_handler_is_logged_and_serving_goes_on(
        echo_server: EchoServer, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """A signal handler runs wherever the loop is: what it raises is logged, never raised into the loop.

    Here re-reading the rules on SIGHUP raises something no check foresaw; the
    service (served in this, the main thread) goes on forwarding.
    """
    args = cli.build_parser().parse_args(["-c", str(tmp_path / "fwd.toml")])
    rule = Rule("127.0.0.1", 0, "127.0.0.1", echo_server.port, name="echo")
    services: List[Service] = []
    seen: List[object] = []

    def reread() -> List[Rule]:
        raise RuntimeError("unforeseen")

    def signal_then_stop() -> None:
        try:
            wait_for(lambda: services, what="the service")
            os.kill(os.getpid(), signal.SIGHUP)
            wait_for(lambda: [r for r in caplog.records if "internal error" in r.getMessage()], what="the log line")
            with socket.create_connection(services[0].forwarders["echo"].address, timeout=WAIT) as client:
                client.sendall(b"ping")
                seen.append(recv_exactly(client, 4))
        except BaseException as error:  # reported by the main thread
            seen.append(error)
        finally:
            if services:
                services[0].stop()

    thread = threading.Thread(target=signal_then_stop, daemon=True)
    thread.start()
    assert serve(args, [rule], reread, attach=services.append) == 0
    thread.join(WAIT)
    assert seen == [b"ping"]
    (record,) = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert record.getMessage() == "SIGHUP: internal error; still serving" and record.exc_info is not None


# -- the running command (child processes) ----------------------------------------


def test_module_entry_point_forwards_logs_and_exits_0_on_sigint(
        spawn: Callable[..., ForwarderProcess], echo_server: EchoServer) -> None:
    """``python -m asyncore_fwd -v``: forwards, logs the connection, SIGINT exits 0."""
    proc = spawn(MODULE + ["-p", "0", "-r", "127.0.0.1", "-P", str(echo_server.port), "-v"])
    check_one_verbose_connection(proc, echo_server)
    status = proc.stop(signal.SIGINT)
    assert status == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def test_console_script_forwards_logs_and_exits_0_on_sigterm(
        spawn: Callable[..., ForwarderProcess], echo_server: EchoServer) -> None:
    """The ``asyncore-fwd`` script with -v: forwards, logs the connection, SIGTERM exits 0."""
    proc = spawn(console_script() + ["-p", "0", "-r", "127.0.0.1", "-P", str(echo_server.port), "-v"])
    check_one_verbose_connection(proc, echo_server)
    status = proc.stop(signal.SIGTERM)
    assert status == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def test_sigterm_with_an_open_connection_exits_0_and_ends_the_client(
        spawn: Callable[..., ForwarderProcess], echo_server: EchoServer) -> None:
    """SIGTERM while a client is connected: after the drain timeout, exit 0, and the client sees EOF or a reset."""
    proc = spawn(MODULE + ["-p", "0", "-r", "127.0.0.1", "-P", str(echo_server.port), "--drain-timeout", "0.2"])
    port = proc.start_port()
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"  # relayed: the connection is established
        status = proc.stop(signal.SIGTERM)
        assert status == 0, proc.stderr
        client.settimeout(WAIT)
        try:
            assert client.recv(1024) == b""
        except ConnectionResetError:
            pass
        except socket.timeout:
            pytest.fail(f"the client saw neither EOF nor a reset within {WAIT} s of the exit")
    assert "Traceback" not in proc.stderr


def test_quiet_logs_nothing_for_a_clean_run(spawn: Callable[..., ForwarderProcess],
                                            echo_server: EchoServer) -> None:
    """-q: a connection and a SIGTERM leave stderr empty."""
    port = free_port()
    proc = spawn(MODULE + ["-p", str(port), "-r", "127.0.0.1", "-P", str(echo_server.port), "-q"])

    def relayed() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
                client.sendall(b"quiet")
                client.shutdown(socket.SHUT_WR)
                return recv_all(client) == b"quiet"
        except ConnectionRefusedError:
            return proc.process.poll() is not None  # not listening yet, or died: stop if died
    wait_for(relayed, what="a connection through the quiet forwarder")
    status = proc.stop(signal.SIGTERM)
    assert status == 0, proc.stderr
    assert proc.stderr == ""


def test_help_runs_with_warnings_as_errors() -> None:
    """``python -W error -m asyncore_fwd --help`` exits 0 without any warning."""
    result = subprocess.run([sys.executable, "-W", "error", "-m", "asyncore_fwd", "--help"],
                            capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(f"usage: {PROG} ")


# -- --toxic ---------------------------------------------------------------------


def test_toxic_flag_delays_every_reply(spawn: Callable[..., ForwarderProcess], echo_server: EchoServer) -> None:
    """--toxic downstream:latency=200ms: each reply through the forwarder comes about 200 ms late."""
    proc = spawn(MODULE + ["-p", "0", "-r", "127.0.0.1", "-P", str(echo_server.port),
                           "--toxic", "downstream:latency=200ms"])
    with socket.create_connection(("127.0.0.1", proc.start_port()), timeout=WAIT) as client:
        started = time.monotonic()
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
        assert 0.19 <= time.monotonic() - started < 2.0
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--toxic", "latency=soon"], "argument --toxic: bad toxic 'latency=soon': seconds: expected a value like "
                                  "100ms or 1.5s, not 'soon' (see --help)"),
    (["--toxic", "upstream:poison"], "argument --toxic: bad toxic 'upstream:poison': unknown toxic 'poison' (one "
                                     "of latency, bandwidth, slicer, timeout, limit_data, reset_peer, slow_close) "
                                     "(see --help)"),
    (["--toxic", "latency=1", "--splice"], "--toxic needs the copy relay: with --splice the bytes never enter "
                                           "Python (see --help)"),
])
def test_bad_toxic_flags_are_usage_errors(argv: List[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = usage_error(["-p", "0", "-r", "127.0.0.1", "-P", "9", *argv], capsys)
    assert line == f"{cli.PROG}: error: {message}"
