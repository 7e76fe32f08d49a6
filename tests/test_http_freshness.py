"""The freshness options (issue 11) on the HTTP edges: FastAPI, Starlette, Flask and Django
views get `stale_if_error`, `timeout`, `early_refresh` and `jitter` from the core decorator
their responses are cached by, and `stale-if-error` in their Cache-Control.

Expiry moves by an injected clock (`Cache(clock=...)`), through each framework's own test
client: real requests, no mocks.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import coalesce.fastapi
import coalesce.starlette
from coalesce import Cache, CoalesceTimeout, ConfigurationError
from coalesce.http.metrics import MetricsRegistry


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Source:
    def __init__(self) -> None:
        self.calls = 0
        self.failing = False

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.failing:
            raise ConnectionError("the database is down")
        return {"version": self.calls}


def fastapi_app(cache: Cache, source: Source, **options: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/report")
    @coalesce.fastapi.cached(ttl=10, cache=cache, registry=MetricsRegistry(), **options)
    def report() -> dict[str, Any]:
        return source()

    return app


def test_fastapi_stale_if_error_serves_the_last_response_and_says_so() -> None:
    clock, source = FakeClock(), Source()
    cache = Cache(clock=clock)
    client = TestClient(fastapi_app(cache, source, stale_if_error=120))
    first = client.get("/report")
    assert first.json() == {"version": 1}
    assert first.headers["cache-control"] == "public, max-age=10, stale-if-error=120"
    source.failing = True
    clock.now += 11
    for _ in range(20):
        again = client.get("/report")
        assert again.status_code == 200 and again.json() == {"version": 1}
    assert source.calls == 2  # one failed refresh; retried after a second, not per request
    clock.now += 120
    with pytest.raises(ConnectionError):
        client.get("/report")
    cache.close()


def test_fastapi_timeout_raises_coalesce_timeout_and_the_response_lands() -> None:
    cache = Cache()
    release = threading.Event()
    calls = 0
    app = FastAPI()

    @app.get("/slow")
    @coalesce.fastapi.cached(ttl=60, timeout=0.05, cache=cache, registry=MetricsRegistry())
    def slow() -> dict[str, int]:
        nonlocal calls
        calls += 1
        release.wait(10)
        return {"calls": calls}

    with TestClient(app) as client:  # one event loop for all requests, as on a server
        with pytest.raises(CoalesceTimeout):
            client.get("/slow")
        release.set()
        deadline = time.monotonic() + 5
        while not cache.keys() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.get("/slow").headers["x-cache"] == "HIT"
    assert calls == 1
    cache.close()


def test_bad_freshness_options_are_refused_when_decorating() -> None:
    with pytest.raises(ConfigurationError, match="stale_if_error"):
        coalesce.fastapi.cached(ttl=10, stale_if_error=-1)(lambda: None)
    with pytest.raises(ConfigurationError, match="jitter"):

        @coalesce.starlette.cached(ttl=10, jitter=2)
        async def view(request: Request) -> Response:
            return JSONResponse({})


def test_starlette_early_refresh_refreshes_a_hot_view_in_the_background() -> None:
    clock, calls = FakeClock(), []
    cache = Cache(clock=clock)
    refreshed = threading.Event()

    @coalesce.starlette.cached(
        ttl=10, early_refresh=10.0, stale_if_error=30, cache=cache, registry=MetricsRegistry()
    )
    async def hot(request: Request) -> Response:
        time.sleep(0.05)  # a measurable compute time for XFetch to scale by
        calls.append(1)
        if len(calls) > 1:
            refreshed.set()
        return JSONResponse({"n": len(calls)})

    client = TestClient(Starlette(routes=[Route("/hot", hot)]))
    first = client.get("/hot")
    assert first.json() == {"n": 1}
    assert "stale-if-error=30" in first.headers["cache-control"]
    # XFetch drawn once per entry: the refresh moment is at least one computation (~0.05 s)
    # before the expiry, so 0.01 s before it the entry refreshes; the refreshed entry's
    # moment is already past with probability exp(-(10 - 0.05) / 0.5): one refresh, not two
    clock.now += 9.99
    for _ in range(20):
        assert client.get("/hot").json() in ({"n": 1}, {"n": 2})
        if refreshed.is_set():
            break
    assert refreshed.wait(5)
    deadline = time.monotonic() + 5
    while client.get("/hot").json() != {"n": 2} and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.get("/hot").json() == {"n": 2}
    assert len(calls) == 2
    cache.close()


def test_fastapi_early_refresh_refreshes_a_hot_route_in_the_background() -> None:
    """A route without dependencies would answer hits before FastAPI's handling (the
    shortcut); with early_refresh its hits go through the core, which refreshes early."""
    clock, calls = FakeClock(), []
    cache = Cache(clock=clock)
    app = FastAPI()

    @app.get("/hot")
    @coalesce.fastapi.cached(ttl=10, early_refresh=10.0, cache=cache, registry=MetricsRegistry())
    def hot() -> dict[str, int]:
        time.sleep(0.05)  # a measurable compute time for XFetch to scale by
        calls.append(1)
        return {"n": len(calls)}

    with TestClient(app) as client:
        assert client.get("/hot").json() == {"n": 1}
        assert client.get("/hot").headers["x-cache"] == "HIT"
        clock.now += 9.99  # as above: one early refresh, not a second one
        deadline = time.monotonic() + 5
        while len(calls) < 2 and time.monotonic() < deadline:
            assert client.get("/hot").status_code == 200
            time.sleep(0.01)
        while client.get("/hot").json() != {"n": 2} and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.get("/hot").json() == {"n": 2}
    assert len(calls) == 2
    cache.close()
