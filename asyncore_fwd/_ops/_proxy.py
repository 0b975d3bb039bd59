"""The PROXY protocol, sending side: the client's addresses ahead of its bytes (``send_proxy``).

A server behind the forwarder sees the forwarder's address as its peer.
With ``send_proxy = "v1"`` or ``"v2"`` (HAProxy's text and binary forms),
the first bytes the server receives say who the client was and which
address it connected to; then the client's bytes follow, unchanged.

Strategy: ``proxy_header`` is a pure function of the two addresses; the
``ProxyHeader`` observer queues its bytes for the server when a connection
opens (``Connection.queue_for_server``), which works with the copy and the
splice relay alike.  A rule without ``send_proxy`` has no such observer.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Optional, Tuple, Union

from .._net import SockAddr
from .._relay._connection import Connection, ConnectionObserver
from .._values._rules import Rule

__all__ = ["V2_SIGNATURE", "ProxyHeader", "proxy_header"]

#: The twelve bytes that open a version 2 header.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY = 0x21  # version 2, command PROXY
_V2_FAMILY = {4: 0x11, 6: 0x21}  # TCP over IPv4, TCP over IPv6
_V1_FAMILY = {4: "TCP4", 6: "TCP6"}
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def _ip(host: str) -> Address:
    """The address of ``host``; an IPv4-mapped one (a dual-stack listener's IPv4 client) as IPv4."""
    address = ipaddress.ip_address(host.partition("%")[0])  # a link-local scope is not sent
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def proxy_header(version: str, source: SockAddr, destination: SockAddr) -> bytes:
    """The PROXY header (``version`` "v1" or "v2") for a TCP connection from ``source`` to ``destination``.

    Both are socket addresses, ``(host, port, ...)``.  IPv4-mapped IPv6
    addresses are sent as TCP4 with the plain IPv4 addresses; a version 2
    header has no TLVs.
    """
    src, dst = _ip(source[0]), _ip(destination[0])
    if src.version != dst.version:  # one mapped, the other not: both as IPv6
        src, dst = (ipaddress.IPv6Address(f"::ffff:{ip}") if ip.version == 4 else ip for ip in (src, dst))
    ports: Tuple[int, int] = (source[1], destination[1])
    if version == "v1":
        family = _AF[src.version]
        return (f"PROXY {_V1_FAMILY[src.version]} {socket.inet_ntop(family, src.packed)} "
                f"{socket.inet_ntop(family, dst.packed)} {ports[0]} {ports[1]}\r\n").encode("ascii")
    if version == "v2":
        body = src.packed + dst.packed + struct.pack("!HH", *ports)
        return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, _V2_FAMILY[src.version], len(body)) + body
    raise ValueError(f"send_proxy must be 'v1' or 'v2', not {version!r}")


class ProxyHeader(ConnectionObserver):
    """Sends each connection's PROXY header to the server ahead of the client's bytes."""

    __slots__ = ("version",)

    def __init__(self, version: str) -> None:
        proxy_header(version, ("127.0.0.1", 0), ("127.0.0.1", 0))  # a wrong version fails now, not per client
        self.version = version

    @classmethod
    def for_rule(cls, rule: Rule) -> Optional[ProxyHeader]:
        """The rule's header observer, or None when it sends none (nothing is done per connection)
        or takes one first (``accept_proxy``: that step sends this header once it knows the client)."""
        return cls(rule.send_proxy) if rule.send_proxy is not None and not rule.accept_proxy else None

    def opened(self, conn: Connection) -> None:
        """Queue the header: the server connect has not started, so it goes before the client's bytes."""
        conn.queue_for_server(proxy_header(self.version, conn.client_address, conn.local_address()))

    #: Queue the header of ``conn``'s client now: ``accept_proxy``'s step, once its header named the client.
    queue = opened
