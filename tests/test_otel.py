"""coalesce.otel: spans and metrics through the OpenTelemetry SDK's in-memory exporter/reader.

Concurrency is real (asyncio tasks, threads, a second OS process on a real redis-server);
computations are held at a gate until every caller has joined, so the counts are exact.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from opentelemetry import trace as trace_api
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import coalesce
import coalesce.otel
import coalesce.otel.hook
from coalesce import Cache, MissingDependencyError
from coalesce.stores.redis.lease import TRACE_LEASES
from coalesce.testing import FakeClock

ROOT = Path(__file__).resolve().parent.parent
BARRIER = 30.0  # seconds a barrier waits before the test fails loudly


class Telemetry:
    """An SDK tracer and meter provider, recording in memory, instrumented for one test."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self, prefix: str = "coalesce") -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name.startswith(prefix)]

    def computations(self) -> list[ReadableSpan]:
        return self.spans("coalesce compute")

    def waits(self) -> list[ReadableSpan]:
        return self.spans("coalesce wait")

    def metrics(self) -> dict[str, dict[str, Any]]:
        """{instrument: {function: value (counters) or (count, sum) (histogram)}}."""
        found: dict[str, dict[str, Any]] = {}
        data = self.reader.get_metrics_data()
        assert data is not None
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        function = str(point.attributes["coalesce.function"])
                        value = getattr(point, "value", None)
                        if value is None:
                            value = (point.count, point.sum)  # type: ignore[union-attr]
                        found.setdefault(metric.name, {})[function] = value
        return found


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    recorded = Telemetry()
    coalesce.otel.instrument(
        tracer_provider=recorded.tracer_provider, meter_provider=recorded.meter_provider
    )
    yield recorded
    coalesce.otel.uninstrument()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """A barrier (not a timed assertion): poll until `condition`, failing after `BARRIER`."""
    deadline = time.monotonic() + BARRIER
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.002)


def linked(span: ReadableSpan) -> set[tuple[int, int]]:
    return {(link.context.trace_id, link.context.span_id) for link in span.links}


def ids(span: ReadableSpan) -> tuple[int, int]:
    assert span.context is not None
    return span.context.trace_id, span.context.span_id


# -- in one process ----------------------------------------------------------------------------


async def test_fifty_async_callers_one_span_and_linked_waits(telemetry: Telemetry) -> None:
    cache = Cache("memory://")
    gate = asyncio.Event()
    tracer = telemetry.tracer_provider.get_tracer("test")

    @cache.cached(ttl=60, key="user:{user_id}")
    async def load(user_id: int) -> dict[str, int]:
        await gate.wait()
        return {"id": user_id}

    async def caller() -> dict[str, int]:
        with tracer.start_as_current_span("request"):
            return await load(7)

    tasks = [asyncio.create_task(caller()) for _ in range(50)]
    while load.stats()["misses"] < 50:  # each caller joins the flight right after counting
        await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*tasks) == [{"id": 7}] * 50

    [computed] = telemetry.computations()
    assert computed.attributes == {
        "coalesce.key": "coalesce:user:7",
        "coalesce.function": "user:{user_id}",
        "coalesce.cache": "miss",
        "coalesce.followers": 49,
    }
    assert computed.status.status_code is StatusCode.UNSET
    requests = {ids(s) for s in telemetry.spans("request")}
    assert computed.parent is not None
    assert (computed.parent.trace_id, computed.parent.span_id) in requests  # the leader's call
    waits = telemetry.waits()
    assert len(waits) == 49
    for wait in waits:
        assert linked(wait) == {ids(computed)}
        assert wait.attributes is not None and wait.attributes["coalesce.cache"] == "coalesced"
        assert wait.parent is not None
        assert (wait.parent.trace_id, wait.parent.span_id) in requests  # the follower's call
    assert await load(7) == {"id": 7}  # a hit: no span
    assert len(telemetry.spans()) == 50


def test_threads_one_span_followers_linked(telemetry: Telemetry) -> None:
    cache = Cache("memory://")
    gate = threading.Event()

    @cache.cached(ttl=60)
    def report(day: str) -> str:
        gate.wait(BARRIER)
        return day.upper()

    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(report("mon"))) for _ in range(20)]
    for thread in threads:
        thread.start()

    def joined() -> bool:
        flight = cache.flights._flights.get(cache.prefix + report.key("mon"))
        return flight is not None and flight.trace is not None and flight.trace.followers == 19

    wait_until(joined, "19 threads following the leader")
    gate.set()
    for thread in threads:
        thread.join(BARRIER)
    assert results == ["MON"] * 20

    [computed] = telemetry.computations()
    assert computed.attributes is not None
    assert computed.attributes["coalesce.followers"] == 19
    assert computed.attributes["coalesce.function"] == f"{__name__}.{report.__qualname__}"
    waits = telemetry.waits()
    assert len(waits) == 19
    assert all(linked(wait) == {ids(computed)} for wait in waits)


def test_function_spans_are_children_of_the_computation(telemetry: Telemetry) -> None:
    cache = Cache("memory://")
    tracer = telemetry.tracer_provider.get_tracer("test")

    @cache.cached(ttl=60)
    def query(n: int) -> int:
        with tracer.start_as_current_span("SELECT"):
            return n

    assert query(1) == 1
    [computed] = telemetry.computations()
    [select] = telemetry.exporter.get_finished_spans()[:1]
    assert select.name == "SELECT"
    assert select.parent is not None and select.parent.span_id == ids(computed)[1]


async def test_error_recorded_on_leader_and_waits(telemetry: Telemetry) -> None:
    cache = Cache("memory://")
    gate = asyncio.Event()

    @cache.cached(ttl=60, key="broken:{n}")
    async def broken(n: int) -> int:
        await gate.wait()
        raise ValueError(f"no row {n}")

    tasks = [asyncio.create_task(broken(3)) for _ in range(5)]
    while broken.stats()["misses"] < 5:
        await asyncio.sleep(0)
    gate.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(o, ValueError) for o in outcomes)

    [computed] = telemetry.computations()
    assert computed.status.status_code is StatusCode.ERROR
    assert computed.status.description == "ValueError: no row 3"
    [event] = computed.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "ValueError"
    waits = telemetry.waits()
    assert len(waits) == 4
    assert all(w.status.status_code is StatusCode.ERROR for w in waits)
    assert telemetry.metrics()["coalesce.errors"]["broken:{n}"] == 1


def test_stale_refresh_and_early_refresh_statuses(telemetry: Telemetry) -> None:
    clock = FakeClock()
    cache = Cache("memory://", clock=clock)

    @cache.cached(ttl=10, stale_ttl=100, key="page:{n}")
    def page(n: int) -> int:
        return n

    @cache.cached(ttl=10, early_refresh=True, key="hot:{n}")
    def hot(n: int) -> int:
        time.sleep(0.01)  # a compute time for XFetch to scale by
        return n

    page(1)
    hot(1)
    clock.advance(10 - 1e-6)  # hot: past any moment drawn (at least one computation early)
    hot(1)
    clock.advance(10)  # page: stale, served, refreshed in the background
    page(1)
    cache.close()  # waits for the background refreshes
    statuses = {
        (s.attributes["coalesce.function"], s.attributes["coalesce.cache"])  # type: ignore[index]
        for s in telemetry.computations()
    }
    assert statuses == {
        ("page:{n}", "miss"),
        ("hot:{n}", "miss"),
        ("hot:{n}", "refresh"),
        ("page:{n}", "stale"),
    }
    assert len(telemetry.computations()) == 4


def test_metrics_through_the_meter_provider(telemetry: Telemetry) -> None:
    cache = Cache("memory://")

    @cache.cached(ttl=60, key="item:{n}")
    def item(n: int) -> int:
        return n

    for n in (1, 2, 1, 1, 2):
        item(n)
    metrics = telemetry.metrics()
    assert metrics["coalesce.hits"]["item:{n}"] == 3
    assert metrics["coalesce.misses"]["item:{n}"] == 2
    assert metrics["coalesce.computations"]["item:{n}"] == 2
    assert metrics["coalesce.errors"]["item:{n}"] == 0
    assert metrics["coalesce.stale"]["item:{n}"] == 0
    assert metrics["coalesce.coalesced"]["item:{n}"] == 0
    count, seconds = metrics["coalesce.compute.duration"]["item:{n}"]
    assert count == 2 and seconds >= 0


def test_get_or_set_is_traced(telemetry: Telemetry) -> None:
    cache = Cache("memory://")
    assert cache.get_or_set("answer:1", lambda: 42, ttl=60) == 42
    [computed] = telemetry.computations()
    assert computed.attributes is not None
    assert computed.attributes["coalesce.key"] == "coalesce:answer:1"


def test_uninstrument_stops_spans() -> None:
    recorded = Telemetry()
    coalesce.otel.instrument(tracer_provider=recorded.tracer_provider)
    coalesce.otel.uninstrument()
    assert coalesce.otel.hook.tracing is None
    cache = Cache("memory://")
    assert cache.get_or_set("k:1", lambda: 1) == 1
    assert recorded.spans() == []


class BrokenTracer(trace_api.NoOpTracer):
    """A tracer whose every span fails to start: instrumentation must not fail the call."""

    def start_span(self, *args: Any, **kwargs: Any) -> trace_api.Span:
        raise RuntimeError("exporter misconfigured")


class BrokenTracerProvider(trace_api.NoOpTracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> trace_api.Tracer:
        return BrokenTracer()


def test_a_failing_tracer_does_not_fail_computations() -> None:
    coalesce.otel.instrument(tracer_provider=BrokenTracerProvider())
    try:
        cache = Cache("memory://")
        gate = threading.Event()

        @cache.cached(ttl=60)
        def value(n: int) -> int:
            gate.wait(BARRIER)
            return n

        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(value(4))) for _ in range(3)]
        for thread in threads:
            thread.start()
        wait_until(lambda: value.stats()["misses"] == 3, "three callers")
        gate.set()
        for thread in threads:
            thread.join(BARRIER)
        assert results == [4, 4, 4]
        assert value.stats()["computations"] == 1
    finally:
        coalesce.otel.uninstrument()


# -- across processes on Redis --------------------------------------------------------------------

LEADER = r"""
import json, os, sys, time
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
import coalesce.otel
from coalesce import Cache

url, namespace, workdir = sys.argv[1:4]
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
coalesce.otel.instrument(tracer_provider=provider)
cache = Cache(url, namespace=namespace)

@cache.cached(ttl=60, key="shared:{n}")
def shared(n):
    open(os.path.join(workdir, "computing"), "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(workdir, "go")):
        if time.monotonic() > deadline:
            sys.exit("no go")
        time.sleep(0.005)
    return n * 2

value = shared(21)
[span] = [s for s in exporter.get_finished_spans() if s.name.startswith("coalesce compute")]
print(json.dumps({"value": value, "trace_id": span.context.trace_id,
                  "span_id": span.context.span_id, "stats": shared.stats()}))
cache.close()
"""


def test_waiter_in_another_process_links_to_the_leader_span(
    telemetry: Telemetry, redis_url: str, unique_namespace: str, tmp_path: Path
) -> None:
    """The leader is a second OS process; this one waits on the lease and is woken through
    Redis pub/sub: its wait span links to the leader's computation span (read from Redis)."""
    leader = subprocess.Popen(
        [sys.executable, "-c", LEADER, redis_url, unique_namespace, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        wait_until(lambda: (tmp_path / "computing").exists(), "the leader process computing")
        cache = Cache(redis_url, namespace=unique_namespace)
        ran: list[int] = []

        @cache.cached(ttl=60, key="shared:{n}")
        def shared(n: int) -> int:
            ran.append(n)
            return -1

        got: list[int] = []
        caller = threading.Thread(target=lambda: got.append(shared(21)))
        caller.start()
        wait_until(lambda: cache.store.counts["waits"] == 1, "this process waiting on the lease")
        (tmp_path / "go").touch()
        caller.join(BARRIER)
        out, err = leader.communicate(timeout=BARRIER)
        assert leader.returncode == 0, err
        cache.close()
    finally:
        if leader.poll() is None:
            leader.kill()
    remote = json.loads(out)
    assert got == [42] and ran == [] and remote["value"] == 42
    assert remote["stats"]["computations"] == 1
    [wait] = telemetry.waits()
    assert linked(wait) == {(remote["trace_id"], remote["span_id"])}
    assert wait.attributes is not None
    assert wait.attributes["coalesce.cache"] == "coalesced"
    assert wait.attributes["coalesce.function"] == "shared:{n}"
    assert telemetry.computations() == []


async def test_async_waiter_on_redis_links_in_and_across_caches(
    telemetry: Telemetry, redis_caches: Callable[..., Cache]
) -> None:
    """Two caches with their own connections and listeners, meeting only in Redis (as two
    processes would): the second's callers wait for the first's lease, woken by its push."""
    first, second = redis_caches(), redis_caches()
    gate = asyncio.Event()

    async def compute(n: int) -> int:
        await gate.wait()
        return n

    one = first.cached(ttl=60, key="k:{n}")(compute)
    other = second.cached(ttl=60, key="k:{n}")(compute)
    leading = asyncio.create_task(one(5))
    while first.store.counts["leads"] < 1:  # type: ignore[attr-defined]
        await asyncio.sleep(0.001)
    waiting = [asyncio.create_task(other(5)) for _ in range(3)]
    while second.store.counts["waits"] < 1:  # type: ignore[attr-defined]
        await asyncio.sleep(0.001)
    gate.set()
    assert await leading == 5 and await asyncio.gather(*waiting) == [5, 5, 5]

    [computed] = telemetry.computations()
    waits = telemetry.waits()
    assert len(waits) == 3  # the second cache's leader (on Redis) and its 2 followers
    by_followers = {s.attributes.get("coalesce.followers"): s for s in waits}  # type: ignore[union-attr]
    remote_wait = by_followers[2]  # the step that waited on the lease
    assert linked(remote_wait) == {ids(computed)}
    for follower in (s for s in waits if s is not remote_wait):
        assert linked(follower) == {ids(remote_wait), ids(computed)}


async def test_a_failed_leader_on_redis_fails_the_linked_wait(
    telemetry: Telemetry, redis_caches: Callable[..., Cache]
) -> None:
    first, second = redis_caches(), redis_caches()
    gate = asyncio.Event()

    async def compute(n: int) -> int:
        await gate.wait()
        raise LookupError(f"no {n}")

    one = first.cached(ttl=60, key="bad:{n}")(compute)
    other = second.cached(ttl=60, key="bad:{n}")(compute)
    leading = asyncio.create_task(one(5))
    while first.store.counts["leads"] < 1:  # type: ignore[attr-defined]
        await asyncio.sleep(0.001)
    waiting = asyncio.create_task(other(5))
    while second.store.counts["waits"] < 1:  # type: ignore[attr-defined]
        await asyncio.sleep(0.001)
    gate.set()
    with pytest.raises(LookupError):
        await leading
    with pytest.raises(coalesce.LeaderFailedError):
        await waiting

    [computed] = telemetry.computations()
    assert computed.status.status_code is StatusCode.ERROR
    [wait] = telemetry.waits()
    assert linked(wait) == {ids(computed)}
    assert wait.status.status_code is StatusCode.ERROR
    assert wait.status.description is not None and "LeaderFailedError" in wait.status.description


def _leader_trace(redis_url: str, key: str) -> tuple[bytes | None, int]:
    """The value and PTTL (ms) of the traceparent key a Redis leader of `key` wrote."""
    raw = redis.Redis.from_url(redis_url)
    try:
        wait_until(lambda: raw.exists(key) == 1, "the leader's traceparent in Redis")
        return raw.get(key), int(raw.pttl(key))
    finally:
        raw.close()


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_leaders_traceparent_on_redis_expires(
    telemetry: Telemetry, redis_caches: Callable[..., Cache], redis_url: str, is_async: bool
) -> None:
    """`ns:{key}:trace` (the traced leader's "<token>|<traceparent>" for waiters elsewhere)
    is deleted by nobody: it expires `TRACE_LEASES` lease times after it was written."""
    cache = redis_caches(lease_ttl=0.5)
    gate = threading.Event()

    def compute(n: int) -> int:
        assert gate.wait(BARRIER)
        return n

    async def acompute(n: int) -> int:
        return await asyncio.to_thread(compute, n)

    leader = cache.cached(ttl=60, key="traced:{n}")(acompute if is_async else compute)
    thread = threading.Thread(
        target=lambda: asyncio.run(leader(1)) if is_async else leader(1), daemon=True
    )
    thread.start()
    try:
        value, pttl = _leader_trace(redis_url, f"{cache.namespace}:{{traced:1}}:trace")
    finally:
        gate.set()
        thread.join(BARRIER)
    assert value is not None and b"|00-" in value  # "<token>|<W3C traceparent>"
    assert 0 < pttl <= 500 * TRACE_LEASES


# -- without OpenTelemetry ---------------------------------------------------------------------

WITHOUT = r"""
import asyncio, sys, threading
sys.modules["opentelemetry"] = None  # not importable, as when it is not installed
import coalesce, coalesce.otel
from coalesce import flight

cache = coalesce.Cache("memory://")
runs = []

@cache.cached(ttl=60)
def f(n):
    runs.append(n)
    return n

@cache.cached(ttl=60)
async def g(n):
    runs.append(n)
    await asyncio.sleep(0.01)
    return n

threads = [threading.Thread(target=f, args=(1,)) for _ in range(10)]
[t.start() for t in threads]
[t.join() for t in threads]
async def main():
    return await asyncio.gather(*[g(2) for _ in range(10)])
assert asyncio.run(main()) == [2] * 10
assert cache.get_or_set("x:1", lambda: 3) == 3
assert coalesce.otel.hook.tracing is None
try:
    coalesce.otel.instrument()
except coalesce.MissingDependencyError as exc:
    print("refused:", exc)
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry") and sys.modules[m])
print("loaded:", loaded, "runs:", sorted(runs))
"""


def test_without_opentelemetry_nothing_is_traced() -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "refused: coalesce.otel needs opentelemetry-api" in done.stdout
    assert "pip install 'coalesce-cache[otel]'" in done.stdout
    assert "loaded: [] runs: [1, 2]" in done.stdout


def test_importing_coalesce_imports_no_opentelemetry() -> None:
    code = textwrap.dedent(
        """
        import sys, coalesce, coalesce.otel
        cache = coalesce.Cache("memory://")
        cache.get_or_set("a:1", lambda: 1)
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_instrument_without_the_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name == "coalesce.otel.instruments":
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # type: ignore[arg-type]
    with pytest.raises(MissingDependencyError, match=r"coalesce-cache\[otel\]"):
        coalesce.otel.instrument()
    assert coalesce.otel.hook.tracing is None


async def test_a_follower_that_times_out_records_its_wait_as_failed(telemetry: Telemetry) -> None:
    cache = Cache("memory://")
    gate = asyncio.Event()

    @cache.cached(ttl=60, timeout=0.01, key="slow:{n}")
    async def slow(n: int) -> int:
        await gate.wait()
        return n

    leader = asyncio.create_task(slow(1))
    while slow.stats()["misses"] < 1:
        await asyncio.sleep(0)
    with pytest.raises(coalesce.CoalesceTimeout):
        await slow(1)  # joins the flight, leaves on its timeout
    gate.set()
    with pytest.raises(coalesce.CoalesceTimeout):
        await leader  # the leader's own caller had the same timeout
    await cache.aclose()
    [wait] = telemetry.waits()
    assert wait.status.status_code is StatusCode.ERROR
    assert wait.status.description is not None and "CoalesceTimeout" in wait.status.description
