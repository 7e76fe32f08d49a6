"""`coalesce demo` end to end, as a user runs it: the console script in a subprocess.

A small load (20 items: a cold start of 40 requests, then 200, 20 at a time) keeps each run
to a few seconds while still showing the point of the demo: the cached route asks the
database far less. The query counts in the report come from the database (SQLite's trace
callback, a PostgreSQL sequence: tests/test_demo_database.py); the tests assert on counts
and on the report's structure, never on timings.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from redis_servers import RedisServer
from test_cli import assert_one_line_error, clean_env, run_cli
from test_demo_database import require_postgres, schemas

from coalesce import Cache
from coalesce.demo.load import (
    LoadResult,
    ProgressBar,
    app_seconds,
    cold_start_plan,
    percentile,
    request_plan,
)
from coalesce.demo.report import CACHED, COLD, STEADY, UNPROTECTED, Phase, render, verdict


@pytest.fixture
def postgres_url() -> str:
    return require_postgres()


SMALL = ["--requests", "200", "--concurrency", "20", "--keys", "20"]


def section(output: str, title: str) -> str:
    """The block of the report that starts with `title` (up to the next blank line)."""
    match = re.search(rf"^{re.escape(title)}.*?(?=\n\n|\Z)", output, re.M | re.S)
    assert match, f"no section {title!r} in:\n{output}"
    return match.group(0)


def table_row(block: str, label: str) -> tuple[str, str]:
    """The unprotected and cached cells of one row of a table."""
    match = re.search(rf"^{re.escape(label)}\s{{2,}}(.+?)\s{{2,}}(.+?)\s*$", block, re.M)
    assert match, f"no row {label!r} in:\n{block}"
    return match.group(1), match.group(2)


def number(cell: str) -> float:
    return float(cell.split()[0].replace(",", "").rstrip("%"))


def assert_queries_drop(output: str, requests: int = 200, keys: int = 20) -> None:
    """The structure of the report and its counts (never its timings)."""
    cold = section(output, "cold start:")
    steady = section(output, "steady state:")
    # Cold start: each item once plus as many hot requests; @cached queries each item once.
    before, after = (int(number(cell)) for cell in table_row(cold, "database queries"))
    assert before == 2 * keys  # unprotected: one query per request
    assert after == keys  # @cached: one per item, however many asked for it at once
    assert table_row(cold, "requests") == (f"{2 * keys:,}", f"{2 * keys:,}")
    # Steady state: every item is cached (ttl 60 s), so no query at all.
    before, after = (int(number(cell)) for cell in table_row(steady, "database queries"))
    assert (before, after) == (requests, 0)
    assert table_row(steady, "requests") == (f"{requests:,}", f"{requests:,}")
    for block in (cold, steady):
        assert table_row(block, "errors") == ("0", "0")
        hit_ratio = table_row(block, "hit ratio")
        assert hit_ratio[0] == "-" and 0 <= number(hit_ratio[1]) <= 100
        for label in ("p50 latency", "p99 latency", "p50 time in the app"):
            assert all(cell.endswith(" ms") for cell in table_row(block, label))
        for label in ("coalesced followers", "wall time", "throughput", "CPU app / load gen."):
            table_row(block, label)
    assert number(table_row(steady, "hit ratio")[1]) == 100
    where = section(output, "where the time goes:")
    assert "load generator" in where and "in the application" in where
    total = 2 * keys + requests
    assert (
        f"result: {total:,} requests cost {keys:,} database queries with @cached "
        f"instead of {total:,}"
    ) in output
    assert f"steady state: queries {requests:,} -> 0," in output
    assert f"cold start:   queries {2 * keys:,} -> {keys:,}," in output


def test_demo_on_memory_shows_database_queries_drop() -> None:
    result = run_cli("demo", *SMALL, timeout=120)
    assert result.returncode == 0, result.stderr
    assert_queries_drop(result.stdout)
    assert "cache: memory://" in result.stdout
    assert "over SQLite (in a temporary folder)" in result.stdout
    assert "[" not in result.stderr  # no progress bar when stderr is not a terminal


def test_demo_on_postgresql(postgres_url: str) -> None:
    before = schemas(postgres_url)
    result = run_cli("demo", *SMALL, "--database", postgres_url, timeout=120)
    assert result.returncode == 0, result.stderr
    assert_queries_drop(result.stdout)
    assert "over PostgreSQL (postgresql://***@127.0.0.1:5432/" in result.stdout
    assert schemas(postgres_url) <= before  # the demo dropped the schema it made


def test_demo_database_errors_are_one_line_before_any_load() -> None:
    closed = "postgresql://postgres@127.0.0.1:1/test"
    result = run_cli("demo", "--database", closed)
    assert_one_line_error(result, "cannot connect to the database", "127.0.0.1:1")
    assert result.stdout == ""
    result = run_cli("demo", "--database", "mysql://root:secret@127.0.0.1/x")
    line = assert_one_line_error(result, "--database must be 'sqlite' or a postgresql:// URL")
    assert "secret" not in line


def test_demo_on_redis(redis_server: RedisServer, unique_namespace: str) -> None:
    result = run_cli(
        "demo", *SMALL, "--url", redis_server.url, "--namespace", unique_namespace, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert_queries_drop(result.stdout)
    assert f"cache: {redis_server.url}" in result.stdout
    # The demo deletes its entries (by tag) when it stops; the store's own bookkeeping
    # that may remain expires by itself.
    cache = Cache(redis_server.url, namespace=unique_namespace)
    client = redis_server.client()
    try:
        assert cache.keys("*") == []
        for key in client.scan_iter(match=f"{unique_namespace}:*"):
            assert client.ttl(key) > 0, key
    finally:
        client.close()
        cache.close()


def test_demo_progress_bar_can_be_forced() -> None:
    result = run_cli("demo", *SMALL, "--progress", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "unprotected" in result.stderr and "@cached" in result.stderr
    assert "40/40" in result.stderr and "200/200" in result.stderr
    assert "#" * 30 in result.stderr


def test_demo_plot_without_matplotlib_says_what_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from coalesce.cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    chart = tmp_path / "out.png"
    result = subprocess.run(
        [sys.executable, "-c", code, "demo", *SMALL, "--plot", str(chart)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert_one_line_error(result, "pip install matplotlib")
    assert result.stdout == ""  # refused before any load was sent
    assert not chart.exists()


def test_demo_plot_writes_a_png(tmp_path: Path) -> None:
    chart = tmp_path / "out.png"
    result = run_cli("demo", *SMALL, "--plot", str(chart), timeout=120)
    assert result.returncode == 0, result.stderr
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"chart written to {chart}" in result.stdout


def test_demo_refuses_a_chart_it_could_not_write_before_any_load(tmp_path: Path) -> None:
    result = run_cli("demo", *SMALL, "--plot", str(tmp_path / "missing" / "out.png"))
    assert_one_line_error(result, "--plot", "does not exist")
    assert result.stdout == ""  # refused before any load was sent


def test_demo_rejects_bad_options_and_urls() -> None:
    assert_one_line_error(run_cli("demo", "--requests", "0"), "--requests")
    assert_one_line_error(run_cli("demo", "--concurrency", "-1"), "--concurrency")
    assert_one_line_error(run_cli("demo", "--url", "ftp://x"), "unknown cache URL scheme")
    port_closed = "redis://127.0.0.1:1/0"
    assert_one_line_error(run_cli("demo", "--url", port_closed), "cannot connect")


def test_demo_uses_coalesce_url_from_the_environment() -> None:
    env = clean_env(COALESCE_URL="unknown://somewhere")
    assert_one_line_error(run_cli("demo", *SMALL, env=env), "unknown")


# ---------------------------------------------------------------------------------------
# the load generator's pieces, in process


def test_request_plan_is_skewed_and_repeatable() -> None:
    plan = request_plan(1000, 100)
    assert plan == request_plan(1000, 100)
    assert all(0 <= key < 100 for key in plan)
    hot = sum(1 for key in plan if key < 10)
    assert hot > 700  # 80% aimed at the hottest 10%, plus their share of the rest
    assert len(set(plan)) > 50  # and a long tail of colder keys


def test_cold_start_plan_asks_for_every_key_and_repeats_hot_ones() -> None:
    plan = cold_start_plan(50)
    assert plan == cold_start_plan(50)
    assert len(plan) == 100 and set(plan) == set(range(50))
    assert sum(1 for key in plan if key < 5) > 30  # hot traffic meanwhile


def test_app_seconds_reads_server_timing() -> None:
    assert app_seconds("app;dur=1.5") == 0.0015
    assert app_seconds('db;dur=3, app;desc="x";dur=250') == 0.25
    assert app_seconds("") is None
    assert app_seconds("app;dur=oops") is None
    assert app_seconds("other;dur=2") is None


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([], 50) == 0.0
    result = LoadResult("x", 3, latencies=[0.3, 0.1, 0.2], wall=1.0)
    assert result.p(50) == 0.2
    assert result.throughput == 3.0


def test_progress_bar_draws_only_when_enabled(tmp_path: Path) -> None:
    path = tmp_path / "bar.txt"
    with path.open("w") as stream:
        quiet = ProgressBar(10, "x", enabled=False, stream=stream)
        quiet.advance(10)
        quiet.close()
    assert path.read_text() == ""
    with path.open("w") as stream:
        bar = ProgressBar(10, "phase", enabled=True, stream=stream)
        for _ in range(10):
            bar.advance()
        bar.close()
    text = path.read_text()
    assert "phase" in text and "10/10" in text and text.endswith("\n")


# ---------------------------------------------------------------------------------------
# the report, from made-up measurements


def phases(cached_p99_cold: float, cached_p99_steady: float) -> list[Phase]:
    def load(p: float, planned: int) -> LoadResult:
        return LoadResult("x", planned, latencies=[p] * planned, app_times=[p / 2], wall=1.0)

    return [
        Phase(UNPROTECTED, COLD, load(0.5, 40), 40),
        Phase(UNPROTECTED, STEADY, load(0.5, 200), 200),
        Phase(CACHED, COLD, load(cached_p99_cold, 40), 20, hit_ratio=0.25, coalesced=5),
        Phase(CACHED, STEADY, load(cached_p99_steady, 200), 0, hit_ratio=1.0, coalesced=0),
    ]


def test_report_says_what_did_not_improve() -> None:
    good = verdict(phases(0.2, 0.02))
    assert good[0] == (
        "result: 240 requests cost 20 database queries with @cached instead of 240 "
        "(92% fewer, 12.0x)"
    )
    assert not any(line.startswith("note:") for line in good)
    bad = verdict(phases(0.6, 0.7))
    notes = [line for line in bad if line.startswith("note:")]
    assert len(notes) == 2
    assert notes[0].startswith("note: in the steady state, @cached did not lower the p50")
    assert notes[1].startswith("note: in the cold start, @cached did not lower the p50")
    assert "first request" in notes[1]


def test_report_has_both_parts_and_explains_the_latency() -> None:
    text = render(phases(0.2, 0.02), cores=2)
    cold, steady = section(text, "cold start:"), section(text, "steady state:")
    assert table_row(cold, "database queries") == ("40", "20")
    assert table_row(steady, "database queries") == ("200", "0")
    assert table_row(steady, "p50 latency") == ("500 ms", "20.0 ms")
    assert "2 cores" in section(text, "where the time goes:")
