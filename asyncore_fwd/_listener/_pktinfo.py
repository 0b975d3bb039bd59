"""Replies from the address the client sent to, on a wildcard UDP listener.

A socket bound to ``0.0.0.0`` or ``[::]`` receives on every address of the
host, but a plain ``sendto`` lets the kernel pick the source by the route
back to the client: on a host with several addresses, a client that sent to
one may hear from another, and drop the reply (DNS resolvers do).  A socket
bound to one address has no such choice, so only wildcard listeners need
this.

Strategy: ``enable()`` asks the kernel for each datagram's destination
(``IP_PKTINFO``; ``IPV6_RECVPKTINFO``, which a dual-stack socket also gives
for IPv4 clients, as an IPv4-mapped address); the listener reads with
``recvmsg_into``, keeps the last destination on the client's session, and
sends its replies with ``sendmsg`` and that address as the source
(``reply_ancillary``).  The interface index is left 0 (the route decides),
except for an IPv6 link-local address, which means nothing without it.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, List, Tuple

from .._net import describe_error
from ._sessions import DATAGRAMS_PER_EVENT

__all__ = ["ANCILLARY_SPACE", "Ancillary", "enable", "read_with_destinations", "reply_ancillary"]

log = logging.getLogger("asyncore_fwd")

#: Linux's value, for the Pythons whose socket module lacks the name.
IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)
#: Room for one in6_pktinfo (20 bytes), the larger of the two.
ANCILLARY_SPACE = socket.CMSG_SPACE(20)

Ancillary = List[Tuple[int, int, bytes]]

_NO_INTERFACE = bytes(4)


def enable(sock: socket.socket) -> bool:
    """Ask for each datagram's destination if ``sock`` listens on a wildcard address: True if so."""
    if sock.getsockname()[0] not in ("0.0.0.0", "::"):
        return False
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    return True


def reply_ancillary(received: Any) -> Ancillary:
    """The ancillary data that sends a reply from the destination in ``received`` (from
    ``recvmsg_into``); empty (the kernel chooses) if there is none or it cannot be a source."""
    for level, kind, data in received:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            # in_pktinfo: ifindex, spec_dst, addr.  spec_dst is the destination for a unicast
            # datagram, and this host's address on that network for a broadcast one.
            return [(level, kind, _NO_INTERFACE + data[4:8] + _NO_INTERFACE)]
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
            if data[0] == 0xFF:  # multicast: no source to send from
                return []
            link_local = data[0] == 0xFE and data[1] & 0xC0 == 0x80
            return [(level, kind, bytes(data[:16]) + (bytes(data[16:20]) if link_local else _NO_INTERFACE))]
    return []


def read_with_destinations(listener: Any) -> None:
    """``DatagramListener.handle_read`` on a wildcard address: each datagram's destination is
    noted on its session, for the replies' source."""
    recvmsg_into = listener.socket.recvmsg_into
    buffers = [listener.scratch]
    now = time.monotonic()
    for _ in range(DATAGRAMS_PER_EVENT):
        try:
            size, ancillary, _, client = recvmsg_into(buffers, ANCILLARY_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            log.debug("%s: recvmsg: %s", listener.label, describe_error(error))
            continue
        session = listener.session_for(client, now)
        if session is None:
            continue
        if ancillary and ancillary[0][2] != session.destination:  # (once, unless the client changes it)
            session.destination = ancillary[0][2]
            session.reply_ancillary = reply_ancillary(ancillary)
        session.to_server(listener.scratch[:size], now)
