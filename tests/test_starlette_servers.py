"""`coalesce.starlette.cached` behind a real uvicorn server process on 127.0.0.1 (over TCP:
the `uvicorn_process` fixture serves this module's `app`), and on real Redis servers (the
`redis_caches` fixture: two caches meet only in Redis, like two processes)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from test_starlette import App

from coalesce import Cache

TESTS = Path(__file__).resolve().parent


async def calls(request: Request) -> Response:
    return JSONResponse(dict(served.calls))


async def drop(request: Request) -> Response:
    removed = await served.item.invalidate(item_id=request.path_params["item_id"])
    return JSONResponse({"removed": removed})


# What `python -m uvicorn test_starlette_servers:app` serves (in its own process).
served = App()
served.hold_for = 30  # /slow answers once 30 requests for its path arrived
served.app.router.routes += [Route("/calls", calls), Route("/drop/{item_id:int}", drop)]
app = served.asgi


@pytest.fixture(scope="module")
def base(uvicorn_process: Callable[[str, Path], Any]) -> str:
    return str(uvicorn_process("test_starlette_servers:app", TESTS).url)


async def test_uvicorn_concurrent_requests_compute_once(base: str) -> None:
    limits = httpx.Limits(max_connections=30)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        responses = await asyncio.gather(*(client.get("/slow/tcp") for _ in range(30)))
        after = await client.get("/slow/tcp")
        runs = (await client.get("/calls")).json()
    assert runs["slow"] == 1
    assert Counter(r.headers["x-cache"] for r in responses) == {"MISS": 1, "COALESCED": 29}
    assert after.headers["x-cache"] == "HIT" and after.json() == {"name": "tcp"}


async def test_uvicorn_two_users_etag_and_invalidate(base: str) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        for _ in range(3):
            alice = await client.get("/me", headers={"authorization": "alice"})
            bob = await client.get("/me", headers={"authorization": "bob"})
            stranger = await client.get("/whoami", headers={"authorization": "mallory"})
            assert alice.json() == {"user": "alice"} and bob.json() == {"user": "bob"}
            assert stranger.json() == {"user": "mallory"}
            assert stranger.headers["x-cache"] == "BYPASS"
        assert (await client.get("/calls")).json()["me"] == 2

        first = await client.get("/items/5")
        again = await client.get("/items/5", headers={"if-none-match": first.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        assert (await client.get("/drop/5")).json() == {"removed": True}
        fresh = await client.get("/items/5")
        assert fresh.headers["x-cache"] == "MISS" and fresh.json()["run"] == 2


async def test_redis_two_users_and_a_fleet_of_two(redis_caches: Callable[..., Cache]) -> None:
    one, two = App(redis_caches()), App(redis_caches())  # two "processes", one Redis
    clients = [
        httpx.AsyncClient(transport=httpx.ASGITransport(app=t.asgi), base_url="http://shop")
        for t in (one, two)
    ]
    try:
        first = await clients[0].get("/items/1?page=2")
        other = await clients[1].get("/items/1?page=2")
        assert (first.headers["x-cache"], other.headers["x-cache"]) == ("MISS", "HIT")
        assert first.content == other.content and first.headers["etag"] == other.headers["etag"]
        assert one.calls["item"] == 1 and two.calls["item"] == 0

        for who in ("alice", "bob", "alice", "bob"):
            for client in clients:
                response = await client.get("/me", headers={"authorization": who})
                assert response.json() == {"user": who}
        assert one.calls["me"] + two.calls["me"] == 2

        assert await two.item.invalidate(item_id=1) is True  # from the other "process"
        assert (await clients[0].get("/items/1?page=2")).headers["x-cache"] == "MISS"
    finally:
        for client in clients:
            await client.aclose()


async def test_redis_concurrent_requests_compute_once(
    redis_caches: Callable[..., Cache],
) -> None:
    target = App(redis_caches())
    target.hold_for = 20
    transport = httpx.ASGITransport(app=target.asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
        responses = await asyncio.gather(*(client.get("/slow/redis") for _ in range(20)))
        after = await client.get("/slow/redis")
    assert target.calls["slow"] == 1
    assert Counter(r.headers["x-cache"] for r in responses) == {"MISS": 1, "COALESCED": 19}
    assert after.headers["x-cache"] == "HIT"
    stored: Any = target.cache.get_entry(target.cache.keys()[0])
    assert stored.value["status"] == 200 and b'"redis"' in stored.value["body"]
