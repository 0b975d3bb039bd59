"""The loop-back guard: a forwarder never forwards to itself.

An address of the remote may be the forwarder's own listener (``localhost``
resolving to ``::1`` and ``127.0.0.1``, with the server on one of them and
the forwarder on the other, same port).  Relayed, such a connect would be
accepted and forwarded again, and again, until descriptors run out.

Strategy, one ``LoopbackGuard`` per forwarder:

* at start, a remote whose every address is this listener is refused;
* a Sender connecting to the listener's port registers its own end; when
  its connect completes to this listener it is given up for the next
  address, and its other end, still in the backlog, is *turned back*;
* at accept, a client that is one of our own connects (turned back, or one
  whose completion the Sender could not tell) is reset, never forwarded.

Nothing is checked per byte; a connect to another port costs one comparison.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import time
from typing import Any, Dict, Iterable, Optional, Protocol, Tuple

from .._net import SockAddr, end_key, reset

__all__ = ["LEADS_BACK", "LoopbackGuard", "is_loopback"]

#: Why a connect is given up when it reached the forwarder's own listener.
LEADS_BACK = "it leads back to this forwarder"
#: How long a connect of ours that led back here may take to come out of the backlog.
TURNED_BACK_WAIT = 5.0

End = Tuple[str, int]


def is_loopback(host: str) -> bool:
    """True if ``host`` (a bound address) only serves this machine."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # no scope id
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback  # an IPv4 client as a dual-stack listener sees it
    return ip.is_loopback


class _Listening(Protocol):
    """The listener a guard keeps connects from (a ``Forwarder``)."""

    @property
    def address(self) -> Tuple[str, int]: ...

    @property
    def socket(self) -> Any: ...


class _OwnConnect(Protocol):
    """A connect of ours to the listener's port (a ``Sender``)."""

    @property
    def socket(self) -> Any: ...

    def reached_its_own_forwarder(self) -> None:
        """The listener accepted this very connect: give it up."""


class LoopbackGuard:
    """Keeps one forwarder's connects from leading back to its own listener."""

    def __init__(self, listening: _Listening, reuse_port: bool) -> None:
        self._listening = listening
        self._reuse_port = reuse_port
        #: Our own connects to the listener's port, by their (host, port).
        self.own_ends: Dict[End, _OwnConnect] = {}
        self._end_of: Dict[_OwnConnect, Optional[End]] = {}
        #: Connects of ours that led back here and were given up, by (their end, ours),
        #: with the time: reset when they come out of the backlog.
        self.turned_back: Dict[Tuple[End, End], float] = {}

    # -- at start ------------------------------------------------------------

    def refuse_remote(self, addresses: Iterable[Tuple[int, SockAddr]], what: str) -> None:
        """OSError if every address of the remote is this very listener, which
        would accept each connect and forward it again.  (When only some are,
        the connects that lead back are caught as they complete.)"""
        addresses = list(addresses)
        if addresses and all(self.leads_back_here(sockaddr) for _, sockaddr in addresses):
            raise OSError(errno.ELOOP, f"{what}: that is this forwarder's own listening address")

    def leads_back_here(self, peer: SockAddr, local: Optional[SockAddr] = None) -> bool:
        """Whether a connect to ``peer`` (from ``local``, once known) reaches this listener."""
        host, port = end_key(self._listening.address)
        peer_host, peer_port = end_key(peer)
        if peer_port != port:
            return False
        if peer_host == host:
            return True
        if host not in ("0.0.0.0", "::") or self._reuse_port:
            return False  # (with reuse_port, another process's more specific listener may own it)
        # A wildcard listener takes every local address of its family, and [::]
        # IPv4 too unless it is IPv6-only.  A connection to a local address has
        # that same address at its own end.
        if ":" in peer_host and host != "::":
            return False
        if ":" not in peer_host and host == "::" and self._listening.socket.getsockopt(
                socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
            return False
        return (is_loopback(peer_host) or peer_host in ("0.0.0.0", "::")
                or (local is not None and end_key(local)[0] == peer_host))

    # -- the Sender's side ---------------------------------------------------

    def connecting(self, connect: _OwnConnect, address: SockAddr) -> bool:
        """``connect`` is about to start to ``address``: True if that may be this listener
        (then ``started()`` notes its end once it has one)."""
        if address[1] != self._listening.address[1]:
            return False
        self._end_of[connect] = None  # (``connected()`` may come inside connect())
        return True

    def started(self, connect: _OwnConnect) -> None:
        """``connect``, to this listener's port, has started: note its end, for the accept."""
        if connect in self._end_of:  # (not if it completed at once and was given up)
            end = end_key(connect.socket.getsockname())
            self.own_ends[end], self._end_of[connect] = connect, end

    def connected(self, connect: _OwnConnect, peer: SockAddr, local: SockAddr) -> bool:
        """``connect`` completed from ``local`` to ``peer``: True if it leads back here.
        Its other end is then turned back: reset when it comes out of the backlog."""
        if connect not in self._end_of or not self.leads_back_here(peer, local):
            return False
        self.turn_back(local, peer)
        return True

    def turn_back(self, local: SockAddr, peer: SockAddr) -> None:
        """A connect of ours from ``local`` led back to ``peer`` here: reset it when it is accepted."""
        now = time.monotonic()
        for key in [key for key, when in self.turned_back.items() if now - when > TURNED_BACK_WAIT]:
            del self.turned_back[key]  # never accepted (the backlog dropped it)
        self.turned_back[(end_key(local), end_key(peer))] = now

    def forget(self, connect: _OwnConnect) -> None:
        """``connect``'s socket is closing (a failed try, or the pair's close)."""
        end = self._end_of.pop(connect, None)
        if end is not None and self.own_ends.get(end) is connect:
            del self.own_ends[end]

    # -- at accept -------------------------------------------------------------

    def came_back(self, sock: socket.socket, addr: SockAddr) -> bool:
        """Whether the client ``sock`` is a connect of ours that led back here (then reset it)."""
        client = end_key(addr)
        connect = self.own_ends.get(client)
        if connect is None and not self.turned_back:
            return False
        try:
            ours = end_key(sock.getsockname())
        except OSError:
            return False
        if self.turned_back.pop((client, ours), None) is None:
            try:  # the whole four-tuple: a client may share a port number with a connect of ours
                if connect is None or end_key(connect.socket.getpeername()) != ours:
                    return False
            except OSError:
                return False
            connect.reached_its_own_forwarder()
        reset(sock)
        return True
