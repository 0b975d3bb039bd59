"""The PROXY protocol, receiving side: a front balancer names the client (``accept_proxy``).

Behind a load balancer (HAProxy, nginx, an AWS NLB, another forwarder with
``send_proxy``), every client seems to be the balancer.  With
``accept_proxy = ["10.0.0.0/8"]`` only those networks may connect, and each
connection must open with a PROXY header (HAProxy's spec, version 1 or 2,
told apart by their first bytes) naming the real client, which is then the
client for everything: allow/deny, ``max_per_client``, the close line, and
the header ``send_proxy`` sends on.

Strategy: ``parse_proxy_header`` is a pure function of the bytes read so far
(a header, None for "need more", or ``ProxyHeaderError``).  ``ProxyAccept``
is the rule's first admission step: at accept it refuses a client outside
the networks; then it holds the server connect and reads the client until
the header is whole (``Connection.read_client``), so nothing reaches the
server before it.  Each read takes no more than the header can still need
(``header_bytes_wanted``): the few bytes after it that came with it go on
first (``queue_for_server``), the rest stays in the socket for the relay,
whatever the high-water mark.  A missing, malformed, too long or truncated header
turns the client away (``Connection.turn_away``): a reset and a rate-limited
refusal line, never more.  A rule without ``accept_proxy`` has no such step.

What HAProxy does, done alike: a v2 ``LOCAL`` command (a balancer's health
check) and a v1 ``UNKNOWN`` keep the balancer's own address; so does a v2
``PROXY`` command for anything but TCP over IPv4 or IPv6 (UDP, AF_UNIX,
AF_UNSPEC).  A v2 header's TLVs are skipped (checked to fit its length,
their CRC32C not verified); another version or command is refused.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

from .._net import SockAddr, format_address
from .._relay._connection import AdmissionStep, Connection
from .._values._rules import Rule
from ._access import client_ip
from ._proxy import V2_SIGNATURE, ProxyHeader

__all__ = ["V1_MAX_LENGTH", "V2_MAX_BODY", "ProxyAccept", "ProxyHeaderError", "ReceivedHeader",
           "header_bytes_wanted", "parse_proxy_header"]

log = logging.getLogger("asyncore_fwd")

#: A version 1 header is one line of this many bytes at most, CRLF included (the spec's limit).
V1_MAX_LENGTH = 107
#: The most a version 2 header may carry after its 16 fixed bytes (addresses and TLVs).  The spec
#: allows 65535; the addresses take 36 at most, and the TLVs balancers send (SSL, unique ID,
#: AWS and Azure ids) a few hundred: a longer one is refused rather than buffered.
V2_MAX_BODY = 2048
_V1_PREFIX = b"PROXY "
_V2_FIXED = 16
_V2_INET, _V2_INET6 = 0x11, 0x21  # TCP over IPv4, TCP over IPv6
_V2_ADDRESSES = {_V2_INET: 12, _V2_INET6: 36}


class ProxyHeaderError(ValueError):
    """Bytes that are not a PROXY header we take: what is wrong, in a few words."""


@dataclass(frozen=True)
class ReceivedHeader:
    """A whole PROXY header: how many bytes it took, and the client it names.

    ``source`` (the client) and ``destination`` (what it connected to) are
    socket addresses, or both None when the connection's own are kept
    (``LOCAL``, ``UNKNOWN``, not TCP over IPv4/IPv6).
    """

    version: int
    length: int
    source: Optional[SockAddr] = None
    destination: Optional[SockAddr] = None


def parse_proxy_header(data: bytes) -> Optional[ReceivedHeader]:
    """The PROXY header (v1 or v2) at the start of ``data``; None while ``data`` is a header's
    beginning; ProxyHeaderError when it cannot be one (the bytes after a header are not read)."""
    if not data:
        return None
    if data[:1] == V2_SIGNATURE[:1]:
        if not V2_SIGNATURE.startswith(data[:len(V2_SIGNATURE)]):
            raise ProxyHeaderError("not a PROXY header")
        return _parse_v2(data)
    if not _V1_PREFIX.startswith(data[:len(_V1_PREFIX)]):
        raise ProxyHeaderError("not a PROXY header")
    return _parse_v1(data)


def header_bytes_wanted(data: bytes) -> int:
    """The most bytes a header that ``data`` begins can still need (at least 1): a v2 header's
    exact length once its fixed part is read, up to the longest v1 line otherwise."""
    if not data:
        return _V2_FIXED  # either version's header is that long at least (v1: but for one byte)
    if data[:1] == V2_SIGNATURE[:1]:
        if len(data) < _V2_FIXED:
            return _V2_FIXED - len(data)
        length = min(struct.unpack_from("!H", data, _V2_FIXED - 2)[0], V2_MAX_BODY)
        return max(1, _V2_FIXED + length - len(data))
    return max(1, V1_MAX_LENGTH - len(data))


def _parse_v1(data: bytes) -> Optional[ReceivedHeader]:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    line = data[:V1_MAX_LENGTH] if end < 0 else data[:end]
    if any(byte < 0x20 or byte > 0x7E for byte in line.rstrip(b"\r")):
        raise ProxyHeaderError("v1 header with a byte that is not printable ASCII")
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyHeaderError(f"v1 header longer than {V1_MAX_LENGTH} bytes")
        return None
    fields = line.decode("ascii").split(" ")
    if fields[1] == "UNKNOWN":  # the rest of the line is to be ignored
        return ReceivedHeader(1, end + 2)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("v1 header not of the form PROXY TCP4|TCP6|UNKNOWN SRC DST SPORT DPORT")
    ip_class = ipaddress.IPv4Address if fields[1] == "TCP4" else ipaddress.IPv6Address
    try:
        if "%" in fields[2] + fields[3]:
            raise ValueError("a scope id")
        hosts = [str(ip_class(field)) for field in fields[2:4]]
    except ValueError:
        raise ProxyHeaderError(f"v1 header with a bad {fields[1]} address") from None
    ports = [_v1_port(field) for field in fields[4:6]]
    tail = (0, 0) if fields[1] == "TCP6" else ()
    return ReceivedHeader(1, end + 2, (hosts[0], ports[0]) + tail, (hosts[1], ports[1]) + tail)


def _v1_port(field: str) -> int:
    if not (field.isdigit() and len(field) <= 5 and int(field) <= 65535):
        raise ProxyHeaderError("v1 header with a bad port")
    return int(field)


def _parse_v2(data: bytes) -> Optional[ReceivedHeader]:
    if len(data) > len(V2_SIGNATURE):  # the version and command can be judged already
        version_command = data[len(V2_SIGNATURE)]
        if version_command >> 4 != 2:
            raise ProxyHeaderError(f"v2 header of version {version_command >> 4}")
        if version_command & 0x0F > 1:
            raise ProxyHeaderError(f"v2 header with command {version_command & 0x0F} (neither LOCAL nor PROXY)")
    if len(data) < _V2_FIXED:
        return None
    version_command, family, length = struct.unpack_from("!BBH", data, len(V2_SIGNATURE))
    command = version_command & 0x0F
    if length > V2_MAX_BODY:
        raise ProxyHeaderError(f"v2 header of {_V2_FIXED + length} bytes, more than the "
                               f"{_V2_FIXED + V2_MAX_BODY} taken")
    if len(data) < _V2_FIXED + length:
        return None
    body = data[_V2_FIXED:_V2_FIXED + length]
    if command == 0 or family not in _V2_ADDRESSES:  # LOCAL, or not TCP/IP: keep the balancer's address
        return ReceivedHeader(2, _V2_FIXED + length)
    size = _V2_ADDRESSES[family]
    if length < size:
        raise ProxyHeaderError(f"v2 header too short for its addresses ({length} bytes)")
    _check_tlvs(body[size:])
    width = 4 if family == _V2_INET else 16
    ip_class = ipaddress.IPv4Address if family == _V2_INET else ipaddress.IPv6Address
    hosts = [str(ip_class(body[i:i + width])) for i in (0, width)]
    ports = struct.unpack_from("!HH", body, 2 * width)
    tail: Tuple[int, ...] = () if family == _V2_INET else (0, 0)  # (flow info and scope of an IPv6 address)
    return ReceivedHeader(2, _V2_FIXED + length, (hosts[0], ports[0]) + tail, (hosts[1], ports[1]) + tail)


def _check_tlvs(tlvs: bytes) -> None:
    """Each TLV (type, 2-byte length, value) must fit in the header, as HAProxy checks."""
    offset = 0
    while offset < len(tlvs):
        if offset + 3 > len(tlvs):
            raise ProxyHeaderError("v2 header with a truncated TLV")
        offset += 3 + struct.unpack_from("!H", tlvs, offset + 1)[0]
        if offset > len(tlvs):
            raise ProxyHeaderError("v2 header with a TLV longer than the header")


class ProxyAccept(AdmissionStep):
    """A rule's trusted front balancers: refuses other clients at accept, and holds each
    connection's server connect until its PROXY header has named the client."""

    __slots__ = ("networks", "forward_header")

    def __init__(self, rule: Rule) -> None:
        self.networks = rule.accept_proxy
        #: With ``send_proxy`` too: the header sent on, once this one named the client.
        self.forward_header = ProxyHeader(rule.send_proxy) if rule.send_proxy is not None else None

    @classmethod
    def for_rule(cls, rule: Rule) -> Optional[ProxyAccept]:
        """The rule's step, or None when it takes no PROXY header (nothing is done per connection)."""
        return cls(rule) if rule.accept_proxy else None

    def refusal(self, client_address: SockAddr, open_connections: int) -> Optional[str]:
        """"accept_proxy" for a client outside the networks: only balancers may connect."""
        try:
            ip = client_ip(client_address)
        except ValueError:  # not an IP socket address (cannot happen with TCP/IP)
            return "accept_proxy"
        return None if any(ip in network for network in self.networks) else "accept_proxy"

    def admit(self, conn: Connection) -> bool:
        """Hold the connect, and read the client until its header is whole."""
        read = bytearray()

        def received(data: bytes) -> None:
            if not data:
                conn.turn_away("PROXY header cut short: the client closed" if read else
                               "no PROXY header: the client closed")
                return
            read.extend(data)
            try:
                header = parse_proxy_header(bytes(read))
            except ProxyHeaderError as error:
                conn.turn_away(f"bad PROXY header: {error}")
                return
            if header is not None:
                self._take(conn, header, bytes(read[header.length:]))

        conn.read_client(received, lambda: header_bytes_wanted(bytes(read)))
        return False

    def _take(self, conn: Connection, header: ReceivedHeader, rest: bytes) -> None:
        """The header is whole: the client it names is the connection's; the rest goes on, then the connect."""
        if header.source is not None and header.destination is not None:
            conn.proxied(header.source, header.destination)
            log.debug("#%d client %s, named by %s (PROXY v%d)", conn.id, format_address(conn.client_address),
                      format_address(conn.proxied_by or ()), header.version)
        if self.forward_header is not None:
            self.forward_header.queue(conn)
        if rest:  # sent in the same segment as the header: the server gets it first
            conn.queue_for_server(rest)
        conn.let_go()

    def timed_out(self, conn: Connection) -> None:
        """No whole header within the rule's connect timeout."""
        conn.turn_away(f"no PROXY header within {conn.rule.connect_timeout:g} s")
