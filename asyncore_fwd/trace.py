"""Trace mode: one line for every loop round and every dispatcher call.

Run any asyncore program under it, or the forwarder itself::

    python -m asyncore_fwd.trace examples/article_forwarder.py -p 8080 -r localhost -P 8000
    asyncore-fwd --trace -p 8080 -r localhost -P 8000

or switch it on and off from code with ``enable()`` and ``disable()``.

**What a round is.**  An asyncore loop repeats one *round*: it asks each
dispatcher in its map ``readable()`` and ``writable()``, hands the
descriptors that said yes to the kernel (``select()``, ``poll()`` or
``epoll``), waits up to ``timeout`` seconds until some of them are ready,
then calls the handler of each ready one: ``handle_read()``,
``handle_write()``, ``handle_accept()``...  asyncore_fwd's loops then run
the timers that are due (connect timeouts, the end of an accept pause).  Its
epoll loop keeps its registrations from one round to the next, so it asks
only the dispatchers whose answer may have changed.

**What the lines mean.**  A client connects through a forwarder under the
``poll`` loop, sends 18 bytes, half-closes, and gets a reply (a real trace,
some lines left out)::

    r1 fd5 Forwarder#1 readable() -> True
    r1 poll(timeout=0.5) -> 1 event: fd5 r
    r1 fd5 Forwarder#1 handle_accept()
    r1   fd5 Forwarder#1 handle_accepted(fd7, 127.0.0.1:40954)
    r2 fd7 Receiver#1 readable() -> False (server not connected yet)
    r2 fd8 Sender#1 writable() -> True (connecting)
    r2 poll(timeout=0.5) -> 1 event: fd8 w
    r2 fd8 Sender#1 handle_connect_event()
    r2   fd8 Sender#1 handle_connect()
    r2 fd8 Sender#1 handle_write()
    r3 fd7 Receiver#1 readable() -> True
    r3 poll(timeout=0.5) -> 1 event: fd7 r
    r3 fd7 Receiver#1 handle_read() -> read 18B
    r4 poll(timeout=0.5) -> 1 event: fd7 r
    r4 fd7 Receiver#1 handle_read() -> EOF, EOF passed on
    r5 fd7 Receiver#1 readable() -> False (EOF received)
    r5 poll(timeout=0.5) -> 1 event: fd8 r|hup
    r5 fd8 Sender#1 handle_read() -> read 24B
    r5 fd8 Sender#1 handle_close()
    r5   fd8 Sender#1 handle_read()
    r5     fd7 Receiver#1 close()
    r5     fd8 Sender#1 close()
    r5   fd8 Sender#1 handle_read() -> EOF, EOF passed on, pair closed

``r5`` is the round, ``fd8`` the dispatcher's descriptor (``fd-`` when it
has none), ``Sender#1`` its class and which instance of that class (in the
order the trace first meets them), then the call with its arguments and
what it returned.  A call made from inside another one is indented under
it; a call with such lines under it is shown twice, when it starts and, with
its result, when it returns.  ``readable()`` and ``writable()`` are shown
when the loop asks them, not when a handler checks them itself.

For asyncore_fwd's own dispatchers a False ``readable()``/``writable()`` says
why in brackets, and ``handle_read()``/``handle_write()`` say what they did:
``read 18B``, ``sent 18B``, ``EOF`` (this side read the end of its stream),
``EOF passed on`` (to the other side, with ``shutdown()``), ``pair closed``.
Other dispatchers (the article's, yours) get the bare calls.  The kernel's
answer lists each ready descriptor with its events: ``r`` readable, ``w``
writable, ``x`` urgent data (or an error, for select), ``hup`` hung up,
``err`` error.  In round 5 the server's reply, its EOF and the hang-up come
together: asyncore calls ``handle_read()`` for the data, then
``handle_close()`` for the hang-up, which reads on rather than drop
anything.  ``r-`` marks a call outside any round: before the loop starts,
after it stops, or from another thread.

**How it works.**  ``enable()`` replaces, in place, the round functions
(asyncore's ``poll()`` for select and ``poll2()`` for poll, asyncore_fwd's
``EpollLoop.poll`` and its select/poll twin), asyncore's reference to the
``select`` module (to see what the kernel answered), and the methods named
in ``TRACED_METHODS`` on ``asyncore.dispatcher`` and each of its subclasses,
including those created later (a class-creation hook).  ``disable()`` puts
every original back, so when tracing is off nothing is wrapped and nothing
is checked: it costs nothing.  All of these are looked up at each call, so
tracing can start while a loop runs.  Tracing is slow; it is for learning
and debugging, not for production traffic.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import runpy
import select
import sys
import threading
import types
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple, Union

from . import EpollLoop
from ._compat import asyncore
from ._eventloop import _loop

__all__ = ["TRACED_METHODS", "disable", "enable", "is_enabled", "main"]

log = logging.getLogger("asyncore_fwd.trace")

#: The dispatcher methods that get a line each.
TRACED_METHODS = ("readable", "writable", "handle_read", "handle_write", "handle_accept", "handle_accepted",
                  "handle_connect", "handle_connect_event", "handle_close", "handle_expt", "handle_expt_event",
                  "handle_error", "close")

_PREDICATES = ("readable", "writable")

# asyncore's round functions: select(), poll(), and poll2's old alias.
_ROUNDS = ("poll", "poll2", "poll3")

# Event bits of poll() and epoll (the same values on Linux), as the trace names them.
_EVENT_NAMES = [(select.POLLIN, "r"), (select.POLLOUT, "w"), (select.POLLPRI, "x"),
                (select.POLLHUP, "hup"), (select.POLLERR, "err"), (select.POLLNVAL, "nval")]
if hasattr(select, "POLLRDHUP"):
    _EVENT_NAMES.append((select.POLLRDHUP, "rdhup"))

_MARK = "_asyncore_fwd_trace"  # set on our wrappers, so that nothing is wrapped twice


class _Session:
    """One ``enable()``: where the lines go, what to put back, and the counters."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.handler: Optional[logging.Handler] = None
        self.saved_logger_state: Tuple[int, bool] = (logger.level, logger.propagate)
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
            state.stack = []        # the traced calls in progress, outermost first
        return state

    def number(self, obj: object) -> int:
        """``obj``'s number among the instances of its class, from 1."""
        with self._lock:
            try:
                number = self._numbers.get(obj)
                if number is None:
                    counter = self._counters.setdefault(type(obj).__name__, itertools.count(1))
                    number = self._numbers[obj] = next(counter)
            except TypeError:  # not hashable or not weak-referenceable: no number
                number = 0
            return number

    def patch(self, owner: Any, name: str, replacement: Any) -> None:
        """Set ``owner.name`` to ``replacement``, remembering what to put back."""
        had_own = name in vars(owner)
        self.patches.append((owner, name, vars(owner).get(name), had_own))
        setattr(owner, name, replacement)


_session: Optional[_Session] = None


# -- switching on and off -----------------------------------------------------


def enable(output: Union[None, TextIO, logging.Logger] = None) -> None:
    """Start tracing every asyncore loop and dispatcher in this process.

    The lines are logged at DEBUG level to ``output`` if it is a logger; to
    the ``asyncore_fwd.trace`` logger, as plain lines, written to ``output``
    if it is a stream (``sys.stderr``...); or to that logger, as your logging
    set-up has it, if ``output`` is None.
    """
    global _session
    if _session is not None:
        raise RuntimeError("tracing is already enabled")
    session = _Session(output if isinstance(output, logging.Logger) else log)
    if output is not None and not isinstance(output, logging.Logger):
        session.handler = logging.StreamHandler(output)
        session.handler.setFormatter(logging.Formatter("%(message)s"))
        session.logger.addHandler(session.handler)
        session.logger.setLevel(logging.DEBUG)
        session.logger.propagate = False
    _session = session
    for name in _ROUNDS:
        if hasattr(asyncore, name):
            session.patch(asyncore, name, _traced_round(getattr(asyncore, name)))
    session.patch(EpollLoop, "poll", _traced_epoll_round(EpollLoop.poll))
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
    if session.handler is not None:
        session.logger.removeHandler(session.handler)
        session.logger.level, session.logger.propagate = session.saved_logger_state


def is_enabled() -> bool:
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


class _Call:
    """A traced call in progress; its line is written early if a nested call has one."""

    __slots__ = ("obj", "name", "text", "depth", "shown")

    def __init__(self, obj: object, name: str, text: str, depth: int) -> None:
        self.obj, self.name, self.text, self.depth = obj, name, text, depth
        self.shown = False


def _write(session: _Session, state: Any, depth: int, text: str) -> None:
    """Log one line, after the lines of the calls it is nested in, if not yet shown."""
    for call in state.stack:
        if not call.shown:
            call.shown = True
            _write_line(session, state, call.depth, call.text)
    _write_line(session, state, depth, text)


def _write_line(session: _Session, state: Any, depth: int, text: str) -> None:
    where = f"r{state.round}" if state.round is not None else "r-"
    session.logger.debug("%s %s%s", where, "  " * depth, text)


def _traced_method(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (a dispatcher's ``name``), writing one line per call."""

    @functools.wraps(method)
    def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
        session = _session
        if session is None or not session.logger.isEnabledFor(logging.DEBUG):
            return method(self, *args, **kwargs)
        state = session.thread_state()
        if ((name in _PREDICATES and state.stack)  # a handler checking itself, not the loop asking
                or (name == "close" and getattr(self, "socket", None) is None)  # nothing to close
                or any(call.obj is self and call.name == name for call in state.stack)):
            # (the last: the same call going up the class tree, super().handle_close()...)
            return method(self, *args, **kwargs)
        call = _Call(self, name, f"{_who(session, self)} {name}({_arguments(name, args, kwargs)})",
                     len(state.stack))
        before = _before(name, self)
        state.stack.append(call)
        try:
            result = method(self, *args, **kwargs)
        except BaseException as error:
            state.stack.pop()
            _write(session, state, call.depth, f"{call.text} raised {_error(error)}")
            raise
        state.stack.pop()
        outcome = _outcome(name, self, result, before)
        if outcome or not call.shown:
            _write(session, state, call.depth, call.text + outcome)
        return result

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
            _write(session, state, 0, "nothing to watch")
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
    """Stands in for the ``select`` module inside asyncore: logs what the kernel answered."""

    def __init__(self, module: Any) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def select(self, rlist: Sequence[int], wlist: Sequence[int], xlist: Sequence[int],
               timeout: Optional[float] = None) -> Any:
        with _kernel_call(f"select(timeout={_seconds(timeout)})") as ready:
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
    """A poll or epoll object whose ``poll()`` logs what the kernel answered."""

    def __init__(self, poller: Any, kind: str, units_per_second: int) -> None:
        self._poller, self._kind, self._units = poller, kind, units_per_second

    def __getattr__(self, name: str) -> Any:
        return getattr(self._poller, name)

    def poll(self, *args: Any, **kwargs: Any) -> Any:
        timeout = args[0] if args else kwargs.get("timeout")
        if timeout is not None and timeout >= 0:
            timeout = timeout / self._units  # asyncore passes poll() milliseconds: show seconds
        with _kernel_call(f"{self._kind}(timeout={_seconds(timeout)})") as ready:
            result = self._poller.poll(*args, **kwargs)
            ready.extend((fd, "|".join(name for bit, name in _EVENT_NAMES if flags & bit) or hex(flags))
                         for fd, flags in result)
        return result


@contextlib.contextmanager
def _kernel_call(text: str) -> Iterator[List[Tuple[int, str]]]:
    """Log one line for a kernel wait: ``text -> N events: fd7 r, ...`` (or what it raised)."""
    session = _session
    if session is None:  # disabled by another thread meanwhile
        yield []
        return
    state = session.thread_state()
    state.waited = True
    ready: List[Tuple[int, str]] = []
    try:
        yield ready
    except BaseException as error:
        _write(session, state, 0, f"{text} raised {_error(error)}")
        raise
    else:
        events = ", ".join(f"fd{fd} {names}" for fd, names in ready)
        plural = "" if len(ready) == 1 else "s"
        _write(session, state, 0, f"{text} -> {len(ready)} event{plural}" + (f": {events}" if events else ""))


# -- what a line says ---------------------------------------------------------


def _who(session: _Session, obj: Any) -> str:
    """``fd7 Receiver#3``: descriptor, class and instance number."""
    fd = getattr(obj, "_fileno", None)
    return f"fd{'-' if fd is None else fd} {type(obj).__name__}#{session.number(obj)}"


def _arguments(name: str, args: Sequence[Any], kwargs: Dict[str, Any]) -> str:
    """The call's arguments, short: a socket as its descriptor, an address as host:port."""
    if name == "handle_error":  # called inside an ``except``: show what went wrong
        error = sys.exc_info()[1]
        return f"after {_error(error)}" if error is not None else ""
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


def _seconds(timeout: Optional[float]) -> str:
    return "None" if timeout is None else f"{timeout:g}"


def _error(error: BaseException) -> str:
    message = str(error)
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _size(count: int) -> str:
    """``300B``, ``1.5K``, ``512K``, ``2M``."""
    if count < 1024:
        return f"{count}B"
    if count < 1024 * 1024:
        return f"{round(count / 1024, 1):g}K"
    return f"{round(count / (1024 * 1024), 1):g}M"


# asyncore_fwd's sides (Receiver, Sender and the splice ones) are recognised by
# their public attributes: conn, peer, outgoing, eof_received, write_closed,
# bytes_sent.  Anything missing means "some other dispatcher": no comment.

def _before(name: str, obj: Any) -> Optional[Tuple[int, bool, bool, bool, bool]]:
    """What a handler of an asyncore_fwd side is compared with when it returns."""
    if name not in ("handle_read", "handle_write"):
        return None
    try:
        # Bytes read from this side end up sent by the peer, or queued there.
        moved = obj.peer.bytes_sent + len(obj.peer.outgoing) if name == "handle_read" else obj.bytes_sent
        return moved, obj.eof_received, obj.write_closed, obj.peer.write_closed, obj.conn.closed
    except (AttributeError, TypeError):
        return None


def _outcome(name: str, obj: Any, result: Any, before: Optional[Tuple[int, bool, bool, bool, bool]]) -> str:
    """`` -> False (why)`` for a predicate, `` -> read 18B, EOF`` for a handler; or ''."""
    if name in ("readable", "writable"):
        why = _why_readable(obj, result) if name == "readable" else _why_writable(obj, result)
        return f" -> {result!r}" + (f" ({why})" if why else "")
    if before is None:
        return ""
    after = _before(name, obj)
    if after is None:
        return ""
    what = []
    if after[0] > before[0]:
        what.append(f"{'read' if name == 'handle_read' else 'sent'} {_size(after[0] - before[0])}")
    if after[1] and not before[1]:
        what.append("EOF")
    if (after[2] and not before[2]) or (after[3] and not before[3]):
        what.append("EOF passed on")
    if after[4] and not before[4]:
        what.append("pair closed")
    return " -> " + ", ".join(what) if what else ""


def _why_readable(obj: Any, readable: Any) -> str:
    if readable:
        return ""
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


# -- python -m asyncore_fwd.trace SCRIPT [ARGS] -------------------------------

USAGE = "usage: python -m asyncore_fwd.trace SCRIPT [ARGS...]\n" \
        "Runs SCRIPT as __main__ with ARGS, writing a trace of its asyncore loop to stderr.\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a script as ``__main__`` with tracing on; return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        (sys.stdout if args else sys.stderr).write(USAGE)
        return 0 if args else 2
    script = args[0]
    if not os.path.isfile(script):
        sys.stderr.write(f"python -m asyncore_fwd.trace: no such file: {script}\n")
        return 2
    # What `python SCRIPT ARGS` would have: its arguments, and its directory first on the path.
    sys.argv = args
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    enable(sys.stderr)
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        disable()
    return 0


if __name__ == "__main__":
    # Run the package's copy of this module, not this __main__ copy, so that a
    # script calling asyncore_fwd.trace.disable() reaches the same state.
    from asyncore_fwd.trace import main as _main

    raise SystemExit(_main())
