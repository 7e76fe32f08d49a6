"""`cached_many` on Redis (issue 12, step 2): one `MGET` for the cached ids, leases per id in
one script, each id computed once across processes, fencing per id.

Two caches made by `redis_caches` meet only in Redis, like two processes; the test with
three real OS processes starts them together from files (no timing). Round trips are seen
through a `MONITOR` connection (`test_redis_miss_path.Commands`).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import test_redis_miss_path as miss_path
from redis_servers import RedisCluster, RedisServer
from test_batch import BOUND, Boom, await_until, run_thread, wait_until
from test_redis_miss_path import Commands

from coalesce import BackendError, Cache, LeaderFailedError
from coalesce.stores.redis import RedisStore
from coalesce.stores.redis.scripts import CLAIM, CLAIM_MANY, DELETE, STORE, STORE_MANY

Caches = Callable[..., Cache]
commands = miss_path.commands  # the fixtures: a MONITOR of a server of the test's own
own_caches = miss_path.own_caches
ROOT = Path(__file__).resolve().parent.parent
_NAMES = {s.sha[:8]: s.name.upper() for s in (CLAIM, CLAIM_MANY, STORE, STORE_MANY, DELETE)}


def _store(cache: Cache) -> RedisStore:
    assert isinstance(cache.store, RedisStore)
    return cache.store


def _named(commands: list[str]) -> list[str]:
    return [_NAMES.get(c.split()[-1], c) if c.startswith("EVALSHA") else c for c in commands]


class Source:
    """A batch function that records its calls; `block` holds the batches with that id."""

    def __init__(self, block: int | None = None, value: str = "v") -> None:
        self.calls: list[list[int]] = []
        self.block = block
        self.value = value
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, ids: list[int]) -> dict[int, str]:
        self.calls.append(list(ids))
        if self.block is not None and self.block in ids:
            self.entered.set()
            assert self.release.wait(BOUND)
        return {i: f"{self.value}{i}" for i in ids if i >= 0}


# ---------------------------------------------------------------------------------------
# round trips


def test_a_page_is_one_mget_one_claim_and_one_store(own_caches: Caches, commands: Commands) -> None:
    cache = own_caches()
    source = Source()
    users = cache.cached_many(key="user:{}", ttl=60)(source)
    users([1, 2])  # warm: the connections, the scripts and the listener
    seen = _named(commands.during(lambda: users([1, 2, 3, 4, 5])))
    assert seen == ["MGET", "CLAIM_MANY", "STORE_MANY"]
    assert source.calls == [[1, 2], [3, 4, 5]]
    assert _named(commands.during(lambda: users([5, 4, 3, 2, 1]))) == ["MGET"]  # all hits


def test_async_page_round_trips_and_the_near_cache(own_caches: Caches, commands: Commands) -> None:
    cache = own_caches(local_maxsize=100)
    calls: list[list[int]] = []

    @cache.cached_many(key="user:{}", ttl=60)
    async def users(ids: list[int]) -> dict[int, int]:
        calls.append(list(ids))
        return {i: i for i in ids}

    async def main() -> None:
        await users([1])
        seen = await commands.aduring(lambda: users([1, 2, 3]))
        assert _named(seen) == ["MGET", "CLAIM_MANY", "STORE_MANY"]
        assert await commands.aduring(lambda: users([3, 2, 1])) == []  # near cache: no I/O

    asyncio.run(main())
    assert calls == [[1], [2, 3]]


# ---------------------------------------------------------------------------------------
# two caches, like two processes


def test_overlapping_batches_of_two_processes_compute_each_id_once(
    redis_caches: Caches,
) -> None:
    a, b = redis_caches(), redis_caches()
    source_a, source_b = Source(block=1, value="a"), Source(value="b")
    users_a = a.cached_many(key="user:{}", ttl=60)(source_a)
    users_b = b.cached_many(key="user:{}", ttl=60)(source_b)
    first, out_a = run_thread(lambda: users_a([1, 2, 3]))
    assert source_a.entered.wait(BOUND)
    second, out_b = run_thread(lambda: users_b([2, 3, 4]))
    wait_until(lambda: _store(b).counts["waits"] == 2 and bool(source_b.calls))
    source_a.release.set()
    first.join(BOUND)
    second.join(BOUND)
    assert source_a.calls == [[1, 2, 3]] and source_b.calls == [[4]]
    assert out_a == [{1: "a1", 2: "a2", 3: "a3"}]
    assert out_b == [{2: "a2", 3: "a3", 4: "b4"}]  # 2 and 3 pushed from the other process
    assert _store(b).counts["pushed"] == 2


def test_async_batches_of_two_processes_and_a_cancelled_leader(redis_caches: Caches) -> None:
    a, b = redis_caches(), redis_caches()
    calls: list[tuple[str, list[int]]] = []

    async def main() -> None:
        go = asyncio.Event()

        @a.cached_many(key="user:{}", ttl=60)
        async def users_a(ids: list[int]) -> dict[int, str]:
            calls.append(("a", list(ids)))
            await go.wait()
            return {i: f"a{i}" for i in ids}

        @b.cached_many(key="user:{}", ttl=60)
        async def users_b(ids: list[int]) -> dict[int, str]:
            calls.append(("b", list(ids)))
            return {i: f"b{i}" for i in ids}

        leader = asyncio.create_task(users_a([1, 2, 3]))
        while not calls:
            await asyncio.sleep(0.002)
        other = asyncio.create_task(users_b([2, 3, 4]))
        while _store(b).counts["waits"] < 2:
            await asyncio.sleep(0.002)
        leader.cancel()  # its caller leaves; the batch goes on and stores for the others
        go.set()
        assert await other == {2: "a2", 3: "a3", 4: "b4"}
        assert await users_b([1]) == {1: "a1"}

    asyncio.run(main())
    assert calls == [("a", [1, 2, 3]), ("b", [4])]


def test_invalidation_of_one_id_during_a_batch_fences_only_that_id(
    redis_caches: Caches,
) -> None:
    a, b = redis_caches(), redis_caches()
    source = Source(block=1, value="old")
    users = a.cached_many(key="user:{}", ttl=60)(source)
    first, out = run_thread(lambda: users([1, 2, 3]))
    assert source.entered.wait(BOUND)
    assert b.invalidate("user:2") is False  # deletes the lease: the other process is fenced
    source.release.set()
    first.join(BOUND)
    assert out == [{1: "old1", 2: "old2", 3: "old3"}]
    assert b.get("user:1") == "old1" and b.get("user:3") == "old3"
    assert b.get("user:2") is None


def test_each_id_is_fenced_by_its_own_lease_token(redis_caches: Caches, redis_url: str) -> None:
    a = redis_caches()
    source = Source(block=1)
    users = a.cached_many(key="user:{}", ttl=60)(source)
    first, out = run_thread(lambda: users([1, 2]))
    assert source.entered.wait(BOUND)
    raw = redis.Redis.from_url(redis_url)
    lease = f"{a.namespace}:{{user:2}}:lease"
    assert raw.delete(lease) == 1  # as an invalidation whose broadcast never arrived
    raw.close()
    source.release.set()
    first.join(BOUND)
    assert out == [{1: "v1", 2: "v2"}]
    assert a.get("user:1") == "v1" and a.get("user:2") is None
    assert _store(a).counts["fenced"] == 1


def test_a_batch_whose_ids_were_all_fenced_sends_no_store(
    own_caches: Caches, commands: Commands
) -> None:
    cache = own_caches()
    source = Source(block=1)
    users = cache.cached_many(key="user:{}", ttl=60)(source)
    users([0])  # warm: the connections, the scripts and the listener

    def fenced_batch() -> None:
        first, out = run_thread(lambda: users([1]))
        assert source.entered.wait(BOUND)
        cache.invalidate("user:1")
        source.release.set()
        first.join(BOUND)
        assert out == [{1: "v1"}]

    seen = _named(commands.during(fenced_batch))
    assert "CLAIM_MANY" in seen and "STORE_MANY" not in seen
    assert cache.get("user:1") is None


def test_a_tag_invalidation_during_a_batch_fences_the_tagged_ids(redis_caches: Caches) -> None:
    a, b = redis_caches(), redis_caches()
    source = Source(block=1)
    users = a.cached_many(key="user:{}", tags=["team:{}", "users"], ttl=60)(source)
    first, _ = run_thread(lambda: users([1, 2]))
    assert source.entered.wait(BOUND)
    b.invalidate_tag("team:2")
    source.release.set()
    first.join(BOUND)
    assert b.get("user:1") == "v1" and b.get("user:2") is None
    assert b.invalidate_tag("users") == 1 and b.get("user:1") is None


def test_a_failing_remote_batch_reaches_the_callers_waiting_on_its_ids(
    redis_caches: Caches,
) -> None:
    a, b = redis_caches(), redis_caches()
    entered, release = threading.Event(), threading.Event()

    def failing(ids: list[int]) -> dict[int, int]:
        entered.set()
        assert release.wait(BOUND)
        raise RuntimeError("down")

    calls: list[list[int]] = []

    def working(ids: list[int]) -> dict[int, int]:
        calls.append(list(ids))
        return {i: i for i in ids}

    users_a = a.cached_many(key="user:{}")(failing)
    users_b = b.cached_many(key="user:{}")(working)
    first, out_a = run_thread(lambda: users_a([1, 2]))
    assert entered.wait(BOUND)
    second, out_b = run_thread(lambda: users_b([2, 3]))
    wait_until(lambda: _store(b).counts["waits"] >= 1 and calls == [[3]])
    release.set()
    first.join(BOUND)
    second.join(BOUND)
    assert isinstance(out_a[0], RuntimeError)
    assert isinstance(out_b[0], LeaderFailedError) and "down" in str(out_b[0])
    assert users_b([2, 3]) == {2: 2, 3: 3}  # a later caller computes afresh
    assert calls == [[3], [2]]


def test_an_error_reaches_only_the_callers_of_the_batch_that_raised(redis_caches: Caches) -> None:
    """This process's batch raises for [1, 2], whose id 1 another process computes: a caller
    waiting here on id 1 alone gets the other process's value, not this batch's error."""
    a, b = redis_caches(), redis_caches()
    source_a = Source(block=1, value="a")
    users_a = a.cached_many(key="user:{}", ttl=60)(source_a)
    first, out_a = run_thread(lambda: users_a([1]))
    assert source_a.entered.wait(BOUND)

    async def main() -> None:
        go = asyncio.Event()
        entered: list[list[int]] = []

        @b.cached_many(key="user:{}", ttl=60)
        async def users_b(ids: list[int]) -> dict[int, str]:
            entered.append(list(ids))
            await go.wait()
            raise Boom(ids)

        both = asyncio.create_task(users_b([1, 2]))  # leads 1 and 2 here; 1 waits for a
        await await_until(lambda: entered == [[2]] and _store(b).counts["waits"] == 1)
        one = asyncio.create_task(users_b([1]))  # joins this process's flight of 1
        await await_until(lambda: users_b.stats()["misses"] == 3)
        go.set()
        source_a.release.set()
        assert await one == {1: "a1"}
        with pytest.raises(Boom):
            await both

    asyncio.run(main())
    first.join(BOUND)
    assert out_a == [{1: "a1"}]


def test_a_sync_batch_error_reaches_only_its_ids(redis_caches: Caches) -> None:
    a, b = redis_caches(), redis_caches()
    source_a = Source(block=1, value="a")
    users_a = a.cached_many(key="user:{}", ttl=60)(source_a)
    first, _ = run_thread(lambda: users_a([1]))
    assert source_a.entered.wait(BOUND)
    entered, go = threading.Event(), threading.Event()

    def failing(ids: list[int]) -> dict[int, str]:
        entered.set()
        assert go.wait(BOUND)
        raise Boom(ids)

    users_b = b.cached_many(key="user:{}", ttl=60)(failing)
    both, out_both = run_thread(lambda: users_b([1, 2]))
    assert entered.wait(BOUND)
    one, out_one = run_thread(lambda: users_b([1]))
    wait_until(lambda: _joined(b, "user:1"))
    go.set()
    source_a.release.set()
    for thread in (first, both, one):
        thread.join(BOUND)
    assert out_one == [{1: "a1"}]
    assert isinstance(out_both[0], Boom)


def test_a_failed_remote_leader_reaches_only_the_callers_of_its_id(redis_caches: Caches) -> None:
    """Id 1's leader elsewhere fails: `LeaderFailedError` reaches the callers of id 1 here,
    while a caller of id 2 alone, computed by the same batch here, gets its value."""
    a, b = redis_caches(), redis_caches()
    entered, release = threading.Event(), threading.Event()

    def failing(ids: list[int]) -> dict[int, str]:
        entered.set()
        assert release.wait(BOUND)
        raise RuntimeError("down")

    users_a = a.cached_many(key="user:{}")(failing)
    first, _ = run_thread(lambda: users_a([1]))
    assert entered.wait(BOUND)
    source_b = Source(block=2, value="b")
    users_b = b.cached_many(key="user:{}")(source_b)
    both, out_both = run_thread(lambda: users_b([1, 2]))
    assert source_b.entered.wait(BOUND)
    two, out_two = run_thread(lambda: users_b([2]))
    wait_until(lambda: _joined(b, "user:2"))
    release.set()
    first.join(BOUND)
    source_b.release.set()
    both.join(BOUND)
    two.join(BOUND)
    assert out_two == [{2: "b2"}]
    assert isinstance(out_both[0], LeaderFailedError)


def _joined(cache: Cache, key: str) -> bool:
    """Whether a thread waits on this process's flight of `key`."""
    flight = cache.batch_flights._flights.get(cache.prefix + key)
    return flight is not None and bool(flight.outcome._condition._waiters)  # type: ignore[attr-defined]


def test_absent_ids_release_their_leases_and_cache_missing_stores_them(
    redis_caches: Caches,
) -> None:
    a = redis_caches()
    source = Source()
    users = a.cached_many(key="user:{}", ttl=60)(source)
    missing = a.cached_many(key="gone:{}", ttl=60, cache_missing=30)(source)
    assert users([-1, 1]) == {1: "v1"}
    assert users([-1, 1]) == {1: "v1"}  # -1 not cached: computed again, without waiting
    assert missing([-1]) == {} and missing([-1]) == {}
    assert source.calls == [[-1, 1], [-1], [-1]]


def test_the_near_cache_serves_ids_and_forgets_an_invalidated_one(redis_caches: Caches) -> None:
    a, b = redis_caches(local_maxsize=100), redis_caches()
    source = Source()
    users = a.cached_many(key="user:{}", ttl=60)(source)
    assert users([1, 2, 3]) == {1: "v1", 2: "v2", 3: "v3"}
    assert users([1, 2, 3]) == {1: "v1", 2: "v2", 3: "v3"}
    assert _store(a).stats()["local_hits"] >= 3  # read from the near cache, no MGET
    b.invalidate("user:2")  # another process: its broadcast reaches the near cache
    wait_until(
        lambda: _store(a)._near is not None and _store(a)._near.get(a.prefix + "user:2") is None
    )
    assert users([1, 2, 3]) == {1: "v1", 2: "v2", 3: "v3"}
    assert source.calls == [[1, 2, 3], [2]]


def test_stale_ids_on_redis_are_served_and_refreshed_once(redis_caches: Caches) -> None:
    a = redis_caches()
    source = Source()
    users = a.cached_many(key="user:{}", ttl=0.2, stale_ttl=60)(source)
    assert users([1, 2]) == {1: "v1", 2: "v2"}
    source.value = "w"
    entry = a.get_entry("user:1")
    assert entry is not None
    wait_until(lambda: entry.fresh_until < time.time())
    assert users([1, 2]) == {1: "v1", 2: "v2"}  # stale: served at once
    wait_until(lambda: a.get("user:1") == "w1" and a.get("user:2") == "w2")
    assert source.calls == [[1, 2], [1, 2]]
    assert users.stats()["stale"] == 2


def test_a_failing_redis_degrades_to_computing_or_raises_when_failing_closed(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    open_cache = Cache(fresh_redis.url, namespace=unique_namespace, breaker_threshold=1)
    closed = Cache(fresh_redis.url, namespace=unique_namespace, on_backend_error="raise")
    try:
        source = Source()
        users = open_cache.cached_many(key="user:{}", ttl=60)(source)
        strict = closed.cached_many(key="user:{}", ttl=60)(source)
        assert users([1, 2]) == {1: "v1", 2: "v2"}
        fresh_redis.stop()
        assert users([2, 3]) == {2: "v2", 3: "v3"}  # computed directly, coalescing kept
        assert users([3]) == {3: "v3"}  # served from what this process kept meanwhile
        assert source.calls == [[1, 2], [2, 3]]
        assert users.stats()["backend_errors"] >= 1
        with pytest.raises(BackendError):
            strict([4])
    finally:
        open_cache.close()
        closed.close()


# ---------------------------------------------------------------------------------------
# three OS processes

WORKER = r"""
import json, os, sys, threading, time
from coalesce import BackendError, Cache, LeaderFailedError

url, ns, workdir, index = sys.argv[1:5]
index = int(index)
cache = Cache(url, namespace=ns)

def path(name):
    return os.path.join(workdir, name)

@cache.cached_many(key="item:{}", ttl=60)
def items(ids):
    fd = os.open(path("computed"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, ("".join(f"{os.getpid()} {i}\n" for i in ids)).encode())
    os.close(fd)
    time.sleep(0.05)  # keeps leases held while the other processes claim
    return {i: i * 7 for i in ids}

open(path(f"ready-{index}"), "w").close()
deadline = time.monotonic() + 30
while not os.path.exists(path("go")):
    if time.monotonic() > deadline:
        sys.exit(3)
    time.sleep(0.005)
results = []
def caller(n):
    lo = index * 20 + n * 10
    got = items(list(range(lo, lo + 50)))
    results.append(got == {i: i * 7 for i in range(lo, lo + 50)})
threads = [threading.Thread(target=caller, args=(n,)) for n in range(4)]
for t in threads: t.start()
for t in threads: t.join(30)
print(json.dumps({"ok": results, "waits": cache.store.counts["waits"]}))
"""


def test_three_processes_with_overlapping_ranges_compute_each_id_once(
    redis_url: str, unique_namespace: str, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, redis_url, unique_namespace, str(tmp_path), str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for n in range(3)
    ]
    try:
        wait_until(lambda: all((tmp_path / f"ready-{n}").exists() for n in range(3)))
        (tmp_path / "go").touch()
        outputs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    reports = []
    for (out, err), proc in zip(outputs, procs, strict=True):
        assert proc.returncode == 0, err
        reports.append(json.loads(out))
    assert all(report["ok"] == [True] * 4 for report in reports)
    computed = Counter(
        line.split()[1] for line in (tmp_path / "computed").read_text().split("\n") if line
    )
    assert set(computed) == {str(i) for i in range(0, 40 + 30 + 50)}
    assert set(computed.values()) == {1}, computed.most_common(3)


# ---------------------------------------------------------------------------------------
# Redis Cluster


def test_cluster_batches_across_slots(redis_cluster: RedisCluster, unique_namespace: str) -> None:
    a = Cache(redis_cluster.url, namespace=unique_namespace, cluster=True)
    b = Cache(redis_cluster.url, namespace=unique_namespace, cluster=True)
    try:
        source_a, source_b = Source(block=1, value="a"), Source(value="b")
        users_a = a.cached_many(key="user:{}", tags=["users"], ttl=60)(source_a)
        users_b = b.cached_many(key="user:{}", tags=["users"], ttl=60)(source_b)
        ids = list(range(1, 13))  # on several slots and nodes
        first, out_a = run_thread(lambda: users_a(ids))
        assert source_a.entered.wait(BOUND)
        second, out_b = run_thread(lambda: users_b([*ids[6:], 13]))
        wait_until(lambda: source_b.calls == [[13]])
        b.invalidate("user:12")  # fences that id alone
        source_a.release.set()
        first.join(BOUND)
        second.join(BOUND)
        assert out_a == [{i: f"a{i}" for i in ids}]
        assert out_b[0][13] == "b13" and out_b[0][7] == "a7"
        assert source_a.calls == [ids]
        assert b.get("user:12") is None and b.get("user:11") == "a11"
        assert users_b(ids[:11]) == {i: f"a{i}" for i in ids[:11]}  # one MGET per slot group
        assert b.invalidate_tag("users") == 12  # 1..11 and 13: recorded by STORE_MANY
        assert users_a([1]) == {1: "a1"} and source_a.calls == [ids, [1]]
    finally:
        a.close()
        b.close()


def test_cluster_async_batches(redis_cluster: RedisCluster, unique_namespace: str) -> None:
    a = Cache(redis_cluster.url, namespace=unique_namespace, cluster=True)
    b = Cache(redis_cluster.url, namespace=unique_namespace, cluster=True)
    calls: list[tuple[str, list[int]]] = []

    async def main() -> None:
        go = asyncio.Event()

        @a.cached_many(key="user:{}", ttl=60)
        async def users_a(ids: list[int]) -> dict[int, str]:
            calls.append(("a", list(ids)))
            await go.wait()
            return {i: f"a{i}" for i in ids}

        @b.cached_many(key="user:{}", ttl=60)
        async def users_b(ids: list[int]) -> dict[int, str]:
            calls.append(("b", list(ids)))
            return {i: f"b{i}" for i in ids}

        first = asyncio.create_task(users_a(list(range(1, 9))))
        while not calls:
            await asyncio.sleep(0.002)
        second = asyncio.create_task(users_b(list(range(5, 11))))
        while _store(b).counts["waits"] < 4:
            await asyncio.sleep(0.002)
        go.set()
        assert await first == {i: f"a{i}" for i in range(1, 9)}
        assert await second == {**{i: f"a{i}" for i in range(5, 9)}, 9: "b9", 10: "b10"}
        assert await users_b(list(range(1, 11))) == {
            **{i: f"a{i}" for i in range(1, 9)},
            9: "b9",
            10: "b10",
        }
        await a.aclose()
        await b.aclose()

    try:
        asyncio.run(main())
    finally:
        a.close()
        b.close()
    assert calls == [("a", list(range(1, 9))), ("b", [9, 10])]
