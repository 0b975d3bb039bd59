"""The listener layer: the article's ``forwarder``, which accepts clients and pairs each with a connection."""
