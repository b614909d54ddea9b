"""What the server process needs from its host: systemd notifications (readiness, watchdog)
and keeping GC pauses out of the tail latency."""
