"""`Cache` ties a store, a serializer, the in-process flights and the stats together.

`configure()` sets the default cache that the module-level `cached` / `coalesced` use and
`get_cache()` returns it; with nothing configured, the default comes from the `COALESCE_URL`
environment variable, else memory. Creating a cache or decorating a function never connects
to anything: stores connect on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar, cast, overload

from coalesce import decorators
from coalesce.batch import DEFAULT_BATCH_WINDOW, DEFAULT_MAX_BATCH, CachedMany, make_cached_many
from coalesce.batch.flights import BatchFlights
from coalesce.decorators import (
    AsidePolicy,
    CachedFunction,
    Decorator,
    Policy,
    aget_or_set,
    get_or_set,
    make_decorator,
    run_sync_refresh,
    served,
)
from coalesce.entry import STORE_FAILED, Clock, Entry
from coalesce.errors import BackendError, ConfigurationError
from coalesce.flight import AsyncFlights, ThreadFlights
from coalesce.keys import MAX_KEY_LENGTH, escape, is_safe_key, shorten
from coalesce.options import CachedOptions, check_option_names, check_seconds
from coalesce.serialization import Serializer, get_serializer
from coalesce.stats import Stats
from coalesce.stores.base import Fence, KeyList, Store
from coalesce.stores.memory import MemoryStore
from coalesce.urls import redact, scheme_of, url_of_settings
from coalesce.values import Frozen

if TYPE_CHECKING:
    from redis import Redis
    from redis.asyncio import Redis as AsyncRedis
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.cluster import RedisCluster
    from typing_extensions import Unpack  # PEP 692 (typing.Unpack from 3.11, kwargs 3.12)

logger = logging.getLogger("coalesce")
P = ParamSpec("P")
R = TypeVar("R")

BackendErrorMode = Literal["compute", "raise"]
_LOG_EVERY = 30.0  # seconds between two log lines about a failing store
_COMPUTE_THREADS = 32  # sync computations running past their callers' timeouts, at most
_MAX_ASIDE_NAMES = 1000  # stats slots of cache-aside calls; past it, "get_or_set" counts them

# A key already in the form the decorators store: printable, no whitespace nor braces, `%`
# only in `%XX` escapes (as `keys.escape` writes them) ...
_ESCAPED = re.compile(r"(?:[^%\s{}]|%[0-9A-F]{2})*")
# ... possibly shortened (`keys.shorten`: 200 characters, which may cut an escape, then
# `%#` and 40 hex digits).
_SHORTENED = re.compile(r"((?:[^%\s{}]|%[0-9A-F]{2})*(?:%[0-9A-F]?)?)%#[0-9a-f]{40}")


def stored_key(key: str) -> str:
    """The form a key (or tag) given to a `Cache` method is stored under, as the decorators
    store theirs: a safe key as it is (`keys.is_safe_key`); a key already in that escaped
    form (`fn.key(...)` gives one, `coalesce keys` lists them) as it is too; any other key
    percent-encoded and shortened like a decorator's (`user:a b` -> `user:a%20b`), as if
    it were the one field of a key template. So a stored form maps to itself, and text
    without `%XX` sequences meets the decorator whose template renders it.
    """
    if is_safe_key(key):
        return key
    if (
        key.isprintable()
        and len(key) <= MAX_KEY_LENGTH
        and (_ESCAPED.fullmatch(key) or (len(key) == 242 and _SHORTENED.fullmatch(key)))
    ):
        return key
    return shorten(escape(key))


def text_key(key: str) -> str:
    """The stored form of a key (or tag) given as *text* to `get`, `set` and `get_or_set`: as
    it is when safe, else percent-encoded and shortened as a decorator's template renders its
    one field (`user:a b` -> `user:a%20b`). Unlike `stored_key`, text that looks escaped is
    escaped again (`user:a%20b` -> `user:a%2520b`): keys built from user input, such as
    `f"profile:{username}"`, stay distinct for every distinct text, so one user's entry can
    never be another's."""
    return key if is_safe_key(key) else shorten(escape(key))


def _disabled_by_environment() -> bool:
    return os.environ.get("COALESCE_DISABLED", "").strip().lower() in ("1", "true", "yes", "on")


def _given_client(
    client: object,
) -> tuple[str, Redis | RedisCluster | None, AsyncRedis | AsyncRedisCluster | None] | None:
    """For a redis-py client (sync or asyncio, single or cluster) given as the cache url: the
    URL of the server it talks to, read from its connection settings, and the client as
    `client` or `async_client`; None when `client` is not a redis-py client.

    `Cache(redis.Redis(...))` names its server in messages by this URL (password masked), and
    connections the store opens itself (the pub/sub listener; the sync client next to a given
    asyncio one, and the other way round) are made from it, so they reach the same server
    with the same user, password, database and TLS files.
    """
    if not type(client).__module__.startswith("redis."):
        return None  # redis is never imported for a cache that does not use it
    import redis
    import redis.asyncio
    import redis.asyncio.cluster
    import redis.cluster

    settings: dict[str, Any]
    if isinstance(client, (redis.Redis, redis.asyncio.Redis)):
        pool = client.connection_pool
        settings = dict(pool.connection_kwargs)
        connection_class: Any = pool.connection_class
    elif isinstance(client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)):
        manager = getattr(client, "nodes_manager", None)  # the sync cluster client's
        settings = dict(getattr(manager, "connection_kwargs", None) or {})
        settings = settings or dict(getattr(client, "connection_kwargs", None) or {})
        connection_class = settings.get("connection_class")
        nodes = list(getattr(manager, "startup_nodes", {}).values())
        nodes = nodes or list(getattr(client, "startup_nodes", None) or [])
        if nodes and "host" not in settings:
            settings.update(host=nodes[0].host, port=nodes[0].port)
    else:
        return None
    tls = bool(settings.get("ssl")) or "SSL" in getattr(connection_class, "__name__", "")
    url = url_of_settings(settings, tls=tls)
    if isinstance(client, (redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster)):
        return url, None, client
    return url, client, None


def _make_store(url: str, maxsize: int, clock: Clock, options: dict[str, Any]) -> Store:
    scheme = scheme_of(url)
    if scheme == "memory":
        if options:
            raise ConfigurationError(
                f"options {sorted(options)} do not apply to the memory store ({url!r})"
            )
        return MemoryStore(maxsize=maxsize, clock=clock)
    if clock is not time.time:
        raise ConfigurationError(
            "clock= applies to the memory store only: entries on Redis are timed by the "
            "wall clock every process shares"
        )
    if scheme in ("redis", "rediss", "unix"):
        from coalesce.stores.redis import RedisStore

        return RedisStore(url, **options)
    raise ConfigurationError(
        f"unknown cache URL scheme {scheme!r} in {redact(url)!r}: use memory://, redis://, "
        "rediss:// or unix://"
    )


class Cache:
    """A cache: where entries live (`url`) and how they are shared.

    `Cache()` keeps entries in this process's memory (`"memory://"`, at most `maxsize`);
    `Cache("redis://host:6379/0")` keeps them in Redis, shared by every process. Every key
    is stored as `f"{namespace}:{key}"`. `enabled=False` (or `COALESCE_DISABLED=1`) turns
    every decorator of this cache into a plain call: the rollback switch.

    `clock` (memory store only) is the time every freshness decision asks, `time.time` by
    default: a test can pass a fake one and move it forward instead of sleeping.
    """

    def __init__(
        self,
        url: str | Redis | AsyncRedis | RedisCluster | AsyncRedisCluster = "memory://",
        *,
        namespace: str = "coalesce",
        maxsize: int = 10_000,
        default_ttl: float = 300.0,
        enabled: bool | None = None,
        serializer: str | Serializer | None = None,
        on_backend_error: BackendErrorMode = "compute",
        clock: Clock = time.time,
        client: Redis | RedisCluster | None = None,
        async_client: AsyncRedis | AsyncRedisCluster | None = None,
        **store_options: Any,
    ) -> None:
        if not isinstance(url, str):
            given = _given_client(url)
            if given is None:
                raise ConfigurationError(
                    "cache url must be a string such as 'redis://host:6379/0' or a redis-py "
                    f"client, not {type(url).__name__}"
                )
            url, given_sync, given_async = given
            if (given_sync is not None and client is not None) or (
                given_async is not None and async_client is not None
            ):
                kind = "client" if given_sync is not None else "async_client"
                raise ConfigurationError(
                    f"a redis-py client was given twice: as the cache url and as {kind}="
                )
            if given_sync is not None:
                client = given_sync
            if given_async is not None:
                async_client = given_async
        if not namespace or not isinstance(namespace, str) or not namespace.isprintable():
            raise ConfigurationError(
                f"namespace must be a non-empty printable string, not {namespace!r}"
            )
        if any(c in namespace for c in " :{}*?[]%"):
            raise ConfigurationError(
                f"namespace may not contain spaces or any of : {{ }} * ? [ ] %: {namespace!r}"
            )
        if enabled is not None and not isinstance(enabled, bool):
            raise ConfigurationError(f"enabled must be True or False, not {enabled!r}")
        if on_backend_error not in ("compute", "raise"):
            raise ConfigurationError(
                f"on_backend_error must be 'compute' or 'raise', not {on_backend_error!r}"
            )
        default_ttl = check_seconds("default_ttl", default_ttl) or 0.0
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or not 0 < maxsize < 1 << 40:
            raise ConfigurationError(f"maxsize must be a positive integer, not {maxsize!r}")
        if client is not None:
            store_options["client"] = client
        if async_client is not None:
            store_options["async_client"] = async_client
        self.url = url
        self.namespace = namespace
        self.prefix = namespace + ":"
        self.default_ttl = float(default_ttl)
        # the environment wins: COALESCE_DISABLED=1 rolls back without a code change
        self.enabled = (enabled is not False) and not _disabled_by_environment()
        self.serializer = get_serializer(serializer)
        self.on_backend_error: BackendErrorMode = on_backend_error
        if "namespace" not in store_options and scheme_of(url) != "memory":
            store_options["namespace"] = namespace
        if scheme_of(url) != "memory":
            store_options.setdefault("serializer", self.serializer)
        if not callable(clock):
            raise ConfigurationError(f"clock must be a function returning seconds, not {clock!r}")
        self.clock = clock
        self.store = _make_store(url, maxsize, clock, store_options)
        self.flights: ThreadFlights[Entry] = ThreadFlights()
        self.aflights = AsyncFlights()
        self.batch_flights = BatchFlights()  # per-id flights of `cached_many` batches
        self._policies: weakref.WeakSet[Policy] = weakref.WeakSet()
        self._aside_policies: dict[str, AsidePolicy] = {}  # by stats name; under _lock
        # text keys -> their full stored names, for the hottest (see `_full_key`)
        self._full_keys: dict[str, str] = {}
        _all_caches.add(self)
        self._refresher: ThreadPoolExecutor | None = None
        self._computer: ThreadPoolExecutor | None = None
        self._refresh_tasks: set[asyncio.Task[Any]] = set()
        self._closed = False  # set by close(): no more background refreshes
        # keys with a background refresh pending: written under _lock; read without it by
        # the early-refresh hit test (one set lookup, atomic in CPython)
        self.refreshing: set[str] = set()
        self._lock = threading.Lock()
        self._last_logged = 0.0
        self.backend_errors = 0
        self.local = not self.store.shared  # reads cannot fail nor block: no wrapper needed
        # full tag -> full key -> how many computations of it carry the tag right now (two
        # may overlap: one fenced by a key invalidation, and its successor)
        self._tags_in_flight: dict[str, dict[str, int]] = {}
        if self.store.shared:
            self.store.on_invalidated = self._fence
            self.store.on_invalidated_tag = self._fence_tag
            self.store.on_missed_invalidations = self._fence_all
        if self.local:
            self._read = self.store.get  # type: ignore[method-assign]

    def __repr__(self) -> str:
        return f"Cache({redact(self.url)!r}, namespace={self.namespace!r}, enabled={self.enabled})"

    # -- decorators ---------------------------------------------------------------------

    @overload
    def cached(self, fn: Callable[P, R], /) -> CachedFunction[P, R]: ...

    @overload
    def cached(self, fn: None = None, /, **options: Unpack[CachedOptions]) -> Decorator: ...

    def cached(
        self, fn: Callable[..., Any] | None = None, /, **options: Unpack[CachedOptions]
    ) -> Any:
        """Cache a function's results for `ttl` seconds, sharing concurrent computations.

        `key` is a template over the parameters (`"user:{user_id}"`); without it the key is
        built from the function's name and all its arguments but those in `exclude`.
        `tags` are templates too; `invalidate_tag` deletes every entry carrying a tag.
        `stale_ttl` serves an expired value that long while one caller refreshes it.
        `stale_if_error` serves it that long after expiry when refreshing it raises
        (retrying about once a second). `timeout` bounds a caller's wait for a
        computation: then the stale value if one may be served, else `CoalesceTimeout`.
        `early_refresh` refreshes hot entries in the background before they expire (XFetch;
        a number is its `beta`). `jitter` shortens each entry's ttl by a random fraction up
        to it. `cache_errors` caches a raised exception for that many seconds (off by
        default). `copy=False` hands every caller the same stored object instead of a
        private copy. Every option is checked here (`ConfigurationError` naming it).
        """
        check_option_names("cached", options, CachedOptions.__annotations__)
        decorator = make_decorator(self, None, store=True, **options)
        return decorator if fn is None else decorator(fn)

    @overload
    def coalesced(self, fn: Callable[P, R], /) -> CachedFunction[P, R]: ...

    @overload
    def coalesced(
        self, fn: None = None, /, *, key: str | None = None, exclude: Sequence[str] = ()
    ) -> Decorator: ...

    def coalesced(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        key: str | None = None,
        exclude: Sequence[str] = (),
    ) -> Any:
        """Share one computation among overlapping identical calls; store nothing.

        Every caller of one flight receives the very same result object.
        """
        return make_decorator(self, fn, store=False, key=key, exclude=exclude, copy=False)

    def cached_many(
        self,
        *,
        key: str,
        ttl: float | None = None,
        tags: Sequence[str] = (),
        stale_ttl: float = 0.0,
        cache_missing: float | None = None,
        batch_window: float = DEFAULT_BATCH_WINDOW,
        max_batch: int = DEFAULT_MAX_BATCH,
        copy: bool = True,
    ) -> Callable[[Callable[..., Any]], CachedMany]:
        """Cache a batch function `f(ids: list) -> dict[id, value]` per id (issue 12).

        `key` is a template with one field filled with each id (`"user:{}"`); `tags` are
        templates too. A call `f([1, 2, 3])` reads every id's entry in one pass and calls the
        function once with only the missing ids, in the caller's order; an id being computed
        for another caller is waited for, never computed twice (on Redis, across processes).
        Ids the function leaves out are absent from the result and not cached, unless
        `cache_missing` caches their absence that many seconds. `f.load(id)` gathers the
        single-id calls of one event-loop iteration (async), or of `batch_window` seconds
        (threads), into one batch of at most `max_batch` ids. `f.invalidate(id)` deletes
        one id's entry, as `cache.invalidate("user:2")` does. See `coalesce.batch`.
        """
        return make_cached_many(
            self,
            key=key,
            tags=tags,
            cache_missing=cache_missing,
            batch_window=batch_window,
            max_batch=max_batch,
            ttl=ttl,
            stale_ttl=stale_ttl,
            copy=copy,
        )

    def _register(self, policy: Policy) -> None:
        self._policies.add(policy)

    # -- cache-aside ------------------------------------------------------------------------
    #
    # The decorators' path for a key that is given: a policy per stats name (`AsidePolicy`),
    # the same read, flight, `fill` (lease and fencing on Redis), entries and stats.

    def get_or_set(
        self,
        key: str,
        fn: Callable[[], R],
        *,
        ttl: float | None = None,
        tags: Sequence[str] = (),
        stale_ttl: float = 0.0,
        stale_if_error: float = 0.0,
        cache_errors: float | None = None,
        timeout: float | None = None,
        early_refresh: bool | float = False,
        jitter: float = 0.0,
        copy: bool = True,
        name: str | None = None,
    ) -> R:
        """The value stored under `key`, else `fn()` (no arguments), stored for `ttl` seconds.

        Overlapping callers of one key share one computation (on Redis, across processes),
        exactly as callers of a decorated function do: the same options (`ttl`, `tags`,
        `stale_ttl`, `stale_if_error`, `cache_errors`, `timeout`, `early_refresh`,
        `jitter`, `copy`; see `cached`), the same fencing by `invalidate`, the same copies
        of values. `key` and `tags` are stored as `stored_key` says (`user:a b` as
        `user:a%20b`), so a decorator with `key="user:{name}"` meets the same entries.
        Counted in `stats()` under `name`, by default the key up to its first `:` (`user`
        for `user:42`; `get_or_set` for a key without one). With the cache disabled, just
        `fn()`.
        """
        options = {
            "ttl": ttl,
            "stale_ttl": stale_ttl,
            "stale_if_error": stale_if_error,
            "cache_errors": cache_errors,
            "timeout": timeout,
            "early_refresh": early_refresh,
            "jitter": jitter,
            "copy": copy,
        }
        policy, stored, full_tags = self._aside(key, fn, tags, name, options)
        if not self.enabled:
            return fn()
        return cast(R, get_or_set(self, policy, stored, fn, full_tags))

    async def aget_or_set(
        self,
        key: str,
        fn: Callable[[], Awaitable[R]],
        *,
        ttl: float | None = None,
        tags: Sequence[str] = (),
        stale_ttl: float = 0.0,
        stale_if_error: float = 0.0,
        cache_errors: float | None = None,
        timeout: float | None = None,
        early_refresh: bool | float = False,
        jitter: float = 0.0,
        copy: bool = True,
        name: str | None = None,
    ) -> R:
        """`get_or_set` for async code: `await fn()` computed once for overlapping callers
        (on every event loop of the process; on Redis, across processes)."""
        options = {
            "ttl": ttl,
            "stale_ttl": stale_ttl,
            "stale_if_error": stale_if_error,
            "cache_errors": cache_errors,
            "timeout": timeout,
            "early_refresh": early_refresh,
            "jitter": jitter,
            "copy": copy,
        }
        policy, stored, full_tags = self._aside(key, fn, tags, name, options)
        if not self.enabled:
            return await fn()
        return cast(R, await aget_or_set(self, policy, stored, fn, full_tags))

    def get(self, key: str, default: Any = None) -> Any:
        """A private copy of the value under `key` as a decorated call or `get_or_set` would
        serve it (fresh, or stale within its `stale_ttl`), else `default`. A failure cached
        with `cache_errors` is raised. A failing store reads as missing (unless failing
        closed); a disabled cache reads nothing."""
        full = self._full_key(key)
        if not self.enabled:
            return default
        return served(self._read(full), default, self.clock())

    async def aget(self, key: str, default: Any = None) -> Any:
        """`get` for async code."""
        full = self._full_key(key)
        if not self.enabled:
            return default
        entry = self._read(full) if self.local else await self._aread(full)
        return served(entry, default, self.clock())

    def get_fresh(self, key: str, default: Any = None) -> Any:
        """The value under `key` while it is fresh, as `get_or_set` would return it on a hit
        (the same read, the same freshness test, no copy beyond what the call stored:
        `copy=False` values come back as the very object stored in memory), else `default`:
        missing, stale or expired (`get_or_set` then decides whether to serve it and
        refresh), a cached failure (`get_or_set` raises it), a failing store without a
        fresh fallback, a disabled cache.

        For a fast path in front of `get_or_set` (the web edges answer hits with it). It
        never computes, waits, refreshes nor counts; `early_refresh` callers should call
        `get_or_set` on every request: it decides when to refresh early. Fails closed as
        `get` does (with `on_backend_error="raise"` a failing store raises `BackendError`).
        """
        full = self._full_key(key)
        if not self.enabled:
            return default
        return self._fresh_value(self._read(full), default)

    async def aget_fresh(self, key: str, default: Any = None) -> Any:
        """`get_fresh` for async code (on Redis the read is awaited)."""
        full = self._full_key(key)
        if not self.enabled:
            return default
        entry = self._read(full) if self.local else await self._aread(full)
        return self._fresh_value(entry, default)

    def _fresh_value(self, entry: Entry | None, default: Any) -> Any:
        """`get_fresh`'s answer for the entry it read (the hot path's test: fresh, no error)."""
        if entry is None or entry.error or entry.fresh_until <= self.clock():
            return default
        value = entry.value
        return value.thaw() if type(value) is Frozen else value

    def _full_key(self, key: str) -> str:
        """The full stored name of a text key, as `get_or_set` stores it. The names of the
        hottest keys (at most 4096, then forgotten at once) are remembered: the web edges
        ask for the same keys on every hit. Written without a lock: one dict operation."""
        full = self._full_keys.get(key) if type(key) is str else None
        if full is None:
            full = self.prefix + text_key(self._checked(key))
            if type(key) is str:
                if len(self._full_keys) >= 4096:
                    self._full_keys.clear()
                self._full_keys[key] = full
        return full

    def set(
        self,
        key: str,
        value: Any,
        *,
        ttl: float | None = None,
        tags: Sequence[str] = (),
        stale_ttl: float = 0.0,
        stale_if_error: float = 0.0,
        jitter: float = 0.0,
    ) -> bool:
        """Store `value` under `key` for `ttl` seconds (default: the cache's `default_ttl`);
        return whether it was stored.

        Checked and frozen as a decorator's result is, so later readers get copies. Like
        `invalidate`, it first fences the computations of the key in flight (in this
        process, and on Redis in every process), so none of them overwrites it with a value
        computed before. A disabled cache writes nothing (False).
        """
        options = {"ttl": ttl, "stale_ttl": stale_ttl, "stale_if_error": stale_if_error}
        full, entry = self._entry_to_set(key, value, tags, {**options, "jitter": jitter})
        if not self.enabled:
            return False
        self._fence(full)
        try:
            self.store.delete(full)  # on Redis, deletes the lease: fences other processes
            return self.store.set(full, entry)
        except BackendError as exc:
            self._backend_failed(None, exc)  # raises when failing closed
            self._remember(full, entry, Fence())
            return False
        finally:
            self._fence(full)

    async def aset(
        self,
        key: str,
        value: Any,
        *,
        ttl: float | None = None,
        tags: Sequence[str] = (),
        stale_ttl: float = 0.0,
        stale_if_error: float = 0.0,
        jitter: float = 0.0,
    ) -> bool:
        """`set` for async code."""
        options = {"ttl": ttl, "stale_ttl": stale_ttl, "stale_if_error": stale_if_error}
        full, entry = self._entry_to_set(key, value, tags, {**options, "jitter": jitter})
        if not self.enabled:
            return False
        self._fence(full)
        try:
            await self.store.adelete(full)
            return await self.store.aset(full, entry)
        except BackendError as exc:
            self._backend_failed(None, exc)
            self._remember(full, entry, Fence())
            return False
        finally:
            self._fence(full)

    def _entry_to_set(
        self, key: str, value: Any, tags: Sequence[str], options: dict[str, Any]
    ) -> tuple[str, Entry]:
        policy, stored, full_tags = self._aside(key, None, tags, None, options)
        return self.prefix + stored, policy.make_entry(self, value, time.perf_counter(), full_tags)

    def _aside(
        self,
        key: str,
        fn: Callable[[], Any] | None,
        tags: Sequence[str],
        name: str | None,
        options: dict[str, Any],
    ) -> tuple[AsidePolicy, str, tuple[str, ...]]:
        """Check a cache-aside call: its policy (options checked as the decorators check
        theirs), the key's stored form and the tags' full names."""
        stored = text_key(self._checked(key))
        if fn is not None and not callable(fn):
            raise ConfigurationError(f"fn must be a function without arguments, not {fn!r}")
        if isinstance(tags, (str, bytes)) or not all(isinstance(tag, str) for tag in tags):
            raise ConfigurationError(f"tags must be a list of tags, not {tags!r}")
        full_tags = tuple(self.prefix + text_key(self._checked(tag)) for tag in tags)
        if name is None:
            name = stored.partition(":")[0] if ":" in stored else "get_or_set"
        elif not isinstance(name, str) or not name:
            raise ConfigurationError(f"name must be a non-empty string, not {name!r}")
        policy = self._aside_policies.get(name)
        if fn is None:  # `set`: nothing to count, only the entry to make
            policy = policy or AsidePolicy(self, name)
        elif policy is None:
            with self._lock:
                if len(self._aside_policies) >= _MAX_ASIDE_NAMES:
                    name = "get_or_set"  # keys without a kind before their ':': one slot
                policy = self._aside_policies.get(name)
                if policy is None:
                    policy = self._aside_policies[name] = AsidePolicy(self, name)
                    self._register(policy)
        return policy.with_options(options), stored, full_tags

    # -- reads on the call path -----------------------------------------------------------
    #
    # For the core's own drivers (decorators, batch: full keys, `STORE_FAILED`); code
    # outside the core reads through `get` / `get_fresh` / `get_or_set` and their a-twins.

    def _read(self, key: str) -> Entry | None:
        """The stored entry of a full key; a failing store reads as `STORE_FAILED`, an
        expired entry (or raises when failing closed)."""
        try:
            return self.store.get(key)
        except BackendError as exc:
            self._backend_failed(None, exc)  # raises when failing closed
            return self._fallback(key)

    async def _aread(self, key: str) -> Entry | None:
        if not self.store.shared:
            return self.store.get(key)
        try:
            return await self.store.aget(key)
        except BackendError as exc:
            self._backend_failed(None, exc)  # raises when failing closed
            return self._fallback(key)

    def _fallback(self, key: str) -> Entry:
        """After a failed read (failing open): what this process computed for `key` while
        the store was unavailable (its fallback, no I/O), else `STORE_FAILED`."""
        entry = self.store.fallback(key)
        return STORE_FAILED if entry is None else entry

    def _remember(self, key: str, entry: Entry, fence: Fence) -> None:
        """Hand an entry computed because the store failed to the store's fallback."""
        self.store.remember(key, entry, fence=fence)

    def _backend_failed(self, policy: Policy | None, exc: BackendError) -> None:
        """Count and (at most every 30 s) log a store failure; re-raise if failing closed."""
        self.backend_errors += 1
        if policy is not None:
            policy.stats.backend_errors += 1
        if self.on_backend_error == "raise":
            raise exc
        now = time.monotonic()
        if now - self._last_logged >= _LOG_EVERY:
            self._last_logged = now
            logger.warning(
                "coalesce: the cache store %s failed (%s); serving what this process kept and "
                "computing with coalescing until it is back",
                redact(self.url),
                exc,
            )

    def _refresh_in_background(self, key: str, job: Callable[[], Any]) -> None:
        """Refresh `key`'s entry (stale, or early) in a worker thread, unless a refresh of
        it is already pending here (the flight then keeps computations to one at a time).
        After `close()`, nothing is refreshed in the background."""
        with self._lock:
            if self._closed or key in self.refreshing:
                return
            if self._refresher is None:
                self._refresher = ThreadPoolExecutor(4, thread_name_prefix="coalesce-refresh")
            self.refreshing.add(key)
            self._refresher.submit(self._refresh, key, job)

    def _refresh(self, key: str, job: Callable[[], Any]) -> None:
        try:
            run_sync_refresh(job)
        finally:
            with self._lock:
                self.refreshing.discard(key)

    def _compute_pool(self) -> ThreadPoolExecutor:
        """The threads sync computations with a `timeout` run on, so that their callers
        (the leader's included) can stop waiting; bounded: a computation beyond its size
        waits for a thread, and its callers time out meanwhile."""
        with self._lock:
            if self._computer is None:
                self._computer = ThreadPoolExecutor(
                    _COMPUTE_THREADS, thread_name_prefix="coalesce-compute"
                )
            return self._computer

    def _arefresh_in_background(self, key: str, job: Coroutine[Any, Any, Any]) -> None:
        """Refresh `key`'s entry in a task of the running loop (see `_refresh_in_background`);
        `aclose()` cancels the tasks still running."""
        with self._lock:
            if self._closed or key in self.refreshing:
                job.close()
                return
            self.refreshing.add(key)

        async def guarded() -> None:
            try:
                with contextlib.suppress(Exception):  # the next caller computes and sees it
                    await job
            finally:
                with self._lock:
                    self.refreshing.discard(key)

        task = asyncio.get_running_loop().create_task(guarded())
        self._refresh_tasks.add(task)
        task.add_done_callback(self._refresh_tasks.discard)

    # -- invalidation ---------------------------------------------------------------------

    def _full(self, key: str) -> str:
        """The full stored name of a key or tag given to a method (see `stored_key`)."""
        return self.prefix + stored_key(self._checked(key))

    def _checked(self, key: str) -> str:
        """`key` as given, refused unless it is valid text."""
        if not isinstance(key, str) or not key:
            raise ConfigurationError(f"a key must be a non-empty string, not {key!r}")
        if not key.isascii():
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigurationError(
                    f"key {key!r} is not valid text (a lone surrogate); keys of such values "
                    "are stored escaped: use fn.key(...) to get one"
                ) from None
        return key

    def _after_fork(self) -> None:
        """In a forked child: fresh locks, no refresh pool, no tags in flight (the flight
        tables reset themselves)."""
        self._lock = threading.Lock()
        self._refresher = None
        self._computer = None
        self._refresh_tasks = set()
        self.refreshing = set()
        self._tags_in_flight = {}

    def _fence(self, full_key: str) -> None:
        """Fence this process's computations of `full_key` in flight."""
        self.flights.invalidate(full_key)
        self.aflights.invalidate(full_key)
        self.batch_flights.invalidate(full_key)

    @contextlib.contextmanager
    def _computing(self, key: str, tags: tuple[str, ...]) -> Iterator[None]:
        """Mark `key` as computing with `tags`, so an invalidation of a tag fences it."""
        if not tags:
            yield
            return
        with self._lock:
            for tag in tags:
                counts = self._tags_in_flight.setdefault(tag, {})
                counts[key] = counts.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                for tag in tags:
                    keys = self._tags_in_flight.get(tag)
                    if keys is not None and key in keys:
                        keys[key] -= 1
                        if not keys[key]:
                            del keys[key]
                        if not keys:
                            del self._tags_in_flight[tag]

    def _fence_all(self) -> None:
        """Detach every computation in flight: invalidations may have been missed, so new
        callers start afresh instead of joining one (on Redis the lease token still decides
        whether its result may be stored)."""
        self.flights.invalidate_all()
        self.aflights.invalidate_all()
        self.batch_flights.invalidate_all()

    def _fence_tag(self, full_tag: str) -> None:
        """Fence this process's computations in flight that carry `full_tag`."""
        with self._lock:
            keys = list(self._tags_in_flight.get(full_tag, ()))
        for key in keys:
            self._fence(key)

    def invalidate(self, key: str) -> bool:
        """Delete `key` (without namespace); return whether an entry existed.

        Computations of the key in flight are fenced before the deletion and again after it
        (one begun in between may have read the old entry), so none of them can store its
        result or be joined afterwards: the next caller computes afresh.
        """
        full = self._full(key)
        if not self.enabled:
            return False  # the rollback switch: nothing is read or written
        self._fence(full)
        try:
            return self.store.delete(full)
        finally:
            self._fence(full)  # a flight begun meanwhile may have read the old entry

    async def ainvalidate(self, key: str) -> bool:
        """`invalidate` for async code."""
        full = self._full(key)
        if not self.enabled:
            return False
        self._fence(full)
        try:
            return await self.store.adelete(full)
        finally:
            self._fence(full)

    def invalidate_tag(self, tag: str) -> int:
        """Delete every entry carrying `tag`; return how many there were.

        Computations in flight whose entries will carry the tag are fenced first, as for
        `invalidate`.
        """
        full = self._full(tag)
        if not self.enabled:
            return 0
        self._fence_tag(full)
        try:
            return self.store.delete_tag(full)
        finally:
            self._fence_tag(full)

    async def ainvalidate_tag(self, tag: str) -> int:
        """`invalidate_tag` for async code."""
        full = self._full(tag)
        if not self.enabled:
            return 0
        self._fence_tag(full)
        try:
            return await self.store.adelete_tag(full)
        finally:
            self._fence_tag(full)

    def get_entry(self, key: str, *, strict: bool = False) -> Entry | None:
        """The entry stored under `key` (without namespace), fresh or stale, for inspection:
        a copy with the value as a caller would receive it and the tags without namespace.

        An entry that cannot be decoded (written by another serializer or program) counts as
        missing, as it does for the decorators; with `strict=True` it raises
        `SerializationError` saying why, and a Redis store reads Redis, not its near cache.
        """
        full = self._full(key)
        entry = self.store.get_strict(full) if strict else self.store.get(full)
        return None if entry is None else self._inspectable(entry)

    async def aget_entry(self, key: str, *, strict: bool = False) -> Entry | None:
        """`get_entry` for async code (on Redis, read in a worker thread: the event loop
        never blocks)."""
        if self.local:
            return self.get_entry(key, strict=strict)
        return await asyncio.to_thread(self.get_entry, key, strict=strict)

    def _inspectable(self, entry: Entry) -> Entry:
        """A copy of a stored entry for a reader: its own copy of the value (not the store's
        frozen form) and tags without the namespace, as the decorators name them."""
        value = entry.value.thaw() if isinstance(entry.value, Frozen) else entry.value
        prefix = self.prefix
        tags = tuple(tag[len(prefix) :] if tag.startswith(prefix) else tag for tag in entry.tags)
        return Entry(
            value,
            created=entry.created,
            ttl=entry.ttl,
            stale_ttl=entry.stale_ttl,
            compute_time=entry.compute_time,
            tags=tags,
            error=entry.error,
            stale_if_error=entry.stale_if_error,
        )

    def keys(
        self, pattern: str = "*", *, limit: int = 1000, max_scanned: int | None = None
    ) -> KeyList:
        """Up to `limit` keys (without namespace) matching the glob `pattern`.

        `max_scanned` bounds the work, not only the result: the store looks at about that
        many stored keys at most (on Redis, in SCAN calls of 1,000), so a pattern matching
        nothing cannot walk a large database. The result is a list; its `complete` says
        whether the listing looked at everything (False: there may be more matches).
        """
        for name, bound in (("limit", limit), ("max_scanned", max_scanned)):
            if bound is not None and (type(bound) is not int or bound < 1):
                raise ConfigurationError(f"{name} must be a positive integer, not {bound!r}")
        full = self.store.keys(
            self.prefix + self._checked(pattern), limit=limit, max_scanned=max_scanned
        )
        return KeyList((key[len(self.prefix) :] for key in full), full.complete)

    async def akeys(
        self, pattern: str = "*", *, limit: int = 1000, max_scanned: int | None = None
    ) -> KeyList:
        """`keys` for async code (on Redis, scanned in a worker thread)."""
        if self.local:
            return self.keys(pattern, limit=limit, max_scanned=max_scanned)
        return await asyncio.to_thread(self.keys, pattern, limit=limit, max_scanned=max_scanned)

    # -- stats and lifecycle ----------------------------------------------------------------

    def stats(self) -> dict[str, dict[str, Any]]:
        """Counters per decorated function: by key template, else by qualified name (both
        when functions share a template). Copies, read now."""
        return {name: stats.as_dict() for name, stats in self.counters().items()}

    def counters(self) -> dict[str, Stats]:
        """The live `Stats` of each function of this cache, named as `stats()` names them.

        The objects the calls count into, not copies: one kept goes on counting, also
        after its function is gone from the cache (collected) or renamed here (another
        function with its key template appeared). Read them; the cache writes them.
        """
        result: dict[str, Stats] = {}
        policies = list(self._policies)
        names = [policy.stats_name for policy in policies]
        for policy, name in zip(policies, names, strict=True):
            if names.count(name) > 1:  # one template on several functions: tell them apart
                name = f"{name} ({policy.name})"
            unique, n = name, 1
            while unique in result:  # and the same name too (closures made in a loop)
                n += 1
                unique = f"{name} #{n}"
            result[unique] = policy.stats
        return result

    def close(self) -> None:
        """Stop background work and close the store's connections.

        Background refreshes queued but not started are dropped and those running are
        waited for, as are sync computations left running by callers that timed out; the
        asyncio ones are `aclose`'s. The cache stays usable; nothing more is refreshed in
        the background.
        """
        self._stop_background()
        self.store.close()

    def _stop_background(self) -> None:
        """Refresh nothing more in the background; wait for the worker threads' jobs."""
        with self._lock:
            self._closed = True
            pools = [self._refresher, self._computer]
            self._refresher = self._computer = None
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    async def aclose(self) -> None:
        """`close` for async code: also cancels this process's background refresh tasks
        (of the running event loop) and waits until they have ended."""
        loop = asyncio.get_running_loop()
        tasks = [task for task in self._refresh_tasks if task.get_loop() is loop]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(self._stop_background)
        await self.store.aclose()


# ---------------------------------------------------------------------------------------
# forked children (gunicorn --preload, multiprocessing) start without the parent's threads

_all_caches: weakref.WeakSet[Cache] = weakref.WeakSet()


def _reset_after_fork() -> None:
    global _default_lock
    _default_lock = threading.Lock()
    for cache in list(_all_caches):
        cache._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


# ---------------------------------------------------------------------------------------
# the default cache

_default_lock = threading.Lock()
_default: Cache | None = None
_default_policies: weakref.WeakSet[Policy] = weakref.WeakSet()


def configure(url_or_cache: str | Cache = "memory://", **options: Any) -> Cache:
    """Set the default cache of the module-level decorators; return it.

    Functions decorated before (and already called) switch to the new cache on their next
    call.
    """
    global _default
    cache = url_or_cache if isinstance(url_or_cache, Cache) else Cache(url_or_cache, **options)
    with _default_lock:
        _default = cache
        for policy in list(_default_policies):
            policy.cache = None
            cache._register(policy)
    return cache


def get_cache() -> Cache:
    """The default cache: configured, else from `COALESCE_URL`, else in memory."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Cache(os.environ.get("COALESCE_URL") or "memory://")
        return _default


def bind_default(policy: Policy) -> Cache:
    """Bind a policy to its cache at its first call (the default one unless fixed)."""
    if policy.fixed_cache is not None:
        policy.cache = policy.fixed_cache
        return policy.fixed_cache
    cache = get_cache()
    with _default_lock:
        _default_policies.add(policy)
        cache._register(policy)
        policy.cache = cache
    return cache


decorators.bind_default = bind_default


@overload
def cached(fn: Callable[P, R], /) -> CachedFunction[P, R]: ...


@overload
def cached(fn: None = None, /, **options: Unpack[CachedOptions]) -> Decorator: ...


def cached(fn: Callable[..., Any] | None = None, /, **options: Unpack[CachedOptions]) -> Any:
    """`Cache.cached` on the default cache (see `configure`)."""
    check_option_names("cached", options, CachedOptions.__annotations__)
    decorator = make_decorator(None, None, store=True, **options)
    return decorator if fn is None else decorator(fn)


@overload
def coalesced(fn: Callable[P, R], /) -> CachedFunction[P, R]: ...


@overload
def coalesced(
    fn: None = None, /, *, key: str | None = None, exclude: Sequence[str] = ()
) -> Decorator: ...


def coalesced(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    key: str | None = None,
    exclude: Sequence[str] = (),
) -> Any:
    """`Cache.coalesced` on the default cache (see `configure`)."""
    return make_decorator(None, fn, store=False, key=key, exclude=exclude, copy=False)
