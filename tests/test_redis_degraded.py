"""Redis unavailable or overloaded: bounded recovery time, bounded connections, and the local
fallback a fail-open cache serves from meanwhile (issue 9, items 8-10).

Real redis-server processes: killed, restarted, or frozen with SIGSTOP (always resumed in a
`finally`). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from redis_servers import RedisServer, take_connection

from coalesce import Cache
from coalesce.entry import Entry
from coalesce.errors import BackendError
from coalesce.stores.base import Fence
from coalesce.stores.redis import RedisStore
from coalesce.stores.redis.connection import DEFAULT_MAX_CONNECTIONS


def _wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "condition not reached in time"
        time.sleep(0.005)
    return time.monotonic() - started


@contextlib.contextmanager
def _frozen(server: RedisServer) -> Iterator[None]:
    """The server hangs (SIGSTOP) inside the block, and always resumes after it."""
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


class FakeClock:
    """Monotonic seconds that move only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _store(cache: Cache) -> RedisStore:
    store = cache.store
    assert isinstance(store, RedisStore)
    return store


# -- item 9: recovery is noticed within about a second ---------------------------------------


def test_recovery_after_a_long_outage_is_noticed_within_a_second(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    """However long Redis was gone (20 s here, on the breaker's fake clock), the breaker
    lets a probe through at least once a second: the first call at most a second after
    Redis is back uses it again. (The old backoff reached 10 s.)"""
    cache = Cache(fresh_redis.url, namespace=unique_namespace)
    store = _store(cache)
    clock = FakeClock()
    store.breaker.clock = clock
    key = cache.prefix + "k"
    assert store.get(key) is None  # connected
    fresh_redis.kill()
    failures = 0
    while clock.now < 1020.0:  # a 20 s outage: a call every 100 ms fails (fast or probing)
        with contextlib.suppress(BackendError):
            store.get(key)
            raise AssertionError("Redis is down")
        failures += 1
        clock.now += 0.1
    assert store.breaker.state == "open" and failures == 200
    assert store.breaker.retry_in() <= 1.0
    fresh_redis.start()
    back = clock.now
    while True:  # bounded: the probe must go out within a second of fake time
        assert clock.now - back <= 1.05, "no probe within a second after Redis came back"
        try:
            assert store.get(key) is None
            break
        except BackendError:
            clock.now += 0.05
    assert store.breaker.state == "closed"
    cache.close()


def test_a_hung_redis_is_used_again_within_two_seconds_of_resuming(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    """SIGSTOP for 5 s (on the breaker's fake clock; every call that reaches Redis still
    waits for its real socket timeout) under steady calls, then SIGCONT: the cache reads
    Redis again (breaker closed, a fresh entry served from Redis) within 2 s."""
    cache = Cache(fresh_redis.url, namespace=unique_namespace, socket_timeout=0.25)
    store = _store(cache)
    clock = FakeClock()
    store.breaker.clock = clock
    calls = [0]

    @cache.cached(ttl=60, key="v")
    def v() -> int:
        calls[0] += 1
        return 7

    assert v() == 7
    with _frozen(fresh_redis):
        hung = clock.now
        while clock.now - hung < 5.0:  # the old backoff: 4 s more after a 5 s hang
            assert v() == 7
            clock.now += 0.02
        assert store.breaker.state == "open"
    resumed = clock.now
    while store.breaker.state != "closed":
        assert clock.now - resumed < 2.0, "Redis not used again within 2 s"
        assert v() == 7
        clock.now += 0.02
    assert store.get(cache.prefix + "v") is not None  # read from Redis itself
    cache.close()


def test_the_listener_subscribing_again_makes_the_next_call_probe() -> None:
    from coalesce.stores.redis.breaker import CircuitBreaker

    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, cooldown=0.5, max_cooldown=1.0, clock=clock)
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    breaker.probe_now()
    assert breaker.allow()  # without the clock moving


# -- item 10: connection pools are bounded by default ----------------------------------------


def test_many_threads_and_tasks_never_open_more_than_the_bound(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    """An invalidation storm from 90 threads and 90 tasks while Redis stalls for a moment:
    every caller wants a connection at once. The pools we create stop at
    `DEFAULT_MAX_CONNECTIONS` each (one sync pool, one per event loop); callers beyond wait
    for a free connection instead of opening more."""
    cache = Cache(fresh_redis.url, namespace=unique_namespace, socket_timeout=5.0)
    admin = fresh_redis.client()
    stop = threading.Event()
    done = [0]
    errors: list[BaseException] = []

    def storm(i: int) -> None:
        try:
            while not stop.is_set():
                cache.invalidate(f"k{i % 7}")
                done[0] += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    async def astorm(i: int) -> None:
        while not stop.is_set():
            await cache.ainvalidate(f"a{i % 7}")
            done[0] += 1

    def run_tasks() -> None:
        async def main() -> None:
            await asyncio.gather(*(astorm(i) for i in range(90)))
            await cache.aclose()

        try:
            asyncio.run(main())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=storm, args=(i,)) for i in range(90)]
    workers.append(threading.Thread(target=run_tasks))
    for worker in workers:
        worker.start()
    try:
        _wait_until(lambda: done[0] > 500)
        with _frozen(fresh_redis):
            time.sleep(0.5)  # every caller now waits for Redis, holding a connection or not
        _wait_until(lambda: done[0] > 2000)
        clients = len(admin.client_list()) - 1  # minus the admin connection itself
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    assert not errors, errors[:3]
    assert not any(worker.is_alive() for worker in workers)
    # one sync pool, one pool for the one event loop, and the admin's own
    assert clients <= 2 * DEFAULT_MAX_CONNECTIONS, clients
    admin.close()
    cache.close()


def test_a_full_pool_degrades_like_a_store_failure_without_opening_the_breaker(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    """With every connection taken for longer than callers wait for one, a call fails like
    any store failure (fail-open: computed; the store raises `BackendError`), but Redis did
    not fail: the breaker stays closed."""
    cache = Cache(
        fresh_redis.url, namespace=unique_namespace, max_connections=1, socket_timeout=0.5
    )
    store = _store(cache)
    key = cache.prefix + "k"
    assert store.get(key) is None
    conn = store._conn
    pool = conn.sync().connection_pool
    held = take_connection(pool)  # the only connection
    try:
        started = time.monotonic()
        with pytest.raises(BackendError, match="No connection available"):
            store.get(key)
        assert time.monotonic() - started >= 0.4  # it waited (socket_timeout), not refused
    finally:
        pool.release(held)
    assert store.breaker.state == "closed" and store.breaker.failures == 0
    assert store.get(key) is None
    cache.close()


# -- item 8: the fallback of a fail-open cache (store level) ---------------------------------


def test_fallback_keeps_what_was_computed_during_an_outage_within_its_bounds(
    redis_url: str, unique_namespace: str
) -> None:
    cache = Cache(redis_url, namespace=unique_namespace, fallback_ttl=5)
    store = _store(cache)
    key = cache.prefix + "k"
    assert store.fallback(key) is None
    assert store.remember(key, Entry({"v": 1}, ttl=60))
    served = store.fallback(key)
    assert served is not None and served.value.thaw() == {"v": 1}
    assert served.fresh_until <= time.time() + 5.0  # fallback_ttl, not the entry's 60 s
    assert not store.remember(key, Entry(1, created=time.time() - 10, ttl=5))  # expired
    fence = Fence()
    fence.valid = False
    assert not store.remember(cache.prefix + "fenced", Entry(1, ttl=60), fence=fence)
    assert store.fallback(cache.prefix + "fenced") is None
    store.breaker.failure()
    store.breaker.success()  # Redis answers again: a healthy Redis is read first
    assert store.fallback(key) is None
    cache.close()


def test_invalidating_drops_the_fallback_copy_even_when_redis_is_down(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    cache = Cache(fresh_redis.url, namespace=unique_namespace)
    store = _store(cache)
    key, other = cache.prefix + "k", cache.prefix + "t"
    fresh_redis.kill()
    store.remember(key, Entry(1, ttl=60))
    store.remember(other, Entry(2, ttl=60, tags=(cache.prefix + "team",)))
    with pytest.raises(BackendError):
        cache.invalidate("k")  # the delete did not happen, and says so ...
    assert store.fallback(key) is None  # ... but this process no longer serves the copy
    with pytest.raises(BackendError):
        cache.invalidate_tag("team")
    assert store.fallback(other) is None
    cache.close()


# -- item 8: a Redis outage does not multiply the load (needs the Cache wiring) --------------


def test_a_hung_redis_keeps_computations_bounded_and_values_correct(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    """8 threads call a hot key (ttl 1 s) without pause while Redis hangs for 2 s: the
    process computes it about once per ttl window (served from the fallback in between,
    coalesced when it is due), not on every call; afterwards Redis is used again."""
    cache = Cache(fresh_redis.url, namespace=unique_namespace, socket_timeout=0.25)
    store = _store(cache)
    computed = [0]
    lock = threading.Lock()

    @cache.cached(ttl=1, key="hot:{n}")
    def hot(n: int) -> dict[str, int]:
        with lock:
            computed[0] += 1
        time.sleep(0.01)  # a database query
        return {"n": n}

    assert hot(3) == {"n": 3}
    stop = threading.Event()
    served = [0]
    wrong: list[object] = []

    def caller() -> None:
        while not stop.is_set():
            value = hot(3)
            if value != {"n": 3}:
                wrong.append(value)
            served[0] += 1

    before = computed[0]
    threads = [threading.Thread(target=caller) for _ in range(8)]
    with _frozen(fresh_redis):
        for thread in threads:
            thread.start()
        try:
            time.sleep(2.0)  # real time: entries and the fallback expire on the wall clock
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)
        during = computed[0] - before
    assert not wrong and served[0] > 100
    assert during <= 5, during  # once at the start, then about once per 1 s window
    assert store.stats()["fallback_hits"] > 0
    resumed = time.monotonic()
    while store.breaker.state != "closed":
        assert time.monotonic() - resumed < 2.0, "Redis not used again within 2 s"
        assert hot(3) == {"n": 3}
        time.sleep(0.02)
    assert hot(4) == {"n": 4}
    assert store.get(cache.prefix + "hot:4") is not None  # stored in Redis again
    assert store.fallback(cache.prefix + "hot:3") is None  # the fallback is dropped
    cache.close()


async def test_async_callers_of_a_dead_redis_compute_once_per_window(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    cache = Cache(fresh_redis.url, namespace=unique_namespace)
    computed = [0]

    @cache.cached(ttl=30, key="a")
    async def a() -> str:
        computed[0] += 1
        await asyncio.sleep(0.01)
        return "value"

    assert await a() == "value"
    listener = _store(cache)._listener
    assert listener.ready.wait(10)
    resets = listener.resets
    fresh_redis.kill()
    # The pub/sub drop detaches the flights in progress (by design: see listener.py); wait
    # for it, so that it cannot detach the outage's computation from its later callers.
    # The listener's failed attempts to reconnect, which follow, must not detach it either.
    _wait_until(lambda: listener.resets != resets)
    for _ in range(20):
        assert await asyncio.gather(*(a() for _ in range(20))) == ["value"] * 20
    assert computed[0] == 2  # once before, once for the outage
    assert cache.backend_errors > 0  # still counted
    with pytest.raises(BackendError):
        await cache.ainvalidate("a")  # not deleted in Redis, and says so ...
    assert await a() == "value"
    assert computed[0] == 3  # ... but never served again from the local copy
    await cache.aclose()


async def test_failed_reconnects_during_an_outage_do_not_detach_its_computation(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    """Only the pub/sub drop detaches the flights in progress: the listener's attempts to
    reconnect to a dead Redis, which never get subscribed, heard nothing new. A computation
    on the fallback path that outlasts two of them keeps every later caller."""
    cache = Cache(fresh_redis.url, namespace=unique_namespace)
    listener = _store(cache)._listener
    computed = [0]
    target = [0]

    @cache.cached(ttl=30, key="a")
    async def a() -> str:
        computed[0] += 1
        while listener.resets < target[0]:  # computing across the listener's next attempts
            await asyncio.sleep(0.005)
        return "value"

    assert await a() == "value"
    assert listener.ready.wait(10)
    resets = listener.resets
    fresh_redis.kill()
    _wait_until(lambda: listener.resets != resets)  # the drop (which detaches, by design)
    target[0] = listener.resets + 2  # two failed attempts to reconnect
    callers = [asyncio.create_task(a())]
    deadline = time.monotonic() + 10
    while not callers[0].done():
        assert time.monotonic() < deadline, "the listener stopped trying to reconnect"
        callers.append(asyncio.create_task(a()))
        await asyncio.sleep(0.005)
    assert await asyncio.wait_for(asyncio.gather(*callers), 10) == ["value"] * len(callers)
    assert listener.resets >= target[0]
    assert computed[0] == 2  # once before, once for the outage
    await cache.aclose()


def test_failing_closed_is_unchanged(fresh_redis: RedisServer, unique_namespace: str) -> None:
    cache = Cache(fresh_redis.url, namespace=unique_namespace, on_backend_error="raise")
    calls = [0]

    @cache.cached(ttl=30, key="k")
    def k() -> int:
        calls[0] += 1
        return 1

    assert k() == 1
    _store(cache).remember(cache.prefix + "k", Entry(1, ttl=30))
    fresh_redis.kill()
    for _ in range(3):
        with pytest.raises(BackendError):
            k()
    assert calls[0] == 1
    cache.close()


# -- the fallback never serves a value older than this process's own invalidation ------------


def test_a_flight_detached_by_a_pubsub_drop_cannot_land_in_the_fallback_after_invalidate(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    """A pub/sub drop detaches the flights in progress (their fences stay valid); an
    invalidation of the key then completes; the detached computation's STORE fails (a busy
    pool): its pre-invalidation value must not be kept for the calls that follow."""
    cache = Cache(
        fresh_redis.url, namespace=unique_namespace, max_connections=1, socket_timeout=0.3
    )
    store = _store(cache)
    admin = fresh_redis.client()
    db = {"v": "v1"}
    computing, release = threading.Event(), threading.Event()

    @cache.cached(ttl=30, key="doc")
    def doc() -> str:
        value = db["v"]
        if not computing.is_set():
            computing.set()
            release.wait(10)
        return value

    got: list[str] = []
    leader = threading.Thread(target=lambda: got.append(doc()))
    leader.start()
    assert computing.wait(5) and store._listener.ready.wait(5)
    resets = store._listener.resets
    admin.client_kill_filter(_type="pubsub")
    _wait_until(lambda: store._listener.resets != resets)
    db["v"] = "v2"
    cache.invalidate("doc")  # deletes the lease (no entry yet)
    pool = store._conn.sync().connection_pool
    held = take_connection(pool)  # from now on the store fails: the fallback answers
    try:
        release.set()
        leader.join(10)
        assert got == ["v1"]  # its own caller gets what it computed
        assert doc() == "v2"  # never the value from before the invalidation
    finally:
        pool.release(held)
        admin.close()
        cache.close()


def test_a_computation_on_the_failed_path_cannot_land_after_invalidate_tag(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    """A read fails (busy pool), the caller computes on the failed path; `invalidate_tag` of
    one of its tags completes meanwhile: the value must not be kept in the fallback."""
    cache = Cache(
        fresh_redis.url, namespace=unique_namespace, max_connections=1, socket_timeout=0.3
    )
    store = _store(cache)
    db = {"v": "v1"}
    computing, release = threading.Event(), threading.Event()

    @cache.cached(ttl=30, key="doc", tags=["t"])
    def doc() -> str:
        value = db["v"]
        if not computing.is_set():
            computing.set()
            release.wait(10)
        return value

    pool = store._conn.sync().connection_pool
    store.get(cache.prefix + "warm")  # the one connection exists
    held = take_connection(pool)
    got: list[str] = []
    caller = threading.Thread(target=lambda: got.append(doc()))
    caller.start()
    try:
        assert computing.wait(5)  # its read failed: it computes v1
    finally:
        pool.release(held)
    db["v"] = "v2"
    assert cache.invalidate_tag("t") == 0  # nothing stored yet; the tag is dropped here too
    release.set()
    caller.join(10)
    assert got == ["v1"]
    held = take_connection(pool)  # the store fails again
    try:
        assert doc() == "v2"
    finally:
        pool.release(held)
        cache.close()
