"""The in-memory core against its peers: hits and misses (sync and async) and stampedes.

    python benchmarks/bench_core.py           # about 30 s; writes benchmarks/results/core.md
    python benchmarks/bench_core.py --quick   # a few seconds, noisier
    python benchmarks/bench_core.py --only misses   # one table, printed, no file written

Every number is the median of several repeats, the repeats of the cases in one table
interleaved. PASS/FAIL compares with the goals of issue 2 and is information only: the
script always exits 0. See benchmarks/README.md for what each row measures.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocache
import async_lru
import cachetools
import cashews
from common import (
    RESULTS,
    Timing,
    command_line,
    distinct_keys,
    environment,
    fmt_ms,
    fmt_ns,
    fmt_ratio,
    loop_overhead_ns,
    markdown_table,
    median,
    paired_ratio,
    time_async_calls,
    time_sync_calls,
    verdict,
    write_result,
)

from coalesce import Cache

PEERS = ("cachetools", "async-lru", "cashews", "aiocache", "msgpack")

GOAL_SYNC_HIT = 0.5  # x cachetools.cached(TTLCache, condition=Condition())
GOAL_ASYNC_HIT = 1.0  # x async_lru.alru_cache(ttl=...)
GOAL_SYNC_MISS = 1.5  # x cachetools.cached(TTLCache(10_000, 60), lock=Lock()), issue 10
GOAL_ASYNC_MISS = 1.5  # x async_lru.alru_cache(ttl=60), issue 10
MISS_MAXSIZE = 10_000  # every cache of the miss rows holds at most this many entries
GOAL_STAMPEDE = 1.1  # x the function's own time
STAMPEDE_SLEEP = 0.050
STAMPEDE_TASKS = 200
STAMPEDE_THREADS = 50


@dataclass
class Settings:
    repeat: int  # repeats per micro-benchmark (the median is reported)
    target_s: float  # seconds per repeat
    stampede_runs: int  # stampedes per row, each on a fresh key


def flat_value(user_id: int) -> dict[str, Any]:
    return {"id": user_id, "name": "Ada Lovelace", "email": "ada@example.com", "active": True}


def nested_value(user_id: int) -> dict[str, Any]:
    return {"id": user_id, "name": "Ada Lovelace", "roles": ["admin", "editor", "viewer"]}


# -- sync memory hit ----------------------------------------------------------------------


def sync_cases(make: Callable[[int], dict[str, Any]]) -> dict[str, Callable[[Any], Any]]:
    cache = Cache()

    @cache.cached(ttl=60, key="user:{user_id}")
    def coalesce_fn(user_id: int) -> dict[str, Any]:
        return make(user_id)

    @cache.cached(ttl=60, key="user_shared:{user_id}", copy=False)
    def coalesce_shared(user_id: int) -> dict[str, Any]:
        return make(user_id)

    @cachetools.cached(cachetools.TTLCache(maxsize=10_000, ttl=60), condition=threading.Condition())
    def cachetools_fn(user_id: int) -> dict[str, Any]:
        return make(user_id)

    @functools.lru_cache(maxsize=10_000)
    def lru_fn(user_id: int) -> dict[str, Any]:
        return make(user_id)

    return {
        "coalesce": coalesce_fn,
        "coalesce copy=False": coalesce_shared,
        "cachetools+Condition": cachetools_fn,
        "functools.lru_cache": lru_fn,
    }


def check_hits(cases: dict[str, Callable[[Any], Any]], expected: Any) -> None:
    for name, f in cases.items():
        for _ in range(2):
            if f(1) != expected:
                raise AssertionError(f"{name} returned {f(1)!r}, not {expected!r}")


def bench_sync_hits(settings: Settings) -> tuple[str, dict[str, float]]:
    rows: list[list[str]] = []
    ratios: dict[str, float] = {}
    for label, make in (("flat dict", flat_value), ("nested dict (list inside)", nested_value)):
        cases = sync_cases(make)
        check_hits(cases, make(1))
        timings = time_sync_calls(cases, 1, repeat=settings.repeat, target_s=settings.target_s)
        reference = timings["cachetools+Condition"]
        for name, timing in timings.items():
            ratio = paired_ratio(timing, reference)
            if name == "coalesce" and label == "flat dict":
                goal, result = f"<= {GOAL_SYNC_HIT:.2f}x", verdict(ratio, GOAL_SYNC_HIT)
                ratios["sync hit, flat dict"] = ratio
            elif name == "coalesce":
                goal, result = "(none: for honesty)", "info"
                ratios["sync hit, nested dict"] = ratio
            elif name == "cachetools+Condition":
                goal, result = "(reference)", ""
            else:
                goal, result = "(for scale)", ""
            rows.append([label, name, *_timing_cells(timing), fmt_ratio(ratio), goal, result])
    header = ["value", "library", "median/call", "spread", "vs cachetools", "goal", "result"]
    return markdown_table(header, rows), ratios


def _timing_cells(timing: Timing) -> list[str]:
    return [fmt_ns(timing.median_ns), f"{timing.spread:.0%}"]


# -- async memory hit ----------------------------------------------------------------------


def async_cases() -> dict[str, Callable[[Any], Awaitable[Any]]]:
    cache = Cache()

    @cache.cached(ttl=60, key="user:{user_id}")
    async def coalesce_fn(user_id: int) -> dict[str, Any]:
        return flat_value(user_id)

    @async_lru.alru_cache(maxsize=10_000, ttl=60)
    async def alru_fn(user_id: int) -> dict[str, Any]:
        return flat_value(user_id)

    cashews_cache = cashews.Cache()
    cashews_cache.setup("mem://")

    @cashews_cache(ttl=60)
    async def cashews_fn(user_id: int) -> dict[str, Any]:
        return flat_value(user_id)

    @aiocache.cached(ttl=60, cache=aiocache.SimpleMemoryCache)
    async def aiocache_fn(user_id: int) -> dict[str, Any]:
        return flat_value(user_id)

    return {
        "coalesce": coalesce_fn,
        "async_lru.alru_cache": alru_fn,
        "cashews mem://": cashews_fn,
        "aiocache SimpleMemoryCache": aiocache_fn,
    }


async def bench_async_hits(settings: Settings) -> tuple[str, dict[str, float]]:
    cases = async_cases()
    for name, f in cases.items():
        for _ in range(2):
            got = await f(1)
            if got != flat_value(1):
                raise AssertionError(f"{name} returned {got!r}")
    timings = await time_async_calls(cases, 1, repeat=settings.repeat, target_s=settings.target_s)
    reference = timings["async_lru.alru_cache"]
    rows = []
    ratio = paired_ratio(timings["coalesce"], reference)
    for name, timing in timings.items():
        row_ratio = paired_ratio(timing, reference)
        if name == "coalesce":
            goal, result = f"<= {GOAL_ASYNC_HIT:.2f}x", verdict(ratio, GOAL_ASYNC_HIT)
        elif name == "async_lru.alru_cache":
            goal, result = "(reference)", ""
        else:
            goal, result = "(peer)", ""
        rows.append(["flat dict", name, *_timing_cells(timing), fmt_ratio(row_ratio), goal, result])
    header = ["value", "library", "median/call", "spread", "vs async_lru", "goal", "result"]
    return markdown_table(header, rows), {"async hit, flat dict": ratio}


# -- misses: every call a key never seen -----------------------------------------------------


def sync_miss_cases() -> dict[str, Callable[[Any], Any]]:
    cache = Cache(maxsize=MISS_MAXSIZE)

    @cache.cached(ttl=60, key="user:{user_id}")
    def coalesce_fn(user_id: int) -> dict[str, Any]:
        return flat_value(user_id)

    @cache.cached(ttl=60, key="user_shared:{user_id}", copy=False)
    def coalesce_shared(user_id: int) -> dict[str, Any]:
        return flat_value(user_id)

    @cachetools.cached(cachetools.TTLCache(maxsize=MISS_MAXSIZE, ttl=60), lock=threading.Lock())
    def cachetools_fn(user_id: int) -> dict[str, Any]:
        return flat_value(user_id)

    return {
        "coalesce": distinct_keys(coalesce_fn),
        "coalesce copy=False": distinct_keys(coalesce_shared),
        "cachetools+Lock": distinct_keys(cachetools_fn),
        "flat_value alone": distinct_keys(flat_value),
    }


def async_miss_cases() -> dict[str, Callable[[Any], Awaitable[Any]]]:
    cache = Cache(maxsize=MISS_MAXSIZE)

    @cache.cached(ttl=60, key="user:{user_id}")
    async def coalesce_fn(user_id: int) -> dict[str, Any]:
        return flat_value(user_id)

    @async_lru.alru_cache(ttl=60)
    async def alru_fn(user_id: int) -> dict[str, Any]:
        return flat_value(user_id)

    async def alone(user_id: int) -> dict[str, Any]:
        return flat_value(user_id)

    return {
        "coalesce": distinct_keys(coalesce_fn),
        "async_lru.alru_cache(ttl=60)": distinct_keys(alru_fn),
        "async def alone": distinct_keys(alone),
    }


def _miss_rows(
    mode: str, timings: dict[str, Timing], reference: str, goal: float
) -> tuple[list[list[str]], float]:
    rows = []
    for name, timing in timings.items():
        ratio = paired_ratio(timing, timings[reference])
        if name == "coalesce":
            cells = [f"<= {goal:.2f}x", verdict(ratio, goal)]
        else:
            cells = ["(reference)" if name == reference else "(for scale)", ""]
        rows.append([mode, name, *_timing_cells(timing), fmt_ratio(ratio), *cells])
    return rows, paired_ratio(timings["coalesce"], timings[reference])


def warm_full(cases: dict[str, Callable[[Any], Any]]) -> None:
    """Fill every cache first, so that every timed miss also evicts (the steady state)."""
    for f in cases.values():
        for _ in range(MISS_MAXSIZE + 100):
            f(None)


async def awarm_full(cases: dict[str, Callable[[Any], Awaitable[Any]]]) -> None:
    for f in cases.values():
        for _ in range(MISS_MAXSIZE + 100):
            await f(None)


async def _async_miss_timings(settings: Settings) -> dict[str, Timing]:
    cases = async_miss_cases()
    await awarm_full(cases)
    return await time_async_calls(cases, None, repeat=settings.repeat, target_s=settings.target_s)


def bench_misses(settings: Settings) -> tuple[str, dict[str, float]]:
    cases = sync_miss_cases()
    warm_full(cases)
    sync_timings = time_sync_calls(cases, None, repeat=settings.repeat, target_s=settings.target_s)
    sync_rows, sync_ratio = _miss_rows("sync", sync_timings, "cachetools+Lock", GOAL_SYNC_MISS)
    async_timings = asyncio.run(_async_miss_timings(settings))
    async_rows, async_ratio = _miss_rows(
        "asyncio", async_timings, "async_lru.alru_cache(ttl=60)", GOAL_ASYNC_MISS
    )
    header = ["mode", "library", "median/call", "spread", "vs reference", "goal", "result"]
    table = markdown_table(header, sync_rows + async_rows)
    return table, {"sync miss, flat dict": sync_ratio, "async miss, flat dict": async_ratio}


# -- stampedes ----------------------------------------------------------------------------------


@dataclass
class Stampede:
    executions: list[int]  # per run
    wall_s: list[float]  # per run: first call started -> last caller answered

    @property
    def ratio(self) -> float:
        return median(self.wall_s) / STAMPEDE_SLEEP


async def async_stampede(
    make: Callable[[Callable[[int], Awaitable[Any]]], Callable[[int], Awaitable[Any]]], runs: int
) -> Stampede:
    executions = 0

    async def slow(n: int) -> dict[str, Any]:
        nonlocal executions
        executions += 1
        await asyncio.sleep(STAMPEDE_SLEEP)
        return flat_value(n)

    f = make(slow)
    result = Stampede([], [])
    base = random.randrange(1 << 30)
    for run in range(runs):
        executions = 0
        key = base + run  # a cold key every run
        start = time.perf_counter()
        answers = await asyncio.gather(*(f(key) for _ in range(STAMPEDE_TASKS)))
        result.wall_s.append(time.perf_counter() - start)
        result.executions.append(executions)
        if any(answer != flat_value(key) for answer in answers):
            raise AssertionError("a caller of the async stampede got a wrong value")
    return result


def thread_stampede(
    make: Callable[[Callable[[int], Any]], Callable[[int], Any]], runs: int
) -> Stampede:
    lock = threading.Lock()
    executions = 0

    def slow(n: int) -> dict[str, Any]:
        nonlocal executions
        with lock:
            executions += 1
        time.sleep(STAMPEDE_SLEEP)
        return flat_value(n)

    f = make(slow)
    result = Stampede([], [])
    base = random.randrange(1 << 30)
    for run in range(runs):
        executions = 0
        key = base + run  # a cold key every run
        wall, answers = _threads_call_once(f, key)
        result.wall_s.append(wall)
        result.executions.append(executions)
        if len(answers) != STAMPEDE_THREADS or any(a != flat_value(key) for a in answers):
            raise AssertionError("a caller of the thread stampede got a wrong value or none")
    return result


def _threads_call_once(f: Callable[[int], Any], key: int) -> tuple[float, list[Any]]:
    """Start the threads, release them together, return (wall seconds, their answers)."""
    lock = threading.Lock()
    answers: list[Any] = []
    barrier = threading.Barrier(STAMPEDE_THREADS + 1)

    def caller() -> None:
        barrier.wait()
        answer = f(key)
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=caller) for _ in range(STAMPEDE_THREADS)]
    for thread in threads:
        thread.start()
    barrier.wait()  # every thread is started and waiting: go
    start = time.perf_counter()
    for thread in threads:
        thread.join(timeout=30)
    return time.perf_counter() - start, answers


def _coalesce_wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    return Cache().cached(ttl=60, key="stampede:{n}")(fn)  # type: ignore[no-any-return]


def _cachetools_wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    cache: cachetools.TTLCache[Any, Any] = cachetools.TTLCache(maxsize=10_000, ttl=60)
    return cachetools.cached(cache, condition=threading.Condition())(fn)


def _alru_wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    return async_lru.alru_cache(maxsize=10_000, ttl=60)(fn)


def bench_stampedes(settings: Settings) -> tuple[str, dict[str, float]]:
    runs = settings.stampede_runs
    measured = [
        (
            f"{STAMPEDE_TASKS} asyncio tasks",
            "coalesce",
            asyncio.run(async_stampede(_coalesce_wrap, runs)),
        ),
        (
            f"{STAMPEDE_TASKS} asyncio tasks",
            "async_lru.alru_cache",
            asyncio.run(async_stampede(_alru_wrap, runs)),
        ),
        (f"{STAMPEDE_THREADS} threads", "coalesce", thread_stampede(_coalesce_wrap, runs)),
        (
            f"{STAMPEDE_THREADS} threads",
            "cachetools+Condition",
            thread_stampede(_cachetools_wrap, runs),
        ),
    ]
    rows = []
    ratios = {}
    for callers, name, stampede in measured:
        worst = max(stampede.executions)
        executions = f"{worst}" + (" (every run)" if min(stampede.executions) == worst else "")
        if name == "coalesce":
            ok = worst == 1 and stampede.ratio <= GOAL_STAMPEDE
            goal, result = f"1 execution, <= {GOAL_STAMPEDE:.2f}x", "PASS" if ok else "FAIL"
            ratios[f"stampede, {callers}"] = stampede.ratio
        else:
            goal, result = "(peer)", ""
        rows.append(
            [
                callers,
                name,
                executions,
                fmt_ms(median(stampede.wall_s)),
                fmt_ms(max(stampede.wall_s)),
                fmt_ratio(stampede.ratio),
                goal,
                result,
            ]
        )
    header = [
        "callers",
        "library",
        "executions (max)",
        "wall (median)",
        "wall (max)",
        "wall / 50 ms",
        "goal",
        "result",
    ]
    return markdown_table(header, rows), ratios


# -- main ------------------------------------------------------------------------------------

TABLES: dict[str, Callable[[Settings], tuple[str, dict[str, float]]]] = {
    "sync-hits": bench_sync_hits,
    "async-hits": lambda settings: asyncio.run(bench_async_hits(settings)),
    "misses": bench_misses,
    "stampedes": bench_stampedes,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short, noisier run")
    parser.add_argument(
        "--output", type=Path, default=RESULTS / "core.md", help="where to write the table"
    )
    parser.add_argument(
        "--only",
        choices=sorted(TABLES),
        help="run one table and print it (for comparing changes; writes no file)",
    )
    args = parser.parse_args()
    settings = (
        Settings(repeat=3, target_s=0.02, stampede_runs=2)
        if args.quick
        else Settings(repeat=7, target_s=0.25, stampede_runs=5)
    )
    if args.only is not None:
        table, ratios = TABLES[args.only](settings)
        print(table)
        print(", ".join(f"{name}: {fmt_ratio(ratio)}" for name, ratio in ratios.items()))
        return

    sync_table, sync_ratios = bench_sync_hits(settings)
    async_table, async_ratios = asyncio.run(bench_async_hits(settings))
    miss_table, miss_ratios = bench_misses(settings)
    stampede_table, stampede_ratios = bench_stampedes(settings)
    overhead = loop_overhead_ns(repeat=settings.repeat, target_s=settings.target_s)

    summary_rows = []
    goals = {
        "sync hit, flat dict": (GOAL_SYNC_HIT, "x cachetools+Condition"),
        "async hit, flat dict": (GOAL_ASYNC_HIT, "x async_lru"),
        "sync miss, flat dict": (GOAL_SYNC_MISS, "x cachetools+Lock"),
        "async miss, flat dict": (GOAL_ASYNC_MISS, "x async_lru"),
        f"stampede, {STAMPEDE_TASKS} asyncio tasks": (GOAL_STAMPEDE, "x 50 ms"),
        f"stampede, {STAMPEDE_THREADS} threads": (GOAL_STAMPEDE, "x 50 ms"),
    }
    every = {**sync_ratios, **async_ratios, **miss_ratios, **stampede_ratios}
    for name, (goal, unit) in goals.items():
        summary_rows.append(
            [name, fmt_ratio(every[name]), f"<= {goal:.2f}{unit}", verdict(every[name], goal)]
        )

    mode = "quick" if args.quick else "full"
    text = "\n".join(
        [
            "# coalesce core benchmarks (in memory)",
            "",
            f"`{command_line()}` ({mode} run: median of {settings.repeat} repeats of about "
            f"{settings.target_s:g} s each, repeats interleaved; stampedes: median of "
            f"{settings.stampede_runs} runs, each on a fresh key).",
            "",
            f"Environment: {environment(*PEERS)}.",
            "",
            "## Goals (issues 2 and 10)",
            "",
            markdown_table(["measure", "coalesce", "goal", "result"], summary_rows),
            "",
            "## Sync memory hit, key template `user:{user_id}`",
            "",
            sync_table,
            "",
            f"Each sync row includes about {fmt_ns(overhead)} of `timeit` loop and call "
            "overhead. `coalesce` returns a private copy of the value (a shallow copy of a flat "
            "container, a msgpack decode of a nested one); `copy=False`, cachetools and "
            "lru_cache hand every caller the same object.",
            "",
            "## Async memory hit (`for _ in range(N): await f(1)` in one coroutine)",
            "",
            async_table,
            "",
            "## Memory miss: every call a new key, `flat_value(user_id)` computed each time",
            "",
            miss_table,
            "",
            "Each call passes the next integer of a counter, so every call misses, computes "
            "and stores; the caches are filled first (10,000 entries), so every timed miss "
            "also evicts. "
            "coalesce stores a frozen copy of the value (`copy=True`, the default); "
            "`alru_cache(ttl=60)` keeps its default `maxsize=128` and schedules a timer per "
            "entry. The `alone` rows are the bare function with the same counter.",
            "",
            "## Stampede on a cold key of a 50 ms function",
            "",
            stampede_table,
            "",
            "PASS/FAIL is information only; the script always exits 0.",
            "",
        ]
    )
    print(text)
    write_result(args.output, text)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
