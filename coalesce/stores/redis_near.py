"""The optional near cache: hot entries in process memory, in front of Redis.

`NearCache` is a `MemoryStore` plus the rules that keep it honest:

* it serves only while the store's listener is subscribed to the invalidation channel
  (`listener.ready`): otherwise an invalidation could be missed. When the subscription drops,
  the listener flushes it (`on_reset`) before anything else;
* an entry is kept at most `ttl` seconds and never beyond its own freshness (the local copy's
  `ttl` is clipped, with no stale window: a stale entry is always read from Redis);
* an entry read from Redis is kept only if no invalidation arrived (or was sent) since the
  read began: `listener.generation` is read before the `GET` and compared before keeping;
* invalidations by key or tag, from this process or any other, drop the local copies;
* a forked child starts with none (`after_fork`), and keeps none until its own listener is
  subscribed.

Values are kept frozen (see `coalesce.values`), so every caller still gets a private copy.

Concurrency contract: `MemoryStore` has its own lock for writes and lock-free reads;
`generation` belongs to the listener (see `redis_listener`). `_lock` makes `remember`'s
generation check and write one step against every drop: else an invalidation (bump, then
delete) could land between the check and the write, and the old entry stay for `ttl`.
"""

from __future__ import annotations

import threading
import time

from coalesce.entry import Entry
from coalesce.serialization import Serializer
from coalesce.stores.memory import MemoryStore
from coalesce.stores.redis_listener import Listener
from coalesce.values import freeze_entry


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
        value = freeze_entry(entry, self.serializer).value
        copy = Entry(
            value,
            entry.created,
            until - entry.created,
            0.0,
            entry.compute_time,
            entry.tags,
            entry.error,
        )
        with self._lock:
            if self.listener.generation == generation:
                self.memory.set(key, copy)

    def forget(self, key: str | None = None, tag: str | None = None) -> None:
        """Drop local copies of a key or a tag (this process invalidates them)."""
        self.listener.bump()
        with self._lock:
            if key is not None:
                self.memory.delete(key)
            if tag is not None:
                self.memory.delete_tag(tag)

    def on_invalidate(self, message: bytes) -> None:
        """An invalidation from any process, on the listener thread: "k:<key>" / "t:<tag>"."""
        text = message.decode("utf-8", "surrogateescape")
        with self._lock:
            if text.startswith("k:"):
                self.memory.delete(text[2:])
            elif text.startswith("t:"):
                self.memory.delete_tag(text[2:])
            else:
                self.memory.clear()

    def clear(self) -> None:
        with self._lock:
            self.memory.clear()

    def after_fork(self) -> None:
        """In a forked child: drop every copy (invalidations sent while no listener runs here
        are lost) without touching the old store's lock, which another thread may have held."""
        self.memory = MemoryStore(maxsize=self.maxsize)
        self._lock = threading.Lock()
