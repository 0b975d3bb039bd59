"""A rule's listener, as the service sees it, and the one place that makes it.

Strategy: ``Service`` makes every rule's listener with ``listener_for()``
and uses it only through ``Listener``: what a drain, a reload, the counters
and a close need.  Another kind of listener (a UDP rule's) is then one more
class that has those members and one more choice here; the service does not
change.  Today every rule is a TCP rule, served by a ``Forwarder``.
"""

from __future__ import annotations

import socket
from typing import Any, Collection, Optional, Protocol, Sequence, Tuple

from .._listener._forwarder import Forwarder
from .._listener._udp import DatagramListener, give_back
from .._net import SocketMap
from .._ops._balance import TargetSet
from .._ops._stats import RuleStats
from .._values._rules import Rule
from ..toxics import Toxic

__all__ = ["Listener", "listener_for"]


class Listener(Protocol):
    """What the service asks of a rule's listener (a ``Forwarder`` is one)."""

    @property
    def rule(self) -> Rule:
        """The rule it serves."""
        ...

    @property
    def label(self) -> str:
        """The name in its log lines (the port bound, for an unnamed rule on port 0)."""
        ...

    @property
    def address(self) -> Tuple[str, int]:
        """The (host, port) it listens on."""
        ...

    @property
    def stats(self) -> RuleStats:
        """The rule's counters, carried on to the listener that takes over after a reload."""
        ...

    @property
    def targets(self) -> Optional[TargetSet]:
        """The state of the rule's targets, when it has several (or active checks); else None."""
        ...

    @property
    def connections(self) -> Collection[Any]:
        """The live connections (``Connection``; a UDP rule's sessions): drained, counted and cut by the service."""
        ...

    def stop_accepting(self) -> None:
        """Stop listening; the connections go on (a drain, a removed rule)."""

    def release_listener(self) -> socket.socket:
        """Stop accepting and hand over the listening socket, still open, for a successor."""
        ...

    def take_over(self, listener: socket.socket) -> None:
        """Listen on ``listener``, released by ``release_listener`` (its own, given back)."""

    def close(self, reason: str = ...) -> None:
        """Stop listening and cut the connections still open (``reason`` in their close lines)."""


def listener_for(rule: Rule, map: SocketMap, *, scratch: memoryview, toxics: Sequence[Tuple[Toxic, str]] = (),
                 stats: Optional[RuleStats] = None, listener: Optional[socket.socket] = None) -> Listener:
    """The listener that serves ``rule`` on ``map``, listening now (``OSError`` if it cannot).

    ``scratch`` is the read buffer the loop's listeners share; ``toxics``,
    (toxic, direction) pairs, act on its connections.  ``stats`` and
    ``listener`` (from ``release_listener``) continue a predecessor's counters
    and port, as a reload that changes a rule does.
    """
    wanted = socket.SOCK_DGRAM if rule.proto == "udp" else socket.SOCK_STREAM
    handed_over = listener
    if listener is not None and listener.type != wanted:
        listener = None  # the other kind of socket: bind our own, and let that one go once we listen
    if rule.proto == "udp":
        if toxics:
            raise ValueError(f"{rule.label}: toxics act on TCP connections, not on a UDP rule's datagrams")
        new: Listener = DatagramListener(rule, map, scratch=scratch, stats=stats, listener=listener)
    else:
        fwd = Forwarder.from_rule(rule, map, scratch=scratch, stats=stats, listener=listener)
        try:
            for toxic, direction in toxics:
                fwd.add_toxic(toxic, direction)
        except BaseException:  # e.g. toxics on a splice rule: leave no listener behind
            if listener is not None:
                fwd.release_listener()  # still the caller's, to serve the old rule
            else:
                fwd.close()
            raise
        new = fwd
    if handed_over is not None and listener is None and not give_back(handed_over):
        handed_over.close()  # a TCP listener's, whose rule is UDP now
    return new
