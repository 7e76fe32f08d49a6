"""The in-memory store: an LRU (`OrderedDict`) and an expiry heap, read without a lock.

A hit must cost little more than a dict lookup, but an LRU is not safe to read from several
threads without a lock, and a lock (plus the Python-level bookkeeping of an LRU read) would
cost more than the rest of the hit. So the store keeps:

* `_index`, a plain dict from key to entry, which readers use without a lock (a single
  dict lookup is atomic in CPython);
* `_order` (LRU order, for the `maxsize` bound) and `_heap`/`_until` (when each entry stops
  being kept: `Entry.kept_until`, the end of its stale windows, on the store's `clock`),
  changed only under `_lock`; whatever they expire or evict leaves `_index` and the tag
  index with it. The heap holds plain `(until, key)` tuples, compared in C, so a miss's
  write costs about what a `cachetools.TTLCache` write does (a `TLRUCache` compares its
  items with a Python `__lt__`, some fourteen calls per write). A rewritten or removed key
  leaves its old pair in the heap, told apart from a live one by `_until`; the heap is
  rebuilt from `_until` when stale pairs outnumber live ones, so it stays bounded.

Reads are recorded in a bounded buffer and replayed into the LRU order on the next write,
the way Caffeine does it: recency stays accurate enough to evict cold keys first, and the
read path never takes the lock. Values are kept frozen (see `coalesce.values`), so callers
get private copies.
"""

from __future__ import annotations

import fnmatch
import heapq
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any

from coalesce.entry import Clock, Entry
from coalesce.errors import ConfigurationError
from coalesce.stores.base import Fence, KeyList, Store

_SLACK = 64  # stale heap pairs tolerated beyond the live ones before a rebuild


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
        self._lock = threading.Lock()  # guards everything below but reads of _index
        self._index: dict[str, Entry] = {}  # read without the lock; written under it
        self._tags: dict[str, set[str]] = {}  # tag -> keys of the entries carrying it
        self._touched: deque[str] = deque(maxlen=maxsize)  # reads not yet replayed
        self._order: OrderedDict[str, None] = OrderedDict()  # the keys of _index, LRU first
        # key -> when its entry stops being kept (`clock`), for entries with a TTL only
        self._until: dict[str, float] = {}
        # (until, key) per write of an entry with a TTL, earliest first; a pair whose until
        # no longer matches `_until` is stale (its key was rewritten or removed)
        self._heap: list[tuple[float, str]] = []

    # -- reads ---------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        entry = self._index.get(key)
        if entry is not None:
            self._touched.append(key)
        return entry

    async def aget(self, key: str) -> Entry | None:
        return self.get(key)

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
            if self._touched:
                self._replay_reads()
            if key in self._index:
                self._remove(key)
            now = self.clock()
            heap = self._heap
            if heap and heap[0][0] <= now:
                self._expire(now)
            if entry.ttl is not None:
                until = entry.kept_until
                if until <= now:
                    return True  # already past its stale windows: not kept
                self._until[key] = until
                heapq.heappush(heap, (until, key))
                if len(heap) > 2 * len(self._until) + _SLACK:
                    self._rebuild_heap()
            order = self._order
            self._index[key] = entry
            order[key] = None
            for tag in entry.tags:
                self._tags.setdefault(tag, set()).add(key)
            while len(order) > self.maxsize:
                self._remove(next(iter(order)))
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
            self._order.clear()
            self._until.clear()
            self._heap.clear()
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
        touched, order = self._touched, self._order
        while touched:
            key = touched.popleft()
            if key in order:  # else gone since it was read
                order.move_to_end(key)

    def _expire(self, now: float) -> None:
        """Remove every entry kept until `now` or earlier."""
        heap, until = self._heap, self._until
        while heap and heap[0][0] <= now:
            when, key = heapq.heappop(heap)
            if until.get(key) == when:  # else a stale pair
                self._remove(key)

    def _rebuild_heap(self) -> None:
        """Drop the stale pairs: one pair per live entry with a TTL."""
        self._heap = [(when, key) for key, when in self._until.items()]
        heapq.heapify(self._heap)

    def _remove(self, key: str) -> bool:
        """Remove `key`; whether it was there and still kept (not past its windows)."""
        entry = self._index.pop(key, None)
        if entry is None:
            return False
        self._order.pop(key, None)
        self._until.pop(key, None)
        for tag in entry.tags:
            members = self._tags.get(tag)
            if members is not None:
                members.discard(key)
                if not members:
                    del self._tags[tag]
        return entry.kept_until > self.clock()

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self._index), "maxsize": self.maxsize, "tags": len(self._tags)}
