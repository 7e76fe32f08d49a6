"""The Redis miss path, counted command by command, and early refresh, on real servers.

Issue 10 ("a cheap miss"): a miss on a `RedisStore` costs three round trips, the caller's
`GET`, one `CLAIM` script (which takes the lease *and* reads the entry, atomically) and one
`STORE` script (fenced write and wake-up); a hit costs one `GET`, none with a near cache.
(The misses that follow a miss skip the `GET`: `tests/test_miss_streak.py`.)
The commands are seen through a `MONITOR` connection to a server of the test's own, so a
round trip added back anywhere (core or store) fails these tests. Commands run by the
scripts themselves (Lua) are not round trips and are left out.

Issue 11's hook: `fill(..., refresh=True)` recomputes a fresh entry early, once across
processes; a caller that finds somebody already refreshing gets the stored entry at once.
Two caches made by `redis_caches` meet only in Redis, like two processes.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from redis_servers import RedisServer
from test_redis_tags import Blocked, _release_blocked, _store  # noqa: F401  (autouse fixture)
from test_redis_tags import _entry as tagged_entry

from coalesce.cache import Cache
from coalesce.entry import Entry
from coalesce.stores.base import Fence
from coalesce.stores.redis import RedisStore
from coalesce.stores.redis.scripts import CLAIM, CLAIM_MANY, DELETE, STORE, STORE_MANY

Caches = Callable[..., Cache]

_SCRIPTS = {
    script.sha: script.name.upper() for script in (CLAIM, STORE, DELETE, CLAIM_MANY, STORE_MANY)
}
_MARK = "coalesce-test-mark"


def _monitored(line: Any) -> dict[str, Any]:
    r"""One line of `MONITOR` (`<time> [<db> <client>] "<arg>" "<arg>" ...`) as the command
    (its arguments joined by spaces), who ran it (`"lua"` for a script) and its number of
    arguments. Each argument is quoted with `\\`, `\"` and `\xNN` escapes (Redis's
    `sdscatrepr`), so counting the quoted parts counts arguments whatever bytes they hold;
    redis-py's own `next_command` joins them unquoted, and its text cannot be split again
    when a value holds a space or a quote."""
    text = line.decode("utf-8", "backslashreplace") if isinstance(line, bytes) else line
    header, _, quoted = text.partition("] ")
    args: list[str] = []
    start = quoted.find('"')
    while start >= 0:
        end = start + 1
        while quoted[end] != '"':
            end += 2 if quoted[end] == "\\" else 1
        args.append(quoted[start + 1 : end])
        start = quoted.find('"', end + 1)
    client = header.rsplit(" ", 1)[-1]
    return {"command": " ".join(args), "client_type": client, "args": len(args)}


class Commands:
    """The commands a server runs, read from a `MONITOR` connection on a thread.

    `during(action)` returns the commands run between two marks (an `ECHO` sent from a
    connection of its own before and after `action`): MONITOR reports commands in the order
    the server runs them, so once the second mark is seen every command `action` sent has
    been seen too. Scripts show as their names (`CLAIM`), other commands as their name
    (`GET`); the commands scripts run (Lua) are left out: they cost no round trip.
    """

    def __init__(self, server: RedisServer) -> None:
        self._marker = server.client()
        self._seen: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._monitor = server.client().monitor()
        self._monitor.__enter__()  # sends MONITOR and checks its OK
        self._stop = f"{_MARK}-stop-{uuid.uuid4().hex}"
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                command = _monitored(self._monitor.connection.read_response())
                with self._cond:
                    self._seen.append(command)
                    self._cond.notify_all()
                if command["command"] == f"ECHO {self._stop}":
                    return
        finally:
            self._monitor.__exit__()

    def _mark(self) -> int:
        """Send a mark; the index in `_seen` just after it, once seen."""
        text = f"{_MARK}-{uuid.uuid4().hex}"
        self._marker.echo(text)
        with self._cond:
            found = self._cond.wait_for(
                lambda: any(c["command"] == f"ECHO {text}" for c in self._seen), timeout=10
            )
            assert found, "the MONITOR connection never reported a mark"
            return next(i for i, c in enumerate(self._seen) if c["command"] == f"ECHO {text}")

    def arguments(self, action: Callable[[], Any]) -> dict[str, int]:
        """How many arguments each round trip of `action` sent (its command and, for a
        script, its SHA and key count included), by name (as `during`)."""
        start = self._mark()
        action()
        end = self._mark()
        with self._cond:
            window = [c["args"] for c in self._seen[start + 1 : end] if c["client_type"] != "lua"]
        return dict(zip(self._names(start, end), window, strict=True))

    def _names(self, start: int, end: int, lua: bool = False) -> list[str]:
        names = []
        with self._cond:
            window = self._seen[start + 1 : end]
        for command in window:
            if command["client_type"] == "lua" and not lua:
                continue
            words = command["command"].split()
            name = words[0].upper()
            if name in ("EVALSHA", "EVAL"):
                name = _SCRIPTS.get(words[1], f"EVALSHA {words[1][:8]}")
            names.append(name)
        return names

    def during(self, action: Callable[[], Any], *, lua: bool = False) -> list[str]:
        """The round trips of `action`; with `lua`, also the commands its scripts ran."""
        start = self._mark()
        action()
        return self._names(start, self._mark(), lua)

    async def aduring(self, action: Callable[[], Awaitable[Any]]) -> list[str]:
        start = self._mark()  # blocks the loop briefly: nothing else runs on it meanwhile
        await action()
        return self._names(start, self._mark())

    def close(self) -> None:
        self._marker.echo(self._stop)
        self._thread.join(10)
        self._marker.close()


@pytest.fixture
def commands(fresh_redis: RedisServer) -> Iterator[Commands]:
    seen = Commands(fresh_redis)
    yield seen
    seen.close()


@pytest.fixture
def own_caches(fresh_redis: RedisServer, unique_namespace: str) -> Iterator[Caches]:
    """`redis_caches` on the test's own server (the one `commands` watches)."""
    made: list[Cache] = []

    def make(**options: Any) -> Cache:
        cache = Cache(fresh_redis.url, namespace=unique_namespace, **options)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


def _entry(value: Any, ttl: float = 30.0) -> Entry:
    return tagged_entry(value, (), ttl)


class Counted:
    """A computation that returns at once, counting its calls."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> Entry:
        self.calls += 1
        return _entry(self.value)

    async def acall(self) -> Entry:
        return self()


def _in_thread(target: Callable[[], Entry]) -> tuple[threading.Thread, list[Entry]]:
    got: list[Entry] = []
    thread = threading.Thread(target=lambda: got.append(target()), daemon=True)
    thread.start()
    return thread, got


def _two_stores(caches: Caches, stored: Any = None) -> tuple[RedisStore, RedisStore, str]:
    """The stores of two caches (like two processes) and a key, with `stored` under it."""
    sa, sb = _store(caches()), _store(caches())
    key = sa.namespace + ":user:1"
    if stored is not None:
        sa.set(key, _entry(stored))
    return sa, sb, key


def _computing(
    store: RedisStore, key: str, value: Any, *, refresh: bool = True
) -> tuple[Blocked, threading.Thread, list[Entry]]:
    """`store.fill(key, ...)` on a thread, returned once its computation of `value` runs."""
    compute = Blocked(value, ())
    thread, got = _in_thread(lambda: store.fill(key, compute, fence=Fence(), refresh=refresh))
    assert compute.started.wait(10)
    return compute, thread, got


MISS = ["GET", "CLAIM", "STORE"]


# -- round trips of a miss and a hit --------------------------------------------------------


@pytest.mark.parametrize("near", [False, True], ids=["plain", "near-cache"])
def test_sync_miss_is_get_claim_store(own_caches: Caches, commands: Commands, near: bool) -> None:
    cache = own_caches(**({"local_maxsize": 100} if near else {}))
    calls: list[int] = []

    @cache.cached(ttl=60)
    def load(user_id: int) -> dict[str, int]:
        calls.append(user_id)
        return {"id": user_id}

    assert load(0) == {"id": 0}  # connections, listener, scripts loaded: not counted
    assert load(0) == {"id": 0}  # a hit: the next miss reads first (see test_miss_streak)
    assert commands.during(lambda: load(1)) == MISS
    assert commands.during(lambda: load(1)) == ([] if near else ["CLAIM"])  # after a miss
    assert commands.during(lambda: load(1)) == ([] if near else ["GET"])
    assert calls == [0, 1]


@pytest.mark.parametrize("near", [False, True], ids=["plain", "near-cache"])
async def test_async_miss_is_get_claim_store(
    own_caches: Caches, commands: Commands, near: bool
) -> None:
    cache = own_caches(**({"local_maxsize": 100} if near else {}))
    calls: list[int] = []

    @cache.cached(ttl=60)
    async def load(user_id: int) -> dict[str, int]:
        calls.append(user_id)
        return {"id": user_id}

    assert await load(0) == {"id": 0}  # this loop's connection, listener, scripts
    assert await load(0) == {"id": 0}  # a hit: the next miss reads first
    assert await commands.aduring(lambda: load(1)) == MISS
    assert await commands.aduring(lambda: load(1)) == ([] if near else ["CLAIM"])
    assert await commands.aduring(lambda: load(1)) == ([] if near else ["GET"])
    assert calls == [0, 1]
    await cache.aclose()


def test_get_or_set_miss_is_get_claim_store(own_caches: Caches, commands: Commands) -> None:
    cache = own_caches()
    assert cache.get_or_set("warm", lambda: 0, ttl=60) == 0
    assert commands.during(lambda: cache.get_or_set("user:1", lambda: 1, ttl=60)) == MISS
    assert commands.during(lambda: cache.get_or_set("user:1", lambda: 2, ttl=60)) == ["GET"]


def test_checks_in_fill_only_without_a_near_cache(own_caches: Caches, commands: Commands) -> None:
    """`checks_in_fill`: `fill` alone (no `get` first) is one `CLAIM` that serves an entry
    stored meanwhile, and a `CLAIM` and a `STORE` for a miss; with a near cache it is False
    (`get` may answer without any I/O)."""
    store = _store(own_caches())
    assert store.checks_in_fill is True
    assert _store(own_caches(local_maxsize=10)).checks_in_fill is False
    key = store.namespace + ":user:"
    store.fill(key + "0", Counted(0), fence=Fence())  # scripts loaded, listener started
    store.set(key + "1", _entry("stored"))
    compute = Counted("computed")
    got: list[Entry] = []
    assert commands.during(lambda: got.append(store.fill(key + "1", compute, fence=Fence()))) == [
        "CLAIM"
    ]
    assert got[0].value == "stored" and compute.calls == 0
    assert commands.during(lambda: store.fill(key + "2", compute, fence=Fence())) == [
        "CLAIM",
        "STORE",
    ]
    assert compute.calls == 1


def test_a_miss_sends_the_scripts_only_what_every_miss_needs(
    own_caches: Caches, commands: Commands
) -> None:
    """Issue 10: each argument costs the client (redis-py packs it) and the server (Lua
    builds it). A first `CLAIM` without tags sends KEYS entry, lease, waiters and ARGV token,
    lease ms, mode; a `STORE` without tags KEYS entry, lease, waiters, handed and ARGV token,
    data, px, handed ms (see `scripts`): the rest only when a wait or tags need it."""
    store = _store(own_caches())
    key = store.namespace + ":user:"
    store.fill(key + "0", Counted(0), fence=Fence())  # scripts loaded, listener started
    sent = commands.arguments(lambda: store.fill(key + "1", Counted(1), fence=Fence()))
    assert sent == {"CLAIM": 3 + 3 + 3, "STORE": 3 + 4 + 4}


def test_a_miss_runs_few_commands_inside_its_scripts(
    own_caches: Caches, commands: Commands
) -> None:
    """Each command a script runs costs the server a call: a miss nobody waits for takes its
    free lease with one `SET NX` and ends it with one `DEL` (of the lease and the waiters'
    flag together)."""
    store = _store(own_caches())
    key = store.namespace + ":user:"
    store.fill(key + "0", Counted(0), fence=Fence())  # scripts loaded, listener started
    ran = commands.during(lambda: store.fill(key + "1", Counted(1), fence=Fence()), lua=True)
    assert sorted(ran) == sorted(["CLAIM", "GET", "SET", "STORE", "GET", "DEL", "SET"])


def test_a_miss_nobody_waits_for_publishes_no_wake_up(
    own_caches: Caches, commands: Commands
) -> None:
    """Every process of the namespace hears every wake-up (one pattern subscription each):
    `STORE` and `STORE_MANY` publish one only when a waiter flagged the lease, and a plain
    `set` only while somebody waits for a lease of its key (`test_redis_store` checks that
    waiters still get theirs)."""
    store = _store(own_caches())
    key = store.namespace + ":user:"
    store.fill(key + "0", Counted(0), fence=Fence())  # scripts loaded, listener started
    single = commands.during(lambda: store.fill(key + "1", Counted(1), fence=Fence()), lua=True)
    assert "STORE" in single and "PUBLISH" not in single
    plain = commands.during(lambda: store.set(key + "2", _entry(2)), lua=True)
    assert "STORE" in plain and "PUBLISH" not in plain
    keys = [key + "3", key + "4"]
    batch = commands.during(
        lambda: store.fill_many(
            keys,
            lambda todo: {k: _entry(k) for k in todo},
            fences={k: Fence() for k in keys},
            tags={k: () for k in keys},
        ),
        lua=True,
    )
    assert "STORE_MANY" in batch and "PUBLISH" not in batch
    assert [store.get(k).value for k in keys] == keys  # type: ignore[union-attr]


def test_refresh_round_trips(own_caches: Caches, commands: Commands) -> None:
    """An early refresh: CLAIM and STORE; one that finds somebody refreshing: CLAIM only."""
    sa, sb, key = _two_stores(own_caches, "old")
    for store in (sa, sb):  # listeners and scripts: not counted
        store.fill(key + ":warm", Counted("warm"), fence=Fence(), refresh=True)
    renewed = Counted("new")
    seen = commands.during(lambda: sa.fill(key, renewed, fence=Fence(), refresh=True))
    assert seen == ["CLAIM", "STORE"]
    blocked, thread, _ = _computing(sa, key, "newer")
    busy = Counted("not computed")
    got: list[Entry] = []
    seen = commands.during(lambda: got.append(sb.fill(key, busy, fence=Fence(), refresh=True)))
    assert seen == ["CLAIM"]
    assert [entry.value for entry in got] == ["new"] and busy.calls == 0
    blocked.release.set()
    thread.join(10)


# -- early refresh (fill(..., refresh=True)) ----------------------------------------------------


def test_refresh_replaces_a_fresh_entry(redis_caches: Caches) -> None:
    cache = redis_caches()
    store, key = _store(cache), cache.prefix + "user:1"
    store.set(key, _entry("old"))
    plain = Counted("not computed")
    assert store.fill(key, plain, fence=Fence()).value == "old"  # a plain fill finds it
    assert plain.calls == 0
    renewed = Counted("new")
    assert store.fill(key, renewed, fence=Fence(), refresh=True).value == "new"
    assert renewed.calls == 1
    entry = store.get(key)
    assert entry is not None and entry.value == "new"
    assert store.counts["waits"] == 0


def test_concurrent_refreshes_compute_once_and_never_wait(redis_caches: Caches) -> None:
    sa, sb, key = _two_stores(redis_caches, "old")
    leader, thread, led = _computing(sa, key, "new")
    other = Counted("not computed")
    second, got = _in_thread(lambda: sb.fill(key, other, fence=Fence(), refresh=True))
    second.join(10)
    # answered while the leader is still computing: it did not wait for it
    assert not second.is_alive() and not leader.release.is_set()
    assert [entry.value for entry in got] == ["old"] and other.calls == 0
    assert sb.counts["waits"] == 0
    leader.release.set()
    thread.join(10)
    assert [entry.value for entry in led] == ["new"] and leader.calls == 1
    for store in (sa, sb):
        entry = store.get(key)
        assert entry is not None and entry.value == "new"


async def test_concurrent_async_refreshes_compute_once_and_never_wait(
    redis_caches: Caches,
) -> None:
    sa, sb, key = _two_stores(redis_caches)
    await sa.aset(key, _entry("old"))
    started, release = asyncio.Event(), asyncio.Event()
    calls: list[str] = []

    async def slow() -> Entry:
        calls.append("new")
        started.set()
        await asyncio.wait_for(release.wait(), 30)
        return _entry("new")

    leader = asyncio.ensure_future(sa.afill(key, slow, fence=Fence(), refresh=True))
    await asyncio.wait_for(started.wait(), 10)
    other = Counted("not computed")
    got = await asyncio.wait_for(sb.afill(key, other.acall, fence=Fence(), refresh=True), 10)
    assert got.value == "old" and other.calls == 0 and not release.is_set()
    assert sb.counts["waits"] == 0
    release.set()
    assert (await asyncio.wait_for(leader, 10)).value == "new"
    assert calls == ["new"]
    entry = await sb.aget(key)
    assert entry is not None and entry.value == "new"
    await sa.aclose()
    await sb.aclose()


def test_refresh_fenced_by_an_invalidation(redis_caches: Caches) -> None:
    sa, sb, key = _two_stores(redis_caches, "old")
    leader, thread, led = _computing(sa, key, "computed before the invalidation")
    assert sb.delete(key)  # deletes the entry and the refresh's lease
    leader.release.set()
    thread.join(10)
    assert [entry.value for entry in led] == ["computed before the invalidation"]
    assert sa.counts["fenced"] == 1
    assert sa.get(key) is None and sb.get(key) is None


def test_refresh_with_a_fence_already_invalid_stores_nothing(redis_caches: Caches) -> None:
    cache = redis_caches()
    store, key = _store(cache), cache.prefix + "user:1"
    store.set(key, _entry("old"))
    fence = Fence()

    def invalidated_meanwhile() -> Entry:
        fence.valid = False  # what the cache does when an invalidation reaches this process
        return _entry("new")

    assert store.fill(key, invalidated_meanwhile, fence=fence, refresh=True).value == "new"
    entry = store.get(key)
    assert entry is not None and entry.value == "old"
    assert store.counts["fenced"] == 1


def test_refresh_of_a_deleted_entry_waits_for_the_leader(redis_caches: Caches) -> None:
    """Nothing stored while somebody computes: a refresh waits as a miss would."""
    sa, sb, key = _two_stores(redis_caches)
    leader, thread, _ = _computing(sa, key, "new", refresh=False)
    other = Counted("not computed")
    second, got = _in_thread(lambda: sb.fill(key, other, fence=Fence(), refresh=True))
    deadline = time.monotonic() + 10
    while sb.counts["waits"] == 0:  # a bounded poll of a counter, not a timing assertion
        assert time.monotonic() < deadline, "the refresh never waited"
        time.sleep(0.002)
    assert second.is_alive()
    leader.release.set()
    thread.join(10)
    second.join(10)
    assert [entry.value for entry in got] == ["new"] and other.calls == 0
