"""The Redis store: entries shared by every process, and single-flight across processes.

The pieces, one concern per module of this package: `scripts` (key layout and Lua scripts,
pure), `connection` (lazy clients, errors, circuit breaker, shared reads), `listener` (the one
pub/sub connection: wake-ups and invalidations), `near` (the optional near cache), `breaker`,
`lease` (writing entries and the lease protocol of `fill`: the `Leases` object the store
composes), `steps` (the lease's decisions, pure) and `batch` (`get_many`, `fill_many`). This
module is the store itself: reads, deletes, tags, listing.

The paths, in the order of their cost:

* hit: exactly one `GET`, decoded with `decode_entry`. Concurrent reads of one key in this
  process share that `GET`; each caller decodes the shared bytes itself, so callers never
  share a mutable value. With a near cache (`local_maxsize=`), a hit costs no I/O at all.
* miss (`fill`): the cache has already made sure one caller per key and process gets here.
  One `CLAIM` script reads the entry again (one stored since the caller's `GET` is the
  answer) and either takes the lease or names its holder: a miss is three round trips,
  `GET`, `CLAIM`, `STORE` (tests/test_redis_miss_path.py counts them). The lease holder (the
  leader) computes, renewing the lease every `lease_ttl / 3` from the store's renewer thread
  (sync) or a task (async), then one `STORE` script writes the entry *only if the lease is
  still its own*, ends the lease and, only when somebody waits for that lease, publishes a
  wake-up, which carries the entry itself when it is small (`PUSH_MAX`). Everyone else
  waits: registered with the listener first, then checking again (`CLAIM` also reports a
  fresh entry, or the failure of the leader it waited for), then sleeping until a wake-up,
  at most `wait_check` seconds or until the lease would run out. A wake-up carrying the
  entry of the awaited lease is the answer, with no further round trip; any other wake-up
  means `CLAIM` again. When the lease vanished without an entry (the leader died, or was
  fenced), `CLAIM` hands it to exactly one of them. Nobody polls in a tight loop.
* early refresh (`fill(..., refresh=True)`, the caller holds a fresh entry): `CLAIM` takes a
  free lease whatever is stored; when somebody holds it already, it returns the stored entry
  and the caller neither computes nor waits (see `lease`).
* leader failure: a short-lived marker `...:failed` holds the lease token, exception type and
  message; waiters that waited for that lease raise `LeaderFailedError` at once. A caller
  arriving later never sees it (it did not wait for that token) and computes afresh.
* invalidation: one `DELETE` script removes the entry *and the lease*, so a computation that
  began before it cannot store after it (the fence), wakes that lease's waiters and
  broadcasts the key to every near cache.
* tag invalidation: `TAKE_TAG` reads and deletes the tag's set in one step, then `DELETE`
  removes every member's entry and lease. A leader records its key in the sets of its
  entry's tags when it takes the lease (`fill(..., tags=)`), so computations in flight are
  fenced too (on a cluster with a short window, see `lease`). The tag is then
  broadcast (`t:<tag>`) to near caches and to `on_invalidated_tag` in every process.

Failures: every Redis error becomes `BackendError` naming the URL (never the password) and
the cause; the cache then serves what this process has and computes with coalescing
(fail-open) unless configured to raise. What it computes meanwhile it hands back with
`remember`, and `fallback` serves it to the calls that follow (see `near.Fallback`):
stale by at most `fallback_ttl` seconds, dropped by invalidations and when Redis is back.
After `breaker_threshold` consecutive connection failures the breaker fails calls fast for a
cooldown (0.5 s, backing off to 1 s), then lets one probe through, and closes again by
itself once Redis answers; the listener subscribing again makes the next call probe at once.

Fork: after `os.fork()` a child resets every store it inherited (`_after_fork_in_child`):
listener and renewer "not started", near cache empty, new locks, no pending reads, new
clients of our own. The child then starts its threads and connections on first need.

Concurrency contract of this module's own state: `counts` are plain ints bumped without a
lock (approximate under threads, by design; `Leases` bumps the same dict); `_echoes` (own
invalidations whose broadcast has not come back yet) is guarded by `_echoes_lock`.
Everything else is owned by the composed objects (`Leases`, `Batches`, `Listener`,
`NearCache`, ...), whose docstrings state their contracts.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import redis.asyncio
import redis.cluster
from redis.crc import key_slot

from coalesce.entry import Entry
from coalesce.errors import ConfigurationError, SerializationError
from coalesce.serialization import Serializer, decode_entry, get_serializer
from coalesce.stores.base import Fence, KeyList, Store
from coalesce.stores.redis.batch import Batches, Outcomes
from coalesce.stores.redis.breaker import CircuitBreaker, RateLimitedLog
from coalesce.stores.redis.connection import AsyncClient, RedisConnection, SyncClient
from coalesce.stores.redis.lease import Keys, Leases
from coalesce.stores.redis.listener import Listener
from coalesce.stores.redis.near import Fallback, NearCache
from coalesce.stores.redis.scripts import DELETE, TAKE_TAG, KeyLayout
from coalesce.stores.redis.steps import encodable
from coalesce.urls import redact, scheme_of

__all__ = ["RedisStore", "redact"]

logger = logging.getLogger("coalesce.redis")

_MAX_SECONDS = 10_000_000  # about four months: any time option beyond is a mistake
_CHUNK = 256  # keys per DELETE script / ZREM in `delete_tag`
SCAN_COUNT = 1000  # keys Redis looks at per SCAN call of `keys`


class RedisStore(Store):
    """Entries in Redis, shared by every process; one computation per key across them all.

    `url` is `redis://[user:password@]host:port/db`, `rediss://...` or
    `unix://[user:password@]/path?db=0`. `client` / `async_client` are existing redis-py
    clients to use instead of building them from the URL (the URL still names the server in
    messages and feeds the pub/sub connection). `cluster=True` (or a `RedisCluster` client)
    talks to Redis Cluster. `local_maxsize=N` adds a near cache keeping entries at most
    `local_ttl` seconds. `max_connections` bounds each connection pool we create (default
    `DEFAULT_MAX_CONNECTIONS`; callers beyond it wait up to `socket_timeout`). While Redis is
    unavailable, a fail-open cache serves what it computed meanwhile for at most
    `fallback_ttl` seconds, keeping at most `fallback_maxsize` entries. Nothing connects
    before the first call.

    `checks_in_fill` is True when the store has no near cache (`local_maxsize` not set):
    `fill`'s first step (`CLAIM`) reads the entry atomically with taking the lease and serves
    it when it is fresh, and `get` has no local copy to answer from, so a caller that expects
    a miss may skip `get` and call `fill` at once (one round trip fewer; only `get` counts
    a miss in `stats()`). With a near cache it is False: `get` may answer without any I/O.
    """

    shared = True

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        namespace: str = "coalesce",
        serializer: str | Serializer | None = None,
        client: SyncClient | None = None,
        async_client: AsyncClient | None = None,
        cluster: bool | None = None,
        socket_timeout: float = 0.5,
        socket_connect_timeout: float = 0.5,
        max_connections: int | None = None,
        lease_ttl: float = 2.0,
        failure_ttl: float = 5.0,
        wait_check: float = 1.0,
        local_maxsize: int | None = None,
        local_ttl: float = 5.0,
        fallback_maxsize: int = 4096,
        fallback_ttl: float = 30.0,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 0.5,
        breaker_max_cooldown: float = 1.0,
        log_interval: float = 30.0,
    ) -> None:
        scheme = scheme_of(url) if isinstance(url, str) else ""
        if scheme not in ("redis", "rediss", "unix"):
            raise ConfigurationError(f"not a Redis URL: {redact(str(url))!r}")
        for name, value in (
            ("socket_timeout", socket_timeout),
            ("socket_connect_timeout", socket_connect_timeout),
            ("lease_ttl", lease_ttl),
            ("failure_ttl", failure_ttl),
            ("wait_check", wait_check),
            ("local_ttl", local_ttl),
            ("fallback_ttl", fallback_ttl),
            ("breaker_cooldown", breaker_cooldown),
            ("breaker_max_cooldown", breaker_max_cooldown),
            ("log_interval", log_interval),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 < value <= _MAX_SECONDS
            ):
                raise ConfigurationError(
                    f"{name} must be a positive number of seconds (at most {_MAX_SECONDS:,}), "
                    f"not {value!r}"
                )
        for name, count in (
            ("max_connections", max_connections),
            ("local_maxsize", local_maxsize),
            ("fallback_maxsize", fallback_maxsize),
            ("breaker_threshold", breaker_threshold),
        ):
            if count is not None and (type(count) is not int or not 0 < count < 1 << 31):
                raise ConfigurationError(f"{name} must be a positive integer, not {count!r}")
        for name, given, kinds in (
            ("client", client, (redis.Redis, redis.cluster.RedisCluster)),
            ("async_client", async_client, (redis.asyncio.Redis, redis.asyncio.RedisCluster)),
        ):
            if given is not None and not isinstance(given, kinds):
                expected = " or ".join(f"{k.__module__}.{k.__qualname__}" for k in kinds)
                raise ConfigurationError(
                    f"{name} must be a redis-py client ({expected}), not {type(given).__name__}"
                )
        self.namespace = namespace
        self.serializer = get_serializer(serializer)
        self.lease_ms = max(1, int(lease_ttl * 1000))
        self.failure_ms = max(1, int(failure_ttl * 1000))
        self.wait_check = float(wait_check)
        self._layout = KeyLayout(namespace)
        self._log = RateLimitedLog(logger, log_interval)
        self.breaker = CircuitBreaker(breaker_threshold, breaker_cooldown, breaker_max_cooldown)
        #: What a fail-open cache computed while Redis was unavailable (see `fallback`).
        self._fallback = Fallback(fallback_maxsize, float(fallback_ttl), self.serializer)
        self.breaker.on_recover = self._fallback.clear  # a healthy Redis is read first
        self._conn = RedisConnection(
            url,
            client=client,
            async_client=async_client,
            cluster=cluster,
            socket_timeout=float(socket_timeout),
            socket_connect_timeout=float(socket_connect_timeout),
            max_connections=max_connections,
            breaker=self.breaker,
            log=self._log,
        )
        self.url = url
        self.where = self._conn.where
        self.cluster = self._conn.cluster
        self._listener = Listener(
            self._conn.pubsub,
            self._layout,
            on_invalidate=self._invalidated,
            on_reset=self._listener_reset,
            log=self._log,
            where=self.where,
        )
        self._near: NearCache | None = None
        if local_maxsize is not None:
            self._near = NearCache(local_maxsize, float(local_ttl), self._listener, self.serializer)
        #: See the class docstring: `fill` checks the entry itself and no near cache answers.
        self.checks_in_fill: bool = self._near is None
        self.counts = dict.fromkeys(
            (
                "hits",
                "misses",
                "corrupt",
                "leads",
                "waits",
                "pushed",
                "takeovers",
                "fenced",
                "leader_failed",
                "fallback_kept",
            ),
            0,
        )
        #: Writing entries and the lease protocol (`lease`); batches of keys (`batch`).
        self._leases = Leases(
            self._conn,
            self._layout,
            self._listener,
            self._near,
            self.serializer,
            decode=self._decode,
            counts=self.counts,
            lease_ms=self.lease_ms,
            failure_ms=self.failure_ms,
            wait_check=self.wait_check,
            where=self.where,
        )
        self._renewer = self._leases.renewer
        self._batches = Batches(self._leases)
        #: Called (on the listener thread) with the full key of every invalidation by key that
        #: any process broadcasts, this one included, while the listener runs (it does while
        #: this process waits on or leads a computation, or keeps a near cache). The cache can
        #: fence its in-process flights with it. Must be quick and must not raise. The echo of
        #: this store's own `delete` is not passed on: the cache fenced its flights before
        #: deleting, and a flight begun after the delete must not be fenced when the echo
        #: arrives (`_echoes` counts the broadcasts still on their way back).
        self.on_invalidated: Callable[[str], None] | None = None
        #: Called the same way with the full tag name of every tag invalidation (echoes of
        #: this store's own `delete_tag` skipped likewise).
        self.on_invalidated_tag: Callable[[str], None] | None = None
        #: Called (on the listener thread) when invalidations may have been missed: when the
        #: pub/sub connection drops and again once it is subscribed anew.
        self.on_missed_invalidations: Callable[[], None] | None = None
        self._echoes: dict[str, int] = {}  # "k:<key>" / "t:<tag>" -> broadcasts on their way
        self._echoes_lock = threading.Lock()
        _STORES.add(self)

    def __repr__(self) -> str:
        return f"RedisStore({self.where!r}, namespace={self.namespace!r})"

    # -- decoding ------------------------------------------------------------------------------

    def _decode(self, key: str, data: Any) -> Entry | None:
        """The entry in `data`; None for a missing, corrupt or foreign value (logged)."""
        if data is None:
            self.counts["misses"] += 1
            return None
        try:
            entry = decode_entry(data, self.serializer, context=key)
        except SerializationError as exc:
            self.counts["corrupt"] += 1
            self._log.warning(
                "corrupt",
                "coalesce: ignoring an unreadable value under %r in Redis at %s (it will be "
                "replaced): %s",
                key,
                self.where,
                exc,
            )
            return None
        self.counts["hits"] += 1
        return entry

    # -- the near cache's hooks (listener thread) ------------------------------------------------

    def _invalidated(self, message: bytes) -> None:
        self._conn.epoch += 1  # a read begun before a remote deletion is not to be joined
        # Then the generation, in this order: a near-cache reader that sees the new generation
        # can no longer join a read begun before the deletion, and one that saw the old one
        # (and may have joined such a read) has its `remember` refused, or its copy dropped
        # just below.
        self._listener.bump()
        self._fallback.on_invalidate(message)
        if self._near is not None:
            self._near.on_invalidate(message)
        text = message.decode("utf-8", "surrogateescape")
        if text.startswith("k:"):
            hook, name = self.on_invalidated, "on_invalidated"
        elif text.startswith("t:"):
            hook, name = self.on_invalidated_tag, "on_invalidated_tag"
        else:
            return
        if self._echoes and self._echo_arrived(text):
            return  # our own delete or delete_tag, back from Redis
        if hook is not None:
            try:
                hook(text[2:])
            except Exception:  # a broken hook must not stop the listener
                logger.exception("coalesce: the %s hook failed", name)

    def _expect_echo(self, message: str, change: int) -> None:
        """Count (+1) or uncount (-1) a broadcast ("k:<key>" / "t:<tag>") of our own."""
        with self._echoes_lock:
            count = self._echoes.get(message, 0) + change
            if count > 0:
                self._echoes[message] = count
            else:
                self._echoes.pop(message, None)

    def _echo_arrived(self, message: str) -> bool:
        with self._echoes_lock:
            count = self._echoes.get(message, 0)
            if count <= 0:
                return False
            if count == 1:
                del self._echoes[message]
            else:
                self._echoes[message] = count - 1
            return True

    def _listener_reset(self) -> None:
        """Invalidations may have been missed (the pub/sub connection dropped, or is back):
        drop local copies and have the cache detach its computations in flight."""
        with self._echoes_lock:
            self._echoes.clear()  # echoes still on their way are lost with the connection
        self._conn.epoch += 1
        # As in `_invalidated`, also once subscribed again: a read or write answered while the
        # connection was down may be older than a deletion nobody here heard, and reach
        # `NearCache.remember` only now. Its generation must have moved (after the epoch, and
        # before the flush, which drops any copy kept just before).
        self._listener.bump()
        if self._near is not None:
            self._near.clear()
        if self._listener.ready.is_set():  # subscribed anew: Redis answers again
            self.breaker.probe_now()
        hook = self.on_missed_invalidations
        if hook is not None:
            try:
                hook()
            except Exception:  # a broken hook must not stop the listener
                logger.exception("coalesce: the on_missed_invalidations hook failed")

    def _after_fork(self) -> None:
        """In a forked child (see `_after_fork_in_child`): the listener and renewer threads
        are not there, so their state is reset to "not started"; the near cache is dropped,
        locks are new, pending reads and async clients forgotten. Everything starts again on
        next need, as in a new process."""
        self._echoes = {}
        self._echoes_lock = threading.Lock()
        self._leases.after_fork()
        self._log.after_fork()
        self.breaker.after_fork()
        self._conn.after_fork()
        self._listener.after_fork()
        if self._near is not None:
            self._near.after_fork()
        self._fallback.after_fork()

    def _forget(self, key: str | None = None, tag: str | None = None) -> None:
        """Drop local copies after (and before) a deletion: the near cache's, and any read
        begun before it, which a later reader must not join (`RedisConnection.get`)."""
        self._conn.epoch += 1
        self._fallback.forget(key, tag)
        if self._near is not None:
            self._near.forget(key, tag)

    # -- get ---------------------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        """One `GET` (shared by the threads reading the same key at the same moment)."""
        if not key.isascii() and not encodable(key):
            return None  # a raw key the core stores escaped: the caller asks for that next
        near = self._near
        if near is None:
            return self._decode(key, self._conn.get(self._layout.entry(key)))
        generation = self._listener.generation
        entry = near.get(key)
        if entry is None:
            entry = self._decode(key, self._conn.get(self._layout.entry(key)))
            if entry is not None:
                near.remember(key, entry, generation)
        return entry

    async def aget(self, key: str) -> Entry | None:
        """One `GET` (shared by the tasks of this loop reading the same key at once)."""
        if not key.isascii() and not encodable(key):
            return None
        near = self._near
        if near is None:
            return self._decode(key, await self._conn.aget(self._layout.entry(key)))
        generation = self._listener.generation
        entry = near.get(key)
        if entry is None:
            entry = self._decode(key, await self._conn.aget(self._layout.entry(key)))
            if entry is not None:
                near.remember(key, entry, generation)
        return entry

    # -- while Redis is unavailable (for a fail-open cache) --------------------------------------

    def fallback(self, key: str) -> Entry | None:
        """What a fail-open cache serves after a failed `get`/`aget` of `key`: a fresh entry
        this process computed and handed to `remember` during the outage, else None. No I/O.

        A fail-closed cache never asks: it raises the `BackendError` instead.
        """
        return self._fallback.get(key)

    def remember(self, key: str, entry: Entry, *, fence: Fence | None = None) -> bool:
        """Keep `entry`, computed by a fail-open cache because Redis failed, for `fallback`
        (unless `fence` was invalidated); return whether it was kept. No I/O."""
        kept = self._fallback.remember(key, entry, fence)
        if kept:
            self.counts["fallback_kept"] += 1
        return kept

    # -- set, delete, tags ---------------------------------------------------------------------
    def set(self, key: str, entry: Entry, *, fence: Fence | None = None) -> bool:
        if fence is not None and not fence.valid:
            return False
        return self._leases.store(key, Keys(self._layout, key), entry, "")

    async def aset(self, key: str, entry: Entry, *, fence: Fence | None = None) -> bool:
        if fence is not None and not fence.valid:
            return False
        return await self._leases.astore(key, Keys(self._layout, key), entry, "")

    # -- computing: the lease protocol (`lease`) and batches (`batch`) --------------------------

    # The options are `Store`'s (fence, tags, refresh; fences, tags), passed on unchanged.
    def fill(self, key: str, compute: Callable[[], Entry], **options: Any) -> Entry:
        """Compute `key` once across every process sharing this Redis (see `lease`)."""
        return self._leases.fill(key, compute, **options)

    async def afill(
        self, key: str, compute: Callable[[], Awaitable[Entry]], **options: Any
    ) -> Entry:
        return await self._leases.afill(key, compute, **options)

    def get_many(self, keys: list[str]) -> list[Entry | None]:
        """The near cache, then one `MGET` (per slot on a cluster) for the rest."""
        return self._batches.get_many(keys)

    async def aget_many(self, keys: list[str]) -> list[Entry | None]:
        return await self._batches.aget_many(keys)

    def fill_many(
        self, keys: list[str], compute: Callable[[list[str]], Outcomes], **options: Any
    ) -> Outcomes:
        """Compute each key once across every process sharing this Redis (see `batch`)."""
        return self._batches.fill_many(keys, compute, **options)

    async def afill_many(
        self, keys: list[str], compute: Callable[[list[str]], Awaitable[Outcomes]], **options: Any
    ) -> Outcomes:
        return await self._batches.afill_many(keys, compute, **options)

    # -- delete, tags --------------------------------------------------------------------------

    def _delete_args(self, key: str) -> tuple[list[str], list[str]]:
        entry = self._layout.entry(key)
        return [entry, self._layout.lease(entry)], [self._layout.invalidate_channel, "k:" + key]

    def delete(self, key: str) -> bool:
        """Delete the entry and its lease (fencing its computations), tell every near cache."""
        self._forget(key=key)
        keys, args = self._delete_args(key)
        echo = self._listener.ready.is_set()  # else our broadcast will not come back to us
        if echo:
            self._expect_echo(args[1], 1)
        try:
            existed = bool(self._conn.script(DELETE, keys, args))
        except BaseException:
            if echo:
                self._expect_echo(args[1], -1)  # maybe not sent: rather fence once too often
            raise
        self._forget(key=key)
        return existed

    async def adelete(self, key: str) -> bool:
        self._forget(key=key)
        keys, args = self._delete_args(key)
        echo = self._listener.ready.is_set()
        if echo:
            self._expect_echo(args[1], 1)
        try:
            existed = bool(await self._conn.ascript(DELETE, keys, args))
        except BaseException:
            if echo:
                self._expect_echo(args[1], -1)
            raise
        self._forget(key=key)
        return existed

    def _tag_batches(self, taken: list[Any]) -> list[tuple[list[str], list[Any]]]:
        """From `TAKE_TAG`'s flat (member, score) reply: per batch, the KEYS of `DELETE` (entry
        and lease of each member, one slot per batch) and the (member, score) pairs it covers."""
        groups: dict[int, tuple[list[str], list[Any]]] = {}
        for member, score in zip(taken[0::2], taken[1::2], strict=True):
            name = (
                member.decode("utf-8", "surrogateescape") if isinstance(member, bytes) else member
            )
            entry = self._layout.entry(name)
            slot = key_slot(entry.encode("utf-8", "surrogateescape")) if self.cluster else 0
            keys, pairs = groups.setdefault(slot, ([], []))
            keys.extend((entry, self._layout.lease(entry)))
            pairs.extend((member, score))
        return [
            (keys[i : i + 2 * _CHUNK], pairs[i : i + 2 * _CHUNK])
            for keys, pairs in groups.values()
            for i in range(0, len(keys), 2 * _CHUNK)
        ]

    def delete_tag(self, tag: str) -> int:
        """Delete every entry recorded in the tag's set, and the leases of its computations in
        flight (fencing them); tell every process. Reads the set, never SCANs.

        The set is taken (moved to its "taking" set, see `TAKE_TAG`) in one step first: a
        computation that takes its lease after that is recorded in a new set, for the next
        `delete_tag`. Members leave the taking set once their entries are deleted, so a call
        that fails half-way leaves the rest to the next `delete_tag`.
        """
        self._forget(tag=tag)
        tag_key = self._layout.tag(tag)
        message = "t:" + tag
        echo = self._listener.ready.is_set()  # else our broadcast will not come back to us
        if echo:
            self._expect_echo(message, 1)
        try:
            taking = self._layout.taking(tag_key)
            batches = self._tag_batches(self._conn.script(TAKE_TAG, [tag_key, taking], []))
            client = self._conn.sync()
            deleted = 0
            for keys, pairs in batches:
                deleted += int(self._conn.script(DELETE, keys, ["", ""]))
                self._conn.call(client.zrem, taking, *pairs[0::2])
            self._conn.call(client.publish, self._layout.invalidate_channel, message)
        except BaseException:
            if echo:
                self._expect_echo(message, -1)
            raise
        self._forget(tag=tag)
        return deleted

    async def adelete_tag(self, tag: str) -> int:
        self._forget(tag=tag)
        tag_key = self._layout.tag(tag)
        message = "t:" + tag
        echo = self._listener.ready.is_set()
        if echo:
            self._expect_echo(message, 1)
        try:
            taking = self._layout.taking(tag_key)
            taken = await self._conn.ascript(TAKE_TAG, [tag_key, taking], [])
            batches = self._tag_batches(taken)
            client = self._conn.loop_state().client
            deleted = 0
            for keys, pairs in batches:
                deleted += int(await self._conn.ascript(DELETE, keys, ["", ""]))
                await self._conn.acall(client.zrem, taking, *pairs[0::2])
            await self._conn.apublish(self._layout.invalidate_channel, message)
        except BaseException:
            if echo:
                self._expect_echo(message, -1)
            raise
        self._forget(tag=tag)
        return deleted

    # -- listing, stats, lifecycle ---------------------------------------------------------------

    def get_strict(self, key: str) -> Entry | None:
        """`get` from Redis itself (not the near cache); unreadable bytes raise
        `SerializationError` instead of counting as a miss."""
        data: Any = self._conn.call(self._conn.sync().get, self._layout.entry(key))
        return None if data is None else decode_entry(data, self.serializer, context=key)

    def keys(
        self, pattern: str = "*", *, limit: int = 1000, max_scanned: int | None = None
    ) -> KeyList:
        """Up to `limit` full keys matching `pattern`: SCAN MATCH inside our namespace only,
        `SCAN_COUNT` keys per call and about `max_scanned` keys in all (every node of a
        cluster in turn)."""
        match = self._layout.match(pattern)
        calls = None if max_scanned is None else max(1, -(-max_scanned // SCAN_COUNT))

        def scan() -> KeyList:
            found, scans = KeyList(), 0
            nodes = self._conn.node_clients()
            for number, client in enumerate(nodes, 1):
                cursor: Any = 0
                while True:
                    if calls is not None and scans >= calls:
                        found.complete = False
                        return found
                    cursor, names = client.scan(cursor, match=match, count=SCAN_COUNT)
                    scans += 1
                    for index, raw in enumerate(names, 1):
                        name = (
                            raw.decode("utf-8", "surrogateescape")
                            if isinstance(raw, bytes)
                            else raw
                        )
                        key = self._layout.key_of_entry(name)
                        if key is None:
                            continue
                        found.append(key)
                        if len(found) >= limit:
                            found.complete = (
                                int(cursor) == 0 and number == len(nodes) and index == len(names)
                            )
                            return found
                    if int(cursor) == 0:
                        break
            return found

        return self._conn.call(scan)

    def stats(self) -> dict[str, Any]:
        """Breaker state, counters, listener and near-cache state (cheap, approximate)."""
        return {
            "url": self.where,
            "namespace": self.namespace,
            "cluster": self.cluster,
            "breaker": self.breaker.stats(),
            "listener": {
                "subscribed": self._listener.ready.is_set(),
                "resets": self._listener.resets,
            },
            "local_entries": None if self._near is None else len(self._near),
            "local_hits": 0 if self._near is None else self._near.hits,
            "fallback_entries": len(self._fallback),
            "fallback_hits": self._fallback.hits,
            "errors": self._conn.errors,
            "log_suppressed": self._log.suppressed,
            **self.counts,
        }

    def close(self) -> None:
        """Stop the listener and close the clients this store created (not given ones)."""
        self._listener.close()
        self._renewer.close()
        self._conn.close()
        self._fallback.clear()
        if self._near is not None:
            self._near.clear()

    async def aclose(self) -> None:
        """Close this loop's asyncio client (if the store created it), then the rest."""
        await self._conn.aclose()
        self.close()


#: Every store of this process, for `_after_fork_in_child`.
_STORES: weakref.WeakSet[RedisStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """Reset every store after `os.fork()` (gunicorn --preload, multiprocessing's fork).

    Only the forking thread lives on in the child: without this, a store would believe its
    listener runs (and its near cache would serve entries no invalidation can reach any more)
    and its renewer thread too.
    """
    for store in list(_STORES):
        try:
            store._after_fork()
        except Exception:  # one broken store must not leave the others stale
            logger.exception("coalesce: resetting %r after fork failed", store)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
