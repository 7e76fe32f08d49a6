"""One decorated route handler: the decisions made once, and the path of one request.

    request ──► HitShortcut (routes without dependencies, before FastAPI validates or
       │        solves anything): a request seen before, no credentials, fresh entry ──► HIT
       ▼
    FastAPI (validation, dependencies) ──► the decorated endpoint ──► `CachedRoute.serve`:

    request ──► GET/HEAD? cache enabled? ── no ──► the handler, as if undecorated
       │
       ├─ Authorization/Cookie not covered by the key (and not shared=True) ──► BYPASS
       │  (covered: each such header in `vary`, or a key template that reads the user's
       │  identity: a dependency result such as `{user.id}`, a cookie or credential header)
       ▼
    key ──► read the entry ── fresh ──► HIT (the hot path: one read, nothing else)
       │
       └─ missing / stale ──► the core's decorator on `compute` (the flight: one
          computation per key; on Redis one per fleet), which runs the handler for one
          request, renders it, and stores the entry ──► MISS | COALESCED | STALE

The shortcut is installed in place of the route's ASGI app (`APIRoute.app`, or the context
FastAPI makes of a route for each `include_router`) by the route's first request, only when
FastAPI would do nothing on a hit that it skips: no dependencies (an auth check must be able
to refuse), path and query parameters only, no default factories (their values are then a
function of the request's text). It maps a request's *raw identity* (root path, path, query
string, `vary` header lines) to the key the full way computed for it.

Only the public API of coalesce is used: `Cache.aread` / `ainvalidate` /
`ainvalidate_tag`, `Cache.cached` / `coalesced` (and their `.key`) on a small `compute`
function whose key template is `"{key}"`, and `Entry`. Which request ran the handler is
known from its `Job`; whether the others waited (COALESCED) or hit is told by the entry's
creation time (`coalesce.http.cache_status`).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
import typing
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, cast

import fastapi.routing
from fastapi import HTTPException, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

import coalesce
from coalesce import Cache, CoalesceError, ConfigurationError, LeaderFailedError, get_cache
from coalesce.decorators import check_seconds
from coalesce.errors import BackendError
from coalesce.fastapi_keys import (
    REQUIRED,
    analyse,
    bind_identity,
    encode_params,
    encode_vary,
    resolved_signature,
    template_carries_identity,
)
from coalesce.fastapi_metrics import REGISTRY, MetricsRegistry, RouteMetrics
from coalesce.fastapi_render import NotShared, Responder, entry_of, exception_entry, render
from coalesce.http import (
    BYPASS,
    COALESCED,
    CREDENTIAL_HEADERS,
    HIT,
    MISS,
    STALE,
    cache_status,
    client_wants_fresh,
    is_token,
)

logger = logging.getLogger("coalesce.fastapi")

_COUNTER = {HIT: "hits", MISS: "misses", STALE: "stale", COALESCED: "coalesced"}
_CREDENTIALS = {name.encode(): name for name in CREDENTIAL_HEADERS}
# What rendering a request's key or tags may raise: the request then runs uncached.
_UNRENDERABLE = (CoalesceError, TypeError, ValueError, AttributeError, LookupError)


# FastAPI runs a route included with `include_router` as a context made for that inclusion
# (its prefix, dependencies, response class); a private helper finds it, if there is one.
_effective_context = getattr(fastapi.routing, "_get_scope_effective_route_context", None)


def served_route(scope: Scope) -> Any:
    """The route FastAPI runs for a request: `scope["route"]`, or its inclusion context."""
    route = scope.get("route")
    if _effective_context is not None:
        context = _effective_context(scope)
        if context is not None and getattr(context, "original_route", None) is route:
            return context
    return route


def _has_default_factory(annotation: Any) -> bool:
    """Whether a parameter's type is (or holds) a model with a field's default factory."""
    fields = getattr(annotation, "model_fields", None)
    if isinstance(annotation, type) and isinstance(fields, dict):
        return any(getattr(f, "default_factory", None) is not None for f in fields.values())
    return any(_has_default_factory(arg) for arg in typing.get_args(annotation))


def _deterministic(field: Any) -> bool:
    """Whether FastAPI gives a path or query parameter the same value for the same text:
    not when a default factory (of the parameter, or of a field of its model) is involved."""
    info = field.field_info
    if getattr(info, "default_factory", None) is not None:
        return False
    return not _has_default_factory(getattr(info, "annotation", None))


def shortcut_allowed(api_route: Any) -> bool:
    """Whether FastAPI would do nothing on a hit of `api_route` that `HitShortcut` skips.

    No dependencies at all (route, router and security ones included: an auth check must
    be able to refuse a hit) and only path and query parameters, whose validated values are
    a function of the request's text (no default factories).
    """
    dependant = getattr(api_route, "dependant", None)
    if dependant is None or not callable(getattr(api_route, "app", None)):
        return False
    return (
        not dependant.dependencies
        and not dependant.header_params
        and not dependant.cookie_params
        and not dependant.body_params
        and all(map(_deterministic, [*dependant.path_params, *dependant.query_params]))
    )


class HitShortcut:
    """A route's ASGI app that answers fresh hits before FastAPI solves anything.

    Installed in place of an `APIRoute`'s `app` (which it wraps) by the route's first
    request, when `shortcut_allowed`. The first request that goes the full way with a given
    *raw identity* (root path, path, query string and `vary` header lines, as received)
    records the key it got; a later request with the same raw identity, no credentials
    (unless `shared=True`) and a fresh entry is answered from it at once: same status, body
    and headers as the full way. Anything else (unknown raw identity, a miss, a stale entry,
    a cached exception, a disabled cache) goes to the wrapped app unchanged.
    """

    __slots__ = ("app", "keys", "route", "vary")

    def __init__(self, route: CachedRoute, app: ASGIApp) -> None:
        self.route = route
        self.app = app
        self.vary = frozenset(name.encode("latin-1") for name in route.vary)
        # raw identity -> (key, path template); at most 4096, then forgotten all at once.
        self.keys: dict[tuple[Any, ...], tuple[str, str]] = {}

    def identity(self, scope: Scope) -> tuple[tuple[Any, ...], bytes | None] | None:
        """A request's raw identity and its `If-None-Match`; None if it has credentials
        that the route must not share."""
        lines: list[tuple[bytes, bytes]] = []
        if_none_match: bytes | None = None
        for name, value in scope["headers"]:
            if name in self.vary:
                lines.append((name, value))
            if name in _CREDENTIALS and not self.route.shared:
                return None
            if name == b"if-none-match" and if_none_match is None:
                if_none_match = value
        raw = (scope.get("root_path", ""), scope["path"], scope.get("query_string", b""), *lines)
        return raw, if_none_match

    def remember(self, scope: Scope, key: str, path: str) -> None:
        """Record the key (and path template, for metrics) of a request gone the full way."""
        found = self.identity(scope)
        if found is not None:
            if len(self.keys) >= 4096:
                self.keys.clear()
            self.keys[found[0]] = (key, path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] in ("GET", "HEAD"):
            found = self.identity(scope)
            if found is not None:
                known = self.keys.get(found[0])
                if known is not None and await self.answer(scope, send, *known, found[1]):
                    return
        await self.app(scope, receive, send)

    async def answer(
        self, scope: Scope, send: Send, key: str, path: str, etags: bytes | None
    ) -> bool:
        """Send the response of a fresh entry of `key`, if there is one (True)."""
        route = self.route
        cache = route.cache or get_cache()
        if not cache.enabled:
            return False
        shared_store = cache.store.shared
        full = cache.prefix + key
        entry = await cache.aread(full) if shared_store else cache.read(full)
        if (
            entry is None
            or type(entry.value) is not dict
            or entry.fresh_until <= time.time()
            or "detail" in entry.value  # a cached exception: the full way raises it
        ):
            return False
        metrics = route.registry.route(path)
        metrics.hits += 1
        code, body, headers = route.responder.parts(
            entry.value,
            HIT,
            cached=True,
            private=False,
            stale=False,
            if_none_match_header=None if etags is None else etags.decode("latin-1"),
            head=scope["method"] == "HEAD",
            remember=not shared_store,
        )
        if code == 304:
            metrics.not_modified += 1
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return True


def _credentials(raw_headers: Any) -> list[str]:
    """The credential headers (`authorization`, `cookie`) a request carries: one pass."""
    found: list[str] = []
    for name, _ in raw_headers:
        credential = _CREDENTIALS.get(name)
        if credential is not None and credential not in found:
            found.append(credential)
    return found


class Job:
    """One request's part in a computation: its arguments, and whether it ran the handler."""

    __slots__ = ("key", "kwargs", "metrics", "path", "ran", "request", "response", "sub")

    def __init__(
        self,
        key: str,
        kwargs: dict[str, Any],
        request: Request,
        sub: Response,
        metrics: RouteMetrics,
        path: str,
    ) -> None:
        self.key = key
        self.kwargs = kwargs
        self.request = request
        self.sub = sub  # FastAPI's sub-response: status/headers set by the handler or deps
        self.metrics = metrics
        self.path = path
        self.ran = False  # set when this request's computation started (it is the leader)
        self.response: Response | None = None  # its rendered response, once there is one


def _raw(fn: Callable[..., Any], template: str) -> Callable[..., str]:
    """Render `template` over a handler's arguments as it is, unescaped.

    The core checks the template against the handler's parameters first (an unknown name
    raises `KeyTemplateError` when decorating).
    """
    coalesce.coalesced(key=template)(fn)
    return template.format


def _refuse(message: str) -> NoReturn:
    raise ConfigurationError(message)


def _flag(name: str, value: Any) -> bool:
    """`value` if it is a bool: a string such as `"false"` would read as true."""
    if not isinstance(value, bool):
        _refuse(f"{name} must be True or False, not {value!r}")
    return value


def _texts(name: str, value: Any, what: str) -> tuple[str, ...]:
    """`value` as a tuple of strings: a list or tuple of them, never one string (which would
    be read character by character)."""
    if (
        isinstance(value, (str, bytes, bytearray))
        or not isinstance(value, Sequence)
        or not all(isinstance(item, str) for item in value)
    ):
        _refuse(f"{name} must be a list of {what}, not {value!r}")
    return tuple(value)


def _header_names(value: Any) -> tuple[str, ...]:
    """The `vary` header names, lower-case; each must be an RFC 9110 token, as it is sent
    in the `Vary` header of every response."""
    names = tuple(n.strip().lower() for n in _texts("vary", value, "header names"))
    for name in names:
        if not is_token(name):
            _refuse(
                f"vary: {name!r} is not an HTTP header name (an RFC 9110 token: ASCII "
                "letters, digits and !#$%&'*+-.^_`|~)"
            )
    return names


class CachedRoute:
    """Everything decided about one decorated handler when it is decorated."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        store: bool,
        ttl: float | None,
        key: str | None,
        vary: Sequence[str],
        shared: bool,
        tags: Sequence[str],
        stale_ttl: float,
        cache: Cache | None,
        cache_4xx: bool,
        honor_client_no_cache: bool,
        registry: MetricsRegistry | None,
    ) -> None:
        if not callable(fn):
            _refuse(f"@{'cached' if store else 'coalesced'} decorates a handler, not {fn!r}")
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise ConfigurationError(
                f"{fn.__qualname__} streams its response (a generator): it cannot be cached"
            )
        # checked now (the core's rule): every response's Cache-Control is computed from them
        ttl = check_seconds("ttl", ttl, allow_none=True)
        stale_ttl = check_seconds("stale_ttl", stale_ttl, allow_zero=True) or 0.0
        if key is not None and not isinstance(key, str):
            _refuse(f"key must be a template string such as 'item:{{item_id}}', not {key!r}")
        vary = _header_names(vary)
        tags = _texts("tags", tags, "tag templates such as ['item:{item_id}']")
        shared = _flag("shared", shared)
        cache_4xx = _flag("cache_4xx", cache_4xx)
        honor_client_no_cache = _flag("honor_client_no_cache", honor_client_no_cache)
        if cache is not None and not isinstance(cache, Cache):
            raise ConfigurationError(f"cache must be a coalesce.Cache, not {cache!r}")
        if registry is not None and not isinstance(registry, MetricsRegistry):
            _refuse(f"registry must be a coalesce.fastapi.MetricsRegistry, not {registry!r}")
        self.fn = fn
        self.name = f"{fn.__module__}.{fn.__qualname__}"
        self.is_async = inspect.iscoroutinefunction(fn)
        self.signature = resolved_signature(fn)
        self.identity = analyse(self.signature)
        self.store = store
        self.ttl = ttl
        self.cache = cache
        self.cache_4xx = cache_4xx
        self.honor_no_cache = honor_client_no_cache
        self.shared = shared
        self.registry = REGISTRY if registry is None else registry
        self.vary = vary
        # Key and tag templates render the raw text: the core escapes it once, as it stores
        # it (`normal`, and the tags of `inner`), so `coalesce get 'feed:a b'` finds it.
        self.template: Callable[..., str] | None = None if key is None else _raw(fn, key)
        # Whether the key tells users apart by itself (a template reading a dependency
        # result such as `{user.id}`, a cookie or a credential header parameter); else a
        # request with credentials needs each of them in `vary` (or `shared=True`).
        self.key_has_user = key is not None and template_carries_identity(self.signature, key)
        self.tag_makers: list[Callable[..., str]] = [_raw(fn, tag) for tag in tags]
        uncovered = () if shared else [h for h in CREDENTIAL_HEADERS if h not in self.vary]
        vary_header = ", ".join(n.title() for n in (*self.vary, *uncovered))
        self.responder = Responder(vary_header=vary_header.encode("latin-1"), stale_ttl=stale_ttl)
        self.paths: set[str] = set()  # the path templates this handler has served
        # `HitShortcut`: the decorated endpoint FastAPI calls (set by `coalesce.fastapi`),
        # the ids of the routes already looked at, and whether this route could use one (a
        # key template may read anything the handler takes: only path and query values).
        self.endpoint: Any = None
        self.routes_seen: set[int] = set()
        identity = {p.name for p in self.identity}
        self.shortcut_ok = (
            store
            and not honor_client_no_cache
            and (key is None or all(n in identity for n in self.signature.parameters))
        )
        self._normal: dict[str, str] = {}  # key -> the core's form of it (see `normal`)
        self.warned: set[str] = set()  # the degradations already logged for this route

        async def compute(key: str, tags: tuple[str, ...], job: Job) -> dict[str, Any]:
            return await self.run(job)

        compute.__qualname__ = compute.__name__ = f"{fn.__qualname__}[http]"
        compute.__module__ = fn.__module__
        tag_fields = [f"{{tags[{i}]}}" for i in range(2 + len(self.tag_makers))]
        self.inner: Any
        if store:
            self.inner = (cache.cached if cache else coalesce.cached)(
                ttl=ttl, key="{key}", tags=tag_fields, stale_ttl=stale_ttl, copy=False
            )(compute)
        else:
            self.inner = (cache.coalesced if cache else coalesce.coalesced)(key="{key}")(compute)

    # -- keys ------------------------------------------------------------------------------

    def ident(self, values: dict[str, Any]) -> str:
        """What identifies a request within the route: the template's key or the params."""
        if self.template is not None:
            return self.template(**values)
        return encode_params(self.identity, values)

    def base_key(self, path: str | None, ident: str) -> str:
        """The key without its `vary` part."""
        if self.template is not None:
            return ident
        if path is None:
            raise ConfigurationError(
                f"{self.name}: which path? pass path='/...' (this process served none yet)"
            )
        # `<item_id>` for `{item_id}`: braces would be escaped (they cut Redis Cluster hash
        # tags short), and the key should stay readable in `coalesce keys`
        return f"{path.replace('{', '<').replace('}', '>')}?{ident}"

    def given_values(self, given: dict[str, Any], where: str) -> dict[str, Any]:
        """Arguments for `.key()` / `.invalidate()`: FastAPI's defaults filled in."""
        if self.template is None:
            return bind_identity(self.identity, given, where)
        values: dict[str, Any] = dict.fromkeys(self.signature.parameters)  # unused: None
        values.update((p.name, p.default) for p in self.identity if p.default is not REQUIRED)
        values.update(given)
        return values

    def normal(self, key: str) -> str:
        """`key` as the core stores it (escaped where unsafe, bounded in length).

        Remembered for the hottest keys (at most 4096, then forgotten all at once): the core
        builds it the same way every time.
        """
        known = self._normal.get(key)
        if known is None:
            known = cast(str, self.inner.key(key, (), None))
            if len(self._normal) >= 4096:
                self._normal.clear()
            self._normal[key] = known
        return known

    def route_tag(self) -> str:
        return f"route:{self.name}"

    def request_tag(self, ident: str) -> str:
        """The tag of every entry (each `vary` variant, each path) of one request."""
        return f"route:{self.name}?{ident}"

    # -- serving ---------------------------------------------------------------------------

    async def call(self, kwargs: dict[str, Any]) -> Any:
        if self.is_async:
            return await self.fn(**kwargs)
        return await run_in_threadpool(self.fn, **kwargs)

    async def bypass(self, kwargs: dict[str, Any], sub: Response, metrics: RouteMetrics) -> Any:
        """Run the handler as if undecorated, saying so in `X-Cache`."""
        metrics.bypassed += 1
        sub.headers["x-cache"] = BYPASS
        return await self.call(kwargs)

    def warn_once(self, kind: str, message: str, *args: Any) -> None:
        """Log a degradation of this route the first time it happens, not per request."""
        if kind not in self.warned:
            self.warned.add(kind)
            logger.warning(message, *args)

    async def serve(self, request: Request, sub: Response, kwargs: dict[str, Any]) -> Any:
        scope = request.scope
        cache = self.cache or get_cache()
        if scope["method"] not in ("GET", "HEAD") or not cache.enabled:
            return await self.call(kwargs)
        route = served_route(scope)
        path = scope.get("root_path", "") + (getattr(route, "path_format", None) or scope["path"])
        metrics = self.registry.route(path)
        credentials = _credentials(scope["headers"])
        private = False
        if credentials and not self.shared:
            if not self.key_has_user and not all(h in self.vary for h in credentials):
                return await self.bypass(kwargs, sub, metrics)
            private = True  # the key holds the user's identity: for this user only
        if path not in self.paths:
            self.paths.add(path)
        if id(route) not in self.routes_seen:
            if len(self.routes_seen) >= 1024:
                self.routes_seen.clear()
            self.routes_seen.add(id(route))
            self.install_shortcut(route)
        try:
            ident = self.ident(kwargs)
            base = self.base_key(path, ident)
            raw_key = base + encode_vary(self.vary, request.headers) if self.vary else base
            key = self.normal(raw_key)
        except _UNRENDERABLE as exc:
            # No stable key for this request (an argument without a text form, a template
            # field missing): run it as if undecorated rather than fail or share wrongly.
            self.warn_once("key", "coalesce: no cache key for %s (%s); not caching it", path, exc)
            return await self.bypass(kwargs, sub, metrics)
        headers = request.headers
        shared_store = cache.store.shared
        if self.store:
            if self.honor_no_cache and client_wants_fresh(
                headers.get("cache-control"), headers.get("pragma")
            ):
                try:
                    await cache.ainvalidate(key)
                except BackendError as exc:
                    # The entry may still be there: computing through the cache could serve
                    # it. Fail as the cache's other reads do (raise when failing closed),
                    # else answer with a fresh, uncached computation.
                    cache.backend_failed(None, exc)
                    self.warn_once(
                        "no-cache",
                        "coalesce: cannot drop %s for a no-cache request (%s); running it uncached",
                        path,
                        exc,
                    )
                    return await self.bypass(kwargs, sub, metrics)
            else:  # the hot path: one read, no flight, no handler
                shortcut = getattr(route, "app", None)
                if type(shortcut) is HitShortcut and shortcut.route is self and not private:
                    shortcut.remember(scope, key, path)
                full = cache.prefix + key
                entry = await cache.aread(full) if shared_store else cache.read(full)
                if (
                    entry is not None
                    and type(entry.value) is dict
                    and entry.fresh_until > time.time()
                ):
                    metrics.hits += 1
                    return self.respond(entry.value, HIT, request, metrics, private, shared_store)
        try:
            tags = (
                self.route_tag(),
                self.request_tag(ident),
                *[m(**kwargs) for m in self.tag_makers],
            )
        except _UNRENDERABLE as exc:  # as for the key: run it uncached, never fail it
            self.warn_once("tags", "coalesce: no cache tags for %s (%s); not caching it", path, exc)
            return await self.bypass(kwargs, sub, metrics)
        started = time.time()
        job = Job(key, kwargs, request, sub, metrics, path)
        try:
            # The raw key: the core escapes it once, into `key` (`normal`); passing `key`
            # would escape its `%` again and store where reads and invalidations never look.
            value = await self.inner(raw_key, tags, job)
        except NotShared as exc:
            if job.response is not None:  # this request ran the handler: its own response
                metrics.misses += 1
                job.response.headers["x-cache"] = MISS
                return job.response
            if exc.rendered is None:
                return await self.bypass(kwargs, sub, metrics)
            metrics.coalesced += 1
            return self.respond(exc.rendered, COALESCED, request, metrics, private, True, False)
        except LeaderFailedError:  # another process failed computing it: try here
            return await self.bypass(kwargs, sub, metrics)
        status = cache_status(
            computed_here=job.ran,
            created=value["created"],
            ttl=math.inf if value["ttl"] is None else value["ttl"],
            started=started,
            now=time.time(),
        )
        counter = _COUNTER[status]
        setattr(metrics, counter, getattr(metrics, counter) + 1)
        response = self.respond(value, status, request, metrics, private, shared_store)
        if job.response is not None:
            response.background = job.response.background
        return response

    def respond(
        self,
        value: dict[str, Any],
        status: str,
        request: Request,
        metrics: RouteMetrics,
        private: bool,
        fresh_dict: bool,
        cached: bool | None = None,
    ) -> Response:
        response = self.responder.respond(
            value,
            status,
            cached=self.store if cached is None else cached,
            private=private,
            stale=status == STALE,
            if_none_match_header=request.headers.get("if-none-match"),
            head=request.scope["method"] == "HEAD",
            remember=not fresh_dict,
        )
        if response.status_code == 304:
            metrics.not_modified += 1
        return response

    def install_shortcut(self, api_route: Any) -> None:
        """Put a `HitShortcut` in front of `api_route`'s app, if it may have one."""
        if (
            self.shortcut_ok
            and self.endpoint is not None
            and getattr(api_route, "endpoint", None) is self.endpoint
            and type(api_route.app) is not HitShortcut
            and shortcut_allowed(api_route)
        ):
            api_route.app = HitShortcut(self, api_route.app)

    # -- computing -------------------------------------------------------------------------

    async def run(self, job: Job) -> dict[str, Any]:
        """Run the handler for a flight's leader and make its entry (or raise)."""
        job.ran = True
        started = time.perf_counter()
        code = 500  # what an exception becomes, unless it says otherwise
        try:
            try:
                raw = await self.call(job.kwargs)
            except HTTPException as exc:
                code = exc.status_code
                if not (self.store and self.cache_4xx and 400 <= code < 500):
                    raise
                return exception_entry(exc, ttl=self.ttl_now())
            job.response = await render(raw, served_route(job.request.scope), job.sub)
            return entry_of(
                job.response, ttl=self.ttl_now(), store=self.store, cache_4xx=self.cache_4xx
            )
        finally:
            if job.response is not None:
                code = job.response.status_code
            seconds = time.perf_counter() - started
            job.metrics.record_computation(seconds, failed=code >= 500)
            logger.log(
                logging.WARNING if code >= 500 else logging.INFO,
                "coalesce computed %s in %.1f ms (HTTP %s)",
                job.key,
                seconds * 1000,
                code,
                extra={
                    "route": job.path,
                    "key": job.key,
                    "cache_status": MISS,
                    "duration_ms": round(seconds * 1000, 3),
                    "status_code": code,
                    "handler": self.name,
                },
            )

    def ttl_now(self) -> float | None:
        if not self.store:
            return None
        return self.ttl if self.ttl is not None else (self.cache or get_cache()).default_ttl

    # -- invalidation ----------------------------------------------------------------------

    async def invalidate(self, path: str | None, given: dict[str, Any]) -> bool:
        """Delete every entry of one request (all `vary` variants, every path served)."""
        cache = self.cache or get_cache()
        ident = self.ident(self.given_values(given, f"{self.name}.invalidate"))
        removed = await cache.ainvalidate_tag(self.normal(self.request_tag(ident))) > 0
        if not self.vary:  # exact keys can be named: also fence computations in flight
            if self.template is not None:
                bases = [ident]
            else:
                bases = [self.base_key(p, ident) for p in ([path] if path else self.paths)]
            for base in bases:
                removed = await cache.ainvalidate(self.normal(base)) or removed
        return removed
