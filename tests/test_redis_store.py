"""The Redis store through the public API (`Cache(url)` + `@cache.cached`), on real servers.

Two `Cache` instances in one process have separate in-process flights, so they meet only in
Redis, like two processes: that is how the waiting, take-over and failure paths are driven
here quickly; `test_redis_processes.py` does the same with real OS processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis_servers import RedisServer, free_port

from coalesce.cache import Cache
from coalesce.entry import Entry
from coalesce.errors import (
    BackendError,
    ConfigurationError,
    LeaderFailedError,
    ReentrantCallError,
    SerializationError,
)
from coalesce.serialization import MsgpackSerializer, encode_entry
from coalesce.stores.redis import RedisStore, redact
from coalesce.stores.redis.scripts import CLAIM, PUSH_MAX, STORE, KeyLayout, pushed_entry
from coalesce.testing import FakeClock


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def caches(redis_caches: Callable[..., Cache]) -> Callable[..., Cache]:
    """`Cache(redis_url, namespace=unique_namespace, **options)`s, closed afterwards."""
    return redis_caches


def only_namespace(client: redis.Redis, ns: str) -> None:
    """Nothing we wrote lies outside `ns:` (SCAN the whole database)."""
    stray = [k for k in client.scan_iter(match=f"*{ns}*") if not k.startswith(f"{ns}:".encode())]
    assert stray == []


def commandstats(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {k[len("cmdstat_") :]: v["calls"] for k, v in stats.items()}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Data commands run between two snapshots (not connection set-up by the listener)."""
    changed = {k: v - before.get(k, 0) for k, v in after.items()}
    ignored = ("info", "config", "hello", "ping", "psubscribe", "subscribe", "client")
    return {k: v for k, v in changed.items() if v and not k.startswith(ignored)}


# -- construction ---------------------------------------------------------------------------


def test_constructing_and_decorating_do_not_connect() -> None:
    cache = Cache("redis://127.0.0.1:1/0", namespace="never")  # nothing listens on port 1

    @cache.cached(ttl=10)
    def f() -> int:
        return 1

    assert isinstance(cache.store, RedisStore)
    assert cache.store._conn._sync_client is None and cache.store._conn._loops == {}
    assert f() == 1  # the first call connects, fails, and computes directly (fail-open)
    cache.close()


def test_redact_hides_passwords() -> None:
    assert redact("redis://u:secret@h:1/0") == "redis://u:***@h:1/0"
    assert redact("redis://:secret@h:1/0") == "redis://:***@h:1/0"
    assert "secret" not in redact("unix:///tmp/r.sock?db=0&password=secret")
    assert redact("redis://h:1/0") == "redis://h:1/0"
    # generated secrets hold / ? # +: urllib would take part of them for the port or path
    for secret in ("Zm9v/YmFy+", "a#b?c", "p@ss/w?rd#x"):
        shown = redact(f"redis://user:{secret}@h:1/0")
        assert shown == "redis://user:***@h:1/0"
        assert not any(part in shown for part in ("Zm9v", "YmFy", "a#b", "ss/w", "rd#x"))
    assert redact("redis://token@h/0") == "redis://***@h/0"
    assert "pw" not in redact("rediss://h/0?ssl_certfile=/c.pem&ssl_password=pw")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://:Zm9v/YmFy+@127.0.0.1:6390/0", "percent-encoded"),
        ("redis://h:99999/0", "Port out of range"),
        ("redis://h:abc/0", "Port"),
        ("redis://h/x", "database"),
        ("redis://h/0?socket_timeout=zz", "socket_timeout"),
        ("redis://:s3cret@[::1", "IPv6"),
    ],
)
def test_a_bad_redis_url_is_refused_when_the_cache_is_built(url: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid Redis URL") as info:
        Cache(url)
    assert problem in str(info.value)
    assert not any(secret in str(info.value) for secret in ("Zm9v", "YmFy", "s3cret"))


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"socket_timeout": float("nan")}, "socket_timeout"),
        ({"lease_ttl": float("inf")}, "lease_ttl"),
        ({"wait_check": 1e300}, "wait_check"),
        ({"client": "redis://h"}, "client must be a redis-py client"),
        ({"async_client": redis.Redis()}, "async_client must be a redis-py client"),
    ],
)
def test_bad_redis_options_are_refused_when_the_cache_is_built(
    options: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        Cache("redis://127.0.0.1:1/0", **options)


def test_password_in_url_and_error_messages_without_it(unique_namespace: str) -> None:
    with RedisServer(password="s3cret") as server:
        cache = Cache(server.url, namespace=unique_namespace)
        calls = []

        @cache.cached(ttl=30)
        def f() -> str:
            calls.append(1)
            return "ok"

        assert f() == f() == "ok" and len(calls) == 1
        bad = RedisStore(server.url.replace("s3cret", "wrong"), namespace=unique_namespace)
        with pytest.raises(BackendError) as info:
            bad.get(unique_namespace + ":x")
        assert "s3cret" not in str(info.value) and "wrong" not in str(info.value)
        assert "127.0.0.1" in str(info.value)
        bad.close()
        cache.close()


def test_existing_clients_are_used(redis_url: str, unique_namespace: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    cache = Cache(redis_url, namespace=unique_namespace, client=sync)

    @cache.cached(ttl=30)
    def f(x: int) -> int:
        return x + 1

    assert f(1) == 2 and f(1) == 2
    assert cache.store._conn._sync_client is sync
    cache.close()
    assert sync.ping()  # a given client is not closed by the store
    sync.close()


async def test_existing_async_client_is_used(redis_url: str, unique_namespace: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    cache = Cache(redis_url, namespace=unique_namespace, async_client=client)

    @cache.cached(ttl=30)
    async def f(x: int) -> int:
        return x + 1

    assert await f(1) == 2 and await f(1) == 2
    assert cache.store._conn.loop_state().client is client
    await cache.aclose()
    assert await client.ping()
    await client.aclose()


def test_unix_socket_url(unique_namespace: str, tmp_path: Any) -> None:
    sock = tmp_path / "redis.sock"
    with RedisServer(extra_args=["--unixsocket", str(sock), "--unixsocketperm", "700"]) as srv:
        assert srv.is_running()
        cache = Cache(f"unix://{sock}?db=0", namespace=unique_namespace)

        @cache.cached(ttl=30)
        def f() -> str:
            return "via unix"

        assert f() == "via unix"
        assert cache.keys() != []
        cache.close()


# -- the hot path ---------------------------------------------------------------------------


def test_sync_hit_is_exactly_one_get(fresh_redis: RedisServer, unique_namespace: str) -> None:
    cache = Cache(fresh_redis.url, namespace=unique_namespace)
    calls = []

    @cache.cached(ttl=30, key="user:{uid}")
    def user(uid: int) -> dict[str, Any]:
        calls.append(uid)
        return {"id": uid, "roles": ["a", "b"]}

    assert user(42) == {"id": 42, "roles": ["a", "b"]}
    assert user(42) == {"id": 42, "roles": ["a", "b"]}  # after a miss: a CLAIM (test_miss_streak)
    client = fresh_redis.client()
    before = commandstats(client)
    for _ in range(10):
        value = user(42)
        value["roles"].append("mine")  # a private copy each time
    assert delta(before, commandstats(client)) == {"get": 10}
    assert user(42) == {"id": 42, "roles": ["a", "b"]} and calls == [42]
    raw_value = client.get(f"{unique_namespace}:{{user:42}}")
    assert raw_value is not None  # the documented layout: ns:{key}
    client.close()
    cache.close()


async def test_async_hit_is_one_get_shared_by_concurrent_callers(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    cache = Cache(fresh_redis.url, namespace=unique_namespace)

    @cache.cached(ttl=30, key="item:{i}")
    async def item(i: int) -> list[int]:
        return [i, i]

    assert await item(3) == [3, 3]
    assert await item(3) == [3, 3]  # after a miss: a CLAIM (test_miss_streak)
    client = fresh_redis.client()
    before = commandstats(client)
    results = await asyncio.gather(*[item(3) for _ in range(25)])
    assert delta(before, commandstats(client)) == {"get": 1}
    assert results == [[3, 3]] * 25
    assert len({id(r) for r in results}) == 25  # every caller has its own copy
    before = commandstats(client)
    assert await item(3) == [3, 3]
    assert delta(before, commandstats(client)) == {"get": 1}
    client.close()
    await cache.aclose()


async def test_cancelled_first_reader_does_not_break_the_others(
    caches: Callable[..., Cache], unique_namespace: str
) -> None:
    cache = caches()
    store = cache.store
    assert isinstance(store, RedisStore)
    key = unique_namespace + ":k"
    await store.aset(key, Entry("v", ttl=30))
    first = asyncio.ensure_future(store.aget(key))
    await asyncio.sleep(0)  # the first reader has sent its GET
    others = [asyncio.ensure_future(store.aget(key)) for _ in range(5)]
    await asyncio.sleep(0)
    first.cancel()
    entries = await asyncio.gather(*others)
    assert all(e is not None and e.value == "v" for e in entries)
    assert first.cancelled() or (first.result() is not None)


def test_threads_share_one_get(fresh_redis: RedisServer, unique_namespace: str) -> None:
    """Threads reading one key at the same moment send one GET and each get its own copy.

    `CLIENT PAUSE` holds the first GET in Redis while the other threads arrive, so they
    overlap for sure; `INFO commandstats` counts the GETs that reached Redis.
    """
    cache = Cache(fresh_redis.url, namespace=unique_namespace)
    store = cache.store
    assert isinstance(store, RedisStore)
    key = unique_namespace + ":t"
    store.set(key, Entry({"a": 1}, ttl=30))
    admin = fresh_redis.client()
    admin.config_resetstat()
    barrier = threading.Barrier(9)
    out: list[Any] = []

    def read() -> None:
        barrier.wait()
        entry = store.get(key)
        out.append(entry.value if entry else None)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    admin.execute_command("CLIENT", "PAUSE", 300, "ALL")
    barrier.wait()
    for t in threads:
        t.join(10)
    assert out == [{"a": 1}] * 8
    assert len({id(v) for v in out}) == 8
    assert admin.info("commandstats")["cmdstat_get"]["calls"] == 1
    admin.close()
    cache.close()


# -- corrupt and foreign values -------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage", [b"\xff\xfe not msgpack", b"\x93\x01\x02\x03", "plain text", None]
)
def test_corrupt_value_is_a_miss_and_replaced(
    caches: Callable[..., Cache], raw: redis.Redis, unique_namespace: str, garbage: Any
) -> None:
    cache = caches()
    redis_key = f"{unique_namespace}:{{page:1}}"
    if garbage is None:
        raw.hset(redis_key, "field", "a hash, not a string")
    else:
        raw.set(redis_key, garbage)
    calls = []

    @cache.cached(ttl=30, key="page:{n}")
    def page(n: int) -> str:
        calls.append(n)
        return f"page {n}"

    assert page(1) == "page 1"
    assert page(1) == "page 1"
    assert calls == [1]  # replaced by a valid entry on the first call
    entry = cache.get_entry("page:1")
    assert entry is not None and entry.value == "page 1"


async def test_corrupt_value_async(caches: Callable[..., Cache], raw: redis.Redis) -> None:
    cache = caches()
    raw.set(f"{cache.namespace}:{{a}}", b"junk")

    @cache.cached(ttl=30, key="a")
    async def a() -> int:
        return 1

    assert await a() == 1
    assert cache.store.stats()["corrupt"] >= 1
    await cache.aclose()


def test_pickle_entries_are_never_read_by_a_msgpack_cache(
    caches: Callable[..., Cache], raw: redis.Redis
) -> None:
    writer = caches(serializer="pickle")
    reader = caches()

    @writer.cached(ttl=30, key="p")
    def w() -> str:
        return "pickled"

    @reader.cached(ttl=30, key="p")
    def r() -> str:
        return "msgpack"

    assert w() == "pickled"
    assert r() == "msgpack"  # the pickle entry was a miss, never unpickled


# -- fill across "processes" (two caches) ---------------------------------------------------


def test_waiter_gets_the_leaders_value_by_push(caches: Callable[..., Cache]) -> None:
    # Without the push the waiter would sleep 30 s (its `wait_check`, and a's lease): so an
    # answer within 10 s on however loaded a machine shows that the push woke it.
    a, b = caches(lease_ttl=30), caches(wait_check=30)
    _subscribed(b)
    calls: list[str] = []

    def make(cache: Cache, name: str) -> Callable[[], str]:
        @cache.cached(ttl=30, key="shared")
        def shared() -> str:
            calls.append(name)
            started_event.set()
            _until(lambda: b.store.stats()["waits"] >= 1, "b waits for this lease")
            return f"from {name}"

        return shared  # type: ignore[no-any-return]

    started_event = threading.Event()
    fa, fb = make(a, "a"), make(b, "b")
    got: list[str] = []
    t = threading.Thread(target=lambda: got.append(fa()))
    t.start()
    assert started_event.wait(5)
    started = time.monotonic()
    assert fb() == "from a"
    waited = time.monotonic() - started
    t.join(5)
    assert got == ["from a"] and calls == ["a"]
    assert waited < 10  # woken by the push, not by the 30 s fallback check
    assert b.store.stats()["waits"] == 1
    assert b.store.stats()["pushed"] == 1  # the wake-up carried the entry: no second CLAIM


def _until(condition: Callable[[], bool], what: str) -> None:
    """Wait (a bounded poll, not a timing assertion) until `condition()` holds."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.002)


async def _auntil(condition: Callable[[], bool], what: str) -> None:
    """`_until` for async tests: the loop keeps running while it polls."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.002)


def _subscribed(cache: Cache) -> None:
    """Start `cache`'s listener and wait for its subscriptions: pushes then reach it."""
    store = cache.store
    assert isinstance(store, RedisStore)
    store._listener.start()
    assert store._listener.ready.wait(10)


def _load_scripts(client: redis.Redis) -> None:
    """Load the scripts beforehand, so that counted commands hold no SCRIPT LOAD retry."""
    for script in (CLAIM, STORE):
        client.script_load(script.source)


@pytest.mark.parametrize("size", ["small", "large"])
def test_waiter_takes_the_entry_from_the_wake_up_without_asking_redis(
    fresh_redis: RedisServer, unique_namespace: str, size: str
) -> None:
    """A small entry travels in the wake-up: after it, the waiter sends no command at all
    (commandstats: only the leader's STORE). A large one is announced by a marker and read by
    the waiter's CLAIM."""
    value: Any = {"id": 7, "name": "Ada"} if size == "small" else "x" * (PUSH_MAX + 1000)
    options = {"namespace": unique_namespace, "lease_ttl": 60.0, "wait_check": 60.0}
    a, b = Cache(fresh_redis.url, **options), Cache(fresh_redis.url, **options)
    client = fresh_redis.client()
    _load_scripts(client)
    started, release = threading.Event(), threading.Event()
    try:

        @a.cached(ttl=30, key="k")
        def fa() -> Any:
            started.set()
            assert release.wait(30)
            return value

        @b.cached(ttl=30, key="k")
        def fb() -> Any:
            raise AssertionError("the waiter computed")

        _subscribed(b)
        leader = threading.Thread(target=fa)
        leader.start()
        assert started.wait(10)
        got: list[Any] = []
        waiter = threading.Thread(target=lambda: got.append(fb()))
        waiter.start()
        _until(lambda: b.store.stats()["waits"] == 1, "the waiter parked on the lease")
        before = commandstats(client)
        release.set()
        waiter.join(10)
        leader.join(10)
        after = delta(before, commandstats(client))
        assert got == [value]
        if size == "small":
            # STORE: GET the lease, DEL it with the waiters flag, SET the entry, PUBLISH it
            assert after == {"evalsha": 1, "get": 1, "del": 1, "set": 1, "publish": 1}
            assert b.store.stats()["pushed"] == 1
        else:
            assert after["evalsha"] == 2  # STORE, then the waiter's CLAIM finds the entry
            assert b.store.stats()["pushed"] == 0
        assert b.store.stats()["leads"] == 0 and a.store.stats()["leads"] == 1
    finally:
        release.set()
        client.close()
        a.close()
        b.close()


async def test_async_waiter_takes_the_entry_from_the_wake_up(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    a = Cache(fresh_redis.url, namespace=unique_namespace, lease_ttl=60.0, wait_check=60.0)
    b = Cache(fresh_redis.url, namespace=unique_namespace, lease_ttl=60.0, wait_check=60.0)
    client = fresh_redis.client()
    _load_scripts(client)
    started, release = asyncio.Event(), asyncio.Event()

    @a.cached(ttl=30, key="k")
    async def fa() -> list[int]:
        started.set()
        await release.wait()
        return [1, 2, 3]

    @b.cached(ttl=30, key="k")
    async def fb() -> list[int]:
        raise AssertionError("the waiter computed")

    try:
        _subscribed(b)
        leader = asyncio.ensure_future(fa())
        await asyncio.wait_for(started.wait(), 10)
        waiter = asyncio.ensure_future(fb())
        while b.store.stats()["waits"] == 0:
            await asyncio.sleep(0.002)
        before = commandstats(client)
        release.set()
        assert await asyncio.wait_for(waiter, 10) == [1, 2, 3]
        assert await asyncio.wait_for(leader, 10) == [1, 2, 3]
        assert delta(before, commandstats(client)) == {
            "evalsha": 1,
            "get": 1,
            "del": 1,
            "set": 1,
            "publish": 1,
        }
        assert b.store.stats()["pushed"] == 1
    finally:
        release.set()
        client.close()
        await a.aclose()
        await b.aclose()


def test_waiter_ignores_foreign_and_corrupt_pushes(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    """Only the entry pushed by the leader of the lease it waits for is taken: a value
    message carrying another token, or unreadable bytes, sends the waiter back to CLAIM."""
    options = {"namespace": unique_namespace, "lease_ttl": 60.0, "wait_check": 60.0}
    a, b = Cache(fresh_redis.url, **options), Cache(fresh_redis.url, **options)
    client = fresh_redis.client()
    _load_scripts(client)
    started, release = threading.Event(), threading.Event()
    channel = f"{unique_namespace}:{{k}}:done"
    try:

        @a.cached(ttl=30, key="k")
        def fa() -> str:
            started.set()
            assert release.wait(30)
            return "from the leader"

        @b.cached(ttl=30, key="k")
        def fb() -> str:
            raise AssertionError("the waiter computed")

        _subscribed(b)
        leader = threading.Thread(target=fa)
        leader.start()
        assert started.wait(10)
        got: list[str] = []
        waiter = threading.Thread(target=lambda: got.append(fb()))
        waiter.start()
        _until(lambda: b.store.stats()["waits"] == 1, "the waiter parked on the lease")
        token = client.get(f"{unique_namespace}:{{k}}:lease")
        assert token is not None
        forged = encode_entry(Entry("forged", time.time(), 30.0), MsgpackSerializer())
        for message in (b"v" + b"f" * 32 + b"|" + forged, b"v" + token + b"|not an entry"):
            claims = commandstats(client).get("evalsha", 0)
            assert client.publish(channel, message) >= 1
            _until(
                lambda claims=claims: commandstats(client).get("evalsha", 0) > claims,
                "the waiter checked Redis again",
            )
        release.set()
        waiter.join(10)
        leader.join(10)
        assert got == ["from the leader"]
        assert b.store.stats()["pushed"] == 1
    finally:
        release.set()
        client.close()
        a.close()
        b.close()


def test_store_pushes_entries_only_for_leases_somebody_waits_for(
    caches: Callable[..., Cache], raw: redis.Redis
) -> None:
    cache = caches()
    pubsub = raw.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.subscribe(f"{cache.namespace}:{{alone}}:done")
    _until(lambda: raw.pubsub_numsub(f"{cache.namespace}:{{alone}}:done")[0][1] == 1, "subscribed")

    @cache.cached(ttl=30, key="alone")
    def alone() -> int:
        return 1

    assert alone() == 1
    raw.publish(f"{cache.namespace}:{{alone}}:done", "after")  # heard after any wake-up
    message = None
    deadline = time.monotonic() + 10
    while message is None and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
    pubsub.close()
    assert message is not None and message["data"] == b"after"  # nobody waited: no wake-up


def test_pushed_entry_takes_only_the_awaited_leases_entry() -> None:
    assert pushed_entry(b"vabc|data", "abc") == b"data"
    assert pushed_entry(b"vabc|", "abc") == b""
    assert pushed_entry(b"vabd|data", "abc") is None  # another lease's leader
    assert pushed_entry(b"vabcd|data", "abc") is None
    assert pushed_entry(b"s", "abc") is None  # markers: s, d, r, f
    assert pushed_entry(b"vabc|data", "") is None
    assert pushed_entry(None, "abc") is None


def test_own_invalidation_does_not_fence_a_computation_begun_after_it(
    caches: Callable[..., Cache],
) -> None:
    """The broadcast of our own invalidate comes back to our listener later; the cache
    fenced its flights before deleting, so the echo must not fence a newer computation."""
    cache = caches()
    _subscribed(cache)
    store = cache.store
    assert isinstance(store, RedisStore)
    started, release = threading.Event(), threading.Event()

    @cache.cached(ttl=30, key="doc")
    def doc() -> str:
        started.set()
        assert release.wait(30)
        return "fresh"

    generation = store._listener.generation
    assert cache.invalidate("doc") is False
    t = threading.Thread(target=doc)
    t.start()
    assert started.wait(10)
    _until(lambda: store._listener.generation > generation, "the echo arrived")
    release.set()
    t.join(10)
    assert store.stats()["fenced"] == 0
    entry = cache.get_entry("doc")
    assert entry is not None and entry.value == "fresh"


async def test_async_waiter_and_leader_failure(caches: Callable[..., Cache]) -> None:
    a, b = caches(lease_ttl=30), caches(wait_check=30)  # fallback checks only after 30 s
    _subscribed(b)
    started_event = asyncio.Event()

    @a.cached(ttl=30, key="f")
    async def fa() -> int:
        started_event.set()
        await _auntil(lambda: b.store.stats()["waits"] >= 1, "b waits for this lease")
        raise KeyError("nope")

    @b.cached(ttl=30, key="f")
    async def fb() -> int:
        return 2

    leader = asyncio.ensure_future(fa())
    await asyncio.wait_for(started_event.wait(), 5)
    started = time.monotonic()
    with pytest.raises(LeaderFailedError) as info:
        await fb()
    assert time.monotonic() - started < 10  # woken by the failure, not the 30 s check
    assert info.value.exc_type == "KeyError" and "nope" in info.value.message
    with pytest.raises(KeyError):
        await leader
    assert await fb() == 2  # a later caller computes afresh


def test_sync_leader_cancel_like_exit_hands_over(caches: Callable[..., Cache]) -> None:
    """A leader leaving with a BaseException releases the lease: a waiter takes over."""
    a, b = caches(lease_ttl=30), caches(wait_check=30)  # fallback checks only after 30 s
    _subscribed(b)

    class Stop(BaseException):
        pass

    @a.cached(ttl=30, key="g")
    def fa() -> int:
        started_event.set()
        _until(lambda: b.store.stats()["waits"] >= 1, "b waits for this lease")
        raise Stop

    @b.cached(ttl=30, key="g")
    def fb() -> int:
        return 5

    started_event = threading.Event()

    def lead() -> None:
        with pytest.raises(Stop):
            fa()

    t = threading.Thread(target=lead)
    t.start()
    assert started_event.wait(5)
    started = time.monotonic()
    assert fb() == 5
    assert time.monotonic() - started < 10  # woken by the release, not the 30 s check
    t.join(5)
    assert b.store.stats()["takeovers"] == 1


async def test_async_leader_cancelled_hands_over(caches: Callable[..., Cache]) -> None:
    a, b = caches(lease_ttl=30), caches(wait_check=30)  # fallback checks only after 30 s
    _subscribed(b)

    @a.cached(ttl=30, key="h")
    async def fa() -> int:
        started_event.set()
        await asyncio.sleep(10)
        return 1

    @b.cached(ttl=30, key="h")
    async def fb() -> int:
        return 2

    started_event = asyncio.Event()
    leader = asyncio.ensure_future(fa())
    await asyncio.wait_for(started_event.wait(), 5)
    waiter = asyncio.ensure_future(fb())
    await _auntil(lambda: b.store.stats()["waits"] >= 1, "the waiter is parked on the lease")
    leader.cancel()
    started = time.monotonic()
    assert await asyncio.wait_for(waiter, 10) == 2  # woken by the release, not the 30 s check
    assert time.monotonic() - started < 10
    assert b.store.stats()["takeovers"] == 1


def test_lease_is_renewed_while_computing(caches: Callable[..., Cache], raw: redis.Redis) -> None:
    """A computation outliving its lease several times keeps it (renewed every third of
    it): the lease never lapses, and a caller elsewhere waits instead of taking over."""
    a, b = caches(lease_ttl=0.5), caches(lease_ttl=0.5)
    calls: list[str] = []
    started_event, release = threading.Event(), threading.Event()

    @a.cached(ttl=30, key="long")
    def fa() -> str:
        calls.append("a")
        started_event.set()
        assert release.wait(20)
        return "a"

    @b.cached(ttl=30, key="long")
    def fb() -> str:
        calls.append("b")
        return "b"

    t = threading.Thread(target=fa)
    t.start()
    assert started_event.wait(10)
    lease = f"{a.namespace}:{{long}}:lease"
    began = time.monotonic()
    while time.monotonic() - began < 1.25:  # two and a half lease lifetimes
        assert raw.pttl(lease) > 0, "the lease lapsed while its computation ran"
        time.sleep(0.05)
    waiter: list[str] = []
    w = threading.Thread(target=lambda: waiter.append(fb()))
    w.start()
    _wait_until(lambda: b.store.stats()["waits"] >= 1)  # type: ignore[attr-defined]
    release.set()
    t.join(10)
    w.join(10)
    assert waiter == ["a"] and calls == ["a"]  # no takeover: the lease never ran out
    assert raw.exists(lease) == 0  # released


# -- invalidation ---------------------------------------------------------------------------


def test_invalidate_fences_a_computation_in_flight(caches: Callable[..., Cache]) -> None:
    a, b = caches(), caches()
    version = ["v1"]

    @a.cached(ttl=30, key="doc")
    def doc_a() -> str:
        v = version[0]
        started_event.set()
        assert invalidated.wait(30)
        return v

    @b.cached(ttl=30, key="doc")
    def doc_b() -> str:
        return version[0]

    started_event, invalidated = threading.Event(), threading.Event()
    t = threading.Thread(target=doc_a)
    t.start()
    assert started_event.wait(5)
    version[0] = "v2"
    try:
        assert b.invalidate("doc") is False  # nothing stored yet
    finally:
        invalidated.set()
    t.join(5)
    assert doc_b() == "v2" and doc_a() == "v2"
    assert a.store.stats()["fenced"] == 1


def test_invalidate_returns_whether_it_existed(caches: Callable[..., Cache]) -> None:
    cache = caches()

    @cache.cached(ttl=30, key="x")
    def x() -> int:
        return 1

    assert cache.invalidate("x") is False
    x()
    assert cache.invalidate("x") is True
    assert cache.get_entry("x") is None


# -- tags -----------------------------------------------------------------------------------


def test_tags_delete_their_entries_and_expired_members_are_cleaned(
    caches: Callable[..., Cache], raw: redis.Redis
) -> None:
    cache = caches()
    ns = cache.namespace
    calls: list[tuple[int, str]] = []

    @cache.cached(ttl=0.2, key="short:{i}", tags=["grp"])
    def short(i: int) -> int:
        calls.append((i, "short"))
        return i

    @cache.cached(ttl=30, key="user:{uid}:orders", tags=["user:{uid}", "grp"])
    def orders(uid: int) -> list[int]:
        calls.append((uid, "orders"))
        return [uid]

    short(1), short(2)
    tag_key = f"{ns}:tag:{{grp}}"
    assert raw.zcard(tag_key) == 2
    time.sleep(0.25)  # real time: the members' scores are Redis's expiry times
    orders(42)
    orders(43)
    assert sorted(raw.zrange(tag_key, 0, -1)) == [
        f"{ns}:user:42:orders".encode(),
        f"{ns}:user:43:orders".encode(),
    ]  # the expired members were dropped
    assert 25_000 < raw.pttl(tag_key) <= 30_100  # the set lives as long as its last member
    assert cache.invalidate_tag("user:42") == 1
    assert orders(43) == [43] and orders(42) == [42]
    assert calls.count((42, "orders")) == 2 and calls.count((43, "orders")) == 1
    assert cache.invalidate_tag("grp") == 2
    assert cache.invalidate_tag("grp") == 0
    assert cache.keys() == []
    only_namespace(raw, ns)


async def test_tags_async(caches: Callable[..., Cache]) -> None:
    cache = caches()

    @cache.cached(ttl=30, key="a:{i}", tags=["t"])
    async def a(i: int) -> int:
        return i

    assert [await a(i) for i in range(5)] == list(range(5))
    assert await cache.ainvalidate_tag("t") == 5
    assert await cache.ainvalidate("a:1") is False
    await cache.aclose()


def test_keys_lists_only_entries_in_the_namespace(
    caches: Callable[..., Cache], raw: redis.Redis
) -> None:
    cache = caches()
    other = Cache(cache.url, namespace=cache.namespace + "x")

    @cache.cached(ttl=30, key="user:{i}", tags=["all"])
    def user(i: int) -> int:
        return i

    @other.cached(ttl=30, key="user:{i}")
    def other_user(i: int) -> int:
        return i

    for i in range(5):
        user(i)
        other_user(i)
    raw.set(f"{cache.namespace}:{{user:9}}:lease", "x", px=5000)  # a sibling, not an entry
    assert sorted(cache.keys("user:*")) == [f"user:{i}" for i in range(5)]
    assert len(cache.keys("*", limit=2)) == 2
    assert cache.keys("nothing*") == []
    other.close()


def test_keys_scan_a_bounded_number_of_keys_on_a_real_server(
    caches: Callable[..., Cache], raw: redis.Redis, unique_namespace: str
) -> None:
    cache = caches()

    @cache.cached(ttl=30, key="user:{i}")
    def user(i: int) -> int:
        return i

    for i in range(3):
        user(i)
    unrelated = [f"other-app-{unique_namespace[::-1]}:{i}" for i in range(2500)]
    with raw.pipeline(transaction=False) as pipe:  # another application's data, same database
        for name in unrelated:
            pipe.set(name, "x", ex=60)
        pipe.execute()
    assert sorted(cache.keys("user:*")) == ["user:0", "user:1", "user:2"]
    assert cache.keys("user:*").complete
    cut = cache.keys("nothing*", max_scanned=1000)  # one SCAN call of 1,000 keys
    assert cut == [] and not cut.complete
    assert cache.keys("nothing*").complete
    capped = cache.keys("user:*", limit=1)
    assert len(capped) == 1 and not capped.complete
    raw.delete(*unrelated)


def test_strict_get_entry_tells_unreadable_from_missing(
    caches: Callable[..., Cache], raw: redis.Redis, unique_namespace: str
) -> None:
    cache = caches(local_maxsize=10)

    @cache.cached(ttl=30, key="good")
    def good() -> str:
        return "value"

    good()
    raw.set(f"{unique_namespace}:{{bad}}", b"\xff\xfe not an entry")
    assert cache.get_entry("bad") is None  # as the decorators see it: a miss
    with pytest.raises(SerializationError):
        cache.get_entry("bad", strict=True)
    assert cache.get_entry("missing", strict=True) is None
    entry = cache.get_entry("good", strict=True)
    assert entry is not None and entry.value == "value"
    raw.set(f"{unique_namespace}:{{good}}", b"junk")  # behind the near cache's back
    assert cache.get_entry("good") is not None  # the near cache still holds it
    with pytest.raises(SerializationError):  # strict reads Redis itself
        cache.get_entry("good", strict=True)


# -- near cache ------------------------------------------------------------------------------


def _wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "condition not reached in time"
        time.sleep(0.001)
    return time.monotonic() - started


def test_near_cache_serves_locally_and_is_dropped_by_invalidations(
    caches: Callable[..., Cache],
) -> None:
    near = caches(local_maxsize=100, local_ttl=10)
    plain = caches()
    store = near.store
    assert isinstance(store, RedisStore)
    version = ["v1"]

    @near.cached(ttl=30, key="cfg:{name}", tags=["cfg"])
    def cfg(name: str) -> dict[str, str]:
        return {"name": name, "v": version[0]}

    cfg("a")
    _wait_until(lambda: store.stats()["listener"]["subscribed"])
    cfg("a")  # from Redis, now kept locally
    hits = store.stats()["local_hits"]
    value = cfg("a")
    value["v"] = "mutated"
    assert cfg("a") == {"name": "a", "v": "v1"}  # private copies from the near cache too
    assert store.stats()["local_hits"] == hits + 2
    version[0] = "v2"
    plain.invalidate("cfg:a")
    # local_ttl is 10 s: only the broadcast can drop the copy within 5
    _wait_until(lambda: store.get(near.prefix + "cfg:a") is None, timeout=5)
    assert cfg("a") == {"name": "a", "v": "v2"}
    cfg("a")
    assert store._near is not None and len(store._near) == 1
    version[0] = "v3"
    plain.invalidate_tag("cfg")
    _wait_until(lambda: len(store._near or ()) == 0, timeout=5)
    assert cfg("a") == {"name": "a", "v": "v3"}


def test_near_cache_never_outlives_the_entry(caches: Callable[..., Cache]) -> None:
    near = caches(local_maxsize=100, local_ttl=10)
    n = [0]

    @near.cached(ttl=0.5, key="short")
    def short() -> int:
        n[0] += 1
        return n[0]

    _subscribed(near)  # first, so that the entry's second read is well inside its 0.5 s
    short()
    assert short() == 1
    time.sleep(0.55)  # real time: Redis (PX) and the near cache expire on the wall clock
    assert short() == 2


def test_near_cache_flushed_when_the_listener_connection_drops(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    cache = Cache(fresh_redis.url, namespace=unique_namespace, local_maxsize=100)
    store = cache.store
    assert isinstance(store, RedisStore)

    @cache.cached(ttl=30, key="k")
    def k() -> int:
        return 1

    k()
    _wait_until(lambda: store.stats()["listener"]["subscribed"])
    k()
    assert store._near is not None and len(store._near) == 1
    client = fresh_redis.client()
    client.client_kill_filter(_type="pubsub")
    _wait_until(lambda: len(store._near or ()) == 0)
    _wait_until(lambda: store.stats()["listener"]["subscribed"])  # resubscribed
    assert store.stats()["listener"]["resets"] >= 1
    client.close()
    cache.close()


# -- Redis down ------------------------------------------------------------------------------


def test_redis_stopped_and_restarted_keeps_answering(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    cache = Cache(fresh_redis.url, namespace=unique_namespace)
    store = cache.store
    assert isinstance(store, RedisStore)
    calls = [0]

    @cache.cached(ttl=30, key="n:{i}")
    def n(i: int) -> int:
        calls[0] += 1
        return i * 10

    assert n(1) == 10 and n(1) == 10 and calls[0] == 1
    clock = FakeClock()
    store.breaker.clock = clock  # its cooldown passes by advance(), not by sleeping
    fresh_redis.stop()
    started = time.monotonic()
    for _ in range(20):
        assert n(1) == 10  # computed directly
    assert time.monotonic() - started < 2.0
    assert store.breaker.state == "open"
    opened_calls = calls[0]
    assert cache.backend_errors >= 5
    fresh_redis.start()
    clock.advance(1.1)  # past the breaker's cooldown
    assert n(2) == 20  # the probe
    _wait_until(lambda: store.breaker.state == "closed")
    before = calls[0]
    assert n(2) == 20 and n(2) == 20
    assert calls[0] == before  # caching resumed
    assert opened_calls > 1
    cache.close()


async def test_redis_down_async_fails_open_and_breaker_fails_fast(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    cache = Cache(fresh_redis.url, namespace=unique_namespace)
    store = cache.store
    assert isinstance(store, RedisStore)

    @cache.cached(ttl=30, key="a")
    async def a() -> str:
        return "computed"

    assert await a() == "computed"
    clock = FakeClock()
    store.breaker.clock = clock  # its cooldown passes by advance(), not by sleeping
    fresh_redis.kill()
    for _ in range(10):
        assert await a() == "computed"
    assert store.breaker.state == "open"
    with pytest.raises(BackendError, match="circuit breaker open"):
        await store.aget(cache.prefix + "a")
    fresh_redis.start()
    clock.advance(1.1)  # past the breaker's cooldown
    assert await a() == "computed"
    assert store.breaker.state == "closed"
    await cache.aclose()


def test_fail_closed_raises_backend_error(unique_namespace: str) -> None:
    cache = Cache("redis://127.0.0.1:1/0", namespace=unique_namespace, on_backend_error="raise")

    @cache.cached(ttl=30)
    def f() -> int:
        return 1

    with pytest.raises(BackendError, match=r"127\.0\.0\.1:1"):
        f()
    cache.close()


def test_breaker_opens_and_closes() -> None:
    from coalesce.stores.redis.breaker import CircuitBreaker

    clock = FakeClock()
    breaker = CircuitBreaker(threshold=3, cooldown=0.05, max_cooldown=0.2, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        assert not breaker.failure()
    assert breaker.failure() and breaker.state == "open"
    assert not breaker.allow()
    clock.advance(0.04)
    assert not breaker.allow()  # still cooling down
    clock.advance(0.02)
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one
    breaker.failure()
    assert breaker.state == "open" and breaker.retry_in() > 0
    assert breaker.stats()["cooldown"] == pytest.approx(0.1)  # doubled
    clock.advance(0.09)
    assert not breaker.allow()
    clock.advance(0.02)
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow()


def test_key_layout_round_trips() -> None:
    layout = KeyLayout("ns")
    entry = layout.entry("ns:user:42")
    assert entry == "ns:{user:42}"
    assert layout.lease(entry) == "ns:{user:42}:lease"
    assert layout.key_of_entry(entry) == "ns:user:42"
    assert layout.key_of_entry("ns:{user:42}:lease") is None
    assert layout.key_of_channel("ns:{user:42}:done") == "ns:user:42"
    assert layout.tag("ns:user:42") == "ns:tag:{user:42}"
    assert layout.match("ns:user:*") == "ns:{user:*}"


def test_entries_written_by_hand_are_read(caches: Callable[..., Cache], raw: redis.Redis) -> None:
    cache = caches()
    data = encode_entry(Entry({"hand": True}, ttl=30), MsgpackSerializer())
    raw.set(f"{cache.namespace}:{{manual}}", data)
    entry = cache.get_entry("manual")
    assert entry is not None and entry.value == {"hand": True}


# -- stale-while-revalidate and cached errors through Redis ----------------------------------


def test_stale_entry_is_served_while_one_caller_refreshes(caches: Callable[..., Cache]) -> None:
    a, b = caches(), caches()
    version = [1]

    refresh = threading.Event()  # the refresh finishes only when the test says so

    def make(cache: Cache) -> Callable[[], int]:
        @cache.cached(ttl=0.2, stale_ttl=30, key="swr")
        def swr() -> int:
            if version[0] == 2:
                assert refresh.wait(30)
            return version[0]

        return swr  # type: ignore[no-any-return]

    fa, fb = make(a), make(b)
    assert fa() == 1
    time.sleep(0.25)
    version[0] = 2
    try:
        assert fa() == 1 and fb() == 1  # stale, refreshed in the background (once)
    finally:
        refresh.set()
    _wait_until(lambda: fb() == 2, timeout=10)
    assert fa() == 2


def test_cached_errors_round_trip_through_redis(caches: Callable[..., Cache]) -> None:
    a, b = caches(), caches()
    calls: list[str] = []

    def make(cache: Cache, name: str) -> Callable[[], int]:
        @cache.cached(ttl=30, cache_errors=5, key="err")
        def err() -> int:
            calls.append(name)
            raise LookupError("not there")

        return err  # type: ignore[no-any-return]

    fa, fb = make(a, "a"), make(b, "b")
    with pytest.raises(LookupError, match="not there"):
        fa()
    with pytest.raises(LookupError, match="not there"):
        fb()  # read from Redis, not computed again
    assert calls == ["a"]


def test_everything_written_lies_under_the_namespace(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    """A workload touching every kind of key; then SCAN the whole database."""
    a = Cache(fresh_redis.url, namespace=unique_namespace, local_maxsize=10)
    b = Cache(fresh_redis.url, namespace=unique_namespace)

    @a.cached(ttl=30, key="u:{i}", tags=["g:{i}", "all"])
    def u(i: int) -> list[int]:
        if i == 3:
            raise RuntimeError("three")
        return [i]

    @b.cached(ttl=30, key="u:{i}", tags=["g:{i}", "all"])
    async def ub(i: int) -> list[int]:
        return [i]

    for i in range(5):
        if i == 3:
            with pytest.raises(RuntimeError):
                u(i)
        else:
            assert u(i) == [i]
    assert asyncio.run(ub(4)) == [4]
    a.invalidate("u:1")
    b.invalidate_tag("g:2")
    client = fresh_redis.client()
    names = list(client.scan_iter(count=1000))
    assert names and all(name.startswith(f"{unique_namespace}:".encode()) for name in names)
    client.close()
    a.close()
    b.close()


def test_options_are_checked_and_passed_on(redis_url: str, unique_namespace: str) -> None:
    from coalesce.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="socket_timeout"):
        Cache(redis_url, namespace=unique_namespace, socket_timeout=0)
    with pytest.raises(ConfigurationError, match="max_connections"):
        Cache(redis_url, namespace=unique_namespace, max_connections=0)
    with pytest.raises(ConfigurationError, match="decode_responses"):
        Cache(redis_url, client=redis.Redis.from_url(redis_url, decode_responses=True))
    cache = Cache(redis_url, namespace=unique_namespace, max_connections=3, socket_timeout=0.25)
    store = cache.store
    assert isinstance(store, RedisStore)
    client = store._conn.sync()
    assert isinstance(client, redis.Redis)
    pool = client.connection_pool
    assert pool.max_connections == 3
    assert pool.connection_kwargs["socket_timeout"] == 0.25
    cache.close()


def test_invalidations_by_other_processes_reach_the_hook(caches: Callable[..., Cache]) -> None:
    """The hook a cache can use to fence its own flights when another process invalidates."""
    a, b = caches(), caches()
    store = a.store
    assert isinstance(store, RedisStore)
    seen: list[str] = []
    store.on_invalidated = seen.append

    @a.cached(ttl=30, key="x")
    def x() -> int:
        return 1

    x()  # a fill: the listener runs from now on
    _wait_until(lambda: store.stats()["listener"]["subscribed"])
    b.invalidate("x")
    _wait_until(lambda: seen == [a.prefix + "x"], timeout=5)


# -- fork ------------------------------------------------------------------------------------


def _fork(child: Callable[[], None], report: Path) -> int:
    """Run `child` in a forked process; its pid. The child exits 0 if `child` returned,
    else 1 with the traceback in `report`; it never returns into pytest."""
    with warnings.catch_warnings():  # Python 3.12+ warns about forking with threads running
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child()
            code = 0
        except BaseException:
            report.write_text(traceback.format_exc())
        finally:
            os._exit(code)
    return pid


def _reap(pid: int, report: Path, timeout: float = 30.0) -> None:
    """Wait (bounded) for the child `pid` to exit 0; kill it and fail otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked child did not finish in {timeout} s")
        time.sleep(0.01)
    details = report.read_text() if report.exists() else "(no report)"
    assert os.waitstatus_to_exitcode(status) == 0, details


def _read_byte(fd: int, timeout: float = 20.0) -> bytes:
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, "the other process never answered"
    return os.read(fd, 1)


def test_forked_child_starts_its_store_afresh(caches: Callable[..., Cache], tmp_path: Path) -> None:
    """After fork the child has none of the parent's threads: its store must not believe its
    listener runs (its near cache would serve what no invalidation reaches any more)."""
    cache = caches(local_maxsize=100, local_ttl=60)
    store = cache.store
    assert isinstance(store, RedisStore)
    origin = ["parent"]

    @cache.cached(ttl=60, key="cfg", tags=["cfg"])
    def cfg() -> str:
        return origin[0]

    @cache.cached(ttl=60, key="acfg")
    async def acfg() -> str:
        return origin[0] + "-async"

    assert cfg() == "parent"
    _subscribed(cache)
    assert cfg() == "parent"  # from Redis, kept in the near cache
    hits = store.stats()["local_hits"]
    assert cfg() == "parent" and store.stats()["local_hits"] == hits + 1
    assert store._renewer._thread is not None and store._renewer._thread.is_alive()
    assert asyncio.run(acfg()) == "parent-async"  # an asyncio client of the parent's
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    report = tmp_path / "child.txt"

    def child() -> None:
        origin[0] = "child"
        listener = store._listener
        assert not listener.ready.is_set() and listener._thread is None
        assert store._near is not None and len(store._near) == 0
        assert store._renewer._thread is None and store._renewer._leases == {}
        assert store._conn._loops == {} and store._conn._reads == {}
        assert store._conn._sync_client is None  # made again on first use
        assert cfg() == "parent"  # read from Redis (the near cache starts the listener)
        assert listener.ready.wait(10)
        assert cfg() == "parent"
        hits = store.stats()["local_hits"]
        assert cfg() == "parent" and store.stats()["local_hits"] == hits + 1  # near, again
        os.write(to_parent_w, b"r")
        assert _read_byte(to_child_r) == b"i"  # the parent invalidated "cfg"
        _until(lambda: len(store._near or ()) == 0, "the child's near cache dropped cfg")
        assert cfg() == "child"  # computed and filled here
        assert cache.invalidate("acfg") is True
        assert asyncio.run(acfg()) == "child-async"  # a new asyncio client, in this process

    pid = _fork(child, report)
    try:
        assert _read_byte(to_parent_r) == b"r"
        assert cache.invalidate("cfg") is True
        os.write(to_child_w, b"i")
    finally:
        _reap(pid, report)
        for fd in (to_child_r, to_child_w, to_parent_r, to_parent_w):
            os.close(fd)
    # the child's results are in Redis, and the parent's store still works
    entry = cache.get_entry("cfg")
    assert entry is not None and entry.value == "child"
    assert cfg() == "child"
    assert asyncio.run(acfg()) == "child-async"
    assert store._listener.ready.is_set()


def test_a_computation_asking_for_its_own_key_on_redis_fails_at_once(
    caches: Callable[..., Cache],
) -> None:
    cache = caches()

    @cache.cached(ttl=30, key="r:{x}")
    def recurse(x: int, depth: int = 0) -> int:
        return recurse(x, depth + 1) if depth < 1 else x

    started = time.monotonic()
    with pytest.raises(ReentrantCallError):
        recurse(1)
    assert time.monotonic() - started < 1.0  # not a lease wait
    assert recurse(1, 1) == 1  # the lease was handed back


async def test_a_lone_surrogate_in_a_key_value_is_stored_escaped(
    caches: Callable[..., Cache],
) -> None:
    cache = caches()
    calls: list[str] = []
    odd = json.loads('"a\\ud800"')  # valid JSON, not valid UTF-8 once decoded

    @cache.cached(ttl=30, key="user:{name}")
    def user(name: str) -> str:
        calls.append(name)
        return "ok"

    @cache.cached(ttl=30, key="auser:{name}")
    async def auser(name: str) -> str:
        calls.append(name)
        return "ok"

    assert user(odd) == user(odd) == "ok"
    assert await auser(odd) == await auser(odd) == "ok"
    assert len(calls) == 2  # computed once each, then hits
    assert sorted(cache.keys("*")) == ["auser:a%ED%A0%80", "user:a%ED%A0%80"]
    with pytest.raises(ConfigurationError, match="lone surrogate"):
        cache.invalidate(f"user:{odd}")
    assert cache.invalidate(user.key(odd))


@pytest.mark.parametrize("spec", [[1], 5, [None, None, None], ["a", "b"]])
def test_a_malformed_cached_failure_is_a_miss(
    caches: Callable[..., Cache], raw: redis.Redis, unique_namespace: str, spec: Any
) -> None:
    cache = caches()
    raw.set(
        f"{unique_namespace}:{{e:0}}",
        encode_entry(Entry(spec, ttl=30, error=True), MsgpackSerializer()),
    )

    @cache.cached(ttl=30, key="e:{n}", cache_errors=30)
    def e(n: int) -> int:
        return n + 1

    assert e(0) == 1  # replaced, not raised from a broken record
    assert cache.store.stats()["corrupt"] >= 1


def test_a_cached_failure_with_undecodable_text_reaches_every_caller(
    caches: Callable[..., Cache],
) -> None:
    cache = caches()
    odd = json.loads('"bad \\ud800"')

    @cache.cached(ttl=30, key="f", cache_errors=30)
    def f() -> int:
        raise ValueError(odd)

    with pytest.raises(ValueError) as first:
        f()
    assert first.value.args == (odd,)  # the caller that ran it: its own exception
    with pytest.raises(ValueError, match="bad"):  # the others: rebuilt from Redis
        f()


def test_a_hung_redis_costs_one_socket_timeout_per_step_then_the_breaker_opens(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    """A Redis that stops answering (SIGSTOP) is not retried after a timeout: each call
    waits at most about `socket_timeout` per step, then computes; soon the breaker opens
    and calls stop waiting at all. Nothing hangs; nothing fails."""
    cache = Cache(
        fresh_redis.url, namespace=unique_namespace, socket_timeout=0.5, breaker_threshold=3
    )

    @cache.cached(ttl=30, key="n:{i}")
    def n(i: int) -> int:
        return i * 2

    assert n(1) == 2 and n(1) == 2  # connected and cached
    pid = fresh_redis.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        slowest = 0.0
        for i in range(8):
            started = time.monotonic()
            assert n(i) == i * 2
            slowest = max(slowest, time.monotonic() - started)
        # each call: one GET that times out, then it computes directly; a retry after the
        # timeout would make it 2 x 0.5 s
        assert slowest < 0.9, slowest
        assert cache.store.breaker.state == "open"  # type: ignore[attr-defined]
        started = time.monotonic()
        assert n(100) == 200
        assert time.monotonic() - started < 0.1  # failing fast
    finally:
        os.kill(pid, signal.SIGCONT)
    cache.close()


def test_foreign_types_under_our_keys_are_misses_even_failing_closed(
    caches: Callable[..., Cache], raw: redis.Redis, unique_namespace: str
) -> None:
    cache = caches(on_backend_error="raise")
    raw.hset(f"{unique_namespace}:{{u:1}}", "field", "a hash, not an entry")
    raw.rpush(f"{unique_namespace}:tag:{{team:1}}", "a list, not a tag set")
    calls: list[int] = []

    @cache.cached(ttl=30, key="u:{i}", tags=["team:1"])
    def u(i: int) -> int:
        calls.append(i)
        return i

    assert u(1) == 1 and u(1) == 1  # replaced on the first call, then a hit
    assert calls == [1]
    assert cache.invalidate_tag("team:1") == 1  # the tag set replaced the list
    raw.set(f"{unique_namespace}:tag:{{team:2}}", "a string")
    assert cache.invalidate_tag("team:2") == 0  # not an error, ever again
    assert raw.exists(f"{unique_namespace}:tag:{{team:2}}") == 0


@pytest.mark.parametrize("mode", ["compute", "raise"])
async def test_invalidation_with_redis_down_raises_whatever_the_mode(
    unique_namespace: str, mode: str
) -> None:
    """A delete that did not happen must not look like one: invalidations raise
    `BackendError` even when calls fail open (they compute directly)."""
    cache = Cache(
        f"redis://127.0.0.1:{free_port()}/0", namespace=unique_namespace, on_backend_error=mode
    )
    with pytest.raises(BackendError):
        cache.invalidate("k")
    with pytest.raises(BackendError):
        cache.invalidate_tag("t")
    with pytest.raises(BackendError):
        await cache.ainvalidate("k")
    with pytest.raises(BackendError):
        await cache.ainvalidate_tag("t")
    await cache.aclose()


def test_a_read_begun_before_a_deletion_is_not_joined_after_it(
    caches: Callable[..., Cache], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threads share one GET of a key; a thread that starts reading after `invalidate`
    returned must not join a GET that was answered before the deletion."""
    cache = caches()
    store = cache.store
    assert isinstance(store, RedisStore)
    key = cache.prefix + "k"
    store.set(key, Entry("old", ttl=30))
    conn = store._conn
    answered, release = threading.Event(), threading.Event()
    original = conn._get

    def slow_get(redis_key: str) -> Any:
        data = original(redis_key)  # the old entry, read before the deletion
        if not answered.is_set():
            answered.set()
            assert release.wait(10)
        return data

    monkeypatch.setattr(conn, "_get", slow_get)
    early: list[Any] = []
    reader = threading.Thread(target=lambda: early.append(store.get(key)))
    reader.start()
    assert answered.wait(10)
    assert cache.invalidate("k")
    late: list[Any] = []
    after = threading.Thread(target=lambda: late.append(store.get(key)))
    after.start()
    # its own GET returns at once; a joined read would hold it until released, or for a
    # follower's own bound (socket_timeout * 4 + 1 s = 3 s), after which it reads alone
    after.join(1.5)
    joined = after.is_alive()
    release.set()
    after.join(10)
    reader.join(10)
    assert not joined
    assert late == [None]  # its own GET, after the deletion
    assert early and early[0] is not None and early[0].value == "old"  # began before: fine


def test_an_invalidation_cannot_land_between_the_near_caches_check_and_write(
    caches: Callable[..., Cache], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = caches(local_maxsize=10)

    @cache.cached(ttl=30, key="warm")
    def warm() -> int:
        return 1

    warm()
    store = cache.store
    assert isinstance(store, RedisStore)
    _wait_until(lambda: store.stats()["listener"]["subscribed"])
    near = store._near
    assert near is not None
    key = cache.prefix + "k"
    writing = threading.Event()
    original = near.memory.set

    def slow_set(k: str, entry: Entry, **kwargs: Any) -> bool:
        writing.set()
        time.sleep(0.2)  # an invalidation arriving now must wait for this write
        return original(k, entry, **kwargs)

    monkeypatch.setattr(near.memory, "set", slow_set)
    writer = threading.Thread(
        target=near.remember, args=(key, Entry("old", ttl=30), store._listener.generation)
    )
    writer.start()
    assert writing.wait(10)
    near.on_invalidate(b"k:" + key.encode())  # from the listener thread, in real life
    writer.join(10)
    assert near.get(key) is None  # the drop came after the write, not before it


def test_a_dropped_subscription_fences_the_computations_in_flight(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    """Invalidations broadcast while the pub/sub connection is down are lost, so when it
    drops (and again when it is back) every computation in flight is detached: a caller
    arriving afterwards starts afresh instead of joining one that may be stale, and the
    old one's store is refused when its lease was deleted."""
    cache = Cache(fresh_redis.url, namespace=unique_namespace)
    started, release = threading.Event(), threading.Event()
    versions = iter(range(1, 100))

    @cache.cached(ttl=30, key="v")
    def version() -> int:
        value = next(versions)
        started.set()
        assert release.wait(20)
        return value

    first: list[int] = []
    leader = threading.Thread(target=lambda: first.append(version()))
    leader.start()
    assert started.wait(10)
    store = cache.store
    assert isinstance(store, RedisStore)
    _wait_until(lambda: store.stats()["listener"]["subscribed"])
    assert cache.flights.running(cache.prefix + "v")
    admin = fresh_redis.client()
    admin.client_kill_filter(_type="pubsub")
    _wait_until(lambda: store.stats()["listener"]["resets"] >= 1)
    _wait_until(lambda: not cache.flights.running(cache.prefix + "v"))  # fenced
    # an invalidation whose broadcast was lost: the entry's lease deleted behind our back
    admin.delete(f"{unique_namespace}:{{v}}:lease")
    started.clear()
    later: list[int] = []
    follower = threading.Thread(target=lambda: later.append(version()))
    follower.start()
    assert started.wait(10)  # a new computation, not the fenced one
    release.set()
    leader.join(10)
    follower.join(10)
    assert first == [1] and later == [2]
    admin.close()
    cache.close()


async def test_a_glitch_inside_redis_py_is_a_store_failure_but_our_bugs_are_not(
    caches: Callable[..., Cache],
) -> None:
    """An exception other than a `RedisError` raised inside redis-py (seen: its asyncio
    cluster client writing to a connection another task had closed) degrades like any
    store failure; the same exception raised by our own code is not hidden."""
    store = caches().store
    assert isinstance(store, RedisStore)
    conn = store._conn
    client_side: dict[str, Any] = {"__name__": "redis.asyncio.connection"}
    exec("def glitch():\n    raise AttributeError('writelines')\n", client_side)
    exec("async def aglitch():\n    raise AttributeError('writelines')\n", client_side)

    def our_bug() -> None:
        raise AttributeError("ours")

    with pytest.raises(BackendError, match="AttributeError: writelines"):
        conn.call(client_side["glitch"])
    with pytest.raises(BackendError, match="AttributeError: writelines"):
        await conn.acall(client_side["aglitch"])
    with pytest.raises(AttributeError, match="ours"):
        conn.call(our_bug)
    # redis-py failing inside the standard library it calls (seen on Python 3.12: asyncio's
    # writelines on a transport another task closed, a TypeError) is redis-py's glitch too
    exec("def in_stdlib():\n    import json\n    json.loads(None)\n", client_side)
    with pytest.raises(BackendError, match="TypeError"):
        conn.call(client_side["in_stdlib"])

    def our_stdlib_bug() -> None:
        json.loads(None)  # type: ignore[arg-type]

    with pytest.raises(TypeError):
        conn.call(our_stdlib_bug)


class _RequestDeadline(Exception):
    """What a web worker's alarm handler raises to cut a slow request short."""


def test_a_signal_handlers_exception_inside_redis_py_goes_up_unchanged(
    fresh_redis: RedisServer, unique_namespace: str
) -> None:
    """A user's SIGALRM handler raising while redis-py waits on a hung Redis: the exception
    is the user's (the deepest frame not redis-py's nor the standard library's), so it goes
    up as it was raised, not as a store failure the call degrades past (it would compute on,
    past the deadline the handler enforces), and the breaker does not count it."""
    cache = Cache(fresh_redis.url, namespace=unique_namespace, socket_timeout=5)

    @cache.cached(ttl=30, key="n:{i}")
    def n(i: int) -> int:
        return i * 2

    assert n(1) == 2  # connected

    def deadline(signum: int, frame: object) -> None:
        raise _RequestDeadline("the request took too long")

    previous = signal.signal(signal.SIGALRM, deadline)
    pid = fresh_redis.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        for call in (lambda: n(2), lambda: cache.get("n:3")):
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(_RequestDeadline) as raised:
                call()
            # raised while redis-py read the reply, not before or after the call
            modules = [tb.tb_frame.f_globals.get("__name__") for tb in _frames(raised.value)]
            assert "redis.connection" in modules or "redis._parsers.socket" in modules
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        os.kill(pid, signal.SIGCONT)
    assert cache.store.breaker.state == "closed"  # type: ignore[attr-defined]
    assert n(2) == 4
    cache.close()


def _frames(exc: BaseException) -> Iterator[Any]:
    tb = exc.__traceback__
    while tb is not None:
        yield tb
        tb = tb.tb_next
