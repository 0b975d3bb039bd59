"""Capture: the wrappers that see every round, kernel wait and dispatcher call.

Strategy: ``enable_with()`` replaces, in place, the round functions, the
``select`` module asyncore uses and the methods named in ``TRACED_METHODS``
on every dispatcher class (later ones too, through a class-creation hook);
``disable()`` puts every original back.  Each wrapper describes what it saw
once, in a ``TraceEvent``, and hands it to the renderer: it decides nothing
about how an event is shown.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
import time
import types
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .._compat import asyncore
from .._eventloop import _loop
from . import _describe
from ._events import END, IDLE, START, WAIT, Renderer, TraceEvent

__all__ = ["TRACED_METHODS", "disable", "enable_with", "is_enabled"]

#: The dispatcher methods that get a line each.
TRACED_METHODS = ("readable", "writable", "handle_read", "handle_write", "handle_accept", "handle_accepted",
                  "handle_connect", "handle_connect_event", "handle_close", "handle_expt", "handle_expt_event",
                  "handle_error", "close")

_PREDICATES = ("readable", "writable")

# asyncore's round functions: select(), poll(), and poll2's old alias.
_ROUNDS = ("poll", "poll2", "poll3")

_MARK = "_asyncore_fwd_trace"  # set on our wrappers, so that nothing is wrapped twice


class _Session:
    """One ``enable_with()``: the renderer, what to put back, and the counters."""

    def __init__(self, renderer: Renderer) -> None:
        self.renderer = renderer
        #: (owner, attribute, original, whether the owner had it itself) for each change.
        self.patches: List[Tuple[Any, str, Any, bool]] = []
        self.rounds = itertools.count(1)
        self._numbers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._counters: Dict[str, Iterator[int]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def thread_state(self) -> Any:
        """This thread's round and stack of calls in progress."""
        state = self._local
        if not hasattr(state, "stack"):
            state.round = None      # the current round's number, None between rounds
            state.waited = False    # whether this round's kernel call was seen
            state.stack = []        # (dispatcher, method name) of the traced calls in progress, outermost first
        return state

    def name_of(self, obj: object) -> str:
        """``Receiver#3``: ``obj``'s class and its number among the instances of that class, from 1."""
        with self._lock:
            try:
                number = self._numbers.get(obj)
                if number is None:
                    counter = self._counters.setdefault(type(obj).__name__, itertools.count(1))
                    number = self._numbers[obj] = next(counter)
            except TypeError:  # not hashable or not weak-referenceable: no number
                number = 0
        return f"{type(obj).__name__}#{number}"

    def patch(self, owner: Any, name: str, replacement: Any) -> None:
        """Set ``owner.name`` to ``replacement``, remembering what to put back."""
        had_own = name in vars(owner)
        self.patches.append((owner, name, vars(owner).get(name), had_own))
        setattr(owner, name, replacement)

    def emit(self, state: Any, depth: int, kind: str, fd: Optional[int] = None, obj: str = "", call: str = "",
             arguments: str = "", result: str = "", why: str = "", error: str = "",
             ready: Tuple[Tuple[int, str], ...] = ()) -> None:
        """Hand the renderer one event seen by this thread now."""
        self.renderer.event(TraceEvent(time.time(), threading.get_ident(), state.round, depth, kind, fd, obj,
                                       call, arguments, result, why, error, ready))


_session: Optional[_Session] = None

ALREADY_ENABLED = "tracing is already enabled"


# -- switching on and off -----------------------------------------------------


def enable_with(renderer: Renderer) -> None:
    """Start tracing every asyncore loop and dispatcher in this process, into ``renderer``."""
    global _session
    if _session is not None:
        raise RuntimeError(ALREADY_ENABLED)
    session = _session = _Session(renderer)
    for name in _ROUNDS:
        if hasattr(asyncore, name):
            session.patch(asyncore, name, _traced_round(getattr(asyncore, name)))
    session.patch(_loop.EpollLoop, "poll", _traced_epoll_round(_loop.EpollLoop.poll))
    # asyncore_fwd's select/poll backend runs the due timers after asyncore's
    # round: count them in the round (asyncore's round inside it is the same round).
    asyncore_loop = getattr(_loop, "AsyncoreLoop", None)
    if asyncore_loop is not None:
        session.patch(asyncore_loop, "poll", _traced_round(asyncore_loop.poll))
    session.patch(asyncore, "select", _TracedSelectModule(asyncore.select))  # type: ignore[attr-defined]
    for cls in _subclasses(asyncore.dispatcher):
        _wrap_class(session, cls)
    # Classes created from now on (the traced script's own) are wrapped as they are made.
    session.patch(asyncore.dispatcher, "__init_subclass__", classmethod(_on_new_subclass))


def disable() -> None:
    """Stop tracing: put back every function and method that ``enable()`` replaced."""
    global _session
    session, _session = _session, None
    if session is None:
        return
    for owner, name, original, had_own in reversed(session.patches):
        if had_own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)
    session.renderer.close()


def is_enabled() -> bool:
    """Whether tracing is on."""
    return _session is not None


def _subclasses(cls: type) -> List[type]:
    """``cls`` and all its subclasses, at any depth."""
    found: List[type] = []
    todo = [cls]
    while todo:
        current = todo.pop()
        if current not in found:
            found.append(current)
            todo.extend(type.__subclasses__(current))
    return found


def _on_new_subclass(cls: type, **kwargs: Any) -> None:
    """Installed as ``asyncore.dispatcher.__init_subclass__`` while tracing."""
    super(asyncore.dispatcher, cls).__init_subclass__(**kwargs)  # type: ignore[misc]
    if _session is not None:
        _wrap_class(_session, cls)


def _wrap_class(session: _Session, cls: type) -> None:
    """Wrap the traced methods that ``cls`` defines itself (inherited ones are wrapped where defined)."""
    for name in TRACED_METHODS:
        method = vars(cls).get(name)
        if isinstance(method, types.FunctionType) and not getattr(method, _MARK, False):
            session.patch(cls, name, _traced_method(name, method))


# -- the wrappers -------------------------------------------------------------


def _traced_method(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (a dispatcher's ``name``), an event when it starts and one when it ends."""

    @functools.wraps(method)
    def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
        session = _session
        if session is None or not session.renderer.wants_events():
            return method(self, *args, **kwargs)
        state = session.thread_state()
        if ((name in _PREDICATES and state.stack)  # a handler checking itself, not the loop asking
                or (name == "close" and getattr(self, "socket", None) is None)  # nothing to close
                or any(obj is self and called == name for obj, called in state.stack)):
            # (the last: the same call going up the class tree, super().handle_close()...)
            return method(self, *args, **kwargs)
        # Who and with what, as at the start: a close() on the way clears the descriptor.
        call = (_describe.fd_of(self), session.name_of(self), name, _describe.arguments(name, args, kwargs))
        depth = len(state.stack)
        session.emit(state, depth, START, *call)
        earlier = _describe.before(name, self)
        state.stack.append((self, name))
        try:
            value = method(self, *args, **kwargs)
        except BaseException as exception:
            state.stack.pop()
            session.emit(state, depth, END, *call, error=_describe.error(exception))
            raise
        state.stack.pop()
        session.emit(state, depth, END, *call, result=_describe.result(name, self, value, earlier),
                     why=_describe.why(name, self, value))
        return value

    setattr(traced, _MARK, True)
    return traced


@contextlib.contextmanager
def _round(kernel_call_seen: bool = True) -> Iterator[None]:
    """Number the round run inside; note it if the kernel was not asked at all
    (when the kernel call can be seen)."""
    session = _session
    state = session.thread_state() if session is not None else None
    if session is None or state is None or state.round is not None:  # off, or already inside a round
        yield
        return
    state.round, state.waited = next(session.rounds), False
    try:
        yield
    finally:
        if kernel_call_seen and not state.waited:  # asyncore skips the kernel call when no descriptor is watched
            session.emit(state, 0, IDLE)
        state.round = None


def _traced_round(poll: Callable[..., Any]) -> Callable[..., Any]:
    """A loop's round function (asyncore's ``poll()``...): one round each call."""

    @functools.wraps(poll)
    def traced_round(*args: Any, **kwargs: Any) -> Any:
        with _round():
            return poll(*args, **kwargs)

    setattr(traced_round, _MARK, True)
    return traced_round


def _traced_epoll_round(poll: Callable[..., Any]) -> Callable[..., Any]:
    """``EpollLoop.poll``: one round; its epoll object is watched for the round."""

    @functools.wraps(poll)
    def traced_round(loop: Any, *args: Any, **kwargs: Any) -> Any:
        if _session is None:
            return poll(loop, *args, **kwargs)
        epoll = getattr(loop, "_epoll", None)  # None: rounds numbered, the kernel's answer not shown
        if epoll is not None:
            loop._epoll = _TracedPoller(epoll, "epoll", 1)
        try:
            with _round(kernel_call_seen=epoll is not None):
                return poll(loop, *args, **kwargs)
        finally:
            if epoll is not None:
                loop._epoll = epoll

    setattr(traced_round, _MARK, True)
    return traced_round


class _TracedSelectModule:
    """Stands in for the ``select`` module inside asyncore: sees what the kernel answered."""

    def __init__(self, module: Any) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def select(self, rlist: Sequence[int], wlist: Sequence[int], xlist: Sequence[int],
               timeout: Optional[float] = None) -> Any:
        with _kernel_call("select", timeout) as ready:
            result = self._module.select(rlist, wlist, xlist, timeout)
            events: Dict[int, List[str]] = {}
            for fds, event in zip(result, "rwx"):
                for fd in fds:
                    events.setdefault(fd, []).append(event)
            ready.extend((fd, "|".join(names)) for fd, names in events.items())
        return result

    def poll(self) -> Any:
        return _TracedPoller(self._module.poll(), "poll", 1000)


class _TracedPoller:
    """A poll or epoll object whose ``poll()`` is seen with what the kernel answered."""

    def __init__(self, poller: Any, kind: str, units_per_second: int) -> None:
        self._poller, self._kind, self._units = poller, kind, units_per_second

    def __getattr__(self, name: str) -> Any:
        return getattr(self._poller, name)

    def poll(self, *args: Any, **kwargs: Any) -> Any:
        timeout = args[0] if args else kwargs.get("timeout")
        if timeout is not None and timeout >= 0:
            timeout = timeout / self._units  # asyncore passes poll() milliseconds: show seconds
        with _kernel_call(self._kind, timeout) as ready:
            result = self._poller.poll(*args, **kwargs)
            ready.extend(_describe.ready_events(result))
        return result


@contextlib.contextmanager
def _kernel_call(kind: str, timeout: Optional[float]) -> Iterator[List[Tuple[int, str]]]:
    """One WAIT event for a kernel wait: the descriptors put in the list given, or what it raised."""
    session = _session
    if session is None:  # disabled by another thread meanwhile
        yield []
        return
    state = session.thread_state()
    state.waited = True
    ready: List[Tuple[int, str]] = []
    arguments = f"timeout={_describe.seconds(timeout)}"
    try:
        yield ready
    except BaseException as exception:
        session.emit(state, 0, WAIT, None, "", kind, arguments, error=_describe.error(exception))
        raise
    else:
        session.emit(state, 0, WAIT, None, "", kind, arguments, ready=tuple(ready))
