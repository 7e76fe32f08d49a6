"""The Starlette edge: cache and coalesce endpoints as rendered HTTP responses.

    from coalesce.starlette import cached, coalesced

    @cached(ttl=60, vary=["accept-language"])
    async def item(request: Request) -> Response: ...

    app = Starlette(routes=[Route("/items/{item_id}", item)])

The same options and guarantees as `coalesce.fastapi.cached` where they apply (ttl, key,
vary, shared, tags, stale_ttl, cache_4xx, honor_client_no_cache, cache, registry); what a
request's key is, the credentials rule, the headers and metrics are `coalesce.http.view`'s,
shared with Flask and Django. This module only translates: a Starlette `Request` to an
`HttpRequest`, a `Response` to `Rendered` parts and back. A sync endpoint runs in
Starlette's thread pool, as without the decorator. Streaming responses are never cached.
With `cache_4xx=True` a raised `HTTPException` (4xx) is kept too and raised again on hits,
for the app's exception handlers to render. `coalesced` shares one run of an endpoint
among overlapping identical requests and keeps nothing. Metrics name a request by the path
templates of the mounts and the route it went through (`/api/items/{item_id:int}`), found in
the app's routes on every supported Starlette, never by the URL a client sent
(`coalesce.starlette.routes`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NoReturn, cast

from coalesce.http.view import missing_extra

try:
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response
except ImportError as exc:  # the extra is not installed: say which one
    raise missing_extra("starlette", "Starlette", exc) from None

from coalesce.http.metrics import REGISTRY, MetricsRegistry
from coalesce.http.render import RawHeaders
from coalesce.http.view import (
    HttpError,
    HttpRequest,
    Rendered,
    RequestHeaders,
    ViewCache,
    view_decorators,
)
from coalesce.starlette.routes import RouteNames

__all__ = ["REGISTRY", "MetricsRegistry", "RawResponse", "cached", "coalesced"]


class RawResponse(Response):
    """A response from parts already encoded: a hit builds nothing it can reuse."""

    def __init__(self, status_code: int, body: bytes, raw_headers: RawHeaders) -> None:
        self.status_code = status_code
        self.body = body
        self.raw_headers = raw_headers
        self.background = None


class StarletteIo:
    """`coalesce.http.view.Io` for Starlette responses."""

    strips_head = True  # Starlette sends a HEAD response's body: we leave it empty

    def render(self, response: Response) -> Rendered:
        body = getattr(response, "body", None)  # a StreamingResponse has none
        headers = [
            (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in response.raw_headers
        ]
        return Rendered(response.status_code, headers, body if isinstance(body, bytes) else None)

    def build(
        self, status: int, body: bytes, headers: RawHeaders, own: Response | None
    ) -> Response:
        response = RawResponse(status, body, headers)
        if own is not None:  # the endpoint's background tasks still run
            response.background = own.background
        return response

    def header(self, response: Response, name: str) -> list[str]:
        return response.headers.getlist(name)

    def set_header(self, response: Response, name: str, value: str) -> None:
        response.headers[name] = value

    def http_error(self, exc: Exception) -> HttpError | None:
        if not isinstance(exc, HTTPException):
            return None
        return HttpError(exc.status_code, exc.detail, list((exc.headers or {}).items()))

    def raise_error(self, error: HttpError) -> NoReturn:
        raise HTTPException(error.status, detail=error.detail, headers=dict(error.headers))


IO = StarletteIo()


def request_of(request: Request, routes: RouteNames) -> HttpRequest:
    """A Starlette request's parts: its route's path template (with the templates of the
    mounts it is under, as `routes` names it: never the concrete URL, on every Starlette) for
    metrics, its path, path parameters, query and headers."""
    scope = request.scope
    headers = RequestHeaders(
        (k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
    )
    return HttpRequest(
        method=scope["method"],
        scheme=scope.get("scheme", "http"),
        host=headers.get("host"),
        route=routes.name(scope),
        path=request.url.path,
        params=request.path_params,
        query=request.query_params.multi_items(),
        headers=headers,
    )


def _wrap(view: ViewCache, fn: Callable[..., Any]) -> Callable[..., Any]:
    is_async = inspect.iscoroutinefunction(fn)
    routes = RouteNames(f"{fn.__module__}.{fn.__qualname__}")

    @functools.wraps(fn)
    async def endpoint(request: Request) -> Response:
        async def run() -> Response:
            if is_async:
                return cast(Response, await fn(request))
            return cast(Response, await run_in_threadpool(fn, request))

        return await view.aserve(request_of(request, routes), run, IO)

    routes.bind(endpoint)
    view.attach(endpoint, awaited=True)
    return endpoint


cached, coalesced = view_decorators("starlette", _wrap)
cached.__doc__ = """Cache a Starlette endpoint's rendered responses for `ttl` seconds (see the
module docstring and `coalesce.http.view`).

`@cached`, `@cached(60)`, `@cached(ttl=60, key=..., vary=[...], shared=..., tags=[...],
stale_ttl=..., cache=..., cache_4xx=..., honor_client_no_cache=..., registry=...)`. The
decorated endpoint has `await endpoint.invalidate(**path_params)` (every entry of that
path: each query string, host and `vary` variant; with a `key` template, the values of
its fields), `await endpoint.invalidate_all()`, `endpoint.key(...)` and `endpoint.stats()`
(`ViewCache.attach`).
"""
