#!/usr/bin/env python3
"""Where the forwarder's CPU goes, per request and per GB: ``perf`` samples grouped by what they did.

    python benchmarks/profile.py rr   [--requests N] [-- FORWARDER FLAGS...]
    python benchmarks/profile.py bulk [--seconds S] [-- FORWARDER FLAGS...]
    python benchmarks/profile.py bulk --seconds 5 -- --splice
    python benchmarks/profile.py rr --peer rinetd

``rr`` runs ``redis-benchmark -c 1`` (GET; ``--clients`` for more) through ``python -m asyncore_fwd``
to a redis server; ``bulk`` runs ``iperf3 -R`` (the server sends) through it.
Both are C programs, so the only Python on the path is the forwarder.  The
forwarder runs under ``perf record -g``; each sample is put in one group by
its call chain (the system call it is in, and within it the copy or the
wake-up of the peer), and the forwarder's CPU time (from /proc) is shared
out in the same proportions.  ``bulk`` also measures the CPU of the iperf3
client and server, with and without the forwarder: on a machine with few
cores, the sum of the three per GB is what bounds the throughput.

Needs root (or perf_event_paranoid <= 1 for kernel symbols), perf, redis and
iperf3.  The machine should be otherwise idle.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from benchlib import HOST, ROOT, Proc, cpu_seconds, free_port
from peers import PEER_KINDS, PY
from servers import Servers
from workloads import redis_get_result

# A sample's group: the first rule whose frame is in its call chain (leaf
# first), within the system call it is in.  Names are the kernel's (6.x).
SYSCALLS = [
    ("__x64_sys_sendto", "send()"),
    ("__x64_sys_write", "send()"),
    ("__x64_sys_sendmsg", "send()"),
    ("__x64_sys_recvfrom", "recv()"),
    ("__x64_sys_read", "recv()"),
    ("__x64_sys_recvmsg", "recv()"),
    ("__x64_sys_epoll_wait", "waiting: epoll_wait()"),
    ("__x64_sys_epoll_pwait", "waiting: epoll_wait()"),
    ("__x64_sys_poll", "waiting: poll()"),
    ("__x64_sys_pselect6", "waiting: select()"),
    ("__x64_sys_select", "waiting: select()"),
    ("__x64_sys_splice", "splice()"),
]
INSIDE = [
    ("sock_def_readable", "waking the reader"),       # the peer's receive path ends by waking it
    ("net_rx_action", "the reader's TCP receive path (loopback runs it in the sender)"),
    ("sk_stream_write_space", "waking the writer"),
    ("_copy_to_iter", "copying bytes out"),
    ("_copy_from_iter", "copying bytes in"),
    ("schedule_hrtimeout_range_clock", "sleeping and being woken"),
    ("ep_send_events", "collecting ready events"),
]


def classify(stack: List[Tuple[str, str]]) -> str:
    """One group for a sample: ``stack`` is (symbol, dso) pairs, leaf first."""
    symbols = [symbol for symbol, _ in stack]
    for frame, call in SYSCALLS:
        if frame in symbols:
            top = symbols.index(frame)
            for inner, what in INSIDE:
                if inner in symbols[:top]:
                    return f"{call}: {what}"
            return f"{call}: the rest (TCP/IP, locks, entry)"
    leaf_symbol, leaf_dso = stack[0]
    if "kernel" in leaf_dso:
        return "other kernel work (other system calls, interrupts)"
    if "libpython" in leaf_dso:
        return "Python interpreter"
    return "user space outside the interpreter (libc, C modules, a C program's own code)"


def perf_groups(data: Path) -> Dict[str, int]:
    """Sample counts per group from a ``perf record -g`` file."""
    script = subprocess.run(["perf", "script", "-i", str(data), "-F", "ip,sym,dso"],
                            capture_output=True, text=True, check=True).stdout
    groups: Dict[str, int] = collections.Counter()
    stack: List[Tuple[str, str]] = []
    for line in script.splitlines() + [""]:
        line = line.strip()
        if not line:
            if stack:
                groups[classify(stack)] += 1
            stack = []
            continue
        parts = line.split(None, 1)
        if len(parts) == 2:
            rest = parts[1]
            symbol, _, dso = rest.rpartition(" (")
            stack.append((symbol.split("+", 1)[0], dso.rstrip(")")))
    return groups


class Profiled:
    """The forwarder under ``perf record`` between ``start()`` and ``stop()``."""

    def __init__(self, fwd: Proc, tmp: Path) -> None:
        self.fwd, self.data = fwd, tmp / "perf.data"
        self.perf: Optional[subprocess.Popen] = None

    def start(self) -> None:
        self.perf = subprocess.Popen(["perf", "record", "-F", "2999", "-g", "-p", str(self.fwd.pid),
                                      "-o", str(self.data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)  # perf attaches

    def stop(self) -> None:
        assert self.perf is not None
        self.perf.send_signal(2)
        self.perf.wait(60)


def start_forwarder(args: argparse.Namespace, remote: int, tmp: Path) -> Tuple[Proc, int]:
    """``args.peer`` (asyncore_fwd with ``args.flags``, or one of run.py's peers) forwarding to ``remote``."""
    port = free_port()
    if args.peer == "asyncore_fwd":
        argv = [PY, "-m", "asyncore_fwd", "-p", str(port), "-r", HOST, "-P", str(remote), *args.flags]
    else:
        argv = PEER_KINDS[args.peer].argv(remote, port, tmp, args.flags)  # type: ignore[misc]
    fwd = Proc(argv, args.peer, tmp)
    fwd.wait_listening(port)
    return fwd, port


def report(title: str, groups: Dict[str, int], cpu: float, unit: float, unit_name: str) -> None:
    total = sum(groups.values()) or 1
    print(f"\n{title}: forwarder CPU {cpu / unit * 1e6 if unit_name == 'request' else cpu / unit:.3g} "
          f"{'µs' if unit_name == 'request' else 's'} per {unit_name} ({total} perf samples)\n")
    print(f"| where | share | per {unit_name} |")
    print("|---|---|---|")
    for group, count in sorted(groups.items(), key=lambda item: -item[1]):
        share = count / total
        per = cpu * share / unit
        figure = f"{per * 1e6:.2f} µs" if unit_name == "request" else f"{per:.3f} s"
        print(f"| {group} | {100 * share:.1f} % | {figure} |")


def profile_rr(args: argparse.Namespace, tmp: Path, servers: Servers) -> None:
    redis = servers.redis()

    def bench(port: int, requests: int) -> Dict[str, float]:
        out = subprocess.run(["redis-benchmark", "-h", HOST, "-p", str(port), "-t", "get", "-c", str(args.clients),
                              "-n", str(requests), "--csv"], capture_output=True, text=True, timeout=300).stdout
        result = redis_get_result(out)
        if result is None:
            sys.exit(f"profile.py: redis-benchmark gave no GET result on port {port}")
        return result

    bench(redis, 2000)
    direct = bench(redis, args.requests)
    fwd, port = start_forwarder(args, redis, tmp)
    try:
        bench(port, 2000)
        cpu0 = cpu_seconds([fwd.pid])
        through = bench(port, args.requests)
        cpu = cpu_seconds([fwd.pid]) - cpu0
        profiled = Profiled(fwd, tmp)  # a second run for the shares: perf slows the first
        profiled.start()
        bench(port, args.requests)
        profiled.stop()
    finally:
        fwd.stop()
    print(f"redis GET, {args.clients} client(s), {args.requests} requests: direct {direct['rps']:.0f} req/s, "
          f"p50 {direct['p50_ms']:.3f} ms; through the forwarder {through['rps']:.0f} req/s, "
          f"p50 {through['p50_ms']:.3f} ms")
    report("rr", perf_groups(profiled.data), cpu, args.requests, "request")


def run_iperf(client_port: int, seconds: int, tmp: Path, server: Proc) -> Tuple[float, float, float]:
    """``iperf3 -c -R`` to ``client_port``: (GB moved, client CPU s, server CPU s)."""
    server_cpu0 = cpu_seconds([server.pid])
    client = Proc(["iperf3", "-c", HOST, "-p", str(client_port), "-t", str(seconds), "-R", "-J"],
                  "iperf3-client", tmp)
    deadline = time.monotonic() + seconds + 30
    while client.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    client_cpu = cpu_seconds([client.pid])  # a zombie, not reaped yet: its /proc entry still counts
    server_cpu = cpu_seconds([server.pid]) - server_cpu0
    client.stop()
    result = json.loads(client.output())
    gb = result["end"]["sum_received"]["bytes"] / 1e9
    return gb, client_cpu, server_cpu


def profile_bulk(args: argparse.Namespace, tmp: Path, servers: Servers) -> None:
    rows = []
    profiled: Optional[Profiled] = None
    for label in ("direct", "forwarder", "forwarder under perf"):
        port = free_port()
        server = Proc(["iperf3", "-s", "-1", "-B", HOST, "-p", str(port)], "iperf3-server", tmp)
        server.wait_listening(port)
        fwd: Optional[Proc] = None
        target = port
        if label != "direct":
            fwd, target = start_forwarder(args, port, tmp)
            if label == "forwarder under perf":
                profiled = Profiled(fwd, tmp)
                profiled.start()
        try:
            fwd_cpu0 = cpu_seconds([fwd.pid]) if fwd else 0.0
            gb, client_cpu, server_cpu = run_iperf(target, args.seconds, tmp, server)
            fwd_cpu = cpu_seconds([fwd.pid]) - fwd_cpu0 if fwd else 0.0
            if profiled is not None:
                profiled.stop()
        finally:
            if fwd is not None:
                fwd.stop()
            server.stop()
        rows.append((label, gb, client_cpu, server_cpu, fwd_cpu))
    print(f"iperf3 -R for {args.seconds} s, {os.cpu_count()} cores; CPU seconds per GB:\n")
    print("| path | GB/s | iperf3 sender | iperf3 receiver | forwarder | all three |")
    print("|---|---|---|---|---|---|")
    for label, gb, client_cpu, server_cpu, fwd_cpu in rows:
        total = (client_cpu + server_cpu + fwd_cpu) / gb
        print(f"| {label} | {gb / args.seconds:.2f} | {server_cpu / gb:.3f} | {client_cpu / gb:.3f} | "
              f"{fwd_cpu / gb:.3f} | {total:.3f} |")
    direct, through, _ = rows
    cores = os.cpu_count() or 1

    def cpu_bound(gb: float, client_cpu: float, server_cpu: float, fwd_cpu: float) -> float:
        """GB/s that CPU alone allows: all together get ``cores``, each one-threaded process one core."""
        per_gb = [cpu / gb for cpu in (client_cpu, server_cpu, fwd_cpu) if cpu]
        return min([cores / sum(per_gb)] + [1 / cpu for cpu in per_gb])

    direct_bound, through_bound = cpu_bound(*direct[1:]), cpu_bound(*through[1:])
    print(f"\nWhat CPU alone allows ({cores} cores shared, each process on at most one): direct "
          f"{direct_bound:.2f} GB/s, through the forwarder {through_bound:.2f} GB/s, a ceiling of "
          f"{through_bound / direct_bound:.2f}× direct; measured {through[1] / direct[1]:.2f}× "
          f"({through[1] / args.seconds / through_bound:.0%} of its bound; direct "
          f"{direct[1] / args.seconds / direct_bound:.0%} of its).")
    assert profiled is not None
    report("bulk", perf_groups(profiled.data), through[4], through[1], "GB")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=["rr", "bulk"])
    parser.add_argument("--requests", type=int, default=100_000, help="rr: GET requests (default 100000)")
    parser.add_argument("--clients", type=int, default=1, help="rr: redis-benchmark -c (default 1)")
    parser.add_argument("--seconds", type=int, default=5, help="bulk: iperf3 -t (default 5)")
    parser.add_argument("--peer", default="asyncore_fwd",
                        choices=["asyncore_fwd"] + [name for name, kind in PEER_KINDS.items()
                                                    if kind.argv is not None and kind.port_from == "chosen"],
                        help="the forwarder to profile (default asyncore_fwd); others as in run.py")
    args, flags = parser.parse_known_args(argv)
    args.flags = [flag for flag in flags if flag != "--"]  # the forwarder's own flags
    with tempfile.TemporaryDirectory(prefix="profile-") as name:
        tmp = Path(name)
        try:
            servers = Servers(tmp)
            (profile_rr if args.workload == "rr" else profile_bulk)(args, tmp, servers)
        finally:
            Proc.stop_all()


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
