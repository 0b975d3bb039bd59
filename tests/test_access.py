"""Access control: allow/deny lists and connection limits, checked at accept."""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Iterator

import pytest

from asyncore_fwd import Rule
from asyncore_fwd._eventloop._timers import Timers
from asyncore_fwd._ops import _access
from asyncore_fwd._ops._access import AccessControl, client_ip, is_loopback
from conftest import WAIT, connect_until_reset, needs_dual_stack, needs_ipv6, recv_exactly, wait_for


@pytest.fixture
def silent_target() -> Iterator[socket.socket]:
    """A listening socket that never accepts: its queue shows whether anyone connected."""
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(16)
    target.setblocking(False)
    yield target
    target.close()


def echo_once(address, source: str = "127.0.0.1") -> socket.socket:
    """Connect (from ``source``) and check a round trip through the echo server."""
    client = socket.create_connection(address, timeout=WAIT, source_address=(source, 0))
    client.sendall(b"ping")
    assert recv_exactly(client, 4) == b"ping"
    return client


def refusals(caplog: pytest.LogCaptureFixture) -> list:
    return [r for r in caplog.records if getattr(r, "event", None) == "refused"]


#: Overrides start_forwarder's loops and relay modes with one of each: the
#: lists are checked at accept, before either plays a part.
one_loop = pytest.mark.parametrize(("loop_kind", "splice"), [("poll", False)])


# -- allow / deny ---------------------------------------------------------------


def test_denied_client_is_reset_and_never_reaches_the_target(start_forwarder, silent_target) -> None:
    fwd = start_forwarder(silent_target.getsockname()[1], deny=["127.0.0.0/8"])
    assert connect_until_reset(fwd.address) == b""
    wait_for(lambda: fwd.forwarder.stats.refused_acl == 1, what="the refusal to be counted")
    with pytest.raises(BlockingIOError):
        silent_target.accept()  # nobody was connected to the target


def test_client_outside_the_allow_list_is_reset(start_forwarder, silent_target) -> None:
    fwd = start_forwarder(silent_target.getsockname()[1], allow=["10.0.0.0/8", "192.168.0.0/16"])
    assert connect_until_reset(fwd.address) == b""
    wait_for(lambda: fwd.forwarder.stats.refused_acl == 1, what="the refusal to be counted")
    with pytest.raises(BlockingIOError):
        silent_target.accept()


def test_client_in_the_allow_list_is_forwarded(start_forwarder, echo_server) -> None:
    fwd = start_forwarder(echo_server.port, allow=["10.0.0.0/8", "127.0.0.1"])
    echo_once(fwd.address).close()
    assert fwd.forwarder.stats.refused_acl == 0


@needs_ipv6
def test_ipv6_client_in_the_allow_list_is_forwarded(start_forwarder, echo_server) -> None:
    fwd = start_forwarder(echo_server.port, local_host="::1", allow=["::1/128"])
    echo_once(fwd.address, source="::1").close()


@needs_ipv6
def test_ipv6_client_outside_an_ipv4_allow_list_is_reset(start_forwarder, echo_server) -> None:
    fwd = start_forwarder(echo_server.port, local_host="::1", allow=["127.0.0.0/8"])
    assert connect_until_reset(fwd.address) == b""
    assert echo_server.accepted == 0


def test_ipv4_mapped_client_matches_ipv4_networks() -> None:
    access = AccessControl(Rule("::", 0, "127.0.0.1", 9, allow=["10.0.0.0/8"]), Timers())
    assert access.refusal(("::ffff:10.1.2.3", 5000, 0, 0), 0) is None
    assert access.refusal(("::ffff:11.1.2.3", 5000, 0, 0), 0) == "acl"
    assert client_ip(("::ffff:10.1.2.3", 5000, 0, 0)) == ipaddress.ip_address("10.1.2.3")


# -- addresses in every form ------------------------------------------------------
#
# A client reaches a rule as IPv4 or IPv6, through a listener on 127.0.0.1, ::1
# or a dual-stack [::] (which sees IPv4 clients as ::ffff:a.b.c.d); an entry
# names it as plain IPv4, an IPv4-mapped address or network, or IPv6.  Every
# entry that names the client matches it, whatever the forms.

#: (listener, client): the pairs that can connect at all.
LISTENER_CLIENT = [
    pytest.param("127.0.0.1", "127.0.0.1", id="ipv4_listener-ipv4_client"),
    pytest.param("::1", "::1", id="ipv6_listener-ipv6_client", marks=needs_ipv6),
    pytest.param("::", "127.0.0.1", id="dual_stack_listener-ipv4_client", marks=needs_dual_stack),
    pytest.param("::", "::1", id="dual_stack_listener-ipv6_client", marks=needs_dual_stack),
]
#: Entries naming the test's clients, by form: IPv4 ones name 127.0.0.1, the IPv6 one ::1.
ENTRY_FORMS = {
    "ipv4": "127.0.0.1",
    "mapped_address": "::ffff:127.0.0.1",
    "mapped_network": "::ffff:127.0.0.0/104",
    "ipv6": "::1",
}
#: The client's address as each listener reports it at accept.
SEEN_AS = {
    ("127.0.0.1", "127.0.0.1"): ("127.0.0.1", 40000),
    ("::1", "::1"): ("::1", 40000, 0, 0),
    ("::", "127.0.0.1"): ("::ffff:127.0.0.1", 40000, 0, 0),
    ("::", "::1"): ("::1", 40000, 0, 0),
}


def names_client(form: str, client: str) -> bool:
    """Whether the entry of ``form`` names ``client`` (the IPv4 forms name the IPv4 client)."""
    return (form == "ipv6") == (":" in client)


@pytest.mark.parametrize("kind", ["allow", "deny"])
@pytest.mark.parametrize("form", ENTRY_FORMS)
@pytest.mark.parametrize(("listener", "client"), LISTENER_CLIENT)
def test_entry_matches_the_client_it_names_in_any_form(listener: str, client: str, form: str, kind: str) -> None:
    access = AccessControl(Rule(listener, 0, "127.0.0.1", 9, **{kind: [ENTRY_FORMS[form]]}), Timers())
    admitted = access.refusal(SEEN_AS[listener, client], 0) is None
    assert admitted == (names_client(form, client) == (kind == "allow"))


# Real sockets, where the listener's family decides what address the client has.
@one_loop
@pytest.mark.parametrize("kind", ["allow", "deny"])
@pytest.mark.parametrize("form", ENTRY_FORMS)
@pytest.mark.parametrize(("listener", "client"), LISTENER_CLIENT)
def test_client_is_admitted_or_refused_as_its_entry_says_in_any_form(start_forwarder, echo_server, listener: str,
                                                                    client: str, form: str, kind: str) -> None:
    fwd = start_forwarder(echo_server.port, local_host=listener, **{kind: [ENTRY_FORMS[form]]})
    if names_client(form, client) == (kind == "allow"):
        echo_once((client, fwd.port), source=client).close()
        assert fwd.forwarder.stats.refused_acl == 0
    else:
        assert connect_until_reset((client, fwd.port)) == b""
        wait_for(lambda: fwd.forwarder.stats.refused_acl == 1, what="the refusal to be counted")
        assert echo_server.accepted == 0


def test_mapped_entry_is_kept_as_the_ipv4_network_it_names() -> None:
    rule = Rule("::", 0, "127.0.0.1", 9, allow=["::ffff:127.0.0.0/104", "::ffff:10.1.2.3", "[::ffff:10.1.2.4]"],
                deny=["::ffff:0:0/96", "::/0"])
    assert rule.allow == tuple(map(ipaddress.ip_network, ["127.0.0.0/8", "10.1.2.3/32", "10.1.2.4/32"]))
    assert rule.deny == (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))  # ::/0: IPv6 only


def test_mapped_entry_does_not_match_other_ipv4_clients() -> None:
    access = AccessControl(Rule("::", 0, "127.0.0.1", 9, deny=["::ffff:10.0.0.0/104"]), Timers())
    assert access.refusal(("::ffff:10.9.9.9", 5000, 0, 0), 0) == "acl"
    assert access.refusal(("::ffff:11.0.0.1", 5000, 0, 0), 0) is None
    assert access.refusal(("11.0.0.1", 5000), 0) is None


def test_deny_wins_over_allow() -> None:
    access = AccessControl(Rule("127.0.0.1", 0, "127.0.0.1", 9, allow=["10.0.0.0/8"], deny=["10.6.0.0/16"]),
                           Timers())
    assert access.refusal(("10.5.0.1", 1), 0) is None
    assert access.refusal(("10.6.0.1", 1), 0) == "acl"


def test_rule_without_lists_or_limits_has_no_access_control() -> None:
    assert AccessControl.for_rule(Rule("127.0.0.1", 0, "127.0.0.1", 9), Timers()) is None


def test_only_loopback_addresses_count_as_private_listeners() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.168.1.1")


def test_loopback_listener_without_allow_list_does_not_warn(start_forwarder, echo_server, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="asyncore_fwd"):
        start_forwarder(echo_server.port)
    assert not [r for r in caplog.records if "allow list" in r.getMessage()]


# -- limits ---------------------------------------------------------------------


def test_connection_over_max_connections_is_reset_and_counted(start_forwarder, echo_server) -> None:
    fwd = start_forwarder(echo_server.port, max_connections=2)
    first, second = echo_once(fwd.address), echo_once(fwd.address)
    assert connect_until_reset(fwd.address) == b""
    assert fwd.forwarder.stats.refused_limit == 1
    assert echo_server.accepted == 2
    first.close()
    second.close()


def test_connection_is_admitted_again_once_one_closes(start_forwarder, echo_server) -> None:
    fwd = start_forwarder(echo_server.port, max_connections=1)
    first = echo_once(fwd.address)
    first.close()
    wait_for(lambda: not fwd.forwarder.connections, what="the first connection to close")
    echo_once(fwd.address).close()


def test_connection_over_max_per_client_is_reset_while_other_clients_get_in(start_forwarder, echo_server) -> None:
    fwd = start_forwarder(echo_server.port, max_per_client=1)
    first = echo_once(fwd.address, source="127.0.0.1")
    assert connect_until_reset(fwd.address) == b""  # from 127.0.0.1 again
    other = echo_once(fwd.address, source="127.0.0.2")  # another client IP
    assert fwd.forwarder.stats.refused_limit == 1
    first.close()
    other.close()


# -- the refusal log --------------------------------------------------------------


def test_refusal_is_logged_with_rule_client_and_reason(start_forwarder, silent_target, caplog) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    fwd = start_forwarder(silent_target.getsockname()[1], deny=["127.0.0.1"], name="guarded")
    connect_until_reset(fwd.address)
    wait_for(lambda: refusals(caplog), what="the refusal log line")
    (record,) = refusals(caplog)
    assert record.details["rule"] == "guarded" and record.details["reason"] == "acl"
    assert record.details["client"].startswith("127.0.0.1:")


@needs_dual_stack
@one_loop
def test_refusal_log_names_a_dual_stack_ipv4_client_in_plain_ipv4_form(start_forwarder, silent_target,
                                                                       caplog) -> None:
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    fwd = start_forwarder(silent_target.getsockname()[1], local_host="::", deny=["127.0.0.1"])
    connect_until_reset(("127.0.0.1", fwd.port))
    wait_for(lambda: refusals(caplog), what="the refusal log line")
    (record,) = refusals(caplog)
    assert record.details["client"].startswith("127.0.0.1:")
    assert "refused 127.0.0.1:" in record.getMessage()


def test_a_burst_of_refusals_logs_one_line_then_one_summary(start_forwarder, silent_target, caplog,
                                                            monkeypatch) -> None:
    monkeypatch.setattr(_access, "REFUSAL_LOG_INTERVAL", 0.5)
    caplog.set_level(logging.INFO, logger="asyncore_fwd")
    fwd = start_forwarder(silent_target.getsockname()[1], deny=["127.0.0.1"])
    for _ in range(20):
        connect_until_reset(fwd.address)

    def suppressed() -> int:
        return sum(r.details.get("suppressed", 0) for r in refusals(caplog))

    wait_for(lambda: suppressed() == 19, what="the summary lines to account for every refusal")
    first, *summaries = refusals(caplog)
    assert "suppressed" not in first.details
    assert 1 <= len(summaries) <= 2  # the burst may straddle the end of a window
    assert "more clients" in summaries[0].getMessage()
    assert fwd.forwarder.stats.refused_acl == 20
