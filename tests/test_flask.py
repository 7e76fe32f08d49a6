"""`coalesce.flask.cached` on real Flask apps through Flask's test client (no mocks): keys,
the credentials rule, headers, 304, invalidation, metrics, and concurrent requests on
threads sharing one run of the view, in memory and on a real Redis."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import flask
import pytest
from flask import Flask, Response, abort, request

from coalesce import Cache, ConfigurationError
from coalesce.flask import cached, coalesced
from coalesce.http.metrics import MetricsRegistry

GATE_TIMEOUT = 10.0


class App:
    """A Flask app whose cached views count their runs. With `hold_for = n`, `/slow/<name>`
    runs until n requests for its path have arrived (counted before any view runs)."""

    def __init__(self, cache: Cache | None = None) -> None:
        self.cache = cache or Cache()
        self.registry = MetricsRegistry()
        self.calls: Counter[str] = Counter()
        self.arrived: Counter[str] = Counter()
        self.hold_for = 0
        self.all_arrived = threading.Event()
        self.lock = threading.Lock()
        app = self.app = Flask(__name__)
        app.secret_key = "test-secret"
        options: dict[str, Any] = {"cache": self.cache, "registry": self.registry}

        @app.before_request
        def count_arrivals() -> None:
            with self.lock:
                self.arrived[request.path] += 1
                if self.arrived[request.path] >= self.hold_for:
                    self.all_arrived.set()

        @app.route("/items/<int:item_id>", methods=["GET", "POST"])
        @cached(ttl=60, **options)
        def item(item_id: int) -> Any:
            with self.lock:
                self.calls["item"] += 1
                run = self.calls["item"]
            return {"item": item_id, "query": sorted(request.args.items(multi=True)), "run": run}

        @app.get("/me")
        @cached(ttl=60, vary=["authorization", "cookie"], **options)
        def me() -> Any:
            self.calls["me"] += 1
            return {"user": request.headers.get("authorization") or request.cookies.get("user")}

        @app.get("/whoami")
        @cached(ttl=60, **options)
        def whoami() -> Any:
            self.calls["whoami"] += 1
            return {"user": request.headers.get("authorization") or request.cookies.get("user")}

        @app.get("/login")
        @cached(ttl=60, **options)
        def login() -> Any:
            self.calls["login"] += 1
            flask.session["visits"] = self.calls["login"]  # Flask sets the cookie later
            return f"welcome {self.calls['login']}"

        @app.get("/cookie")
        @cached(ttl=60, **options)
        def cookie() -> Any:
            self.calls["cookie"] += 1
            response = flask.make_response(f"cookie {self.calls['cookie']}")
            response.set_cookie("seen", "1")
            return response

        @app.get("/private")
        @cached(ttl=60, **options)
        def private() -> Any:
            self.calls["private"] += 1
            return "mine", 200, {"Cache-Control": "private"}

        @app.get("/products/<name>")
        @cached(ttl=60, key="product:{name}", tags=["products"], **options)
        def product(name: str) -> Any:
            self.calls["product"] += 1
            return {"product": name, "run": self.calls["product"]}

        @app.get("/missing")
        @cached(ttl=60, **options)
        def missing() -> Any:
            self.calls["missing"] += 1
            return "no such thing", 404

        @app.get("/stream")
        @cached(ttl=60, **options)
        def stream() -> Any:
            self.calls["stream"] += 1
            return Response((c for c in (b"a", b"b")), mimetype="text/plain")

        @app.get("/async")
        @cached(ttl=60, **options)
        async def async_view() -> Any:
            self.calls["async"] += 1
            return {"async": self.calls["async"]}

        @app.get("/slow/<name>")
        @cached(ttl=60, **options)
        def slow(name: str) -> Any:
            with self.lock:
                self.calls["slow"] += 1
            if not self.all_arrived.wait(GATE_TIMEOUT):
                return "the requests never overlapped", 500
            return {"name": name}

        @app.get("/news")
        @cached(ttl=0.2, stale_ttl=30, **options)
        def news() -> Any:  # reads the request: a refresh needs a request context too
            self.calls["news"] += 1
            return {"lang": request.args.get("lang"), "run": self.calls["news"]}

        @app.get("/together/<name>")
        @coalesced(**options)
        def together(name: str) -> Any:
            with self.lock:
                self.calls["together"] += 1
            if not self.all_arrived.wait(GATE_TIMEOUT):
                return "the requests never overlapped", 500
            return {"name": name}

        @app.errorhandler(404)
        def not_found(error: Any) -> Any:  # the app's own rendering of a 404
            return {"error": error.description}, 404

        @app.get("/raised/<int:item_id>")
        @cached(ttl=60, cache_4xx=True, **options)
        def raised(item_id: int) -> Any:
            self.calls["raised"] += 1
            abort(404, f"no item {item_id}")

        @app.get("/raised-uncached")
        @cached(ttl=60, **options)
        def raised_uncached() -> Any:
            self.calls["raised_uncached"] += 1
            abort(404, "not here")

        self.item, self.product, self.slow = item, product, slow


@pytest.fixture
def target() -> App:
    return App()


@pytest.fixture
def client(target: App) -> Any:
    return target.app.test_client()


def test_a_miss_then_hits_with_the_caching_headers(target: App, client: Any) -> None:
    first = client.get("/items/3")
    second = client.get("/items/3")
    assert first.json == second.json == {"item": 3, "query": [], "run": 1}
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert first.headers["cache-control"] == "public, max-age=60"
    assert first.headers["vary"] == "Authorization, Cookie"
    assert first.headers["etag"] == second.headers["etag"]
    assert second.headers["age"] == "0"
    assert second.headers["content-type"] == "application/json"
    assert second.headers["content-length"] == str(len(second.data))
    assert target.item.stats()["/items/<int:item_id>"]["hits"] == 1


def test_query_host_and_method(target: App, client: Any) -> None:
    client.get("/items/3?b=2&a=1")
    assert client.get("/items/3?a=1&b=2").headers["x-cache"] == "HIT"
    assert client.get("/items/3?a=1&b=3").headers["x-cache"] == "MISS"
    assert client.get("/items/3?a=1&b=2", base_url="http://evil.example").headers["x-cache"] == (
        "MISS"
    )
    posted = client.post("/items/3?a=1&b=2")
    assert "x-cache" not in posted.headers and posted.json["run"] == 4
    assert target.calls["item"] == 4


def test_two_users_never_see_each_others_response(target: App, client: Any) -> None:
    for _ in range(2):
        alice = client.get("/me", headers={"authorization": "alice"})
        bob = client.get("/me", headers={"authorization": "bob"})
        assert alice.json == {"user": "alice"} and bob.json == {"user": "bob"}
        assert alice.headers["cache-control"] == "private, max-age=60"
    client.set_cookie("user", "carol")
    carol = [client.get("/me").json for _ in range(2)]
    client.set_cookie("user", "dave")
    dave = client.get("/me").json
    assert carol == [{"user": "carol"}] * 2 and dave == {"user": "dave"}
    assert target.calls["me"] == 4  # one entry per user


def test_a_credential_outside_the_key_bypasses(target: App, client: Any) -> None:
    users = []
    for who in ("alice", "bob"):
        response = client.get("/whoami", headers={"authorization": who})
        users.append(response.json["user"])
        assert response.headers["x-cache"] == "BYPASS"
        assert response.headers["cache-control"] == "private"
    client.set_cookie("user", "carol")
    cookie = client.get("/whoami")
    assert users == ["alice", "bob"] and cookie.json == {"user": "carol"}
    assert cookie.headers["x-cache"] == "BYPASS"
    assert target.cache.keys() == []


def test_session_cookies_and_private_are_never_stored(target: App, client: Any) -> None:
    first = client.get("/login")
    assert first.headers["x-cache"] == "MISS" and "session=" in first.headers["set-cookie"]
    fresh = target.app.test_client()  # another visitor, without the session cookie
    second = fresh.get("/login")
    assert second.data == b"welcome 2"
    assert [fresh.get("/cookie").data for _ in range(2)] == [b"cookie 1", b"cookie 2"]
    other = target.app.test_client()
    assert [other.get("/private").headers["cache-control"] for _ in range(2)] == ["private"] * 2
    assert target.calls["private"] == 2
    assert target.cache.keys() == []


def test_etag_304_and_head(target: App, client: Any) -> None:
    first = client.get("/items/7")
    again = client.get("/items/7", headers={"if-none-match": first.headers["etag"]})
    assert again.status_code == 304 and again.data == b""
    assert again.headers["etag"] == first.headers["etag"]
    assert again.headers["cache-control"] == "public, max-age=60"
    head = client.head("/items/7")
    assert head.status_code == 200 and head.data == b"" and head.headers["x-cache"] == "HIT"
    assert head.headers["content-length"] == str(len(first.data))
    assert target.item.stats()["/items/<int:item_id>"]["not_modified"] == 1


def test_statuses_streams_and_async_views(target: App, client: Any) -> None:
    assert [client.get("/missing").status_code for _ in range(2)] == [404, 404]
    assert target.calls["missing"] == 2
    assert [client.get("/stream").data for _ in range(2)] == [b"ab", b"ab"]
    assert target.calls["stream"] == 2
    assert [client.get("/async").json for _ in range(2)] == [{"async": 1}] * 2


def test_invalidate_and_templates(target: App, client: Any) -> None:
    client.get("/items/3?a=1")
    client.get("/items/3?a=2")
    client.get("/items/4")
    assert target.item.invalidate(item_id=3) is True
    assert client.get("/items/3?a=1").headers["x-cache"] == "MISS"
    assert client.get("/items/4").headers["x-cache"] == "HIT"
    assert target.item.invalidate_all() == 2

    client.get("/products/tea?x=1")
    assert client.get("/products/tea?x=2").headers["x-cache"] == "HIT"
    assert target.product.key(name="tea") == "product:tea@test_flask.App.__init__.<locals>.product"
    assert target.product.invalidate(name="tea") is True
    assert client.get("/products/tea").json["run"] == 2
    assert target.cache.invalidate_tag("products") == 1


def test_a_stale_entry_is_refreshed_in_a_request_context(target: App, client: Any) -> None:
    first = client.get("/news?lang=fr")
    time.sleep(0.25)  # past the 0.2 s ttl: nothing to wait for but the clock
    stale = client.get("/news?lang=fr")
    assert stale.headers["x-cache"] == "STALE" and stale.json == first.json
    assert stale.headers["cache-control"] == "public, max-age=1, stale-while-revalidate=30"
    deadline = time.monotonic() + 10
    while (fresh := client.get("/news?lang=fr")).json["run"] != 2:
        assert time.monotonic() < deadline, "the stale entry was never refreshed"
        time.sleep(0.01)  # the refresh stores from a worker thread: nothing to await
    assert fresh.json == {"lang": "fr", "run": 2}
    assert fresh.headers["x-cache"] in ("HIT", "STALE")


def run_concurrently(client: Any, path: str, n: int) -> list[Any]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: client.get(path), range(n)))


def test_concurrent_threads_compute_once(target: App, client: Any) -> None:
    target.hold_for = 16  # the view returns only after all 16 requests arrived
    responses = run_concurrently(client, "/slow/x", 16)
    assert target.calls["slow"] == 1
    assert [r.status_code for r in responses] == [200] * 16
    assert {r.data for r in responses} == {client.get("/slow/x").data}
    statuses = Counter(r.headers["x-cache"] for r in responses)
    assert (
        statuses["MISS"] == 1 and statuses["MISS"] + statuses["COALESCED"] + statuses["HIT"] == 16
    )
    assert target.slow.stats()["/slow/<name>"]["computations"] == 1


def test_coalesced_threads_share_runs_and_keep_nothing(target: App, client: Any) -> None:
    target.hold_for = 12  # the view returns only after all 12 requests arrived
    responses = run_concurrently(client, "/together/x", 12)
    runs = target.calls["together"]
    statuses = Counter(r.headers["x-cache"] for r in responses)
    # requests that joined the run get its response; one that reached the flight after it
    # ended (a thread descheduled between arriving and joining) runs the view itself
    assert runs < 12 and statuses == {"MISS": runs, "COALESCED": 12 - runs}
    assert {r.data for r in responses} == {b'{"name":"x"}\n'}
    after = client.get("/together/x")  # nothing was kept: it runs again
    assert after.headers["x-cache"] == "MISS" and target.calls["together"] == runs + 1
    assert "age" not in after.headers
    assert target.cache.keys() == []


def test_a_raised_404_is_cached_with_cache_4xx(target: App, client: Any) -> None:
    first, second = client.get("/raised/3"), client.get("/raised/3")
    assert target.calls["raised"] == 1
    for response in (first, second):  # raised again on the hit: the app's handler renders it
        assert (response.status_code, response.json) == (404, {"error": "no item 3"})
    assert client.get("/raised/4").json == {"error": "no item 4"}
    assert target.calls["raised"] == 2
    plain = [client.get("/raised-uncached") for _ in range(2)]  # without cache_4xx
    assert [(r.status_code, r.json) for r in plain] == [(404, {"error": "not here"})] * 2
    assert target.calls["raised_uncached"] == 2


def test_redis_threads_and_users(redis_caches: Callable[..., Cache]) -> None:
    one, two = App(redis_caches()), App(redis_caches())  # two "processes", one Redis
    one.hold_for = two.hold_for = 8
    clients = [one.app.test_client(), two.app.test_client()]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: clients[i % 2].get("/slow/r"), range(16)))
    assert one.calls["slow"] + two.calls["slow"] == 1  # one run for the fleet
    assert {r.data for r in responses} == {b'{"name":"r"}\n'}
    for who in ("alice", "bob", "alice"):
        for client in clients:
            assert client.get("/me", headers={"authorization": who}).json == {"user": who}
    assert one.calls["me"] + two.calls["me"] == 2
    clients[0].get("/items/1")
    assert clients[1].get("/items/1").headers["x-cache"] == "HIT"
    assert two.item.invalidate(item_id=1) is True
    assert clients[0].get("/items/1").headers["x-cache"] == "MISS"


def test_options_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="tags"):
        cached(tags="a")(lambda: "x")
