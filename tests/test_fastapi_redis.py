"""A cached route on the Redis store: entries shared between "processes" (two caches).

Uses the `redis_server` / `unique_namespace` fixtures of `conftest.py` (a real redis-server
on 127.0.0.1, started by the test-suite).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from coalesce import Cache
from coalesce.errors import BackendError
from coalesce.fastapi import MetricsRegistry, cached


class Site:
    """One application process: its own app and `Cache` on the shared Redis."""

    def __init__(self, url: str, namespace: str) -> None:
        self.cache = Cache(url, namespace=namespace)
        self.calls = 0
        self.app = FastAPI()

        @self.app.get("/items/{item_id}")
        @cached(ttl=60, cache=self.cache, vary=["accept-language"], registry=MetricsRegistry())
        async def item(item_id: int) -> dict[str, object]:
            self.calls += 1
            await asyncio.sleep(0.1)
            return {"id": item_id, "name": "café"}

        self.item = item

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://t")


@pytest.fixture
async def sites(redis_server: object, unique_namespace: str) -> AsyncIterator[tuple[Site, Site]]:
    url = redis_server.url  # type: ignore[attr-defined]
    one, two = Site(url, unique_namespace), Site(url, unique_namespace)
    yield one, two
    for site in (one, two):
        await site.cache.aclose()
        site.cache.close()


async def test_cached_route_on_redis_is_shared_between_processes(
    sites: tuple[Site, Site],
) -> None:
    one, two = sites
    async with one.client() as a, two.client() as b:
        miss = await a.get("/items/1")
        hit_here = await a.get("/items/1")
        hit_there = await b.get("/items/1")
        again_there = await b.get("/items/1")  # answered before FastAPI's request handling
    assert miss.headers["x-cache"] == "MISS"
    assert hit_here.headers["x-cache"] == "HIT"
    assert hit_there.headers["x-cache"] == "HIT"
    assert miss.content == hit_here.content == hit_there.content
    assert miss.json() == {"id": 1, "name": "café"}
    assert hit_there.headers["etag"] == miss.headers["etag"]  # the same on every machine
    assert hit_there.headers["content-type"] == "application/json"
    assert one.calls == 1 and two.calls == 0
    same = ("x-cache", "etag", "content-type", "content-length", "vary")
    assert [again_there.headers[h] for h in same] == [hit_there.headers[h] for h in same]
    assert again_there.content == hit_there.content


async def test_concurrent_cold_requests_on_redis_compute_once(sites: tuple[Site, Site]) -> None:
    one, two = sites
    async with one.client() as a, two.client() as b:
        responses = await asyncio.gather(
            *(a.get("/items/2") for _ in range(10)), *(b.get("/items/2") for _ in range(10))
        )
    assert {r.content for r in responses} == {b'{"id":2,"name":"caf\xc3\xa9"}'}
    assert one.calls + two.calls == 1
    assert sorted(r.headers["x-cache"] for r in responses).count("MISS") == 1


async def test_invalidation_on_redis_reaches_every_process(sites: tuple[Site, Site]) -> None:
    one, two = sites
    async with one.client() as a, two.client() as b:
        await a.get("/items/3", headers={"accept-language": "en"})
        await a.get("/items/3", headers={"accept-language": "fr"})
        assert await two.item.invalidate(item_id=3)  # this process served nothing yet
        again = await b.get("/items/3", headers={"accept-language": "fr"})
    assert again.headers["x-cache"] == "MISS"


def unreachable_redis() -> str:
    """A Redis URL on a free loopback port where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


async def test_client_no_cache_with_redis_down_is_computed_not_a_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = Cache(unreachable_redis())  # fails open: a failing store reads as a miss
    calls = 0
    app = FastAPI()

    @app.get("/fresh")
    @cached(ttl=5, cache=cache, honor_client_no_cache=True, registry=MetricsRegistry())
    async def fresh() -> dict[str, int]:
        nonlocal calls
        calls += 1
        return {"n": calls}

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        with pytest.raises(BackendError):
            await cache.ainvalidate("anything")
        with caplog.at_level(logging.WARNING, logger="coalesce.fastapi"):
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                plain = await c.get("/fresh")
                reloads = [await c.get("/fresh", headers={"cache-control": "no-cache"})]
                reloads.append(await c.get("/fresh", headers={"pragma": "no-cache"}))
    finally:
        await cache.aclose()
        cache.close()
    assert plain.status_code == 200 and plain.headers["x-cache"] == "MISS"
    assert [(r.status_code, r.headers["x-cache"]) for r in reloads] == [(200, "BYPASS")] * 2
    assert [r.json() for r in reloads] == [{"n": 2}, {"n": 3}]
    warnings = [r for r in caplog.records if r.name == "coalesce.fastapi"]
    assert len(warnings) == 1 and "no-cache" in warnings[0].getMessage()


async def test_client_no_cache_with_redis_down_fails_closed_when_asked() -> None:
    cache = Cache(unreachable_redis(), on_backend_error="raise")
    app = FastAPI()

    @app.get("/fresh")
    @cached(ttl=5, cache=cache, honor_client_no_cache=True, registry=MetricsRegistry())
    async def fresh() -> dict[str, int]:
        return {"n": 1}

    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            with pytest.raises(BackendError):
                await c.get("/fresh", headers={"cache-control": "no-cache"})
    finally:
        await cache.aclose()
        cache.close()
