"""The demo's application: a real database, one expensive query, and the endpoint over it.

The database is real, not simulated, so that a query costs what it costs: a table of
`ROWS` order lines (generated when the server starts, in a few hundred milliseconds) and, per
item, a sales report that aggregates every line of that item. The table has no index on
`item_id`, as reporting tables often have none for the question being asked, so each query
scans all the rows: 20-30 ms of database CPU here, on SQLite or PostgreSQL alike.

* SQLite (the default, nothing to install): a file in a temporary folder, deleted at exit.
  Queries are counted by SQLite itself: each connection's trace callback is called by the
  engine for every statement it runs, and counts those that are the item query.
* PostgreSQL (`--database postgresql://...`, psycopg from the `demo` extra): a schema of
  its own, `coalesce_demo_<run id>`, dropped at exit. The query bumps a sequence of that
  schema (`nextval`, once per execution), so the count is kept by the server, exact, outside
  any transaction. (`pg_stat_statements` would do as well, but it needs a server
  restart with `shared_preload_libraries`; a sequence works on any server.)

Queries run on a pool of `pool` threads, one connection each, as a web application's
database pool does; a request that waits more than `POOL_TIMEOUT` for one gets a 503.

The application serves the same handler twice, `/unprotected/items/{id}` and, under
`coalesce.fastapi.cached`, `/cached/items/{id}`; `/demo/counters` tells the load generator
what the database and the cache did, and every response says how long it spent in the
application (`Server-Timing: app;dur=<ms>`), so the report can tell the server's share of a
request's latency from the load generator's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from coalesce import Cache

if TYPE_CHECKING:
    import psycopg

ROWS = 600_000  # order lines: enough for an aggregate over them to cost 20-30 ms
POOL_TIMEOUT = 5.0  # seconds a request may wait for a database connection
ITEM_QUERY_TAG = "/* coalesce demo: item report */"

Handler = Callable[[int], Awaitable[dict[str, Any]]]
Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The same report on both databases: one item's order lines, summed up.
ITEM_COLUMNS = ("orders", "units", "revenue_cents", "days_sold")
ITEM_AGGREGATES = (
    "count(*), coalesce(sum(quantity), 0), coalesce(sum(quantity * price_cents), 0), "
    "count(DISTINCT day)"
)


def is_postgres_url(database: str) -> bool:
    return database.startswith(("postgresql://", "postgres://"))


class Database(Protocol):
    """What the application needs from a database; both kinds below provide it."""

    kind: str  # "SQLite" or "PostgreSQL", for the report

    def item_report(self, item_id: int) -> dict[str, Any]:
        """Run the expensive query for one item (in a pool thread) and return its row."""
        ...

    def queries(self) -> int:
        """How many item queries the database has run so far, as the database counts them."""
        ...

    def close(self) -> None:
        """Close every connection and delete the data."""
        ...


def _report(item_id: int, row: tuple[Any, ...]) -> dict[str, Any]:
    return {
        "id": item_id,
        **{name: int(value) for name, value in zip(ITEM_COLUMNS, row, strict=True)},
    }


class SQLiteDatabase:
    """A generated SQLite database in a temporary folder; one connection per pool thread.

    `_counts[i]` is written only by SQLite's trace callback of connection `i`, which only the
    pool thread that owns that connection uses; `queries()` sums them between phases.
    """

    kind = "SQLite"

    def __init__(self, items: int, rows: int = ROWS) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="coalesce-demo-")
        self.path = os.path.join(self._folder.name, "demo.sqlite3")
        self._local = threading.local()
        self._lock = threading.Lock()  # guards the two lists below when a thread connects
        self._connections: list[sqlite3.Connection] = []
        self._counts: list[int] = []
        with contextlib.closing(sqlite3.connect(self.path)) as connection:
            # Rows from arithmetic, not random(): the same data, and the same answers, each run.
            connection.executescript(
                f"""
                CREATE TABLE order_lines (
                    id INTEGER PRIMARY KEY, item_id INTEGER NOT NULL,
                    quantity INTEGER NOT NULL, price_cents INTEGER NOT NULL,
                    day INTEGER NOT NULL);
                WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
                INSERT INTO order_lines (item_id, quantity, price_cents, day)
                SELECT (i * 7919) % {items}, 1 + (i * 31) % 9, 100 + (i * 37) % 9900,
                       (i * 104729) % 365
                FROM n;
                """
            )
            connection.commit()
        self._sql = f"{ITEM_QUERY_TAG} SELECT {ITEM_AGGREGATES} FROM order_lines WHERE item_id = ?"

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.path, check_same_thread=False)
            with self._lock:
                index = len(self._connections)
                self._connections.append(connection)
                self._counts.append(0)

            def count(statement: str) -> None:
                if statement.startswith(ITEM_QUERY_TAG):
                    self._counts[index] += 1

            connection.set_trace_callback(count)
            self._local.connection = connection
        return connection

    def item_report(self, item_id: int) -> dict[str, Any]:
        row = self._connection().execute(self._sql, (item_id,)).fetchone()
        return _report(item_id, row)

    def queries(self) -> int:
        with self._lock:
            return sum(self._counts)

    def close(self) -> None:
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
        self._folder.cleanup()


class PostgresDatabase:
    """The same table and query in a schema of its own on a PostgreSQL server.

    Each pool thread has its own autocommit connection; parallel query is turned off on them
    so that one query uses one server core, as under a busy production load.
    """

    kind = "PostgreSQL"

    def __init__(self, url: str, items: int, run_id: str, rows: int = ROWS) -> None:
        import psycopg
        from psycopg import sql

        self._psycopg = psycopg
        self.url = url
        self.schema = f"coalesce_demo_{run_id}"
        self._local = threading.local()
        self._lock = threading.Lock()  # guards _connections when a thread connects
        self._connections: list[psycopg.Connection[Any]] = []
        schema = sql.Identifier(self.schema)
        self._admin = psycopg.connect(url, autocommit=True, connect_timeout=5)
        try:
            self._admin.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
            self._admin.execute(
                sql.SQL(
                    "CREATE TABLE {}.order_lines (id bigint PRIMARY KEY, item_id int NOT NULL, "
                    "quantity int NOT NULL, price_cents int NOT NULL, day int NOT NULL)"
                ).format(schema)
            )
            self._admin.execute(
                sql.SQL(
                    "INSERT INTO {}.order_lines SELECT i, (i * 7919) % {}, 1 + (i * 31) % 9, "
                    "100 + (i * 37) % 9900, (i * 104729) % 365 "
                    "FROM generate_series(1::bigint, {}) AS i"
                ).format(schema, sql.Literal(items), sql.Literal(rows))
            )
            self._admin.execute(sql.SQL("ANALYZE {}.order_lines").format(schema))
            self._admin.execute(sql.SQL("CREATE SEQUENCE {}.item_queries").format(schema))
        except BaseException:
            self._drop()
            raise
        # The scalar subquery runs once per execution: the sequence counts executions.
        self._sql = sql.SQL(
            ITEM_QUERY_TAG + " SELECT " + ITEM_AGGREGATES + ", (SELECT nextval({}))"
            " FROM {}.order_lines WHERE item_id = %s"
        ).format(sql.Literal(f"{self.schema}.item_queries"), schema)
        self._count_sql = sql.SQL("SELECT last_value, is_called FROM {}.item_queries").format(
            schema
        )

    def _connection(self) -> psycopg.Connection[Any]:
        connection: psycopg.Connection[Any] | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._psycopg.connect(self.url, autocommit=True, connect_timeout=5)
            connection.execute("SET max_parallel_workers_per_gather = 0")
            connection.execute("SET statement_timeout = '30s'")
            with self._lock:
                self._connections.append(connection)
            self._local.connection = connection
        return connection

    def item_report(self, item_id: int) -> dict[str, Any]:
        row = self._connection().execute(self._sql, (item_id,)).fetchone()
        assert row is not None  # an aggregate always returns one row
        return _report(item_id, row[: len(ITEM_COLUMNS)])

    def queries(self) -> int:
        with self._lock:  # the admin connection is shared by the threads that ask
            row = self._admin.execute(self._count_sql).fetchone()
        assert row is not None
        last_value, is_called = row
        return int(last_value) if is_called else 0

    def close(self) -> None:
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
        self._drop()

    def _drop(self) -> None:
        from psycopg import sql

        if self._admin.closed:
            return  # closed already
        try:
            self._admin.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema))
            )
        finally:
            self._admin.close()


def open_database(database: str, items: int, run_id: str, rows: int = ROWS) -> Database:
    """`sqlite` (generated in a temporary folder) or a `postgresql://` URL."""
    if is_postgres_url(database):
        return PostgresDatabase(database, items, run_id, rows)
    return SQLiteDatabase(items, rows)


# ---------------------------------------------------------------------------------------
# the application


class DatabaseBusyError(Exception):
    """No pool connection became free in time: what a real pool raises under overload."""


class DatabasePool:
    """`size` threads, each with its own connection; waiting for one is bounded.

    `busy_errors` is written only on the server's event loop.
    """

    def __init__(self, db: Database, size: int) -> None:
        self.db = db
        self.size = size
        self.busy_errors = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(size, "demo-db")
        self._slots: asyncio.Semaphore | None = None  # made on the server's loop
        self._closed = False  # set by the first close()

    async def item_report(self, item_id: int) -> dict[str, Any]:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        try:
            await asyncio.wait_for(self._slots.acquire(), POOL_TIMEOUT)
        except asyncio.TimeoutError:
            self.busy_errors += 1
            raise DatabaseBusyError("no database connection free") from None
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self.db.item_report, item_id)
        finally:
            self._slots.release()

    async def queries(self) -> int:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.db.queries)

    def close(self) -> None:
        """Wait for the pool's threads, then close the database; once (later calls do nothing)."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.db.close()


def cached_counters(registry: Any) -> dict[str, int]:
    """hits, stale, misses, coalesced and computations of the routes in `registry`, so far."""
    totals = dict.fromkeys(("hits", "stale", "misses", "coalesced", "computations"), 0)
    for route in registry.snapshot()["routes"].values():
        for name in totals:
            totals[name] += int(route.get(name, 0))
    return totals


def server_timing(app: ASGIApp) -> ASGIApp:
    """Wrap `app` so that every HTTP response says how long the application took to start it.

    The time runs from the request reaching the application to its response headers:
    routing, the cache, the database; not uvicorn's parsing nor the wait in its event loop.
    """

    async def timed(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started = time.perf_counter()

        async def send_timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                took = (time.perf_counter() - started) * 1000
                headers = [
                    *message.get("headers", []),
                    (b"server-timing", f"app;dur={took:.3f}".encode()),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_timed)

    return timed


def build_app(cache: Cache, pool: DatabasePool, run_id: str, ttl: float) -> Any:
    """A FastAPI app with the same endpoint twice: unprotected, and under `@cached`.

    The cached route is what a user writes: `coalesce.fastapi.cached` under `@app.get`,
    with its own metrics registry so the demo counts only its own requests. Entries carry
    the tag `demo:<run_id>`, by which the app deletes them when it stops, so a shared Redis
    keeps nothing of the demo; then it closes the database pool, which deletes the data.
    """
    from fastapi import FastAPI, HTTPException

    from coalesce.fastapi import MetricsRegistry, cached

    tag = f"demo:{run_id}"
    registry = MetricsRegistry()

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        yield
        # Leave nothing behind in a shared store, then close its connections on this loop;
        # then the database: its connections, and its data (a file, or a schema). This must
        # happen here: uvicorn re-raises the SIGTERM it caught once it has stopped serving.
        with contextlib.suppress(Exception):
            await cache.ainvalidate_tag(tag)
        with contextlib.suppress(Exception):
            await cache.aclose()
        await asyncio.get_running_loop().run_in_executor(None, pool.close)

    app = FastAPI(title="coalesce demo", lifespan=lifespan)

    async def item_from_database(item_id: int) -> dict[str, Any]:
        try:
            return await pool.item_report(item_id)
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
        return {
            "queries": await pool.queries(),
            "busy": pool.busy_errors,
            "cpu": time.process_time(),  # seconds, this process: the app and the database
            **cached_counters(registry),
        }

    return app
