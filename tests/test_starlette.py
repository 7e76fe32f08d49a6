"""`coalesce.starlette.cached` on real Starlette apps, through Starlette's TestClient and
httpx's ASGI transport (no mocks): keys, the credentials rule, headers, 304, invalidation,
metrics and coalescing of concurrent requests."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Host, Mount, Route, Router
from starlette.testclient import TestClient

from coalesce import Cache, ConfigurationError, KeyTemplateError
from coalesce.http.metrics import MetricsRegistry
from coalesce.starlette import cached, coalesced

GATE_TIMEOUT = 10.0


class CountArrivals:
    """Pure ASGI middleware: counts requests per path as they enter, and wakes the ones
    waiting for a number of arrivals (no await between here and the cached endpoint)."""

    def __init__(self, app: Any, owner: App) -> None:
        self.app = app
        self.owner = owner

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.owner.arrived[scope["path"]] += 1
            if self.owner.arrived[scope["path"]] >= self.owner.hold_for:
                self.owner.all_arrived.set()
        await self.app(scope, receive, send)


class App:
    """A Starlette app whose cached endpoints count their runs."""

    def __init__(self, cache: Cache | None = None) -> None:
        self.cache = cache or Cache()
        self.registry = MetricsRegistry()
        self.calls: Counter[str] = Counter()
        self.arrived: Counter[str] = Counter()
        self.hold_for = 0
        self.all_arrived = asyncio.Event()
        options: dict[str, Any] = {"cache": self.cache, "registry": self.registry}

        @cached(ttl=60, **options)
        async def item(request: Request) -> Response:
            self.calls["item"] += 1
            return JSONResponse(
                {
                    "item": request.path_params["item_id"],
                    "query": sorted(request.query_params.multi_items()),
                    "run": self.calls["item"],
                }
            )

        @cached(ttl=60, vary=["authorization"], **options)
        async def me(request: Request) -> Response:
            self.calls["me"] += 1
            return JSONResponse({"user": request.headers.get("authorization")})

        @cached(ttl=60, **options)
        async def whoami(request: Request) -> Response:  # reads a credential it does not vary on
            self.calls["whoami"] += 1
            user = request.headers.get("authorization") or request.cookies.get("user")
            return JSONResponse({"user": user})

        @cached(ttl=60, shared=True, **options)
        async def banner(request: Request) -> Response:
            self.calls["banner"] += 1
            return PlainTextResponse("the same for everyone")

        @cached(ttl=60, **options)
        async def login(request: Request) -> Response:
            self.calls["login"] += 1
            response = PlainTextResponse(f"welcome {self.calls['login']}")
            response.set_cookie("session", f"s{self.calls['login']}")
            return response

        @cached(ttl=60, **options)
        async def nostore(request: Request) -> Response:
            self.calls["nostore"] += 1
            return PlainTextResponse("fresh", headers={"cache-control": "no-store"})

        @cached(ttl=60, **options)
        async def own_control(request: Request) -> Response:
            self.calls["own_control"] += 1
            return PlainTextResponse("x", headers={"cache-control": "no-cache"})

        @cached(ttl=60, key="product:{product_id}", tags=["products"], **options)
        async def product(request: Request) -> Response:
            self.calls["product"] += 1
            return JSONResponse({"product": request.path_params["product_id"]})

        @cached(ttl=60, **options)
        async def missing(request: Request) -> Response:
            self.calls["missing"] += 1
            return PlainTextResponse("no such thing", status_code=404)

        @cached(ttl=60, cache_4xx=True, **options)
        async def gone(request: Request) -> Response:
            self.calls["gone"] += 1
            return PlainTextResponse("gone", status_code=410)

        @cached(ttl=60, **options)
        async def stream(request: Request) -> Response:
            self.calls["stream"] += 1

            async def chunks() -> Any:
                yield b"a"
                yield b"b"

            return StreamingResponse(chunks())

        @cached(ttl=60, **options)
        def sync_page(request: Request) -> Response:  # a sync endpoint: Starlette's threads
            self.calls["sync"] += 1
            return PlainTextResponse(f"sync {self.calls['sync']}")

        @cached(ttl=60, **options)
        async def slow(request: Request) -> Response:
            self.calls["slow"] += 1
            await asyncio.wait_for(self.all_arrived.wait(), GATE_TIMEOUT)
            return JSONResponse({"name": request.path_params["name"]})

        @cached(ttl=60, **options)
        async def write(request: Request) -> Response:
            self.calls["write"] += 1
            return PlainTextResponse(f"write {self.calls['write']}")

        @cached(ttl=0.2, stale_ttl=30, **options)
        async def news(request: Request) -> Response:
            self.calls["news"] += 1
            return JSONResponse(
                {"lang": request.query_params.get("lang"), "run": self.calls["news"]}
            )

        @cached(ttl=60, honor_client_no_cache=True, **options)
        async def prices(request: Request) -> Response:
            self.calls["prices"] += 1
            return JSONResponse({"run": self.calls["prices"]})

        @coalesced(**options)
        async def together(request: Request) -> Response:
            self.calls["together"] += 1
            await asyncio.wait_for(self.all_arrived.wait(), GATE_TIMEOUT)
            return JSONResponse(
                {"name": request.path_params["name"], "run": self.calls["together"]}
            )

        @cached(ttl=60, cache_4xx=True, **options)
        async def raised(request: Request) -> Response:
            self.calls["raised"] += 1
            raise HTTPException(404, detail="no such item", headers={"x-reason": "sold out"})

        @cached(ttl=60, **options)
        async def raised_uncached(request: Request) -> Response:
            self.calls["raised_uncached"] += 1
            raise HTTPException(404, detail="not here")

        self.item, self.product, self.slow = item, product, slow
        self.app = Starlette(
            routes=[
                Route("/items/{item_id:int}", item),
                Route("/me", me),
                Route("/whoami", whoami),
                Route("/banner", banner),
                Route("/login", login),
                Route("/nostore", nostore),
                Route("/own-control", own_control),
                Route("/products/{product_id}", product),
                Route("/missing", missing),
                Route("/gone", gone),
                Route("/stream", stream),
                Route("/sync", sync_page),
                Route("/slow/{name}", slow),
                Route("/write", write, methods=["GET", "POST"]),
                Route("/news", news),
                Route("/prices", prices),
                Route("/together/{name}", together),
                Route("/raised", raised),
                Route("/raised-uncached", raised_uncached),
                Mount("/api", routes=[Route("/items/{item_id:int}", item)]),
            ]
        )
        self.asgi = CountArrivals(self.app, self)


@pytest.fixture
def target() -> App:
    return App()


@pytest.fixture
def client(target: App) -> Iterator[TestClient]:
    with TestClient(target.asgi, base_url="http://shop.example") as test_client:
        yield test_client


def test_a_miss_then_hits_with_the_caching_headers(target: App, client: TestClient) -> None:
    first = client.get("/items/3")
    second = client.get("/items/3")
    assert first.json() == second.json() == {"item": 3, "query": [], "run": 1}
    assert target.calls["item"] == 1
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert first.headers["cache-control"] == "public, max-age=60"
    assert first.headers["vary"] == "Authorization, Cookie"
    assert first.headers["etag"] == second.headers["etag"]
    assert second.headers["age"] == "0"
    assert second.headers["content-type"] == "application/json"
    assert second.headers["content-length"] == str(len(second.content))
    stats = target.item.stats()
    assert stats["/items/{item_id:int}"]["hits"] == 1
    assert stats["/items/{item_id:int}"]["computations"] == 1


def test_the_query_is_in_the_key_in_any_order(target: App, client: TestClient) -> None:
    a = client.get("/items/3?b=2&a=1")
    b = client.get("/items/3?a=1&b=2")
    c = client.get("/items/3?a=1&b=3")
    d = client.get("/items/4?a=1&b=2")
    assert (a.headers["x-cache"], b.headers["x-cache"]) == ("MISS", "HIT")
    assert c.headers["x-cache"] == "MISS" and c.json()["query"] == [["a", "1"], ["b", "3"]]
    assert d.headers["x-cache"] == "MISS" and d.json()["item"] == 4
    assert target.calls["item"] == 3


def test_the_host_and_the_mount_are_in_the_key(target: App, client: TestClient) -> None:
    client.get("/items/3")
    other = client.get("/items/3", headers={"host": "evil.example"})
    mounted = client.get("/api/items/3")
    assert other.headers["x-cache"] == "MISS" and mounted.headers["x-cache"] == "MISS"
    assert target.calls["item"] == 3
    assert set(target.registry.snapshot()["routes"]) == {
        "/items/{item_id:int}",
        "/api/items/{item_id:int}",
    }


def test_two_users_never_see_each_others_response(target: App, client: TestClient) -> None:
    for _ in range(2):
        alice = client.get("/me", headers={"authorization": "Bearer alice"})
        bob = client.get("/me", headers={"authorization": "Bearer bob"})
        assert alice.json() == {"user": "Bearer alice"}
        assert bob.json() == {"user": "Bearer bob"}
        assert alice.headers["cache-control"] == "private, max-age=60"
        assert bob.headers["vary"] == "Authorization, Cookie"
    assert target.calls["me"] == 2  # one entry per user, each computed once
    assert alice.headers["x-cache"] == bob.headers["x-cache"] == "HIT"
    anonymous = client.get("/me")
    assert anonymous.json() == {"user": None}


def test_a_credential_outside_the_key_bypasses(target: App, client: TestClient) -> None:
    seen = []
    for who in ("alice", "bob", "alice"):
        response = client.get("/whoami", headers={"authorization": who})
        seen.append(response.json()["user"])
        assert response.headers["x-cache"] == "BYPASS"
        assert response.headers["cache-control"] == "private"
        assert response.headers["vary"] == "Authorization, Cookie"
    client.cookies.set("user", "carol")
    cookie = client.get("/whoami")
    client.cookies.clear()
    api_key = client.get("/whoami", headers={"x-api-key": "k1"})
    assert seen == ["alice", "bob", "alice"] and cookie.json()["user"] == "carol"
    assert cookie.headers["x-cache"] == api_key.headers["x-cache"] == "BYPASS"
    assert target.calls["whoami"] == 5
    assert target.cache.keys() == []  # nothing of theirs was stored
    # without credentials the view is cached as usual
    assert client.get("/whoami").headers["x-cache"] == "MISS"
    assert client.get("/whoami").headers["x-cache"] == "HIT"


def test_shared_views_serve_everyone_one_entry(target: App, client: TestClient) -> None:
    a = client.get("/banner", headers={"authorization": "alice"})
    b = client.get("/banner", headers={"authorization": "bob"})
    assert (a.headers["x-cache"], b.headers["x-cache"]) == ("MISS", "HIT")
    assert a.headers["cache-control"] == "public, max-age=60"
    assert "vary" not in a.headers
    assert target.calls["banner"] == 1


def test_a_views_own_cookie_or_no_store_is_never_stored(target: App, client: TestClient) -> None:
    first = client.get("/login")
    client.cookies.clear()
    second = client.get("/login")
    assert first.text == "welcome 1" and second.text == "welcome 2"
    assert first.headers["set-cookie"].startswith("session=s1")
    assert second.headers["set-cookie"].startswith("session=s2")
    assert first.headers["x-cache"] == "MISS"
    client.cookies.clear()
    for _ in range(2):
        response = client.get("/nostore")
        assert response.headers["cache-control"] == "no-store"
    assert target.calls["nostore"] == 2
    assert target.cache.keys() == []


def test_the_views_cache_control_wins(target: App, client: TestClient) -> None:
    first = client.get("/own-control")
    second = client.get("/own-control")
    assert second.headers["x-cache"] == "HIT"
    assert first.headers["cache-control"] == second.headers["cache-control"] == "no-cache"


def test_etag_and_304(target: App, client: TestClient) -> None:
    first = client.get("/items/7")
    etag = first.headers["etag"]
    again = client.get("/items/7", headers={"if-none-match": f'W/{etag}, "other"'})
    other = client.get("/items/7", headers={"if-none-match": '"nope"'})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == etag
    assert again.headers["cache-control"] == "public, max-age=60"
    assert again.headers["vary"] == "Authorization, Cookie"
    assert other.status_code == 200 and other.content == first.content
    assert target.item.stats()["/items/{item_id:int}"]["not_modified"] == 1
    assert target.calls["item"] == 1


def test_head_is_answered_from_the_entry_without_a_body(target: App, client: TestClient) -> None:
    full = client.get("/items/8")
    head = client.head("/items/8")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["x-cache"] == "HIT"
    assert head.headers["content-length"] == str(len(full.content))


def test_only_get_and_head_are_cached(target: App, client: TestClient) -> None:
    posted = [client.post("/write").text for _ in range(2)]
    assert posted == ["write 1", "write 2"]
    assert [client.get("/write").text for _ in range(2)] == ["write 3", "write 3"]


def test_statuses_streams_and_sync_endpoints(target: App, client: TestClient) -> None:
    assert [client.get("/missing").status_code for _ in range(2)] == [404, 404]
    assert target.calls["missing"] == 2  # a 4xx is not stored without cache_4xx
    gone = [client.get("/gone") for _ in range(2)]
    assert [r.headers["x-cache"] for r in gone] == ["MISS", "HIT"]
    assert gone[1].status_code == 410 and gone[1].text == "gone"
    assert [client.get("/stream").content for _ in range(2)] == [b"ab", b"ab"]
    assert target.calls["stream"] == 2  # a stream is never stored
    assert [client.get("/sync").text for _ in range(2)] == ["sync 1", "sync 1"]


async def test_invalidate_every_variant_of_a_path(target: App) -> None:
    transport = httpx.ASGITransport(app=target.asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.example") as client:
        await client.get("/items/3?a=1")
        await client.get("/items/3?a=2")
        await client.get("/items/4")
        assert await target.item.invalidate(item_id=3) is True
        assert (await client.get("/items/3?a=1")).headers["x-cache"] == "MISS"
        assert (await client.get("/items/3?a=2")).headers["x-cache"] == "MISS"
        assert (await client.get("/items/4")).headers["x-cache"] == "HIT"
        assert await target.item.invalidate(item_id=99) is False
        assert await target.item.invalidate_all() == 3
        assert (await client.get("/items/4")).headers["x-cache"] == "MISS"


async def test_a_key_template_and_its_tags(target: App) -> None:
    transport = httpx.ASGITransport(app=target.asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.example") as client:
        await client.get("/products/a b?x=1")
        hit = await client.get("/products/a b?x=2")  # the template ignores the query
        assert hit.headers["x-cache"] == "HIT"
        stored = target.product.key(product_id="a b")
        assert stored == "product:a%20b@test_starlette.App.__init__.<locals>.product"
        assert target.cache.keys() == [stored]
        assert await target.product.invalidate(product_id="a b") is True
        assert (await client.get("/products/a b")).headers["x-cache"] == "MISS"
        assert target.cache.invalidate_tag("products") == 1
        assert target.cache.keys() == []


def test_a_views_key_is_of_the_only_origin_it_served(target: App, client: TestClient) -> None:
    with pytest.raises(ConfigurationError, match=r"which origin\?.* \(this process served none\)"):
        target.item.key(path="/items/3")
    client.get("/items/3")
    shop = target.item.key(path="/items/3")
    assert [shop] == target.cache.keys()
    client.get("/items/3", headers={"host": "other.example"})
    with pytest.raises(ConfigurationError, match=r"served http://other\.example, http://shop"):
        target.item.key(path="/items/3")
    other = target.item.key(path="/items/3", origin="http://other.example")
    assert sorted(target.cache.keys()) == [other, shop]


async def overlapping(target: App, path: str, n: int) -> tuple[list[Any], Any]:
    """`n` overlapping GETs of `path` (the endpoint returns only once all `n` arrived), then
    one more after they all ended."""
    target.hold_for = n
    transport = httpx.ASGITransport(app=target.asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.example") as client:
        responses = await asyncio.gather(*(client.get(path) for _ in range(n)))
        return responses, await client.get(path)


async def test_concurrent_identical_requests_compute_once(target: App) -> None:
    responses, after = await overlapping(target, "/slow/x", 20)
    assert target.calls["slow"] == 1
    assert Counter(r.headers["x-cache"] for r in responses) == {"MISS": 1, "COALESCED": 19}
    assert {r.content for r in responses} == {after.content}
    assert after.headers["x-cache"] == "HIT"
    stats = target.slow.stats()["/slow/{name}"]
    assert (stats["misses"], stats["coalesced"], stats["computations"]) == (1, 19, 1)


async def test_coalesced_shares_one_run_and_keeps_nothing(target: App) -> None:
    responses, after = await overlapping(target, "/together/x", 12)
    assert Counter(r.headers["x-cache"] for r in responses) == {"MISS": 1, "COALESCED": 11}
    assert {r.content for r in responses} == {b'{"name":"x","run":1}'}
    # nothing was kept: the next request runs the endpoint again, no max-age nor Age sent
    assert (after.headers["x-cache"], after.json()["run"], target.calls["together"]) == (
        "MISS",
        2,
        2,
    )
    assert "age" not in after.headers and "max-age" not in after.headers.get("cache-control", "")
    assert target.cache.keys() == []


def test_a_raised_4xx_is_cached_with_cache_4xx_and_raised_again(
    target: App, client: TestClient
) -> None:
    first, second = client.get("/raised"), client.get("/raised")
    assert target.calls["raised"] == 1
    for response in (first, second):  # Starlette's handler renders it, headers and all
        assert (response.status_code, response.text) == (404, "no such item")
        assert response.headers["x-reason"] == "sold out"
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert second.headers["cache-control"] == "public, max-age=60"
    # without cache_4xx a raised 404 is raised for every request, as before
    plain = [client.get("/raised-uncached") for _ in range(2)]
    assert [(r.status_code, r.text) for r in plain] == [(404, "not here")] * 2
    assert target.calls["raised_uncached"] == 2


@pytest.mark.parametrize("status", [503, 302])
def test_cache_4xx_keeps_no_other_raised_status(status: int) -> None:
    cache, calls = Cache(), Counter[str]()

    @cached(ttl=60, cache=cache, cache_4xx=True, registry=MetricsRegistry())
    async def down(request: Request) -> Response:
        calls["down"] += 1
        raise HTTPException(status, detail="not now")

    with TestClient(Starlette(routes=[Route("/down", down)])) as client:
        responses = [client.get("/down", follow_redirects=False) for _ in range(2)]
    assert [r.status_code for r in responses] == [status, status]
    assert calls["down"] == 2 and cache.keys() == []  # raised to every request, never kept


async def test_concurrent_users_never_share_a_computation(target: App) -> None:
    transport = httpx.ASGITransport(app=target.asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.example") as client:
        requests = [
            client.get("/me", headers={"authorization": f"user-{i % 4}"}) for i in range(40)
        ]
        responses = await asyncio.gather(*requests)
    for i, response in enumerate(responses):
        assert response.json() == {"user": f"user-{i % 4}"}
    assert target.calls["me"] == 4


async def test_a_stale_entry_is_served_then_refreshed(target: App) -> None:
    transport = httpx.ASGITransport(app=target.asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.example") as client:
        first = await client.get("/news?lang=fr")
        await asyncio.sleep(0.25)  # past the 0.2 s ttl: nothing to wait for but the clock
        stale = await client.get("/news?lang=fr")
        assert stale.headers["x-cache"] == "STALE" and stale.json() == first.json()
        assert int(stale.headers["age"]) >= 1
        deadline = time.monotonic() + 10
        while (fresh := await client.get("/news?lang=fr")).json()["run"] != 2:
            assert time.monotonic() < deadline, "the stale entry was never refreshed"
            await asyncio.sleep(0.01)  # the refresh task stores when it ends
    assert fresh.json() == {"lang": "fr", "run": 2}


def test_a_clients_no_cache_recomputes_only_when_honoured(target: App, client: TestClient) -> None:
    assert client.get("/prices").json() == {"run": 1}
    assert client.get("/prices").headers["x-cache"] == "HIT"
    again = client.get("/prices", headers={"cache-control": "no-cache"})
    assert again.json() == {"run": 2} and again.headers["x-cache"] == "MISS"
    client.get("/items/1")
    ignored = client.get("/items/1", headers={"cache-control": "no-cache"})
    assert ignored.headers["x-cache"] == "HIT"  # not honoured: anyone could stampede


def test_options_are_checked_when_decorating() -> None:
    async def view(request: Request) -> Response:
        return PlainTextResponse("x")

    with pytest.raises(ConfigurationError, match="vary"):
        cached(vary="accept")(view)
    with pytest.raises(ConfigurationError, match="shared"):
        cached(shared="no")(view)
    with pytest.raises(ConfigurationError, match="ttl"):
        cached(ttl=float("nan"))(view)
    with pytest.raises(KeyTemplateError):
        cached(key="item:{item_id")(view)


def test_a_disabled_cache_calls_the_view(target: App, client: TestClient) -> None:
    target.cache.enabled = False
    assert [json.loads(client.get("/items/1").content)["run"] for _ in range(2)] == [1, 2]
    assert "x-cache" not in client.get("/items/1").headers


def test_bare_decorator_uses_the_default_cache() -> None:
    @cached
    async def hello(request: Request) -> Response:
        return PlainTextResponse("hi")

    with TestClient(Starlette(routes=[Route("/hello", hello)])) as client:
        assert client.get("/hello").headers["x-cache"] == "MISS"
        assert client.get("/hello").headers["x-cache"] == "HIT"


def test_hostile_paths_make_no_new_metrics_names(target: App, client: TestClient) -> None:
    """A client that walks ids (and the mounted copy of the route) adds no metrics names:
    one per route template, on every Starlette (before 1.7 there is no scope["route"])."""
    for item_id in range(200):
        assert client.get(f"/items/{item_id}?x={item_id}").status_code == 200
        assert client.get(f"/api/items/{item_id}").status_code == 200
    templates = {"/items/{item_id:int}", "/api/items/{item_id:int}"}
    assert set(target.registry.snapshot()["routes"]) == templates
    stats = target.item.stats()
    assert set(stats) == templates
    assert stats["/items/{item_id:int}"]["computations"] == 200
    assert stats["/api/items/{item_id:int}"]["computations"] == 200


class Passthrough:
    """Pure ASGI middleware that keeps the app it wraps as `.app`."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def test_every_route_is_named_by_its_templates_wherever_it_is_mounted() -> None:
    """Mount templates with parameters, a mounted Starlette app behind middleware, a Host,
    one endpoint under several templates and a decorator around the cached endpoint: each
    request is named by the templates of the mounts and route it went through."""
    registry, calls = MetricsRegistry(), Counter[str]()

    @cached(ttl=60, cache=Cache(), registry=registry)
    async def page(request: Request) -> Response:
        calls["page"] += 1
        return JSONResponse(request.path_params)

    def logged(endpoint: Any) -> Any:
        @functools.wraps(endpoint)
        async def wrapper(request: Request) -> Response:
            return cast(Response, await endpoint(request))

        return wrapper

    inner = Starlette(routes=[Route("/pages/{n:int}", page)])
    app = Starlette(
        routes=[
            Route("/pages/{n:int}", page),
            Route("/page-{n:int}.html", page),
            Mount("/shops/{shop}", routes=[Route("/pages/{n:int}", page)]),
            Mount("/v1", app=Passthrough(inner)),
            Mount("/v2", routes=[Mount("/deep", routes=[Route("/{n:int}", logged(page))])]),
            Host("admin.example", app=Router(routes=[Route("/admin/{n:int}", page)])),
        ]
    )
    paths = {
        "/pages/{n:int}": [f"/pages/{n}" for n in range(20)],
        "/page-{n:int}.html": [f"/page-{n}.html" for n in range(20)],
        "/shops/{shop}/pages/{n:int}": [f"/shops/s{n}/pages/{n}" for n in range(20)],
        "/v1/pages/{n:int}": [f"/v1/pages/{n}" for n in range(20)],
        "/v2/deep/{n:int}": [f"/v2/deep/{n}" for n in range(20)],
    }
    with TestClient(app, base_url="http://shop.example") as client:
        for urls in paths.values():
            for url in urls:
                assert client.get(url).status_code == 200
        for n in range(20):
            admin = client.get(f"/admin/{n}", headers={"host": "admin.example"})
            assert admin.json() == {"n": n}
    names = set(paths) | {"/admin/{n:int}"}
    assert set(registry.snapshot()["routes"]) == names
    assert {name: stats["computations"] for name, stats in page.stats().items()} == {
        name: 20 for name in names
    }
    assert calls["page"] == 20 * len(names)


def test_a_route_that_cannot_be_found_is_named_by_the_endpoint() -> None:
    """An endpoint served outside any router (a bare Route as the ASGI app) is named by its
    qualified name: one name, whatever the paths."""
    registry = MetricsRegistry()

    @cached(ttl=60, cache=Cache(), registry=registry)
    async def lone(request: Request) -> Response:
        return JSONResponse(request.path_params)

    client = TestClient(Route("/lone/{n:int}", lone))  # no lifespan: a Route has none
    for n in range(20):
        assert client.get(f"/lone/{n}").json() == {"n": n}
    assert set(registry.snapshot()["routes"]) == {f"{__name__}.{lone.__qualname__}"}
