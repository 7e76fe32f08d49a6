"""The Flask edge: cache and coalesce views as rendered HTTP responses.

    from coalesce.flask import cached, coalesced

    @app.get("/items/<int:item_id>")
    @cached(ttl=60, vary=["accept-language"])
    def item(item_id: int): ...

Place the decorator *under* `@app.route(...)`. The same options and guarantees as
`coalesce.fastapi.cached` where they apply (ttl, key, vary, shared, tags, stale_ttl,
cache_4xx, honor_client_no_cache, cache, registry); what a request's key is, the credentials
rule, the headers and metrics are `coalesce.http.view`'s, shared with Starlette and Django.
Concurrent identical requests on the threads of one process (the development server,
waitress, gunicorn's threads) share one run of the view; on Redis, one per fleet.

This module only translates: `flask.request` to an `HttpRequest`, the view's return value
(through `app.make_response`, as Flask would) to `Rendered` parts, and an entry's parts to
the app's `response_class`. A response whose request modified `flask.session` is treated as
setting a cookie (Flask adds the cookie after the view): it is never stored nor shared.
Streamed responses are never cached. With `cache_4xx=True` an `abort(404)` (a werkzeug HTTP
exception, 4xx) is kept too and raised again on hits, for the app's error handlers to render.
`coalesced` shares one run of a view among overlapping identical requests and keeps
nothing. A stale entry (`stale_ttl`) is refreshed in a worker thread inside a request
context made from the original request's WSGI environ (a new `g`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NoReturn

from coalesce.http.view import missing_extra

try:
    import flask
    from flask import Response, abort
    from werkzeug.exceptions import HTTPException
except ImportError as exc:  # the extra is not installed: say which one
    raise missing_extra("flask", "Flask", exc) from None

from coalesce.http.metrics import REGISTRY, MetricsRegistry
from coalesce.http.render import RawHeaders
from coalesce.http.view import (
    HttpError,
    HttpRequest,
    Rendered,
    RequestHeaders,
    ViewCache,
    view_decorators,
)

__all__ = ["REGISTRY", "MetricsRegistry", "cached", "coalesced"]

#: The header `render` adds to the parts of a response whose request modified the session:
#: it makes them `personal` (never stored, never shared), as the cookie Flask adds would.
SESSION_COOKIE = ("set-cookie", "(the session, set by Flask after the view)")


class FlaskIo:
    """`coalesce.http.view.Io` for Flask (werkzeug) responses, for one request of `app`."""

    strips_head = False  # werkzeug sends no body for HEAD, and the full Content-Length

    __slots__ = ("app", "session_modified")

    def __init__(self, app: flask.Flask) -> None:
        self.app = app
        # Whether the view modified the session, told by `run` while the request context
        # is there (a stale refresh renders after leaving the one it made).
        self.session_modified = False

    def render(self, response: Response) -> Rendered:
        headers = [(k.lower(), v) for k, v in response.headers.items()]
        if self.session_modified:
            headers.append(SESSION_COOKIE)
        streamed = response.is_streamed or response.direct_passthrough
        return Rendered(response.status_code, headers, None if streamed else response.get_data())

    def build(
        self, status: int, body: bytes, headers: RawHeaders, own: Response | None
    ) -> Response:
        response: Response = self.app.response_class(
            body,
            status=status,
            headers=[
                (k.decode("latin-1"), v.decode("latin-1"))
                for k, v in headers
                if k != b"content-length"  # werkzeug sets it from the body
            ],
        )
        return response

    def header(self, response: Response, name: str) -> list[str]:
        return response.headers.getlist(name)

    def set_header(self, response: Response, name: str, value: str) -> None:
        response.headers[name] = value

    def http_error(self, exc: Exception) -> HttpError | None:
        """`abort(404)` and werkzeug's other HTTP exceptions, but one carrying a response
        of its own (`abort(response)`)."""
        if not isinstance(exc, HTTPException) or exc.code is None or exc.response is not None:
            return None
        return HttpError(exc.code, exc.description, [])

    def raise_error(self, error: HttpError) -> NoReturn:
        abort(error.status, error.detail)


def request_of(request: flask.Request) -> HttpRequest:
    """A Flask request's parts: its URL rule (for metrics), path, view arguments, query and
    headers."""
    rule = request.url_rule
    path = request.script_root + request.path
    return HttpRequest(
        method=request.method,
        scheme=request.scheme,
        host=request.host,
        route=request.script_root + rule.rule if rule is not None else path,
        path=path,
        params=request.view_args or {},
        query=list(request.args.items(multi=True)),
        headers=RequestHeaders(request.headers.items()),
    )


def _wrap(view: ViewCache, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Response:
        app = flask.current_app._get_current_object()  # type: ignore[attr-defined]
        request = flask.request._get_current_object()  # type: ignore[attr-defined]
        environ = request.environ
        io = FlaskIo(app)

        def direct() -> Response:
            response: Response = app.make_response(app.ensure_sync(fn)(*args, **kwargs))
            io.session_modified = bool(getattr(flask.session, "modified", False))
            return response

        def run() -> Response:
            if flask.has_request_context():
                return direct()
            with app.request_context(environ):  # a stale refresh, in a worker thread
                return direct()

        return view.serve(request_of(request), run, io)

    view.attach(wrapper, awaited=False)
    return wrapper


cached, coalesced = view_decorators("flask", _wrap)
cached.__doc__ = """Cache a Flask view's rendered responses for `ttl` seconds (see the module
docstring and `coalesce.http.view`).

`@cached`, `@cached(60)`, `@cached(ttl=60, key=..., vary=[...], shared=..., tags=[...],
stale_ttl=..., cache=..., cache_4xx=..., honor_client_no_cache=..., registry=...)`. The
decorated view has `view.invalidate(**view_args)` (every entry of that path: each query
string, host and `vary` variant; with a `key` template, the values of its fields),
`view.invalidate_all()`, their awaitable twins `ainvalidate` / `ainvalidate_all`,
`view.key(...)` and `view.stats()` (`ViewCache.attach`). An `async def` view runs through
Flask's `ensure_sync`, as without the decorator.
"""
