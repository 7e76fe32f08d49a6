"""Two requests share an entry only when the handler cannot tell them apart (issue 8).

Each test is an attack from the outside, through real HTTP requests against the ASGI app:
two users, two tenants, two hosts, one secret in a URL. Every assertion that one user's
body never reaches another would fail on the code before the fix it guards.
"""

import logging
from collections.abc import Callable
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request, Security
from fastapi.responses import HTMLResponse
from fastapi.security import (
    APIKeyCookie,
    APIKeyHeader,
    APIKeyQuery,
    HTTPBasic,
    HTTPBearer,
    HTTPDigest,
    OAuth2AuthorizationCodeBearer,
    OAuth2PasswordBearer,
    OpenIdConnect,
)
from pydantic import BaseModel

from coalesce import Cache, ConfigurationError
from coalesce.fastapi import MetricsRegistry, cached, coalesced

TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}


def client(app: FastAPI, base_url: str = "http://test") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url)


@pytest.fixture
def cache() -> Cache:
    return Cache()


def of(key: str, handler: Any) -> str:
    return f"{key}@{handler.__module__}.{handler.__qualname__}"


class User(BaseModel):
    id: str


# -- 1. every fastapi.security scheme marks its input as a credential -----------------------

api_key_header = APIKeyHeader(name="X-API-Key")


def user_from_api_key(key: Annotated[str, Security(api_key_header)]) -> User:
    if key not in TOKENS:
        raise HTTPException(401)
    return User(id=TOKENS[key])


def _bearer_user(token: str) -> User:
    name = TOKENS.get(token.removeprefix("Bearer ").strip())
    if name is None:
        raise HTTPException(401)
    return User(id=name)


def _schemes() -> list[tuple[str, Any, Callable[[str], dict[str, Any]]]]:
    """(name, scheme, how a request carries the token `tok-<user>`)."""

    def header(name: str) -> Callable[[str], dict[str, Any]]:
        return lambda tok: {"headers": {name: tok}}

    def bearer(tok: str) -> dict[str, Any]:
        return {"headers": {"authorization": f"Bearer {tok}"}}

    return [
        ("APIKeyHeader", APIKeyHeader(name="X-API-Key"), header("x-api-key")),
        ("APIKeyQuery", APIKeyQuery(name="api_key"), lambda tok: {"params": {"api_key": tok}}),
        (
            "APIKeyCookie",
            APIKeyCookie(name="sid"),
            lambda tok: {"headers": {"cookie": f"sid={tok}"}},
        ),
        ("HTTPBearer", HTTPBearer(), bearer),
        ("HTTPDigest", HTTPDigest(), lambda tok: {"headers": {"authorization": f"Digest {tok}"}}),
        ("HTTPBasic", HTTPBasic(), lambda tok: {"auth": (tok, "pw")}),
        ("OAuth2PasswordBearer", OAuth2PasswordBearer(tokenUrl="token"), bearer),
        (
            "OAuth2AuthorizationCodeBearer",
            OAuth2AuthorizationCodeBearer(authorizationUrl="a", tokenUrl="t"),
            bearer,
        ),
        ("OpenIdConnect", OpenIdConnect(openIdConnectUrl="http://127.0.0.1/oidc"), bearer),
    ]


def _token_of(credentials: Any) -> str:
    """The `tok-<user>` a scheme's result holds, whatever its shape."""
    text = str(
        getattr(credentials, "username", None) or getattr(credentials, "credentials", credentials)
    )
    return text.removeprefix("Bearer ").removeprefix("Digest ").strip()


@pytest.mark.parametrize(("name", "scheme", "carry"), _schemes(), ids=lambda v: str(v)[:30])
async def test_every_security_scheme_in_the_tree_keeps_users_apart(
    cache: Cache, name: str, scheme: Any, carry: Callable[[str], dict[str, Any]]
) -> None:
    """A default-key route whose dependency (two levels down) uses a security scheme: the
    scheme's input is a credential, so such requests bypass instead of sharing."""
    app = FastAPI()

    def current_user(credentials: Annotated[Any, Security(scheme)]) -> User:
        token = _token_of(credentials)
        if token not in TOKENS:
            raise HTTPException(401)
        return User(id=TOKENS[token])

    def profile(user: Annotated[User, Depends(current_user)]) -> User:
        return user

    @app.get("/me")
    @cached(ttl=60, cache=cache, registry=MetricsRegistry())
    async def me(user: Annotated[User, Depends(profile)]) -> dict[str, str]:
        return {"me": user.id}

    async with client(app) as c:
        alice = await c.get("/me", **carry("tok-alice"))
        bob = await c.get("/me", **carry("tok-bob"))
        alice2 = await c.get("/me", **carry("tok-alice"))
    assert [r.json() for r in (alice, bob, alice2)] == [
        {"me": "alice"},
        {"me": "bob"},
        {"me": "alice"},
    ]
    assert [r.headers["x-cache"] for r in (alice, bob, alice2)] == ["BYPASS"] * 3
    assert cache.keys() == []


async def test_api_key_route_from_the_issue(cache: Cache) -> None:
    """`X-API-Key: tok-alice` -> alice, then `tok-bob` was a HIT with alice's body."""
    app = FastAPI()

    @app.get("/me")
    @cached(ttl=60, cache=cache, registry=MetricsRegistry())
    async def me(user: Annotated[User, Depends(user_from_api_key)]) -> dict[str, str]:
        return {"me": user.id}

    async with client(app) as c:
        alice = await c.get("/me", headers={"x-api-key": "tok-alice"})
        bob = await c.get("/me", headers={"x-api-key": "tok-bob"})
    assert (alice.json(), bob.json()) == ({"me": "alice"}, {"me": "bob"})
    assert "x-api-key" in alice.headers["vary"].lower()


async def test_a_router_dependency_with_a_scheme_counts_too(cache: Cache) -> None:
    """Security declared on the router (not the handler) is in the route's tree."""
    app = FastAPI()
    router = APIRouter(dependencies=[Depends(user_from_api_key)])

    @router.get("/report")
    @cached(ttl=60, cache=cache, registry=MetricsRegistry())
    async def report(request: Request) -> dict[str, str]:
        return {"for": request.headers["x-api-key"]}

    app.include_router(router, prefix="/v1")
    async with client(app) as c:
        alice = await c.get("/v1/report", headers={"x-api-key": "tok-alice"})
        bob = await c.get("/v1/report", headers={"x-api-key": "tok-bob"})
    assert (alice.json(), bob.json()) == ({"for": "tok-alice"}, {"for": "tok-bob"})
    assert bob.headers["x-cache"] == "BYPASS"


async def test_a_template_reading_the_schemes_user_caches_per_user_privately(cache: Cache) -> None:
    app = FastAPI()

    @app.get("/feed")
    @cached(ttl=60, cache=cache, key="feed:{user.id}", registry=MetricsRegistry())
    async def feed(user: Annotated[User, Depends(user_from_api_key)]) -> dict[str, str]:
        return {"feed": user.id}

    async with client(app) as c:
        alice = await c.get("/feed", headers={"x-api-key": "tok-alice"})
        bob = await c.get("/feed", headers={"x-api-key": "tok-bob"})
        alice2 = await c.get("/feed", headers={"x-api-key": "tok-alice"})
    assert [r.json()["feed"] for r in (alice, bob, alice2)] == ["alice", "bob", "alice"]
    assert alice2.headers["x-cache"] == "HIT"
    for response in (alice, bob, alice2):
        control = response.headers["cache-control"]
        assert control.startswith("private") and "public" not in control
        assert "s-maxage" not in control
        assert "x-api-key" in response.headers["vary"].lower()


async def test_a_template_reading_a_plain_dependency_does_not_carry_identity(
    cache: Cache,
) -> None:
    """`Depends(common_parameters)` reads no credential: its result is not the user, so a
    request with credentials under `key="items:{params.q}"` bypasses."""
    app = FastAPI()

    class Params(BaseModel):
        q: str

    def common(q: str = "") -> Params:
        return Params(q=q)

    @app.get("/items")
    @cached(ttl=60, cache=cache, key="items:{params.q}", registry=MetricsRegistry())
    async def items(request: Request, params: Annotated[Params, Depends(common)]) -> dict[str, Any]:
        return {"q": params.q, "auth": request.headers.get("authorization")}

    async with client(app) as c:
        alice = await c.get("/items?q=x", headers={"authorization": "Bearer tok-alice"})
        bob = await c.get("/items?q=x", headers={"authorization": "Bearer tok-bob"})
    assert (alice.json()["auth"], bob.json()["auth"]) == ("Bearer tok-alice", "Bearer tok-bob")
    assert bob.headers["x-cache"] == "BYPASS"


# -- 2. inputs declared by dependencies are in the key --------------------------------------


async def test_the_tutorials_common_parameters_are_in_the_key(cache: Cache) -> None:
    app = FastAPI()

    async def common_parameters(
        q: str | None = None, skip: int = 0, limit: int = 100
    ) -> dict[str, Any]:
        return {"q": q, "skip": skip, "limit": limit}

    @app.get("/common")
    @cached(ttl=60, cache=cache, registry=MetricsRegistry())
    async def read_items(
        commons: Annotated[dict[str, Any], Depends(common_parameters)],
    ) -> dict[str, Any]:
        return commons

    async with client(app) as c:
        first = await c.get("/common?skip=0")
        fifty = await c.get("/common?skip=50")
        again = await c.get("/common?skip=050")  # validated as FastAPI does: the same 50
        limited = await c.get("/common?skip=50&limit=5")
    assert first.json()["skip"] == 0
    assert fifty.json()["skip"] == 50 and fifty.headers["x-cache"] == "MISS"
    assert again.headers["x-cache"] == "HIT" and again.json()["skip"] == 50
    assert limited.json() == {"q": None, "skip": 50, "limit": 5}


async def test_a_tenant_header_two_dependencies_down_is_in_the_key(cache: Cache) -> None:
    app = FastAPI()

    def get_tenant(x_tenant: Annotated[str, Header()]) -> str:
        return x_tenant

    def get_db(tenant: Annotated[str, Depends(get_tenant)]) -> str:
        return f"db-{tenant}"

    @app.get("/orders")
    @cached(ttl=60, cache=cache, registry=MetricsRegistry())
    async def orders(db: Annotated[str, Depends(get_db)]) -> dict[str, str]:
        return {"db": db}

    async with client(app) as c:
        acme = await c.get("/orders", headers={"x-tenant": "acme"})
        globex = await c.get("/orders", headers={"x-tenant": "globex"})
        acme2 = await c.get("/orders", headers={"x-tenant": "acme"})
    assert [r.json()["db"] for r in (acme, globex, acme2)] == ["db-acme", "db-globex", "db-acme"]
    assert acme2.headers["x-cache"] == "HIT"
    for response in (acme, globex, acme2):  # the header is in the key: named in Vary
        assert "x-tenant" in response.headers["vary"].lower()
        assert response.headers["cache-control"].startswith("public")
    assert len(cache.keys()) == 2
    keys = cache.keys()
    assert all("|header.x-tenant=" in key for key in keys)


async def test_invalidate_reaches_every_dependency_variant(cache: Cache) -> None:
    app = FastAPI()

    def get_tenant(x_tenant: Annotated[str, Header()]) -> str:
        return x_tenant

    @app.get("/items/{item_id}")
    @cached(ttl=60, cache=cache, registry=MetricsRegistry())
    async def item(item_id: int, tenant: Annotated[str, Depends(get_tenant)]) -> dict[str, Any]:
        return {"id": item_id, "tenant": tenant}

    async with client(app) as c:
        for tenant in ("acme", "globex"):
            await c.get("/items/1", headers={"x-tenant": tenant})
        await c.get("/items/2", headers={"x-tenant": "acme"})
        assert len(cache.keys()) == 3
        assert await item.invalidate(item_id=1)
        assert len(cache.keys()) == 1
        again = await c.get("/items/1", headers={"x-tenant": "globex"})
    assert again.headers["x-cache"] == "MISS"


# -- 3. scheme and host are part of every default key ---------------------------------------


async def test_host_and_scheme_are_in_the_default_key(cache: Cache) -> None:
    app = FastAPI()

    @app.get("/items/{item_id}", name="item")
    @cached(ttl=60, cache=cache, registry=MetricsRegistry())
    async def item(item_id: int, request: Request) -> dict[str, str]:
        return {"self": str(request.url_for("item", item_id=item_id))}

    async with client(app, "http://shop.example") as c:
        evil = await c.get("/items/1", headers={"host": "evil.example"})
        shop = await c.get("/items/1")
        shop2 = await c.get("/items/1", headers={"host": "SHOP.example"})  # case-insensitive
    async with client(app, "https://shop.example") as c:
        secure = await c.get("/items/1")
    assert evil.json() == {"self": "http://evil.example/items/1"}
    assert shop.json() == {"self": "http://shop.example/items/1"}
    assert shop.headers["x-cache"] == "MISS" and shop2.headers["x-cache"] == "HIT"
    assert secure.json() == {"self": "https://shop.example/items/1"}
    assert sorted(cache.keys()) == [
        "http://evil.example/items/<item_id>?item_id=1",
        "http://shop.example/items/<item_id>?item_id=1",
        "https://shop.example/items/<item_id>?item_id=1",
    ]
    with pytest.raises(ConfigurationError, match="which origin"):
        item.key(item_id=1)
    assert item.key(item_id=1, origin="https://shop.example") == cache.keys()[-1]


async def test_a_hostile_host_header_is_escaped_in_the_key(cache: Cache) -> None:
    app = FastAPI()

    @app.get("/x")
    @cached(ttl=60, cache=cache, registry=MetricsRegistry())
    async def x() -> dict[str, int]:
        return {"n": 1}

    async with client(app) as c:
        for host in ("a.example/x?q=1|h", "a.example%2Fx", "a b"):
            assert (await c.get("/x", headers={"host": host})).status_code == 200
    keys = cache.keys()
    assert len(keys) == 3 and len(set(keys)) == 3
    assert all(" " not in k and "|" not in k.split("/x?")[0] for k in keys)


async def test_the_hit_shortcut_tells_hosts_apart(cache: Cache) -> None:
    """Routes without dependencies answer hits before FastAPI: that path keys on host too."""
    app = FastAPI()

    @app.get("/n/{n}", name="n")
    @cached(ttl=60, cache=cache, registry=MetricsRegistry())
    async def n_route(n: int, request: Request) -> dict[str, str]:
        return {"url": str(request.url_for("n", n=n))}

    async with client(app, "http://shop.example") as c:
        for _ in range(3):  # the first request installs the shortcut, the next go through it
            evil = await c.get("/n/1", headers={"host": "evil.example"})
            shop = await c.get("/n/1")
    assert evil.json() == {"url": "http://evil.example/n/1"}
    assert shop.json() == {"url": "http://shop.example/n/1"}


# -- 4. every header in the key is in Vary; per-user entries are private --------------------


async def test_a_credential_header_parameter_in_the_key_is_private_and_varied(
    cache: Cache,
) -> None:
    app = FastAPI()

    @app.get("/mine")
    @cached(ttl=60, cache=cache, registry=MetricsRegistry())
    async def mine(x_api_key: Annotated[str, Header()]) -> dict[str, str]:
        return {"me": TOKENS.get(x_api_key, "?")}

    async with client(app) as c:
        alice = await c.get("/mine", headers={"x-api-key": "tok-alice"})
        bob = await c.get("/mine", headers={"x-api-key": "tok-bob"})
        alice2 = await c.get("/mine", headers={"x-api-key": "tok-alice"})
    assert [r.json()["me"] for r in (alice, bob, alice2)] == ["alice", "bob", "alice"]
    assert alice2.headers["x-cache"] == "HIT"
    for response in (alice, bob, alice2):
        assert response.headers["cache-control"].startswith("private")
        assert "x-api-key" in response.headers["vary"].lower()
    keys = cache.keys()
    assert all("tok-" not in key for key in keys)


async def test_shared_routes_stay_public_without_credential_vary(cache: Cache) -> None:
    app = FastAPI()

    @app.get("/news")
    @cached(ttl=60, cache=cache, shared=True, registry=MetricsRegistry())
    async def news() -> dict[str, str]:
        return {"news": "same for all"}

    async with client(app) as c:
        response = await c.get("/news", headers={"authorization": "Bearer tok-alice"})
    assert response.headers["cache-control"].startswith("public")
    assert "authorization" not in response.headers.get("vary", "").lower()


# -- 7. two routes with one key template never serve each other -----------------------------


async def test_two_routes_with_one_template_keep_their_own_entries(cache: Cache) -> None:
    app = FastAPI()

    @app.get("/settings/{user_id}", response_class=HTMLResponse)
    @cached(ttl=60, cache=cache, key="user:{user_id}", registry=MetricsRegistry())
    async def settings(user_id: int) -> str:
        return f"<h1>settings of {user_id}</h1>"

    @app.get("/profile/{user_id}")
    @cached(ttl=60, cache=cache, key="user:{user_id}", registry=MetricsRegistry())
    async def profile(user_id: int) -> dict[str, int]:
        return {"profile": user_id}

    async with client(app) as c:
        html = await c.get("/settings/7")
        json = await c.get("/profile/7")
        assert json.headers["content-type"] == "application/json"
        assert json.json() == {"profile": 7}
        assert html.text == "<h1>settings of 7</h1>"
        assert sorted(cache.keys()) == sorted([of("user:7", settings), of("user:7", profile)])
        assert profile.key(user_id=7) == of("user:7", profile)
        assert cache.invalidate(of("user:7", profile))  # the documented stored form
        assert await settings.invalidate(user_id=7)
        assert cache.keys() == []
        assert (await c.get("/profile/7")).headers["x-cache"] == "MISS"


# -- 8. the decorator in the wrong place is refused at decoration ---------------------------


@pytest.mark.parametrize("decorator", [cached, coalesced])
def test_a_decorator_above_the_route_decorator_is_refused(decorator: Any) -> None:
    app = FastAPI()
    with pytest.raises(ConfigurationError, match=r"above @app.get"):

        @decorator(cache=Cache(), registry=MetricsRegistry())
        @app.get("/late")
        async def late() -> dict[str, int]:
            return {"n": 1}

    @app.get("/fine")
    @decorator
    async def fine() -> dict[str, int]:
        return {"n": 1}


# -- 9. secrets never show in keys or logs --------------------------------------------------


async def test_secret_query_values_are_hashed_in_keys_and_logs(
    cache: Cache, caplog: pytest.LogCaptureFixture
) -> None:
    app = FastAPI()

    @app.get("/export")
    @cached(ttl=60, cache=cache, registry=MetricsRegistry())
    async def export(api_token: str, fmt: str = "csv") -> dict[str, str]:
        return {"fmt": fmt, "for": api_token[-5:]}

    @app.get("/signed")
    @cached(ttl=60, cache=cache, key="signed:{signature}", registry=MetricsRegistry())
    async def signed(signature: str) -> dict[str, str]:
        return {"ok": signature[-5:]}

    caplog.set_level(logging.INFO, logger="coalesce.fastapi")
    async with client(app) as c:
        one = await c.get("/export?api_token=SECRET-one&fmt=json")
        two = await c.get("/export?api_token=SECRET-two&fmt=json")
        sig = await c.get("/signed?signature=SECRET-sig")
    assert (one.json()["for"], two.json()["for"]) == ("T-one", "T-two")  # never shared
    assert sig.json() == {"ok": "T-sig"}
    assert one.headers["cache-control"].startswith("private")
    text = " ".join(cache.keys()) + " ".join(r.getMessage() for r in caplog.records)
    text += " ".join(str(getattr(r, "key", "")) for r in caplog.records)
    assert "SECRET" not in text
    assert len(cache.keys()) == 3
    assert "api_token=#" in text and "signed:#" in text


async def test_a_credential_header_read_by_a_middleware_is_a_credential(cache: Cache) -> None:
    """An authentication middleware reads `X-Auth-Token` without the route declaring it:
    a header named like a credential is one, so such requests bypass."""
    app = FastAPI()

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Any:
        request.state.user = TOKENS.get(request.headers.get("x-auth-token", ""), "anon")
        return await call_next(request)

    @app.get("/whoami")
    @cached(ttl=60, cache=cache, registry=MetricsRegistry())
    async def whoami(request: Request) -> dict[str, str]:
        return {"me": request.state.user}

    async with client(app) as c:
        alice = await c.get("/whoami", headers={"x-auth-token": "tok-alice"})
        bob = await c.get("/whoami", headers={"x-auth-token": "tok-bob"})
        anon = await c.get("/whoami")
    assert [r.json()["me"] for r in (alice, bob, anon)] == ["alice", "bob", "anon"]
    assert [r.headers["x-cache"] for r in (alice, bob, anon)] == ["BYPASS", "BYPASS", "MISS"]
    assert alice.headers["cache-control"] == "private"


async def test_a_path_parameter_and_a_body_read_only_by_dependencies_are_in_the_key(
    cache: Cache,
) -> None:
    app = FastAPI()

    class Filter(BaseModel):
        color: str

    def tenant_of(tenant: str) -> str:  # the path's {tenant}, read by the dependency only
        return tenant

    def filter_of(body: Filter) -> str:  # a GET body, read by the dependency only
        return body.color

    @app.get("/t/{tenant}/items")
    @cached(ttl=60, cache=cache, registry=MetricsRegistry())
    async def items(
        tenant: Annotated[str, Depends(tenant_of)], color: Annotated[str, Depends(filter_of)]
    ) -> dict[str, str]:
        return {"tenant": tenant, "color": color}

    async with client(app) as c:
        red = await c.request("GET", "/t/acme/items", json={"color": "red"})
        blue = await c.request("GET", "/t/acme/items", json={"color": "blue"})
        other = await c.request("GET", "/t/globex/items", json={"color": "red"})
        red2 = await c.request("GET", "/t/acme/items", json={"color": "red"})
    assert [r.json() for r in (red, blue, other)] == [
        {"tenant": "acme", "color": "red"},
        {"tenant": "acme", "color": "blue"},
        {"tenant": "globex", "color": "red"},
    ]
    assert red2.headers["x-cache"] == "HIT"
    assert len(cache.keys()) == 3
