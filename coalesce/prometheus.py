"""coalesce's counters in the user's own `prometheus_client` registry (the `prometheus` extra).

    from coalesce.prometheus import register

    register()  # the default cache, into prometheus_client.REGISTRY
    register(caches=[cache], routes=[fastapi_registry], registry=my_registry)

`register` adds one collector, read at scrape time: it copies the counters that coalesce
already keeps (`Cache.stats()`, and the FastAPI edge's `MetricsRegistry`), so nothing is
added to the hot path and nothing is counted twice. Metrics (counters carry `_total`):

* `coalesce_hits_total`, `coalesce_stale_total` (stale entries served while refreshed),
  `coalesce_misses_total` (calls that found no usable entry), `coalesce_coalesced_total`
  (misses that received another caller's computation), `coalesce_computations_total`,
  `coalesce_errors_total`, `coalesce_early_refreshes_total`, `coalesce_stale_on_error_total`,
  `coalesce_timeouts_total`, `coalesce_backend_errors_total`, `coalesce_invalidations_total`,
  `coalesce_batches_total`, `coalesce_batch_ids_total`,
  `coalesce_compute_seconds_total`, each `{namespace, function}`: `function` is the key
  template, else the qualified name (as `Cache.stats()` names it);
* `coalesce_http_requests_total{route, cache}` (`cache`: hit, miss, stale, coalesced,
  bypass, not_modified), `coalesce_http_computations_total{route}`,
  `coalesce_http_errors_total{route}`, `coalesce_http_compute_seconds_total{route}`, for the
  FastAPI edge's routes.

Caches are named when registering, or the default cache (`coalesce.get_cache()`) is read at
each scrape. This module imports no web framework; `routes` takes any object with the
`MetricsRegistry.snapshot()` shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

from coalesce import Cache, MissingDependencyError, get_cache

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import CounterMetricFamily
    from prometheus_client.registry import Collector
except ImportError as exc:  # the extra is not installed: say which one
    raise MissingDependencyError(
        f"coalesce.prometheus needs prometheus_client ({exc}), which the 'prometheus' extra "
        "installs: pip install 'coalesce-cache[prometheus]'"
    ) from None

__all__ = ["CoalesceCollector", "register"]

_PER_FUNCTION = (
    ("hits", "hits", "Fresh entries served."),
    ("stale", "stale", "Stale entries served while one caller refreshed them."),
    ("misses", "misses", "Calls that found no usable entry."),
    ("coalesced", "coalesced", "Misses that received another caller's computation."),
    ("computations", "computations", "Times the function itself ran (the expensive part)."),
    ("errors", "errors", "Computations that raised."),
    ("early_refreshes", "early_refreshes", "Refreshes started before expiry (early_refresh)."),
    ("stale_on_error", "stale_on_error", "Failed refreshes that kept serving the old value."),
    ("timeouts", "timeouts", "Callers that stopped waiting for a computation (timeout)."),
    ("backend_errors", "backend_errors", "Store failures that degraded to computing directly."),
    ("invalidations", "invalidations", "Entries deleted through the function's invalidate()."),
    ("compute_seconds", "compute_time", "Seconds spent in computations."),
    ("batches", "batches", "Runs of a cached_many function (ids missing from the cache)."),
    ("batch_ids", "batch_ids", "Ids passed to those runs, in total."),
)
_HTTP_RESULTS = (
    ("hit", "hits"),
    ("miss", "misses"),
    ("stale", "stale"),
    ("coalesced", "coalesced"),
    ("bypass", "bypassed"),
    ("not_modified", "not_modified"),
)


class RouteSnapshots(Protocol):
    """What the collector reads of a FastAPI `MetricsRegistry`."""

    def snapshot(self) -> dict[str, Any]: ...


class CoalesceCollector(Collector):
    """Reads the counters of some caches and route registries at each scrape."""

    def __init__(
        self, caches: Sequence[Cache] | None = None, routes: Sequence[RouteSnapshots] = ()
    ) -> None:
        self.caches = None if caches is None else tuple(caches)
        self.routes = tuple(routes)

    def collect(self) -> Iterator[CounterMetricFamily]:
        caches = (get_cache(),) if self.caches is None else self.caches
        yield from _function_metrics(caches)
        yield from _route_metrics(self.routes)


def _function_metrics(caches: Iterable[Cache]) -> Iterator[CounterMetricFamily]:
    families = [
        (CounterMetricFamily(f"coalesce_{name}", text, labels=["namespace", "function"]), field)
        for name, field, text in _PER_FUNCTION
    ]
    for cache in caches:
        for function, counts in sorted(cache.stats().items()):
            for family, field in families:
                family.add_metric([cache.namespace, function], counts[field])
    for family, _ in families:
        yield family


def _route_metrics(registries: Iterable[RouteSnapshots]) -> Iterator[CounterMetricFamily]:
    requests = CounterMetricFamily(
        "coalesce_http_requests",
        "Requests of cached routes by X-Cache result (304s are counted among them too).",
        labels=["route", "cache"],
    )
    computations = CounterMetricFamily(
        "coalesce_http_computations", "Handler runs through the cache.", labels=["route"]
    )
    errors = CounterMetricFamily(
        "coalesce_http_errors", "Handler runs that raised or answered 5xx.", labels=["route"]
    )
    seconds = CounterMetricFamily(
        "coalesce_http_compute_seconds", "Seconds spent in handler runs.", labels=["route"]
    )
    for registry in registries:
        for route, counts in sorted(registry.snapshot()["routes"].items()):
            for result, field in _HTTP_RESULTS:
                requests.add_metric([route, result], counts[field])
            computations.add_metric([route], counts["computations"])
            errors.add_metric([route], counts["errors"])
            seconds.add_metric([route], counts["compute_time_s"])
    yield from (requests, computations, errors, seconds)


def register(
    *,
    caches: Sequence[Cache] | None = None,
    routes: Sequence[RouteSnapshots] = (),
    registry: CollectorRegistry | None = None,
) -> CoalesceCollector:
    """Add a `CoalesceCollector` to `registry` (prometheus_client's default `REGISTRY` unless
    given) and return it (`registry.unregister(collector)` removes it).

    `caches`: the caches to read (default: `coalesce.get_cache()`, looked up at each scrape);
    `routes`: FastAPI `MetricsRegistry` objects (`coalesce.fastapi.REGISTRY` is the default
    one of the edge).
    """
    collector = CoalesceCollector(caches, routes)
    (REGISTRY if registry is None else registry).register(collector)
    return collector
