"""One decorated route handler: the decisions made once, and the path of one request.

    request ──► HitShortcut (routes without dependencies, before FastAPI validates or
       │        solves anything): a request seen before, no credentials, fresh entry ──► HIT
       ▼
    FastAPI (validation, dependencies) ──► the decorated endpoint ──► `CachedRoute.serve`:

    request ──► GET/HEAD? cache enabled? ── no ──► the handler, as if undecorated
       │
       ├─ a credential (Authorization, Cookie, a header named like one, what a security
       │  scheme of the route reads) not covered by the key (and not shared=True) ──► BYPASS
       │  (covered: its header's value in the key, or a key template that reads the user's
       │  identity: the result of a dependency that reads a credential, such as `{user.id}`)
       ▼
    key ──► `Cache.aget_fresh` ── fresh ──► HIT (the hot path: one read, nothing else)
       │
       └─ missing / stale ──► `Cache.aget_or_set(key, run)` (the flight: one computation
          per key; on Redis one per fleet), `run` running the handler for one request and
          rendering it into the entry ──► MISS | COALESCED | STALE

What is known of each route serving the handler (its dependency tree's inputs and
credentials, its `Vary`, whether its entries are per user) is a `ServedRoute`, built at the
route's first request. The shortcut lives in `coalesce.fastapi.shortcut`.

Only the public API of coalesce is used, through `CachedEndpoint` (`coalesce.http.endpoint`,
shared with the other edges): `Cache.aget_fresh` for hits, `Cache.aget_or_set` for the
rest (`Cache.coalesced` for `coalesced` routes, which keep nothing), `ainvalidate` /
`ainvalidate_tag`. Which request ran the handler is known from its `Job`; whether the others
waited (COALESCED) or hit is told by the entry's creation time. What cannot go through
`get_or_set`: whether a request may share at all (its credentials, `BYPASS`), and the
per-request `private` decision, both made here before the core is asked; and the hit
shortcut, which answers before FastAPI runs (`coalesce.fastapi.shortcut`), with
`Cache.aget_fresh` too.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

import coalesce
from coalesce import CoalesceError, ConfigurationError, LeaderFailedError, get_cache
from coalesce.fastapi.keys import (
    NO_INPUTS,
    REQUIRED,
    RouteInputs,
    analyse,
    bind_identity,
    encode_inputs,
    encode_params,
    encode_value,
    header_params,
    resolved_signature,
    route_inputs,
    template_carries_identity,
    template_fields,
)
from coalesce.fastapi.metrics import RouteMetrics
from coalesce.fastapi.render import (
    NotShared,
    Responder,
    entry_of,
    exception_entry,
    own_response,
    render,
)
from coalesce.fastapi.shortcut import HitShortcut, served_route, shortcut_allowed
from coalesce.http import BYPASS, COALESCED, CREDENTIAL_HEADERS, HIT, client_wants_fresh
from coalesce.http.endpoint import CachedEndpoint
from coalesce.http.keys import (
    credential_header,
    encode_origin,
    encode_vary,
    secret,
    secret_header,
)
from coalesce.http.options import RouteOptions, refuse

logger = logging.getLogger("coalesce.fastapi")

# What rendering a request's key or tags may raise: the request then runs uncached.
_UNRENDERABLE = (CoalesceError, TypeError, ValueError, AttributeError, LookupError)


class ServedRoute:
    """What is known of one route (or inclusion of a router) serving the handler, decided at
    its first request from FastAPI's dependency tree of it (`route_inputs`): the inputs its
    dependencies read, the credentials its security schemes read, the `Vary` header, and
    whether every response from it is for one user only (`private`).

    Built by `CachedRoute.view` and never changed after; read by any request of the route.
    """

    __slots__ = (
        "credential_headers",
        "credential_queries",
        "inputs",
        "keyed",
        "per_user",
        "responder",
        "vary",
    )

    def __init__(self, owner: CachedRoute, inputs: RouteInputs) -> None:
        self.inputs = inputs
        names = [*CREDENTIAL_HEADERS, *inputs.credential_headers]
        self.credential_headers = {name.encode("latin-1"): name for name in names}
        self.credential_queries = inputs.credential_queries
        # Every request header in the key is named in Vary (RFC 9110 12.5.5), and so is
        # every credential header unless the route is shared: a downstream cache must not
        # answer a request with another one's response.
        keyed = owner.template_headers if owner.template is not None else inputs.headers
        # The headers whose values are in the key: a credential among them keeps the
        # entry to its holder.
        self.keyed = frozenset((*owner.vary, *keyed))
        credentials = () if owner.shared else names
        vary = list(dict.fromkeys((*owner.vary, *keyed, *credentials)))
        sensitive_key = owner.template is None and (
            any(p.sensitive for p in owner.identity) or any(i.sensitive for i in inputs.inputs)
        )
        # An entry that depends on a credential or a user's identity is for that user only.
        self.per_user = (
            owner.key_has_user or sensitive_key or any(secret_header(v) for v in owner.vary)
        )
        self.vary = ", ".join(n.title() for n in vary)
        self.responder = Responder(
            vary_header=self.vary.encode("latin-1"),
            stale_ttl=owner.stale_ttl,
            stale_if_error=owner.stale_if_error,
        )

    def credentials(self, request: Request) -> list[str]:
        """The credentials a request carries: credential headers (`authorization`, `cookie`,
        those of the route's security schemes) and `?name` for a security scheme's query
        parameter."""
        found: list[str] = []
        known = self.credential_headers
        for name, _ in request.scope["headers"]:
            credential = known.get(name) or credential_header(name)
            if credential is not None and credential not in found:
                found.append(credential)
        if self.credential_queries:
            query = request.query_params
            found.extend(f"?{name}" for name in self.credential_queries if name in query)
        return found


class Job:
    """One request's part in a computation: its arguments, and whether it ran the handler."""

    __slots__ = ("key", "kwargs", "metrics", "ran", "request", "response", "sub", "ttl")

    def __init__(
        self,
        key: str,
        kwargs: dict[str, Any],
        request: Request,
        sub: Response,
        metrics: RouteMetrics,
        ttl: float | None,
    ) -> None:
        self.key = key
        self.kwargs = kwargs
        self.request = request
        self.sub = sub  # FastAPI's sub-response: status/headers set by the handler or deps
        self.metrics = metrics
        self.ttl = ttl  # of the entry it makes (`CachedEndpoint.ttl_now`)
        self.ran = False  # set when this request's computation started (it is the leader)
        self.response: Response | None = None  # its rendered response, once there is one


def _raw(fn: Callable[..., Any], template: str) -> Callable[..., str]:
    """Render `template` over a handler's arguments as it is, unescaped.

    The core checks the template against the handler's parameters first (an unknown name
    raises `KeyTemplateError` when decorating), on a stand-in with the handler's parameter
    names only: the core refuses FastAPI's parameter markers, meant for this edge.
    """

    def stand_in(*args: Any, **kwargs: Any) -> None:
        return None

    sig = resolved_signature(fn)
    plain = [
        p.replace(annotation=p.empty, default=None if p.default is not p.empty else p.empty)
        for p in sig.parameters.values()
    ]
    stand_in.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=plain, return_annotation=sig.empty
    )
    stand_in.__module__, stand_in.__qualname__ = fn.__module__, fn.__qualname__
    coalesce.coalesced(key=template)(stand_in)
    return template.format


class CachedRoute(CachedEndpoint):
    """Everything decided about one decorated handler when it is decorated."""

    def __init__(self, fn: Callable[..., Any], options: RouteOptions, *, store: bool) -> None:
        if not callable(fn):
            refuse(f"@{'cached' if store else 'coalesced'} decorates a handler, not {fn!r}")
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise ConfigurationError(
                f"{fn.__qualname__} streams its response (a generator): it cannot be cached"
            )
        super().__init__(fn, options, store=store, logger=logger)
        key, honor_client_no_cache = options.key, options.honor_client_no_cache
        self.is_async = inspect.iscoroutinefunction(fn)
        self.signature = resolved_signature(fn)
        self.identity = analyse(self.signature)
        # Key and tag templates render the raw text: the core escapes it once, as it stores
        # it (`normal`, and the tags of `inner`), so `coalesce get 'feed:a b'` finds it.
        self.template: Callable[..., str] | None = None if key is None else _raw(fn, key)
        # Whether the key tells users apart by itself (a template reading a dependency
        # result such as `{user.id}`, a cookie or a credential header parameter); else a
        # request with credentials needs each of them in `vary` (or `shared=True`).
        self.key_has_user = key is not None and template_carries_identity(self.signature, key)
        fields = set() if key is None else template_fields(key)
        # The request headers a template reads (for Vary), and the secrets it reads (hashed
        # as they enter the key, as in default keys).
        self.template_headers = tuple(
            sorted(h for n, h in header_params(self.signature).items() if n in fields)
        )
        self.template_secrets = frozenset(
            p.name for p in self.identity if p.sensitive and p.name in fields
        )
        self.tag_makers: list[Callable[..., str]] = [_raw(fn, tag) for tag in options.tags]
        # id(route) -> (route, what is known of it): written by a route's first requests
        # (the same object may be built twice by concurrent ones; either is right).
        self.views: dict[int, tuple[Any, ServedRoute]] = {}
        self.tree_inputs = False  # whether some route's dependencies add inputs to keys
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

    # -- keys ------------------------------------------------------------------------------

    def ident(self, values: dict[str, Any]) -> str:
        """What identifies a request within the route: the template's key or the params."""
        if self.template is not None:
            if self.template_secrets:
                values = dict(values)
                for name in self.template_secrets:
                    if values.get(name) is not None:
                        values[name] = secret(encode_value(values[name]))
            return self.template(**values)
        return encode_params(self.identity, values)

    def base_key(self, origin: str | None, path: str | None, ident: str) -> str:
        """The key without its `vary` part and its dependencies' inputs.

        A template's key is followed by `@` and the handler's name: two routes with one
        template never answer each other (an HTML page and a JSON document of one user).
        A default key starts with the request's scheme and host (RFC 9111 2: caches key on
        the target URI), then the path template and the parameters.
        """
        if self.template is not None:
            return f"{ident}@{self.name}"
        if path is None:
            path = self.only("path", self.paths, "'/items/{item_id}'")
        if origin is None:
            origin = self.only("origin", self.origins, "'https://shop.example'")
        # `<item_id>` for `{item_id}`: braces would be escaped (they cut Redis Cluster hash
        # tags short), and the key should stay readable in `coalesce keys`
        return f"{origin}{path.replace('{', '<').replace('}', '>')}?{ident}"

    def view(self, api_route: Any) -> ServedRoute:
        """What is known of a route serving this handler (`ServedRoute`), built once."""
        known = self.views.get(id(api_route))
        if known is not None and known[0] is api_route:
            return known[1]
        dependant = getattr(api_route, "dependant", None)
        inputs = NO_INPUTS if dependant is None else route_inputs(dependant)
        view = ServedRoute(self, inputs)
        if inputs.inputs or inputs.body:
            self.tree_inputs = True
        if len(self.views) >= 1024:
            self.views.clear()
        self.views[id(api_route)] = (api_route, view)
        return view

    def given_values(self, given: dict[str, Any], where: str) -> dict[str, Any]:
        """Arguments for `.key()` / `.invalidate()`: FastAPI's defaults filled in."""
        if self.template is None:
            return bind_identity(self.identity, given, where)
        values: dict[str, Any] = dict.fromkeys(self.signature.parameters)  # unused: None
        values.update((p.name, p.default) for p in self.identity if p.default is not REQUIRED)
        values.update(given)
        return values

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

    async def serve(self, request: Request, sub: Response, kwargs: dict[str, Any]) -> Any:
        scope = request.scope
        cache = self.cache or get_cache()
        if scope["method"] not in ("GET", "HEAD") or not cache.enabled:
            return await self.call(kwargs)
        route = served_route(scope)
        path = scope.get("root_path", "") + (getattr(route, "path_format", None) or scope["path"])
        metrics = self.registry.route(path)
        view = self.view(route)
        credentials = view.credentials(request)
        private = view.per_user
        if credentials and not self.shared:
            if not self.key_has_user and not all(h in view.keyed for h in credentials):
                # Its response depends on the credentials: downstream caches must keep it
                # to this user too, unless the handler says otherwise.
                sub.headers["cache-control"] = "private"
                sub.headers["vary"] = view.vary
                return await self.bypass(kwargs, sub, metrics)
            private = True  # the key holds the user's identity: for this user only
        if path not in self.paths:
            self.paths.add(path)
        if id(route) not in self.routes_seen:
            if len(self.routes_seen) >= 1024:
                self.routes_seen.clear()
            self.routes_seen.add(id(route))
            self.install_shortcut(route, view)
        try:
            ident = self.ident(kwargs)
            if self.template is None:
                origin = encode_origin(scope.get("scheme", "http"), request.headers.get("host"))
                self.add_origin(origin)
                base = self.base_key(origin, path, ident)
            else:
                base = self.base_key(None, None, ident)
            raw_key = base + encode_vary(self.vary, request.headers) if self.vary else base
            if self.template is None and (view.inputs.inputs or view.inputs.body):
                raw_key += await encode_inputs(view.inputs, request)
        except _UNRENDERABLE as exc:
            # No stable key for this request (an argument without a text form, a template
            # field missing): run it as if undecorated rather than fail or share wrongly.
            self.warn_once("key", "coalesce: no cache key for %s (%s); not caching it", path, exc)
            return await self.bypass(kwargs, sub, metrics)
        if self.store:
            if self.honor_no_cache and client_wants_fresh(
                request.headers.get("cache-control"), request.headers.get("pragma")
            ):
                if not await self.adrop(cache, raw_key):
                    return await self.bypass(kwargs, sub, metrics)
            else:  # the hot path: one read, no flight, no handler
                shortcut = getattr(route, "app", None)
                if type(shortcut) is HitShortcut and shortcut.route is self and not private:
                    shortcut.remember(scope, raw_key, path)
                value = self.hit(cache, raw_key) if cache.local else await self.ahit(cache, raw_key)
                if value is not None:
                    metrics.hits += 1
                    return self.respond(view, value, HIT, request, metrics, private, cache.local)
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
        job = Job(raw_key, kwargs, request, sub, metrics, self.ttl_now(cache))
        try:
            # The raw key: the core escapes it once (`normal`); passing `normal(raw_key)`
            # would escape its `%` again and store where reads and invalidations never look.
            value = await self.athrough(cache, raw_key, tags, partial(self.run, job))
        except NotShared as exc:
            if job.response is not None:  # this request ran the handler: its own response
                metrics.misses += 1
                return own_response(job.response, private=private)
            if exc.rendered is None:
                return await self.bypass(kwargs, sub, metrics)
            metrics.coalesced += 1
            return self.respond(
                view, exc.rendered, COALESCED, request, metrics, private, False, False
            )
        except LeaderFailedError:  # another process failed computing it: try here
            return await self.bypass(kwargs, sub, metrics)
        status = self.status(value, job.ran, started, metrics)
        response = self.respond(view, value, status, request, metrics, private, cache.local)
        if job.response is not None:
            response.background = job.response.background
        return response

    def respond(
        self,
        view: ServedRoute,
        value: dict[str, Any],
        status: str,
        request: Request,
        metrics: RouteMetrics,
        private: bool,
        remember: bool,
        cached: bool | None = None,
    ) -> Response:
        """The response for an entry (`remember`: the entry is the very dict the memory
        store keeps, so its encoded headers may be remembered)."""
        response = view.responder.respond(
            value,
            status,
            cached=self.store if cached is None else cached,
            private=private,
            if_none_match_header=request.headers.get("if-none-match"),
            head=request.scope["method"] == "HEAD",
            remember=remember,
        )
        if response.status_code == 304:
            metrics.not_modified += 1
        return response

    def install_shortcut(self, api_route: Any, view: ServedRoute) -> None:
        """Put a `HitShortcut` in front of `api_route`'s app, if it may have one."""
        if (
            self.shortcut_ok
            and self.endpoint is not None
            and getattr(api_route, "endpoint", None) is self.endpoint
            and type(api_route.app) is not HitShortcut
            and shortcut_allowed(api_route)
        ):
            api_route.app = HitShortcut(self, view, api_route.app)

    # -- computing -------------------------------------------------------------------------

    async def run(self, job: Job) -> dict[str, Any]:
        """Run the handler for the core (the flight's leader) and make its entry (or raise)."""
        job.ran = True
        started = time.perf_counter()
        code = 500  # what an exception becomes, unless it says otherwise
        try:
            try:
                raw = await self.call(job.kwargs)
            except HTTPException as exc:
                code = exc.status_code
                if not self.keeps_error(code):
                    raise
                return exception_entry(exc, ttl=job.ttl)
            job.response = await render(raw, served_route(job.request.scope), job.sub)
            return entry_of(job.response, ttl=job.ttl, store=self.store, cache_4xx=self.cache_4xx)
        finally:
            if job.response is not None:
                code = job.response.status_code
            self.computed(job.metrics, job.key, time.perf_counter() - started, code)

    # -- invalidation ----------------------------------------------------------------------

    async def invalidate(self, path: str | None, origin: str | None, given: dict[str, Any]) -> bool:
        """Delete every entry of one request (all `vary` variants, every path served)."""
        cache = self.cache or get_cache()
        ident = self.ident(self.given_values(given, f"{self.name}.invalidate"))
        removed = await cache.ainvalidate_tag(self.normal(self.request_tag(ident))) > 0
        if not self.vary and not self.tree_inputs:  # exact keys: fence computations too
            if self.template is not None:
                bases = [self.base_key(None, None, ident)]
            else:
                bases = [
                    self.base_key(o, p, ident)
                    for p in ([path] if path else self.paths)
                    for o in ([origin] if origin else self.origins)
                ]
            for base in bases:
                removed = await cache.ainvalidate(self.normal(base)) or removed
        return removed
