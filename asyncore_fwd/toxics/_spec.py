"""Toxics from the command line: ``--toxic SPEC``, parsed into a toxic and its direction."""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, NamedTuple, Tuple

from .._values._parse import parse_decimal, parse_duration, parse_size, shorten
from ._kinds import Bandwidth, Latency, LimitData, ResetPeer, Slicer, SlowClose, Timeout
from ._link import Toxic
from ._set import DIRECTIONS

__all__ = ["parse_toxic_spec"]


class _Spec(NamedTuple):
    """How a spec names one toxic: its class and the kind of each parameter (a key of ``_KINDS``)."""

    cls: type
    main: str  # the parameter that NAME=VALUE sets
    kinds: Dict[str, str]
    main_required: bool = True  # False where NAME alone will do: the class has a default for it


#: name in a spec -> how it is spelt
_SPECS: Dict[str, _Spec] = {
    "latency": _Spec(Latency, "seconds", {"seconds": "time", "jitter": "time"}),
    "bandwidth": _Spec(Bandwidth, "bytes_per_second", {"bytes_per_second": "size"}),
    "slicer": _Spec(Slicer, "average_size", {"average_size": "size", "size_variation": "bytes", "delay": "time"}),
    "timeout": _Spec(Timeout, "seconds", {"seconds": "time"}),
    "limit_data": _Spec(LimitData, "bytes", {"bytes": "bytes"}),
    "reset_peer": _Spec(ResetPeer, "after", {"after": "time"}, main_required=False),
    "slow_close": _Spec(SlowClose, "seconds", {"seconds": "time"}),
}
#: the parameters every toxic takes (those of ``Toxic``)
_COMMON_KINDS = {"toxicity": "share"}


def _share(text: str) -> float:
    try:
        return parse_decimal(text)  # its range is the toxic's to check
    except ValueError:
        raise ValueError("expected a number from 0 to 1, like 0.5") from None


#: kind of parameter -> its parser: a value from its text, or ValueError saying what was expected
_KINDS: Dict[str, Callable[[str], float]] = {"time": parse_duration, "size": parse_size,
                                             "bytes": functools.partial(parse_size, zero_ok=True), "share": _share}


def parse_toxic_spec(text: str) -> Tuple[Toxic, str]:
    """``[DIRECTION:]NAME[=VALUE][,KEY=VALUE...]`` as (toxic, direction), e.g.

    ``downstream:latency=100ms,jitter=10ms``, ``upstream:bandwidth=64K``,
    ``both:reset_peer=2s,toxicity=0.5``.  The direction defaults to
    downstream; ValueError with a one-line message if the spec is bad.
    """
    shown = shorten(repr(text))
    direction, _, body = text.rpartition(":")
    direction = direction or "downstream"
    if direction not in DIRECTIONS:
        raise ValueError(f"bad toxic {shown}: direction must be one of {', '.join(DIRECTIONS)}, "
                         f"not {shorten(repr(direction))}")
    first, *options = body.split(",")
    name, _, main_value = first.partition("=")
    if name not in _SPECS:
        raise ValueError(f"bad toxic {shown}: unknown toxic {shorten(repr(name))} (one of {', '.join(_SPECS)})")
    spec = _SPECS[name]
    kinds = {**spec.kinds, **_COMMON_KINDS}
    arguments: Dict[str, Any] = {}
    for key, value in [(spec.main, main_value)] * bool(main_value) + [option.partition("=")[::2] for option in options]:
        if key not in kinds:
            raise ValueError(f"bad toxic {shown}: {name} has no option {shorten(repr(key))} "
                             f"(it takes {', '.join(kinds)})")
        if key in arguments:
            raise ValueError(f"bad toxic {shown}: {key} given twice")
        try:
            arguments[key] = _KINDS[kinds[key]](value)
        except ValueError as error:
            raise ValueError(f"bad toxic {shown}: {key}: {error}, not {shorten(repr(value))}") from None
    if spec.main_required and spec.main not in arguments:
        raise ValueError(f"bad toxic {shown}: give its {spec.main}, as in {name}=VALUE")
    try:
        return spec.cls(**arguments), direction
    except ValueError as error:
        raise ValueError(f"bad toxic {shown}: {error}") from None
