"""Counters per rule, and the one log line each connection leaves at close.

Strategy: nothing here runs per byte.  A counter changes at an event
(accept, refusal, failed connect, close); the bytes of a connection are
added when it closes, and a snapshot adds those of the live connections,
which their sides count anyway.

The close line, HAProxy-tcplog-like, one per connection::

    RULE CLIENT -> TARGET BYTES_TO_SERVER/BYTES_TO_CLIENT CONNECT_MS DURATION_S CLOSED_FIRST closed first[: REASON]
    web 127.0.0.1:50412 -> 127.0.0.1:8000 120/5320 0.4ms 1.203s client closed first
    web 127.0.0.1:50418 -> 127.0.0.1:8000 0/0 - 0.001s forwarder closed first: cannot connect to ...

``TARGET`` is the server address connected to (the rule's remote if none
was; with several targets, the one that served it as configured,
``host:port``); ``CLIENT`` is the one a front balancer's PROXY header named
(``accept_proxy``; the balancer is then the details' ``proxied_by``);
``CONNECT_MS`` is ``-`` when the server was never reached;
``CLOSED_FIRST`` is ``client``, ``server`` or ``forwarder``; ``REASON`` is
left out for a clean close.  The same fields are in the record's ``details``.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterable

from .._net import format_address
from .._relay._connection import Connection, ConnectionObserver

__all__ = ["COUNTERS", "DATAGRAM_COUNTERS", "DROP_REASONS", "RuleStats", "close_details", "format_close",
           "log_close"]

log = logging.getLogger("asyncore_fwd")

#: The keys of a snapshot, in the order they are reported.
COUNTERS = ("active", "accepted", "refused_acl", "refused_limit", "failed_connects",
            "bytes_to_server", "bytes_to_client")
#: Why a UDP rule drops a datagram: refused by the allow/deny lists, over a session limit, a socket that
#: could not take it now (EAGAIN), out of descriptors for a new session, another send error, or a
#: client with no session while the rule drains.
DROP_REASONS = ("acl", "limit", "full", "resources", "error", "draining")
#: The keys a UDP rule's snapshot has after ``COUNTERS``.
DATAGRAM_COUNTERS = ("datagrams_to_server", "datagrams_to_client") + tuple(f"dropped_{reason}"
                                                                           for reason in DROP_REASONS)


class RuleStats(ConnectionObserver):
    """The counters of one rule; shared by the old and new forwarder of a reloaded rule.

    It observes the rule's connections: ``opened`` and ``closed`` count them.
    """

    __slots__ = ("accepted", "refused_acl", "refused_limit", "failed_connects", "bytes_to_server",
                 "bytes_to_client", "target_failures", "datagram_rule", "datagrams_to_server",
                 "datagrams_to_client", "drops")

    def __init__(self) -> None:
        self.accepted = 0
        self.refused_acl = 0
        self.refused_limit = 0
        self.failed_connects = 0
        #: Bytes of the connections that have closed.
        self.bytes_to_server = 0
        self.bytes_to_client = 0
        #: Failed connects per target name, for a rule with several targets (kept by ``_balance``).
        self.target_failures: Dict[str, int] = {}
        #: Set by a UDP rule's listener: its snapshot has the ``DATAGRAM_COUNTERS`` too (from then on,
        #: a reload to TCP included, so that no counter disappears).
        self.datagram_rule = False
        #: Datagrams of the UDP sessions that have closed, and the datagrams dropped, by reason.
        self.datagrams_to_server = 0
        self.datagrams_to_client = 0
        self.drops: Dict[str, int] = {}

    def opened(self, conn: Connection) -> None:
        """A client was accepted."""
        self.accepted += 1

    def refused(self, reason: str) -> None:
        """A client was turned away: by the access lists ("acl") or ``accept_proxy`` (not a trusted
        balancer), or else a limit or an admission step (a bad PROXY header)."""
        if reason == "acl" or reason == "accept_proxy":
            self.refused_acl += 1
        else:
            self.refused_limit += 1

    def closed(self, conn: Connection) -> None:
        """A connection closed: add what it moved."""
        self.bytes_to_server += conn.bytes_to_server
        self.bytes_to_client += conn.bytes_to_client
        if conn.connect_failed:
            self.failed_connects += 1
        if self.datagram_rule:
            self.datagrams_to_server += getattr(conn, "datagrams_to_server", 0)  # (a TCP one's, after a reload: 0)
            self.datagrams_to_client += getattr(conn, "datagrams_to_client", 0)

    def dropped(self, reason: str) -> None:
        """A UDP rule dropped a datagram (``DROP_REASONS``)."""
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def snapshot(self, live: Iterable[Connection]) -> Dict[str, int]:
        """The counters now, with the bytes the ``live`` connections have moved so far
        (and, for a UDP rule, the datagrams: ``DATAGRAM_COUNTERS`` after ``COUNTERS``)."""
        live = list(live)
        active = to_server = to_client = 0
        for conn in live:
            active += 1
            to_server += conn.bytes_to_server
            to_client += conn.bytes_to_client
        counters = {"active": active, "accepted": self.accepted, "refused_acl": self.refused_acl,
                    "refused_limit": self.refused_limit, "failed_connects": self.failed_connects,
                    "bytes_to_server": self.bytes_to_server + to_server,
                    "bytes_to_client": self.bytes_to_client + to_client}
        if self.datagram_rule:
            counters["datagrams_to_server"] = self.datagrams_to_server + sum(
                getattr(conn, "datagrams_to_server", 0) for conn in live)
            counters["datagrams_to_client"] = self.datagrams_to_client + sum(
                getattr(conn, "datagrams_to_client", 0) for conn in live)
            for reason in DROP_REASONS:
                counters[f"dropped_{reason}"] = self.drops.get(reason, 0)
        return counters


def close_details(conn: Connection, label: str) -> Dict[str, Any]:
    """The ``details`` of a connection's ``close`` event."""
    connect_ms = None
    if conn.connected_at is not None:
        connect_ms = round((conn.connected_at - conn.opened_at) * 1000, 3)
    if conn.target is not None and conn.rule.targets:  # several: the one that served it, as configured
        target = conn.target
    else:
        target = format_address(conn.server_address) if conn.server_address is not None else conn.rule.remote
    return {"rule": label, "client": format_address(conn.client_address), "target": target,
            "bytes_to_server": conn.bytes_to_server, "bytes_to_client": conn.bytes_to_client,
            "connect_ms": connect_ms, "duration_s": round(conn.duration, 6),
            "closed_first": conn.closed_first or "forwarder", "reason": conn.error,
            **({"proxied_by": format_address(conn.proxied_by)} if conn.proxied_by is not None else {})}


def format_close(details: Dict[str, Any]) -> str:
    """The close line (see the module docstring) for ``close_details()``."""
    connect = "-" if details["connect_ms"] is None else f"{details['connect_ms']:.1f}ms"
    return (f"{details['rule']} {details['client']} -> {details['target']} "
            f"{details['bytes_to_server']}/{details['bytes_to_client']} {connect} {details['duration_s']:.3f}s "
            f"{details['closed_first']} closed first" + (f": {details['reason']}" if details["reason"] else ""))


def log_close(conn: Connection, label: str) -> None:
    """Log the close line of ``conn``: DEBUG for a clean close (or a client reset for lack of
    descriptors, or turned away: a refusal line says so), INFO when the forwarder ended it,
    WARNING for an error."""
    if not conn.error or conn.out_of_resources or conn.turned_away:
        level = logging.DEBUG
    else:
        level = logging.INFO if conn.cut else logging.WARNING
    if log.isEnabledFor(level):  # a clean close at the default level costs no formatting
        details = close_details(conn, label)
        log.log(level, "%s", format_close(details), extra={"event": "close", "details": details})
