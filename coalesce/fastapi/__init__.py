"""The FastAPI edge: cache and coalesce route handlers as rendered HTTP responses.

    from coalesce.fastapi import cached, coalesced, metrics_router, admin_router

    @app.get("/items/{item_id}")
    @cached(ttl=60, vary=["accept-language"])
    async def get_item(item_id: int, db: Session = Depends(get_db)) -> Item: ...

    app.include_router(metrics_router())                      # GET /coalesce/metrics
    app.include_router(admin_router(cache, token=SECRET))     # POST /coalesce/invalidate

Place the decorator *under* `@app.get(...)`. Sync (`def`) and async handlers both work; a
sync handler still runs in FastAPI's thread pool. FastAPI sees the handler's own signature
(plus a `Request` and a `Response` it injects for us, which never show in OpenAPI), so
dependency injection, validation and the OpenAPI schema are exactly as without the decorator.
Dependencies run on every request, hits included: an auth dependency still rejects. A route
with no dependencies at all (route, router and security ones included) whose parameters are
path and query parameters only has its fresh hits answered before FastAPI's request
handling (validation, dependency solving) by the route's `HitShortcut`, with the same
status, body and headers (see `coalesce.fastapi.route`).

What is cached is the *rendered* response: status, body bytes and headers (minus
`Set-Cookie`, `Date`, `Content-Length` and the caching headers computed per response), as a
msgpack-friendly dict, so a hit skips the handler, response validation and serialization,
in memory or on Redis.

Keys (see `coalesce.fastapi.keys`): two requests share an entry only when the handler
cannot tell them apart. A default key is the request's `scheme://host`, the route's path
template, the handler's path, query, header, cookie and body parameters (sorted), the
inputs that its dependencies at any depth declare (route, router and app dependencies
included: the inputs of the route's OpenAPI operation), and the `vary` headers:
`https://shop.example/items/<item_id>?item_id=3|query.skip=50|header.x-tenant=acme`.
`Request`, `Response`, `BackgroundTasks`, `SecurityScopes` and `Depends(...)` values are
not inputs (what a dependency reads from them is invisible: name such headers in `vary`).
`key="item:{item_id}"` replaces the default with a template over the handler's parameters
(dependency results included: `"feed:{user.id}"`), stored as `item:3@<module>.<handler>`
so that two routes with one template never answer each other. Secrets (cookies,
credential headers, parameters named like token, key, secret, password, signature,
session) enter keys and logs only as a hash.

Safe by default: a request carrying a credential (`Authorization`, `Cookie`, or the
header, query parameter or cookie that a `fastapi.security` scheme anywhere in the route's
dependency tree reads) is neither served from nor stored into an entry unless each such
header is in `vary`, the key is a template that reads the user's identity (the result of a
dependency that reads a credential, such as `"feed:{user.id}"`; a cookie or credential
header parameter; `"item:{item_id}"` does not), or the route says `shared=True`. Such
requests run the handler as if undecorated (`X-Cache: BYPASS`, `Cache-Control: private`
unless the handler sets its own). Every request header in the key is named in `Vary`, and
so are the credential headers unless `shared=True`; an entry that depends on a credential
or on the user's identity is sent `private`. Responses that set a cookie or say
`Cache-Control: private`/`no-store` are never stored nor handed to another request.

HTTP semantics (pure logic in `coalesce.http`):

* `X-Cache: HIT | MISS | STALE | COALESCED | BYPASS`;
* `ETag: "<32 hex of the body's SHA-256>"`, the same in every process; `If-None-Match`
  (lists, `*`, `W/` weak comparison) is answered `304` with ETag, Cache-Control, Age, Vary;
* `Cache-Control: public|private, max-age=<ttl>` (plus `stale-while-revalidate` with
  `stale_ttl`) and `Age: <the entry's age>`, or the handler's own Cache-Control as it wrote
  it (per user: `public`, `s-maxage` and `proxy-revalidate` removed, `private` first);
  `Vary` naming every request header in the key and, unless `shared=True`, the credential
  headers;
* only GET and HEAD are cached (other methods run as if undecorated); 5xx is never stored;
  4xx only with `cache_4xx=True` (also for `raise HTTPException(404)`, re-raised on hits so
  your exception handlers render it); concurrent requests still share a 5xx/4xx result;
* a client's `Cache-Control: no-cache` is ignored unless `honor_client_no_cache=True`
  (otherwise anyone could stampede the database with one header); when the store cannot
  drop the entry, such a request runs uncached (`BYPASS`, logged once per route), or
  raises `BackendError` with `on_backend_error="raise"`;
* `max-age`, `Age` and `stale-while-revalidate` never exceed 2^31 (RFC 9111 1.2.2).

Arguments are checked when decorating (`ConfigurationError` naming the argument): finite
`ttl` / `stale_ttl`, lists (not strings) of `vary` names and `tags`, `vary` names that are
HTTP header names (RFC 9110 tokens), real booleans, a `Cache` and a `MetricsRegistry`. A
request whose key or tags cannot be rendered (`"{user.nope}"`) runs uncached (`BYPASS`,
one warning per route).

Visibility: per-route counters (hits, misses, stale, coalesced, bypassed, 304s,
computations, errors) and compute latency p50/p99 over the last 1024 computations, in a
`MetricsRegistry` (`REGISTRY` by default), served by `metrics_router()`:

* `GET /coalesce/metrics` -> JSON `{"routes": {"/items/{item_id}": {"hits": 3, ...,
  "p50_ms": 1.2, "p99_ms": 9.8}}}`;
* `GET /coalesce/metrics?format=prometheus` or `GET /coalesce/metrics/prometheus` ->
  Prometheus text format 0.0.4 (`coalesce_http_requests_total{route,cache}`,
  `coalesce_http_computations_total`, `coalesce_http_errors_total`,
  `coalesce_http_compute_seconds{quantile="0.5"|"0.99"}`).

Every computation logs one line on the logger `coalesce.fastapi` (INFO, WARNING for 5xx)
with `extra=` fields `route`, `key`, `cache_status`, `duration_ms`, `status_code`, `handler`.

Invalidation: `await get_item.invalidate(item_id=3)` deletes every entry of that request
(every `vary` variant; it works in a process that never served the route, through the
entry's tag `route:<module.qualname>?<params>`), `await get_item.invalidate_all()` the whole
route, `get_item.key(item_id=3)` names the key. `tags=["item:{item_id}"]` adds tags for
`Cache.invalidate_tag`.

Admin router (off unless mounted; `admin_router(cache, token=...)` raises
`ConfigurationError` without a token), used by `coalesce invalidate KEY --app URL --token T`:

* `POST {prefix}/invalidate` (prefix `/coalesce`), `Authorization: Bearer <token>`
  (compared in constant time; otherwise 401 with `WWW-Authenticate: Bearer`), JSON body
  with exactly one of
  - `{"keys": ["k1", "k2"]}` -> 200 `{"removed": {"k1": true, "k2": false}, "count": 1}`
    (keys without the namespace, as `Cache.invalidate` takes them);
  - `{"tag": "t"}` -> 200 `{"tag": "t", "removed": 3}` (entries that carried the tag);
* the token is checked before the body is read; 413 above 64 KiB, 400 `{"detail": ...}`
  for any other body (not UTF-8 JSON, deeper than 32, more than 1,000 keys, another
  shape), 503 when the store fails.

Notes: `max-age` minus `Age` is exactly what is left of the entry (a downstream cache adds
`Age` to its own clock, RFC 9111 4.2.3), and a STALE response is stale downstream too.
A stale entry (`stale_ttl`) is refreshed in the background with the arguments of the
request that found it stale, after that request may have finished: use `stale_ttl` only on
handlers whose dependencies outlive the request (not a session closed by a `yield`).
Streaming responses (`StreamingResponse`, `FileResponse`) are never cached.

Several workers: with the in-memory store every worker process has its own entries, metrics
and admin router, so `POST /invalidate` reaches only the worker that answers it and
`/metrics` shows one worker. Use Redis (`Cache("redis://...")`) for one cache per fleet;
metrics stay per process (scrape each, or sum them).

Modules of this package: `route` (one decorated route: the request path), `shortcut` (hits
of simple routes before FastAPI solves anything; the one private FastAPI helper), `render`
(entries and responses), `keys` (identity inputs and key text), `metrics`, `admin`; and
`coalesce.http`, shared with the other edges: pure header logic, the options (one signature
and one check for every edge) and `endpoint`, the calls into the core's public cache-aside
path (`Cache.aget_fresh` for hits, `Cache.aget_or_set` for the rest).
"""

from __future__ import annotations

import functools
import gc
import inspect
import sys
from collections.abc import Callable
from typing import Any, TypeVar, cast

from coalesce import MissingDependencyError

try:
    from fastapi import Request
    from fastapi.responses import Response
except ImportError as exc:  # the extra is not installed: say which one
    raise MissingDependencyError(
        f"coalesce.fastapi needs FastAPI ({exc}), which the 'fastapi' extra installs: "
        "pip install 'coalesce-cache[fastapi]'"
    ) from None

from coalesce import ConfigurationError
from coalesce.fastapi.admin import admin_router
from coalesce.fastapi.keys import base_type, is_class
from coalesce.fastapi.metrics import REGISTRY, MetricsRegistry, RouteMetrics, metrics_router
from coalesce.fastapi.route import CachedRoute
from coalesce.http.options import RouteOptions, coalescing_decorator, route_decorator

__all__ = [
    "REGISTRY",
    "MetricsRegistry",
    "RouteMetrics",
    "admin_router",
    "cached",
    "coalesced",
    "metrics_router",
]

F = TypeVar("F", bound=Callable[..., Any])

# References to a handler being decorated: the decorator's frame and its caller's (more
# when it is already the endpoint of a route: the route, its dependant, FastAPI's records).
_UNREGISTERED_REFERENCES = 4 if sys.version_info >= (3, 11) else 7
_REQUEST = "coalesce_request_"  # the parameters we add to the signature FastAPI sees
_RESPONSE = "coalesce_response_"


def _slot(sig: inspect.Signature, cls: type, injected: str) -> tuple[str, bool]:
    """The parameter FastAPI fills with its `cls` object: the handler's own, else ours.

    FastAPI fills one parameter per kind (the last one declared), so a handler that already
    takes a `Request` or `Response` shares it with us instead of losing it.
    """
    for param in sig.parameters.values():
        base = base_type(param.annotation)
        if is_class(base) and issubclass(base, cls):
            return param.name, False
    return injected, True


def _decorate(route: CachedRoute) -> Callable[..., Any]:
    fn = route.fn
    sig = route.signature
    request_name, own_request = _slot(sig, Request, _REQUEST)
    response_name, own_response = _slot(sig, Response, _RESPONSE)

    @functools.wraps(fn)
    async def endpoint(**kwargs: Any) -> Any:
        request = kwargs.pop(request_name) if own_request else kwargs[request_name]
        sub = kwargs.pop(response_name) if own_response else kwargs[response_name]
        return await route.serve(request, sub, kwargs)

    params = list(sig.parameters.values())
    added = []
    if own_request:
        added.append(
            inspect.Parameter(_REQUEST, inspect.Parameter.KEYWORD_ONLY, annotation=Request)
        )
    if own_response:
        added.append(
            inspect.Parameter(_RESPONSE, inspect.Parameter.KEYWORD_ONLY, annotation=Response)
        )
    tail = [p for p in params if p.kind is p.VAR_KEYWORD]
    head = [p for p in params if p.kind is not p.VAR_KEYWORD]
    wrapper = cast(Any, endpoint)
    route.endpoint = wrapper
    wrapper.__signature__ = sig.replace(parameters=[*head, *added, *tail])

    async def invalidate(
        *, path: str | None = None, origin: str | None = None, **params: Any
    ) -> bool:
        """Delete the entries (every `vary` variant, host and dependency input) of a request
        with these parameters."""
        return await route.invalidate(path, origin, params)

    async def invalidate_all() -> int:
        """Delete every entry of this route; return how many there were."""
        return await route.ainvalidate_all()

    def key(*, path: str | None = None, origin: str | None = None, **params: Any) -> str:
        """The key (without namespace, `vary` part and dependency inputs) of a request with
        these parameters.

        `path` and `origin` (`"https://shop.example"`) default to the one path template and
        the one origin this handler served, if only one.
        """
        ident = route.ident(route.given_values(params, f"{route.name}.key"))
        return route.normal(route.base_key(origin, path, ident))

    def stats() -> dict[str, Any]:
        """This handler's metrics, per path template it served."""
        return {p: route.registry.route(p).snapshot() for p in sorted(route.paths)}

    wrapper.invalidate = invalidate
    wrapper.invalidate_all = invalidate_all
    wrapper.key = key
    wrapper.stats = stats
    return cast(Callable[..., Any], wrapper)


def _refuse_if_routed(fn: Callable[..., Any], decorator: str) -> None:
    """Refuse `@cached` placed above `@app.get(...)`: FastAPI registered the handler itself
    and would never call the cached one.

    A function still being decorated is referred to by a couple of frames; FastAPI's route
    adds several references. Only then are its referrers looked through (a full scan of
    the heap: not for every decoration).
    """
    if sys.getrefcount(fn) <= _UNREGISTERED_REFERENCES:
        return
    for referrer in gc.get_referrers(fn):
        routed = isinstance(referrer, dict) and referrer.get("endpoint") is fn
        if routed and "dependant" in referrer:
            raise ConfigurationError(
                f"@{decorator} is above @app.get(...) on {fn.__qualname__}: FastAPI registered "
                "the undecorated handler, so nothing would be cached. Put it under the route "
                "decorator:\n    @app.get(...)\n    @" + decorator + "(...)\n    def handler(...)"
            )


def _make(fn: Callable[..., Any], options: RouteOptions, store: bool) -> Any:
    _refuse_if_routed(fn, "cached" if store else "coalesced")
    return _decorate(CachedRoute(fn, options, store=store))


cached = route_decorator(_make, __name__)
cached.__doc__ = """Cache a route handler's rendered responses for `ttl` seconds (see the module
docstring).

`@cached`, `@cached(60)`, `@cached(ttl=60, key=..., vary=[...], shared=..., tags=[...],
stale_ttl=..., stale_if_error=..., timeout=..., early_refresh=..., jitter=..., cache=...,
cache_4xx=..., honor_client_no_cache=..., registry=...)`: the one signature of every edge
(`coalesce.http.options.route_decorator`), checked when `cached(...)` is called.
`cache` defaults to `coalesce.get_cache()` at each request; `ttl` to its `default_ttl`.
`tags` are templates over the handler's parameters (`"item:{item_id}"`), for
`Cache.invalidate_tag`. `registry` collects the metrics (default `REGISTRY`).
`stale_if_error`, `timeout`, `early_refresh` and `jitter` mean what they mean for
`Cache.get_or_set`, through which every response is computed (`stale_if_error` is also sent
as `Cache-Control: stale-if-error`).
"""


coalesced = coalescing_decorator(_make, __name__)
