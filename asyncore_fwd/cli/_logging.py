"""The command's logs: to stderr, as text or JSON lines, and a moment of quiet.

Every line goes through the ``asyncore_fwd`` logger; the command gives it its
one handler (stderr) and its level (``-v``, ``-q``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import sys
from typing import Any, Dict, Iterator, Optional

__all__ = ["JsonFormatter", "configure_logging", "quiet"]

log = logging.getLogger("asyncore_fwd")


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


def configure_logging(args: argparse.Namespace, worker: Optional[int] = None) -> None:
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


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the package's lines below ERROR for a moment: the probe's start lines and
    warnings, which every worker logs again (its errors are exceptions)."""
    level = log.level
    log.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        log.setLevel(level)
