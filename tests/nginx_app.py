"""The application tests/test_nginx.py serves with uvicorn behind nginx's proxy_cache.

Users: ``tok-alice`` is alice, ``tok-bob`` is bob, given as ``Authorization: Bearer tok-...``
or, on ``/me``, as ``X-API-Key: tok-...``. Every cached handler counts its computations
(``GET /counts``, undecorated) and puts that count and, where there is one, the user in its
body, so a test can tell whose computation a response is.

* ``/public/{item_id}``: the same for everyone, default key;
* ``/feed``: per user, ``key="feed:{user.id}"`` over a ``Depends(current_user)`` result;
* ``/me``: per user, the user from FastAPI's ``APIKeyHeader(name="X-API-Key")``, default key;
* ``/profile``: the same API-key user, ``key="profile:{user.id}"``: a per-user entry whose
  request carries neither ``Authorization`` nor ``Cookie``;
* ``/shared``: ``shared=True``, the same for everyone (credentials or not);
* ``/no-store`` and ``/no-cache``: the handler sets its own ``Cache-Control``.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel

from coalesce import Cache
from coalesce.fastapi import cached

TTL = 30
USERS = {"tok-alice": "alice", "tok-bob": "bob"}

cache = Cache()
app = FastAPI()
counts: Counter[str] = Counter()


class User(BaseModel):
    id: str


def current_user(authorization: Annotated[str | None, Header()] = None) -> User:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or token not in USERS:
        raise HTTPException(401, "unknown user", headers={"WWW-Authenticate": "Bearer"})
    return User(id=USERS[token])


api_key = APIKeyHeader(name="X-API-Key")


def api_user(key: Annotated[str, Depends(api_key)]) -> User:
    if key not in USERS:
        raise HTTPException(401, "unknown API key")
    return User(id=USERS[key])


def computed(route: str) -> int:
    counts[route] += 1
    return counts[route]


@app.get("/public/{item_id}")
@cached(ttl=TTL, cache=cache)
async def public(item_id: int) -> dict[str, Any]:
    return {"item": item_id, "computation": computed("public")}


@app.get("/feed")
@cached(ttl=TTL, cache=cache, key="feed:{user.id}")
async def feed(user: Annotated[User, Depends(current_user)]) -> dict[str, Any]:
    return {"user": user.id, "feed": f"news for {user.id}", "computation": computed("feed")}


@app.get("/me")
@cached(ttl=TTL, cache=cache)
async def me(user: Annotated[User, Depends(api_user)]) -> dict[str, Any]:
    return {"user": user.id, "profile": f"profile of {user.id}", "computation": computed("me")}


@app.get("/profile")
@cached(ttl=TTL, cache=cache, key="profile:{user.id}")
async def profile(user: Annotated[User, Depends(api_user)]) -> dict[str, Any]:
    return {"user": user.id, "profile": f"profile of {user.id}", "computation": computed("profile")}


@app.get("/shared")
@cached(ttl=TTL, cache=cache, shared=True)
async def shared() -> dict[str, Any]:
    return {"message": "the same for everyone", "computation": computed("shared")}


@app.get("/no-store")
@cached(ttl=TTL, cache=cache)
async def no_store(response: Response) -> dict[str, Any]:
    response.headers["Cache-Control"] = "no-store"
    return {"secret": "never stored", "computation": computed("no-store")}


@app.get("/no-cache")
@cached(ttl=TTL, cache=cache)
async def no_cache(response: Response) -> dict[str, Any]:
    response.headers["Cache-Control"] = "no-cache"
    return {"fresh": "revalidate every time", "computation": computed("no-cache")}


@app.get("/counts")
async def get_counts() -> dict[str, int]:
    return dict(counts)
