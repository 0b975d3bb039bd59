"""The workloads of benchmarks/run.py: bulk streams, request/response (redis or
echo), HTTP (wrk), a connect burst, held idle connections, and UDP
request/response and one-way throughput through a peer's UDP mode.

Each workload is a function ``(Context, Peer) -> dict of figures``; it starts
a fresh forwarder for its run and raises Failed, Partial or Skipped (from
benchlib) when it cannot give a figure.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

from benchlib import BENCH, HOST, Failed, Partial, Proc, Skipped
from peers import PY, Forwarding, Peer, forwarding
from servers import Servers

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
    udp_seconds: float         # each UDP run, after its warm-up


SIZES = {
    "full": Sizes(repeat=3, bulk_seconds=5, rr_c1_requests=50000,
                  rr_c50_requests=100000, http_seconds=5, burst_clients=3000, burst_cap=30.0,
                  held_conns=9000, held_rr_seconds=5.0, client_timeout=120.0, udp_seconds=3.0),
    "quick": Sizes(repeat=1, bulk_seconds=2, rr_c1_requests=10000,
                   rr_c50_requests=50000, http_seconds=2, burst_clients=3000, burst_cap=30.0,
                   held_conns=2000, held_rr_seconds=3.0, client_timeout=60.0, udp_seconds=2.0),
}

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
            raise Failed(fwd.why_failed(f"loadgen {args[0]}: {proc.tail() or 'no result'}")) from None
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
                raise Failed(fwd.why_failed(f"iperf3: {proc.tail() or 'no JSON output'}")) from None
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
    if cpu is not None and peer.kind.counts_cpu:
        values["cpu_s"] = cpu - cpu_before
    return values


def bulk_up(ctx: Context, peer: Peer) -> Dict:
    return _bulk(ctx, peer, reverse=False)


def bulk_down(ctx: Context, peer: Peer) -> Dict:
    return _bulk(ctx, peer, reverse=True)


def redis_get_result(csv_output: str) -> Optional[Dict[str, float]]:
    """rps and p50_ms of the GET row of ``redis-benchmark --csv`` output (None if it has none)."""
    rows = [row for row in csv.DictReader(io.StringIO(csv_output)) if row.get("test") == "GET"]
    return {"rps": float(rows[0]["rps"]), "p50_ms": float(rows[0]["p50_latency_ms"])} if rows else None


def _redis_benchmark(ctx: Context, fwd: Forwarding, clients: int, requests: int) -> Dict:
    proc = ctx.client(["redis-benchmark", "-h", HOST, "-p", str(fwd.port), "-t", "get", "-n", str(requests),
                       "-c", str(clients), "--csv"], f"redis-benchmark-c{clients}")
    result = redis_get_result(proc.output())
    if proc.exit_code() or result is None:
        raise Failed(fwd.why_failed(f"redis-benchmark: {proc.tail() or 'no result'}"))
    return {**result, "requests": requests}


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


# UDP: a reply later than this counts as lost (loopback replies take tens of
# microseconds; a fork of socat's, a few milliseconds).
UDP_REPLY_TIMEOUT = 0.2
UDP_RR_SIZE = 64
UDP_ONEWAY_SIZE = 1400
# The counts of a udp-rr run that say a reply did not come back as it should.
UDP_ASTRAY = ("lost", "late", "misdelivered", "lost_warm_up", "late_warm_up", "misdelivered_warm_up", "errors")


def _udp_rr(ctx: Context, peer: Peer, clients: int) -> Dict:
    """C clients, one 64-byte datagram out and its echo back at a time each."""
    with forwarding(ctx, peer, ctx.servers.udp_echo(), proto="udp") as fwd:
        result = ctx.loadgen(fwd, "udp-rr", "--clients", str(clients), "--size", str(UDP_RR_SIZE),
                             "--seconds", str(ctx.sizes.udp_seconds), "--warm-up", str(WARM_UP_SECONDS),
                             "--timeout", str(UDP_REPLY_TIMEOUT), timeout=ctx.sizes.udp_seconds + 30)
        fwd.check_alive()  # figures from a forwarder that died on the way are not its figures
        if not result["requests"]:
            why = f"no reply in {ctx.sizes.udp_seconds:g} s ({result['lost']} lost"
            raise Failed(fwd.why_failed(why + (f", {result['first_error']})" if result["first_error"] else ")")))
    return {key: result[key] for key in ("rps", "p50_ms", "p99_ms", "requests", "loss_pct", *UDP_ASTRAY)}


def udp_rr_c1(ctx: Context, peer: Peer) -> Dict:
    return _udp_rr(ctx, peer, 1)


def udp_rr_c32(ctx: Context, peer: Peer) -> Dict:
    return _udp_rr(ctx, peer, 32)


def _udp_oneway(ctx: Context, peer: Peer, size: int) -> Dict:
    """One sender, ``size``-byte datagrams as fast as it can: what reaches the sink."""
    sink = ctx.servers.udp_sink()
    with forwarding(ctx, peer, sink, proto="udp") as fwd:
        cpu_before = fwd.cpu_seconds()
        result = ctx.loadgen(fwd, "udp-oneway", "--sink-port", str(sink), "--size", str(size),
                             "--seconds", str(ctx.sizes.udp_seconds), timeout=ctx.sizes.udp_seconds + 30)
        cpu = fwd.cpu_seconds()
        fwd.check_alive()
        if not result["received"]:
            why = f"nothing reached the sink ({result['sent']} sent"
            raise Failed(fwd.why_failed(why + (f", {result['first_error']})" if result["first_error"] else ")")))
    values = {key: result[key] for key in ("MBps", "dps", "loss_pct", "sent", "received", "bytes", "seconds",
                                           "send_errors")}
    if cpu is not None and cpu_before is not None and peer.kind.counts_cpu:
        values["cpu_s"] = cpu - cpu_before
    return values


def udp_oneway(ctx: Context, peer: Peer) -> Dict:
    return _udp_oneway(ctx, peer, UDP_ONEWAY_SIZE)


def udp_oneway_64(ctx: Context, peer: Peer) -> Dict:
    """Small datagrams: the forwarder's cost per datagram rather than per byte."""
    return _udp_oneway(ctx, peer, 64)


@dataclass(frozen=True)
class Workload:
    run: Callable[[Context, Peer], Dict]
    group: str
    client: Callable[[Context], str]
    proto: str = "tcp"  # "udp": run against the peers' UDP mode


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
    "udp-rr-c1": Workload(udp_rr_c1, "udp", lambda ctx: f"stdlib UDP echo {UDP_RR_SIZE} B", "udp"),
    "udp-rr-c32": Workload(udp_rr_c32, "udp", lambda ctx: f"stdlib UDP echo {UDP_RR_SIZE} B", "udp"),
    "udp-oneway": Workload(udp_oneway, "udp", lambda ctx: f"stdlib UDP {UDP_ONEWAY_SIZE} B → sink", "udp"),
    "udp-oneway-64": Workload(udp_oneway_64, "udp", lambda ctx: "stdlib UDP 64 B → sink", "udp"),
}

