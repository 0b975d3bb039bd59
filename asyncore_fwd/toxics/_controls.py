"""The fault-injection controls of one listener: its toxics, ``down()``, and its connections.

A ``Forwarder`` makes one ``FaultControls`` and hands its ``add_toxic``,
``remove_toxic``, ``toxics``, ``toxic()``, ``down()``,
``wait_for_connections`` and ``close_connections`` to it.  The controls
know the listener only as a ``ControlledListener``: its connections, its
rule and map, and the two operations on its socket that ``down()`` needs.

Strategy: a test calls the controls from its own thread while the loop runs
in another.  Each call that touches the loop's objects runs in the loop's
thread through the map's ``LoopCalls`` (the loop is woken at once), and
returns once the loop has applied it; errors raised there reach the caller.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Collection, ContextManager, Generic, Iterator, List, Optional, Protocol, TypeVar

from .._eventloop import _loop
from .._eventloop._wakeup import LoopCalls
from .._net import SocketMap
from .._relay._connection import Connection, ConnectionObserver, cut
from .._values._rules import Rule
from ._link import Toxic
from ._set import DIRECTIONS, ToxicHandle, ToxicSet

__all__ = ["ControlledListener", "FaultControls", "FaultInjection"]

T = TypeVar("T")


class ControlledListener(Protocol):
    """What ``FaultControls`` need of the listener they act on (a ``Forwarder`` is one)."""

    @property
    def connections(self) -> Collection[Connection]:
        """The open connections: toxics act on them (the copy relay's); ``down()`` and
        ``close_connections()`` need only their ``reset_on_close()``, ``close_early()`` and ``close()``."""

    @property
    def rule(self) -> Rule:
        """Its rule: toxics need the copy relay (``splice`` off)."""

    @property
    def _map(self) -> SocketMap:
        """The asyncore map its loop serves (other threads call in through its ``LoopCalls``)."""

    def _close_port(self) -> None:
        """Stop listening, keeping the listener's place in the map: connects are refused."""

    def _reopen_port(self) -> None:
        """Listen again on the same address and port; OSError if that fails (the port stays closed)."""

    def add_observer(self, observer: ConnectionObserver) -> None:
        """Tell ``observer`` of every connection's life from now on: the toxics follow them so."""


L = TypeVar("L", bound=ControlledListener)


class FaultControls(Generic[L]):
    """Toxics and ``down()`` for one listener; the listener's methods of the same names call these."""

    def __init__(self, listener: L, seed: Optional[int] = None) -> None:
        self._listener = listener
        #: Decides which connections a toxic with ``toxicity`` < 1 hits: the same seed, the same ones.
        self._seed = seed
        #: The toxics acting now and the links they act through; made on first use.
        self.toxic_set: Optional[ToxicSet] = None
        #: True from ``down()`` until the port listens again (the listener is not readable meanwhile).
        self.is_down = False

    # -- toxics ---------------------------------------------------------------------

    def add_toxic(self, toxic: Toxic, direction: str = "downstream") -> ToxicHandle:
        """Make ``toxic`` act on ``direction`` of open and new connections; returns its handle."""
        if not isinstance(toxic, Toxic):
            raise TypeError(f"add_toxic() takes a Toxic, not {toxic!r}")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, not {direction!r}")
        if self._listener.rule.splice:
            raise ValueError("toxics need the copy relay: bytes never enter Python with splice=True")
        handle = ToxicHandle(toxic, direction)

        def add() -> None:
            if self.toxic_set is None:
                self.toxic_set = ToxicSet(self._seed)
                self._listener.add_observer(self.toxic_set)
            self.toxic_set.add(handle, self._listener.connections)
        self._in_loop(add)
        return handle

    def remove_toxic(self, handle: ToxicHandle) -> None:
        """Stop a toxic (what it holds is passed on at once)."""
        def remove() -> None:
            if self.toxic_set is None or handle not in self.toxic_set.handles:
                raise ValueError(f"{handle!r} is not a toxic of this forwarder")
            self.toxic_set.remove(handle)
        self._in_loop(remove)

    @property
    def toxics(self) -> List[ToxicHandle]:
        """The handles of the toxics acting now, in the order they were added."""
        return list(self.toxic_set.handles) if self.toxic_set is not None else []

    @contextlib.contextmanager
    def toxic(self, toxic: Toxic, direction: str = "downstream") -> Iterator[ToxicHandle]:
        """``add_toxic`` for the ``with`` block, removed on exit."""
        handle = self.add_toxic(toxic, direction)
        try:
            yield handle
        finally:
            self.remove_toxic(handle)

    # -- down, and the connections --------------------------------------------------

    @contextlib.contextmanager
    def down(self) -> Iterator[L]:
        """Open connections reset and the port closed for the block; listening again on exit."""
        self._in_loop(self._go_down)
        try:
            yield self._listener
        finally:
            self._in_loop(self._come_up)

    def wait_for_connections(self, count: int, timeout: float = 10.0) -> bool:
        """True once ``count`` connections are open (accepted), False after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while len(self._listener.connections) < count:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)
        return True

    def close_connections(self) -> None:
        """Close every open connection (each peer sees EOF); keep listening."""
        def close_all() -> None:
            for conn in list(self._listener.connections):
                conn.close()
        self._in_loop(close_all)

    def _go_down(self) -> None:
        if self.is_down:
            return
        self.is_down = True
        cut(self._listener.connections, "forwarder down")
        self._listener._close_port()

    def _come_up(self) -> None:
        if not self.is_down:
            return
        # If another socket took the port meanwhile, this raises and the
        # listener stays down: the exit of a later down() block tries again.
        self._listener._reopen_port()
        self.is_down = False
        _loop.channel_changed(self._listener)  # readable again

    # -- helpers -------------------------------------------------------------------

    def _in_loop(self, function: Callable[..., T], *args: Any) -> T:
        """Run ``function(*args)`` in the loop's thread (here, if no loop runs elsewhere)."""
        calls = LoopCalls.of(self._listener._map)
        if calls is None:
            return function(*args)
        result: T = calls.call(lambda: function(*args))
        return result


_Self = TypeVar("_Self", bound="FaultInjection")


class FaultInjection:
    """The controls' names on a listener (a ``Forwarder`` is one): each hands the call to its
    ``FaultControls``, made with the listener."""

    _faults: FaultControls[Any]

    def add_toxic(self, toxic: Toxic, direction: str = "downstream") -> ToxicHandle:
        """Make ``toxic`` act on ``direction`` of open and new connections; returns its handle.

        ``direction`` is ``"upstream"`` (client to server), ``"downstream"``
        or ``"both"``.  The toxic acts once this returns.  Safe from any
        thread while ``serve_forever`` (or ``running()``, or a ``Service``)
        runs the loop; under your own ``asyncore.loop``, call it from the
        loop's thread.
        """
        return self._faults.add_toxic(toxic, direction)

    def remove_toxic(self, handle: ToxicHandle) -> None:
        """Stop a toxic (what it holds is passed on at once).  Safe from any thread."""
        self._faults.remove_toxic(handle)

    @property
    def toxics(self) -> List[ToxicHandle]:
        """The handles of the toxics acting now, in the order they were added."""
        return self._faults.toxics

    def toxic(self, toxic: Toxic, direction: str = "downstream") -> ContextManager[ToxicHandle]:
        """``add_toxic`` for the ``with`` block, removed on exit."""
        return self._faults.toxic(toxic, direction)

    def down(self: _Self) -> ContextManager[_Self]:
        """As if the server went away: open connections are reset, new connects refused.

        The listening port is closed for the block and opened again (same
        address and port) on exit.  Safe from any thread.  If another socket
        took the port meanwhile, the exit raises OSError and the forwarder
        stays down; the exit of a later ``down()`` block tries again.
        """
        return self._faults.down()

    def wait_for_connections(self, count: int, timeout: float = 10.0) -> bool:
        """True once ``count`` connections are open (accepted), False after ``timeout`` s."""
        return self._faults.wait_for_connections(count, timeout)

    def close_connections(self) -> None:
        """Close every open connection (each peer sees EOF); keep listening.  Safe from any thread."""
        self._faults.close_connections()
