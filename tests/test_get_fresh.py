"""`Cache.get_fresh` / `aget_fresh`: the hit lookup in front of `get_or_set` that the web
edges answer hits with (issue 10: the edges use only public names of the core).

What it must say is exactly what `get_or_set` would return without computing: the same key
form, the same freshness test, the same object for `copy=False` values in memory; never a
stale, expired or failed entry (those are `get_or_set`'s to decide). On the memory store
time moves by an injected clock; on Redis, against the real test server.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest

from coalesce import BackendError, Cache
from coalesce.testing import FakeClock

MISSING = object()


def test_a_fresh_value_is_what_get_or_set_returns_without_computing() -> None:
    clock = FakeClock()
    cache = Cache(clock=clock)
    stored = {"body": b"x"}
    assert cache.get_fresh("page:a b", MISSING) is MISSING
    cache.get_or_set("page:a b", lambda: stored, ttl=10, stale_ttl=30, copy=False)
    # the text key is stored as get_or_set stores it; copy=False: the very object
    assert cache.get_fresh("page:a b") is stored
    assert cache.get_or_set("page:a b", lambda: {"other": 1}, ttl=10, copy=False) is stored
    clock.advance(10)  # stale: get_or_set serves it and refreshes; not a hit
    assert cache.get_fresh("page:a b", MISSING) is MISSING
    assert cache.get("page:a b") == stored  # `get` still serves it stale
    clock.advance(30)
    assert cache.get_fresh("page:a b", MISSING) is MISSING
    # it never counted: the counts are get_or_set's two calls (a miss, then a hit)
    counts = cache.stats()["page"]
    assert (counts["hits"], counts["misses"], counts["stale"]) == (1, 1, 0)


def test_copied_values_come_back_as_private_copies() -> None:
    cache = Cache()
    cache.set("k", {"n": [1]}, ttl=10)
    first = cache.get_fresh("k")
    first["n"].append(2)
    assert cache.get_fresh("k") == {"n": [1]}


def test_a_cached_failure_and_a_disabled_cache_read_as_missing() -> None:
    cache = Cache()

    def fail() -> None:
        raise ValueError("down")

    with pytest.raises(ValueError):
        cache.get_or_set("failing", fail, ttl=10, cache_errors=10)
    assert cache.get_fresh("failing", MISSING) is MISSING  # get_or_set raises it again
    with pytest.raises(ValueError):
        cache.get_or_set("failing", fail, ttl=10, cache_errors=10)
    off = Cache(enabled=False)
    off.set("k", 1)
    assert off.get_fresh("k", MISSING) is MISSING


def test_aget_fresh_on_memory() -> None:
    clock = FakeClock()
    cache = Cache(clock=clock)

    async def run() -> list[Any]:
        async def compute() -> dict[str, int]:
            return {"n": 1}

        before = await cache.aget_fresh("k", MISSING)
        value = await cache.aget_or_set("k", compute, ttl=5, copy=False)
        hit = await cache.aget_fresh("k")
        clock.advance(5)
        return [before, value is hit, await cache.aget_fresh("k", MISSING)]

    assert asyncio.run(run()) == [MISSING, True, MISSING]


def test_on_redis_fresh_values_are_read_and_invalidations_seen(
    redis_caches: Callable[..., Cache],
) -> None:
    writer, reader = redis_caches(), redis_caches()  # two processes, as far as flights go
    writer.set("user:1", {"name": "ada"}, ttl=60)
    assert reader.get_fresh("user:1") == {"name": "ada"}
    assert asyncio.run(reader.aget_fresh("user:1")) == {"name": "ada"}
    writer.invalidate("user:1")
    assert reader.get_fresh("user:1", MISSING) is MISSING
    assert asyncio.run(reader.aget_fresh("user:1", MISSING)) is MISSING


def _unreachable_redis() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def test_a_failing_store_reads_as_missing_or_raises_when_failing_closed() -> None:
    open_cache = Cache(_unreachable_redis())
    closed = Cache(_unreachable_redis(), on_backend_error="raise")
    try:
        assert open_cache.get_fresh("k", MISSING) is MISSING
        assert asyncio.run(open_cache.aget_fresh("k", MISSING)) is MISSING
        with pytest.raises(BackendError):
            closed.get_fresh("k")
        with pytest.raises(BackendError):
            asyncio.run(closed.aget_fresh("k"))
    finally:
        open_cache.close()
        closed.close()
