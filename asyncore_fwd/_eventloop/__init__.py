"""The loop layer: asyncore's loop made fit for a server, knowing nothing of forwarding.

Timers per socket map (``_timers``), wake-ups from other threads (``_wakeup``),
the dispatcher base that logs through ``logging`` and keeps an epoll loop
informed (``_dispatcher``) and the loop backends: epoll, and asyncore's own
poll and select rounds (``_loop``).
"""
