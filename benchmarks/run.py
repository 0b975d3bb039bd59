#!/usr/bin/env python3
"""Benchmark asyncore_fwd against a direct connection and other forwarders.

    python benchmarks/run.py --quick
    python benchmarks/run.py --peers direct,asyncore_fwd,socat --workloads bulk,rr --repeat 5
    python benchmarks/run.py --quick --peers 'asyncore_fwd[epoll],asyncore_fwd@main~5[epoll]'

Starts the servers (iperf3, redis, nginx, a stdlib echo server, a UDP echo
server and counting sink) and each forwarder on 127.0.0.1 with ephemeral
ports (the UDP workloads start each peer's UDP mode), runs the workloads, and prints
one table of medians (min-max range over the repeats) with ratios to a direct
connection, to the floor relay (benchmarks/floor_relay.py) and to socat.  The
same table goes to benchmarks/results/latest.md, and every raw sample to
latest.json.

Peers run interleaved: each repeat runs every peer once per workload, in an
order rotated by one each repeat, so slow drifts of the machine spread evenly.
A real client is used where installed (iperf3, redis-benchmark, wrk), a
standard-library one otherwise; the table says which.  Nothing here fails on
a slow result: a peer that cannot do a workload gets "failed: why" in its cell.

The parts: peers.py (how each forwarder is started, peer specs, other git
versions), servers.py (the servers behind them), workloads.py (what is
measured), report.py (the table, notes, Markdown and JSON); this file is the
command line and the interleaving loop.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from benchlib import BENCH, ROOT, Failed, Partial, Proc, Skipped, raise_fd_limit
from peers import (
    ASYNCORE_FWD_MODES,
    DEFAULT_ASYNCORE_FWD_MODES,
    DEFAULT_PEERS,
    PEER_KINDS,
    SOURCE_TREES,
    Peer,
    parse_peers,
    split_list,
    start_peer,
)
from report import build_table, machine_facts, notes_for, render_markdown, run_facts, summarize, tool_versions
from servers import Servers
from workloads import SIZES, WORKLOADS, Context

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


# Why a peer is skipped, per (peer name, protocol): (short reason for the
# table, full reason for the notes).
Unusable = Dict[Tuple[str, str], Tuple[str, str]]


def preflight(ctx: Context, peers: List[Peer], protos: Sequence[str]) -> Unusable:
    """Start and stop each forwarder once per protocol the workloads use; a
    peer that cannot start is skipped for the whole run in that protocol (e.g.
    an asyncore_fwd flag this version does not have, or no UDP rules)."""
    unusable: Unusable = {}
    for peer in peers:
        missing = [tool for tool in peer.kind.needs if not shutil.which(tool)]
        if missing:
            why = f"skipped: {', '.join(missing)} not installed"
            for proto in protos:
                unusable[peer.name, proto] = (why, f"{peer.name}: {why}")
            continue
        if not peer.forwards:
            continue
        for proto in protos:
            if proto == "udp" and peer.kind.udp_argv is None:
                unusable[peer.name, proto] = ("skipped: no UDP mode", f"{peer.name} (UDP): skipped: no UDP mode")
                continue
            target = ctx.servers.udp_echo() if proto == "udp" else ctx.servers.echo()
            try:
                start_peer(ctx, peer, target, proto)[0].stop()
            except Failed as error:
                unusable[peer.name, proto] = _why_unusable(peer, proto, str(error))
    return unusable


def _why_unusable(peer: Peer, proto: str, error: str) -> Tuple[str, str]:
    flags = re.search(r"unrecognized arguments: (.*?)(?: \(see --help\))?$", error)
    if "(status 2)" in error:  # the CLI's exit status for bad usage
        if flags:
            rejected = flags.group(1)
        elif proto == "udp" and "proto" in error:  # a version without UDP rules
            rejected = "proto=udp"
        else:
            rejected = " ".join(peer.extra)
        short = f"skipped: CLI rejects {rejected}"
    else:
        short = "skipped: did not start"
    label = f"{peer.name} ({proto.upper()})" if proto != "tcp" else peer.name
    return short, f"{label}: {short} — {error}"


def _reasons(unusable: Unusable, peer: str = "") -> List[str]:
    """The full reasons (of one peer, or of all), each once: a missing tool
    makes the same one for every protocol."""
    return list(dict.fromkeys(why for (name, _), (_, why) in unusable.items() if name == peer or not peer))


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


def run_all(ctx: Context, peers: List[Peer], workloads: List[str], unusable: Unusable,
            repeat: int) -> List[Dict]:
    samples: List[Dict] = []
    for rep in range(repeat):
        for workload in workloads:
            # Rotate the order each repeat: every peer takes every position.
            order = peers[rep % len(peers):] + peers[:rep % len(peers)]
            for position, peer in enumerate(order):
                why = unusable.get((peer.name, WORKLOADS[workload].proto))
                if why:
                    samples.append({"workload": workload, "peer": peer.name, "repeat": rep, "position": position,
                                    "client": "", "values": {}, "status": "skipped",
                                    "reason": why[0], "wall_seconds": 0})
                    continue
                record = run_sample(ctx, workload, peer, rep, position)
                samples.append(record)
                log(f"[{rep + 1}/{repeat}] {workload:<13} {peer.name:<22} {summarize(record)} "
                    f"({record['wall_seconds']:.1f} s)")
    return samples


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs, 1 repeat, 2000 held (about 4 minutes)")
    parser.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                        help="comma list of: " + ", ".join(PEER_KINDS) + "; asyncore_fwd[mode,...] picks modes: "
                             f"{', '.join(ASYNCORE_FWD_MODES)}, or a flag like splice (--splice) or workers=2 "
                             f"(--workers 2); plain asyncore_fwd means "
                             f"{', '.join(f'asyncore_fwd[{m}]' for m in DEFAULT_ASYNCORE_FWD_MODES)} "
                             "; asyncore_fwd@REF[...] runs the "
                             "package as of git REF (commit, branch, tag) beside the working tree, "
                             "asyncore_fwd@/PATH[...] the one in another checkout as it is "
                             "(default: %(default)s)")
    parser.add_argument("--workloads", default="all",
                        help="comma list of workloads or groups: " + ", ".join(WORKLOADS)
                             + "; groups bulk, rr, http, burst, held, udp (default: all)")
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
    try:
        return run(args, argv)
    finally:
        SOURCE_TREES.cleanup()  # after run() has stopped every peer started from them


def run(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    """The whole run: servers, peers, workloads, then the report."""
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
    facts = run_facts()
    # SIGTERM (and SIGHUP) end the run like Ctrl-C: the finally below stops every child.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.default_int_handler)
    tmp = Path(tempfile.mkdtemp(prefix="asyncore_fwd-bench-"))
    try:
        ctx = Context(sizes, tmp, Servers(tmp), tools)
        log(f"peers: {', '.join(p.name for p in peers)}; workloads: {', '.join(workloads)}; "
            f"repeat {sizes.repeat}; logs in {tmp}")
        unusable = preflight(ctx, peers, sorted({WORKLOADS[w].proto for w in workloads}, reverse=True))
        for why in _reasons(unusable):
            log(why)
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
    meta["peers"] = {p.name: {"args": list(p.extra), "unusable": "; ".join(_reasons(unusable, p.name))}
                     for p in peers}
    notes = _reasons(unusable) + notes_for(samples, peers, workloads, sizes, facts)
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

