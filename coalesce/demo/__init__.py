"""`coalesce demo`: watch a slow endpoint's database load drop under `@cached`.

The demo starts a real FastAPI application on uvicorn (loopback, a free port, in a process
of its own: `server.py`) over a real database (`app.py`): SQLite by default, generated at
start in a temporary folder, or PostgreSQL with `--database postgresql://...`. Its one
expensive endpoint aggregates an item's sales over a few hundred thousand rows (20-30 ms of
database CPU a query) and is served twice:

* `/unprotected/items/{item_id}` asks the database on every request;
* `/cached/items/{item_id}` is the same handler under `coalesce.fastapi.cached`, so identical
  concurrent requests share one query and later ones are served from the cache.

The load (`load.py`) runs in this process, in two parts, the same for both routes:

* the cold start: the first pass over the items, each one asked for once, mixed with hot
  traffic; with `@cached` the cache starts empty, so every item still costs one query;
* the steady state: `--requests` requests, `--concurrency` at a time, 80% of them on the
  10% hottest items, once the cache holds them.

Reporting both keeps the result honest: a cache does not make a first request cheaper, and
its benefit is the steady state. The report (`report.py`) also says where the remaining
latency goes: every response carries the time it spent in the application, and the CPU
each process used is measured, so a cached request's latency that is mostly the load
generator's own work (both processes share this machine's cores) is shown as such.
`--plot out.png` draws the result; `--url redis://...` puts the cache in Redis.

This module is imported to build the command line's parser, so it imports the web stack
(FastAPI, uvicorn, httpx) and the database drivers only inside the functions that use them.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

from coalesce import Cache

if TYPE_CHECKING:
    from coalesce.demo.report import Phase

DEFAULT_REQUESTS = 600
DEFAULT_CONCURRENCY = 50
DEFAULT_KEYS = 100
DEFAULT_POOL = 10
DEFAULT_TTL = 60.0
DEFAULT_TIME_LIMIT = 60.0
DEFAULT_DATABASE = "sqlite"

__all__ = ["add_demo_arguments", "run_demo"]


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's own options (the cache's `--url` and `--namespace` are shared)."""
    parser.add_argument(
        "--requests",
        type=int,
        default=DEFAULT_REQUESTS,
        help="requests per route in the steady state (600)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="requests in flight (50)"
    )
    parser.add_argument(
        "--keys", type=int, default=DEFAULT_KEYS, help="distinct items; 10%% of them are hot (100)"
    )
    parser.add_argument(
        "--database",
        default=DEFAULT_DATABASE,
        metavar="sqlite|postgresql://...",
        help="where the data lives: SQLite in a temporary folder (default), or a PostgreSQL "
        "database, in a schema the demo creates and drops",
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
        help="seconds each part may send requests; the rest count as errors (60)",
    )
    parser.add_argument(
        "--plot", metavar="FILE.png", help="write a chart of database queries and latency"
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: only when stderr is a terminal)",
    )


def _check_options(args: argparse.Namespace) -> None:
    from coalesce.cli.remote import CliError

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
    from coalesce.cli.remote import CliError

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise CliError(f"--plot {path!r}: the folder {folder!r} does not exist or is not writable")


def _import_pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or a one-line error saying what to do."""
    from coalesce.cli.remote import CliError

    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise CliError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def _import_web_stack() -> None:
    from coalesce.cli.remote import CliError

    for module in ("fastapi", "uvicorn", "httpx"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise CliError(
                f"the demo needs {module}, which the 'fastapi' extra installs: "
                "pip install 'coalesce-cache[fastapi]'"
            ) from None


def _check_database(database: str) -> None:
    """`sqlite`, or a PostgreSQL server we can reach now (not after the load), with psycopg."""
    from coalesce.cli.remote import CliError
    from coalesce.demo.app import is_postgres_url
    from coalesce.urls import credentials, redact

    if database == "sqlite":
        return
    if not is_postgres_url(database):
        raise CliError(
            f"--database must be 'sqlite' or a postgresql:// URL, not {redact(database)!r}"
        )
    try:
        psycopg = importlib.import_module("psycopg")
    except ImportError:
        raise CliError(
            "--database postgresql://... needs psycopg, which the 'demo' extra installs: "
            "pip install 'coalesce-cache[demo]'"
        ) from None
    try:
        psycopg.connect(database, connect_timeout=5).close()
    except psycopg.Error as exc:
        secret = credentials(database)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if secret:
            reason = reason.replace(secret, "***")
        raise CliError(f"cannot connect to the database {redact(database)}: {reason}") from None


def run_demo(args: argparse.Namespace) -> int:
    """Run both parts on both routes of a fresh app and print the report; the exit code."""
    _check_options(args)
    _import_web_stack()  # before the modules that import it: a missing extra is named
    _check_database(args.database)

    from coalesce.cli.remote import RedisTarget, resolve_url
    from coalesce.demo import report
    from coalesce.demo.app import ROWS
    from coalesce.demo.load import cold_start_plan, request_plan
    from coalesce.demo.server import ServerProcess
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
    plans = {
        report.COLD: cold_start_plan(args.keys),
        report.STEADY: request_plan(args.requests, args.keys),
    }
    hot = max(1, args.keys // 10)
    kind = "PostgreSQL" if args.database != "sqlite" else "SQLite"
    where = redact(args.database) if args.database != "sqlite" else "in a temporary folder"
    print(
        f"coalesce demo: a FastAPI endpoint over {kind} ({where}): per item, a sales "
        f"report that aggregates {ROWS:,} order lines; a pool of {args.pool} connections"
    )
    print(
        f"load: cold start {len(plans[report.COLD]):,} requests (each of {args.keys:,} items "
        f"once, mixed with hot traffic), then steady state {args.requests:,} requests; "
        f"{args.concurrency} at a time, 80% on the {hot:,} hottest items; cache: {redact(url)}"
    )
    server = ServerProcess(
        url,
        args.namespace,
        database=args.database,
        items=args.keys,
        pool=args.pool,
        ttl=args.ttl,
    )
    with server:
        print(
            f"app:  {server.url}  (uvicorn on loopback, in its own process; "
            f"{os.cpu_count() or 1} CPU cores shared with this load generator)",
            flush=True,
        )
        phases = asyncio.run(_run_phases(server.url, plans, args, progress))
    print()
    print(report.render(phases, cores=os.cpu_count() or 1))
    if pyplot is not None:
        report.write_plot(pyplot, args.plot, phases, database=kind)
        print(f"chart written to {args.plot}")
    return 0


async def _run_phases(
    base_url: str, plans: dict[str, list[int]], args: argparse.Namespace, progress: bool
) -> list[Phase]:
    """Each route in turn (unprotected, then @cached): its cold start, then its steady state."""
    import httpx

    from coalesce.demo.load import run_load
    from coalesce.demo.report import Phase

    phases: list[Phase] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as admin:

        async def counters() -> dict[str, float]:
            response = await admin.get("/demo/counters")
            response.raise_for_status()
            answer: dict[str, float] = response.json()
            return answer

        for route, prefix in (("unprotected", "/unprotected"), ("@cached", "/cached")):
            for part, plan in plans.items():
                paths = [f"{prefix}/items/{item_id}" for item_id in plan]
                before = await counters()
                load = await run_load(
                    base_url,
                    paths,
                    label=f"{route} {part}",
                    concurrency=args.concurrency,
                    time_limit=args.time_limit,
                    progress=progress,
                )
                after = await counters()
                delta = {field: after[field] - before[field] for field in after}
                phase = Phase(route, part, load, int(delta["queries"]), app_cpu=delta["cpu"])
                if prefix == "/cached":
                    served = delta["hits"] + delta["stale"] + delta["misses"] + delta["coalesced"]
                    hits = delta["hits"] + delta["stale"]
                    phase.hit_ratio = hits / served if served else 0.0
                    phase.coalesced = int(delta["coalesced"])
                phases.append(phase)
    return phases
