"""What a traced call says, in words: its arguments, what it did, and why.

Strategy: every dispatcher gets its arguments and its predicates' answers
shown.  asyncore_fwd's own sides (Receiver, Sender and the splice ones) say
more, and are recognised by their public attributes (conn, peer, outgoing,
eof_received, write_closed, bytes_sent) and their ``why_not_readable()``;
anything missing means "some other dispatcher": no comment.
"""

from __future__ import annotations

import select
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["arguments", "before", "error", "fd_of", "ready_events", "result", "seconds", "why"]

# Event bits of poll() and epoll (the same values on Linux), as the trace names them.
_EVENT_NAMES = [(select.POLLIN, "r"), (select.POLLOUT, "w"), (select.POLLPRI, "x"),
                (select.POLLHUP, "hup"), (select.POLLERR, "err"), (select.POLLNVAL, "nval")]
if hasattr(select, "POLLRDHUP"):
    _EVENT_NAMES.append((select.POLLRDHUP, "rdhup"))

_PREDICATES = ("readable", "writable")

#: What a handler of a side is compared with when it returns: bytes moved, its
#: EOF, the EOF passed on each way, the pair closed.
Snapshot = Tuple[int, bool, bool, bool, bool]


def fd_of(obj: Any) -> Optional[int]:
    """The dispatcher's descriptor, None if it has none."""
    return getattr(obj, "_fileno", None)


def arguments(name: str, args: Sequence[Any], kwargs: Dict[str, Any]) -> str:
    """The call's arguments, short: a socket as its descriptor, an address as host:port."""
    if name == "handle_error":  # called inside an ``except``: show what went wrong
        exception = sys.exc_info()[1]
        return f"after {error(exception)}" if exception is not None else ""
    shown = [_short(value) for value in args]
    shown += [f"{key}={_short(value)}" for key, value in kwargs.items()]
    return ", ".join(shown)


def _short(value: Any) -> str:
    if hasattr(value, "fileno") and hasattr(value, "getsockname"):  # a socket
        try:
            return f"fd{value.fileno()}"
        except OSError:
            return "closed socket"
    if isinstance(value, tuple) and len(value) >= 2 and isinstance(value[0], str) and isinstance(value[1], int):
        host, port = value[0], value[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def seconds(timeout: Optional[float]) -> str:
    return "None" if timeout is None else f"{timeout:g}"


def error(exception: BaseException) -> str:
    message = str(exception)
    return f"{type(exception).__name__}: {message}" if message else type(exception).__name__


def ready_events(result: Sequence[Tuple[int, int]]) -> List[Tuple[int, str]]:
    """poll()'s or epoll's answer, each descriptor with its events named: (7, "r|hup")."""
    return [(fd, "|".join(name for bit, name in _EVENT_NAMES if flags & bit) or hex(flags))
            for fd, flags in result]


def _size(count: int) -> str:
    """``300B``, ``1.5K``, ``512K``, ``2M``."""
    if count < 1024:
        return f"{count}B"
    if count < 1024 * 1024:
        return f"{round(count / 1024, 1):g}K"
    return f"{round(count / (1024 * 1024), 1):g}M"


# -- what a call came to ------------------------------------------------------


def before(name: str, obj: Any) -> Optional[Snapshot]:
    """What a handler of an asyncore_fwd side is compared with when it returns."""
    if name not in ("handle_read", "handle_write"):
        return None
    try:
        # Bytes read from this side end up sent by the peer, or queued there.
        moved = obj.peer.bytes_sent + len(obj.peer.outgoing) if name == "handle_read" else obj.bytes_sent
        return moved, obj.eof_received, obj.write_closed, obj.peer.write_closed, obj.conn.closed
    except (AttributeError, TypeError):
        return None


def result(name: str, obj: Any, value: Any, earlier: Optional[Snapshot]) -> str:
    """A predicate's answer, ``False``; what a side's handler did, ``read 18B, EOF``; or ''."""
    if name in _PREDICATES:
        return repr(value)
    if earlier is None:
        return ""
    after = before(name, obj)
    if after is None:
        return ""
    what = []
    if after[0] > earlier[0]:
        what.append(f"{'read' if name == 'handle_read' else 'sent'} {_size(after[0] - earlier[0])}")
    if after[1] and not earlier[1]:
        what.append("EOF")
    if (after[2] and not earlier[2]) or (after[3] and not earlier[3]):
        what.append("EOF passed on")
    if after[4] and not earlier[4]:
        what.append("pair closed")
    return ", ".join(what)


def why(name: str, obj: Any, value: Any) -> str:
    """Why a predicate answered as it did, for asyncore_fwd's sides and paused listeners; or ''."""
    if name == "readable":
        return _why_not_readable(obj) if not value else ""
    if name == "writable":
        return _why_writable(obj, value)
    return ""


def _why_not_readable(obj: Any) -> str:
    if getattr(obj, "accepting", False):
        return "accepting paused"
    why_not_readable = getattr(obj, "why_not_readable", None)  # asyncore_fwd's sides say it themselves
    if why_not_readable is None:
        return ""
    try:
        return why_not_readable() or ""
    except (AttributeError, TypeError):  # a side not fully made yet
        return ""


def _why_writable(obj: Any, writable: Any) -> str:
    try:
        outgoing, conn = obj.outgoing, obj.conn
    except AttributeError:
        return ""
    try:
        if writable:
            return "connecting" if obj.connecting else f"{_size(len(outgoing))} queued"
        if conn.closed:
            return "pair closed"
        return "nothing queued" if not outgoing else ""
    except (AttributeError, TypeError):
        return ""
