"""The Django edge: cache and coalesce views as rendered HTTP responses.

    from coalesce.django import cached, coalesced

    @cached(ttl=60, vary=["accept-language"])
    def item(request, item_id): ...                  # sync views

    @cached(ttl=60)
    async def report(request, day): ...               # and async views

    urlpatterns = [path("items/<int:item_id>/", item), path("reports/<day>/", report)]

The same options and guarantees as `coalesce.fastapi.cached` where they apply (ttl, key,
vary, shared, tags, stale_ttl, cache_4xx, honor_client_no_cache, cache, registry); what a
request's key is, the credentials rule, the headers and metrics are `coalesce.http.view`'s,
shared with Starlette and Flask. Concurrent identical requests share one run of the view:
threads of a WSGI server for sync views, tasks of the event loop for async views under
ASGI (Django runs *sync* views of an ASGI app one at a time, in one thread); on Redis one
per fleet. Unlike `cache_page`, concurrent misses do not all run the view.

This module only translates: an `HttpRequest` (and the view's URL arguments) to the
layer's `HttpRequest`, an `HttpResponse` to `Rendered` parts (a `TemplateResponse` is
rendered first), and an entry's parts to an `HttpResponse`. A response that sets a cookie
(`response.cookies`), or whose request modified its session or used its CSRF token (the
middleware sets those cookies after the view), is never stored nor shared. Streaming
responses (`StreamingHttpResponse`, `FileResponse`) are never cached. With `cache_4xx=True`
a raised `Http404` is kept too and raised again on hits (Django renders its 404 page).
`coalesced` shares one run of a view among overlapping identical requests and keeps
nothing. Decorate functions;
for a class-based view, decorate the function `as_view()` returns.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, cast

from coalesce.http.view import missing_extra

try:
    from django.http import (  # type: ignore[import-untyped]  # Django ships no types
        Http404,
        HttpResponse,
        HttpResponseBase,
    )
    from django.http import HttpRequest as DjangoRequest
except ImportError as exc:  # the extra is not installed: say which one
    raise missing_extra("django", "Django", exc) from None

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

#: What `render` adds to the parts of a response whose request will get a cookie from a
#: middleware after the view (its session modified, its CSRF token used): it makes them
#: `personal` (never stored, never shared), as that cookie would.
MIDDLEWARE_COOKIE = ("set-cookie", "(a session or CSRF cookie, set by a middleware)")


class DjangoIo:
    """`coalesce.http.view.Io` for Django responses, for one request."""

    strips_head = True  # an entry's HEAD response: no body, the full Content-Length

    __slots__ = ("request",)

    def __init__(self, request: DjangoRequest) -> None:
        self.request = request

    def sets_cookie_later(self) -> bool:
        """Whether a middleware will add a cookie to this request's response."""
        session = getattr(self.request, "session", None)
        meta = self.request.META
        return (
            bool(getattr(session, "modified", False))
            or bool(meta.get("CSRF_COOKIE_NEEDS_UPDATE"))
            or bool(meta.get("CSRF_COOKIE_USED"))
        )

    def render(self, response: HttpResponseBase) -> Rendered:
        render = getattr(response, "render", None)
        if callable(render) and not getattr(response, "is_rendered", True):
            render()  # a TemplateResponse: its content is what is kept
        headers = [(k.lower(), v) for k, v in response.headers.items()]
        headers += [("set-cookie", m.OutputString()) for m in response.cookies.values()]
        if self.sets_cookie_later():
            headers.append(MIDDLEWARE_COOKIE)
        body = None if response.streaming else cast(HttpResponse, response).content
        return Rendered(response.status_code, headers, body)

    def build(
        self, status: int, body: bytes, headers: RawHeaders, own: HttpResponseBase | None
    ) -> HttpResponseBase:
        response = HttpResponse(body, status=status)
        del response["Content-Type"]  # the entry's own, if it has one
        lines: dict[str, list[str]] = {}
        for name, value in headers:
            lines.setdefault(name.decode("latin-1"), []).append(value.decode("latin-1"))
        for text, values in lines.items():
            response[text] = ", ".join(values)
        return response

    def header(self, response: HttpResponseBase, name: str) -> list[str]:
        value = response.headers.get(name)
        return [] if value is None else [value]

    def set_header(self, response: HttpResponseBase, name: str, value: str) -> None:
        response[name] = value

    def http_error(self, exc: Exception) -> HttpError | None:
        if not isinstance(exc, Http404):
            return None
        return HttpError(404, str(exc), [])

    def raise_error(self, error: HttpError) -> NoReturn:
        raise Http404(error.detail)


def request_of(request: DjangoRequest, kwargs: dict[str, Any]) -> HttpRequest:
    """A Django request's parts: its URL pattern (for metrics), path, the view's URL
    arguments, query and headers."""
    match = request.resolver_match
    route = getattr(match, "route", None)
    return HttpRequest(
        method=request.method or "GET",
        scheme=request.scheme or "http",
        host=request.headers.get("host"),
        route="/" + route if route else request.path,
        path=request.path,
        params=kwargs,
        query=[(name, value) for name, values in request.GET.lists() for value in values],
        headers=RequestHeaders(request.headers.items()),
    )


def _wrap(view: ViewCache, fn: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_view(request: DjangoRequest, *args: Any, **kwargs: Any) -> Any:
            def run() -> Awaitable[HttpResponseBase]:
                return cast(Awaitable[HttpResponseBase], fn(request, *args, **kwargs))

            return await view.aserve(request_of(request, kwargs), run, DjangoIo(request))

        wrapper: Callable[..., Any] = async_view
    else:

        @functools.wraps(fn)
        def sync_view(request: DjangoRequest, *args: Any, **kwargs: Any) -> Any:
            def run() -> HttpResponseBase:
                return cast(HttpResponseBase, fn(request, *args, **kwargs))

            return view.serve(request_of(request, kwargs), run, DjangoIo(request))

        wrapper = sync_view
    view.attach(wrapper, awaited=False)
    return wrapper


cached, coalesced = view_decorators("django", _wrap)
cached.__doc__ = """Cache a Django view's rendered responses for `ttl` seconds (see the module
docstring and `coalesce.http.view`).

`@cached`, `@cached(60)`, `@cached(ttl=60, key=..., vary=[...], shared=..., tags=[...],
stale_ttl=..., cache=..., cache_4xx=..., honor_client_no_cache=..., registry=...)`. The
decorated view has `view.invalidate(**url_kwargs)` (every entry of that path: each query
string, host and `vary` variant; with a `key` template, the values of its fields) and
`view.invalidate_all()`, their awaitable twins `ainvalidate` / `ainvalidate_all` (for
async code), `view.key(...)` and `view.stats()` (`ViewCache.attach`).
"""
