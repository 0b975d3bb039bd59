"""The accept pause: a listener out of descriptors stops accepting for a while.

Out of descriptors (EMFILE), a waiting client stays in the backlog and the
listening socket stays readable: ignoring the error would spin the loop,
and closing the listener (asyncore's default) would stop the service.  So
the listener stops asking for accepts for a moment, with a timer that
resumes by itself.

Strategy for the log: out of descriptors, a pause follows every resume.
The first pause is logged, with its resume; later ones are counted, and
summed up in one line per interval (``Throttle``).
"""

from __future__ import annotations

import logging
from typing import Optional, Protocol, Tuple

from .._eventloop import _loop
from .._eventloop._timers import Throttle, Timer, Timers
from .._net import describe_error, format_address

__all__ = ["AcceptPause"]

log = logging.getLogger("asyncore_fwd")


class _Listener(Protocol):
    """The dispatcher that pauses (a ``Forwarder``)."""

    @property
    def address(self) -> Tuple[str, int]: ...

    @property
    def label(self) -> str: ...

    @property
    def accepting(self) -> bool: ...


class AcceptPause:
    """One listener's pauses of accepting; ``timer`` is set while it pauses."""

    def __init__(self, listener: _Listener, timers: Timers, log_interval: float) -> None:
        self._listener = listener
        self._timers = timers
        #: The resume, while paused: the listener's ``readable()`` looks at it every round.
        self.timer: Optional[Timer] = None
        self._seconds = 0.0
        #: Whether the last line logged about pauses left the listener paused.
        self._said_paused = False
        self._error = ""
        self._log = Throttle(timers, log_interval, self._log_pauses)

    def start(self, error: BaseException, seconds: float) -> None:
        """Stop accepting for ``seconds`` (out of descriptors, or an error); a pause under way starts over.

        The first pause is logged, with the resume after it; later ones are
        counted, and summed up in one line per interval.
        """
        if self.timer is not None:
            self.timer.cancel()
        else:
            self._error = describe_error(error)
            if self._log.allow():  # the first of a burst: the others are counted
                self._said_paused = True
                details = {"rule": self._listener.label, "paused_s": seconds, "error": self._error}
                log.warning("not accepting on %s for %g s: %s", format_address(self._listener.address),
                            seconds, self._error, extra={"event": "accept_pause", "details": details})
        self._seconds = seconds
        self.timer = self._timers.call_later(seconds, self._resume)

    def _resume(self) -> None:
        self.timer = None
        if self._said_paused:
            self._said_paused = False
            log.info("accepting connections again on %s", format_address(self._listener.address),
                     extra={"event": "accept_pause", "details": {"rule": self._listener.label, "paused_s": 0}})
        _loop.channel_changed(self._listener)

    def _log_pauses(self, count: int) -> None:
        self._said_paused = self.timer is not None
        # (Neither, once it stopped listening: the lines of the close or reload say so.)
        now = "; paused now" if self._said_paused else "; accepting now" if self._listener.accepting else ""
        details = {"rule": self._listener.label, "paused_s": self._seconds if self._said_paused else 0,
                   "error": self._error, "suppressed": count}
        log.warning("not accepting on %s: paused %d more time%s in the last %g s (last: %s)%s",
                    format_address(self._listener.address), count, "s" if count > 1 else "",
                    self._log.interval, self._error, now, extra={"event": "accept_pause", "details": details})

    def cancel(self) -> None:
        """The listener stops listening: no resume; the pauses not logged yet are summed up now."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._log.close()
