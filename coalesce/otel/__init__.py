"""OpenTelemetry for coalesce (the `otel` extra): a span per computation, metrics per function.

    import coalesce.otel

    coalesce.otel.instrument()  # the global tracer and meter providers
    coalesce.otel.instrument(tracer_provider=tp, meter_provider=mp)  # or these
    coalesce.otel.uninstrument()

Switched on by the application, like OpenTelemetry's own instrumentors, and not merely because
`opentelemetry-api` can be imported: the API comes with many packages (FastAPI depends on it),
and an application that never configured tracing should get neither spans nor their cost. The
providers default to the global ones, looked up lazily, so `instrument()` may run before the
SDK is configured.

What is recorded (tracer and meter named `coalesce`):

* `coalesce compute <function>`: one span per computation, in the process that computes (on
  Redis, the one holding the lease), from the start of the function's run to the end of the
  leader's step (the entry stored, the waiters woken). Its parent is the context of the
  caller that led; it is the current span while the function runs, so the function's own
  spans (a database query) are its children. Attributes: `coalesce.key`,
  `coalesce.function` (key template, else qualified name), `coalesce.cache` (`miss`,
  `stale`: refreshing a stale entry, `refresh`: early refresh), `coalesce.followers` (the
  callers of this process that joined the computation). An exception is recorded on it with
  status ERROR.
* `coalesce wait <function>`: a caller that received another caller's computation instead of
  computing (`coalesce.cache` = `coalesced`), linked to the computation's span: in the same
  process through the flight, and across processes on Redis through the lease's sibling key
  `ns:{key}:trace`, where the leader writes its span's W3C `traceparent` (see
  `coalesce.stores.redis.lease`).
* Metrics: observable counters `coalesce.hits`, `coalesce.stale`, `coalesce.misses`,
  `coalesce.coalesced`, `coalesce.computations`, `coalesce.errors`, read at collection time
  from the counters coalesce keeps anyway (`Cache.stats()`), so a hit pays nothing; and the
  histogram `coalesce.compute.duration` (seconds). Attributes: `coalesce.function`,
  `coalesce.namespace`.

How the core finds it: `coalesce.otel.hook.tracing` is None until `instrument()`. The miss
path reads it once per flight (`coalesce.flight`), per leader (`coalesce.decorators`) and per
Redis lease (`coalesce.stores.redis.lease`); hits never do. Nothing here imports
`opentelemetry` before `instrument()` is called.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from coalesce.otel import hook

if TYPE_CHECKING:
    from coalesce.cache import Cache

__all__ = ["instrument", "uninstrument"]


def instrument(
    *,
    tracer_provider: Any = None,
    meter_provider: Any = None,
    caches: Iterable[Cache] | None = None,
) -> None:
    """Trace computations and export coalesce's counters through OpenTelemetry.

    `tracer_provider` / `meter_provider`: OpenTelemetry providers (default: the global ones).
    `caches`: the caches whose counters the metrics report (default: every cache of the
    process, read at each collection). Calling it again replaces the previous setup.

    Raises `MissingDependencyError` when `opentelemetry-api` is not installed.
    """
    try:
        from coalesce.otel.instruments import Tracing
    except ImportError as exc:
        from coalesce.errors import MissingDependencyError

        raise MissingDependencyError(
            f"coalesce.otel needs opentelemetry-api ({exc}), which the 'otel' extra "
            "installs: pip install 'coalesce-cache[otel]'"
        ) from None
    previous, hook.tracing = hook.tracing, Tracing(tracer_provider, meter_provider, caches)
    if previous is not None:
        previous.close()


def uninstrument() -> None:
    """Stop tracing and reporting (computations in flight finish their spans)."""
    previous, hook.tracing = hook.tracing, None
    if previous is not None:
        previous.close()
