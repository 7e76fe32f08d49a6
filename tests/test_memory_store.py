"""The in-memory store: get/set/delete, fences, per-entry TTL and stale window, LRU bound
(reads count as use), tags, thread safety; and the same behaviour seen through a Cache.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest

from coalesce import Cache, ConfigurationError, Entry
from coalesce.entry import Freshness
from coalesce.stores.base import Fence
from coalesce.stores.memory import MemoryStore
from coalesce.testing import FakeClock

BOUND = 10.0


def entry(value: Any, ttl: float | None = 60.0, **kw: Any) -> Entry:
    return Entry(value, time.time(), ttl, **kw)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore(maxsize=100)


# ---------------------------------------------------------------------------------------
# basics


def test_set_get_delete(store: MemoryStore) -> None:
    assert store.get("a") is None
    e = entry({"x": 1})
    assert store.set("a", e) is True
    assert store.get("a") is e
    assert len(store) == 1
    assert store.delete("a") is True
    assert store.get("a") is None
    assert store.delete("a") is False
    assert len(store) == 0


def test_overwrite_replaces_entry(store: MemoryStore) -> None:
    store.set("a", entry(1))
    e2 = entry(2)
    store.set("a", e2)
    assert store.get("a") is e2
    assert len(store) == 1


def test_none_value_is_an_entry(store: MemoryStore) -> None:
    store.set("a", entry(None))
    got = store.get("a")
    assert got is not None
    assert got.value is None


async def test_async_methods(store: MemoryStore) -> None:
    e = entry("v")
    assert await store.aset("k", e) is True
    assert await store.aget("k") is e
    assert await store.adelete("k") is True
    assert await store.adelete("k") is False
    assert await store.aget("k") is None


def test_not_shared_between_processes() -> None:
    assert MemoryStore.shared is False


@pytest.mark.parametrize("maxsize", [0, -1, 1.5, "10", True])
def test_bad_maxsize_rejected(maxsize: Any) -> None:
    with pytest.raises(ConfigurationError, match="maxsize"):  # our own error, a ValueError
        MemoryStore(maxsize=maxsize)
    with pytest.raises(ConfigurationError, match="clock"):
        MemoryStore(clock=42)  # type: ignore[arg-type]


def test_stats(store: MemoryStore) -> None:
    store.set("a", entry(1, tags=("t",)))
    store.set("b", entry(2))
    stats = store.stats()
    assert stats["entries"] == 2
    assert stats["maxsize"] == 100
    assert stats["tags"] == 1


def test_clear(store: MemoryStore) -> None:
    store.set("a", entry(1, tags=("t",)))
    store.clear()
    assert store.get("a") is None
    assert len(store) == 0
    assert store.delete_tag("t") == 0


# ---------------------------------------------------------------------------------------
# fences


def test_invalid_fence_refuses_the_write(store: MemoryStore) -> None:
    fence = Fence()
    fence.valid = False
    assert store.set("a", entry(1), fence=fence) is False
    assert store.get("a") is None


def test_valid_fence_allows_the_write(store: MemoryStore) -> None:
    assert store.set("a", entry(1), fence=Fence()) is True
    assert store.get("a") is not None


def test_fill_computes_and_stores_unless_fenced(store: MemoryStore) -> None:
    calls = []

    def compute() -> Entry:
        calls.append(1)
        return entry("v")

    got = store.fill("a", compute, fence=Fence())
    assert got.value == "v"
    assert store.get("a") is got
    fence = Fence()
    fence.valid = False
    got2 = store.fill("b", compute, fence=fence)
    assert got2.value == "v"  # the caller gets its value ...
    assert store.get("b") is None  # ... but it is not stored
    assert len(calls) == 2


async def test_afill_computes_and_stores_unless_fenced(store: MemoryStore) -> None:
    async def compute() -> Entry:
        return entry("v")

    got = await store.afill("a", compute, fence=Fence())
    assert store.get("a") is got
    fence = Fence()
    fence.valid = False
    await store.afill("b", compute, fence=fence)
    assert store.get("b") is None


def test_fence_invalidated_during_fill_blocks_the_write(store: MemoryStore) -> None:
    fence = Fence()

    def compute() -> Entry:
        fence.valid = False  # an invalidation arrives while computing
        return entry("stale")

    store.fill("a", compute, fence=fence)
    assert store.get("a") is None


# ---------------------------------------------------------------------------------------
# time


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def timed(clock: FakeClock) -> MemoryStore:
    """A store on `clock`: time passes by `clock.advance(seconds)`."""
    return MemoryStore(maxsize=100, clock=clock)


def test_entry_expires_after_ttl(timed: MemoryStore, clock: FakeClock) -> None:
    timed.set("a", Entry(1, clock.now, 0.1))
    clock.advance(0.09)
    assert timed.get("a") is not None
    assert timed.keys() == ["a"]
    clock.advance(0.02)
    # the store's contract: it may still hold an entry whose time is up (it expires them
    # lazily, on writes); readers judge freshness, and the entry reads as expired
    found = timed.get("a")
    assert found is None or found.freshness(clock.now) is Freshness.EXPIRED
    assert timed.keys() == []
    assert timed.delete("a") is False  # it no longer "existed"


def test_expired_entry_removed_by_the_next_write(timed: MemoryStore, clock: FakeClock) -> None:
    timed.set("a", Entry(1, clock.now, 0.1, tags=("t",)))
    clock.advance(0.15)
    timed.set("b", Entry(2, clock.now, 60.0))
    assert len(timed) == 1
    assert timed.stats()["tags"] == 0
    assert timed.keys() == ["b"]


def test_stale_window_keeps_the_entry(timed: MemoryStore, clock: FakeClock) -> None:
    timed.set("a", Entry(1, clock.now, 0.1, stale_ttl=30))
    clock.advance(0.15)
    got = timed.get("a")
    assert got is not None
    assert got.freshness(clock.now) is Freshness.STALE
    timed.set("b", Entry(2, clock.now, 60.0))  # a write expires what is past its window only
    assert timed.get("a") is not None


def test_entry_without_ttl_never_expires(timed: MemoryStore, clock: FakeClock) -> None:
    timed.set("a", Entry(1, clock.now, None))
    timed.set("b", Entry(2, clock.now, 0.05))
    clock.advance(0.1)
    timed.set("c", Entry(3, clock.now, 60.0))
    assert timed.get("a") is not None
    assert timed.get("b") is None


def test_entry_already_past_its_window_is_not_kept(store: MemoryStore) -> None:
    old = Entry("old", time.time() - 100, 1.0)
    store.set("a", old)
    assert store.get("a") is None
    assert len(store) == 0


def test_keys_pattern_and_limit(timed: MemoryStore, clock: FakeClock) -> None:
    for i in range(10):
        timed.set(f"ns:user:{i}", Entry(i, clock.now, 60.0))
    timed.set("ns:other", Entry(0, clock.now, 60.0))
    timed.set("ns:user:gone", Entry(0, clock.now, 0.05))
    clock.advance(0.1)
    found = timed.keys("ns:user:*")
    assert sorted(found) == sorted(f"ns:user:{i}" for i in range(10))
    assert len(timed.keys("ns:*", limit=3)) == 3
    assert timed.keys("nothing*") == []


def test_expiry_follows_the_injected_clock() -> None:
    clock = FakeClock()
    store = MemoryStore(maxsize=100, clock=clock)
    store.set("short", Entry(1, clock.now, 10.0, tags=("t",)))
    store.set("stale", Entry(2, clock.now, 10.0, stale_ttl=20.0))
    store.set("on_error", Entry(3, clock.now, 10.0, stale_if_error=40.0))
    store.set("forever", Entry(4, clock.now, None))
    clock.now += 10.0  # "short" is kept until exactly now: dropped by the next write
    store.set("x", Entry(0, clock.now, 60.0))
    assert store.get("short") is None
    assert store.stats()["tags"] == 0
    assert {"stale", "on_error", "forever", "x"} == set(store.keys())
    clock.now += 20.0  # the stale window of "stale" ends
    store.set("y", Entry(0, clock.now, 60.0))
    assert store.get("stale") is None
    assert store.get("on_error") is not None  # kept for its stale_if_error window
    clock.now += 20.0
    store.set("z", Entry(0, clock.now, 60.0))
    assert store.get("on_error") is None
    assert store.get("forever") is not None
    assert store.delete("forever") is True


def test_entry_past_its_window_on_the_injected_clock_is_not_kept() -> None:
    clock = FakeClock()
    store = MemoryStore(maxsize=100, clock=clock)
    store.set("a", Entry(1, clock.now, 60.0, tags=("t",)))
    # an entry created long ago by the clock: its windows ended, so it replaces "a" by nothing
    assert store.set("a", Entry(2, clock.now - 100, 60.0, stale_ttl=30.0, tags=("t",))) is True
    assert store.get("a") is None
    assert len(store) == 0
    assert store.stats()["tags"] == 0
    assert store.delete("a") is False


def test_eviction_is_lru_whatever_the_ttls() -> None:
    clock = FakeClock()
    store = MemoryStore(maxsize=3, clock=clock)
    store.set("a", Entry("a", clock.now, None))
    store.set("b", Entry("b", clock.now, 5.0))
    store.set("c", Entry("c", clock.now, 1_000.0))
    store.get("a")
    store.set("d", Entry("d", clock.now, 50.0))  # b is the least recently used
    assert store.get("b") is None
    store.set("e", Entry("e", clock.now, 50.0))  # then c (a was read, d written later)
    assert store.get("c") is None
    assert sorted(store.keys()) == ["a", "d", "e"]
    clock.now += 60.0  # d and e expire first, while a (no TTL) stays
    store.set("f", Entry("f", clock.now, 50.0))
    assert sorted(store.keys()) == ["a", "f"]


def test_len_and_stats_count_only_live_entries(timed: MemoryStore, clock: FakeClock) -> None:
    timed.set("a", Entry(1, clock.now, 10.0, tags=("t",)))
    timed.set("b", Entry(2, clock.now, 60.0))
    clock.advance(30.0)  # no write since: "a" may linger, but no count sees it
    assert len(timed) == 1
    assert timed.stats() == {"entries": 1, "maxsize": 100, "tags": 0}
    assert timed.keys() == ["b"]
    assert timed.get("a") is None  # counting swept it out


def test_entries_expiring_one_by_one_are_swept_by_later_writes() -> None:
    clock = FakeClock()
    store = MemoryStore(maxsize=200, clock=clock)
    for i in range(100):  # deadlines 1, 2, ..., 100 s from now
        store.set(f"old{i}", Entry(i, clock.now, 1.0 + i))
    for i in range(150):  # one old entry expires per write: sweeps are spaced out
        clock.advance(1.0)
        store.set(f"new{i}", Entry(i, clock.now, 1_000.0))
        held = [store.get(f"old{j}") for j in range(100)]
        lingering = [e for e in held if e is not None and e.kept_until <= clock.now]
        assert len(lingering) <= 50  # at most a quarter of the store's size in writes
    assert all(store.get(f"old{j}") is None for j in range(100))
    assert len(store) == 150


# ---------------------------------------------------------------------------------------
# LRU


def test_lru_evicts_least_recently_written_without_reads() -> None:
    store = MemoryStore(maxsize=3)
    for k in "abcd":
        store.set(k, entry(k))
    assert len(store) == 3
    assert store.get("a") is None
    assert [store.get(k) is not None for k in "bcd"] == [True, True, True]


def test_lru_reads_count_as_use() -> None:
    store = MemoryStore(maxsize=3)
    for k in "abc":
        store.set(k, entry(k))
    assert store.get("a") is not None  # a is now the most recently used
    store.set("d", entry("d"))
    assert len(store) == 3
    assert store.get("b") is None  # b was the least recently used
    assert store.get("a") is not None
    assert store.get("c") is not None
    assert store.get("d") is not None


def test_lru_several_reads_order() -> None:
    store = MemoryStore(maxsize=4)
    for k in "abcd":
        store.set(k, entry(k))
    store.get("b")
    store.get("a")
    store.set("e", entry("e"))  # evicts c (d, b, a, e are newer uses)
    assert store.get("c") is None
    store.set("f", entry("f"))  # evicts d
    assert store.get("d") is None
    assert all(store.get(k) is not None for k in "baef")


def test_overwrite_counts_as_use() -> None:
    store = MemoryStore(maxsize=2)
    store.set("a", entry(1))
    store.set("b", entry(1))
    store.set("a", entry(2))
    store.set("c", entry(1))
    assert store.get("b") is None
    assert store.get("a") is not None


def test_delete_frees_room() -> None:
    store = MemoryStore(maxsize=2)
    store.set("a", entry(1))
    store.set("b", entry(1))
    store.delete("a")
    store.set("c", entry(1))
    assert store.get("b") is not None
    assert store.get("c") is not None


def test_eviction_cleans_tags() -> None:
    store = MemoryStore(maxsize=1)
    store.set("a", entry(1, tags=("t",)))
    store.set("b", entry(1))
    assert store.delete_tag("t") == 0
    assert store.stats()["tags"] == 0


# ---------------------------------------------------------------------------------------
# tags


def test_delete_tag(store: MemoryStore) -> None:
    store.set("a", entry(1, tags=("user:1", "all")))
    store.set("b", entry(2, tags=("user:2", "all")))
    store.set("c", entry(3))
    assert store.delete_tag("user:1") == 1
    assert store.get("a") is None
    assert store.get("b") is not None
    assert store.delete_tag("all") == 1
    assert store.get("b") is None
    assert store.get("c") is not None
    assert store.delete_tag("all") == 0


def test_overwrite_replaces_tags(store: MemoryStore) -> None:
    store.set("a", entry(1, tags=("old",)))
    store.set("a", entry(2, tags=("new",)))
    assert store.delete_tag("old") == 0
    assert store.get("a") is not None
    assert store.delete_tag("new") == 1


async def test_adelete_tag(store: MemoryStore) -> None:
    store.set("a", entry(1, tags=("t",)))
    assert await store.adelete_tag("t") == 1
    assert store.get("a") is None


# ---------------------------------------------------------------------------------------
# threads


def test_concurrent_readers_and_writers_stay_consistent() -> None:
    store = MemoryStore(maxsize=20)
    errors: list[str] = []
    stop = time.monotonic() + 1.0

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while time.monotonic() < stop:
                k = f"k{rng.randrange(50)}"
                op = rng.random()
                if op < 0.5:
                    got = store.get(k)
                    if got is not None and got.value != k:
                        errors.append(f"{k} -> {got.value}")
                elif op < 0.85:
                    store.set(k, entry(k, ttl=rng.choice([None, 0.01, 60.0]), tags=("t",)))
                elif op < 0.95:
                    store.delete(k)
                else:
                    store.delete_tag("t")
                if len(store) > 20:
                    errors.append(f"size {len(store)} > maxsize")
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BOUND * 3)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(store) <= 20
    # every key the index knows is readable and consistent
    for k in store.keys(limit=100):
        got = store.get(k)
        assert got is None or got.value == k


# ---------------------------------------------------------------------------------------
# through a Cache


def test_cache_maxsize_bounds_entries_and_evicts_lru() -> None:
    cache = Cache(maxsize=3)
    calls: list[int] = []

    @cache.cached(ttl=60, key="n:{x}")
    def f(x: int) -> int:
        calls.append(x)
        return x

    f(1), f(2), f(3)
    f(1)  # a hit: 1 becomes the most recently used
    f(4)  # evicts 2
    assert sorted(cache.keys()) == ["n:1", "n:3", "n:4"]
    assert calls == [1, 2, 3, 4]
    f(1), f(3), f(4)
    assert calls == [1, 2, 3, 4]  # all still cached
    f(2)  # recomputed: it was evicted
    assert calls == [1, 2, 3, 4, 2]
    assert len(cache.keys()) == 3


async def test_cache_maxsize_async_reads_count_as_use() -> None:
    cache = Cache(maxsize=2)
    calls: list[str] = []

    @cache.cached(ttl=60, key="{x}")
    async def f(x: str) -> str:
        calls.append(x)
        return x

    await f("a")
    await f("b")
    await f("a")  # hit
    await f("c")  # evicts b
    assert sorted(cache.keys()) == ["a", "c"]
    await f("a")
    assert calls == ["a", "b", "c"]


def test_cache_maxsize_must_be_positive() -> None:
    with pytest.raises(ConfigurationError, match="maxsize"):
        Cache(maxsize=0)
