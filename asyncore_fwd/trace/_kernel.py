"""The kernel waits: what each round asked the kernel, and what it answered.

Strategy: asyncore's reference to the ``select`` module is replaced by a
stand-in whose ``select()`` and ``poll()`` are seen (``EpollLoop``'s epoll
object is wrapped by its round, in ``_capture``).  A loop written by hand
calls the ``select`` module itself, so its ``select()``, ``poll()`` and
``epoll()`` are replaced too; those report a wait only outside the rounds
that a round function numbers (inside one, the stand-in already does) and
in a thread that asks dispatchers ``readable()`` itself, and begin a round
of their own for it when the previous wait ended the last.
"""

from __future__ import annotations

import contextlib
import select
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .._compat import asyncore
from . import _describe, _session
from ._events import WAIT
from ._session import Session

__all__ = ["TracedPoller", "patch"]


def patch(session: Session) -> None:
    """Watch the kernel waits of asyncore's loops and of loops written by hand."""
    session.patch(asyncore, "select", _TracedSelectModule(asyncore.select))  # type: ignore[attr-defined]
    session.patch(select, "select", _hand_select(select.select))
    session.patch(select, "poll", _hand_factory(select.poll, "poll", 1000))
    if hasattr(select, "epoll"):
        session.patch(select, "epoll", _hand_factory(select.epoll, "epoll", 1))


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
            ready.extend(_select_events(result))
        return result

    def poll(self) -> Any:
        return TracedPoller(self._module.poll(), "poll", 1000)


class TracedPoller:
    """A poll or epoll object whose ``poll()`` is seen with what the kernel answered."""

    def __init__(self, poller: Any, kind: str, units_per_second: int, by_hand: bool = False) -> None:
        self._poller, self._kind, self._units, self._by_hand = poller, kind, units_per_second, by_hand

    def __getattr__(self, name: str) -> Any:
        return getattr(self._poller, name)

    def __enter__(self) -> Any:  # an epoll object is a context manager
        self._poller.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> Any:
        return self._poller.__exit__(*exc_info)

    def poll(self, *args: Any, **kwargs: Any) -> Any:
        if self._by_hand and not _outside_round_functions():
            return self._poller.poll(*args, **kwargs)  # a round function's stand-in sees it
        timeout = args[0] if args else kwargs.get("timeout")
        if timeout is not None and timeout >= 0:
            timeout = timeout / self._units  # poll() takes milliseconds: show seconds
        with _kernel_call(self._kind, timeout, by_hand=self._by_hand) as ready:
            result = self._poller.poll(*args, **kwargs)
            ready.extend(_describe.ready_events(result))
        return result


def _select_events(result: Sequence[Sequence[int]]) -> List[Tuple[int, str]]:
    """select()'s three lists as (fd, "r|w") pairs."""
    events: Dict[int, List[str]] = {}
    for fds, event in zip(result, "rwx"):
        for fd in fds:
            events.setdefault(fd, []).append(event)
    return [(fd, "|".join(names)) for fd, names in events.items()]


def _outside_round_functions() -> bool:
    """Whether this wait is a hand-written loop's: outside every round a round function
    numbers, in a thread that asks dispatchers itself (another thread's wait, a
    supervisor's or a test server's, is not a loop round)."""
    session = _session.current
    if session is None:
        return False
    state = session.thread_state()
    return (state.round is None or state.hand) and state.asks


def _hand_select(original: Any) -> Any:
    """``select.select`` for loops written by hand."""

    def select_(rlist: Sequence[Any], wlist: Sequence[Any], xlist: Sequence[Any],
                timeout: Optional[float] = None) -> Any:
        if not _outside_round_functions():
            return original(rlist, wlist, xlist, timeout)
        with _kernel_call("select", timeout, by_hand=True) as ready:
            result = original(rlist, wlist, xlist, timeout)
            ready.extend(_select_events([[_fileno(x) for x in fds] for fds in result]))
        return result

    select_.__doc__ = original.__doc__
    setattr(select_, _session.MARK, True)
    return select_


def _fileno(obj: Any) -> int:
    return obj if isinstance(obj, int) else obj.fileno()


def _hand_factory(original: Any, kind: str, units_per_second: int) -> Any:
    """``select.poll`` or ``select.epoll`` for loops written by hand: its objects' waits are seen."""

    def make(*args: Any, **kwargs: Any) -> TracedPoller:
        return TracedPoller(original(*args, **kwargs), kind, units_per_second, by_hand=True)

    make.__doc__ = original.__doc__
    setattr(make, _session.MARK, True)
    return make


@contextlib.contextmanager
def _kernel_call(kind: str, timeout: Optional[float], by_hand: bool = False) -> Iterator[List[Tuple[int, str]]]:
    """One WAIT event for a kernel wait: the descriptors put in the list given, or what it raised."""
    session = _session.current
    if session is None:  # disabled by another thread meanwhile
        yield []
        return
    state = session.thread_state()
    if by_hand and (state.round is None or state.waited):
        session.begin_hand_round(state)
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
