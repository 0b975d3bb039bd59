"""The relay layer: one forwarded connection, its two sides and how bytes move between them.

The ``Connection`` (``_connection``) owns a pair of sides; the copy relay
(``_copy``: ``Receiver``, ``Sender``) and the zero-copy one (``_splice``),
which changes only how bytes move, are the sides.
"""
