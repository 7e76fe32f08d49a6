"""`Cache.cached_many` on the memory store (issue 12): one pass over the cached ids, each
missing id computed once among overlapping callers (threads and tasks), `load(id)` batching,
fencing by invalidation, tags, the kill switch and stats.

Ordering is arranged with events; the only waits are bounded polls for a caller to reach
the point a test needs.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from coalesce import Cache, ConfigurationError, KeyBuildError, KeyTemplateError
from coalesce.errors import ReentrantCallError
from coalesce.testing import FakeClock

BOUND = 10.0


class Boom(Exception):
    pass


def wait_until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + BOUND
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


async def await_until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + BOUND
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


def run_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Start `call` in a thread; its result (or exception) lands in the list."""
    out: list[Any] = []

    def body() -> None:
        try:
            out.append(call())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    return thread, out


# ---------------------------------------------------------------------------------------
# one caller


def test_found_ids_in_the_callers_order_and_only_missing_ids_computed() -> None:
    cache = Cache()
    calls: list[list[int]] = []

    @cache.cached_many(key="user:{}", ttl=60)
    def users(ids: list[int]) -> dict[int, str]:
        calls.append(list(ids))
        return {i: f"u{i}" for i in ids if i != 3}

    assert list(users([2, 1, 3])) == [2, 1]
    assert users([5, 3, 4, 1, 2]) == {5: "u5", 4: "u4", 1: "u1", 2: "u2"}
    assert list(users([5, 3, 4, 1, 2])) == [5, 4, 1, 2]
    # 3 is absent and not cached: asked again each time, alone with the other missing ids
    assert calls == [[2, 1, 3], [5, 3, 4], [3]]
    assert users([1, 1, 2]) == {1: "u1", 2: "u2"}  # duplicates read once
    assert cache.get("user:2") == "u2"  # the single-key API sees the same stored key
    assert users.key(2) == "user:2"


def test_values_are_private_copies() -> None:
    cache = Cache()

    @cache.cached_many(key="user:{}")
    def users(ids: list[int]) -> dict[int, dict[str, list[int]]]:
        return {i: {"tags": [i]} for i in ids}

    first = users([1])
    first[1]["tags"].append(99)
    assert users([1]) == {1: {"tags": [1]}}


def test_cache_missing_stores_the_absence_for_that_long() -> None:
    clock = FakeClock()
    cache = Cache(clock=clock)
    calls: list[list[int]] = []

    @cache.cached_many(key="user:{}", ttl=60, cache_missing=5)
    def users(ids: list[int]) -> dict[int, int]:
        calls.append(list(ids))
        return {i: i for i in ids if i % 2}

    assert users([1, 2]) == {1: 1}
    assert users([1, 2]) == {1: 1}
    assert calls == [[1, 2]]
    with pytest.raises(KeyError):  # the stored absence, as the README says
        cache.get("user:2")
    assert cache.get("user:1") == 1
    clock.advance(6)
    assert users([1, 2]) == {1: 1}
    assert calls == [[1, 2], [2]]


def test_template_fields_conversions_and_escaping() -> None:
    cache = Cache()

    @cache.cached_many(key="item:{!r}:{:>3}")
    def items(ids: list[Any]) -> dict[Any, str]:
        return {i: str(i) for i in ids}

    assert items(["a b", 7]) == {"a b": "a b", 7: "7"}
    assert items.key(7) == "item:7:%20%207"
    assert items.key("a b") == "item:'a%20b':a%20b"
    assert cache.get("item:7:  7") == "7"  # text keys meet the escaped form


def test_bad_input_raises_our_errors() -> None:
    cache = Cache()
    with pytest.raises(KeyTemplateError, match="filled with each id"):
        cache.cached_many(key="user:{user_id}")(lambda ids: {})
    with pytest.raises(KeyTemplateError, match="needs a field"):
        cache.cached_many(key="users")(lambda ids: {})
    with pytest.raises(ConfigurationError, match="max_batch"):
        cache.cached_many(key="u:{}", max_batch=0)(lambda ids: {})
    with pytest.raises(ConfigurationError, match="cache_missing"):
        cache.cached_many(key="u:{}", cache_missing=-1)(lambda ids: {})
    with pytest.raises(ConfigurationError, match="tags"):
        cache.cached_many(key="u:{}", tags="users")(lambda ids: {})

    @cache.cached_many(key="u:{}")
    def wrong(ids: list[int]) -> Any:
        return [1, 2]

    with pytest.raises(ConfigurationError, match="must return a dict"):
        wrong([1])
    with pytest.raises(KeyBuildError, match="list of ids"):
        wrong("12")
    with pytest.raises(KeyBuildError, match="hashable"):
        wrong([[1]])


def test_a_batch_asking_for_its_own_id_gets_reentrant_call_error() -> None:
    cache = Cache()

    @cache.cached_many(key="r:{}")
    def again(ids: list[int]) -> dict[int, int]:
        return again(ids)  # type: ignore[no-any-return]

    with pytest.raises(ReentrantCallError):
        again([1])
    assert not cache.batch_flights.running(cache.prefix + "r:1")


# ---------------------------------------------------------------------------------------
# overlapping callers: threads


def test_overlapping_threads_compute_each_id_once() -> None:
    cache = Cache()
    calls: list[list[int]] = []
    entered, release = threading.Event(), threading.Event()

    @cache.cached_many(key="user:{}")
    def users(ids: list[int]) -> dict[int, int]:
        calls.append(list(ids))
        if ids[0] == 1:
            entered.set()
            assert release.wait(BOUND)
        return {i: i * 10 for i in ids}

    first, out1 = run_thread(lambda: users([1, 2, 3]))
    assert entered.wait(BOUND)
    second, out2 = run_thread(lambda: users([2, 3, 4]))
    wait_until(lambda: [4] in calls)
    release.set()
    first.join(BOUND)
    second.join(BOUND)
    assert out1 == [{1: 10, 2: 20, 3: 30}] and out2 == [{2: 20, 3: 30, 4: 40}]
    assert calls == [[1, 2, 3], [4]]
    assert users.stats()["coalesced"] == 2  # ids 2 and 3 received from the other batch
    assert users.stats()["batches"] == 2 and users.stats()["batch_ids"] == 4


def test_many_threads_with_random_overlapping_ranges_compute_each_id_once() -> None:
    cache = Cache()
    computed: Counter[int] = Counter()
    lock = threading.Lock()

    @cache.cached_many(key="n:{}")
    def numbers(ids: list[int]) -> dict[int, int]:
        with lock:
            computed.update(ids)
        time.sleep(0.001)  # keep batches in flight while others arrive
        return {i: -i for i in ids}

    rng = random.Random(12)
    ranges = [
        (start, start + rng.randint(1, 40)) for start in (rng.randint(0, 200) for _ in range(64))
    ]
    gate = threading.Barrier(16)
    results: list[bool] = []

    def worker(part: list[tuple[int, int]]) -> None:
        gate.wait(BOUND)
        for lo, hi in part:
            got = numbers(list(range(lo, hi)))
            results.append(got == {i: -i for i in range(lo, hi)})

    threads = [threading.Thread(target=worker, args=(ranges[n::16],)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(BOUND)
    assert results == [True] * 64
    assert set(computed.values()) == {1}


def test_an_exception_reaches_every_caller_waiting_on_those_ids() -> None:
    cache = Cache()
    calls: list[list[int]] = []
    entered, release = threading.Event(), threading.Event()

    @cache.cached_many(key="user:{}")
    def users(ids: list[int]) -> dict[int, int]:
        calls.append(list(ids))
        if ids[0] == 1 and len(calls) == 1:
            entered.set()
            assert release.wait(BOUND)
            raise Boom("down")
        return {i: i for i in ids}

    first, out1 = run_thread(lambda: users([1, 2]))
    assert entered.wait(BOUND)
    second, out2 = run_thread(lambda: users([2, 3]))
    wait_until(lambda: [3] in calls)
    release.set()
    first.join(BOUND)
    second.join(BOUND)
    assert isinstance(out1[0], Boom) and isinstance(out2[0], Boom)
    assert users([1, 2, 3]) == {1: 1, 2: 2, 3: 3}  # not cached: computed again, 3 was kept
    assert calls == [[1, 2], [3], [1, 2]]
    assert users.stats()["errors"] == 1


def test_invalidating_one_id_during_a_batch_keeps_its_result_out() -> None:
    cache = Cache()
    calls: list[list[int]] = []
    entered, release = threading.Event(), threading.Event()

    @cache.cached_many(key="user:{}")
    def users(ids: list[int]) -> dict[int, str]:
        calls.append(list(ids))
        if len(calls) == 1:
            entered.set()
            assert release.wait(BOUND)
            return {i: f"old{i}" for i in ids}
        return {i: f"new{i}" for i in ids}

    first, out = run_thread(lambda: users([1, 2, 3]))
    assert entered.wait(BOUND)
    users.invalidate(2)
    assert users([2]) == {2: "new2"}  # a caller after the invalidation does not join
    release.set()
    first.join(BOUND)
    assert out == [{1: "old1", 2: "old2", 3: "old3"}]  # its own callers still get it
    assert cache.get("user:2") == "new2"  # the fenced result did not land over the new one
    assert cache.get("user:1") == "old1" and cache.get("user:3") == "old3"


def test_cache_invalidate_of_the_text_key_fences_the_id_too() -> None:
    cache = Cache()
    entered, release = threading.Event(), threading.Event()

    @cache.cached_many(key="user:{}")
    def users(ids: list[int]) -> dict[int, str]:
        entered.set()
        assert release.wait(BOUND)
        return {i: "v" for i in ids}

    first, _ = run_thread(lambda: users([7, 8]))
    assert entered.wait(BOUND)
    cache.invalidate("user:7")
    release.set()
    first.join(BOUND)
    assert cache.get("user:7") is None and cache.get("user:8") == "v"


def test_tags_per_id_and_a_tag_invalidation_during_a_batch() -> None:
    cache = Cache()
    entered, release = threading.Event(), threading.Event()
    slow = [False]

    @cache.cached_many(key="user:{}", tags=["users", "user-tag:{}"])
    def users(ids: list[int]) -> dict[int, int]:
        if slow[0]:
            entered.set()
            assert release.wait(BOUND)
        return {i: i for i in ids}

    users([1, 2])
    assert cache.invalidate_tag("user-tag:1") == 1
    assert cache.get("user:1") is None and cache.get("user:2") == 2
    assert cache.invalidate_tag("users") == 1
    slow[0] = True
    first, _ = run_thread(lambda: users([3, 4]))
    assert entered.wait(BOUND)
    cache.invalidate_tag("user-tag:4")
    release.set()
    first.join(BOUND)
    assert cache.get("user:3") == 3 and cache.get("user:4") is None


def test_stale_entries_are_served_and_refreshed_in_the_background() -> None:
    clock = FakeClock()
    cache = Cache(clock=clock)
    version = [1]

    @cache.cached_many(key="user:{}", ttl=10, stale_ttl=30)
    def users(ids: list[int]) -> dict[int, int]:
        return {i: version[0] for i in ids}

    assert users([1, 2]) == {1: 1, 2: 1}
    version[0] = 2
    clock.advance(15)
    assert users([1, 2]) == {1: 1, 2: 1}  # stale, served at once
    wait_until(lambda: cache.get("user:1") == 2 and cache.get("user:2") == 2)
    assert users.stats()["stale"] == 2
    assert users([1, 2]) == {1: 2, 2: 2}
    clock.advance(100)  # past the stale window: computed while the caller waits
    version[0] = 3
    assert users([1]) == {1: 3}


@pytest.mark.parametrize("how", ["enabled=False", "COALESCE_DISABLED=1"])
def test_the_kill_switch_makes_plain_calls(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if how == "enabled=False":
        cache = Cache(enabled=False)
    else:
        monkeypatch.setenv("COALESCE_DISABLED", "1")
        cache = Cache()
    calls: list[list[int]] = []

    @cache.cached_many(key="user:{}")
    def users(ids: list[int]) -> dict[int, int]:
        calls.append(list(ids))
        return {i: i for i in ids}

    assert users([1, 2]) == {1: 1, 2: 2} and users([1, 2]) == {1: 1, 2: 2}
    assert calls == [[1, 2], [1, 2]]
    assert users.invalidate(1) is False


def test_stats_count_hits_misses_batches_and_ids() -> None:
    cache = Cache()

    @cache.cached_many(key="user:{}")
    def users(ids: list[int]) -> dict[int, int]:
        return {i: i for i in ids}

    users([1, 2, 3])
    users([2, 3, 4, 5])
    stats = cache.stats()["user:{}"]
    assert (stats["hits"], stats["misses"]) == (2, 5)
    assert (stats["batches"], stats["batch_ids"], stats["computations"]) == (2, 5, 2)
    assert users._policy.stats.ids_per_batch == 2.5
    users.invalidate(1)
    assert users.stats()["invalidations"] == 1


# ---------------------------------------------------------------------------------------
# overlapping callers: tasks


def test_overlapping_tasks_compute_each_id_once() -> None:
    cache = Cache()
    calls: list[list[int]] = []

    @cache.cached_many(key="user:{}")
    async def users(ids: list[int]) -> dict[int, int]:
        calls.append(list(ids))
        await asyncio.sleep(0.01)
        return {i: i * 10 for i in ids}

    async def main() -> list[dict[int, int]]:
        return await asyncio.gather(users([1, 2, 3]), users([2, 3, 4]), users([4, 1]))

    assert asyncio.run(main()) == [
        {1: 10, 2: 20, 3: 30},
        {2: 20, 3: 30, 4: 40},
        {4: 40, 1: 10},
    ]
    assert calls == [[1, 2, 3], [4]]


def test_a_cancelled_caller_leaves_alone_and_the_batch_goes_on() -> None:
    cache = Cache()
    calls: list[list[int]] = []

    async def main() -> None:
        go = asyncio.Event()

        @cache.cached_many(key="user:{}")
        async def users(ids: list[int]) -> dict[int, int]:
            calls.append(list(ids))
            await go.wait()
            return {i: i for i in ids}

        leader = asyncio.create_task(users([1, 2, 3]))
        await await_until(lambda: bool(calls))
        follower = asyncio.create_task(users([2, 3]))
        await asyncio.sleep(0.01)
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        go.set()
        assert await follower == {2: 2, 3: 3}
        assert await users([1]) == {1: 1}  # stored by the batch its caller left

    asyncio.run(main())
    assert calls == [[1, 2, 3]]


def test_an_async_exception_reaches_every_task_waiting_on_those_ids() -> None:
    cache = Cache()
    calls: list[list[int]] = []

    @cache.cached_many(key="user:{}")
    async def users(ids: list[int]) -> dict[int, int]:
        calls.append(list(ids))
        await asyncio.sleep(0.01)
        if 1 in ids:
            raise Boom("down")
        return {i: i for i in ids}

    async def main() -> list[Any]:
        return await asyncio.gather(users([1, 2]), users([2, 3]), return_exceptions=True)

    first, second = asyncio.run(main())
    assert isinstance(first, Boom) and isinstance(second, Boom)
    assert calls == [[1, 2], [3]]


def test_async_invalidation_during_a_batch() -> None:
    cache = Cache()
    calls: list[list[int]] = []

    async def main() -> None:
        go = asyncio.Event()

        @cache.cached_many(key="user:{}")
        async def users(ids: list[int]) -> dict[int, str]:
            calls.append(list(ids))
            if len(calls) == 1:
                await go.wait()
                return {i: "old" for i in ids}
            return {i: "new" for i in ids}

        first = asyncio.create_task(users([1, 2]))
        await await_until(lambda: bool(calls))
        assert await users.invalidate(2) is False
        assert await users([2]) == {2: "new"}
        go.set()
        assert await first == {1: "old", 2: "old"}
        assert await users([1, 2]) == {1: "old", 2: "new"}

    asyncio.run(main())


# ---------------------------------------------------------------------------------------
# load(id)


def test_async_loads_of_one_iteration_make_one_batch() -> None:
    cache = Cache()
    calls: list[list[int]] = []

    @cache.cached_many(key="user:{}", max_batch=3)
    async def users(ids: list[int]) -> dict[int, int]:
        calls.append(list(ids))
        return {i: i for i in ids if i != 9}

    async def main() -> list[Any]:
        return await asyncio.gather(*(users.load(i) for i in (1, 2, 2, 3, 4, 9)))

    assert asyncio.run(main()) == [1, 2, 2, 3, 4, None]
    assert calls == [[1, 2, 3], [4, 9]]  # at most max_batch distinct ids per batch


def test_thread_loads_within_the_window_make_one_batch() -> None:
    cache = Cache()
    calls: list[list[int]] = []

    # the batch closes when max_batch ids are in: no timing in this test
    @cache.cached_many(key="user:{}", batch_window=BOUND, max_batch=4)
    def users(ids: list[int]) -> dict[int, int]:
        calls.append(sorted(ids))
        return {i: i * 2 for i in ids}

    threads = [run_thread(lambda i=i: users.load(i)) for i in range(4)]
    for thread, _ in threads:
        thread.join(BOUND)
    assert [out for _, out in threads] == [[0], [2], [4], [6]]
    assert calls == [[0, 1, 2, 3]]


def test_a_failing_load_batch_raises_in_every_caller() -> None:
    cache = Cache()

    @cache.cached_many(key="user:{}")
    async def users(ids: list[int]) -> dict[int, int]:
        raise Boom("down")

    async def main() -> list[Any]:
        return await asyncio.gather(users.load(1), users.load(2), return_exceptions=True)

    assert [type(r) for r in asyncio.run(main())] == [Boom, Boom]


# ---------------------------------------------------------------------------------------
# a waiter never hangs


class Interrupt(BaseException):
    """Stands for KeyboardInterrupt / SystemExit in a leading thread."""


def test_a_leader_interrupted_hands_its_ids_to_a_waiter() -> None:
    cache = Cache()
    calls: list[list[int]] = []
    entered, release = threading.Event(), threading.Event()

    @cache.cached_many(key="user:{}")
    def users(ids: list[int]) -> dict[int, int]:
        calls.append(list(ids))
        if len(calls) == 1:
            entered.set()
            assert release.wait(BOUND)
            raise Interrupt
        return {i: i for i in ids}

    first, out1 = run_thread(lambda: users([1, 2]))
    assert entered.wait(BOUND)
    second, out2 = run_thread(lambda: users([2, 3]))
    wait_until(lambda: [3] in calls)
    release.set()
    first.join(BOUND)
    second.join(BOUND)
    assert isinstance(out1[0], Interrupt)
    assert out2 == [{2: 2, 3: 3}]  # started over for 2: it did not inherit the interrupt
    assert calls == [[1, 2], [3], [2]]


def test_tasks_on_two_event_loops_share_one_batch() -> None:
    cache = Cache()
    calls: list[list[int]] = []
    entered, release = threading.Event(), threading.Event()

    @cache.cached_many(key="user:{}")
    async def users(ids: list[int]) -> dict[int, int]:
        calls.append(list(ids))
        if len(calls) == 1:
            entered.set()
            while not release.is_set():
                await asyncio.sleep(0.002)
        return {i: i for i in ids}

    first, out1 = run_thread(lambda: asyncio.run(users([1, 2])))
    assert entered.wait(BOUND)
    second, out2 = run_thread(lambda: asyncio.run(users([2, 3])))
    wait_until(lambda: [3] in calls)
    release.set()
    first.join(BOUND)
    second.join(BOUND)
    assert out1 == [{1: 1, 2: 2}] and out2 == [{2: 2, 3: 3}]
    assert calls == [[1, 2], [3]]


def test_a_thread_load_alone_runs_its_batch_after_the_window() -> None:
    cache = Cache()
    calls: list[list[int]] = []

    @cache.cached_many(key="user:{}", batch_window=0.01)
    def users(ids: list[int]) -> dict[int, int]:
        calls.append(list(ids))
        return {i: i for i in ids if i != 2}

    assert users.load(1) == 1
    assert users.load(2) is None  # absent
    assert users.load(1) == 1 and calls == [[1], [2]]  # the second load of 1: a hit


def test_a_cancelled_load_leaves_the_batch_to_the_others() -> None:
    cache = Cache()

    async def main() -> None:
        go = asyncio.Event()

        @cache.cached_many(key="user:{}")
        async def users(ids: list[int]) -> dict[int, int]:
            await go.wait()
            return {i: i for i in ids}

        left = asyncio.create_task(users.load(1))
        stays = asyncio.create_task(users.load(1))
        await asyncio.sleep(0.01)
        left.cancel()
        go.set()
        assert await stays == 1
        assert left.cancelled()

    asyncio.run(main())
