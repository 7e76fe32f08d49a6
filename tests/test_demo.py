"""`coalesce demo` end to end, as a user runs it: the console script in a subprocess.

A small load (200 requests, 20 at a time, 20 items) keeps each run to a few seconds while
still showing the point of the demo: the cached phase asks the database far less.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from redis_servers import RedisServer
from test_cli import assert_one_line_error, clean_env, run_cli

from coalesce import Cache
from coalesce.demo_load import LoadResult, ProgressBar, percentile, request_plan

SMALL = ["--requests", "200", "--concurrency", "20", "--keys", "20"]


def table_row(output: str, label: str) -> tuple[str, str]:
    """The unprotected and cached cells of one row of the demo's table."""
    match = re.search(rf"^{re.escape(label)}\s{{2,}}(.+?)\s{{2,}}(.+?)\s*$", output, re.M)
    assert match, f"no row {label!r} in:\n{output}"
    return match.group(1), match.group(2)


def number(cell: str) -> float:
    return float(cell.split()[0].replace(",", "").rstrip("%"))


def assert_queries_drop(output: str, requests: int = 200, keys: int = 20) -> None:
    before, after = (int(number(cell)) for cell in table_row(output, "database queries"))
    assert before == requests  # unprotected: one query per request
    assert 1 <= after <= keys  # cached: at most one per distinct item
    assert after * 5 <= before
    assert table_row(output, "requests") == (f"{requests:,}", f"{requests:,}")
    assert table_row(output, "errors") == ("0", "0")
    hit_ratio = table_row(output, "hit ratio")
    assert hit_ratio[0] == "-" and number(hit_ratio[1]) >= 50
    for label in ("p50 latency", "p99 latency"):
        assert all(cell.endswith(" ms") for cell in table_row(output, label))
    for label in ("coalesced followers", "wall time", "throughput"):
        table_row(output, label)
    assert "database queries 200 -> " in output


def test_demo_on_memory_shows_database_queries_drop() -> None:
    result = run_cli("demo", *SMALL, timeout=120)
    assert result.returncode == 0, result.stderr
    assert_queries_drop(result.stdout)
    assert "cache: memory://" in result.stdout
    assert "[" not in result.stderr  # no progress bar when stderr is not a terminal


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
    assert "200/200" in result.stderr
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
