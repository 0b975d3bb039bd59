"""A UDP rule in a script: a Service forwarding datagrams to a small UDP echo server.

The echo server stands in for a DNS, syslog or game server on a free
loopback port; the Service listens on another and forwards each client's
datagrams there, one session per client address.  Three datagrams go
through, an empty one among them: each comes back whole, from the address
the client sent to; half a second later the session has idled out.

Run it with ``python examples/udp_relay.py``: it prints what came back.
"""

import socket
import threading
import time

from asyncore_fwd import Rule, Service


def start_echo_server():
    """A UDP echo server in a thread: every datagram goes back to its sender."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))

    def echo():
        while True:
            try:
                data, sender = server.recvfrom(65535)
                server.sendto(data, sender)
            except OSError:  # closed at the end
                return

    threading.Thread(target=echo, daemon=True).start()
    return server


def main():
    server = start_echo_server()
    # proto="udp": a datagram listener, one session per client address; a session
    # ends after idle_timeout seconds without a datagram either way (0: 60 s).
    rule = Rule("127.0.0.1", 0, "127.0.0.1", server.getsockname()[1], name="echo", proto="udp",
                idle_timeout=0.5, max_connections=1000)
    service = Service([rule], map={})
    address = service.forwarders["echo"].address
    loop = threading.Thread(target=service.serve_forever, daemon=True)
    loop.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(10)  # always a timeout: UDP may lose a datagram
            for message in (b"hello", b"", b"bye"):
                client.sendto(message, address)
                reply, sender = client.recvfrom(65535)
                print(f"{reply!r} from the address sent to: {sender == address}")
        deadline = time.monotonic() + 10
        while service.stats()["echo"]["active"] and time.monotonic() < deadline:
            time.sleep(0.05)  # the session ends idle_timeout after its last datagram
        counters = service.stats()["echo"]
        print(f"sessions={counters['accepted']} open={counters['active']} "
              f"datagrams_to_server={counters['datagrams_to_server']}")
    finally:
        service.stop()  # safe from any thread: closes the port (and cuts any session still open)
        loop.join(timeout=10)
        server.close()


if __name__ == "__main__":
    main()
