"""A dispatcher's reads and writes: the bytes, its EOF, a reset.

Strategy: the lessons' dispatchers, like any, read and write through their
socket (``self.recv()`` calls ``self.socket.recv()``; later steps call the
socket themselves), so ``socket.socket``'s ``recv()``, ``recv_into()`` and
``send()`` are replaced while tracing.  One is reported only when it is made
inside a traced call and the socket is a dispatcher's: a test's client
socket, in another thread, is left alone.  The report is an IO event at the
depth of the calls in progress, after the read or write, so that a
``handle_close()`` called by asyncore's ``recv()`` on EOF stays where it was.
"""

from __future__ import annotations

import errno
import functools
import socket
from typing import Any, Callable, Sequence

from . import _session
from ._events import IO
from ._session import Session

__all__ = ["patch"]

_READS = ("recv", "recv_into")
_WRITES = ("send",)

# Errors that say the other end is gone: shown as "reset".
_RESETS = {errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE}


def patch(session: Session) -> None:
    """Report the reads and writes of dispatchers' sockets."""
    for name in _READS + _WRITES:
        session.patch(socket.socket, name, _traced_io(name, getattr(socket.socket, name)))


def _traced_io(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    """``socket.socket.NAME``, reporting what it did for a dispatcher's socket."""

    @functools.wraps(original)
    def traced(sock: Any, *args: Any, **kwargs: Any) -> Any:
        session = _session.current
        if session is None:
            return original(sock, *args, **kwargs)
        state = session.thread_state()
        owner = session.owner_of(sock, state) if state.stack else None
        if owner is None:
            return original(sock, *args, **kwargs)
        fd, obj = sock.fileno(), session.name_of(owner)
        # asyncore_fwd's sides say what they moved in their handler's own line.
        quiet = hasattr(owner, "why_not_readable")
        arguments = _arguments(name, args)
        try:
            value = original(sock, *args, **kwargs)
        except OSError as exception:
            if exception.errno in _RESETS:
                session.emit(state, len(state.stack), IO, fd, obj, name, arguments, result="reset",
                             error=f"{type(exception).__name__}: {exception.strerror}", quiet=quiet)
            raise
        count = value if isinstance(value, int) else len(value)
        if name in _WRITES:
            result = f"sent {count}B"
        else:
            result = f"read {count}B" if count else "EOF"
        session.emit(state, len(state.stack), IO, fd, obj, name, arguments, result=result, nbytes=count,
                     quiet=quiet)
        return value

    setattr(traced, _session.MARK, True)
    return traced


def _arguments(name: str, args: Sequence[Any]) -> str:
    """``recv(4096)``, ``recv_into(1024)`` (its buffer left out), ``send(18B)``."""
    if not args:
        return ""
    if name == "recv":
        return str(args[0])
    if name == "recv_into":
        return str(args[1]) if len(args) > 1 and args[1] else ""
    return f"{_length(args[0])}B"


def _length(data: Any) -> int:
    try:
        return len(memoryview(data).cast("B"))
    except TypeError:
        return 0
