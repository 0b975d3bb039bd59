"""How busy a process is now: its CPU time over an interval, read from /proc twice.

    python examples/lessons/cpu.py PID [-i SECONDS]

`ps -o %cpu` divides the CPU time a process used since it started by its
age: a lifetime average, which a spin that began a second ago barely moves.
This reads the process's user and system time (/proc/PID/stat, fields 14
and 15, in clock ticks) at the start and at the end of the interval, and
prints the difference as a share of one CPU, e.g. "98% of one CPU over 1.0 s".
Linux only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far, in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name (field 2) is in brackets and may hold spaces: split after it.
        fields = stat.read().rpartition(")")[2].split()
    user, system = int(fields[11]), int(fields[12])
    return (user + system) / os.sysconf("SC_CLK_TCK")


def busy_share(pid: int, interval: float) -> float:
    """The share of one CPU ``pid`` used over the next ``interval`` seconds (1.0 is one whole CPU)."""
    before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(interval)
    after, elapsed = cpu_seconds(pid), time.monotonic() - started
    return (after - before) / elapsed


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description="CPU use of a process over an interval.")
    parser.add_argument("pid", type=int)
    parser.add_argument("-i", "--interval", type=float, default=1.0, help="seconds to measure (default 1)")
    args = parser.parse_args(argv)
    try:
        share = busy_share(args.pid, args.interval)
    except OSError as error:
        parser.exit(2, f"cpu.py: process {args.pid}: {error.strerror}\n")
    print(f"{share:.0%} of one CPU over {args.interval:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
