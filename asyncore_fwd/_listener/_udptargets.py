"""Where a UDP rule's sessions send: a socket connected to a target's address.

Strategy: a new session tries the targets in the balance's order (one
target: the rule's remote), and each target's addresses in order, the one
that last answered a session first; a UDP ``connect`` sends nothing, so
only a local failure (no route, a broadcast address, our own lack of
descriptors) makes it try the next.  An address that leads back to the
listener (``_udploop``) is skipped, before the connect and after it, by
its local end.  A target none of whose addresses could be connected to has
failed a client (passive health).  A session whose target answers an ICMP
error before any reply asks for the target's next address (``next_socket``):
a new socket, since the family may differ, and nothing resent.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import Any, Dict, List, Optional, Tuple

from .._eventloop import _loop
from .._net import OUT_OF_RESOURCES, RemoteAddresses, SockAddr, SocketMap, bind_source, format_address
from .._ops._balance import TargetSet, TargetState
from .._values._rules import Rule
from ._udploop import DatagramLoopGuard

__all__ = ["SessionTargets"]

log = logging.getLogger("asyncore_fwd")

#: Why no session could start when every address led back to the listener.
LEADS_BACK = "it leads back to this listener"


class SessionTargets:
    """Connects a UDP rule's sessions to its targets (see the module docstring)."""

    def __init__(self, rule: Rule, map: SocketMap, remote: RemoteAddresses, targets: Optional[TargetSet],
                 loopback: DatagramLoopGuard) -> None:
        self._rule = rule
        self._map = map
        self._remote = remote
        self._targets = targets
        self._loopback = loopback
        #: Per target name, the address that last answered a session: where new sessions start.
        self.answered_at: Dict[str, SockAddr] = {}

    def addresses(self, state: Optional[TargetState]) -> List[Tuple[int, SockAddr]]:
        """The addresses of a target to try, the one that last answered first."""
        addresses = state.addresses.current() if state is not None else self._remote.current()
        answered = self.answered_at.get(state.name if state is not None else self._rule.remote)
        if answered is None or addresses[0][1] == answered or len(addresses) < 2:
            return addresses
        return sorted(addresses, key=lambda address: address[1] != answered)

    def connect(self) -> Tuple[socket.socket, SockAddr, Optional[TargetState]]:
        """A socket connected for a new session, its peer and its target (None: the rule's one).
        OSError if none: our own lack of resources (at once), or the last target's error."""
        last_error: Optional[OSError] = None
        for state in self._targets.order() if self._targets is not None else [None]:
            target_error: Optional[OSError] = None
            for family, sockaddr in self.addresses(state):
                try:
                    sock = self._socket(family, sockaddr)
                except OSError as error:
                    if error.errno in OUT_OF_RESOURCES:
                        raise
                    target_error = last_error = error
                    continue
                if sock is not None:
                    return sock, sockaddr, state
            if self._targets is not None and state is not None and target_error is not None:
                self._targets.failure(state, target_error)  # none of its addresses: it failed a client
        raise last_error if last_error is not None else OSError(errno.ELOOP, LEADS_BACK)

    def failed(self, session: Any) -> None:
        """``session``'s target answered with an ICMP error.  Before any reply, the session moves to
        the target's next address (the client retries; nothing is sent again); a session whose target
        is down or has no address left ends: the client's next datagram starts one by the balance."""
        state = session.target_state
        if state is not None and not state.up:
            session.close("target down")
            return
        if session.replied:
            return  # (a server that answered may be restarting: the session stays until it idles out)
        if state is None and (self._targets is not None or session.target != self._rule.remote):
            session.close("target failed")  # adopted, its target no longer the rule's: next, the rule's
            return
        moved = self.next_socket(session)
        if moved is None:
            session.close("target failed")
            return
        sock, sockaddr = moved
        session.move_to(sock, sockaddr)
        self._loopback.opened(session, sockaddr, sock)
        log.debug("#%d udp session to %s moves to %s", session.id, session.target, format_address(sockaddr))

    def next_socket(self, session: Any) -> Optional[Tuple[socket.socket, SockAddr]]:
        """A socket connected to the next address of ``session``'s target it has not tried, or None."""
        for family, sockaddr in self.addresses(session.target_state):
            if sockaddr in session.tried:
                continue
            session.tried.append(sockaddr)
            try:
                sock = self._socket(family, sockaddr)
            except OSError:
                continue
            if sock is not None:
                return sock, sockaddr
        return None

    def answered(self, session: Any) -> None:
        """The session's target address sent its first reply: new sessions of that target start there."""
        self.answered_at[session.target] = session.server_address

    def _socket(self, family: int, sockaddr: SockAddr) -> Optional[socket.socket]:
        """A UDP socket connected to ``sockaddr``; None if that is this listener (OSError if it fails)."""
        if self._loopback.leads_back(sockaddr):
            return None
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if self._rule.source is not None:
                bind_source(sock, self._rule.source)
            sock.connect(sockaddr)  # a UDP connect only fixes the peer: it does not wait
            _loop.check_watchable(self._map, sock)
        except BaseException:
            sock.close()
            raise
        if self._loopback.connected_here(sockaddr, sock):  # one of this host's addresses: ours
            sock.close()
            return None
        return sock
