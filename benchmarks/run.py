#!/usr/bin/env python3
"""Benchmark asyncore_fwd against a direct connection and other forwarders.

    python benchmarks/run.py --quick
    python benchmarks/run.py --peers direct,asyncore_fwd,socat --workloads bulk,rr --repeat 5

Starts the servers (iperf3, redis, nginx, a stdlib echo server) and each
forwarder on 127.0.0.1 with ephemeral ports, runs the workloads, and prints
one table of medians (min-max range over the repeats) with ratios to a direct
connection and to socat.  The same table goes to benchmarks/results/latest.md,
and every raw sample to latest.json.

Peers run interleaved: each repeat runs every peer once per workload, in an
order rotated by one each repeat, so slow drifts of the machine spread evenly.
A real client is used where installed (iperf3, redis-benchmark, wrk), a
standard-library one otherwise; the table says which.  Nothing here fails on
a slow result: a peer that cannot do a workload gets "failed: why" in its cell.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from benchlib import BENCH, HOST, ROOT, Failed, Partial, PeakRss, Proc, Skipped, free_port, raise_fd_limit

PY = sys.executable


# --- sizes ----------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    repeat: int
    bulk_seconds: int          # iperf3 -t (and the stdlib bulk client's run)
    rr_c1_requests: int
    rr_c50_requests: int
    http_seconds: int
    burst_clients: int
    burst_cap: float           # seconds: report how many were served by then
    held_conns: int
    held_rr_seconds: float     # echo ping-pong by 50 clients, with and without the idle ones
    client_timeout: float      # bound on any one client run


SIZES = {
    "full": Sizes(repeat=3, bulk_seconds=5, rr_c1_requests=50000,
                  rr_c50_requests=100000, http_seconds=5, burst_clients=3000, burst_cap=30.0,
                  held_conns=9000, held_rr_seconds=5.0, client_timeout=120.0),
    "quick": Sizes(repeat=1, bulk_seconds=2, rr_c1_requests=10000,
                   rr_c50_requests=50000, http_seconds=2, burst_clients=3000, burst_cap=30.0,
                   held_conns=2000, held_rr_seconds=3.0, client_timeout=60.0),
}


# --- peers ----------------------------------------------------------------------

@dataclass(frozen=True)
class PeerKind:
    """How to start one kind of forwarder and find its port.

    ``argv(remote_port, listen_port, tmpdir, extra)``: the command line.
    ``port_from``: "stderr:REGEX" or "stdout:REGEX" (the first group is the
    port; started with port 0), or "chosen" (a free port is passed to it and
    the harness waits until it listens).
    """
    argv: Optional[Callable[[int, int, Path, Sequence[str]], List[str]]]
    port_from: str = "chosen"
    needs: Tuple[str, ...] = ()
    version: Callable[[], str] = lambda: ""
    skip: Dict[str, str] = field(default_factory=dict)  # workload -> why it does not apply
    note: str = ""


def _first_line(argv: Sequence[str], pattern: str = "") -> str:
    """First output line of a version command (matching ``pattern``)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    for line in (done.stdout + done.stderr).splitlines():
        if line.strip() and re.search(pattern, line):
            return line.strip()
    return "?"


def _git_revision() -> str:
    rev = _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return f"{rev}{' + uncommitted changes' if dirty else ''}"


def _haproxy_argv(remote: int, listen: int, tmp: Path, extra: Sequence[str]) -> List[str]:
    config = tmp / f"haproxy-{listen}.cfg"
    # maxconn 20000 needs 40,000 descriptors; the hard limit here is 20,000.
    # "no strict-limits" lets haproxy start anyway (it warns): 9,000 held
    # connections need 18,000, which fits.
    config.write_text(f"""global
    maxconn 20000
    no strict-limits
defaults
    mode tcp
    timeout connect 10s
    timeout client 5m
    timeout server 5m
frontend bench
    bind {HOST}:{listen}
    default_backend upstream
backend upstream
    server upstream {HOST}:{remote}
""")
    return ["haproxy", "-db", "-f", str(config), *extra]


FORWARDING_LINE = r"forwarding 127\.0\.0\.1:(\d+)"

PEER_KINDS: Dict[str, PeerKind] = {
    "direct": PeerKind(argv=None, note="client talks to the server, no forwarder"),
    "asyncore_fwd": PeerKind(
        argv=lambda r, l, tmp, extra: [PY, "-m", "asyncore_fwd", "-p", "0", "-r", HOST, "-P", str(r), *extra],
        port_from=f"stderr:{FORWARDING_LINE}",
        version=lambda: f"{_first_line([PY, '-m', 'asyncore_fwd', '--version'])} (git {_git_revision()})"),
    # backlog=4096, like asyncore_fwd's default and haproxy's: with socat's own
    # (5), the 50 clients of rr-c50 and http-c50 connecting at once lose SYNs
    # and every run includes a 1-3 s retransmit stall, which is not what
    # those rows measure.
    "socat": PeerKind(
        argv=lambda r, l, tmp, extra: ["socat", f"TCP-LISTEN:{l},fork,reuseaddr,bind={HOST},backlog=4096",
                                       f"TCP:{HOST}:{r}", *extra],
        needs=("socat",), version=lambda: _first_line(["socat", "-V"], "socat version"),
        skip={"held": "skipped: forks a process per connection"},
        note="TCP-LISTEN:P,fork,reuseaddr,bind=127.0.0.1,backlog=4096 (its default backlog, 5, stalls 50 "
             "simultaneous connects for 1–3 s)"),
    "haproxy": PeerKind(
        argv=_haproxy_argv, needs=("haproxy",), version=lambda: _first_line(["haproxy", "-v"]),
        note="mode tcp, maxconn 20000, default nbthread"),
    "asyncio": PeerKind(
        argv=lambda r, l, tmp, extra: [PY, str(BENCH / "asyncio_forwarder.py"), "--listen-port", "0",
                                       "--remote-port", str(r)],
        port_from=r"stdout:^(\d+)$",
        version=lambda: f"benchmarks/asyncio_forwarder.py, Python {platform.python_version()}"),
    "article": PeerKind(
        argv=lambda r, l, tmp, extra: [PY, str(ROOT / "examples" / "article_forwarder.py"), "-p", "0", "-r", HOST,
                                       "-P", str(r)],
        port_from=r"stdout:^(\d+)$", version=lambda: "examples/article_forwarder.py (asyncore recipe)",
        note="the recipe as published: listen backlog 5, select() loop, 4 KiB reads"),
}

# asyncore_fwd modes: "asyncore_fwd[epoll,splice]" -> --loop epoll --splice.
# A name not in this table becomes a flag as written: "workers=2" -> --workers 2,
# "splice" -> --splice.  A mode whose flags the CLI rejects (exit 2) is skipped.
ASYNCORE_FWD_MODES: Dict[str, List[str]] = {
    "epoll": ["--loop", "epoll"],
    "poll": ["--loop", "poll"],
    "select": ["--loop", "select"],
    "auto": ["--loop", "auto"],
}
DEFAULT_ASYNCORE_FWD_MODES = ["epoll", "poll"]
DEFAULT_PEERS = ["direct", "asyncore_fwd", "socat", "haproxy", "asyncio", "article"]


@dataclass(frozen=True)
class Peer:
    name: str        # the column title, e.g. "asyncore_fwd[epoll]"
    kind: PeerKind
    extra: Tuple[str, ...] = ()

    @property
    def forwards(self) -> bool:
        return self.kind.argv is not None


def mode_flags(mode: str) -> List[str]:
    if mode in ASYNCORE_FWD_MODES:
        return list(ASYNCORE_FWD_MODES[mode])
    name, _, value = mode.partition("=")
    return [f"--{name}"] + ([value] if value else [])


def split_list(text: str) -> List[str]:
    """Split on commas outside brackets: "a,b[c,d]" -> ["a", "b[c,d]"]."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    items.append(current.strip())
    return [item for item in items if item]


def parse_peers(text: str) -> List[Peer]:
    peers: List[Peer] = []
    for item in split_list(text):
        match = re.fullmatch(r"([\w-]+)(?:\[(.*)\])?", item)
        if not match or match.group(1) not in PEER_KINDS:
            raise SystemExit(f"unknown peer {item!r}; known: {', '.join(PEER_KINDS)} "
                             f"(asyncore_fwd[mode,...] with modes like {', '.join(ASYNCORE_FWD_MODES)}, "
                             "splice, workers=2)")
        kind_name, modes = match.group(1), match.group(2)
        kind = PEER_KINDS[kind_name]
        if kind_name == "asyncore_fwd" and modes is None:
            peers += [Peer(f"asyncore_fwd[{m}]", kind, tuple(mode_flags(m))) for m in DEFAULT_ASYNCORE_FWD_MODES]
        elif modes:
            flags = [flag for mode in split_list(modes) for flag in mode_flags(mode)]
            peers.append(Peer(item, kind, tuple(flags)))
        else:
            peers.append(Peer(item, kind))
    return peers


# --- a running forwarder ----------------------------------------------------------

@dataclass
class Forwarding:
    """Where the client connects, and the forwarder process (none for direct)."""
    port: int
    proc: Optional[Proc] = None

    def cpu_seconds(self) -> Optional[float]:
        return self.proc.cpu_seconds() if self.proc else None

    def rss_kib(self) -> Optional[int]:
        return self.proc.rss_kib() if self.proc else None

    def settle(self, fds: int, timeout: float) -> None:
        """Wait until the forwarder is back to about ``fds`` descriptors (it
        has handled a wave of closes), at most ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while self.proc and self.proc.fd_count() > fds + 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)

    def check_alive(self) -> None:
        if self.proc and not self.proc.alive():
            raise Failed(self.proc.describe_exit())

    def why_failed(self, fallback: str) -> str:
        """Prefer "the forwarder died: ..." to the client's view of it."""
        if self.proc and not self.proc.alive():
            return self.proc.describe_exit()
        return fallback


def start_peer(ctx: "Context", peer: Peer, remote_port: int) -> Tuple[Proc, int]:
    """Start the forwarder; return it and the port it listens on."""
    kind = peer.kind
    listen = free_port() if kind.port_from == "chosen" else 0
    proc = Proc(kind.argv(remote_port, listen, ctx.tmp, peer.extra), peer.name, ctx.tmp)
    try:
        if kind.port_from == "chosen":
            proc.wait_listening(listen)
        else:
            stream, _, pattern = kind.port_from.partition(":")
            listen = int(proc.wait_for(pattern, stream).group(1))
    except BaseException:
        proc.stop()
        raise
    return proc, listen


@contextmanager
def forwarding(ctx: "Context", peer: Peer, remote_port: int) -> Iterator[Forwarding]:
    """A fresh forwarder in front of ``remote_port`` for one workload run.

    Records its peak RSS in ``ctx.extras`` (kept even if the workload fails).
    """
    if not peer.forwards:
        yield Forwarding(remote_port)
        return
    proc, port = start_peer(ctx, peer, remote_port)
    sampler = PeakRss(proc)
    sampler.start()
    try:
        yield Forwarding(port, proc)
    finally:
        ctx.extras["peak_rss_kib"] = sampler.finish()
        proc.stop()


# --- servers ----------------------------------------------------------------------

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


# --- workloads --------------------------------------------------------------------

@dataclass
class Context:
    sizes: Sizes
    tmp: Path
    servers: Servers
    tools: Dict[str, bool]             # real clients usable in this run
    extras: Dict[str, float] = field(default_factory=dict)  # per sample, kept on failure

    def client(self, argv: Sequence[str], name: str, timeout: Optional[float] = None) -> Proc:
        return Proc.run(argv, name, self.tmp, timeout or self.sizes.client_timeout)

    def loadgen(self, fwd: Forwarding, *args: str, timeout: Optional[float] = None) -> Dict:
        """Run a benchmarks/loadgen.py subcommand; its JSON result."""
        argv = [PY, str(BENCH / "loadgen.py"), *args, "--port", str(fwd.port)]
        if fwd.proc:
            argv += ["--watch-pid", str(fwd.proc.pid)]
        proc = self.client(argv, f"loadgen-{args[0]}", timeout)
        try:
            result = json.loads(proc.output().strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise Failed(fwd.why_failed(f"loadgen {args[0]}: {proc.tail() or 'no result'}"))
        if "error" in result:
            raise Failed(fwd.why_failed(result["error"]))
        return result


def _bulk(ctx: Context, peer: Peer, reverse: bool) -> Dict:
    """One stream, one direction: MB/s, and the forwarder's CPU for it."""
    if ctx.tools["iperf3"]:
        with ctx.servers.iperf3() as server_port, forwarding(ctx, peer, server_port) as fwd:
            cpu_before = fwd.cpu_seconds()
            secs = ctx.sizes.bulk_seconds
            proc = ctx.client(["iperf3", "-c", HOST, "-p", str(fwd.port), "-t", str(secs), "-J"]
                              + (["-R"] if reverse else []), "iperf3-client", timeout=secs + 30)
            time.sleep(0.2)  # let socat reap its per-connection children (their CPU joins cutime)
            cpu = fwd.cpu_seconds()
            try:
                report = json.loads(proc.output())
            except ValueError:
                raise Failed(fwd.why_failed(f"iperf3: {proc.tail() or 'no JSON output'}"))
            if report.get("error"):
                raise Failed(fwd.why_failed(f"iperf3: {report['error']}"))
            received = report["end"]["sum_received"]
            moved, seconds = received["bytes"], received["seconds"]
    else:
        server_port = ctx.servers.source() if reverse else ctx.servers.sink()
        with forwarding(ctx, peer, server_port) as fwd:
            cpu_before = fwd.cpu_seconds()
            result = ctx.loadgen(fwd, "bulk", "--direction", "down" if reverse else "up",
                                 "--seconds", str(ctx.sizes.bulk_seconds), "--deadline", "30")
            time.sleep(0.2)
            cpu = fwd.cpu_seconds()
            if not result.get("complete"):
                raise Failed(fwd.why_failed(f"stream ended after {result['bytes']} bytes"))
            moved, seconds = result["bytes"], result["seconds"]
    if not moved:
        raise Failed("no bytes moved")
    values = {"MBps": moved / seconds / 1e6, "bytes": moved, "seconds": seconds}
    if cpu is not None:
        values["cpu_s"] = cpu - cpu_before
    return values


def bulk_up(ctx: Context, peer: Peer) -> Dict:
    return _bulk(ctx, peer, reverse=False)


def bulk_down(ctx: Context, peer: Peer) -> Dict:
    return _bulk(ctx, peer, reverse=True)


def _redis_benchmark(ctx: Context, fwd: Forwarding, clients: int, requests: int) -> Dict:
    proc = ctx.client(["redis-benchmark", "-h", HOST, "-p", str(fwd.port), "-t", "get", "-n", str(requests),
                       "-c", str(clients), "--csv"], f"redis-benchmark-c{clients}")
    rows = [row for row in csv.DictReader(io.StringIO(proc.output())) if row.get("test") == "GET"]
    if proc.exit_code() or not rows:
        raise Failed(fwd.why_failed(f"redis-benchmark: {proc.tail() or 'no result'}"))
    return {"rps": float(rows[0]["rps"]), "p50_ms": float(rows[0]["p50_latency_ms"]), "requests": requests}


def _pingpong(ctx: Context, fwd: Forwarding, clients: int, requests: int = 0, seconds: float = 0.0) -> Dict:
    """100-byte echo ping-pong: ``requests`` in all, or for ``seconds``."""
    amount = ["--duration", str(seconds)] if seconds else ["--requests", str(requests)]
    result = ctx.loadgen(fwd, "pingpong", "--conns", str(clients), *amount,
                         "--deadline", str(ctx.sizes.client_timeout - 10))
    if not result["complete"]:
        raise Failed(fwd.why_failed(f"{result['requests']} requests done, then "
                                    f"{result['errors']} connections lost or the deadline passed"))
    return {"rps": result["rps"], "p50_ms": result["p50_ms"], "requests": result["requests"]}


# A fresh forwarder's first moments are slower (asyncio's notably: half its
# later rate over the first second): every request/response run is preceded
# by a short unmeasured one.
WARM_UP_REQUESTS = 2000
WARM_UP_SECONDS = 1.0


def _rr(ctx: Context, peer: Peer, clients: int, requests: int) -> Dict:
    if ctx.tools["redis"]:
        with forwarding(ctx, peer, ctx.servers.redis()) as fwd:
            _redis_benchmark(ctx, fwd, clients, WARM_UP_REQUESTS)
            return _redis_benchmark(ctx, fwd, clients, requests)
    with forwarding(ctx, peer, ctx.servers.echo()) as fwd:
        _pingpong(ctx, fwd, clients, WARM_UP_REQUESTS)
        return _pingpong(ctx, fwd, clients, requests)


def rr_c1(ctx: Context, peer: Peer) -> Dict:
    return _rr(ctx, peer, 1, ctx.sizes.rr_c1_requests)


def rr_c50(ctx: Context, peer: Peer) -> Dict:
    return _rr(ctx, peer, 50, ctx.sizes.rr_c50_requests)


def http_c50(ctx: Context, peer: Peer) -> Dict:
    if not ctx.tools["http"]:
        raise Skipped("skipped: needs wrk and nginx")
    with forwarding(ctx, peer, ctx.servers.nginx()) as fwd:
        secs = ctx.sizes.http_seconds
        proc = ctx.client(["wrk", "-t2", "-c50", f"-d{secs}s", "--timeout", "5s", f"http://{HOST}:{fwd.port}/"],
                          "wrk", timeout=secs + 30)
        text = proc.output()
        match = re.search(r"Requests/sec:\s+([\d.]+)", text)
        if not match:
            raise Failed(fwd.why_failed(f"wrk: {proc.tail() or 'no result'}"))
        values = {"rps": float(match.group(1))}
        errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        values["errors"] = sum(int(n) for n in errors.groups()) if errors else 0
        values["non2xx"] = int(non2xx.group(1)) if non2xx else 0
        return values


def burst(ctx: Context, peer: Peer) -> Dict:
    """All clients connect at once; seconds until every one got its echo."""
    n, cap = ctx.sizes.burst_clients, ctx.sizes.burst_cap
    with forwarding(ctx, peer, ctx.servers.echo()) as fwd:
        result = ctx.loadgen(fwd, "burst", "--clients", str(n), "--cap", str(cap), timeout=cap + 30)
        values = {k: result[k] for k in ("seconds", "served", "errors", "pending")}
        if not result["complete"]:
            ctx.extras.update(values)
            detail = f"{result['served']}/{n} served in {result['seconds']:.0f} s"
            if result["errors"]:
                detail += f", {result['errors']} errors ({result['first_error']})"
            if result["forwarder_gone"]:
                raise Failed(f"{fwd.why_failed('forwarder gone')} ({detail})")
            raise Partial(detail)
        return values


def held(ctx: Context, peer: Peer) -> Dict:
    """50 clients' request rate with N idle connections held vs with none,
    and the forwarder's RSS per idle connection.

    The rate with none held is measured before opening them and again after
    closing them; their mean is the reference, so a drift of the machine
    during the run (other load, frequency) does not pass for an effect.
    """
    n = ctx.sizes.held_conns
    if "held" in peer.kind.skip:
        raise Skipped(peer.kind.skip["held"])
    seconds = ctx.sizes.held_rr_seconds
    with forwarding(ctx, peer, ctx.servers.echo()) as fwd:
        _pingpong(ctx, fwd, 50, seconds=WARM_UP_SECONDS)
        before = _pingpong(ctx, fwd, 50, seconds=seconds)
        rss_before = fwd.rss_kib()
        fds_before = fwd.proc.fd_count() if fwd.proc else 0
        # The idle connections come from their own process (their own
        # descriptor limit), which keeps them until its stdin closes.
        argv = [PY, str(BENCH / "loadgen.py"), "hold", "--port", str(fwd.port), "--conns", str(n),
                "--deadline", str(ctx.sizes.client_timeout), "--max-hold", str(4 * ctx.sizes.client_timeout)]
        if fwd.proc:
            argv += ["--watch-pid", str(fwd.proc.pid)]
        holder = Proc(argv, "loadgen-hold", ctx.tmp, stdin=True)
        try:
            report = json.loads(holder.wait_for(r"^(\{.*\})$", timeout=ctx.sizes.client_timeout + 10).group(1))
            if report["held"] < n:
                raise Failed(fwd.why_failed(f"held {report['held']} of {n}"
                                            + (f" ({report['first_error']})" if report["first_error"] else "")))
            time.sleep(1.0)  # let the forwarder settle before reading its RSS
            rss_held = fwd.rss_kib()
            loaded = _pingpong(ctx, fwd, 50, seconds=seconds)
            fwd.check_alive()
        finally:
            holder.stop(grace=10.0)
        fwd.settle(fds_before, timeout=ctx.sizes.client_timeout / 4)
        after = _pingpong(ctx, fwd, 50, seconds=seconds)
    reference = (before["rps"] + after["rps"]) / 2
    values = {"ratio": loaded["rps"] / reference, "held_rps": loaded["rps"], "before_rps": before["rps"],
              "after_rps": after["rps"], "open_seconds": report["seconds"]}
    if rss_before is not None:
        values["rss_per_idle_kib"] = (rss_held - rss_before) / n
        values["rss_held_kib"] = rss_held
    return values


@dataclass(frozen=True)
class Workload:
    run: Callable[[Context, Peer], Dict]
    group: str
    client: Callable[[Context], str]


def _real_or(tool: str, real: str, fallback: str) -> Callable[[Context], str]:
    return lambda ctx: real if ctx.tools[tool] else fallback


WORKLOADS: Dict[str, Workload] = {
    "bulk-up": Workload(bulk_up, "bulk", _real_or("iperf3", "iperf3", "stdlib bulk")),
    "bulk-down": Workload(bulk_down, "bulk", _real_or("iperf3", "iperf3 -R", "stdlib bulk")),
    "rr-c1": Workload(rr_c1, "rr", _real_or("redis", "redis-benchmark GET", "stdlib echo 100 B")),
    "rr-c50": Workload(rr_c50, "rr", _real_or("redis", "redis-benchmark GET", "stdlib echo 100 B")),
    "http-c50": Workload(http_c50, "http", _real_or("http", "wrk → nginx", "n/a")),
    "burst": Workload(burst, "burst", lambda ctx: "stdlib echo 8 B"),
    "held": Workload(held, "held", lambda ctx: "stdlib echo 100 B, c50"),
}


# --- report rows ----------------------------------------------------------------

# One repeat of one peer: workload -> {"status": "ok"|"partial"|"failed"|"skipped", "values": {...}, ...}
RepeatSamples = Dict[str, Dict]


def _ok(samples: RepeatSamples, workload: str, key: str) -> Optional[float]:
    sample = samples.get(workload)
    if sample and sample["status"] == "ok":
        return sample["values"].get(key)
    return None


def _cpu_per_gb(samples: RepeatSamples) -> Optional[float]:
    cpu = moved = 0.0
    for workload in ("bulk-up", "bulk-down"):
        if _ok(samples, workload, "cpu_s") is not None:
            cpu += samples[workload]["values"]["cpu_s"]
            moved += samples[workload]["values"]["bytes"]
    return cpu / (moved / 1e9) if moved else None


def _peak_rss_mib(samples: RepeatSamples) -> Optional[float]:
    peaks = [s["values"]["peak_rss_kib"] for s in samples.values() if s["values"].get("peak_rss_kib")]
    return max(peaks) / 1024 if peaks else None


@dataclass(frozen=True)
class Row:
    label: str                   # may use Sizes fields: "held-{held_conns}"
    workloads: Tuple[str, ...]   # computed from these; the first one's failures show
    unit: str
    value: Callable[[RepeatSamples], Optional[float]]
    ratios: bool = True          # show ×direct and ×socat
    show_failures: bool = True   # say in the cell when the first workload failed
    forwarders_only: bool = False  # a figure of the forwarder process: none for direct
    lower_is_better: bool = False


def _metric(workload: str, key: str) -> Callable[[RepeatSamples], Optional[float]]:
    return lambda samples: _ok(samples, workload, key)


ROWS: List[Row] = [
    Row("bulk-up", ("bulk-up",), "MB/s", _metric("bulk-up", "MBps")),
    Row("bulk-down", ("bulk-down",), "MB/s", _metric("bulk-down", "MBps")),
    Row("cpu-per-gb", ("bulk-up", "bulk-down"), "CPU-s/GB", _cpu_per_gb, forwarders_only=True, lower_is_better=True),
    Row("rr-c1", ("rr-c1",), "req/s", _metric("rr-c1", "rps")),
    Row("rr-c1 p50", ("rr-c1",), "ms", _metric("rr-c1", "p50_ms"), lower_is_better=True),
    Row("rr-c50", ("rr-c50",), "req/s", _metric("rr-c50", "rps")),
    Row("http-c50", ("http-c50",), "req/s", _metric("http-c50", "rps")),
    Row("burst-{burst_clients}", ("burst",), "s", _metric("burst", "seconds"), lower_is_better=True),
    Row("held-{held_conns}: rate vs none held", ("held",), "×", _metric("held", "ratio"), ratios=False),
    Row("held-{held_conns}: req/s", ("held",), "req/s", _metric("held", "held_rps")),
    Row("rss per idle conn", ("held",), "KiB", _metric("held", "rss_per_idle_kib"), forwarders_only=True,
        lower_is_better=True),
    Row("rss-peak", tuple(WORKLOADS), "MiB", _peak_rss_mib, forwarders_only=True, lower_is_better=True,
        show_failures=False),
]


# --- running ------------------------------------------------------------------------

def select_workloads(text: str) -> List[str]:
    chosen: List[str] = []
    for item in split_list(text):
        names = [name for name, w in WORKLOADS.items() if item in (name, w.group)]
        if item in ("all", "*"):
            names = list(WORKLOADS)
        if not names and item.startswith(("burst-", "held-")):  # burst-3000, held-9000
            names = [item.split("-")[0]]
        if not names:
            raise SystemExit(f"unknown workload {item!r}; known: {', '.join(WORKLOADS)} "
                             f"(groups: {', '.join(sorted({w.group for w in WORKLOADS.values()}))})")
        chosen += [name for name in names if name not in chosen]
    return [name for name in WORKLOADS if name in chosen]  # table order


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def preflight(ctx: Context, peers: List[Peer]) -> Dict[str, Tuple[str, str]]:
    """Start and stop each forwarder once; a peer that cannot start is skipped
    for the whole run (e.g. an asyncore_fwd flag this version does not have).

    Returns peer name -> (short reason for the table, full reason for the notes).
    """
    unusable: Dict[str, Tuple[str, str]] = {}
    target = ctx.servers.echo()
    for peer in peers:
        missing = [tool for tool in peer.kind.needs if not shutil.which(tool)]
        if missing:
            why = f"skipped: {', '.join(missing)} not installed"
            unusable[peer.name] = (why, f"{peer.name}: {why}")
            continue
        if not peer.forwards:
            continue
        try:
            start_peer(ctx, peer, target)[0].stop()
        except Failed as error:
            flags = re.search(r"unrecognized arguments: (.*?)(?: \(see --help\))?$", str(error))
            if "(status 2)" in str(error):  # the CLI's exit status for bad usage
                short = f"skipped: CLI rejects {flags.group(1) if flags else ' '.join(peer.extra)}"
            else:
                short = "skipped: did not start"
            unusable[peer.name] = (short, f"{peer.name}: {short} — {error}")
    return unusable


def run_sample(ctx: Context, workload: str, peer: Peer, repeat: int, position: int) -> Dict:
    ctx.extras = {}
    record = {"workload": workload, "peer": peer.name, "repeat": repeat, "position": position,
              "client": WORKLOADS[workload].client(ctx), "values": {}, "status": "ok", "reason": ""}
    started = time.monotonic()
    try:
        record["values"] = WORKLOADS[workload].run(ctx, peer)
    except Skipped as why:
        record.update(status="skipped", reason=str(why))
    except Partial as why:
        record.update(status="partial", reason=str(why))
    except Failed as why:
        record.update(status="failed", reason=str(why))
    except Exception as error:  # a harness bug or an odd tool output: keep going
        record.update(status="failed", reason=f"harness error: {type(error).__name__}: {error}")
    record["values"].update(ctx.extras)
    record["wall_seconds"] = round(time.monotonic() - started, 3)
    return record


def run_all(ctx: Context, peers: List[Peer], workloads: List[str], unusable: Dict[str, Tuple[str, str]],
            repeat: int) -> List[Dict]:
    samples: List[Dict] = []
    for rep in range(repeat):
        for workload in workloads:
            # Rotate the order each repeat: every peer takes every position.
            order = peers[rep % len(peers):] + peers[:rep % len(peers)]
            for position, peer in enumerate(order):
                if peer.name in unusable:
                    samples.append({"workload": workload, "peer": peer.name, "repeat": rep, "position": position,
                                    "client": "", "values": {}, "status": "skipped",
                                    "reason": unusable[peer.name][0], "wall_seconds": 0})
                    continue
                record = run_sample(ctx, workload, peer, rep, position)
                samples.append(record)
                log(f"[{rep + 1}/{repeat}] {workload:<9} {peer.name:<22} {summarize(record)} "
                    f"({record['wall_seconds']:.1f} s)")
    return samples


def summarize(record: Dict) -> str:
    if record["status"] != "ok":
        return record["reason"]
    return ", ".join(f"{k}={fmt_num(v)}" for k, v in record["values"].items() if isinstance(v, (int, float)))


# --- the table ------------------------------------------------------------------

def fmt_num(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def fmt_ratio(value: float) -> str:
    if value >= 10:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def cell_stats(samples: List[Dict], peer: str, row: Row, repeat: int) -> Dict:
    """Median, range, and what went wrong, for one row and one peer."""
    values, failures, skips = [], [], []
    for rep in range(repeat):
        by_workload = {s["workload"]: s for s in samples if s["peer"] == peer and s["repeat"] == rep}
        if not any(w in by_workload for w in row.workloads):
            continue
        value = row.value(by_workload)
        if value is not None:
            values.append(value)
        primary = next((by_workload[w] for w in row.workloads if w in by_workload), None)
        if not row.show_failures and primary and primary["status"] != "skipped":
            continue
        if primary and primary["status"] == "failed":
            failures.append(f"failed: {primary['reason']}")
        elif primary and primary["status"] == "partial":
            failures.append(primary["reason"])
        elif primary and primary["status"] == "skipped":
            skips.append(primary["reason"])
    stats = {"values": values, "failures": failures, "skips": skips}
    if values:
        stats.update(median=statistics.median(values), min=min(values), max=max(values))
    return stats


def render_cell(stats: Dict, row: Row, peer: str, refs: Dict[str, Optional[float]]) -> str:
    if "median" not in stats:
        if stats["skips"] and not stats["failures"]:
            return stats["skips"][0]
        if stats["failures"]:
            return stats["failures"][0]
        return "n/a"
    text = f"{fmt_num(stats['median'])} {row.unit}".replace(" ×", "×")
    if len(stats["values"]) > 1:
        text += f" [{fmt_num(stats['min'])}–{fmt_num(stats['max'])}]"
    if row.ratios:
        parts = [f"{fmt_ratio(stats['median'] / ref)}×{name}" for name, ref in refs.items()
                 if ref and name != peer]
        if parts:
            text += f" ({', '.join(parts)})"
    if stats["failures"]:
        text += f" ({len(stats['failures'])} of {len(stats['failures']) + len(stats['values'])}: " \
                f"{stats['failures'][0]})"
    return text


def build_table(samples: List[Dict], peers: List[Peer], workloads: List[str], ctx: Context,
                repeat: int) -> Tuple[str, List[Dict]]:
    header = ["workload", "client"] + [peer.name for peer in peers]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows_json = []
    for row in ROWS:
        if not any(w in workloads for w in row.workloads):
            continue
        if row.label == "rss-peak" and not any(p.forwards for p in peers):
            continue
        stats = {peer.name: cell_stats(samples, peer.name, row, repeat) for peer in peers}
        refs = {"direct": stats.get("direct", {}).get("median"), "socat": stats.get("socat", {}).get("median")}
        primary = next(w for w in row.workloads if w in workloads)
        client = WORKLOADS[primary].client(ctx) if row.label != "rss-peak" else "(all workloads)"
        label = row.label.format(**vars(ctx.sizes))
        cells = []
        for peer in peers:
            if row.forwarders_only and not peer.forwards:
                cells.append("—")
            else:
                cells.append(render_cell(stats[peer.name], row, peer.name, refs))
        lines.append("| " + " | ".join([label, client] + cells) + " |")
        rows_json.append({"row": label, "unit": row.unit, "client": client,
                          "lower_is_better": row.lower_is_better,
                          "cells": {name: {k: v for k, v in s.items()} for name, s in stats.items()}})
    return "\n".join(lines), rows_json


# --- header and output --------------------------------------------------------------

def machine_facts() -> Dict[str, str]:
    cpu = "?"
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match.group(1).strip() if match else "?"
        mem = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        mem = None
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": f"{int(mem.group(1)) / (1 << 20):.1f} GiB" if mem else "?",
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()} ({PY})",
    }


def tool_versions(peers: List[Peer], tools: Dict[str, bool], workloads: List[str]) -> Dict[str, str]:
    """Versions of the forwarders compared and of the clients and servers used."""
    versions: Dict[str, str] = {}
    for name, kind in PEER_KINDS.items():
        if any(p.kind is kind and p.forwards for p in peers) and all(shutil.which(t) for t in kind.needs):
            versions[name] = kind.version()
    groups = {WORKLOADS[w].group for w in workloads}
    if tools["iperf3"] and "bulk" in groups:
        versions["iperf3"] = _first_line(["iperf3", "--version"])
    if tools["redis"] and "rr" in groups:
        versions["redis"] = _first_line(["redis-server", "--version"]).split(" sha=")[0]
    if tools["http"] and "http" in groups:
        versions["nginx"] = _first_line(["nginx", "-v"]).replace("nginx version: ", "")
        versions["wrk"] = _first_line(["wrk", "-v"], "wrk").split(" Copyright")[0]
    return versions


def render_markdown(meta: Dict, table: str, notes: List[str]) -> str:
    lines = ["# asyncore_fwd benchmarks", "",
             f"- command: `{meta['command']}`",
             f"- date: {meta['date']} (wall time {meta['wall_seconds']:.0f} s)",
             "- machine: " + ", ".join(f"{k} {v}" for k, v in meta["machine"].items()),
             f"- descriptor limit (every process): {meta['nofile']}",
             f"- mode: {meta['mode']}, {meta['repeat']} repeat(s), peers interleaved in rotated order",
             "- versions: " + "; ".join(f"{k}: {v}" for k, v in meta["versions"].items()),
             "", "Median over repeats, [min–max] when more than one; ratios of medians to direct and socat.",
             "", table, ""]
    if notes:
        lines += ["Notes:", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


def _somaxconn() -> str:
    try:
        return Path("/proc/sys/net/core/somaxconn").read_text().strip()
    except OSError:
        return "?"


def _asyncore_fwd_backlog() -> str:
    """The CLI's default --backlog, as its --help states it."""
    try:
        text = subprocess.run([PY, "-m", "asyncore_fwd", "--help"], capture_output=True, text=True,
                              cwd=ROOT, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    match = re.search(r"--backlog.*?\(default:\s*(\d+)\)", text, re.S)
    return match.group(1) if match else "?"


# What each workload group measures, for the notes under the table.
# Each takes the sizes and the facts read at the start of the run.
GROUP_NOTES: Dict[str, Callable[[Sizes, Dict[str, str]], str]] = {
    "bulk": lambda z, f: f"bulk: one stream per direction for {z.bulk_seconds} s (iperf3, or the stdlib client); "
                         "cpu-per-gb: user+system CPU of the forwarder's process group (children included) during "
                         "both bulk runs, per GB received.",
    "rr": lambda z, f: f"rr: GET of a missing key, {z.rr_c1_requests} requests on 1 connection, "
                       f"{z.rr_c50_requests} on 50, after 2000 unmeasured ones; p50 as reported by redis-benchmark "
                       "(or the stdlib client).",
    "http": lambda z, f: f"http-c50: wrk -t2 -c50 -d{z.http_seconds}s, a 1 KiB file from nginx (1 worker).",
    "burst": lambda z, f: f"burst-{z.burst_clients}: all clients connect at once, each sends 8 bytes and waits "
                          f"for the echo; seconds until the last is served, or how many were by the "
                          f"{z.burst_cap:g} s cap. Listen backlogs: asyncore_fwd {f['asyncore_fwd_backlog']} (its "
                          "default), asyncio 100 (its default), socat 4096, article 5, haproxy its maxconn; the "
                          f"kernel caps them at somaxconn = {f['somaxconn']}.",
    "held": lambda z, f: f"held-{z.held_conns}: {z.held_conns} idle connections (each checked with one echo) held "
                         f"through the forwarder while 50 clients ping-pong 100-byte messages for "
                         f"{z.held_rr_seconds:g} s; rate vs the mean of the same run just before they were opened "
                         "and just after they were closed (target: a drop under 20 %, i.e. ≥ 0.80×); rss per idle "
                         "conn = (RSS with them held − RSS before) / count.",
}


def notes_for(samples: List[Dict], peers: List[Peer], workloads: List[str], sizes: Sizes,
              facts: Dict[str, str]) -> List[str]:
    groups = [g for g in GROUP_NOTES if any(WORKLOADS[w].group == g for w in workloads)]
    notes = [GROUP_NOTES[g](sizes, facts) for g in groups]
    notes.append("rss-peak: highest RSS of the forwarder's process group over all its runs (VmHWM, and the sum "
                 "over its processes sampled every 0.5 s: socat's per-connection children count shared pages "
                 "once each).")
    for peer in peers:
        if peer.kind.note:
            notes.append(f"{peer.name}: {peer.kind.note}.")
        if peer.extra:
            notes.append(f"{peer.name}: asyncore-fwd {' '.join(peer.extra)}.")
    # One note per (peer, workload, what happened), listing the repeats.
    events: Dict[Tuple[str, str, str], List[str]] = {}
    for s in samples:
        if s["status"] in ("failed", "partial"):
            what = f"{s['status']}: {s['reason']}"
        elif s["workload"] == "http-c50" and s["status"] == "ok" and (s["values"].get("errors", 0)
                                                                      or s["values"].get("non2xx", 0)):
            what = "wrk counted socket errors or non-2xx replies: " \
                   f"{s['values'].get('errors', 0) + s['values'].get('non2xx', 0):.0f}"
        else:
            continue
        kind, _, detail = what.partition(": ")
        events.setdefault((s["peer"], s["workload"], kind), []).append(f"{detail} (repeat {s['repeat'] + 1})")
    for (peer, workload, kind), details in events.items():
        texts = {d.rsplit(" (repeat", 1)[0] for d in details}
        if len(texts) == 1:
            repeats = ", ".join(d.rsplit("(repeat ", 1)[1].rstrip(")") for d in details)
            details = [f"{texts.pop()} (repeat{'s' if len(details) > 1 else ''} {repeats})"]
        notes.append(f"{peer} {workload}, {kind}: {'; '.join(details)}")
    return notes


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs, 1 repeat, 2000 held (about 4 minutes)")
    parser.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                        help="comma list of: " + ", ".join(PEER_KINDS) + "; asyncore_fwd[mode,...] picks modes: "
                             f"{', '.join(ASYNCORE_FWD_MODES)}, or a flag like splice (--splice) or workers=2 "
                             f"(--workers 2); plain asyncore_fwd means "
                             f"{', '.join(f'asyncore_fwd[{m}]' for m in DEFAULT_ASYNCORE_FWD_MODES)} "
                             "(default: %(default)s)")
    parser.add_argument("--workloads", default="all",
                        help="comma list of workloads or groups: " + ", ".join(WORKLOADS)
                             + "; groups bulk, rr, http, burst, held (default: all)")
    parser.add_argument("--repeat", type=int, default=None, help="repeats (default: 3; with --quick: 1)")
    parser.add_argument("--out", default=str(BENCH / "results" / "latest.md"),
                        help="Markdown output; the JSON goes beside it (default: %(default)s)")
    parser.add_argument("--stdlib-clients", action="store_true",
                        help="use the standard-library clients even where iperf3/redis/wrk are installed")
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    sizes = SIZES["quick" if args.quick else "full"]
    sizes = replace(sizes, repeat=args.repeat or sizes.repeat)
    peers = parse_peers(args.peers)
    workloads = select_workloads(args.workloads)
    nofile = raise_fd_limit()
    have = lambda *names: not args.stdlib_clients and all(shutil.which(n) for n in names)  # noqa: E731
    tools = {"iperf3": have("iperf3"), "redis": have("redis-server", "redis-benchmark"), "http": have("wrk", "nginx")}
    command = " ".join(shlex.quote(a) for a in ["python", os.path.relpath(__file__, ROOT),
                                                  *(sys.argv[1:] if argv is None else argv)])
    started_at, started = datetime.now().astimezone(), time.monotonic()
    # Read before the run: the code under test may change while it runs.
    meta = {"command": command, "date": started_at.isoformat(timespec="seconds"), "machine": machine_facts(),
            "nofile": f"soft {nofile[0]}, hard {nofile[1]}", "mode": "quick" if args.quick else "full",
            "repeat": sizes.repeat, "versions": tool_versions(peers, tools, workloads), "sizes": vars(sizes),
            "clients": tools}
    facts = {"asyncore_fwd_backlog": _asyncore_fwd_backlog(), "somaxconn": _somaxconn()}
    # SIGTERM (and SIGHUP) end the run like Ctrl-C: the finally below stops every child.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.default_int_handler)
    tmp = Path(tempfile.mkdtemp(prefix="asyncore_fwd-bench-"))
    try:
        ctx = Context(sizes, tmp, Servers(tmp), tools)
        log(f"peers: {', '.join(p.name for p in peers)}; workloads: {', '.join(workloads)}; "
            f"repeat {sizes.repeat}; logs in {tmp}")
        unusable = preflight(ctx, peers)
        for name, (_, why) in unusable.items():
            log(f"{name}: {why}")
        samples = run_all(ctx, peers, workloads, unusable, sizes.repeat)
    except KeyboardInterrupt:
        log("interrupted: stopping every process started")
        Proc.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        return 130
    finally:
        Proc.stop_all()
    table, rows_json = build_table(samples, peers, workloads, ctx, sizes.repeat)
    meta["wall_seconds"] = time.monotonic() - started
    meta["peers"] = {p.name: {"args": list(p.extra), "unusable": unusable.get(p.name, ("", ""))[1]} for p in peers}
    notes = [why for _, why in unusable.values()] + notes_for(samples, peers, workloads, sizes, facts)
    markdown = render_markdown(meta, table, notes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown)
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows_json, "samples": samples}, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    print(markdown)
    log(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
