"""UDP rules in operation: reload, drain, stats, SIGUSR1, metrics, -v, --workers, the command's errors."""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import sys
import threading
import time
import urllib.request
from typing import Callable, Iterator, List

import pytest
from udp_helpers import RunningUdp, UdpEcho, ask, client, free_udp_port, no_reply, udp_rule

from asyncore_fwd import Rule, Service, cli
from asyncore_fwd._listener._udp import DRAIN_QUIET
from asyncore_fwd._service._metrics import render_prometheus
from asyncore_fwd._service._reports import WorkerStats
from asyncore_fwd.cli._parser import PROG
from conftest import WAIT, EchoServer, ForwarderProcess, wait_for

MODULE = [sys.executable, "-m", "asyncore_fwd"]
Spawn = Callable[..., ForwarderProcess]


@pytest.fixture
def echoes() -> Iterator[List[UdpEcho]]:
    servers = [UdpEcho(), UdpEcho()]
    yield servers
    for server in servers:
        server.close()


@pytest.fixture
def running() -> Iterator[List[RunningUdp]]:
    services: List[RunningUdp] = []
    yield services
    for service in services:
        service.stop()


def reload(service: RunningUdp, rules: List[Rule]) -> None:
    service.service.reload(rules)
    wait_for(lambda: [fwd.rule for fwd in service.service.forwarders.values()] == rules, what="the reload")


# -- reload and drain -----------------------------------------------------------------------


def test_a_changed_target_serves_new_sessions_and_the_old_ones_keep_theirs(
        echoes: List[UdpEcho], running: List[RunningUdp]) -> None:
    """Same listen, new target: the socket is taken over, the open session is adopted and stays on
    the old target; a new client goes to the new one; the counters go on."""
    port = free_udp_port()
    old_rule = Rule("127.0.0.1", port, "127.0.0.1", echoes[0].port, name="u", proto="udp")
    service = RunningUdp([old_rule])
    running.append(service)
    with client() as before, client() as after:
        ask(before, ("127.0.0.1", port), b"old")
        reload(service, [Rule("127.0.0.1", port, "127.0.0.1", echoes[1].port, name="u", proto="udp")])
        assert ask(before, ("127.0.0.1", port), b"still old") == (b"still old", ("127.0.0.1", port))
        assert ask(after, ("127.0.0.1", port), b"new") == (b"new", ("127.0.0.1", port))
    assert (echoes[0].received, echoes[1].received) == (2, 1)
    wait_for(lambda: service.stats("u")["datagrams_to_client"] == 3, what="the last reply counted")
    assert (service.stats("u")["accepted"], service.stats("u")["active"]) == (2, 2)
    assert service.service.retiring == []  # the old listener handed its sessions over


def test_adopted_sessions_count_on_their_targets_in_the_reloaded_rule(
        echoes: List[UdpEcho], running: List[RunningUdp]) -> None:
    port = free_udp_port()

    def rule(**options: object) -> Rule:
        return Rule("127.0.0.1", port, "127.0.0.1", echoes[0].port, name="u", proto="udp",
                    targets=[("127.0.0.1", echoes[1].port)], balance="roundrobin", **options)

    service = RunningUdp([rule()])
    running.append(service)
    with client() as one, client() as two:
        ask(one, ("127.0.0.1", port), b"1")
        ask(two, ("127.0.0.1", port), b"2")
        reload(service, [rule(max_connections=10)])
        targets = service.service.target_stats()["u"]
        assert [counters["active"] for counters in targets.values()] == [1, 1]
        assert ask(one, ("127.0.0.1", port), b"still")[0] == b"still"
    assert [echo.received for echo in echoes] in ([2, 1], [1, 2])


def test_a_failed_reload_hands_the_sessions_back_without_counting_their_clients_twice(
        echoes: List[UdpEcho], running: List[RunningUdp], caplog: pytest.LogCaptureFixture) -> None:
    """The new rule adopts the sessions, then fails (its target is its own listener): given back, each
    session counts once for max_per_client, so the client's IP may still start its second one."""
    port = free_udp_port()
    service = RunningUdp([Rule("127.0.0.1", port, "127.0.0.1", echoes[0].port, name="r", proto="udp",
                               max_per_client=2)])
    running.append(service)
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    with client() as first, client() as second:
        ask(first, ("127.0.0.1", port), b"1")
        service.service.reload([Rule("127.0.0.1", port, "127.0.0.1", port, name="r", proto="udp", max_per_client=2)])
        wait_for(lambda: any(record.getMessage().startswith("reloaded") for record in caplog.records),
                 what="the reload")
        assert service.listener("r").rule.remote_port == echoes[0].port
        assert ask(second, ("127.0.0.1", port), b"2") == (b"2", ("127.0.0.1", port))
        assert service.stats("r")["dropped_limit"] == 0


def test_an_adopted_session_whose_old_target_refuses_ends_and_the_client_goes_on_with_the_new_target(
        echoes: List[UdpEcho], running: List[RunningUdp]) -> None:
    """Adopted on a target the reloaded rule no longer has, no reply yet: the ICMP error ends it (not a
    move to the new target's addresses under the old name); the client's next datagram starts one there."""
    port = free_udp_port()
    old_target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    old_target.bind(("127.0.0.1", 0))  # silent: no reply, and no ICMP error while it is open
    old_port = old_target.getsockname()[1]
    service = RunningUdp([Rule("127.0.0.1", port, "127.0.0.1", old_port, name="u", proto="udp")])
    running.append(service)
    with client() as sock:
        sock.sendto(b"1", ("127.0.0.1", port))
        wait_for(lambda: service.stats("u")["datagrams_to_server"] == 1, what="the session")
        reload(service, [Rule("127.0.0.1", port, "127.0.0.1", echoes[0].port, name="u", proto="udp")])
        # Connected elsewhere, it still holds its port (nobody else takes it) and takes no datagram: an ICMP error.
        old_target.connect(("127.0.0.1", 9))
        sock.sendto(b"2", ("127.0.0.1", port))
        wait_for(lambda: service.stats("u")["failed_connects"] == 1, what="the ICMP error")
        assert ask(sock, ("127.0.0.1", port), b"3")[0] == b"3"
    sessions = list(service.listener("u").sessions.values())
    assert [(session.target, session.server_address[1]) for session in sessions] == [
        (f"127.0.0.1:{echoes[0].port}", echoes[0].port)]
    assert service.stats("u")["accepted"] == 2
    old_target.close()


def test_a_reload_adds_and_removes_udp_rules(echoes: List[UdpEcho], running: List[RunningUdp]) -> None:
    """Removed: no new session, the open one served until it idles out.  Added: serving at once."""
    a_port = free_udp_port()
    service = RunningUdp([Rule("127.0.0.1", a_port, "127.0.0.1", echoes[0].port, name="a", proto="udp",
                               idle_timeout=1.0)])  # (once removed, its sessions end after DRAIN_QUIET, 1 s)
    running.append(service)
    a_address = ("127.0.0.1", a_port)
    with client() as old, client() as late, client() as new:
        ask(old, a_address, b"1")
        reload(service, [Rule("127.0.0.1", 0, "127.0.0.1", echoes[1].port, name="b", proto="udp")])
        assert service.address("b") != a_address  # (a's socket is still bound: its session is served)
        assert ask(new, service.address("b"), b"b") == (b"b", service.address("b"))
        assert ask(old, a_address, b"2")[0] == b"2"  # its session still served
        late.sendto(b"3", a_address)
        assert no_reply(late)
        wait_for(lambda: service.service.retiring == [], what="the removed rule's session to idle out")
        old.sendto(b"4", a_address)
        assert no_reply(old)


def test_a_new_rule_on_the_port_of_a_removed_one_with_sessions_listens_at_once(
        echoes: List[UdpEcho], running: List[RunningUdp]) -> None:
    """"a" on 0.0.0.0:P replaced by "b" on 127.0.0.1:P: a's listener, kept for its session, is closed
    (that session cut) so that b can bind; a client of a's is then b's."""
    port = free_udp_port()
    service = RunningUdp([Rule("0.0.0.0", port, "127.0.0.1", echoes[0].port, name="a", proto="udp")])
    running.append(service)
    with client() as old, client() as new:
        ask(old, ("127.0.0.1", port), b"a")
        reload(service, [Rule("127.0.0.1", port, "127.0.0.1", echoes[1].port, name="b", proto="udp")])
        assert service.service.retiring == []
        assert ask(new, ("127.0.0.1", port), b"b") == (b"b", ("127.0.0.1", port))
        assert ask(old, ("127.0.0.1", port), b"now b") == (b"now b", ("127.0.0.1", port))
    assert (echoes[0].received, echoes[1].received) == (1, 2)


def test_a_reload_from_udp_to_tcp_on_one_address_keeps_the_sessions_answered(
        echoes: List[UdpEcho], echo_server: EchoServer, running: List[RunningUdp]) -> None:
    port = free_udp_port()
    service = RunningUdp([Rule("127.0.0.1", port, "127.0.0.1", echoes[0].port, name="x", proto="udp")])
    running.append(service)
    with client() as sock:
        ask(sock, ("127.0.0.1", port), b"udp")
        reload(service, [Rule("127.0.0.1", port, "127.0.0.1", echo_server.port, name="x")])
        assert ask(sock, ("127.0.0.1", port), b"udp still")[0] == b"udp still"
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as tcp:
        tcp.sendall(b"tcp")
        assert tcp.recv(3) == b"tcp"


def test_renamed_tcp_and_udp_rules_on_one_address_each_keep_their_own_listener(
        echoes: List[UdpEcho], echo_server: EchoServer, running: List[RunningUdp]) -> None:
    """A reload matches a rule with the running one of the same proto on its address, not the other proto's."""
    port = free_udp_port()
    service = RunningUdp([Rule("127.0.0.1", port, "127.0.0.1", echoes[0].port, name="dns-udp", proto="udp"),
                          Rule("127.0.0.1", port, "127.0.0.1", echo_server.port, name="dns-tcp")])
    running.append(service)
    with client() as sock, client() as new:
        ask(sock, ("127.0.0.1", port), b"an open session")
        reload(service, [Rule("127.0.0.1", port, "127.0.0.1", echoes[0].port, name="dns2-udp", proto="udp"),
                         Rule("127.0.0.1", port, "127.0.0.1", echo_server.port, name="dns2-tcp")])
        assert {label: fwd.rule.proto for label, fwd in service.service.forwarders.items()} == {
            "dns2-udp": "udp", "dns2-tcp": "tcp"}
        assert ask(sock, ("127.0.0.1", port), b"adopted")[0] == b"adopted"
        assert ask(new, ("127.0.0.1", port), b"udp") == (b"udp", ("127.0.0.1", port))
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as tcp:
        tcp.sendall(b"tcp")
        assert tcp.recv(3) == b"tcp"


def test_a_drain_starts_no_session_and_ends_when_the_open_ones_idle_out(echoes: List[UdpEcho]) -> None:
    service = Service([udp_rule("u", echoes[0].port, idle_timeout=0.5)])
    address = service.forwarders["u"].address
    thread = threading.Thread(target=service.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    with client() as open_one, client() as new_one:
        ask(open_one, address, b"before")
        service.drain(WAIT)
        assert ask(open_one, address, b"during")[0] == b"during"
        new_one.sendto(b"new", address)
        assert no_reply(new_one)
        thread.join(WAIT)
        assert not thread.is_alive(), "the drain did not end once the session idled out"
    assert service.stats()["u"]["dropped_draining"] == 1


def test_a_drain_ends_a_session_once_it_is_quiet_for_a_second_not_at_its_idle_timeout(
        echoes: List[UdpEcho]) -> None:
    """A UDP session has no end of its own: with the default idle_timeout (60 s) a drain would
    wait its whole timeout.  Once draining, a session ends after DRAIN_QUIET without a datagram."""
    service = Service([udp_rule("u", echoes[0].port)])
    address = service.forwarders["u"].address
    thread = threading.Thread(target=service.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    with client() as sock:
        ask(sock, address, b"before")
        started = time.monotonic()
        service.drain(30.0)
        thread.join(WAIT)
        took = time.monotonic() - started
    assert not thread.is_alive(), "the drain waited for the idle timeout"
    assert DRAIN_QUIET <= took < DRAIN_QUIET + 3.0


# -- counters -------------------------------------------------------------------------------


def test_metrics_have_the_datagram_series_for_udp_rules_only(echoes: List[UdpEcho],
                                                             running: List[RunningUdp]) -> None:
    service = RunningUdp([udp_rule("dns", echoes[0].port, deny=["10.0.0.0/8"]),
                          Rule("127.0.0.1", 0, "127.0.0.1", 9, name="web")])
    running.append(service)
    with client() as sock:
        ask(sock, service.address("dns"), b"12345")
    text = render_prometheus(service.service)
    assert 'asyncore_fwd_datagrams_to_server_total{rule="dns"} 1' in text
    assert 'asyncore_fwd_datagrams_to_client_total{rule="dns"} 1' in text
    assert 'asyncore_fwd_datagrams_dropped_total{rule="dns",reason="acl"} 0' in text
    assert 'asyncore_fwd_connections_accepted_total{rule="dns"} 1' in text
    assert 'asyncore_fwd_bytes_to_client_total{rule="dns"} 5' in text
    assert 'rule="web"' in text and not re.search(r'datagrams\w*\{rule="web"', text)


def test_a_tcp_only_service_has_no_datagram_series() -> None:
    service = Service([Rule("127.0.0.1", 0, "127.0.0.1", 9, name="web")], map={})
    try:
        assert "datagram" not in render_prometheus(service)
        assert "datagrams_to_server" not in service.stats()["web"]
    finally:
        service.close()


def test_the_supervisor_sums_the_workers_datagram_counters() -> None:
    totals = WorkerStats(map={})
    try:
        for pid in (1, 2):
            report = {"pid": pid, "stats": {"dns": {"active": 1, "accepted": 2, "datagrams_to_server": 5,
                                                    "dropped_limit": pid}, "web": {"accepted": 1}}}
            totals.receive(json.dumps(report).encode())
        totals.worker_exited(1)
        dns = totals.stats()["dns"]
        assert (dns["datagrams_to_server"], dns["dropped_limit"], dns["active"]) == (10, 3, 1)
        assert "datagrams_to_server" not in totals.stats()["web"]
        assert 'asyncore_fwd_datagrams_dropped_total{rule="dns",reason="limit"} 3' in render_prometheus(totals)
    finally:
        totals.close()


# -- the command ----------------------------------------------------------------------------


def run(argv: List[str], capsys: pytest.CaptureFixture[str]) -> tuple:
    try:
        status = cli.main(argv)
    except SystemExit as exited:
        status = exited.code
    out, err = capsys.readouterr()
    return status, out, err


def test_check_config_shows_proto_and_the_udp_idle_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(["-L", "0:127.0.0.1:53,proto=udp,name=dns", "--check-config"], capsys)
    assert (status, err) == (0, "")
    assert " idle_timeout=60 " in out and " accept_proxy=none proto=udp source=none " in out


@pytest.mark.parametrize("setting, key", [
    ('send_proxy = "v1"', "send_proxy"), ('accept_proxy = ["10.0.0.1"]', "accept_proxy"),
    ("half_closed_timeout = 5", "half_closed_timeout"), ("tcp_keepalive = 30", "tcp_keepalive"),
    ("health_check_interval = 2", "health_check_interval")])
def test_a_key_that_means_nothing_for_udp_is_one_error_line_naming_it(
        setting: str, key: str, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "fwd.toml"
    config.write_text(f'[[rule]]\nlisten = "127.0.0.1:0"\nconnect = "127.0.0.1:53"\nproto = "udp"\n{setting}\n')
    status, out, err = run(["-c", str(config), "--check-config"], capsys)
    assert (status, out) == (2, "")
    assert err.startswith(f"{PROG}: error: {config}: rule 1: {key}: not for a UDP rule (proto=udp): ")
    assert err.count("\n") == 1, err


def test_a_key_that_means_nothing_for_udp_in_l_is_a_usage_error_naming_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(["-L", "0:127.0.0.1:53,proto=udp,send_proxy=v1", "--check-config"], capsys)
    assert (status, out) == (2, "")
    assert err.splitlines()[-1].startswith(f'{PROG}: error: -L "0:127.0.0.1:53,proto=udp,send_proxy=v1": '
                                           f"send_proxy: not for a UDP rule (proto=udp): ")


def test_splice_on_a_udp_rule_in_a_config_file_is_one_error_line(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "fwd.toml"
    config.write_text('[[rule]]\nlisten = "127.0.0.1:0"\nconnect = "127.0.0.1:53"\nproto = "udp"\n')
    status, out, err = run(["-c", str(config), "--splice", "--check-config"], capsys)
    assert (status, out) == (2, "")
    assert err == (f"{PROG}: error: {config}: rule 1: splice (--splice): not for a UDP rule (proto=udp): "
                   f"datagrams are relayed whole, not spliced\n")


def test_toxic_with_a_udp_rule_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(["-L", "0:127.0.0.1:53,proto=udp,name=dns", "--toxic", "latency=10ms", "--check-config"],
                           capsys)
    assert (status, out) == (2, "")
    assert err == (f"{PROG}: error: --toxic: toxics act on TCP connections, not on a UDP rule's datagrams "
                   f"(proto=udp: dns)\n")


def test_a_bad_proto_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(["-L", "0:127.0.0.1:53,proto=sctp", "--check-config"], capsys)
    assert status == 2 and 'proto: expected "tcp" or "udp", got "sctp"' in err


def test_a_tcp_and_a_udp_rule_may_listen_on_one_port(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(["-L", "5353:127.0.0.1:53", "-L", "5353:127.0.0.1:53,proto=udp", "--check-config"],
                           capsys)
    assert (status, err) == (0, "")
    assert [line.split()[0] for line in out.splitlines()] == ["name=127.0.0.1:5353", "name=127.0.0.1:5353/udp"]


def test_without_max_connections_a_udp_flood_leaves_descriptors_for_a_tcp_rule(
        spawn: Spawn, echoes: List[UdpEcho], echo_server: EchoServer) -> None:
    """A descriptor limit of 160: the UDP rule's sessions stop at the default cap, half of it, and a TCP
    rule still accepts and relays during the flood from 200 source ports."""
    limited = ("import resource, runpy, sys; hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
               "resource.setrlimit(resource.RLIMIT_NOFILE, (160, hard)); sys.argv[0] = 'asyncore_fwd'; "
               "runpy.run_module('asyncore_fwd', run_name='__main__')")
    proc = spawn([sys.executable, "-c", limited, "-L", f"0:127.0.0.1:{echoes[0].port},proto=udp,name=u",
                  "-L", f"0:127.0.0.1:{echo_server.port},name=t"])
    udp_port = int(proc.wait_line(r"u: forwarding \S+:(\d+) to ").group(1))
    tcp_port = int(proc.wait_line(r"t: forwarding \S+:(\d+) to ").group(1))
    flood = [client() for _ in range(200)]
    try:
        for sock in flood:
            sock.sendto(b"flood", ("127.0.0.1", udp_port))
        wait_for(lambda: proc.process.send_signal(signal.SIGUSR1) or
                 any(re.search(r"u: active=80 accepted=80 .* dropped_limit=120 ", line) for line in proc.lines),
                 what="a stats line with 80 sessions and 120 datagrams dropped at the cap")
        with socket.create_connection(("127.0.0.1", tcp_port), timeout=WAIT) as tcp:
            tcp.sendall(b"tcp still served")
            assert tcp.recv(100) == b"tcp still served"
    finally:
        for sock in flood:
            sock.close()
    assert "dropped_resources=0" in [line for line in proc.lines if "u: active=" in line][-1]
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr


def test_sigusr1_and_v_log_a_udp_rules_sessions_and_counters(spawn: Spawn, echoes: List[UdpEcho]) -> None:
    proc = spawn(MODULE + ["-v", "-L", f"0:127.0.0.1:{echoes[0].port},proto=udp,name=dns,idle_timeout=0.3"])
    port = int(proc.wait_line(r"dns: forwarding \S+:(\d+) to ").group(1))
    with client() as sock:
        assert ask(sock, ("127.0.0.1", port), b"12345")[0] == b"12345"
    proc.wait_line(r"#\d+ udp session from 127\.0\.0\.1:\d+ to 127\.0\.0\.1:\d+")
    proc.wait_line(r"dns 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:\d+ udp 5/5 bytes 1/1 datagrams \S+s ended: idle")
    wait_for(lambda: proc.process.send_signal(signal.SIGUSR1) or
             any(re.search(r"dns: active=0 accepted=1 .*bytes_to_server=5 bytes_to_client=5 "
                           r"datagrams_to_server=1 datagrams_to_client=1 dropped_acl=0", line)
                 for line in proc.lines), what="a stats line counting the session")
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr


def test_sighup_changes_a_udp_rules_target_for_new_sessions_only(spawn: Spawn, echoes: List[UdpEcho],
                                                                  tmp_path) -> None:
    port = free_udp_port()
    config = tmp_path / "fwd.toml"

    def write(target: int) -> None:
        config.write_text(f'[[rule]]\nname = "dns"\nlisten = "127.0.0.1:{port}"\n'
                          f'connect = "127.0.0.1:{target}"\nproto = "udp"\n')

    write(echoes[0].port)
    proc = spawn(MODULE + ["--drain-timeout", "0.5", "-c", str(config)])
    proc.wait_line(r"dns: forwarding ")
    with client() as old, client() as new:
        ask(old, ("127.0.0.1", port), b"before")
        write(echoes[1].port)
        proc.process.send_signal(signal.SIGHUP)
        proc.wait_line(r"reloaded: 0 added, 0 removed, 1 changed, 0 unchanged, 0 failed")
        assert ask(old, ("127.0.0.1", port), b"after") == (b"after", ("127.0.0.1", port))
        assert ask(new, ("127.0.0.1", port), b"new") == (b"new", ("127.0.0.1", port))
    assert (echoes[0].received, echoes[1].received) == (2, 1)
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr
    assert "drain timeout: cut 2 connections" in proc.stderr  # the sessions, open until then


def test_a_sessions_end_is_a_json_close_event_with_its_datagrams(spawn: Spawn, echoes: List[UdpEcho]) -> None:
    proc = spawn(MODULE + ["-v", "--log-format", "json",
                           "-L", f"0:127.0.0.1:{echoes[0].port},proto=udp,name=dns,idle_timeout=0.2"])
    port = int(proc.wait_line(r'"message": "dns: forwarding \S+:(\d+) to ').group(1))
    with client() as sock:
        ask(sock, ("127.0.0.1", port), b"abc")
    line = proc.wait_line(r'"event": "close"').string
    event = json.loads(line)
    assert {key: event[key] for key in ("rule", "proto", "target", "bytes_to_server", "bytes_to_client",
                                        "datagrams_to_server", "datagrams_to_client", "reason")} == {
        "rule": "dns", "proto": "udp", "target": f"127.0.0.1:{echoes[0].port}", "bytes_to_server": 3,
        "bytes_to_client": 3, "datagrams_to_server": 1, "datagrams_to_client": 1, "reason": "idle"}
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr


def test_workers_serve_a_udp_rule_and_the_metrics_sum_it(spawn: Spawn, echoes: List[UdpEcho]) -> None:
    port, metrics = free_udp_port(), free_udp_port()
    proc = spawn(MODULE + ["--workers", "2", "--drain-timeout", "0.5", "--metrics", f"127.0.0.1:{metrics}",
                           "-L", f"{port}:127.0.0.1:{echoes[0].port},proto=udp,name=dns"])
    proc.wait_line(r"w0 dns: forwarding ")
    proc.wait_line(r"w1 dns: forwarding ")
    socks = [client() for _ in range(8)]
    try:
        for sock in socks:
            assert ask(sock, ("127.0.0.1", port), b"hi")[0] == b"hi"
    finally:
        for sock in socks:
            sock.close()

    def scraped() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=WAIT) as response:
            return response.read().decode()

    wait_for(lambda: 'asyncore_fwd_datagrams_to_server_total{rule="dns"} 8' in scraped(),
             what="the workers' datagrams summed")
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr
