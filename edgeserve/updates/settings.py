"""The [updater] section of edgeserve.toml: who may sign bundles, limits, health watch.

The updater package itself never imports edgeserve; the server turns these settings
into `updater.BundlePolicy` / `updater.SlotStore` arguments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from edgeserve.config.hosts import is_loopback
from edgeserve.config.schema import setting
from updater.signing import parse_public_key

_PLAIN_NETLOC = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")


def allowed_url(url: str) -> bool:
    """https to any host, or plain http to a loopback address (or `localhost`), judged on
    the host the URL really names: `http://127.0.0.1.evil.example/` and
    `http://127.0.0.1@evil.example/` are plain http to another host, refused."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - a malformed port raises here, refused below
    except ValueError:
        return False
    if not host:
        return False
    if parts.scheme == "https":
        return True
    if parts.scheme != "http" or not _PLAIN_NETLOC.fullmatch(parts.netloc):
        return False  # no user info, nothing after an IPv6 literal's bracket
    return is_loopback(host)


@dataclass(frozen=True)
class UpdaterSettings:
    """Trusted keys, limits, health watch and key sources for model updates (issues 4, 5)."""

    enabled: bool = True
    # Ed25519 public keys allowed to sign bundles: base64 of the raw 32 bytes, or PEM.
    trusted_keys: list[str] = setting([])
    # Keys this box decrypts bundles with: files holding `fleet:<b64>` or `x25519:<b64>`.
    bundle_key_files: list[Path] = setting([])
    max_bundle_bytes: int = setting(1024**3, min=1024)
    max_file_bytes: int = setting(1024**3, min=1024)
    # Health watch after a flip: judged over this window, once min_requests were seen.
    watch_window_s: float = setting(300.0, min=0.0, max=7 * 86400.0)
    min_requests: int = setting(50, min=1)
    max_error_rate: float = setting(0.05, min=0.0, max=1.0)
    max_p99_ms: float = setting(1000.0, min=0.001)  # compute per row
    # Speed is judged only once this many distinct callers (token subjects) were served,
    # one vote each, and against the replaced version's compute per row times max_slowdown.
    min_subjects: int = setting(3, min=1, max=1000)
    max_slowdown: float = setting(3.0, min=1.0, max=1000.0)
    # Starts on probation without a confirmation before the previous slot is restored.
    max_unconfirmed_boots: int = setting(3, min=0, max=100)
    # At-rest master key sources, in order of preference; unset file = <state_dir>/keys/master.key.
    master_key_file: Path | None = None
    master_key_credential: str = "edgeserve-master-key"
    master_key_env: str = "EDGESERVE_MASTER_KEY"
    # Upstream bundle index (static JSON over HTTPS); empty = no polling.
    poll_url: str = ""
    poll_interval_s: float = setting(3600.0, min=10.0, max=7 * 86400.0)

    def __post_init__(self) -> None:
        for i, text in enumerate(self.trusted_keys):
            try:
                parse_public_key(text)
            except ValueError as exc:
                raise ValueError(f"trusted_keys[{i}]: {exc}") from None
        if self.poll_url and not allowed_url(self.poll_url):
            raise ValueError("poll_url: must be an https:// URL (plain http only on loopback)")
