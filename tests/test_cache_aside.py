"""Cache-aside calls: `Cache.get_or_set` / `aget_or_set`, `get` / `aget`, `set` / `aset`.

They take the decorators' path (one policy per stats name, the same flight, `fill`, fencing,
entries and stats), so the tests check what a user relies on, with real threads, tasks and
OS processes, on the memory store and on a real Redis: one computation among overlapping
callers, failures shared, invalidation fencing a computation in flight, copies of values,
and that decorators, `get` / `set` and `invalidate` meet on the same stored keys.

Every wait is bounded (`WAIT`).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from coalesce import Cache, ConfigurationError
from coalesce.cache import stored_key
from coalesce.testing import FakeClock

ROOT = Path(__file__).resolve().parent.parent
WAIT = 20.0  # seconds any wait in these tests gives up after


@pytest.fixture(params=["memory", "redis"])
def make_cache(request: pytest.FixtureRequest) -> Iterator[Callable[..., Cache]]:
    """`make_cache(**options)`: caches of one kind; on Redis, two of them meet only in Redis
    (separate in-process flights), like two processes."""
    if request.param == "redis":
        yield request.getfixturevalue("redis_caches")
        return
    made: list[Cache] = []

    def make(**options: Any) -> Cache:
        made.append(Cache(**options))
        return made[-1]

    yield make
    for cache in made:
        cache.close()


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {WAIT} s"
        time.sleep(0.005)


async def _auntil(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {WAIT} s"
        await asyncio.sleep(0.005)


def _threads(n: int, target: Callable[[], Any]) -> list[Any]:
    """Run `target` in n threads at once; their results (or exceptions), in order."""
    results: list[Any] = [None] * n
    start = threading.Barrier(n)

    def run(i: int) -> None:
        start.wait(WAIT)
        try:
            results[i] = target()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive(), "a caller hung"
    return results


# ---------------------------------------------------------------------------------------
# keys


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("user:42", "user:42"),
        ("user:a b", "user:a%20b"),
        ("user:a%20b", "user:a%20b"),  # already the stored form (`fn.key(...)` gives it)
        ("user:100%", "user:100%25"),  # a `%` that is no escape is text
        ("user:a%2fb", "user:a%252fb"),  # escapes are upper case: this one is text
        ("user:{x}", "user:%7Bx%7D"),
        ("user:é", "user:é"),
        ("user:a\tb", "user:a%09b"),
    ],
)
def test_stored_key_escapes_like_the_decorators_and_keeps_stored_forms(
    given: str, stored: str
) -> None:
    assert stored_key(given) == stored
    assert stored_key(stored) == stored


def test_a_long_key_is_shortened_once() -> None:
    key = "user:" + "a b" * 100
    stored = stored_key(key)
    assert len(stored) == 242 and stored[200:202] == "%#"
    assert stored_key(stored) == stored


def test_decorators_get_set_and_invalidate_meet_on_one_key(
    make_cache: Callable[..., Cache],
) -> None:
    cache = make_cache()
    calls: list[str] = []

    @cache.cached(ttl=60, key="user:{name}")
    def user(name: str) -> dict[str, Any]:
        calls.append(name)
        return {"name": name}

    assert user("a b") == {"name": "a b"}
    assert cache.keys("user:*") == ["user:a%20b"]
    # the decorator's entry, by its text (the stored form is for invalidate and get_entry)
    assert cache.get("user:a b") == {"name": "a b"}
    assert cache.get(user.key("a b")) is None  # "user:a%20b" is another text
    assert cache.get_entry(user.key("a b")) is not None
    assert cache.get_or_set("user:a b", lambda: {"name": "other"}) == {"name": "a b"}
    # written by `set`, read by the decorator without computing
    assert cache.set("user:c d", {"name": "set"}, ttl=60)
    assert user("c d") == {"name": "set"}
    assert calls == ["a b"]
    # `invalidate` takes either form too
    assert cache.invalidate("user:a b")
    assert cache.get("user:a b") is None
    assert user("a b") == {"name": "a b"}
    assert calls == ["a b", "a b"]
    assert cache.invalidate(user.key("c d"))
    assert cache.get("user:c d", "gone") == "gone"


async def test_async_decorators_and_aget_aset_meet(make_cache: Callable[..., Cache]) -> None:
    cache = make_cache()

    @cache.cached(ttl=60, key="team:{name}")
    async def team(name: str) -> list[str]:
        return [name]

    assert await team("x y") == ["x y"]
    assert await cache.aget("team:x y") == ["x y"]
    assert await cache.aset("team:z", ["set"], ttl=60)
    assert await team("z") == ["set"]
    assert await cache.aget_or_set("team:z", _never) == ["set"]
    assert await cache.ainvalidate("team:x y")
    assert await cache.aget("team:x y") is None


async def _never() -> Any:
    raise AssertionError("computed although the entry was there")


# ---------------------------------------------------------------------------------------
# values


def test_get_set_roundtrip_hands_out_copies(make_cache: Callable[..., Cache]) -> None:
    cache = make_cache()
    assert cache.get("cfg:missing") is None
    assert cache.get("cfg:missing", 5) == 5
    value = {"a": [1, 2], "b": {"c": (1, "x")}}
    assert cache.set("cfg:1", value, ttl=60, tags=["cfg"])
    value["a"].append(3)  # the caller's object is not the stored one
    first = cache.get("cfg:1")
    assert first == {"a": [1, 2], "b": {"c": (1, "x")}}
    first["a"].append(4)  # nor is what a reader receives
    assert cache.get("cfg:1") == {"a": [1, 2], "b": {"c": (1, "x")}}
    entry = cache.get_entry("cfg:1")
    assert entry is not None and entry.ttl == 60 and entry.tags == ("cfg",)
    # get_or_set copies as the decorators do
    got = cache.get_or_set("cfg:2", lambda: {"n": [1]})
    got["n"].append(2)
    assert cache.get_or_set("cfg:2", lambda: {"n": ["recomputed"]}) == {"n": [1]}
    assert cache.invalidate_tag("cfg") == 1
    assert cache.get("cfg:1") is None


def test_get_or_set_entries_carry_their_tags(make_cache: Callable[..., Cache]) -> None:
    """A computed entry carries the call's tags (stored, and invalidated by them), sync and
    async: the tags of a cache-aside call come from the call, not from a decorator."""
    cache = make_cache()
    assert cache.get_or_set("user:1", lambda: 1, tags=["team:a"]) == 1

    async def two() -> int:
        return 2

    assert asyncio.run(cache.aget_or_set("user:2", two, tags=["team:a"])) == 2
    for key in ("user:1", "user:2"):
        entry = cache.get_entry(key)
        assert entry is not None and entry.tags == ("team:a",)
    assert cache.invalidate_tag("team:a") == 2
    assert cache.get("user:1") is None and cache.get("user:2") is None


def test_set_refuses_what_the_decorators_refuse(make_cache: Callable[..., Cache]) -> None:
    from coalesce import SerializationError

    cache = make_cache()
    with pytest.raises(SerializationError):
        cache.set("obj:1", threading.Lock())
    assert cache.get("obj:1") is None


def test_copy_false_shares_the_object_on_memory() -> None:
    cache = Cache()
    shared = cache.get_or_set("s:1", lambda: {"a": 1}, copy=False)
    assert cache.get_or_set("s:1", lambda: {"a": 2}, copy=False) is shared


def test_an_expired_entry_is_missing_and_a_stale_one_is_refreshed() -> None:
    clock = FakeClock()
    cache = Cache(clock=clock)
    cache.set("t:1", "old", ttl=0.05)
    clock.advance(0.04)
    assert cache.get("t:1") == "old"
    clock.advance(0.02)
    assert cache.get("t:1") is None
    versions = iter(["v1", "v2"])
    assert cache.get_or_set("t:2", lambda: next(versions), ttl=0.05, stale_ttl=60) == "v1"
    clock.advance(0.1)  # past its ttl, inside its stale window
    assert cache.get_or_set("t:2", lambda: next(versions), ttl=0.05, stale_ttl=60) == "v1"
    _until(lambda: cache.stats()["t"]["computations"] == 2, "the background refresh")
    assert cache.stats()["t"]["stale"] == 1


# ---------------------------------------------------------------------------------------
# one computation


def test_overlapping_threads_compute_once(make_cache: Callable[..., Cache]) -> None:
    cache = make_cache()
    n = 8
    executions: list[int] = []

    def compute() -> dict[str, int]:
        executions.append(1)
        # finish only once every caller has joined the flight
        _until(lambda: cache.stats()["hot"]["misses"] >= n, "every caller joining")
        return {"v": 1}

    results = _threads(n, lambda: cache.get_or_set("hot:1", compute, ttl=60))
    assert results == [{"v": 1}] * n
    assert len(executions) == 1
    stats = cache.stats()["hot"]
    assert stats["computations"] == 1 and stats["coalesced"] == n - 1
    assert cache.get_or_set("hot:1", compute) == {"v": 1}  # a hit now
    assert cache.stats()["hot"]["hits"] == 1


async def test_overlapping_tasks_compute_once(make_cache: Callable[..., Cache]) -> None:
    cache = make_cache()
    n = 20
    executions: list[int] = []

    async def compute() -> list[int]:
        executions.append(1)
        await _auntil(lambda: cache.stats()["hot"]["misses"] >= n, "every caller joining")
        return [1, 2]

    results = await asyncio.gather(*(cache.aget_or_set("hot:a", compute) for _ in range(n)))
    assert results == [[1, 2]] * n
    assert len({id(r) for r in results}) == n  # each caller its own copy
    assert len(executions) == 1
    assert cache.stats()["hot"]["coalesced"] == n - 1


def test_two_caches_on_redis_compute_once(redis_caches: Callable[..., Cache]) -> None:
    # two caches meet only in Redis: the second waits for the first one's lease
    first, second = redis_caches(), redis_caches()
    executions: list[str] = []
    started = threading.Event()

    def compute(who: str) -> Callable[[], str]:
        def run() -> str:
            executions.append(who)
            started.set()
            _until(lambda: second.store.stats()["waits"] >= 1, "the other cache waiting")
            return who

        return run

    leader = threading.Thread(target=lambda: first.get_or_set("x:1", compute("first")))
    leader.start()
    assert started.wait(WAIT)
    assert second.get_or_set("x:1", compute("second")) == "first"
    leader.join(WAIT)
    assert executions == ["first"]


WORKER = r"""
import json, os, sys, threading, time
from coalesce import Cache

url, ns, workdir, procs, callers, wait = sys.argv[1:7]
procs, callers, wait = int(procs), int(callers), float(wait)
cache = Cache(url, namespace=ns)

def path(name):
    return os.path.join(workdir, name)

def until(condition, what):
    deadline = time.monotonic() + wait
    while not condition():
        if time.monotonic() > deadline:
            sys.stderr.write(f"worker {os.getpid()}: {what} within {wait} s\n")
            os._exit(3)
        time.sleep(0.005)

def compute():
    fd = os.open(path("executions"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    # finish only when every process's callers overlap this computation
    until(lambda: len([f for f in os.listdir(workdir) if f.startswith("engaged-")]) == procs,
          "not every process joined")
    return {"by": "one", "items": [1, 2]}

def engage():
    # engaged: every caller of this process joined its flight, which leads or waits
    def ready():
        stats = cache.store.stats()
        misses = cache.stats().get("cold", {}).get("misses", 0)
        return misses >= callers and (stats["leads"] or stats["waits"])
    until(ready, "the callers did not reach the store")
    open(path(f"engaged-{os.getpid()}"), "w").close()

open(path(f"ready-{os.getpid()}"), "w").close()
until(lambda: os.path.exists(path("go")), "no go from the test")
results = [None] * callers
def call(i):
    results[i] = cache.get_or_set("cold:1", compute, ttl=60)
threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
threads.append(threading.Thread(target=engage))
for t in threads:
    t.start()
for t in threads:
    t.join(wait)
print(json.dumps({"results": results, "stats": cache.store.stats()}))
cache.close()
"""


def test_two_os_processes_on_redis_compute_once(
    redis_url: str, unique_namespace: str, tmp_path: Path
) -> None:
    procs, callers = 2, 4
    args = [redis_url, unique_namespace, str(tmp_path), str(procs), str(callers), str(WAIT)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for _ in range(procs)
    ]
    try:
        _until(lambda: len(list(tmp_path.glob("ready-*"))) == procs, "every worker ready")
        (tmp_path / "go").write_text("")
        outputs = []
        for worker in workers:
            out, err = worker.communicate(timeout=2 * WAIT)
            assert worker.returncode == 0, err
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate(timeout=WAIT)
    results = [r for out in outputs for r in out["results"]]
    assert results == [{"by": "one", "items": [1, 2]}] * (procs * callers)
    assert len((tmp_path / "executions").read_text().splitlines()) == 1
    assert sum(out["stats"]["leads"] for out in outputs) == 1
    assert sum(out["stats"]["waits"] for out in outputs) == procs - 1


# ---------------------------------------------------------------------------------------
# failures and fencing


def test_an_exception_reaches_every_waiter_and_nothing_is_stored(
    make_cache: Callable[..., Cache],
) -> None:
    cache = make_cache()
    n = 6
    executions: list[int] = []

    def fail() -> Any:
        executions.append(1)
        _until(lambda: cache.stats()["bad"]["misses"] >= n, "every caller joining")
        raise ValueError("boom")

    results = _threads(n, lambda: cache.get_or_set("bad:1", fail))
    assert all(isinstance(r, ValueError) and str(r) == "boom" for r in results), results
    assert len(executions) == 1
    assert cache.get("bad:1") is None
    assert cache.get_or_set("bad:1", lambda: "fine") == "fine"  # the key is free at once
    assert cache.stats()["bad"]["errors"] == 1


async def test_an_exception_reaches_every_task(make_cache: Callable[..., Cache]) -> None:
    cache = make_cache()
    n = 10

    async def fail() -> Any:
        await _auntil(lambda: cache.stats()["bad"]["misses"] >= n, "every caller joining")
        raise KeyError("gone")

    results = await asyncio.gather(
        *(cache.aget_or_set("bad:a", fail) for _ in range(n)), return_exceptions=True
    )
    assert all(isinstance(r, KeyError) for r in results), results
    assert await cache.aget("bad:a") is None
    assert cache.stats()["bad"]["computations"] == 1


def test_invalidate_during_a_computation_fences_it(make_cache: Callable[..., Cache]) -> None:
    cache = make_cache()
    # on Redis another "process" (a cache meeting this one only in Redis) invalidates
    other = make_cache() if cache.store.shared else cache
    computing, invalidated = threading.Event(), threading.Event()

    def compute() -> str:
        computing.set()
        assert invalidated.wait(WAIT)
        return "computed before the invalidation"

    caller = threading.Thread(target=lambda: results.append(cache.get_or_set("f:1", compute)))
    results: list[str] = []
    caller.start()
    assert computing.wait(WAIT)
    other.invalidate("f:1")
    invalidated.set()
    caller.join(WAIT)
    assert results == ["computed before the invalidation"]  # its caller still gets it
    assert cache.get("f:1") is None and other.get("f:1") is None  # but it was not stored
    assert cache.get_or_set("f:1", lambda: "fresh") == "fresh"


def test_set_during_a_computation_wins(make_cache: Callable[..., Cache]) -> None:
    cache = make_cache()
    computing, written = threading.Event(), threading.Event()

    def compute() -> str:
        computing.set()
        assert written.wait(WAIT)
        return "old"

    caller = threading.Thread(target=lambda: cache.get_or_set("w:1", compute))
    caller.start()
    assert computing.wait(WAIT)
    assert cache.set("w:1", "new")
    written.set()
    caller.join(WAIT)
    assert cache.get("w:1") == "new"


async def test_ainvalidate_during_an_async_computation_fences_it(
    make_cache: Callable[..., Cache],
) -> None:
    cache = make_cache()
    computing, invalidated = asyncio.Event(), asyncio.Event()

    async def compute() -> str:
        computing.set()
        await asyncio.wait_for(invalidated.wait(), WAIT)
        return "old"

    task = asyncio.ensure_future(cache.aget_or_set("f:a", compute))
    await asyncio.wait_for(computing.wait(), WAIT)
    await cache.ainvalidate("f:a")
    invalidated.set()
    assert await asyncio.wait_for(task, WAIT) == "old"
    assert await cache.aget("f:a") is None


# ---------------------------------------------------------------------------------------
# the rollback switch, options, stats


def test_the_kill_switch_computes_every_time(make_cache: Callable[..., Cache]) -> None:
    cache = make_cache(enabled=False)
    calls: list[int] = []
    assert [cache.get_or_set("k:1", lambda: calls.append(1) or len(calls)) for _ in "ab"] == [
        1,
        2,
    ]
    assert cache.set("k:1", "x") is False
    assert cache.get("k:1", "default") == "default"
    live = make_cache()
    live.set("k:2", "stored")
    live.enabled = False  # at run time
    assert live.get("k:2") is None
    assert live.get_or_set("k:2", lambda: "computed") == "computed"
    live.enabled = True
    assert live.get("k:2") == "stored"


async def test_the_kill_switch_async(make_cache: Callable[..., Cache]) -> None:
    cache = make_cache(enabled=False)
    calls: list[int] = []

    async def compute() -> int:
        calls.append(1)
        return len(calls)

    assert [await cache.aget_or_set("k:a", compute) for _ in "ab"] == [1, 2]
    assert await cache.aset("k:a", 1) is False
    assert await cache.aget("k:a") is None


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"ttl": math.inf}, "ttl"),
        ({"ttl": -1}, "ttl"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": math.nan}, "ttl"),
        ({"ttl": True}, "ttl"),
        ({"ttl": "60"}, "ttl"),
        ({"stale_ttl": -1}, "stale_ttl"),
        ({"stale_ttl": False}, "stale_ttl"),
        ({"cache_errors": 0}, "cache_errors"),
        ({"copy": "yes"}, "copy"),
        ({"tags": "user:1"}, "tags"),
        ({"tags": [1]}, "tags"),
        ({"name": ""}, "name"),
    ],
)
async def test_bad_options_raise_configuration_error(options: dict[str, Any], named: str) -> None:
    cache = Cache()
    cache.set("opt:1", "there")  # refused on a hit too
    with pytest.raises(ConfigurationError, match=named):
        cache.get_or_set("opt:1", lambda: 1, **options)
    with pytest.raises(ConfigurationError, match=named):
        await cache.aget_or_set("opt:1", _never, **options)
    set_options = {k: v for k, v in options.items() if k in ("ttl", "tags", "stale_ttl")}
    if set_options:
        with pytest.raises(ConfigurationError, match=named):
            cache.set("opt:1", 1, **set_options)


@pytest.mark.parametrize("key", ["", None, 42, "a\ud800"])
def test_bad_keys_raise_configuration_error(key: Any) -> None:
    cache = Cache()
    with pytest.raises(ConfigurationError, match="key"):
        cache.get_or_set(key, lambda: 1)
    with pytest.raises(ConfigurationError, match="key"):
        cache.get(key)
    with pytest.raises(ConfigurationError, match="key"):
        cache.set(key, 1)


def test_fn_must_be_callable() -> None:
    with pytest.raises(ConfigurationError, match="fn"):
        Cache().get_or_set("a:1", 42)  # type: ignore[arg-type]


def test_stats_by_the_keys_first_segment_or_by_name() -> None:
    cache = Cache()
    cache.get_or_set("user:1", lambda: 1)
    cache.get_or_set("user:1", lambda: 1)
    cache.get_or_set("user:2", lambda: 2, ttl=5)  # other options, the same counters
    cache.get_or_set("plain", lambda: 3)
    cache.get_or_set("report:7", lambda: 4, name="reports")
    stats = cache.stats()
    assert stats["user"]["hits"] == 1 and stats["user"]["computations"] == 2
    assert stats["get_or_set"]["computations"] == 1
    assert stats["reports"]["computations"] == 1
    assert "report" not in stats
    cache.set("other:1", 1)  # `set` counts nothing
    assert "other" not in cache.stats()


def test_cached_errors_are_shared_like_the_decorators() -> None:
    cache = Cache()
    calls: list[int] = []

    def fail() -> Any:
        calls.append(1)
        raise ValueError("bad input")

    for _ in range(2):
        with pytest.raises(ValueError, match="bad input"):
            cache.get_or_set("neg:1", fail, cache_errors=60)
    assert calls == [1]
    with pytest.raises(ValueError, match="bad input"):
        cache.get("neg:1")


def test_texts_that_look_escaped_never_meet_another_text(
    make_cache: Callable[..., Cache],
) -> None:
    """Keys built from user input stay apart: the user named `a%20b` never reads the entry
    of the user named `a b` (a stored-form lookalike is escaped again)."""
    cache = make_cache()
    cache.set("profile:a b", {"owner": "a b"}, ttl=60)
    assert cache.get("profile:a%20b") is None
    assert cache.get_or_set("profile:a%20b", lambda: {"owner": "a%20b"}) == {"owner": "a%20b"}
    assert cache.get("profile:a b") == {"owner": "a b"}
    assert sorted(cache.keys("profile:*")) == ["profile:a%20b", "profile:a%2520b"]
