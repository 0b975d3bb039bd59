"""The report of benchmarks/run.py: table rows, medians and ratios, the
header (machine, versions) and the notes, as Markdown and JSON."""

from __future__ import annotations

import os
import platform
import re
import shutil
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from benchlib import ROOT
from peers import PEER_KINDS, PY, Peer, first_line
from workloads import UDP_ASTRAY, WORKLOADS, Context, Sizes

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


def _udp_cpu_per_gb(samples: RepeatSamples) -> Optional[float]:
    cpu, moved = _ok(samples, "udp-oneway", "cpu_s"), _ok(samples, "udp-oneway", "bytes")
    return cpu / (moved / 1e9) if cpu is not None and moved else None


def _peak_rss_mib(samples: RepeatSamples) -> Optional[float]:
    peaks = [s["values"]["peak_rss_kib"] for s in samples.values() if s["values"].get("peak_rss_kib")]
    return max(peaks) / 1024 if peaks else None


#: The peers every cell is compared with, when they ran: no forwarder, the floor relay
#: (benchmarks/floor_relay.py, the least Python a relay can run), and socat.
REFERENCES = ("direct", "floor", "socat")


@dataclass(frozen=True)
class Row:
    label: str                   # may use Sizes fields: "held-{held_conns}"
    workloads: Tuple[str, ...]   # computed from these; the first one's failures show
    unit: str
    value: Callable[[RepeatSamples], Optional[float]]
    ratios: bool = True          # show ×direct, ×floor and ×socat
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
    Row("udp-rr-c1", ("udp-rr-c1",), "req/s", _metric("udp-rr-c1", "rps")),
    Row("udp-rr-c1 p50", ("udp-rr-c1",), "ms", _metric("udp-rr-c1", "p50_ms"), lower_is_better=True),
    Row("udp-rr-c1 p99", ("udp-rr-c1",), "ms", _metric("udp-rr-c1", "p99_ms"), lower_is_better=True),
    Row("udp-rr-c32", ("udp-rr-c32",), "req/s", _metric("udp-rr-c32", "rps")),
    Row("udp-rr-c32 p50", ("udp-rr-c32",), "ms", _metric("udp-rr-c32", "p50_ms"), lower_is_better=True),
    Row("udp-rr-c32 p99", ("udp-rr-c32",), "ms", _metric("udp-rr-c32", "p99_ms"), lower_is_better=True),
    Row("udp-rr-c32 lost", ("udp-rr-c32",), "%", _metric("udp-rr-c32", "loss_pct"), ratios=False,
        lower_is_better=True),
    Row("udp-oneway", ("udp-oneway",), "MB/s", _metric("udp-oneway", "MBps")),
    Row("udp-oneway datagrams", ("udp-oneway",), "dgram/s", _metric("udp-oneway", "dps")),
    Row("udp-oneway lost", ("udp-oneway",), "%", _metric("udp-oneway", "loss_pct"), ratios=False,
        lower_is_better=True),
    Row("udp-oneway cpu-per-gb", ("udp-oneway",), "CPU-s/GB", _udp_cpu_per_gb, forwarders_only=True,
        lower_is_better=True),
    Row("udp-oneway-64 datagrams", ("udp-oneway-64",), "dgram/s", _metric("udp-oneway-64", "dps")),
    Row("udp-oneway-64 lost", ("udp-oneway-64",), "%", _metric("udp-oneway-64", "loss_pct"), ratios=False,
        lower_is_better=True),
    Row("rss-peak", tuple(WORKLOADS), "MiB", _peak_rss_mib, forwarders_only=True, lower_is_better=True,
        show_failures=False),
]

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
        refs = {name: stats.get(name, {}).get("median") for name in REFERENCES}
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
    order = list(PEER_KINDS)
    for peer in sorted(peers, key=lambda p: (order.index(p.kind_name.split("@")[0]), "@" in p.kind_name)):
        if peer.forwards and peer.kind_name not in versions and all(shutil.which(t) for t in peer.kind.needs):
            versions[peer.kind_name] = peer.kind.version()
    groups = {WORKLOADS[w].group for w in workloads}
    if tools["iperf3"] and "bulk" in groups:
        versions["iperf3"] = first_line(["iperf3", "--version"])
    if tools["redis"] and "rr" in groups:
        versions["redis"] = first_line(["redis-server", "--version"]).split(" sha=")[0]
    if tools["http"] and "http" in groups:
        versions["nginx"] = first_line(["nginx", "-v"]).replace("nginx version: ", "")
        versions["wrk"] = first_line(["wrk", "-v"], "wrk").split(" Copyright")[0]
    return versions


def render_markdown(meta: Dict, table: str, notes: List[str]) -> str:
    lines = ["# asyncore_fwd benchmarks", "",
             f"- command: `{meta['command']}`",
             f"- date: {meta['date']} (wall time {meta['wall_seconds']:.0f} s)",
             "- machine: " + ", ".join(f"{k} {v}" for k, v in meta["machine"].items()),
             f"- descriptor limit (every process): {meta['nofile']}",
             f"- mode: {meta['mode']}, {meta['repeat']} repeat(s), peers interleaved in rotated order",
             "- versions: " + "; ".join(f"{k}: {v}" for k, v in meta["versions"].items()),
             "", "Median over repeats, [min–max] when more than one; ratios of medians to direct, floor and socat.",
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


def run_facts() -> Dict[str, str]:
    """Facts the notes quote, read before the run: the code under test may change while it runs."""
    return {"asyncore_fwd_backlog": _asyncore_fwd_backlog(), "somaxconn": _somaxconn()}


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
                          "default), asyncio 100 (its default), socat 4096, article 5, haproxy its maxconn, "
                          "rinetd 128 and redir 10 (fixed in each); the kernel caps them at somaxconn = "
                          f"{f['somaxconn']}.",
    "held": lambda z, f: f"held-{z.held_conns}: {z.held_conns} idle connections (each checked with one echo) held "
                         f"through the forwarder while 50 clients ping-pong 100-byte messages for "
                         f"{z.held_rr_seconds:g} s; rate vs the mean of the same run just before they were opened "
                         "and just after they were closed (target: a drop under 20 %, i.e. ≥ 0.80×); rss per idle "
                         "conn = (RSS with them held − RSS before) / count.",
    "udp": lambda z, f: f"udp-rr: 1 or 32 clients, each a UDP socket of its own, send a 64-byte datagram and wait "
                        f"for its echo, then the next, for {z.udp_seconds:g} s, measured from 1 s after every "
                        "client had its first reply (or 6 s after the start; same sockets; what goes astray before "
                        "is counted apart as warm-up); "
                        "a reply not back within 0.2 s is counted lost and the next request sent; req/s = replies "
                        "per second; p50/p99 over the measured replies. udp-oneway(-64): one socket sends 1400-byte "
                        "(64-byte) "
                        f"datagrams as fast as it can (no pacing) for {z.udp_seconds:g} s to a sink that counts "
                        "them; MB/s and dgram/s are what reached the sink per second of sending, lost is the share "
                        "sent that never arrived (wherever it was dropped: a full socket buffer of the forwarder or "
                        "of the sink; the direct column shows the sink's own limit); cpu-per-gb: the forwarder's "
                        "CPU (process group) during the blast, per GB that reached the sink.",
}


def notes_for(samples: List[Dict], peers: List[Peer], workloads: List[str], sizes: Sizes,
              facts: Dict[str, str]) -> List[str]:
    groups = [g for g in GROUP_NOTES if any(WORKLOADS[w].group == g for w in workloads)]
    notes = [GROUP_NOTES[g](sizes, facts) for g in groups]
    notes.append("rss-peak: highest RSS of the forwarder's process group over all its runs (VmHWM, and the sum "
                 "over its processes sampled every 0.5 s: socat's per-connection children count shared pages "
                 "once each).")
    kinds_noted = set()
    for peer in peers:
        if peer.kind_name not in kinds_noted:
            kinds_noted.add(peer.kind_name)
            if peer.kind.note and (not peer.kind.udp_note or any(WORKLOADS[w].proto == "tcp" for w in workloads)):
                notes.append(f"{peer.kind_name}: {peer.kind.note}.")
            if peer.kind.udp_note and any(WORKLOADS[w].proto == "udp" for w in workloads):
                notes.append(f"{peer.kind_name}: {peer.kind.udp_note}.")
        if peer.extra:
            command = "asyncore-fwd" if peer.kind_name.startswith("asyncore_fwd") else "extra arguments:"
            notes.append(f"{peer.name}: {command} {' '.join(peer.extra)}.")
    # One note per (peer, workload, what happened), listing the repeats.
    events: Dict[Tuple[str, str, str], List[str]] = {}
    for s in samples:
        if s["status"] in ("failed", "partial"):
            what = f"{s['status']}: {s['reason']}"
        elif s["workload"] == "http-c50" and s["status"] == "ok" and (s["values"].get("errors", 0)
                                                                      or s["values"].get("non2xx", 0)):
            what = "wrk counted socket errors or non-2xx replies: " \
                   f"{s['values'].get('errors', 0) + s['values'].get('non2xx', 0):.0f}"
        elif s["workload"].startswith("udp-rr") and s["status"] == "ok" and any(
                s["values"].get(k) for k in UDP_ASTRAY):
            what = "UDP replies lost or astray: " + ", ".join(
                f"{k.replace('_', ' ')} {s['values'][k]:.0f}" for k in UDP_ASTRAY if s["values"].get(k))
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


