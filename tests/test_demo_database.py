"""The demo's databases: the same data and answers on SQLite and PostgreSQL, counted by them.

The PostgreSQL tests use the server on 127.0.0.1:5432 (`COALESCE_TEST_POSTGRES_URL` names
another) and are never skipped: without it they fail and say so. Each test works in a schema
of its own, `coalesce_demo_<random>`, which the database object drops when it closes.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from coalesce.demo.app import (
    ITEM_QUERY_TAG,
    DatabasePool,
    PostgresDatabase,
    SQLiteDatabase,
    open_database,
)

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
ROWS = 20_000  # small: these tests check counts and answers, not cost
ITEMS = 10


def require_postgres() -> str:
    """The test server's URL, or a failure that says what is missing."""
    url = os.environ.get("COALESCE_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL
    try:
        psycopg.connect(url, connect_timeout=5).close()
    except psycopg.Error as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {url} ({' '.join(str(exc).split())}): the demo's "
            "PostgreSQL tests need it; start it (trust auth, database 'test') or set "
            "COALESCE_TEST_POSTGRES_URL",
            pytrace=False,
        )
    return url


def schemas(url: str) -> set[str]:
    """The demo's schemas on that server now."""
    with psycopg.connect(url, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'coalesce_demo_%'"
        ).fetchall()
    return {row[0] for row in rows}


@pytest.fixture
def postgres_url() -> str:
    return require_postgres()


@pytest.fixture
def postgres_db(postgres_url: str) -> Iterator[PostgresDatabase]:
    db = PostgresDatabase(postgres_url, ITEMS, f"t{uuid.uuid4().hex[:12]}", rows=ROWS)
    try:
        yield db
    finally:
        db.close()
    assert db.schema not in schemas(postgres_url)


@pytest.fixture
def sqlite_db() -> Iterator[SQLiteDatabase]:
    db = SQLiteDatabase(ITEMS, rows=ROWS)
    try:
        yield db
    finally:
        db.close()
    assert not os.path.exists(db.path)


def expected_report(item_id: int) -> dict[str, int]:
    """The report computed in Python from the same arithmetic that generates the rows."""
    lines = [i for i in range(1, ROWS + 1) if (i * 7919) % ITEMS == item_id]
    return {
        "id": item_id,
        "orders": len(lines),
        "units": sum(1 + (i * 31) % 9 for i in lines),
        "revenue_cents": sum((1 + (i * 31) % 9) * (100 + (i * 37) % 9900) for i in lines),
        "days_sold": len({(i * 104729) % 365 for i in lines}),
    }


def test_sqlite_answers_and_counts_its_own_queries(sqlite_db: SQLiteDatabase) -> None:
    assert sqlite_db.queries() == 0
    assert sqlite_db.item_report(3) == expected_report(3)
    assert sqlite_db.item_report(ITEMS + 5)["orders"] == 0  # no such item: zeros, not None
    assert sqlite_db.queries() == 2
    # The count is SQLite's: the trace callback sees every statement the engine runs on the
    # connection, whoever sends it, and counts only the item query.
    connection = sqlite_db._connection()
    connection.execute("SELECT count(*) FROM order_lines").fetchone()
    assert sqlite_db.queries() == 2
    connection.execute(f"{ITEM_QUERY_TAG} SELECT 1").fetchone()
    assert sqlite_db.queries() == 3


def test_sqlite_counts_across_pool_threads(sqlite_db: SQLiteDatabase) -> None:
    threads = [
        threading.Thread(target=lambda: [sqlite_db.item_report(i) for i in range(5)])
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sqlite_db.queries() == 20


def test_postgresql_answers_as_sqlite_does_and_counts_on_the_server(
    postgres_db: PostgresDatabase, postgres_url: str
) -> None:
    assert postgres_db.queries() == 0
    assert postgres_db.item_report(3) == expected_report(3)
    assert postgres_db.item_report(7) == expected_report(7)
    assert postgres_db.queries() == 2
    # The count lives in the server (a sequence the query bumps): a query sent on another
    # connection, by another client, counts too; other statements do not.
    with psycopg.connect(postgres_url, autocommit=True) as other:
        other.execute(postgres_db._sql, (1,)).fetchone()
        other.execute(f"SELECT count(*) FROM {postgres_db.schema}.order_lines").fetchone()
    assert postgres_db.queries() == 3


async def test_pool_runs_queries_on_its_threads(sqlite_db: SQLiteDatabase) -> None:
    import asyncio

    pool = DatabasePool(sqlite_db, 3)
    try:
        reports = await asyncio.gather(*(pool.item_report(i % ITEMS) for i in range(12)))
        assert [r["id"] for r in reports] == [i % ITEMS for i in range(12)]
        assert await pool.queries() == 12
    finally:
        pool.close()
        pool.close()  # a second close does nothing
    assert not os.path.exists(sqlite_db.path)  # closing the pool closed the database


def test_open_database_picks_by_url(postgres_url: str) -> None:
    db = open_database("sqlite", ITEMS, "x", rows=100)
    try:
        assert isinstance(db, SQLiteDatabase)
    finally:
        db.close()
    db = open_database(postgres_url, ITEMS, f"t{uuid.uuid4().hex[:12]}", rows=100)
    try:
        assert isinstance(db, PostgresDatabase)
        assert db.kind == "PostgreSQL"
    finally:
        db.close()
