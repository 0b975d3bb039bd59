"""A UDP rule's sessions: per client address, a socket connected to its target.

Strategy: UDP has no connection, so the listener (``_udp``) makes one
*session* per client address it hears from.  A session owns a UDP socket
connected to the target chosen when it started (by ``balance``, then fixed
for its life); that socket's local port is what the target sees, so the
target's replies come back to it and to no other session, and the kernel
drops datagrams from anyone else.  A reply goes back to the client through
the listening socket (``DatagramListener.to_client``): from the address the
client sent to.

* **Whole datagrams.**  One ``recv`` is one datagram (0 to 65507 bytes), one
  ``send`` another: boundaries are kept, nothing is buffered.  A socket that
  cannot take a datagram now (EAGAIN) drops it, counted as "full": queueing
  would trade a lost datagram for unbounded memory.
* **ICMP errors.**  A target port that is closed answers with ICMP, which
  Linux reports on the connected socket as ECONNREFUSED (on the next
  ``recv``/``send``, or as a pending error behind POLLERR).  It counts as a
  failed connect to the target for passive health.  Before any reply the
  session moves to the target's next address (a name may have several); a
  session whose target is down, or that has none left, ends, so that the
  client's next datagram starts one on the target the balance picks then.
  A session that had replies keeps its target otherwise (UDP cannot tell a
  restarting server from a gone one).
* **The end.**  No datagram either way for ``idle_timeout`` seconds: the
  listener's sweep closes the session (``_udp``), and its socket with it.
  A drain's timeout or a stop cuts the sessions left (``close_early``).
"""

from __future__ import annotations

import errno
import logging
import sys
import time
from typing import Any, Dict, List, Optional, OrderedDict, Protocol, Tuple

from .._eventloop._dispatcher import Dispatcher
from .._net import SockAddr, SocketMap, describe_error, format_address, os_error, pending_error
from .._ops._balance import TargetSet, TargetState
from .._ops._stats import RuleStats
from .._relay._connection import Connection

__all__ = ["DATAGRAMS_PER_EVENT", "MAX_DATAGRAM", "Session", "SessionOwner", "log_session_end"]

log = logging.getLogger("asyncore_fwd")

#: Datagrams read per readiness event of a socket, so that one busy client cannot hold the loop.
DATAGRAMS_PER_EVENT = 64
#: The read size: the largest UDP payload there is (65535 less the UDP header: 65527 over IPv6,
#: 65507 over IPv4); a larger buffer is never filled.
MAX_DATAGRAM = 65535

#: The errors an ICMP message from the target's side reports on a connected UDP socket: the target's
#: failure, for passive health (not EMSGSIZE and the like, which are the datagram's).
TARGET_ERRORS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN,
                           errno.ENETDOWN})



class SessionOwner(Protocol):
    """What a session asks of the listener that owns it (``_udp.DatagramListener``)."""

    _map: SocketMap
    #: The rule's counters; the read buffer the loop's sockets share; the sessions by client address.
    stats: RuleStats
    scratch: memoryview
    sessions: OrderedDict[SockAddr, Any]

    @property
    def label(self) -> str: ...

    def to_client(self, session: Any, data: Any) -> bool:
        """Send ``data`` to the session's client from the listening socket; False if it was dropped."""
        ...

    def answered(self, session: Any) -> None:
        """The session's target address sent its first reply."""

    def session_failed(self, session: Any) -> None:
        """The session's target answered with an ICMP error (counted): move the session, or end it."""

    def session_closed(self, session: Any) -> None:
        """The session ended: forget it."""


class Session(Dispatcher):
    """One client address's session: a UDP socket connected to its target, and its counters."""

    def __init__(self, owner: SessionOwner, sock: Any, client_address: SockAddr, server_address: SockAddr,
                 target: str, targets: Optional[TargetSet], target_state: Optional[TargetState],
                 now: float) -> None:
        #: The listener that reads the client's datagrams and sends the replies (a reload's successor may adopt it).
        self.owner = owner
        self.id = next(Connection._ids)  # one count with the TCP connections: each #N in the logs is one
        self.client_address = client_address
        self.server_address = server_address
        #: The target as configured ("host:port"), fixed for the session.
        self.target = target
        self.bytes_to_server = self.bytes_to_client = 0
        self.datagrams_to_server = self.datagrams_to_client = 0
        #: ICMP errors the target's address answered with.
        self.icmp_errors = 0
        self.opened_at = now
        #: The time of the last datagram either way: the sweep closes the session ``idle_timeout`` after it.
        self.last_active = now
        #: (For ``RuleStats.closed``: a session's socket never fails to connect.)
        self.connect_failed = False
        self.closed_reason: Optional[str] = None
        # The target set the session was chosen by (the listener that started it): counted there until it ends.
        self._targets = targets
        self._target_state = target_state
        #: True once the target replied: an ICMP error no longer moves the session.
        self.replied = False
        #: The target's addresses this session has been connected to.
        self.tried = [server_address]
        #: On a wildcard listener: the destination of the client's last datagram (as received), and
        #: the ancillary data that sends the replies from it (empty: the kernel picks the source).
        self.destination = b""
        self.reply_ancillary: List[Tuple[int, int, bytes]] = []
        super().__init__(sock, map=owner._map)

    # -- select() predicates --------------------------------------------

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    # -- datagrams --------------------------------------------------------

    def to_server(self, data: Any, now: float) -> None:
        """A datagram of the client's: send it to the target (dropped, and counted, if it cannot go now)."""
        self.last_active = now
        try:
            self.socket.send(data)
        except (BlockingIOError, InterruptedError):
            self.owner.stats.dropped("full")
            return
        except OSError as error:
            self.owner.stats.dropped("error")
            if error.errno in TARGET_ERRORS:  # an ICMP error for an earlier datagram
                self.target_failed(error)
            return
        self.datagrams_to_server += 1
        self.bytes_to_server += len(data)

    def handle_read(self) -> None:
        """Called when the target's replies wait: pass up to ``DATAGRAMS_PER_EVENT`` to the client."""
        owner = self.owner
        recv_into = self.socket.recv_into
        scratch = owner.scratch
        now = time.monotonic()
        replies = 0
        for _ in range(DATAGRAMS_PER_EVENT):
            try:
                size = recv_into(scratch)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:  # an ICMP error for an earlier datagram
                if error.errno in TARGET_ERRORS:
                    self.target_failed(error)  # (which may move the session to another socket, or end it)
                    break
                log.debug("#%d recv: %s", self.id, describe_error(error))
                continue
            if not self.replied:
                self.replied = True
                owner.answered(self)
                if self._targets is not None and self._target_state is not None:
                    # (ends a probation: it answers)
                    self._targets.connected(self, self._target_state)  # type: ignore[arg-type]
            # Counted first: whoever reads the reply may read the counters next (another thread).
            self.datagrams_to_client += 1
            self.bytes_to_client += size
            if not owner.to_client(self, scratch[:size]):
                self.datagrams_to_client -= 1
                self.bytes_to_client -= size
            self.last_active = now
            replies += 1
        if replies and self.closed_reason is None and self.client_address in owner.sessions:
            owner.sessions.move_to_end(self.client_address)  # the sweep's order: least recently active first

    def handle_close(self) -> None:
        """Called on POLLERR: an ICMP error is pending (never an end: UDP has none); read and count it."""
        error = pending_error(self.socket)
        if error:
            self.target_failed(os_error(error))

    def handle_error(self) -> None:
        """Called when a handler raised: end this session only."""
        error = sys.exc_info()[1]
        log.warning("%s: session #%d: internal error: %s", self.owner.label, self.id,
                    describe_error(error or RuntimeError("unknown error")), exc_info=True)
        self.close("internal error")

    def count_in(self, targets: Optional[TargetSet]) -> None:
        """Adopted by a reloaded rule's listener: count in its ``targets`` (open sessions, failures) if
        this session's target is one of them, else in none (the old set is retired)."""
        if self._targets is not None:
            self._targets.closed(self)  # type: ignore[arg-type]
        state = next((each for each in targets if each.name == self.target), None) if targets is not None else None
        self._targets, self._target_state = (targets, state) if state is not None else (None, None)
        if targets is not None and state is not None:
            targets.started(self, state)  # type: ignore[arg-type]

    @property
    def target_state(self) -> Optional[TargetState]:
        """The target's state in the rule's target set (None: a rule with one target)."""
        return self._target_state

    def target_failed(self, error: OSError) -> None:
        """The target's address answered with an ICMP error (ECONNREFUSED: no one at that port):
        counted as a failed connect for passive health; then the listener moves the session to
        the target's next address, or ends it (``session_failed``)."""
        self.icmp_errors += 1
        self.owner.stats.failed_connects += 1
        if self._targets is not None and self._target_state is not None:
            self._targets.failure(self._target_state, error)
        log.debug("#%d %s answers %s", self.id, self.target, describe_error(error))
        self.owner.session_failed(self)

    def move_to(self, sock: Any, server_address: SockAddr) -> None:
        """Go on with ``sock``, connected to the target's next address (the old socket closes)."""
        old = self.socket
        self.del_channel()
        self.set_socket(sock)
        old.close()
        self.server_address = server_address
        self.tried.append(server_address)

    # -- the end ------------------------------------------------------------

    def reset_on_close(self) -> None:
        """(For ``cut``: a datagram socket has no reset to send.)"""

    def close_early(self, reason: str) -> None:
        """End the session now: a drain's timeout, a stop (``reason`` in its end line)."""
        self.close(reason)

    @property
    def duration(self) -> float:
        return time.monotonic() - self.opened_at

    def close(self, reason: str = "stopped") -> None:
        """Close the socket, leave the listener's table and counts, and log the end line (once)."""
        if self.closed_reason is not None:
            super().close()
            return
        self.closed_reason = reason
        super().close()
        self.owner.session_closed(self)
        if self._targets is not None:
            self._targets.closed(self)  # type: ignore[arg-type]
        log_session_end(self, self.owner.label)


def session_details(session: Session, label: str) -> Dict[str, Any]:
    """The ``details`` of a session's ``close`` event."""
    return {"rule": label, "proto": "udp", "client": format_address(session.client_address),
            "target": session.target, "bytes_to_server": session.bytes_to_server,
            "bytes_to_client": session.bytes_to_client, "datagrams_to_server": session.datagrams_to_server,
            "datagrams_to_client": session.datagrams_to_client, "icmp_errors": session.icmp_errors,
            "duration_s": round(session.duration, 6), "reason": session.closed_reason}


def log_session_end(session: Session, label: str) -> None:
    """The session's end line, at DEBUG (``-v``), WARNING for an internal error::

        dns 127.0.0.1:40112 -> 10.0.0.53:53 udp 96/412 bytes 2/2 datagrams 60.004s ended: idle

    A session cut by a drain's timeout or a stop is DEBUG too, unlike a cut TCP connection: a
    datagram flow has no clean end to miss, and every session is open at a stop (the service
    logs how many it cut, in one line).
    """
    level = logging.WARNING if session.closed_reason == "internal error" else logging.DEBUG
    if log.isEnabledFor(level):
        details = session_details(session, label)
        log.log(level, "%s %s -> %s udp %d/%d bytes %d/%d datagrams %.3fs ended: %s", label, details["client"],
                details["target"], details["bytes_to_server"], details["bytes_to_client"],
                details["datagrams_to_server"], details["datagrams_to_client"], details["duration_s"],
                details["reason"], extra={"event": "close", "details": details})
