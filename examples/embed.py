"""Embedding asyncore_fwd in a program: two ways to run a Forwarder.

Both put a tiny HTTP server on a free loopback port, forward a second free
port to it, and fetch a page through the forwarder:

* ``main()`` runs the forwarder's own loop, ``serve_forever()``, in a thread;
* ``run_in_own_loop()`` drives it from the caller's own asyncore loop.

Run it with ``python examples/embed.py``: it prints the page twice.
"""

import http.server
import threading
import urllib.request
import warnings

with warnings.catch_warnings():
    # 3.10/3.11: the standard library's asyncore warns that it is deprecated.
    # 3.12+: the pyasyncore backport (a dependency of asyncore_fwd) provides it.
    warnings.simplefilter("ignore", DeprecationWarning)
    import asyncore

from asyncore_fwd import Forwarder

BODY = b"Hello from behind the forwarder.\n"


class HelloHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with BODY: no files involved."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format, *args):
        pass  # keep the output to the page itself


def start_http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HelloHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def fetch(port):
    # Always a timeout: a forwarder that misbehaves must not hang the caller.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
        return response.read()


def main():
    server = start_http_server()
    # Port 0: the system picks a free port; fwd.address tells which.  An own
    # map (rather than asyncore's global socket_map) keeps the forwarder apart
    # from any other asyncore code in the process.
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", server.server_address[1], map={})
    loop = threading.Thread(target=fwd.serve_forever, daemon=True)
    loop.start()
    try:
        print(fetch(fwd.address[1]).decode(), end="")
    finally:
        # stop() only sets a flag, so it is safe from any thread; serve_forever
        # sees it within its poll interval (0.5 s) and, on its way out, closes
        # the listener and every forwarded connection.
        fwd.stop()
        loop.join(timeout=10)
        server.shutdown()
        server.server_close()


def run_in_own_loop():
    server = start_http_server()
    my_map = {}
    fwd = Forwarder("127.0.0.1", 0, "127.0.0.1", server.server_address[1], map=my_map)
    pages = []
    client = threading.Thread(target=lambda: pages.append(fetch(fwd.address[1])), daemon=True)
    client.start()
    # This thread is the loop: pump a round at a time while the client thread
    # works.  count=1 with timeout=0.05 returns after at most 50 ms, so the
    # caller keeps control (here, to stop after 200 rounds at most).  use_poll:
    # select() cannot watch descriptors above 1023.
    for _ in range(200):
        asyncore.loop(timeout=0.05, use_poll=True, map=my_map, count=1)
        if not client.is_alive():
            break
    fwd.close()  # without serve_forever, closing is ours to do: listener and connections
    client.join(timeout=10)
    server.shutdown()
    server.server_close()
    if not pages:
        raise SystemExit("the page did not come back through the forwarder")
    print(pages[0].decode(), end="")


if __name__ == "__main__":
    main()
    run_in_own_loop()
