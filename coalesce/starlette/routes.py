"""The name of the route a Starlette request reached, for metrics: its path template.

A cached endpoint's metrics (`coalesce.http.metrics.MetricsRegistry`, a reservoir of
samples per name) are kept per route, so a route must be named by its template, never by
the URL a client chose: `/items/{item_id:int}` for `/items/1`, `/items/2`, ... Starlette
says which route it ran (`scope["route"]`) only from 1.7 on, and its `root_path` holds the
concrete path a `Mount` matched (`/users/42` for `Mount("/users/{uid}")`), so neither is
used as is. `RouteNames` finds the templates from the application's own routes instead,
walking them once per application the way Starlette's router composes them:

* the name is the server's root path (`uvicorn --root-path`, Starlette's `app_root_path`)
  followed by the path template of each `Mount` on the way (`Mount.path`, written as
  declared: `/users/{uid}`, not `/users/42`), then the `Route`'s path as declared
  (`Route.path`). For mounts without parameters this is exactly Starlette's
  `scope["root_path"] + scope["route"].path`; `Host` routes add nothing.
* the routes whose endpoint is the decorated one (or a decorator around it that sets
  `__wrapped__`, or a `functools.partial` of it) are found once per router and endpoint
  and memoized: a request then costs a dict lookup. When the endpoint is routed at several
  templates, the one Starlette ran (`scope["route"]`, on Starlette >= 1.7) or else the
  first whose mounts and route match the request's path, in the router's order, names it.
* when none is found (an endpoint called outside a `Router`, an app whose routes are not
  reachable through `.routes`, a route added after the first request was served, a path
  that matches none), the name is the endpoint's qualified name (`module.qualname`): one
  name per endpoint, never the URL path.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from starlette.routing import BaseRoute, Host, Mount, Route

# How deep mounts may nest, and how many wrappers may sit around an endpoint, before the walk
# stops: a bound on an app that mounts itself or an endless chain of wrappers.
MAX_DEPTH = 32


class Candidate(NamedTuple):
    """A place in an app where the endpoint is routed."""

    template: str  # the mounts' path templates, then the route's, from the router's root
    chain: tuple[BaseRoute, ...]  # the `Mount`s and `Host`s on the way, the `Route` last


def serves(endpoint: Any, target: Callable[..., Any]) -> bool:
    """Whether a `Route`'s `endpoint` is `target`, or wraps it (`__wrapped__`, partials)."""
    for _ in range(MAX_DEPTH):
        if endpoint is target:
            return True
        if isinstance(endpoint, functools.partial):
            endpoint = endpoint.func
        else:
            endpoint = getattr(endpoint, "__wrapped__", None)
            if endpoint is None:
                return False
    return False


def routes_of(app: Any) -> Sequence[BaseRoute]:
    """The routes of a Starlette app, a `Router`, a `Mount` or a `Host`, looking through
    ASGI middleware that keeps the app it wraps as `.app`; none for anything else."""
    for _ in range(MAX_DEPTH):
        routes = getattr(app, "routes", None)
        if isinstance(routes, list) and routes:
            return routes
        app = getattr(app, "app", None)
        if app is None:
            return []
    return []


def candidates(
    routes: Sequence[BaseRoute],
    target: Callable[..., Any],
    prefix: str = "",
    chain: tuple[BaseRoute, ...] = (),
) -> Iterator[Candidate]:
    """Every place under `routes` where `target` is the endpoint, in the router's order."""
    if len(chain) >= MAX_DEPTH:
        return
    for route in routes:
        if isinstance(route, Route):
            if serves(route.endpoint, target):
                yield Candidate(prefix + route.path, (*chain, route))
        elif isinstance(route, Mount):
            inner = routes_of(route)
            yield from candidates(inner, target, prefix + route.path, (*chain, route))
        elif isinstance(route, Host):
            yield from candidates(routes_of(route), target, prefix, (*chain, route))


def reaches(chain: tuple[BaseRoute, ...], path: str) -> bool:
    """Whether `path` (relative to the router's root) goes through these mounts to this
    route, matched as Starlette's `Mount.matches` and `Route.matches` do (hosts pass)."""
    for hop in chain:
        if isinstance(hop, Mount):
            match = hop.path_regex.match(path)
            if match is None:
                return False
            path = "/" + match.groupdict().get("path", "")
        elif isinstance(hop, Route):
            return hop.path_regex.match(path) is not None
    return False


class RouteNames:
    """The route names of one decorated endpoint, per router that serves it.

    `name(scope)` is the template of the route a request reached (see the module
    docstring): a bounded set of names per app, whatever paths clients send. The first
    request through a router walks its routes; the later ones look the result up.
    """

    def __init__(self, fallback: str) -> None:
        self.fallback = fallback  # the endpoint's qualified name: when no route is found
        self.target: Callable[..., Any] | None = None  # the decorated endpoint, once made
        self.found: dict[int, tuple[Callable[[], Any], tuple[Candidate, ...]]] = {}

    def bind(self, target: Callable[..., Any]) -> None:
        """Name the routes whose endpoint is `target` (the decorated endpoint)."""
        self.target = target

    def name(self, scope: Mapping[str, Any]) -> str:
        """The name of the route that `scope` (a request's ASGI scope) reached."""
        router = scope.get("router") or scope.get("app")
        if router is None or self.target is None:
            return self.fallback
        known = self.found.get(id(router))
        if known is None or known[0]() is not router:
            known = self.remember(router, tuple(candidates(routes_of(router), self.target)))
        places = known[1]
        if not places:
            return self.fallback
        # the router's root: what the server put before it (Starlette keeps it in
        # app_root_path once a Mount changed root_path)
        root: str = scope.get("app_root_path", scope.get("root_path", "")) or ""
        if len(places) == 1:
            return root + places[0].template
        route = scope.get("route")
        ran = [place for place in places if place.chain[-1] is route]
        if len(ran) == 1:
            return root + ran[0].template
        path: str = scope.get("path", "")
        if root and (path == root or path.startswith(root + "/")):  # not /apix under /api
            path = path[len(root) :]
        for place in ran or places:
            if reaches(place.chain, path):
                return root + place.template
        return self.fallback

    def remember(
        self, router: Any, places: tuple[Candidate, ...]
    ) -> tuple[Callable[[], Any], tuple[Candidate, ...]]:
        """Keep the places found in `router` until it is collected."""
        key = id(router)
        try:
            ref: Callable[[], Any] = weakref.ref(router, lambda _: self.found.pop(key, None))
        except TypeError:  # a router that takes no weak reference: kept alive
            ref = lambda: router  # noqa: E731
        known = (ref, places)
        self.found[key] = known
        return known
