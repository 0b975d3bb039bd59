"""``main()``: parse the arguments, load the rules, then check them (``--check-config``) or serve them.

Exit status: 0 after SIGINT/SIGTERM (or a clean --check-config), 1 for a
run-time error, 2 for bad usage or a bad config.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
from typing import Callable, Optional, Sequence

from .._net import describe_error
from .._service import _pidfile, _workers
from .._values._config import ConfigError, describe_rule
from .._values._rules import Rule
from ._logging import configure_logging, quiet
from ._parser import PROG, build_parser
from ._rules import FlagError, load_rules, one_rule
from ._run import fail, run_workers, serve

__all__ = ["main"]


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
        except FlagError as error:
            parser.error(str(error))
        except ConfigError as error:
            return _config_error(error)
        forward_rules = rules[:len(args.forward)]  # they come first; a reload reads only the file again
    else:
        forward_rules = []
        rules = [one_rule(parser, args)]
    if args.workers > 1 and not _workers.AVAILABLE:
        parser.error("--workers above 1 needs SO_REUSEPORT and fork(), which this platform lacks")
    if args.toxic and args.splice:
        parser.error("--toxic needs the copy relay: with --splice the bytes never enter Python")
    udp_rules = [rule.label for rule in rules if rule.proto == "udp"]
    if args.toxic and udp_rules:
        return _config_error(ConfigError(f"--toxic: toxics act on TCP connections, not on a UDP rule's "
                                         f"datagrams (proto=udp: {', '.join(udp_rules)})"))
    if args.check_config:
        try:
            _try_start(args, rules)
        except (OSError, ValueError) as error:
            return fail(error)
        for rule in rules:
            print(describe_rule(rule))
        return 0
    configure_logging(args)
    if args.pidfile:
        try:
            _pidfile.check(args.pidfile)  # before binding: "running already" rather than "address in use"
        except OSError as error:
            return fail(error)
    if not args.trace:
        if args.workers > 1:
            return run_workers(args, rules, forward_rules)
        return serve(args, rules, lambda: load_rules(args, forward_rules), pidfile=args.pidfile)
    from .. import trace
    trace.enable(sys.stderr, format=args.trace_format, times=args.trace_times, summary=True,
                 only=args.trace_filter)
    try:
        if args.workers > 1:
            return run_workers(args, rules, forward_rules)
        return serve(args, rules, lambda: load_rules(args, forward_rules), pidfile=args.pidfile)
    finally:
        trace.disable()  # the summary, at the end


def _try_start(args: argparse.Namespace, rules: Sequence[Rule]) -> None:
    """Resolve and bind what a start would, rule by rule, then let go: --check-config fails
    where a start would (an unknown host, an address not local), with the same line.

    An address in use is only noted: on the host of a running forwarder its own ports
    are, and the check before its reload must pass there.
    """
    from .._service._metrics import MetricsServer
    from .._service._service import Service

    def starts(start: Callable[[], Service], elsewhere: Optional[Callable[[], Service]] = None) -> None:
        try:
            with quiet():  # no start lines, no warnings: they are the start's to log
                start().close()
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            print(f"{PROG}: note: {describe_error(error)} (a start now would fail there)", file=sys.stderr)
            if elsewhere is not None:  # the rest of the rule (its remote's name) is checked all the same
                with quiet():
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
    """Say what is wrong with the config in one line on stderr; the exit status of a bad config."""
    print(f"{PROG}: error: {error}", file=sys.stderr)
    return 2
