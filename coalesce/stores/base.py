"""The one interface every store implements, sync and async side by side.

Keys handed to a store are *full* keys: the cache's namespace is already in front. A store
raises `BackendError` when its backend fails; the cache decides whether that degrades to a
direct computation (fail-open, the default) or reaches the caller (fail-closed).

`fill` is the store's share of single-flight. The cache has already made sure that only one
caller per key *in this process* gets here; a store shared by several processes (Redis) makes
sure only one process computes and hands the result to the others. The in-memory store just
computes and stores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable

from coalesce.entry import Entry


class Fence:
    """Says whether a computation in flight may still store its result.

    Invalidating a key invalidates the fences of its computations in flight *before* the
    entry is deleted, and stores check the fence atomically with their write: so a result
    computed before an invalidation never lands after it.
    """

    __slots__ = ("valid",)

    def __init__(self) -> None:
        self.valid = True  # written False once by an invalidation; read by the store on set


class KeyList(list[str]):
    """Keys found by a bounded listing (`Cache.keys`): a plain list, and `complete`.

    `complete` is False when the listing stopped before it had looked at everything (at
    `limit` matches, or after `max_scanned` stored keys): there may be more matches.
    """

    def __init__(self, keys: Iterable[str] = (), complete: bool = True) -> None:
        super().__init__(keys)
        self.complete = complete


class Store(ABC):
    """Where entries live. Every method may raise `BackendError`."""

    #: True when the store is shared between processes (its `fill` coordinates them).
    shared: bool = False

    #: True when `fill`'s first step reads the entry itself, atomically with its claim, and
    #: `get` has no local copy to answer from: a caller expecting a miss may skip `get`
    #: and go straight to `fill`, which then returns the stored entry if there is one.
    checks_in_fill: bool = False

    #: Called with the full key of every invalidation broadcast through a shared store (by
    #: any process), so the cache can fence its own computations of that key in flight.
    on_invalidated: Callable[[str], None] | None = None

    #: The same for every tag invalidation (the full tag name).
    on_invalidated_tag: Callable[[str], None] | None = None

    #: Called when invalidations broadcast by other processes may have been missed (a shared
    #: store's subscription dropped or came back): the cache detaches all its computations
    #: in flight, so that new callers do not join them.
    on_missed_invalidations: Callable[[], None] | None = None

    @abstractmethod
    def get(self, key: str) -> Entry | None:
        """The entry under `key`, or None.

        A store may return an entry whose time is up (the memory store expires entries
        lazily, to keep reads free of clock calls): callers judge it with
        `Entry.freshness`, which the hot path does anyway.
        """

    @abstractmethod
    def set(self, key: str, entry: Entry, *, fence: Fence | None = None) -> bool:
        """Store `entry` unless `fence` was invalidated; return whether it was stored."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Delete `key` (and fence its computations elsewhere); return whether it existed."""

    @abstractmethod
    def delete_tag(self, tag: str) -> int:
        """Delete every entry carrying `tag`; return how many existed."""

    @abstractmethod
    def fill(
        self,
        key: str,
        compute: Callable[[], Entry],
        *,
        fence: Fence,
        tags: tuple[str, ...] = (),
        refresh: bool = False,
    ) -> Entry:
        """Compute the entry for `key` once across everyone sharing this store, and store it.

        `tags` are the full tag names the entry will carry, known before it is computed: a
        shared store makes an invalidation of one of them during the computation fence it,
        as an invalidation of the key does.

        `refresh=True`: the caller holds a fresh entry and wants it recomputed early
        (probabilistic early expiration). A stored entry does not answer the call then; but
        when somebody sharing the store is already computing the key, a shared store
        returns the stored entry at once, neither computing nor waiting (or, when nothing
        is stored any more, waits as for a miss). A store not shared just computes.
        """

    @abstractmethod
    async def aget(self, key: str) -> Entry | None: ...

    @abstractmethod
    async def aset(self, key: str, entry: Entry, *, fence: Fence | None = None) -> bool: ...

    @abstractmethod
    async def adelete(self, key: str) -> bool: ...

    @abstractmethod
    async def adelete_tag(self, tag: str) -> int: ...

    @abstractmethod
    async def afill(
        self,
        key: str,
        compute: Callable[[], Awaitable[Entry]],
        *,
        fence: Fence,
        tags: tuple[str, ...] = (),
        refresh: bool = False,
    ) -> Entry: ...

    @abstractmethod
    def keys(
        self, pattern: str = "*", *, limit: int = 1000, max_scanned: int | None = None
    ) -> KeyList:
        """Up to `limit` full keys matching a glob `pattern`, looking at no more than about
        `max_scanned` stored keys (None: no bound); see `KeyList.complete`."""

    # -- batches (`Cache.cached_many`) -----------------------------------------------------

    def get_many(self, keys: list[str]) -> list[Entry | None]:
        """The entries under `keys`, in their order, read in one pass where the store can
        (Redis: one `MGET` per cluster slot; the near cache first). As `get`, an entry may
        be past its time: callers judge it."""
        return [self.get(key) for key in keys]

    async def aget_many(self, keys: list[str]) -> list[Entry | None]:
        """`get_many` for async code."""
        return [await self.aget(key) for key in keys]

    def fill_many(
        self,
        keys: list[str],
        compute: Callable[[list[str]], dict[str, Entry | None]],
        *,
        fences: dict[str, Fence],
        tags: dict[str, tuple[str, ...]],
    ) -> dict[str, Entry | None]:
        """`fill` for several keys at once: `compute(todo)` computes the keys `todo` (a part
        of `keys`, in their order) in one call and returns an entry per key (None: nothing to
        store). Returns an outcome per key of `keys`.

        The cache has made sure that only one caller per key in this process gets here. A
        store not shared computes all of them and stores each unless its fence was
        invalidated; a shared store computes only the keys no other process computes, and
        waits for the others (see `RedisStore.fill_many`).
        """
        outcomes = compute(keys)
        for key, entry in outcomes.items():
            if entry is not None:
                self.set(key, entry, fence=fences[key])
        return outcomes

    async def afill_many(
        self,
        keys: list[str],
        compute: Callable[[list[str]], Awaitable[dict[str, Entry | None]]],
        *,
        fences: dict[str, Fence],
        tags: dict[str, tuple[str, ...]],
    ) -> dict[str, Entry | None]:
        """`fill_many` for async code."""
        outcomes = await compute(keys)
        for key, entry in outcomes.items():
            if entry is not None:
                await self.aset(key, entry, fence=fences[key])
        return outcomes

    def get_strict(self, key: str) -> Entry | None:
        """`get`, except that an entry that exists but cannot be decoded raises
        `SerializationError` instead of counting as missing (for inspection: the command
        line must tell "absent" from "unreadable"). Stores that keep no bytes just `get`."""
        return self.get(key)

    def fallback(self, key: str) -> Entry | None:
        """After a failed `get` of a fail-open cache: what this process kept for `key` through
        `remember` while the store was unavailable, else None. No I/O. Stores that cannot
        fail keep nothing."""
        return None

    def remember(self, key: str, entry: Entry, *, fence: Fence | None = None) -> bool:
        """Keep `entry`, computed because the store failed, for `fallback` (unless `fence`
        was invalidated); return whether it was kept. No I/O."""
        return False

    def close(self) -> None:  # noqa: B027  (optional for stores without connections)
        """Release connections; the store may not be used afterwards."""

    async def aclose(self) -> None:  # noqa: B027
        """Release async connections."""
