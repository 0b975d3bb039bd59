"""One forwarded connection: the pair of sides it owns, and what happened to them.

A ``Connection`` is the one place where a pair is created and closed, and it
keeps what the logs report (addresses, bytes each way, duration, who closed
first, why it ended early).  ``cut()`` ends many at once, with resets.
"""

from __future__ import annotations

import itertools
import socket
import time
from typing import TYPE_CHECKING, Iterable, Optional, Protocol, Sized

from .._net import SockAddr, describe_error, format_address
from .._ops._timeouts import Timeouts

if TYPE_CHECKING:
    from .._listener._forwarder import Forwarder

__all__ = ["STOPPED", "STOPPED_BY_ERROR", "Connection", "Side", "cut"]

#: Why connections still open were cut: a ``stop()`` or ``close()``, or an error that ended the loop.
STOPPED = "stopped"
STOPPED_BY_ERROR = "stopped by an error"


class Side(Protocol):
    """What a connection needs of each of its two sides (``Receiver`` and ``Sender``, copy or splice)."""

    @property
    def role(self) -> str:
        """"client" or "server", as the close line names them."""

    @property
    def outgoing(self) -> Sized:
        """The bytes read from the other side that this one has not sent yet."""

    @property
    def bytes_sent(self) -> int: ...

    @property
    def peer(self) -> Side:
        """The other side of the pair."""

    def reset_on_close(self) -> None: ...

    def close_socket(self) -> None: ...


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
        #: When the server connect succeeded (None until then).
        self.connected_at: Optional[float] = None
        self.closed_at: Optional[float] = None
        #: True from the server connect until the pair closes: both sides may relay.
        self.established = False
        self.closed = False
        #: "client" or "server": the first side to send EOF or fail.
        self.closed_first: Optional[str] = None
        #: Why the pair closed early (reset, refused, timeout...), or None.
        self.error: Optional[str] = None
        #: True if the server could not be reached.
        self.connect_failed = False
        #: True if that was for lack of descriptors (or memory): the accept pause's line tells it.
        self.out_of_resources = False
        #: True if the forwarder closed the pair on purpose (a timeout, a drain).
        self.cut = False
        #: The idle and half-closed timeouts, if the rule sets any.
        self.timeouts: Optional[Timeouts] = None
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
        self.connected_at = time.monotonic()
        self.timeouts = Timeouts.start(self)
        self.forwarder.connection_established(self)

    def direction_ended(self) -> None:
        """One direction passed its EOF on; the other still relays."""
        if self.timeouts is not None:
            self.timeouts.direction_ended()

    def side_finished(self, side: Side) -> None:
        """Record which side closed first (sent EOF or failed)."""
        if self.closed_first is None:
            self.closed_first = side.role

    def abort(self, side: Side, error: BaseException) -> None:
        """``side`` failed: close both at once, resetting the other side.

        A reset is passed on as a reset: a clean FIN would tell the other
        peer that the stream ended normally when it was cut short.
        """
        if self.closed:
            return
        self.side_finished(side)
        self.error = f"{side.role}: {describe_error(error)}"
        side.peer.reset_on_close()
        self.close()

    def time_out(self, reason: str) -> None:
        """A timeout expired: close with FINs if no data is lost, else with resets.

        Bytes a toxic still holds (a latency longer than the timeout) are lost too.
        """
        toxics = self.forwarder._toxics
        lost = (len(self.receiver.outgoing) or len(self.sender.outgoing)
                or (toxics is not None and toxics.holds(self)))
        self.close_early(reason, reset=bool(lost))

    def close_early(self, reason: str, reset: bool = True) -> None:
        """The forwarder ends the pair (a timeout, a drain cut short, an injected fault):
        reset both sides if ``reset``."""
        if self.closed:
            return
        self.error, self.cut = reason, True
        if reset:
            self.reset_on_close()
        self.close()

    def reset_on_close(self) -> None:
        """Make the coming close reset both sides instead of sending them a FIN."""
        self.receiver.reset_on_close()
        self.sender.reset_on_close()

    def close(self) -> None:
        """Close both sockets (once) and tell the forwarder."""
        if self.closed:
            return
        self.closed = True
        self.closed_at = time.monotonic()
        self.established = False
        if self.timeouts is not None:
            self.timeouts.cancel()
        self.receiver.close_socket()
        self.sender.close_socket()
        self.forwarder.connections.discard(self)
        if self.forwarder._toxics is not None:
            self.forwarder._toxics.connection_closed(self)
        self.forwarder.connection_closed(self)


def cut(connections: Iterable[Connection], reason: str) -> int:
    """End ``connections`` now, each with a reset on both sides; return how many.

    The one way the forwarder ends connections that have not finished both
    ways (a drain's timeout, a stop, an error that ends the loop): a FIN
    would tell a peer that a cut-short stream is complete.  Every socket is
    set to reset before any is closed, so that should a close raise, the
    rest still end with resets when the process exits.
    """
    conns = list(connections)
    for conn in conns:
        conn.reset_on_close()
    for conn in conns:
        conn.close_early(reason)
    return len(conns)

