"""The in-memory store: a `cachetools.TLRUCache` for expiry and LRU, read without a lock.

A hit must cost little more than a dict lookup, but `cachetools` caches are not safe to read
from several threads without a lock, and a lock (plus the Python-level bookkeeping of an LRU
read) would cost more than the rest of the hit. So the store keeps two structures:

* `_index`, a plain dict from key to entry, which readers use without a lock (a single
  dict lookup is atomic in CPython);
* `_lru`, a `TLRUCache` that owns expiry (per entry, from its TTL and stale window) and the
  `maxsize` bound, changed only under `_lock`; whatever it expires or evicts leaves `_index`
  and the tag index with it.

Reads are recorded in a bounded buffer and replayed into the LRU order on the next write,
the way Caffeine does it: recency stays accurate enough to evict cold keys first, and the
read path never takes the lock. Values are kept frozen (see `coalesce.values`), so callers
get private copies.
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


def _keep_until(_key: str, entry: Entry, _now: float) -> float:
    """`TLRUCache`'s time-to-use: until the entry's stale windows end (on the store's clock,
    which is also the `TLRUCache` timer)."""
    return math.inf if entry.ttl is None else entry.kept_until


class _Bookkeeping(cachetools.TLRUCache):  # type: ignore[type-arg]
    """The LRU/TTL structure; tells the store about every key it drops."""

    def __init__(self, maxsize: int, dropped: Callable[[str], None], clock: Clock) -> None:
        super().__init__(maxsize, ttu=_keep_until, timer=clock)
        self._dropped = dropped

    def expire(self, time: float | None = None) -> list[tuple[str, Entry]]:
        expired: list[tuple[str, Entry]] = super().expire(time)
        for key, _ in expired:
            self._dropped(key)
        return expired

    def popitem(self) -> tuple[str, Entry]:
        key, entry = super().popitem()
        self._dropped(key)
        return key, entry


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
        self._lru = _Bookkeeping(maxsize, self._forget, clock)

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
            self._replay_reads()
            self._remove(key)
            self._lru[key] = entry
            if key in self._lru:  # an entry already past its stale window is not kept
                self._index[key] = entry
                for tag in entry.tags:
                    self._tags.setdefault(tag, set()).add(key)
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
        return {"entries": len(self._index), "maxsize": self.maxsize, "tags": len(self._tags)}
