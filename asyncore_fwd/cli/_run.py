"""Serving: one process, or ``--workers`` processes under a supervisor; a run-time error's line.

Exit status 0 after SIGINT/SIGTERM and the drain, 1 for a run-time error
(address in use, permission denied, unknown host).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any, Callable, List, Optional, Sequence

from .._eventloop._loop import check_select_limit, open_loop
from .._net import describe_error, format_address
from .._service import _pidfile, _workers
from .._values._config import ConfigError
from .._values._rules import Rule
from ._logging import configure_logging, quiet
from ._parser import PROG
from ._rules import load_rules
from ._signals import Signals

__all__ = ["fail", "run_workers", "serve"]

log = logging.getLogger("asyncore_fwd")


def fail(error: BaseException) -> int:
    """Say what went wrong in one line on stderr; the exit status of a run-time error."""
    print(f"{PROG}: {describe_error(error)}", file=sys.stderr)
    return 1


def serve(args: argparse.Namespace, rules: Sequence[Rule], reread: Optional[Callable[[], List[Rule]]],
          pidfile: Optional[str] = None, worker: bool = False,
          ready: Optional[Callable[[], None]] = None,
          attach: Optional[Callable[[Any], None]] = None) -> int:
    """Serve ``rules`` until SIGINT/SIGTERM and the drain; return the exit status.
    ``attach(service)`` runs once the service is made (a worker's ``StatsReporter``)."""
    from .._service._service import Service

    signals = Signals(args, reread, worker)
    # Handlers first: the start lines are what a caller waits for before signalling.
    signals.install()
    written_pidfile = None
    try:
        try:
            service = Service(rules, map={}, toxics=args.toxic)
        except (OSError, ValueError) as error:
            return fail(error)
        signals.service = service
        if attach is not None:
            attach(service)
        try:
            if args.metrics and not worker:
                from .._service._metrics import MetricsServer

                metrics = MetricsServer(service, *args.metrics)  # closed with the service
                log.info("metrics at http://%s/metrics", format_address(metrics.address))
            if args.loop == "select":  # from here on the loop refuses what it cannot watch
                check_select_limit(service.map)
            if pidfile:
                _pidfile.claim(pidfile)
                written_pidfile = pidfile
        except OSError as error:
            service.close()
            return fail(error)
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


def run_workers(args: argparse.Namespace, rules: List[Rule], forward_rules: List[Rule]) -> int:
    """Check the settings once here, then fork the workers and watch them; with
    --metrics, serve the sums of the workers' counters from here."""
    from .._service._metrics import MetricsServer
    from .._service._reports import REPORT_INTERVAL, StatsReporter, WorkerStats
    from .._service._service import Service

    reserves = _workers.Reservations()
    written_pidfile: List[str] = []
    totals: Optional[WorkerStats] = None
    try:
        try:
            rules = reserves.hold(rules)
            # Resolve the remotes and bind once here, so that errors show before any fork.
            with quiet():
                Service(rules, map={}).close()
            if args.metrics:
                totals = WorkerStats()
                metrics = MetricsServer(totals, *args.metrics)  # closed with totals
        except (OSError, ValueError) as error:
            return fail(error)
        current = {"rules": rules}

        def run_worker(index: int, ready: Callable[[], None], lifeline: int) -> int:
            reserves.close()
            configure_logging(args, worker=index)
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
            return serve(args, current["rules"], lambda: reserves.apply(load_rules(args, forward_rules)),
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
                if rule.targets:
                    details.update(targets=[format_address(target) for target in rule.all_targets],
                                   balance=rule.balance)
                log.info("%s: forwarding %s to %s with %d workers", rule.label, rule.listen,
                         f"{rule.connect} ({rule.balance})" if rule.targets else rule.remote,
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
                return fail(error)
            written_pidfile.append(args.pidfile)
        return _workers.supervise(args.workers, run_worker, announce, drain_timeout=args.drain_timeout,
                                  on_hangup=hangup, idle=idle, on_exit=on_exit)
    finally:
        if totals is not None:
            totals.close()
        reserves.close()
        for path in written_pidfile:
            _pidfile.release(path)
