"""Small network helpers shared by the relay and the listener.

Socket-address formatting, one-line error descriptions, reading a socket's
pending error, the options of a relayed socket (keepalive, the source
address of a connect), the remote's addresses (resolved at start,
refreshed off the loop), and a registry of one object per socket map.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import struct
import sys
import threading
import time
from typing import Any, Dict, Generic, List, Optional, Tuple, TypeVar

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["OUT_OF_RESOURCES", "acknowledge_urgent", "LINGER_ABORT", "RESOLVE_INTERVAL", "PerMap", "RemoteAddresses",
           "SPLICE_AVAILABLE", "SockAddr", "SocketMap", "bind_source", "check_source", "describe_error", "end_key",
           "family_of", "format_address", "listen_address", "os_error", "pending_error", "reset", "set_keepalive",
           "strip_brackets", "tune"]

#: True where os.splice() and pipe sizing exist (Linux, Python 3.10+): what the splice relay needs.
SPLICE_AVAILABLE = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")

log = logging.getLogger("asyncore_fwd")

#: The option that defers a bound socket's port to its connect (Linux 4.2; named by Python 3.12, 24 on Linux).
_BIND_NO_PORT: Optional[int] = getattr(socket, "IP_BIND_ADDRESS_NO_PORT",
                                       24 if sys.platform.startswith("linux") else None)

#: How long a resolved remote hostname is trusted before it is looked up again.
RESOLVE_INTERVAL = 60.0

# accept() errors that mean "no resources now": pause instead of spinning.
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
LINGER_ABORT = struct.pack("ii", 1, 0)

SockAddr = Tuple[Any, ...]
SocketMap = Dict[int, Any]
T = TypeVar("T")


class PerMap(Generic[T]):
    """One object per asyncore socket map (the map's timers, its wake-up pipe), found by the map's identity."""

    def __init__(self) -> None:
        # The map is kept in its entry, so that its id() cannot be reused by
        # another dict while the entry exists.
        self._entries: Dict[int, Tuple[SocketMap, T]] = {}

    def get(self, map: SocketMap) -> Optional[T]:
        """The object of ``map``, or None."""
        entry = self._entries.get(id(map))
        return entry[1] if entry is not None and entry[0] is map else None

    def set(self, map: SocketMap, value: T) -> T:
        """Make ``value`` the object of ``map``; returns it."""
        self._entries[id(map)] = (map, value)
        return value

    def forget(self, map: SocketMap, value: Optional[T] = None) -> None:
        """Drop the object of ``map`` (only if it is ``value``, when given)."""
        current = self.get(map)
        if current is not None and (value is None or current is value):
            del self._entries[id(map)]


def format_address(address: SockAddr) -> str:
    """``127.0.0.1:80`` or ``[::1]:80`` for a socket address."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe_error(error: BaseException) -> str:
    """A one-line description of a network error, without a traceback."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def end_key(address: SockAddr) -> Tuple[str, int]:
    """(host, port) of one end of a connection, an IPv4-mapped IPv6 host as
    plain IPv4: the same end, seen by an IPv4 socket or a dual-stack one."""
    host = address[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, address[1]


def os_error(code: int, message: Optional[str] = None) -> OSError:
    """An OSError for ``code``, with the system's message unless one is given."""
    return OSError(code, message or os.strerror(code))


def pending_error(sock: socket.socket) -> int:
    """The socket's pending error (SO_ERROR, which reading clears); EBADF if closed."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError as error:
        return error.errno or errno.EBADF


def strip_brackets(host: str) -> str:
    """``::1`` for ``[::1]``: IPv6 literals may be written in brackets."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def tune(sock: socket.socket) -> None:
    """Set a relayed socket's options: no Nagle delay, urgent data in line.

    No Nagle: we pass writes on as they come, the sender already batched
    them.  SO_OOBINLINE: a TCP urgent byte stays in the stream, in its
    place, so it is relayed exactly once and in order, like any other byte
    (it arrives at the other end as ordinary data, no longer marked urgent).
    """
    for level, option in ((socket.IPPROTO_TCP, socket.TCP_NODELAY), (socket.SOL_SOCKET, socket.SO_OOBINLINE)):
        try:
            sock.setsockopt(level, option, 1)
        except OSError:
            pass


def set_keepalive(sock: socket.socket, seconds: float) -> None:
    """Turn TCP keepalive on: probes after ``seconds`` without a byte either way (rounded up:
    the kernel counts whole seconds).

    Only the idle time is set (TCP_KEEPIDLE); the probes' interval and count
    are the kernel's.  Where TCP_KEEPIDLE does not exist, SO_KEEPALIVE alone
    (the system's idle time, two hours by default).
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, math.ceil(seconds))
    except OSError:
        pass  # closed already: the error shows on the next read or write


def family_of(ip: str) -> int:
    """AF_INET6 for an IPv6 address, AF_INET for an IPv4 one."""
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def bind_source(sock: socket.socket, ip: str) -> None:
    """Bind ``sock``, before its connect, to the local address ``ip`` (the kernel picks the port);
    OSError with a one-line message naming the address.

    Where the system has IP_BIND_ADDRESS_NO_PORT (Linux), the port is picked at
    the connect, as without a bind: a port is then shared by connects to
    different servers, instead of one port per connect from the address, which
    would cap them at the size of the ephemeral range (HAProxy and nginx do the same).
    """
    try:
        if _BIND_NO_PORT is not None:
            try:
                sock.setsockopt(socket.IPPROTO_IP, _BIND_NO_PORT, 1)
            except OSError:
                pass  # an older kernel: one port per connect, as with a plain bind
        sock.bind((ip, 0))
    except OSError as error:
        raise OSError(error.errno, f"cannot bind to source address {ip}: {describe_error(error)}") from None


def check_source(ip: str) -> None:
    """OSError, in one line, unless connects can be made from ``ip``: one throwaway socket
    is bound to it (an address not on this machine fails with EADDRNOTAVAIL)."""
    with socket.socket(family_of(ip), socket.SOCK_STREAM) as probe:
        bind_source(probe, ip)


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with a reset (RST) instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
    except OSError:
        pass
    sock.close()


def acknowledge_urgent(sock: socket.socket) -> None:
    """Stop the kernel reporting a pending urgent byte, and leave it in the stream.

    The byte is read out of band once, with SO_OOBINLINE off: that clears
    the exceptional condition that select() and poll() report.  With
    SO_OOBINLINE back on, an ordinary read still returns the byte in its
    place (Linux keeps it in the stream and skips it only for sockets
    without SO_OOBINLINE), so it is relayed once, in order.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 0)
        try:
            sock.recv(1, socket.MSG_OOB)
        except OSError:
            pass  # not there yet, or already acknowledged: nothing is reported then
        finally:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    except OSError:
        pass  # closed: the error shows on the next read or write


class RemoteAddresses:
    """The remote's socket addresses, resolved at start, refreshed off the loop.

    A hostname is looked up once when the forwarder starts (so a typo fails
    at once), then again in a background thread when the answer is older than
    ``RESOLVE_INTERVAL``; until the new answer arrives the old one is used, so
    a slow DNS server never stalls the loop.  A failed refresh keeps the old
    answer.  An IP literal is never looked up again.  With ``family`` (a
    source address's), only the addresses of that family are kept, and a
    name with none of them fails as an unknown one does.
    """

    def __init__(self, host: str, port: int, family: int = socket.AF_UNSPEC) -> None:
        self.host, self.port, self.family = host, port, family
        self._addresses = self._resolve()
        self._resolved_at = time.monotonic()
        self._refreshing = False
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
            self._numeric = True
        except socket.gaierror:
            self._numeric = False

    def _resolve(self) -> List[Tuple[int, SockAddr]]:
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            raise OSError(error.errno, f"cannot resolve remote host {self.host!r}: {error.strerror}") from None
        except UnicodeError:  # the IDNA codec rejects it: an empty or over-long label
            raise OSError(errno.EINVAL, f"cannot resolve remote host {self.host!r}: not a valid host name") from None
        addresses: List[Tuple[int, SockAddr]] = []
        for family, _, _, _, sockaddr in infos:
            if (family, sockaddr) not in addresses and self.family in (socket.AF_UNSPEC, family):
                addresses.append((family, sockaddr))
        if not addresses:  # (getaddrinfo never answers with nothing: the family filtered them all out)
            version = "IPv6" if self.family == socket.AF_INET6 else "IPv4"
            raise OSError(errno.EADDRNOTAVAIL, f"remote host {self.host!r} has no {version} address, "
                                               f"and the source address is {version}")
        return addresses

    @property
    def last_answer(self) -> List[Tuple[int, SockAddr]]:
        """The addresses as last resolved, without starting a refresh."""
        return self._addresses

    def current(self) -> List[Tuple[int, SockAddr]]:
        """The addresses to try, in order; starts a refresh if they are stale."""
        if (not self._numeric and not self._refreshing
                and time.monotonic() - self._resolved_at > RESOLVE_INTERVAL):
            self._refreshing = True
            try:
                threading.Thread(target=self._refresh, name="asyncore_fwd-resolve", daemon=True).start()
            except RuntimeError as error:  # no thread to spare: keep the old answer, retry later
                self._refreshing = False
                self._resolved_at = time.monotonic()
                log.warning("cannot look up %s again now: %s", self.host, error)
        return self._addresses

    def _refresh(self) -> None:
        try:
            self._addresses = self._resolve()  # one assignment: atomic for the loop thread
        except OSError as error:
            log.warning("keeping the old addresses of %s: %s", self.host, describe_error(error))
        finally:
            self._resolved_at = time.monotonic()
            self._refreshing = False


def descriptor_limit() -> Optional[int]:
    """The process's soft limit on open descriptors (RLIMIT_NOFILE), or None if it has none."""
    try:
        import resource  # (not on Windows)
    except ImportError:  # pragma: no cover
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def listen_address(host: str, port: int) -> Tuple[int, SockAddr]:
    """(family, sockaddr) to bind for ``host:port``; OSError with a one-line message."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise OSError(error.errno, f"cannot resolve local address {host!r}: {error.strerror}") from None
    except UnicodeError:  # the IDNA codec rejects it: an empty or over-long label
        raise OSError(errno.EINVAL, f"cannot resolve local address {host!r}: not a valid host name") from None
    family, _, _, _, address = infos[0]
    return family, address


