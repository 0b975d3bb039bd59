"""Target choice: whom a connection's server connect goes to, and what the choice hears back."""

from __future__ import annotations

import errno
import socket
from typing import List, Optional, Tuple

from asyncore_fwd import Connection, Forwarder
from asyncore_fwd._relay._targets import Target, TargetChoice
from conftest import WAIT, EchoServer, connect_until_reset, dead_port, recv_all, wait_for

Outcome = Tuple[str, int, Optional[int]]


class FirstThatAnswers:
    """A choice as a feature with several targets would make one: its own servers, in turn,
    noting what became of each connect."""

    def __init__(self, ports: List[int], outcomes: List[Outcome]) -> None:
        self._left: List[Target] = [(socket.AF_INET, ("127.0.0.1", port)) for port in ports]
        self.outcomes = outcomes

    def next_target(self) -> Optional[Target]:
        return self._left.pop(0) if self._left else None

    def failed(self, target: Target, error: OSError) -> None:
        self.outcomes.append(("failed", target[1][1], error.errno))

    def succeeded(self, target: Target) -> None:
        self.outcomes.append(("succeeded", target[1][1], None))


class ChoosingForwarder(Forwarder):
    """Connects each client to its own list of servers instead of the remote's addresses."""

    ports: List[int]
    outcomes: List[Outcome]

    def target_choice(self, conn: Connection) -> TargetChoice:
        return FirstThatAnswers(self.ports, self.outcomes)


def choosing(ports: List[int]) -> ChoosingForwarder:
    fwd = ChoosingForwarder("127.0.0.1", 0, "127.0.0.1", dead_port(), map={})  # its remote is never tried
    fwd.ports, fwd.outcomes = ports, []
    return fwd


def test_a_choice_of_two_servers_whose_first_refuses_serves_the_client_from_the_second(
        echo_server: EchoServer) -> None:
    """The choice gives the addresses; the connect tells it that the first refused and the second answered."""
    dead = dead_port()
    fwd = choosing([dead, echo_server.port])
    with fwd.running():
        with socket.create_connection(fwd.address, timeout=WAIT) as client:
            client.sendall(b"through the second")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"through the second"
        wait_for(lambda: not fwd.connections, what="the pair to close")
    assert fwd.outcomes == [("failed", dead, errno.ECONNREFUSED), ("succeeded", echo_server.port, None)]


def test_a_choice_with_nothing_left_resets_the_client() -> None:
    """Every server the choice gives refuses: it hears of each, and the client is reset."""
    first, second = dead_port(), dead_port()
    fwd = choosing([first, second])
    with fwd.running():
        assert connect_until_reset(fwd.address) == b""
        wait_for(lambda: fwd.stats.failed_connects == 1, what="the failed connect to be counted")
    assert fwd.outcomes == [("failed", first, errno.ECONNREFUSED), ("failed", second, errno.ECONNREFUSED)]
