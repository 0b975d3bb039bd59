"""Toxics: faults injected into a forwarder's connections, to test clients.

Put a ``Forwarder`` between a client under test and its server, then add
toxics while it runs::

    from asyncore_fwd import Forwarder
    from asyncore_fwd.toxics import Latency

    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", server_port, map={}, seed=1)
    with fwd.running():
        with fwd.toxic(Latency(0.2), direction="downstream"):
            ...   # every reply now arrives 200 ms late
        with fwd.down():
            ...   # connects are refused, open connections reset

A toxic acts on one direction of each connection: ``"upstream"`` (client to
server), ``"downstream"`` (server to client) or ``"both"``; ``toxicity`` is
the share of connections it applies to, drawn with the forwarder's ``seed``
so that a failing test can be replayed.  It acts on open connections and new
ones from the moment ``add_toxic`` returns, until it is removed.

How it works: a connection with toxics gets a ``_Link`` per direction, which
takes the place of five methods *of that connection's sides only*
(``forward``, ``shutdown_write`` and ``handle_write`` of the side that
writes, ``readable`` and ``read_room`` of the side that reads), passing
bytes and EOF through the toxics in order.
Connections without toxics run the plain relay: nothing is checked per byte.
Bytes a toxic holds count towards backpressure, so memory stays bounded;
a toxic lets bytes out only while the writing side has room, so a peer
that does not read costs no wakeups.
Toxics need the copy relay: with ``splice=True`` bytes never enter Python.

The modules: ``_link`` (the hooks of a ``Toxic`` and the link that calls
them), ``_kinds`` (the toxics), ``_set`` (a forwarder's toxics and the
handles ``add_toxic`` returns), ``_controls`` (``add_toxic``, ``down()``
and the other controls, for any listener that offers what they need),
``_spec`` (``--toxic SPEC``).
"""

from __future__ import annotations

# Names outside ``__all__`` are importable from here too, as from the module before it was a package.
from ._kinds import Bandwidth, Latency, LimitData, ResetPeer, Slicer, SlowClose, Timeout
from ._link import UNSENT_LIMIT, Deliver, DeliverEof, Toxic  # noqa: F401
from ._set import DIRECTIONS, ToxicHandle, ToxicSet  # noqa: F401
from ._spec import parse_toxic_spec  # noqa: F401

__all__ = ["Bandwidth", "Latency", "LimitData", "ResetPeer", "SlowClose", "Slicer", "Timeout", "Toxic",
           "DIRECTIONS"]
