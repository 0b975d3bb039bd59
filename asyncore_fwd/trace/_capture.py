"""Capture: the wrappers that see every round and dispatcher call.

Strategy: ``enable_with()`` replaces, in place, the round functions and the
methods named in ``TRACED_METHODS`` on every dispatcher class (later ones
too, through a class-creation hook), and has ``_kernel`` wrap the kernel
waits and ``_io`` the sockets' reads and writes; ``disable()`` puts every
original back.  Each wrapper describes what it saw
once, in a ``TraceEvent``, and hands it to the renderer: it decides nothing
about how an event is shown.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Any, Callable, Iterator, List

from .._compat import asyncore
from .._eventloop import _loop
from . import _describe, _io, _kernel, _session
from ._events import END, IDLE, START, Renderer
from ._session import ALREADY_ENABLED, MARK, Session

__all__ = ["ALREADY_ENABLED", "TRACED_METHODS", "disable", "enable_with", "is_enabled"]

#: The dispatcher methods that get a line each.
TRACED_METHODS = ("readable", "writable", "handle_read", "handle_write", "handle_accept", "handle_accepted",
                  "handle_connect", "handle_connect_event", "handle_close", "handle_expt", "handle_expt_event",
                  "handle_error", "close")

_PREDICATES = ("readable", "writable")

# asyncore's round functions: select(), poll(), and poll2's old alias.
_ROUNDS = ("poll", "poll2", "poll3")


# -- switching on and off -----------------------------------------------------


def enable_with(renderer: Renderer) -> None:
    """Start tracing every asyncore loop and dispatcher in this process, into ``renderer``."""
    if _session.current is not None:
        raise RuntimeError(ALREADY_ENABLED)
    session = _session.current = Session(renderer)
    # Every question the loop would ask, asked: no quiet reads while tracing.
    _loop.ask_after_every_read(True)
    for name in _ROUNDS:
        if hasattr(asyncore, name):
            session.patch(asyncore, name, _traced_round(getattr(asyncore, name)))
    session.patch(_loop.EpollLoop, "poll", _traced_epoll_round(_loop.EpollLoop.poll))
    # asyncore_fwd's select/poll backend runs the due timers after asyncore's
    # round: count them in the round (asyncore's round inside it is the same round).
    asyncore_loop = getattr(_loop, "AsyncoreLoop", None)
    if asyncore_loop is not None:
        session.patch(asyncore_loop, "poll", _traced_round(asyncore_loop.poll))
    _kernel.patch(session)
    _io.patch(session)
    for cls in _subclasses(asyncore.dispatcher):
        _wrap_class(session, cls)
    # Classes created from now on (the traced script's own) are wrapped as they are made.
    session.patch(asyncore.dispatcher, "__init_subclass__", classmethod(_on_new_subclass))


def disable() -> None:
    """Stop tracing: put back every function and method that ``enable()`` replaced."""
    session, _session.current = _session.current, None
    if session is None:
        return
    _loop.ask_after_every_read(False)
    for owner, name, original, had_own in reversed(session.patches):
        if had_own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)
    session.renderer.close()


def is_enabled() -> bool:
    """Whether tracing is on."""
    return _session.current is not None


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
    session = _session.current
    if session is not None:
        _wrap_class(session, cls)


def _wrap_class(session: Session, cls: type) -> None:
    """Wrap the traced methods that ``cls`` defines itself (inherited ones are wrapped where defined)."""
    for name in TRACED_METHODS:
        method = vars(cls).get(name)
        if isinstance(method, types.FunctionType) and not getattr(method, MARK, False):
            session.patch(cls, name, _traced_method(name, method))


# -- the wrappers -------------------------------------------------------------


def _traced_method(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (a dispatcher's ``name``), an event when it starts and one when it ends."""

    @functools.wraps(method)
    def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
        session = _session.current
        if session is None or not session.renderer.wants_events():
            return method(self, *args, **kwargs)
        state = session.thread_state()
        if name in _PREDICATES and not state.stack and (state.round is None or (state.hand and state.waited)):
            session.begin_hand_round(state)  # asked by a loop written by hand: no round function numbers it
            state.asks = True
        if ((name in _PREDICATES and state.stack)  # a handler checking itself, not the loop asking
                or (name == "close" and getattr(self, "socket", None) is None)  # nothing to close
                or any(obj is self and called == name for obj, called in state.stack)):
            # (the last: the same call going up the class tree, super().handle_close()...)
            return method(self, *args, **kwargs)
        # Who and with what, as at the start: a close() on the way clears the descriptor.
        fd = _describe.fd_of(self)
        call = (fd, session.name_of(self, fd), name, _describe.arguments(name, args, kwargs))
        listener = bool(getattr(self, "accepting", False))
        depth = len(state.stack)
        session.emit(state, depth, START, *call, listener=listener)
        earlier = _describe.before(name, self)
        state.stack.append((self, name))
        try:
            value = method(self, *args, **kwargs)
        except BaseException as exception:
            state.stack.pop()
            session.emit(state, depth, END, *call, error=_describe.error(exception), listener=listener)
            raise
        state.stack.pop()
        session.emit(state, depth, END, *call, result=_describe.result(name, self, value, earlier),
                     why=_describe.why(name, self, value), listener=listener)
        return value

    setattr(traced, MARK, True)
    return traced


@contextlib.contextmanager
def _round(kernel_call_seen: bool = True) -> Iterator[None]:
    """Number the round run inside; note it if the kernel was not asked at all
    (when the kernel call can be seen)."""
    session = _session.current
    state = session.thread_state() if session is not None else None
    if session is None or state is None or (state.round is not None and not state.hand):
        yield  # off, or already inside a round
        return
    state.round, state.hand, state.waited = next(session.rounds), False, False
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

    setattr(traced_round, MARK, True)
    return traced_round


def _traced_epoll_round(poll: Callable[..., Any]) -> Callable[..., Any]:
    """``EpollLoop.poll``: one round; its epoll object is watched for the round."""

    @functools.wraps(poll)
    def traced_round(loop: Any, *args: Any, **kwargs: Any) -> Any:
        if _session.current is None:
            return poll(loop, *args, **kwargs)
        epoll = getattr(loop, "_epoll", None)  # None: rounds numbered, the kernel's answer not shown
        if epoll is not None:
            loop._epoll = _kernel.TracedPoller(epoll, "epoll", 1)
        try:
            with _round(kernel_call_seen=epoll is not None):
                return poll(loop, *args, **kwargs)
        finally:
            if epoll is not None:
                loop._epoll = epoll

    setattr(traced_round, MARK, True)
    return traced_round
