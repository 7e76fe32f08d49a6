"""Cross-process single-flight on a real Redis: several OS processes, one computation.

Each worker is a fresh `python -c` process (no fork: every process has its own clients and
listener) running `WORKER` below. Nothing here depends on how fast a machine is:

* start: every worker announces itself with a `ready-<pid>` file once it has imported
  everything and made its cache, then waits for the `go` file that the test writes only when
  all workers are ready (`_start_together`), and fires its callers at one cold key at once;
* overlap: a worker writes `engaged-<pid>` once all its callers have joined its in-process
  flight and that flight either leads or waits for another process's lease (its store's
  `leads`/`waits` counters); the leader's computation does not finish before every worker
  is engaged, so every caller really overlaps the leader, however late its process ran.

Every wait is bounded (`BARRIER_TIMEOUT`); a worker that gives up exits with status 3 and
says why. Each worker prints every caller's outcome as JSON. Executions are counted by
appending to a file, and the barriers are files too, so they write nothing to Redis.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from coalesce.cache import Cache

ROOT = Path(__file__).resolve().parent.parent
BARRIER_TIMEOUT = 30.0  # seconds any barrier waits before failing loudly
LEASE_TTL = 2.0  # the workers' default lease

WORKER = r"""
import asyncio, glob, json, os, sys, time
from coalesce.cache import Cache
from coalesce.errors import LeaderFailedError

url, ns, mode, workdir, procs, callers, barrier = sys.argv[1:8]
procs, callers, barrier = int(procs), int(callers), float(barrier)
cache = Cache(
    url,
    namespace=ns,
    lease_ttl=float(os.environ.get("LEASE_TTL", "2")),
    wait_check=float(os.environ.get("WAIT_CHECK", "1")),
)

def path(name):
    return os.path.join(workdir, name)

def give_up(why):
    sys.stderr.write(f"worker {os.getpid()}: {why} within {barrier} s\n")
    sys.stderr.flush()
    os._exit(3)

def touch(name, text=""):
    tmp = path(f".{name}.tmp")  # no barrier's pattern matches it
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path(name))  # appears complete, never half written

def executed(note):
    fd = os.open(path("executions"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{os.getpid()} {note}\n".encode())
    os.close(fd)

def first():
    try:
        os.close(os.open(path("first"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False

async def all_engaged():
    # the leader finishes only once every process's callers overlap it
    deadline = time.monotonic() + barrier
    while len(glob.glob(path("engaged-*"))) < procs:
        if time.monotonic() > deadline:
            give_up("not every process joined the computation")
        await asyncio.sleep(0.01)

@cache.cached(ttl=30, key="cold:{x}")
async def compute(x):
    executed("start")
    if mode == "kill" and first():
        touch("leader", str(os.getpid()))
        await asyncio.sleep(60)  # the test SIGKILLs us here, once everybody waits
    await all_engaged()
    if mode == "drop" and first():
        touch("leader", str(os.getpid()))
        # computing until the test has cut every pub/sub connection and they are back
        deadline = time.monotonic() + barrier
        while not os.path.exists(path("dropped")):
            if time.monotonic() > deadline:
                give_up("the test did not drop the pub/sub connections")
            await asyncio.sleep(0.01)
    if mode in ("slow", "large", "raise"):
        await asyncio.sleep(0.5)  # a slow computation, as it would be without the barrier
    touch("finished", repr(time.time()))
    if mode == "raise":
        raise ValueError("boom from the leader")
    if mode == "large":  # over PUSH_MAX: announced by a marker, read by the waiters
        return {"x": x, "by": "coalesce", "pad": "p" * 70_000}
    return {"x": x, "by": "coalesce"}

async def call():
    try:
        return ["ok", await compute(7), time.time()]
    except LeaderFailedError as exc:
        return ["leader_failed", exc.exc_type, exc.message, time.time()]
    except Exception as exc:
        return ["error", type(exc).__name__, str(exc), time.time()]

async def engage():
    # engaged: all callers joined this process's flight, which leads or waits for a lease
    deadline = time.monotonic() + barrier
    while True:
        stats = cache.store.stats()
        joined = compute.stats()["misses"] >= callers
        if joined and (stats["leads"] or stats["waits"]):
            touch(f"engaged-{os.getpid()}")
            return
        if time.monotonic() > deadline:
            give_up(f"the callers did not reach the store ({stats})")
        await asyncio.sleep(0.005)

async def main():
    touch(f"ready-{os.getpid()}")
    deadline = time.monotonic() + barrier
    while not os.path.exists(path("go")):
        if time.monotonic() > deadline:
            give_up("no go from the test")
        await asyncio.sleep(0.005)
    watcher = asyncio.ensure_future(engage())
    results = await asyncio.gather(*[call() for _ in range(callers)])
    await watcher
    print(json.dumps({"pid": os.getpid(), "results": results, "stats": cache.store.stats()}))
    await cache.aclose()

asyncio.run(main())
"""


def _spawn(
    url: str,
    ns: str,
    mode: str,
    workdir: Path,
    procs: int = 4,
    callers: int = 25,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    args = [url, ns, mode, str(workdir), str(procs), str(callers), str(BARRIER_TIMEOUT)]
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """`spawn(url, ns, mode, n=4, env=None)`: n workers on `tmp_path`, killed if left over."""
    made: list[subprocess.Popen[str]] = []

    def start(
        url: str, ns: str, mode: str, n: int = 4, env: dict[str, str] | None = None
    ) -> list[subprocess.Popen[str]]:
        procs = [_spawn(url, ns, mode, tmp_path, procs=n, env=env) for _ in range(n)]
        made.extend(procs)
        return procs

    yield start
    for proc in made:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def _wait_for(
    workdir: Path, pattern: str, count: int, procs: list[subprocess.Popen[str]], what: str
) -> None:
    """Wait (bounded) until `count` files match `pattern`; fail early if a worker died."""
    deadline = time.monotonic() + BARRIER_TIMEOUT
    while len(list(workdir.glob(pattern))) < count:
        dead = [p for p in procs if p.poll() is not None]
        assert not dead, f"a worker exited before {what}:\n{dead[0].communicate()[1]}"
        assert time.monotonic() < deadline, f"{what} did not happen within {BARRIER_TIMEOUT} s"
        time.sleep(0.01)


def _start_together(workdir: Path, procs: list[subprocess.Popen[str]]) -> None:
    """The start barrier: every worker has started up; then let them all go at once."""
    _wait_for(workdir, "ready-*", len(procs), procs, "every worker was ready")
    (workdir / "go").write_text("")


def _collect(proc: subprocess.Popen[str], timeout: float = 2 * BARRIER_TIMEOUT) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{err}"
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _executions(workdir: Path) -> list[str]:
    path = workdir / "executions"
    return path.read_text().splitlines() if path.exists() else []


def _finished(workdir: Path) -> float:
    """When the (last) leader's computation ended: the wall clock its worker wrote."""
    return float((workdir / "finished").read_text())


def _only_namespace(url: str, ns: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        stray = [k for k in client.scan_iter(match=f"{ns}*") if not k.startswith(f"{ns}:".encode())]
        assert stray == []
    finally:
        client.close()


@pytest.mark.parametrize("mode", ["slow", "large"])
def test_four_processes_times_25_callers_compute_once(
    redis_url: str, unique_namespace: str, tmp_path: Path, mode: str, spawn: Any
) -> None:
    # waiters re-check Redis only every 30 s: answering within the lease proves the push
    procs = spawn(redis_url, unique_namespace, mode, env={"WAIT_CHECK": "30"})
    _start_together(tmp_path, procs)
    outputs = [_collect(p) for p in procs]
    results = [r for out in outputs for r in out["results"]]
    expected: dict[str, Any] = {"x": 7, "by": "coalesce"}
    if mode == "large":
        expected["pad"] = "p" * 70_000
    assert len(results) == 100
    assert all(r[0] == "ok" and r[1] == expected for r in results), results
    assert len(_executions(tmp_path)) == 1
    assert sum(out["stats"]["leads"] for out in outputs) == 1
    assert sum(out["stats"]["waits"] for out in outputs) == 3  # the other processes waited
    if mode == "large":  # never pushed: every waiting process read it from Redis
        assert sum(out["stats"]["pushed"] for out in outputs) == 0
    else:  # the wake-up carried the entry to every waiting process
        assert sum(out["stats"]["pushed"] for out in outputs) == 3
    # woken by the leader's store, not by a lease running out: every caller had its answer
    # before the 2 s lease could have expired twice (a generous bound for a loaded machine)
    assert max(r[2] for r in results) - _finished(tmp_path) < 2 * LEASE_TTL
    _only_namespace(redis_url, unique_namespace)


def test_sigkill_of_the_leader_hands_over_to_exactly_one_waiter(
    redis_url: str, unique_namespace: str, tmp_path: Path, spawn: Any
) -> None:
    lease_ttl = 1.0
    procs = spawn(redis_url, unique_namespace, "kill", env={"LEASE_TTL": str(lease_ttl)})
    _start_together(tmp_path, procs)
    # kill the leader only once every other process waits for its lease
    _wait_for(tmp_path, "leader", 1, procs, "a worker started computing")
    _wait_for(tmp_path, "engaged-*", len(procs), procs, "every worker joined the computation")
    leader_pid = int((tmp_path / "leader").read_text())
    os.kill(leader_pid, signal.SIGKILL)
    killed_at = time.time()
    survivors = [p for p in procs if p.pid != leader_pid]
    assert len(survivors) == 3
    outputs = [_collect(p) for p in survivors]
    for p in procs:
        if p.pid == leader_pid:
            p.communicate(timeout=10)
            assert p.returncode == -signal.SIGKILL
    results = [r for out in outputs for r in out["results"]]
    assert len(results) == 75
    assert all(r[0] == "ok" and r[1] == {"x": 7, "by": "coalesce"} for r in results), results
    executions = _executions(tmp_path)
    assert len(executions) == 2, executions  # the killed leader, then exactly one takeover
    assert sum(out["stats"]["leads"] for out in outputs) == 1
    assert sum(out["stats"]["takeovers"] for out in outputs) == 1
    # handed over once the 1 s lease ran out (plus at most a 1 s check interval and a wide
    # margin for a loaded machine), long before the killed leader's 60 s computation
    assert max(r[2] for r in results) - killed_at < lease_ttl + 1.0 + 3.0


def test_leader_raising_fails_waiters_in_other_processes_promptly(
    redis_url: str, unique_namespace: str, tmp_path: Path, spawn: Any
) -> None:
    procs = spawn(redis_url, unique_namespace, "raise", env={"WAIT_CHECK": "30"})
    _start_together(tmp_path, procs)
    outputs = [_collect(p) for p in procs]
    assert len(_executions(tmp_path)) == 1  # nobody retried after the leader failed
    by_process = [{tuple(r[:3]) for r in out["results"]} for out in outputs]
    leader = [s for s in by_process if ("error", "ValueError", "boom from the leader") in s]
    waiters = [s for s in by_process if s not in leader]
    assert len(leader) == 1 and len(waiters) == 3
    assert leader[0] == {("error", "ValueError", "boom from the leader")}
    for outcomes in waiters:
        assert outcomes == {("leader_failed", "ValueError", "boom from the leader")}
    assert sum(len(out["results"]) for out in outputs) == 100
    assert sum(out["stats"]["leader_failed"] for out in outputs) == 3
    # told at once, not after the 2 s lease ran out (twice, to allow for a loaded machine)
    finished = [r[-1] for out in outputs for r in out["results"]]
    assert max(finished) - _finished(tmp_path) < 2 * LEASE_TTL
    # a caller arriving after the failure computes afresh instead of inheriting the error
    cache = Cache(redis_url, namespace=unique_namespace)

    @cache.cached(ttl=30, key="cold:{x}")
    def compute(x: int) -> dict[str, Any]:
        return {"x": x, "by": "late"}

    try:
        assert compute(7) == {"x": 7, "by": "late"}
    finally:
        cache.close()


def _subscribers(client: redis.Redis) -> set[int]:
    """Ids of the connections subscribed to both a pattern and a channel: our listeners."""
    return {
        int(c["id"])
        for c in client.client_list(_type="pubsub")
        if c.get("psub") == "1" and c.get("sub") == "1"
    }


def test_a_pubsub_drop_does_not_multiply_computations(
    fresh_redis: Any, unique_namespace: str, tmp_path: Path, spawn: Any
) -> None:
    """Cutting every pub/sub connection (`CLIENT KILL TYPE pubsub`) while one process
    computes and three wait: the listeners come back, the leader's result is stored and
    reaches everyone, and nobody computes the key again (issue 9, item 3: each process used
    to fence all its flights on the drop, so every one of them computed in turn)."""
    procs = spawn(fresh_redis.url, unique_namespace, "drop")
    _start_together(tmp_path, procs)
    _wait_for(tmp_path, "engaged-*", len(procs), procs, "every worker joined the computation")
    _wait_for(tmp_path, "leader", 1, procs, "the leader computes")
    admin = fresh_redis.client()
    try:
        deadline = time.monotonic() + BARRIER_TIMEOUT
        while len(before := _subscribers(admin)) < len(procs):
            assert time.monotonic() < deadline, "not every listener subscribed"
            time.sleep(0.01)
        admin.client_kill_filter(_type="pubsub")
        while len(_subscribers(admin) - before) < len(procs):
            assert time.monotonic() < deadline, "the listeners did not come back"
            time.sleep(0.01)
    finally:
        admin.close()
    (tmp_path / "dropped").write_text("")
    outputs = [_collect(p) for p in procs]
    results = [r for out in outputs for r in out["results"]]
    assert len(results) == 100
    assert all(r[0] == "ok" and r[1] == {"x": 7, "by": "coalesce"} for r in results), results
    assert len(_executions(tmp_path)) == 1, _executions(tmp_path)
    assert sum(out["stats"]["leads"] for out in outputs) == 1
    assert sum(out["stats"]["listener"]["resets"] for out in outputs) >= len(procs)


INVALIDATE_WORKER = r"""
import json, sys, time
from pathlib import Path
from coalesce.cache import Cache
url, ns, workdir = sys.argv[1:4]
cache = Cache(url, namespace=ns)

@cache.cached(ttl=30, key="doc")
def load():
    version = Path(workdir, "version").read_text()
    Path(workdir, "started").write_text("1")
    deadline = time.time() + 30
    while not Path(workdir, "invalidated").exists() and time.time() < deadline:
        time.sleep(0.005)  # until the test has invalidated the key
    return version

print(json.dumps({"value": load(), "stats": cache.store.stats()}))
cache.close()
"""


def test_invalidate_from_another_process_while_computing_fences_the_stale_result(
    redis_url: str, unique_namespace: str, tmp_path: Path
) -> None:
    (tmp_path / "version").write_text("v1")
    proc = subprocess.Popen(
        [sys.executable, "-c", INVALIDATE_WORKER, redis_url, unique_namespace, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    deadline = time.time() + 10
    while not (tmp_path / "started").exists():
        assert time.time() < deadline and proc.poll() is None, "the worker did not start"
        time.sleep(0.01)
    cache = Cache(redis_url, namespace=unique_namespace)

    @cache.cached(ttl=30, key="doc")
    def load() -> str:
        return (tmp_path / "version").read_text()

    try:
        (tmp_path / "version").write_text("v2")
        cache.invalidate("doc")
        (tmp_path / "invalidated").write_text("1")
        out = _collect(proc)
        assert out["value"] == "v1"  # its own caller gets what it computed ...
        assert out["stats"]["fenced"] == 1  # ... but it was not stored
        assert load() == "v2"
        entry = cache.get_entry("doc")
        assert entry is not None and entry.value == "v2"
    finally:
        cache.close()


@pytest.mark.parametrize("mode", ["slow"])
def test_waiters_need_few_redis_commands(
    fresh_redis: Any, unique_namespace: str, tmp_path: Path, mode: str, spawn: Any
) -> None:
    """The stampede costs at most about one Redis command per caller (issue: speed)."""
    client = fresh_redis.client()
    client.config_resetstat()
    procs = spawn(fresh_redis.url, unique_namespace, mode)
    _start_together(tmp_path, procs)
    for p in procs:
        _collect(p)
    stats = client.info("commandstats")
    client.close()
    calls = sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_info", "cmdstat_config"))
    assert calls <= 100, stats
