"""The [audit] section of edgeserve.toml: how long the audit log keeps its rows."""

from __future__ import annotations

from dataclasses import dataclass

from edgeserve.config.schema import setting


@dataclass(frozen=True)
class AuditSettings:
    """Retention and flood control for `<state_dir>/audit.db`."""

    retention_days: float = setting(365.0, min=1.0, max=36500.0)
    prune_interval_s: float = setting(3600.0, min=1.0, max=86400.0)
    # Identical refusals (same client, same reason) within one window become one row
    # with a count, so a flood of bad tokens costs one write per second, not one each.
    aggregate_window_s: float = setting(1.0, min=0.05, max=60.0)
    aggregate_max_keys: int = setting(1024, min=1, max=100000)
    queue_entries: int = setting(10000, min=10, max=1000000)
    # Largest audit.db (pages in use; the WAL adds up to ~4 MiB between checkpoints).
    # Past it the oldest rows are pruned early, through the signed anchor like retention.
    max_db_bytes: int = setting(64 * 1024**2, min=65536)
