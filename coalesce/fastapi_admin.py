"""The admin router: invalidate keys or a tag of a cache over HTTP, behind a bearer token.

Off by default: nothing is mounted unless the application includes
`admin_router(cache, token=...)`, and the router refuses to be built without a token
(`ConfigurationError`). The token is compared in constant time.

Endpoint (what `coalesce invalidate KEY --app URL --token TOKEN` calls):

`POST {prefix}/invalidate` (prefix `/coalesce` by default), header
`Authorization: Bearer <token>`, JSON body with exactly one of:

* `{"keys": ["k1", "k2"]}` -> 200 `{"removed": {"k1": true, "k2": false}, "count": 1}`
  (`true`: an entry existed and was deleted; keys are given without the namespace, as
  `Cache.invalidate` takes them);
* `{"tag": "t"}` -> 200 `{"tag": "t", "removed": 3}` (how many entries carried the tag).

Errors: 401 `{"detail": ...}` with `WWW-Authenticate: Bearer` for a missing or wrong token;
400 for a body that is not such JSON (at most 1000 non-empty string keys); 503 when the
store fails.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from coalesce.cache import Cache
from coalesce.errors import BackendError, CoalesceError, ConfigurationError
from coalesce.fastapi_metrics import bearer_matches

MAX_KEYS = 1000


def admin_router(
    cache: Cache,
    *,
    token: str | None,
    prefix: str = "/coalesce",
    include_in_schema: bool = False,
) -> APIRouter:
    """A router with `POST {prefix}/invalidate` for `cache` (see the module docstring).

    Raises `ConfigurationError` when `token` is missing or blank: an admin endpoint without
    a secret would let anyone drop the cache and stampede the database.
    """
    if not isinstance(token, str) or not token.strip():
        raise ConfigurationError(
            "admin_router needs a bearer token: admin_router(cache, token=...) with a long "
            "random secret (e.g. secrets.token_urlsafe(32)); it is never mounted without one"
        )
    if not isinstance(cache, Cache):
        raise ConfigurationError(f"admin_router needs a coalesce.Cache, not {cache!r}")
    if prefix and not prefix.startswith("/"):
        raise ConfigurationError(f"prefix must start with '/', not {prefix!r}")
    secret = token
    router = APIRouter()

    async def invalidate(request: Request) -> JSONResponse:
        if not bearer_matches(request.headers.get("authorization"), secret):
            return JSONResponse(
                {"detail": "missing or wrong bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _bad_request('the body must be JSON: {"keys": [...]} or {"tag": "..."}')
        problem = _check_body(body)
        if problem:
            return _bad_request(problem)
        try:
            if "keys" in body:
                removed = {key: await cache.ainvalidate(key) for key in body["keys"]}
                return JSONResponse({"removed": removed, "count": sum(removed.values())})
            count = await cache.ainvalidate_tag(body["tag"])
            return JSONResponse({"tag": body["tag"], "removed": count})
        except BackendError as exc:
            return JSONResponse({"detail": f"the cache store failed: {exc}"}, status_code=503)
        except CoalesceError as exc:
            return _bad_request(str(exc))

    router.add_api_route(
        prefix.rstrip("/") + "/invalidate",
        invalidate,
        methods=["POST"],
        include_in_schema=include_in_schema,
    )
    return router


def _check_body(body: Any) -> str | None:
    """What is wrong with an invalidation request body, or None."""
    if not isinstance(body, dict) or len({"keys", "tag"} & body.keys()) != 1:
        return 'the body must have exactly one of "keys" (a list) or "tag" (a string)'
    if "keys" in body:
        keys = body["keys"]
        if not isinstance(keys, list) or not keys or len(keys) > MAX_KEYS:
            return f'"keys" must be a list of 1 to {MAX_KEYS} keys'
        if not all(isinstance(key, str) and key for key in keys):
            return '"keys" must hold non-empty strings'
        return None
    tag = body["tag"]
    if not isinstance(tag, str) or not tag:
        return '"tag" must be a non-empty string'
    return None


def _bad_request(detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=400)
