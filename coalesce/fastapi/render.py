"""Rendered responses on FastAPI: a handler's result as a `Response`, and back from entries.

An *entry* (`coalesce.http.render`, shared with the other edges) is what the cache keeps
for one request: a msgpack-friendly dict of the rendered response's status, headers and
body. Here, for a cached `HTTPException` (`cache_4xx=True`), it holds `"detail"` instead of
a body: it is raised again on hits so that the application's exception handlers render it
as usual.

`render` turns a handler's return value into the `Response` FastAPI itself would have sent:
the route's `response_model` validation and serialization, its `response_class` and
`status_code`, and the headers and status set on the injected `Response` parameter. The
result of a handler that returns a `Response` is kept as it is.
"""

from __future__ import annotations

import inspect
from typing import Any, NoReturn

from fastapi import HTTPException
from fastapi.datastructures import DefaultPlaceholder
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response
from fastapi.routing import serialize_response

from coalesce.http import MISS
from coalesce.http.render import NotShared as NotShared  # kept importable from here
from coalesce.http.render import Responder as BaseResponder
from coalesce.http.render import entry_from, error_entry, own_cache_control
from coalesce.starlette import IO
from coalesce.starlette import RawResponse as RawResponse  # kept importable from here

_DUMP_JSON = "dump_json" in inspect.signature(serialize_response).parameters


def own_response(response: Response, *, private: bool) -> Response:
    """The response of the request that ran the handler, when it is not stored: as the
    handler made it, with `X-Cache: MISS`; per user (`private`), its Cache-Control as
    `http.cache_control_for` makes it (never `public` nor `s-maxage`, at least `private`)."""
    response.headers["x-cache"] = MISS
    if private:
        response.headers["cache-control"] = own_cache_control(
            response.headers.getlist("cache-control")
        )
    return response


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
    """The entry of a rendered response; raises `NotShared` when it may not be kept.

    A `personal` response (a cookie set, `no-store`, `private`) is handed to no other
    request: `NotShared(None)`. One that is not stored for its status (5xx; 4xx unless
    `cache_4xx`; anything on a route that does not store) may still be shared by the requests
    of its flight: `NotShared(rendered)`.
    """
    status, headers, body = IO.render(response)  # body None: a stream, nothing to keep
    return entry_from(status, headers, body, ttl=ttl, store=store, cache_4xx=cache_4xx)


def exception_entry(exc: HTTPException, *, ttl: float | None) -> dict[str, Any]:
    """The entry of a raised 4xx `HTTPException` (kept only with `cache_4xx=True`).

    One whose headers make it `personal` is raised again (`exc`): not stored, as without
    `cache_4xx`.
    """
    headers = list((exc.headers or {}).items())
    entry = error_entry(exc.status_code, jsonable_encoder(exc.detail), headers, ttl=ttl)
    if entry is None:
        raise exc
    return entry


class Responder(BaseResponder):
    """`coalesce.http.render.Responder` making Starlette responses, and raising a cached
    `HTTPException` again (so that the application's exception handlers render it)."""

    def raise_cached(
        self, value: dict[str, Any], status: str, *, cached: bool, private: bool
    ) -> NoReturn:
        headers = self.exception_headers(value, status, cached=cached, private=private)
        raise HTTPException(value["status"], detail=value["detail"], headers=headers)

    def respond(self, value: dict[str, Any], status: str, **options: Any) -> Response:
        """`parts` (with the same keyword arguments) as a `Response`."""
        return RawResponse(*self.parts(value, status, **options))
