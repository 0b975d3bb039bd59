"""The service layer: many rules on one loop (``_service``), each rule's listener (``_listeners``),
worker processes (``_workers``), the metrics endpoint (``_metrics``) and the pid file (``_pidfile``)."""
