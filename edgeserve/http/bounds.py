"""How often each connection and body bound was hit, for `/metrics`
(`edgeserve_bounds_hit_total{bound=...}`): a bound that answers fast must also be seen."""

from __future__ import annotations

BODY_DEADLINE = "body_deadline"
CONNECTIONS = "connections"
CONNECTIONS_PER_CLIENT = "connections_per_client"
DECOMPRESSED_BODY = "decompressed_body"
HEADER_BYTES = "header_bytes"  # a request head (or its trailers) over max_header_bytes: 431
JOBS_ACTIVE = "jobs_active"
JOBS_DISK = "jobs_disk"


class BoundsHit:
    """Counts by bound name; the names are ours (a fixed set), never a client's text."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def hit(self, bound: str) -> None:
        self._counts[bound] = self._counts.get(bound, 0) + 1

    def counts(self) -> dict[tuple[str, ...], float]:
        """Label values -> count, as `ReadCounter` reads them."""
        return {(bound,): float(n) for bound, n in self._counts.items()}
