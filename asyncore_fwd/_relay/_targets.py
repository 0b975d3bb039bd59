"""Where a connection's server connect goes: the next address to try, and how each try went.

Strategy: the server's side (``Sender``) asks its connection's
``TargetChoice`` for an address, connects, and tells the choice whether
that worked; when the choice has nothing left, the client is reset.  The
forwarder makes one choice per connection (``Forwarder.target_choice``).
Today's is ``InOrder``: the remote's resolved addresses, each tried once,
in order.  A choice that spreads connections over several targets, or
skips one a health check found dead, answers differently; the Sender does
not change.  A choice may also have ``describe_failure(last_error) -> str``:
then the close line's reason, when nothing is left, is its answer (every
target tried and its error) instead of the remote's name and the last error.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Protocol, Tuple

from .._net import SockAddr

__all__ = ["InOrder", "Target", "TargetChoice"]

#: What a connect goes to: (address family, socket address).
Target = Tuple[int, SockAddr]


class TargetChoice(Protocol):
    """One connection's choice of server: asked for each address to try, told of each outcome."""

    def next_target(self) -> Optional[Target]:
        """The next (family, sockaddr) to connect to; None when none is left (the client is reset)."""

    def failed(self, target: Target, error: OSError) -> None:
        """The connect to ``target`` failed (refused, timed out, led back to the forwarder...)."""

    def succeeded(self, target: Target) -> None:
        """The connect to ``target`` succeeded: the pair relays through it."""


class InOrder:
    """The addresses given, each tried once, in their order (the remote's, as resolved)."""

    __slots__ = ("_left",)

    def __init__(self, targets: Iterable[Target]) -> None:
        self._left: List[Target] = list(targets)

    def next_target(self) -> Optional[Target]:
        return self._left.pop(0) if self._left else None

    def failed(self, target: Target, error: OSError) -> None:
        pass  # the next one is tried

    def succeeded(self, target: Target) -> None:
        pass
