"""The metrics router: what the cached routes did, as JSON and Prometheus text, over HTTP.

The counters themselves (`RouteMetrics`, `MetricsRegistry`, `REGISTRY`, shared with the
Starlette, Flask and Django edges) live in `coalesce.http.metrics`; the event loop bumps
them, a thread-run handler only from the loop. `metrics_router()` serves a registry:

* `GET {path}` -> JSON `{"routes": {"/items/{item_id}": {"hits": 3, ..., "p50_ms": 1.2,
  "p99_ms": 9.8}}}`;
* `GET {path}?format=prometheus` (or `GET {path}/prometheus`) -> Prometheus text format
  0.0.4: `coalesce_http_requests_total{route=...,cache="hit"}`,
  `coalesce_http_computations_total`, `coalesce_http_errors_total` and the summary
  `coalesce_http_compute_seconds{quantile="0.5"|"0.99"}` with `_sum` and `_count`.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from coalesce.errors import ConfigurationError
from coalesce.http.metrics import REGISTRY, MetricsRegistry, RouteMetrics, bearer_matches

__all__ = ["REGISTRY", "MetricsRegistry", "RouteMetrics", "bearer_matches", "metrics_router"]


def metrics_router(
    path: str = "/coalesce/metrics",
    *,
    registry: MetricsRegistry | None = None,
    token: str | None = None,
    include_in_schema: bool = False,
) -> APIRouter:
    """A router serving `registry` (default: `REGISTRY`) as JSON and Prometheus text.

    `token`, if given, is required as `Authorization: Bearer <token>` (compared in constant
    time); without it the metrics are public, like most `/metrics` endpoints behind a
    private network. The routes stay out of the OpenAPI schema unless `include_in_schema`.
    """
    if not path.startswith("/"):
        raise ConfigurationError(f"metrics path must start with '/', not {path!r}")
    source = REGISTRY if registry is None else registry
    path = path.rstrip("/") or "/"
    router = APIRouter()

    def refused(request: Request) -> Response | None:
        if token is None or bearer_matches(request.headers.get("authorization"), token):
            return None
        return JSONResponse(
            {"detail": "missing or wrong bearer token"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    async def as_json_or_text(request: Request) -> Response:
        denied = refused(request)
        if denied is not None:
            return denied
        if request.query_params.get("format") == "prometheus":
            return prometheus_response(source)
        return JSONResponse(source.snapshot())

    async def as_text(request: Request) -> Response:
        denied = refused(request)
        return denied if denied is not None else prometheus_response(source)

    router.add_api_route(
        path, as_json_or_text, methods=["GET"], include_in_schema=include_in_schema
    )
    router.add_api_route(
        path.rstrip("/") + "/prometheus",
        as_text,
        methods=["GET"],
        include_in_schema=include_in_schema,
    )
    return router


def prometheus_response(registry: MetricsRegistry) -> Response:
    return PlainTextResponse(
        registry.prometheus(), media_type="text/plain; version=0.0.4; charset=utf-8"
    )
