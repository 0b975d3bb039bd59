"""One tracing session: the renderer, what to put back, the counters, each thread's round.

Strategy: the wrappers of ``_capture`` (rounds, dispatcher methods),
``_kernel`` (the kernel waits) and ``_io`` (a dispatcher's socket reads and
writes) all read ``current``, the session in progress or None, at each
call, and describe what they saw through ``emit()``: a ``TraceEvent``.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ._events import Renderer, TraceEvent

__all__ = ["ALREADY_ENABLED", "MARK", "Session", "current"]

ALREADY_ENABLED = "tracing is already enabled"

MARK = "_asyncore_fwd_trace"  # set on our wrappers, so that nothing is wrapped twice


class Session:
    """One ``enable_with()``: the renderer, what to put back, and the counters."""

    def __init__(self, renderer: Renderer) -> None:
        self.renderer = renderer
        #: (owner, attribute, original, whether the owner had it itself) for each change.
        self.patches: List[Tuple[Any, str, Any, bool]] = []
        self.rounds = itertools.count(1)
        self._numbers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._counters: Dict[str, Iterator[int]] = {}
        #: The dispatcher last seen on each descriptor: whose socket a read or a write is.
        self._by_fd: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self._local = threading.local()

    def thread_state(self) -> Any:
        """This thread's round and stack of calls in progress."""
        state = self._local
        if not hasattr(state, "stack"):
            state.round = None      # the current round's number, None between rounds
            state.hand = False      # whether that round was begun by a hand-written loop (no round function)
            state.waited = False    # whether this round's kernel call was seen
            state.asks = False      # whether this thread has asked a dispatcher readable()/writable() itself
            state.stack = []        # (dispatcher, method name) of the traced calls in progress, outermost first
        return state

    def begin_hand_round(self, state: Any) -> None:
        """A loop written by hand has no round function: a round begins at its first
        question or wait after the previous round's wait, and lasts until the next one."""
        state.round, state.hand, state.waited = next(self.rounds), True, False

    def name_of(self, obj: object, fd: Optional[int] = None) -> str:
        """``Receiver#3``: ``obj``'s class and its number among the instances of that class, from 1."""
        with self._lock:
            try:
                number = self._numbers.get(obj)
                if number is None:
                    counter = self._counters.setdefault(type(obj).__name__, itertools.count(1))
                    number = self._numbers[obj] = next(counter)
                if fd is not None:
                    self._by_fd[fd] = obj
            except TypeError:  # not hashable or not weak-referenceable: no number
                number = 0
        return f"{type(obj).__name__}#{number}"

    def owner_of(self, sock: Any, state: Any) -> Any:
        """The dispatcher whose socket ``sock`` is: one of the calls in progress, or the
        last one seen on its descriptor; None if none."""
        for obj, _ in reversed(state.stack):
            if getattr(obj, "socket", None) is sock:
                return obj
        try:
            obj = self._by_fd.get(sock.fileno())
        except OSError:
            return None
        return obj if obj is not None and getattr(obj, "socket", None) is sock else None

    def patch(self, owner: Any, name: str, replacement: Any) -> None:
        """Set ``owner.name`` to ``replacement``, remembering what to put back."""
        had_own = name in vars(owner)
        self.patches.append((owner, name, vars(owner).get(name), had_own))
        setattr(owner, name, replacement)

    def emit(self, state: Any, depth: int, kind: str, fd: Optional[int] = None, obj: str = "", call: str = "",
             arguments: str = "", result: str = "", why: str = "", error: str = "",
             ready: Tuple[Tuple[int, str], ...] = (), nbytes: int = 0, listener: bool = False,
             quiet: bool = False) -> None:
        """Hand the renderer one event seen by this thread now."""
        self.renderer.event(TraceEvent(time.time(), threading.get_ident(), state.round, depth, kind, fd, obj,
                                       call, arguments, result, why, error, ready, nbytes, listener, quiet))


#: The session in progress, None when tracing is off.
current: Optional[Session] = None
