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

Errors, each `{"detail": ...}` naming the problem:

* 401 with `WWW-Authenticate: Bearer` for a missing or wrong token, checked before a byte of
  the body is read;
* 413 for a body over `MAX_BODY_BYTES` (64 KiB): refused from `Content-Length` alone when it
  announces more, otherwise (a chunked body) as soon as the bytes read exceed it; the body
  is read in chunks, never more than the limit plus one chunk;
* 400 for a malformed `Content-Length`, a body that is not UTF-8, not JSON, nested deeper
  than `MAX_DEPTH` (32) arrays/objects (checked before parsing, without recursion), not
  exactly one of the two shapes above (no other members), or more than `MAX_KEYS` (1000)
  keys (split longer lists over several requests);
* 503 when the store fails.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from coalesce.cache import Cache
from coalesce.errors import BackendError, CoalesceError, ConfigurationError
from coalesce.fastapi.metrics import bearer_matches

MAX_KEYS = 1000  # keys per request
MAX_BODY_BYTES = 64 * 1024  # request body, in bytes
MAX_DEPTH = 32  # nesting of arrays and objects in the body (a valid one has 2)


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
            body = _parse(await _read_body(request))
        except _Refused as refused:
            return JSONResponse({"detail": refused.detail}, status_code=refused.status)
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


class _Refused(Exception):
    """A request body we do not accept: the status and `detail` to answer with."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


TOO_LARGE = f"the body must be at most {MAX_BODY_BYTES} bytes (split a longer list of keys)"


async def _read_body(request: Request) -> bytes:
    """The request body, read in chunks and never more than `MAX_BODY_BYTES` plus one chunk.

    Raises `_Refused` 413 when it is longer (at once when `Content-Length` says so), 400 when
    `Content-Length` is not a number.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isascii() or not declared.isdigit():
            raise _Refused(400, "the Content-Length header must be a whole number of bytes")
        if int(declared) > MAX_BODY_BYTES:
            raise _Refused(413, TOO_LARGE)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _Refused(413, TOO_LARGE)
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(raw: bytes) -> Any:
    """The JSON value of `raw`; raises `_Refused` 400 saying why it is not acceptable JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Refused(400, "the body must be UTF-8 encoded JSON") from None
    if _depth(text) > MAX_DEPTH:
        raise _Refused(400, f"the body nests arrays/objects deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: belt and braces after _depth
        raise _Refused(400, 'the body must be JSON: {"keys": [...]} or {"tag": "..."}') from None


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"?', re.DOTALL)  # a JSON string (maybe unterminated)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _depth(text: str) -> int:
    """How deep arrays and objects nest in JSON `text`, without recursion (brackets inside
    strings do not count). Malformed text gets some number: `json.loads` refuses it later."""
    depth = deepest = 0
    for char in _NOT_BRACKET.sub("", _STRING.sub("", text)):
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _check_body(body: Any) -> str | None:
    """What is wrong with an invalidation request body, or None."""
    if not isinstance(body, dict) or len({"keys", "tag"} & body.keys()) != 1:
        return 'the body must have exactly one of "keys" (a list) or "tag" (a string)'
    if len(body) != 1:
        others = sorted(set(body) - {"keys", "tag"})
        return f'unknown member(s) {", ".join(map(json.dumps, others))}: send only "keys" or "tag"'
    if "keys" in body:
        keys = body["keys"]
        if not isinstance(keys, list) or not keys:
            return '"keys" must be a non-empty list of keys'
        if len(keys) > MAX_KEYS:
            return f"too many keys: {len(keys)} given, at most {MAX_KEYS} per request"
        if not all(isinstance(key, str) and key for key in keys):
            return '"keys" must hold non-empty strings'
        return None
    tag = body["tag"]
    if not isinstance(tag, str) or not tag:
        return '"tag" must be a non-empty string'
    return None


def _bad_request(detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=400)
