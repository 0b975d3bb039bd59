"""Values as people write them: numbers, seconds, sizes, host:port; and values shown in error lines.

Strategy: one reading of each kind of value for every place that takes one --
the config file and ``-L`` options, the command's flags, ``--toxic`` specs, and
``Rule``'s own checks -- so that ``1M`` or ``0.5`` means the same wherever it
is written.  Only plain ASCII numbers are read: ``int()`` and ``float()`` also
take ``1_0``, spaces, ``nan``, ``1e3`` and non-ASCII digits, which no one means
here.  A parser raises ``BadValue`` saying what it expected ("expected a
positive number of seconds"); a caller that words its errors its own way
catches it and says so in its words, showing the value with ``show_value()``
or ``shorten()``, which keep an error to one readable line.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from typing import Optional, Tuple, TypeGuard

__all__ = ["MAX_INTEGER", "BadValue", "decimal_integer", "format_size", "is_decimal", "is_integer", "is_seconds",
           "parse_decimal", "parse_duration", "parse_host_port", "parse_integer", "parse_ip_address", "parse_seconds",
           "parse_size",
           "shorten", "show_value", "split_host_port"]

#: The largest count or size taken anywhere (what a C ``ssize_t`` holds): more is never meant,
#: and could overflow where it reaches the system (a float, a pipe's size).
MAX_INTEGER = 2 ** 63 - 1
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
_PLAIN_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\Z")
#: How much of a value an error line shows.
_SHOWN = 40
#: What JSON leaves as it is, yet ``str.splitlines()`` breaks a line at: escaped in error lines.
_LINE_BREAKS = {ord(char): f"\\u{ord(char):04x}" for char in "\x1c\x1d\x1e\x85\u2028\u2029"}


class BadValue(ValueError):
    """A value that is not what was expected: the message says what was (``expected ...``)."""


# -- values in error lines -----------------------------------------------------


def show_value(value: object) -> str:
    """A value as the user wrote it: strings in double quotes, TOML's true/false; a long one cut
    short, so that the error stays one readable line."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (ValueError, RecursionError):  # an int past 4300 digits; arrays nested past the recursion limit
        text = f"<{type(value).__name__}>"
    return shorten(text.translate(_LINE_BREAKS))


def shorten(text: str) -> str:
    """``text``, cut short if it is long: an error line stays readable.  A quoted text keeps its quotes."""
    if len(text) <= _SHOWN + 20:
        return text
    quote = text[0] if text[0] in "'\"" and text[-1] == text[0] else ""
    return f"{text[:_SHOWN]}...{quote} ({len(text) - 2 * len(quote)} characters)"


# -- numbers -------------------------------------------------------------------


def is_decimal(text: str) -> bool:
    """True for ASCII digits only: ``str.isdigit()`` also takes ``²`` (which int() refuses) and ``١٢``."""
    return text.isascii() and text.isdigit()


def parse_decimal(text: str) -> float:
    """A number written plainly, like ``2``, ``0.5``, ``.25`` or ``-1`` (its range is the
    caller's to check; too many digits give ``inf``): ValueError for anything else."""
    if not _PLAIN_NUMBER.match(text):
        raise ValueError(f"not a plain number: {text!r}")
    return float(text) + 0.0  # -0.0 is 0.0: shown as "0", not "-0"


def decimal_integer(text: str) -> Optional[int]:
    """The integer ``text`` spells in ASCII digits, or None: for anything else, and above
    MAX_INTEGER (so that the caller's range check rejects it as it rejects any bad number;
    ``int()`` itself raises ValueError past 4300 digits)."""
    if not is_decimal(text) or len(text.lstrip("0")) > len(str(MAX_INTEGER)):
        return None
    value = int(text, 10)
    return value if value <= MAX_INTEGER else None


def is_integer(value: object, lowest: float, highest: float = math.inf) -> TypeGuard[int]:
    """True for an int (a bool is not one) from ``lowest`` to ``highest``."""
    return isinstance(value, int) and not isinstance(value, bool) and lowest <= value <= highest


def is_seconds(value: object, zero_ok: bool = False) -> bool:
    """True for a finite int or float (a bool is neither) above 0, or from 0 if ``zero_ok``."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and (0 <= value if zero_ok else 0 < value) and value < math.inf)


def parse_integer(value: object, lowest: int, highest: int = MAX_INTEGER) -> int:
    """An int, or its ASCII digits, from ``lowest`` to ``highest`` (at most MAX_INTEGER)."""
    if isinstance(value, str):
        value = decimal_integer(value)
    if not is_integer(value, lowest, min(highest, MAX_INTEGER)):
        raise BadValue(f"expected an integer from {lowest} to {highest}" if highest < MAX_INTEGER
                       else f"expected an integer >= {lowest}")
    return value


def _number(value: object) -> float:
    """A finite number: an int or a float, or one written plainly (BadValue without a message)."""
    if isinstance(value, str):
        try:
            value = parse_decimal(value)
        except ValueError:
            raise BadValue("") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise BadValue("")
    try:
        number = float(value)
    except OverflowError:  # an integer of 309 digits or more
        raise BadValue("") from None
    if not math.isfinite(number):
        raise BadValue("")
    return number + 0.0  # -0.0 is 0.0


def parse_seconds(value: object, zero_ok: bool = False, highest: float = math.inf) -> float:
    """A number of seconds, above 0 or, if ``zero_ok``, from 0 (to ``highest``): ``5``, ``0.25``, ``"1.5"``."""
    try:
        seconds = _number(value)
    except BadValue:
        seconds = math.nan
    if not is_seconds(seconds, zero_ok) or seconds > highest:
        if highest < math.inf:
            raise BadValue(f"expected a number of seconds from {0 if zero_ok else 'above 0'} to {highest:g}")
        raise BadValue("expected a number of seconds >= 0" if zero_ok else "expected a positive number of seconds")
    return seconds


def parse_duration(text: str) -> float:
    """Seconds from ``100ms``, ``1.5s`` or ``2`` (its range is the caller's to check)."""
    number, scale = text.lower(), 1.0
    if number.endswith("ms"):
        number, scale = number[:-2], 0.001
    elif number.endswith("s"):
        number = number[:-1]
    try:
        return parse_decimal(number) * scale
    except ValueError:
        raise BadValue("expected a value like 100ms or 1.5s") from None


def parse_size(value: object, zero_ok: bool = False) -> int:
    """A positive byte count: an integer, or text like ``65536``, ``512K``, ``1M``, ``2G``
    (at most MAX_INTEGER bytes); with ``zero_ok``, a plain ``0`` too."""
    size = 0
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        if zero_ok and decimal_integer(value) == 0:
            return 0
        number = value.rstrip("kKmMgG")
        unit = value[len(number):].lower()
        if unit in _SIZE_UNITS:  # not two suffixes, like 1KM
            size = (decimal_integer(number) or 0) * _SIZE_UNITS[unit]
    if not 0 < size <= MAX_INTEGER:
        raise BadValue("expected a number of bytes, like 0, 1500, 64K or 1M" if zero_ok
                       else "expected a positive number of bytes, like 65536, 512K, 1M or 1G")
    return size


def format_size(size: int) -> str:
    """``512K`` for 524288: the largest unit that divides it exactly."""
    for unit in ("G", "M", "K"):
        if size % _SIZE_UNITS[unit.lower()] == 0:
            return f"{size // _SIZE_UNITS[unit.lower()]}{unit}"
    return str(size)


# -- addresses -----------------------------------------------------------------


def split_host_port(text: str) -> Tuple[str, str]:
    """``("::1", "80")`` for ``[::1]:80``; BadValue unless it is HOST:PORT."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise BadValue('expected "host:port", like "[::1]:8080"')
        return host, rest[1:]
    host, colon, port = text.rpartition(":")
    if not colon:
        raise BadValue('expected "host:port", like "127.0.0.1:8080"')
    if ":" in host:
        raise BadValue('expected "host:port" with an IPv6 address in brackets, like "[::1]:8080"')
    return host, port


def parse_ip_address(value: object) -> str:
    """An IPv4 or IPv6 address (in brackets or not), as the address's own text; never a host name."""
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value[1:-1] if value.startswith("[") and value.endswith("]") else value))
        except ValueError:
            pass
    raise BadValue("expected an IP address, like 192.0.2.7 or ::1 (a host name is not accepted)")


def parse_host_port(value: object, lowest_port: int, default_host: Optional[str] = None) -> Tuple[str, int]:
    """``("::1", 80)`` for ``[::1]:80``: a host and a port from ``lowest_port`` to 65535.
    With ``default_host``, a port alone (no colon) is that host's."""
    if not isinstance(value, str):
        raise BadValue('expected "host:port"')
    host, port = split_host_port(value) if default_host is None or ":" in value else (default_host, value)
    if not host:
        raise BadValue('expected "host:port" with a host before the colon')
    number = decimal_integer(port)
    if number is None or not lowest_port <= number <= 65535:
        raise BadValue(f'expected "host:port" with a port from {lowest_port} to 65535')
    return host, number
