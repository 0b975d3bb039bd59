"""A UDP rule's loop guard: no session sends its datagrams to its own listener.

A session whose target is the listener itself (this host's address, the
listener's port) sends the client's datagram back to the listener, which
sees a new client, starts a session for it, and so on until the table is
full.  A datagram has no handshake to catch, so the guard looks at
addresses, at three moments:

* at start, a target whose every address leads back here is refused (as
  ``LoopbackGuard.refuse_remote`` does, and an address of this host's own
  counts: it is what a wildcard listener receives on);
* at a session's connect, the socket's local end tells which of this host's
  addresses the target is: if it is the listener, that address is skipped;
* at a new client, a source that is a session's own end (a datagram of ours
  come back) or this listener (a forged source: each reply would come back
  as a new client) starts nothing.

Unlike a TCP rule's guard, ``reuse_port`` makes no exception: the other
sockets of a UDP listener's port are this forwarder's own workers, so a
loopback or own target on that port loops just the same.  Nothing is checked
per datagram of a session; a new client costs a dictionary lookup (and, on
a wildcard listener, a bind probe when its port is the listener's, once per
host).
"""

from __future__ import annotations

import errno
import socket
from typing import Any, Dict, Iterable, Optional, Tuple

from .._net import SockAddr, end_key
from .._relay._loopback import LoopbackGuard

__all__ = ["DatagramLoopGuard", "is_own_address"]

End = Tuple[str, int]

#: How many hosts the guard remembers as this host's own or not.
OWN_CACHE = 256


def is_own_address(host: str) -> bool:
    """True if ``host`` is an address of this host (one a socket can bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((host, 0))
    except (OSError, ValueError):
        return False
    return True


class DatagramLoopGuard:
    """Keeps one UDP listener's sessions from sending to that listener (see the module docstring)."""

    def __init__(self, listening: Any) -> None:
        self._listening = listening  # (its address is read when needed: it may not listen yet)
        self._guard = LoopbackGuard(listening, reuse_port=False)
        #: The local ends of the sessions whose target is on the listener's port, and back.
        self.own_ends: Dict[End, Any] = {}
        self._end_of: Dict[Any, End] = {}
        self._own: Dict[str, bool] = {}

    @property
    def _port(self) -> int:
        port: int = self._listening.address[1]
        return port

    def leads_back(self, peer: SockAddr, local: Optional[SockAddr] = None) -> bool:
        """Whether datagrams to ``peer`` (sent from ``local``, once known) reach this listener."""
        if peer[1] != self._port:
            return False
        if local is None and self._listening.address[0] in ("0.0.0.0", "::") and self._is_own(end_key(peer)[0]):
            local = peer  # (what a connect to one of our own addresses has at its end)
        return self._guard.leads_back_here(peer, local)

    def _is_own(self, host: str) -> bool:
        """``is_own_address``, remembered for the few hosts a rule's targets and clients on the
        listener's port have (forgotten past ``OWN_CACHE`` of them: a flood's forged sources)."""
        own = self._own.get(host)
        if own is None:
            if len(self._own) >= OWN_CACHE:
                self._own.clear()
            own = self._own[host] = is_own_address(host)
        return own

    def refuse_remote(self, addresses: Iterable[Tuple[int, SockAddr]], what: str) -> None:
        """OSError if every address of the target leads back to this listener."""
        addresses = list(addresses)
        if addresses and all(self.leads_back(sockaddr) for _, sockaddr in addresses):
            raise OSError(errno.ELOOP, f"{what}: that is this forwarder's own listening address")

    def connected_here(self, peer: SockAddr, sock: socket.socket) -> bool:
        """Whether ``sock``, just connected to ``peer``, sends to this listener (then give it up)."""
        return peer[1] == self._port and self._guard.leads_back_here(peer, sock.getsockname())

    def opened(self, session: Any, peer: SockAddr, sock: socket.socket) -> None:
        """``session`` sends to ``peer`` from ``sock``: its end is noted if ``peer`` is on the listener's port."""
        self.forget(session)
        if peer[1] == self._port:
            end = end_key(sock.getsockname())
            self.own_ends[end], self._end_of[session] = session, end

    def forget(self, session: Any) -> None:
        """``session`` closed its socket (or moves to another address)."""
        end = self._end_of.pop(session, None)
        if end is not None and self.own_ends.get(end) is session:
            del self.own_ends[end]

    def is_ours(self, client: SockAddr) -> bool:
        """Whether a new client is a datagram of ours come back, or a source that is this listener."""
        return end_key(client) in self.own_ends or self.leads_back(client)
