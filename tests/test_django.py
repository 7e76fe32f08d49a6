"""`coalesce.django.cached` on real Django views through Django's test clients (no mocks):
sync views with threads, async views with tasks, the credentials rule, session and CSRF
cookies, headers, 304, invalidation, metrics, in memory and on a real Redis.

Django is configured here (settings of this module: `ROOT_URLCONF` is this module);
`tests/test_django_server.py` serves the same views from a uvicorn process.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import django
import pytest
from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False,
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        SECRET_KEY="coalesce-tests-only",
        MIDDLEWARE=[
            f"{__name__}.count_arrivals",
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.middleware.csrf.CsrfViewMiddleware",
        ],
        SESSION_ENGINE="django.contrib.sessions.backends.signed_cookies",
        INSTALLED_APPS=[],
        DATABASES={},
        USE_TZ=True,
    )
    django.setup()

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.middleware.csrf import get_token
from django.test import AsyncClient, Client
from django.urls import path

import coalesce
from coalesce import Cache
from coalesce.django import cached, coalesced
from coalesce.http.metrics import MetricsRegistry

GATE_TIMEOUT = 10.0
REGISTRY = MetricsRegistry()
CALLS: Counter[str] = Counter()
ARRIVED: Counter[str] = Counter()
GATE = {"hold_for": 0}
ALL_ARRIVED = threading.Event()
LOCK = threading.Lock()


def arrive(request: HttpRequest) -> None:
    with LOCK:
        ARRIVED[request.path] += 1
        if ARRIVED[request.path] >= GATE["hold_for"]:
            ALL_ARRIVED.set()


def count_arrivals(get_response: Any) -> Any:
    """Middleware (sync and async): counts requests per path before any view runs."""
    if iscoroutinefunction(get_response):

        async def async_middleware(request: HttpRequest) -> Any:
            arrive(request)
            return await get_response(request)

        return markcoroutinefunction(async_middleware)

    def middleware(request: HttpRequest) -> Any:
        arrive(request)
        return get_response(request)

    return middleware


count_arrivals.sync_capable = True  # type: ignore[attr-defined]
count_arrivals.async_capable = True  # type: ignore[attr-defined]


def ran(name: str) -> int:
    with LOCK:
        CALLS[name] += 1
        return CALLS[name]


@cached(ttl=60, registry=REGISTRY)
def item(request: HttpRequest, item_id: int) -> HttpResponse:
    run = ran("item")
    query = sorted((k, v) for k, vs in request.GET.lists() for v in vs)
    return JsonResponse({"item": item_id, "query": query, "run": run})


@cached(ttl=60, vary=["authorization", "cookie"], registry=REGISTRY)
def me(request: HttpRequest) -> HttpResponse:
    ran("me")
    return JsonResponse({"user": request.headers.get("authorization") or request.COOKIES.get("u")})


@cached(ttl=60, registry=REGISTRY)
def whoami(request: HttpRequest) -> HttpResponse:
    ran("whoami")
    return JsonResponse({"user": request.headers.get("authorization") or request.COOKIES.get("u")})


@cached(ttl=60, registry=REGISTRY)
def visit(request: HttpRequest) -> HttpResponse:
    request.session["visits"] = ran("visit")  # the middleware sets the cookie after the view
    return HttpResponse(f"visit {CALLS['visit']}")


@cached(ttl=60, registry=REGISTRY)
def form(request: HttpRequest) -> HttpResponse:
    ran("form")
    return HttpResponse(f"<input name=csrfmiddlewaretoken value={get_token(request)}>")


@cached(ttl=60, registry=REGISTRY)
def cookie(request: HttpRequest) -> HttpResponse:
    response = HttpResponse(f"cookie {ran('cookie')}")
    response.set_cookie("seen", "1")
    return response


@cached(ttl=60, key="product:{name}", tags=["products"], registry=REGISTRY)
def product(request: HttpRequest, name: str) -> HttpResponse:
    return JsonResponse({"product": name, "run": ran("product")})


@cached(ttl=60, registry=REGISTRY)
def stream(request: HttpRequest) -> HttpResponse:
    ran("stream")
    return StreamingHttpResponse(iter([b"a", b"b"]))


@cached(ttl=60, registry=REGISTRY)
def slow(request: HttpRequest, name: str) -> HttpResponse:
    ran("slow")
    if not ALL_ARRIVED.wait(GATE_TIMEOUT):
        return HttpResponse("the requests never overlapped", status=500)
    return JsonResponse({"name": name})


@cached(ttl=60, registry=REGISTRY)
async def aslow(request: HttpRequest, name: str) -> HttpResponse:
    ran("aslow")
    if not await asyncio.to_thread(ALL_ARRIVED.wait, GATE_TIMEOUT):
        return HttpResponse("the requests never overlapped", status=500)
    return JsonResponse({"name": name, "async": True})


@cached(ttl=60, vary=["authorization"], registry=REGISTRY)
async def ame(request: HttpRequest) -> HttpResponse:
    ran("ame")
    await asyncio.sleep(0)
    return JsonResponse({"user": request.headers.get("authorization")})


@cached(ttl=0.2, stale_ttl=30, registry=REGISTRY)
def news(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"lang": request.GET.get("lang"), "run": ran("news")})


@coalesced(registry=REGISTRY)
def together(request: HttpRequest, name: str) -> HttpResponse:
    run = ran("together")
    if not ALL_ARRIVED.wait(GATE_TIMEOUT):
        return HttpResponse("the requests never overlapped", status=500)
    return JsonResponse({"name": name, "run": run})


@cached(ttl=60, cache_4xx=True, registry=REGISTRY)
def lost(request: HttpRequest, item_id: int) -> HttpResponse:
    ran("lost")
    raise Http404(f"no item {item_id}")


@cached(ttl=60, registry=REGISTRY)
def lost_uncached(request: HttpRequest) -> HttpResponse:
    ran("lost_uncached")
    raise Http404("not here")


def calls(request: HttpRequest) -> HttpResponse:
    return JsonResponse(dict(CALLS))


async def drop(request: HttpRequest, item_id: int) -> HttpResponse:
    return JsonResponse({"removed": await item.ainvalidate(item_id=item_id)})


urlpatterns = [
    path("items/<int:item_id>/", item),
    path("me/", me),
    path("whoami/", whoami),
    path("visit/", visit),
    path("form/", form),
    path("cookie/", cookie),
    path("products/<str:name>/", product),
    path("stream/", stream),
    path("slow/<str:name>/", slow),
    path("aslow/<str:name>/", aslow),
    path("ame/", ame),
    path("news/", news),
    path("calls/", calls),
    path("together/<str:name>/", together),
    path("lost/<int:item_id>/", lost),
    path("lost-uncached/", lost_uncached),
    path("drop/<int:item_id>/", drop),
]


@pytest.fixture(autouse=True)
def fresh_state() -> Iterator[Cache]:
    """A cache of the test's own (the views use the default cache), counters at zero."""
    cache = coalesce.configure(Cache())
    CALLS.clear()
    ARRIVED.clear()
    REGISTRY.reset()
    GATE["hold_for"] = 0
    ALL_ARRIVED.clear()
    yield cache
    coalesce.configure(Cache())


def test_a_miss_then_hits_with_the_caching_headers() -> None:
    client = Client()
    first = client.get("/items/3/")
    second = client.get("/items/3/")
    assert first.json() == second.json() == {"item": 3, "query": [], "run": 1}
    assert (first["x-cache"], second["x-cache"]) == ("MISS", "HIT")
    assert first["cache-control"] == "public, max-age=60"
    assert first["vary"] == "Authorization, Cookie"
    assert first["etag"] == second["etag"] and second["age"] == "0"
    assert second["content-type"] == "application/json"
    assert item.stats()["/items/<int:item_id>/"]["hits"] == 1


def test_query_host_and_method(fresh_state: Cache) -> None:
    client = Client()
    client.get("/items/3/?b=2&a=1")
    assert client.get("/items/3/?a=1&b=2")["x-cache"] == "HIT"
    assert client.get("/items/3/?a=1&b=3")["x-cache"] == "MISS"
    assert client.get("/items/3/?a=1&b=2", headers={"host": "evil.example"})["x-cache"] == "MISS"
    posted = client.post("/items/3/?a=1&b=2")
    assert not posted.has_header("x-cache") and posted.json()["run"] == 4
    assert len(fresh_state.keys()) == 3


def test_two_users_never_see_each_others_response() -> None:
    client = Client()
    for _ in range(2):
        alice = client.get("/me/", headers={"authorization": "alice"})
        bob = client.get("/me/", headers={"authorization": "bob"})
        assert alice.json() == {"user": "alice"} and bob.json() == {"user": "bob"}
        assert alice["cache-control"] == "private, max-age=60"
    client.cookies["u"] = "carol"
    carol = [client.get("/me/").json() for _ in range(2)]
    client.cookies["u"] = "dave"
    assert carol == [{"user": "carol"}] * 2 and client.get("/me/").json() == {"user": "dave"}
    assert CALLS["me"] == 4


def test_a_credential_outside_the_key_bypasses(fresh_state: Cache) -> None:
    client = Client()
    for who in ("alice", "bob"):
        response = client.get("/whoami/", headers={"authorization": who})
        assert response.json() == {"user": who}
        assert response["x-cache"] == "BYPASS" and response["cache-control"] == "private"
    client.cookies["u"] = "carol"
    assert client.get("/whoami/").json() == {"user": "carol"}
    assert fresh_state.keys() == []


def test_session_csrf_and_cookies_are_never_stored(fresh_state: Cache) -> None:
    first = Client().get("/visit/")
    assert "sessionid" in first.cookies and first["x-cache"] == "MISS"
    assert Client().get("/visit/").content == b"visit 2"
    tokens = [Client().get("/form/") for _ in range(2)]
    assert tokens[0].content != tokens[1].content  # each visitor its own CSRF token
    assert all("csrftoken" in r.cookies for r in tokens)
    assert [Client().get("/cookie/").content for _ in range(2)] == [b"cookie 1", b"cookie 2"]
    assert fresh_state.keys() == []


def test_etag_304_and_head() -> None:
    client = Client()
    first = client.get("/items/7/")
    again = client.get("/items/7/", headers={"if-none-match": first["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert again["etag"] == first["etag"] and again["cache-control"] == "public, max-age=60"
    head = client.head("/items/7/")
    assert head.status_code == 200 and head.content == b"" and head["x-cache"] == "HIT"
    assert head["content-length"] == str(len(first.content))
    assert item.stats()["/items/<int:item_id>/"]["not_modified"] == 1


def test_streams_are_not_cached() -> None:
    client = Client()
    assert [b"".join(client.get("/stream/").streaming_content) for _ in range(2)] == [b"ab"] * 2
    assert CALLS["stream"] == 2


def test_invalidate_and_templates(fresh_state: Cache) -> None:
    client = Client()
    client.get("/items/3/?a=1")
    client.get("/items/3/?a=2")
    client.get("/items/4/")
    assert item.invalidate(item_id=3) is True
    assert client.get("/items/3/?a=1")["x-cache"] == "MISS"
    assert client.get("/items/4/")["x-cache"] == "HIT"
    assert item.invalidate_all() == 2
    client.get("/products/tea/?x=1")
    assert client.get("/products/tea/?x=2")["x-cache"] == "HIT"
    assert product.key(name="tea") == "product:tea@test_django.product"
    assert product.invalidate(name="tea") is True
    assert client.get("/products/tea/").json()["run"] == 2
    assert fresh_state.invalidate_tag("products") == 1


def test_a_stale_entry_is_refreshed_in_the_background() -> None:
    client = Client()
    first = client.get("/news/?lang=fr")
    time.sleep(0.25)  # past the 0.2 s ttl: nothing to wait for but the clock
    stale = client.get("/news/?lang=fr")
    assert stale["x-cache"] == "STALE" and stale.json() == first.json()
    deadline = time.monotonic() + 10
    while (fresh := client.get("/news/?lang=fr")).json()["run"] != 2:
        assert time.monotonic() < deadline, "the stale entry was never refreshed"
        time.sleep(0.01)  # the refresh stores from a worker thread: nothing to await
    assert fresh.json() == {"lang": "fr", "run": 2}


def test_sync_views_on_threads_compute_once() -> None:
    GATE["hold_for"] = 12  # the view returns only after all 12 requests arrived
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: Client().get("/slow/x/"), range(12)))
    assert CALLS["slow"] == 1
    assert [r.status_code for r in responses] == [200] * 12
    statuses = Counter(r["x-cache"] for r in responses)
    assert statuses["MISS"] == 1 and statuses["COALESCED"] + statuses["HIT"] == 11


async def test_async_views_on_tasks_compute_once() -> None:
    GATE["hold_for"] = 12
    client = AsyncClient()
    responses = await asyncio.gather(*(client.get("/aslow/y/") for _ in range(12)))
    assert CALLS["aslow"] == 1
    assert {r.content for r in responses} == {b'{"name": "y", "async": true}'}
    statuses = Counter(r["x-cache"] for r in responses)
    assert statuses["MISS"] == 1 and statuses["COALESCED"] + statuses["HIT"] == 11
    users = await asyncio.gather(
        *(client.get("/ame/", headers={"authorization": f"u{i % 3}"}) for i in range(12))
    )
    assert [r.json()["user"] for r in users] == [f"u{i % 3}" for i in range(12)]
    assert CALLS["ame"] == 3


def test_coalesced_sync_views_share_runs_and_keep_nothing(fresh_state: Cache) -> None:
    GATE["hold_for"] = 12  # the view returns only after all 12 requests arrived
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: Client().get("/together/x/"), range(12)))
    runs = CALLS["together"]
    statuses = Counter(r["x-cache"] for r in responses)
    # requests that joined a run get its response; one that reached the flight after it
    # ended (a thread descheduled between arriving and joining) runs the view itself
    assert runs < 12 and statuses == {"MISS": runs, "COALESCED": 12 - runs}
    assert all(r.status_code == 200 and r.json()["name"] == "x" for r in responses)
    after = Client().get("/together/x/")  # nothing was kept: it runs again
    assert after["x-cache"] == "MISS" and CALLS["together"] == runs + 1
    assert fresh_state.keys() == []


def test_a_raised_http404_is_cached_with_cache_4xx() -> None:
    client = Client()
    first, second = client.get("/lost/3/"), client.get("/lost/3/")
    assert [first.status_code, second.status_code] == [404, 404]  # Django's 404 page
    assert CALLS["lost"] == 1
    assert client.get("/lost/4/").status_code == 404 and CALLS["lost"] == 2
    plain = [client.get("/lost-uncached/") for _ in range(2)]  # without cache_4xx
    assert [r.status_code for r in plain] == [404, 404] and CALLS["lost_uncached"] == 2


def test_redis_threads_and_users(redis_caches: Callable[..., Cache]) -> None:
    coalesce.configure(redis_caches())
    GATE["hold_for"] = 8
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: Client().get("/slow/r/"), range(8)))
    assert CALLS["slow"] == 1 and {r.content for r in responses} == {b'{"name": "r"}'}
    for who in ("alice", "bob", "alice"):
        assert Client().get("/me/", headers={"authorization": who}).json() == {"user": who}
    assert CALLS["me"] == 2
    Client().get("/items/1/")
    coalesce.configure(redis_caches())  # another "process": it meets the first in Redis
    assert Client().get("/items/1/")["x-cache"] == "HIT"
    assert item.invalidate(item_id=1) is True
    assert Client().get("/items/1/")["x-cache"] == "MISS"


@pytest.mark.parametrize(
    ("edge", "module"), [("django", "django"), ("flask", "flask"), ("starlette", "starlette")]
)
def test_import_without_the_framework_names_the_extra(edge: str, module: str) -> None:
    code = f"import sys; sys.modules[{module!r}] = None\nimport coalesce.{edge}"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"coalesce.errors.MissingDependencyError: coalesce.{edge} needs")
    assert f"pip install 'coalesce-cache[{edge}]'" in last
