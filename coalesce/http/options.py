"""Checks of the options the HTTP edges take, made once when decorating.

Each raises `ConfigurationError` naming the option and what it must be: a string where a
list is expected would otherwise be read character by character, and `"false"` as true.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, NoReturn

from coalesce.cache import Cache
from coalesce.errors import ConfigurationError
from coalesce.http.headers import is_token
from coalesce.http.metrics import REGISTRY, MetricsRegistry
from coalesce.options import check_seconds


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


def check_options(
    *,
    ttl: Any,
    stale_ttl: Any,
    key: Any,
    vary: Any,
    tags: Any,
    shared: Any,
    cache_4xx: Any,
    honor_client_no_cache: Any,
    cache: Any,
    registry: Any,
) -> RouteOptions:
    """The options of a route decorator, checked once when decorating (the core's rule):
    every response's Cache-Control is computed from them. `registry` None is `REGISTRY`."""
    checked_ttl = check_seconds("ttl", ttl, allow_none=True)
    checked_stale = check_seconds("stale_ttl", stale_ttl, allow_zero=True) or 0.0
    if key is not None and not isinstance(key, str):
        refuse(f"key must be a template string such as 'item:{{item_id}}', not {key!r}")
    names = header_names(vary)
    templates = texts("tags", tags, "tag templates such as ['item:{item_id}']")
    if cache is not None and not isinstance(cache, Cache):
        refuse(f"cache must be a coalesce.Cache, not {cache!r}")
    if registry is not None and not isinstance(registry, MetricsRegistry):
        refuse(f"registry must be a coalesce.fastapi.MetricsRegistry, not {registry!r}")
    return RouteOptions(
        ttl=checked_ttl,
        stale_ttl=checked_stale,
        key=key,
        vary=names,
        tags=templates,
        shared=flag("shared", shared),
        cache_4xx=flag("cache_4xx", cache_4xx),
        honor_client_no_cache=flag("honor_client_no_cache", honor_client_no_cache),
        cache=cache,
        registry=REGISTRY if registry is None else registry,
    )
