"""The decorators: identity of the wrapped function, methods, caching semantics, copies,
negative caching, TTL, stale-while-revalidate, argument checking.

Concurrency guarantees live in test_flight.py; the Cache object in test_cache.py.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from coalesce import Cache, ConfigurationError, SerializationError
from coalesce.testing import FakeClock

BOUND = 10.0  # seconds: generous upper bound for anything that should happen "soon"


class AppError(Exception):
    """A module-level exception type, so negative caching can rebuild it by name."""


class Widget:
    """A value type the msgpack serializer does not support."""

    def __init__(self, n: int) -> None:
        self.n = n


def wait_until(predicate: Callable[[], bool], timeout: float = BOUND) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


async def await_until(predicate: Callable[[], bool], timeout: float = BOUND) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


@pytest.fixture
def cache() -> Cache:
    return Cache()


@pytest.fixture
def clock() -> FakeClock:
    """The time of `timed`: expiry by `clock.advance(seconds)`, no sleeping."""
    return FakeClock()


@pytest.fixture
def timed(clock: FakeClock) -> Cache:
    """A memory cache on `clock`."""
    return Cache(clock=clock)


# ---------------------------------------------------------------------------------------
# identity of the decorated function


def _sync_original(day: str, region: str = "eu", *, limit: int = 10) -> dict[str, Any]:
    """Build the report of one day."""
    return {"day": day, "region": region, "limit": limit}


async def _async_original(user_id: int, /, verbose: bool = False) -> dict[str, int]:
    """Load one user."""
    return {"id": user_id}


@pytest.mark.parametrize("kind", ["cached", "coalesced"])
def test_sync_wrapper_keeps_identity(cache: Cache, kind: str) -> None:
    decorated = getattr(cache, kind)()(_sync_original)
    assert decorated.__name__ == "_sync_original"
    assert decorated.__qualname__ == _sync_original.__qualname__
    assert decorated.__doc__ == "Build the report of one day."
    assert decorated.__module__ == __name__
    assert decorated.__wrapped__ is _sync_original
    assert inspect.signature(decorated) == inspect.signature(_sync_original)
    assert not inspect.iscoroutinefunction(decorated)
    assert decorated("mon") == {"day": "mon", "region": "eu", "limit": 10}


@pytest.mark.parametrize("kind", ["cached", "coalesced"])
async def test_async_wrapper_keeps_identity(cache: Cache, kind: str) -> None:
    decorated = getattr(cache, kind)()(_async_original)
    assert decorated.__name__ == "_async_original"
    assert decorated.__doc__ == "Load one user."
    assert decorated.__wrapped__ is _async_original
    assert inspect.signature(decorated) == inspect.signature(_async_original)
    assert inspect.iscoroutinefunction(decorated)
    assert asyncio.iscoroutinefunction(decorated)
    assert await decorated(3) == {"id": 3}


def test_module_level_decorators_keep_identity() -> None:
    from coalesce import cached, coalesced

    for deco in (cached(ttl=5), cached, coalesced(), coalesced):
        sync_fn = deco(_sync_original)
        async_fn = deco(_async_original)
        assert sync_fn.__wrapped__ is _sync_original
        assert async_fn.__wrapped__ is _async_original
        assert inspect.signature(sync_fn) == inspect.signature(_sync_original)
        assert inspect.signature(async_fn) == inspect.signature(_async_original)
        assert not inspect.iscoroutinefunction(sync_fn)
        assert inspect.iscoroutinefunction(async_fn)


def test_bare_decorator_without_parentheses(cache: Cache) -> None:
    calls = []

    @cache.cached
    def f(x: int) -> int:
        calls.append(x)
        return x + 1

    assert f(1) == 2
    assert f(1) == 2
    assert calls == [1]
    assert f.__name__ == "f"


def test_decorated_function_exposes_key_invalidate_stats(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f(x: int) -> int:
        return x

    @cache.cached(ttl=60)
    async def g(x: int) -> int:
        return x

    assert callable(f.key) and callable(f.invalidate) and callable(f.stats)
    assert not inspect.iscoroutinefunction(f.invalidate)
    assert inspect.iscoroutinefunction(g.invalidate)
    assert isinstance(f.stats(), dict)


def test_functools_wraps_over_decorated_keeps_chain(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f(x: int) -> int:
        """Doc."""
        return x

    @functools.wraps(f)
    def outer(*args: Any, **kwargs: Any) -> Any:
        return f(*args, **kwargs)

    assert inspect.signature(outer) == inspect.signature(f.__wrapped__)
    assert inspect.unwrap(outer) is f.__wrapped__


# Names a generated wrapper might use for its own locals must still reach the function.
_PARAM_NAMES = ["c", "k", "e", "v", "key", "cache", "entry", "policy", "fn", "args", "kwargs"]


@pytest.mark.parametrize("name", _PARAM_NAMES)
def test_any_parameter_name_reaches_the_sync_function(cache: Cache, name: str) -> None:
    namespace: dict[str, Any] = {}
    exec(f"def echo({name}):\n    return {name}\n", namespace)
    echo = cache.cached(ttl=60)(namespace["echo"])
    assert echo("value") == "value"
    assert echo(**{name: "other"}) == "other"
    assert echo("value") == "value"  # the hit too
    templated = Cache().cached(ttl=60, key=f"t:{{{name}}}")(namespace["echo"])
    assert templated("x") == "x"
    assert templated.key("x") == "t:x"


@pytest.mark.parametrize("name", _PARAM_NAMES)
async def test_any_parameter_name_reaches_the_async_function(cache: Cache, name: str) -> None:
    namespace: dict[str, Any] = {}
    exec(f"async def echo({name}):\n    return {name}\n", namespace)
    echo = cache.cached(ttl=60)(namespace["echo"])
    assert await echo("value") == "value"
    assert await echo("value") == "value"
    shared = cache.coalesced()(namespace["echo"])
    assert await shared("z") == "z"


def test_varargs_and_kwargs_reach_the_function(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f(a: int, *rest: int, flag: bool = False, **extra: Any) -> Any:
        return (a, rest, flag, extra)

    assert f(1, 2, 3, flag=True, z=4) == (1, (2, 3), True, {"z": 4})
    assert f(1) == (1, (), False, {})
    assert f(1, 2, 3, flag=True, z=4) == (1, (2, 3), True, {"z": 4})


# ---------------------------------------------------------------------------------------
# methods


def test_method_cached_and_self_not_in_key(cache: Cache) -> None:
    calls: list[tuple[str, int]] = []

    class Repo:
        def __init__(self, name: str) -> None:
            self.name = name

        @cache.cached(ttl=60)
        def get(self, item_id: int) -> dict[str, int]:
            calls.append((self.name, item_id))
            return {"id": item_id}

    a, b = Repo("a"), Repo("b")
    assert a.get(1) == {"id": 1}
    assert a.get(item_id=1) == {"id": 1}
    assert b.get(1) == {"id": 1}  # self is not in the key: shared with a
    assert a.get(2) == {"id": 2}
    assert calls == [("a", 1), ("a", 2)]
    assert inspect.signature(Repo.get) == inspect.signature(Repo.get.__wrapped__)


async def test_async_method_cached(cache: Cache) -> None:
    calls = []

    class Repo:
        @cache.cached(ttl=60)
        async def get(self, item_id: int) -> int:
            calls.append(item_id)
            await asyncio.sleep(0)
            return item_id * 2

    r = Repo()
    assert await r.get(4) == 8
    assert await Repo().get(4) == 8
    assert calls == [4]
    assert inspect.iscoroutinefunction(Repo.get)
    assert inspect.iscoroutinefunction(r.get)


def test_staticmethod_and_classmethod_above_the_decorator(cache: Cache) -> None:
    calls: list[Any] = []

    class Repo:
        @staticmethod
        @cache.cached(ttl=60)
        def static(x: int) -> int:
            calls.append(("static", x))
            return x + 1

        @classmethod
        @cache.cached(ttl=60)
        def klass(cls, x: int) -> str:
            calls.append((cls.__name__, x))
            return f"{x}"

    class Sub(Repo):
        pass

    assert Repo.static(1) == 2
    assert Repo().static(1) == 2
    assert Repo.klass(5) == "5"
    assert Repo().klass(5) == "5"
    assert Sub.klass(5) == "5"  # cls is left out of the key
    assert calls == [("static", 1), ("Repo", 5)]


async def test_async_classmethod_above_the_decorator(cache: Cache) -> None:
    calls = []

    class Repo:
        @classmethod
        @cache.cached(ttl=60)
        async def load(cls, x: int) -> int:
            calls.append(x)
            return x

    assert await Repo.load(1) == 1
    assert await Repo.load(1) == 1
    assert calls == [1]


def test_staticmethod_below_the_decorator_is_a_configuration_error(cache: Cache) -> None:
    with pytest.raises(ConfigurationError) as info:

        class Repo:
            @cache.cached(ttl=60)  # type: ignore[misc]
            @staticmethod
            def static(x: int) -> int:
                return x

    assert "staticmethod" in str(info.value)


def test_decorating_a_non_callable_is_a_configuration_error(cache: Cache) -> None:
    with pytest.raises(ConfigurationError):
        cache.cached(ttl=60)(42)


# ---------------------------------------------------------------------------------------
# what is cached


def test_sync_result_cached_until_invalidated(cache: Cache) -> None:
    calls = []

    @cache.cached(ttl=60)
    def f(x: int) -> int:
        calls.append(x)
        return x * 2

    assert f(2) == 4
    assert f(2) == 4
    assert f(x=2) == 4
    assert f(3) == 6
    assert calls == [2, 3]


async def test_async_result_cached(cache: Cache) -> None:
    calls = []

    @cache.cached(ttl=60)
    async def f(x: int) -> int:
        calls.append(x)
        return x * 2

    assert await f(2) == 4
    assert await f(2) == 4
    assert calls == [2]


@pytest.mark.parametrize("value", [None, 0, "", [], {}, False, ()])
def test_falsy_values_and_none_are_cached(cache: Cache, value: Any) -> None:
    calls = []

    @cache.cached(ttl=60)
    def f() -> Any:
        calls.append(1)
        return value

    assert f() == value
    assert f() == value
    assert type(f()) is type(value)
    assert calls == [1]


async def test_async_none_is_cached(cache: Cache) -> None:
    calls = []

    @cache.cached(ttl=60)
    async def f() -> None:
        calls.append(1)

    assert await f() is None
    assert await f() is None
    assert calls == [1]


def test_exceptions_are_not_cached(cache: Cache) -> None:
    calls = []

    @cache.cached(ttl=60)
    def f() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise AppError("first")
        return 7

    with pytest.raises(AppError, match="first"):
        f()
    assert f() == 7
    assert f() == 7
    assert len(calls) == 2
    assert f.stats()["errors"] == 1


async def test_async_exceptions_are_not_cached(cache: Cache) -> None:
    calls = []

    @cache.cached(ttl=60)
    async def f() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise AppError("first")
        return 7

    with pytest.raises(AppError):
        await f()
    assert await f() == 7
    assert await f() == 7
    assert len(calls) == 2


def test_cache_errors_caches_the_exception_then_expires(timed: Cache, clock: FakeClock) -> None:
    calls = []

    @timed.cached(ttl=60, cache_errors=1.0)
    def f(x: int) -> int:
        calls.append(x)
        raise AppError(f"bad {x}")

    with pytest.raises(AppError, match="bad 1"):
        f(1)
    with pytest.raises(AppError, match="bad 1"):  # re-raised without recomputing
        f(1)
    with pytest.raises(AppError, match="bad 1"):
        f(1)
    assert calls == [1]
    clock.advance(0.99)
    with pytest.raises(AppError, match="bad 1"):  # still inside cache_errors
        f(1)
    assert calls == [1]
    clock.advance(0.02)
    with pytest.raises(AppError, match="bad 1"):
        f(1)
    assert calls == [1, 1]
    assert f.stats()["computations"] == 2
    assert f.stats()["errors"] == 2


def test_cache_errors_builtin_exception_type_kept(cache: Cache) -> None:
    calls = []

    @cache.cached(ttl=60, cache_errors=30)
    def f() -> int:
        calls.append(1)
        raise ValueError("no such thing")

    for _ in range(3):
        with pytest.raises(ValueError, match="no such thing"):
            f()
    assert len(calls) == 1


@pytest.mark.parametrize("option", ["ttl", "stale_ttl", "cache_errors"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e300, -1])
def test_times_must_be_finite_and_sane(cache: Cache, option: str, value: float) -> None:
    with pytest.raises(ConfigurationError, match=option):
        cache.cached(**{option: value})(lambda: 1)


def test_cache_errors_rebuild_the_exception_from_its_own_argument(cache: Cache) -> None:
    @cache.cached(ttl=60, cache_errors=30, key="k:{name}")
    def lookup(name: str) -> int:
        raise KeyError(name)

    for _ in range(2):
        with pytest.raises(KeyError) as info:
            lookup("x")
        assert info.value.args == ("x",)  # not "'x'", as str(KeyError("x")) would give


async def test_async_cache_errors(timed: Cache, clock: FakeClock) -> None:
    calls = []

    @timed.cached(ttl=60, cache_errors=1.0)
    async def f() -> int:
        calls.append(1)
        raise AppError("down")

    with pytest.raises(AppError, match="down"):
        await f()
    with pytest.raises(AppError, match="down"):
        await f()
    assert len(calls) == 1
    clock.advance(0.99)
    with pytest.raises(AppError, match="down"):  # still inside cache_errors
        await f()
    assert len(calls) == 1
    clock.advance(0.02)
    with pytest.raises(AppError):
        await f()
    assert len(calls) == 2


def test_cache_errors_success_is_cached_normally(cache: Cache) -> None:
    calls = []

    @cache.cached(ttl=60, cache_errors=10)
    def f() -> int:
        calls.append(1)
        return 5

    assert f() == 5
    assert f() == 5
    assert calls == [1]


def test_cache_errors_entry_removed_by_invalidate(cache: Cache) -> None:
    calls = []

    @cache.cached(ttl=60, cache_errors=60)
    def f() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise AppError("x")
        return 1

    with pytest.raises(AppError):
        f()
    assert f.invalidate() is True
    assert f() == 1
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------
# TTL and stale-while-revalidate


def test_ttl_expiry_recomputes(timed: Cache, clock: FakeClock) -> None:
    calls = []

    @timed.cached(ttl=1.0)
    def f() -> int:
        calls.append(1)
        return len(calls)

    assert f() == 1
    clock.advance(0.99)
    assert f() == 1
    clock.advance(0.02)
    assert f() == 2
    assert f() == 2
    assert len(calls) == 2


async def test_async_ttl_expiry_recomputes(timed: Cache, clock: FakeClock) -> None:
    calls = []

    @timed.cached(ttl=1.0)
    async def f() -> int:
        calls.append(1)
        return len(calls)

    assert await f() == 1
    clock.advance(0.99)
    assert await f() == 1
    clock.advance(0.02)
    assert await f() == 2
    assert len(calls) == 2


def test_ttl_is_per_function(timed: Cache, clock: FakeClock) -> None:
    short_calls, long_calls = [], []

    @timed.cached(ttl=0.2)
    def short() -> int:
        short_calls.append(1)
        return 1

    @timed.cached(ttl=60)
    def long() -> int:
        long_calls.append(1)
        return 1

    short(), long()
    clock.advance(0.25)
    short(), long()
    assert len(short_calls) == 2
    assert len(long_calls) == 1


def test_default_ttl_of_the_cache_is_used(clock: FakeClock) -> None:
    cache = Cache(default_ttl=0.2, clock=clock)
    calls = []

    @cache.cached()
    def f() -> int:
        calls.append(1)
        return 1

    f()
    clock.advance(0.19)
    f()
    assert len(calls) == 1
    clock.advance(0.02)
    f()
    assert len(calls) == 2


def test_stale_value_served_and_refreshed_once_sync(timed: Cache, clock: FakeClock) -> None:
    release = threading.Event()
    refreshing = threading.Event()
    calls = []

    @timed.cached(ttl=0.2, stale_ttl=30)
    def f() -> int:
        calls.append(1)
        if len(calls) > 1:
            refreshing.set()
            assert release.wait(BOUND)
        return len(calls)

    assert f() == 1
    clock.advance(0.25)
    started = time.monotonic()
    results = [f() for _ in range(20)]  # all stale hits; the refresh is blocked
    assert results == [1] * 20
    assert time.monotonic() - started < 2.0  # served at once, not after the refresh
    assert refreshing.wait(BOUND)
    # more concurrent stale callers from threads, while the one refresh is still running
    out: list[int] = []
    threads = [threading.Thread(target=lambda: out.append(f())) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BOUND)
    assert out == [1] * 10
    release.set()
    wait_until(lambda: f() == 2)
    assert f() == 2
    assert len(calls) == 2  # exactly one background refresh
    stats = f.stats()
    assert stats["stale"] >= 30
    assert stats["computations"] == 2


async def test_stale_value_served_and_refreshed_once_async(timed: Cache, clock: FakeClock) -> None:
    cache = timed
    release = asyncio.Event()
    calls = []

    @cache.cached(ttl=0.2, stale_ttl=30)
    async def f() -> int:
        calls.append(1)
        if len(calls) > 1:
            await release.wait()
        return len(calls)

    assert await f() == 1
    clock.advance(0.25)
    results = await asyncio.wait_for(asyncio.gather(*(f() for _ in range(50))), BOUND)
    assert results == [1] * 50
    await await_until(lambda: len(calls) == 2)
    assert await f() == 1  # still stale while the refresh runs
    release.set()
    await await_until(lambda: cache.get_entry(f.key()).value == 2)  # type: ignore[union-attr]
    assert await f() == 2
    assert len(calls) == 2


def test_after_stale_window_value_is_recomputed_in_the_caller(
    timed: Cache, clock: FakeClock
) -> None:
    calls = []

    @timed.cached(ttl=0.1, stale_ttl=0.1)
    def f() -> int:
        calls.append(1)
        return len(calls)

    assert f() == 1
    clock.advance(0.25)  # past ttl + stale_ttl: nothing to serve
    assert f() == 2
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------
# copies: callers do not see each other's edits


def test_mutating_a_returned_flat_dict_does_not_change_the_cache(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f() -> dict[str, int]:
        return {"a": 1}

    first = f()
    first["a"] = 99
    first["b"] = 2
    assert f() == {"a": 1}
    assert f() is not f()


def test_mutating_nested_structures_does_not_change_the_cache(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f() -> dict[str, Any]:
        return {"items": [1, 2, {"deep": [3]}], "meta": {"n": 1}, "t": (1, [2])}

    first = f()
    first["items"].append(4)
    first["items"][2]["deep"].append(5)
    first["meta"]["n"] = 2
    first["t"][1].append(3)
    assert f() == {"items": [1, 2, {"deep": [3]}], "meta": {"n": 1}, "t": (1, [2])}


def test_mutating_returned_list_and_set(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def lst() -> list[Any]:
        return [1, [2]]

    @cache.cached(ttl=60)
    def st() -> set[int]:
        return {1, 2}

    a = lst()
    a.append(3)
    a[1].append(9)
    assert lst() == [1, [2]]
    s = st()
    s.add(3)
    assert st() == {1, 2}


def test_function_mutating_its_own_returned_object_later_does_not_change_cache(
    cache: Cache,
) -> None:
    shared: dict[str, Any] = {"n": 1, "xs": [1]}

    @cache.cached(ttl=60)
    def f() -> dict[str, Any]:
        return shared

    assert f() == {"n": 1, "xs": [1]}
    shared["n"] = 2
    shared["xs"].append(2)
    assert f() == {"n": 1, "xs": [1]}


def test_leader_result_is_a_private_copy_too(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f() -> dict[str, list[int]]:
        return {"xs": [1]}

    leader = f()  # the caller that computed the value
    leader["xs"].append(2)
    assert f() == {"xs": [1]}


async def test_async_mutation_isolated(cache: Cache) -> None:
    @cache.cached(ttl=60)
    async def f() -> dict[str, list[int]]:
        await asyncio.sleep(0.01)
        return {"xs": [1]}

    results = await asyncio.gather(*(f() for _ in range(20)))
    assert len({id(r) for r in results}) == 20
    results[0]["xs"].append(2)
    assert all(r == {"xs": [1]} for r in results[1:])
    assert await f() == {"xs": [1]}


def test_copy_false_shares_the_object(cache: Cache) -> None:
    calls = []

    @cache.cached(ttl=60, copy=False)
    def f() -> dict[str, Any]:
        calls.append(1)
        return {"a": [1]}

    first = f()
    second = f()
    assert first is second
    first["a"].append(2)
    assert f() == {"a": [1, 2]}
    assert len(calls) == 1


def test_copy_false_allows_unserializable_values_in_memory(cache: Cache) -> None:
    @cache.cached(ttl=60, copy=False)
    def f() -> Widget:
        return Widget(1)

    assert f() is f()


def test_coalesced_stores_nothing(cache: Cache) -> None:
    calls = []

    @cache.coalesced()
    def f(x: int) -> int:
        calls.append(x)
        return x

    assert f(1) == 1
    assert f(1) == 1
    assert calls == [1, 1]
    assert cache.keys() == []


async def test_async_coalesced_stores_nothing(cache: Cache) -> None:
    calls = []

    @cache.coalesced(key="rates:{currency}")
    async def rates(currency: str) -> dict[str, float]:
        calls.append(currency)
        return {currency: 1.0}

    assert await rates("eur") == {"eur": 1.0}
    assert await rates("eur") == {"eur": 1.0}
    assert calls == ["eur", "eur"]
    assert rates.key("eur") == "rates:eur"


# ---------------------------------------------------------------------------------------
# serialization errors


def test_unsupported_value_type_raises_serialization_error(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def make_widget(n: int) -> Widget:
        return Widget(n)

    with pytest.raises(SerializationError) as info:
        make_widget(1)
    message = str(info.value)
    assert "Widget" in message
    assert "make_widget" in message
    assert cache.keys() == []  # nothing stored


def test_unsupported_nested_value_names_the_inner_type(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def nested() -> dict[str, Any]:
        return {"ok": [1, 2], "bad": [Widget(1)]}

    with pytest.raises(SerializationError) as info:
        nested()
    assert "Widget" in str(info.value)
    assert "nested" in str(info.value)


async def test_async_unsupported_value_type_raises_serialization_error(cache: Cache) -> None:
    @cache.cached(ttl=60)
    async def make_widget_async() -> Widget:
        return Widget(1)

    with pytest.raises(SerializationError) as info:
        await make_widget_async()
    assert "Widget" in str(info.value)
    assert "make_widget_async" in str(info.value)


def test_serialization_error_is_not_silently_pickled(cache: Cache) -> None:
    class Point:
        def __init__(self) -> None:
            self.x = 1

        def __reduce__(self) -> Any:
            raise AssertionError("pickle must not be used")

    @cache.cached(ttl=60)
    def f() -> Point:
        return Point()

    with pytest.raises(SerializationError):
        f()


def test_supported_value_types_round_trip_through_the_cache(cache: Cache) -> None:
    import datetime as dt
    import uuid
    from decimal import Decimal

    value = {
        "t": (1, "a"),
        "s": {1, 2},
        "fs": frozenset({3}),
        "b": b"\x00",
        "when": dt.datetime(2024, 1, 2, 3, 4, tzinfo=dt.timezone.utc),
        "d": dt.date(2024, 1, 2),
        "tm": dt.time(1, 2),
        "dec": Decimal("1.10"),
        "u": uuid.UUID(int=5),
        "none": None,
        "nested": [{"x": (1, [2])}],
    }

    @cache.cached(ttl=60)
    def f() -> dict[str, Any]:
        return value

    first = f()
    second = f()
    assert first == second == value
    for k in value:
        assert type(second[k]) is type(value[k]), k
    assert type(second["nested"][0]["x"]) is tuple


# ---------------------------------------------------------------------------------------
# invalidation through the function


def test_fn_invalidate_returns_whether_entry_existed(cache: Cache) -> None:
    calls = []

    @cache.cached(ttl=60, key="item:{x}")
    def f(x: int) -> int:
        calls.append(x)
        return x

    assert f.invalidate(1) is False
    f(1)
    assert f.invalidate(x=1) is True
    assert f.invalidate(1) is False
    f(1)
    assert calls == [1, 1]
    assert f.stats()["invalidations"] == 3


async def test_async_fn_invalidate_is_awaitable(cache: Cache) -> None:
    calls = []

    @cache.cached(ttl=60)
    async def f(x: int) -> int:
        calls.append(x)
        return x

    result = f.invalidate(1)
    assert inspect.isawaitable(result)
    assert await result is False
    await f(1)
    await f(1)
    assert await f.invalidate(1) is True
    await f(1)
    assert calls == [1, 1]


def test_fn_invalidate_only_removes_that_key(cache: Cache) -> None:
    calls = []

    @cache.cached(ttl=60)
    def f(x: int) -> int:
        calls.append(x)
        return x

    f(1), f(2)
    assert f.invalidate(1) is True
    f(1), f(2)
    assert calls == [1, 2, 1]


def test_fn_invalidate_of_expired_entry_reports_false(timed: Cache, clock: FakeClock) -> None:
    @timed.cached(ttl=0.1)
    def f() -> int:
        return 1

    f()
    clock.advance(0.15)
    assert f.invalidate() is False


# ---------------------------------------------------------------------------------------
# decorator arguments


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": -1}, "ttl"),
        ({"ttl": -0.5}, "ttl"),
        ({"ttl": "60"}, "ttl"),
        ({"ttl": True}, "ttl"),
        ({"stale_ttl": -1}, "stale_ttl"),
        ({"stale_ttl": "x"}, "stale_ttl"),
        ({"cache_errors": 0}, "cache_errors"),
        ({"cache_errors": -5}, "cache_errors"),
    ],
)
def test_bad_decorator_arguments_raise_configuration_error(
    cache: Cache, kwargs: dict[str, Any], word: str
) -> None:
    with pytest.raises(ConfigurationError) as info:

        @cache.cached(**kwargs)
        def f() -> int:
            return 1

    message = str(info.value)
    assert word in message
    assert repr(next(iter(kwargs.values()))) in message


def test_bad_arguments_raise_for_module_level_decorator_too() -> None:
    from coalesce import cached

    with pytest.raises(ConfigurationError):

        @cached(ttl=0)
        def f() -> int:
            return 1


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"tags": "user:{x}"}, "tags must be a list of tag templates"),
        ({"exclude": "x"}, "exclude must be a list of parameter names"),
        ({"copy": "no"}, "copy must be True or False"),
    ],
)
def test_decorator_options_of_the_wrong_shape_are_named(
    cache: Cache, options: dict[str, Any], problem: str
) -> None:
    def f(x: int) -> int:
        return x

    with pytest.raises(ConfigurationError, match=problem):
        cache.cached(ttl=5, **options)(f)


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"enabled": "no"}, "enabled must be True or False"),
        ({"namespace": "a{b}"}, "namespace may not contain"),
        ({"namespace": "a*"}, "namespace may not contain"),
        ({"maxsize": 10**20}, "maxsize must be a positive integer"),
    ],
)
def test_cache_options_of_the_wrong_shape_are_named(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        Cache(**options)


# -- a BackendError the function raises is its own outcome, not a store failure ----------------


@pytest.mark.parametrize("tags", [[], ["team"]], ids=["no-tags", "tags"])
def test_a_backend_error_raised_by_the_function_is_raised_once(
    cache: Cache, tags: list[str]
) -> None:
    """A cached function calling a fail-closed cache whose store is down raises that cache's
    `BackendError`: it runs once and its caller gets it, as with any exception (it is not a
    failure of this cache's store, to be computed again without it)."""
    from coalesce import BackendError

    calls: list[int] = []

    @cache.cached(ttl=60, tags=tags)
    def nested(user_id: int) -> int:
        calls.append(user_id)
        raise BackendError("Redis at elsewhere failed")

    with pytest.raises(BackendError, match="elsewhere"):
        nested(1)
    assert calls == [1]
    assert nested.stats()["backend_errors"] == 0
