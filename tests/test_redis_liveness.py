"""Liveness of the Redis lease protocol (issue 9): no computation twice at expiry, no caller
held up by a foreign lease value, a pub/sub drop or an invalidation storm.

Two `Cache` instances in one process meet only in Redis, like two processes; the storm test
uses real OS processes. Every wait is bounded; stalls are handshakes, not sleeps.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from coalesce.cache import Cache
from coalesce.stores.redis import RedisStore
from coalesce.stores.redis.scripts import CLAIM, STORE

WAIT = 10.0  # seconds any handshake waits before the test fails


class CountingRedis(redis.Redis):
    """A sync client that records the name of every command it sends (one per round trip)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[str] = []

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(str(args[0]).lower())
        return super().execute_command(*args, **options)


def _store(cache: Cache) -> RedisStore:
    store = cache.store
    assert isinstance(store, RedisStore)
    return store


def _until(condition: Callable[[], bool], what: str) -> None:
    """Wait (a bounded poll, not a timing assertion) until `condition()` holds."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.002)


# -- item 2: the first claim checks the entry ----------------------------------------------


def test_a_miss_costs_one_get_one_claim_and_one_store(
    redis_url: str, unique_namespace: str
) -> None:
    """The leader's check again is the `CLAIM` itself: no separate `GET` on a miss."""
    client = CountingRedis.from_url(redis_url)
    for script in (CLAIM, STORE):
        client.script_load(script.source)  # no NOSCRIPT retry among the counted commands
    cache = Cache(redis_url, namespace=unique_namespace, client=client)
    try:

        @cache.cached(ttl=30, key="k")
        def k() -> int:
            return 1

        client.sent.clear()
        assert k() == 1
        assert client.sent == ["get", "evalsha", "evalsha"]  # GET, CLAIM, STORE
        client.sent.clear()
        assert k() == 1
        assert client.sent == ["evalsha"]  # after a miss the claim reads (test_miss_streak)
        client.sent.clear()
        assert k() == 1
        assert client.sent == ["get"]  # a hit is one GET
    finally:
        cache.close()
        client.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_entry_stored_just_before_the_claim_is_not_computed_again(
    redis_caches: Callable[..., Cache], kind: str
) -> None:
    """b misses, stalls before its first `CLAIM` while a computes and stores the entry, then
    claims: the claim finds the entry, so b does not compute it a second time."""
    a, b = redis_caches(), redis_caches()
    at_claim, go = threading.Event(), threading.Event()
    store = _store(b)
    calls: list[str] = []

    def stall() -> None:
        if not at_claim.is_set():
            at_claim.set()
            assert go.wait(WAIT)

    real_script, real_ascript = store._conn.script, store._conn.ascript

    def script(script: Any, keys: Any, args: Any) -> Any:
        if script is CLAIM:
            stall()
        return real_script(script, keys, args)

    async def ascript(script: Any, keys: Any, args: Any) -> Any:
        if script is CLAIM:
            await asyncio.to_thread(stall)
        return await real_ascript(script, keys, args)

    store._conn.script = script  # type: ignore[method-assign]
    store._conn.ascript = ascript  # type: ignore[method-assign]

    @a.cached(ttl=30, key="k")
    def fa() -> str:
        calls.append("a")
        return "a"

    if kind == "sync":

        @b.cached(ttl=30, key="k")
        def fb() -> str:
            calls.append("b")
            return "b"

        call: Callable[[], str] = fb
    else:

        @b.cached(ttl=30, key="k")
        async def afb() -> str:
            calls.append("b")
            return "b"

        def call() -> str:
            return asyncio.run(afb())

    got: list[str] = []
    thread = threading.Thread(target=lambda: got.append(call()))
    thread.start()
    assert at_claim.wait(WAIT)  # b missed and is about to claim
    assert fa() == "a"  # meanwhile a computes and stores
    go.set()
    thread.join(WAIT)
    assert got == ["a"] and calls == ["a"]


# -- items 4 and 5: foreign lease values ---------------------------------------------------

FOREIGN_LEASES = {
    # item 4: bytes that are not UTF-8, with an ordinary expiry
    "not-utf8": (b"\xff\xfe\x80 not a token", 300),
    # item 5: a token-like value without expiry, and one with an expiry far above the lease
    "no-expiry": (b"0123456789abcdef0123456789abcdef", None),
    "an-hour": (b"0123456789abcdef0123456789abcdef", 3_600_000),
    "text-no-expiry": (b"held by hand", None),
}
LEASE_TTL = 0.3  # the takeover must come within about one lease time; asserted: 10 of them


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("foreign", sorted(FOREIGN_LEASES))
def test_a_foreign_lease_is_taken_over_within_a_lease_time(
    redis_caches: Callable[..., Cache], redis_url: str, foreign: str, kind: str
) -> None:
    """A value under the lease key that is not a lease of ours (bytes that are not UTF-8, a
    lease that never expires or only in an hour) neither raises nor blocks: the caller
    computes within a bound, stores its entry, and the foreign value is gone."""
    cache = redis_caches(lease_ttl=LEASE_TTL)
    value, px = FOREIGN_LEASES[foreign]
    raw = redis.Redis.from_url(redis_url)
    lease_key = f"{cache.namespace}:{{k}}:lease"
    raw.set(lease_key, value, px=px)
    calls: list[int] = []

    if kind == "sync":

        @cache.cached(ttl=30, key="k")
        def k() -> int:
            calls.append(1)
            return 7

        call: Callable[[], int] = k
    else:

        @cache.cached(ttl=30, key="k")
        async def ak() -> int:
            calls.append(1)
            return 7

        def call() -> int:
            return asyncio.run(ak())

    got: list[Any] = []

    def run() -> None:
        try:
            got.append(call())
        except BaseException as exc:  # reported below, not lost in the thread
            got.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)  # daemon: the old code never returns
    thread.start()
    thread.join(10 * LEASE_TTL + 5)
    elapsed = time.monotonic() - started
    try:
        assert got == [7], f"after {elapsed:.1f} s: {got}"
        assert elapsed < 10 * LEASE_TTL, elapsed  # within about one lease time (generous)
        assert calls == [1]
        assert raw.get(lease_key) is None  # our lease ended with our store
        entry = cache.get_entry("k")
        assert entry is not None and entry.value == 7
    finally:
        raw.delete(lease_key)
        raw.close()


def test_a_value_of_another_type_under_the_lease_key_is_foreign(
    redis_caches: Callable[..., Cache], redis_url: str
) -> None:
    """A hash under the lease key (no expiry): the call computes without an error and
    without waiting long, as for any foreign lease."""
    cache = redis_caches(lease_ttl=LEASE_TTL, on_backend_error="raise")
    raw = redis.Redis.from_url(redis_url)
    lease_key = f"{cache.namespace}:{{k}}:lease"
    raw.hset(lease_key, "field", "not a lease")

    @cache.cached(ttl=30, key="k")
    def k() -> int:
        return 7

    started = time.monotonic()
    try:
        assert k() == 7
        assert time.monotonic() - started < 10 * LEASE_TTL
        entry = cache.get_entry("k")
        assert entry is not None and entry.value == 7
    finally:
        raw.delete(lease_key)
        raw.close()


# -- item 3: a pub/sub drop detaches, the lease token fences ---------------------------------


def test_an_invalidation_missed_while_the_listener_is_down_still_fences(
    fresh_redis: Any, unique_namespace: str
) -> None:
    """The listener of `a` is cut and kept from reconnecting while `a` computes; `b`
    invalidates the key meanwhile (a broadcast `a` never hears). `a`'s result still reaches
    its own caller but is not stored, and a caller of `a` arriving after the invalidation
    gets a new computation, not the old one: a drop detaches the flights, and the
    invalidation deleted the lease that the old computation's store needed."""
    a = Cache(fresh_redis.url, namespace=unique_namespace)
    b = Cache(fresh_redis.url, namespace=unique_namespace)
    admin = fresh_redis.client()
    version = ["v1"]
    started, release, down, back = (threading.Event() for _ in range(4))

    @a.cached(ttl=30, key="doc")
    def load() -> str:
        value = version[0]
        if not started.is_set():
            started.set()
            assert release.wait(WAIT)
        return value

    listener = _store(a)._listener
    try:
        first: list[str] = []
        leader = threading.Thread(target=lambda: first.append(load()))
        leader.start()
        assert started.wait(WAIT) and listener.ready.wait(WAIT)
        connect = listener._connect

        def held_connect() -> Any:
            down.set()
            assert back.wait(WAIT)
            return connect()

        listener._connect = held_connect
        admin.client_kill_filter(_type="pubsub")
        assert down.wait(WAIT)  # the listener is down and cannot come back yet
        version[0] = "v2"
        assert b.invalidate("doc") is False  # nothing stored yet; the lease is deleted
        assert load() == "v2"  # arrived after the invalidation: a new computation
        back.set()
        release.set()
        leader.join(WAIT)
        assert first == ["v1"]  # the old computation answers its own caller ...
        assert _store(a).stats()["fenced"] == 1  # ... and its store was refused
        entry = a.get_entry("doc")
        assert entry is not None and entry.value == "v2"
        assert load() == "v2"
    finally:
        back.set()
        release.set()
        admin.close()
        a.close()
        b.close()


# -- item 1: an invalidation storm starves nobody -------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
COMPUTE = 0.07  # seconds one computation of the hot key takes
STORM = 3.0  # seconds the storm lasts (without the handover, callers waited until its end)
EVERY = 0.05  # seconds between two invalidations

STORM_WORKER = r"""
import json, os, sys, threading, time
from coalesce.cache import Cache

url, ns, workdir, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cache = Cache(url, namespace=ns)
store = cache.store
heard = []  # when this process had fenced its flights for each invalidation it heard of
fence = store.on_invalidated

def hook(key):
    fence(key)
    heard.append(time.time())

store.on_invalidated = hook

@cache.cached(ttl=30, key="hot")
def hot():
    with open(os.path.join(workdir, "version")) as f:
        version = int(f.read())
    time.sleep(COMPUTE)  # the computation itself
    return version

calls = []

def caller(until):
    while time.time() < until:
        started = time.time()
        value = hot()
        calls.append((started, time.time(), value))

store._listener.start()
if not store._listener.ready.wait(10):
    sys.exit("the listener did not subscribe")
open(os.path.join(workdir, f"ready-{os.getpid()}"), "w").close()
deadline = time.monotonic() + 30
while not os.path.exists(os.path.join(workdir, "go")):
    if time.monotonic() > deadline:
        sys.exit("no go from the test")
    time.sleep(0.005)
until = float(open(os.path.join(workdir, "go")).read())
workers = [threading.Thread(target=caller, args=(until,)) for _ in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
print(json.dumps({"calls": calls, "heard": heard}))
cache.close()
""".replace("COMPUTE", repr(COMPUTE))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name)
    tmp.write_text(text)
    os.replace(tmp, path)  # readers never see it half written


def test_an_invalidation_storm_starves_no_caller(
    redis_url: str, unique_namespace: str, tmp_path: Path
) -> None:
    """One hot key invalidated every 50 ms, computing in 70 ms, called by four processes (one
    with 8 threads, three with 2): every caller is answered within a small multiple of one
    computation, and never with a value older than an invalidation its process had heard of
    before the call (the exact rule: the n-th invalidation a process's listener passed on
    fenced its flights before it was recorded, so calls starting later respect it).

    Issue 9, item 1: a flight fenced by an invalidation waited on other processes' leases,
    every one deleted before its computation ended, until the storm stopped (seconds)."""
    _write(tmp_path / "version", "0")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", STORM_WORKER, redis_url, unique_namespace, str(tmp_path), n],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for n in ("8", "2", "2", "2")
    ]
    cache = Cache(redis_url, namespace=unique_namespace)
    try:
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("ready-*"))) < len(procs):
            dead = [p for p in procs if p.poll() is not None]
            assert not dead, dead[0].communicate()[1]
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.01)
        until = time.time() + STORM
        _write(tmp_path / "go", repr(until))
        invalidated: list[tuple[int, float]] = []  # (version, when the invalidation returned)
        version = 0
        while time.time() < until:
            version += 1
            _write(tmp_path / "version", str(version))
            cache.invalidate("hot")
            invalidated.append((version, time.time()))
            time.sleep(EVERY)  # the storm's own pace, not a wait for anything
        outputs = []
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        cache.close()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)
    waits = []
    for out in outputs:
        heard = out["heard"]
        # every invalidation reached every process, but the last one may land after the
        # process stopped calling and reported (the storm ends when the calls do)
        assert len(invalidated) - 1 <= len(heard) <= len(invalidated)
        for started, ended, value in out["calls"]:
            waits.append(ended - started)
            known = bisect.bisect_left(heard, started)  # invalidations heard before the call
            required = invalidated[known - 1][0] if known else 0
            assert value >= required, (started, value, required)
    assert len(waits) > 100
    slowest = max(waits)
    # one computation plus a lease handover, with room for a loaded two-core machine (here:
    # at most 0.2 s); without the handover the slowest callers waited 0.75 to 2.3 s
    assert slowest < 8 * COMPUTE, f"slowest caller waited {slowest:.2f} s"


def test_a_foreign_value_under_the_failure_marker_is_no_failure(
    redis_caches: Callable[..., Cache], redis_url: str
) -> None:
    """A waiter re-claims with the holder's token to look for its failure marker; a value of
    another type under that marker key (a hash) is no marker: the waiter takes over when the
    lease ends, without a store error."""
    cache = redis_caches(lease_ttl=LEASE_TTL)
    raw = redis.Redis.from_url(redis_url)
    holder = "0123456789abcdef0123456789abcdef"
    raw.set(f"{cache.namespace}:{{k}}:lease", holder, px=300)  # a leader elsewhere
    raw.hset(f"{cache.namespace}:{{k}}:failed", "x", "1")  # foreign data under the marker

    @cache.cached(ttl=30, key="k")
    def k() -> int:
        return 7

    assert k() == 7
    assert k.stats()["backend_errors"] == 0
    raw.close()


def test_a_fenced_leader_whose_lease_survived_hands_nothing(
    redis_caches: Callable[..., Cache], redis_url: str
) -> None:
    """A leader fenced in its process while its lease survives (here: the invalidation's
    delete never reached Redis) must not hand its pre-invalidation result to the callers
    that arrive after the invalidation: they compute afresh."""
    cache = redis_caches(lease_ttl=2.0)
    db = {"v": "v1"}
    computing, release = threading.Event(), threading.Event()

    @cache.cached(ttl=30, key="doc")
    def doc() -> str:
        value = db["v"]
        if not computing.is_set():
            computing.set()
            release.wait(WAIT)
        return value

    got: list[str] = []
    leader = threading.Thread(target=lambda: got.append(doc()))
    leader.start()
    assert computing.wait(WAIT)
    db["v"] = "v2"
    cache._fence(cache.prefix + "doc")  # the invalidation fenced it here; Redis never heard
    later: list[str] = []
    follower = threading.Thread(target=lambda: later.append(doc()))
    follower.start()  # arrives after the invalidation: waits on the surviving lease
    raw = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + WAIT
    while not raw.exists(f"{cache.namespace}:{{doc}}:waiters"):  # it waits on the lease
        assert time.monotonic() < deadline, "the follower never waited"
        time.sleep(0.005)
    raw.close()
    release.set()
    leader.join(WAIT)
    follower.join(WAIT)
    assert got == ["v1"]  # the fenced leader answers its own caller
    assert later == ["v2"]  # never the result computed before the invalidation
