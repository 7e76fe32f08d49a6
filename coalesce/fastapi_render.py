"""Rendered responses: how a handler's result becomes a stored entry and an entry a response.

An *entry* is what the cache keeps for one request: a msgpack-friendly dict (so it works on
Redis as well as in memory)

    {"v": 1, "status": 200, "headers": [["content-type", "application/json"], ...],
     "body": b'...', "etag": '"3f2a..."', "created": 1732520000.1, "ttl": 60.0}

or, for a cached `HTTPException` (`cache_4xx=True`), `"detail"` instead of a body: it is
raised again on hits so that the application's exception handlers render it as usual.
Headers that are per response, per hop or per user are not kept (`http.UNSTORED_HEADERS`).

`render` turns a handler's return value into the `Response` FastAPI itself would have sent:
the route's `response_model` validation and serialization, its `response_class` and
`status_code`, and the headers and status set on the injected `Response` parameter. The
result of a handler that returns a `Response` is kept as it is.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

from fastapi import HTTPException
from fastapi.datastructures import DefaultPlaceholder
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response
from fastapi.routing import serialize_response

from coalesce.http import (
    COALESCED,
    HIT,
    MISS,
    STALE,
    UNSTORED_HEADERS,
    age_seconds,
    cache_control_value,
    cache_directives,
    etag_for,
    if_none_match,
    max_age_seconds,
    storable,
)

_DUMP_JSON = "dump_json" in inspect.signature(serialize_response).parameters
RawHeaders = list[tuple[bytes, bytes]]
_X_CACHE = {s: (b"x-cache", s.encode()) for s in (HIT, MISS, STALE, COALESCED)}


class RawResponse(Response):
    """A response from parts already encoded: a hit builds nothing it can reuse."""

    def __init__(self, status_code: int, body: bytes, raw_headers: RawHeaders) -> None:
        self.status_code = status_code
        self.body = body
        self.raw_headers = raw_headers
        self.background = None


class NotShared(Exception):
    """A computed response that must not be stored, and maybe not shared either.

    The request that ran the handler answers with its own response; the others answer with
    `rendered` when sharing it is safe (a 5xx, an un-opted 4xx, `no-store`), else run the
    handler themselves (`rendered` is None: a cookie was set, `private`, or a stream).
    """

    def __init__(self, rendered: dict[str, Any] | None) -> None:
        super().__init__("response not stored")
        self.rendered = rendered


async def render(raw: Any, route: Any, sub: Response) -> Response:
    """`raw`, a handler's return value, as FastAPI would have rendered it on `route`.

    `sub` is FastAPI's sub-response (the injected `Response` parameter): its status and
    headers apply as they would without the decorator.
    """
    if isinstance(raw, Response):
        return raw
    if route is None:  # not under FastAPI routing: plain JSON
        return JSONResponse(jsonable_encoder(raw))
    field = route.response_field
    response_class = route.response_class
    default_class = isinstance(response_class, DefaultPlaceholder)
    if default_class:
        response_class = response_class.value
    dump_json = _DUMP_JSON and field is not None and default_class
    options: dict[str, Any] = {"dump_json": True} if dump_json else {}
    content = await serialize_response(
        field=field,
        response_content=raw,
        include=route.response_model_include,
        exclude=route.response_model_exclude,
        by_alias=route.response_model_by_alias,
        exclude_unset=route.response_model_exclude_unset,
        exclude_defaults=route.response_model_exclude_defaults,
        exclude_none=route.response_model_exclude_none,
        is_coroutine=True,
        **options,
    )
    args: dict[str, Any] = {}
    status = sub.status_code or route.status_code
    if status:
        args["status_code"] = status
    if dump_json:
        response = Response(content, media_type="application/json", **args)
    else:
        response = response_class(content, **args)
    if response.status_code < 200 or response.status_code in (204, 205, 304):
        response.body = b""
    response.raw_headers.extend(sub.headers.raw)
    return response


def entry_of(
    response: Response, *, ttl: float | None, store: bool, cache_4xx: bool
) -> dict[str, Any]:
    """The entry of a rendered response; raises `NotShared` when it may not be kept."""
    body = getattr(response, "body", None)
    if not isinstance(body, bytes):  # a streaming response: nothing to keep or share
        raise NotShared(None)
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers]
    rendered = {
        "v": 1,
        "status": response.status_code,
        "headers": [[k, v] for k, v in headers if k.lower() not in UNSTORED_HEADERS],
        "body": body,
        "etag": etag_for(body),
        "created": time.time(),
        "ttl": ttl,
    }
    if not storable(response.status_code, headers, cache_4xx=True):
        per_user = any(
            k.lower() == "set-cookie"
            or (k.lower() == "cache-control" and "private" in cache_directives(v))
            for k, v in headers
        )
        raise NotShared(None if per_user else rendered)
    if store and not storable(response.status_code, headers, cache_4xx=cache_4xx):
        raise NotShared(rendered)
    return rendered


def exception_entry(exc: HTTPException, *, ttl: float | None) -> dict[str, Any]:
    """The entry of a raised 4xx `HTTPException` (kept only with `cache_4xx=True`)."""
    return {
        "v": 1,
        "status": exc.status_code,
        "headers": [[k, v] for k, v in (exc.headers or {}).items()],
        "detail": jsonable_encoder(exc.detail),
        "etag": "",
        "created": time.time(),
        "ttl": ttl,
    }


class Encoded:
    """An entry's parts encoded once: its stored headers (with Content-Length) and ETag, and
    the complete headers of its latest public `HIT` response with the `Age` and `max-age`
    they carry (they change at most once a second)."""

    __slots__ = ("etag", "hit", "hit_ages", "raw", "value")

    def __init__(self, value: dict[str, Any]) -> None:
        self.value = value
        self.raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in value["headers"]]
        self.raw.append((b"content-length", str(len(value["body"])).encode()))
        self.etag = value["etag"].encode()
        self.hit: RawHeaders = []
        self.hit_ages = (-1, -1)


class Responder:
    """Builds responses from entries for one route, remembering each entry's encoded parts.

    In memory a hit returns the very same entry dict every time, so its headers are encoded
    once and kept (for at most `memo_size` entries, by identity); entries read from a shared
    store are new dicts on every read and are not remembered.
    """

    def __init__(self, *, vary_header: bytes, stale_ttl: float, memo_size: int = 256) -> None:
        self.vary_header = vary_header
        self.stale_ttl = stale_ttl
        self.memo_size = memo_size
        # `Cache-Control` with a `%d` for max-age, built once (see `cache_control_value`).
        self._control_public = (
            cache_control_value(0, stale_while_revalidate=stale_ttl)
            .replace("max-age=0", "max-age=%d")
            .encode()
        )
        self._control_private = (
            cache_control_value(0, private=True, stale_while_revalidate=stale_ttl)
            .replace("max-age=0", "max-age=%d")
            .encode()
        )
        self._memo: dict[int, Encoded] = {}

    def _encoded(self, value: dict[str, Any], remember: bool) -> Encoded:
        memo = self._memo.get(id(value))
        if memo is not None and memo.value is value:
            return memo
        encoded = Encoded(value)
        if remember:
            if len(self._memo) >= self.memo_size:
                self._memo.clear()
            self._memo[id(value)] = encoded
        return encoded

    def _caching_headers(
        self, status: str, private: bool, ages: tuple[int, int] | None
    ) -> RawHeaders:
        """`X-Cache`, then (`ages`: Age and max-age, for cached routes) `Cache-Control` and
        `Age`, then `Vary`."""
        extra: RawHeaders = [_X_CACHE.get(status) or (b"x-cache", status.encode())]
        if ages is not None:
            control = self._control_private if private else self._control_public
            extra.append((b"cache-control", control % ages[1]))
            extra.append((b"age", b"%d" % ages[0]))
        if self.vary_header:
            extra.append((b"vary", self.vary_header))
        return extra

    def parts(
        self,
        value: dict[str, Any],
        status: str,
        *,
        cached: bool,
        private: bool,
        stale: bool,
        if_none_match_header: str | None,
        head: bool,
        remember: bool = True,
    ) -> tuple[int, bytes, RawHeaders]:
        """The status, body and raw headers of the response for an entry: its stored parts
        plus this response's caching headers.

        `cached`: add Cache-Control and Age (False for `coalesced` routes, which keep
        nothing). Raises the entry's `HTTPException` for a cached exception.
        """
        ages: tuple[int, int] | None = None
        if cached:
            now = time.time()
            created, ttl = value["created"], value["ttl"]
            max_age = 0 if stale or ttl is None else max_age_seconds(created, ttl, now)
            ages = (age_seconds(created, now), max_age)
        if "detail" in value:  # a cached HTTPException: the app's handlers render it
            headers = {k: v for k, v in value["headers"]}
            extra = self._caching_headers(status, private, ages)
            headers.update((k.decode(), v.decode()) for k, v in extra)
            raise HTTPException(value["status"], detail=value["detail"], headers=headers)
        encoded = self._encoded(value, remember)
        code: int = value["status"]
        body = b"" if head else value["body"]
        if status == HIT and ages is not None and not private and if_none_match_header is None:
            # The common hit: the same headers as the previous one within the same second.
            if encoded.hit_ages != ages:
                extra = self._caching_headers(HIT, False, ages)
                encoded.hit = [*encoded.raw, *extra, (b"etag", encoded.etag)]
                encoded.hit_ages = ages
            return code, body, list(encoded.hit)  # a copy: middleware may add to it
        extra = self._caching_headers(status, private, ages)
        extra.append((b"etag", encoded.etag))
        if 200 <= code < 300 and if_none_match(if_none_match_header, value["etag"]):
            return 304, b"", extra
        return code, body, encoded.raw + extra

    def respond(
        self,
        value: dict[str, Any],
        status: str,
        *,
        cached: bool,
        private: bool,
        stale: bool,
        if_none_match_header: str | None,
        head: bool,
        remember: bool = True,
    ) -> Response:
        """`parts` as a `Response`."""
        return RawResponse(
            *self.parts(
                value,
                status,
                cached=cached,
                private=private,
                stale=stale,
                if_none_match_header=if_none_match_header,
                head=head,
                remember=remember,
            )
        )
