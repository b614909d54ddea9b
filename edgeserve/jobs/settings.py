"""The [jobs] and [features] sections of edgeserve.toml: background batch jobs, streaming
and the online feature store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeserve.config.schema import ConfigError, setting


@dataclass(frozen=True)
class JobSettings:
    """Async batch jobs on the server and the streaming endpoint (issue 8)."""

    enabled: bool = True
    # Server folders a job may read its input from by path; empty = uploads only.
    input_dirs: list[Path] = setting([])
    max_upload_bytes: int = setting(1024**3, min=1024)
    # Jobs queued, running or being uploaded at once; more are refused with 429 at once.
    max_active_jobs: int = setting(16, min=1, max=10_000)
    # Disk the job folders (uploads, results) may hold, per subject and in all; an upload
    # that would pass either, or leave less than min_free_bytes free, is refused with 507.
    max_subject_bytes: int = setting(2 * 1024**3, min=1024)
    max_total_bytes: int = setting(8 * 1024**3, min=1024)
    min_free_bytes: int = setting(1024**3, min=0)
    # Finished jobs (and their results) are deleted this long after they ended.
    keep_finished_s: float = setting(7 * 86400.0, min=0.0)
    # Rows per chunk: the job steps aside for live traffic between chunks.
    chunk_rows: int = setting(512, min=1, max=1_000_000)
    # Finished chunks are made durable (fsync + jobs.db) together at most this often;
    # after a crash the job resumes from the last such checkpoint.
    checkpoint_interval_s: float = setting(1.0, min=0.0, max=3600.0)
    # How often the job thread looks again whether the model's queue is idle.
    idle_poll_ms: float = setting(2.0, min=0.1, max=1000.0)
    # Nice value of the job thread (0..19; higher = lower CPU priority).
    nice: int = setting(10, min=0, max=19)
    # While live requests are being served, the job may use this share of the time.
    busy_share: float = setting(0.25, min=0.01, max=1.0)
    # Streaming: results computed but not yet sent, per connection (backpressure window).
    stream_window: int = setting(16, min=1, max=1024)
    stream_max_message_bytes: int = setting(1024 * 1024, min=1024)
    # A stream whose client reads nothing for this long is closed (dead or stuck client).
    stream_send_timeout_s: float = setting(30.0, min=0.1, max=3600.0)
    # A stream with nothing in flight that receives nothing for this long is closed.
    stream_idle_timeout_s: float = setting(300.0, min=0.1, max=86400.0)

    def __post_init__(self) -> None:
        for i, path in enumerate(self.input_dirs):
            if not path.is_absolute():
                raise ConfigError(f"input_dirs[{i}]", f"must be an absolute path, got {path}")


@dataclass(frozen=True)
class FeatureSettings:
    """The online feature store that models declaring [features] read from."""

    # SQLite file; a relative path is inside server.state_dir.
    database: Path = Path("features.db")

    def resolve(self, state_dir: Path) -> Path:
        return self.database if self.database.is_absolute() else state_dir / self.database
