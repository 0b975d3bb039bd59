"""The service layer: many rules on one loop (``_service``), each rule's listener (``_listeners``),
worker processes (``_workers``), the metrics endpoint (``_metrics``), the workers' counters summed
for it (``_reports``) and the pid file (``_pidfile``)."""
