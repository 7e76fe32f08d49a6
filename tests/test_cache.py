"""The Cache object: construction and its errors, the kill switch, the default cache
(`configure` / `get_cache` / `COALESCE_URL`), invalidation by key, inspection and stats.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import coalesce
import coalesce.cache as cache_module
from coalesce import Cache, ConfigurationError, KeyList, cached, coalesced, configure, get_cache

BOUND = 10.0
STAT_FIELDS = {
    "hits",
    "stale",
    "misses",
    "coalesced",
    "computations",
    "errors",
    "invalidations",
    "compute_time",
}


@pytest.fixture
def no_default(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Start without a configured default cache and without environment settings."""
    monkeypatch.setattr(cache_module, "_default", None)
    monkeypatch.delenv("COALESCE_URL", raising=False)
    monkeypatch.delenv("COALESCE_DISABLED", raising=False)
    yield


# ---------------------------------------------------------------------------------------
# construction


def test_default_cache_is_memory() -> None:
    cache = Cache()
    assert cache.url == "memory://"
    assert cache.namespace == "coalesce"
    assert cache.enabled is True
    assert "memory://" in repr(cache)


def test_explicit_memory_url_and_namespace() -> None:
    cache = Cache("memory://", namespace="app", maxsize=5)

    @cache.cached(ttl=60, key="k")
    def f() -> int:
        return 1

    f()
    assert cache.keys() == ["k"]
    assert cache.store.get("app:k") is not None


@pytest.mark.parametrize("url", ["bogus://x", "http://localhost", "memcached://h:11211", ""])
def test_unknown_url_scheme_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Cache(url)
    message = str(info.value)
    assert "memory://" in message  # says what to use instead
    assert "redis://" in message


def test_url_must_be_a_string() -> None:
    with pytest.raises(ConfigurationError):
        Cache(123)  # type: ignore[arg-type]


@pytest.mark.parametrize("namespace", ["", "a b", "a:b", "tab\there", "nl\n"])
def test_bad_namespace_is_a_configuration_error(namespace: str) -> None:
    with pytest.raises(ConfigurationError, match="namespace"):
        Cache(namespace=namespace)


@pytest.mark.parametrize("ttl", [0, -1, -0.001])
def test_bad_default_ttl_is_a_configuration_error(ttl: float) -> None:
    with pytest.raises(ConfigurationError, match="default_ttl"):
        Cache(default_ttl=ttl)


@pytest.mark.parametrize("ttl", ["60", None, True])
def test_non_numeric_default_ttl_is_a_configuration_error(ttl: Any) -> None:
    with pytest.raises(ConfigurationError, match="default_ttl"):
        Cache(default_ttl=ttl)


@pytest.mark.parametrize("maxsize", [0, -5, "100"])
def test_bad_maxsize_is_a_configuration_error(maxsize: Any) -> None:
    with pytest.raises(ConfigurationError, match="maxsize"):
        Cache(maxsize=maxsize)


def test_bad_on_backend_error_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="on_backend_error"):
        Cache(on_backend_error="ignore")  # type: ignore[arg-type]


def test_unknown_serializer_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        Cache(serializer="yaml")


def test_options_for_another_store_rejected_for_memory() -> None:
    with pytest.raises(ConfigurationError):
        Cache("memory://", socket_timeout=1.0)


def test_all_errors_derive_from_coalesce_error() -> None:
    for name in (
        "ConfigurationError",
        "KeyTemplateError",
        "KeyBuildError",
        "SerializationError",
        "BackendError",
        "CachedError",
        "LeaderFailedError",
    ):
        assert issubclass(getattr(coalesce, name), coalesce.CoalesceError), name


def test_creating_a_redis_cache_and_decorating_does_not_connect() -> None:
    started = time.monotonic()
    cache = Cache("redis://127.0.0.1:1/0")  # nothing listens on port 1

    @cache.cached(ttl=60)
    def f() -> int:
        return 1

    @cache.cached(ttl=60)
    async def g() -> int:
        return 1

    assert time.monotonic() - started < 2.0
    assert f.__name__ == "f"


# ---------------------------------------------------------------------------------------
# kill switch


def test_disabled_cache_is_a_pass_through_sync() -> None:
    cache = Cache(enabled=False)
    calls = 0
    lock = threading.Lock()

    @cache.cached(ttl=60)
    def f(x: int) -> dict[str, int]:
        nonlocal calls
        with lock:
            calls += 1
        time.sleep(0.05)
        return {"x": x}

    assert f(1) == {"x": 1}
    assert f(1) == {"x": 1}
    assert calls == 2
    threads = [threading.Thread(target=f, args=(1,)) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BOUND)
    assert calls == 7  # no coalescing either
    assert cache.keys() == []


async def test_disabled_cache_is_a_pass_through_async() -> None:
    cache = Cache(enabled=False)
    calls = 0

    @cache.cached(ttl=60)
    async def f() -> int:
        nonlocal calls
        calls += 1
        n = calls
        await asyncio.sleep(0.01)
        return n

    results = await asyncio.gather(*(f() for _ in range(10)))
    assert sorted(results) == list(range(1, 11))
    assert calls == 10


async def test_disabled_cache_coalesced_is_a_pass_through() -> None:
    cache = Cache(enabled=False)
    calls = 0

    @cache.coalesced()
    async def f() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return 1

    await asyncio.gather(*(f() for _ in range(5)))
    assert calls == 5


def test_disabled_cache_returns_the_very_object_and_unsupported_types() -> None:
    cache = Cache(enabled=False)
    obj = object()

    @cache.cached(ttl=60)
    def f() -> object:
        return obj

    assert f() is obj  # untouched: no copy, no serialization


def test_disabled_cache_lets_exceptions_through_unchanged() -> None:
    cache = Cache(enabled=False)

    class Special(Exception):
        pass

    @cache.cached(ttl=60, cache_errors=60)
    def f() -> int:
        raise Special("x")

    for _ in range(2):
        with pytest.raises(Special):
            f()


@pytest.mark.parametrize("value", ["1", "true", "yes", "TRUE", "on"])
def test_env_kill_switch_disables_new_caches(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("COALESCE_DISABLED", value)
    cache = Cache()
    assert cache.enabled is False
    calls = 0

    @cache.cached(ttl=60)
    def f() -> int:
        nonlocal calls
        calls += 1
        return 1

    f()
    f()
    assert calls == 2


@pytest.mark.parametrize("value", ["0", "", "false", "no"])
def test_env_kill_switch_off_values(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("COALESCE_DISABLED", value)
    assert Cache().enabled is True


def test_env_kill_switch_applies_to_module_level_decorators(
    monkeypatch: pytest.MonkeyPatch, no_default: None
) -> None:
    monkeypatch.setenv("COALESCE_DISABLED", "1")
    calls = 0

    @cached(ttl=60)
    def f() -> int:
        nonlocal calls
        calls += 1
        return 1

    f()
    f()
    assert calls == 2
    assert get_cache().enabled is False


def test_configure_a_disabled_cache_makes_module_decorators_pass_through(
    no_default: None,
) -> None:
    configure(Cache(enabled=False))
    calls = 0

    @cached(ttl=60)
    async def f() -> int:
        nonlocal calls
        calls += 1
        return 1

    asyncio.run(f())
    asyncio.run(f())
    assert calls == 2


# ---------------------------------------------------------------------------------------
# the default cache


def test_get_cache_without_configuration_is_memory(no_default: None) -> None:
    cache = get_cache()
    assert isinstance(cache, Cache)
    assert cache.url == "memory://"
    assert get_cache() is cache


def test_get_cache_from_environment(monkeypatch: pytest.MonkeyPatch, no_default: None) -> None:
    monkeypatch.setenv("COALESCE_URL", "memory://from-env")
    assert get_cache().url == "memory://from-env"


def test_bad_environment_url_fails_at_first_call_not_at_decoration(
    monkeypatch: pytest.MonkeyPatch, no_default: None
) -> None:
    monkeypatch.setenv("COALESCE_URL", "nope://somewhere")

    @cached(ttl=60)
    def f() -> int:
        return 1

    @coalesced
    def g() -> int:
        return 1

    with pytest.raises(ConfigurationError, match="nope"):
        f()
    with pytest.raises(ConfigurationError):
        get_cache()


def test_configure_with_url_and_options(no_default: None) -> None:
    cache = configure("memory://", namespace="app", maxsize=10)
    assert isinstance(cache, Cache)
    assert get_cache() is cache
    assert cache.namespace == "app"


def test_configure_with_a_cache_instance(no_default: None) -> None:
    mine = Cache(namespace="mine")
    assert configure(mine) is mine
    assert get_cache() is mine


def test_configure_bad_url_raises(no_default: None) -> None:
    with pytest.raises(ConfigurationError):
        configure("ftp://x")


def test_module_level_cached_uses_the_configured_cache(no_default: None) -> None:
    calls = 0

    @cached(ttl=60, key="mod:{x}")
    def f(x: int) -> int:
        nonlocal calls
        calls += 1
        return x

    first = configure(Cache(namespace="first"))
    assert f(1) == 1
    assert f(1) == 1
    assert calls == 1
    assert first.keys() == ["mod:1"]
    assert first.invalidate("mod:1") is True
    assert f(1) == 1
    assert calls == 2


def test_reconfigure_switches_already_called_functions(no_default: None) -> None:
    calls = 0

    @cached(ttl=60, key="sw")
    def f() -> int:
        nonlocal calls
        calls += 1
        return calls

    first = configure(Cache(namespace="first"))
    assert f() == 1
    second = configure(Cache(namespace="second"))
    assert f() == 2  # the new, empty cache
    assert f() == 2
    assert first.keys() == ["sw"]
    assert second.keys() == ["sw"]
    assert f.invalidate() is True  # invalidates on the current cache
    assert second.keys() == []
    assert first.keys() == ["sw"]


async def test_module_level_coalesced_shares_calls(no_default: None) -> None:
    calls = 0

    @coalesced(key="r:{currency}")
    async def rates(currency: str) -> dict[str, float]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return {currency: 1.0}

    results = await asyncio.gather(*(rates("eur") for _ in range(50)))
    assert results == [{"eur": 1.0}] * 50
    assert calls == 1


def test_explicit_cache_not_affected_by_configure(no_default: None) -> None:
    own = Cache(namespace="own")

    @own.cached(ttl=60, key="k")
    def f() -> int:
        return 1

    configure(Cache(namespace="other"))
    f()
    assert own.keys() == ["k"]
    assert get_cache().keys() == []


# ---------------------------------------------------------------------------------------
# invalidation by key


def test_invalidate_returns_whether_an_entry_existed() -> None:
    cache = Cache()
    calls = 0

    @cache.cached(ttl=60, key="user:{uid}")
    def f(uid: int) -> int:
        nonlocal calls
        calls += 1
        return uid

    assert cache.invalidate("user:1") is False
    f(1)
    f(2)
    assert cache.invalidate(f.key(1)) is True
    assert cache.invalidate("user:1") is False
    assert cache.keys() == ["user:2"]
    f(1)
    assert calls == 3


async def test_ainvalidate_returns_whether_an_entry_existed() -> None:
    cache = Cache()

    @cache.cached(ttl=60, key="user:{uid}")
    async def f(uid: int) -> int:
        return uid

    assert await cache.ainvalidate("user:1") is False
    await f(1)
    assert await cache.ainvalidate("user:1") is True
    assert await cache.ainvalidate("user:1") is False


def test_invalidate_does_not_touch_other_namespaces() -> None:
    a, b = Cache(namespace="a"), Cache(namespace="b")

    @a.cached(ttl=60, key="k")
    def fa() -> int:
        return 1

    @b.cached(ttl=60, key="k")
    def fb() -> int:
        return 2

    fa(), fb()
    assert a.invalidate("k") is True
    assert b.keys() == ["k"]


@pytest.mark.parametrize("key", ["", None, 5])
def test_invalidate_bad_key_is_a_configuration_error(key: Any) -> None:
    with pytest.raises(ConfigurationError):
        Cache().invalidate(key)


def test_invalidate_tag() -> None:
    cache = Cache()

    @cache.cached(ttl=60, key="post:{pid}", tags=("author:{author}",))
    def post(pid: int, author: str) -> str:
        return f"{pid}-{author}"

    post(1, "ann"), post(2, "ann"), post(3, "bob")
    assert cache.invalidate_tag("author:ann") == 2
    assert sorted(cache.keys()) == ["post:3"]
    assert cache.invalidate_tag("author:ann") == 0


# ---------------------------------------------------------------------------------------
# inspection


def test_get_entry_exposes_value_and_metadata() -> None:
    cache = Cache()

    @cache.cached(ttl=42, key="e", tags=["group:{n}"])
    def f(n: int) -> dict[str, list[int]]:
        time.sleep(0.02)
        return {"a": [n]}

    before = time.time()
    f(3)
    entry = cache.get_entry("e")
    assert entry is not None
    assert entry.ttl == 42
    assert before - 1 <= entry.created <= time.time() + 1
    assert entry.compute_time >= 0.015
    assert entry.value == {"a": [3]} and type(entry.value) is dict  # a plain value
    entry.value["a"].append(4)  # the reader's own copy
    assert f(3) == {"a": [3]}
    assert entry.tags == ("group:3",)  # as the decorator names them, without namespace
    assert cache.get_entry("missing") is None


def test_keys_glob() -> None:
    cache = Cache()

    @cache.cached(ttl=60, key="user:{uid}")
    def f(uid: int) -> int:
        return uid

    for i in range(5):
        f(i)
    assert sorted(cache.keys("user:*")) == [f"user:{i}" for i in range(5)]
    assert cache.keys("user:3") == ["user:3"]
    assert len(cache.keys(limit=2)) == 2


def test_keys_bound_their_work_and_say_whether_they_saw_everything() -> None:
    cache = Cache()

    @cache.cached(ttl=60, key="user:{uid}")
    def f(uid: int) -> int:
        return uid

    for i in range(50):
        f(i)
    everything = cache.keys("user:*")
    assert isinstance(everything, list) and isinstance(everything, KeyList)
    assert len(everything) == 50 and everything.complete
    cut = cache.keys("nothing*", max_scanned=10)
    assert cut == [] and not cut.complete  # looked at 10 of 50 entries only
    assert cache.keys("nothing*").complete
    capped = cache.keys("user:*", limit=3)
    assert len(capped) == 3 and not capped.complete
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigurationError, match="limit must be a positive integer"):
            cache.keys(limit=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="max_scanned must be a positive integer"):
            cache.keys(max_scanned=bad)  # type: ignore[arg-type]


def test_strict_get_entry_in_memory_is_get_entry() -> None:
    cache = Cache()

    @cache.cached(ttl=60, key="k")
    def k() -> int:
        return 7

    k()
    entry = cache.get_entry("k", strict=True)
    assert entry is not None and entry.value == 7
    assert cache.get_entry("missing", strict=True) is None


# ---------------------------------------------------------------------------------------
# stats


def test_fn_stats_fields_and_counts() -> None:
    cache = Cache()

    @cache.cached(ttl=60)
    def f(x: int) -> int:
        time.sleep(0.01)
        if x < 0:
            raise ValueError("negative")
        return x

    f(1)  # miss + computation
    f(1)  # hit
    f(1)  # hit
    with pytest.raises(ValueError):
        f(-1)  # miss + computation + error
    f.invalidate(1)
    f(1)  # miss + computation
    stats = f.stats()
    assert set(stats) >= STAT_FIELDS
    assert stats["hits"] == 2
    assert stats["misses"] == 3
    assert stats["computations"] == 3
    assert stats["errors"] == 1
    assert stats["invalidations"] == 1
    assert stats["coalesced"] == 0
    assert stats["stale"] == 0
    assert stats["compute_time"] >= 0.025


async def test_cache_stats_per_function_by_template_or_name() -> None:
    cache = Cache()

    @cache.cached(ttl=60, key="user:{uid}")
    async def load_user(uid: int) -> int:
        return uid

    @cache.cached(ttl=60)
    def report(day: str) -> str:
        return day

    await load_user(1)
    await load_user(1)
    report("mon")
    stats = cache.stats()
    assert set(stats) >= {"user:{uid}", f"{report.__module__}.{report.__qualname__}"}
    assert stats["user:{uid}"]["hits"] == 1
    assert stats["user:{uid}"]["misses"] == 1
    name = f"{report.__module__}.{report.__qualname__}"
    assert stats[name]["misses"] == 1
    assert stats[name]["computations"] == 1
    assert set(stats[name]) >= STAT_FIELDS


def test_stats_of_a_fresh_function_are_zero() -> None:
    cache = Cache()

    @cache.cached(ttl=60)
    def f() -> int:
        return 1

    stats = f.stats()
    assert all(stats[k] == 0 for k in STAT_FIELDS)


def test_stats_are_a_snapshot() -> None:
    cache = Cache()

    @cache.cached(ttl=60)
    def f() -> int:
        return 1

    snap = f.stats()
    f()
    assert snap["misses"] == 0
    assert f.stats()["misses"] == 1


def test_cache_errors_hits_count_as_hits() -> None:
    cache = Cache()

    @cache.cached(ttl=60, cache_errors=60)
    def f() -> int:
        raise ValueError("x")

    for _ in range(3):
        with pytest.raises(ValueError):
            f()
    stats = f.stats()
    assert stats["computations"] == 1
    assert stats["errors"] == 1
    assert stats["misses"] == 1
    assert stats["hits"] == 2


# -- tags fence computations in flight; the rollback switch covers invalidation ------------


def test_invalidate_tag_fences_a_sync_computation_in_flight() -> None:
    cache = Cache()
    started, release = threading.Event(), threading.Event()
    versions = iter(range(1, 10))

    @cache.cached(ttl=60, key="orders:{uid}", tags=["user:{uid}"])
    def orders(uid: int) -> int:
        value = next(versions)
        started.set()
        release.wait(5)
        return value

    results: list[int] = []
    worker = threading.Thread(target=lambda: results.append(orders(42)))
    worker.start()
    assert started.wait(5)
    assert cache.invalidate_tag("user:42") == 0  # nothing stored yet, but one is computing
    release.set()
    worker.join(5)
    assert results == [1]  # its own caller still gets it ...
    assert orders(42) == 2  # ... but it never landed: the next caller computes afresh


async def test_invalidate_tag_fences_an_async_computation_in_flight() -> None:
    cache = Cache()
    started, release = asyncio.Event(), asyncio.Event()
    versions = iter(range(1, 10))

    @cache.cached(ttl=60, key="orders:{uid}", tags=["user:{uid}"])
    async def orders(uid: int) -> int:
        value = next(versions)
        started.set()
        await release.wait()
        return value

    first = asyncio.ensure_future(orders(42))
    await asyncio.wait_for(started.wait(), 5)
    await cache.ainvalidate_tag("user:42")
    release.set()
    assert await first == 1
    assert await orders(42) == 2


async def test_a_tag_invalidation_leaves_other_computations_alone() -> None:
    cache = Cache()
    release = asyncio.Event()

    @cache.cached(ttl=60, key="orders:{uid}", tags=["user:{uid}"])
    async def orders(uid: int) -> int:
        await release.wait()
        return uid

    first = asyncio.ensure_future(orders(7))
    await asyncio.sleep(0)
    await cache.ainvalidate_tag("user:42")
    release.set()
    assert await first == 7
    assert await orders(7) == 7
    assert orders.stats()["hits"] == 1


def test_disabled_cache_invalidation_is_a_no_op() -> None:
    cache = Cache("redis://127.0.0.1:1/0", enabled=False)  # nothing listens there

    @cache.cached(ttl=60, key="k:{x}", tags=["t"])
    def f(x: int) -> int:
        return x

    assert f(1) == 1
    assert f.invalidate(1) is False
    assert cache.invalidate("k:1") is False
    assert cache.invalidate_tag("t") == 0


class NotFound(Exception):
    def __init__(self, what: str, code: int) -> None:
        super().__init__(what, code)
        self.code = code


def test_cached_error_reaches_the_leader_as_the_original_exception() -> None:
    cache = Cache()
    calls = 0

    @cache.cached(ttl=60, cache_errors=30)
    def find(x: int) -> int:
        nonlocal calls
        calls += 1
        raise NotFound("user", 404)

    with pytest.raises(NotFound) as first:
        find(1)
    assert first.value.code == 404  # the very exception, attributes and all
    with pytest.raises(Exception, match="user") as later:
        find(1)  # from the cache: rebuilt, or CachedError when it cannot be
    assert later.value is not first.value
    assert calls == 1


def test_a_failing_store_is_logged_once_per_interval_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from redis_servers import free_port

    cache = Cache(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)  # closed

    @cache.cached(ttl=60, key="k:{x}")
    def f(x: int) -> int:
        return x

    with caplog.at_level(logging.WARNING, logger="coalesce"):
        assert [f(i) for i in range(5)] == [0, 1, 2, 3, 4]  # fail-open: computed directly
    warnings = [r for r in caplog.records if "computing with coalescing" in r.getMessage()]
    assert len(warnings) == 1  # not once per call
    assert cache.backend_errors >= 5
    assert f.stats()["backend_errors"] >= 5
    cache.close()


def test_a_tag_invalidation_fences_a_computation_overlapping_a_fenced_one() -> None:
    """Computation A of a key is fenced by a key invalidation; B starts; A ends. A later tag
    invalidation must still fence B (A's end must not unmark B as carrying the tag)."""
    cache = Cache()
    db = {"v": 0}
    gates: list[threading.Event] = []

    @cache.cached(ttl=60, key="item:{i}", tags=["grp"])
    def load(i: int) -> int:
        v = db["v"]
        if len(gates) < 2:  # the first two computations wait for the test
            gate = threading.Event()
            gates.append(gate)
            assert gate.wait(10)
        return v

    def wait_for_gates(n: int) -> None:
        deadline = time.monotonic() + 10
        while len(gates) < n:
            assert time.monotonic() < deadline
            time.sleep(0.001)

    a = threading.Thread(target=load, args=(1,))
    a.start()
    wait_for_gates(1)
    cache.invalidate("item:1")  # fences A
    b = threading.Thread(target=load, args=(1,))
    b.start()
    wait_for_gates(2)  # B has read v=0
    gates[0].set()
    a.join(10)
    db["v"] = 1
    cache.invalidate_tag("grp")  # must fence B
    gates[1].set()
    b.join(10)
    assert load(1) == 1
