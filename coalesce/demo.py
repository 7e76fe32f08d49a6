"""`coalesce demo`: watch a slow endpoint's database load drop under `@cached`.

The demo starts a real FastAPI application on uvicorn (loopback, a free port, in a process
of its own: `coalesce.demo_server`) with one expensive endpoint, served twice:

* `/unprotected/items/{item_id}` asks the simulated database on every request;
* `/cached/items/{item_id}` is the same handler under `coalesce.fastapi.cached`, so identical
  concurrent requests share one query and later ones are served from the cache.

The database is simulated but behaves like a real one under load: every query takes 20-50 ms
and holds one of a small pool of connections, so requests queue once the pool is busy, and a
request that waits too long for a connection fails. It counts its queries.

The load (`coalesce.demo_load`) is the same list of requests for both phases: bounded in
count and time, `--concurrency` at a time, most of them on a few hot keys. It runs in this
process and the server in another, so neither takes CPU time from the other and the numbers
describe the server. The result is a before/after table; `--plot out.png` draws it. No
setup is needed; `--url redis://...` puts the cache in Redis instead of memory.

This module is imported to build the command line's parser, so it imports the web stack
(FastAPI, uvicorn, httpx) only inside the functions that use it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from coalesce import Cache

if TYPE_CHECKING:
    from coalesce.demo_load import LoadResult

DEFAULT_REQUESTS = 2000
DEFAULT_CONCURRENCY = 50
DEFAULT_KEYS = 200
DEFAULT_POOL = 10
DEFAULT_TTL = 60.0
DEFAULT_TIME_LIMIT = 60.0
QUERY_SECONDS = (0.020, 0.050)
POOL_TIMEOUT = 5.0

Handler = Callable[[int], Awaitable[dict[str, Any]]]


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's own options (the cache's `--url` and `--namespace` are shared)."""
    parser.add_argument(
        "--requests", type=int, default=DEFAULT_REQUESTS, help="requests per phase (2000)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="requests in flight (50)"
    )
    parser.add_argument(
        "--keys", type=int, default=DEFAULT_KEYS, help="distinct items; 10%% of them are hot (200)"
    )
    parser.add_argument(
        "--pool", type=int, default=DEFAULT_POOL, help="database connection pool size (10)"
    )
    parser.add_argument(
        "--ttl", type=float, default=DEFAULT_TTL, help="seconds a cached item stays fresh (60)"
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=DEFAULT_TIME_LIMIT,
        help="seconds each phase may send requests; the rest count as errors (60)",
    )
    parser.add_argument(
        "--plot", metavar="FILE.png", help="write a chart of latency and database queries"
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: only when stderr is a terminal)",
    )


# ---------------------------------------------------------------------------------------
# the simulated database


class DatabaseBusyError(Exception):
    """No pool connection became free in time: what a real pool raises under overload."""


class SlowDatabase:
    """A database that takes 20-50 ms a query on one of `pool` connections, and counts.

    Its counters are written only on the server's event loop; the demo reads them between
    phases, when no request is running.
    """

    def __init__(self, pool: int, *, seed: int = 11) -> None:
        self.pool_size = pool
        self.queries = 0  # queries answered
        self.busy_errors = 0  # requests that found no free connection in time
        self._rng = random.Random(seed)
        self._pool: asyncio.Semaphore | None = None  # made on the server's loop

    async def fetch_item(self, item_id: int) -> dict[str, Any]:
        if self._pool is None:
            self._pool = asyncio.Semaphore(self.pool_size)
        try:
            await asyncio.wait_for(self._pool.acquire(), POOL_TIMEOUT)
        except asyncio.TimeoutError:
            self.busy_errors += 1
            raise DatabaseBusyError("no database connection free") from None
        try:
            self.queries += 1
            await asyncio.sleep(self._rng.uniform(*QUERY_SECONDS))
        finally:
            self._pool.release()
        return {
            "id": item_id,
            "name": f"item {item_id}",
            "price_cents": 100 + (item_id * 37) % 9900,
            "in_stock": item_id % 7 != 0,
        }


# ---------------------------------------------------------------------------------------
# the application


def cached_counters(registry: Any) -> dict[str, int]:
    """hits, stale, misses, coalesced and computations of the routes in `registry`, so far."""
    totals = dict.fromkeys(("hits", "stale", "misses", "coalesced", "computations"), 0)
    for route in registry.snapshot()["routes"].values():
        for name in totals:
            totals[name] += int(route.get(name, 0))
    return totals


def build_app(cache: Cache, db: SlowDatabase, run_id: str, ttl: float) -> Any:
    """A FastAPI app with the same endpoint twice: unprotected, and under `@cached`.

    The cached route is what a user writes: `coalesce.fastapi.cached` under `@app.get`,
    with its own metrics registry so the demo counts only its own requests.
    `GET /demo/counters` tells the load generator how many queries the database answered
    and what the cache did. Entries carry the tag `demo:<run_id>`, by which the app deletes
    them when it stops, so a shared Redis keeps nothing of the demo.
    """
    from fastapi import FastAPI, HTTPException

    from coalesce.fastapi import MetricsRegistry, cached

    tag = f"demo:{run_id}"
    registry = MetricsRegistry()

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        yield
        # Leave nothing behind in a shared store, then close its connections on this loop.
        with contextlib.suppress(Exception):
            await cache.ainvalidate_tag(tag)
        with contextlib.suppress(Exception):
            await cache.aclose()

    app = FastAPI(title="coalesce demo", lifespan=lifespan)

    async def item_from_database(item_id: int) -> dict[str, Any]:
        try:
            return await db.fetch_item(item_id)
        except DatabaseBusyError as exc:
            raise HTTPException(503, str(exc)) from None

    @app.get("/unprotected/items/{item_id}")
    async def unprotected_item(item_id: int) -> dict[str, Any]:
        return await item_from_database(item_id)

    # What a user writes: `@cached(...)` under `@app.get(...)`. (Named first only so that
    # the type checker knows the decorator keeps the handler's type.)
    cache_route: Callable[[Handler], Handler] = cached(
        ttl=ttl, cache=cache, key=f"demo:{run_id}:item:{{item_id}}", tags=[tag], registry=registry
    )

    @app.get("/cached/items/{item_id}")
    @cache_route
    async def cached_item(item_id: int) -> dict[str, Any]:
        return await item_from_database(item_id)

    @app.get("/demo/counters")
    async def counters() -> dict[str, Any]:
        return {"queries": db.queries, "busy": db.busy_errors, **cached_counters(registry)}

    return app


# ---------------------------------------------------------------------------------------
# running it


@dataclass
class Phase:
    """One phase's numbers: the client's view (`load`) and the server's (`queries`...)."""

    name: str
    load: LoadResult
    queries: int
    hit_ratio: float | None = None
    coalesced: int | None = None


def _check_options(args: argparse.Namespace) -> None:
    from coalesce.cli_remote import CliError

    for name, low, high in (
        ("requests", 1, 1_000_000),
        ("concurrency", 1, 1_000),
        ("keys", 1, 1_000_000),
        ("pool", 1, 1_000),
    ):
        value = getattr(args, name)
        if not low <= value <= high:
            raise CliError(f"--{name} must be between {low:,} and {high:,}, not {value}")
    if not 0 < args.ttl <= 86_400 or not 0 < args.time_limit <= 3_600:
        raise CliError("--ttl must be in (0, 86400] and --time-limit in (0, 3600] seconds")


def _check_writable(path: str) -> None:
    """A `CliError` now, not after the whole load, if the chart could not be written there."""
    from coalesce.cli_remote import CliError

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise CliError(f"--plot {path!r}: the folder {folder!r} does not exist or is not writable")


def _import_pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or a one-line error saying what to do."""
    from coalesce.cli_remote import CliError

    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise CliError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def _import_web_stack() -> None:
    from coalesce.cli_remote import CliError

    for module in ("fastapi", "uvicorn", "httpx"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise CliError(
                f"the demo needs {module}, which the 'fastapi' extra installs: "
                "pip install 'coalesce-cache[fastapi]'"
            ) from None


def run_demo(args: argparse.Namespace) -> int:
    """Run both phases against a fresh app and print the table; return the exit code."""
    _check_options(args)
    _import_web_stack()  # before the modules that import it: a missing extra is named

    from coalesce.cli_remote import RedisTarget, resolve_url
    from coalesce.demo_load import request_plan
    from coalesce.demo_server import ServerProcess
    from coalesce.urls import redact

    pyplot = _import_pyplot() if args.plot else None
    if args.plot:
        _check_writable(args.plot)
    url = resolve_url(args)
    if not url.startswith("memory:"):
        Cache(url, namespace=args.namespace)  # an unknown scheme fails here, in one line
        target = RedisTarget(url, args.namespace, args.timeout)
        try:
            target.ping()  # unreachable or wrong password: say so now, not after the load
        finally:
            target.close()
    progress = sys.stderr.isatty() if args.progress is None else bool(args.progress)
    plan = request_plan(args.requests, args.keys)

    hot = max(1, args.keys // 10)
    print(
        f"coalesce demo: a FastAPI endpoint over a slow database "
        f"({QUERY_SECONDS[0] * 1000:.0f}-{QUERY_SECONDS[1] * 1000:.0f} ms a query, "
        f"pool of {args.pool})"
    )
    print(
        f"load: {args.requests:,} requests per phase, {args.concurrency} at a time, "
        f"{args.keys:,} items (80% of requests on the {hot:,} hottest); cache: {redact(url)}"
    )
    server = ServerProcess(url, args.namespace, pool=args.pool, ttl=args.ttl)
    with server:
        print(f"app:  {server.url}  (uvicorn on loopback, in its own process)", flush=True)
        before, after = asyncio.run(_run_phases(server.url, plan, args, progress))
    print()
    print(render_table(before, after))
    print()
    print(summary(before, after))
    if pyplot is not None:
        write_plot(pyplot, args.plot, before, after)
        print(f"chart written to {args.plot}")
    return 0


async def _run_phases(
    base_url: str, plan: list[int], args: argparse.Namespace, progress: bool
) -> tuple[Phase, Phase]:
    """The same requests to the unprotected route, then to the cached one; what each did."""
    import httpx

    from coalesce.demo_load import run_load

    phases: list[Phase] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as admin:

        async def counters() -> dict[str, int]:
            response = await admin.get("/demo/counters")
            response.raise_for_status()
            answer: dict[str, int] = response.json()
            return answer

        for name, prefix in (("unprotected", "/unprotected"), ("@cached", "/cached")):
            paths = [f"{prefix}/items/{item_id}" for item_id in plan]
            before = await counters()
            load = await run_load(
                base_url,
                paths,
                label=name,
                concurrency=args.concurrency,
                time_limit=args.time_limit,
                progress=progress,
            )
            after = await counters()
            delta = {field: after[field] - before[field] for field in after}
            phase = Phase(name, load, delta["queries"])
            if prefix == "/cached":
                served = delta["hits"] + delta["stale"] + delta["misses"] + delta["coalesced"]
                phase.hit_ratio = (delta["hits"] + delta["stale"]) / served if served else 0.0
                phase.coalesced = delta["coalesced"]
            phases.append(phase)
    return phases[0], phases[1]


# ---------------------------------------------------------------------------------------
# reporting


def render_table(before: Phase, after: Phase) -> str:
    """The before/after table, one measure per line."""

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:,.1f} ms"

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    def count(value: int | None) -> str:
        return "-" if value is None else f"{value:,}"

    rows = [
        ("requests", f"{before.load.planned:,}", f"{after.load.planned:,}"),
        ("database queries", f"{before.queries:,}", f"{after.queries:,}"),
        ("p50 latency", ms(before.load.p(50)), ms(after.load.p(50))),
        ("p99 latency", ms(before.load.p(99)), ms(after.load.p(99))),
        ("errors", f"{before.load.errors:,}", f"{after.load.errors:,}"),
        ("hit ratio", ratio(before.hit_ratio), ratio(after.hit_ratio)),
        ("coalesced followers", count(before.coalesced), count(after.coalesced)),
        (
            "throughput",
            f"{before.load.throughput:,.0f} req/s",
            f"{after.load.throughput:,.0f} req/s",
        ),
        ("wall time", f"{before.load.wall:.2f} s", f"{after.load.wall:.2f} s"),
    ]
    label_width = max(len(row[0]) for row in rows)
    width = max(14, *(len(cell) for row in rows for cell in row[1:]))
    lines = [f"{'':<{label_width}}  {before.name:>{width}}  {after.name:>{width}}"]
    lines.append("-" * len(lines[0]))
    lines += [f"{label:<{label_width}}  {b:>{width}}  {a:>{width}}" for label, b, a in rows]
    return "\n".join(lines)


def summary(before: Phase, after: Phase) -> str:
    """One sentence with the headline numbers."""
    fewer = before.queries / after.queries if after.queries else float("inf")
    factor = "all" if after.queries == 0 else f"{fewer:.1f}x fewer"
    return (
        f"database queries {before.queries:,} -> {after.queries:,} ({factor}); "
        f"p99 latency {before.load.p(99) * 1000:,.1f} ms -> {after.load.p(99) * 1000:,.1f} ms"
    )


def write_plot(pyplot: Any, path: str, before: Phase, after: Phase) -> None:
    """Two panels: latency percentiles, and database queries, before and after."""
    from coalesce.cli_remote import CliError

    figure, (latency, queries) = pyplot.subplots(1, 2, figsize=(10, 4))
    percentiles = (50, 90, 99)
    width = 0.38
    for offset, phase, color in ((-width / 2, before, "#d62728"), (width / 2, after, "#2ca02c")):
        positions = [i + offset for i in range(len(percentiles))]
        values = [phase.load.p(q) * 1000 for q in percentiles]
        latency.bar(positions, values, width, label=phase.name, color=color)
    latency.set_xticks(range(len(percentiles)), [f"p{q}" for q in percentiles])
    latency.set_ylabel("latency (ms)")
    latency.set_title("request latency")
    latency.legend()
    queries.bar(
        [before.name, after.name], [before.queries, after.queries], color=["#d62728", "#2ca02c"]
    )
    queries.set_ylabel("queries")
    queries.set_title(f"database queries for {before.load.planned:,} requests")
    figure.suptitle("coalesce demo: the same endpoint, unprotected and @cached")
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=100)
    except OSError as exc:
        raise CliError(f"cannot write the chart to {path!r}: {exc.strerror or exc}") from exc
    finally:
        pyplot.close(figure)
