"""What the UDP rule tests share: an echo server in a thread, a running service, a client."""

from __future__ import annotations

import selectors
import socket
import threading
from typing import Any, Dict, List, Optional, Set, Tuple

from asyncore_fwd import Rule, Service
from conftest import WAIT


class UdpEcho:
    """A UDP echo server in a thread: echoes every datagram to its sender, and notes each sender."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_DGRAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)  # room for a test's burst
        self.socket.bind((host, port))
        self.socket.setblocking(False)
        self.port: int = self.socket.getsockname()[1]
        #: Every (host, port) a datagram came from.
        self.peers: Set[Tuple[str, int]] = set()
        self.received = 0
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.socket, selectors.EVENT_READ)
        self._running = True
        self._thread = threading.Thread(target=self._run, name="udp-echo", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._running:
            for _ in self._selector.select(0.05):
                while True:
                    try:
                        data, peer = self.socket.recvfrom(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    self.peers.add(peer[:2])
                    self.received += 1
                    try:
                        self.socket.sendto(data, peer)
                    except OSError:
                        pass

    def close(self) -> None:
        self._running = False
        self._thread.join(WAIT)
        self._selector.close()
        self.socket.close()


class RunningUdp:
    """A Service with the given rules, served by a thread until ``stop()``."""

    def __init__(self, rules: List[Rule], loop: str = "auto") -> None:
        self.service = Service(rules)
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._serve, args=(loop,), daemon=True)
        self.thread.start()

    def _serve(self, loop: str) -> None:
        try:
            self.service.serve_forever(poll_interval=0.05, loop=loop)
        except BaseException as error:  # pragma: no cover - shown by stop()
            self.error = error

    def address(self, label: str) -> Tuple[str, int]:
        return self.service.forwarders[label].address

    def stats(self, label: str) -> Dict[str, int]:
        return self.service.stats()[label]

    def listener(self, label: str) -> Any:
        return self.service.forwarders[label]

    def stop(self) -> None:
        self.service.stop()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "serve_forever did not return after stop()"
        assert self.error is None, self.error


def free_udp_port() -> int:
    """A loopback port free a moment ago for UDP and for TCP alike (a rule may turn from one to the other)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free for both UDP and TCP")


def client(family: int = socket.AF_INET, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(WAIT)
    return sock


def ask(sock: socket.socket, address: Tuple[str, int], data: bytes,
        timeout: float = WAIT) -> Tuple[bytes, Tuple[str, int]]:
    """Send ``data`` to ``address``, and return the first reply with where it came from."""
    sock.settimeout(timeout)
    sock.sendto(data, address)
    reply, sender = sock.recvfrom(65535)
    return reply, sender[:2]


def no_reply(sock: socket.socket, timeout: float = 0.3) -> bool:
    """True if nothing arrives within ``timeout`` s."""
    sock.settimeout(timeout)
    try:
        sock.recvfrom(65535)
    except socket.timeout:
        return True
    return False


def udp_rule(name: str, port: int, **options: Any) -> Rule:
    return Rule("127.0.0.1", 0, "127.0.0.1", port, name=name, proto="udp", **options)


def own_ipv4() -> Optional[str]:
    """An IPv4 address of this host's that is not a loopback one (the source of a route out), or None."""
    return _route_source(socket.AF_INET, "192.0.2.1")


def own_ipv6() -> Optional[str]:
    """A global or unique-local IPv6 address of this host's (the source of a route out), or None."""
    return _route_source(socket.AF_INET6, "2001:db8::1")


def _route_source(family: int, documentation_address: str) -> Optional[str]:
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((documentation_address, 9))  # (a UDP connect sends nothing: it picks a route and a source)
        except OSError:
            return None
        host: str = probe.getsockname()[0]
    return None if host.startswith("127.") or host in ("::1", "::") or host.startswith("fe80:") else host
