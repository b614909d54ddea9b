"""Polling an upstream bundle index: any web server or object store can host one.

The index is a static JSON document at `[updater] poll_url`::

    {"bundles": [{"model": "digits", "version": 4, "url": "digits-4.bundle",
                  "size": 81920, "sha256": "<hex>"}]}

`url` is resolved against the index URL; `size` is required (the download cap) and
`sha256` optional (the bundle's own signature is what is trusted; the digest only
catches a corrupt transfer early). For each model this box serves, the newest entry
newer than anything installed before is downloaded into `<state_dir>/incoming/`,
resuming an interrupted download with a Range request, then installed like an
upload. A cut download nothing will resume (a newer version is offered or installed, the
model is no longer served here) is removed at the next poll. Failures back off
exponentially (1 s, 2 s, 4 s ... up to the poll interval); a bundle the store refused is
not fetched again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx

from edgeserve.updates.settings import allowed_url
from updater import BundleRejected
from updater.manifest import MODEL_NAME

log = logging.getLogger(__name__)

MAX_INDEX_BYTES = 1024 * 1024
FIRST_BACKOFF_S = 1.0
TIMEOUT_S = 30.0
PART_PREFIX, PART_SUFFIX = "poll-", ".part"  # a download in <state_dir>/incoming/

Install = Callable[[Path, str, str], Awaitable[Any]]


class IndexProblem(ValueError):
    """The index or a download is not what it should be (retried with backoff)."""


@dataclass(frozen=True)
class IndexEntry:
    model: str
    version: int
    url: str
    size: int
    sha256: str | None


def parse_index(doc: Any, base_url: str, max_bytes: int) -> list[IndexEntry]:
    """The entries of an index document; anything malformed is refused as a whole."""
    if not isinstance(doc, dict) or not isinstance(doc.get("bundles"), list):
        raise IndexProblem('index: expected {"bundles": [...]}')
    entries = []
    for i, item in enumerate(doc["bundles"][:10_000]):
        where = f"index bundles[{i}]"
        if not isinstance(item, dict):
            raise IndexProblem(f"{where}: not an object")
        model, version, url, size = (item.get(k) for k in ("model", "version", "url", "size"))
        sha = item.get("sha256")
        if not isinstance(model, str) or not MODEL_NAME.match(model):
            raise IndexProblem(f"{where}.model: not a model name")
        for key, value in (("version", version), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise IndexProblem(f"{where}.{key}: must be a positive integer")
        if not isinstance(url, str) or not url:
            raise IndexProblem(f"{where}.url: missing")
        if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
            raise IndexProblem(f"{where}.sha256: must be 64 hex digits")
        absolute = urljoin(base_url, url)
        if not allowed_url(absolute):
            raise IndexProblem(f"{where}.url: must be https (plain http only on loopback)")
        if size > max_bytes:
            log.warning("index entry over the size cap model=%s version=%s", model, version)
            continue
        entries.append(IndexEntry(model, version, absolute, size, sha))
    return entries


class BundlePoller:
    """Fetch and install newer bundles from the index, forever, with backoff."""

    def __init__(
        self,
        index_url: str,
        interval_s: float,
        incoming: Path,
        max_bytes: int,
        models: Callable[[], list[str]],
        versions_seen: Callable[[str], int],
        install: Install,
    ) -> None:
        self.index_url = index_url
        self.interval_s = interval_s
        self.incoming = incoming
        self.max_bytes = max_bytes
        self._models = models
        self._versions_seen = versions_seen
        self._install = install
        self.refused: set[tuple[str, int]] = set()
        self.failures = 0

    async def run_forever(self) -> None:
        while True:
            try:
                await self.poll_once()
                self.failures = 0
                delay = self.interval_s
            except (httpx.HTTPError, IndexProblem, OSError, ValueError) as exc:
                self.failures += 1
                delay = min(self.interval_s, FIRST_BACKOFF_S * 2 ** (self.failures - 1))
                delay *= random.uniform(0.8, 1.0)  # a fleet must not retry in lockstep
                log.warning(
                    "poll failed attempt=%d retry_s=%.1f error=%r", self.failures, delay, str(exc)
                )
            await asyncio.sleep(delay)

    async def poll_once(self) -> list[IndexEntry]:
        """One look at the index; returns the entries that were installed."""
        async with httpx.AsyncClient(timeout=TIMEOUT_S, follow_redirects=False) as client:
            index = await self._get_index(client)
            wanted = set(self._models())
            newest: dict[str, IndexEntry] = {}
            for entry in index:
                best = newest.get(entry.model)
                if entry.model in wanted and (best is None or entry.version > best.version):
                    newest[entry.model] = entry
            due = []
            for entry in newest.values():
                seen = await asyncio.to_thread(self._versions_seen, entry.model)
                if entry.version > seen and (entry.model, entry.version) not in self.refused:
                    due.append(entry)
            await asyncio.to_thread(self._forget_parts, {self._part_path(e) for e in due})
            installed = []
            for entry in due:
                path = await self._download(client, entry)
                try:
                    await self._install(path, entry.model, f"polled from {self.index_url}")
                except BundleRejected as exc:
                    log.error(
                        "polled bundle refused model=%s version=%s reason=%s",
                        entry.model,
                        entry.version,
                        exc.reason,
                    )
                    self.refused.add((entry.model, entry.version))
                    continue
                finally:
                    path.unlink(missing_ok=True)
                installed.append(entry)
            return installed

    def _part_path(self, entry: IndexEntry) -> Path:
        """Where `entry` is downloaded to (kept across restarts, to resume)."""
        return self.incoming / f"{PART_PREFIX}{entry.model}-{entry.version}{PART_SUFFIX}"

    def _forget_parts(self, resumable: set[Path]) -> None:
        """Remove cut downloads this poll will not resume (a newer version is offered or
        installed, the model is no longer served): each could hold up to max_bytes of
        disk for good. Only after the index was read, so a failed poll keeps them all."""
        for path in self.incoming.glob(f"{PART_PREFIX}*{PART_SUFFIX}"):
            if path not in resumable:
                log.info("removing a download the index no longer offers path=%s", path)
                path.unlink(missing_ok=True)

    async def _get_index(self, client: httpx.AsyncClient) -> list[IndexEntry]:
        body = bytearray()
        async with client.stream("GET", self.index_url) as response:
            if response.status_code != 200:
                raise IndexProblem(f"index answered HTTP {response.status_code}")
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_INDEX_BYTES:
                    raise IndexProblem(f"index is larger than {MAX_INDEX_BYTES} bytes")
        try:
            doc = json.loads(bytes(body))
        except ValueError:
            raise IndexProblem("index is not valid JSON") from None
        return parse_index(doc, self.index_url, self.max_bytes)

    async def _download(self, client: httpx.AsyncClient, entry: IndexEntry) -> Path:
        """The bundle file, complete and checked; an interrupted download resumes later."""
        self.incoming.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._part_path(entry)
        have = path.stat().st_size if path.exists() else 0
        if have > entry.size:
            path.unlink()
            have = 0
        if have < entry.size:
            headers = {"Range": f"bytes={have}-"} if have else {}
            async with client.stream("GET", entry.url, headers=headers) as response:
                if response.status_code == 200:
                    have = 0  # the server ignored the range: start over
                elif response.status_code != 206 or not have:
                    raise IndexProblem(f"bundle download answered HTTP {response.status_code}")
                with path.open("r+b" if have else "wb") as out:
                    out.seek(have)
                    out.truncate()
                    async for chunk in response.aiter_bytes():
                        have += len(chunk)
                        if have > entry.size:
                            out.close()
                            path.unlink(missing_ok=True)
                            raise IndexProblem("bundle is larger than the index says")
                        out.write(chunk)
        if have != entry.size:
            raise IndexProblem(f"bundle download incomplete ({have} of {entry.size} bytes)")
        if entry.sha256 is not None:
            digest = await asyncio.to_thread(_sha256, path)
            if digest != entry.sha256.lower():
                path.unlink(missing_ok=True)
                raise IndexProblem("bundle does not match the index's sha256")
        return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
