"""Forwarding rules: what a listener serves, checked once.

A ``Rule`` holds everything one forwarder needs to know -- where to listen,
where to connect, and its limits -- so that rules can come from anywhere
(the article's arguments, ``-L`` flags, a config file).
"""

from __future__ import annotations

import ipaddress
import math
import socket
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Tuple, Union

from .._net import SPLICE_AVAILABLE, format_address, strip_brackets
from ._parse import is_integer, is_seconds, parse_ip_address

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

__all__ = ["BALANCES", "DEFAULT_BACKLOG", "DEFAULT_CONNECT_TIMEOUT", "DEFAULT_FAIL_TIMEOUT", "DEFAULT_HIGH_WATER",
           "DEFAULT_READ_SIZE", "DEFAULT_UDP_IDLE_TIMEOUT", "KiB", "MAX_KEEPALIVE", "PROTOS", "PROXY_VERSIONS", "Rule",
           "check_source_family", "repeated_target", "source_ip"]

KiB = 1024
#: Stop reading from a side while this many bytes wait for the other side.
DEFAULT_HIGH_WATER = 1024 * KiB
#: Bytes asked of the kernel per read at most (a read never takes more than
#: the room under the high-water mark).  Large reads mean fewer rounds of the
#: loop per megabyte: 1 MiB costs about 30 % less CPU per GB than 256 KiB.
DEFAULT_READ_SIZE = 1024 * KiB
DEFAULT_CONNECT_TIMEOUT = 10.0
#: The listen queue: deep enough for a burst of thousands of connects (the
#: article's 5 drops SYNs, and each dropped one waits a second to retry).
#: The kernel caps it at net.core.somaxconn.
DEFAULT_BACKLOG = 4096
#: The PROXY protocol's versions a rule may send to its server (``send_proxy``).
PROXY_VERSIONS = ("v1", "v2")
#: How new connections are spread over a rule's targets (``balance``): the first that is up
#: (failover), each in turn, or the one with the fewest open connections.
BALANCES = ("first", "roundrobin", "leastconn")
#: How long the failed connects that mark a target down are counted, and how long it stays down.
DEFAULT_FAIL_TIMEOUT = 10.0
#: The longest keepalive idle time, in seconds: Linux refuses a TCP_KEEPIDLE above it.
MAX_KEEPALIVE = 32767
#: What a rule forwards: TCP connections, or UDP datagrams (per client, a session).
PROTOS = ("tcp", "udp")
#: A UDP rule's ``idle_timeout`` when it is 0 (or not given): a session must always end, as UDP has no close.
DEFAULT_UDP_IDLE_TIMEOUT = 60.0


@dataclass(frozen=True)
class Rule:
    """One forwarding rule: where to listen, where to connect, and its limits.

    Everything a ``Forwarder`` needs to know, checked once, so that a list of
    rules can come from anywhere (arguments, flags, a config file).
    """

    local_host: str
    local_port: int
    remote_host: str
    remote_port: int
    backlog: int = DEFAULT_BACKLOG
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    high_water: int = DEFAULT_HIGH_WATER
    read_size: int = DEFAULT_READ_SIZE
    #: Relay with os.splice() through kernel pipes (Linux) instead of copying.
    splice: bool = False
    #: Listen with SO_REUSEPORT, so that several processes share the port.
    reuse_port: bool = False
    #: The rule's name in logs, stats and reloads ("" = named after ``listen``).
    name: str = ""
    #: Clients allowed in (empty: everyone not denied); then those denied.
    allow: Tuple[Network, ...] = ()
    deny: Tuple[Network, ...] = ()
    #: Open connections at most, in all and per client IP (0 = no limit).
    max_connections: int = 0
    max_per_client: int = 0
    #: Close a pair after this long without a byte either way (0 = never).
    idle_timeout: float = 0.0
    #: Once one direction has ended, close the pair if the other stays quiet
    #: this long (0 = never).
    half_closed_timeout: float = 0.0
    #: Send the server a PROXY protocol header, "v1" (text) or "v2" (binary), ahead of the client's bytes.
    send_proxy: Optional[str] = None
    #: The targets after the first (``remote_host:remote_port``), as (host, port) pairs: tried
    #: when the first is down or failed, or spread over by ``balance``.
    targets: Tuple[Tuple[str, int], ...] = ()
    #: "first" (failover, in order), "roundrobin" or "leastconn": see ``BALANCES``.
    balance: str = "first"
    #: Failed connects within ``fail_timeout`` that mark a target down for ``fail_timeout`` (0 = never).
    max_fails: int = 1
    fail_timeout: float = DEFAULT_FAIL_TIMEOUT
    #: Seconds between the active checks (a TCP connect) of every target (0 = none).
    health_check_interval: float = 0.0
    #: Front balancers (networks): only clients from these are served, and each must open with a PROXY
    #: header (v1 or v2) naming the real client, who is then the client for everything (empty: off).
    accept_proxy: Tuple[Network, ...] = ()
    #: Connect to the server from this local IP address (the kernel picks the port); None: the kernel's choice.
    source: Optional[str] = None
    #: Keepalive probes on both sockets after this many seconds without a byte (0 = off); a
    #: fraction rounds up to whole seconds, as the kernel counts them.
    tcp_keepalive: float = 0
    #: "tcp" (connections) or "udp" (datagrams, one session per client address: see ``_udp_checks``).
    proto: str = "tcp"

    def __post_init__(self) -> None:
        for name in ("local_host", "remote_host"):
            host = getattr(self, name)
            if not isinstance(host, str) or not strip_brackets(host):
                raise ValueError(f"{name} must be a non-empty string, not {host!r}")
            object.__setattr__(self, name, strip_brackets(host))
        for name, lowest in (("local_port", 0), ("remote_port", 1), ("backlog", 0)):
            if not is_integer(getattr(self, name), lowest, 65535):
                raise ValueError(f"{name} must be an integer from {lowest} to 65535, not {getattr(self, name)!r}")
        if isinstance(self.connect_timeout, int) and not isinstance(self.connect_timeout, bool):
            object.__setattr__(self, "connect_timeout", float(self.connect_timeout))
        if not is_seconds(self.connect_timeout):
            raise ValueError(f"connect_timeout must be a positive float, not {self.connect_timeout!r}")
        for name in ("high_water", "read_size"):
            if not is_integer(getattr(self, name), 1):
                raise ValueError(f"{name} must be a positive int, not {getattr(self, name)!r}")
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a string, not {self.name!r}")
        for name in ("allow", "deny", "accept_proxy"):
            object.__setattr__(self, name, tuple(_network(name, value) for value in getattr(self, name)))
        for name in ("max_connections", "max_per_client"):
            value = getattr(self, name)
            if not is_integer(value, 0):
                raise ValueError(f"{name} must be an integer >= 0 (0 = no limit), not {value!r}")
        for name in ("idle_timeout", "half_closed_timeout"):
            value = getattr(self, name)
            if not is_seconds(value, zero_ok=True):
                raise ValueError(f"{name} must be a number of seconds >= 0 (0 = off), not {value!r}")
            object.__setattr__(self, name, float(value))
        for name in ("splice", "reuse_port"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, not {getattr(self, name)!r}")
        if self.send_proxy is not None and self.send_proxy not in PROXY_VERSIONS:
            raise ValueError(f"send_proxy must be 'v1', 'v2' or None, not {self.send_proxy!r}")
        object.__setattr__(self, "targets", _targets(self.targets))
        repeated = repeated_target(self.all_targets)
        if repeated is not None:
            raise ValueError(f"targets must each be listed once: {format_address(repeated)} is listed twice")
        if not isinstance(self.balance, str) or self.balance not in BALANCES:
            raise ValueError(f"balance must be 'first', 'roundrobin' or 'leastconn', not {self.balance!r}")
        if not is_integer(self.max_fails, 0):
            raise ValueError(f"max_fails must be an integer >= 0 (0 = never down), not {self.max_fails!r}")
        if not is_seconds(self.fail_timeout):
            raise ValueError(f"fail_timeout must be a positive number of seconds, not {self.fail_timeout!r}")
        object.__setattr__(self, "fail_timeout", float(self.fail_timeout))
        if not is_seconds(self.health_check_interval, zero_ok=True):
            raise ValueError(f"health_check_interval must be a number of seconds >= 0 (0 = off), "
                             f"not {self.health_check_interval!r}")
        object.__setattr__(self, "health_check_interval", float(self.health_check_interval))
        if self.source is not None:
            object.__setattr__(self, "source", source_ip(self.source))
            check_source_family(self.source, (host for host, _ in self.all_targets))
        if not is_seconds(self.tcp_keepalive, zero_ok=True) or self.tcp_keepalive > MAX_KEEPALIVE:
            raise ValueError(f"tcp_keepalive must be a number of seconds from 0 to {MAX_KEEPALIVE} (0 = off), "
                             f"not {self.tcp_keepalive!r}")
        object.__setattr__(self, "tcp_keepalive", math.ceil(self.tcp_keepalive))
        if self.reuse_port and not hasattr(socket, "SO_REUSEPORT"):
            raise ValueError("reuse_port=True needs SO_REUSEPORT, which this platform does not have")
        if self.splice and not SPLICE_AVAILABLE:
            raise ValueError("splice=True needs os.splice(), which this platform does not have")
        if not isinstance(self.proto, str) or self.proto not in PROTOS:
            raise ValueError(f"proto must be 'tcp' or 'udp', not {self.proto!r}")
        if self.proto == "udp":
            self._udp_checks()

    def _udp_checks(self) -> None:
        """A UDP rule: ValueError naming a key that means nothing for datagrams; its idle_timeout
        of 0 (the default) is ``DEFAULT_UDP_IDLE_TIMEOUT``, since a session has no other end.

        backlog, connect_timeout, high_water and read_size are left as they are and not used
        (a datagram is read whole, up to 65535 bytes; a UDP connect does not wait).
        """
        why = {"send_proxy": "a UDP rule sends no PROXY header" if self.send_proxy is not None else None,
               "accept_proxy": "a UDP rule reads no PROXY header" if self.accept_proxy else None,
               "half_closed_timeout": "a UDP session has no half-close" if self.half_closed_timeout else None,
               "tcp_keepalive": "a UDP socket has no keepalive" if self.tcp_keepalive else None,
               "splice (--splice)": "datagrams are relayed whole, not spliced" if self.splice else None,
               "health_check_interval": ("the active checks are TCP connects; a UDP rule's targets are judged by "
                                         "the ICMP errors of their sessions (max_fails, fail_timeout)")
               if self.health_check_interval else None}
        for key, reason in why.items():
            if reason is not None:
                raise ValueError(f"{key}: not for a UDP rule (proto=udp): {reason}")
        if not self.idle_timeout:
            object.__setattr__(self, "idle_timeout", DEFAULT_UDP_IDLE_TIMEOUT)

    @property
    def remote(self) -> str:
        """The remote as written in logs: ``host:port``."""
        return format_address((self.remote_host, self.remote_port))

    @property
    def all_targets(self) -> Tuple[Tuple[str, int], ...]:
        """Every target, in order: the first (``remote_host``, ``remote_port``), then ``targets``."""
        return ((self.remote_host, self.remote_port),) + self.targets

    @property
    def connect(self) -> str:
        """Every target as written in logs and configs: ``host:port``, comma-separated."""
        return ",".join(format_address(target) for target in self.all_targets)

    @property
    def listen(self) -> str:
        """Where it listens, as written in logs and configs: ``host:port``."""
        return format_address((self.local_host, self.local_port))

    @property
    def label(self) -> str:
        """The rule's name, or where it listens if it has none (a UDP rule's with "/udp" after it:
        a TCP and a UDP rule may listen on one port, as DNS does)."""
        return self.name or (f"{self.listen}/udp" if self.proto == "udp" else self.listen)


def _targets(value: Any) -> Tuple[Tuple[str, int], ...]:
    """``targets`` as a tuple of (host, port) pairs, brackets stripped; ValueError naming a bad entry."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
        raise ValueError(f"targets must be a list of (host, port) pairs, not {value!r}")
    checked = []
    for entry in value:
        if (not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str)
                or not strip_brackets(entry[0]) or not is_integer(entry[1], 1, 65535)):
            raise ValueError(f"targets entries must be (host, port) pairs with a port from 1 to 65535, "
                             f"not {entry!r}")
        checked.append((strip_brackets(entry[0]), entry[1]))
    return tuple(checked)


def source_ip(value: Any) -> str:
    """``value``, an IPv4 or IPv6 address to connect from, as the address's own text; ValueError else."""
    try:
        return parse_ip_address(value)
    except ValueError:
        raise ValueError(f"source must be an IP address (a host name is not accepted), not {value!r}") from None


def check_source_family(source: str, hosts: Iterable[str]) -> None:
    """ValueError if a target host written as an IP address is not of the family of ``source``
    (a host name is not checked: only its addresses of that family are used)."""
    source_version = ipaddress.ip_address(source).version
    for host in map(strip_brackets, hosts):
        try:
            version = ipaddress.ip_address(host).version
        except ValueError:
            continue  # a name
        if version != source_version:
            raise ValueError(f"source {source} is IPv{source_version} but the target {host} is IPv{version}: "
                             f"a connect needs both of one family")


def repeated_target(targets: Iterable[Tuple[str, int]]) -> Optional[Tuple[str, int]]:
    """The first of ``targets`` that repeats an earlier one, or None.  The same host spelt
    otherwise is the same (a name's case, an IP's form): its counters would merge."""
    seen = set()
    for host, port in targets:
        try:
            same = str(ipaddress.ip_address(host))
        except ValueError:
            same = host.lower().rstrip(".")
        if (same, port) in seen:
            return host, port
        seen.add((same, port))
    return None


def _network(key: str, value: Any) -> Network:
    """A CIDR or a single address (IPv4 or IPv6) as a network; an IPv4-mapped
    one (``::ffff:10.0.0.0/104``) as the IPv4 network it names."""
    if not isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        try:
            value = ipaddress.ip_network(strip_brackets(value) if isinstance(value, str) else value, strict=False)
        except (TypeError, ValueError):
            raise ValueError(f"{key} entries must be addresses or CIDRs like 10.0.0.0/8 or ::1, "
                             f"not {value!r}") from None
    # Clients are matched as IPv4 when a dual-stack listener sees them mapped
    # (``client_ip``), so a mapped entry must be IPv4 too, or it never matches.
    mapped = value.network_address.ipv4_mapped if isinstance(value, ipaddress.IPv6Network) else None
    if mapped is not None and value.prefixlen >= 96:
        return ipaddress.IPv4Network((mapped, value.prefixlen - 96))
    return value


