"""FaultControls on a listener that is not a Forwarder: the seam a new kind of listener plugs into.

A listener that offers what ``ControlledListener`` names -- its connections,
its rule and map, closing and reopening its port -- gets ``down()``,
``wait_for_connections`` and ``close_connections``, thread-safe, with none of
``Forwarder``'s code.  The Forwarder's own use of them is tested in
test_toxics.py.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any, Iterator, List, Set, Tuple

import pytest

from asyncore_fwd import Rule
from asyncore_fwd._compat import asyncore
from asyncore_fwd._eventloop import _loop
from asyncore_fwd._eventloop._wakeup import LoopCalls
from asyncore_fwd._net import LINGER_ABORT, SocketMap
from asyncore_fwd.toxics._controls import FaultControls
from conftest import WAIT, recv_all, recv_exactly, recv_until_reset


class EchoChannel(asyncore.dispatcher_with_send):
    """One client of ``EchoListener``: sends back what it reads."""

    def __init__(self, listener: EchoListener, sock: socket.socket) -> None:
        super().__init__(sock, map=listener._map)
        self.listener = listener
        listener.connections.add(self)

    def handle_read(self) -> None:
        data = self.recv(65536)
        if data:
            self.send(data)

    def handle_close(self) -> None:
        self.close()

    def handle_error(self) -> None:
        raise  # fail the test, as CPython's asyncore tests do

    def close(self) -> None:
        self.listener.closed_in.append(threading.get_ident())
        self.listener.connections.discard(self)
        super().close()

    # -- what down() asks of a connection (the relay's Connection has the same) --

    def reset_on_close(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)

    def close_early(self, reason: str) -> None:
        self.close()


class EchoListener(asyncore.dispatcher):
    """A listener of another kind: it answers each client itself (no server behind it)."""

    def __init__(self, map: SocketMap) -> None:
        super().__init__(map=map)
        self.connections: Set[EchoChannel] = set()
        self.rule = Rule("127.0.0.1", 0, "127.0.0.1", 1)  # not forwarded anywhere; splice is off
        #: The thread each connection was closed in: the loop's, whoever asked.
        self.closed_in: List[int] = []
        self.create_socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listen(("127.0.0.1", 0))
        self.address: Tuple[str, int] = self.socket.getsockname()
        self.faults = FaultControls(self)

    def _listen(self, address: Tuple[str, int]) -> None:
        self.set_reuse_addr()
        self.bind(address)
        self.listen(16)

    def readable(self) -> bool:
        return not self.faults.is_down

    def writable(self) -> bool:
        return False

    def handle_accepted(self, sock: socket.socket, addr: Any) -> None:
        EchoChannel(self, sock)

    def handle_error(self) -> None:
        raise

    # -- what FaultControls.down() needs of the listener --

    def _close_port(self) -> None:
        old = self.socket
        self.del_channel()
        self.set_socket(socket.socket(socket.AF_INET, socket.SOCK_STREAM))  # in the map, not listening
        self.accepting = False
        old.close()

    def _reopen_port(self) -> None:
        try:
            self._listen(self.address)
        except OSError:
            self._close_port()
            raise


@contextlib.contextmanager
def serving(map: SocketMap) -> Iterator[int]:
    """Run ``map``'s loop in a thread, taking calls from others through LoopCalls; yields its thread id."""
    ready, stop, failed = threading.Event(), threading.Event(), []

    def serve() -> None:
        backend = _loop.open_loop("poll", map)
        calls = LoopCalls.open(map)
        ready.set()
        try:
            while not stop.is_set():
                backend.poll(0.05)
        except BaseException as error:  # reported by the test, not lost with the thread
            failed.append(error)
        finally:
            calls.close()
            backend.close()

    thread = threading.Thread(target=serve, name="test loop", daemon=True)
    thread.start()
    assert ready.wait(WAIT), "the loop did not start"
    try:
        yield thread.ident or 0
    finally:
        stop.set()
        thread.join(WAIT)
        asyncore.close_all(map, ignore_all=True)
    assert not thread.is_alive(), "the loop did not stop"
    assert not failed, f"the loop failed: {failed[0]!r}"


def test_a_listener_of_another_kind_gets_down_and_the_connection_controls() -> None:
    sock_map: SocketMap = {}
    listener = EchoListener(sock_map)
    with serving(sock_map) as loop_thread:
        controls = listener.faults
        assert controls.wait_for_connections(1, timeout=0.1) is False
        with socket.create_connection(listener.address, timeout=WAIT) as client:
            assert controls.wait_for_connections(1, timeout=WAIT)
            client.sendall(b"ping")
            assert recv_exactly(client, 4) == b"ping"
            with controls.down() as down:
                assert down is listener
                recv_until_reset(client)  # cut: a reset, never a clean end
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(listener.address, timeout=WAIT)
        with socket.create_connection(listener.address, timeout=WAIT) as again:  # the same port, back
            assert controls.wait_for_connections(1, timeout=WAIT)
            controls.close_connections()
            assert recv_all(again) == b""  # closed cleanly: EOF
        assert listener.closed_in == [loop_thread, loop_thread]
