"""source and tcp_keepalive: the options of the sockets a rule makes, seen from the other end or read back.

The server records the address each connection came from (what ``source``
changes); keepalive is read back with getsockopt() from the forwarder's own
two sockets of a live connection, found through ``Forwarder.connections``.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, List, Tuple

import pytest

from asyncore_fwd import Forwarder, Rule, Service, cli
from asyncore_fwd._values._config import ConfigError, describe_rule, load_config, parse_forward_spec
from conftest import (
    WAIT,
    EchoServer,
    ForwarderProcess,
    ScriptedServer,
    connect_until_reset,
    dead_port,
    free_port,
    needs_ipv6,
    open_fds,
    recv_all,
    recv_exactly,
    unless_taken,
    wait_for,
)

MODULE = [sys.executable, "-m", "asyncore_fwd"]
#: An address of TEST-NET-1 (RFC 5737): on no machine's interfaces.
NOT_HERE = "192.0.2.1"
HAS_KEEPIDLE = hasattr(socket, "TCP_KEEPIDLE")


def can_bind(ip: str) -> bool:
    try:
        with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((ip, 0))
        return True
    except OSError:
        return False


#: Linux answers for the whole of 127/8; other systems only for 127.0.0.1.
needs_second_loopback = pytest.mark.skipif(not can_bind("127.0.0.2"), reason="127.0.0.2 is not on this machine")
needs_address_not_here = pytest.mark.skipif(can_bind(NOT_HERE), reason=f"{NOT_HERE} is on this machine")


class PeerRecording:
    """A server's handler that notes the address each connection came from, then echoes until the end."""

    def __init__(self) -> None:
        self.peers: List[str] = []
        self._lock = threading.Lock()

    def __call__(self, conn: socket.socket) -> None:
        try:
            peer = conn.getpeername()[0]
        except OSError:
            return  # a health check's connect, reset before it was looked at
        with self._lock:
            self.peers.append(peer)
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)
        except ConnectionResetError:
            return  # a pair still open when its forwarder stopped is cut with resets


@pytest.fixture
def peer_server(scripted_server: Callable[..., ScriptedServer]) -> Callable[..., Tuple[ScriptedServer, PeerRecording]]:
    """``peer_server(host)``: a server on ``host`` and what it records."""
    def start(host: str = "127.0.0.1") -> Tuple[ScriptedServer, PeerRecording]:
        recording = PeerRecording()
        return scripted_server(recording, host), recording

    return start


def echo_once(address: Tuple[str, int], message: bytes = b"hello") -> None:
    with socket.create_connection(address, timeout=WAIT) as client:
        client.sendall(message)
        assert recv_exactly(client, len(message)) == message


def keepalive_of(sock: socket.socket) -> Tuple[int, int]:
    """(SO_KEEPALIVE, TCP_KEEPIDLE) of ``sock``, the idle time 0 where the platform has no TCP_KEEPIDLE."""
    on = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    idle = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) if HAS_KEEPIDLE else 0
    return (1 if on else 0), idle


@pytest.fixture
def live_connection(echo_server: EchoServer, splice: bool) -> Iterator[Callable[..., Any]]:
    """``live_connection(**options)``: a forwarder with ``options`` and one established connection
    through it, as the forwarder's ``Connection``."""
    clients: List[socket.socket] = []
    blocks: List[Any] = []

    def start(**options: Any) -> Any:
        fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={}, splice=splice, **options)
        block = fwd.running()
        block.__enter__()
        blocks.append(block)
        client = socket.create_connection(fwd.address, timeout=WAIT)
        clients.append(client)
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
        [conn] = list(fwd.connections)
        return conn

    yield start
    for client in clients:
        client.close()
    for block in blocks:
        block.__exit__(None, None, None)


def run_cli(argv: List[str], capsys: pytest.CaptureFixture[str]) -> Tuple[Any, str, str]:
    try:
        status = cli.main(argv)
    except SystemExit as exited:  # (argparse exits for a bad -L)
        status = exited.code
    out, err = capsys.readouterr()
    return status, out, err


# -- source: where the server sees the connects come from ---------------------------------------


@needs_second_loopback
def test_the_server_sees_connects_from_the_source_address(peer_server, splice: bool) -> None:
    server, recording = peer_server("127.0.0.1")
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", server.port, map={}, splice=splice, source="127.0.0.2")
    with fwd.running():
        echo_once(fwd.address)
        echo_once(fwd.address)
    assert recording.peers == ["127.0.0.2", "127.0.0.2"]


def test_without_a_source_the_kernel_chooses_the_address(peer_server) -> None:
    server, recording = peer_server("127.0.0.1")
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", server.port, map={})
    with fwd.running():
        echo_once(fwd.address)
    assert recording.peers == ["127.0.0.1"]


@needs_ipv6
def test_an_ipv6_source_connects_to_an_ipv6_target(peer_server) -> None:
    server, recording = peer_server("::1")
    fwd = Forwarder("127.0.0.1", 0, "::1", server.port, map={}, source="[::1]")
    assert fwd.rule.source == "::1"
    with fwd.running():
        echo_once(fwd.address)
    assert recording.peers == ["::1"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="IP_BIND_ADDRESS_NO_PORT is Linux's")
@pytest.mark.parametrize("source", ["127.0.0.1", pytest.param("::1", marks=needs_ipv6)])
def test_a_source_bind_leaves_the_port_to_the_connect(source: str, echo_server: EchoServer) -> None:
    """Ports are then shared by connects to different servers, not taken one per connect."""
    from asyncore_fwd._net import bind_source

    with socket.socket(socket.AF_INET6 if ":" in source else socket.AF_INET, socket.SOCK_STREAM) as sock:
        bind_source(sock, source)
        assert sock.getsockname()[:2] == (source, 0)
        if ":" not in source:
            sock.connect(("127.0.0.1", echo_server.port))
            assert sock.getsockname()[0] == source and sock.getsockname()[1] != 0


@pytest.mark.parametrize("source, target", [("127.0.0.1", "::1"), ("::1", "127.0.0.1")],
                         ids=["ipv4-source-ipv6-target", "ipv6-source-ipv4-target"])
def test_a_source_of_another_family_than_the_target_is_a_value_error(source: str, target: str) -> None:
    with pytest.raises(ValueError, match=rf"source {source} is IPv. but the target {target} is IPv."):
        Rule("127.0.0.1", 0, target, 80, source=source)
    with pytest.raises(ValueError, match="but the target"):
        Forwarder("127.0.0.1", 0, target, 80, map={}, source=source)


@pytest.mark.parametrize("value", ["localhost", "example.org", "", "127.0.0.1:80", "10.0.0.0/8", 1, b"::1"])
def test_a_source_that_is_not_an_ip_address_is_a_value_error(value: object) -> None:
    with pytest.raises(ValueError, match="source must be an IP address .a host name is not accepted."):
        Rule("127.0.0.1", 0, "127.0.0.1", 80, source=value)  # type: ignore[arg-type]


def test_the_family_check_takes_every_target_host() -> None:
    from asyncore_fwd._values._rules import check_source_family

    check_source_family("127.0.0.2", ["127.0.0.1", "example.org", "10.1.2.3"])
    with pytest.raises(ValueError, match="the target 2001:db8::1 is IPv6"):
        check_source_family("127.0.0.2", ["127.0.0.1", "example.org", "[2001:db8::1]"])


def test_a_source_of_another_family_than_a_later_target_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="source 127.0.0.1 is IPv4 but the target ::1 is IPv6"):
        Rule("127.0.0.1", 0, "127.0.0.1", 80, targets=[("::1", 80)], source="127.0.0.1")


@pytest.fixture
def fake_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """``both.test`` resolves to ::1 then 127.0.0.1, ``six.test`` to ::1 only; other names as usual."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list:
        if host not in ("both.test", "six.test"):
            return real(host, port, *args, **kwargs)
        infos = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", int(port), 0, 0))]
        if host == "both.test":
            infos.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", int(port))))
        return infos

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@needs_second_loopback
def test_a_hostname_target_is_connected_to_at_its_addresses_of_the_source_s_family_only(
        peer_server, fake_names: None) -> None:
    server, recording = peer_server("127.0.0.1")
    fwd = Forwarder("127.0.0.1", 0, "both.test", server.port, map={}, source="127.0.0.2")
    assert fwd.remote_addresses() == [(socket.AF_INET, ("127.0.0.1", server.port))]
    with fwd.running():
        echo_once(fwd.address)
    assert recording.peers == ["127.0.0.2"]


@needs_second_loopback
def test_every_target_is_connected_to_from_the_source_at_its_addresses_of_that_family(
        peer_server, fake_names: None) -> None:
    """Several targets: the later ones are looked up for the source's family too, and connected from it."""
    server, recording = peer_server("127.0.0.1")
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", dead_port(), map={}, source="127.0.0.2",
                    targets=[("both.test", server.port)])
    assert fwd.targets is not None
    assert fwd.targets[1].addresses.current() == [(socket.AF_INET, ("127.0.0.1", server.port))]
    with fwd.running():
        echo_once(fwd.address)
    assert recording.peers == ["127.0.0.2"]


def test_a_later_hostname_target_without_an_address_of_the_source_s_family_fails_the_start(
        fake_names: None, sock_map: dict) -> None:
    before = open_fds()
    with pytest.raises(OSError, match="remote host 'six.test' has no IPv4 address"):
        Forwarder("127.0.0.1", 0, "127.0.0.1", 80, map=sock_map, source="127.0.0.1", targets=[("six.test", 80)])
    assert (open_fds(), sock_map) == (before, {})


def test_a_hostname_target_without_an_address_of_the_source_s_family_fails_the_start(
        fake_names: None, sock_map: dict) -> None:
    before = open_fds()
    with pytest.raises(OSError, match="remote host 'six.test' has no IPv4 address, and the source address is IPv4"):
        Forwarder("127.0.0.1", 0, "six.test", 80, map=sock_map, source="127.0.0.1")
    assert (open_fds(), sock_map) == (before, {})


def test_a_hostname_target_without_an_address_of_the_source_s_family_is_one_line_and_exit_1(
        fake_names: None, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_cli(["-L", "0:six.test:80,source=127.0.0.1", "--check-config"], capsys)
    assert (status, out) == (1, "")
    assert err == "asyncore-fwd: remote host 'six.test' has no IPv4 address, and the source address is IPv4\n"


@needs_address_not_here
def test_a_source_address_not_on_this_machine_fails_the_start(sock_map: dict) -> None:
    before = open_fds()
    with pytest.raises(OSError, match=f"cannot bind to source address {NOT_HERE}: ") as raised:
        Forwarder("127.0.0.1", 0, "127.0.0.1", 80, map=sock_map, source=NOT_HERE)
    assert raised.value.errno == errno.EADDRNOTAVAIL
    assert (open_fds(), sock_map) == (before, {})


@needs_address_not_here
@pytest.mark.parametrize("check", [False, True], ids=["run", "check-config"])
def test_a_source_address_not_on_this_machine_is_one_line_and_exit_1(check: bool) -> None:
    """As a port in use is (a process: a start that did not fail would serve until stopped)."""
    done = subprocess.run(MODULE + ["-L", f"0:127.0.0.1:80,source={NOT_HERE}"] + (["--check-config"] if check else []),
                          capture_output=True, text=True, timeout=WAIT)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"asyncore-fwd: cannot bind to source address {NOT_HERE}: "), done.stderr


@needs_address_not_here
def test_a_source_address_gone_since_the_start_resets_the_client_with_a_line_naming_it(
        echo_server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    """The address left the machine after the start: each connect's bind fails, as a failed connect."""
    caplog.set_level(logging.WARNING, logger="asyncore_fwd")
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={}, source="127.0.0.1")
    fwd.rule = dataclasses.replace(fwd.rule, source=NOT_HERE)  # what the connects now find
    with fwd.running():
        assert connect_until_reset(fwd.address) == b""
        wait_for(lambda: not fwd.connections, what="the pair to close")
    [line] = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert f"cannot connect to 127.0.0.1:{echo_server.port}: cannot bind to source address {NOT_HERE}: " in line
    assert fwd.stats.snapshot(fwd.connections)["failed_connects"] == 1


# -- source and the loop-back guard ----------------------------------------------------------------


def test_a_source_does_not_hide_a_remote_that_is_this_very_listener(sock_map: dict) -> None:
    def forwarder_to_itself() -> Forwarder:
        port = free_port()
        return Forwarder("127.0.0.1", port, "127.0.0.1", port, map=sock_map, source="127.0.0.1")

    with pytest.raises(OSError, match="own listening address"):
        unless_taken(forwarder_to_itself)


@pytest.mark.parametrize("source", ["127.0.0.1", pytest.param("127.0.0.2", marks=needs_second_loopback)])
def test_with_a_source_an_address_that_leads_back_is_still_skipped_for_the_next(
        source: str, echo_server: EchoServer) -> None:
    """The guard knows our connects by their own end, which the source now sets."""
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={}, source=source)
    fwd._remote._addresses = [(socket.AF_INET, ("127.0.0.1", fwd.address[1])),
                              (socket.AF_INET, ("127.0.0.1", echo_server.port))]
    with fwd.running():
        echo_once(fwd.address)
        wait_for(lambda: not fwd.loopback.turned_back, what="the connect that led back to be reset")
        assert fwd.stats.accepted == 1  # the connect that came back was not forwarded again
        assert fwd.loopback.own_ends == {}


# -- tcp_keepalive: read back from both sockets of a live connection -----------------------------------


def test_tcp_keepalive_turns_keepalive_on_for_both_sockets(live_connection) -> None:
    conn = live_connection(tcp_keepalive=7)
    expected = (1, 7 if HAS_KEEPIDLE else 0)
    assert (keepalive_of(conn.receiver.socket), keepalive_of(conn.sender.socket)) == (expected, expected)


def test_without_tcp_keepalive_both_sockets_keep_it_off(live_connection) -> None:
    conn = live_connection()
    assert keepalive_of(conn.receiver.socket)[0] == keepalive_of(conn.sender.socket)[0] == 0


@pytest.mark.skipif(not HAS_KEEPIDLE, reason="no TCP_KEEPIDLE: the idle time is the system's")
def test_a_fractional_tcp_keepalive_is_rounded_up_to_whole_seconds(live_connection) -> None:
    conn = live_connection(tcp_keepalive=1.2)
    assert conn.rule.tcp_keepalive == 2
    assert keepalive_of(conn.receiver.socket) == keepalive_of(conn.sender.socket) == (1, 2)


@pytest.mark.parametrize("value, rounded", [(0, 0), (0.0, 0), (1, 1), (0.001, 1), (59.5, 60), (32767, 32767)])
def test_tcp_keepalive_values_are_whole_seconds(value: float, rounded: int) -> None:
    assert Rule("127.0.0.1", 0, "127.0.0.1", 80, tcp_keepalive=value).tcp_keepalive == rounded


@pytest.mark.parametrize("value", [-1, -0.5, 32768, float("inf"), float("nan"), "5", True, None])
def test_a_bad_tcp_keepalive_is_a_value_error(value: object) -> None:
    with pytest.raises(ValueError, match="tcp_keepalive must be a number of seconds from 0 to 32767"):
        Rule("127.0.0.1", 0, "127.0.0.1", 80, tcp_keepalive=value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tcp_keepalive must be"):
        Forwarder("127.0.0.1", 0, "127.0.0.1", 80, map={}, tcp_keepalive=value)


# -- the keys: -L, the config file, --check-config --------------------------------------------------


def test_the_keys_in_a_forward_spec() -> None:
    rule = parse_forward_spec("0:127.0.0.1:80,source=127.0.0.2,tcp_keepalive=30")
    assert (rule.source, rule.tcp_keepalive) == ("127.0.0.2", 30)
    rule = parse_forward_spec("0:[::1]:80,source=[::1],tcp_keepalive=0.5")
    assert (rule.source, rule.tcp_keepalive) == ("::1", 1)
    rule = parse_forward_spec("0:127.0.0.1:80")
    assert (rule.source, rule.tcp_keepalive) == (None, 0)


def test_a_rule_s_none_unsets_the_defaults_source(tmp_path: Path) -> None:
    config = tmp_path / "fwd.toml"
    config.write_text('[defaults]\nsource = "127.0.0.2"\ntcp_keepalive = 60\n'
                      '[[rule]]\nname = "a"\nlisten = "127.0.0.1:0"\nconnect = "127.0.0.1:80"\n'
                      '[[rule]]\nname = "b"\nlisten = "127.0.0.1:0"\nconnect = "127.0.0.1:80"\nsource = "none"\n'
                      'tcp_keepalive = 0\n')
    assert [(rule.source, rule.tcp_keepalive) for rule in load_config(str(config))] == [("127.0.0.2", 60), (None, 0)]


BAD_VALUES = [
    ("source=example.org", 'source: expected an IP address, like 192.0.2.7 or ::1 (a host name is not accepted), '
                           'got "example.org"'),
    ("source=::1", "source ::1 is IPv6 but the target 127.0.0.1 is IPv4: a connect needs both of one family"),
    ("tcp_keepalive=-1", 'tcp_keepalive: expected a number of seconds from 0 to 32767, got "-1"'),
    ("tcp_keepalive=soon", 'tcp_keepalive: expected a number of seconds from 0 to 32767, got "soon"'),
]


@pytest.mark.parametrize("option, line", BAD_VALUES, ids=["hostname", "family", "negative", "not-a-number"])
def test_a_bad_value_after_l_is_one_line_and_exit_2(option: str, line: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_cli(["-L", f"0:127.0.0.1:80,{option}", "--check-config"], capsys)
    assert (status, out) == (2, "")
    assert err.count("\n") == 1 and line in err, err
    with pytest.raises(ConfigError):
        parse_forward_spec(f"0:127.0.0.1:80,{option}")


@pytest.mark.parametrize("option, line", BAD_VALUES, ids=["hostname", "family", "negative", "not-a-number"])
@pytest.mark.parametrize("check", [False, True], ids=["run", "check-config"])
def test_a_bad_value_in_a_config_file_is_one_line_and_exit_2(
        option: str, line: str, check: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    key, value = option.split("=")
    toml_value = value if value.lstrip("-").isdigit() else f'"{value}"'
    Path("fwd.toml").write_text(f'[[rule]]\nlisten = "127.0.0.1:0"\nconnect = "127.0.0.1:80"\n{key} = {toml_value}\n')
    status, out, err = run_cli(["-c", "fwd.toml"] + (["--check-config"] if check else []), capsys)
    assert (status, out) == (2, "")
    expected = line.replace('got "-1"', "got -1")  # (a TOML number, not text)
    assert err == f"asyncore-fwd: error: fwd.toml: rule 1: {expected}\n"


def test_check_config_shows_source_and_tcp_keepalive(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_cli(["-L", "0:127.0.0.1:80,name=a,source=127.0.0.1,tcp_keepalive=2.5",
                                "-L", "0:127.0.0.1:80,name=b", "--check-config"], capsys)
    assert (status, err) == (0, "")
    assert [line.split()[-2:] for line in out.splitlines()] == [["source=127.0.0.1", "tcp_keepalive=3"],
                                                                ["source=none", "tcp_keepalive=0"]]
    assert describe_rule(parse_forward_spec("0:[::1]:80,source=::1")).endswith(" source=::1 tcp_keepalive=0")


# -- a reload applies to new connections only --------------------------------------------------------


@pytest.fixture
def service_on(peer_server) -> Iterator[Callable[..., Any]]:
    """``service_on(**options)``: a served ``Service`` with one rule "r" to a peer server, and the server's
    record of peers."""
    started: List[Tuple[Service, threading.Thread]] = []

    def start(**options: Any) -> Tuple[Service, ScriptedServer, PeerRecording, int]:
        server, recording = peer_server("127.0.0.1")
        port = free_port()
        service = unless_taken(lambda: Service([Rule("127.0.0.1", port, "127.0.0.1", server.port, name="r",
                                                     **options)], map={}))
        thread = threading.Thread(target=service.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        started.append((service, thread))
        return service, server, recording, port

    yield start
    for service, thread in started:
        service.stop()
        thread.join(WAIT)


@needs_second_loopback
def test_a_reload_connects_new_connections_from_the_new_source(service_on) -> None:
    service, server, recording, port = service_on()
    fwd = service.forwarders["r"]
    address = fwd.address
    with socket.create_connection(address, timeout=WAIT) as old:
        old.sendall(b"old")
        assert recv_exactly(old, 3) == b"old"
        [old_conn] = list(fwd.connections)
        service.reload([Rule("127.0.0.1", port, "127.0.0.1", server.port, name="r", source="127.0.0.2")])
        wait_for(lambda: service.forwarders["r"].rule.source == "127.0.0.2", what="the reload")
        echo_once(address)
        old.sendall(b"still")
        assert recv_exactly(old, 5) == b"still"
        assert old_conn.sender.socket.getsockname()[0] == "127.0.0.1"  # still open, from its old address
    assert recording.peers == ["127.0.0.1", "127.0.0.2"]


def test_a_reload_turns_keepalive_on_for_new_connections_only(service_on) -> None:
    service, server, _, port = service_on()
    fwd = service.forwarders["r"]
    with socket.create_connection(fwd.address, timeout=WAIT) as old:
        old.sendall(b"old")
        assert recv_exactly(old, 3) == b"old"
        [old_conn] = list(fwd.connections)
        service.reload([Rule("127.0.0.1", port, "127.0.0.1", server.port, name="r", tcp_keepalive=9)])
        wait_for(lambda: service.forwarders["r"].rule.tcp_keepalive == 9, what="the reload")
        with socket.create_connection(fwd.address, timeout=WAIT) as new:
            new.sendall(b"new")
            assert recv_exactly(new, 3) == b"new"
            [new_conn] = [conn for conn in service.forwarders["r"].connections if conn is not old_conn]
            assert keepalive_of(new_conn.receiver.socket)[0] == keepalive_of(new_conn.sender.socket)[0] == 1
        assert keepalive_of(old_conn.receiver.socket)[0] == keepalive_of(old_conn.sender.socket)[0] == 0


@needs_address_not_here
def test_a_reload_to_a_source_not_on_this_machine_keeps_the_old_rule(
        service_on, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    service, server, recording, port = service_on()
    old = service.forwarders["r"]
    service.reload([Rule("127.0.0.1", port, "127.0.0.1", server.port, name="r", source=NOT_HERE)])
    wait_for(lambda: any("reloaded:" in record.getMessage() for record in caplog.records), what="the reload")
    assert service.forwarders["r"] is old
    [line] = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert line.startswith(f"r: cannot start: cannot bind to source address {NOT_HERE}: "), line
    echo_once(old.address)  # still listening, with its old settings
    assert recording.peers == ["127.0.0.1"]


@needs_second_loopback
def test_sighup_changes_the_source_for_new_connections(
        peer_server, spawn: Callable[..., ForwarderProcess], tmp_path: Path) -> None:
    server, recording = peer_server("127.0.0.1")
    port = free_port()
    config = tmp_path / "fwd.toml"
    rule = f'[[rule]]\nname = "r"\nlisten = "127.0.0.1:{port}"\nconnect = "127.0.0.1:{server.port}"\n'
    config.write_text(rule + 'source = "127.0.0.1"\n')
    proc = spawn(MODULE + ["-c", str(config)])
    proc.wait_line(r"r: forwarding ")
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as old:
        old.sendall(b"old")
        assert recv_exactly(old, 3) == b"old"
        config.write_text(rule + 'source = "127.0.0.2"\ntcp_keepalive = 30\n')
        proc.process.send_signal(signal.SIGHUP)
        proc.wait_line(r"reloaded: 0 added, 0 removed, 1 changed")
        echo_once(("127.0.0.1", port))
        old.shutdown(socket.SHUT_WR)
        assert recv_all(old) == b""
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr
    assert recording.peers == ["127.0.0.1", "127.0.0.2"]


@needs_second_loopback
def test_health_checks_connect_from_the_source_address(peer_server) -> None:
    """The active checks come from where the clients' connects come from (the same firewall rules)."""
    first, first_peers = peer_server("127.0.0.1")
    second, second_peers = peer_server("127.0.0.1")
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", first.port, map={}, source="127.0.0.2",
                    targets=[("127.0.0.1", second.port)], health_check_interval=0.05)
    with fwd.running():
        wait_for(lambda: first_peers.peers and second_peers.peers, what="a check of each target")
    assert set(first_peers.peers + second_peers.peers) == {"127.0.0.2"}
