"""The relay layer: one forwarded connection, its two sides and how bytes move between them.

The copy relay (``_copy``: ``Connection``, ``Receiver``, ``Sender``) and the
zero-copy one (``_splice``), which changes only how bytes move.
"""
