"""Batch loading on Redis (issue 12): an N+1 page of 100 ids, 80% cached, 50 pages at once.

    python benchmarks/bench_batch.py            # about a minute; writes results/batch.md
    python benchmarks/bench_batch.py --quick    # one round, noisier

Page `p` shows the ids `p * 10 ... p * 10 + 99`, so the 50 concurrent pages overlap heavily
(590 distinct ids); 80% of those ids (a seeded sample) are cached before each round, the
rest are missing, and each page is loaded by one call of the library's batch API (or, for
the N+1 reference, by a loop of single-key `cached` calls). The backend is a simulated
database: `DB_CALL` seconds per call, whatever the number of ids.

Measured per library, over the rounds: backend calls, ids computed against the distinct
missing ids (an id computed twice is wasted work), Redis round trips per page (requests
sent by redis-py, which all three libraries use: a pipeline or a script is one; counted
client-side, because `INFO commandstats` also counts the commands scripts run), and each
page's latency (p50/p99). The script starts its own `redis-server` on a free loopback port and uses
only coalesce's public API; PASS/FAIL (issue 12's goals) is information only: it exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocache
import redis.asyncio.connection
import redis.connection
from bench_redis import MsgpackBytes, quiet_peer_logs
from common import (
    HOST,
    RESULTS,
    RedisServer,
    command_line,
    environment,
    fmt_ms,
    markdown_table,
    percentile,
    verdict,
    write_result,
)
from dogpile.cache import make_region

from coalesce import Cache

PEERS = ("redis", "aiocache", "dogpile.cache")
PAGES = 50
PAGE_SIZE = 100
STRIDE = 10  # page p shows ids p * STRIDE ... p * STRIDE + PAGE_SIZE - 1
CACHED = 0.8
DB_CALL = 0.005  # seconds per backend call
GOAL_ROUND_TRIPS = 3.0
#: Requests that open a connection (or the pub/sub listener's), not counted as round trips: a
#: burst of 50 pages opens up to 50 pooled connections, each with its own handshake.
SETUP = frozenset({"hello", "client", "select", "auth", "psubscribe", "subscribe", "ping"})
BARRIER_TIMEOUT = 60.0


def row(user_id: int) -> dict[str, Any]:
    return {"id": user_id, "name": f"user {user_id}", "email": f"u{user_id}@example.com"}


class RoundTrips:
    """Requests sent to Redis by redis-py (sync and asyncio), counted where they are sent."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def install(self) -> None:
        sync_send = redis.connection.AbstractConnection.send_packed_command
        async_send = redis.asyncio.connection.AbstractConnection.send_packed_command
        trips = self

        def send(self: Any, command: Any, check_health: bool = True) -> None:
            trips.bump(command)
            sync_send(self, command, check_health)

        async def asend(self: Any, command: Any, check_health: bool = True) -> None:
            trips.bump(command)
            await async_send(self, command, check_health)

        redis.connection.AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
        redis.asyncio.connection.AbstractConnection.send_packed_command = asend  # type: ignore[method-assign]

    def bump(self, packed: Any) -> None:
        """Count a request, unless it sets up a connection (see `SETUP`)."""
        first = packed if isinstance(packed, (bytes, str)) else next(iter(packed), b"")
        first = first.encode() if isinstance(first, str) else bytes(first)
        words = first.split(b"\r\n")
        name = words[2].decode("ascii", "replace").lower() if len(words) > 2 else ""
        if name in SETUP:
            return
        with self._lock:
            self.count += 1


TRIPS = RoundTrips()


class Backend:
    """The simulated database: counts calls and ids (under a lock: threads call it too)."""

    def __init__(self) -> None:
        self.calls = 0
        self.ids = 0
        self._lock = threading.Lock()

    def _count(self, ids: list[Any]) -> None:
        with self._lock:
            self.calls += 1
            self.ids += len(ids)

    def rows(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        self._count(ids)
        time.sleep(DB_CALL)
        return {i: row(i) for i in ids}

    async def arows(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        self._count(ids)
        await asyncio.sleep(DB_CALL)
        return {i: row(i) for i in ids}

    def reset(self) -> None:
        self.calls = self.ids = 0


@dataclass
class Case:
    """One library's page loader; `sync` ones run in threads, the others as tasks."""

    page: Callable[[list[int]], Any]
    sync: bool
    close: Callable[[], Any] = lambda: None


@dataclass
class Result:
    name: str
    calls: int = 0
    computed: int = 0
    missing: int = 0
    commands: int = 0
    pages: int = 0
    latencies: list[float] = field(default_factory=list)
    wrong: int = 0


# -- the cases ------------------------------------------------------------------------------


def coalesce_many(url: str, ns: str, backend: Backend, *, sync: bool) -> Case:
    cache = Cache(url, namespace=ns)
    if sync:
        users = cache.cached_many(key="user:{}", ttl=60)(backend.rows)
        return Case(users, sync=True, close=cache.close)

    @cache.cached_many(key="user:{}", ttl=60)
    async def ausers(ids: list[int]) -> dict[int, dict[str, Any]]:
        return await backend.arows(ids)

    return Case(ausers, sync=False, close=cache.aclose)


def coalesce_loop(url: str, ns: str, backend: Backend) -> Case:
    cache = Cache(url, namespace=ns)

    @cache.cached(ttl=60, key="user:{user_id}")
    async def user(user_id: int) -> dict[str, Any]:
        return (await backend.arows([user_id]))[user_id]

    async def page(ids: list[int]) -> dict[int, Any]:
        return {i: await user(i) for i in ids}

    return Case(page, sync=False, close=cache.aclose)


def aiocache_many(port: int, ns: str, backend: Backend) -> Case:
    @aiocache.multi_cached(  # type: ignore[untyped-decorator]
        keys_from_attr="ids",
        cache=aiocache.RedisCache,
        serializer=MsgpackBytes(),
        namespace=ns,
        endpoint=HOST,
        port=port,
        ttl=60,
    )
    async def users(ids: list[int]) -> dict[int, dict[str, Any]]:
        return await backend.arows(ids)

    async def page(ids: list[int]) -> dict[int, Any]:
        got = await users(ids=ids)
        return {int(k): v for k, v in got.items()}  # msgpack keeps int keys; to be sure

    return Case(page, sync=False)


def dogpile_many(port: int, ns: str, backend: Backend) -> Case:
    region = make_region().configure(
        "dogpile.cache.redis",
        expiration_time=60,
        arguments={"host": HOST, "port": port, "db": 0, "redis_expiration_time": 120},
    )

    def page(ids: list[int]) -> dict[int, Any]:
        keys = [f"{ns}:user:{i}" for i in ids]

        def creator(*missing: str) -> list[Any]:
            numbers = [int(key.rsplit(":", 1)[1]) for key in missing]
            found = backend.rows(numbers)
            return [found[n] for n in numbers]

        return dict(zip(ids, region.get_or_create_multi(keys, creator), strict=True))

    return Case(page, sync=True)


def builders(server: RedisServer) -> dict[str, Callable[[str, Backend], Case]]:
    url, port = server.url, server.port
    return {
        "coalesce cached_many (asyncio)": lambda ns, b: coalesce_many(url, ns, b, sync=False),
        "coalesce cached_many (threads)": lambda ns, b: coalesce_many(url, ns, b, sync=True),
        "aiocache multi_cached (asyncio)": lambda ns, b: aiocache_many(port, ns, b),
        "dogpile.cache get_or_create_multi (threads)": lambda ns, b: dogpile_many(port, ns, b),
        "coalesce cached, a loop of single-key calls (asyncio)": lambda ns, b: coalesce_loop(
            url, ns, b
        ),
    }


# -- one round --------------------------------------------------------------------------------


def plan(seed: int) -> tuple[list[list[int]], list[int]]:
    """The pages, and the ids cached before the round (a seeded 80% of all)."""
    pages = [list(range(p * STRIDE, p * STRIDE + PAGE_SIZE)) for p in range(PAGES)]
    universe = sorted({i for page in pages for i in page})
    warm = random.Random(seed).sample(universe, int(len(universe) * CACHED))
    return pages, sorted(warm)


async def run_tasks(case: Case, pages: list[list[int]]) -> list[tuple[float, Any]]:
    async def one(ids: list[int]) -> tuple[float, Any]:
        started = time.perf_counter()
        got = await case.page(ids)
        return time.perf_counter() - started, got

    return list(await asyncio.gather(*(one(ids) for ids in pages)))


def run_threads(case: Case, pages: list[list[int]]) -> list[tuple[float, Any]]:
    gate = threading.Barrier(len(pages), timeout=BARRIER_TIMEOUT)
    out: list[tuple[float, Any]] = [(0.0, None)] * len(pages)

    def one(index: int) -> None:
        gate.wait()
        started = time.perf_counter()
        got = case.page(pages[index])
        out[index] = (time.perf_counter() - started, got)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(len(pages))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(BARRIER_TIMEOUT)
    return out


def round_of(build: Callable[[str, Backend], Case], seed: int, result: Result) -> None:
    backend = Backend()
    case = build(f"b{uuid.uuid4().hex[:8]}", backend)
    pages, warm = plan(seed)
    try:
        for start in range(0, len(warm), PAGE_SIZE):  # warm through the library itself
            chunk = warm[start : start + PAGE_SIZE]
            if case.sync:
                case.page(chunk)
            else:
                _run(case.page(chunk))
        backend.reset()
        before = TRIPS.count
        outcomes = run_threads(case, pages) if case.sync else _run(run_tasks(case, pages))
        result.commands += TRIPS.count - before
    finally:
        _run(_closed(case))
    result.calls += backend.calls
    result.computed += backend.ids
    result.missing += len({i for ids in pages for i in ids} - set(warm))
    result.pages += len(pages)
    for (latency, got), ids in zip(outcomes, pages, strict=True):
        result.latencies.append(latency)
        result.wrong += got != {i: row(i) for i in ids}


_LOOP: asyncio.AbstractEventLoop | None = None


def _run(job: Awaitable[Any]) -> Any:
    """Run `job` on the script's one event loop (clients stay bound to their loop)."""
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
    return _LOOP.run_until_complete(job)  # type: ignore[arg-type]


async def _closed(case: Case) -> None:
    closed = case.close()
    if asyncio.iscoroutine(closed):
        await closed


# -- the report ---------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    header = [
        "library",
        "backend calls",
        "ids computed",
        "missing ids",
        "ids per call",
        "Redis round trips/page",
        "page p50",
        "page p99",
        "wrong pages",
    ]
    rows = []
    for r in results:
        rows.append(
            [
                r.name,
                f"{r.calls:,}",
                f"{r.computed:,}",
                f"{r.missing:,}",
                f"{r.computed / r.calls:.1f}" if r.calls else "-",
                f"{r.commands / r.pages:.2f}",
                fmt_ms(percentile(r.latencies, 50)),
                fmt_ms(percentile(r.latencies, 99)),
                str(r.wrong),
            ]
        )
    return markdown_table(header, rows)


def goals(results: list[Result]) -> str:
    rows = []
    for r in results:
        if not r.name.startswith("coalesce cached_many"):
            continue
        once = r.computed / r.missing
        rows.append(
            [f"{r.name}: ids computed / missing ids", f"{once:.2f}", "1.00", verdict(once, 1.0)]
        )
        trips = r.commands / r.pages
        rows.append(
            [
                f"{r.name}: Redis round trips per page",
                f"{trips:.2f}",
                f"<= {GOAL_ROUND_TRIPS:.0f}",
                verdict(trips, GOAL_ROUND_TRIPS),
            ]
        )
    return markdown_table(["measure", "coalesce", "goal", "result"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, noisier")
    parser.add_argument("--output", type=Path, default=None, help="where to write the tables")
    args = parser.parse_args()
    rounds = 1 if args.quick else 5
    quiet_peer_logs()
    TRIPS.install()
    with RedisServer() as server:
        cases = builders(server)
        results = {name: Result(name) for name in cases}
        for n in range(rounds):  # cases interleaved round by round
            for name, build in cases.items():
                round_of(build, seed=n, result=results[name])
    listed = list(results.values())
    text = "\n".join(
        [
            "# coalesce batch-loading benchmark (issue 12)",
            "",
            f"`{command_line()}`: {rounds} round(s) of {PAGES} concurrent pages of {PAGE_SIZE} "
            f"ids (page p: ids p*{STRIDE} ... p*{STRIDE}+{PAGE_SIZE - 1}), {CACHED:.0%} of the "
            f"ids cached before each round; the backend takes {DB_CALL * 1000:.0f} ms per call. "
            "Counts are totals over the rounds; latencies are per page over all rounds. "
            "Round trips: requests redis-py sent per page (a pipeline, a script: one; the "
            "warm-up before each round, connection handshakes and pub/sub not counted).",
            "",
            f"Environment: {environment(*PEERS)}.",
            "",
            "## Goals",
            "",
            goals(listed),
            "",
            "## All libraries",
            "",
            table(listed),
            "",
            "PASS/FAIL is information only; the script always exits 0.",
            "",
        ]
    )
    print(text)
    output = args.output or RESULTS / "batch.md"
    write_result(output, text)
    print(f"written to {output}")


if __name__ == "__main__":
    main()
