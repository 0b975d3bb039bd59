"""send_proxy: a PROXY protocol header (v1 or v2) is the first thing the server receives.

The servers here record every byte they receive; the expected headers are
written out by hand from HAProxy's spec, not made by the code under test.
"""

from __future__ import annotations

import logging
import signal
import socket
import struct
import sys
import threading
from pathlib import Path
from typing import Callable, List, Tuple

import pytest

from asyncore_fwd import Forwarder, Rule, Service, cli
from asyncore_fwd._ops._proxy import proxy_header
from asyncore_fwd._values._config import ConfigError, describe_rule, load_config, parse_forward_spec
from conftest import (
    WAIT,
    ForwarderProcess,
    ScriptedServer,
    free_port,
    needs_dual_stack,
    needs_ipv6,
    recv_all,
    unless_taken,
    wait_for,
)

SIGNATURE = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
MODULE = [sys.executable, "-m", "asyncore_fwd"]


class Recording:
    """A server's handler that reads each connection to its EOF and keeps what it received,
    in the order of accept (``received``)."""

    def __init__(self) -> None:
        self.received: List[bytes] = []
        self._lock = threading.Lock()

    def __call__(self, conn: socket.socket) -> None:
        with self._lock:
            index = len(self.received)
            self.received.append(b"")
        while True:
            data = conn.recv(65536)
            if not data:
                return
            with self._lock:
                self.received[index] += data


#: A scripted server with ``received``: what each connection sent, in the order of accept.
RecordingServer = ScriptedServer


@pytest.fixture
def recording_server(scripted_server: Callable[..., ScriptedServer]) -> Callable[..., RecordingServer]:
    """``recording_server(host)``: a ``RecordingServer``, closed (and its errors raised) by ``scripted_server``."""
    def start(host: str = "127.0.0.1") -> RecordingServer:
        recording = Recording()
        server = scripted_server(recording, host)
        server.received = recording.received  # type: ignore[attr-defined]
        return server

    return start


def v1(family: str, source: Tuple[str, int], destination: Tuple[str, int]) -> bytes:
    return f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def v2(source: Tuple[str, int], destination: Tuple[str, int]) -> bytes:
    family = socket.AF_INET6 if ":" in source[0] else socket.AF_INET
    addresses = socket.inet_pton(family, source[0]) + socket.inet_pton(family, destination[0])
    family_byte, length = (b"\x21", b"\x00\x24") if family == socket.AF_INET6 else (b"\x11", b"\x00\x0c")
    return SIGNATURE + b"\x21" + family_byte + length + addresses + struct.pack("!HH", source[1], destination[1])


# -- the header's bytes -------------------------------------------------------------------------


@pytest.mark.parametrize("version, source, destination, header", [
    ("v1", ("192.168.0.1", 56324), ("192.168.0.11", 443), b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"),
    ("v1", ("2001:db8::1", 65535, 0, 0), ("2001:db8::a:b", 1, 0, 0),
     b"PROXY TCP6 2001:db8::1 2001:db8::a:b 65535 1\r\n"),
    ("v1", ("::ffff:10.0.0.1", 1234, 0, 0), ("::ffff:10.0.0.2", 80, 0, 0), b"PROXY TCP4 10.0.0.1 10.0.0.2 1234 80\r\n"),
    ("v2", ("192.168.0.1", 56324), ("192.168.0.11", 443),
     SIGNATURE + bytes.fromhex("2111000c c0a80001 c0a8000b dc04 01bb")),
    ("v2", ("2001:db8::1", 65535, 0, 0), ("2001:db8::a:b", 1, 0, 0),
     SIGNATURE + bytes.fromhex("21210024 20010db8000000000000000000000001 20010db80000000000000000000a000b"
                               " ffff 0001")),
    ("v2", ("::ffff:10.0.0.1", 1234, 0, 0), ("::ffff:10.0.0.2", 80, 0, 0),
     SIGNATURE + bytes.fromhex("2111000c 0a000001 0a000002 04d2 0050")),
], ids=["v1-ipv4", "v1-ipv6", "v1-mapped", "v2-ipv4", "v2-ipv6", "v2-mapped"])
def test_header_bytes_follow_the_spec(version: str, source: tuple, destination: tuple, header: bytes) -> None:
    assert proxy_header(version, source, destination) == header


def test_a_header_of_another_version_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="'v3'"):
        proxy_header("v3", ("127.0.0.1", 1), ("127.0.0.1", 2))


# -- what the server receives -----------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=needs_ipv6)], ids=["ipv4", "ipv6"])
def test_the_server_receives_the_header_then_the_client_s_bytes(
        recording_server: Callable[..., RecordingServer], splice: bool, version: str, host: str) -> None:
    """The client sends at once, before the server connect is done: its bytes still come after the header."""
    server = recording_server(host)
    fwd = Forwarder(host, 0, host, server.port, map={}, splice=splice, send_proxy=version)
    with fwd.running():
        with socket.create_connection(fwd.address, timeout=WAIT) as client:
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")
            client.shutdown(socket.SHUT_WR)
            source = client.getsockname()[:2]
            assert recv_all(client) == b""
        wait_for(lambda: not fwd.connections, what="the pair to close")
    expected = v1("TCP6" if ":" in host else "TCP4", source, fwd.address) if version == "v1" else \
        v2(source, fwd.address)
    assert server.received == [expected + b"GET / HTTP/1.0\r\n\r\n"]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_header_longer_than_the_high_water_mark_is_sent_whole(
        recording_server: Callable[..., RecordingServer], splice: bool, version: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """With splice, the kernel pipe holds only high_water: the header still goes, then the client's bytes."""
    caplog.set_level(logging.WARNING, logger="asyncore_fwd")
    server = recording_server()
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", server.port, map={}, splice=splice, send_proxy=version,
                    high_water=1)
    with fwd.running():
        with socket.create_connection(fwd.address, timeout=WAIT) as client:
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")
            client.shutdown(socket.SHUT_WR)
            source = client.getsockname()[:2]
            assert recv_all(client) == b""
        wait_for(lambda: not fwd.connections, what="the pair to close")
    expected = v1("TCP4", source, fwd.address) if version == "v1" else v2(source, fwd.address)
    assert server.received == [expected + b"GET / HTTP/1.0\r\n\r\n"]
    assert [record.getMessage() for record in caplog.records] == []


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_client_that_sends_nothing_still_gets_its_header_sent(
        recording_server: Callable[..., RecordingServer], splice: bool, version: str) -> None:
    server = recording_server()
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", server.port, map={}, splice=splice, send_proxy=version)
    with fwd.running():
        with socket.create_connection(fwd.address, timeout=WAIT) as client:
            source = client.getsockname()[:2]
            wait_for(lambda: server.received and server.received[0], what="the header")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b""
    expected = v1("TCP4", source, fwd.address) if version == "v1" else v2(source, fwd.address)
    assert server.received == [expected]


@needs_dual_stack
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_an_ipv4_client_of_a_dual_stack_listener_is_sent_as_tcp4(
        recording_server: Callable[..., RecordingServer], version: str) -> None:
    """The listener sees ::ffff:127.0.0.1; the server is told 127.0.0.1, as TCP4."""
    server = recording_server()
    fwd = Forwarder("::", 0, "127.0.0.1", server.port, map={}, send_proxy=version)
    with fwd.running():
        with socket.create_connection(("127.0.0.1", fwd.address[1]), timeout=WAIT) as client:
            client.sendall(b"hello")
            client.shutdown(socket.SHUT_WR)
            source = client.getsockname()[:2]
            assert recv_all(client) == b""
    destination = ("127.0.0.1", fwd.address[1])
    expected = v1("TCP4", source, destination) if version == "v1" else v2(source, destination)
    assert server.received == [expected + b"hello"]


def test_a_rule_without_send_proxy_has_no_header_observer(recording_server) -> None:
    server = recording_server()
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", server.port, map={})
    try:
        assert [type(obs).__name__ for obs in fwd.observers] == ["RuleStats"]
    finally:
        fwd.close()


# -- the values: Rule, -L, the config file, --check-config -----------------------------------------


@pytest.mark.parametrize("value", ["v3", "V1", "", 1, True])
def test_rule_and_forwarder_refuse_another_value(value: object) -> None:
    with pytest.raises(ValueError, match="send_proxy must be 'v1', 'v2' or None"):
        Rule("127.0.0.1", 0, "127.0.0.1", 80, send_proxy=value)
    with pytest.raises(ValueError, match="send_proxy must be"):
        Forwarder("127.0.0.1", 0, "127.0.0.1", 80, map={}, send_proxy=value)


def test_the_key_in_a_forward_spec_and_a_config_file(tmp_path: Path) -> None:
    assert parse_forward_spec("0:127.0.0.1:80,send_proxy=v1").send_proxy == "v1"
    assert parse_forward_spec("0:127.0.0.1:80").send_proxy is None
    config = tmp_path / "fwd.toml"
    config.write_text('[defaults]\nsend_proxy = "v2"\n'
                      '[[rule]]\nname = "a"\nlisten = "127.0.0.1:0"\nconnect = "127.0.0.1:80"\n'
                      '[[rule]]\nname = "b"\nlisten = "127.0.0.1:0"\nconnect = "127.0.0.1:80"\nsend_proxy = "none"\n')
    assert [rule.send_proxy for rule in load_config(str(config))] == ["v2", None]


@pytest.mark.parametrize("argv, line", [
    (["-L", "0:127.0.0.1:80,send_proxy=v3"], 'send_proxy: expected "v1", "v2" or "none", got "v3"'),
    (["-c", "fwd.toml"], 'fwd.toml: rule 1: send_proxy: expected "v1", "v2" or "none", got "v3"'),
], ids=["forward-flag", "config-file"])
def test_another_value_is_one_error_line_and_exit_2(
        argv: List[str], line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    Path("fwd.toml").write_text('[[rule]]\nlisten = "127.0.0.1:0"\nconnect = "127.0.0.1:80"\nsend_proxy = "v3"\n')
    try:
        status = cli.main(argv + ["--check-config"])
    except SystemExit as exited:  # (argparse exits for a bad -L)
        status = exited.code
    out, err = capsys.readouterr()
    assert (status, out) == (2, "")
    assert err.count("\n") == 1 and line in err, err
    with pytest.raises(ConfigError, match="send_proxy"):
        parse_forward_spec("0:127.0.0.1:80,send_proxy=v3")


def test_check_config_shows_send_proxy(capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["-L", "0:127.0.0.1:80,name=a,send_proxy=v2", "-L", "0:127.0.0.1:80,name=b", "--check-config"])
    out, err = capsys.readouterr()
    assert (status, err) == (0, "")
    shown = [[item for item in line.split() if item.startswith("send_proxy=")] for line in out.splitlines()]
    assert shown == [["send_proxy=v2"], ["send_proxy=none"]]
    assert " send_proxy=v1" in describe_rule(parse_forward_spec("0:127.0.0.1:80,send_proxy=v1"))


# -- a reload applies to new connections only ------------------------------------------------------------


def test_a_reload_sends_the_header_on_new_connections_only(recording_server) -> None:
    server = recording_server()
    port = free_port()
    service = unless_taken(lambda: Service([Rule("127.0.0.1", port, "127.0.0.1", server.port, name="r")], map={}))
    thread = threading.Thread(target=service.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        address = service.forwarders["r"].address
        with socket.create_connection(address, timeout=WAIT) as old:
            old.sendall(b"before")
            wait_for(lambda: server.received == [b"before"], what="the old connection's bytes")
            service.reload([Rule("127.0.0.1", port, "127.0.0.1", server.port, name="r", send_proxy="v1")])
            wait_for(lambda: service.forwarders["r"].rule.send_proxy == "v1", what="the reload")
            with socket.create_connection(address, timeout=WAIT) as new:
                new.sendall(b"new")
                new.shutdown(socket.SHUT_WR)
                source = new.getsockname()[:2]
                assert recv_all(new) == b""
            old.sendall(b" and after")
            old.shutdown(socket.SHUT_WR)
            assert recv_all(old) == b""
    finally:
        service.stop()
        thread.join(WAIT)
    assert server.received == [b"before and after", v1("TCP4", source, address) + b"new"]


def test_sighup_turns_send_proxy_on_for_new_connections(
        recording_server, spawn: Callable[..., ForwarderProcess], tmp_path: Path) -> None:
    server = recording_server()
    port = free_port()
    config = tmp_path / "fwd.toml"
    rule = f'[[rule]]\nname = "r"\nlisten = "127.0.0.1:{port}"\nconnect = "127.0.0.1:{server.port}"\n'
    config.write_text(rule)
    proc = spawn(MODULE + ["-c", str(config)])
    proc.wait_line(r"r: forwarding ")
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as old:
        old.sendall(b"old")
        wait_for(lambda: server.received == [b"old"], what="the old connection's bytes")
        config.write_text(rule + 'send_proxy = "v2"\n')
        proc.process.send_signal(signal.SIGHUP)
        proc.wait_line(r"reloaded: 0 added, 0 removed, 1 changed")
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as new:
            new.sendall(b"new")
            new.shutdown(socket.SHUT_WR)
            source = new.getsockname()[:2]
            assert recv_all(new) == b""
        old.shutdown(socket.SHUT_WR)
        assert recv_all(old) == b""
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr
    assert server.received == [b"old", v2(source, ("127.0.0.1", port)) + b"new"]
