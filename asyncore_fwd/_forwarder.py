"""The forwarder: the article's three dispatchers, made correct.

The article's design is kept: a listening ``Forwarder`` accepts a client,
wraps it in a ``Receiver`` (talks to the client) and pairs it with a
``Sender`` (talks to the server).  Both halves are the same idea -- "what I
read, my peer writes" -- so they share one base class, ``_Pipe``, as in
Twisted's ``portforward.Proxy``.  A ``Connection`` owns the pair: it is the
one place where a pair is created and closed, and it keeps what the logs
report (addresses, bytes each way, duration, who closed first).

Strategy, in the order the loop sees it:

* **Backpressure.**  A side is ``readable()`` only while the bytes waiting
  for its peer are under ``high_water``.  When the slow side cannot keep up,
  the fast side simply stops being asked for reads, and the kernel's own
  buffers push back on the sender.  Memory per connection is bounded.
* **Half-close.**  EOF on one side is not the end of the connection: first
  everything already read from that side is written to the other one, then
  the EOF is passed on with ``shutdown(SHUT_WR)``.  The pair closes when both
  directions have done this, or at once on an error.  A side that has seen
  EOF stops asking for read events, so the loop does not spin on it.
* **Timers without a timer API.**  asyncore has none, but it asks every
  dispatcher ``readable()`` and ``writable()`` once per round; the connect
  timeout and the pause after EMFILE are checked there.  Their precision is
  the loop's timeout (``serve_forever`` uses half a second), or under the
  epoll loop its sweep interval (also half a second).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from . import _loop
from ._compat import asyncore

__all__ = ["Forwarder", "Receiver", "Sender", "Connection", "Rule", "forwarder", "receiver", "sender"]

log = logging.getLogger("asyncore_fwd")

KiB = 1024
#: Stop reading from a side while this many bytes wait for the other side.
DEFAULT_HIGH_WATER = 512 * KiB
#: Bytes asked of the kernel per read.
DEFAULT_READ_SIZE = 256 * KiB
DEFAULT_CONNECT_TIMEOUT = 10.0
#: How long a resolved remote hostname is trusted before it is looked up again.
RESOLVE_INTERVAL = 60.0
#: How long the listener stops accepting when the process is out of descriptors.
ACCEPT_PAUSE = 0.5
#: Connections taken from the backlog per readiness event of the listener.
ACCEPTS_PER_EVENT = 128
#: The listen queue: deep enough for a burst of thousands of connects (the
#: article's 5 drops SYNs, and each dropped one waits a second to retry).
#: The kernel caps it at net.core.somaxconn.
DEFAULT_BACKLOG = 4096

# accept() errors that mean "no resources now": pause instead of spinning.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_LINGER_ABORT = struct.pack("ii", 1, 0)

SockAddr = Tuple[Any, ...]
SocketMap = Dict[int, Any]


def format_address(address: SockAddr) -> str:
    """``127.0.0.1:80`` or ``[::1]:80`` for a socket address."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _describe(error: BaseException) -> str:
    """A one-line description of a network error, without a traceback."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _os_error(code: int, message: Optional[str] = None) -> OSError:
    return OSError(code, message or os.strerror(code))


def _pending_error(sock: socket.socket) -> int:
    """The socket's pending error (SO_ERROR, which reading clears); EBADF if closed."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError as error:
        return error.errno or errno.EBADF


def _strip_brackets(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _check_port(name: str, port: object, lowest: int) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not lowest <= port <= 65535:
        raise ValueError(f"{name} must be an integer from {lowest} to 65535, not {port!r}")


def _check_positive(name: str, value: object, kind: type) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or not 0 < value < float("inf"):  # type: ignore[operator]
        raise ValueError(f"{name} must be a positive {kind.__name__}, not {value!r}")


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

    def __post_init__(self) -> None:
        for name in ("local_host", "remote_host"):
            host = getattr(self, name)
            if not isinstance(host, str) or not _strip_brackets(host):
                raise ValueError(f"{name} must be a non-empty string, not {host!r}")
            object.__setattr__(self, name, _strip_brackets(host))
        _check_port("local_port", self.local_port, 0)
        _check_port("remote_port", self.remote_port, 1)
        if isinstance(self.backlog, bool) or not isinstance(self.backlog, int) or not 0 <= self.backlog <= 65535:
            raise ValueError(f"backlog must be an integer from 0 to 65535, not {self.backlog!r}")
        if isinstance(self.connect_timeout, int) and not isinstance(self.connect_timeout, bool):
            object.__setattr__(self, "connect_timeout", float(self.connect_timeout))
        _check_positive("connect_timeout", self.connect_timeout, float)
        _check_positive("high_water", self.high_water, int)
        _check_positive("read_size", self.read_size, int)
        for name in ("splice", "reuse_port"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, not {getattr(self, name)!r}")
        if self.reuse_port and not hasattr(socket, "SO_REUSEPORT"):
            raise ValueError("reuse_port=True needs SO_REUSEPORT, which this platform does not have")
        if self.splice:
            from ._splice import AVAILABLE
            if not AVAILABLE:
                raise ValueError("splice=True needs os.splice(), which this platform does not have")

    @property
    def remote(self) -> str:
        """The remote as written in logs: ``host:port``."""
        return format_address((self.remote_host, self.remote_port))


class _RemoteAddresses:
    """The remote's socket addresses, resolved at start, refreshed off the loop.

    A hostname is looked up once when the forwarder starts (so a typo fails
    at once), then again in a background thread when the answer is older than
    ``RESOLVE_INTERVAL``; until the new answer arrives the old one is used, so
    a slow DNS server never stalls the loop.  A failed refresh keeps the old
    answer.  An IP literal is never looked up again.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
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
            if (family, sockaddr) not in addresses:
                addresses.append((family, sockaddr))
        return addresses

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
            log.warning("keeping the old addresses of %s: %s", self.host, _describe(error))
        finally:
            self._resolved_at = time.monotonic()
            self._refreshing = False


class _Dispatcher(asyncore.dispatcher):
    """asyncore's dispatcher, with its messages sent to ``logging`` instead of stdout."""

    _LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

    def log_info(self, message: str, type: str = "info") -> None:
        log.log(self._LEVELS.get(type, logging.INFO), "%r: %s", self, message)

    # An epoll loop keeps registrations between rounds: tell it at once when
    # a socket joins or leaves the map, rather than wait for its next sweep.
    def add_channel(self, map: Optional[SocketMap] = None) -> None:
        super().add_channel(map)
        _loop.channel_added(self)

    def del_channel(self, map: Optional[SocketMap] = None) -> None:
        fd = self._fileno
        super().del_channel(map)
        _loop.channel_removed(self, fd)


class Connection:
    """One forwarded connection: a ``Receiver``, a ``Sender`` and what happened to them.

    Created by the forwarder for each accepted client; closed once, by
    ``close()``, which tells the forwarder.
    """

    _ids = itertools.count(1)

    def __init__(self, forwarder: Forwarder, sock: socket.socket, client_address: SockAddr) -> None:
        self.id = next(self._ids)
        self.forwarder = forwarder
        self.rule = forwarder.rule
        self.client_address = client_address
        #: The server address actually connected to, once connected.
        self.server_address: Optional[SockAddr] = None
        self.opened_at = time.monotonic()
        self.closed_at: Optional[float] = None
        #: True from the server connect until the pair closes: both sides may relay.
        self.established = False
        self.closed = False
        #: "client" or "server": the first side to send EOF or fail.
        self.closed_first: Optional[str] = None
        #: Why the pair closed early (reset, refused, timeout...), or None.
        self.error: Optional[str] = None
        self.receiver = forwarder.receiver_class(self, sock)
        try:
            self.sender = forwarder.sender_class(self)
        except BaseException:
            self.receiver.close_socket()
            raise
        self.receiver.peer, self.sender.peer = self.sender, self.receiver
        forwarder.connections.add(self)
        forwarder.connection_opened(self)
        self.sender.connect_next()

    def __repr__(self) -> str:
        return f"<Connection #{self.id} from {format_address(self.client_address)}>"

    @property
    def bytes_to_server(self) -> int:
        return self.sender.bytes_sent

    @property
    def bytes_to_client(self) -> int:
        return self.receiver.bytes_sent

    @property
    def duration(self) -> float:
        """Seconds from accept to close (or until now, while open)."""
        return (self.closed_at or time.monotonic()) - self.opened_at

    def established_to(self, address: SockAddr) -> None:
        """The server side connected: from now on both sides relay."""
        self.server_address = address
        self.established = True
        self.forwarder.connection_established(self)

    def side_finished(self, side: _Pipe) -> None:
        """Record which side closed first (sent EOF or failed)."""
        if self.closed_first is None:
            self.closed_first = side.role

    def abort(self, side: _Pipe, error: BaseException) -> None:
        """``side`` failed: close both at once, resetting the other side.

        A reset is passed on as a reset: a clean FIN would tell the other
        peer that the stream ended normally when it was cut short.
        """
        if self.closed:
            return
        self.side_finished(side)
        self.error = f"{side.role}: {_describe(error)}"
        side.peer.reset_on_close()
        self.close()

    def close(self) -> None:
        """Close both sockets (once) and tell the forwarder."""
        if self.closed:
            return
        self.closed = True
        self.closed_at = time.monotonic()
        self.established = False
        self.receiver.close_socket()
        self.sender.close_socket()
        self.forwarder.connections.discard(self)
        self.forwarder.connection_closed(self)


class _Pipe(_Dispatcher):
    """One socket of a forwarded pair: what it reads goes to its peer.

    ``outgoing`` holds the bytes read from the peer that this socket has not
    sent yet; ``eof_received`` is set when this socket reads EOF;
    ``write_closed`` once the peer's EOF has been passed on here.
    """

    role = "?"
    peer: _Pipe

    def __init__(self, conn: Connection, sock: Optional[socket.socket] = None) -> None:
        self.conn = conn
        self.outgoing = bytearray()
        self.eof_received = False
        self.write_closed = False
        self.bytes_sent = 0
        super().__init__(sock, map=conn.forwarder._map)
        if sock is not None:
            _tune(sock)

    # -- select() predicates --------------------------------------------

    def readable(self) -> bool:
        """Read while the pair relays, until EOF, and while the peer keeps up."""
        return (self.conn.established and not self.eof_received
                and len(self.peer.outgoing) < self.conn.rule.high_water)

    def writable(self) -> bool:
        """Ask for write events only when there is something to send."""
        return bool(self.outgoing)

    # -- event handlers ---------------------------------------------------

    def handle_read(self) -> None:
        """Called when the socket has data or EOF: hand the bytes to the peer."""
        if not self.readable():
            return  # a stale event (the pair closed, or the peer filled up this round)
        scratch = self.conn.forwarder.scratch
        try:
            count = self.socket.recv_into(scratch)
        except (BlockingIOError, InterruptedError):
            return  # spurious readiness: nothing to read after all
        except OSError as error:
            self.conn.abort(self, error)
            return
        if count:
            self.peer.forward(scratch[:count])
        else:
            self.handle_eof()

    def handle_write(self) -> None:
        """Called when the socket can take more: send what the peer read, then its EOF."""
        if self.outgoing:
            try:
                sent = self.socket.send(self.outgoing)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                self.conn.abort(self, error)
                return
            # bytearray deletes from the front without copying the rest.
            del self.outgoing[:sent]
            self.bytes_sent += sent
        if not self.outgoing and self.peer.eof_received:
            self.shutdown_write()

    def handle_close(self) -> None:
        """Called by the poll loop on POLLHUP/POLLERR, and by asyncore on a reset.

        A hang-up is not a reason to drop data: the kernel may still hold
        bytes the peer sent before its FIN, so keep reading (and writing) as
        usual; EOF and errors are handled where they are seen.
        """
        if self.conn.closed:
            return
        code = _pending_error(self.socket)
        if code:
            self.conn.abort(self, _os_error(code))
        elif self.readable():
            self.handle_read()
        elif self.writable():
            self.handle_write()

    def handle_expt(self) -> None:
        """Called on TCP urgent data: pass the urgent byte on, as urgent.

        Reading it out of band clears the condition at once, even while this
        side is paused; otherwise select() would report it every round.
        """
        try:
            urgent = self.socket.recv(1, socket.MSG_OOB)
            if urgent and self.conn.established:
                self.peer.socket.send(urgent, socket.MSG_OOB)
        except OSError:
            pass  # best effort: urgent data is advisory, the stream goes on

    def handle_error(self) -> None:
        """Called by the loop when a handler raised: close this pair only."""
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            log.exception("%r: internal error", self.conn)
        self.conn.abort(self, error or RuntimeError("unknown error"))

    # -- helpers ----------------------------------------------------------

    def handle_eof(self) -> None:
        """This socket read EOF: pass it on once everything read from it is written."""
        self.eof_received = True
        self.conn.side_finished(self)
        if not self.peer.outgoing:
            self.peer.shutdown_write()

    def forward(self, data: memoryview) -> None:
        """Queue bytes read by the peer; send at once if nothing is queued."""
        if not self.outgoing:
            # The common case on a fast path: one send straight from the read
            # buffer saves a copy and a round of the loop.
            try:
                sent = self.socket.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as error:
                self.conn.abort(self, error)
                return
            self.bytes_sent += sent
            if sent == len(data):
                return
            data = data[sent:]
        self.outgoing += data

    def shutdown_write(self) -> None:
        """Pass the peer's EOF on; close the pair if the other way is done too."""
        if self.write_closed:
            return
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as error:
            self.conn.abort(self, error)
            return
        self.write_closed = True
        if self.peer.write_closed:
            self.conn.close()

    def reset_on_close(self) -> None:
        """Make the coming close send RST instead of FIN (only once connected)."""
        if self.connected:
            try:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
            except OSError:
                pass

    def close_socket(self) -> None:
        """Close this socket and forget its buffer (the pair is closing)."""
        self.outgoing = bytearray()
        asyncore.dispatcher.close(self)

    def close(self) -> None:
        """Closing either side closes the whole pair (e.g. ``asyncore.close_all``)."""
        self.conn.close()


class Receiver(_Pipe):
    """The client's side of a connection (the article's ``receiver``)."""

    role = "client"


class Sender(_Pipe):
    """The server's side of a connection (the article's ``sender``).

    Connects to each address of the remote in turn until one answers within
    the connect timeout; if none does, the client is closed.
    """

    role = "server"

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        self._candidates = list(conn.forwarder.remote_addresses())
        self._deadline = 0.0
        self._last_error: Optional[OSError] = None

    # -- select() predicates --------------------------------------------

    def writable(self) -> bool:
        """While connecting: wait for the connect (and check its timeout)."""
        if not self.connecting:
            return bool(self.outgoing)
        if time.monotonic() < self._deadline:
            return True
        timeout = self.conn.rule.connect_timeout
        self.connect_next(_os_error(errno.ETIMEDOUT, f"connect timed out after {timeout:g} s"))
        return False  # this round's descriptor is gone; the next one registers next round

    # -- event handlers ---------------------------------------------------

    def handle_connect_event(self) -> None:
        """Called on the first write event while connecting: did the connect work?"""
        code = _pending_error(self.socket)
        if code:
            self.connect_next(_os_error(code))
            return
        try:
            self.socket.getpeername()
        except OSError:
            # Not connected yet: a stale event meant for a closed socket whose
            # descriptor number we reuse (python/cpython#75114).  Keep waiting.
            return
        super().handle_connect_event()  # calls handle_connect(), sets connected
        self.conn.established_to(self.addr)

    def handle_connect(self) -> None:
        """Called once the connect to the server succeeds, before relaying starts."""
        _tune(self.socket)

    def handle_close(self) -> None:
        if self.connecting:
            # Only a pending error counts: after a retry earlier in this same
            # poll round the flag may belong to the previous attempt's socket.
            code = _pending_error(self.socket)
            if code:
                self.connect_next(_os_error(code))
        else:
            super().handle_close()

    def handle_error(self) -> None:
        error = sys.exc_info()[1]
        if self.connecting and isinstance(error, OSError):
            self.connect_next(error)
        else:
            super().handle_error()

    # -- helpers ----------------------------------------------------------

    def connect_next(self, error: Optional[OSError] = None) -> None:
        """Start connecting to the next address; close the client when none is left."""
        if error is not None:
            self._last_error = error
        asyncore.dispatcher.close(self)  # the failed attempt's socket, if any
        while self._candidates and not self.conn.closed:
            family, address = self._candidates.pop(0)
            try:
                self.create_socket(family, socket.SOCK_STREAM)
                self._deadline = time.monotonic() + self.conn.rule.connect_timeout
                self.connect(address)
                return
            except OSError as failure:
                if failure.errno in _OUT_OF_RESOURCES:
                    self.conn.forwarder.pause_accepting(failure)
                self._last_error = _os_error(failure.errno) if failure.errno else failure
                asyncore.dispatcher.close(self)
        if not self.conn.closed:
            failure = self._last_error or _os_error(errno.EHOSTUNREACH)
            self.conn.error = f"cannot connect to {self.conn.rule.remote}: {_describe(failure)}"
            self.conn.close()


def _tune(sock: socket.socket) -> None:
    """No Nagle delay: we pass writes on as they come, the sender already batched them."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


class Forwarder(_Dispatcher):
    """Listens on ``ip:port`` and forwards each client to ``remoteip:remoteport``.

    Keeps the article's signature.  The remote may be a hostname or an IPv4/
    IPv6 address; it is resolved now, so an unknown host raises ``OSError``
    here, as does a port already in use.  ``port=0`` binds a free port: see
    ``address``.  ``map`` is the asyncore map to join (the global one by
    default, as in asyncore); run it with ``serve_forever()`` or with your own
    ``asyncore.loop(use_poll=True, map=...)``.  ``splice=True`` relays with
    os.splice() (Linux) instead of copying through Python; ``reuse_port=True``
    lets other processes listen on the same port (see ``--workers``).
    """

    #: The classes of a connection's two sides (splice=True swaps in others).
    receiver_class: type = Receiver
    sender_class: type = Sender

    def __init__(self, ip: str, port: int, remoteip: str, remoteport: int, backlog: int = DEFAULT_BACKLOG, *,
                 map: Optional[SocketMap] = None,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 high_water: int = DEFAULT_HIGH_WATER,
                 read_size: int = DEFAULT_READ_SIZE,
                 splice: bool = False,
                 reuse_port: bool = False) -> None:
        self.rule = Rule(ip, port, remoteip, remoteport, backlog, connect_timeout, high_water, read_size, splice,
                         reuse_port)
        if self.rule.splice:
            from ._splice import SpliceReceiver, SpliceSender
            self.receiver_class, self.sender_class = SpliceReceiver, SpliceSender
        #: The live connections, for stats and for closing them all.
        self.connections: set[Connection] = set()
        #: One read buffer for every connection: the loop runs one handler at a time.
        self.scratch = memoryview(bytearray(self.rule.read_size))
        self._remote = _RemoteAddresses(self.rule.remote_host, self.rule.remote_port)
        self._resume_accepting_at = 0.0
        self._stop_requested = False
        super().__init__(map=map)
        family, address = _listen_address(self.rule.local_host, self.rule.local_port)
        self.create_socket(family, socket.SOCK_STREAM)
        try:
            self.set_reuse_addr()
            if self.rule.reuse_port:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self.bind(address)
            self.listen(self.rule.backlog)
        except OSError as error:
            self.close()
            where = format_address((self.rule.local_host, self.rule.local_port))
            raise OSError(error.errno, f"cannot listen on {where}: {_describe(error)}") from None
        except BaseException:
            self.close()
            raise
        self._address: Tuple[str, int] = self.socket.getsockname()[:2]
        self.addr = self._address  # asyncore's repr shows it: the real port, not 0

    @property
    def address(self) -> Tuple[str, int]:
        """The (host, port) actually bound: the port to use after ``port=0``."""
        return self._address

    def remote_addresses(self) -> List[Tuple[int, SockAddr]]:
        """(family, sockaddr) of the remote to try, in order."""
        return self._remote.current()

    # -- running ----------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5, loop: str = "auto") -> None:
        """Run the loop on this forwarder's map until ``stop()``, then ``close()``.

        ``loop`` is ``"epoll"``, ``"poll"``, ``"select"`` or ``"auto"`` (the
        best the platform has).  select() fails past descriptor 1023; epoll's
        cost follows the active connections, not the open ones.  ``stop()``
        takes effect within ``poll_interval`` seconds.
        """
        backend = _loop.open_loop(loop, self._map)
        try:
            while not self._stop_requested and self._map:
                backend.poll(poll_interval)
        finally:
            self.close()
            backend.close()

    def stop(self) -> None:
        """Ask ``serve_forever`` to return.  Safe from another thread or a signal handler."""
        self._stop_requested = True

    def close(self) -> None:
        """Stop listening and close every connection this forwarder made."""
        asyncore.dispatcher.close(self)
        for conn in list(self.connections):
            conn.close()

    # -- select() predicates --------------------------------------------

    def readable(self) -> bool:
        """Accept, except during a pause after running out of descriptors."""
        if self._resume_accepting_at:
            if time.monotonic() < self._resume_accepting_at:
                return False
            self._resume_accepting_at = 0.0
            log.info("accepting connections again on %s", format_address(self.address))
        return True

    def writable(self) -> bool:
        return False

    # -- event handlers ---------------------------------------------------

    def handle_accept(self) -> None:
        """Called when clients wait in the backlog: take up to ``ACCEPTS_PER_EVENT``."""
        for _ in range(ACCEPTS_PER_EVENT):
            try:
                accepted = self.accept()  # None when the client already left
            except OSError as error:
                if error.errno in _OUT_OF_RESOURCES:
                    self.pause_accepting(error)
                else:
                    log.warning("accept on %s failed: %s", format_address(self.address), _describe(error))
                return
            if accepted is None:
                return
            self.handle_accepted(*accepted)
            if self._resume_accepting_at:
                return

    def handle_accepted(self, sock: socket.socket, addr: SockAddr) -> None:
        """Called with each new client socket: pair it with a connection to the remote."""
        try:
            Connection(self, sock, addr)
        except OSError as error:
            sock.close()
            if error.errno in _OUT_OF_RESOURCES:
                self.pause_accepting(error)
            else:
                log.warning("dropped client %s: %s", format_address(addr), _describe(error))

    def handle_close(self) -> None:
        """Called on an error flag on the listener: never close it, just pause."""
        self.pause_accepting(_os_error(_pending_error(self.socket) or errno.EIO))

    def handle_error(self) -> None:
        """Called when a handler raised: keep listening, pause so a repeat cannot spin."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            self.pause_accepting(error)
        else:
            log.exception("%r: internal error", self)
            self.pause_accepting(RuntimeError("internal error"))

    # -- helpers ----------------------------------------------------------

    def pause_accepting(self, error: BaseException) -> None:
        """Stop accepting for ``ACCEPT_PAUSE`` s (out of descriptors, or an error)."""
        if not self._resume_accepting_at:
            log.warning("not accepting on %s for %g s: %s", format_address(self.address),
                        ACCEPT_PAUSE, _describe(error))
        self._resume_accepting_at = time.monotonic() + ACCEPT_PAUSE

    # -- events: override to log, count or trace differently ---------------

    def connection_opened(self, conn: Connection) -> None:
        """A client was accepted; the server connect starts."""
        log.debug("#%d accepted from %s", conn.id, format_address(conn.client_address))

    def connection_established(self, conn: Connection) -> None:
        """The server side connected; bytes flow both ways."""
        assert conn.server_address is not None
        log.debug("#%d connected to %s (%s)", conn.id, self.rule.remote, format_address(conn.server_address))

    def connection_closed(self, conn: Connection) -> None:
        """The pair closed: one line with what it moved and why it ended."""
        summary = (f"#{conn.id} from {format_address(conn.client_address)} closed after "
                   f"{conn.duration:.3f} s: {conn.bytes_to_server} bytes to server, "
                   f"{conn.bytes_to_client} bytes to client, {conn.closed_first or 'forwarder'} closed first")
        if conn.error:
            log.warning("%s (%s)", summary, conn.error)
        else:
            log.debug("%s", summary)


def _listen_address(host: str, port: int) -> Tuple[int, SockAddr]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise OSError(error.errno, f"cannot resolve local address {host!r}: {error.strerror}") from None
    except UnicodeError:  # the IDNA codec rejects it: an empty or over-long label
        raise OSError(errno.EINVAL, f"cannot resolve local address {host!r}: not a valid host name") from None
    family, _, _, _, address = infos[0]
    return family, address


# The article's lowercase names, for code written against it.
forwarder = Forwarder
receiver = Receiver
sender = Sender
