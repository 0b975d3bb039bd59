"""The command's rules: from ``-L`` flags and a config file (``-c``), or from the article's one-rule flags.

The flags' settings are the base every rule starts from; ``_values._config``
reads the specs and the file over it.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional, Sequence

from .._net import describe_error
from .._values._config import ConfigError, check_unique, load_config, parse_forward_spec, rule_defaults
from .._values._parse import is_decimal, show_value
from .._values._rules import Rule

__all__ = ["FlagError", "load_rules", "one_rule"]


def _base(args: argparse.Namespace) -> Dict[str, Any]:
    """What every rule starts from: the flags; a config's [defaults] and the rule's own keys go over it."""
    return rule_defaults(backlog=args.backlog, connect_timeout=args.connect_timeout, high_water=args.high_water,
                         splice=args.splice)


class FlagError(ConfigError):
    """A ``-L`` flag that cannot be used: bad usage, so its line points at --help."""


def load_rules(args: argparse.Namespace, forward_rules: Optional[Sequence[Rule]] = None) -> List[Rule]:
    """The rules of -L (parsed now unless given) and of -c (read now); ConfigError if any is
    wrong or two collide (FlagError for a -L flag).

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
                    raise FlagError(f"{place}: {error}") from None
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
        kind = ConfigError if place == args.config else FlagError
        raise kind(f"{place}: cannot be read: {describe_error(error)}") from error
    return rules


def one_rule(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Rule:
    """The rule of the article's flags (-l -p -r -P); a usage error if one is missing or looks swapped."""
    missing = [flag for flag, value in (("-p/--local-port", args.local_port), ("-r/--remote-ip", args.remote_ip),
                                        ("-P/--remote-port", args.remote_port)) if value is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} (or give rules with -L or -c)")
    if is_decimal(args.local_ip):
        parser.error(f"-l takes an address; did you mean -p {args.local_ip}?")
    if is_decimal(args.remote_ip):
        parser.error(f"-r takes a host; did you mean -P {args.remote_ip}?")
    return Rule(args.local_ip, args.local_port, args.remote_ip, args.remote_port, **_base(args))
