"""The Redis store on a real 3-master Redis Cluster: cached, fill, tags and invalidation."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from redis.cluster import RedisCluster as ClusterClient
from redis.crc import key_slot
from redis_servers import RedisCluster

from coalesce.cache import Cache
from coalesce.entry import Entry
from coalesce.stores.base import Fence
from coalesce.stores.redis import RedisStore


@pytest.fixture
def cluster_client(redis_cluster: RedisCluster) -> Iterator[ClusterClient]:
    client = ClusterClient.from_url(redis_cluster.url)
    yield client
    client.close()


def test_cluster_cached_fill_tags_and_invalidate(
    redis_cluster: RedisCluster, cluster_client: ClusterClient, unique_namespace: str
) -> None:
    a = Cache(redis_cluster.url, namespace=unique_namespace, cluster=True)
    b = Cache(redis_cluster.url, namespace=unique_namespace, cluster=True)
    assert isinstance(a.store, RedisStore) and a.store.cluster
    calls: list[tuple[str, int]] = []

    def make(cache: Cache, name: str, delay: float) -> object:
        @cache.cached(ttl=30, key="user:{uid}", tags=["team:{team}", "all"])
        def user(uid: int, team: int) -> dict[str, int]:
            calls.append((name, uid))
            started_event.set()
            time.sleep(delay)
            return {"uid": uid, "team": team}

        return user

    user_a = make(a, "a", 0.3)
    user_b = make(b, "b", 0.0)
    # fill across two caches: b waits for a's computation through the lease and a push
    started_event = threading.Event()
    t = threading.Thread(target=lambda: user_a(1, 7))  # type: ignore[operator]
    t.start()
    assert started_event.wait(10)
    assert user_b(1, 7) == {"uid": 1, "team": 7}  # type: ignore[operator]
    t.join(5)
    assert calls == [("a", 1)]
    # many keys over several slots (and nodes)
    for uid in range(2, 20):
        user_b(uid, uid % 2)  # type: ignore[operator]
    slots = {key_slot(f"{unique_namespace}:{{user:{uid}}}".encode()) for uid in range(1, 20)}
    assert len(slots) > 3
    lease_slot = key_slot(f"{unique_namespace}:{{user:1}}:lease".encode())
    assert lease_slot == key_slot(f"{unique_namespace}:{{user:1}}".encode())
    listed = a.keys("user:*")
    assert sorted(listed, key=lambda k: int(k.split(":")[1])) == [
        f"user:{uid}" for uid in range(1, 20)
    ]
    assert listed.complete  # every master was scanned
    assert not a.keys("user:*", limit=5).complete
    before = len(calls)
    assert user_a(5, 1) == {"uid": 5, "team": 1}  # type: ignore[operator]
    assert len(calls) == before  # a hit
    assert a.invalidate("user:5") is True
    assert user_a(5, 1) == {"uid": 5, "team": 1}  # type: ignore[operator]
    assert len(calls) == before + 1
    assert b.invalidate_tag("team:0") == 9  # uids 2, 4, ..., 18: many slots
    assert b.invalidate_tag("all") == 10
    assert a.keys() == []
    stray = [
        k
        for k in cluster_client.scan_iter(match=f"*{unique_namespace}*")
        if not k.startswith(f"{unique_namespace}:".encode())
    ]
    assert stray == []
    a.close()
    b.close()


async def test_cluster_async(redis_cluster: RedisCluster, unique_namespace: str) -> None:
    cache = Cache(redis_cluster.url, namespace=unique_namespace, cluster=True)
    calls: list[int] = []

    @cache.cached(ttl=30, key="item:{i}", tags=["items"])
    async def item(i: int) -> list[int]:
        calls.append(i)
        await asyncio.sleep(0.05)
        return [i]

    results = await asyncio.gather(*[item(i % 5) for i in range(50)])
    assert results == [[i % 5] for i in range(50)]
    assert sorted(calls) == [0, 1, 2, 3, 4]
    assert await item(3) == [3] and len(calls) == 5
    assert await cache.ainvalidate("item:3") is True
    assert await cache.ainvalidate_tag("items") == 4
    assert await item(3) == [3] and len(calls) == 6
    await cache.aclose()


def test_cluster_client_is_detected(redis_cluster: RedisCluster, unique_namespace: str) -> None:
    client = ClusterClient.from_url(redis_cluster.url)
    cache = Cache(redis_cluster.url, namespace=unique_namespace, client=client)
    assert isinstance(cache.store, RedisStore) and cache.store.cluster

    @cache.cached(ttl=30, key="k", tags=["t"])
    def k() -> int:
        return 1

    assert k() == 1 and k() == 1
    assert cache.invalidate_tag("t") == 1
    cache.close()
    client.close()


def test_cluster_near_cache_invalidation(
    redis_cluster: RedisCluster, unique_namespace: str
) -> None:
    near = Cache(redis_cluster.url, namespace=unique_namespace, cluster=True, local_maxsize=10)
    other = Cache(redis_cluster.url, namespace=unique_namespace, cluster=True)
    store = near.store
    assert isinstance(store, RedisStore)
    version = [1]

    @near.cached(ttl=30, key="cfg:{n}", tags=["cfg"])
    def cfg(n: int) -> int:
        return version[0]

    assert cfg(1) == 1
    deadline = time.monotonic() + 5
    while not store.stats()["listener"]["subscribed"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert cfg(1) == 1 and cfg(1) == 1
    assert store.stats()["local_hits"] >= 1
    version[0] = 2
    other.invalidate("cfg:1")  # published on another node than the listener's, maybe
    deadline = time.monotonic() + 1
    while len(store._near or ()) != 0:
        assert time.monotonic() < deadline, "the near cache was not invalidated"
        time.sleep(0.001)
    assert cfg(1) == 2
    near.close()
    other.close()


def test_cluster_tag_invalidation_fences_a_computation_in_flight(
    redis_cluster: RedisCluster, cluster_client: ClusterClient, unique_namespace: str
) -> None:
    """On a cluster the leader records its key in the tag sets right after `CLAIM` (other
    slots): from then on a `delete_tag` deletes its lease and the result is refused."""
    a = Cache(redis_cluster.url, namespace=unique_namespace, cluster=True)
    b = Cache(redis_cluster.url, namespace=unique_namespace, cluster=True)
    sa, sb = a.store, b.store
    assert isinstance(sa, RedisStore) and isinstance(sb, RedisStore)
    tag = a.prefix + "team:7"
    keys = [a.prefix + f"member:{i}" for i in range(6)]  # several slots, other than the tag's
    assert len({key_slot(sa._layout.entry(k).encode()) for k in keys}) > 1
    started = threading.Barrier(len(keys) + 1)
    release = threading.Event()
    calls: list[str] = []

    def compute(key: str) -> Entry:
        calls.append(key)
        started.wait(10)
        assert release.wait(30)
        return Entry("stale", time.time(), 30.0, 0.0, 0.0, (tag,))

    threads = [
        threading.Thread(
            target=lambda key=key: sa.fill(key, lambda: compute(key), fence=Fence(), tags=(tag,))
        )
        for key in keys
    ]
    for t in threads:
        t.start()
    try:
        started.wait(10)
        members = cluster_client.zrange(sa._layout.tag(tag), 0, -1)
        assert sorted(members) == sorted(k.encode() for k in keys)
        assert sb.delete_tag(tag) == 0
    finally:
        release.set()
        for t in threads:
            t.join(10)
    assert sa.counts["fenced"] == len(keys)
    assert all(sb.get(k) is None for k in keys)
    fresh = sb.fill(
        keys[0],
        lambda: Entry("fresh", time.time(), 30.0, 0.0, 0.0, (tag,)),
        fence=Fence(),
        tags=(tag,),
    )
    assert fresh.value == "fresh"
    assert sb.delete_tag(tag) == 1
    a.close()
    b.close()
