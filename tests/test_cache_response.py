"""The response cache: repeats answered from memory, hits counted, bounded in bytes."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from edgeserve.serving.batcher import DynamicBatcher
from edgeserve.serving.cache import CachedScheduler, ResponseCache, request_key
from tests.test_batching_scheduler import FakeRuntime, policy, row


@pytest.fixture
def executor():
    with ThreadPoolExecutor(2) as pool:
        yield pool


def test_key_differs_with_inputs_shapes_dtypes_and_outputs() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    keys = {
        request_key({"x": x}, None),
        request_key({"x": x.reshape(3, 2)}, None),
        request_key({"x": x.astype(np.float64)}, None),
        request_key({"x": x}, ["sum"]),
        request_key({"y": x}, None),
        request_key({"x": x + 1}, None),
    }
    assert len(keys) == 6
    assert request_key({"x": x.copy()}, None) == request_key({"x": x}, None)
    words = np.array([b"a", b"bc"], dtype=object)
    assert request_key({"s": words}, None) != request_key(
        {"s": np.array([b"ab", b"c"], object)}, None
    )


def test_cache_answers_repeats_and_counts_hits(executor) -> None:
    runtime = FakeRuntime()
    cached = CachedScheduler(DynamicBatcher(runtime.run, executor, policy()), ResponseCache(4096))

    async def scenario() -> None:
        first = await cached.submit(row(1), None, None)
        again = await cached.submit(row(1), None, None)
        other = await cached.submit(row(2), None, None)
        only_sum = await cached.submit(row(1), ["sum"], None)
        assert again.outputs["double"].tolist() == first.outputs["double"].tolist()
        assert again.executions == 0
        assert other.outputs["sum"].tolist() == [6.0]
        assert set(only_sum.outputs) == {"sum"}

    asyncio.run(scenario())
    assert runtime.calls == [1, 1, 1]
    assert (cached.cache_stats.hit.count, cached.cache_stats.miss.count) == (1, 3)


def test_cache_stays_under_its_byte_bound() -> None:
    cache = ResponseCache(max_bytes=4000)
    for i in range(50):
        cache.put(bytes([i]), {"y": np.zeros(100, np.float32)})
        assert cache.bytes <= 4000
    assert cache.get(bytes([0])) is None  # the oldest were evicted
    assert cache.get(bytes([49])) is not None
    cache.put(b"huge", {"y": np.zeros(10_000, np.float32)})  # larger than the bound: skipped
    assert cache.get(b"huge") is None
