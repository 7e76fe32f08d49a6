"""The chaos suite: a cached FastAPI app on Redis under load while things break.

```bash
python benchmarks/chaos.py                        # every scenario, ~2.5 min -> results/chaos.md
python benchmarks/chaos.py --quick                # shorter phases, fewer processes
python benchmarks/chaos.py --scenarios baseline,redis_kill --output /tmp/chaos.md
```

Each scenario starts its own processes on loopback and stops them by pid at its end:
two `redis-server`s (the cache, which the faults hit, and the "database", which they never
touch), `uvicorn chaos_app:app --workers N` (`chaos_app.py`: one `coalesce.fastapi.cached`
route on `Cache(redis://..., near cache on)`, TTL 2 s, 70 ms computations whose value carries
the key's version) and several load-generator processes (httpx, bounded in requests and
time). Meanwhile the driver bumps a key's version in the database and then invalidates it
(`Cache.invalidate`) every 300 ms, and bumps a control key every 500 ms *without*
invalidating it: the control proves, in every run, that the stale detector sees staleness.

What is measured per scenario (every time is `time.monotonic()`, one clock for every process
of the machine):

* requests, non-2xx answers, transport errors (a connection reset even after one retry, as
  a proxy retries an idempotent GET), lost requests (no answer within 10 s);
* wrong values (another key's value, a version never written, a malformed body);
* stale after invalidation: an answer whose version is older than an invalidation that had
  finished before the request was sent; the worst lag is how long after that invalidation
  it was received; the control key's count must be above 0;
* computations per key and TTL window (the worst one), and the excess over one per window
  plus one per invalidation in it;
* latency p50 / p99 / max, database computations per second during the fault against
  before it, time to recover (from the end of the fault to the last answer that was not a
  2xx or took over 1 s), and the growth of the workers' RSS, threads and file descriptors
  and of the cache Redis's connected clients from before the fault to after the load.

Like the other benchmarks this script reports and always exits 0; `tests/test_chaos.py` runs
three scenarios in CI and asserts the invariants (no wrong value, nothing stale, every
request answered) but never a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    HOST,
    RESULTS,
    ROOT,
    command_line,
    environment,
    markdown_table,
    percentile,
    write_result,
)

sys.path.insert(0, str(ROOT / "tests"))
import redis
from nginx_server import ServerProcess
from redis_servers import RedisServer

from coalesce import Cache

BENCH_DIR = Path(__file__).resolve().parent
TTL = 2.0
COMPUTE_MS = 70
REQUEST_TIMEOUT = 10.0  # seconds without an answer: the request is lost
SLOW = 1.0  # seconds: an answer slower than this is not "recovered"
#: An invalidation reaches the other processes' near caches by a pub/sub broadcast, a few
#: milliseconds after `invalidate` returns in the driver: a stale answer to a request sent
#: within this long after it is counted apart (`stale_in_grace`), not as stale.
BROADCAST_GRACE = 0.25
INVALIDATE_EVERY = 0.3
CONTROL_EVERY = 0.5
STORM_EVERY = 0.05
CONTROL_KEY = "ctl"
HOT_KEY = "hot"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


def stored_key(key: str) -> str:
    """The key `chaos_app.item` stores `key` under (`item:{key}@<module>.<handler>`)."""
    return f"item:{key}@chaos_app.item"


# -- scenarios ---------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    title: str
    fault_s: float = 0.0  # how long the fault lasts (0: an instant fault, or none)
    keys: int = 20  # k0..k{keys-1}; 80% of requests go to the first 5
    storm: bool = False  # one hot key invalidated every 50 ms during the fault
    pad: int = 0  # bytes of padding per value
    maxmemory: str | None = None  # the fault: this maxmemory with allkeys-lru


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("baseline", "baseline (no fault)"),
        Scenario("worker_kill", "SIGKILL of a uvicorn worker"),
        Scenario("redis_stop", "Redis SIGSTOP for 3 s, then SIGCONT", fault_s=3.0),
        Scenario("redis_kill", "Redis SIGKILL, restarted empty after 1 s", fault_s=1.0),
        Scenario("pubsub_kill", "CLIENT KILL TYPE pubsub, 5 times 300 ms apart", fault_s=1.2),
        Scenario(
            "storm",
            "invalidation storm: one hot key every 50 ms, 70 ms computations",
            4.0,
            storm=True,
        ),
        Scenario(
            "eviction",
            "maxmemory 2mb allkeys-lru, 300 keys of 20 KB",
            4.0,
            keys=300,
            pad=20_000,
            maxmemory="2mb",
        ),
    )
}
CI_SCENARIOS = ("worker_kill", "redis_kill", "pubsub_kill")


@dataclass
class Shape:
    """How big a run is: `--quick` (and CI) use the small one."""

    workers: int
    loaders: int
    concurrency: int
    warm_s: float
    before_s: float
    after_s: float
    max_requests: int  # per load generator

    @classmethod
    def of(cls, quick: bool) -> Shape:
        return QUICK if quick else FULL


QUICK = Shape(2, 2, 8, warm_s=1.0, before_s=2.0, after_s=3.0, max_requests=20_000)
FULL = Shape(3, 3, 12, warm_s=1.5, before_s=3.0, after_s=5.0, max_requests=50_000)


# -- processes ---------------------------------------------------------------------------------


class Uvicorn(ServerProcess):
    """`python -m uvicorn chaos_app:app --workers N` in its own process group (started and
    stopped as the tests' servers are: `tests/nginx_server.py`)."""

    name = "chaos-uvicorn"

    def __init__(self, workers: int, env: dict[str, str]) -> None:
        super().__init__()
        self.workers = workers
        self.env = env

    def start(self) -> Uvicorn:
        argv = [sys.executable, "-m", "uvicorn", "chaos_app:app", "--app-dir", str(BENCH_DIR)]
        argv += ["--host", HOST, "--port", str(self.port), "--workers", str(self.workers)]
        argv += ["--log-level", "warning", "--timeout-graceful-shutdown", "2"]
        self._spawn(argv, env=self.env)
        deadline = time.monotonic() + START_TIMEOUT
        while len(self.worker_pids()) < self.workers:
            if time.monotonic() > deadline:
                log = self.logs()
                self.close(check=False)
                raise RuntimeError(f"uvicorn did not start {self.workers} workers; log:\n{log}")
            time.sleep(0.1)
        return self

    def worker_pids(self) -> list[int]:
        """The serving workers: children of the supervisor (not multiprocessing helpers)."""
        if self.proc is None:
            return []
        pids = []
        for pid in children(self.proc.pid):
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"resource_tracker" not in cmdline and b"forkserver" not in cmdline:
                    pids.append(pid)
        return pids


def check_stored_key(app: Uvicorn, cache: Cache) -> None:
    """The driver invalidates `stored_key(...)`: make sure the app stores under that name
    (else every invalidation would miss, and the run would measure nothing)."""
    import httpx

    httpx.get(f"{app.url}/item/{CONTROL_KEY}", timeout=REQUEST_TIMEOUT).raise_for_status()
    if cache.get_entry(stored_key(CONTROL_KEY)) is None:
        found = list(cache.keys("*", limit=10))
        raise RuntimeError(f"the app does not store {stored_key(CONTROL_KEY)!r}; it has {found}")


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def process_usage(pid: int) -> tuple[float, int, int]:
    """(RSS in MB, threads, open file descriptors) of a live process, else zeros."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0.0, 0, 0
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_kb = int(fields.get("VmRSS", "0 kB").split()[0])
    return rss_kb / 1024, int(fields.get("Threads", "0")), fds


@dataclass
class Usage:
    rss_mb: float = 0.0
    threads: int = 0
    fds: int = 0
    redis_clients: int = 0


def usage(app: Uvicorn, cache_redis: RedisServer) -> Usage:
    total = Usage()
    for pid in app.worker_pids():
        rss, threads, fds = process_usage(pid)
        total.rss_mb += rss
        total.threads += threads
        total.fds += fds
    with contextlib.suppress(redis.RedisError):
        client = cache_redis.client(socket_timeout=2, socket_connect_timeout=2)
        try:
            total.redis_clients = int(client.info("clients")["connected_clients"]) - 1
        finally:
            client.close()
    return total


# -- the load generator (its own process) ------------------------------------------------------


async def _load(opts: dict[str, Any]) -> None:
    import httpx

    rng = random.Random(opts["seed"])
    keys = [f"k{i}" for i in range(opts["keys"])]
    hot = keys[:5]
    end = opts["end"]
    budget = opts["max_requests"]
    records: list[list[Any]] = []

    def pick() -> str:
        roll = rng.random()
        if roll < 0.05:
            return CONTROL_KEY
        if opts["storm"] and roll < 0.55:
            return HOT_KEY
        return rng.choice(hot) if rng.random() < 0.8 else rng.choice(keys)

    async def one(client: httpx.AsyncClient, key: str) -> list[Any]:
        retried = 0
        while True:
            sent = time.monotonic()
            try:
                response = await client.get(f"/item/{key}")
            except httpx.TimeoutException:
                return [key, sent, time.monotonic(), -1, None, "", retried]
            except httpx.TransportError:
                if retried or time.monotonic() > end + 1:
                    return [key, sent, time.monotonic(), -2, None, "", retried]
                retried = 1  # a killed worker reset the connection: retry once, as a proxy would
                continue
            got = time.monotonic()
            body: Any = None
            with contextlib.suppress(ValueError):
                body = response.json()
            if isinstance(body, dict):
                body = {k: v for k, v in body.items() if k != "pad"}
            return [
                key,
                sent,
                got,
                response.status_code,
                body,
                response.headers.get("x-cache", ""),
                retried,
            ]

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal budget
        while time.monotonic() < end and budget > 0:
            budget -= 1
            records.append(await one(client, pick()))

    limits = httpx.Limits(
        max_connections=opts["concurrency"],
        max_keepalive_connections=0 if opts.get("no_keepalive") else opts["concurrency"],
    )
    async with httpx.AsyncClient(
        base_url=opts["url"], timeout=REQUEST_TIMEOUT, limits=limits
    ) as client:
        await asyncio.gather(*(worker(client) for _ in range(opts["concurrency"])))
    Path(opts["out"]).write_text("\n".join(json.dumps(r) for r in records))


# -- the driver's background work --------------------------------------------------------------


@dataclass
class Timeline:
    """What the driver did, in monotonic seconds."""

    invalidated: dict[str, list[tuple[int, float]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    control: list[tuple[int, float]] = field(default_factory=list)
    failed_invalidations: int = 0
    fault_start: float = 0.0
    fault_end: float = 0.0
    load_start: float = 0.0


def invalidator(
    stop: threading.Event,
    db: redis.Redis,
    cache: Cache,
    timeline: Timeline,
    keys: list[str],
    storm: Callable[[], bool],
    seed: int,
) -> None:
    """Bump a key's version in the database, then invalidate it; retried until the
    invalidation succeeds (it raises while Redis is down), so every bump is fenced."""
    rng = random.Random(seed)
    next_regular = next_control = time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        if now >= next_control:
            next_control = now + CONTROL_EVERY
            version = int(db.incr(f"version:{CONTROL_KEY}"))
            timeline.control.append((version, time.monotonic()))  # never invalidated
        storming = storm()
        if storming or now >= next_regular:
            if not storming:
                next_regular = now + INVALIDATE_EVERY
            key = HOT_KEY if storming else rng.choice(keys)
            version = int(db.incr(f"version:{key}"))
            deadline = time.monotonic() + 15
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    cache.invalidate(stored_key(key))
                except Exception:
                    timeline.failed_invalidations += 1
                    time.sleep(0.05)
                    continue
                timeline.invalidated[key].append((version, time.monotonic()))
                break
        stop.wait(STORM_EVERY if storming else 0.01)


# -- analysis ----------------------------------------------------------------------------------


@dataclass
class Result:
    scenario: str
    title: str
    requests: int = 0
    non_2xx: int = 0
    errors: int = 0  # transport errors after one retry
    retried: int = 0
    lost: int = 0  # timeouts
    wrong: int = 0
    wrong_examples: list[Any] = field(default_factory=list)
    stale: int = 0
    stale_lag_ms: float = 0.0
    stale_examples: list[Any] = field(default_factory=list)
    stale_in_grace: int = 0
    stale_in_grace_lag_ms: float = 0.0
    control_stale: int = 0
    invalidations: int = 0
    failed_invalidations: int = 0
    computations: int = 0
    worst_per_key_window: int = 0
    excess_computations: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    hit_ratio: float = 0.0
    comps_per_s_before: float = 0.0
    comps_per_s_fault: float = 0.0
    recover_s: float | None = None
    fault_s: float = 0.0
    before: Usage = field(default_factory=Usage)
    after: Usage = field(default_factory=Usage)
    notes: list[str] = field(default_factory=list)

    @property
    def answered(self) -> bool:
        """Every request got an HTTP answer (after at most one retry of a reset connection)."""
        return self.lost == 0 and self.errors == 0


def required_version(history: list[tuple[int, float]], sent: float) -> tuple[int, float]:
    """The newest version whose invalidation (or bump, for the control) finished before
    `sent`, and when: what an answer to a request sent then must at least carry."""
    best = (0, 0.0)
    for version, done in history:
        if done < sent and version > best[0]:
            best = (version, done)
    return best


def analyse(
    result: Result,
    records: list[list[Any]],
    comps: list[tuple[str, float]],
    timeline: Timeline,
    written: dict[str, int],
) -> None:
    latencies = []
    hits = 0
    for key, sent, got, status, body, xcache, retried in records:
        result.requests += 1
        result.retried += retried
        if status == -1:
            result.lost += 1
            continue
        if status == -2:
            result.errors += 1
            continue
        latencies.append(got - sent)
        if not 200 <= status < 300:
            result.non_2xx += 1
            continue
        hits += xcache in ("HIT", "STALE", "COALESCED")
        version = body.get("version") if isinstance(body, dict) else None
        if (
            not isinstance(body, dict)
            or body.get("key") != key
            or type(version) is not int
            or not 0 <= version <= written.get(key, 0)
        ):
            result.wrong += 1
            if len(result.wrong_examples) < 3:
                result.wrong_examples.append([key, status, body])
            continue
        if key == CONTROL_KEY:
            need, _ = required_version(timeline.control, sent)
            result.control_stale += version < need
            continue
        need, done = required_version(timeline.invalidated.get(key, []), sent)
        if version < need:
            # the first invalidation that made this version stale, and how long before
            first = min((d for v, d in timeline.invalidated[key] if version < v and d < sent))
            if sent - first <= BROADCAST_GRACE:
                result.stale_in_grace += 1  # other processes' near caches hear it just after
                result.stale_in_grace_lag_ms = max(
                    result.stale_in_grace_lag_ms, (got - first) * 1000
                )
                continue
            result.stale += 1
            result.stale_lag_ms = max(result.stale_lag_ms, (got - first) * 1000)
            if len(result.stale_examples) < 3:
                result.stale_examples.append(
                    {
                        "key": key,
                        "got": version,
                        "needed": need,
                        "xcache": xcache,
                        "sent_after_ms": round((sent - first) * 1000, 1),
                    }
                )
    if latencies:
        result.p50_ms = percentile(latencies, 50) * 1000
        result.p99_ms = percentile(latencies, 99) * 1000
        result.max_ms = max(latencies) * 1000
    result.hit_ratio = hits / max(1, result.requests)
    result.invalidations = sum(len(v) for v in timeline.invalidated.values())
    result.failed_invalidations = timeline.failed_invalidations
    # computations per key per TTL window, and the excess over 1 + invalidations in it
    result.computations = len(comps)
    per_window: Counter[tuple[str, int]] = Counter()
    for key, at in comps:
        per_window[key, math.floor((at - timeline.load_start) / TTL)] += 1
    invalidations_in: Counter[tuple[str, int]] = Counter()
    for key, history in timeline.invalidated.items():
        for _, done in history:
            invalidations_in[key, math.floor((done - timeline.load_start) / TTL)] += 1
    if per_window:
        result.worst_per_key_window = (
            max(count for (key, _), count in per_window.items() if key != CONTROL_KEY)
            if any(k != CONTROL_KEY for k, _ in per_window)
            else 0
        )
    result.excess_computations = sum(
        max(0, count - 1 - invalidations_in[slot])
        for slot, count in per_window.items()
        if slot[0] != CONTROL_KEY
    )
    before_start = timeline.fault_start - 2.0
    result.comps_per_s_before = (
        sum(before_start <= t < timeline.fault_start for _, t in comps) / 2.0
    )
    if timeline.fault_end > timeline.fault_start:
        span = max(0.2, timeline.fault_end - timeline.fault_start)
        during = sum(timeline.fault_start <= t <= timeline.fault_end for _, t in comps)
        result.comps_per_s_fault = during / span
    bad = [
        got
        for key, sent, got, status, *_ in records
        if sent >= timeline.fault_start - REQUEST_TIMEOUT
        and (not 200 <= status < 300 or got - sent > SLOW)
    ]
    result.recover_s = max(0.0, max(bad) - timeline.fault_end) if bad else 0.0


# -- one scenario ------------------------------------------------------------------------------


def run_scenario(
    name: str,
    *,
    quick: bool,
    seed: int = 1,
    log: Callable[[str], None] = print,
) -> Result:
    """Run one scenario start to end (its own servers, app and load) and analyse it."""
    scenario = SCENARIOS[name]
    shape = Shape.of(quick)
    result = Result(name, scenario.title, fault_s=scenario.fault_s)
    workdir = Path(tempfile.mkdtemp(prefix=f"coalesce-chaos-{name}-"))
    cache_redis = RedisServer(name="chaos-cache")
    db_redis = RedisServer(name="chaos-db")
    app: Uvicorn | None = None
    loaders: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    thread: threading.Thread | None = None
    driver_cache: Cache | None = None
    try:
        cache_redis.start()
        db_redis.start()
        env = {
            **os.environ,
            "CHAOS_CACHE_URL": cache_redis.url,
            "CHAOS_DB_URL": db_redis.url,
            "CHAOS_TTL": str(TTL),
            "CHAOS_COMPUTE_MS": str(COMPUTE_MS),
            "CHAOS_PAD": str(scenario.pad),
            "PYTHONPATH": str(ROOT),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        app = Uvicorn(shape.workers, env)
        app.start()
        db = db_redis.client(socket_timeout=5)
        driver_cache = Cache(cache_redis.url, namespace="chaos")
        check_stored_key(app, driver_cache)
        timeline = Timeline()
        keys = [f"k{i}" for i in range(scenario.keys)][:5]
        phases = shape.warm_s + shape.before_s + scenario.fault_s + shape.after_s
        timeline.load_start = time.monotonic()
        end = timeline.load_start + phases + (0.5 if scenario.fault_s == 0 else 0)
        for index in range(shape.loaders):
            opts = {
                "url": app.url,
                "keys": scenario.keys,
                "end": end,
                "seed": seed * 100 + index,
                "concurrency": shape.concurrency,
                "max_requests": shape.max_requests,
                "storm": scenario.storm,
                "out": str(workdir / f"load{index}.jsonl"),
            }
            loaders.append(
                subprocess.Popen(
                    [sys.executable, __file__, "_load", json.dumps(opts)],
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
            )
        fault_at = timeline.load_start + shape.warm_s + shape.before_s
        timeline.fault_start = timeline.fault_end = fault_at

        def storming() -> bool:
            return scenario.storm and timeline.fault_start <= time.monotonic() < (
                timeline.fault_start + scenario.fault_s
            )

        thread = threading.Thread(
            target=invalidator,
            args=(stop, db, driver_cache, timeline, keys, storming, seed),
            name="chaos-invalidator",
            daemon=True,
        )
        thread.start()
        time.sleep(max(0.0, fault_at - 0.2 - time.monotonic()))
        result.before = usage(app, cache_redis)  # under load, just before the fault
        time.sleep(max(0.0, fault_at - time.monotonic()))
        log(f"  {name}: fault")
        inject(scenario, app, cache_redis, timeline, result)
        while any(p.poll() is None for p in loaders) and time.monotonic() < end + 30:
            time.sleep(0.1)
        stop.set()
        thread.join(timeout=20)
        time.sleep(1.0)  # let connections settle before counting them
        result.after = usage(app, cache_redis)
        records: list[list[Any]] = []
        for index, proc in enumerate(loaders):
            if proc.poll() is None:
                result.notes.append(f"load generator {index} overran its deadline: killed")
                continue
            path = workdir / f"load{index}.jsonl"
            if path.exists() and path.stat().st_size:
                records += [json.loads(line) for line in path.read_text().splitlines()]
            else:
                result.notes.append(
                    f"load generator {index} wrote nothing (exit {proc.returncode})"
                )
        comps = []
        for raw in db.lrange("comps", 0, -1):
            key, at, _pid = raw.decode().split()
            comps.append((key, float(at)))
        written = {}
        for raw_key in db.scan_iter(match="version:*"):
            written[raw_key.decode().split(":", 1)[1]] = int(db.get(raw_key) or 0)
        db.close()
        analyse(result, records, comps, timeline, written)
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=20)
        for proc in loaders:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_TIMEOUT)
        if app is not None:
            app.close(check=False)
        if driver_cache is not None:
            driver_cache.close()
        if cache_redis.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(cache_redis.pid, signal.SIGCONT)  # never leave it stopped
        cache_redis.close()
        db_redis.close()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return result


def inject(
    scenario: Scenario, app: Uvicorn, cache_redis: RedisServer, timeline: Timeline, result: Result
) -> None:
    """Apply the scenario's fault; record when it started and ended."""
    timeline.fault_start = time.monotonic()
    name = scenario.name
    if name == "worker_kill":
        pids = app.worker_pids()
        victim = random.choice(pids)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:  # until the supervisor has replaced it
            now = app.worker_pids()
            if victim not in now and len(now) >= len(pids):
                break
            time.sleep(0.05)
        result.notes.append(
            f"worker replaced after {time.monotonic() - timeline.fault_start:.1f} s"
        )
    elif name == "redis_stop":
        pid = cache_redis.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(scenario.fault_s)
        finally:
            os.kill(pid, signal.SIGCONT)
    elif name == "redis_kill":
        cache_redis.kill()
        time.sleep(scenario.fault_s)
        cache_redis.restart()
    elif name == "pubsub_kill":
        client = cache_redis.client(socket_timeout=2)
        killed = 0
        try:
            for _ in range(5):
                killed += int(client.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))
                time.sleep(0.3)
        finally:
            client.close()
        result.notes.append(f"{killed} pub/sub connections killed")
    elif name == "storm":
        time.sleep(scenario.fault_s)  # the invalidator storms meanwhile
    elif scenario.maxmemory is not None:
        client = cache_redis.client(socket_timeout=2)
        try:
            client.config_set("maxmemory-policy", "allkeys-lru")
            client.config_set("maxmemory", scenario.maxmemory)
            time.sleep(scenario.fault_s)
            result.notes.append(f"{client.info('stats')['evicted_keys']:,} keys evicted")
            client.config_set("maxmemory", "0")
        finally:
            client.close()
    timeline.fault_end = time.monotonic()


# -- the report --------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    header = [
        "scenario",
        "requests",
        "non-2xx",
        "errors (retried)",
        "lost",
        "wrong",
        "stale (worst lag)",
        "stale < 250 ms (lag)",
        "control stale",
        "invalidations",
        "comps / key / TTL (excess)",
        "hits",
        "p50 / p99 / max ms",
        "DB comps/s before -> fault",
        "recover",
        "RSS MB, threads, fds, Redis clients: before -> after",
    ]
    rows = []
    for r in results:
        fault = (
            f"{r.comps_per_s_before:,.0f} -> {r.comps_per_s_fault:,.0f}"
            if (r.scenario != "baseline")
            else f"{r.comps_per_s_before:,.0f}"
        )
        growth = (
            f"{r.before.rss_mb:.0f}->{r.after.rss_mb:.0f}, "
            f"{r.before.threads}->{r.after.threads}, {r.before.fds}->{r.after.fds}, "
            f"{r.before.redis_clients}->{r.after.redis_clients}"
        )
        rows.append(
            [
                r.scenario,
                f"{r.requests:,}",
                f"{r.non_2xx:,}",
                f"{r.errors} ({r.retried})",
                str(r.lost),
                str(r.wrong),
                f"{r.stale} ({r.stale_lag_ms:.0f} ms)",
                f"{r.stale_in_grace} ({r.stale_in_grace_lag_ms:.0f} ms)",
                str(r.control_stale),
                f"{r.invalidations} (+{r.failed_invalidations} failed)",
                f"{r.worst_per_key_window} (+{r.excess_computations})",
                f"{r.hit_ratio:.0%}",
                f"{r.p50_ms:.0f} / {r.p99_ms:.0f} / {r.max_ms:,.0f}",
                fault,
                "-" if r.scenario == "baseline" else f"{r.recover_s:.1f} s",
                growth,
            ]
        )
    return markdown_table(header, rows)


def report(results: list[Result], quick: bool, seconds: float) -> str:
    shape = Shape.of(quick)
    lines = [
        "# Chaos suite (`benchmarks/chaos.py`)",
        "",
        f"`{command_line()}`, {seconds:.0f} s; "
        f"{environment('fastapi', 'uvicorn', 'redis', 'httpx')}.",
        f"uvicorn with {shape.workers} workers, {shape.loaders} load generators x "
        f"{shape.concurrency} concurrent requests, TTL {TTL:g} s, {COMPUTE_MS} ms computations, "
        f"near cache on; a key invalidated every {INVALIDATE_EVERY * 1000:.0f} ms, a control "
        f"key bumped without invalidation every {CONTROL_EVERY * 1000:.0f} ms.",
        "",
        table(results),
        "",
        "Scenarios:",
    ]
    for r in results:
        extra = f" ({'; '.join(r.notes)})" if r.notes else ""
        lines.append(f"- `{r.scenario}`: {r.title}{extra}.")
        if r.wrong_examples:
            lines.append(f"  wrong, e.g. {r.wrong_examples}")
        if r.stale_examples:
            lines.append(f"  stale, e.g. {r.stale_examples}")
    lines += [
        "",
        "Columns: see the docstring of `benchmarks/chaos.py`. `control stale` > 0 "
        "shows the detector sees staleness; `errors (retried)`: connections reset even "
        "after one retry (retries in brackets).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["_load"]:
        asyncio.run(_load(json.loads(args[1])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter phases, fewer processes")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from: {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="where to write the table (default: results/chaos.md)",
    )
    parser.add_argument("--seed", type=int, default=1)
    options = parser.parse_args(args)
    names = [n.strip() for n in options.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    started = time.monotonic()
    results = []
    for name in names:
        print(f"{name}: {SCENARIOS[name].title}", flush=True)
        results.append(run_scenario(name, quick=options.quick, seed=options.seed))
    text = report(results, options.quick, time.monotonic() - started)
    print(text)
    write_result(options.output or RESULTS / "chaos.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
