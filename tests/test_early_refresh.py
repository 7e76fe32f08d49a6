"""Early refresh (issue 11): XFetch's refresh moment, drawn once per entry and process.

The distribution is checked on the pure `refresh_moment` with a seeded random source; the
decorators on the injected clock, moved to just before and to the drawn moment, with the
refresh held by an event: no sleeping, no timed assertion.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from coalesce import Cache
from coalesce.entry import MIN_LATE_REFRESH_GRACE, Entry, Freshness, decide, refresh_moment
from coalesce.testing import FakeClock

BOUND = 10.0  # seconds a test waits for a background refresh at most


def _stored(cache: Cache, fn: Any) -> Entry:
    """The entry object the memory store hands every reader of `fn()`'s key (`get_entry`
    returns a copy)."""
    entry = cache._read(cache.prefix + fn.key())
    assert entry is not None
    return entry


def _landed(cache: Cache, key: str, value: Any) -> bool:
    """Wait (bounded) until the entry of `key` holds `value`."""
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        entry = cache.get_entry(key)
        if entry is not None and entry.value == value:
            return True
        time.sleep(0.005)
    return False


# -- the pure parts -------------------------------------------------------------------------


def test_refresh_moment_follows_xfetch_one_computation_ahead() -> None:
    """P(moment <= t) = exp(-(fresh_until - compute_time - t) / (compute_time * beta)):
    XFetch's probability for a read at t + compute_time; never later than one computation
    before the expiry, so the refresh lands before it."""
    entry = Entry("v", created=0.0, ttl=100.0, compute_time=2.0)
    draw = random.Random(20151).random
    moments = [refresh_moment(entry, 1.5, draw) for _ in range(20_000)]
    assert max(moments) <= 98.0
    for t in (90.0, 95.0, 97.0):
        share = sum(moment <= t for moment in moments) / len(moments)
        assert abs(share - math.exp(-(98.0 - t) / 3.0)) < 0.02, (t, share)
    # a larger beta refreshes earlier; no compute time, at the expiry
    assert refresh_moment(entry, 10.0, lambda: 0.5) < refresh_moment(entry, 1.0, lambda: 0.5)
    instant = Entry("v", created=0.0, ttl=100.0)
    assert refresh_moment(instant, 1.0, lambda: 0.999) == 100.0


def test_decide_at_a_drawn_moment_and_while_a_late_refresh_lands() -> None:
    entry = Entry("v", created=100.0, ttl=10.0, compute_time=1.0)
    assert decide(entry, 105.0, refresh_at=107.0) is Freshness.FRESH
    assert decide(entry, 107.0, refresh_at=107.0) is Freshness.EARLY
    assert decide(entry, 109.9, refresh_at=107.0) is Freshness.EARLY
    # expired while this process refreshes it: served for one more computation's time
    assert decide(entry, 110.5, refresh_at=107.0, refreshing=True) is Freshness.STALE
    assert decide(entry, 110.5, refresh_at=107.0) is Freshness.EXPIRED
    assert decide(entry, 111.0, refreshing=True) is Freshness.EXPIRED
    failure = Entry(["m", "q", "x"], created=100.0, ttl=10.0, compute_time=1.0, error=True)
    assert decide(failure, 110.5, refreshing=True) is Freshness.EXPIRED
    # and for at least MIN_LATE_REFRESH_GRACE after the expiry of a fast computation
    fast = Entry("v", created=100.0, ttl=10.0, compute_time=0.001)
    assert decide(fast, 110.04, refreshing=True) is Freshness.STALE
    assert decide(fast, 110.0 + MIN_LATE_REFRESH_GRACE, refreshing=True) is Freshness.EXPIRED


# -- through the decorators, on the injected clock ------------------------------------------


@dataclass
class Hot:
    """A sync function cached with early refresh on a memory cache with a fake clock: its
    first computation takes 50 ms (the compute time XFetch scales by), later ones wait
    for `release`; `calls` counts them."""

    clock: FakeClock
    cache: Cache
    load: Any
    release: threading.Event
    calls: list[int]


@pytest.fixture
def hot() -> Iterator[Hot]:
    clock, release = FakeClock(), threading.Event()
    calls: list[int] = []
    cache = Cache(clock=clock)

    @cache.cached(ttl=10, early_refresh=True)
    def load() -> int:
        if calls:
            assert release.wait(BOUND)
        else:
            time.sleep(0.05)
        calls.append(1)
        return len(calls)

    yield Hot(clock, cache, load, release, calls)
    release.set()
    cache.close()


def test_a_hot_key_draws_its_moment_once_and_refreshes_once_at_it(hot: Hot) -> None:
    load = hot.load
    assert load() == 1
    entry = _stored(hot.cache, load)
    assert math.isnan(entry.refresh_at)  # no reader drew it yet
    assert load() == 1
    moment = entry.refresh_at
    assert moment <= entry.fresh_until - entry.compute_time
    for _ in range(1000):
        assert load() == 1
    assert entry.refresh_at == moment  # drawn once, not once per hit

    hot.clock.set(moment - 0.001)
    assert [load() for _ in range(100)] == [1] * 100
    assert len(hot.calls) == 1 and load.stats()["early_refreshes"] == 0

    hot.clock.set(moment)  # 200 callers at the moment: one refresh, nobody waits
    served: list[int] = []

    def caller() -> None:
        served.extend(load() for _ in range(5))

    threads = [threading.Thread(target=caller) for _ in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(BOUND)
    assert served == [1] * 1000  # the refresh is held: every call was served at once
    assert entry.refresh_at == entry.fresh_until  # its readers hit until it expires
    assert load.stats()["early_refreshes"] == 1
    hot.release.set()
    assert _landed(hot.cache, load.key(), 2)
    assert len(hot.calls) == 2


def test_an_early_refresh_landing_after_the_expiry_keeps_its_callers_served(hot: Hot) -> None:
    load = hot.load
    assert load() == 1
    assert load() == 1
    entry = _stored(hot.cache, load)
    hot.clock.set(entry.refresh_at)
    assert load() == 1  # the refresh starts, held
    hot.clock.set(entry.fresh_until + 0.01)  # expired, less than a computation ago
    served: list[int] = []
    late = threading.Thread(target=lambda: served.append(load()))
    late.start()
    late.join(BOUND)  # before the release: it must not wait for the refresh
    assert served == [1]
    assert load.stats()["stale"] >= 1 and load.stats()["misses"] == 1
    hot.release.set()
    assert _landed(hot.cache, load.key(), 2)
    assert load() == 2 and len(hot.calls) == 2


async def test_async_hot_key_draws_its_moment_once_and_refreshes_once() -> None:
    clock = FakeClock()
    calls: list[int] = []
    cache = Cache(clock=clock)
    gate = asyncio.Event()

    @cache.cached(ttl=10, early_refresh=True)
    async def load() -> int:
        if calls:
            await gate.wait()
        else:
            await asyncio.sleep(0.05)
        calls.append(1)
        return len(calls)

    assert await load() == 1
    assert await load() == 1
    entry = _stored(cache, load)
    moment = entry.refresh_at
    assert [await load() for _ in range(500)] == [1] * 500
    assert entry.refresh_at == moment
    clock.set(moment - 0.001)
    assert [await load() for _ in range(50)] == [1] * 50
    clock.set(moment)
    assert await asyncio.gather(*(load() for _ in range(200))) == [1] * 200
    await asyncio.sleep(0)  # the refresh task takes its first step and waits at the gate
    assert await asyncio.gather(*(load() for _ in range(200))) == [1] * 200
    assert load.stats()["early_refreshes"] == 1 and len(calls) == 1
    gate.set()
    for _ in range(100):
        if await load() == 2:
            break
        await asyncio.sleep(0.01)
    assert await load() == 2 and len(calls) == 2
    await cache.aclose()


def test_on_redis_the_moment_is_drawn_once_per_entry_not_per_read(
    redis_url: str, unique_namespace: str
) -> None:
    """Redis hands every read a freshly decoded entry: the moment is kept per key for the
    entry of the same expiry, so hits still draw once per entry in this process."""
    cache = Cache(redis_url, namespace=unique_namespace)

    @cache.cached(ttl=60, early_refresh=True, key="hot")
    def hot() -> str:
        time.sleep(0.02)
        return "v"

    try:
        assert hot() == "v"
        assert hot() == "v"
        kept = dict(hot._policy.moments)  # type: ignore[attr-defined]
        assert len(kept) == 1
        [(fresh_until, moment)] = kept.values()
        assert moment <= fresh_until - 0.02
        assert [hot() for _ in range(50)] == ["v"] * 50
        assert hot._policy.moments == kept  # type: ignore[attr-defined]
        full = cache.prefix + "hot"
        assert cache._read(full) is not cache._read(full)  # decoded per read
        assert hot.stats()["misses"] == 1
    finally:
        cache.close()


def test_get_or_set_refreshes_at_the_moment_drawn_once() -> None:
    clock, release = FakeClock(), threading.Event()
    calls: list[int] = []
    cache = Cache(clock=clock)

    def load() -> int:
        if calls:
            assert release.wait(BOUND)
        else:
            time.sleep(0.05)
        calls.append(1)
        return len(calls)

    def get() -> Any:
        return cache.get_or_set("report:1", load, ttl=10, early_refresh=True)

    try:
        assert get() == 1 and get() == 1
        entry = cache._read(cache.prefix + "report:1")
        assert entry is not None
        moment = entry.refresh_at
        assert moment <= entry.fresh_until - entry.compute_time
        clock.set(moment - 0.001)
        assert [get() for _ in range(100)] == [1] * 100
        assert entry.refresh_at == moment and len(calls) == 1
        clock.set(moment)
        assert [get() for _ in range(100)] == [1] * 100  # one refresh, held; all served
        assert cache.stats()["report"]["early_refreshes"] == 1
        release.set()
        assert _landed(cache, "report:1", 2)
        assert len(calls) == 2
    finally:
        release.set()
        cache.close()
