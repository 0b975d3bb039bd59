"""The command's arguments: the argparse parser, the types that read its values, and its help.

The values are read by ``_values._parse``, as the config file's are; the
types here only word their errors as argparse lines (``invalid size ...``).
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, NoReturn, Optional, Tuple

from .. import __version__
from .._eventloop._loop import LOOP_KINDS, best_loop_kind
from .._net import strip_brackets
from .._values._parse import parse_host_port, parse_integer, parse_seconds, parse_size, shorten
from .._values._rules import DEFAULT_BACKLOG, DEFAULT_CONNECT_TIMEOUT, DEFAULT_HIGH_WATER

__all__ = ["DEFAULT_DRAIN_TIMEOUT", "EPILOG", "PROG", "build_parser"]

PROG = "asyncore-fwd"

#: Seconds open connections get to finish after SIGTERM/SIGINT, by default.
DEFAULT_DRAIN_TIMEOUT = 10.0

EPILOG = """\
examples:
  %(prog)s -p 8080 -r example.org -P 80
      connections to 127.0.0.1:8080 go to example.org:80
  %(prog)s -L 8080:example.org:80 -L '[::1]:5433:db.internal:5432,max_connections=50'
      two rules in one process (ssh's -L syntax, options after commas)
  %(prog)s -c /etc/asyncore-fwd.toml --check-config
      check a config file as a start would (names resolved, addresses bound),
      print its rules, defaults applied, and exit

signals:
  SIGTERM, SIGINT  stop accepting; open connections get --drain-timeout seconds
                   to finish, then are reset; a second signal stops at once,
                   resetting every connection still open
  SIGHUP           re-read the config file (-c) and apply it; a config with an
                   error, whatever it is, is logged and the running rules stay
  SIGUSR1          log one line of counters per rule

exit status:
  0  stopped by SIGTERM or SIGINT, or --check-config found no error
  1  a run-time error: address in use, permission denied, unknown host...
     (at start, or found by --check-config)
  2  bad usage or a bad config file (one line saying where and what)
"""


def _integer(what: str, lowest: int, highest: int) -> Callable[[str], int]:
    """An argparse type: a decimal integer from ``lowest`` to ``highest``."""
    def parse(text: str) -> int:
        try:
            return parse_integer(text, lowest, highest)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"invalid {what} {shorten(repr(text))}: {error}") from None
    return parse


def _host(text: str) -> str:
    if not strip_brackets(text):
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: expected a host name or an IP address")
    return text


def _seconds(text: str, zero_ok: bool = False) -> float:
    try:
        return parse_seconds(text, zero_ok)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"invalid time {shorten(repr(text))}: {error}") from None


def _seconds_or_zero(text: str) -> float:
    return _seconds(text, zero_ok=True)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"invalid size {shorten(repr(text))}: {error}") from None


def _toxic(text: str) -> Tuple[Any, str]:
    """An argparse type: a toxic spec, as (toxic, direction)."""
    from ..toxics import parse_toxic_spec
    try:
        return parse_toxic_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _trace_filter(text: str) -> str:
    """An argparse type: a trace filter, checked now, kept as written."""
    from ..trace._filter import parse_filter
    try:
        parse_filter(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _path(text: str) -> str:
    """A file name for --pidfile: "" would quietly mean no pid file at all."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file name, not an empty string")
    return text


def _metrics_address(text: str) -> Tuple[str, int]:
    """``[HOST:]PORT`` for --metrics (HOST defaults to 127.0.0.1)."""
    try:
        return parse_host_port(text, 0, default_host="127.0.0.1")
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid address {shorten(repr(text))}: expected [HOST:]PORT, like 9100 or "
                                         f"127.0.0.1:9100 ([::1]:9100 for IPv6)") from None


class _Given(argparse.Action):
    """Store the value and remember the flag was given (-l has a default, yet cannot go with -L)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.one_rule_flags = getattr(namespace, "one_rule_flags", []) + [self.option_strings[0]]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Bad usage: one line naming the problem (not the whole usage), exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface: the article's four flags, -L and -c, and the rest."""
    parser = _Parser(
        prog=PROG,
        usage="%(prog)s -p PORT -r HOST -P PORT [options]\n"
              "       %(prog)s [-L SPEC ...] [-c FILE] [options]",
        description="Forward TCP connections from local addresses to remote ones.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    one = parser.add_argument_group("one rule (the article's flags)")
    one.add_argument("-l", "--local-ip", type=_host, default="127.0.0.1", metavar="ADDR", action=_Given,
                     help="local address to listen on, IPv4 or IPv6 (default: %(default)s; "
                          "0.0.0.0 or :: for all)")
    one.add_argument("-p", "--local-port", type=_integer("port", 0, 65535), metavar="PORT", action=_Given,
                     help="local port to listen on (0 picks a free port, shown at start)")
    one.add_argument("-r", "--remote-ip", type=_host, metavar="HOST", action=_Given,
                     help="remote host to forward to: a name, an IPv4 or an IPv6 address")
    one.add_argument("-P", "--remote-port", type=_integer("port", 1, 65535), metavar="PORT", action=_Given,
                     help="remote port to forward to")
    many = parser.add_argument_group("many rules")
    many.add_argument("-L", "--forward", action="append", default=[], metavar="SPEC",
                      help="a rule as [BIND:]PORT:HOST:HOSTPORT[,key=value...] (BIND defaults to 127.0.0.1; "
                           "IPv6 in brackets; keys as in a config file); repeat for more rules")
    many.add_argument("-c", "--config", metavar="FILE",
                      help="read rules from a TOML file: an optional [defaults] table and one [[rule]] "
                           "table per rule (SIGHUP re-reads it)")
    many.add_argument("--check-config", action="store_true",
                      help="check the rules as a start would (resolving names, binding addresses), print "
                           "them, one line each with every setting, and exit (1 where a start would fail, "
                           "2 on a config error; an address in use is only a note)")
    tuning = parser.add_argument_group("settings (defaults for every rule)")
    tuning.add_argument("--backlog", type=_integer("backlog", 0, 65535), default=DEFAULT_BACKLOG, metavar="N",
                        help="length of the listen queue, capped by net.core.somaxconn (default: %(default)s)")
    tuning.add_argument("--connect-timeout", type=_seconds, default=DEFAULT_CONNECT_TIMEOUT, metavar="SECONDS",
                        help="give up connecting to the remote after this long (default: %(default)g)")
    tuning.add_argument("--high-water", type=_size, default=DEFAULT_HIGH_WATER, metavar="BYTES",
                        help="stop reading from a side while this much waits for the other: 65536, 512K, "
                             "1M, 1G (default: 1M)")
    process = parser.add_argument_group("the process")
    process.add_argument("--loop", choices=("auto",) + LOOP_KINDS, default="auto",
                         help=f"event loop: epoll's cost follows active connections; poll has no "
                              f"descriptor limit; select refuses clients past descriptor 1023 "
                              f"(default: auto, here {best_loop_kind()})")
    process.add_argument("--splice", action="store_true",
                         help="relay with splice() through kernel pipes instead of copying "
                              "(Linux; costs 4 more descriptors per connection)")
    process.add_argument("--workers", type=_integer("worker count", 1, 256), default=1, metavar="N",
                         help="serve with N processes sharing the ports (SO_REUSEPORT), one loop each, "
                              "supervised by this one (default: %(default)s)")
    process.add_argument("--drain-timeout", type=_seconds_or_zero, default=DEFAULT_DRAIN_TIMEOUT,
                         metavar="SECONDS",
                         help="on SIGTERM/SIGINT, give open connections this long to finish, then cut them "
                              "(0: at once; default: %(default)g)")
    process.add_argument("--metrics", type=_metrics_address, metavar="[HOST:]PORT",
                         help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST defaults to "
                              "127.0.0.1; with --workers, the sums over the workers, up to 1 s old)")
    process.add_argument("--pidfile", type=_path, metavar="PATH",
                         help="write the process id there once listening (refused if it names a running "
                              "process); removed at exit")
    process.add_argument("--toxic", type=_toxic, action="append", default=[], metavar="SPEC",
                         help="inject a fault into every connection, for experiments: "
                              "[DIRECTION:]NAME[=VALUE][,KEY=VALUE...], e.g. downstream:latency=100ms,jitter=10ms "
                              "(latency, bandwidth, slicer, timeout, limit_data, reset_peer, slow_close); repeatable")
    process.add_argument("--trace", action="store_true",
                         help="write a line to stderr for every loop round and every handler call "
                              "(slow: for learning and debugging)")
    process.add_argument("--trace-format", choices=("text", "jsonl"), default="text",
                         help="with --trace: lines of text, or one JSON object per event, for the trace viewer "
                              "(default: text)")
    process.add_argument("--trace-times", action="store_true",
                         help="with --trace: begin each text line with its time offset, +SECONDS")
    process.add_argument("--trace-filter", type=_trace_filter, metavar="TERMS",
                         help="with --trace: only these dispatchers, comma-separated: NAME (a class), NAME#N, "
                              "fdN, no-listener; e.g. Receiver#1,fd8")
    logs = parser.add_argument_group("logs (to stderr)")
    logs.add_argument("--log-format", choices=("text", "json"), default="text",
                      help="text: time level message; json: one JSON object per line (default: text)")
    loudness = logs.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true",
                          help="log every connection: accepted, connected, closed (bytes, duration, who closed)")
    loudness.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.set_defaults(one_rule_flags=[])
    return parser
