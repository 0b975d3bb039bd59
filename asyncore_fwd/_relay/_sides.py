"""What a connection asks of its two sides, whichever relay moves the bytes.

The copy relay's ``Receiver`` and ``Sender`` (``_copy``) and the splice
ones (``_splice``) all answer it; a ``Connection`` knows its sides only
through it.  Nothing here is on the per-byte path: the loop calls the
sides' own handlers.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Optional, Protocol, Sized

__all__ = ["ServerSide", "Side"]


class Side(Protocol):
    """What a connection needs of each of its two sides (``Receiver`` and ``Sender``, copy or splice)."""

    #: The other side of the pair, of the same relay (set by the connection).
    peer: Any
    #: The same, for the loop: it asks a side again after its partner's events (set by the connection).
    partner: Any
    #: Its socket (asyncore's attribute; None only before it has one).
    socket: Optional[socket.socket]

    @property
    def role(self) -> str:
        """"client" or "server", as the close line names them."""

    @property
    def outgoing(self) -> Sized:
        """The bytes read from the peer that this side has not sent yet."""

    @property
    def bytes_sent(self) -> int: ...

    def queue_first(self, data: bytes) -> None:
        """Queue ``data`` to send before anything the peer reads (the pair does not relay yet)."""

    def divert_reads(self, received: Optional[Callable[[bytes], None]],
                     wanted: Optional[Callable[[], int]] = None) -> None:
        """Hand what this side reads to ``received(data)`` (b"" at EOF) instead of its peer,
        each read ``wanted()`` bytes at most; None gives the reads back."""

    def reset_on_close(self) -> None: ...

    def close_socket(self) -> None: ...


class ServerSide(Side, Protocol):
    """The server's side: it also connects."""

    def connect_next(self, error: Optional[OSError] = None) -> None:
        """Connect to the next target (the first, when the connection starts)."""
