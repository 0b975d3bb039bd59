"""Testing a client's retry logic with faults injected by asyncore_fwd.

The package's pytest plugin gives any test suite the ``asyncore_fwd_proxy``
fixture: a forwarder in front of your server, running in a thread, with
toxics you add and remove while the test runs.  Here the client under test
is a small HTTP fetcher with retries, and the server is Python's own
``http.server`` on loopback.

    python -m pytest examples/test_client_retries.py -v
"""

from __future__ import annotations

import http.client
import http.server
import threading
from typing import Iterator, Tuple

import pytest

from asyncore_fwd.toxics import Latency, ResetPeer


def fetch(host: str, port: int, attempts: int = 3, timeout: float = 1.0) -> bytes:
    """The client under test: GET / with a timeout, tried again on a network error."""
    for attempt in range(1, attempts + 1):
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", "/")
            return conn.getresponse().read()
        except (OSError, http.client.HTTPException):
            if attempt == attempts:
                raise
        finally:
            conn.close()
    raise AssertionError("unreachable")


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass  # keep the test output quiet


@pytest.fixture
def web_server() -> Iterator[Tuple[str, int]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[:2]
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_succeeds_through_a_healthy_proxy(asyncore_fwd_proxy, web_server) -> None:
    proxy = asyncore_fwd_proxy(*web_server)
    assert fetch(*proxy.address) == b"hello"


def test_retries_after_connections_are_reset(asyncore_fwd_proxy, web_server) -> None:
    """Half the connections are reset at once; with this seed the first two are, the third is not."""
    proxy = asyncore_fwd_proxy(*web_server, seed=7)
    with proxy.toxic(ResetPeer(after=0, toxicity=0.5), direction="both"):
        assert fetch(*proxy.address, attempts=3) == b"hello"


def test_gives_up_when_the_server_is_down(asyncore_fwd_proxy, web_server) -> None:
    proxy = asyncore_fwd_proxy(*web_server)
    with proxy.down():
        with pytest.raises(ConnectionRefusedError):
            fetch(*proxy.address)
    assert fetch(*proxy.address) == b"hello"  # back up


def test_a_reply_slower_than_the_timeout_fails_every_attempt(asyncore_fwd_proxy, web_server) -> None:
    proxy = asyncore_fwd_proxy(*web_server)
    with proxy.toxic(Latency(1.0), direction="downstream"):
        with pytest.raises(TimeoutError):
            fetch(*proxy.address, attempts=2, timeout=0.3)
