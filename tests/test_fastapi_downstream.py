"""What caches downstream (browsers, nginx, CDNs) are told: httpx against the ASGI app.

* `max-age` is the entry's TTL and `Age` its real age: a downstream cache adds `Age` to its
  own clock (RFC 9111 4.2.3), so its copy stays fresh exactly as long as the entry does; an
  entry served stale is stale downstream too.
* The handler's own `Cache-Control` wins: kept in the entry, sent as written on every
  response of it (304s included). `no-store`, `private` and cookies are never stored nor
  handed to another request of the flight; `no-cache` is stored here and revalidated there.
* A per-user response never says `public`, `s-maxage` or `proxy-revalidate`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from coalesce import Cache
from coalesce.fastapi import MetricsRegistry, cached, coalesced
from coalesce.fastapi.render import own_response
from coalesce.http import cache_directives

ALICE = {"authorization": "Bearer alice"}
BOB = {"authorization": "Bearer bob"}


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def control(response: httpx.Response) -> dict[str, str | None]:
    return cache_directives(response.headers.get("cache-control"))


def age_entry(cache: Cache, seconds: float) -> None:
    """Make the route's only entry `seconds` older: the memory store hands out the very
    dict it keeps, and `Age` is computed from its `created`."""
    (key,) = cache.keys()
    entry = cache._read(cache.prefix + key)
    assert entry is not None
    entry.value["created"] -= seconds


class Arrivals:
    """Pure ASGI middleware counting requests as they enter: once counted, a request joins
    the computation in flight without awaiting anything else."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.n = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.n += 1
        await self.app(scope, receive, send)

    async def burst(self, path: str, n: int) -> list[httpx.Response]:
        """`n` concurrent GETs of `path`."""
        async with client(self) as c:
            return list(await asyncio.gather(*(c.get(path) for _ in range(n))))


def nothing() -> None:
    """A dependency: a route with one is served by FastAPI's full path on hits too."""


# ---------------------------------------------------------------------------------------
# item 6: max-age is the TTL, Age the entry's age


@pytest.mark.parametrize("dependency", [False, True], ids=["hit-shortcut", "full-path"])
async def test_max_age_is_the_ttl_and_age_the_entrys_age(dependency: bool) -> None:
    """At age 5 of ttl 8: `Age: 5`, `max-age=8`, so a downstream cache keeps it 3 more
    seconds, as coalesce does (it used to say `max-age=3`: 3 - 5, stale at once)."""
    cache = Cache()
    app = FastAPI()
    calls: list[int] = []

    dependencies = [Depends(nothing)] if dependency else []

    @app.api_route("/item", methods=["GET", "HEAD"], dependencies=dependencies)
    @cached(ttl=8, cache=cache, vary=["accept-language"], registry=MetricsRegistry())
    async def item() -> dict[str, int]:
        calls.append(1)
        return {"n": len(calls)}

    async with client(app) as c:
        miss = await c.get("/item")
        age_entry(cache, 5.2)
        hit = await c.get("/item")
        again = await c.get("/item")
        etag = hit.headers["etag"]
        not_modified = await c.get("/item", headers={"if-none-match": etag})
        head = await c.head("/item")
    assert len(calls) == 1
    assert (miss.headers["cache-control"], miss.headers["age"]) == ("public, max-age=8", "0")
    for response in (hit, again, not_modified, head):
        assert response.headers["x-cache"] == "HIT"
        assert response.headers["cache-control"] == "public, max-age=8"
        assert response.headers["age"] == "5"
        assert response.headers["vary"] == miss.headers["vary"]  # Accept-Language, ...
        assert response.headers["etag"] == etag
    assert not_modified.status_code == 304 and not_modified.content == b""
    assert miss.headers["vary"].startswith("Accept-Language")
    # downstream: fresh while max-age > Age + its own time (RFC 9111 4.2): 3 s, as here
    assert int(control(hit)["max-age"] or 0) - int(hit.headers["age"]) == 3


async def test_an_entry_served_stale_is_stale_downstream_with_stale_while_revalidate() -> None:
    cache = Cache()
    app = FastAPI()
    calls: list[int] = []

    @app.get("/item")
    @cached(ttl=0.5, stale_ttl=30, cache=cache, registry=MetricsRegistry())
    async def item() -> dict[str, int]:
        calls.append(1)
        return {"n": len(calls)}

    async with client(app) as c:
        miss = await c.get("/item")
        etag = miss.headers["etag"]
        await asyncio.sleep(0.6)
        stale = await c.get("/item", headers={"if-none-match": etag})
    expected = "public, max-age=1, stale-while-revalidate=30"  # 0.5 s rounded up
    assert miss.headers["cache-control"] == expected
    assert stale.headers["x-cache"] == "STALE" and stale.status_code == 304
    assert stale.headers["cache-control"] == expected
    assert stale.headers["etag"] == etag
    # Age >= max-age: already stale downstream, which may serve it while it revalidates
    # for as long as coalesce may (RFC 5861 3)
    assert int(stale.headers["age"]) >= 1


# ---------------------------------------------------------------------------------------
# item 5: the handler's own Cache-Control wins


def handler_app(
    cache: Cache, how: str, value: str, *, burst: int = 1, store: bool = True
) -> tuple[Arrivals, list[int]]:
    """A route whose handler writes `Cache-Control: value` on the injected `Response`
    (`how="injected"`) or on the `Response` it returns (`"returned"`, `"text"`), cached
    (`store`) or only coalesced. Its computations first wait (bounded) for `burst` requests
    to have arrived, so that a burst overlaps the first one."""
    app = FastAPI()
    arrivals = Arrivals(app)
    calls: list[int] = []
    options: dict[str, Any] = {"ttl": 30} if store else {}

    @app.get("/r")
    @(cached if store else coalesced)(cache=cache, registry=MetricsRegistry(), **options)
    async def route(response: Response) -> Any:
        calls.append(1)
        body = {"n": len(calls)}
        deadline = time.monotonic() + 10
        while arrivals.n < burst and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if burst > 1:
            await asyncio.sleep(0.2)
        if how == "returned":
            return JSONResponse(body, headers={"Cache-Control": value})
        if how == "text":
            return PlainTextResponse(str(body), headers={"cache-control": value})
        response.headers["Cache-Control"] = value
        return body

    return arrivals, calls


@pytest.mark.parametrize("how", ["injected", "returned", "text"])
@pytest.mark.parametrize(
    "value",
    ["no-cache", "max-age=0, must-revalidate", "public, max-age=5, s-maxage=600"],
)
async def test_the_handlers_cache_control_is_sent_as_written(how: str, value: str) -> None:
    """Stored by coalesce (the developer asked for server-side caching), and downstream
    told exactly what the handler said: no `public, max-age` of ours in its place."""
    cache = Cache()
    app, calls = handler_app(cache, how, value)
    async with client(app) as c:
        miss = await c.get("/r")
        hit = await c.get("/r")
        not_modified = await c.get("/r", headers={"if-none-match": miss.headers["etag"]})
    assert len(calls) == 1 and len(cache.keys()) == 1
    assert [r.headers["x-cache"] for r in (miss, hit, not_modified)] == ["MISS", "HIT", "HIT"]
    assert not_modified.status_code == 304
    for response in (miss, hit, not_modified):
        assert response.headers.get_list("cache-control") == [value]
        assert "age" in response.headers and "etag" in response.headers


@pytest.mark.parametrize("value", ["no-store", "No-Store", "private, max-age=60"])
async def test_no_store_and_private_are_never_stored_nor_handed_to_the_flight(
    value: str,
) -> None:
    """Five requests overlap one computation that says `no-store` (or `private`): each
    computes for itself, and each response says what its handler said (they used to get
    the first one's body as COALESCED, without any Cache-Control)."""
    cache = Cache()
    app, calls = handler_app(cache, "injected", value, burst=5)
    responses = await app.burst("/r", 5)
    assert len(calls) == 5
    assert sorted(r.json()["n"] for r in responses) == [1, 2, 3, 4, 5]
    statuses = sorted(r.headers["x-cache"] for r in responses)
    assert statuses == ["BYPASS"] * 4 + ["MISS"]  # BYPASS: computed for itself
    assert all(r.headers.get_list("cache-control") == [value] for r in responses)
    assert cache.keys() == []


async def test_a_coalesced_route_sends_the_handlers_cache_control_to_the_flight() -> None:
    cache = Cache()
    app, calls = handler_app(cache, "injected", "max-age=5", burst=4, store=False)
    responses = await app.burst("/r", 4)
    assert len(calls) == 1
    assert sorted(r.headers["x-cache"] for r in responses) == ["COALESCED"] * 3 + ["MISS"]
    assert all(r.headers.get_list("cache-control") == ["max-age=5"] for r in responses)
    assert all("age" not in r.headers for r in responses)  # nothing kept, nothing aged


async def test_a_coalesced_route_never_hands_a_no_store_response_to_the_flight() -> None:
    cache = Cache()
    app, calls = handler_app(cache, "injected", "no-store", burst=4, store=False)
    responses = await app.burst("/r", 4)
    assert len(calls) == 4
    assert "COALESCED" not in {r.headers["x-cache"] for r in responses}


async def test_expires_and_pragma_from_the_handler() -> None:
    """An `Expires` without Cache-Control is the handler's freshness: kept, repeated on a
    304 (RFC 9110 15.4.5), and no `max-age` of ours overrides it (RFC 9111 5.3). `Pragma`
    means nothing in a response (RFC 9111 5.4): sent as written, next to our Cache-Control."""
    cache = Cache()
    app = FastAPI()
    expires = "Wed, 21 Oct 2099 07:28:00 GMT"

    @app.get("/expires")
    @cached(ttl=30, cache=cache, registry=MetricsRegistry())
    async def with_expires(response: Response) -> dict[str, str]:
        response.headers["Expires"] = expires
        response.headers["Content-Location"] = "/expires/en"
        return {"ok": "yes"}

    @app.get("/pragma")
    @cached(ttl=30, cache=cache, registry=MetricsRegistry())
    async def with_pragma(response: Response) -> dict[str, str]:
        response.headers["Pragma"] = "no-cache"
        return {"ok": "yes"}

    async with client(app) as c:
        miss = await c.get("/expires")
        hit = await c.get("/expires")
        not_modified = await c.get("/expires", headers={"if-none-match": miss.headers["etag"]})
        pragma = [await c.get("/pragma"), await c.get("/pragma")]
    assert not_modified.status_code == 304
    for response in (miss, hit, not_modified):
        assert "cache-control" not in response.headers
        assert response.headers["expires"] == expires
        assert response.headers["content-location"] == "/expires/en"
        assert "age" in response.headers
    assert [r.headers["x-cache"] for r in pragma] == ["MISS", "HIT"]
    assert all(r.headers["pragma"] == "no-cache" for r in pragma)
    assert all(r.headers["cache-control"] == "public, max-age=30" for r in pragma)


async def test_the_handlers_vary_is_kept_and_repeated_on_304() -> None:
    cache = Cache()
    app = FastAPI()

    @app.get("/v")
    @cached(ttl=30, cache=cache, vary=["accept-language"], registry=MetricsRegistry())
    async def v(response: Response) -> dict[str, str]:
        response.headers["Vary"] = "Accept-Encoding"
        return {"ok": "yes"}

    async with client(app) as c:
        miss = await c.get("/v")
        not_modified = await c.get("/v", headers={"if-none-match": miss.headers["etag"]})
    for response in (miss, not_modified):
        handlers, ours = response.headers.get_list("vary")
        assert handlers == "Accept-Encoding" and ours.startswith("Accept-Language")


@pytest.mark.parametrize(
    ("header", "stored", "sent"),
    [
        ({"Cache-Control": "max-age=5"}, True, "max-age=5"),
        ({"Cache-Control": "no-store"}, False, "no-store"),
    ],
)
async def test_a_cached_http_exceptions_cache_control(
    header: dict[str, str], stored: bool, sent: str
) -> None:
    cache = Cache()
    app = FastAPI()
    calls: list[int] = []

    @app.get("/gone")
    @cached(ttl=30, cache=cache, cache_4xx=True, registry=MetricsRegistry())
    async def gone() -> None:
        calls.append(1)
        raise HTTPException(404, "gone", headers=header)

    async with client(app) as c:
        responses = [await c.get("/gone"), await c.get("/gone")]
    assert all(r.status_code == 404 for r in responses)
    assert all(r.headers.get_list("cache-control") == [sent] for r in responses)
    assert len(calls) == (1 if stored else 2)
    assert len(cache.keys()) == (1 if stored else 0)


# ---------------------------------------------------------------------------------------
# item 4: a per-user entry is private


def per_user_app(cache: Cache, handler_control: str | None) -> tuple[FastAPI, list[str]]:
    app = FastAPI()
    calls: list[str] = []

    @app.get("/me")
    @cached(ttl=60, cache=cache, vary=["authorization"], registry=MetricsRegistry())
    async def me(request: Request, response: Response) -> dict[str, str]:
        who = request.headers.get("authorization", "anonymous")
        calls.append(who)
        if handler_control is not None:
            response.headers["Cache-Control"] = handler_control
        return {"user": who}

    return app, calls


@pytest.mark.parametrize(
    ("handler_control", "sent"),
    [
        (None, "private, max-age=60"),
        ("public, max-age=30, s-maxage=300, proxy-revalidate", "private, max-age=30"),
        ("no-cache, s-maxage=300", "private, no-cache"),
    ],
)
async def test_a_per_user_entry_is_private_whatever_the_handler_says(
    handler_control: str | None, sent: str
) -> None:
    cache = Cache()
    app, calls = per_user_app(cache, handler_control)
    async with client(app) as c:
        miss = await c.get("/me", headers=ALICE)
        hit = await c.get("/me", headers=ALICE)
        etag = {"if-none-match": miss.headers["etag"]}
        not_modified = await c.get("/me", headers={**ALICE, **etag})
        bob = await c.get("/me", headers=BOB)
    assert calls == ["Bearer alice", "Bearer bob"]
    assert hit.json() == {"user": "Bearer alice"} and bob.json() == {"user": "Bearer bob"}
    assert not_modified.status_code == 304
    for response in (miss, hit, not_modified, bob):
        assert response.headers.get_list("cache-control") == [sent]
        assert "authorization" in response.headers["vary"].lower()


async def test_a_per_user_handler_saying_private_is_never_stored() -> None:
    cache = Cache()
    app, calls = per_user_app(cache, "private, max-age=10")
    async with client(app) as c:
        responses = [await c.get("/me", headers=ALICE) for _ in range(2)]
    assert calls == ["Bearer alice"] * 2 and cache.keys() == []
    assert all(r.headers["cache-control"] == "private, max-age=10" for r in responses)


def test_own_response_of_a_per_user_request_is_private() -> None:
    """The response of the request that ran the handler, when it is not stored (a cookie
    set, a 5xx): per user, never `public` nor `s-maxage`."""
    response = JSONResponse({}, headers={"cache-control": "public, max-age=60, s-maxage=9"})
    response.set_cookie("session", "alice")
    assert own_response(response, private=True) is response
    assert response.headers["x-cache"] == "MISS"
    assert response.headers.getlist("cache-control") == ["private, max-age=60"]
    plain = own_response(JSONResponse({}, status_code=503), private=True)
    assert plain.headers["cache-control"] == "private"
    shared = own_response(JSONResponse({}, headers={"cache-control": "public"}), private=False)
    assert shared.headers["cache-control"] == "public"


async def test_a_per_user_response_setting_a_cookie_is_private() -> None:
    cache = Cache()
    app = FastAPI()

    @app.get("/login")
    @cached(ttl=60, cache=cache, vary=["authorization"], registry=MetricsRegistry())
    async def login(response: Response) -> dict[str, str]:
        response.set_cookie("session", "alice")
        response.headers["Cache-Control"] = "public, max-age=60, s-maxage=600"
        return {"ok": "yes"}

    async with client(app) as c:
        response = await c.get("/login", headers=ALICE)
    assert response.headers["x-cache"] == "MISS" and cache.keys() == []
    assert response.headers["cache-control"] == "private, max-age=60"
