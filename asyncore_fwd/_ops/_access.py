"""Who may connect to a rule, and how many at once.

Strategy: checked once per accepted client, before anything else is done
for it; a rule without allow/deny lists or limits has no ``AccessControl``
at all, so the default path pays one ``is None`` test per connection.  A
refused client is reset at once and never connected to the target.

* **Lists.**  ``deny`` wins; an empty ``allow`` admits everyone not denied.
  An IPv4-mapped IPv6 client (``::ffff:10.1.2.3``, as a dual-stack
  listener sees IPv4 clients) is matched, and logged, as the IPv4 address
  it is; a mapped entry is made the IPv4 network it names (``Rule``), so
  every form of an IPv4 address meets every other.  An IPv6 network wider
  than /96 (``::/0``) matches IPv6 clients only.
* **Limits.**  ``max_connections`` counts this forwarder's open
  connections; ``max_per_client`` those of each client IP.
* **Behind a balancer** (``accept_proxy``), the client is the one its
  PROXY header names: the lists and ``max_per_client`` judge it once the
  header is read (``AccessAfterHeader``, an admission step after the header's).
* **Log.**  A scan must not flood the log: the first refusal of a rule is
  logged, then at most one summary line per ``REFUSAL_LOG_INTERVAL``
  seconds with the number left out (``RefusalLog``).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Dict, Optional, Union

from .._eventloop._timers import Throttle, Timers
from .._net import SockAddr, end_key, format_address
from .._relay._connection import AdmissionStep, Connection, ConnectionObserver
from .._relay._loopback import is_loopback
from .._values._rules import Rule

__all__ = ["AccessAfterHeader", "AccessControl", "RefusalLog", "client_ip", "is_loopback", "warn_if_open"]

log = logging.getLogger("asyncore_fwd")

#: After a logged refusal, further refusals of the rule are counted, and
#: summed up in one line at most this often (seconds).
REFUSAL_LOG_INTERVAL = 10.0

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def client_ip(address: SockAddr) -> IPAddress:
    """The client's IP address; an IPv4-mapped IPv6 address as its IPv4 address."""
    ip = ipaddress.ip_address(address[0].split("%", 1)[0])  # no scope id: networks have none
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def warn_if_open(rule: Rule, address: SockAddr, label: str) -> None:
    """Warn, at start, of a rule that listens beyond this machine with no allow list (nor
    ``accept_proxy``, which serves its balancers only)."""
    if not rule.allow and not rule.accept_proxy and not is_loopback(address[0]):
        log.warning("%s: listening on %s with no allow list: anyone who can reach it may connect",
                    label, format_address(address))


class RefusalLog:
    """Logs refusals of one rule: the first at once, then one summary per interval."""

    def __init__(self, label: str, timers: Timers, interval: Optional[float] = None) -> None:
        self.label = label
        self.interval = REFUSAL_LOG_INTERVAL if interval is None else interval
        self._throttle = Throttle(timers, self.interval, self._log_suppressed)
        self._last = ("", "")

    def refused(self, client: SockAddr, reason: str) -> None:
        """A client was refused: log it, or count it while a window is open."""
        name = format_address(end_key(client))  # as the lists name it: plain IPv4, not mapped
        if not self._throttle.allow():
            self._last = (name, reason)
            return
        details = {"rule": self.label, "client": name, "reason": reason}
        log.info("%s: refused %s (%s)", self.label, details["client"], reason,
                 extra={"event": "refused", "details": details})

    def _log_suppressed(self, count: int) -> None:
        client, reason = self._last
        details = {"rule": self.label, "client": client, "reason": reason, "suppressed": count}
        log.info("%s: refused %d more clients in the last %g s (last: %s, %s)", self.label, count,
                 self.interval, client, reason, extra={"event": "refused", "details": details})

    def close(self) -> None:
        """Log what is still counted, and stop the window."""
        self._throttle.close()


class AccessControl(AdmissionStep, ConnectionObserver):
    """A rule's allow/deny lists and connection limits, with the per-client counts.

    The first admission step of its rule (``refusal``, at accept); it observes
    the rule's connections (``opened``, ``closed``) to count them per client.
    """

    def __init__(self, rule: Rule, timers: Timers) -> None:
        self.allow = rule.allow
        self.deny = rule.deny
        self.max_connections = rule.max_connections
        self.max_per_client = rule.max_per_client
        #: Open connections per client IP (only with ``max_per_client``).
        self.per_client: Dict[IPAddress, int] = {}
        self.refusals = RefusalLog(rule.label, timers)

    @classmethod
    def for_rule(cls, rule: Rule, timers: Timers) -> Optional[AccessControl]:
        """The rule's access control, or None when it has no lists and no limits."""
        if rule.allow or rule.deny or rule.max_connections or rule.max_per_client:
            return (AccessAfterHeader if rule.accept_proxy else cls)(rule, timers)
        return None

    def permits(self, ip: IPAddress) -> bool:
        """True if the lists let ``ip`` in: not denied, and allowed (or no allow list)."""
        if any(ip in network for network in self.deny):
            return False
        return not self.allow or any(ip in network for network in self.allow)

    def refusal(self, client: SockAddr, open_connections: int) -> Optional[str]:
        """Why ``client`` must be refused ("acl", "max_connections", "max_per_client"), or None."""
        try:
            ip = client_ip(client)
        except ValueError:  # not an IP socket address (cannot happen with TCP/IP): lists cannot match
            return "acl" if self.allow else None
        if not self.permits(ip):
            return "acl"
        if self.max_connections and open_connections >= self.max_connections:
            return "max_connections"
        if self.max_per_client and self.per_client.get(ip, 0) >= self.max_per_client:
            return "max_per_client"
        return None

    def opened(self, conn: Connection) -> None:
        """A connection was admitted: count it for its client."""
        if self.max_per_client:
            ip = client_ip(conn.client_address)
            self.per_client[ip] = self.per_client.get(ip, 0) + 1

    def closed(self, conn: Connection) -> None:
        """A connection closed: its client may open another."""
        if self.max_per_client:
            self._uncount(client_ip(conn.client_address))

    def _uncount(self, ip: IPAddress) -> None:
        left = self.per_client.get(ip, 0) - 1
        if left > 0:
            self.per_client[ip] = left
        else:
            self.per_client.pop(ip, None)


class AccessAfterHeader(AccessControl):
    """The access control of a rule with ``accept_proxy``: the lists and ``max_per_client``
    judge the client a PROXY header names, once read (a step after the header's).

    A client it refuses then is turned away as at accept: a reset, a refusal line, a count.
    """

    def __init__(self, rule: Rule, timers: Timers) -> None:
        super().__init__(rule, timers)
        #: The client IP each admitted connection was counted for (only with ``max_per_client``).
        self.counted: Dict[Connection, IPAddress] = {}

    def refusal(self, client: SockAddr, open_connections: int) -> Optional[str]:
        """At accept the client is a balancer: only ``max_connections`` can be judged."""
        if self.max_connections and open_connections >= self.max_connections:
            return "max_connections"
        return None

    def admit(self, conn: Connection) -> bool:
        """The header named the client: judge it, and count it for ``max_per_client``."""
        reason = AccessControl.refusal(self, conn.client_address, 0)  # (max_connections was judged at accept)
        if reason is not None:
            conn.turn_away(reason)
            return False
        if self.max_per_client:
            ip = client_ip(conn.client_address)
            self.counted[conn] = ip
            self.per_client[ip] = self.per_client.get(ip, 0) + 1
        return True

    def opened(self, conn: Connection) -> None:
        """Not yet: the client is the balancer until its header is read (``admit``)."""

    def closed(self, conn: Connection) -> None:
        """A connection closed: its client, if counted, may open another."""
        ip = self.counted.pop(conn, None)
        if ip is not None:
            self._uncount(ip)
