"""Cross-process single-flight on a real Redis: several OS processes, one computation.

Each worker is a fresh `python -c` process (no fork: every process has its own clients and
listener) running `WORKER` below: it waits for a common start time, fires its callers at one
cold key at once and prints every caller's outcome as JSON. Executions are counted by
appending to a file, so counting writes nothing to Redis.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from coalesce.cache import Cache

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import asyncio, json, os, sys, time
from coalesce.cache import Cache
from coalesce.errors import LeaderFailedError

url, ns, mode, workdir, start_at, callers = sys.argv[1:7]
start_at, callers = float(start_at), int(callers)
cache = Cache(url, namespace=ns, lease_ttl=float(os.environ.get("LEASE_TTL", "2")))

def executed(note):
    fd = os.open(os.path.join(workdir, "executions"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{os.getpid()} {note}\n".encode())
    os.close(fd)

def first():
    try:
        os.close(os.open(os.path.join(workdir, "first"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False

@cache.cached(ttl=30, key="cold:{x}")
async def compute(x):
    executed("start")
    if mode in ("slow", "large"):
        await asyncio.sleep(0.5)
    elif mode == "kill":
        if first():
            open(os.path.join(workdir, "leader"), "w").write(str(os.getpid()))
            await asyncio.sleep(30)  # the test SIGKILLs us here
        await asyncio.sleep(0.05)
    elif mode == "raise":
        await asyncio.sleep(0.5)
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

async def main():
    await asyncio.sleep(max(0.0, start_at - time.time()))
    results = await asyncio.gather(*[call() for _ in range(callers)])
    print(json.dumps({"pid": os.getpid(), "results": results, "stats": cache.store.stats()}))
    await cache.aclose()

asyncio.run(main())
"""


def _spawn(
    url: str,
    ns: str,
    mode: str,
    workdir: Path,
    start_at: float,
    callers: int = 25,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, url, ns, mode, str(workdir), str(start_at), str(callers)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def _collect(proc: subprocess.Popen[str], timeout: float = 20.0) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{err}"
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _executions(workdir: Path) -> list[str]:
    path = workdir / "executions"
    return path.read_text().splitlines() if path.exists() else []


def _only_namespace(url: str, ns: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        stray = [k for k in client.scan_iter(match=f"{ns}*") if not k.startswith(f"{ns}:".encode())]
        assert stray == []
    finally:
        client.close()


@pytest.mark.parametrize("mode", ["slow", "large"])
def test_four_processes_times_25_callers_compute_once(
    redis_url: str, unique_namespace: str, tmp_path: Path, mode: str
) -> None:
    start_at = time.time() + 1.5  # every worker has imported everything by then
    procs = [_spawn(redis_url, unique_namespace, mode, tmp_path, start_at) for _ in range(4)]
    outputs = [_collect(p) for p in procs]
    results = [r for out in outputs for r in out["results"]]
    expected: dict[str, Any] = {"x": 7, "by": "coalesce"}
    if mode == "large":
        expected["pad"] = "p" * 70_000
    assert len(results) == 100
    assert all(r[0] == "ok" and r[1] == expected for r in results), results
    assert len(_executions(tmp_path)) == 1
    if mode == "large":  # never pushed: every waiting process read it from Redis
        assert sum(out["stats"]["pushed"] for out in outputs) == 0
    # the slowest caller finished within the computation's time plus a margin
    assert max(r[2] for r in results) - start_at < 0.5 + 0.5
    assert sum(out["stats"]["leads"] for out in outputs) == 1
    _only_namespace(redis_url, unique_namespace)


def test_sigkill_of_the_leader_hands_over_to_exactly_one_waiter(
    redis_url: str, unique_namespace: str, tmp_path: Path
) -> None:
    start_at = time.time() + 1.5
    env = {"LEASE_TTL": "1.0"}
    procs = [
        _spawn(redis_url, unique_namespace, "kill", tmp_path, start_at, env=env) for _ in range(4)
    ]
    leader_file = tmp_path / "leader"
    deadline = time.time() + 10
    while not leader_file.exists() or not leader_file.read_text():
        assert time.time() < deadline, "no process started computing"
        time.sleep(0.01)
    leader_pid = int(leader_file.read_text())
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
    assert sum(out["stats"]["takeovers"] for out in outputs) == 1
    # handed over within the lease time (1 s) plus the waiters' check interval
    assert max(r[2] for r in results) - killed_at < 2.5


def test_leader_raising_fails_waiters_in_other_processes_promptly(
    redis_url: str, unique_namespace: str, tmp_path: Path
) -> None:
    start_at = time.time() + 1.5
    procs = [_spawn(redis_url, unique_namespace, "raise", tmp_path, start_at) for _ in range(4)]
    outputs = [_collect(p) for p in procs]
    assert len(_executions(tmp_path)) == 1  # nobody retried after the leader failed
    by_process = [{tuple(r[:3]) for r in out["results"]} for out in outputs]
    leader = [s for s in by_process if ("error", "ValueError", "boom from the leader") in s]
    waiters = [s for s in by_process if s not in leader]
    assert len(leader) == 1 and len(waiters) == 3
    for outcomes in waiters:
        assert outcomes == {("leader_failed", "ValueError", "boom from the leader")}
    finished = [r[-1] for out in outputs for r in out["results"]]
    assert max(finished) - start_at < 0.5 + 0.5  # at once, not after computing themselves
    # a caller arriving after the failure computes afresh instead of inheriting the error
    cache = Cache(redis_url, namespace=unique_namespace)

    @cache.cached(ttl=30, key="cold:{x}")
    def compute(x: int) -> dict[str, Any]:
        return {"x": x, "by": "late"}

    try:
        assert compute(7) == {"x": 7, "by": "late"}
    finally:
        cache.close()


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
    time.sleep(0.8)  # the test invalidates meanwhile
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
    fresh_redis: Any, unique_namespace: str, tmp_path: Path, mode: str
) -> None:
    """The stampede costs at most about one Redis command per caller (issue: speed)."""
    client = fresh_redis.client()
    client.config_resetstat()
    start_at = time.time() + 1.5
    procs = [_spawn(fresh_redis.url, unique_namespace, mode, tmp_path, start_at) for _ in range(4)]
    for p in procs:
        _collect(p)
    stats = client.info("commandstats")
    client.close()
    calls = sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_info", "cmdstat_config"))
    assert calls <= 100, stats
