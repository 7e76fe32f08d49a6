"""A run of misses on Redis skips the read that the claim makes anyway (issue 10).

A decorated function on a Redis cache without a near cache, with no use for an entry that is
not fresh (no stale windows, no early refresh), skips its `GET` after a miss: the `CLAIM`
script reads the entry atomically with taking the lease, so a run of misses costs `CLAIM`
and `STORE`, two round trips instead of three. A call that finds the entry through the claim
is counted as the hit it is, and reads resume; so they do after a store failure (a failing
store's reads serve what the process kept). Seen command by command through `MONITOR` on a
server of the test's own (`Commands`), never through mocks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from redis_servers import RedisServer
from test_redis_miss_path import Caches, Commands

from coalesce.cache import Cache

MISS = ["GET", "CLAIM", "STORE"]
UNREAD_MISS = ["CLAIM", "STORE"]


@pytest.fixture
def watched(fresh_redis: RedisServer, unique_namespace: str) -> Iterator[tuple[Caches, Commands]]:
    """Caches on the test's own server, and the commands that server runs."""
    made: list[Cache] = []

    def make(**options: Any) -> Cache:
        made.append(Cache(fresh_redis.url, namespace=unique_namespace, **options))
        return made[-1]

    seen = Commands(fresh_redis)
    yield make, seen
    seen.close()
    for cache in made:
        cache.close()


def _counted(cache: Cache, **options: Any) -> tuple[Any, list[int]]:
    calls: list[int] = []

    @cache.cached(ttl=60, **options)
    def load(user_id: int) -> dict[str, int]:
        calls.append(user_id)
        return {"id": user_id}

    return load, calls


def test_a_run_of_misses_skips_the_read_and_a_hit_brings_it_back(
    watched: tuple[Caches, Commands],
) -> None:
    caches, commands = watched
    load, calls = _counted(caches())
    assert load(0) == {"id": 0}  # connections, listener, scripts loaded: not counted
    assert commands.during(lambda: load(1)) == UNREAD_MISS  # load(0) missed
    assert commands.during(lambda: load(2)) == UNREAD_MISS
    assert commands.during(lambda: load(1)) == ["CLAIM"]  # found by the claim: a hit
    assert commands.during(lambda: load(1)) == ["GET"]  # reads are back
    assert commands.during(lambda: load(3)) == MISS
    assert commands.during(lambda: load(4)) == UNREAD_MISS
    assert calls == [0, 1, 2, 3, 4]
    stats = load.stats()
    assert (stats["hits"], stats["misses"], stats["computations"]) == (2, 5, 5)


async def test_an_async_run_of_misses_skips_the_read(watched: tuple[Caches, Commands]) -> None:
    caches, commands = watched
    cache = caches()

    @cache.cached(ttl=60, key="user:{user_id}")
    async def user(user_id: int) -> int:
        return user_id * 10

    assert await user(0) == 0  # this loop's connection, listener, scripts: not counted
    for user_id in (1, 2, 3):
        assert await commands.aduring(lambda u=user_id: user(u)) == UNREAD_MISS
    assert await commands.aduring(lambda: user(2)) == ["CLAIM"]
    assert await user(2) == 20
    assert (user.stats()["hits"], user.stats()["misses"]) == (2, 4)
    await cache.aclose()


@pytest.mark.parametrize(
    ("cache_options", "options"),
    [
        ({}, {"stale_ttl": 30}),
        ({}, {"stale_if_error": 30}),
        ({}, {"early_refresh": True}),
        ({}, {"timeout": 30}),
        ({"local_maxsize": 100}, {}),
    ],
    ids=["stale_ttl", "stale_if_error", "early_refresh", "timeout", "near-cache"],
)
def test_functions_that_need_the_entry_always_read(
    watched: tuple[Caches, Commands], cache_options: dict[str, Any], options: Any
) -> None:
    """A stale entry is served (or kept for errors, or refreshed early) only if the call
    reads it; a near cache answers before Redis; with a timeout a stored entry would wait for
    the compute pool like a computation: these functions never skip the read."""
    caches, commands = watched
    load, calls = _counted(caches(**cache_options), **options)
    load(0)
    assert commands.during(lambda: load(1)) == MISS
    assert commands.during(lambda: load(2)) == MISS
    assert calls == [0, 1, 2]


def test_an_entry_another_process_stored_is_served_by_the_claim(redis_caches: Caches) -> None:
    """Two caches meet only in Redis, like two processes."""
    mine, other = redis_caches(), redis_caches()
    load, calls = _counted(mine)
    theirs, their_calls = _counted(other)
    load(0)  # a miss: the next call skips its read
    assert theirs(7) == {"id": 7}
    assert load(7) == {"id": 7}
    assert calls == [0] and their_calls == [7]
    assert load.stats()["hits"] == 1


def test_overlapping_callers_in_two_processes_still_compute_once(redis_caches: Caches) -> None:
    """The claim coalesces skipped reads across processes as it does any miss."""
    caches = [redis_caches(), redis_caches()]
    started = threading.Event()
    calls: list[int] = []
    loads = []
    for cache in caches:

        @cache.cached(ttl=60, key="user:{user_id}")
        def load(user_id: int) -> dict[str, int]:
            calls.append(user_id)
            started.set()
            time.sleep(0.2)  # long enough for every caller to be waiting on the lease
            return {"id": user_id}

        load(-1 - len(loads))  # a miss each: both now skip their reads
        loads.append(load)
    calls.clear()
    got: list[dict[str, int]] = []
    threads = [
        threading.Thread(target=lambda f=f: got.append(f(5)), daemon=True)
        for f in loads
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert calls == [5]
    assert got == [{"id": 5}] * 8


def test_after_a_store_failure_reads_resume_and_serve_the_fallback(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    cache = Cache(fresh_redis.url, namespace=unique_namespace, fallback_ttl=30)
    try:
        load, calls = _counted(cache)
        load(0)  # a miss: the next call skips its read
        fresh_redis.kill()
        assert load(1) == {"id": 1}  # the claim fails: computed without the store ...
        assert load(1) == {"id": 1}  # ... and the read, failing, serves what was kept
        assert calls == [0, 1]
    finally:
        cache.close()


def test_callers_sharing_a_skipped_read_that_finds_the_entry_all_count_hits(
    watched: tuple[Caches, Commands], fresh_redis: RedisServer
) -> None:
    """Threads that join one flight whose claim finds the entry are hits, like the readers
    they would have been (the server is paused so that they all join the first one's)."""
    caches, _ = watched
    load, calls = _counted(caches(socket_timeout=5), key="user:{user_id}")  # outlasts the pause
    theirs, _ = _counted(caches(), key="user:{user_id}")  # another process
    load(0)  # a miss: the next calls skip their reads
    theirs(7)  # the other process stores id 7
    before = load.stats()
    admin = fresh_redis.client()
    admin.client_pause(500)  # every other client's commands wait 0.5 s
    got: list[dict[str, int]] = []
    threads = [threading.Thread(target=lambda: got.append(load(7))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    admin.close()
    after = load.stats()
    assert got == [{"id": 7}] * 6 and calls == [0]
    assert after["coalesced"] > before["coalesced"]  # they did share the first one's claim
    assert after["hits"] - before["hits"] == 6
    assert after["misses"] == before["misses"]


def test_a_skipped_read_that_waits_for_another_process_counts_a_miss(
    watched: tuple[Caches, Commands], fresh_redis: RedisServer
) -> None:
    """Served what another process computed while this call waited: not a hit."""
    caches, _ = watched
    computing, gate = threading.Event(), threading.Event()
    mine, theirs = caches(), caches()

    @theirs.cached(ttl=60, key="user:{user_id}")
    def slow(user_id: int) -> int:
        computing.set()
        gate.wait(10)
        return user_id

    load, calls = _counted(mine, key="user:{user_id}")
    load(0)  # a miss: the next call skips its read
    leader = threading.Thread(target=slow, args=(5,))
    leader.start()
    assert computing.wait(10)  # the other process holds the lease
    admin = fresh_redis.client()
    flag = mine.prefix + "{user:5}:waiters"  # set by the claim that tells a caller to wait

    def release_once_waited_for() -> None:
        deadline = time.monotonic() + 10
        while not admin.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.005)
        gate.set()

    releaser = threading.Thread(target=release_once_waited_for)
    releaser.start()
    assert load(5) == 5  # waited for the push of the other process's value
    for thread in (leader, releaser):
        thread.join(10)
    admin.close()
    assert calls == [0]
    stats = load.stats()
    assert (stats["hits"], stats["misses"]) == (0, 2)


def test_a_fail_closed_cache_reads_again_after_a_failed_claim(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    """The claim's failure raises (failing closed) and the next calls read, as they would
    have without the skip: they raise from the read, counting no misses."""
    from coalesce import BackendError

    cache = Cache(fresh_redis.url, namespace=unique_namespace, on_backend_error="raise")
    try:
        load, calls = _counted(cache)
        load(0)  # a miss: the next call skips its read
        fresh_redis.kill()
        for _ in range(3):
            with pytest.raises(BackendError):
                load(1)
        assert calls == [0]
        assert load.stats()["misses"] == 2  # load(0), and the one failed claim
    finally:
        cache.close()


def test_functions_on_the_default_cache_always_read(
    watched: tuple[Caches, Commands], fresh_redis: RedisServer, unique_namespace: str
) -> None:
    """The default cache is bound at the first call, after the hot path was generated: its
    functions read before every miss, even when it is a Redis cache without a near cache."""
    from coalesce import cached
    from coalesce.testing import _as_default

    _, commands = watched
    with _as_default(Cache(fresh_redis.url, namespace=unique_namespace)):
        calls: list[int] = []

        @cached(ttl=60)
        def load(user_id: int) -> dict[str, int]:
            calls.append(user_id)
            return {"id": user_id}

        load(0)
        assert commands.during(lambda: load(1)) == MISS
        assert commands.during(lambda: load(2)) == MISS
        assert calls == [0, 1, 2]


def test_a_call_that_read_its_escaped_key_itself_counts_as_a_miss(redis_caches: Caches) -> None:
    """A key that needs escaping is read again by the slow path (the hot path read its raw
    form): that call did not skip its read, so an entry another process stores right after
    that read is a miss served by the claim, as for any call that read, not a skipped read
    turning out a hit."""
    mine, other = redis_caches(), redis_caches()
    computed: list[str] = []

    @mine.cached(ttl=60, key="u:{name}")
    def load(name: str) -> str:
        computed.append("mine")
        return "mine"

    @other.cached(ttl=60, key="u:{name}")
    def their_load(name: str) -> str:
        return "theirs"

    assert load("q r") == "mine"  # a miss: the next call would skip its read
    assert mine.invalidate(load.key("q r"))
    read = mine._read

    def read_then_another_process_stores(key: str) -> Any:
        entry = read(key)
        if entry is None and key.endswith(load.key("q r")):
            assert their_load("q r") == "theirs"
        return entry

    mine._read = read_then_another_process_stores  # type: ignore[method-assign]
    assert load("q r") == "theirs"
    assert computed == ["mine"]
    stats = load.stats()
    assert (stats["hits"], stats["misses"]) == (0, 2)
