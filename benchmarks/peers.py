"""The forwarders compared by benchmarks/run.py: how each is started and stopped.

A peer spec on the command line is a kind, optionally a git ref (asyncore_fwd
only), and optionally modes in brackets:

    direct  floor  socat  haproxy  rinetd  redir  asyncio  article
    asyncore_fwd[epoll,splice]        the working tree, --loop epoll --splice
    asyncore_fwd@main~5[epoll]        that commit, extracted with git archive
    asyncore_fwd@v0.1[]               no flags at all (for a CLI without --loop)
    asyncore_fwd@/path/to/tree[epoll] the package in another checkout (a worktree
                                      with uncommitted work), as it is now
    asyncore_fwd[trace]               a word not in ASYNCORE_FWD_MODES is a flag:
                                      trace -> --trace, workers=2 -> --workers 2

Each workload run gets a fresh forwarder (``forwarding()``).  The UDP
workloads start a peer's UDP mode (``PeerKind.udp_argv``) instead: a peer
without one is skipped for them.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from benchlib import BENCH, HOST, ROOT, Failed, PeakRss, Proc, Skipped, free_port

if TYPE_CHECKING:
    from workloads import Context

PY = sys.executable


@dataclass(frozen=True)
class PeerKind:
    """How to start one kind of forwarder and find its port.

    ``argv(remote_port, listen_port, tmpdir, extra)``: the command line.
    ``port_from``: "stderr:REGEX" or "stdout:REGEX" (the first group is the
    port; started with port 0), or "chosen" (a free port is passed to it and
    the harness waits until it listens).  ``source``: for another version of
    the package, the directory that holds it; the peer runs there, with it
    first on PYTHONPATH.  ``udp_argv``: the same for a UDP forwarding
    (same arguments; always given a chosen free UDP port), None if the peer
    has no UDP mode; ``udp_note`` says how it forwards UDP.
    """
    argv: Optional[Callable[[int, int, Path, Sequence[str]], List[str]]]
    port_from: str = "chosen"
    needs: Tuple[str, ...] = ()
    version: Callable[[], str] = lambda: ""
    skip: Dict[str, str] = field(default_factory=dict)  # workload -> why it does not apply
    note: str = ""
    source: Optional[Path] = None
    counts_cpu: bool = True  # False: its CPU time escapes the process-group figures
    udp_argv: Optional[Callable[[int, int, Path, Sequence[str]], List[str]]] = None
    udp_note: str = ""


def first_line(argv: Sequence[str], pattern: str = "", source: Optional[Path] = None) -> str:
    """First output line of a version command (matching ``pattern``)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=source or ROOT,
                              env=source_env(source))
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    for line in (done.stdout + done.stderr).splitlines():
        if line.strip() and re.search(pattern, line):
            return line.strip()
    return "?"


def source_env(source: Optional[Path]) -> Optional[Dict[str, str]]:
    """The environment for a child that must import the package from ``source``
    (None: inherit ours).  Its working directory is ``source`` as well: with
    ``-m``, that comes first on sys.path, even before PYTHONPATH."""
    if source is None:
        return None
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")]))}


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def _git_revision() -> str:
    rev = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return f"{rev}{' + uncommitted changes' if dirty else ''}"


# --- argv builders for the peers configured by a file ------------------------------

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


def _rinetd_argv(remote: int, listen: int, tmp: Path, extra: Sequence[str]) -> List[str]:
    # No "logfile" line: rinetd then logs nothing, like the other peers here.
    config = tmp / f"rinetd-{listen}.conf"
    config.write_text(f"{HOST} {listen} {HOST} {remote}\n")
    return ["rinetd", "-f", "-c", str(config), *extra]


FORWARDING_LINE = r"forwarding 127\.0\.0\.1:(\d+)"


def _asyncore_fwd_argv(remote: int, listen: int, tmp: Path, extra: Sequence[str]) -> List[str]:
    return [PY, "-m", "asyncore_fwd", "-p", "0", "-r", HOST, "-P", str(remote), *extra]


def _asyncore_fwd_udp_argv(remote: int, listen: int, tmp: Path, extra: Sequence[str]) -> List[str]:
    return [PY, "-m", "asyncore_fwd", "-q", "-L", f"{listen}:{HOST}:{remote},proto=udp", *extra]


ASYNCORE_FWD_UDP_NOTE = "UDP: -q -L PORT:127.0.0.1:TARGET,proto=udp (a session per client address, 60 s idle)"

PEER_KINDS: Dict[str, PeerKind] = {
    "direct": PeerKind(argv=None, note="client talks to the server, no forwarder"),
    "asyncore_fwd": PeerKind(
        argv=_asyncore_fwd_argv, port_from=f"stderr:{FORWARDING_LINE}",
        version=lambda: f"{first_line([PY, '-m', 'asyncore_fwd', '--version'])} (git {_git_revision()})",
        udp_argv=_asyncore_fwd_udp_argv, udp_note=ASYNCORE_FWD_UDP_NOTE),
    # backlog=4096, like asyncore_fwd's default and haproxy's: with socat's own
    # (5), the 50 clients of rr-c50 and http-c50 connecting at once lose SYNs
    # and every run includes a 1-3 s retransmit stall, which is not what
    # those rows measure.
    "socat": PeerKind(
        argv=lambda r, listen, tmp, extra: ["socat", f"TCP-LISTEN:{listen},fork,reuseaddr,bind={HOST},backlog=4096",
                                       f"TCP:{HOST}:{r}", *extra],
        needs=("socat",), version=lambda: first_line(["socat", "-V"], "socat version"),
        skip={"held": "skipped: forks a process per connection"},
        note="TCP-LISTEN:P,fork,reuseaddr,bind=127.0.0.1,backlog=4096 (its default backlog, 5, stalls 50 "
             "simultaneous connects for 1–3 s)",
        udp_argv=lambda r, listen, tmp, extra: ["socat", f"UDP-LISTEN:{listen},fork,reuseaddr,bind={HOST}",
                                           f"UDP:{HOST}:{r}", *extra],
        udp_note="UDP: UDP-LISTEN:P,fork,reuseaddr,bind=127.0.0.1 UDP:127.0.0.1:T — the first datagram from "
                 "a new client address forks a child that keeps that client (its socket connected to it) "
                 "until the run stops it: no -T, so an idle child never exits; the parent binds the port "
                 "afresh after each fork"),
    "haproxy": PeerKind(
        argv=_haproxy_argv, needs=("haproxy",), version=lambda: first_line(["haproxy", "-v"]),
        note="mode tcp, maxconn 20000, default nbthread"),
    "rinetd": PeerKind(
        argv=_rinetd_argv, needs=("rinetd",), version=lambda: first_line(["rinetd", "-v"]),
        note="one rule, no log file, run with -f (one process, libuv)"),
    "redir": PeerKind(
        argv=lambda r, listen, tmp, extra: ["redir", "-n", "-l", "err", *extra, f"{HOST}:{listen}", f"{HOST}:{r}"],
        needs=("redir",), version=lambda: f"redir {first_line(['redir', '-v'])}",
        skip={"held": "skipped: forks a process per connection"}, counts_cpu=False,
        note="redir -n -l err (foreground, errors only in its log); forks a process per connection, which "
             "init reaps, so cpu-per-gb is not measured"),
    "floor": PeerKind(
        argv=lambda r, listen, tmp, extra: [PY, str(BENCH / "floor_relay.py"), "-l", HOST, "-p", str(listen),
                                       "-r", HOST, "-P", str(r), *extra],
        version=lambda: f"benchmarks/floor_relay.py, Python {sys.version.split()[0]}",
        note="benchmarks/floor_relay.py, the least Python a relay can run per event (one epoll loop, "
             "recv_into, send; no features): an anchor, not a product"),
    "asyncio": PeerKind(
        argv=lambda r, listen, tmp, extra: [PY, str(BENCH / "asyncio_forwarder.py"), "--listen-port", "0",
                                       "--remote-port", str(r)],
        port_from=r"stdout:^(\d+)$",
        version=lambda: f"benchmarks/asyncio_forwarder.py, Python {sys.version.split()[0]}",
        udp_argv=lambda r, listen, tmp, extra: [PY, str(BENCH / "asyncio_forwarder.py"), "--udp", "--listen-port",
                                           str(listen), "--remote-port", str(r)],
        udp_note="UDP: asyncio_forwarder.py --udp, datagram endpoints, a session per client address, 60 s idle"),
    "article": PeerKind(
        argv=lambda r, listen, tmp, extra: [PY, str(ROOT / "examples" / "article_forwarder.py"), "-p", "0", "-r", HOST,
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
DEFAULT_PEERS = ["direct", "floor", "asyncore_fwd", "socat", "haproxy", "asyncio", "article"]


# --- other versions of the package --------------------------------------------------

class SourceTrees:
    """Other commits of this repository, each extracted (git archive) into a
    temporary directory of its own; ``cleanup()`` removes them all.

    The peer runs ``python -m asyncore_fwd`` in the tree, with the tree on
    PYTHONPATH, so that its package is imported rather than the installed
    one, by this interpreter (and with its pyasyncore on 3.12+).
    """

    def __init__(self) -> None:
        self.root: Optional[Path] = None
        self.trees: Dict[str, Path] = {}

    @staticmethod
    def resolve(ref: str) -> str:
        """The full commit id of a git ref; SystemExit if there is none."""
        done = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
        if done.returncode or not done.stdout.strip():
            raise SystemExit(f"unknown git ref {ref!r} (in {ROOT})")
        return done.stdout.strip()

    def tree(self, commit: str) -> Path:
        """The directory holding ``commit``'s asyncore_fwd/ (extracted once);
        SystemExit if git cannot give it."""
        if commit not in self.trees:
            if self.root is None:
                self.root = Path(tempfile.mkdtemp(prefix="asyncore_fwd-bench-src-"))
            path = self.root / commit[:12]
            path.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit, "asyncore_fwd"],
                                     capture_output=True)
            if archive.returncode:
                raise SystemExit(f"cannot extract asyncore_fwd/ at {commit[:12]}: "
                                 f"{archive.stderr.decode(errors='replace').strip()}")
            subprocess.run(["tar", "-x", "-C", str(path)], input=archive.stdout, check=True)
            self.trees[commit] = path
        return self.trees[commit]

    def cleanup(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        self.root, self.trees = None, {}


SOURCE_TREES = SourceTrees()


def tree_kind(path: Path) -> PeerKind:
    """asyncore_fwd as it is in another checkout, run from there."""
    tree = path.resolve()
    rev = first_line(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=normal",
                            "asyncore_fwd"], capture_output=True, text=True).stdout.strip()
    state = f"git {rev}{' + uncommitted changes' if dirty else ''}"
    return PeerKind(
        argv=_asyncore_fwd_argv, port_from=f"stderr:{FORWARDING_LINE}", source=tree,
        udp_argv=_asyncore_fwd_udp_argv, udp_note=ASYNCORE_FWD_UDP_NOTE,
        version=lambda: f"{first_line([PY, '-m', 'asyncore_fwd', '--version'], source=tree)} ({tree}, {state})",
        note=f"asyncore_fwd from {tree} as it is at each start ({state} when the run began), same Python")


def ref_kind(ref: str) -> PeerKind:
    """asyncore_fwd as of git ``ref``, run from an extracted tree; or, for a
    directory holding an asyncore_fwd package, from that directory."""
    if "/" in ref and (Path(ref) / "asyncore_fwd" / "__init__.py").is_file():
        return tree_kind(Path(ref))
    commit = SourceTrees.resolve(ref)
    tree = SOURCE_TREES.tree(commit)
    named = "" if commit.startswith(ref) else f" = {ref}"
    return PeerKind(
        argv=_asyncore_fwd_argv, port_from=f"stderr:{FORWARDING_LINE}", source=tree,
        udp_argv=_asyncore_fwd_udp_argv, udp_note=ASYNCORE_FWD_UDP_NOTE,
        version=lambda: f"{first_line([PY, '-m', 'asyncore_fwd', '--version'], source=tree)} "
                        f"(git {commit[:7]}{named})",
        note=f"asyncore_fwd at commit {commit[:12]} ({ref}), extracted with git archive, same Python")


# --- peer specs --------------------------------------------------------------------

@dataclass(frozen=True)
class Peer:
    name: str        # the column title, e.g. "asyncore_fwd[epoll]"
    kind: PeerKind
    extra: Tuple[str, ...] = ()

    @property
    def forwards(self) -> bool:
        return self.kind.argv is not None

    @property
    def kind_name(self) -> str:
        """"asyncore_fwd@main~5" for "asyncore_fwd@main~5[epoll]"."""
        return self.name.split("[", 1)[0]


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
        match = re.fullmatch(r"([\w-]+)(?:@([^\[\],\s]+))?(?:\[(.*)\])?", item)
        if not match or match.group(1) not in PEER_KINDS or (match.group(2) and match.group(1) != "asyncore_fwd"):
            raise SystemExit(f"unknown peer {item!r}; known: {', '.join(PEER_KINDS)} "
                             f"(asyncore_fwd[mode,...] with modes like {', '.join(ASYNCORE_FWD_MODES)}, "
                             "splice, workers=2; asyncore_fwd@REF for a git commit, branch or tag, "
                             "asyncore_fwd@/PATH for another checkout)")
        kind_name, ref, modes = match.groups()
        kind = ref_kind(ref) if ref else PEER_KINDS[kind_name]
        base = f"{kind_name}@{ref}" if ref else kind_name
        if kind_name == "asyncore_fwd" and modes is None:
            peers += [Peer(f"{base}[{m}]", kind, tuple(mode_flags(m))) for m in DEFAULT_ASYNCORE_FWD_MODES]
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


def start_peer(ctx: "Context", peer: Peer, remote_port: int, proto: str = "tcp") -> Tuple[Proc, int]:
    """Start the forwarder; return it and the port it listens on."""
    kind = peer.kind
    if proto == "udp":
        return _start_udp_peer(ctx, peer, remote_port)
    listen = free_port() if kind.port_from == "chosen" else 0
    proc = Proc(kind.argv(remote_port, listen, ctx.tmp, peer.extra), peer.name, ctx.tmp,
                cwd=kind.source or ROOT, env=source_env(kind.source))
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


def _start_udp_peer(ctx: "Context", peer: Peer, remote_port: int) -> Tuple[Proc, int]:
    """Start the peer's UDP mode on a chosen free UDP port (Skipped: it has none)."""
    if peer.kind.udp_argv is None:
        raise Skipped("skipped: no UDP mode")
    listen = free_port(socket.SOCK_DGRAM)
    proc = Proc(peer.kind.udp_argv(remote_port, listen, ctx.tmp, peer.extra), f"{peer.name}-udp", ctx.tmp,
                cwd=peer.kind.source or ROOT, env=source_env(peer.kind.source))
    try:
        proc.wait_listening(listen, proto="udp")
    except BaseException:
        proc.stop()
        raise
    return proc, listen


@contextmanager
def forwarding(ctx: "Context", peer: Peer, remote_port: int, proto: str = "tcp") -> Iterator[Forwarding]:
    """A fresh forwarder in front of ``remote_port`` (a UDP one with ``proto="udp"``) for one workload run.

    Records its peak RSS in ``ctx.extras`` (kept even if the workload fails).
    """
    if not peer.forwards:
        yield Forwarding(remote_port)
        return
    proc, port = start_peer(ctx, peer, remote_port, proto)
    sampler = PeakRss(proc)
    sampler.start()
    try:
        yield Forwarding(port, proc)
    finally:
        ctx.extras["peak_rss_kib"] = sampler.finish()
        proc.stop()
