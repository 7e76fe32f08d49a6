"""The options every HTTP edge's `cached` takes, defined and checked once, when decorating.

`route_decorator` makes the `cached` of an edge (FastAPI, Starlette, Flask, Django) with the
one signature below; `check_options` checks what it is given into a `RouteOptions`. Each
check raises `ConfigurationError` naming the option and what it must be: a string where a
list is expected would otherwise be read character by character, and `"false"` as true.
The core's own options (ttl, stale_ttl, stale_if_error, timeout, early_refresh, jitter)
are checked by the core's rule (`coalesce.options.Options.checked`), here rather than at
the first request, and handed to `Cache.get_or_set` as `RouteOptions.aside` says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, NoReturn

from coalesce.cache import Cache
from coalesce.errors import ConfigurationError
from coalesce.http.headers import is_token
from coalesce.http.metrics import REGISTRY, MetricsRegistry
from coalesce.options import Options


def refuse(message: str) -> NoReturn:
    raise ConfigurationError(message)


def flag(name: str, value: Any) -> bool:
    """`value` if it is a bool: a string such as `"false"` would read as true."""
    if not isinstance(value, bool):
        refuse(f"{name} must be True or False, not {value!r}")
    return value


def texts(name: str, value: Any, what: str) -> tuple[str, ...]:
    """`value` as a tuple of strings: a list or tuple of them, never one string (which would
    be read character by character)."""
    if (
        isinstance(value, (str, bytes, bytearray))
        or not isinstance(value, Sequence)
        or not all(isinstance(item, str) for item in value)
    ):
        refuse(f"{name} must be a list of {what}, not {value!r}")
    return tuple(value)


def header_names(value: Any) -> tuple[str, ...]:
    """The `vary` header names, lower-case; each must be an RFC 9110 token, as it is sent
    in the `Vary` header of every response."""
    names = tuple(n.strip().lower() for n in texts("vary", value, "header names"))
    for name in names:
        if not is_token(name):
            refuse(
                f"vary: {name!r} is not an HTTP header name (an RFC 9110 token: ASCII "
                "letters, digits and !#$%&'*+-.^_`|~)"
            )
    return names


class RouteOptions(NamedTuple):
    """The options of one decorated route or view, checked (`check_options`)."""

    ttl: float | None
    stale_ttl: float
    key: str | None
    vary: tuple[str, ...]  # lower-case header names
    tags: tuple[str, ...]
    shared: bool
    cache_4xx: bool
    honor_client_no_cache: bool
    cache: Cache | None
    registry: MetricsRegistry
    stale_if_error: float = 0.0
    timeout: float | None = None
    early_refresh: float = 0.0  # XFetch's beta; 0.0: off
    jitter: float = 0.0

    def aside(self) -> dict[str, Any]:
        """The keyword arguments of `Cache.get_or_set` for this route's entries (the
        rendered responses are handed out as stored: `copy=False`)."""
        return {
            "ttl": self.ttl,
            "stale_ttl": self.stale_ttl,
            "stale_if_error": self.stale_if_error,
            "timeout": self.timeout,
            "early_refresh": self.early_refresh or False,
            "jitter": self.jitter,
            "copy": False,
        }


def check_options(
    *,
    ttl: Any = None,
    stale_ttl: Any = 0.0,
    key: Any = None,
    vary: Any = (),
    tags: Any = (),
    shared: Any = False,
    cache_4xx: Any = False,
    honor_client_no_cache: Any = False,
    cache: Any = None,
    registry: Any = None,
    stale_if_error: Any = 0.0,
    timeout: Any = None,
    early_refresh: Any = False,
    jitter: Any = 0.0,
) -> RouteOptions:
    """The options of a route decorator, checked once when decorating (the core's rule):
    every response's Cache-Control is computed from them. `registry` None is `REGISTRY`."""
    core = Options.checked(
        ttl=ttl,
        stale_ttl=stale_ttl,
        stale_if_error=stale_if_error,
        timeout=timeout,
        early_refresh=early_refresh,
        jitter=jitter,
    )
    if key is not None and not isinstance(key, str):
        refuse(f"key must be a template string such as 'item:{{item_id}}', not {key!r}")
    names = header_names(vary)
    templates = texts("tags", tags, "tag templates such as ['item:{item_id}']")
    if cache is not None and not isinstance(cache, Cache):
        refuse(f"cache must be a coalesce.Cache, not {cache!r}")
    if registry is not None and not isinstance(registry, MetricsRegistry):
        refuse(f"registry must be a coalesce.fastapi.MetricsRegistry, not {registry!r}")
    return RouteOptions(
        ttl=core.ttl,
        stale_ttl=core.stale_ttl,
        key=key,
        vary=names,
        tags=templates,
        shared=flag("shared", shared),
        cache_4xx=flag("cache_4xx", cache_4xx),
        honor_client_no_cache=flag("honor_client_no_cache", honor_client_no_cache),
        cache=cache,
        registry=REGISTRY if registry is None else registry,
        stale_if_error=core.stale_if_error,
        timeout=core.timeout,
        early_refresh=core.early_refresh,
        jitter=core.jitter,
    )


#: How an edge makes its endpoint of a decorated function: `make(fn, options, store)`,
#: `store` False for `coalesced` (share runs, keep nothing).
Make = Callable[[Callable[..., Any], RouteOptions, bool], Any]


def route_decorator(make: Make, module: str) -> Callable[..., Any]:
    """The `cached` decorator of one web edge (`module`), with the one signature every edge
    shares: its options are checked (`check_options`) when `cached(...)` is called, and
    `make(fn, options, True)` makes the edge's endpoint of each function it decorates."""

    def cached(
        ttl: float | Callable[..., Any] | None = None,
        *,
        key: str | None = None,
        vary: Sequence[str] = (),
        shared: bool = False,
        tags: Sequence[str] = (),
        stale_ttl: float = 0.0,
        stale_if_error: float = 0.0,
        timeout: float | None = None,
        early_refresh: bool | float = False,
        jitter: float = 0.0,
        cache: Cache | None = None,
        cache_4xx: bool = False,
        honor_client_no_cache: bool = False,
        registry: MetricsRegistry | None = None,
    ) -> Any:
        if callable(ttl):  # used bare: @cached
            return cached()(ttl)
        options = check_options(
            ttl=ttl,
            key=key,
            vary=vary,
            shared=shared,
            tags=tags,
            stale_ttl=stale_ttl,
            stale_if_error=stale_if_error,
            timeout=timeout,
            early_refresh=early_refresh,
            jitter=jitter,
            cache=cache,
            cache_4xx=cache_4xx,
            honor_client_no_cache=honor_client_no_cache,
            registry=registry,
        )
        return lambda fn: make(fn, options, True)

    cached.__module__ = module
    return cached


def coalescing_decorator(make: Make, module: str) -> Callable[..., Any]:
    """The `coalesced` decorator of one web edge (`module`): one run of the handler for
    overlapping identical requests, nothing stored; the options that apply (checked as for
    `cached`), `make(fn, options, False)` making the endpoint."""

    def coalesced(
        fn: Callable[..., Any] | None = None,
        *,
        key: str | None = None,
        vary: Sequence[str] = (),
        shared: bool = False,
        cache: Cache | None = None,
        registry: MetricsRegistry | None = None,
    ) -> Any:
        options = check_options(key=key, vary=vary, shared=shared, cache=cache, registry=registry)
        if fn is not None:  # used bare: @coalesced
            return make(fn, options, False)
        return lambda fn: make(fn, options, False)

    coalesced.__module__ = module
    coalesced.__doc__ = """Share one run of the handler among overlapping identical requests;
    store nothing. Followers receive the leader's rendered response (`X-Cache: COALESCED`);
    the same rules as `cached` decide which requests may share (credentials, `vary`,
    `shared`)."""
    return coalesced
