"""The servers behind the forwarders in benchmarks/run.py: started on first
use (a stdlib echo/sink/source server, its UDP echo and counting sink, redis,
nginx; iperf3 once per run) on free ports of 127.0.0.1, and kept for the
whole run."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator

from benchlib import BENCH, HOST, Proc, free_port
from peers import PY


class Servers:
    """Servers started on first use and kept for the whole run."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ports: Dict[str, int] = {}

    def _python_server(self, key: str, *args: str) -> int:
        if key not in self.ports:
            proc = Proc([PY, str(BENCH / "echo_server.py"), *args], key, self.tmp)
            self.ports[key] = int(proc.wait_for(r"^(\d+)$").group(1))
        return self.ports[key]

    def echo(self) -> int:
        return self._python_server("echo-server", "--mode", "echo")

    def sink(self) -> int:
        return self._python_server("sink-server", "--mode", "sink")

    def source(self) -> int:
        # Endless in practice: the client reads for a fixed time, then closes.
        return self._python_server("source-server", "--mode", "source", "--bytes", str(1 << 50))

    def udp_echo(self) -> int:
        return self._python_server("udp-echo-server", "--mode", "udp-echo")

    def udp_sink(self) -> int:
        """A UDP port that counts what arrives (asked with "!stats", see echo_server.py)."""
        return self._python_server("udp-sink-server", "--mode", "udp-sink")

    def redis(self) -> int:
        if "redis" not in self.ports:
            port = free_port()
            # No persistence: a pure in-memory request/response server.
            proc = Proc(["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                         "--daemonize", "no", "--dir", str(self.tmp)], "redis", self.tmp)
            proc.wait_listening(port)
            self.ports["redis"] = port
        return self.ports["redis"]

    def nginx(self) -> int:
        if "nginx" not in self.ports:
            port = free_port()
            root = self.tmp / "nginx"
            (root / "www").mkdir(parents=True, exist_ok=True)
            (root / "www" / "index.html").write_text("<html><body>" + "benchmark " * 100 + "</body></html>\n")
            for path in (self.tmp, root, root / "www"):
                path.chmod(0o755)  # nginx workers run as nobody when started as root
            temp_paths = "\n".join(f"    {name}_temp_path {root}/{name};"
                                   for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
            (root / "nginx.conf").write_text(f"""daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp_paths}
    server {{
        listen {HOST}:{port};
        root {root}/www;
    }}
}}
""")
            proc = Proc(["nginx", "-p", str(root), "-c", str(root / "nginx.conf"), "-e", str(root / "error.log")],
                        "nginx", self.tmp)
            proc.wait_listening(port)
            self.ports["nginx"] = port
        return self.ports["nginx"]

    @contextmanager
    def iperf3(self) -> Iterator[int]:
        """A one-test iperf3 server (-1): a fresh one for each run."""
        port = free_port()
        proc = Proc(["iperf3", "-s", "-1", "-B", HOST, "-p", str(port)], "iperf3-server", self.tmp)
        try:
            proc.wait_listening(port)
            yield port
        finally:
            proc.stop(grace=1.0)

