"""The operations layer: what acts on connections, at their events and never per byte.

Who may connect and how many (``_access``), idle and half-closed timeouts
(``_timeouts``), counters and the close line (``_stats``), the PROXY header
sent to the server (``_proxy``) and the one read from a trusted balancer
(``_proxy_accept``); fault injection is the public
``asyncore_fwd.toxics``.
"""
