"""The hit shortcut: fresh hits of simple routes answered before FastAPI solves anything.

A route with no dependencies at all (route, router and security ones included: an auth
check must be able to refuse a hit) whose parameters are path and query parameters only,
without default factories, gets a `HitShortcut` in place of its ASGI app at its first
request. It maps a request's *raw identity* (scheme, host, root path, path, query string,
`vary` header lines) to the key the full way computed for it, and answers a later request
with the same raw identity from a fresh entry: the same status, body and headers.

The one private FastAPI helper coalesce uses lives here: which context FastAPI made of a
route for an `include_router` (its prefix). Without it (a future FastAPI), included routes
take the full way, which is correct and slower.
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Any

import fastapi.routing
from starlette.types import ASGIApp, Receive, Scope, Send

from coalesce import get_cache
from coalesce.http import HIT
from coalesce.http.keys import credential_header

if TYPE_CHECKING:
    from coalesce.fastapi.route import CachedRoute, ServedRoute

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

    __slots__ = ("app", "keys", "route", "vary", "view")

    def __init__(self, route: CachedRoute, view: ServedRoute, app: ASGIApp) -> None:
        self.route = route
        self.view = view
        self.app = app
        self.vary = frozenset(name.encode("latin-1") for name in route.vary)
        # raw identity -> (key, path template); at most 4096, then forgotten all at once.
        self.keys: dict[tuple[Any, ...], tuple[str, str]] = {}

    def identity(self, scope: Scope) -> tuple[tuple[Any, ...], bytes | None] | None:
        """A request's raw identity and its `If-None-Match`; None if it has credentials
        that the route must not share."""
        lines: list[tuple[bytes, bytes]] = []
        if_none_match: bytes | None = None
        host: bytes | None = None
        for name, value in scope["headers"]:
            if name in self.vary:
                lines.append((name, value))
            if not self.route.shared and credential_header(name) is not None:
                return None
            if name == b"if-none-match" and if_none_match is None:
                if_none_match = value
            elif name == b"host" and host is None:
                host = value
        raw = (
            scope.get("scheme"),
            host,
            scope.get("root_path", ""),
            scope["path"],
            scope.get("query_string", b""),
            *lines,
        )
        return raw, if_none_match

    def remember(self, scope: Scope, key: str, path: str) -> None:
        """Record the key (as given to the core) and path template (for metrics) of a
        request gone the full way."""
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
        """Send the response of a fresh entry of `key` (as the full way gave it to the core,
        unescaped), if there is one (True)."""
        route = self.route
        cache = route.cache or get_cache()
        # `ahit`: `Cache.aget_fresh`, the core's read and freshness test (None with
        # early refresh: the core decides when to refresh)
        value = route.hit(cache, key) if cache.local else await route.ahit(cache, key)
        if value is None or "detail" in value:  # a cached exception: the full way raises it
            return False
        metrics = route.registry.route(path)
        metrics.hits += 1
        code, body, headers = self.view.responder.parts(
            value,
            HIT,
            cached=True,
            private=self.view.per_user,
            if_none_match_header=None if etags is None else etags.decode("latin-1"),
            head=scope["method"] == "HEAD",
            remember=cache.local,
        )
        if code == 304:
            metrics.not_modified += 1
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return True
