"""The coalescing guarantees of issue 2, each with real concurrency (threads, tasks, loops).

1. N concurrent callers of one key -> exactly 1 execution; re-check inside the flight.
2. A cancelled / timed-out caller affects only itself; the computation is cancelled only when
   nobody waits any more.
3. An exception reaches every waiter, frees the key at once, is not cached; the next call
   computes once.
4. BaseExceptions never leave waiters hanging.
5. Different keys never wait for each other; the event loop is never blocked; several
   threads / event loops stay correct.
6. Stats count the coalesced followers exactly.

Plus invalidation while a computation is in flight (sync threads and asyncio).

Ordering is arranged with events and barriers; the only sleeps are short grace periods that
let already-started callers reach their wait, and bounded polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from coalesce import Cache, ReentrantCallError

BOUND = 10.0  # seconds: upper bound for anything that must happen "soon"
GRACE = 0.1  # seconds: lets callers that already counted a miss reach the flight's wait


class Boom(Exception):
    pass


def wait_until(predicate: Callable[[], bool], timeout: float = BOUND) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


async def await_until(predicate: Callable[[], bool], timeout: float = BOUND) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)


class Outcome:
    """What one thread got: a value or an exception (BaseExceptions included)."""

    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = False


def start_threads(
    n: int, call: Callable[[], Any], barrier: bool = True
) -> tuple[list[threading.Thread], list[Outcome]]:
    outcomes = [Outcome() for _ in range(n)]
    gate = threading.Barrier(n) if barrier else None

    def body(out: Outcome) -> None:
        if gate is not None:
            gate.wait(BOUND)
        try:
            out.value = call()
        except BaseException as exc:
            out.error = exc
        finally:
            out.done = True

    threads = [threading.Thread(target=body, args=(o,), daemon=True) for o in outcomes]
    for t in threads:
        t.start()
    return threads, outcomes


def join_all(threads: list[threading.Thread], timeout: float = BOUND) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"threads still hanging: {alive}"


@pytest.fixture
def cache() -> Cache:
    return Cache()


# ---------------------------------------------------------------------------------------
# 1. one execution for N concurrent callers


async def test_200_tasks_one_execution(cache: Cache) -> None:
    calls = 0

    @cache.cached(ttl=60, key="user:{user_id}")
    async def load_user(user_id: int) -> dict[str, int]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return {"id": user_id}

    results = await asyncio.wait_for(asyncio.gather(*(load_user(7) for _ in range(200))), BOUND)
    assert calls == 1
    assert results == [{"id": 7}] * 200
    assert len({id(r) for r in results}) == 200  # each caller got a private copy
    assert await load_user(7) == {"id": 7}
    assert calls == 1


async def test_200_tasks_mixed_positional_and_keyword_calls_share(cache: Cache) -> None:
    calls = 0

    @cache.cached(ttl=60)
    async def f(x: int, y: str = "a") -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return f"{x}{y}"

    coros = [f(1), f(x=1), f(1, "a"), f(1, y="a")] * 50
    results = await asyncio.wait_for(asyncio.gather(*coros), BOUND)
    assert results == ["1a"] * 200
    assert calls == 1


def test_50_threads_on_sync_function_one_execution(cache: Cache) -> None:
    calls = 0
    lock = threading.Lock()

    @cache.cached(ttl=60)
    def report(day: str) -> dict[str, str]:
        nonlocal calls
        with lock:
            calls += 1
        wait_until(lambda: report.stats()["misses"] >= 50)
        time.sleep(GRACE)
        return {"day": day}

    threads, outcomes = start_threads(50, lambda: report("mon"))
    join_all(threads)
    assert [o.error for o in outcomes] == [None] * 50
    assert [o.value for o in outcomes] == [{"day": "mon"}] * 50
    assert calls == 1
    assert report("mon") == {"day": "mon"}
    assert calls == 1


def test_50_threads_one_execution_without_any_synchronisation_in_the_function(
    cache: Cache,
) -> None:
    calls = 0
    lock = threading.Lock()

    @cache.cached(ttl=60)
    def slow() -> int:
        nonlocal calls
        with lock:
            calls += 1
        time.sleep(0.2)
        return 42

    threads, outcomes = start_threads(50, slow)
    join_all(threads)
    assert [o.value for o in outcomes] == [42] * 50
    assert calls == 1


def test_coalesced_decorator_threads_share_and_store_nothing(cache: Cache) -> None:
    calls = 0
    lock = threading.Lock()

    @cache.coalesced()
    def fetch() -> dict[str, int]:
        nonlocal calls
        with lock:
            calls += 1
        # every thread has passed start_threads' barrier: time to reach the flight's wait (as
        # in the 50-thread test above; a late thread would compute again and fail the test)
        time.sleep(0.2)
        return {"n": calls}

    threads, outcomes = start_threads(30, fetch)
    join_all(threads)
    assert calls == 1
    assert all(o.value == {"n": 1} for o in outcomes)
    assert fetch() == {"n": 2}  # nothing was stored
    assert cache.keys() == []


async def test_coalesced_decorator_tasks_share_one_object(cache: Cache) -> None:
    calls = 0

    @cache.coalesced(key="rates:{currency}")
    async def rates(currency: str) -> dict[str, float]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return {currency: 1.0}

    results = await asyncio.wait_for(asyncio.gather(*(rates("eur") for _ in range(100))), BOUND)
    assert calls == 1
    assert all(r is results[0] for r in results)  # documented: the very same object
    await rates("eur")
    assert calls == 2


def _pause_first_read_of(
    cache: Cache, is_b: Callable[[], bool], until: Callable[[], None]
) -> list[bool]:
    """Make caller B's first store read (its hot-path miss) wait, after reading, for `until`."""
    paused: list[bool] = []
    real_read, real_aread = cache._read, cache._aread

    def read(key: str) -> Any:
        entry = real_read(key)
        if is_b() and not paused:
            paused.append(True)
            until()
        return entry

    async def aread(key: str) -> Any:
        entry = await real_aread(key)
        if is_b() and not paused:
            paused.append(True)
            until()
        return entry

    cache._read = read  # type: ignore[method-assign]
    cache._aread = aread  # type: ignore[method-assign]
    return paused


def test_caller_arriving_just_after_completion_does_not_recompute_threads(cache: Cache) -> None:
    calls = 0
    started, release, a_finished = threading.Event(), threading.Event(), threading.Event()

    @cache.cached(ttl=60)
    def f() -> str:
        nonlocal calls
        calls += 1
        started.set()
        assert release.wait(BOUND)
        return "v"

    a_threads, a_out = start_threads(1, f, barrier=False)
    assert started.wait(BOUND)
    main = threading.current_thread()
    paused = _pause_first_read_of(
        cache,
        is_b=lambda: threading.current_thread() not in (main, a_threads[0]),
        until=lambda: a_finished.wait(BOUND),
    )
    b_threads, b_out = start_threads(1, f, barrier=False)
    wait_until(lambda: bool(paused))  # B read the store while A was still computing: a miss
    release.set()
    join_all(a_threads)
    a_finished.set()  # A's flight is over and its value stored; B goes on from its miss
    join_all(b_threads)
    assert paused == [True]
    assert a_out[0].value == "v"
    assert b_out[0].value == "v"
    assert b_out[0].error is None
    assert calls == 1  # B found the value when it checked again inside its flight


async def test_caller_arriving_just_after_completion_does_not_recompute_async(
    cache: Cache,
) -> None:
    """B misses (A is computing), A completes and stores, then B enters its flight."""
    calls = 0
    started, release = asyncio.Event(), asyncio.Event()

    @cache.cached(ttl=60)
    async def f() -> str:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        return "v"

    key = cache.prefix + f.key()
    a = asyncio.create_task(f())
    await asyncio.wait_for(started.wait(), BOUND)
    assert cache._read(key) is None  # what B's hot path sees now
    release.set()
    assert await asyncio.wait_for(a, BOUND) == "v"
    # B goes on with the miss it saw a moment ago: its first read is that stale miss.
    real_read, real_aread = cache._read, cache._aread
    miss_once = [True]

    def read(k: str) -> Any:
        if miss_once and k == key:
            miss_once.clear()
            return None
        return real_read(k)

    async def aread(k: str) -> Any:
        if miss_once and k == key:
            miss_once.clear()
            return None
        return await real_aread(k)

    cache._read = read  # type: ignore[method-assign]
    cache._aread = aread  # type: ignore[method-assign]
    assert await asyncio.wait_for(f(), BOUND) == "v"
    assert not miss_once  # B did see a miss first
    assert calls == 1  # and found the value when checking again inside its flight


def test_caller_seeing_a_stale_miss_does_not_recompute_sync(cache: Cache) -> None:
    """Same race as above, forced deterministically: the hot path misses, the value exists."""
    calls = 0

    @cache.cached(ttl=60)
    def f() -> int:
        nonlocal calls
        calls += 1
        return 5

    assert f() == 5
    key = cache.prefix + f.key()
    real_read = cache._read
    miss_once = [True]

    def read(k: str) -> Any:
        if miss_once and k == key:
            miss_once.clear()
            return None
        return real_read(k)

    cache._read = read  # type: ignore[method-assign]
    assert f() == 5
    assert not miss_once
    assert calls == 1


# ---------------------------------------------------------------------------------------
# 2. cancellation and timeouts affect only the caller


async def test_cancelling_the_leader_does_not_cancel_the_computation(cache: Cache) -> None:
    calls = 0
    started, release = asyncio.Event(), asyncio.Event()
    computation_cancelled = False

    @cache.cached(ttl=60)
    async def f() -> dict[str, int]:
        nonlocal calls, computation_cancelled
        calls += 1
        started.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            computation_cancelled = True
            raise
        return {"v": 1}

    leader = asyncio.create_task(f())
    await asyncio.wait_for(started.wait(), BOUND)
    followers = [asyncio.create_task(f()) for _ in range(10)]
    await await_until(lambda: f.stats()["misses"] == 11)
    await asyncio.sleep(0)  # let the followers reach their wait
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert leader.cancelled()
    await asyncio.sleep(0.02)
    assert not computation_cancelled
    release.set()
    results = await asyncio.wait_for(asyncio.gather(*followers), BOUND)
    assert results == [{"v": 1}] * 10  # not CancelledError, not None
    assert calls == 1
    assert not computation_cancelled
    assert await f() == {"v": 1}  # and it was stored
    assert calls == 1


async def test_cancelling_the_leader_before_the_computation_starts(cache: Cache) -> None:
    calls = 0

    @cache.cached(ttl=60)
    async def f() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return 3

    leader = asyncio.create_task(f())
    await asyncio.sleep(0)  # the leader joined the flight; the computation task is queued
    followers = [asyncio.create_task(f()) for _ in range(5)]
    await asyncio.sleep(0)
    leader.cancel()
    results = await asyncio.wait_for(asyncio.gather(*followers), BOUND)
    assert results == [3] * 5
    assert leader.cancelled()
    assert calls == 1


async def test_cancelling_a_follower_affects_only_it(cache: Cache) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    calls = 0

    @cache.cached(ttl=60)
    async def f() -> str:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        return "ok"

    leader = asyncio.create_task(f())
    await asyncio.wait_for(started.wait(), BOUND)
    victim = asyncio.create_task(f())
    other = asyncio.create_task(f())
    await await_until(lambda: f.stats()["misses"] == 3)
    await asyncio.sleep(0)
    victim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await victim
    release.set()
    assert await asyncio.wait_for(leader, BOUND) == "ok"
    assert await asyncio.wait_for(other, BOUND) == "ok"
    assert calls == 1


async def test_wait_for_timeout_of_one_caller_affects_only_it(cache: Cache) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    calls = 0
    computation_cancelled = False

    @cache.cached(ttl=60)
    async def f() -> str:
        nonlocal calls, computation_cancelled
        calls += 1
        started.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            computation_cancelled = True
            raise
        return "ok"

    patient = asyncio.create_task(f())
    await asyncio.wait_for(started.wait(), BOUND)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(f(), 0.05)
    assert not computation_cancelled
    assert not patient.done()
    release.set()
    assert await asyncio.wait_for(patient, BOUND) == "ok"
    assert calls == 1
    assert not computation_cancelled


async def test_wait_for_timeout_of_the_leader_while_others_wait(cache: Cache) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    calls = 0

    @cache.cached(ttl=60)
    async def f() -> str:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        return "ok"

    # the followers join on their first step, queued before the leader's timer can fire
    leader = asyncio.create_task(asyncio.wait_for(f(), 0.1))
    await asyncio.wait_for(started.wait(), BOUND)
    followers = [asyncio.create_task(f()) for _ in range(5)]
    with pytest.raises(asyncio.TimeoutError):
        await leader
    release.set()
    assert await asyncio.wait_for(asyncio.gather(*followers), BOUND) == ["ok"] * 5
    assert calls == 1


async def test_asyncio_timeout_context_of_one_caller_affects_only_it(cache: Cache) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    @cache.cached(ttl=60)
    async def f() -> str:
        started.set()
        await release.wait()
        return "ok"

    other = asyncio.create_task(f())
    await asyncio.wait_for(started.wait(), BOUND)

    async def impatient() -> str:
        if sys.version_info >= (3, 11):
            async with asyncio.timeout(0.05):
                return await f()
        # Python 3.10 has no asyncio.timeout: do what it does, cancel this very task (not a
        # new one, as wait_for would) after 0.05 s and report a timeout
        task = asyncio.current_task()
        assert task is not None
        handle = asyncio.get_running_loop().call_later(0.05, task.cancel)
        try:
            return await f()
        except asyncio.CancelledError:
            raise TimeoutError from None
        finally:
            handle.cancel()

    with pytest.raises(TimeoutError):
        await impatient()
    release.set()
    assert await asyncio.wait_for(other, BOUND) == "ok"


async def test_computation_cancelled_only_when_the_last_waiter_is_gone(cache: Cache) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()
    calls = 0

    @cache.cached(ttl=60)
    async def f() -> str:
        nonlocal calls
        calls += 1
        if calls > 1:
            return "fresh"
        started.set()
        try:
            await asyncio.sleep(BOUND * 2)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    callers = [asyncio.create_task(f()) for _ in range(3)]
    await asyncio.wait_for(started.wait(), BOUND)
    await asyncio.sleep(0)
    for task in callers[:2]:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.02)
        assert not cancelled.is_set()  # somebody still waits
    callers[2].cancel()
    with pytest.raises(asyncio.CancelledError):
        await callers[2]
    await asyncio.wait_for(cancelled.wait(), BOUND)  # the last waiter left: cancelled
    assert calls == 1
    assert cache.keys() == []  # nothing stored
    # the key is free: the next callers compute afresh, once
    results = await asyncio.wait_for(asyncio.gather(*(f() for _ in range(5))), BOUND)
    assert results == ["fresh"] * 5
    assert calls == 2


async def test_only_caller_timing_out_cancels_the_computation(cache: Cache) -> None:
    cancelled = asyncio.Event()
    calls = 0

    @cache.cached(ttl=60)
    async def f() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            try:
                await asyncio.sleep(BOUND * 2)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return "second"

    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(f(), 0.05)
    await asyncio.wait_for(cancelled.wait(), BOUND)
    assert await asyncio.wait_for(f(), BOUND) == "second"
    assert calls == 2


async def test_new_caller_right_after_last_waiter_cancelled_gets_a_value(cache: Cache) -> None:
    """A caller arriving while the abandoned computation is being cancelled starts over."""
    calls = 0

    @cache.cached(ttl=60)
    async def f() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return calls

    first = asyncio.create_task(f())
    await asyncio.sleep(0.01)
    first.cancel()
    second = asyncio.create_task(f())  # same loop iteration as the cancellation
    result = await asyncio.wait_for(second, BOUND)
    assert isinstance(result, int)
    assert first.cancelled()


# ---------------------------------------------------------------------------------------
# 3. exceptions


async def test_exception_reaches_every_waiter_and_is_not_cached_async(cache: Cache) -> None:
    calls = 0

    @cache.cached(ttl=60)
    async def f() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        if calls == 1:
            raise Boom("first")
        return calls

    results = await asyncio.wait_for(
        asyncio.gather(*(f() for _ in range(50)), return_exceptions=True), BOUND
    )
    assert calls == 1
    assert all(isinstance(r, Boom) and str(r) == "first" for r in results)
    assert cache.keys() == []
    # the next wave computes once, not once per former waiter
    results = await asyncio.wait_for(asyncio.gather(*(f() for _ in range(50))), BOUND)
    assert results == [2] * 50
    assert calls == 2
    stats = f.stats()
    assert stats["errors"] == 1
    assert stats["computations"] == 2


def test_exception_reaches_every_waiter_and_is_not_cached_threads(cache: Cache) -> None:
    calls = 0
    lock = threading.Lock()

    @cache.cached(ttl=60)
    def f() -> int:
        nonlocal calls
        with lock:
            calls += 1
            n = calls
        if n == 1:
            wait_until(lambda: f.stats()["misses"] >= 20)
            time.sleep(GRACE)
            raise Boom("first")
        time.sleep(0.1)
        return n

    threads, outcomes = start_threads(20, f)
    join_all(threads)
    assert calls == 1
    assert all(isinstance(o.error, Boom) and str(o.error) == "first" for o in outcomes)
    assert cache.keys() == []
    threads, outcomes = start_threads(20, f)
    join_all(threads)
    assert [o.value for o in outcomes] == [2] * 20
    assert calls == 2


def test_key_is_free_at_once_after_an_exception(cache: Cache) -> None:
    calls = 0

    @cache.cached(ttl=60)
    def f() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Boom("x")
        return 1

    with pytest.raises(Boom):
        f()
    # a plain sequential retry must not wait for anything nor see the old error
    started = time.monotonic()
    assert f() == 1
    assert time.monotonic() - started < 1.0


async def test_cached_error_shared_by_concurrent_waiters(cache: Cache) -> None:
    calls = 0

    @cache.cached(ttl=60, cache_errors=30)
    async def f() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        raise ValueError("nope")

    results = await asyncio.gather(*(f() for _ in range(20)), return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)
    results = await asyncio.gather(*(f() for _ in range(20)), return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)
    assert calls == 1


# ---------------------------------------------------------------------------------------
# 4. BaseExceptions never leave waiters hanging


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_in_sync_leader_thread_does_not_hang_waiters(
    cache: Cache, exc_type: type[BaseException]
) -> None:
    calls = 0
    lock = threading.Lock()
    leader_started = threading.Event()
    followers = 10

    @cache.cached(ttl=60)
    def f() -> str:
        nonlocal calls
        with lock:
            calls += 1
            n = calls
        if n == 1:
            leader_started.set()
            wait_until(lambda: f.stats()["misses"] >= followers + 1)
            time.sleep(GRACE)
            raise exc_type()
        return "ok"

    leader_threads, leader_out = start_threads(1, f, barrier=False)
    assert leader_started.wait(BOUND)
    threads, outcomes = start_threads(followers, f)
    join_all(leader_threads + threads)
    assert isinstance(leader_out[0].error, exc_type)
    for o in outcomes:
        assert o.done
        assert not isinstance(o.error, exc_type)  # not inherited from the leader
        assert o.value == "ok", o.error
    assert calls == 2  # exactly one of the followers started over
    assert f() == "ok"
    assert calls == 2


def test_keyboard_interrupt_every_time_still_releases_waiters(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f() -> str:
        time.sleep(0.02)
        raise KeyboardInterrupt

    threads, outcomes = start_threads(8, f)
    join_all(threads, timeout=BOUND * 2)
    assert all(o.done for o in outcomes)
    assert all(o.error is not None for o in outcomes)
    assert all(o.value is None for o in outcomes)


async def test_computation_raising_cancelled_error_does_not_hang_waiters(cache: Cache) -> None:
    calls = 0

    @cache.cached(ttl=60)
    async def f() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.02)
        if calls == 1:
            raise asyncio.CancelledError  # e.g. an inner operation was cancelled
        return "ok"

    tasks = [asyncio.create_task(f()) for _ in range(10)]
    _, pending = await asyncio.wait(tasks, timeout=BOUND)
    assert not pending
    assert [t.result() for t in tasks] == ["ok"] * 10  # nobody saw the foreign cancellation
    assert calls == 2


async def test_computation_always_raising_cancelled_error_terminates(cache: Cache) -> None:
    @cache.cached(ttl=60)
    async def f() -> str:
        await asyncio.sleep(0.01)
        raise asyncio.CancelledError

    tasks = [asyncio.create_task(f()) for _ in range(5)]
    _, pending = await asyncio.wait(tasks, timeout=BOUND)
    assert not pending, "waiters hang when the computation keeps being cancelled"
    for t in tasks:
        assert t.cancelled() or t.exception() is not None


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_in_async_computation_does_not_hang_the_loop(
    cache: Cache, exc_type: type[BaseException]
) -> None:
    calls = 0
    outcome: dict[str, Any] = {}

    @cache.cached(ttl=60)
    async def f() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.02)
        if calls == 1:
            raise exc_type()
        return "ok"

    def run() -> None:
        async def main() -> list[Any]:
            tasks = [asyncio.create_task(f()) for _ in range(10)]
            outcome["tasks"] = tasks
            return await asyncio.gather(*tasks, return_exceptions=True)

        try:
            outcome["result"] = asyncio.run(main())
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(BOUND)
    assert not thread.is_alive(), "the event loop hangs after a BaseException in a computation"
    # asyncio lets KeyboardInterrupt/SystemExit escape the loop; every waiter is finished.
    assert all(t.done() for t in outcome["tasks"])
    # a fresh loop afterwards works and computes
    assert asyncio.run(asyncio.wait_for(f(), BOUND)) == "ok"


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_waiters_of_an_interrupted_async_computation_start_over(
    cache: Cache, exc_type: type[BaseException]
) -> None:
    """The interrupt escapes the event loop (asyncio lets it); the callers, which did not
    raise it, start over and get a value instead of inheriting it."""
    calls = 0

    @cache.cached(ttl=60)
    async def f() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.02)
        if calls == 1:
            raise exc_type()
        return "ok"

    loop = asyncio.new_event_loop()
    try:
        tasks = [loop.create_task(f()) for _ in range(10)]
        escaped = 0
        for _ in range(5):
            try:
                loop.run_until_complete(asyncio.wait(tasks, timeout=BOUND))
                break
            except exc_type:
                escaped += 1  # the loop's runner sees it; the loop goes on afterwards
        assert escaped == 1
        assert [t.result() for t in tasks] == ["ok"] * 10
        assert calls == 2
    finally:
        loop.close()


# ---------------------------------------------------------------------------------------
# 5. different keys, the event loop, several threads and loops


def test_slow_key_does_not_delay_fast_key_threads(cache: Cache) -> None:
    slow_started, release = threading.Event(), threading.Event()

    @cache.cached(ttl=60)
    def f(x: str) -> str:
        if x == "slow":
            slow_started.set()
            assert release.wait(BOUND)
        return x

    threads, outcomes = start_threads(5, lambda: f("slow"), barrier=False)
    assert slow_started.wait(BOUND)
    fast_threads, fast = start_threads(5, lambda: f("fast"))
    join_all(fast_threads, timeout=5.0)  # finishes while "slow" is still blocked
    assert [o.value for o in fast] == ["fast"] * 5
    assert not any(o.done for o in outcomes)
    release.set()
    join_all(threads)
    assert [o.value for o in outcomes] == ["slow"] * 5


def test_slow_function_does_not_delay_another_function_with_same_key(cache: Cache) -> None:
    slow_started, release = threading.Event(), threading.Event()

    @cache.cached(ttl=60, key="same")
    def slow() -> str:
        slow_started.set()
        assert release.wait(BOUND)
        return "slow"

    other = Cache()

    @other.cached(ttl=60, key="same")
    def fast() -> str:
        return "fast"

    threads, outcomes = start_threads(1, slow, barrier=False)
    assert slow_started.wait(BOUND)
    assert fast() == "fast"  # another cache: nothing shared
    release.set()
    join_all(threads)
    assert outcomes[0].value == "slow"


async def test_slow_key_does_not_delay_fast_key_async(cache: Cache) -> None:
    release = asyncio.Event()

    @cache.cached(ttl=60)
    async def f(x: str) -> str:
        if x == "slow":
            await release.wait()
        return x

    slow = [asyncio.create_task(f("slow")) for _ in range(5)]
    await asyncio.sleep(0)
    fast = await asyncio.wait_for(asyncio.gather(*(f("fast") for _ in range(5))), 5.0)
    assert fast == ["fast"] * 5
    assert not any(t.done() for t in slow)
    release.set()
    assert await asyncio.wait_for(asyncio.gather(*slow), BOUND) == ["slow"] * 5


async def test_event_loop_not_blocked_during_a_miss(cache: Cache) -> None:
    ticks = 0
    enough_ticks = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1
            if ticks >= 20:
                enough_ticks.set()

    seen: list[int] = []

    @cache.cached(ttl=60)
    async def f() -> int:
        seen.append(ticks)
        await enough_ticks.wait()  # only the ticker can end the computation
        seen.append(ticks)
        return 1

    tick_task = asyncio.create_task(ticker())
    try:
        results = await asyncio.wait_for(asyncio.gather(*(f() for _ in range(200))), BOUND)
    finally:
        tick_task.cancel()
    assert results == [1] * 200
    assert seen[1] >= 20  # the ticker ran while the miss was in progress
    assert len(seen) == 2


async def test_event_loop_keeps_ticking_while_callers_wait(cache: Cache) -> None:
    release = asyncio.Event()

    @cache.cached(ttl=60)
    async def f() -> int:
        await release.wait()
        return 1

    waiters = [asyncio.create_task(f()) for _ in range(100)]
    ticks = 0
    for _ in range(10):
        await asyncio.sleep(0.001)  # would never return if the waiters blocked the loop
        ticks += 1
    assert ticks == 10
    assert not any(t.done() for t in waiters)
    release.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters), BOUND) == [1] * 100


def test_several_event_loops_in_several_threads(cache: Cache) -> None:
    loops = 4
    per_loop = 50
    lock = threading.Lock()
    computing_threads: list[int] = []

    @cache.cached(ttl=60)
    async def f(x: int) -> dict[str, int]:
        with lock:
            computing_threads.append(threading.get_ident())
        await asyncio.sleep(0.05)
        return {"x": x}

    barrier = threading.Barrier(loops)
    results: list[Any] = []

    def run() -> None:
        async def main() -> list[Any]:
            barrier.wait(BOUND)
            return await asyncio.wait_for(asyncio.gather(*(f(1) for _ in range(per_loop))), BOUND)

        out = asyncio.run(main())
        with lock:
            results.extend(out)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(loops)]
    for t in threads:
        t.start()
    join_all(threads)
    assert results == [{"x": 1}] * (loops * per_loop)
    assert len(computing_threads) == 1  # one computation for every loop of the process
    before = len(computing_threads)
    assert asyncio.run(f(1)) == {"x": 1}  # another loop later: a hit
    assert len(computing_threads) == before


def test_several_loops_and_threads_with_many_keys_never_mix_values(cache: Cache) -> None:
    @cache.cached(ttl=60)
    async def f(x: int) -> dict[str, int]:
        await asyncio.sleep(random.random() / 100)
        return {"x": x, "double": 2 * x}

    @cache.cached(ttl=60)
    def g(x: int) -> list[int]:
        time.sleep(random.random() / 100)
        return [x, 3 * x]

    errors: list[str] = []

    def loop_worker(seed: int) -> None:
        rng = random.Random(seed)

        async def main() -> None:
            xs = [rng.randrange(20) for _ in range(200)]
            out = await asyncio.gather(*(f(x) for x in xs))
            for x, r in zip(xs, out, strict=True):
                if r != {"x": x, "double": 2 * x}:
                    errors.append(f"f({x}) -> {r}")

        asyncio.run(main())

    def thread_worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(100):
            x = rng.randrange(20)
            r = g(x)
            if r != [x, 3 * x]:
                errors.append(f"g({x}) -> {r}")
            if rng.random() < 0.1:
                g.invalidate(x)

    threads = [threading.Thread(target=loop_worker, args=(i,), daemon=True) for i in range(4)]
    threads += [
        threading.Thread(target=thread_worker, args=(100 + i,), daemon=True) for i in range(8)
    ]
    for t in threads:
        t.start()
    join_all(threads, timeout=60)
    assert errors == []
    assert f.stats()["computations"] <= 20 * 4  # at most once per key per loop


def test_sync_function_called_from_threads_and_from_async_code(cache: Cache) -> None:
    calls = 0
    lock = threading.Lock()

    @cache.cached(ttl=60)
    def f() -> int:
        nonlocal calls
        with lock:
            calls += 1
        time.sleep(0.2)
        return 9

    async def from_loop() -> list[int]:
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(None, f) for _ in range(10)))

    threads, outcomes = start_threads(10, f)
    results = asyncio.run(from_loop())
    join_all(threads)
    assert results == [9] * 10
    assert [o.value for o in outcomes] == [9] * 10
    assert calls == 1


# ---------------------------------------------------------------------------------------
# 6. stats count coalesced followers exactly


async def test_stats_count_coalesced_followers_exactly_async(cache: Cache) -> None:
    @cache.cached(ttl=60, key="s:{x}")
    async def f(x: int) -> int:
        await asyncio.sleep(0.05)
        return x

    await asyncio.wait_for(asyncio.gather(*(f(1) for _ in range(200))), BOUND)
    stats = f.stats()
    assert stats["misses"] == 200
    assert stats["coalesced"] == 199
    assert stats["computations"] == 1
    assert stats["hits"] == 0
    assert stats["errors"] == 0
    assert stats["compute_time"] >= 0.04
    await asyncio.gather(*(f(1) for _ in range(10)))
    stats = f.stats()
    assert stats["hits"] == 10
    assert stats["coalesced"] == 199
    assert cache.stats()["s:{x}"]["coalesced"] == 199


def test_stats_count_coalesced_followers_exactly_threads(cache: Cache) -> None:
    n = 50

    @cache.cached(ttl=60)
    def f() -> int:
        wait_until(lambda: f.stats()["misses"] >= n)
        time.sleep(GRACE)
        return 1

    threads, outcomes = start_threads(n, f)
    join_all(threads)
    assert [o.value for o in outcomes] == [1] * n
    stats = f.stats()
    assert stats["misses"] == n
    assert stats["computations"] == 1
    assert stats["coalesced"] == n - 1


async def test_stats_count_coalesced_errors_too(cache: Cache) -> None:
    @cache.cached(ttl=60)
    async def f() -> int:
        await asyncio.sleep(0.05)
        raise Boom

    await asyncio.gather(*(f() for _ in range(30)), return_exceptions=True)
    stats = f.stats()
    assert stats["computations"] == 1
    assert stats["errors"] == 1
    assert stats["coalesced"] == 29
    assert stats["misses"] == 30


async def test_stats_coalesced_for_coalesced_decorator(cache: Cache) -> None:
    @cache.coalesced()
    async def f() -> int:
        await asyncio.sleep(0.05)
        return 1

    await asyncio.gather(*(f() for _ in range(40)))
    stats = f.stats()
    assert stats["computations"] == 1
    assert stats["coalesced"] == 39


# ---------------------------------------------------------------------------------------
# invalidation while a computation is in flight


def test_invalidate_in_flight_threads_result_not_stored(cache: Cache) -> None:
    calls = 0
    lock = threading.Lock()
    started = {1: threading.Event(), 2: threading.Event()}
    release = {1: threading.Event(), 2: threading.Event()}

    @cache.cached(ttl=60, key="item")
    def f() -> int:
        nonlocal calls
        with lock:
            calls += 1
            n = calls
        if n in started:
            started[n].set()
            assert release[n].wait(BOUND)
        return n

    a_threads, a_out = start_threads(1, f, barrier=False)
    assert started[1].wait(BOUND)
    assert cache.invalidate("item") is False  # nothing stored yet
    # a caller arriving after the invalidation must not receive the old computation
    b_threads, b_out = start_threads(1, f, barrier=False)
    assert started[2].wait(BOUND), "the caller after invalidate joined the stale computation"
    release[2].set()
    join_all(b_threads)
    assert b_out[0].value == 2
    release[1].set()  # the stale computation finishes last
    join_all(a_threads)
    assert a_out[0].value == 1
    assert f() == 2  # the stale result did not overwrite the fresh one
    assert calls == 2


def test_invalidate_in_flight_threads_next_caller_computes_fresh(cache: Cache) -> None:
    calls = 0
    started, release = threading.Event(), threading.Event()

    @cache.cached(ttl=60)
    def f(x: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            started.set()
            assert release.wait(BOUND)
        return calls

    threads, outcomes = start_threads(1, lambda: f(5), barrier=False)
    assert started.wait(BOUND)
    assert f.invalidate(5) is False
    release.set()
    join_all(threads)
    assert outcomes[0].value == 1  # its own caller still gets it
    assert cache.keys() == []  # but it was not stored
    assert f(5) == 2
    assert f(5) == 2
    assert calls == 2


def test_invalidate_after_value_stored_returns_true(cache: Cache) -> None:
    calls = 0

    @cache.cached(ttl=60, key="k:{x}")
    def f(x: int) -> int:
        nonlocal calls
        calls += 1
        return x

    f(1)
    assert cache.invalidate("k:1") is True
    assert cache.invalidate("k:1") is False
    f(1)
    assert calls == 2


async def test_invalidate_in_flight_async_result_not_stored(cache: Cache) -> None:
    calls = 0
    started = {1: asyncio.Event(), 2: asyncio.Event()}
    release = {1: asyncio.Event(), 2: asyncio.Event()}

    @cache.cached(ttl=60, key="item:{x}")
    async def f(x: int) -> int:
        nonlocal calls
        calls += 1
        n = calls
        if n in started:
            started[n].set()
            await release[n].wait()
        return n

    a = asyncio.create_task(f(1))
    a_follower = asyncio.create_task(f(1))
    await asyncio.wait_for(started[1].wait(), BOUND)
    assert await f.invalidate(1) is False
    b = asyncio.create_task(f(1))
    await asyncio.wait_for(started[2].wait(), BOUND)  # a new computation, not a follower
    release[2].set()
    assert await asyncio.wait_for(b, BOUND) == 2
    release[1].set()
    assert await asyncio.wait_for(a, BOUND) == 1
    assert await asyncio.wait_for(a_follower, BOUND) == 1
    assert await f(1) == 2  # the stale result did not land after the invalidation
    assert calls == 2


async def test_cache_ainvalidate_in_flight_next_caller_computes_fresh(cache: Cache) -> None:
    calls = 0
    started, release = asyncio.Event(), asyncio.Event()

    @cache.cached(ttl=60, key="only")
    async def f() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            started.set()
            await release.wait()
        return calls

    first = asyncio.create_task(f())
    await asyncio.wait_for(started.wait(), BOUND)
    assert await cache.ainvalidate("only") is False
    release.set()
    assert await asyncio.wait_for(first, BOUND) == 1
    assert cache.keys() == []
    assert await f() == 2
    assert await f() == 2
    assert calls == 2


def test_invalidate_from_another_thread_fences_async_computation(cache: Cache) -> None:
    calls = 0
    started = threading.Event()
    release = threading.Event()

    @cache.cached(ttl=60, key="x")
    async def f() -> int:
        nonlocal calls
        calls += 1
        n = calls
        if n == 1:
            started.set()
            while not release.is_set():
                await asyncio.sleep(0.002)
        return n

    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(f())), daemon=True)
    thread.start()
    assert started.wait(BOUND)
    assert cache.invalidate("x") is False  # sync invalidation from this thread
    release.set()
    join_all([thread])
    assert result == [1]
    assert asyncio.run(f()) == 2
    assert calls == 2


def test_stress_threads_with_invalidations_stay_consistent(cache: Cache) -> None:
    version = {"v": 0}
    lock = threading.Lock()

    @cache.cached(ttl=60, key="cfg")
    def config() -> dict[str, int]:
        with lock:
            v = version["v"]
        time.sleep(random.random() * 0.004)  # an older computation may end after a newer one
        return {"v": v}

    stop = time.monotonic() + 1.0
    errors: list[str] = []

    invalidated = [0]  # the newest version whose invalidation has returned

    def writer() -> None:
        while time.monotonic() < stop:
            with lock:
                version["v"] += 1
                written = version["v"]
            cache.invalidate("cfg")
            invalidated[0] = written
            time.sleep(0.001)  # shorter than a computation: invalidations land mid-flight

    def reader() -> None:
        while time.monotonic() < stop:
            floor = invalidated[0]  # a call starting now must not see anything older
            r = config()
            if set(r) != {"v"} or r["v"] < floor:
                errors.append(f"{r!r} after version {floor} was invalidated")
            time.sleep(0.0002)  # let the writer run (hits alone would starve it of the GIL)

    threads = [threading.Thread(target=writer, daemon=True)]
    threads += [threading.Thread(target=reader, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    join_all(threads, timeout=30)
    assert errors == []
    # quiescent: after one last invalidation the value reflects the latest version
    with lock:
        version["v"] += 1
        final = version["v"]
    cache.invalidate("cfg")
    assert config() == {"v": final}


def test_a_follower_on_another_loop_survives_the_leaders_loop_shutting_down(
    cache: Cache,
) -> None:
    started = threading.Event()
    follower_waiting = threading.Event()
    computations = 0

    @cache.cached(ttl=60)
    async def f(x: int) -> int:
        nonlocal computations
        computations += 1
        started.set()
        await asyncio.sleep(0.3)
        return x

    def leader() -> None:
        async def main() -> None:
            task = asyncio.ensure_future(f(1))
            assert await asyncio.to_thread(follower_waiting.wait, BOUND)
            await asyncio.sleep(0.02)  # the follower is now awaiting the shared outcome
            task.cancel()  # the leader's caller leaves, and asyncio.run ends its loop,
            with contextlib.suppress(asyncio.CancelledError):  # cancelling the computation
                await task

        asyncio.run(main())

    result: list[int] = []

    def follower() -> None:
        async def main() -> int:
            assert await asyncio.to_thread(started.wait, BOUND)
            follower_waiting.set()
            return await asyncio.wait_for(f(1), BOUND)

        result.append(asyncio.run(main()))

    threads = [threading.Thread(target=leader), threading.Thread(target=follower)]
    for t in threads:
        t.start()
    join_all(threads)
    assert result == [1]  # the follower started over on its own loop
    assert computations == 2


def test_a_forked_child_does_not_wait_for_its_parents_flights() -> None:
    cache = Cache()
    started, release = threading.Event(), threading.Event()

    @cache.cached(ttl=60)
    def f(x: int) -> int:
        if os.getpid() == parent:
            started.set()
            release.wait(BOUND)
        return x

    parent = os.getpid()
    worker = threading.Thread(target=f, args=(1,))
    worker.start()
    assert started.wait(BOUND)  # the parent's thread leads a flight of f(1)
    pid = os.fork()
    if pid == 0:  # the child: that leader thread does not exist here
        code = 1
        try:
            done = threading.Event()
            threading.Thread(target=lambda: (f(1), done.set()), daemon=True).start()
            code = 0 if done.wait(5) else 2
        finally:
            os._exit(code)
    release.set()
    worker.join(BOUND)
    deadline = time.monotonic() + BOUND
    while True:
        waited, status = os.waitpid(pid, os.WNOHANG)
        if waited:
            break
        assert time.monotonic() < deadline, "the child hung"
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_computation_asking_for_its_own_key_fails_at_once_instead_of_hanging(
    cache: Cache,
) -> None:
    @cache.cached(ttl=60, key="r:{x}")
    def recurse(x: int, depth: int = 0) -> int:
        return recurse(x, depth + 1) if depth < 1 else x  # depth is not in the key

    @cache.cached(ttl=60, key="shared:{x}")
    def outer(x: int) -> int:
        return inner(x)

    @cache.cached(ttl=60, key="shared:{x}")
    def inner(x: int) -> int:
        return x

    @cache.cached(ttl=60, key="fib:{n}")
    def fib(n: int) -> int:
        return n if n < 2 else fib(n - 1) + fib(n - 2)  # other keys: fine

    started = time.monotonic()
    with pytest.raises(ReentrantCallError, match="r:1"):
        recurse(1)
    with pytest.raises(ReentrantCallError, match="shared:2"):
        outer(2)
    assert time.monotonic() - started < BOUND
    assert fib(30) == 832040
    assert recurse(1, 1) == 1  # not poisoned: the key is free again


async def test_an_async_computation_asking_for_its_own_key_fails_at_once(cache: Cache) -> None:
    @cache.cached(ttl=60, key="r:{x}")
    async def recurse(x: int, depth: int = 0) -> int:
        return await recurse(x, depth + 1) if depth < 1 else x

    with pytest.raises(ReentrantCallError):
        await asyncio.wait_for(recurse(1), BOUND)
    followers = [asyncio.create_task(recurse(2, 1)) for _ in range(5)]
    assert await asyncio.wait_for(asyncio.gather(*followers), BOUND) == [2] * 5


# ---------------------------------------------------------------------------------------
# the flights themselves: completion without a per-flight Event, a cross-loop future made
# only for callers on other loops, the outcome settled by the task itself


def test_thread_follower_times_out_alone_and_the_lock_passes_to_the_others() -> None:
    from coalesce.errors import CoalesceTimeout
    from coalesce.flight import ThreadFlights

    flights: ThreadFlights[int] = ThreadFlights()
    release = threading.Event()
    started = threading.Event()
    computations = 0

    def compute(_fence: Any) -> int:
        nonlocal computations
        computations += 1
        started.set()
        assert release.wait(BOUND)
        return 7

    outcomes: dict[str, Any] = {}

    def call(name: str, timeout: float | None) -> None:
        try:
            outcomes[name] = flights.run("k", compute, timeout=timeout)
        except CoalesceTimeout as exc:
            outcomes[name] = exc

    leader = threading.Thread(target=call, args=("leader", None))
    leader.start()
    assert started.wait(BOUND)
    impatient = threading.Thread(target=call, args=("impatient", 0.05))
    patient = [threading.Thread(target=call, args=(f"p{i}", None)) for i in range(5)]
    for t in [impatient, *patient]:
        t.start()
    join_all([impatient])
    assert isinstance(outcomes["impatient"], CoalesceTimeout)
    release.set()
    join_all([leader, *patient])
    assert outcomes["leader"] == (7, False)
    assert all(outcomes[f"p{i}"] == (7, True) for i in range(5))  # every waiter got through
    assert computations == 1
    assert flights.run("k", lambda _f: 8) == (8, False)  # the key is free again


async def test_a_flight_on_one_loop_makes_no_cross_loop_future() -> None:
    from coalesce.flight import AsyncFlights

    flights = AsyncFlights()
    seen: list[Any] = []

    async def compute(_fence: Any) -> int:
        await asyncio.sleep(0.01)
        seen.append(flights._flights["k"])
        return 1

    results = await asyncio.gather(*(flights.run("k", compute) for _ in range(10)))
    assert sorted(results) == [(1, False)] + [(1, True)] * 9
    assert len(seen) == 1 and seen[0]._outcome is None
    assert not flights.running("k")


@pytest.mark.parametrize("outcome", [5, Boom("no")], ids=["value", "exception"])
def test_a_caller_on_another_loop_gets_the_value_or_the_exception(outcome: Any) -> None:
    from coalesce.flight import AsyncFlights

    flights = AsyncFlights()
    started = threading.Event()
    release = threading.Event()

    async def compute(_fence: Any) -> int:
        started.set()
        assert await asyncio.to_thread(release.wait, BOUND)
        if isinstance(outcome, Exception):
            raise outcome
        return int(outcome)

    got: dict[str, Any] = {}

    def call(name: str) -> None:
        async def main() -> Any:
            return await flights.run("k", compute)

        try:
            got[name] = asyncio.run(main())
        except Boom as exc:
            got[name] = exc

    leader = threading.Thread(target=call, args=("leader",))
    leader.start()
    assert started.wait(BOUND)
    others = [threading.Thread(target=call, args=(f"o{i}",)) for i in range(3)]
    for t in others:
        t.start()
    wait_until(lambda: flights._flights["k"]._outcome is not None)
    time.sleep(GRACE)  # the other loops' callers are now awaiting the shared outcome
    release.set()
    join_all([leader, *others])
    if isinstance(outcome, Exception):
        assert all(got[n] is outcome for n in ("leader", "o0", "o1", "o2"))
    else:
        assert got["leader"] == (5, False)
        assert all(got[f"o{i}"] == (5, True) for i in range(3))
    assert not flights.running("k")


async def test_a_cross_loop_future_made_after_the_end_holds_the_outcome() -> None:
    from coalesce.flight import AsyncFlights

    flights = AsyncFlights()
    kept: list[Any] = []

    async def compute(_fence: Any) -> int:
        kept.append(flights._flights["k"])
        return 3

    assert await flights.run("k", compute) == (3, False)
    future = kept[0]._outcome_for_other_loops()  # a caller from another loop, just too late
    assert future.result(timeout=0) == 3


async def test_a_flight_cancelled_before_its_first_step_lets_callers_start_over() -> None:
    from coalesce.flight import AsyncFlights

    flights = AsyncFlights()
    calls = 0

    async def compute(_fence: Any) -> int:
        nonlocal calls
        calls += 1
        return calls

    caller = asyncio.ensure_future(flights.run("k", compute))
    await asyncio.sleep(0)  # the caller started the flight; its task has not run a step
    flights._flights["k"].task.cancel()
    assert await asyncio.wait_for(caller, BOUND) == (1, False)  # started over, computed once
    assert not flights.running("k")
