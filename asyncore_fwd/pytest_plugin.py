"""A pytest plugin: a forwarder in front of your server, to inject faults in tests.

Installed with the package (a ``pytest11`` entry point), it gives every test
suite the ``asyncore_fwd_proxy`` fixture::

    def test_client_retries_when_the_server_is_slow(asyncore_fwd_proxy, server):
        proxy = asyncore_fwd_proxy(server.host, server.port)
        with proxy.toxic(Latency(0.5)):
            ...   # point the client at proxy.address

Each forwarder it makes serves in a background thread and is stopped, with
its port and connections closed, when the test ends (a loop that does not
stop within ``Forwarder.running``'s ``stop_timeout`` is logged and left).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import pytest

from ._listener._forwarder import Forwarder

__all__ = ["asyncore_fwd_proxy"]


@pytest.fixture
def asyncore_fwd_proxy() -> Iterator[Callable[..., Forwarder]]:
    """A factory: ``asyncore_fwd_proxy(host, port, **options)`` returns a running ``Forwarder``.

    It listens on 127.0.0.1 on a free port (``proxy.address``) and forwards
    to ``host:port``; ``options`` are ``Forwarder``'s (``seed=``,
    ``connect_timeout=``...).
    """
    with contextlib.ExitStack() as stack:
        def start(host: str, port: int, **options: Any) -> Forwarder:
            fwd = Forwarder("127.0.0.1", 0, host, port, map={}, **options)
            return stack.enter_context(fwd.running())
        yield start
