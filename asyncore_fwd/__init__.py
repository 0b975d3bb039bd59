"""asyncore_fwd: a TCP port forwarder built on the classic asyncore event loop.

It grew from the "Asynchronous port forwarding" recipe (ActiveState 483732),
whose three ``asyncore.dispatcher`` subclasses -- ``forwarder`` listens,
``receiver`` talks to the client, ``sender`` talks to the server -- are kept
here as ``Forwarder``, ``Receiver`` and ``Sender``, made correct: no data lost
at close (true half-close), bounded memory (backpressure), IPv6, hostnames,
connect timeouts, and no traceback or dead listener when a peer misbehaves.

    from asyncore_fwd import Forwarder

    fwd = Forwarder("127.0.0.1", 8080, "localhost", 8000, map={})
    fwd.serve_forever()       # or in a thread: fwd.stop() ends it

Many rules in one process, on one loop, with drain and reload: ``Service``,
which also serves UDP rules (``Rule(..., proto="udp")``: a session per
client address, on a datagram listener of its own).

Runs on the standard library's asyncore (3.10, 3.11) or the pyasyncore
backport (3.12+).

The modules sit in layers, one folder each, and import only their own layer
and those below, with no exception and no cycle (``tests/test_layers.py``
checks it). From the bottom: the asyncore import and socket helpers
(``_compat``, ``_net``); the loop (``_eventloop``); rules and config
(``_values``); one connection's relay (``_relay``); what acts on connections
(``_ops``, ``toxics``); the listener (``_listener``); many rules, processes
and metrics (``_service``); the entry points (this module, ``cli``,
``trace``, the pytest plugin).
"""

from ._eventloop._loop import EpollLoop, loop
from ._listener._forwarder import (
    Connection,
    Forwarder,
    Receiver,
    Rule,
    Sender,
    forwarder,
    receiver,
    sender,
)
from ._service._service import Service

__version__ = "0.1.0"

__all__ = [
    "Connection",
    "EpollLoop",
    "Forwarder",
    "Receiver",
    "Rule",
    "Sender",
    "Service",
    "__version__",
    "forwarder",
    "loop",
    "receiver",
    "sender",
]
