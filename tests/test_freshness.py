"""Expiry without stampedes or outages (issue 11): the injected clock, `jitter`,
`stale_if_error`, `timeout`, `early_refresh`, and background work ended by `close`.

Time moves by `Cache(clock=...)` wherever the memory store decides; computations are held
by events, not sleeps. Real time appears only where the thing tested is real time passing
across processes (Redis) or under load (early refresh), always short and bounded.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from coalesce import Cache, CoalesceError, CoalesceTimeout, ConfigurationError
from coalesce.entry import Entry, Freshness, decide, refresh_moment, retry_entry

ROOT = Path(__file__).resolve().parent.parent


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(clock: FakeClock) -> Iterator[Cache]:
    made = Cache(clock=clock)
    yield made
    made.close()


class Source:
    """A data source that can be told to fail, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.failing = False
        self.version = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.failing:
            raise ConnectionError("the database is down")
        self.version += 1
        return f"v{self.version}"


# -- the pure decision ----------------------------------------------------------------------


def test_decide_covers_every_state_of_an_entry() -> None:
    entry = Entry("v", created=100.0, ttl=10.0, stale_ttl=5.0, compute_time=1.0)
    assert decide(entry, 105.0) is Freshness.FRESH
    assert decide(entry, 111.0) is Freshness.STALE
    assert decide(entry, 116.0) is Freshness.EXPIRED
    # XFetch, drawn once: a draw near 1 (-ln(1 - u) large) refreshes early, near 0 only one
    # computation ahead of the expiry
    early = refresh_moment(entry, 1.0, lambda: 0.999999)
    assert decide(entry, 105.0, refresh_at=early) is Freshness.EARLY
    late = refresh_moment(entry, 1.0, lambda: 0.0)
    assert late == 109.0
    assert decide(entry, 105.0, refresh_at=late) is Freshness.FRESH
    assert decide(entry, 109.0, refresh_at=late) is Freshness.EARLY
    # without compute time there is nothing to refresh ahead of
    instant = Entry("v", created=100.0, ttl=10.0)
    moment = refresh_moment(instant, 1.0, lambda: 0.999999)
    assert decide(instant, 109.9, refresh_at=moment) is Freshness.FRESH


def test_early_refresh_probability_grows_as_expiry_nears() -> None:
    entry = Entry("v", created=0.0, ttl=100.0, compute_time=2.0)
    draws = [i / 1000 for i in range(1000)]

    def early_share(now: float) -> float:
        moments = [refresh_moment(entry, 1.0, lambda u=u: u) for u in draws]
        early = [decide(entry, now, refresh_at=m) is Freshness.EARLY for m in moments]
        return sum(early) / len(early)

    # XFetch's probabilities for a read one computation (2 s) later
    far, near, nearer = early_share(78.0), early_share(95.0), early_share(97.5)
    assert far == 0.0  # 20 s ahead of a 2 s computation: exp(-10) is below 1/1000
    assert 0.15 < near < 0.35  # exp(-3 / 2) = 0.22
    assert nearer > 0.7  # exp(-0.5 / 2) = 0.78


def test_a_retry_entry_never_stretches_the_stale_if_error_window() -> None:
    first = Entry("v", created=0.0, ttl=10.0, stale_if_error=30.0)
    retry = retry_entry(first, now=20.0)
    assert (retry.value, retry.fresh_until) == ("v", 21.0)
    assert retry.kept_until == first.kept_until == 40.0
    last = retry_entry(first, now=39.5)
    assert last.fresh_until == 40.0 and last.kept_until == 40.0
    assert not Entry("v", created=0.0, ttl=10.0, stale_if_error=30.0).usable_on_error(40.0)


# -- the injected clock ---------------------------------------------------------------------


def test_entries_expire_by_the_injected_clock_without_sleeping(
    cache: Cache, clock: FakeClock
) -> None:
    source = Source()

    @cache.cached(ttl=60)
    def load() -> str:
        return source()

    assert load() == "v1"
    clock.advance(59.9)
    assert load() == "v1"
    assert cache.get_entry(load.key()) is not None
    clock.advance(0.2)
    assert load() == "v2"
    assert source.calls == 2
    assert cache.keys() == [load.key()]


def test_get_or_set_and_get_follow_the_injected_clock(cache: Cache, clock: FakeClock) -> None:
    assert cache.get_or_set("k", lambda: "a", ttl=5, stale_ttl=5) == "a"
    clock.advance(6)
    assert cache.get("k") == "a"  # stale, still served
    clock.advance(5)
    assert cache.get("k", "gone") == "gone"
    assert cache.get_or_set("k", lambda: "b", ttl=5) == "b"


def test_a_clock_is_refused_for_redis_and_must_be_callable(redis_url: str) -> None:
    with pytest.raises(ConfigurationError, match="memory store only"):
        Cache(redis_url, clock=lambda: 0.0)
    with pytest.raises(ConfigurationError, match="clock must be a function"):
        Cache(clock=42)  # type: ignore[arg-type]


# -- jitter -----------------------------------------------------------------------------------


def test_jitter_spreads_ttls_over_the_documented_range(cache: Cache) -> None:
    @cache.cached(ttl=100, jitter=0.2, key="item:{n}")
    def item(n: int) -> int:
        return n

    for n in range(500):
        item(n)
    ttls = []
    for n in range(500):
        entry = cache.get_entry(f"item:{n}")
        assert entry is not None and entry.ttl is not None
        ttls.append(entry.ttl)
    assert all(80.0 <= ttl <= 100.0 for ttl in ttls)
    assert min(ttls) < 82.0 and max(ttls) > 98.0  # spread over the range, not one value
    assert len({round(ttl, 6) for ttl in ttls}) > 450
    assert cache.set("x", 1, ttl=100, jitter=0.5)
    set_entry = cache.get_entry("x")
    assert set_entry is not None and 50.0 <= (set_entry.ttl or 0) <= 100.0


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"jitter": 1.0}, "jitter"),
        ({"jitter": -0.1}, "jitter"),
        ({"jitter": True}, "jitter"),
        ({"stale_if_error": -1}, "stale_if_error"),
        ({"stale_if_error": math.nan}, "stale_if_error"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": "1"}, "timeout"),
        ({"early_refresh": "yes"}, "early_refresh"),
        ({"early_refresh": 0}, "early_refresh"),
        ({"early_refresh": 1000}, "early_refresh"),
    ],
)
def test_bad_freshness_options_name_the_option(
    cache: Cache, options: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigurationError, match=named):
        cache.cached(**options)
    with pytest.raises(ConfigurationError, match=named):
        cache.get_or_set("k", lambda: 1, **options)


# -- stale_if_error ---------------------------------------------------------------------------


def test_stale_if_error_serves_the_last_value_and_retries_about_once_a_second(
    cache: Cache, clock: FakeClock
) -> None:
    source = Source()

    @cache.cached(ttl=10, stale_if_error=60)
    def report() -> str:
        return source()

    assert report() == "v1"
    source.failing = True
    clock.advance(11)  # expired: the refresh raises, the last value is served
    assert report() == "v1"
    assert source.calls == 2
    for _ in range(100):  # within the next second: no caller reaches the source
        clock.advance(0.009)
        assert report() == "v1"
    assert source.calls == 2
    clock.advance(0.2)  # a second after the failure: one caller tries again
    assert [report() for _ in range(50)] == ["v1"] * 50
    assert source.calls == 3
    stats = report.stats()
    assert stats["errors"] == 2 and stats["stale_on_error"] == 2
    clock.advance(60)  # past the window (expired at 10, window until 70): the error
    with pytest.raises(ConnectionError, match="database is down"):
        report()
    source.failing = False
    assert report() == "v2"


async def test_stale_if_error_async_and_through_get_or_set(cache: Cache, clock: FakeClock) -> None:
    source = Source()

    async def fetch() -> str:
        await asyncio.sleep(0)
        return source()

    assert await cache.aget_or_set("feed", fetch, ttl=5, stale_if_error=30) == "v1"
    source.failing = True
    clock.advance(6)
    results = await asyncio.gather(
        *(cache.aget_or_set("feed", fetch, ttl=5, stale_if_error=30) for _ in range(50))
    )
    assert results == ["v1"] * 50
    assert source.calls == 2  # one failed refresh for 50 callers
    clock.advance(30)
    with pytest.raises(ConnectionError):
        await cache.aget_or_set("feed", fetch, ttl=5, stale_if_error=30)


def test_without_stale_if_error_a_failed_refresh_raises(cache: Cache, clock: FakeClock) -> None:
    source = Source()
    assert cache.get_or_set("k", source, ttl=5) == "v1"
    source.failing = True
    clock.advance(6)
    with pytest.raises(ConnectionError):
        cache.get_or_set("k", source, ttl=5)


# -- timeout ----------------------------------------------------------------------------------


async def test_twenty_tasks_time_out_alone_and_the_computation_lands_once(cache: Cache) -> None:
    release = asyncio.Event()
    calls = 0

    @cache.cached(ttl=60, timeout=0.05)
    async def slow_report() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return "done"

    outcomes = await asyncio.gather(*(slow_report() for _ in range(20)), return_exceptions=True)
    assert all(isinstance(outcome, CoalesceTimeout) for outcome in outcomes)
    error = outcomes[0]
    assert isinstance(error, CoalesceError) and isinstance(error, TimeoutError)
    assert "timeout=0.05" in str(error)
    release.set()  # the computation went on, though every caller left
    for _ in range(100):
        if cache.get_entry(slow_report.key()) is not None:
            break
        await asyncio.sleep(0.01)
    assert await slow_report() == "done"
    assert calls == 1
    stats = slow_report.stats()
    assert stats["timeouts"] == 20 and stats["computations"] == 1 and stats["hits"] == 1


def test_sync_callers_leader_included_time_out_alone(cache: Cache) -> None:
    release = threading.Event()
    calls = 0

    @cache.cached(ttl=60, timeout=0.05)
    def slow_report() -> str:
        nonlocal calls
        calls += 1
        release.wait(10)
        return "done"

    outcomes: list[object] = []

    def call() -> None:
        try:
            outcomes.append(slow_report())
        except Exception as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=call) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert len(outcomes) == 20
    assert all(isinstance(outcome, CoalesceTimeout) for outcome in outcomes)
    release.set()
    deadline = time.monotonic() + 5
    while cache.get_entry(slow_report.key()) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert slow_report() == "done"
    assert calls == 1


def test_a_timed_out_caller_gets_the_value_kept_for_errors(cache: Cache, clock: FakeClock) -> None:
    release = threading.Event()
    release.set()

    @cache.cached(ttl=10, stale_if_error=60, timeout=0.05)
    def report() -> str:
        release.wait(10)
        return "fresh" if not release.is_set() else "first"

    assert report() == "first"
    release.clear()
    clock.advance(11)
    assert report() == "first"  # timed out: the kept value, not an error
    assert report.stats()["timeouts"] == 1
    release.set()


def test_a_sync_timeout_reports_a_reentrant_call_instead_of_waiting(cache: Cache) -> None:
    @cache.cached(ttl=60, timeout=1.0, key="self")
    def recursive() -> int:
        return recursive() + 1

    with pytest.raises(CoalesceError, match="while this same call was computing it"):
        recursive()


# -- early refresh ----------------------------------------------------------------------------


async def test_early_refresh_keeps_a_hammered_key_fresh_without_anyone_waiting() -> None:
    cache = Cache()
    computing = 0

    @cache.cached(ttl=0.3, early_refresh=True)
    async def hot() -> float:
        nonlocal computing
        computing += 1
        await asyncio.sleep(0.03)
        return time.monotonic()

    await hot()  # the cold miss
    stop = time.monotonic() + 1.6

    async def hammer() -> None:
        while time.monotonic() < stop:
            await hot()
            await asyncio.sleep(0.002)

    await asyncio.gather(*(hammer() for _ in range(200)))
    stats = hot.stats()
    assert stats["misses"] == 1  # only the cold call ever waited for a computation
    assert stats["coalesced"] == 0
    assert stats["early_refreshes"] >= 4
    assert 5 <= computing <= 12  # about one per ttl (1.6 s / 0.3 s, each a little early)
    await cache.aclose()


def test_early_refresh_serves_the_old_value_while_refreshing(
    cache: Cache, clock: FakeClock
) -> None:
    source = Source()
    refreshed = threading.Event()

    @cache.cached(ttl=10, early_refresh=100.0)  # beta 100 x 0.05 s: refresh 5 s early
    def load() -> str:
        time.sleep(0.05)  # the compute time XFetch scales by (measured, not the clock's)
        value = source()
        refreshed.set()
        return value

    assert load() == "v1"
    refreshed.clear()
    # one computation (50 ms) before expiry: the entry's refresh moment, at most
    # fresh_until - compute_time (`entry.refresh_moment`), has come whatever was drawn
    clock.advance(9.95)
    for _ in range(20):
        assert load() == "v1"  # served at once; the refresh runs in the background
        if refreshed.is_set():
            break
    assert refreshed.wait(5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        entry = cache.get_entry(load.key())
        if entry is not None and entry.value == "v2":
            break
        time.sleep(0.01)
    entry = cache.get_entry(load.key())
    assert entry is not None and entry.value == "v2"
    assert source.calls == 2 and load.stats()["early_refreshes"] == 1


# -- background work ends with close ------------------------------------------------------------


def test_close_waits_for_background_refreshes_and_leaves_no_thread(clock: FakeClock) -> None:
    before = {t.ident for t in threading.enumerate()}
    cache = Cache(clock=clock)
    release = threading.Event()
    finished = []

    @cache.cached(ttl=1, stale_ttl=60)
    def load() -> int:
        if finished or release.is_set():
            release.wait(5)
        finished.append(1)
        return len(finished)

    assert load() == 1
    release.set()
    clock.advance(2)
    assert load() == 1  # stale: the refresh runs in a worker thread
    cache.close()
    assert finished == [1, 1]  # close waited for it
    leftover = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert leftover == []
    clock.advance(2)
    assert load() == 2  # still usable, but nothing refreshes in the background any more
    assert finished == [1, 1]


async def test_aclose_cancels_background_refresh_tasks(clock: FakeClock) -> None:
    cache = Cache(clock=clock)
    started = asyncio.Event()

    @cache.cached(ttl=1, stale_ttl=60)
    async def load() -> int:
        if started.is_set():
            await asyncio.sleep(3600)
        started.set()
        return 1

    assert await load() == 1
    clock.advance(2)
    tasks_before = len(asyncio.all_tasks())
    assert await load() == 1  # stale: a refresh task starts and hangs
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) > tasks_before
    await cache.aclose()
    assert len(asyncio.all_tasks()) <= tasks_before


# -- on Redis: across processes -----------------------------------------------------------------

WORKER = r"""
import json, os, sys, time
from coalesce import Cache

url, ns, workdir, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
cache = Cache(url, namespace=ns)
# a barrier: every worker is imported and ready before the outage is measured
open(os.path.join(workdir, f"ready-{os.getpid()}"), "w").close()
go = os.path.join(workdir, "go")
deadline = time.time() + 30
while not os.path.exists(go) and time.time() < deadline:
    time.sleep(0.01)
until = float(open(go).read())

def source():
    fd = os.open(os.path.join(workdir, "calls"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, b"x")
    os.close(fd)
    if os.path.exists(os.path.join(workdir, "down")):
        raise ConnectionError("the database is down")
    return "v-" + str(os.getpid())

@cache.cached(ttl=0.5, stale_if_error=%(window)s, key="report")
def report():
    return source()

served, errors = [], 0
while time.time() < until:
    try:
        served.append(report())
    except ConnectionError:
        errors += 1
    time.sleep(0.005)
print(json.dumps({"served": sorted(set(served)), "calls": len(served), "errors": errors}))
cache.close()
"""


def _run_workers(
    url: str, namespace: str, workdir: Path, seconds: float, window: float
) -> list[dict[str, Any]]:
    source = WORKER % {"window": window}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", source, url, namespace, str(workdir), str(seconds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for _ in range(4)
    ]
    import json

    deadline = time.monotonic() + 30
    while len(list(workdir.glob("ready-*"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    (workdir / "go.tmp").write_text(str(time.time() + seconds))
    (workdir / "go.tmp").rename(workdir / "go")
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 30)
        assert proc.returncode == 0, err.decode()
        results.append(json.loads(out))
    return results


def test_stale_if_error_across_four_processes_on_redis(
    redis_url: str, unique_namespace: str, tmp_path: Path
) -> None:
    cache = Cache(redis_url, namespace=unique_namespace)

    @cache.cached(ttl=0.2, stale_if_error=30, key="report")
    def report() -> str:
        return "before"

    assert report() == "before"
    time.sleep(0.25)  # expired in Redis (real time: PX); kept there for the window
    (tmp_path / "down").touch()
    results = _run_workers(redis_url, unique_namespace, tmp_path, seconds=3.0, window=30)
    assert [r["errors"] for r in results] == [0, 0, 0, 0]
    assert all(r["served"] == ["before"] for r in results)
    assert sum(r["calls"] for r in results) > 100
    calls = len((tmp_path / "calls").read_bytes())
    # about one try a second for the fleet, not one per caller or per process
    assert 2 <= calls <= 8, calls
    client = redis.Redis.from_url(redis_url)
    assert client.pttl(f"{unique_namespace}:{{report}}") > 20_000  # PX covers the window
    client.close()
    cache.close()


def test_stale_if_error_ends_with_its_window_on_redis(
    redis_url: str, unique_namespace: str, tmp_path: Path
) -> None:
    cache = Cache(redis_url, namespace=unique_namespace)
    failing = False

    @cache.cached(ttl=0.1, stale_if_error=0.4, key="report")
    def report() -> str:
        if failing:
            raise ConnectionError("down")
        return "before"

    assert report() == "before"
    failing = True
    time.sleep(0.15)  # real time (Redis keeps the entry by PX): expired, inside the window
    assert report() == "before"
    time.sleep(0.4)  # past the window
    with pytest.raises(ConnectionError):
        report()
    cache.close()


# -- async twins of the inspection calls (issue 10) ----------------------------------------------


async def test_aget_entry_and_akeys_match_their_sync_twins(
    redis_url: str, unique_namespace: str, clock: FakeClock
) -> None:
    for cache in (Cache(clock=clock), Cache(redis_url, namespace=unique_namespace)):
        await cache.aset("user:1", {"name": "Ada"}, ttl=60, stale_if_error=30)
        entry = await cache.aget_entry("user:1")
        assert entry is not None and entry.value == {"name": "Ada"}
        assert entry.stale_if_error == 30.0
        assert await cache.aget_entry("user:2") is None
        assert await cache.akeys("user:*") == cache.keys("user:*") == ["user:1"]
        await cache.aclose()


def test_early_refresh_on_redis_refreshes_once_per_fleet_and_nobody_waits(
    redis_url: str, unique_namespace: str
) -> None:
    """Two caches (separate flights, like two processes) hammer one hot key across several
    expiries: every call after the cold one is a hit, and refreshes stay about one per ttl
    for the pair (the lease keeps them to one at a time)."""
    caches = [Cache(redis_url, namespace=unique_namespace) for _ in range(2)]
    computed = []
    lock = threading.Lock()

    def make(cache: Cache) -> Any:
        @cache.cached(ttl=0.4, early_refresh=True, key="hot")
        def hot() -> float:
            time.sleep(0.05)
            with lock:
                computed.append(time.monotonic())
            return time.monotonic()

        return hot

    functions = [make(cache) for cache in caches]
    functions[0]()  # the cold miss
    stop = time.monotonic() + 2.0

    def hammer(fn: Any) -> None:
        while time.monotonic() < stop:
            fn()
            time.sleep(0.002)

    threads = [threading.Thread(target=hammer, args=(fn,)) for fn in functions for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    misses = sum(fn.stats()["misses"] for fn in functions)
    assert misses == 1  # only the cold call waited for a computation
    assert 4 <= len(computed) <= 12, len(computed)  # about one per 0.4 s, not one per cache
    for cache in caches:
        cache.close()


def test_stale_if_error_through_the_near_cache(redis_url: str, unique_namespace: str) -> None:
    """With a near cache, expired local copies fall through to Redis, where the entry is
    kept for the window: a failing refresh still serves the last value."""
    cache = Cache(redis_url, namespace=unique_namespace, local_maxsize=100, local_ttl=5)
    failing = False
    calls = 0

    @cache.cached(ttl=0.3, stale_if_error=30, key="report")
    def report() -> str:
        nonlocal calls
        calls += 1
        if failing:
            raise ConnectionError("down")
        return "before"

    assert report() == "before"
    assert report() == "before"  # a near-cache hit
    failing = True
    time.sleep(0.4)
    assert [report() for _ in range(20)] == ["before"] * 20
    assert calls == 2
    assert report.stats()["stale_on_error"] == 1
    cache.close()


def test_a_waiter_for_another_process_times_out_alone_on_redis(
    redis_url: str, unique_namespace: str
) -> None:
    """Cache B's caller waits for the lease cache A holds (as another process would) and
    leaves on its timeout; A's computation lands, and B then hits it."""
    leader_cache = Cache(redis_url, namespace=unique_namespace)
    waiter_cache = Cache(redis_url, namespace=unique_namespace)
    release, started = threading.Event(), threading.Event()

    @leader_cache.cached(ttl=60, key="slow")
    def lead() -> str:
        started.set()
        release.wait(10)
        return "landed"

    @waiter_cache.cached(ttl=60, key="slow", timeout=0.1)
    def wait() -> str:
        return "computed by the waiter"

    leader = threading.Thread(target=lead)
    leader.start()
    assert started.wait(5)
    with pytest.raises(CoalesceTimeout):
        wait()
    release.set()
    leader.join(5)
    assert wait() == "landed"
    assert wait.stats()["computations"] == 0 and wait.stats()["timeouts"] == 1
    leader_cache.close()
    waiter_cache.close()


def test_generated_code_shows_its_source_in_tracebacks(cache: Cache) -> None:
    """The hot-path wrapper and the key function are registered with `linecache`, so a
    traceback through them shows their lines, not only `<coalesce wrapper ...>`."""
    import traceback

    @cache.cached(ttl=60, key="item:{n}")
    def item(n: int) -> int:
        raise LookupError(n)

    with pytest.raises(LookupError) as caught:
        item(1)
    text = "".join(traceback.format_exception(caught.value))
    assert "<coalesce wrapper of" in text
    assert "return __coalesce_slow(" in text  # a generated line, read back from linecache


def test_close_waits_for_computations_callers_left_on_their_timeout(cache: Cache) -> None:
    release, finished = threading.Event(), threading.Event()

    @cache.cached(ttl=60, timeout=0.05)
    def slow() -> str:
        release.wait(10)
        finished.set()
        return "landed"

    with pytest.raises(CoalesceTimeout):
        slow()
    threading.Timer(0.1, release.set).start()
    cache.close()  # waits for the computation the caller left
    assert finished.is_set()
    assert cache.get_entry(slow.key()) is not None
    assert not any(t.name.startswith("coalesce-compute") for t in threading.enumerate())
