"""The cache's own share of Redis behaviour: private copies for in-process followers, and
remote invalidations fencing this process's computations in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from coalesce.cache import Cache
from coalesce.entry import Entry


async def test_followers_of_one_flight_get_private_copies(
    redis_caches: Callable[..., Cache],
) -> None:
    cache = redis_caches()

    @cache.cached(ttl=60, key="doc:{n}")
    async def load(n: int) -> dict[str, Any]:
        await asyncio.sleep(0.05)
        return {"n": n, "items": [1, 2, 3]}

    results = await asyncio.gather(*(load(1) for _ in range(20)))
    assert len({id(r) for r in results}) == 20
    for result in results:
        result["items"].append("mine")
    assert await load(1) == {"n": 1, "items": [1, 2, 3]}


async def test_entry_found_by_the_leaders_recheck_is_copied_for_followers(
    redis_caches: Callable[..., Cache],
) -> None:
    writer, cache = redis_caches(), redis_caches()

    @writer.cached(ttl=60, key="doc:{n}")
    async def produce(n: int) -> dict[str, Any]:
        return {"n": n, "items": [1]}

    @cache.cached(ttl=60, key="doc:{n}")
    async def load(n: int) -> dict[str, Any]:
        raise AssertionError("the entry is in Redis: nothing computes here")

    real_aread = cache._aread
    misses = 0

    async def late_aread(key: str) -> Entry | None:
        # the hot path misses; by the time the flight's leader checks again, another
        # process has stored the entry
        nonlocal misses
        if misses < 10:
            misses += 1
            await asyncio.sleep(0.02)
            if misses == 10:
                await produce(1)
            return None
        return await real_aread(key)

    cache._aread = late_aread  # type: ignore[method-assign]
    results = await asyncio.gather(*(load(1) for _ in range(10)))
    assert len({id(r) for r in results}) == 10
    results[0]["items"].append("mine")
    assert results[1] == {"n": 1, "items": [1]}


@pytest.mark.parametrize("by", ["key", "tag"])
async def test_remote_invalidation_fences_the_local_flight(
    redis_caches: Callable[..., Cache], by: str
) -> None:
    """Another process's invalidation (of the key, or of a tag the entry will carry)
    reaches this process while it computes: its in-process flight is fenced at once, so a
    caller arriving afterwards starts a new computation instead of joining the stale one."""
    here, elsewhere = redis_caches(), redis_caches()
    started = asyncio.Event()
    release = asyncio.Event()
    versions = iter(range(1, 100))

    @here.cached(ttl=60, key="v", tags=["grp"])
    async def version() -> int:
        value = next(versions)
        started.set()
        await release.wait()
        return value

    first = asyncio.ensure_future(version())
    await asyncio.wait_for(started.wait(), 10)
    listener = here.store._listener  # type: ignore[attr-defined]
    assert await asyncio.to_thread(listener.ready.wait, 10)
    # another process invalidates while our computation (value 1) is in flight
    if by == "key":
        await elsewhere.ainvalidate("v")
    else:
        await elsewhere.ainvalidate_tag("grp")
    deadline = asyncio.get_running_loop().time() + 10
    while here.aflights.running(here.prefix + "v"):
        assert asyncio.get_running_loop().time() < deadline, "the broadcast never fenced us"
        await asyncio.sleep(0.005)
    started.clear()
    later = asyncio.ensure_future(version())  # arrives after the invalidation
    await asyncio.wait_for(started.wait(), 10)
    release.set()
    assert await first == 1
    assert await later == 2
    assert await version() == 2  # the fenced value 1 never landed
