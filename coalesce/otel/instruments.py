"""The OpenTelemetry side of `coalesce.otel`: the record a flight's callers share, spans, metrics.

Imported by `coalesce.otel.instrument()` only (it imports `opentelemetry`). The core talks to
one `Tracing` object through a handful of calls, each on the miss path:

* `coalesce.flight`, for every flight: `Tracing.flight(key)` makes the flight's `FlightTrace`
  in the leader caller's context (the computation's parent); the leader runs its step inside
  `FlightTrace.enter()` and calls `finish()` once the flight has left the flights' table;
  each follower counts itself in at joining and calls `followed()` once it has the outcome.
* `coalesce.decorators`, in the leader's step: `traced` / `atraced` wrap the function so that
  its run is the computation span.
* `coalesce.batch.lead`, in a batch's leader: `traced_batch` wraps the function so that each
  run is one computation span of the batch.
* `coalesce.stores.redis.lease`: `announce` (a leader on Redis: how to publish its span's
  traceparent) and `remote_leader` (a waiter: the traceparent of the other process's leader).

The leader's step and the flight's record meet through a context variable (`_current`): the
step runs in the leader's thread or task, inside `enter()`, and the lease code and the wrapper
run in that same context.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context  # type: ignore[import-not-found,unused-ignore]
from opentelemetry import metrics, trace  # type: ignore[import-not-found,unused-ignore]
from opentelemetry.metrics import CallbackOptions, Histogram, Observation  # type: ignore[import-not-found,unused-ignore]
from opentelemetry.trace import Link, Span, SpanContext, Status, StatusCode  # type: ignore[import-not-found,unused-ignore]
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator  # type: ignore[import-not-found,unused-ignore]

from coalesce import __version__
from coalesce.entry import STORE_FAILED, Entry

if TYPE_CHECKING:
    from coalesce.cache import Cache
    from coalesce.decorators import Policy

__all__ = ["FlightTrace", "Tracing"]

_perf = time.perf_counter
_PROPAGATOR = TraceContextTextMapPropagator()

#: The record of the flight whose leader's step runs in this context (see the module doc).
_current: ContextVar[FlightTrace | None] = ContextVar("coalesce_flight_trace", default=None)

#: Observable counters: (instrument name, `Stats` field, description).
_COUNTERS = (
    ("coalesce.hits", "hits", "Fresh entries served."),
    ("coalesce.stale", "stale", "Stale entries served while one caller refreshed them."),
    ("coalesce.misses", "misses", "Calls that found no usable entry."),
    ("coalesce.coalesced", "coalesced", "Misses that received another caller's computation."),
    ("coalesce.computations", "computations", "Times the function itself ran."),
    ("coalesce.errors", "errors", "Computations that raised."),
)


def traceparent(span_context: SpanContext) -> str | None:
    """The W3C `traceparent` of a sampled span context, else None (nothing worth linking)."""
    if not span_context.is_valid or not span_context.trace_flags.sampled:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(
        carrier, context=trace.set_span_in_context(trace.NonRecordingSpan(span_context))
    )
    return carrier.get("traceparent")


def span_context_of(text: str) -> SpanContext | None:
    """The (remote) span context of a `traceparent`, or None when it does not parse."""
    context = _PROPAGATOR.extract({"traceparent": text})
    span_context = trace.get_current_span(context).get_span_context()
    return span_context if span_context.is_valid else None


def _status(cache: Cache, previous: Entry | None, refresh: bool) -> str:
    """`coalesce.cache` of a computation: why it runs."""
    if refresh:
        return "refresh"
    if previous is None or previous is STORE_FAILED:
        return "miss"
    now = cache.clock()
    return "stale" if previous.fresh_until <= now < previous.stale_until else "miss"


class FlightTrace:
    """What the callers of one in-process flight share for tracing.

    Made when the flight is created, in the leader caller's context (`parent`, `started`).
    `followers` is bumped by each follower under the flights' table lock and read by `finish`
    after the flight has left the table, when it is final. `name`, `namespace`, `status`,
    `span`, `remote` and `announce` are written by the leader's step only (its thread or task),
    before the outcome is published; followers read them after it (`followed`).
    """

    __slots__ = (
        "announce",
        "done",
        "followers",
        "key",
        "name",
        "namespace",
        "parent",
        "remote",
        "span",
        "started",
        "status",
        "tracing",
    )

    def __init__(self, tracing: Tracing, key: str) -> None:
        self.tracing = tracing
        self.key = key
        self.parent = otel_context.get_current()
        self.started = time.time_ns()
        self.followers = 0
        self.name = ""  # coalesce.function: set by `Tracing.traced` when the leader starts
        self.namespace = ""
        self.status = "miss"
        self.span: Span | None = None  # the computation's (or the remote wait's) span
        self.remote: SpanContext | None = None  # another process's leader this one waited for
        self.announce: Callable[[str], None] | None = None  # a Redis leader: publish traceparent
        self.done = False  # `finish` ran

    def attributes(self, status: str) -> dict[str, Any]:
        return {"coalesce.key": self.key, "coalesce.function": self.name, "coalesce.cache": status}

    # -- called by coalesce.flight ----------------------------------------------------------

    def enter(self) -> Token[FlightTrace | None]:
        """The leader's step begins in this context."""
        return _current.set(self)

    @staticmethod
    def leave(token: Token[FlightTrace | None]) -> None:
        _current.reset(token)

    def finish(self, error: BaseException | None = None) -> None:
        """The flight has left the table (the leader's step raised `error`): end the
        computation's span, or record the leader's wait for another process. Once; never
        raises."""
        if self.done:
            return
        self.done = True
        with contextlib.suppress(Exception):
            span = self.span
            if span is None and self.remote is not None:
                span = self.span = self.tracing.tracer.start_span(
                    f"coalesce wait {self.name}".rstrip(),
                    context=self.parent,
                    links=[Link(self.remote)],
                    attributes=self.attributes("coalesced"),
                    start_time=self.started,
                )
                if error is not None:  # the other process's leader failed, say
                    _failed(span, error)
            if span is not None:
                span.set_attribute("coalesce.followers", self.followers)
                span.end()

    def followed(self, joined: int, error: BaseException | None) -> None:
        """A follower that joined at `joined` (ns) has the outcome: its wait span, linked to
        the computation (the leader's span, and the other process's leader's). Never raises."""
        with contextlib.suppress(Exception):
            contexts = [self.remote]
            if self.span is not None:
                contexts.insert(0, self.span.get_span_context())
            links = [Link(context) for context in contexts if context and context.is_valid]
            span = self.tracing.tracer.start_span(
                f"coalesce wait {self.name}".rstrip(),
                links=links,
                attributes=self.attributes("coalesced"),
                start_time=joined,
            )
            if error is not None:
                _failed(span, error)
            span.end()

    # -- called by the leader's step ----------------------------------------------------------

    def start(self) -> Span:
        """The computation's span, started (and announced to other processes on Redis).
        Never raises: a failing SDK must not fail the computation."""
        try:
            span = self.span = self.tracing.tracer.start_span(
                f"coalesce compute {self.name}".rstrip(),
                context=self.parent,
                attributes=self.attributes(self.status),
            )
        except Exception:
            span = self.span = trace.INVALID_SPAN
        if self.announce is not None:
            with contextlib.suppress(Exception):
                text = traceparent(span.get_span_context())
                if text is not None:
                    self.announce(text)
        return span


def _failed(span: Span, error: BaseException) -> None:
    """Record `error` on `span`, status ERROR (never raises)."""
    with contextlib.suppress(Exception):
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))


class Tracing:
    """One `instrument()` call: its tracer, its instruments, the caches it reports."""

    def __init__(
        self, tracer_provider: Any, meter_provider: Any, caches: Iterable[Cache] | None
    ) -> None:
        self.tracer = trace.get_tracer("coalesce", __version__, tracer_provider)
        meter = metrics.get_meter("coalesce", __version__, meter_provider)
        self.caches = None if caches is None else tuple(caches)
        self.closed = False
        self.duration = meter.create_histogram(
            "coalesce.compute.duration", unit="s", description="Seconds spent in computations."
        )
        for name, field, text in _COUNTERS:
            meter.create_observable_counter(
                name, callbacks=[self._observer(field)], unit="{call}", description=text
            )

    def close(self) -> None:
        """Replaced or uninstrumented: report nothing more (OpenTelemetry cannot unregister
        an instrument)."""
        self.closed = True

    # -- metrics -----------------------------------------------------------------------------

    def _observer(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterator[Observation]:
            if self.closed:
                return
            for cache in self._caches():
                for function, counts in cache.stats().items():
                    attributes = {
                        "coalesce.function": function,
                        "coalesce.namespace": cache.namespace,
                    }
                    yield Observation(counts[field], attributes)

        return observe

    def _caches(self) -> Iterable[Cache]:
        if self.caches is not None:
            return self.caches
        from coalesce.cache import _all_caches  # every live cache of the process

        return list(_all_caches)

    # -- coalesce.flight ---------------------------------------------------------------------

    def flight(self, key: str) -> FlightTrace:
        """The record of a new flight of `key`, made in its leader caller's context."""
        return FlightTrace(self, key)

    # -- coalesce.decorators: the leader's step ------------------------------------------------

    def _record(
        self, cache: Cache, policy: Policy, key: str, previous: Entry | None, refresh: bool
    ) -> FlightTrace | None:
        record = _current.get()
        if record is None or record.key != key or record.span is not None:
            return None  # not led through a traced flight (instrumented meanwhile)
        record.name = policy.stats_name
        record.namespace = cache.namespace
        record.status = _status(cache, previous, refresh)
        return record

    def traced(
        self, cache: Cache, policy: Policy, key: str, previous: Entry | None, refresh: bool
    ) -> Callable[..., Any]:
        """`policy.fn` for the leader of `key`: its run is the computation span."""
        fn = policy.fn
        record = self._record(cache, policy, key, previous, refresh)
        if record is None:
            return fn
        duration = self.duration

        def computation(*args: Any, **kwargs: Any) -> Any:
            with _computing(record, duration):
                return fn(*args, **kwargs)

        return computation

    def atraced(
        self, cache: Cache, policy: Policy, key: str, previous: Entry | None, refresh: bool
    ) -> Callable[..., Awaitable[Any]]:
        """`traced` for coroutine functions."""
        fn = policy.fn
        record = self._record(cache, policy, key, previous, refresh)
        if record is None:
            return fn
        duration = self.duration

        async def computation(*args: Any, **kwargs: Any) -> Any:
            with _computing(record, duration):
                return await fn(*args, **kwargs)

        return computation

    # -- coalesce.batch.lead: a batch's computation --------------------------------------------

    def traced_batch(self, cache: Cache, policy: Policy) -> Callable[[list[Any]], Any]:
        """`policy.fn` of a `cached_many` function for one batch's leader: each run is a
        `coalesce compute` span (`coalesce.batch.ids`: the ids it computes), a child of the
        current context (the leading caller's, or its batch task's)."""
        fn = policy.fn
        name = f"coalesce compute {policy.stats_name}"
        attributes = {"coalesce.function": policy.stats_name, "coalesce.cache": "miss"}
        metric = {"coalesce.function": policy.stats_name, "coalesce.namespace": cache.namespace}

        def span(ids: list[Any]) -> contextlib.AbstractContextManager[None]:
            return _batch_computing(
                self, name, {**attributes, "coalesce.batch.ids": len(ids)}, metric
            )

        if inspect.iscoroutinefunction(fn):

            async def acomputation(ids: list[Any]) -> Any:
                with span(ids):
                    return await fn(ids)

            return acomputation

        def computation(ids: list[Any]) -> Any:
            with span(ids):
                return fn(ids)

        return computation

    # -- coalesce.stores.redis.lease -----------------------------------------------------------

    @staticmethod
    def announce(publish: Callable[[str], None]) -> None:
        """A leader on a shared store is about to compute: `publish(traceparent)` once its
        span exists (only when sampled: an unsampled span is nothing to link to)."""
        record = _current.get()
        if record is not None:
            record.announce = publish

    @staticmethod
    def wants_remote() -> bool:
        """Whether the step running here would use another process's leader's traceparent."""
        record = _current.get()
        return record is not None and record.remote is None and record.span is None

    @staticmethod
    def remote_leader(text: str) -> None:
        """This step waited for another process's leader, whose span is `text` (traceparent)."""
        record = _current.get()
        if record is not None and record.remote is None:
            with contextlib.suppress(Exception):  # a foreign value: no link
                record.remote = span_context_of(text)


@contextlib.contextmanager
def _computing(record: FlightTrace, duration: Histogram) -> Iterator[None]:
    """The function's run as the computation span (current meanwhile), and its duration."""
    metric = {"coalesce.function": record.name, "coalesce.namespace": record.namespace}
    with _running(record.start(), duration, metric, end=False):
        yield


@contextlib.contextmanager
def _batch_computing(
    tracing: Tracing, name: str, attributes: dict[str, Any], metric: dict[str, str]
) -> Iterator[None]:
    """A batch's run as its computation span (current meanwhile, ended with it), and its
    duration. A failing SDK does not fail the computation."""
    try:
        span = tracing.tracer.start_span(name, attributes=attributes)
    except Exception:
        span = trace.INVALID_SPAN
    with _running(span, tracing.duration, metric, end=True):
        yield


@contextlib.contextmanager
def _running(span: Span, duration: Histogram, metric: dict[str, str], end: bool) -> Iterator[None]:
    """A run with `span` current: an exception recorded on it, the seconds in `duration`."""
    with trace.use_span(
        span, end_on_exit=end, record_exception=False, set_status_on_exception=False
    ):
        started = _perf()
        try:
            yield
        except BaseException as exc:
            _failed(span, exc)
            raise
        finally:
            with contextlib.suppress(Exception):
                duration.record(_perf() - started, metric)
