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
from redis_servers import RedisServer

from coalesce import Cache
from coalesce.errors import BackendError
from coalesce.stores.redis import RedisStore
from coalesce.stores.redis_client import DEFAULT_MAX_CONNECTIONS


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


def _store(cache: Cache) -> RedisStore:
    store = cache.store
    assert isinstance(store, RedisStore)
    return store


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
        fresh_redis.url, namespace=unique_namespace, max_connections=1, socket_timeout=2.0
    )
    store = _store(cache)
    key = cache.prefix + "k"
    assert store.get(key) is None
    conn = store._conn
    pool = conn.sync().connection_pool
    held = pool.get_connection()  # the only connection
    try:
        started = time.monotonic()
        with pytest.raises(BackendError, match="No connection available"):
            store.get(key)
        assert time.monotonic() - started >= 1.5  # it waited (socket_timeout), not refused
    finally:
        pool.release(held)
    assert store.breaker.state == "closed" and store.breaker.failures == 0
    assert store.get(key) is None
    cache.close()
