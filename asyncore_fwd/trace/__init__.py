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
Other dispatchers (the article's, yours) get the bare calls, and a line
for each read or write of their socket, under the handler that made it:
``recv(4096) -> read 18B``, ``-> EOF``, ``-> reset``, ``send(18B) -> sent 18B``.  The kernel's
answer lists each ready descriptor with its events: ``r`` readable, ``w``
writable, ``x`` urgent data (or an error, for select), ``hup`` hung up,
``err`` error.  In round 5 the server's reply, its EOF and the hang-up come
together: asyncore calls ``handle_read()`` for the data, then
``handle_close()`` for the hang-up, which reads on rather than drop
anything.  ``r-`` marks a call outside any round: before the loop starts,
after it stops, or from another thread.  A loop written by hand on the
``select`` module (``select()``, ``poll()``, ``epoll()``) gets numbered
rounds too: one begins with its first ``readable()`` question after the
previous wait.

**Options.**  ``times`` (``--times``, ``--trace-times``) begins each line
with its offset from the start, ``+0.507 r1 poll(timeout=0.5) -> 0 events``;
``summary`` ends the trace with the rounds per second and each dispatcher's
bytes, EOF, reset and time paused; ``only`` (``--filter``,
``--trace-filter``) keeps some dispatchers, ``receiver#1,fd8,no-listener``;
``format="jsonl"`` (``--format jsonl``, ``--trace-format jsonl``) writes one
JSON object per event instead, the schema the trace viewer's page documents.

**How it works.**  ``enable()`` replaces, in place, the round functions
(asyncore's ``poll()`` for select and ``poll2()`` for poll, asyncore_fwd's
``EpollLoop.poll`` and its select/poll twin), asyncore's reference to the
``select`` module and that module's own ``select()``, ``poll()`` and
``epoll()`` (to see what the kernel answered), ``socket.socket``'s
``recv()``, ``recv_into()`` and ``send()`` (reported only for a dispatcher's
socket, inside a traced call), and the methods named
in ``TRACED_METHODS`` on ``asyncore.dispatcher`` and each of its subclasses,
including those created later (a class-creation hook).  ``disable()`` puts
every original back, so when tracing is off nothing is wrapped and nothing
is checked: it costs nothing.  All of these are looked up at each call, so
tracing can start while a loop runs.  Tracing is slow; it is for learning
and debugging, not for production traffic.

What the wrappers see is captured once, as plain data (a ``TraceEvent``:
time, round, descriptor, object, call, result, why), and handed to a
renderer.  The lines above are one renderer of those events, JSON lines
another; any other plugs in with ``_capture.enable_with(renderer)``, with no
change to capture.
"""

from ._capture import TRACED_METHODS, disable, is_enabled
from ._enable import enable
from ._runner import USAGE as USAGE  # the runner's help text, public as before (not in __all__)
from ._runner import main

__all__ = ["TRACED_METHODS", "disable", "enable", "is_enabled", "main"]
