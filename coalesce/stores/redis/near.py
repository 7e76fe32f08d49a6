"""Local copies of entries in process memory: the optional near cache, and the fallback.

`NearCache` (`local_maxsize=`) keeps hot entries in front of a healthy Redis. `Fallback`
holds what a fail-open cache computed while Redis was unavailable (see its docstring): the
near cache cannot stand in for it, because it serves only while the pub/sub listener is
subscribed, which it is not while Redis is down.

`NearCache` is a `MemoryStore` plus the rules that keep it honest:

* it serves only while the store's listener is subscribed to the invalidation channel
  (`listener.ready`): otherwise an invalidation could be missed. When the subscription drops,
  the listener flushes it (`on_reset`) before anything else;
* an entry is kept at most `ttl` seconds and never beyond its own freshness (the local copy's
  `ttl` is clipped, with no stale window: a stale entry is always read from Redis);
* an entry read from Redis is kept only if no invalidation arrived (or was sent) and the
  subscription neither dropped nor came back since the read began: `listener.generation`
  is read before the `GET` and compared before keeping;
* invalidations by key or tag, from this process or any other, drop the local copies;
* a forked child starts with none (`after_fork`), and keeps none until its own listener is
  subscribed.

Values are kept frozen (see `coalesce.values`), so every caller still gets a private copy.

Concurrency contract: `MemoryStore` has its own lock for writes and lock-free reads;
`generation` belongs to the listener (see `listener`). `_lock` makes `remember`'s
generation check and write one step against every drop: else an invalidation (bump, then
delete) could land between the check and the write, and the old entry stay for `ttl`.
"""

from __future__ import annotations

import threading
import time

from coalesce.entry import Entry
from coalesce.serialization import Serializer
from coalesce.stores.base import Fence
from coalesce.stores.memory import MemoryStore
from coalesce.stores.redis.listener import Listener
from coalesce.values import freeze_entry

_DROPS_KEPT = 10_000  # names whose last drop `Fallback` remembers (see `Fallback.dropped`)


class NearCache:
    """Local copies of Redis entries (see the module docstring)."""

    def __init__(
        self, maxsize: int, ttl: float, listener: Listener, serializer: Serializer
    ) -> None:
        self.maxsize = maxsize
        self.memory = MemoryStore(maxsize=maxsize)
        self.ttl = ttl
        self.listener = listener
        self.serializer = serializer
        self.hits = 0
        self._lock = threading.Lock()  # the generation check and write of `remember`, the
        # drops of `forget` / `on_invalidate` / `clear`: one cannot land between the others

    def __len__(self) -> int:
        return len(self.memory)

    def get(self, key: str) -> Entry | None:
        """A fresh local copy, or None (also while invalidations might be missed)."""
        if not self.listener.ready.is_set():
            self.listener.start()
            return None
        entry = self.memory.get(key)
        if entry is not None and entry.fresh_until > time.time():
            self.hits += 1
            return entry
        return None

    def remember(self, key: str, entry: Entry, generation: int) -> None:
        """Keep a copy of `entry` unless local copies were invalidated since `generation`."""
        if not self.listener.ready.is_set():
            return
        now = time.time()
        until = min(entry.fresh_until, now + self.ttl)
        if until <= now:
            return
        copy = local_copy(entry, until, self.serializer)
        with self._lock:
            if self.listener.generation == generation:
                self.memory.set(key, copy)

    def forget(self, key: str | None = None, tag: str | None = None) -> None:
        """Drop local copies of a key or a tag (this process invalidates them)."""
        self.listener.bump()
        with self._lock:
            drop(self.memory, key, tag)

    def on_invalidate(self, message: bytes) -> None:
        """An invalidation from any process, on the listener thread: "k:<key>" / "t:<tag>"."""
        with self._lock:
            if not drop_invalidated(self.memory, message):
                self.memory.clear()

    def clear(self) -> None:
        with self._lock:
            self.memory.clear()

    def after_fork(self) -> None:
        """In a forked child: drop every copy (invalidations sent while no listener runs here
        are lost) without touching the old store's lock, which another thread may have held."""
        self.memory = MemoryStore(maxsize=self.maxsize)
        self._lock = threading.Lock()


def drop(memory: MemoryStore, key: str | None, tag: str | None) -> None:
    """Drop the copies of `key` and of the entries carrying `tag` (either may be None)."""
    if key is not None:
        memory.delete(key)
    if tag is not None:
        memory.delete_tag(tag)


def drop_invalidated(memory: MemoryStore, message: bytes) -> bool:
    """Drop what a broadcast invalidation ("k:<key>" / "t:<tag>") names; False for any other
    message."""
    text = message.decode("utf-8", "surrogateescape")
    if text.startswith("k:"):
        drop(memory, text[2:], None)
    elif text.startswith("t:"):
        drop(memory, None, text[2:])
    else:
        return False
    return True


def local_copy(entry: Entry, until: float, serializer: Serializer) -> Entry:
    """`entry` with its value frozen, fresh until `until` and with no stale window."""
    value = freeze_entry(entry, serializer).value
    return Entry(
        value,
        entry.created,
        until - entry.created,
        0.0,
        entry.compute_time,
        entry.tags,
        entry.error,
    )


class Fallback:
    """What this process serves while Redis is unavailable, for a fail-open cache.

    While the store fails (calls time out or are refused, or the breaker is open), the cache
    would otherwise compute on every call: a Redis outage would multiply the load on whatever
    the cached functions read. So the entries the cache computes meanwhile are kept here
    (`remember`, fenced like any store write) and served (`get`) to the calls that follow, in
    this process only, while the computations themselves stay coalesced by its flights.

    Staleness is bounded: an entry is served at most `ttl` seconds after it was computed and
    never past its own freshness (no stale window). Copies are dropped by every invalidation
    this process makes (before Redis is asked, so a failing `invalidate` still drops them), by
    every invalidation broadcast while the listener runs, and all at once when Redis answers
    again (`clear`): a healthy Redis is always read first. At most `maxsize` entries, least
    recently used evicted first.

    Concurrency contract: `MemoryStore` reads without a lock. A drop records its time per key
    and tag and drops the copies under `lock`; `remember` checks, under the same `lock`, that
    no drop of the entry's key or tags came after its computation began (and its fence), then
    writes: a computation that began before an invalidation of this process can never land
    after it, even when its flight could no longer be fenced (detached by a pub/sub drop, or
    computed on the failed path). `hits` is a plain counter (approximate under threads).
    """

    def __init__(self, maxsize: int, ttl: float, serializer: Serializer) -> None:
        self.maxsize = maxsize
        self.ttl = ttl
        self.serializer = serializer
        self.memory = MemoryStore(maxsize=maxsize)
        self.hits = 0
        # When this process last dropped a key or a tag ("k:<key>" / "t:<tag>", wall clock),
        # and before when everything counts as dropped (`floor`): `remember` refuses an entry
        # whose computation began before a drop of its key or of one of its tags, whether or
        # not its flight could still be fenced (a flight detached by a pub/sub drop cannot).
        # Written and read under `lock`, with the drops and `remember`'s write.
        self.lock = threading.Lock()
        self.dropped: dict[str, float] = {}
        self.floor = 0.0

    def __len__(self) -> int:
        return len(self.memory)

    def _mark(self, names: list[str]) -> None:
        """Record a drop of `names` now (caller holds `lock`); bounded by forgetting every
        name at once and refusing all that began before (`floor`)."""
        now = time.time()
        if len(self.dropped) >= _DROPS_KEPT:
            self.dropped.clear()
            self.floor = now
        for name in names:
            self.dropped[name] = now

    def get(self, key: str) -> Entry | None:
        """A fresh copy computed during the outage, or None."""
        entry = self.memory.get(key)
        if entry is not None and entry.fresh_until > time.time():
            self.hits += 1
            return entry
        return None

    def remember(self, key: str, entry: Entry, fence: Fence | None = None) -> bool:
        """Keep a copy of `entry` (unless `fence` was invalidated); return whether kept."""
        now = time.time()
        until = min(entry.fresh_until, now + self.ttl)
        if until <= now:
            return False
        started = entry.created - entry.compute_time
        copy = local_copy(entry, until, self.serializer)
        with self.lock:
            dropped = self.dropped
            if started <= self.floor or dropped.get("k:" + key, 0.0) >= started:
                return False
            if any(dropped.get("t:" + tag, 0.0) >= started for tag in entry.tags):
                return False
            return self.memory.set(key, copy, fence=fence)

    def forget(self, key: str | None = None, tag: str | None = None) -> None:
        with self.lock:
            self._mark([f"k:{key}"] if key is not None else [])
            if tag is not None:
                self._mark([f"t:{tag}"])
            drop(self.memory, key, tag)

    def on_invalidate(self, message: bytes) -> None:
        """An invalidation broadcast by any process: "k:<key>" / "t:<tag>"."""
        with self.lock:
            self._mark([message.decode("utf-8", "surrogateescape")])
            drop_invalidated(self.memory, message)

    def clear(self) -> None:
        if len(self.memory):
            self.memory.clear()

    def after_fork(self) -> None:
        """In a forked child: start empty, with locks of its own."""
        self.memory = MemoryStore(maxsize=self.maxsize)
        self.lock = threading.Lock()
