"""The ``asyncore-fwd`` command: argument parsing, logging set-up, signals.

Kept apart from the library: nothing here is needed to embed a ``Forwarder``.
Exit status: 0 after SIGINT/SIGTERM, 1 for a run-time error (address in use,
permission denied, unknown host), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import socket
import sys
import threading
from typing import Callable, Optional, Sequence

from . import __version__, _workers
from ._forwarder import DEFAULT_BACKLOG, DEFAULT_CONNECT_TIMEOUT, DEFAULT_HIGH_WATER, Forwarder, format_address
from ._loop import LOOP_KINDS, best_loop_kind

PROG = "asyncore-fwd"
log = logging.getLogger("asyncore_fwd")


def _integer(what: str, lowest: int, highest: int) -> Callable[[str], int]:
    """An argparse type: a decimal integer from ``lowest`` to ``highest``."""
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            value = lowest - 1
        if not lowest <= value <= highest:
            raise argparse.ArgumentTypeError(
                f"invalid {what} {text!r}: expected an integer from {lowest} to {highest}")
        return value
    return parse


def _host(text: str) -> str:
    if not (text[1:-1] if text.startswith("[") and text.endswith("]") else text):
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: expected a host name or an IP address")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid time {text!r}: expected a positive number of seconds")
    return value


def _size(text: str) -> int:
    units = {"": 1, "k": 1024, "m": 1024 ** 2}
    number, unit = text.rstrip("kKmM"), text[len(text.rstrip("kKmM")):].lower()
    try:
        value = int(number, 10) * units[unit]
    except (ValueError, KeyError):
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: expected a positive number of bytes, like 65536, 512K or 1M")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        """Bad usage: one line naming the problem (not the whole usage), exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface: the article's four flags and a few more."""
    parser = _Parser(
        prog=PROG,
        description="Forward TCP connections from a local address to a remote one.",
        epilog="Example: %(prog)s -p 8080 -r example.org -P 80  "
               "(connections to 127.0.0.1:8080 go to example.org:80)",
    )
    parser.add_argument("-l", "--local-ip", type=_host, default="127.0.0.1", metavar="ADDR",
                        help="local address to listen on, IPv4 or IPv6 (default: %(default)s; "
                             "0.0.0.0 or :: for all)")
    parser.add_argument("-p", "--local-port", type=_integer("port", 0, 65535), required=True, metavar="PORT",
                        help="local port to listen on (0 picks a free port, shown at start)")
    parser.add_argument("-r", "--remote-ip", type=_host, required=True, metavar="HOST",
                        help="remote host to forward to: a name, an IPv4 or an IPv6 address")
    parser.add_argument("-P", "--remote-port", type=_integer("port", 1, 65535), required=True, metavar="PORT",
                        help="remote port to forward to")
    parser.add_argument("--backlog", type=_integer("backlog", 0, 65535), default=DEFAULT_BACKLOG, metavar="N",
                        help="length of the listen queue, capped by net.core.somaxconn (default: %(default)s)")
    parser.add_argument("--connect-timeout", type=_seconds, default=DEFAULT_CONNECT_TIMEOUT, metavar="SECONDS",
                        help="give up connecting to the remote after this long (default: %(default)g)")
    parser.add_argument("--high-water", type=_size, default=DEFAULT_HIGH_WATER, metavar="BYTES",
                        help="stop reading from a side while this much waits for the other "
                             "(default: 512K)")
    parser.add_argument("--loop", choices=("auto",) + LOOP_KINDS, default="auto",
                        help=f"event loop: epoll's cost follows active connections; poll has no "
                             f"descriptor limit; select stops at descriptor 1023 "
                             f"(default: auto, here {best_loop_kind()})")
    parser.add_argument("--splice", action="store_true",
                        help="relay with splice() through kernel pipes instead of copying "
                             "(Linux; costs 4 more descriptors per connection)")
    parser.add_argument("--workers", type=_integer("worker count", 1, 256), default=1, metavar="N",
                        help="serve with N processes sharing the port (SO_REUSEPORT), one loop each, "
                             "supervised by this one (default: %(default)s)")
    parser.add_argument("--trace", action="store_true",
                        help="write a line to stderr for every loop round and every handler call "
                             "(slow: for learning and debugging)")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true",
                          help="log every connection: accepted, connected, closed (bytes, duration, who closed)")
    loudness.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _configure_logging(verbose: bool, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.INFO)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the forwarder until SIGINT or SIGTERM; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers > 1 and not _workers.AVAILABLE:
        parser.error("--workers above 1 needs SO_REUSEPORT and fork(), which this platform lacks")
    _configure_logging(args.verbose, args.quiet)
    if args.trace:
        from . import trace
        trace.enable(sys.stderr)
    if args.workers > 1:
        return _run_workers(args)
    try:
        fwd = _make_forwarder(args, args.local_port)
    except OSError as error:
        return _fail(error)
    return _serve(fwd, args, announce=True)


def _make_forwarder(args: argparse.Namespace, port: int, reuse_port: bool = False) -> Forwarder:
    return Forwarder(args.local_ip, port, args.remote_ip, args.remote_port, args.backlog,
                     map={}, connect_timeout=args.connect_timeout, high_water=args.high_water,
                     splice=args.splice, reuse_port=reuse_port)


def _fail(error: OSError) -> int:
    print(f"{PROG}: {error.strerror or error}", file=sys.stderr)
    return 1


def _serve(fwd: Forwarder, args: argparse.Namespace, announce: bool) -> int:
    """Serve until SIGINT/SIGTERM (handled here when in the main thread)."""

    def stop(signum: int, frame: object) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        fwd.stop()

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main_thread:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, stop)
    if announce:
        # Only now: whoever waits for this line may signal us as soon as it appears.
        log.info("forwarding %s to %s", format_address(fwd.address), fwd.rule.remote)
    try:
        fwd.serve_forever(loop=args.loop)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    log.info("stopped")
    return 0


def _run_workers(args: argparse.Namespace) -> int:
    """Check the settings once here, then fork the workers and watch them."""
    try:
        reserve = _workers.reserve_port(args.local_ip.strip("[]"), args.local_port)
    except (socket.gaierror, UnicodeError) as error:
        return _fail(OSError(errno.EINVAL, f"cannot resolve local address {args.local_ip!r}: {error}"))
    except OSError as error:
        where = format_address((args.local_ip.strip("[]"), args.local_port))
        return _fail(OSError(error.errno, f"cannot listen on {where}: {error.strerror}"))
    try:
        port = reserve.getsockname()[1]
        try:  # resolve the remote and bind once here, so that errors show before any fork
            probe = _make_forwarder(args, port, reuse_port=True)
        except OSError as error:
            return _fail(error)
        probe.close()

        def run_worker(index: int, ready: Callable[[], None]) -> int:
            reserve.close()
            log.handlers[0].setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s w{index} %(message)s"))
            fwd = _make_forwarder(args, port, reuse_port=True)
            ready()
            return _serve(fwd, args, announce=False)

        def announce() -> None:  # once every worker listens: connects are not refused from here on
            log.info("forwarding %s to %s with %d workers", format_address(probe.address), probe.rule.remote,
                     args.workers)

        status = _workers.supervise(args.workers, run_worker, announce)
    finally:
        reserve.close()
    log.info("stopped")
    return status
