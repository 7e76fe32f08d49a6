"""A real nginx `proxy_cache` in front of a real uvicorn serving tests/nginx_app.py.

nginx's cache key is its default (``$scheme$proxy_host$request_uri``): no request header is in
it, so only what coalesce puts in the response (``Cache-Control``, ``Vary``) decides whether
nginx hands alice's response to bob. nginx stores responses to requests that carry
``Authorization`` like any other, so "private" and "Vary" must do the work. The proof:

* two users through the proxy never receive each other's body (per-user template route,
  API-key route), including after the proxy could have stored the first response;
* the proxy shares exactly the routes that say it may: a public route and a ``shared=True``
  route are HITs in nginx on the second request, per-user routes and routes whose handler
  says ``no-store`` / ``no-cache`` never are;
* ``max-age`` and ``Age`` together let a downstream cache keep a copy as long as coalesce
  keeps the entry (not ``Age`` seconds less).

Each failure message lists what was seen: who asked, the body and the caching headers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from nginx_app import TTL
from nginx_server import NginxServer, UvicornProcess

HEADERS = ("cache-control", "vary", "age", "x-cache", "x-proxy-cache", "set-cookie")
BEARER = {
    "alice": {"authorization": "Bearer tok-alice"},
    "bob": {"authorization": "Bearer tok-bob"},
}
API_KEY = {"alice": {"x-api-key": "tok-alice"}, "bob": {"x-api-key": "tok-bob"}}
# alice first, again once her response could be stored, then bob, and back: both directions
TURNS = ["alice", "alice", "bob", "bob", "alice", "bob", "bob", "alice"]
AGE_WAIT = 3.1  # seconds an entry ages before the max-age/Age check


@dataclass
class Seen:
    who: str
    status: int
    body: Any
    headers: dict[str, str]

    @property
    def proxy(self) -> str:
        return self.headers.get("x-proxy-cache", "")

    def directives(self) -> dict[str, str]:
        """`Cache-Control` as {directive: argument}, directives lower-cased."""
        found = {}
        for part in self.headers.get("cache-control", "").split(","):
            name, _, value = part.strip().partition("=")
            if name:
                found[name.lower()] = value.strip('"')
        return found

    def vary(self) -> set[str]:
        return {v.strip().lower() for v in self.headers.get("vary", "").split(",") if v.strip()}


def report(seen: list[Seen]) -> str:
    return "\n".join(f"  {s.who:>9}: {s.status} {s.body} {s.headers}" for s in seen)


@dataclass
class Stack:
    proxy: httpx.Client  # through nginx
    direct: httpx.Client  # to uvicorn itself

    def get(self, path: str, who: str = "anonymous", headers: dict[str, str] | None = None) -> Seen:
        response = self.proxy.get(path, headers=headers or {})
        body = response.json() if response.content else None
        kept = {name: response.headers[name] for name in HEADERS if name in response.headers}
        return Seen(who, response.status_code, body, kept)

    def computations(self, route: str) -> int:
        counts: dict[str, int] = self.direct.get("/counts").json()
        return counts.get(route, 0)


@pytest.fixture(scope="module")
def stack(
    uvicorn_process: Callable[[str, Path], UvicornProcess],
    nginx_proxy: Callable[[str], NginxServer],
) -> Iterator[Stack]:
    app = uvicorn_process("nginx_app:app", Path(__file__).resolve().parent)
    nginx = nginx_proxy(app.url)
    with (
        httpx.Client(base_url=nginx.url, timeout=10) as proxy,
        httpx.Client(base_url=app.url, timeout=10) as direct,
    ):
        yield Stack(proxy, direct)


def per_user_turns(stack: Stack, path: str, credentials: dict[str, dict[str, str]]) -> list[Seen]:
    seen = [stack.get(path, who, credentials[who]) for who in TURNS]
    assert all(s.status == 200 for s in seen), report(seen)
    return seen


def assert_never_crosses_users(seen: list[Seen]) -> None:
    crossed = [s for s in seen if s.body["user"] != s.who]
    assert not crossed, f"a user received another user's body:\n{report(seen)}"


def assert_never_served_by_the_proxy(seen: list[Seen]) -> None:
    hits = [s for s in seen if s.proxy != "MISS"]
    assert not hits, f"nginx served a stored response (X-Proxy-Cache):\n{report(seen)}"


# ---------------------------------------------------------------------------------------
# routes the proxy may share


def test_a_public_route_is_stored_and_shared_by_the_proxy(stack: Stack) -> None:
    before = stack.computations("public")
    seen = [stack.get("/public/1", who) for who in ("anonymous", "anonymous", "anonymous")]
    assert [s.proxy for s in seen] == ["MISS", "HIT", "HIT"], report(seen)
    assert all(s.status == 200 and s.body == seen[0].body for s in seen), report(seen)
    assert stack.computations("public") - before == 1
    assert "public" in seen[0].directives() and "private" not in seen[0].directives()


def test_a_shared_route_is_stored_and_shared_by_the_proxy_across_users(stack: Stack) -> None:
    before = stack.computations("shared")
    seen = [stack.get("/shared", who, BEARER[who]) for who in TURNS]
    assert [s.proxy for s in seen] == ["MISS"] + ["HIT"] * (len(TURNS) - 1), report(seen)
    assert all(s.status == 200 and s.body == seen[0].body for s in seen), report(seen)
    assert stack.computations("shared") - before == 1


def test_max_age_and_age_let_a_downstream_cache_keep_the_entry_its_whole_ttl(
    stack: Stack,
) -> None:
    """RFC 9111 4.2: a cache keeps a response fresh while `max-age` > its age, and takes its
    age from `Age`. So `max-age - Age` must be what is left of the entry's ttl; a `max-age`
    that is already the remaining time counts the age twice."""
    stored_at = time.monotonic()
    # coalesce stores the entry; nginx has not seen it. The Host nginx sends ($host: no port),
    # as the host is part of coalesce's key.
    stack.direct.get("/public/2", headers={"host": "127.0.0.1"})
    time.sleep(AGE_WAIT)
    seen = [stack.get("/public/2"), stack.get("/public/2")]
    left = TTL - (time.monotonic() - stored_at)
    first = seen[0]
    assert first.headers.get("x-cache") == "HIT" and first.proxy == "MISS", report(seen)
    age = int(first.headers["age"])
    max_age = int(first.directives()["max-age"])
    assert age >= int(AGE_WAIT), report(seen)
    assert abs((max_age - age) - left) <= 1.5, (
        f"max-age {max_age} - Age {age} = {max_age - age} s of freshness downstream, "
        f"but the entry has {left:.1f} s left:\n{report(seen)}"
    )
    assert seen[1].proxy == "HIT" and seen[1].body == first.body, report(seen)


# ---------------------------------------------------------------------------------------
# per-user routes: never shared


def test_a_per_user_template_route_never_crosses_users_through_the_proxy(stack: Stack) -> None:
    before = stack.computations("feed")
    seen = per_user_turns(stack, "/feed", BEARER)
    assert_never_crosses_users(seen)
    assert_never_served_by_the_proxy(seen)
    assert stack.computations("feed") - before == 2, report(seen)  # one entry per user


@pytest.mark.parametrize("path", ["/me", "/profile"])
def test_an_api_key_route_never_crosses_users_through_the_proxy(stack: Stack, path: str) -> None:
    """`/me`: default key, the user comes from `X-API-Key`; `/profile`: the same user in a
    `key="profile:{user.id}"` template (a per-user entry without Authorization/Cookie)."""
    seen = per_user_turns(stack, path, API_KEY)
    assert_never_crosses_users(seen)
    assert_never_served_by_the_proxy(seen)


@pytest.mark.parametrize(
    ("path", "credentials", "credential_header"),
    [
        ("/feed", BEARER, "authorization"),
        ("/me", API_KEY, "x-api-key"),
        ("/profile", API_KEY, "x-api-key"),
    ],
    ids=["feed", "me", "profile"],
)
def test_per_user_responses_tell_every_cache_how_to_keep_them_apart(
    stack: Stack, path: str, credentials: dict[str, dict[str, str]], credential_header: str
) -> None:
    """Beyond nginx: a per-user response says `private` (or `no-store`), so no shared cache
    stores it, even one that heuristically stores 200s without `Cache-Control` (RFC 9111
    4.2.2); and when it lets any cache (a browser) store it, its `Vary` names the
    credential header, so that cache does not answer bob with alice's copy."""
    seen = per_user_turns(stack, path, credentials)
    for s in seen:
        directives = s.directives()
        assert {"private", "no-store"} & directives.keys(), (
            f"{path}: a per-user response does not say private or no-store:\n{report(seen)}"
        )
        assert "public" not in directives, report(seen)
        if "no-store" not in directives:
            assert credential_header in s.vary(), (
                f"{path}: storable per-user response without Vary: {credential_header}:\n"
                f"{report(seen)}"
            )


# ---------------------------------------------------------------------------------------
# the handler's own Cache-Control wins


def test_a_handler_that_says_no_store_is_never_stored(stack: Stack) -> None:
    before = stack.computations("no-store")
    seen = [stack.get("/no-store", who) for who in ("anonymous",) * 3]
    seen.append(stack.get("/no-store", "alice", BEARER["alice"]))
    assert all(s.status == 200 for s in seen), report(seen)
    assert_never_served_by_the_proxy(seen)
    assert all(s.directives() == {"no-store": ""} for s in seen), report(seen)
    assert stack.computations("no-store") - before == len(seen), report(seen)  # nor by us


def test_a_handler_that_says_no_cache_keeps_it_and_the_proxy_never_serves_a_copy(
    stack: Stack,
) -> None:
    seen = [stack.get("/no-cache", who) for who in ("anonymous",) * 3]
    assert all(s.status == 200 for s in seen), report(seen)
    assert_never_served_by_the_proxy(seen)
    assert all(s.directives() == {"no-cache": ""} for s in seen), report(seen)
