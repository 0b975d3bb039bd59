"""Rules from text: the ``-L`` syntax and the TOML config file.

Strategy: every value is checked here, before a ``Rule`` is made, so that an
error can name where it came from -- the file, the rule (its name or its
index), the key and the value as written -- in one line.  The values are read
by ``_parse``, as the command's flags are.  ``Rule`` checks again; its
``ValueError`` shows up here only for keys that must agree (a ``source``
of another family than the target's).

A config file has an optional ``[defaults]`` table and one ``[[rule]]`` table
per rule::

    [defaults]
    connect_timeout = 5
    allow = ["10.0.0.0/8", "::1"]

    [[rule]]
    name = "web"
    listen = "127.0.0.1:8080"
    connect = ["example.org:80", "example.net:80"]
    idle_timeout = 300

A ``-L`` flag is ssh's ``[BIND:]PORT:HOST:HOSTPORT`` followed by the same
keys as ``,key=value`` options, a list key repeated once per entry:
``-L 8080:example.org:80,name=web,allow=10.0.0.0/8,allow=::1``.  There,
``HOST:HOSTPORT`` is the first target and each ``connect=HOST:PORT`` option
adds one.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .._net import format_address
from ._parse import (
    BadValue,
    format_size,
    parse_host_port,
    parse_integer,
    parse_ip_address,
    parse_seconds,
    parse_size,
    shorten,
    show_value,
)
from ._rules import (
    BALANCES,
    DEFAULT_BACKLOG,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HIGH_WATER,
    MAX_KEEPALIVE,
    PROTOS,
    PROXY_VERSIONS,
    Rule,
    repeated_target,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["ConfigError", "KEYS", "check_unique", "describe_rule", "load_config", "parse_forward_spec",
           "rule_defaults"]

#: Where ``-L`` listens when it names no address (as ssh does).
DEFAULT_BIND = "127.0.0.1"
_NAME = re.compile(r"[A-Za-z0-9_.-]+\Z")


class ConfigError(ValueError):
    """A rule that cannot be used, described in one line (where, key, value)."""


def _show_key(key: str) -> str:
    """A key as written: bare if it can be, else quoted (a quoted TOML key may hold a line break)."""
    return shorten(key) if _NAME.match(key) else show_value(key)


# -- one value per key ---------------------------------------------------


def _count(value: object) -> int:
    """A limit: a count, where 0 means none."""
    try:
        return parse_integer(value, 0)
    except BadValue:
        raise BadValue("expected an integer >= 0 (0 = no limit)") from None


def _name(value: object) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise BadValue("expected a name of letters, digits, '_', '.' and '-'")
    return value


def _network(value: object) -> str:
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_network(value[1:-1] if value.startswith("[") else value, strict=False))
        except ValueError:
            pass
    raise BadValue("expected an address or a network, like 10.0.0.0/8, 192.0.2.7 or ::1")


def _proxy_version(value: object) -> Optional[str]:
    """A PROXY protocol version to send, or None for "none" (a rule's way out of ``[defaults]``'s)."""
    if value == "none":
        return None
    if isinstance(value, str) and value in PROXY_VERSIONS:
        return value
    raise BadValue('expected "v1", "v2" or "none"')


def _proto(value: object) -> str:
    if isinstance(value, str) and value in PROTOS:
        return value
    raise BadValue('expected "tcp" or "udp"')


def _balance(value: object) -> str:
    if isinstance(value, str) and value in BALANCES:
        return value
    raise BadValue('expected "first", "roundrobin" or "leastconn"')


#: Every key a rule takes, with what checks and converts its value.
_PARSERS: Dict[str, Callable[[object], Any]] = {
    "name": _name,
    "listen": lambda value: parse_host_port(value, 0),
    "connect": lambda value: parse_host_port(value, 1),
    "allow": _network,
    "deny": _network,
    "max_connections": _count,
    "max_per_client": _count,
    "connect_timeout": parse_seconds,
    "idle_timeout": lambda value: parse_seconds(value, zero_ok=True),
    "half_closed_timeout": lambda value: parse_seconds(value, zero_ok=True),
    "backlog": lambda value: parse_integer(value, 0, 65535),
    "high_water": parse_size,
    "send_proxy": _proxy_version,
    "balance": _balance,
    "max_fails": lambda value: parse_integer(value, 0),
    "fail_timeout": parse_seconds,
    "health_check_interval": lambda value: parse_seconds(value, zero_ok=True),
    "accept_proxy": _network,
    "proto": _proto,
    "source": lambda value: None if value == "none" else parse_ip_address(value),  # "none": unset [defaults]'s
    "tcp_keepalive": lambda value: parse_seconds(value, zero_ok=True, highest=MAX_KEEPALIVE),
}
KEYS = tuple(_PARSERS)
#: Keys whose value is a list (one entry, or several; in ``-L``, the key repeated once per entry).
_LISTS = ("connect", "allow", "deny", "accept_proxy")
_LIST_OF = {"connect": '"host:port"', "allow": "addresses or networks", "deny": "addresses or networks",
            "accept_proxy": "addresses or networks"}
#: Keys that only a rule may have: each rule has its own.
_OWN = ("name", "listen", "connect")


def rule_defaults(backlog: int = DEFAULT_BACKLOG, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                  high_water: int = DEFAULT_HIGH_WATER, **fields: Any) -> Dict[str, Any]:
    """The base every rule starts from (the command line's flags fill it)."""
    return dict(fields, backlog=backlog, connect_timeout=connect_timeout, high_water=high_water)


def _check(key: str, value: object) -> Any:
    """``value`` checked and converted for ``key``; raises ConfigError naming both."""
    parser = _PARSERS.get(key)
    if parser is None:
        raise ConfigError(f"{_show_key(key)}: unknown key (known: {', '.join(KEYS)})")
    if key in _LISTS:
        entries = [value] if isinstance(value, str) else value
        if not isinstance(entries, list):
            raise ConfigError(f"{key}: expected a list of {_LIST_OF[key]}, got {show_value(value)}")
        if key == "connect" and not entries:
            raise ConfigError(f'{key}: expected "host:port" or a list of at least one, got {show_value(value)}')
        checked = []
        for entry in entries:
            try:
                checked.append(parser(entry))
            except BadValue as error:
                raise ConfigError(f"{key}: {error}, got {show_value(entry)}") from None
        return tuple(checked)
    try:
        return parser(value)
    except BadValue as error:
        raise ConfigError(f"{key}: {error}, got {show_value(value)}") from None


def _make_rule(settings: Mapping[str, Any], base: Mapping[str, Any]) -> Rule:
    """A Rule from checked ``settings`` over ``base`` (``listen`` and ``connect`` required)."""
    for key in ("listen", "connect"):
        if key not in settings:
            raise ConfigError(f'{key}: missing (expected "host:port")')
    repeated = repeated_target(settings["connect"])  # (with -L, the list is whole only now)
    if repeated is not None:
        raise ConfigError(f"connect: {show_value(format_address(repeated))} is listed twice (each target once)")
    fields = dict(base)
    for key, value in settings.items():
        if key == "listen":
            fields["local_host"], fields["local_port"] = value
        elif key == "connect":  # the first target, then the others
            (fields["remote_host"], fields["remote_port"]), fields["targets"] = value[0], value[1:]
        else:
            fields[key] = value
    try:
        return Rule(**fields)
    except ValueError as error:  # keys that do not go together (a source not of the target's family)
        raise ConfigError(str(error)) from None


# -- -L ---------------------------------------------------------------------


def _split_colons(text: str) -> List[str]:
    """``["::1", "8080", "h", "80"]`` for ``[::1]:8080:h:80``: colons inside brackets are kept."""
    parts: List[str] = []
    rest = text
    while True:
        if rest.startswith("["):
            end = rest.find("]")
            if end < 0 or (end + 1 < len(rest) and rest[end + 1] != ":"):
                raise BadValue("")
            parts.append(rest[1:end])
            rest = rest[end + 1:]
            if not rest:
                return parts
            rest = rest[1:]
        else:
            part, colon, rest = rest.partition(":")
            parts.append(part)
            if not colon:
                return parts


def parse_forward_spec(text: str, base: Optional[Mapping[str, Any]] = None) -> Rule:
    """A Rule from ``[BIND:]PORT:HOST:HOSTPORT[,key=value...]`` (ssh's -L syntax).

    ``BIND`` defaults to 127.0.0.1; IPv6 addresses go in brackets.  The
    options are the config file's keys; a list key is repeated once per
    entry.  ``base`` gives the values of keys not set (the built-in defaults
    if omitted).  Raises ConfigError with a one-line message.
    """
    address, _, options = text.partition(",")
    try:
        parts = _split_colons(address)
        if len(parts) == 3:
            parts.insert(0, DEFAULT_BIND)
        if len(parts) != 4 or not all(parts):
            raise BadValue("")
    except BadValue:
        raise ConfigError(f"expected [BIND:]PORT:HOST:HOSTPORT[,key=value...] with IPv6 addresses in "
                          f"brackets, got {show_value(address)}") from None
    bind, port, host, host_port = parts
    settings: Dict[str, Any] = {
        "listen": _check("listen", f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"),
        "connect": _check("connect", f"[{host}]:{host_port}" if ":" in host else f"{host}:{host_port}"),
    }
    for option in options.split(",") if options else ():
        key, equals, value = option.partition("=")
        if not equals:
            raise ConfigError(f"expected key=value after the address, got {show_value(option)}")
        if key == "listen":
            raise ConfigError(f"{key}: given by [BIND:]PORT:HOST:HOSTPORT, not as an option")
        checked = _check(key, value)
        if key in _LISTS:
            settings[key] = settings.get(key, ()) + checked
        elif key in settings:
            raise ConfigError(f"{key}: given twice, got {show_value(value)}")
        else:
            settings[key] = checked
    return _make_rule(settings, rule_defaults() if base is None else base)


# -- the config file ----------------------------------------------------------


def _rule_place(index: int, table: Mapping[str, Any]) -> str:
    name = table.get("name")
    return f"rule {index} ({show_value(name)})" if isinstance(name, str) and name else f"rule {index}"


def _syntax_error(path: str, error: Exception) -> ConfigError:
    """``fwd.toml:3: ...`` for a TOML syntax error (its line, where the parser says it)."""
    message = str(error)
    line = getattr(error, "lineno", None)
    if line is None:
        found = re.search(r"\(at line (\d+), column \d+\)", message)
        line = int(found.group(1)) if found else None
    if line is None and "end of document" in message:
        try:
            with open(path, "rb") as source:
                line = source.read().count(b"\n") + 1
        except OSError:  # pragma: no cover - it was read a moment ago
            pass
    message = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)$", "", message)
    return ConfigError(f"{path}:{line}: {message}" if line else f"{path}: {message}")


def _max_digits() -> int:
    """How many digits int() reads at most (``sys.get_int_max_str_digits``, from 3.10.7 and 3.11)."""
    get = getattr(sys, "get_int_max_str_digits", None)
    return get() if get is not None else 4300


def load_config(path: str, base: Optional[Mapping[str, Any]] = None) -> List[Rule]:
    """The rules of a TOML config file, ``[defaults]`` applied over ``base``.

    Raises ConfigError with a one-line message naming the file, the rule
    (its name or its index from 1), the key and the bad value.
    """
    try:
        with open(path, "rb") as source:
            document = tomllib.load(source)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it: {error.strerror or error}") from None
    except UnicodeDecodeError as error:  # tomllib decodes as UTF-8
        raise ConfigError(f"{path}: not UTF-8 text ({error.reason})") from None
    except tomllib.TOMLDecodeError as error:
        raise _syntax_error(path, error) from None
    except ValueError as error:  # an integer of more than 4300 digits, which int() refuses
        if "integer string conversion" in str(error):  # (worded differently by each Python)
            raise ConfigError(f"{path}: an integer of more than {_max_digits()} digits cannot be read") from None
        raise ConfigError(f"{path}: a value cannot be read: {str(error).split(';')[0]}") from None
    except RecursionError:
        raise ConfigError(f"{path}: arrays or tables nested too deeply to read") from None
    for table in document:
        if table not in ("defaults", "rule"):
            raise ConfigError(f"{path}: [{_show_key(table)}]: unknown table or key (expected [defaults] and [[rule]] "
                              f"tables)")
    defaults = dict(rule_defaults() if base is None else base)
    given_defaults = document.get("defaults", {})
    if not isinstance(given_defaults, dict):
        raise ConfigError(f"{path}: defaults: expected a [defaults] table, got {show_value(given_defaults)}")
    for key, value in given_defaults.items():
        if key in _OWN:
            raise ConfigError(f"{path}: [defaults]: {key}: not allowed in [defaults] (each rule has its own), "
                              f"got {show_value(value)}")
        try:
            defaults[key] = _check(key, value)
        except ConfigError as error:
            raise ConfigError(f"{path}: [defaults]: {error}") from None
    tables = document.get("rule", [])
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        raise ConfigError(f"{path}: rule: expected [[rule]] tables, got {show_value(tables)}")
    if not tables:
        raise ConfigError(f"{path}: no [[rule]] table: nothing to forward")
    rules: List[Rule] = []
    places: List[str] = []
    for index, table in enumerate(tables, 1):
        place = f"{path}: {_rule_place(index, table)}"
        try:
            settings = {key: _check(key, value) for key, value in table.items()}
            rules.append(_make_rule(settings, defaults))
        except ConfigError as error:
            raise ConfigError(f"{place}: {error}") from None
        places.append(place)
    check_unique(rules, places)
    return rules


def check_unique(rules: Sequence[Rule], places: Sequence[str]) -> None:
    """ConfigError if two rules share a name or a listen address and proto (``places[i]`` names rule i).

    Rules on port 0 may share an address (each gets its own free port), but
    then they need names: a rule without one is known by where it listens.
    A TCP and a UDP rule may listen on one address (their ports are apart).
    """
    names: Dict[str, int] = {}
    listens: Dict[Tuple[str, str, int], int] = {}
    for index, rule in enumerate(rules):
        if not rule.name and not rule.local_port and rule.label in names:
            raise ConfigError(f"{places[index]}: name: missing, and {show_value(rule.listen)} is already where "
                              f"{_strip_file(places[names[rule.label]])} listens: give each rule on port 0 a name")
        if not rule.name and not rule.local_port:
            names[rule.label] = index
        if rule.name:
            if rule.name in names:
                raise ConfigError(f"{places[index]}: name: {show_value(rule.name)} is already the name of "
                                  f"{_strip_file(places[names[rule.name]])}")
            names[rule.name] = index
        where = (rule.proto, rule.local_host, rule.local_port)
        if rule.local_port:  # port 0: each rule gets its own free port
            if where in listens:
                raise ConfigError(f"{places[index]}: listen: {show_value(rule.listen)} is already where "
                                  f"{_strip_file(places[listens[where]])} listens")
            listens[where] = index


def _strip_file(place: str) -> str:
    return place.rsplit(": ", 1)[-1]


# -- showing rules ---------------------------------------------------------------


def describe_rule(rule: Rule) -> str:
    """One line with every key of ``rule`` (as ``--check-config`` prints it)."""
    def networks(entries: Iterable[object], empty: str) -> str:
        return ",".join(str(entry) for entry in entries) or empty

    values = {
        "name": rule.label,
        "listen": rule.listen,
        "connect": rule.connect,
        "allow": networks(rule.allow, "all"),
        "deny": networks(rule.deny, "none"),
        "max_connections": rule.max_connections,
        "max_per_client": rule.max_per_client,
        "connect_timeout": f"{rule.connect_timeout:g}",
        "idle_timeout": f"{rule.idle_timeout:g}",
        "half_closed_timeout": f"{rule.half_closed_timeout:g}",
        "backlog": rule.backlog,
        "high_water": format_size(rule.high_water),
        "send_proxy": rule.send_proxy or "none",
        "balance": rule.balance,
        "max_fails": rule.max_fails,
        "fail_timeout": f"{rule.fail_timeout:g}",
        "health_check_interval": f"{rule.health_check_interval:g}",
        "accept_proxy": networks(rule.accept_proxy, "none"),
        "proto": rule.proto,
        "source": rule.source or "none",
        "tcp_keepalive": f"{rule.tcp_keepalive:g}",
    }
    return " ".join(f"{key}={values[key]}" for key in KEYS)

