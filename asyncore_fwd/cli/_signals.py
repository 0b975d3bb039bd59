"""The process's signal handlers while it serves: stop and drain, reload, log counters.

A handler runs wherever the main thread happens to be, so each only records a
request on the service, which its loop carries out between two rounds.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any, Callable, Dict, List, Optional

from .._values._config import ConfigError
from .._values._rules import Rule

__all__ = ["Signals"]

log = logging.getLogger("asyncore_fwd")


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


class Signals:
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
