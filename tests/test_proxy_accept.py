"""accept_proxy: a trusted front balancer's PROXY header (v1 or v2) names the client.

The headers here are written out by hand from HAProxy's spec, not made by
the code under test.  The forwarder listens on loopback; the balancer is the
test's own socket, which sends the header the way a balancer would.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_proxy_send import SIGNATURE, Recording

from asyncore_fwd import Forwarder, Rule, Service, cli
from asyncore_fwd._ops import _access
from asyncore_fwd._ops._proxy_accept import (
    V1_MAX_LENGTH,
    ProxyHeaderError,
    ReceivedHeader,
    header_bytes_wanted,
    parse_proxy_header,
)
from asyncore_fwd._values._config import describe_rule, parse_forward_spec
from conftest import (
    WAIT,
    EchoServer,
    ForwarderProcess,
    ScriptedServer,
    connect_until_reset,
    free_port,
    needs_dual_stack,
    needs_ipv6,
    payload,
    recv_all,
    recv_exactly,
    unless_taken,
    wait_for,
)

V1_TCP4 = b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::1 2001:db8::a:b 65535 1\r\n"
V1_UNKNOWN = b"PROXY UNKNOWN 192.0.2.1 198.51.100.1 56324 443\r\n"
V2_TCP4 = SIGNATURE + bytes.fromhex("2111000c c0a80001 c0a8000b dc04 01bb")
V2_TCP6 = SIGNATURE + bytes.fromhex("21210024 20010db8000000000000000000000001 20010db80000000000000000000a000b"
                                    " ffff 0001")
V2_LOCAL = SIGNATURE + bytes.fromhex("2000 0000")
#: TCP4 with two TLVs: PP2_TYPE_AUTHORITY "example.org" and PP2_TYPE_NOOP of 3 bytes.
V2_TLVS = SIGNATURE + bytes.fromhex("2111 0020 c0a80001 c0a8000b dc04 01bb") + b"\x02\x00\x0bexample.org" + \
    b"\x04\x00\x03abc"


def v2(version_command: int, family: int, body: bytes) -> bytes:
    return SIGNATURE + struct.pack("!BBH", version_command, family, len(body)) + body


# -- the parser ------------------------------------------------------------------------------------


@pytest.mark.parametrize("header, source, destination", [
    (V1_TCP4, ("192.0.2.1", 56324), ("198.51.100.1", 443)),
    (V1_TCP6, ("2001:db8::1", 65535, 0, 0), ("2001:db8::a:b", 1, 0, 0)),
    (V1_UNKNOWN, None, None),
    (b"PROXY UNKNOWN\r\n", None, None),
    (V2_TCP4, ("192.168.0.1", 56324), ("192.168.0.11", 443)),
    (V2_TCP6, ("2001:db8::1", 65535, 0, 0), ("2001:db8::a:b", 1, 0, 0)),
    (V2_LOCAL, None, None),
    (V2_TLVS, ("192.168.0.1", 56324), ("192.168.0.11", 443)),
    (v2(0x20, 0x11, bytes(12)), None, None),  # LOCAL with addresses: they are not the client's
    (v2(0x21, 0x12, bytes(12)), None, None),  # UDP over IPv4: not TCP, the balancer's address is kept
    (v2(0x21, 0x31, bytes(216)), None, None),  # AF_UNIX
    (v2(0x21, 0x00, b""), None, None),  # AF_UNSPEC
], ids=["v1-tcp4", "v1-tcp6", "v1-unknown", "v1-unknown-bare", "v2-tcp4", "v2-tcp6", "v2-local", "v2-tlvs",
        "v2-local-with-addresses", "v2-udp", "v2-unix", "v2-unspec"])
def test_a_whole_header_names_the_client_or_keeps_the_balancer(
        header: bytes, source: Optional[tuple], destination: Optional[tuple]) -> None:
    parsed = parse_proxy_header(header + b"the client's bytes")
    assert parsed == ReceivedHeader(1 if header.startswith(b"PROXY") else 2, len(header), source, destination)


@pytest.mark.parametrize("header", [V1_TCP4, V2_TLVS], ids=["v1", "v2"])
def test_every_beginning_of_a_header_asks_for_more(header: bytes) -> None:
    for end in range(len(header)):
        assert parse_proxy_header(header[:end]) is None


@pytest.mark.parametrize("data, error", [
    (b"GET / HTTP/1.1\r\n", "not a PROXY header"),
    (b"\r\n\r\nGET", "not a PROXY header"),
    (b"PROXY TCP4 " + b"1" * 200, "longer than 107 bytes"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\n", "not printable"),
    (b"PROXY TCP4 192.0.2.1\x00", "not printable"),
    (b"PROXY TCP5 192.0.2.1 198.51.100.1 56324 443\r\n", "not of the form"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.1 56324\r\n", "not of the form"),
    (b"PROXY TCP4  192.0.2.1 198.51.100.1 56324 443\r\n", "not of the form"),
    (b"PROXY TCP4 2001:db8::1 198.51.100.1 56324 443\r\n", "bad TCP4 address"),
    (b"PROXY TCP6 fe80::1%eth0 2001:db8::1 56324 443\r\n", "bad TCP6 address"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.1 65536 443\r\n", "bad port"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.1 -1 443\r\n", "bad port"),
    (v2(0x11, 0x11, bytes(12)), "of version 1"),
    (SIGNATURE + b"\x31", "of version 3"),  # known at its 13th byte
    (v2(0x22, 0x11, bytes(12)), "command 2"),
    (v2(0x21, 0x11, bytes(8)), "too short for its addresses"),
    (v2(0x21, 0x21, bytes(12)), "too short for its addresses"),
    (v2(0x21, 0x11, bytes(12) + b"\x02\x00"), "truncated TLV"),
    (v2(0x21, 0x11, bytes(12) + b"\x02\x00\x05abc"), "TLV longer than the header"),
    (SIGNATURE + b"\x21\x11\x08\x01", "more than the 2064 taken"),
], ids=["http", "v2-signature-wrong", "v1-too-long", "v1-lf-only", "v1-nul", "v1-family", "v1-fields",
        "v1-spaces", "v1-ipv6-as-tcp4", "v1-scope", "v1-port", "v1-negative-port", "v2-version", "v2-version-early",
        "v2-command",
        "v2-short-ipv4", "v2-short-ipv6", "v2-tlv-cut", "v2-tlv-long", "v2-too-long"])
def test_what_cannot_be_a_header_is_an_error(data: bytes, error: str) -> None:
    with pytest.raises(ProxyHeaderError, match=error):
        parse_proxy_header(data)


@st.composite
def headers(draw: st.DrawFn) -> Tuple[bytes, ReceivedHeader]:
    """A valid header of either version and family, with its parse written out by hand."""
    family = draw(st.sampled_from([4, 6]))
    ip = st.ip_addresses(v=family)
    hosts, ports = [draw(ip), draw(ip)], [draw(st.integers(0, 65535)), draw(st.integers(0, 65535))]
    tail = (0, 0) if family == 6 else ()
    source, destination = (str(hosts[0]), ports[0]) + tail, (str(hosts[1]), ports[1]) + tail
    if draw(st.booleans()):
        header = f"PROXY TCP{family} {hosts[0]} {hosts[1]} {ports[0]} {ports[1]}\r\n".encode()
        return header, ReceivedHeader(1, len(header), source, destination)
    tlvs = b"".join(bytes([kind]) + struct.pack("!H", len(value)) + value
                    for kind, value in draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)),
                                                     max_size=5)))
    body = hosts[0].packed + hosts[1].packed + struct.pack("!HH", *ports) + tlvs
    header = v2(0x21, 0x11 if family == 4 else 0x21, body)
    return header, ReceivedHeader(2, len(header), source, destination)


@given(case=headers(), rest=st.binary(max_size=64), cut=st.integers(0, 200))
def test_any_valid_header_is_read_whole_and_none_of_its_beginnings_is(
        case: Tuple[bytes, ReceivedHeader], rest: bytes, cut: int) -> None:
    header, parsed = case
    assert parse_proxy_header(header + rest) == parsed
    assert parse_proxy_header(header[:min(cut, len(header) - 1)]) is None


@given(case=headers(), rest=st.binary(min_size=1, max_size=3000))
def test_reads_of_the_bytes_wanted_take_a_v2_header_exactly_and_a_v1_header_with_a_few_bytes_after(
        case: Tuple[bytes, ReceivedHeader], rest: bytes) -> None:
    """What is read past the header goes to the server ahead of the relay: it stays small."""
    header, parsed = case
    stream, read = header + rest, b""
    while parse_proxy_header(read) is None:
        read += stream[len(read):len(read) + header_bytes_wanted(read)]
    past = len(read) - len(header)
    assert past == 0 if parsed.version == 2 else 0 <= past <= V1_MAX_LENGTH - len(header)


@given(data=st.one_of(st.binary(max_size=300), st.builds(bytes.__add__, st.sampled_from([SIGNATURE, b"PROXY "]),
                                                         st.binary(max_size=300))))
def test_any_bytes_are_a_header_more_wanted_or_a_header_error(data: bytes) -> None:
    """Never another exception: what a hostile balancer sends cannot raise out of the step."""
    try:
        parsed = parse_proxy_header(data)
    except ProxyHeaderError:
        return
    assert parsed is None or parsed.length <= len(data)


# -- through a forwarder ---------------------------------------------------------------------------


def close_records(caplog: pytest.LogCaptureFixture) -> list:
    return [record for record in caplog.records if getattr(record, "event", None) == "close"]


def refusals(caplog: pytest.LogCaptureFixture) -> list:
    return [record for record in caplog.records if getattr(record, "event", None) == "refused"]


def round_trip(address: Tuple[str, int], header: bytes, data: bytes) -> Tuple[bytes, Tuple[str, int]]:
    """Send ``header`` and ``data`` in one write, then EOF; return what came back, and the balancer's address."""
    with socket.create_connection(address, timeout=WAIT) as balancer:
        sender = threading.Thread(target=lambda: (balancer.sendall(header + data), balancer.shutdown(socket.SHUT_WR)))
        sender.start()
        echoed = recv_all(balancer)
        sender.join(WAIT)
        return echoed, balancer.getsockname()[:2]


@pytest.mark.parametrize("header, client", [
    (V1_TCP4, "192.0.2.1:56324"),
    (V1_TCP6, "[2001:db8::1]:65535"),
    (V1_UNKNOWN, None),
    (V2_TCP4, "192.168.0.1:56324"),
    pytest.param(V2_TCP6, "[2001:db8::1]:65535", marks=needs_ipv6),
    (V2_LOCAL, None),
    (V2_TLVS, "192.168.0.1:56324"),
], ids=["v1-tcp4", "v1-tcp6", "v1-unknown", "v2-tcp4", "v2-tcp6-on-ipv6", "v2-local", "v2-tlvs"])
def test_the_header_is_taken_and_every_byte_after_it_goes_both_ways(
        echo_server: EchoServer, splice: bool, caplog: pytest.LogCaptureFixture, header: bytes,
        client: Optional[str]) -> None:
    """The bytes after the header (in the same segment) reach the server, and its answer the client,
    byte for byte; the close line names the header's client (the balancer for LOCAL and UNKNOWN)."""
    caplog.set_level(logging.DEBUG, logger="asyncore_fwd")
    host = "::1" if header == V2_TCP6 else "127.0.0.1"
    fwd = Forwarder(host, 0, "127.0.0.1", echo_server.port, map={}, splice=splice,
                    accept_proxy=["127.0.0.0/8", "::1"])
    data = payload(1 << 20)
    with fwd.running():
        echoed, balancer = round_trip(fwd.address, header, data)
        wait_for(lambda: close_records(caplog), what="the close line")
    assert echoed == data
    (record,) = close_records(caplog)
    named = client or (f"[{balancer[0]}]:{balancer[1]}" if ":" in balancer[0] else f"{balancer[0]}:{balancer[1]}")
    assert record.details["client"] == named and f" {named} -> " in record.getMessage()
    assert record.details.get("proxied_by") == (None if client is None else
                                                f"[{balancer[0]}]:{balancer[1]}" if ":" in balancer[0]
                                                else f"{balancer[0]}:{balancer[1]}")
    assert fwd.stats.snapshot(fwd.connections)["bytes_to_server"] == len(data)


@pytest.mark.parametrize("header", [V1_TCP4, V2_TLVS], ids=["v1", "v2"])
def test_a_header_sent_byte_by_byte_is_read_before_the_server_connect(
        echo_server: EchoServer, splice: bool, header: bytes) -> None:
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={}, splice=splice,
                    accept_proxy=["127.0.0.1"])
    with fwd.running():
        with socket.create_connection(fwd.address, timeout=WAIT) as balancer:
            balancer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for byte in header[:-1]:
                balancer.send(bytes([byte]))
                time.sleep(0.002)
            wait_for(lambda: fwd.connections, what="the balancer to be accepted")
            time.sleep(0.05)
            assert echo_server.accepted == 0  # no connect before the whole header
            balancer.sendall(header[-1:])
            balancer.sendall(b"after the header")
            assert recv_exactly(balancer, 16) == b"after the header"
    assert echo_server.accepted == 1


def test_a_client_outside_accept_proxy_is_reset_and_never_reaches_the_server(
        echo_server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={}, accept_proxy=["192.0.2.0/24"])
    with fwd.running():
        assert connect_until_reset(fwd.address) == b""
        wait_for(lambda: refusals(caplog), what="the refusal line")
    (record,) = refusals(caplog)
    assert record.details["reason"] == "accept_proxy" and record.details["client"].startswith("127.0.0.1:")
    assert fwd.stats.refused_acl == 1 and fwd.stats.accepted == 0
    assert echo_server.accepted == 0


def send_then(data: bytes, then: str) -> Callable[[socket.socket], None]:
    def act(balancer: socket.socket) -> None:
        balancer.sendall(data)
        if then == "close":
            balancer.shutdown(socket.SHUT_WR)
    return act


@pytest.mark.parametrize("data, then, reason", [
    (b"", "wait", "no PROXY header within 0.3 s"),
    (b"GET / HTTP/1.0\r\n\r\n", "wait", "bad PROXY header: not a PROXY header"),
    (b"PROXY TCP4 " + b"9" * 120, "wait", "bad PROXY header: v1 header longer than 107 bytes"),
    (V2_TCP4[:20], "close", "PROXY header cut short: the client closed"),
    (b"", "close", "no PROXY header: the client closed"),
], ids=["missing", "garbage", "too-long", "truncated", "closed-at-once"])
def test_a_bad_header_resets_the_client_with_one_line_and_no_server_connection(
        echo_server: EchoServer, splice: bool, caplog: pytest.LogCaptureFixture, data: bytes, then: str,
        reason: str) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    # Only the missing header waits for connect_timeout; the others must not need it (30 s).
    wait = 0.3 if reason.startswith("no PROXY header within") else 30
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={}, splice=splice, connect_timeout=wait,
                    accept_proxy=["127.0.0.0/8"])
    with fwd.running():
        with socket.create_connection(fwd.address, timeout=WAIT) as balancer:
            started = time.monotonic()
            send_then(data, then)(balancer)
            with pytest.raises(ConnectionResetError):
                while balancer.recv(65536):
                    pass
            assert time.monotonic() - started < 5.0
        wait_for(lambda: not fwd.connections, what="the pair to close")
        wait_for(lambda: refusals(caplog), what="the refusal line")
    [line] = [record.getMessage() for record in caplog.records if record.name == "asyncore_fwd"]
    assert line.endswith(f"({reason})") and "refused 127.0.0.1:" in line
    assert fwd.stats.refused_limit == 1
    assert echo_server.accepted == 0


def test_garbage_from_many_clients_costs_rate_limited_lines_and_a_good_client_is_served(
        echo_server: EchoServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_access, "REFUSAL_LOG_INTERVAL", 60.0)
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={}, accept_proxy=["127.0.0.1"])
    with fwd.running():
        for index in range(50):
            with socket.create_connection(fwd.address, timeout=WAIT) as balancer:
                balancer.sendall(SIGNATURE + b"\x31\x11\x00\x0c" if index % 2 else b"PROXY \xff\xfe")
                with pytest.raises(ConnectionResetError):
                    balancer.recv(10)
        echoed, _ = round_trip(fwd.address, V1_TCP4, b"still served")
        wait_for(lambda: fwd.stats.refused_limit == 50, what="every refusal to be counted")
        assert echoed == b"still served"
        assert len([record for record in caplog.records if record.levelno >= logging.INFO]) == 1
    summaries = [record for record in refusals(caplog) if "suppressed" in record.details]
    assert [record.details["suppressed"] for record in summaries] == [49]  # (logged as the forwarder closes)
    assert echo_server.accepted == 1


# -- the header's client is the client -------------------------------------------------------------


def header_from(source: str, port: int = 40000) -> bytes:
    return f"PROXY TCP4 {source} 198.51.100.1 {port} 443\r\n".encode()


def test_allow_and_deny_judge_the_address_in_the_header(
        echo_server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={}, accept_proxy=["127.0.0.1"],
                    allow=["192.0.2.0/24"], deny=["192.0.2.66"])
    with fwd.running():
        assert round_trip(fwd.address, header_from("192.0.2.1"), b"in")[0] == b"in"
        for refused in ("198.51.100.7", "192.0.2.66"):
            with socket.create_connection(fwd.address, timeout=WAIT) as balancer:
                balancer.sendall(header_from(refused) + b"never relayed")
                with pytest.raises(ConnectionResetError):
                    balancer.recv(10)
        wait_for(lambda: fwd.stats.refused_acl == 2, what="the refusals to be counted")
    assert echo_server.accepted == 1
    assert refusals(caplog)[0].details["client"] == "198.51.100.7:40000"


def test_max_per_client_counts_the_address_in_the_header(echo_server: EchoServer) -> None:
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={}, accept_proxy=["127.0.0.1"],
                    max_per_client=1)
    with fwd.running():
        first = socket.create_connection(fwd.address, timeout=WAIT)
        first.sendall(header_from("192.0.2.1") + b"one")
        assert recv_exactly(first, 3) == b"one"
        with socket.create_connection(fwd.address, timeout=WAIT) as second:  # the same client, another port
            second.sendall(header_from("192.0.2.1", 40001))
            with pytest.raises(ConnectionResetError):
                second.recv(10)
        assert round_trip(fwd.address, header_from("192.0.2.2"), b"other")[0] == b"other"  # another client
        assert fwd.stats.refused_limit == 1
        first.close()
        wait_for(lambda: not fwd.connections, what="the first connection to close")
        assert round_trip(fwd.address, header_from("192.0.2.1"), b"again")[0] == b"again"
        wait_for(lambda: not fwd.connections, what="the last connection to close")
        assert fwd.access is not None and fwd.access.per_client == {}


@needs_dual_stack
def test_an_ipv4_balancer_of_a_dual_stack_listener_matches_an_ipv4_network(echo_server: EchoServer) -> None:
    fwd = Forwarder("::", 0, "127.0.0.1", echo_server.port, map={}, accept_proxy=["127.0.0.1"])
    with fwd.running():
        assert round_trip(("127.0.0.1", fwd.address[1]), V1_TCP4, b"mapped")[0] == b"mapped"


@pytest.fixture
def recording_server(scripted_server: Callable[..., ScriptedServer]) -> Tuple[ScriptedServer, List[bytes]]:
    recording = Recording()
    return scripted_server(recording), recording.received


def test_a_chain_of_forwarders_keeps_the_first_client_s_address(
        recording_server: Tuple[ScriptedServer, List[bytes]], splice: bool) -> None:
    """client -> front (send_proxy v2) -> back (accept_proxy, send_proxy v1) -> server: the server is told
    the client's address, and the address the client connected to (the front's)."""
    server, received = recording_server
    back = Forwarder("127.0.0.1", 0, "127.0.0.1", server.port, map={}, splice=splice, accept_proxy=["127.0.0.1"],
                     send_proxy="v1")
    front = Forwarder("127.0.0.1", 0, "127.0.0.1", back.address[1], map={}, splice=splice, send_proxy="v2")
    with back.running(), front.running():
        with socket.create_connection(front.address, timeout=WAIT) as client:
            client.sendall(b"hello")
            client.shutdown(socket.SHUT_WR)
            source = client.getsockname()[:2]
            assert recv_all(client) == b""
        wait_for(lambda: not back.connections, what="the back's pair to close")
    expected = f"PROXY TCP4 {source[0]} {front.address[0]} {source[1]} {front.address[1]}\r\n".encode()
    assert received == [expected + b"hello"]


@pytest.mark.parametrize("high_water", [1, 1024])
@pytest.mark.parametrize("send_proxy", [None, "v1", "v2"])
@pytest.mark.parametrize("header", [V1_TCP4, V2_TLVS], ids=["v1", "v2"])
def test_the_bytes_sent_with_the_header_reach_the_server_whatever_the_high_water(
        recording_server: Tuple[ScriptedServer, List[bytes]], splice: bool, caplog: pytest.LogCaptureFixture,
        header: bytes, send_proxy: Optional[str], high_water: int) -> None:
    """More bytes than the high-water mark in the header's segment, a header sent on or not:
    none is lost, nothing is logged (with splice, the kernel pipe holds only high_water)."""
    caplog.set_level(logging.WARNING, logger="asyncore_fwd")
    server, received = recording_server
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", server.port, map={}, splice=splice, accept_proxy=["127.0.0.1"],
                    send_proxy=send_proxy, high_water=high_water)
    data = payload(3000)
    with fwd.running():
        assert round_trip(fwd.address, header, data)[0] == b""
        wait_for(lambda: not fwd.connections, what="the pair to close")
    assert [record.getMessage() for record in caplog.records] == []
    (got,) = received
    assert got[len(got) - len(data):] == data
    sent_on = got[:len(got) - len(data)]
    assert (sent_on == b"" if send_proxy is None else sent_on.startswith(b"PROXY TCP4 192.")
            if send_proxy == "v1" else sent_on.startswith(SIGNATURE))


def test_a_local_header_with_send_proxy_sends_the_balancer_s_address(
        recording_server: Tuple[ScriptedServer, List[bytes]]) -> None:
    server, received = recording_server
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", server.port, map={}, accept_proxy=["127.0.0.1"], send_proxy="v1")
    with fwd.running():
        echoed, balancer = round_trip(fwd.address, V2_LOCAL, b"check")
        wait_for(lambda: not fwd.connections, what="the pair to close")
    assert echoed == b""
    header = f"PROXY TCP4 {balancer[0]} {fwd.address[0]} {balancer[1]} {fwd.address[1]}\r\n".encode()
    assert received == [header + b"check"]


def test_the_json_close_line_names_the_header_s_client_and_the_balancer(
        spawn: Callable[..., ForwarderProcess], echo_server: EchoServer) -> None:
    proc = spawn([sys.executable, "-m", "asyncore_fwd", "-v", "--log-format", "json",
                  "-L", f"0:127.0.0.1:{echo_server.port},name=lb,accept_proxy=127.0.0.1"])
    proc.wait_line(r'"event": "start"')
    port = int(json.loads(proc.lines[0])["listen"].rsplit(":", 1)[1])
    echoed, balancer = round_trip(("127.0.0.1", port), V2_TCP4, b"json")
    assert echoed == b"json"
    proc.wait_line(r'"event": "close"')
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr
    close = next(entry for entry in map(json.loads, proc.lines) if entry["event"] == "close")
    assert (close["client"], close["proxied_by"]) == ("192.168.0.1:56324", f"{balancer[0]}:{balancer[1]}")
    assert close["message"].startswith("lb 192.168.0.1:56324 -> ")


def test_a_listener_open_to_all_but_serving_balancers_only_does_not_warn(
        echo_server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="asyncore_fwd"):
        Forwarder("0.0.0.0", 0, "127.0.0.1", echo_server.port, map={}, accept_proxy=["10.0.0.0/8"]).close()
        Forwarder("0.0.0.0", 0, "127.0.0.1", echo_server.port, map={}).close()
    assert len([record for record in caplog.records if "allow list" in record.getMessage()]) == 1


def test_a_rule_without_accept_proxy_has_no_step(echo_server: EchoServer) -> None:
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", echo_server.port, map={}, send_proxy="v1")
    try:
        assert fwd.admission == ()
        assert [type(observer).__name__ for observer in fwd.observers] == ["RuleStats", "ProxyHeader"]
    finally:
        fwd.close()


# -- the values --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [["10.0.0.0/33"], ["balancer"], [None]])
def test_rule_and_forwarder_refuse_a_bad_network(value: list) -> None:
    with pytest.raises(ValueError, match="accept_proxy entries must be addresses or CIDRs"):
        Rule("127.0.0.1", 0, "127.0.0.1", 80, accept_proxy=value)
    with pytest.raises(ValueError, match="accept_proxy"):
        Forwarder("127.0.0.1", 0, "127.0.0.1", 80, map={}, accept_proxy=value)


def test_a_bad_network_on_the_command_line_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["-L", "0:127.0.0.1:80,accept_proxy=10.0.0.0/8,accept_proxy=nope", "--check-config"])
    out, err = capsys.readouterr()
    assert (exited.value.code, out) == (2, "")
    assert err.count("\n") == 1 and 'accept_proxy: expected an address or a network' in err, err


def test_check_config_shows_accept_proxy_repeated_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["-L", "0:127.0.0.1:80,name=a,accept_proxy=10.0.0.0/8,accept_proxy=::1",
                       "-L", "0:127.0.0.1:80,name=b", "--check-config"])
    out, err = capsys.readouterr()
    assert (status, err) == (0, "")
    shown = [[item for item in line.split() if item.startswith("accept_proxy=")] for line in out.splitlines()]
    assert shown == [["accept_proxy=10.0.0.0/8,::1/128"], ["accept_proxy=none"]]
    assert " accept_proxy=192.0.2.7/32" in describe_rule(parse_forward_spec("0:h:80,accept_proxy=192.0.2.7"))


def test_a_reload_asks_new_connections_only_for_a_header(echo_server: EchoServer) -> None:
    port = free_port()
    service = unless_taken(lambda: Service([Rule("127.0.0.1", port, "127.0.0.1", echo_server.port, name="r")],
                                           map={}))
    thread = threading.Thread(target=service.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        address = service.forwarders["r"].address
        with socket.create_connection(address, timeout=WAIT) as old:
            old.sendall(b"before")
            assert recv_exactly(old, 6) == b"before"
            service.reload([Rule("127.0.0.1", port, "127.0.0.1", echo_server.port, name="r",
                                 accept_proxy=["127.0.0.1"])])
            wait_for(lambda: service.forwarders["r"].rule.accept_proxy, what="the reload")
            assert round_trip(address, V1_TCP4, b"new")[0] == b"new"
            with socket.create_connection(address, timeout=WAIT) as no_header:
                no_header.sendall(b"GET / HTTP/1.0\r\n\r\n")
                with pytest.raises(ConnectionResetError):
                    no_header.recv(10)
            old.sendall(b" and after")
            assert recv_exactly(old, 10) == b" and after"
    finally:
        service.stop()
        thread.join(WAIT)


def test_sighup_turns_accept_proxy_on_for_new_connections(
        echo_server: EchoServer, spawn: Callable[..., ForwarderProcess], tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "fwd.toml"
    rule = f'[[rule]]\nname = "r"\nlisten = "127.0.0.1:{port}"\nconnect = "127.0.0.1:{echo_server.port}"\n'
    config.write_text(rule)
    proc = spawn([sys.executable, "-m", "asyncore_fwd", "-c", str(config)])
    proc.wait_line(r"r: forwarding ")
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as old:
        old.sendall(b"old")
        assert recv_exactly(old, 3) == b"old"
        config.write_text(rule + 'accept_proxy = ["127.0.0.1"]\n')
        proc.process.send_signal(signal.SIGHUP)
        proc.wait_line(r"reloaded: 0 added, 0 removed, 1 changed")
        assert round_trip(("127.0.0.1", port), V2_TCP4, b"new")[0] == b"new"
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as no_header:
            no_header.sendall(b"new, without a header")
            with pytest.raises(ConnectionResetError):
                no_header.recv(10)
        old.sendall(b" and on")
        assert recv_exactly(old, 7) == b" and on"
    proc.wait_line(r"refused 127\.0\.0\.1:\d+ \(bad PROXY header: not a PROXY header\)")
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr
