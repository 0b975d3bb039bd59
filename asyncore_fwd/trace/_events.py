"""What the trace captures, as plain data, and where it goes.

Strategy: capture (``_capture``) sees each call, round and kernel wait once,
and describes it in a ``TraceEvent`` of strings and numbers.  A ``Renderer``
is handed every event and only lays it out: the text lines are one renderer
(``_text``); another (JSON lines, a browser viewer) takes the same events,
with no change to capture (``_jsonl`` writes them as JSON lines).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, Tuple

__all__ = ["END", "IDLE", "IO", "START", "WAIT", "Renderer", "TraceEvent"]

# The kinds of event.
START = "start"  # a traced call began; the ones it makes follow, one level deeper
END = "end"      # it returned (``result``, ``why``) or raised (``error``)
WAIT = "wait"    # the kernel answered a round's wait (``ready``) or raised (``error``)
IDLE = "idle"    # a round ended without asking the kernel: nothing was watched
IO = "io"        # a dispatcher's socket read or wrote (``nbytes``), read its EOF or was reset


class TraceEvent(NamedTuple):
    """One thing the trace saw, in strings and numbers: what every renderer is given."""

    time: float            # time.time() when it was seen
    thread: int            # threading.get_ident(): calls nest within their thread
    round: Optional[int]   # the loop round, from 1; None outside any round
    depth: int             # how many traced calls in progress it is made from
    kind: str              # START, END, WAIT, IDLE or IO
    fd: Optional[int]      # the dispatcher's descriptor; None if it has none, or for a kernel wait
    object: str            # its class and which instance of it, "Receiver#1"; "" for a kernel wait
    call: str              # the method, "handle_read"; "select", "poll" or "epoll" for a kernel wait;
                           # "recv", "recv_into" or "send" for IO
    arguments: str         # as shown: "fd7, 127.0.0.1:40954"; "timeout=0.5" for a kernel wait
    result: str = ""       # END: "False", "read 18B, EOF" ("" if nothing to say); IO: "read 18B", "sent 18B",
                           # "EOF" or "reset"
    why: str = ""          # END of readable()/writable(): "EOF received", "connecting"...
    error: str = ""        # END or WAIT that raised: "ValueError: boom"
    ready: Tuple[Tuple[int, str], ...] = ()  # WAIT: each ready descriptor and its events, (7, "r|hup")
    nbytes: int = 0        # IO: how many bytes were read or written
    listener: bool = False  # the dispatcher is listening (accepting): the filter can leave it out
    quiet: bool = False    # IO of asyncore_fwd's own sides: their handler's line says it already


class Renderer(Protocol):
    """Where captured events go: lines of text, or any other form of them."""

    def wants_events(self) -> bool:
        """Asked at each dispatcher call: False skips capturing it (nothing would be shown)."""

    def event(self, event: TraceEvent) -> None:
        """Called with each event, in the thread that saw it, in that thread's order."""

    def close(self) -> None:
        """Called once when tracing stops, after the last event."""
