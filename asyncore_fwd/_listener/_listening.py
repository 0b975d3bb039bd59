"""A rule's listening socket: made, bound and listening, or one line that says why not.

Strategy: every failure to listen is an ``OSError`` whose message names
the address (``cannot listen on HOST:PORT: ...``), so a start or a reload
fails in one line; under select(), a socket it could never watch counts as
one that cannot listen, rather than a listener that would be deaf.  For
``down()``, the port closes and opens again while the dispatcher keeps its
place in the map.
"""

from __future__ import annotations

import socket
from typing import Any

from .._compat import asyncore
from .._eventloop import _loop
from .._net import SockAddr, SocketMap, describe_error, format_address, listen_address
from .._values._rules import Rule

__all__ = ["ListeningSocket"]


class ListeningSocket(asyncore.dispatcher):
    """The dispatcher part that opens a rule's listening socket (a ``Forwarder`` is one)."""

    rule: Rule
    _map: SocketMap
    #: The address bound, whole (an IPv6 scope id too): where the port opens again.
    _sockaddr: SockAddr
    socket: Any  # (set, once listening: asyncore's stubs say Optional)

    def _listen(self) -> None:
        """Make the socket, bind it to the rule's local address and listen."""
        family, address = listen_address(self.rule.local_host, self.rule.local_port)
        self.create_socket(family, socket.SOCK_STREAM)
        try:
            self._bind_and_listen(address)
        except BaseException:
            self.close()
            raise

    def _bind_and_listen(self, address: SockAddr) -> None:
        """Bind this dispatcher's socket to ``address`` and listen; OSError with a one-line message."""
        try:
            self.set_reuse_addr()
            if self.rule.reuse_port:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self.bind(address)
            self.listen(self.rule.backlog)
            _loop.check_watchable(self._map, self.socket)  # a reload under select(): refused, not deaf
        except OSError as error:
            where = format_address((self.rule.local_host, address[1]))
            raise OSError(error.errno, f"cannot listen on {where}: {describe_error(error)}") from None

    def _close_port(self) -> None:
        """For ``down()``: stop listening, keeping this dispatcher's place in the map."""
        # A fresh socket that is neither bound nor listening: the dispatcher
        # keeps its place in the map while the port refuses connects.
        old = self.socket
        self.del_channel()
        idle = socket.socket(old.family, socket.SOCK_STREAM)
        idle.setblocking(False)
        self.set_socket(idle)
        self.accepting = False
        old.close()

    def _reopen_port(self) -> None:
        """For the end of ``down()``: listen again on the same address and port, or raise OSError."""
        try:
            self._bind_and_listen(self._sockaddr)
        except OSError:
            self._close_port()  # still down; the next down() block tries again
            raise
