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

Many rules in one process, on one loop, with drain and reload: ``Service``.

Runs on the standard library's asyncore (3.10, 3.11) or the pyasyncore
backport (3.12+).

The modules sit in layers, each importing only its own and those below
(``tests/test_layers.py`` checks it, and lists today's exceptions), from the
bottom: the asyncore import and socket helpers (``_compat``, ``_net``); the
loop (``_timers``, ``_wakeup``, ``_loop``); rules and config (``_rules``,
``_config``); the relay (``_relay``, ``_splice``); what acts on connections
(``_access``, ``_timeouts``, ``_stats``, ``toxics``); the listener
(``_forwarder``); many rules and processes (``_service``, ``_workers``,
``_metrics``, ``_pidfile``); the entry points (this module, ``cli``,
``trace``, the pytest plugin).
"""

from ._forwarder import (
    Connection,
    Forwarder,
    Receiver,
    Rule,
    Sender,
    forwarder,
    receiver,
    sender,
)
from ._loop import EpollLoop, loop
from ._service import Service

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
