"""The ``asyncore-fwd`` command: argument parsing, logging set-up, signals.

Kept apart from the library: nothing here is needed to embed a ``Forwarder``
or a ``Service``.  The rules come from the article's one-rule flags
(``-l -p -r -P``), or from any number of ``-L`` flags and a config file
(``-c``); ``_config`` parses those.  Exit status: 0 after SIGINT/SIGTERM, 1
for a run-time error (address in use, permission denied, unknown host), 2
for bad usage or a bad config.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import errno
import json
import logging
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

from . import __version__
from ._eventloop._loop import LOOP_KINDS, best_loop_kind, check_select_limit, open_loop
from ._net import describe_error, format_address, strip_brackets
from ._service import _pidfile, _workers
from ._values._config import ConfigError, check_unique, describe_rule, load_config, parse_forward_spec, rule_defaults
from ._values._parse import (
    is_decimal,
    parse_host_port,
    parse_integer,
    parse_seconds,
    parse_size,
    shorten,
    show_value,
)
from ._values._rules import DEFAULT_BACKLOG, DEFAULT_CONNECT_TIMEOUT, DEFAULT_HIGH_WATER, Rule

PROG = "asyncore-fwd"
log = logging.getLogger("asyncore_fwd")

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
    from .toxics import parse_toxic_spec
    try:
        return parse_toxic_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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


# -- logging -------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, event, message, then the event's details."""

    def __init__(self, **fixed: Any) -> None:
        super().__init__()
        self.fixed = fixed

    def format(self, record: logging.LogRecord) -> str:
        entry: Dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
                                     .isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", None) or "log",
            "message": record.getMessage(),
            **self.fixed,
        }
        details = getattr(record, "details", None)
        if isinstance(details, dict):
            entry.update(details)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _QuietDrains(logging.Filter):
    """Hide a drain's two lines when it had no connection to wait for: the signal's line says it all."""

    def __init__(self) -> None:
        super().__init__()
        self.idle_drain = False

    def filter(self, record: logging.LogRecord) -> bool:
        details = getattr(record, "details", None)
        if getattr(record, "event", None) != "drain" or not isinstance(details, dict):
            return True
        if "open" in details:
            self.idle_drain = details["open"] == 0
            return not self.idle_drain
        return not (self.idle_drain and details.get("cut") == 0)


def _configure_logging(args: argparse.Namespace, worker: Optional[int] = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if args.log_format == "json":
        handler.setFormatter(JsonFormatter(**({} if worker is None else {"worker": worker})))
    else:
        tag = "" if worker is None else f"w{worker} "
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(message)s"))
    handler.addFilter(_QuietDrains())
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO)


# -- rules ----------------------------------------------------------------


def _base(args: argparse.Namespace) -> Dict[str, Any]:
    """What every rule starts from: the flags; a config's [defaults] and the rule's own keys go over it."""
    return rule_defaults(backlog=args.backlog, connect_timeout=args.connect_timeout, high_water=args.high_water,
                         splice=args.splice)


class _FlagError(ConfigError):
    """A ``-L`` flag that cannot be used: bad usage, so its line points at --help."""


def load_rules(args: argparse.Namespace, forward_rules: Optional[Sequence[Rule]] = None) -> List[Rule]:
    """The rules of -L (parsed now unless given) and of -c (read now); ConfigError if any is
    wrong or two collide (_FlagError for a -L flag).

    The one place rules are loaded -- at start, for --check-config, and on each SIGHUP in the
    supervisor and in every worker -- so the one place that makes whatever a config raises a
    ConfigError: a value no check foresaw is one error line, never the end of a running forwarder.
    """
    places = [f"-L {show_value(spec)}" for spec in args.forward]
    place = "-L"
    try:
        if forward_rules is None:
            forward_rules = []
            for place, spec in zip(places, args.forward):
                try:
                    forward_rules.append(parse_forward_spec(spec, _base(args)))
                except ConfigError as error:
                    raise _FlagError(f"{place}: {error}") from None
        rules = list(forward_rules)
        if args.config:
            place = args.config
            from_file = load_config(args.config, _base(args))
            rules += from_file
            places += [f"{args.config}: rule {index}" + (f" ({show_value(rule.name)})" if rule.name else "")
                       for index, rule in enumerate(from_file, 1)]
        check_unique(rules, places)
    except ConfigError:
        raise
    except Exception as error:
        kind = ConfigError if place == args.config else _FlagError
        raise kind(f"{place}: cannot be read: {describe_error(error)}") from error
    return rules


def _one_rule(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Rule:
    missing = [flag for flag, value in (("-p/--local-port", args.local_port), ("-r/--remote-ip", args.remote_ip),
                                        ("-P/--remote-port", args.remote_port)) if value is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} (or give rules with -L or -c)")
    if is_decimal(args.local_ip):
        parser.error(f"-l takes an address; did you mean -p {args.local_ip}?")
    if is_decimal(args.remote_ip):
        parser.error(f"-r takes a host; did you mean -P {args.remote_ip}?")
    return Rule(args.local_ip, args.local_port, args.remote_ip, args.remote_port, **_base(args))


# -- main ---------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the rules until SIGINT or SIGTERM; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.forward or args.config:
        if args.one_rule_flags:
            parser.error(f"{'/'.join(sorted(set(args.one_rule_flags), key=args.one_rule_flags.index))} "
                         f"cannot be combined with -L or -c: give every rule with -L or in the config file")
        try:
            rules = load_rules(args)
        except _FlagError as error:
            parser.error(str(error))
        except ConfigError as error:
            return _config_error(error)
        forward_rules = rules[:len(args.forward)]  # they come first; a reload reads only the file again
    else:
        forward_rules = []
        rules = [_one_rule(parser, args)]
    if args.workers > 1 and not _workers.AVAILABLE:
        parser.error("--workers above 1 needs SO_REUSEPORT and fork(), which this platform lacks")
    if args.toxic and args.splice:
        parser.error("--toxic needs the copy relay: with --splice the bytes never enter Python")
    if args.check_config:
        try:
            _try_start(args, rules)
        except (OSError, ValueError) as error:
            return _fail(error)
        for rule in rules:
            print(describe_rule(rule))
        return 0
    _configure_logging(args)
    if args.pidfile:
        try:
            _pidfile.check(args.pidfile)  # before binding: "running already" rather than "address in use"
        except OSError as error:
            return _fail(error)
    if args.trace:
        from . import trace
        trace.enable(sys.stderr)
    if args.workers > 1:
        return _run_workers(args, rules, forward_rules)
    return _serve(args, rules, lambda: load_rules(args, forward_rules), pidfile=args.pidfile)


def _try_start(args: argparse.Namespace, rules: Sequence[Rule]) -> None:
    """Resolve and bind what a start would, rule by rule, then let go: --check-config fails
    where a start would (an unknown host, an address not local), with the same line.

    An address in use is only noted: on the host of a running forwarder its own ports
    are, and the check before its reload must pass there.
    """
    from ._service._metrics import MetricsServer
    from ._service._service import Service

    def starts(start: Callable[[], Service], elsewhere: Optional[Callable[[], Service]] = None) -> None:
        try:
            with _quiet():  # no start lines, no warnings: they are the start's to log
                start().close()
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            print(f"{PROG}: note: {describe_error(error)} (a start now would fail there)", file=sys.stderr)
            if elsewhere is not None:  # the rest of the rule (its remote's name) is checked all the same
                with _quiet():
                    elsewhere().close()

    def metrics() -> Service:
        service = Service([], map={})
        MetricsServer(service, *args.metrics)  # closed with the service
        return service

    for rule in rules:
        starts(lambda: Service([rule], map={}),  # noqa: B023 (called at once, not later)
               lambda: Service([dataclasses.replace(rule, local_port=0)], map={}))  # noqa: B023
    if args.metrics:
        starts(metrics)


def _config_error(error: ConfigError) -> int:
    print(f"{PROG}: error: {error}", file=sys.stderr)
    return 2


def _fail(error: BaseException) -> int:
    print(f"{PROG}: {describe_error(error)}", file=sys.stderr)
    return 1


def _logging_errors(handler: Callable[[int, Any], None]) -> Callable[[int, Any], None]:
    """``handler``, logging what it raises instead of raising it.

    A signal handler runs wherever the main thread happens to be: an exception
    from it would unwind ``serve_forever``, or end the connection whose handler
    it interrupted.  What it raises is a bug; the service goes on.
    """
    def run(signum: int, frame: Any) -> None:
        try:
            handler(signum, frame)
        except Exception:
            log.exception("%s: internal error; still serving", signal.Signals(signum).name)
    return run


class _Signals:
    """The process's signal handlers while it serves (main thread only).

    Every action they take on the service only records a request, which the
    service's loop carries out between two rounds (``Service`` promises
    that), so they are safe at any point of the loop.
    """

    def __init__(self, args: argparse.Namespace, reread: Optional[Callable[[], List[Rule]]],
                 worker: bool) -> None:
        self.args, self.reread, self.worker = args, reread, worker
        self.service: Any = None
        self.stop_signals: List[int] = []
        self.previous: Dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        # A worker leaves SIGINT to the supervisor: Ctrl-C reaches the whole
        # process group, and the supervisor passes it on as SIGTERM.
        stops = (signal.SIGTERM,) if self.worker else (signal.SIGINT, signal.SIGTERM)
        for signum in stops:
            self.previous[signum] = signal.signal(signum, _logging_errors(self.stop))
        self.previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, _logging_errors(self.hangup))
        self.previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, _logging_errors(self.stats))
        if self.worker:
            self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def stop(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        self.stop_signals.append(signum)
        if len(self.stop_signals) > 1:
            if not self.worker:
                log.info("%s again: stopping at once", name,
                         extra={"event": "drain", "details": {"signal": name, "timeout_s": 0}})
            if self.service is not None:
                self.service.stop()
            return
        timeout = self.args.drain_timeout
        if not self.worker:  # with --workers the supervisor has said it
            log.info("%s: stopping; open connections get %g s to finish (%s again: at once)", name, timeout, name,
                     extra={"event": "drain", "details": {"signal": name, "timeout_s": timeout}})
        if self.service is not None:
            self.service.drain(timeout)

    def hangup(self, signum: int, frame: object) -> None:
        if self.service is None:
            return
        if self.reread is None or not self.args.config:
            log.info("SIGHUP: nothing to re-read (the rules come from -L, not from a config file)",
                     extra={"event": "reload", "details": {"ignored": True}})
            return
        try:
            rules = self.reread()
        except ConfigError as error:
            log.error("SIGHUP: %s; the running rules stay", error,
                      extra={"event": "reload", "details": {"error": str(error)}})
            return
        if not self.worker:
            log.info("SIGHUP: re-read %s: %d rules", self.args.config, len(rules),
                     extra={"event": "reload", "details": {"config": self.args.config, "rules": len(rules)}})
        self.service.reload(rules)

    def stats(self, signum: int, frame: object) -> None:
        if self.service is not None:
            self.service.log_stats()


def _serve(args: argparse.Namespace, rules: Sequence[Rule], reread: Optional[Callable[[], List[Rule]]],
           pidfile: Optional[str] = None, worker: bool = False,
           ready: Optional[Callable[[], None]] = None,
           attach: Optional[Callable[[Any], None]] = None) -> int:
    """Serve ``rules`` until SIGINT/SIGTERM and the drain; return the exit status.
    ``attach(service)`` runs once the service is made (a worker's ``StatsReporter``)."""
    from ._service._service import Service

    signals = _Signals(args, reread, worker)
    # Handlers first: the start lines are what a caller waits for before signalling.
    signals.install()
    written_pidfile = None
    try:
        try:
            service = Service(rules, map={}, toxics=args.toxic)
        except (OSError, ValueError) as error:
            return _fail(error)
        signals.service = service
        if attach is not None:
            attach(service)
        try:
            if args.metrics and not worker:
                from ._service._metrics import MetricsServer

                metrics = MetricsServer(service, *args.metrics)  # closed with the service
                log.info("metrics at http://%s/metrics", format_address(metrics.address))
            if args.loop == "select":  # from here on the loop refuses what it cannot watch
                check_select_limit(service.map)
            if pidfile:
                _pidfile.claim(pidfile)
                written_pidfile = pidfile
        except OSError as error:
            service.close()
            return _fail(error)
        if signals.stop_signals:  # came while binding: drain what never served
            service.drain(0 if len(signals.stop_signals) > 1 else args.drain_timeout)
        if ready is not None:
            ready()
        service.serve_forever(loop=args.loop)
    finally:
        signals.restore()
        if written_pidfile:
            _pidfile.release(written_pidfile)
    return 0


def _run_workers(args: argparse.Namespace, rules: List[Rule], forward_rules: List[Rule]) -> int:
    """Check the settings once here, then fork the workers and watch them; with
    --metrics, serve the sums of the workers' counters from here."""
    from ._service._metrics import REPORT_INTERVAL, MetricsServer, StatsReporter, WorkerStats
    from ._service._service import Service

    reserves = _workers.Reservations()
    written_pidfile: List[str] = []
    totals: Optional[WorkerStats] = None
    try:
        try:
            rules = reserves.hold(rules)
            # Resolve the remotes and bind once here, so that errors show before any fork.
            with _quiet():
                Service(rules, map={}).close()
            if args.metrics:
                totals = WorkerStats()
                metrics = MetricsServer(totals, *args.metrics)  # closed with totals
        except (OSError, ValueError) as error:
            return _fail(error)
        current = {"rules": rules}

        def run_worker(index: int, ready: Callable[[], None], lifeline: int) -> int:
            reserves.close()
            _configure_logging(args, worker=index)
            report_to = totals.worker_end() if totals is not None else None  # (closes the supervisor's ends)

            def attach(service: Any) -> None:
                if report_to is not None:
                    StatsReporter(service, report_to, index)  # closed with the service
                service.attachments.append(
                    _workers.SupervisorWatch(lifeline, service.map, lambda: supervisor_gone(service)))

            def supervisor_gone(service: Any) -> None:
                """Killed (a SIGKILL leaves it no time to stop us): drain, then exit, freeing the port."""
                log.warning("the supervisor is gone: stopping; open connections get %g s to finish",
                            args.drain_timeout, extra={"event": "drain", "details": {
                                "reason": "supervisor gone", "timeout_s": args.drain_timeout}})
                service.drain(args.drain_timeout)

            # The worker re-reads on SIGHUP after the parent checked the file:
            # with the ports the parent holds (known at the fork).
            return _serve(args, current["rules"], lambda: reserves.apply(load_rules(args, forward_rules)),
                          worker=True, ready=ready, attach=attach)

        def hangup() -> bool:
            """SIGHUP: check the config here (one error line, not one per worker); True to pass it on."""
            if not args.config:
                log.info("SIGHUP: nothing to re-read (the rules come from -L, not from a config file)",
                         extra={"event": "reload", "details": {"ignored": True}})
                return False
            try:
                current["rules"] = reserves.hold(load_rules(args, forward_rules))  # for workers started later
            except (ConfigError, OSError) as error:
                log.error("SIGHUP: %s; the running rules stay", describe_error(error),
                          extra={"event": "reload", "details": {"error": describe_error(error)}})
                return False
            except Exception:  # a bug: the workers keep their rules, and the supervisor goes on
                log.exception("SIGHUP: internal error; the running rules stay", extra={"event": "reload"})
                return False
            details = {"config": args.config, "rules": len(current["rules"]), "workers": args.workers}
            log.info("SIGHUP: re-read %s: %d rules; reloading %d workers", args.config, len(current["rules"]),
                     args.workers, extra={"event": "reload", "details": details})
            return True

        def announce() -> None:  # once every worker listens: connects are not refused from here on
            for rule in rules:
                details = {"rule": rule.label, "listen": rule.listen, "target": rule.remote, "workers": args.workers}
                log.info("%s: forwarding %s to %s with %d workers", rule.label, rule.listen, rule.remote,
                         args.workers, extra={"event": "start", "details": details})
            if totals is not None:
                log.info("metrics at http://%s/metrics (the workers' sums, up to %g s old)",
                         format_address(metrics.address), REPORT_INTERVAL)

        idle, on_exit = time.sleep, None
        if totals is not None:
            # poll(), not epoll: a worker forked from here closes these sockets, and
            # epoll registrations would be shared with it, through the inherited epoll.
            idle, on_exit = open_loop("poll", totals.map).poll, totals.worker_exited
        if args.pidfile:  # the supervisor's pid, before any worker: a failure here serves nothing
            try:
                _pidfile.claim(args.pidfile)
            except OSError as error:
                return _fail(error)
            written_pidfile.append(args.pidfile)
        return _workers.supervise(args.workers, run_worker, announce, drain_timeout=args.drain_timeout,
                                  on_hangup=hangup, idle=idle, on_exit=on_exit)
    finally:
        if totals is not None:
            totals.close()
        reserves.close()
        for path in written_pidfile:
            _pidfile.release(path)


class _quiet:
    """Silence the package's lines below ERROR for a moment: the probe's start lines and
    warnings, which every worker logs again (its errors are exceptions)."""

    def __enter__(self) -> None:
        self.level = log.level
        log.setLevel(max(self.level, logging.ERROR))

    def __exit__(self, *exc: object) -> None:
        log.setLevel(self.level)
