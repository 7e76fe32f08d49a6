"""coalesce.otel for `cached_many`: one `coalesce compute <function>` span per batch.

Through the SDK's in-memory exporter (the `telemetry` fixture of test_otel); concurrency is
real (threads, tasks, two caches meeting on a real redis-server), ordered with gates.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

import pytest
from opentelemetry.trace import StatusCode
from test_batch import BOUND, Boom, await_until, run_thread, wait_until
from test_otel import BrokenTracerProvider, Telemetry, ids, telemetry

import coalesce.otel
from coalesce import Cache

__all__ = ["telemetry"]  # the fixture, used by name


def _attributes(telemetry: Telemetry) -> list[dict[str, Any]]:
    return [dict(span.attributes or {}) for span in telemetry.computations()]


def test_each_sync_batch_is_one_span_with_its_number_of_ids(telemetry: Telemetry) -> None:
    cache = Cache("memory://")

    @cache.cached_many(key="user:{}", ttl=60)
    def users(ids: list[int]) -> dict[int, int]:
        return {i: i for i in ids}

    assert users([1, 2, 3]) == {1: 1, 2: 2, 3: 3}
    assert users([3, 4]) == {3: 3, 4: 4}
    assert users([1, 2, 3, 4]) == {1: 1, 2: 2, 3: 3, 4: 4}  # all hits: no span
    assert _attributes(telemetry) == [
        {"coalesce.function": "user:{}", "coalesce.batch.ids": 3, "coalesce.cache": "miss"},
        {"coalesce.function": "user:{}", "coalesce.batch.ids": 1, "coalesce.cache": "miss"},
    ]
    duration = telemetry.metrics()["coalesce.compute.duration"]["user:{}"]
    assert duration[0] == 2  # two computations timed


async def test_an_async_batch_span_is_the_callers_child_and_the_functions_parent(
    telemetry: Telemetry,
) -> None:
    cache = Cache("memory://")
    tracer = telemetry.tracer_provider.get_tracer("test")

    @cache.cached_many(key="user:{}", ttl=60)
    async def users(ids: list[int]) -> dict[int, int]:
        with tracer.start_as_current_span("query"):
            return {i: i for i in ids}

    with tracer.start_as_current_span("request"):
        assert await users([1, 2]) == {1: 1, 2: 2}
    [computed] = telemetry.computations()
    [query] = telemetry.spans("query")
    [request] = telemetry.spans("request")
    assert computed.parent is not None and query.parent is not None
    assert (computed.parent.trace_id, computed.parent.span_id) == ids(request)
    assert (query.parent.trace_id, query.parent.span_id) == ids(computed)
    assert computed.attributes is not None and computed.attributes["coalesce.batch.ids"] == 2


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_error_is_recorded_on_the_batch_span(telemetry: Telemetry, kind: str) -> None:
    cache = Cache("memory://")

    def failing(ids: list[int]) -> dict[int, int]:
        raise Boom("down")

    async def afailing(ids: list[int]) -> dict[int, int]:
        raise Boom("down")

    users = cache.cached_many(key="user:{}")(failing if kind == "sync" else afailing)
    with pytest.raises(Boom):
        if kind == "sync":
            users([1, 2])
        else:
            asyncio.run(users([1, 2]))
    [computed] = telemetry.computations()
    assert computed.status.status_code is StatusCode.ERROR
    assert [event.name for event in computed.events] == ["exception"]
    assert computed.attributes is not None and computed.attributes["coalesce.batch.ids"] == 2


def test_overlapping_threads_make_one_span_per_batch(telemetry: Telemetry) -> None:
    cache = Cache("memory://")
    entered, release = threading.Event(), threading.Event()

    @cache.cached_many(key="user:{}", ttl=60)
    def users(ids: list[int]) -> dict[int, int]:
        if 1 in ids:
            entered.set()
            assert release.wait(BOUND)
        return {i: i for i in ids}

    first, _ = run_thread(lambda: users([1, 2, 3]))
    assert entered.wait(BOUND)
    second, out = run_thread(lambda: users([2, 3, 4]))
    wait_until(lambda: users.stats()["misses"] == 6)
    release.set()
    first.join(BOUND)
    second.join(BOUND)
    assert out == [{2: 2, 3: 3, 4: 4}]
    counts = sorted(a["coalesce.batch.ids"] for a in _attributes(telemetry))
    assert counts == [1, 3]  # ids 2 and 3 computed once, in the first batch


def test_batches_on_redis_are_traced_in_the_process_that_computes(
    telemetry: Telemetry, redis_caches: Any
) -> None:
    a, b = redis_caches(), redis_caches()
    entered, release = threading.Event(), threading.Event()

    def slow(ids: list[int]) -> dict[int, str]:
        entered.set()
        assert release.wait(BOUND)
        return {i: f"a{i}" for i in ids}

    users_a = a.cached_many(key="user:{}", ttl=60)(slow)
    first, _ = run_thread(lambda: users_a([1, 2]))
    assert entered.wait(BOUND)

    async def main() -> dict[int, str]:
        @b.cached_many(key="user:{}", ttl=60)
        async def users_b(ids: list[int]) -> dict[int, str]:
            return {i: f"b{i}" for i in ids}

        task = asyncio.create_task(users_b([2, 3]))
        await await_until(lambda: b.store.counts["waits"] == 1)  # type: ignore[attr-defined]
        release.set()
        return await task

    assert asyncio.run(main()) == {2: "a2", 3: "b3"}
    first.join(BOUND)
    assert sorted(a["coalesce.batch.ids"] for a in _attributes(telemetry)) == [1, 2]


def test_without_instrumentation_the_function_is_called_directly() -> None:
    """Not instrumented: no wrapper between the batch driver and the function."""
    coalesce.otel.uninstrument()
    cache = Cache("memory://")
    callers: list[str] = []

    @cache.cached_many(key="user:{}")
    def users(ids: list[int]) -> dict[int, int]:
        callers.append(sys._getframe(1).f_code.co_name)
        return {i: i for i in ids}

    recorded = Telemetry()
    coalesce.otel.instrument(tracer_provider=recorded.tracer_provider)
    try:
        users([1])
    finally:
        coalesce.otel.uninstrument()
    users([2])
    assert len(recorded.computations()) == 1
    assert callers[0] != callers[1]  # the instrumented call went through a wrapper
    assert callers[1] == "compute"  # the driver's own step, nothing in between


def test_a_failing_tracer_does_not_fail_batches() -> None:
    coalesce.otel.instrument(tracer_provider=BrokenTracerProvider())
    try:
        cache = Cache("memory://")

        @cache.cached_many(key="user:{}")
        def users(ids: list[int]) -> dict[int, int]:
            return {i: i for i in ids}

        assert users([1, 2]) == {1: 1, 2: 2}
        assert users.stats()["batches"] == 1
    finally:
        coalesce.otel.uninstrument()
