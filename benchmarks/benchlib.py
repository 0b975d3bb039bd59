"""Plumbing for benchmarks/run.py: child processes, /proc figures, ports.

Every child runs in a process group of its own (a new session), so that
stopping it also stops whatever it forked (socat forks a process per
connection), and ``Proc.stop_all()`` ends every group this run started.
Output goes to files, never to pipes nobody reads.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Failed(Exception):
    """This peer could not do this workload (the reason goes in the table)."""


class Partial(Failed):
    """Did only part of the work in the time allowed: the message says how much."""


class Skipped(Exception):
    """This workload does not apply to this peer, or its tools are missing."""


def raise_fd_limit() -> Tuple[int, int]:
    """Soft RLIMIT_NOFILE to the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port free right now, for servers that cannot bind port 0 and say
    which port they got (socat, haproxy, redis, nginx, iperf3); a UDP one
    with ``kind=socket.SOCK_DGRAM``."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def is_listening(port: int, proto: str = "tcp") -> bool:
    """Is some socket listening on 127.0.0.1:port (or any address)?  For
    ``proto="udp"``: is some socket bound there, unconnected.

    Read from /proc/net/tcp rather than by connecting: a test connection
    would count as a client (iperf3 -1 would serve it and exit; a UDP
    forwarder would open a session for it).
    """
    addresses = {"0100007F", "00000000",  # 127.0.0.1, 0.0.0.0
                 "0" * 32, "0" * 24 + "01000000", "0" * 16 + "FFFF0000" + "0100007F"}  # ::, ::1, v4-mapped
    suffix = f":{port:04X}"
    state = "0A" if proto == "tcp" else "07"  # TCP_LISTEN; TCP_CLOSE, which an unconnected UDP socket shows
    for table in (f"/proc/net/{proto}", f"/proc/net/{proto}6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local = fields[1]
                    if fields[3] == state and local.endswith(suffix) and local[: -len(suffix)] in addresses:
                        return True
        except OSError:
            continue
    return False


# --- /proc readers ------------------------------------------------------------

def _stat_fields(pid: int) -> Optional[List[str]]:
    """Fields of /proc/PID/stat after the command name (state is [0])."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def group_members(pgid: int) -> List[int]:
    """Every process (zombies excluded) in process group ``pgid``."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            members.append(int(name))
    return members


def status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return 0
    return int(match.group(1)) if match else 0


def cpu_seconds(pids: Sequence[int]) -> float:
    """user+system time of these processes, plus that of their reaped children
    (cutime/cstime): socat's per-connection children count once they exit."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLK_TCK


# --- child processes ----------------------------------------------------------

class Proc:
    """A child process in its own process group, output to files."""

    live: ClassVar[List["Proc"]] = []
    _count: ClassVar[int] = 0

    def __init__(self, argv: Sequence[str], name: str, logdir: Path, *, stdin: bool = False,
                 cwd: Path = ROOT, env: Optional[Dict[str, str]] = None) -> None:
        Proc._count += 1
        self.name = name
        self.argv = [str(a) for a in argv]
        stem = f"{Proc._count:04d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}"
        self.out_path = logdir / f"{stem}.out"
        self.err_path = logdir / f"{stem}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=out, stderr=err,
                cwd=cwd, env=env, start_new_session=True)
        self.pid = self.popen.pid  # also the process group id (new session)
        self.stopped = False
        Proc.live.append(self)

    # -- state

    def alive(self) -> bool:
        """Running (not a zombie).  Does not reap: the group id stays ours."""
        fields = _stat_fields(self.pid)
        return bool(fields) and fields[0] not in ("Z", "X")

    def exit_code(self) -> Optional[int]:
        if self.alive():
            return None
        return self.popen.poll()

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def errors(self) -> str:
        return self.err_path.read_text(errors="replace")

    def tail(self) -> str:
        """The last meaningful stderr line (or stdout's), for a failure reason."""
        for text in (self.errors(), self.output()):
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            if lines:
                return lines[-1][:200]
        return ""

    def describe_exit(self) -> str:
        code = self.exit_code()
        what = f"{self.name} exited" + (f" (status {code})" if code is not None else "")
        tail = self.tail()
        return f"{what}: {tail}" if tail else what

    # -- waiting

    def wait_for(self, pattern: str, stream: str = "stdout", timeout: float = 15.0) -> "re.Match[str]":
        """Wait for a line matching ``pattern`` in the child's output."""
        path = self.out_path if stream == "stdout" else self.err_path
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern, re.M)
        while True:
            match = regex.search(path.read_text(errors="replace"))
            if match:
                return match
            if not self.alive():
                raise Failed(self.describe_exit())
            if time.monotonic() > deadline:
                raise Failed(f"{self.name} said nothing matching {pattern!r} within {timeout:g} s")
            time.sleep(0.02)

    def wait_listening(self, port: int, timeout: float = 15.0, proto: str = "tcp") -> None:
        deadline = time.monotonic() + timeout
        while not is_listening(port, proto):
            if not self.alive():
                raise Failed(self.describe_exit())
            if time.monotonic() > deadline:
                raise Failed(f"{self.name} not listening on port {port} within {timeout:g} s")
            time.sleep(0.02)

    def wait(self, timeout: float) -> Optional[int]:
        """Wait for the child to exit by itself; None if it is still running."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close_stdin(self) -> None:
        if self.popen.stdin:
            try:
                self.popen.stdin.close()
            except OSError:
                pass

    # -- figures for the whole group (socat's children included)

    def members(self) -> List[int]:
        return group_members(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.members() or [self.pid])

    def rss_kib(self) -> int:
        return sum(status_kib(pid, "VmRSS") for pid in self.members())

    def fd_count(self) -> int:
        count = 0
        for pid in self.members():
            try:
                count += len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                pass
        return count

    # -- stopping

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the group, SIGKILL what is left after ``grace`` s, reap."""
        if self.stopped:
            return
        self.stopped = True
        self.close_stdin()
        for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if not self.members():
                break
            try:
                os.killpg(self.pid, signum)
            except (ProcessLookupError, PermissionError):
                break
            deadline = time.monotonic() + wait
            while self.members() and time.monotonic() < deadline:
                time.sleep(0.02)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if self in Proc.live:
            Proc.live.remove(self)

    @classmethod
    def stop_all(cls) -> None:
        for proc in reversed(list(cls.live)):
            proc.stop(grace=2.0)

    @classmethod
    def run(cls, argv: Sequence[str], name: str, logdir: Path, timeout: float) -> "Proc":
        """Run a client to completion (killed after ``timeout`` s: Failed)."""
        proc = cls(argv, name, logdir)
        try:
            if proc.wait(timeout) is None:
                raise Failed(f"{name} did not finish within {timeout:g} s")
        finally:
            proc.stop(grace=1.0)
        return proc


class PeakRss(threading.Thread):
    """Samples a process group's total RSS every ``interval`` s; keeps the max.

    VmHWM is exact for one process; for socat's tree of short-lived children
    only sampling sees the sum.
    """

    def __init__(self, proc: Proc, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.interval = interval
        self.peak_kib = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.sample()

    def sample(self) -> int:
        members = self.proc.members()
        now = sum(status_kib(pid, "VmRSS") for pid in members)
        hwm = max((status_kib(pid, "VmHWM") for pid in members), default=0)
        self.peak_kib = max(self.peak_kib, now, hwm)
        return self.peak_kib

    def finish(self) -> int:
        self.done.set()
        return self.sample()
