"""The in-memory store: a `cachetools.LRUCache` bounded by `maxsize`, read without a lock.

A hit must cost little more than a dict lookup, but `cachetools` caches are not safe to read
from several threads without a lock, and a lock (plus the Python-level bookkeeping of an LRU
read) would cost more than the rest of the hit. So the store keeps two structures:

* `_index`, a plain dict from key to entry, which readers use without a lock (a single
  dict lookup is atomic in CPython);
* `_lru`, a `cachetools.LRUCache` of the same keys (bounded by `maxsize` too) that keeps
  their LRU order, changed only under `_lock`; a write to a full store takes its least
  recently used key out of it, then out of `_index` and the tag index.

Reads are recorded in a bounded buffer and replayed into the LRU order on the next write,
the way Caffeine does it: recency stays accurate enough to evict cold keys first, and the
read path never takes the lock. Values are kept frozen (see `coalesce.values`), so callers
get private copies.

Expiry is lazy. Every entry carries its own deadline (`Entry.kept_until`: the end of its
stale windows, on the store's clock), so nothing per entry is kept for it: a write sweeps
out every entry past its deadline once the earliest deadline written has come, at most once
per `len / 4` writes (a sweep scans the store: at most four entries looked at per write,
however entries expire). Until then an expired entry may linger, bounded by `maxsize` like
any other: `get` may return it (readers judge freshness themselves, see `Store.get`), and
the LRU bound may evict a live entry before it. `keys`, `delete`, `stats` and `len` count
only live entries. Why not `cachetools.TLRUCache`, which expires eagerly: its heap of
per-entry deadlines compares items through a Python `__lt__`, and a write to a full store
cost about 8 µs there against about 1.5 µs here, most of a miss.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import cachetools

from coalesce.entry import Clock, Entry
from coalesce.errors import ConfigurationError
from coalesce.stores.base import Fence, KeyList, Store


class MemoryStore(Store):
    """Entries in this process's memory, bounded by `maxsize` entries.

    `clock` tells the time entries are kept by (`time.time` unless the `Cache` was given
    another: the decisions and the store must agree on it).
    """

    shared = False

    def __init__(self, maxsize: int = 10_000, *, clock: Clock = time.time) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ConfigurationError(f"maxsize must be a positive integer, not {maxsize!r}")
        if not callable(clock):
            raise ConfigurationError(f"clock must be a function returning seconds, not {clock!r}")
        self.maxsize = maxsize
        self.clock = clock
        self._lock = threading.Lock()  # guards _lru, _tags and writes to _index
        self._index: dict[str, Entry] = {}  # read without the lock
        self._tags: dict[str, set[str]] = {}
        self._touched: deque[str] = deque(maxlen=maxsize)  # reads not yet replayed
        # the LRU order and the `maxsize` bound; `set` evicts before `_lru` would have to
        self._lru: cachetools.LRUCache[str, None] = cachetools.LRUCache(maxsize)
        # the earliest deadline (`kept_until`) among the entries kept: no sweep finds anything
        # before it (it may be an entry gone since: the next sweep finds out)
        self._next_expiry = math.inf
        self._writes = 0  # since the last sweep

    # -- reads ---------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        entry = self._index.get(key)
        if entry is not None:
            self._touched.append(key)
        return entry

    async def aget(self, key: str) -> Entry | None:
        return self.get(key)

    def get_many(self, keys: list[str]) -> list[Entry | None]:
        """One lock-free dict lookup per key, as `get`."""
        index, touched = self._index, self._touched
        entries = [index.get(key) for key in keys]
        touched.extend(key for key, entry in zip(keys, entries, strict=True) if entry is not None)
        return entries

    async def aget_many(self, keys: list[str]) -> list[Entry | None]:
        return self.get_many(keys)

    def __len__(self) -> int:
        """The entries held, expired ones swept out first."""
        with self._lock:
            self._sweep(self.clock())
            return len(self._index)

    def keys(
        self, pattern: str = "*", *, limit: int = 1000, max_scanned: int | None = None
    ) -> KeyList:
        now = self.clock()
        found = KeyList()
        items = list(self._index.items())
        for scanned, (key, entry) in enumerate(items, 1):
            if entry.kept_until > now and fnmatch.fnmatchcase(key, pattern):
                found.append(key)
                if len(found) >= limit:
                    found.complete = scanned == len(items)
                    break
            if max_scanned is not None and scanned >= max_scanned:
                found.complete = scanned == len(items)
                break
        return found

    # -- writes (under the lock) ------------------------------------------------------------

    def set(self, key: str, entry: Entry, *, fence: Fence | None = None) -> bool:
        with self._lock:
            if fence is not None and not fence.valid:
                return False
            now = self.clock()
            if now >= self._next_expiry and self._writes * 4 >= len(self._index):
                self._sweep(now)
            self._writes += 1
            if self._touched:
                self._replay_reads()
            kept_until = entry.kept_until
            if kept_until <= now:  # already past its stale windows: replaces the key by nothing
                self._remove(key)
                return True
            lru = self._lru
            if key in self._index:
                self._forget(key)
            elif len(self._index) >= self.maxsize:  # full: the least recently used key leaves
                self._forget(lru.popitem()[0])
            lru[key] = None
            self._index[key] = entry
            for tag in entry.tags:
                self._tags.setdefault(tag, set()).add(key)
            if kept_until < self._next_expiry:
                self._next_expiry = kept_until
            return True

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._remove(key)

    def delete_tag(self, tag: str) -> int:
        with self._lock:
            keys = self._tags.pop(tag, set())
            return sum(self._remove(key) for key in keys)

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()
            self._index.clear()
            self._tags.clear()
            self._touched.clear()
            self._next_expiry = math.inf

    def fill(
        self,
        key: str,
        compute: Callable[[], Entry],
        *,
        fence: Fence,
        tags: tuple[str, ...] = (),
        refresh: bool = False,
    ) -> Entry:
        entry = compute()
        self.set(key, entry, fence=fence)
        return entry

    async def aset(self, key: str, entry: Entry, *, fence: Fence | None = None) -> bool:
        return self.set(key, entry, fence=fence)

    async def adelete(self, key: str) -> bool:
        return self.delete(key)

    async def adelete_tag(self, tag: str) -> int:
        return self.delete_tag(tag)

    async def afill(
        self,
        key: str,
        compute: Callable[[], Awaitable[Entry]],
        *,
        fence: Fence,
        tags: tuple[str, ...] = (),
        refresh: bool = False,
    ) -> Entry:
        entry = await compute()
        self.set(key, entry, fence=fence)
        return entry

    # -- helpers, called with the lock held --------------------------------------------------

    def _replay_reads(self) -> None:
        touched, lru = self._touched, self._lru
        while touched:
            key = touched.popleft()
            with contextlib.suppress(KeyError):  # gone since it was read
                lru[key]  # moves the key to the most recently used end

    def _sweep(self, now: float) -> None:
        """Drop every entry past its deadline, if the earliest one has come."""
        if now < self._next_expiry:
            return
        self._writes = 0
        nearest = math.inf
        for key, entry in list(self._index.items()):
            kept_until = entry.kept_until
            if kept_until <= now:
                self._lru.pop(key, None)
                self._forget(key)
            elif kept_until < nearest:
                nearest = kept_until
        self._next_expiry = nearest

    def _remove(self, key: str) -> bool:
        entry = self._index.get(key)
        self._lru.pop(key, None)
        self._forget(key)
        return entry is not None and entry.kept_until > self.clock()

    def _forget(self, key: str) -> None:
        entry = self._index.pop(key, None)
        if entry is None:
            return
        for tag in entry.tags:
            members = self._tags.get(tag)
            if members is not None:
                members.discard(key)
                if not members:
                    del self._tags[tag]

    def stats(self) -> dict[str, Any]:
        """Live entries and tags (expired ones swept out first)."""
        with self._lock:
            self._sweep(self.clock())
            entries, tags = len(self._index), len(self._tags)
        return {"entries": entries, "maxsize": self.maxsize, "tags": tags}
