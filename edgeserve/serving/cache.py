"""Response cache for one model version: identical requests answered from memory.

Keyed by the requested outputs and a digest of every input's name, dtype, shape and
bytes (the cache lives inside one model version, so model and version are implied);
least recently used entries are evicted to stay under `max_bytes`. Hits and misses are
counted in the shape of Triton's `cache_hit` / `cache_miss` statistics.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgeserve.serving.scheduler import RunResult, Scheduler, rows_of

_ENTRY_OVERHEAD_BYTES = 256  # dict slots, key, tuple: keeps many tiny entries honest


@dataclass
class CacheCounter:
    count: int = 0
    ns: int = 0


@dataclass
class CacheStats:
    hit: CacheCounter = field(default_factory=CacheCounter)
    miss: CacheCounter = field(default_factory=CacheCounter)


def request_key(inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None) -> bytes:
    """A digest that differs whenever the inputs or the requested outputs differ."""
    h = hashlib.blake2b(digest_size=20)
    h.update(repr(sorted(outputs) if outputs else None).encode())
    for name in sorted(inputs):
        array = inputs[name]
        h.update(f"\0{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        if array.dtype == np.object_:
            for item in array.reshape(-1):
                raw = item if isinstance(item, bytes) else str(item).encode()
                h.update(len(raw).to_bytes(8, "little"))
                h.update(raw)
        else:
            h.update(np.ascontiguousarray(array).data)
    return h.digest()


def _size_of(outputs: Mapping[str, np.ndarray]) -> int:
    size = _ENTRY_OVERHEAD_BYTES
    for array in outputs.values():
        size += array.nbytes
        if array.dtype == np.object_:
            size += sum(len(x) if isinstance(x, (bytes, str)) else 64 for x in array.reshape(-1))
    return size


class ResponseCache:
    """An LRU map from request keys to output tensors, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, tuple[dict[str, np.ndarray], int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> dict[str, np.ndarray] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: bytes, outputs: Mapping[str, np.ndarray]) -> None:
        """Store copies (a batch slice would pin the whole batch); skip what cannot fit."""
        stored = {n: np.array(a, copy=True) for n, a in outputs.items()}
        size = _size_of(stored)
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        while self._entries and self.bytes + size > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
        self._entries[key] = (stored, size)
        self.bytes += size


class CachedScheduler:
    """Answers repeated requests from a ResponseCache, passes the rest to `inner`."""

    def __init__(self, inner: Scheduler, cache: ResponseCache) -> None:
        self._inner = inner
        self._cache = cache
        self.cache_stats = CacheStats()

    @property
    def depth(self) -> int:
        return self._inner.depth

    @property
    def full(self) -> bool:
        return bool(getattr(self._inner, "full", False))

    async def submit(
        self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None, deadline: float | None
    ) -> RunResult:
        started = time.perf_counter_ns()
        key = request_key(inputs, outputs)
        found = self._cache.get(key)
        looked_up = time.perf_counter_ns()
        if found is not None:
            self.cache_stats.hit.count += 1
            self.cache_stats.hit.ns += looked_up - started
            return RunResult(dict(found), 0.0, 0.0, rows_of(inputs), executions=0, cached=True)
        self.cache_stats.miss.count += 1
        result = await self._inner.submit(inputs, outputs, deadline)
        inserted = time.perf_counter_ns()
        self._cache.put(key, result.outputs)
        self.cache_stats.miss.ns += (looked_up - started) + (time.perf_counter_ns() - inserted)
        return result

    async def close(self) -> None:
        await self._inner.close()
