"""The relay layer: one forwarded connection, its two sides and how bytes move between them.

The ``Connection`` (``_connection``) owns a pair of sides and asks them only
what ``_sides`` says; the copy relay's sides are ``_Pipe`` and ``Receiver``
(``_copy``) and ``Sender`` (``_sender``), which connects to what its
``TargetChoice`` (``_targets``) gives, kept from the forwarder's own
listener by the ``LoopbackGuard`` (``_loopback``).  The zero-copy relay
(``_splice``) changes only how bytes move.
"""
