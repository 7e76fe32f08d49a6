"""One decorated endpoint's path into the core, shared by every web edge.

FastAPI's `CachedRoute` and the other frameworks' `ViewCache` are `CachedEndpoint`s: what
they decide once about a decorated handler (its checked options, its name, its tags), and
the few calls through which its requests reach the core, all public:

* a hit: `Cache.get_fresh` / `aget_fresh` of the request's key, the core's read and
  freshness test (with `early_refresh`, skipped: every request goes to `get_or_set`, which
  decides when to refresh early);
* everything else: `Cache.get_or_set` / `aget_or_set` with the route's options
  (`RouteOptions.aside`), so coalescing (per process and, on Redis, per fleet), fencing,
  `stale_ttl`, `stale_if_error`, `timeout`, `early_refresh`, `jitter`, the kill switch,
  failing open or closed and the stats are the core's; the function it computes renders
  the response of one request and returns its entry (`coalesce.http.render`);
  a route that stores nothing (`coalesced`) shares its runs through `Cache.coalesced`;
* `Cache.invalidate` / `invalidate_tag` of the keys and tags in their stored form
  (`coalesce.cache.text_key`, as `get_or_set` stores them).

Keys and tags are built as text (`raw` keys) and handed to the core as they are: it
escapes them once. Which request ran the handler is known from the function it gave the
core; whether the others waited (COALESCED), hit, or were served a stale entry is told by
the entry's creation time (`coalesce.http.cache_status`).

Fields are written when decorating, but for the bounded sets noted below (`origins`,
`warned`, the stored forms of keys), written by requests without a lock: each write is one
set or dict operation (atomic in CPython), and a lost write only costs a recomputation.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import coalesce
from coalesce import BackendError, Cache, ConfigurationError, get_cache
from coalesce.cache import text_key
from coalesce.http.headers import COALESCED, HIT, MISS, STALE, cache_status
from coalesce.http.options import RouteOptions

_COUNTER = {HIT: "hits", MISS: "misses", STALE: "stale", COALESCED: "coalesced"}


class CachedEndpoint:
    """What every edge decides once about a decorated handler, and its calls into the core."""

    def __init__(
        self,
        fn: Callable[..., Any],
        options: RouteOptions,
        *,
        store: bool,
        logger: logging.Logger,
    ) -> None:
        self.fn = fn
        self.name = f"{fn.__module__}.{fn.__qualname__}"
        self.logger = logger
        # False for `coalesced`: share runs, keep nothing. Its options are those `coalesced`
        # takes; the others keep their defaults (no `cache_4xx`, `stale_if_error`...).
        self.store = store
        self.ttl = options.ttl
        self.stale_ttl = options.stale_ttl
        self.vary = options.vary
        self.shared = options.shared
        self.cache = options.cache  # None: the default cache, looked up per request
        self.cache_4xx = options.cache_4xx
        self.honor_no_cache = options.honor_client_no_cache
        self.registry = options.registry
        self.stale_if_error = options.stale_if_error
        self.early_refresh = bool(options.early_refresh)
        self.aside = {**options.aside(), "name": f"{self.name}[http]"}
        self.origins: set[str] = set()  # the `scheme://host` it served (at most 64 kept)
        self.warned: set[str] = set()  # the degradations already logged for it
        self._normal: dict[str, str] = {}  # raw key -> its stored form (see `normal`)
        if not store:  # the core's single flight, keeping nothing
            self._share, self._ashare = self._sharing(options.cache)

    def _sharing(self, cache: Cache | None) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """`Cache.coalesced` runs of a `coalesced` endpoint, sync and async, keyed by the
        key they are given (functions of their own: named after the handler in stats)."""

        def share(key: str, run: Callable[[], Any]) -> Any:
            return run()

        async def ashare(key: str, run: Callable[[], Awaitable[Any]]) -> Any:
            return await run()

        for function in (share, ashare):
            function.__qualname__ = function.__name__ = f"{self.fn.__qualname__}[http]"
            function.__module__ = self.fn.__module__
        decorate = (cache.coalesced if cache else coalesce.coalesced)(key="{key}")
        return decorate(share), decorate(ashare)

    # -- keys ------------------------------------------------------------------------------

    def normal(self, raw_key: str) -> str:
        """`raw_key` as `get_or_set` stores it (escaped where unsafe, bounded in length), as
        `invalidate` takes it; remembered for the hottest keys (at most 4096, then
        forgotten all at once)."""
        known = self._normal.get(raw_key)
        if known is None:
            known = text_key(raw_key)
            if len(self._normal) >= 4096:
                self._normal.clear()
            self._normal[raw_key] = known
        return known

    def route_tag(self) -> str:
        """The tag of every entry of this endpoint."""
        return f"route:{self.name}"

    def request_tag(self, ident: str) -> str:
        """The tag of every entry (each `vary` variant, path, query string and host) of one
        request, or of one template key."""
        return f"route:{self.name}?{ident}"

    def only(self, what: str, seen: set[str], example: str) -> str:
        """The one `what` (an origin, a path) of `seen` this process served, for a key or an
        invalidation that names none; `ConfigurationError` when it served none or several
        (the message asks for `what=example`)."""
        if len(seen) == 1:
            return next(iter(seen))
        raise ConfigurationError(
            f"{self.name}: which {what}? pass {what}={example} (this process served "
            f"{'none' if not seen else ', '.join(sorted(seen))})"
        )

    def add_origin(self, origin: str) -> None:
        if origin not in self.origins and len(self.origins) < 64:
            self.origins.add(origin)

    def warn_once(self, kind: str, message: str, *args: Any) -> None:
        """Log a degradation of this endpoint the first time it happens, not per request."""
        if kind not in self.warned:
            self.warned.add(kind)
            self.logger.warning(message, *args)

    def keeps_error(self, status: int) -> bool:
        """Whether an HTTP error of `status` the handler raised may be kept as an entry (and
        raised again on hits): a 4xx, with `cache_4xx=True` (which only `cached` takes),
        unless its headers make it personal (`coalesce.http.render.error_entry`); else it is
        raised on. The same option keeps a returned 4xx (`coalesce.http.render.entry_from`)."""
        return self.cache_4xx and 400 <= status < 500

    def ttl_now(self, cache: Cache) -> float | None:
        """The ttl of the entry a request to `cache` makes (None: a `coalesced` route keeps
        nothing). Asked per request: without `cache=`, the cache is the default one of the
        moment (`configure` may replace it), and the core too reads `default_ttl` as it
        makes an entry."""
        if not self.store:
            return None
        return self.ttl if self.ttl is not None else cache.default_ttl

    # -- the calls into the core, sync and async side by side -------------------------------

    def hit(self, cache: Cache, raw_key: str) -> dict[str, Any] | None:
        """The rendered response of a fresh entry of `raw_key` (a hit), else None."""
        if not self.store or self.early_refresh:
            return None
        value = cache.get_fresh(raw_key)
        return value if type(value) is dict else None

    async def ahit(self, cache: Cache, raw_key: str) -> dict[str, Any] | None:
        """`hit` for async code (callers on a `local` cache may call `hit`: no I/O)."""
        if not self.store or self.early_refresh:
            return None
        value = await cache.aget_fresh(raw_key)
        return value if type(value) is dict else None

    def through(
        self, cache: Cache, raw_key: str, tags: tuple[str, ...], run: Callable[[], Any]
    ) -> dict[str, Any]:
        """The entry of `raw_key` from the core: stored, else `run()` once for every
        overlapping request (raises what `run` raises, `NotShared` included)."""
        if self.store:
            return cast(dict[str, Any], cache.get_or_set(raw_key, run, tags=tags, **self.aside))
        return cast(dict[str, Any], self._share(raw_key, run))

    async def athrough(
        self,
        cache: Cache,
        raw_key: str,
        tags: tuple[str, ...],
        run: Callable[[], Awaitable[Any]],
    ) -> dict[str, Any]:
        if self.store:
            value = await cache.aget_or_set(raw_key, run, tags=tags, **self.aside)
        else:
            value = await self._ashare(raw_key, run)
        return cast(dict[str, Any], value)

    def drop(self, cache: Cache, raw_key: str) -> bool:
        """Delete `raw_key`'s entry for a request that asked for a fresh response
        (`honor_client_no_cache`); False when the store failed (see `cannot_drop`)."""
        try:
            cache.invalidate(self.normal(raw_key))
        except BackendError as exc:
            return self.cannot_drop(cache, exc)
        return True

    async def adrop(self, cache: Cache, raw_key: str) -> bool:
        try:
            await cache.ainvalidate(self.normal(raw_key))
        except BackendError as exc:
            return self.cannot_drop(cache, exc)
        return True

    def cannot_drop(self, cache: Cache, exc: BackendError) -> bool:
        """The entry may still be there, and computing through the cache could serve it:
        fail as the cache's reads do (raise when failing closed), else the request runs
        uncached (False), logged once."""
        if cache.on_backend_error == "raise":
            raise exc
        self.warn_once(
            "no-cache",
            "coalesce: cannot drop an entry of %s for a no-cache request (%s); running it uncached",
            self.name,
            exc,
        )
        return False

    def invalidate_all(self) -> int:
        """Delete every entry of this endpoint; return how many there were."""
        return (self.cache or get_cache()).invalidate_tag(self.normal(self.route_tag()))

    async def ainvalidate_all(self) -> int:
        return await (self.cache or get_cache()).ainvalidate_tag(self.normal(self.route_tag()))

    # -- what happened (counters and the log) ------------------------------------------------

    def status(self, value: dict[str, Any], ran: bool, started: float, metrics: Any) -> str:
        """MISS, COALESCED, STALE or HIT for an entry the core returned, counted."""
        status = cache_status(
            computed_here=ran,
            created=value["created"],
            ttl=math.inf if value["ttl"] is None else value["ttl"],
            started=started,
            now=time.time(),
        )
        counter = _COUNTER[status]
        setattr(metrics, counter, getattr(metrics, counter) + 1)
        return status

    def computed(self, metrics: Any, raw_key: str, seconds: float, code: int) -> None:
        """Count one computation (`code`: the status it answered) and log one line for it."""
        metrics.record_computation(seconds, failed=code >= 500)
        key = self.normal(raw_key)
        self.logger.log(
            logging.WARNING if code >= 500 else logging.INFO,
            "coalesce computed %s in %.1f ms (HTTP %s)",
            key,
            seconds * 1000,
            code,
            extra={
                "route": metrics.route,
                "key": key,
                "cache_status": MISS,
                "duration_ms": round(seconds * 1000, 3),
                "status_code": code,
                "handler": self.name,
            },
        )
