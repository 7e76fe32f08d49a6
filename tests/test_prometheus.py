"""`coalesce.prometheus`: the counters in a real `prometheus_client` registry, as scraped."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import coalesce
from coalesce import Cache
from coalesce.fastapi import MetricsRegistry, cached
from coalesce.prometheus import register


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by name and sorted labels: what Prometheus would read."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_function_counters_are_scraped_with_their_labels() -> None:
    cache = Cache(namespace="shop")
    registry = CollectorRegistry()
    register(caches=[cache], registry=registry)
    started = threading.Event()

    @cache.cached(ttl=60, key="user:{user_id}")
    def load_user(user_id: int) -> int:
        started.set()
        time.sleep(0.2)  # long enough for the other threads to join the computation
        return user_id

    threads = [threading.Thread(target=load_user, args=(1,)) for _ in range(5)]
    threads[0].start()
    assert started.wait(10)
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join(10)
    load_user(1)  # a hit
    samples = scrape(registry)

    def value(name: str, **labels: str) -> float:
        key = tuple(sorted({"namespace": "shop", "function": "user:{user_id}", **labels}.items()))
        return samples[(name, key)]

    assert value("coalesce_hits_total") == 1
    assert value("coalesce_misses_total") == 5
    assert value("coalesce_coalesced_total") == 4
    assert value("coalesce_computations_total") == 1
    assert value("coalesce_errors_total") == 0
    assert value("coalesce_compute_seconds_total") >= 0.2


def test_batch_counters_of_a_cached_many_function() -> None:
    cache = Cache(namespace="shop")
    registry = CollectorRegistry()
    register(caches=[cache], registry=registry)

    @cache.cached_many(ttl=60, key="user:{}")
    def load_users(ids: list[int]) -> dict[int, int]:
        return {i: i * 10 for i in ids}

    assert load_users([1, 2, 3]) == {1: 10, 2: 20, 3: 30}
    assert load_users([2, 3, 4, 5]) == {2: 20, 3: 30, 4: 40, 5: 50}
    samples = scrape(registry)
    labels = (("function", "user:{}"), ("namespace", "shop"))
    assert samples[("coalesce_batches_total", labels)] == 2
    assert samples[("coalesce_batch_ids_total", labels)] == 5  # 1, 2, 3, then 4, 5
    assert samples[("coalesce_hits_total", labels)] == 2


def test_route_counters_of_the_fastapi_edge() -> None:
    cache = Cache()
    routes = MetricsRegistry()
    registry = CollectorRegistry()
    register(caches=[cache], routes=[routes], registry=registry)
    app = FastAPI()

    @app.get("/items/{item_id}")
    @cached(ttl=60, cache=cache, registry=routes)
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    async def requests() -> None:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            for _ in range(3):
                await c.get("/items/1")
            await c.get("/items/1", headers={"authorization": "Bearer x"})

    asyncio.run(requests())
    samples = scrape(registry)
    route = (("route", "/items/{item_id}"),)
    assert samples[("coalesce_http_requests_total", (("cache", "hit"), *route))] == 2
    assert samples[("coalesce_http_requests_total", (("cache", "miss"), *route))] == 1
    assert samples[("coalesce_http_requests_total", (("cache", "bypass"), *route))] == 1
    assert samples[("coalesce_http_computations_total", route)] == 1
    # the edge's handler is a function of the cache too (its `get_or_set` calls, named
    # after the handler), counted once
    function = (("function", f"{__name__}.{item.__qualname__}[http]"),)
    assert samples[("coalesce_computations_total", (*function, ("namespace", "coalesce")))] == 1


def test_the_default_cache_is_read_at_each_scrape() -> None:
    registry = CollectorRegistry()
    collector = register(registry=registry)

    @coalesce.cached(ttl=60, key="prometheus-default:{x}")
    def default(x: int) -> int:
        return x

    labels = (("function", "prometheus-default:{x}"), ("namespace", "coalesce"))
    assert ("coalesce_computations_total", labels) not in scrape(registry)
    default(1)
    default(1)
    assert scrape(registry)[("coalesce_computations_total", labels)] == 1
    registry.unregister(collector)
    assert scrape(registry) == {}


def test_without_prometheus_client_the_extra_is_named() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['prometheus_client'] = None\nimport coalesce.prometheus",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("coalesce.errors.MissingDependencyError")
    assert "pip install 'coalesce-cache[prometheus]'" in last
