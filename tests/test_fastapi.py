"""The FastAPI edge through real HTTP: httpx against the ASGI application.

Every test builds its own app, `Cache` and `MetricsRegistry`, so nothing leaks between them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import httpx
import msgpack
import pytest
from fastapi import (
    APIRouter,
    BackgroundTasks,
    Cookie,
    Depends,
    FastAPI,
    Header,
    HTTPException,
    Query,
    Request,
    Response,
    Security,
)
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import APIKeyHeader, SecurityScopes
from pydantic import BaseModel, field_validator

from coalesce import Cache, ConfigurationError
from coalesce.fastapi import MetricsRegistry, admin_router, cached, coalesced, metrics_router
from coalesce.http import age_seconds, cache_control_value, delta_seconds
from coalesce.keys import escape, is_safe_key

TOKEN = "s3cret-token-for-tests-0123456789"


ORIGIN = "http://test"  # the scheme and host of `client`'s requests: default keys start so


def stored(key: str) -> str:
    """A default key as the core stores it (`/items/...` requested from `client`): as it is
    when safe, else escaped (`coalesce.keys`)."""
    key = ORIGIN + key
    return key if is_safe_key(key) else escape(key)


def of(key: str, handler: Any) -> str:
    """A template route's stored key: the template's key, `@` and the handler's name."""
    return f"{key}@{handler.__module__}.{handler.__qualname__}"


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


class Counter:
    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()

    def bump(self) -> int:
        with self.lock:
            self.n += 1
            return self.n


class CountRequests:
    """Pure ASGI middleware counting requests as they enter: nothing is awaited between here
    and the cached route, so a counted request has joined the computation in flight."""

    def __init__(self, app: Any, counter: Counter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.counter.bump()
        await self.app(scope, receive, send)


async def until(condition: Any, timeout: float = 10.0) -> None:
    """Wait (bounded) until `condition()` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


@pytest.fixture
def cache() -> Iterator[Cache]:
    c = Cache()
    yield c
    c.close()


@pytest.fixture
def registry() -> MetricsRegistry:
    return MetricsRegistry()


# ---------------------------------------------------------------------------------------
# FastAPI sees the handler as it is


class Item(BaseModel):
    id: int
    name: str


async def get_db() -> AsyncIterator[str]:
    yield "session"


api_key = APIKeyHeader(name="x-api-key", auto_error=False)


def build_twin(decorate: bool) -> FastAPI:
    """The same routes, decorated or not: their OpenAPI schemas must be identical."""
    app = FastAPI(title="twin")
    router = APIRouter(prefix="/v1", tags=["items"])
    cache = Cache()

    def maybe(**options: Any) -> Any:
        return cached(ttl=30, cache=cache, **options) if decorate else (lambda fn: fn)

    @app.get("/items/{item_id}", response_model=Item, summary="One item")
    @maybe(vary=["accept-language"])
    async def read_item(
        item_id: int,
        request: Request,
        response: Response,
        background: BackgroundTasks,
        q: Annotated[str | None, Query(max_length=20, description="filter")] = None,
        limit: int = 10,
        db: str = Depends(get_db),
        key: str | None = Security(api_key),
        x_trace: Annotated[str | None, Header()] = None,
        session: Annotated[str | None, Cookie()] = None,
    ) -> Any:
        """Read one item; the docstring becomes the description."""
        return {"id": item_id, "name": "x"}

    @router.get("/things", status_code=201, deprecated=True)
    @maybe()
    def list_things(tags: Annotated[list[str], Query()] = [], page: int = 1) -> list[Item]:  # noqa: B006
        return []

    @router.get("/plain", response_class=PlainTextResponse)
    @maybe(shared=True)
    async def plain(scopes: SecurityScopes) -> str:
        return "hi"

    @app.get("/coalesced/{name}")
    @(coalesced(cache=cache) if decorate else (lambda fn: fn))
    async def coalesced_route(name: str) -> dict[str, str]:
        return {"name": name}

    app.include_router(router)
    return app


def test_openapi_schema_is_identical_to_the_undecorated_twin() -> None:
    plain, decorated = build_twin(False).openapi(), build_twin(True).openapi()
    assert decorated == plain
    params = {p["name"] for p in plain["paths"]["/items/{item_id}"]["get"]["parameters"]}
    assert params == {"item_id", "q", "limit", "x-trace", "session"}
    assert "APIKeyHeader" in plain["components"]["securitySchemes"]


async def test_dependencies_run_on_every_request_hits_included(
    cache: Cache, registry: MetricsRegistry
) -> None:
    app = FastAPI()
    opened, closed, computed = Counter(), Counter(), Counter()

    async def db() -> AsyncIterator[int]:
        n = opened.bump()
        try:
            yield n
        finally:
            closed.bump()

    def auth(x_user: Annotated[str | None, Header()] = None) -> str:
        if x_user != "ok":
            raise HTTPException(403, "no")
        return x_user

    @app.get("/r")
    @cached(ttl=60, cache=cache, registry=registry)
    async def route(session: int = Depends(db), user: str = Depends(auth)) -> dict[str, int]:
        computed.bump()
        return {"session": session}

    async with client(app) as c:
        first = await c.get("/r", headers={"x-user": "ok"})
        second = await c.get("/r", headers={"x-user": "ok"})
        denied = await c.get("/r", headers={"x-user": "bad"})
    assert first.json() == second.json() == {"session": 1}  # the dependency value is no key
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert denied.status_code == 403  # the auth dependency still runs before a hit
    assert computed.n == 1
    assert opened.n == 3 and closed.n == 3


async def test_default_key_is_path_template_plus_sorted_params(
    cache: Cache, registry: MetricsRegistry
) -> None:
    app = FastAPI()
    calls = Counter()

    @app.get("/items/{item_id}")
    @cached(ttl=60, cache=cache, registry=registry)
    async def item(
        item_id: int, request: Request, b: str = "x", a: int | None = None
    ) -> dict[str, Any]:
        calls.bump()
        return {"id": item_id, "a": a, "b": b}

    async with client(app) as c:
        r1 = await c.get("/items/3?a=1&b=y")
        r2 = await c.get("/items/3?b=y&a=1")  # other order: same request
        r3 = await c.get("/items/03?a=01&b=y")  # validated values: same request
        r4 = await c.get("/items/3?a=2&b=y")
        r5 = await c.get("/items/4?a=1&b=y")
        r6 = await c.get("/items/3?a=1&b=y&unknown=1")  # not a parameter: same request
    assert [r.headers["x-cache"] for r in (r1, r2, r3, r4, r5, r6)] == [
        "MISS",
        "HIT",
        "HIT",
        "MISS",
        "MISS",
        "HIT",
    ]
    assert calls.n == 3
    assert item.key(item_id=3, a=1, b="y") == stored("/items/<item_id>?a=1&b=y&item_id=3")
    assert sorted(cache.keys()) == [
        stored("/items/<item_id>?a=1&b=y&item_id=3"),
        stored("/items/<item_id>?a=1&b=y&item_id=4"),
        stored("/items/<item_id>?a=2&b=y&item_id=3"),
    ]


async def test_key_values_are_escaped_so_requests_never_collide(cache: Cache) -> None:
    app = FastAPI()

    @app.get("/s")
    @cached(ttl=60, cache=cache, registry=MetricsRegistry())
    async def search(q: str = "", r: str = "") -> dict[str, str]:
        return {"q": q, "r": r}

    async with client(app) as c:
        one = await c.get("/s", params={"q": "a&r=b"})
        two = await c.get("/s", params={"q": "a", "r": "b"})
        three = await c.get("/s", params={"q": "ü %|?"})
    assert one.json() == {"q": "a&r=b", "r": ""}
    assert two.json() == {"q": "a", "r": "b"}
    assert three.json() == {"q": "ü %|?", "r": ""}
    assert all(r.headers["x-cache"] == "MISS" for r in (one, two, three))
    assert len(cache.keys()) == 3


async def test_escaped_keys_are_stored_read_and_invalidated_under_one_name(
    cache: Cache,
) -> None:
    """A key the core escapes (a value with `%` or a space) is escaped once: the entry is
    stored under `fn.key()`, read from there on hits, and `invalidate` finds it."""
    app = FastAPI()
    calls = Counter()

    @app.get("/s")
    @cached(ttl=60, cache=cache, registry=MetricsRegistry())
    async def search(q: str = "") -> dict[str, int]:
        return {"n": calls.bump()}

    async with client(app) as c:
        first = await c.get("/s", params={"q": "a b%"})
        second = await c.get("/s", params={"q": "a b%"})
        assert cache.keys() == [search.key(q="a b%")]
        assert cache.get_entry(search.key(q="a b%")) is not None
        assert await search.invalidate(q="a b%")
        assert cache.keys() == []
        third = await c.get("/s", params={"q": "a b%"})
    assert (first.json(), second.json(), third.json()) == ({"n": 1}, {"n": 1}, {"n": 2})
    assert second.headers["x-cache"] == "HIT"


async def test_template_keys_and_tags_are_escaped_once_as_the_core_does(cache: Cache) -> None:
    """`key="feed:{name}"` with `a b` is stored as `feed:a%20b`, the form `coalesce keys`
    lists and `coalesce get 'feed:a b'` looks up; its tag likewise."""
    app = FastAPI()
    calls = Counter()

    @app.get("/feed")
    @cached(ttl=60, cache=cache, key="feed:{name}", tags=["user:{name}"])
    async def feed(name: str) -> dict[str, int]:
        return {"n": calls.bump()}

    async with client(app) as c:
        assert (await c.get("/feed", params={"name": "a b%"})).json() == {"n": 1}
        assert cache.keys() == [of("feed:a%20b%25", feed)] == [feed.key(name="a b%")]
        entry = cache.get_entry(of("feed:a%20b%25", feed))
        assert entry is not None and "user:a%20b%25" in entry.tags
        assert cache.invalidate_tag("user:a%20b%25") == 1
        assert (await c.get("/feed", params={"name": "a b%"})).json() == {"n": 2}


async def test_vary_headers_are_part_of_the_key(cache: Cache, registry: MetricsRegistry) -> None:
    app = FastAPI()

    @app.get("/hello")
    @cached(ttl=60, cache=cache, vary=["Accept-Language"], registry=registry)
    async def hello(request: Request) -> dict[str, str]:
        return {"lang": request.headers.get("accept-language", "-")}

    async with client(app) as c:
        en = await c.get("/hello", headers={"accept-language": "en"})
        fr = await c.get("/hello", headers={"accept-language": "fr"})
        en2 = await c.get("/hello", headers={"accept-language": "en"})
        none = await c.get("/hello")
    assert (en.json(), fr.json(), en2.json(), none.json()) == (
        {"lang": "en"},
        {"lang": "fr"},
        {"lang": "en"},
        {"lang": "-"},
    )
    assert [r.headers["x-cache"] for r in (en, fr, en2, none)] == ["MISS", "MISS", "HIT", "MISS"]
    assert en.headers["vary"] == "Accept-Language, Authorization, Cookie"
    assert await hello.invalidate()  # every variant of the request at once
    async with client(app) as c:
        assert (await c.get("/hello", headers={"accept-language": "fr"})).headers[
            "x-cache"
        ] == "MISS"


# ---------------------------------------------------------------------------------------
# safe by default: credentials


def per_user_app(cache: Cache, **options: Any) -> tuple[FastAPI, Counter]:
    app = FastAPI()
    calls = Counter()

    @app.get("/me")
    @cached(ttl=60, cache=cache, registry=MetricsRegistry(), **options)
    async def me(request: Request) -> dict[str, str]:
        calls.bump()
        who = request.headers.get("authorization") or request.headers.get("cookie") or "anon"
        return {"user": who}

    return app, calls


async def test_two_users_never_see_each_others_response(cache: Cache) -> None:
    app, calls = per_user_app(cache)
    async with client(app) as c:
        alice = await c.get("/me", headers={"authorization": "Bearer alice"})
        bob = await c.get("/me", headers={"authorization": "Bearer bob"})
        alice2 = await c.get("/me", headers={"authorization": "Bearer alice"})
        anon = await c.get("/me")
        anon2 = await c.get("/me")
        bob2 = await c.get("/me", headers={"authorization": "Bearer bob"})
    assert alice.json() == alice2.json() == {"user": "Bearer alice"}
    assert bob.json() == bob2.json() == {"user": "Bearer bob"}
    assert anon.json() == anon2.json() == {"user": "anon"}
    assert [r.headers["x-cache"] for r in (alice, bob, alice2, bob2)] == ["BYPASS"] * 4
    assert (anon.headers["x-cache"], anon2.headers["x-cache"]) == ("MISS", "HIT")
    # a bypassed response depends on the credentials: private downstream, and varied
    assert alice.headers["cache-control"] == "private"
    assert alice.headers["vary"] == "Authorization, Cookie"
    assert calls.n == 5
    assert cache.keys() == [stored("/me?")]  # only the anonymous response was stored


async def test_cookies_bypass_the_shared_entry_too(cache: Cache) -> None:
    app, _ = per_user_app(cache)
    async with client(app) as c:
        await c.get("/me")  # the anonymous entry exists
        carol = await c.get("/me", headers={"cookie": "session=carol"})
    assert carol.json() == {"user": "session=carol"}
    assert carol.headers["x-cache"] == "BYPASS"


async def test_vary_on_authorization_caches_per_user_privately(cache: Cache) -> None:
    app, calls = per_user_app(cache, vary=["authorization"])
    async with client(app) as c:
        alice = await c.get("/me", headers={"authorization": "Bearer alice"})
        bob = await c.get("/me", headers={"authorization": "Bearer bob"})
        alice2 = await c.get("/me", headers={"authorization": "Bearer alice"})
        bob2 = await c.get("/me", headers={"authorization": "Bearer bob"})
        cookie = await c.get("/me", headers={"authorization": "Bearer x", "cookie": "a=b"})
    assert alice.json() == alice2.json() == {"user": "Bearer alice"}
    assert bob.json() == bob2.json() == {"user": "Bearer bob"}
    assert [r.headers["x-cache"] for r in (alice, bob, alice2, bob2)] == [
        "MISS",
        "MISS",
        "HIT",
        "HIT",
    ]
    assert alice2.headers["cache-control"].startswith("private, max-age=")
    assert cookie.headers["x-cache"] == "BYPASS"  # the cookie is not in the key
    assert calls.n == 3
    keys = cache.keys()
    assert all("alice" not in k and "bob" not in k for k in keys)  # tokens only as hashes
    digest = hashlib.sha256(b"Bearer alice").hexdigest()[:32]
    assert stored(f"/me?|authorization=#{digest}") in keys


async def test_shared_true_serves_everyone_the_same_entry(cache: Cache) -> None:
    app, calls = per_user_app(cache, shared=True)
    async with client(app) as c:
        alice = await c.get("/me", headers={"authorization": "Bearer alice"})
        bob = await c.get("/me", headers={"authorization": "Bearer bob"})
    assert alice.json() == bob.json() == {"user": "Bearer alice"}
    assert bob.headers["x-cache"] == "HIT"
    assert "vary" not in bob.headers
    assert calls.n == 1


class User(BaseModel):
    id: int


def current_user(authorization: Annotated[str, Header()]) -> User:
    return User(id=int(authorization.rsplit(" ", 1)[1]))


async def test_key_template_is_the_users_identity(cache: Cache) -> None:
    app = FastAPI()

    @app.get("/feed")
    @cached(ttl=60, cache=cache, key="feed:{user.id}", registry=MetricsRegistry())
    async def feed(user: Annotated[User, Depends(current_user)]) -> dict[str, int]:
        return {"for": user.id}

    async with client(app) as c:
        one = await c.get("/feed", headers={"authorization": "Bearer 1"})
        two = await c.get("/feed", headers={"authorization": "Bearer 2"})
        one2 = await c.get("/feed", headers={"authorization": "Bearer 1"})
    assert (one.json(), two.json(), one2.json()) == ({"for": 1}, {"for": 2}, {"for": 1})
    assert one2.headers["x-cache"] == "HIT"
    assert one2.headers["cache-control"].startswith("private")
    assert sorted(cache.keys()) == [of("feed:1", feed), of("feed:2", feed)]
    assert feed.key(user=User(id=7)) == of("feed:7", feed)
    assert await feed.invalidate(user=User(id=1))
    assert sorted(cache.keys()) == [of("feed:2", feed)]


async def test_a_template_without_the_users_identity_bypasses_credentials(cache: Cache) -> None:
    """`key="item:{item_id}"` is the same key for every user: Bob must never receive the
    response made for Alice's `Authorization` (nor her cookie's)."""
    app = FastAPI()
    calls = Counter()

    @app.get("/items/{item_id}")
    @cached(ttl=60, cache=cache, key="item:{item_id}", registry=MetricsRegistry())
    async def item(item_id: int, request: Request) -> dict[str, Any]:
        calls.bump()
        who = request.headers.get("authorization") or request.headers.get("cookie") or "anon"
        return {"id": item_id, "for": who}

    async with client(app) as c:
        alice = await c.get("/items/1", headers={"authorization": "Bearer alice"})
        bob = await c.get("/items/1", headers={"authorization": "Bearer bob"})
        carol = await c.get("/items/1", headers={"cookie": "session=carol"})
        anon = await c.get("/items/1")
        anon2 = await c.get("/items/1")
        bob2 = await c.get("/items/1", headers={"authorization": "Bearer bob"})
    assert alice.json() == {"id": 1, "for": "Bearer alice"}
    assert bob.json() == bob2.json() == {"id": 1, "for": "Bearer bob"}
    assert carol.json() == {"id": 1, "for": "session=carol"}
    assert anon.json() == anon2.json() == {"id": 1, "for": "anon"}
    assert [r.headers["x-cache"] for r in (alice, bob, carol, bob2)] == ["BYPASS"] * 4
    assert (anon.headers["x-cache"], anon2.headers["x-cache"]) == ("MISS", "HIT")
    assert calls.n == 5
    assert cache.keys() == [of("item:1", item)]  # only the anonymous response was stored


async def test_a_template_reading_a_dependency_result_keeps_users_apart(cache: Cache) -> None:
    app = FastAPI()
    calls = Counter()

    @app.get("/items/{item_id}")
    @cached(ttl=60, cache=cache, key="item:{item_id}:{user.id}", registry=MetricsRegistry())
    async def item(item_id: int, user: Annotated[User, Depends(current_user)]) -> dict[str, int]:
        calls.bump()
        return {"id": item_id, "for": user.id}

    async with client(app) as c:
        alice = await c.get("/items/1", headers={"authorization": "Bearer 1"})
        bob = await c.get("/items/1", headers={"authorization": "Bearer 2"})
        alice2 = await c.get("/items/1", headers={"authorization": "Bearer 1"})
        bob2 = await c.get("/items/1", headers={"authorization": "Bearer 2"})
    assert alice.json() == alice2.json() == {"id": 1, "for": 1}
    assert bob.json() == bob2.json() == {"id": 1, "for": 2}
    assert [r.headers["x-cache"] for r in (alice, bob, alice2, bob2)] == [
        "MISS",
        "MISS",
        "HIT",
        "HIT",
    ]
    assert alice2.headers["cache-control"].startswith("private, max-age=")
    assert calls.n == 2
    assert sorted(cache.keys()) == [of("item:1:1", item), of("item:1:2", item)]


async def test_templates_over_credential_parameters_or_vary_count_as_identity(
    cache: Cache,
) -> None:
    app = FastAPI()

    @app.get("/by-token")
    @cached(ttl=60, cache=cache, key="t:{authorization}", registry=MetricsRegistry())
    async def by_token(authorization: Annotated[str, Header()]) -> dict[str, str]:
        return {"for": authorization}

    @app.get("/by-cookie")
    @cached(ttl=60, cache=cache, key="c:{session}", registry=MetricsRegistry())
    async def by_cookie(session: Annotated[str, Cookie()]) -> dict[str, str]:
        return {"for": session}

    @app.get("/by-vary")
    @cached(ttl=60, cache=cache, key="v:all", vary=["authorization"], registry=MetricsRegistry())
    async def by_vary(request: Request) -> dict[str, str]:
        return {"for": request.headers["authorization"]}

    @app.get("/by-language")  # a header that is no credential tells no users apart
    @cached(ttl=60, cache=cache, key="l:{accept_language}", registry=MetricsRegistry())
    async def by_language(
        request: Request, accept_language: Annotated[str, Header()] = "en"
    ) -> dict[str, str]:
        return {"for": request.headers["authorization"]}

    async with client(app) as c:
        for path, alice, bob in (
            ("/by-token", {"authorization": "a"}, {"authorization": "b"}),
            ("/by-cookie", {"cookie": "session=a"}, {"cookie": "session=b"}),
            ("/by-vary", {"authorization": "a"}, {"authorization": "b"}),
        ):
            first = await c.get(path, headers=alice)
            other = await c.get(path, headers=bob)
            again = await c.get(path, headers=alice)
            assert (first.json(), other.json(), again.json()) == (
                {"for": "a"},
                {"for": "b"},
                {"for": "a"},
            ), path
            assert again.headers["x-cache"] == "HIT", path
        alice_en = await c.get("/by-language", headers={"authorization": "a"})
        bob_en = await c.get("/by-language", headers={"authorization": "b"})
    assert (alice_en.json(), bob_en.json()) == ({"for": "a"}, {"for": "b"})
    assert alice_en.headers["x-cache"] == bob_en.headers["x-cache"] == "BYPASS"


# ---------------------------------------------------------------------------------------
# the entry is the rendered response


async def test_hit_skips_handler_validation_and_serialization(cache: Cache) -> None:
    app = FastAPI()
    validated, calls = Counter(), Counter()

    class Out(BaseModel):
        name: str

        @field_validator("name")
        @classmethod
        def count(cls, value: str) -> str:
            validated.bump()
            return value.upper()

    @app.get("/out", response_model=Out)
    @cached(ttl=60, cache=cache, registry=MetricsRegistry())
    async def out(response: Response) -> dict[str, str]:
        calls.bump()
        response.headers["x-made-by"] = "handler"
        response.headers["vary"] = "X-Tenant"
        response.status_code = 203
        return {"name": "ada", "secret": "not in the model"}

    async with client(app) as c:
        first = await c.get("/out")
        second = await c.get("/out")
    assert first.json() == second.json() == {"name": "ADA"}  # validated, filtered
    assert first.status_code == second.status_code == 203
    assert second.headers["x-made-by"] == "handler"
    assert second.headers.get_list("vary") == ["X-Tenant", "Authorization, Cookie"]
    assert second.headers["content-type"] == "application/json"
    assert second.content == first.content
    assert calls.n == 1 and validated.n == 1

    entry = cache.get_entry(out.key())
    assert entry is not None
    value = entry.value
    assert isinstance(value, dict)
    assert value["body"] == b'{"name":"ADA"}' and value["status"] == 203
    assert ["x-made-by", "handler"] in value["headers"]
    assert all(k not in ("content-length", "set-cookie") for k, _ in value["headers"])
    assert msgpack.unpackb(msgpack.packb(value)) == value  # plain builtins: fits Redis


async def test_returned_response_objects_are_cached_as_they_are(cache: Cache) -> None:
    app = FastAPI()
    calls = Counter()

    @app.get("/text")
    @cached(ttl=60, cache=cache, registry=MetricsRegistry())
    def text() -> PlainTextResponse:
        calls.bump()
        return PlainTextResponse("héllo", headers={"x-kind": "text"})

    async with client(app) as c:
        first, second = await c.get("/text"), await c.get("/text")
    assert first.text == second.text == "héllo"
    assert second.headers["content-type"] == "text/plain; charset=utf-8"
    assert second.headers["x-kind"] == "text" and second.headers["x-cache"] == "HIT"
    assert calls.n == 1


async def test_streaming_responses_are_never_cached(cache: Cache) -> None:
    app = FastAPI()
    calls = Counter()

    @app.get("/stream")
    @cached(ttl=60, cache=cache, registry=MetricsRegistry())
    async def stream() -> StreamingResponse:
        calls.bump()
        return StreamingResponse(iter([b"a", b"b"]))

    async with client(app) as c:
        first, second = await c.get("/stream"), await c.get("/stream")
    assert first.content == second.content == b"ab"
    assert calls.n == 2
    assert cache.keys() == []


def test_generator_handlers_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="streams"):

        @cached(ttl=1)
        async def gen() -> AsyncIterator[int]:
            yield 1


# ---------------------------------------------------------------------------------------
# HTTP semantics


def simple_app(cache: Cache, registry: MetricsRegistry | None = None, **options: Any) -> Any:
    app = FastAPI()
    calls = Counter()

    @app.api_route("/data", methods=["GET", "HEAD"])
    @cached(cache=cache, registry=registry or MetricsRegistry(), **options)
    async def data() -> dict[str, int]:
        n = calls.bump()
        return {"n": n}

    return app, calls, data


async def test_etag_cache_control_and_age(cache: Cache) -> None:
    app, _, _ = simple_app(cache, ttl=30)
    async with client(app) as c:
        miss = await c.get("/data")
        await asyncio.sleep(1.1)
        hit = await c.get("/data")
    body = miss.content
    assert miss.headers["etag"] == '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    assert hit.headers["etag"] == miss.headers["etag"]
    assert miss.headers["cache-control"] == "public, max-age=30"
    assert miss.headers["age"] == "0"
    age = int(hit.headers["age"])
    assert age >= 1  # at least 1.1 s have passed (more on a loaded machine)
    assert hit.headers["cache-control"] == "public, max-age=30"  # the ttl: Age says the rest
    assert hit.headers["content-length"] == str(len(body))


@pytest.mark.parametrize(
    "condition",
    ["{etag}", "W/{etag}", '"nope", {etag}', '"nope",W/{etag}', "*"],
)
async def test_if_none_match_answers_304(cache: Cache, condition: str) -> None:
    app, calls, _ = simple_app(cache, ttl=30)
    async with client(app) as c:
        first = await c.get("/data")
        etag = first.headers["etag"]
        again = await c.get("/data", headers={"if-none-match": condition.format(etag=etag)})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag
    assert again.headers["cache-control"].startswith("public, max-age=")
    assert "content-type" not in again.headers
    assert calls.n == 1


async def test_if_none_match_on_a_miss_and_on_no_match(cache: Cache) -> None:
    app, _, _ = simple_app(cache, ttl=30)
    async with client(app) as c:
        body = b'{"n":1}'
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        cold = await c.get("/data", headers={"if-none-match": etag})  # computed, then matched
        other = await c.get("/data", headers={"if-none-match": '"other"'})
    assert cold.status_code == 304 and cold.headers["x-cache"] == "MISS"
    assert other.status_code == 200 and other.content == body


async def test_head_is_cached_without_a_body(cache: Cache) -> None:
    app, calls, _ = simple_app(cache, ttl=30)
    async with client(app) as c:
        head = await c.head("/data")
        get = await c.get("/data")
    assert head.status_code == 200 and head.content == b""
    assert get.headers["x-cache"] == "HIT" and get.json() == {"n": 1}
    assert head.headers["content-length"] == get.headers["content-length"]
    assert calls.n == 1


async def test_only_get_and_head_are_cached(cache: Cache) -> None:
    app = FastAPI()
    calls = Counter()

    @app.post("/things")
    @cached(ttl=30, cache=cache, registry=MetricsRegistry())
    async def create(item: Item) -> Item:
        calls.bump()
        return item

    async with client(app) as c:
        responses = [await c.post("/things", json={"id": 1, "name": "a"}) for _ in range(2)]
    assert all(r.json() == {"id": 1, "name": "a"} for r in responses)
    assert all("x-cache" not in r.headers for r in responses)
    assert calls.n == 2 and cache.keys() == []


async def test_x_cache_stale_then_refreshed(cache: Cache) -> None:
    app, calls, _ = simple_app(cache, ttl=0.3, stale_ttl=30)
    async with client(app) as c:
        assert (await c.get("/data")).headers["x-cache"] == "MISS"
        await asyncio.sleep(0.4)
        stale = await c.get("/data")
        for _ in range(50):
            if calls.n == 2:
                break
            await asyncio.sleep(0.02)
        fresh = await c.get("/data")
    assert stale.headers["x-cache"] == "STALE" and stale.json() == {"n": 1}
    # max-age is the ttl (0.3 rounded up), Age at least that: stale downstream too
    assert stale.headers["cache-control"] == "public, max-age=1, stale-while-revalidate=30"
    assert int(stale.headers["age"]) >= 1
    assert fresh.headers["x-cache"] == "HIT" and fresh.json() == {"n": 2}


async def test_concurrent_cold_requests_share_one_computation(
    cache: Cache, registry: MetricsRegistry
) -> None:
    app = FastAPI()
    calls, arrived = Counter(), Counter()
    app.add_middleware(CountRequests, counter=arrived)

    @app.get("/slow/{n}")
    @cached(ttl=30, cache=cache, registry=registry)
    async def slow(n: int) -> dict[str, int]:
        calls.bump()
        await until(lambda: arrived.n >= 20)  # every request overlaps this computation
        await asyncio.sleep(0.3)
        return {"n": n}

    async with client(app) as c:
        responses = await asyncio.gather(*(c.get("/slow/1") for _ in range(20)))
    statuses = sorted(r.headers["x-cache"] for r in responses)
    assert statuses == ["COALESCED"] * 19 + ["MISS"]
    assert {r.content for r in responses} == {b'{"n":1}'}
    assert calls.n == 1
    snapshot = registry.snapshot()["routes"]["/slow/{n}"]
    assert snapshot["coalesced"] == 19 and snapshot["computations"] == 1


async def test_sync_handlers_run_in_threads_and_coalesce(cache: Cache) -> None:
    app = FastAPI()
    calls = Counter()
    threads: set[str] = set()

    @app.get("/sync")
    @cached(ttl=30, cache=cache, registry=MetricsRegistry())
    def sync_route() -> dict[str, str]:
        calls.bump()
        threads.add(threading.current_thread().name)
        time.sleep(0.3)
        return {"ok": "yes"}

    async with client(app) as c:
        responses = await asyncio.gather(*(c.get("/sync") for _ in range(10)))
    assert all(r.json() == {"ok": "yes"} for r in responses)
    assert calls.n == 1
    assert threading.main_thread().name not in threads


async def test_5xx_is_never_stored_but_shared_among_concurrent_requests(cache: Cache) -> None:
    app = FastAPI()
    calls, arrived = Counter(), Counter()
    app.add_middleware(CountRequests, counter=arrived)
    registry = MetricsRegistry()

    @app.get("/down")
    @cached(ttl=30, cache=cache, registry=registry)
    async def down() -> JSONResponse:
        calls.bump()
        await until(lambda: arrived.n >= 5)  # the burst overlaps; `later` comes after
        await asyncio.sleep(0.3)
        return JSONResponse({"error": "db down"}, status_code=503)

    async with client(app) as c:
        burst = await asyncio.gather(*(c.get("/down") for _ in range(5)))
        later = await c.get("/down")
    assert all(r.status_code == 503 for r in (*burst, later))
    assert sorted(r.headers["x-cache"] for r in burst) == ["COALESCED"] * 4 + ["MISS"]
    assert "cache-control" not in burst[0].headers
    assert later.headers["x-cache"] == "MISS"
    assert calls.n == 2 and cache.keys() == []
    assert registry.snapshot()["routes"]["/down"]["errors"] == 2


async def test_exceptions_are_not_cached_and_counted(cache: Cache) -> None:
    app = FastAPI()
    calls = Counter()
    registry = MetricsRegistry()

    @app.get("/boom")
    @cached(ttl=30, cache=cache, registry=registry)
    async def boom() -> dict[str, str]:
        if calls.bump() == 1:
            raise RuntimeError("first call fails")
        return {"ok": "now"}

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        first = await c.get("/boom")
        second = await c.get("/boom")
    assert first.status_code == 500
    assert second.json() == {"ok": "now"} and second.headers["x-cache"] == "MISS"
    route = registry.snapshot()["routes"]["/boom"]
    assert route["errors"] == 1 and route["computations"] == 2


async def test_4xx_is_cached_only_when_asked(cache: Cache) -> None:
    app = FastAPI()
    calls = Counter()

    @app.get("/default/{n}")
    @cached(ttl=30, cache=cache, registry=MetricsRegistry())
    async def default(n: int) -> dict[str, int]:
        calls.bump()
        raise HTTPException(404, "no such item")

    @app.get("/opted/{n}")
    @cached(ttl=30, cache=cache, cache_4xx=True, registry=MetricsRegistry())
    async def opted(n: int) -> dict[str, int]:
        calls.bump()
        raise HTTPException(404, "no such item", headers={"x-why": "gone"})

    @app.get("/returned")
    @cached(ttl=30, cache=cache, cache_4xx=True, registry=MetricsRegistry())
    async def returned() -> JSONResponse:
        calls.bump()
        return JSONResponse({"detail": "gone"}, status_code=410)

    async with client(app) as c:
        d = [await c.get("/default/1") for _ in range(2)]
        assert calls.n == 2
        o = [await c.get("/opted/1") for _ in range(2)]
        assert calls.n == 3
        r = [await c.get("/returned") for _ in range(2)]
        assert calls.n == 4
    assert all(x.status_code == 404 and x.json() == {"detail": "no such item"} for x in d + o)
    assert o[0].headers["x-cache"] == "MISS" and o[0].headers["cache-control"]
    assert o[1].headers["x-cache"] == "HIT" and o[1].headers["x-why"] == "gone"
    assert r[1].status_code == 410 and r[1].headers["x-cache"] == "HIT"


@pytest.mark.parametrize("status", [503, 302])
async def test_cache_4xx_keeps_no_other_raised_status(cache: Cache, status: int) -> None:
    app = FastAPI()
    calls = Counter()

    @app.get("/down")
    @cached(ttl=30, cache=cache, cache_4xx=True, registry=MetricsRegistry())
    async def down() -> dict[str, int]:
        calls.bump()
        raise HTTPException(status, "not now")

    async with client(app) as c:
        responses = [await c.get("/down") for _ in range(2)]
    assert [r.status_code for r in responses] == [status, status]
    assert calls.n == 2 and cache.keys() == []  # raised to every request, never kept


async def test_responses_setting_cookies_are_never_stored_nor_shared(cache: Cache) -> None:
    app = FastAPI()
    calls = Counter()

    @app.get("/login")
    @cached(ttl=30, cache=cache, registry=MetricsRegistry())
    async def login(response: Response) -> dict[str, int]:
        n = calls.bump()
        await asyncio.sleep(0.05)
        response.set_cookie("session", f"user{n}")
        return {"n": n}

    async with client(app) as c:
        burst = await asyncio.gather(*(c.get("/login") for _ in range(3)))
    cookies = sorted(r.cookies["session"] for r in burst)
    assert cookies == ["user1", "user2", "user3"]  # each request ran for itself
    assert cache.keys() == []


async def test_client_no_cache_is_ignored_unless_honoured(cache: Cache) -> None:
    app, calls, _ = simple_app(cache, ttl=30)
    honouring, honoured_calls, _ = simple_app(Cache(), ttl=30, honor_client_no_cache=True)
    async with client(app) as c:
        await c.get("/data")
        ignored = await c.get("/data", headers={"cache-control": "no-cache"})
    async with client(honouring) as c:
        await c.get("/data")
        honoured = await c.get("/data", headers={"cache-control": "no-cache"})
        after = await c.get("/data")
    assert ignored.headers["x-cache"] == "HIT" and calls.n == 1
    assert honoured.headers["x-cache"] == "MISS" and honoured.json() == {"n": 2}
    assert after.headers["x-cache"] == "HIT" and after.json() == {"n": 2}
    assert honoured_calls.n == 2


async def test_background_tasks_run_only_when_the_handler_ran(cache: Cache) -> None:
    app = FastAPI()
    ran = Counter()

    @app.get("/bg")
    @cached(ttl=30, cache=cache, registry=MetricsRegistry())
    async def bg(tasks: BackgroundTasks) -> dict[str, bool]:
        tasks.add_task(ran.bump)
        return {"ok": True}

    async with client(app) as c:
        await c.get("/bg")
        await c.get("/bg")
    assert ran.n == 1


async def test_disabled_cache_is_a_plain_route() -> None:
    app = FastAPI()
    calls = Counter()

    @app.get("/off")
    @cached(ttl=30, cache=Cache(enabled=False), registry=MetricsRegistry())
    async def off() -> dict[str, int]:
        return {"n": calls.bump()}

    async with client(app) as c:
        a, b = await c.get("/off"), await c.get("/off")
    assert (a.json(), b.json()) == ({"n": 1}, {"n": 2})
    assert "x-cache" not in b.headers


async def test_coalesced_shares_without_storing(cache: Cache) -> None:
    app = FastAPI()
    calls, arrived = Counter(), Counter()
    app.add_middleware(CountRequests, counter=arrived)

    @app.get("/c/{n}")
    @coalesced(cache=cache, registry=MetricsRegistry())
    async def route(n: int) -> dict[str, int]:
        calls.bump()
        await until(lambda: arrived.n >= 10)
        await asyncio.sleep(0.3)
        return {"n": n}

    async with client(app) as c:
        burst = await asyncio.gather(*(c.get("/c/1") for _ in range(10)))
        later = await c.get("/c/1")
    assert sorted(r.headers["x-cache"] for r in burst) == ["COALESCED"] * 9 + ["MISS"]
    assert later.headers["x-cache"] == "MISS"
    assert "cache-control" not in later.headers and "etag" in later.headers
    assert calls.n == 2 and cache.keys() == []


async def test_invalidate_and_invalidate_all(cache: Cache) -> None:
    app = FastAPI()
    calls = Counter()

    @app.get("/items/{item_id}")
    @cached(ttl=30, cache=cache, tags=["item:{item_id}"], registry=MetricsRegistry())
    async def item(item_id: int) -> dict[str, int]:
        calls.bump()
        return {"id": item_id}

    async with client(app) as c:
        for n in (1, 2, 3):
            await c.get(f"/items/{n}")
        assert await item.invalidate(item_id=1)
        assert not await item.invalidate(item_id=1)
        assert (await c.get("/items/1")).headers["x-cache"] == "MISS"
        assert cache.invalidate_tag("item:2") == 1
        assert (await c.get("/items/2")).headers["x-cache"] == "MISS"
        assert await item.invalidate_all() == 3
        assert (await c.get("/items/3")).headers["x-cache"] == "MISS"
    with pytest.raises(ConfigurationError, match="not request parameters"):
        await item.invalidate(nope=1)
    with pytest.raises(ConfigurationError, match="required"):
        await item.invalidate()


# ---------------------------------------------------------------------------------------
# visibility


@pytest.mark.filterwarnings("ignore:Duplicate Operation ID")  # GET + HEAD on one function
async def test_metrics_router_json_and_prometheus(cache: Cache) -> None:
    registry = MetricsRegistry()
    app, _, _ = simple_app(cache, registry, ttl=30)
    app.include_router(metrics_router(registry=registry))
    async with client(app) as c:
        for _ in range(3):
            await c.get("/data")
        as_json = (await c.get("/coalesce/metrics")).json()
        text = await c.get("/coalesce/metrics?format=prometheus")
        text2 = await c.get("/coalesce/metrics/prometheus")
    route = as_json["routes"]["/data"]
    assert (route["hits"], route["misses"], route["computations"], route["errors"]) == (2, 1, 1, 0)
    assert route["p50_ms"] >= 0 and route["p99_ms"] >= route["p50_ms"]
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'coalesce_http_requests_total{route="/data",cache="hit"} 2' in text.text
    assert 'coalesce_http_computations_total{route="/data"} 1' in text.text
    assert 'coalesce_http_compute_seconds{route="/data",quantile="0.99"}' in text.text
    assert text2.text == text.text
    assert "/coalesce/metrics" not in app.openapi()["paths"]


async def test_metrics_router_with_a_token() -> None:
    app = FastAPI()
    app.include_router(metrics_router("/metrics", registry=MetricsRegistry(), token=TOKEN))
    async with client(app) as c:
        assert (await c.get("/metrics")).status_code == 401
        ok = await c.get("/metrics", headers={"authorization": f"Bearer {TOKEN}"})
    assert ok.json() == {"routes": {}}


async def test_one_structured_log_line_per_computation(
    cache: Cache, caplog: pytest.LogCaptureFixture
) -> None:
    app, _, _ = simple_app(cache, ttl=30)
    with caplog.at_level(logging.INFO, logger="coalesce.fastapi"):
        async with client(app) as c:
            for _ in range(3):
                await c.get("/data")
    records = [r for r in caplog.records if r.name == "coalesce.fastapi"]
    assert len(records) == 1
    record: Any = records[0]
    assert record.route == "/data" and record.key == stored("/data?")
    assert record.cache_status == "MISS" and record.status_code == 200
    assert record.duration_ms >= 0


# ---------------------------------------------------------------------------------------
# the admin router


def test_admin_router_refuses_to_exist_without_a_token(cache: Cache) -> None:
    for token in (None, "", "   "):
        with pytest.raises(ConfigurationError, match="token"):
            admin_router(cache, token=token)


async def test_admin_router_invalidates_keys_and_tags(cache: Cache) -> None:
    app = FastAPI()

    @app.get("/items/{item_id}")
    @cached(ttl=30, cache=cache, key="item:{item_id}", tags=["items"], registry=MetricsRegistry())
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    app.include_router(admin_router(cache, token=TOKEN))
    auth = {"authorization": f"Bearer {TOKEN}"}
    async with client(app) as c:
        for n in (1, 2, 3):
            await c.get(f"/items/{n}")
        missing = await c.post("/coalesce/invalidate", json={"keys": ["item:1"]})
        wrong = await c.post(
            "/coalesce/invalidate", json={"keys": ["item:1"]}, headers={"authorization": "Bearer x"}
        )
        basic = await c.post(
            "/coalesce/invalidate", json={"keys": ["item:1"]}, headers={"authorization": TOKEN}
        )
        one = of("item:1", item)
        keys = await c.post("/coalesce/invalidate", json={"keys": [one, "nope"]}, headers=auth)
        tag = await c.post("/coalesce/invalidate", json={"tag": "items"}, headers=auth)
        bad = [
            await c.post("/coalesce/invalidate", content=body, headers=auth)
            for body in (b"not json", b"{}", b'{"keys": []}', b'{"keys": [""]}', b'{"tag": 3}')
        ]
    assert missing.status_code == wrong.status_code == basic.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert keys.json() == {"removed": {one: True, "nope": False}, "count": 1}
    assert tag.json() == {"tag": "items", "removed": 2}
    assert cache.keys() == []
    assert [r.status_code for r in bad] == [400] * 5
    assert "/coalesce/invalidate" not in app.openapi()["paths"]


# ---------------------------------------------------------------------------------------
# configuration and placement


async def test_the_default_cache_is_used_when_none_is_given() -> None:
    import coalesce

    app = FastAPI()
    calls = Counter()

    @app.get("/default")
    @cached  # bare: the default cache, its default TTL
    async def route() -> dict[str, int]:
        return {"n": calls.bump()}

    previous = coalesce.get_cache()
    mine = coalesce.configure(Cache(default_ttl=120))
    try:
        async with client(app) as c:
            first, second = await c.get("/default"), await c.get("/default")
        assert second.headers["x-cache"] == "HIT" and second.json() == {"n": 1}
        assert first.headers["cache-control"] == "public, max-age=120"
        assert mine.keys() == [stored("/default?")]
        assert route.stats()["/default"]["hits"] == 1
    finally:
        coalesce.configure(previous)


async def test_mounted_apps_keep_their_prefix_in_the_key(cache: Cache) -> None:
    app = FastAPI()

    def make(label: str) -> FastAPI:
        sub = FastAPI()

        @sub.get("/items/{n}")
        @cached(ttl=30, cache=cache, registry=MetricsRegistry())
        async def items(n: int) -> dict[str, Any]:
            return {"app": label, "n": n}

        return sub

    for name in ("a", "b"):
        app.mount(f"/{name}", make(name))
    async with client(app) as c:
        a, b = await c.get("/a/items/1"), await c.get("/b/items/1")
    assert (a.json()["app"], b.json()["app"]) == ("a", "b")
    assert b.headers["x-cache"] == "MISS"
    assert sorted(cache.keys()) == [stored("/a/items/<n>?n=1"), stored("/b/items/<n>?n=1")]


async def test_coalesced_routes_follow_the_same_credential_rules(cache: Cache) -> None:
    app = FastAPI()

    @app.get("/who")
    @coalesced(cache=cache, registry=MetricsRegistry())
    async def who(request: Request) -> dict[str, str]:
        await asyncio.sleep(0.05)
        return {"user": request.headers.get("authorization", "anon")}

    async with client(app) as c:
        burst = await asyncio.gather(
            *(c.get("/who", headers={"authorization": f"Bearer {i}"}) for i in range(5))
        )
    assert [r.json()["user"] for r in burst] == [f"Bearer {i}" for i in range(5)]
    assert all(r.headers["x-cache"] == "BYPASS" for r in burst)


def test_bad_options_are_refused_when_decorating() -> None:
    async def handler(n: int) -> None: ...

    with pytest.raises(ConfigurationError, match="ttl"):
        cached(ttl=0)(handler)
    with pytest.raises(ConfigurationError, match="vary"):
        cached(ttl=1, vary="accept-language")(handler)
    with pytest.raises(ConfigurationError, match="cache"):
        cached(ttl=1, cache="memory://")(handler)
    with pytest.raises(ConfigurationError):
        cached(ttl=1, key="x:{nope}")(handler)


async def test_a_request_without_a_key_runs_uncached(
    cache: Cache, caplog: pytest.LogCaptureFixture
) -> None:
    app = FastAPI()
    calls = Counter()

    @app.get("/odd")
    @cached(ttl=30, cache=cache, key="odd:{user.nope}", registry=MetricsRegistry())
    async def odd(user: Annotated[User, Depends(current_user)]) -> dict[str, int]:
        return {"n": calls.bump()}

    with caplog.at_level(logging.WARNING, logger="coalesce.fastapi"):
        async with client(app) as c:
            auth = {"authorization": "Bearer 1"}
            a, b = await c.get("/odd", headers=auth), await c.get("/odd", headers=auth)
    assert (a.json(), b.json()) == ({"n": 1}, {"n": 2})
    assert b.headers["x-cache"] == "BYPASS"
    assert sum("no cache key" in r.getMessage() for r in caplog.records) == 1


async def test_a_request_without_its_tags_runs_uncached_like_one_without_a_key(
    cache: Cache, caplog: pytest.LogCaptureFixture
) -> None:
    app = FastAPI()
    calls = Counter()
    registry = MetricsRegistry()

    @app.get("/tagged/{item_id}")
    @cached(ttl=30, cache=cache, tags=["t:{item_id.x}"], registry=registry)
    async def tagged(item_id: int) -> dict[str, int]:
        return {"n": calls.bump()}

    with caplog.at_level(logging.WARNING, logger="coalesce.fastapi"):
        async with client(app) as c:
            a, b = await c.get("/tagged/1"), await c.get("/tagged/1")
    assert (a.status_code, b.status_code) == (200, 200)
    assert (a.json(), b.json()) == ({"n": 1}, {"n": 2})
    assert a.headers["x-cache"] == b.headers["x-cache"] == "BYPASS"
    assert cache.keys() == []
    assert registry.route("/tagged/{item_id}").bypassed == 2
    assert sum("no cache tags" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("ttl", float("inf")),
        ("ttl", float("nan")),
        ("ttl", -1),
        ("ttl", 10**400),
        ("stale_ttl", float("inf")),
        ("stale_ttl", float("nan")),
        ("stale_ttl", -1.0),
    ],
)
def test_infinite_nan_or_negative_seconds_are_refused_when_decorating(
    option: str, value: float
) -> None:
    async def handler() -> None: ...

    options: dict[str, Any] = {"ttl": 30, option: value}
    with pytest.raises(ConfigurationError, match=f"^{option} must be"):
        cached(**options)(handler)


async def test_ttl_none_and_the_longest_ttls_give_bounded_headers(cache: Cache) -> None:
    ten_years = 315_360_000
    default, _, _ = simple_app(Cache(default_ttl=45), ttl=None)
    longest, _, _ = simple_app(cache, ttl=ten_years, stale_ttl=ten_years)
    async with client(default) as c:
        by_default = await c.get("/data")
    async with client(longest) as c:
        miss, hit = await c.get("/data"), await c.get("/data")
    assert by_default.headers["cache-control"] == "public, max-age=45"
    control = f"public, max-age={ten_years}, stale-while-revalidate={ten_years}"
    assert miss.headers["cache-control"] == control
    assert (miss.headers["x-cache"], hit.headers["x-cache"]) == ("MISS", "HIT")
    # Whatever the entry says, delta-seconds stay within RFC 9111's 2^31 (1.2.2).
    assert delta_seconds(1e308) == delta_seconds(math.inf) == 2**31
    assert delta_seconds(math.nan) == 0
    assert age_seconds(-math.inf, 0.0) == 2**31
    assert cache_control_value(2**31, stale_while_revalidate=1e308).endswith("=2147483648")


async def test_bad_argument_types_are_refused_when_decorating_not_per_request() -> None:
    app = FastAPI()

    async def handler(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    refused: list[tuple[str, Any]] = [
        ("registry", lambda: cached(ttl=1, registry=1)),
        ("registry", lambda: coalesced(registry="routes")),
        ("vary", lambda: cached(ttl=1, vary="accept-language")),
        ("vary", lambda: coalesced(vary="accept-language")),
        ("vary", lambda: cached(ttl=1, vary=[b"accept"])),
        ("vary", lambda: cached(ttl=1, vary={"accept", "accept-language"})),
        ("tags", lambda: cached(ttl=1, tags="item:{item_id}")),
        ("tags", lambda: cached(ttl=1, tags=[1])),
        ("key", lambda: cached(ttl=1, key=1)),
        ("ttl", lambda: cached(ttl="60")),
        ("stale_ttl", lambda: cached(ttl=1, stale_ttl="5")),
        ("stale_ttl", lambda: cached(ttl=1, stale_ttl=True)),
        ("shared", lambda: cached(ttl=1, shared="false")),
        ("shared", lambda: coalesced(shared="false")),
        ("cache_4xx", lambda: cached(ttl=1, cache_4xx="yes")),
        ("honor_client_no_cache", lambda: cached(ttl=1, honor_client_no_cache="true")),
        ("cache", lambda: coalesced(cache="memory://")),
    ]
    for option, decorator in refused:
        with pytest.raises(ConfigurationError, match=f"^{option} must be"):
            decorator()(handler)
    with pytest.raises(ConfigurationError, match="decorates a handler"):
        cached(ttl=1)("not a handler")
    with pytest.raises(ConfigurationError, match="decorates a handler"):
        coalesced("items")

    @app.get("/items/{item_id}")  # the same arguments, well typed, serve requests
    @cached(ttl=1, vary=("accept-language",), tags=("item:{item_id}",), registry=MetricsRegistry())
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    async with client(app) as c:
        response = await c.get("/items/3")
    assert response.status_code == 200 and response.headers["x-cache"] == "MISS"


@pytest.mark.parametrize("name", ["x-ü", "x y", "x:y", "", " ", "x\ny", "(x)", 'x"'])
def test_vary_names_must_be_http_tokens(name: str) -> None:
    async def handler() -> None: ...

    with pytest.raises(ConfigurationError, match=r"vary: .* is not an HTTP header name"):
        cached(ttl=1, vary=["accept", name])(handler)
    with pytest.raises(ConfigurationError, match="vary"):
        coalesced(vary=[name])(handler)


async def test_valid_vary_names_are_sent_as_one_ascii_vary_header(cache: Cache) -> None:
    app = FastAPI()

    @app.get("/v")
    @cached(
        ttl=5,
        cache=cache,
        vary=[" X-Tenant ", "accept-language", "x-a!#$%&'*+.^_`|~1"],
        shared=True,
        registry=MetricsRegistry(),
    )
    async def v() -> dict[str, bool]:
        return {"ok": True}

    async with client(app) as c:
        response = await c.get("/v", headers={"x-tenant": "t1"})
    assert response.headers["vary"] == "X-Tenant, Accept-Language, X-A!#$%&'*+.^_`|~1"


# ---------------------------------------------------------------------------------------
# Hits of routes without dependencies are answered before FastAPI solves anything


@pytest.fixture
def solved(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts FastAPI's dependency solving: once per request that goes the full way."""
    import fastapi.routing

    count = Counter()
    solve = fastapi.routing.solve_dependencies

    async def counting(*args: Any, **kwargs: Any) -> Any:
        count.bump()
        return await solve(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    return count


def twin_routes(cache: Cache, registry: MetricsRegistry, **options: Any) -> tuple[FastAPI, Counter]:
    """`/fast/{n}` (no dependencies) and `/full/{n}` (a no-op dependency): same handler."""
    app = FastAPI()
    calls = Counter()

    def nothing() -> None:
        return None

    async def item(n: int, q: str | None = None) -> dict[str, Any]:
        calls.bump()
        return {"n": n, "q": q}

    both = ["GET", "HEAD"]
    app.api_route("/fast/{n}", methods=both)(
        cached(ttl=30, cache=cache, registry=registry, **options)(item)
    )
    app.api_route("/full/{n}", methods=both, dependencies=[Depends(nothing)])(
        cached(ttl=30, cache=cache, registry=registry, **options)(item)
    )
    return app, calls


def comparable(response: httpx.Response) -> tuple[int, bytes, list[tuple[str, str]]]:
    return response.status_code, response.content, list(response.headers.multi_items())


async def test_hits_without_dependencies_skip_fastapi_and_answer_the_same(
    cache: Cache, registry: MetricsRegistry, solved: Counter
) -> None:
    app, calls = twin_routes(cache, registry)
    async with client(app) as c:
        for route in ("fast", "full"):
            first = await c.get(f"/{route}/1?q=a")
            etag = first.headers["etag"]
        before = solved.n
        fast = [
            await c.get("/fast/1?q=a"),
            await c.head("/fast/1?q=a"),
            await c.get("/fast/1?q=a", headers={"if-none-match": etag}),
            await c.get("/fast/1?q=a", headers={"if-none-match": '"other"'}),
        ]
        assert solved.n == before  # no dependency solving, no validation: the shortcut
        full = [
            await c.get("/full/1?q=a"),
            await c.head("/full/1?q=a"),
            await c.get("/full/1?q=a", headers={"if-none-match": etag}),
            await c.get("/full/1?q=a", headers={"if-none-match": '"other"'}),
        ]
        assert solved.n == before + 4  # the dependency keeps the full way
    assert [comparable(r) for r in fast] == [comparable(r) for r in full]
    assert [r.status_code for r in fast] == [200, 200, 304, 200]
    assert all(r.headers["x-cache"] == "HIT" for r in fast)
    assert fast[0].json() == {"n": 1, "q": "a"} and fast[1].content == b""
    assert calls.n == 2  # one computation per route
    stats = registry.snapshot()["routes"]
    assert stats["/fast/{n}"]["hits"] == stats["/full/{n}"]["hits"] == 4
    assert stats["/fast/{n}"]["not_modified"] == stats["/full/{n}"]["not_modified"] == 1


async def test_the_shortcut_keeps_keys_validation_and_credentials(
    cache: Cache, registry: MetricsRegistry
) -> None:
    app, calls = twin_routes(cache, registry)
    async with client(app) as c:
        first, again = await c.get("/fast/1"), await c.get("/fast/01")  # the same key
        other = await c.get("/fast/2")
        bad = [await c.get("/fast/x"), await c.get("/fast/x")]  # never a key: always 422
        alice = await c.get("/fast/1", headers={"authorization": "Bearer alice"})
        cookie = await c.get("/fast/1", headers={"cookie": "s=1"})
        anon = await c.get("/fast/1")
    assert [r.headers["x-cache"] for r in (first, again, other, anon)] == [
        "MISS",
        "HIT",
        "MISS",
        "HIT",
    ]
    assert [r.status_code for r in bad] == [422, 422]
    assert alice.headers["x-cache"] == cookie.headers["x-cache"] == "BYPASS"
    assert calls.n == 4  # 1, 2 and the two bypasses
    assert sorted(cache.keys()) == [stored("/fast/<n>?n=1"), stored("/fast/<n>?n=2")]


async def test_the_shortcut_keeps_vary_invalidation_and_expiry(cache: Cache) -> None:
    app = FastAPI()
    calls = Counter()

    @app.get("/greet")
    @cached(ttl=0.3, cache=cache, vary=["accept-language"], registry=MetricsRegistry())
    async def greet(request: Request) -> dict[str, Any]:
        return {"lang": request.headers.get("accept-language"), "n": calls.bump()}

    async with client(app) as c:

        async def get(lang: str) -> tuple[str, Any]:
            r = await c.get("/greet", headers={"accept-language": lang})
            return r.headers["x-cache"], r.json()["n"]

        assert [await get("en"), await get("fr"), await get("en"), await get("fr")] == [
            ("MISS", 1),
            ("MISS", 2),
            ("HIT", 1),
            ("HIT", 2),
        ]
        assert await greet.invalidate() is True  # type: ignore[attr-defined]
        assert await get("en") == ("MISS", 3)
        await asyncio.sleep(0.4)
        assert await get("en") == ("MISS", 4)  # expired: the full way computes again
        cache.enabled = False
        assert (await c.get("/greet")).headers.get("x-cache") is None
        cache.enabled = True


async def test_routes_with_dependencies_never_skip_them(cache: Cache, solved: Counter) -> None:
    def auth(x_user: Annotated[str | None, Header()] = None) -> None:
        if x_user != "ok":
            raise HTTPException(403, "no")

    app = FastAPI()
    router = APIRouter()
    calls = Counter()

    async def thing(n: int) -> dict[str, int]:
        calls.bump()
        return {"n": n}

    def decorate(fn: Any) -> Any:
        return cached(ttl=30, cache=cache, registry=MetricsRegistry())(fn)

    app.get("/route/{n}", dependencies=[Depends(auth)])(decorate(thing))
    router.get("/router/{n}")(decorate(thing))
    app.include_router(router, prefix="/included", dependencies=[Depends(auth)])

    async def header(n: int, x_user: Annotated[str | None, Header()] = None) -> dict[str, int]:
        return {"n": n}

    async def since(n: int, t: float = Query(default_factory=time.time)) -> dict[str, float]:
        return {"n": n, "t": t}

    app.get("/header/{n}")(decorate(header))
    app.get("/since/{n}")(decorate(since))

    async with client(app) as c:
        for url in ("/route/1", "/included/router/1"):
            ok = [await c.get(url, headers={"x-user": "ok"}) for _ in range(2)]
            denied = await c.get(url, headers={"x-user": "bad"})
            assert [r.headers["x-cache"] for r in ok] == ["MISS", "HIT"]
            assert denied.status_code == 403  # the dependency still refuses a hit
        before = solved.n
        await c.get("/header/1")
        await c.get("/header/1")
        a, b = await c.get("/since/1"), await c.get("/since/1")
        assert solved.n == before + 4  # header and default-factory parameters: full way
    assert a.json()["t"] != b.json()["t"] and b.headers["x-cache"] == "MISS"


async def test_included_routers_use_the_shortcut_and_keep_their_prefix(
    cache: Cache, solved: Counter
) -> None:
    app = FastAPI()
    router = APIRouter(prefix="/v1")

    @router.get("/x/{n}")
    @cached(ttl=30, cache=cache, registry=MetricsRegistry())
    async def x(request: Request, n: int) -> dict[str, Any]:
        return {"n": n, "path": request.url.path}

    app.include_router(router, prefix="/a")
    app.include_router(router, prefix="/b")
    async with client(app) as c:
        a1, b1 = await c.get("/a/v1/x/1"), await c.get("/b/v1/x/1")
        before = solved.n
        a2, b2 = await c.get("/a/v1/x/1"), await c.get("/b/v1/x/1")
        assert solved.n == before
    assert (a1.json()["path"], b1.json()["path"]) == ("/a/v1/x/1", "/b/v1/x/1")
    assert (a2.json(), b2.json()) == (a1.json(), b1.json())
    assert [r.headers["x-cache"] for r in (a1, b1, a2, b2)] == ["MISS", "MISS", "HIT", "HIT"]
    assert sorted(cache.keys()) == [stored("/a/v1/x/<n>?n=1"), stored("/b/v1/x/<n>?n=1")]


async def test_shortcut_headers_are_fresh_lists_middleware_may_change(cache: Cache) -> None:
    app, _, _ = simple_app(cache, ttl=30)

    def tagging(inner: Any) -> Any:
        async def asgi(scope: Any, receive: Any, send: Any) -> None:
            async def tagged(message: Any) -> None:
                if message["type"] == "http.response.start":
                    message["headers"].append((b"x-tag", b"1"))  # in place, as many do
                await send(message)

            await inner(scope, receive, tagged)

        return asgi

    async with client(tagging(app)) as c:  # type: ignore[arg-type]
        responses = [await c.get("/data") for _ in range(4)]
    assert [r.headers.get_list("x-tag") for r in responses] == [["1"]] * 4
    assert [r.headers["x-cache"] for r in responses] == ["MISS", "HIT", "HIT", "HIT"]
