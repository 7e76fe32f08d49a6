"""Tag invalidation on the Redis store fences computations in flight, on real servers.

A computation that takes the lease records its key in the sets of the tags its entry will
carry before it computes, so an `invalidate_tag` during the computation deletes its lease and
its result is refused (DESIGN: a stale result never lands after an invalidation). Two caches
made by `redis_caches` meet only in Redis, like two processes.

The store is driven directly (`store.fill(key, compute, fence=Fence(), tags=...)`), and
through `@cache.cached(..., tags=[...])`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from coalesce.cache import Cache
from coalesce.entry import Entry
from coalesce.stores.base import Fence
from coalesce.stores.redis import RedisStore

Caches = Callable[..., Cache]


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _release_blocked() -> Iterator[None]:
    """A failing test must not leave a computation blocked for its 30 s bound."""
    yield
    for blocked in Blocked.made:
        blocked.release.set()
    Blocked.made.clear()


def _store(cache: Cache) -> RedisStore:
    store = cache.store
    assert isinstance(store, RedisStore)
    return store


def _until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait (a bounded poll, not a timing assertion) until `condition()` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.002)


def _subscribed(*caches: Cache) -> None:
    for cache in caches:
        store = _store(cache)
        store._listener.start()
        assert store._listener.ready.wait(10)


def _entry(value: Any, tags: tuple[str, ...], ttl: float = 30.0) -> Entry:
    return Entry(value, time.time(), ttl, 0.0, 0.0, tags)


class Blocked:
    """A computation that signals its start and then waits until released."""

    made: list[Blocked] = []

    def __init__(self, value: Any, tags: tuple[str, ...]) -> None:
        self.value = value
        self.tags = tags
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        Blocked.made.append(self)

    def __call__(self) -> Entry:
        self.calls += 1
        self.started.set()
        assert self.release.wait(30)
        return _entry(self.value, self.tags)


def _fill_in_thread(
    store: RedisStore, key: str, compute: Callable[[], Entry], tags: tuple[str, ...]
) -> tuple[threading.Thread, list[Entry]]:
    got: list[Entry] = []
    thread = threading.Thread(
        target=lambda: got.append(store.fill(key, compute, fence=Fence(), tags=tags))
    )
    thread.start()
    return thread, got


# -- the store, driven directly -------------------------------------------------------------


def test_delete_tag_fences_a_fill_in_flight(redis_caches: Caches, raw: redis.Redis) -> None:
    a, b = redis_caches(), redis_caches()
    sa, sb = _store(a), _store(b)
    key, tag = a.prefix + "user:42:profile", a.prefix + "user:42"
    tag_set = sa._layout.tag(tag)
    compute = Blocked("stale", (tag,))
    thread, got = _fill_in_thread(sa, key, compute, (tag,))
    assert compute.started.wait(10)
    # recorded when the lease was taken, with the lease's expiry
    score = raw.zscore(tag_set, key)
    assert score is not None and score <= time.time() * 1000 + sa.lease_ms + 1000
    assert sb.delete_tag(tag) == 0  # no entry yet: the lease is what it deletes
    compute.release.set()
    thread.join(10)
    assert [e.value for e in got] == ["stale"]  # its own caller still gets what it computed
    assert sa.counts["fenced"] == 1
    assert sa.get(key) is None and sb.get(key) is None
    fresh = Blocked("fresh", (tag,))
    fresh.release.set()
    assert sb.fill(key, fresh, fence=Fence(), tags=(tag,)).value == "fresh"
    assert fresh.calls == 1  # computed afresh, not served the fenced result
    entry = sa.get(key)
    assert entry is not None and entry.value == "fresh"
    score = raw.zscore(tag_set, key)  # raised to the entry's expiry by STORE
    assert score is not None and score > time.time() * 1000 + 20_000
    assert sa.delete_tag(tag) == 1
    assert raw.exists(tag_set) == 0


async def test_adelete_tag_fences_an_afill_in_flight(
    redis_caches: Caches, raw: redis.Redis
) -> None:
    a, b = redis_caches(), redis_caches()
    sa, sb = _store(a), _store(b)
    key, tag = a.prefix + "doc:1", a.prefix + "docs"
    started, release = asyncio.Event(), asyncio.Event()
    calls: list[str] = []

    async def compute(value: str) -> Entry:
        calls.append(value)
        started.set()
        await asyncio.wait_for(release.wait(), 30)
        return _entry(value, (tag,))

    leader = asyncio.ensure_future(
        sa.afill(key, lambda: compute("stale"), fence=Fence(), tags=(tag,))
    )
    await asyncio.wait_for(started.wait(), 10)
    assert raw.zscore(sa._layout.tag(tag), key) is not None
    assert await sb.adelete_tag(tag) == 0
    release.set()
    assert (await asyncio.wait_for(leader, 10)).value == "stale"
    assert sa.counts["fenced"] == 1
    assert await sa.aget(key) is None
    entry = await sb.afill(key, lambda: compute("fresh"), fence=Fence(), tags=(tag,))
    assert entry.value == "fresh" and calls == ["stale", "fresh"]
    stored = await sa.aget(key)
    assert stored is not None and stored.value == "fresh"
    assert await sa.adelete_tag(tag) == 1
    await a.aclose()
    await b.aclose()


def test_delete_tag_does_not_fence_computations_without_that_tag(
    redis_caches: Caches, raw: redis.Redis
) -> None:
    a, b = redis_caches(), redis_caches()
    sa, sb = _store(a), _store(b)
    tag, other = a.prefix + "team:1", a.prefix + "team:2"
    tagged = Blocked("two", (other,))
    untagged = Blocked("none", ())
    t1, got1 = _fill_in_thread(sa, a.prefix + "k:two", tagged, (other,))
    t2, got2 = _fill_in_thread(sa, a.prefix + "k:none", untagged, ())
    assert tagged.started.wait(10) and untagged.started.wait(10)
    raw_set = raw.zrange(sa._layout.tag(other), 0, -1)
    assert raw_set == [f"{a.prefix}k:two".encode()]
    assert sb.delete_tag(tag) == 0
    tagged.release.set()
    untagged.release.set()
    t1.join(10)
    t2.join(10)
    assert got1 and got2
    assert sa.counts["fenced"] == 0
    assert [sa.get(a.prefix + k) is not None for k in ("k:two", "k:none")] == [True, True]
    assert sb.delete_tag(other) == 1


def test_members_recorded_at_claim_are_cleaned_up(redis_caches: Caches, raw: redis.Redis) -> None:
    """A leader that fails stores nothing: its membership expires with its lease."""
    a = redis_caches(lease_ttl=0.4)  # the set must expire with it (real time: PX)
    store = _store(a)
    key, tag = a.prefix + "k", a.prefix + "t"
    tag_set = store._layout.tag(tag)

    def fails() -> Entry:
        assert raw.zscore(tag_set, key) is not None
        pttl = raw.pttl(tag_set)
        assert 0 < pttl <= store.lease_ms  # the set expires with the lease
        raise KeyError("no")

    with pytest.raises(KeyError):
        store.fill(key, fails, fence=Fence(), tags=(tag,))
    _until(lambda: raw.exists(tag_set) == 0, "the tag set expired with the lease")
    # a fenced computation's membership goes with the set `delete_tag` takes
    compute = Blocked("v", (tag,))
    thread, _ = _fill_in_thread(store, key, compute, (tag,))
    assert compute.started.wait(10)
    assert raw.exists(tag_set) == 1
    assert store.delete_tag(tag) == 0
    assert raw.exists(tag_set) == 0
    compute.release.set()
    thread.join(10)
    assert raw.exists(tag_set) == 0 and store.get(key) is None
    assert store.counts["fenced"] == 1


def test_renewals_keep_a_long_computation_in_its_tag_sets(
    redis_caches: Caches, raw: redis.Redis
) -> None:
    """The membership lasts as long as the lease, renewed: still fenced after 2 lifetimes."""
    a, b = redis_caches(lease_ttl=0.6), redis_caches()
    sa, sb = _store(a), _store(b)
    key, tag = a.prefix + "slow", a.prefix + "slow-tag"
    tag_set = sa._layout.tag(tag)
    compute = Blocked("stale", (tag,))
    thread, got = _fill_in_thread(sa, key, compute, (tag,))
    assert compute.started.wait(10)
    first = raw.zscore(tag_set, key)
    assert first is not None
    _until(lambda: (raw.zscore(tag_set, key) or 0) > first + 1200, "renewed for 2 lifetimes")
    assert raw.pttl(tag_set) > 0
    assert sb.delete_tag(tag) == 0
    compute.release.set()
    thread.join(10)
    assert got and sa.counts["fenced"] == 1 and sa.get(key) is None


def test_plain_set_never_shortens_a_computations_membership(
    redis_caches: Caches, raw: redis.Redis
) -> None:
    """`set` while somebody holds the lease only raises the scores (the computation must
    stay listed as long as its lease); without a lease it sets them."""
    a = redis_caches()
    store = _store(a)
    key, tag = a.prefix + "k", a.prefix + "t"
    tag_set = store._layout.tag(tag)
    compute = Blocked("v", (tag,))
    thread, _ = _fill_in_thread(store, key, compute, (tag,))
    assert compute.started.wait(10)
    claimed = raw.zscore(tag_set, key)
    assert claimed is not None
    assert store.set(key, _entry("short", (tag,), ttl=0.05))
    assert raw.zscore(tag_set, key) == claimed
    compute.release.set()
    thread.join(10)
    stored = raw.zscore(tag_set, key)
    assert stored is not None and stored > time.time() * 1000 + 20_000
    assert store.set(key, _entry("short", (tag,), ttl=5))
    lowered = raw.zscore(tag_set, key)
    assert lowered is not None and lowered < time.time() * 1000 + 6_000


# -- broadcasts: on_invalidated_tag ------------------------------------------------------------


def test_tag_broadcasts_reach_on_invalidated_tag_except_own_echoes(redis_caches: Caches) -> None:
    a, b = redis_caches(), redis_caches()
    sa, sb = _store(a), _store(b)
    _subscribed(a, b)
    heard_a: list[str] = []
    heard_b: list[str] = []
    sa.on_invalidated_tag = heard_a.append
    sb.on_invalidated_tag = heard_b.append
    first, second = a.prefix + "one", a.prefix + "two"
    sb.delete_tag(first)
    sa.delete_tag(second)  # published after the first: b hears it after its own echo
    _until(lambda: heard_b == [second], "b heard a's tag invalidation")
    _until(lambda: heard_a == [first], "a heard b's tag invalidation")
    _until(lambda: not sa._echoes and not sb._echoes, "both echoes came back")
    assert heard_a == [first] and heard_b == [second]  # neither hook heard its own


def test_a_broken_tag_hook_does_not_stop_the_listener(redis_caches: Caches) -> None:
    a, b = redis_caches(), redis_caches()
    sa, sb = _store(a), _store(b)
    _subscribed(a)

    def broken(tag: str) -> None:
        raise RuntimeError("hook")

    heard: list[str] = []
    sa.on_invalidated_tag = broken
    sa.on_invalidated = heard.append
    sb.delete_tag(a.prefix + "t")
    sb.delete(a.prefix + "k")
    _until(lambda: heard == [a.prefix + "k"], "the key invalidation after the broken hook")


def test_a_tag_invalidation_failing_half_way_leaves_its_members_to_the_next(
    redis_caches: Caches, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleting the entries fails after the tag set was taken: the members wait in the
    tag's taking set, and the next `delete_tag` deletes them (none is lost)."""
    from coalesce.errors import BackendError
    from coalesce.stores.redis import scripts

    a = redis_caches()
    store = _store(a)
    tag = a.prefix + "t"
    for i in range(3):
        store.set(f"{a.prefix}k{i}", _entry(i, (tag,)))
    real = store._conn.script

    def failing(script: Any, keys: Any, args: Any) -> Any:
        if script is scripts.DELETE:
            raise BackendError("down")
        return real(script, keys, args)

    monkeypatch.setattr(store._conn, "script", failing)
    with pytest.raises(BackendError):
        store.delete_tag(tag)
    monkeypatch.undo()
    taking = store._layout.taking(store._layout.tag(tag))
    assert raw.zcard(taking) == 3 and raw.pttl(taking) > 0
    assert store.delete_tag(tag) == 3
    assert raw.exists(taking) == 0
    assert all(store.get(f"{a.prefix}k{i}") is None for i in range(3))


def test_a_tag_taken_whose_reply_was_lost_is_deleted_by_the_next_invalidation(
    redis_caches: Caches, raw: redis.Redis
) -> None:
    """`TAKE_TAG` ran but its caller never saw the reply (a timeout): a retried
    `invalidate_tag` still deletes every entry the tag carried."""
    from coalesce.stores.redis.scripts import TAKE_TAG

    a = redis_caches()
    store = _store(a)
    tag = a.prefix + "t"
    for i in range(3):
        store.set(f"{a.prefix}k{i}", _entry(i, (tag,)))
    tag_key = store._layout.tag(tag)
    store._conn.script(TAKE_TAG, [tag_key, store._layout.taking(tag_key)], [])  # reply lost
    store.set(f"{a.prefix}k3", _entry(3, (tag,)))  # tagged afterwards: in a new tag set
    assert a.invalidate_tag("t") == 4
    assert all(store.get(f"{a.prefix}k{i}") is None for i in range(4))


# -- through @cache.cached ---------------------------------------------------------------------


@pytest.mark.parametrize("broadcast", ["heard", "lost"])
def test_invalidate_tag_fences_a_cached_computation_in_flight(
    redis_caches: Caches, broadcast: str
) -> None:
    """Fenced twice over: the broadcast reaches a's hook (which fences a's flights), and
    the lease is gone from Redis (which refuses the store even when the broadcast is lost
    or late: "lost" takes the hook away)."""
    a, b = redis_caches(), redis_caches()
    if broadcast == "lost":
        _store(a).on_invalidated_tag = None
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    @a.cached(ttl=30, key="profile:{uid}", tags=["user:{uid}"])
    def profile(uid: int) -> dict[str, int]:
        calls.append(uid)
        started.set()
        assert release.wait(30)
        return {"uid": uid, "version": len(calls)}

    got: list[dict[str, int]] = []
    thread = threading.Thread(target=lambda: got.append(profile(42)))
    thread.start()
    try:
        assert started.wait(10)
        assert b.invalidate_tag("user:42") == 0
    finally:
        release.set()
        thread.join(10)
    assert got == [{"uid": 42, "version": 1}]
    assert a.get_entry("profile:42") is None  # the stale result did not land
    assert profile(42) == {"uid": 42, "version": 2}  # computed afresh
    assert profile(42) == {"uid": 42, "version": 2} and calls == [42, 42]
    assert b.invalidate_tag("user:42") == 1


async def test_ainvalidate_tag_fences_a_cached_computation_in_flight(
    redis_caches: Caches,
) -> None:
    a, b = redis_caches(), redis_caches()
    started, release = asyncio.Event(), asyncio.Event()
    calls: list[int] = []

    @a.cached(ttl=30, key="profile:{uid}", tags=["user:{uid}"])
    async def profile(uid: int) -> dict[str, int]:
        calls.append(uid)
        started.set()
        await asyncio.wait_for(release.wait(), 30)
        return {"uid": uid, "version": len(calls)}

    leader = asyncio.ensure_future(profile(42))
    await asyncio.wait_for(started.wait(), 10)
    assert await b.ainvalidate_tag("user:42") == 0
    release.set()
    assert await asyncio.wait_for(leader, 10) == {"uid": 42, "version": 1}
    assert await a.store.aget(a.prefix + "profile:42") is None
    assert await profile(42) == {"uid": 42, "version": 2}
    assert calls == [42, 42]
    await a.aclose()
    await b.aclose()


def test_cached_tag_invalidation_leaves_other_computations_alone(redis_caches: Caches) -> None:
    a, b = redis_caches(), redis_caches()
    started, release = threading.Event(), threading.Event()

    @a.cached(ttl=30, key="profile:{uid}", tags=["user:{uid}"])
    def profile(uid: int) -> int:
        started.set()
        assert release.wait(30)
        return uid

    thread = threading.Thread(target=lambda: profile(43))
    thread.start()
    try:
        assert started.wait(10)
        assert b.invalidate_tag("user:42") == 0
    finally:
        release.set()
        thread.join(10)
    entry = a.get_entry("profile:43")
    assert entry is not None and entry.value == 43
    assert _store(a).counts["fenced"] == 0


def test_a_tagged_waiter_claims_again_with_the_tokens_it_saw(redis_caches: Caches) -> None:
    """A waiter of a tagged function claims again after its wait with the lease tokens it saw
    and its tag sets (`CLAIM`'s fullest layout, 5 KEYS + tags, 8 ARGV) and gets the leader's
    failure from there."""
    from coalesce import LeaderFailedError
    from coalesce.stores.redis.scripts import CLAIM

    a, b = redis_caches(), redis_caches()
    started, release = threading.Event(), threading.Event()

    @a.cached(ttl=30, key="doc:{did}", tags=["team:{did}"])
    def leader(did: int) -> int:
        started.set()
        assert release.wait(10)
        raise RuntimeError("the database is down")

    @b.cached(ttl=30, key="doc:{did}", tags=["team:{did}"])
    def waiter(did: int) -> int:
        return did * 10

    conn = _store(b)._conn
    layouts: list[tuple[int, int]] = []
    script = conn.script

    def counted(which: Any, keys: Any, args: Any) -> Any:
        if which is CLAIM:
            layouts.append((len(keys), len(args)))
        return script(which, keys, args)

    conn.script = counted  # type: ignore[method-assign]  # counts, then runs it for real
    failures: list[BaseException] = []

    def lead() -> None:
        try:
            leader(7)
        except RuntimeError as exc:
            failures.append(exc)

    thread = threading.Thread(target=lead)
    thread.start()
    try:
        assert started.wait(10)
        threading.Timer(0.1, release.set).start()
        with pytest.raises(LeaderFailedError, match="the database is down"):
            waiter(7)
    finally:
        release.set()
        thread.join(10)
    assert (6, 8) in layouts  # entry, lease, waiters, failed, handed, one tag set
    assert len(failures) == 1  # the leader's own caller got its exception
