#!/usr/bin/env python3
"""One request at a time, against the floor: many short interleaved runs, medians of ratios.

    python benchmarks/one_request.py
    python benchmarks/one_request.py --peers 'floor,asyncore_fwd[epoll],asyncore_fwd@main[epoll]' --runs 40
    python benchmarks/one_request.py --pin 0      # every process on one core

On a shared machine a single `redis-benchmark -c 1` run of each peer says
little: its rate moves by 2× from run to run with where the scheduler puts
the three processes.  Here every peer runs at once behind one redis, and
each run sends ``--requests`` GETs on one connection through each peer in
turn (the order rotated every run), so the peers of one run share the same
moment of the machine.  What is reported is, per peer, the median rate and
p50 over the runs, and the median over runs of its rate divided by the
floor's rate in the same run: a drift of the machine cancels out of each
ratio.  ``--pin`` puts every process (redis, the peers, the client) on the
cores given, so that the wake-ups cost the same in every run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from benchlib import HOST, Failed, Proc, raise_fd_limit
from peers import SOURCE_TREES, Peer, parse_peers, start_peer
from servers import Servers
from workloads import SIZES, Context, redis_get_result

FLOOR = "floor"


def get_run(port: int, requests: int, cpus: Optional[str]) -> Dict[str, float]:
    """One redis-benchmark run of ``requests`` GETs on one connection: rps and p50_ms."""
    argv = ["redis-benchmark", "-h", HOST, "-p", str(port), "-t", "get", "-n", str(requests), "-c", "1", "--csv"]
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    result = redis_get_result(done.stdout)
    if done.returncode or result is None:
        raise Failed(f"redis-benchmark on port {port}: {done.stderr.strip() or 'no result'}")
    return result


def pin(pids: Sequence[int], cpus: str) -> None:
    for pid in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], capture_output=True, check=True)


def summary(peers: List[Peer], samples: Dict[str, List[Dict[str, float]]]) -> List[str]:
    """A Markdown table: median rate [min–max], median p50, median of the per-run ratios to the floor."""
    lines = ["| peer | req/s, median [min–max] | p50 ms, median | rate ÷ floor's, median of runs [min–max] |",
             "|---|---|---|---|"]
    floor = samples.get(FLOOR)
    for peer in peers:
        runs = samples[peer.name]
        rates = [run["rps"] for run in runs]
        cells = [peer.name, f"{statistics.median(rates):.0f} [{min(rates):.0f}–{max(rates):.0f}]",
                 f"{statistics.median(run['p50_ms'] for run in runs):.3f}"]
        if floor is not None and peer.name != FLOOR:
            ratios = [mine / theirs["rps"] for mine, theirs in zip(rates, floor)]
            cells.append(f"{statistics.median(ratios):.3f} [{min(ratios):.2f}–{max(ratios):.2f}]")
        else:
            cells.append("—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--peers", default="floor,asyncore_fwd[epoll]",
                        help="as for run.py; the ratios need the floor among them (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=30, help="interleaved runs (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=5000, help="GETs per peer per run (default: %(default)s)")
    parser.add_argument("--pin", metavar="CPUS", help="taskset every process to these cores, e.g. 0 or 0,1")
    args = parser.parse_args(argv)
    peers = [peer for peer in parse_peers(args.peers) if peer.forwards]
    if not peers:
        raise SystemExit("no forwarding peer given")
    raise_fd_limit()
    tmp = Path(tempfile.mkdtemp(prefix="asyncore_fwd-one-request-"))
    ctx = Context(sizes=SIZES["quick"], tmp=tmp, servers=Servers(tmp), tools={"redis": True})
    procs: Dict[str, Proc] = {}
    ports: Dict[str, int] = {}
    try:
        redis_port = ctx.servers.redis()
        for peer in peers:
            procs[peer.name], ports[peer.name] = start_peer(ctx, peer, redis_port)
        if args.pin is not None:
            pin([proc.pid for proc in Proc.live] + [os.getpid()], args.pin)
        samples: Dict[str, List[Dict[str, float]]] = {peer.name: [] for peer in peers}
        for peer in peers:  # warm-up, not counted
            get_run(ports[peer.name], 2000, args.pin)
        for run in range(args.runs):
            shift = run % len(peers)
            for peer in peers[shift:] + peers[:shift]:
                samples[peer.name].append(get_run(ports[peer.name], args.requests, args.pin))
            print(f"run {run + 1}/{args.runs}: " + ", ".join(
                f"{name} {runs[-1]['rps']:.0f}" for name, runs in samples.items()), file=sys.stderr, flush=True)
        print(f"{args.runs} interleaved runs of {args.requests} GETs on one connection (redis-benchmark -c 1)"
              f"{f', every process on cores {args.pin}' if args.pin is not None else ''}:\n")
        print("\n".join(summary(peers, samples)))
        return 0
    finally:
        for proc in procs.values():
            proc.stop()
        Proc.stop_all()
        SOURCE_TREES.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
