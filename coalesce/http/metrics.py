"""What the cached routes and views did, per route: counters, compute latency, Prometheus text.

Every route served by the edges (`coalesce.fastapi`, `coalesce.starlette`, `coalesce.flask`,
`coalesce.django`) gets one `RouteMetrics`, keyed by its path template (`/items/{item_id}`,
`/items/<int:item_id>`), in a `MetricsRegistry` (the module-level `REGISTRY` unless a
decorator is given another; all the edges share it). Counters are plain integers bumped
without a lock, like `coalesce.stats`: under heavy thread contention (Flask, Django) a hit
may go uncounted. Compute latency is kept in a bounded reservoir of the most recent
computations (1024 by default), so p50/p99 describe the recent past and the memory per
route is fixed.

`MetricsRegistry.snapshot()` is JSON data, `MetricsRegistry.prometheus()` the Prometheus
text format 0.0.4: `coalesce_http_requests_total{route=...,cache="hit"}`,
`coalesce_http_computations_total`, `coalesce_http_errors_total` and the summary
`coalesce_http_compute_seconds{quantile="0.5"|"0.99"}` with `_sum` and `_count`
(`coalesce.fastapi.metrics_router` serves them; `coalesce.prometheus` reads the snapshots).
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque
from typing import Any

from coalesce.errors import ConfigurationError
from coalesce.http.headers import quantile

_STATUSES = ("hits", "misses", "stale", "coalesced", "bypassed", "not_modified")
_PROMETHEUS_STATUS = {
    "hits": "hit",
    "misses": "miss",
    "stale": "stale",
    "coalesced": "coalesced",
    "bypassed": "bypass",
    "not_modified": "not_modified",
}


class RouteMetrics:
    """The counters and recent compute latencies of one route."""

    __slots__ = (
        "bypassed",
        "coalesced",
        "computations",
        "compute_time",
        "errors",
        "hits",
        "misses",
        "not_modified",
        "route",
        "samples",
        "stale",
    )

    def __init__(self, route: str, reservoir: int = 1024) -> None:
        self.route = route
        self.hits = 0  # served from a fresh entry
        self.misses = 0  # ran the handler for this request
        self.stale = 0  # served a stale entry while it was refreshed
        self.coalesced = 0  # received another request's computation
        self.bypassed = 0  # not cacheable: ran the handler as if undecorated
        self.not_modified = 0  # answered 304 to If-None-Match (also counted above)
        self.computations = 0  # times the handler ran through the cache (the database calls)
        self.errors = 0  # computations that raised or answered 5xx
        self.compute_time = 0.0  # seconds spent in computations, in total
        self.samples: deque[float] = deque(maxlen=reservoir)  # recent compute durations

    def record_computation(self, seconds: float, *, failed: bool = False) -> None:
        self.computations += 1
        self.compute_time += seconds
        self.samples.append(seconds)
        if failed:
            self.errors += 1

    def snapshot(self) -> dict[str, Any]:
        """The counters, hit ratio and p50/p99 compute latency (milliseconds) as JSON data."""
        ordered = sorted(self.samples)
        served = self.hits + self.stale + self.misses + self.coalesced
        return {
            "hits": self.hits,
            "misses": self.misses,
            "stale": self.stale,
            "coalesced": self.coalesced,
            "bypassed": self.bypassed,
            "not_modified": self.not_modified,
            "computations": self.computations,
            "errors": self.errors,
            "hit_ratio": round((self.hits + self.stale) / served, 4) if served else 0.0,
            "compute_time_s": round(self.compute_time, 6),
            "p50_ms": round(quantile(ordered, 0.5) * 1000, 3),
            "p99_ms": round(quantile(ordered, 0.99) * 1000, 3),
            "samples": len(ordered),
        }


class MetricsRegistry:
    """`RouteMetrics` by path template."""

    def __init__(self, reservoir: int = 1024) -> None:
        if reservoir < 1:
            raise ConfigurationError(f"reservoir must be at least 1, not {reservoir!r}")
        self.reservoir = reservoir
        self.routes: dict[str, RouteMetrics] = {}

    def route(self, route: str) -> RouteMetrics:
        """The metrics of `route`, created on first use."""
        metrics = self.routes.get(route)
        if metrics is None:
            metrics = self.routes.setdefault(route, RouteMetrics(route, self.reservoir))
        return metrics

    def snapshot(self) -> dict[str, Any]:
        return {"routes": {name: m.snapshot() for name, m in sorted(self.routes.items())}}

    def reset(self) -> None:
        """Forget every route (tests, or a deliberate reset)."""
        self.routes.clear()

    def prometheus(self) -> str:
        """The registry in Prometheus text exposition format 0.0.4."""
        lines = [
            "# HELP coalesce_http_requests_total Requests to cached routes, by cache status.",
            "# TYPE coalesce_http_requests_total counter",
        ]
        routes = sorted(self.routes.items())
        for name, m in routes:
            for field in _STATUSES:
                status = _PROMETHEUS_STATUS[field]
                lines.append(
                    f'coalesce_http_requests_total{{route="{_label(name)}",cache="{status}"}} '
                    f"{getattr(m, field)}"
                )
        for metric, field, help_text in (
            ("coalesce_http_computations_total", "computations", "Handler runs (computations)."),
            ("coalesce_http_errors_total", "errors", "Computations that raised or gave 5xx."),
        ):
            lines.append(f"# HELP {metric} {help_text}")
            lines.append(f"# TYPE {metric} counter")
            for name, m in routes:
                lines.append(f'{metric}{{route="{_label(name)}"}} {getattr(m, field)}')
        lines.append("# HELP coalesce_http_compute_seconds Handler compute time (recent window).")
        lines.append("# TYPE coalesce_http_compute_seconds summary")
        for name, m in routes:
            ordered = sorted(m.samples)
            label = _label(name)
            for q in (0.5, 0.99):
                lines.append(
                    f'coalesce_http_compute_seconds{{route="{label}",quantile="{q}"}} '
                    f"{quantile(ordered, q):.6f}"
                )
            lines.append(
                f'coalesce_http_compute_seconds_sum{{route="{label}"}} {m.compute_time:.6f}'
            )
            lines.append(f'coalesce_http_compute_seconds_count{{route="{label}"}} {m.computations}')
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    """Escape a Prometheus label value."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


#: The registry the decorators use unless given another.
REGISTRY = MetricsRegistry()


def bearer_matches(header: str | None, token: str) -> bool:
    """True when an `Authorization` header carries `Bearer <token>`, compared in constant time."""
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Hash both sides first so that not even the token's length shows in the timing.
    given_digest = hashlib.sha256(given.strip().encode("utf-8")).digest()
    return hmac.compare_digest(given_digest, hashlib.sha256(token.encode("utf-8")).digest())
