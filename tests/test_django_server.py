"""`coalesce.django.cached` behind a real uvicorn process serving Django's ASGI application
(the views and settings of `tests/test_django.py`), on a free port of 127.0.0.1, over TCP.

Under ASGI Django runs sync views one at a time in one thread, so concurrency here is the
async view's: tasks of the server's event loop sharing one run of it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import test_django
from django.core.asgi import get_asgi_application

TESTS = Path(__file__).resolve().parent

# What `python -m uvicorn test_django_server:application` serves (in its own process).
test_django.GATE["hold_for"] = 20  # /aslow/... answers once 20 requests for its path arrived
application = get_asgi_application()


@pytest.fixture(scope="module")
def base(uvicorn_process: Callable[[str, Path], Any]) -> str:
    return str(uvicorn_process("test_django_server:application", TESTS).url)


async def test_async_view_on_uvicorn_computes_once(base: str) -> None:
    limits = httpx.Limits(max_connections=20)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        responses = await asyncio.gather(*(client.get("/aslow/tcp/") for _ in range(20)))
        runs = (await client.get("/calls/")).json()
        after = await client.get("/aslow/tcp/")
    assert runs["aslow"] == 1
    assert [r.status_code for r in responses] == [200] * 20
    statuses = Counter(r.headers["x-cache"] for r in responses)
    assert statuses["MISS"] == 1 and statuses["COALESCED"] + statuses["HIT"] == 19
    assert after.headers["x-cache"] == "HIT" and after.json() == {"name": "tcp", "async": True}


async def test_users_etag_and_invalidate_on_uvicorn(base: str) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        for _ in range(3):
            alice = await client.get("/me/", headers={"authorization": "alice"})
            bob = await client.get("/me/", headers={"authorization": "bob"})
            mallory = await client.get("/whoami/", headers={"authorization": "mallory"})
            assert alice.json() == {"user": "alice"} and bob.json() == {"user": "bob"}
            assert mallory.json() == {"user": "mallory"}
            assert mallory.headers["x-cache"] == "BYPASS"
        assert (await client.get("/calls/")).json()["me"] == 2

        first = await client.get("/items/5/")
        again = await client.get("/items/5/", headers={"if-none-match": first.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        assert (await client.get("/drop/5/")).json() == {"removed": True}
        fresh = await client.get("/items/5/")
        assert fresh.headers["x-cache"] == "MISS" and fresh.json()["run"] == 2
