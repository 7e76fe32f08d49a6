"""One cached view, for the frameworks that hand a view its request: Starlette, Flask, Django.

    adapter (coalesce.starlette / flask / django): framework request ──► `HttpRequest`
        │
        ▼
    `ViewCache.serve` (sync) / `aserve` (async), side by side below:

    GET/HEAD? cache enabled? ── no ──► the view, as if undecorated
       │
       ├─ `plan` (pure): a credential header (Authorization, Cookie, one named like a
       │  credential: X-API-Key...) not in `vary`, and not shared=True ──► BYPASS, private
       │  (no key or tag renders ──► BYPASS)
       ▼
    key ──► `Cache.get_fresh` ── fresh ──► HIT (one read; the view does not run)
       │
       └─ missing / stale ──► `Cache.get_or_set(key, compute)` (the flight: one run of the
          view per key; on Redis one per fleet), `compute` running the view for one request,
          rendering its response (`Rendered`) into the entry ──► MISS | COALESCED | STALE

The adapter gives the request's parts (`HttpRequest`), a `run` callable that runs the view
for this request and returns the framework's response, and an `Io` that renders such a
response to `Rendered` parts and builds one from the parts of an entry, and tells which
raised exceptions are HTTP errors (`HttpError`: kept with `cache_4xx=True` as an entry with
`"detail"`, raised again on hits for the framework to render). A `coalesced` view
(`store=False`) shares runs through the core's `Cache.coalesced` and keeps nothing.
Everything else (the key, the credentials rule, the headers, 304, metrics, logging,
invalidation) is here, once.

The default key is the request's `scheme://host`, its path and its whole query string
(pairs sorted), then the `vary` headers (`coalesce.http.keys.view_key`): a view may read any
query parameter, so every one of them is in the key. What a view reads from other request
headers is invisible: name such headers in `vary`. `key="item:{item_id}"` replaces it with a
template over the path parameters and the query's first values (path parameters win),
stored as `item:3@<module>.<view>`; a template cannot tell users apart, so a request with a
credential still needs that header in `vary` (or `shared=True`).

The core is reached as the FastAPI edge reaches it, through `CachedEndpoint`
(`coalesce.http.endpoint`): public names only. Which request ran the view is known from its
`Job`; whether the others waited (COALESCED) or hit is told by the entry's creation time.
The options and their checks are `coalesce.http.options`'s, shared with FastAPI.
"""

from __future__ import annotations

import logging
import string
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, Generic, NamedTuple, NoReturn, Protocol, TypeVar

from coalesce import (
    CoalesceError,
    ConfigurationError,
    KeyTemplateError,
    LeaderFailedError,
    MissingDependencyError,
    get_cache,
)
from coalesce.http.endpoint import CachedEndpoint
from coalesce.http.headers import BYPASS, COALESCED, HIT, MISS, client_wants_fresh
from coalesce.http.keys import (
    credential_name,
    encode_origin,
    encode_pairs,
    encode_vary,
    secret,
    secret_header,
    secret_name,
    view_key,
)
from coalesce.http.metrics import RouteMetrics
from coalesce.http.options import RouteOptions, coalescing_decorator, route_decorator
from coalesce.http.render import (
    NotShared,
    RawHeaders,
    Responder,
    entry_from,
    error_entry,
    own_cache_control,
)

N = TypeVar("N")  # a framework's response type
# What rendering a request's key or tags may raise: the request then runs uncached.
_UNRENDERABLE = (CoalesceError, TypeError, ValueError, AttributeError, LookupError)
_ANSWERS = ("GET", "HEAD")


class RequestHeaders:
    """A request's header lines by lower-case name: `get` joins a header's lines with commas
    (RFC 9110 5.3), `getlist` gives them apart (for `encode_vary`)."""

    __slots__ = ("_lines",)

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        lines: dict[str, list[str]] = {}
        for name, value in pairs:
            lines.setdefault(name.lower(), []).append(value)
        self._lines = lines

    def get(self, name: str, default: str | None = None) -> str | None:
        found = self._lines.get(name)
        return default if found is None else ",".join(found)

    def getlist(self, name: str) -> list[str]:
        return list(self._lines.get(name, ()))

    def credentials(self) -> list[str]:
        """The credential headers (`credential_name`) sent with a value: an empty `Cookie`
        line (Django's test client sends one) carries no credential."""
        return [
            name
            for name, lines in self._lines.items()
            if credential_name(name) and any(line.strip() for line in lines)
        ]


class HttpRequest(NamedTuple):
    """What a view's request is, for the cache: made by the adapter of each framework."""

    method: str  # upper-case
    scheme: str  # "http" / "https"
    host: str | None  # the Host header (or the server's name)
    route: str  # the route's path template, as the framework writes it (metrics)
    path: str  # the path as received, decoded
    params: Mapping[str, Any]  # the path parameters the framework matched
    query: Sequence[tuple[str, str]]  # the query string's pairs, in order
    headers: RequestHeaders


class Rendered(NamedTuple):
    """A framework's response as parts: `body` None for a stream (never kept nor shared)."""

    status: int
    headers: list[tuple[str, str]]  # names lower-case
    body: bytes | None


class Io(Protocol[N]):
    """What an adapter does with its framework's responses."""

    #: Whether `build` is given an empty body for HEAD (True), or the framework's server
    #: drops the body of a HEAD response itself (False: Flask).
    strips_head: bool

    def render(self, response: N) -> Rendered: ...

    def build(self, status: int, body: bytes, headers: RawHeaders, own: N | None) -> N:
        """A response from an entry's parts; `own`: this request's own response (it ran
        the view), whose background work (Starlette) must still run."""
        ...

    def header(self, response: N, name: str) -> list[str]:
        """The lines of one header of a response (lower-case name)."""
        ...

    def set_header(self, response: N, name: str, value: str) -> None: ...

    def http_error(self, exc: Exception) -> HttpError | None:
        """A raised exception the framework renders as an HTTP error (`abort(404)`,
        `Http404`, Starlette's `HTTPException`), else None."""
        ...

    def raise_error(self, error: HttpError) -> NoReturn:
        """Raise such an error again, for the framework to render (a cached one's hit)."""
        ...


class HttpError(NamedTuple):
    """An HTTP error a view raised: its status, detail (text) and headers."""

    status: int
    detail: Any
    headers: list[tuple[str, str]]


class Bypass(NamedTuple):
    """A request that runs the view as if undecorated (`X-Cache: BYPASS`)."""

    metrics: RouteMetrics
    credentials: bool  # it carried a credential: its response is private unless it says


class Step(NamedTuple):
    """A request that goes through the cache: its key, tags and how its answer is sent."""

    raw_key: str  # as built; the core escapes it once as it stores it
    tags: tuple[str, ...]
    private: bool  # the entry is for one user: `Cache-Control: private`
    metrics: RouteMetrics

    def bypass(self) -> Bypass:
        return Bypass(self.metrics, self.private)


class Job(Generic[N]):
    """One request's part in a computation: how to run its view, and whether it did."""

    __slots__ = ("code", "io", "ran", "response", "run", "step", "ttl")

    def __init__(self, run: Callable[[], Any], io: Io[N], step: Step, ttl: float | None) -> None:
        self.run = run
        self.io = io
        self.step = step
        self.ttl = ttl  # of the entry it makes (`CachedEndpoint.ttl_now`)
        self.ran = False  # set when this request's computation started (it is the leader)
        self.response: N | None = None  # its view's response, once there is one
        self.code = 500  # the status it answered (an exception stays a 500)


def _template(key: str) -> Callable[..., str]:
    """A key or tag template's `format`, refused when decorating if it does not parse."""
    try:
        fields = list(string.Formatter().parse(key))
    except ValueError as exc:
        raise KeyTemplateError(f"key template {key!r} is malformed: {exc}") from None
    for _, field, _, _ in fields:
        if field is not None and not field.split(".", 1)[0].split("[", 1)[0].isidentifier():
            raise KeyTemplateError(
                f"key template {key!r}: {{{field}}} does not name a path or query parameter"
            )
    return key.format


class ViewCache(CachedEndpoint):
    """Everything decided about one decorated view when it is decorated, and its requests."""

    def __init__(
        self,
        fn: Callable[..., Any],
        options: RouteOptions,
        *,
        framework: str,
        store: bool = True,
    ) -> None:
        if not callable(fn):
            decorator = "cached" if store else "coalesced"
            raise ConfigurationError(f"@{decorator} decorates a view, not {fn!r}")
        logger = logging.getLogger(f"coalesce.{framework}")
        super().__init__(fn, options, store=store, logger=logger)
        self.template = None if options.key is None else _template(options.key)
        self.tag_makers = [_template(tag) for tag in options.tags]
        # An entry keyed on a credential header's value is for that user only.
        self.per_user = any(secret_header(name) for name in self.vary)
        # Every request header in the key is named in Vary (RFC 9110 12.5.5), and so is
        # every credential header unless the view is shared: a downstream cache must not
        # answer a request with another one's response.
        credentials = () if self.shared else ("authorization", "cookie")
        self.vary_header = ", ".join(n.title() for n in dict.fromkeys((*self.vary, *credentials)))
        self.routes: set[str] = set()  # the route templates it served (for `stats`)
        self.responder = Responder(
            vary_header=self.vary_header.encode("latin-1"),
            stale_ttl=self.stale_ttl,
            stale_if_error=self.stale_if_error,
        )

    # -- keys (pure) -----------------------------------------------------------------------

    def values(self, request: HttpRequest) -> dict[str, Any]:
        """What a template reads: the query's first values, then the path parameters."""
        values: dict[str, Any] = {}
        for name, value in request.query:
            values.setdefault(name, value)
        values.update(request.params)
        return values

    def ident(self, values: Mapping[str, Any]) -> str:
        """What identifies a request within the view's entries, for its request tag: the
        template's key, or the path parameters (`invalidate(item_id=3)`)."""
        if self.template is None:
            return encode_pairs((name, str(value)) for name, value in values.items())
        hashed = {
            name: secret(str(value)) if secret_name(name) and value is not None else value
            for name, value in values.items()
        }
        return self.template(**hashed)

    def plan(self, request: HttpRequest) -> Step | Bypass:
        """How a GET or HEAD request is served: its key and tags, or a bypass.

        A request carrying a credential (`credential_name`: Authorization, Cookie, X-API-Key,
        ...) is bypassed unless each such header is in `vary` (the entry is then the user's,
        sent `private`) or the view is `shared`. A request whose key or tags cannot be
        rendered (a template field it lacks) is bypassed too, logged once per view.
        """
        metrics = self.registry.route(request.route)
        if request.route not in self.routes:
            self.routes.add(request.route)
        private = self.per_user
        if not self.shared:
            found = request.headers.credentials()
            if found:
                if not all(name in self.vary for name in found):
                    return Bypass(metrics, credentials=True)
                private = True  # the key holds the user's credentials: for this user only
        try:
            values = self.values(request) if self.template or self.tag_makers else {}
            if self.template is None:
                origin = encode_origin(request.scheme, request.host)
                self.add_origin(origin)
                base = view_key(origin, request.path, request.query)
                ident = self.ident(request.params)
            else:
                ident = self.ident(values)
                base = f"{ident}@{self.name}"
            raw_key = base + encode_vary(self.vary, request.headers) if self.vary else base
            tags = (
                self.route_tag(),
                self.request_tag(ident),
                *[make(**values) for make in self.tag_makers],
            )
        except _UNRENDERABLE as exc:
            # No stable key for this request: run it as if undecorated rather than fail or
            # share wrongly.
            self.warn_once(
                "key", "coalesce: no cache key for %s (%s); not caching it", self.name, exc
            )
            return Bypass(metrics, credentials=private)
        return Step(raw_key, tags, private, metrics)

    def key(self, values: Mapping[str, Any], path: str | None, origin: str | None) -> str:
        """The stored key (without its `vary` part) of a template's values, or of a path
        (`origin` defaults to the only one this process served) and query values."""
        if self.template is not None:
            return self.normal(f"{self.ident(values)}@{self.name}")
        if path is None:
            raise ConfigurationError(f"{self.name}.key: which path? pass path='/items/3'")
        if origin is None:
            origin = self.only("origin", self.origins, "'https://shop.example'")
        return self.normal(view_key(origin, path, [(k, str(v)) for k, v in values.items()]))

    # -- answers (pure but for the counters) -----------------------------------------------

    def wants_fresh(self, request: HttpRequest) -> bool:
        """Whether to drop the entry first (`honor_client_no_cache` and the client's no-cache)."""
        headers = request.headers
        return self.honor_no_cache and client_wants_fresh(
            headers.get("cache-control"), headers.get("pragma")
        )

    def bypassed(self, response: N, bypass: Bypass, io: Io[N]) -> N:
        """The view's own response to a bypassed request, saying so in `X-Cache`; with a
        credential, `private` (unless the view set its own Cache-Control) and our `Vary`."""
        bypass.metrics.bypassed += 1
        io.set_header(response, "x-cache", BYPASS)
        if bypass.credentials:
            if not io.header(response, "cache-control"):
                io.set_header(response, "cache-control", "private")
            if self.vary_header:
                io.set_header(
                    response, "vary", ", ".join([*io.header(response, "vary"), self.vary_header])
                )
        return response

    def parts(
        self,
        value: dict[str, Any],
        status: str,
        step: Step,
        request: HttpRequest,
        io: Io[N],
        *,
        remember: bool,
        cached: bool | None = None,
    ) -> tuple[int, bytes, RawHeaders]:
        """The parts of the response for an entry (`cached`: by default, whether this view
        stores its entries); an entry of a raised error is raised again (`Io.raise_error`)
        with this response's caching headers."""
        cached = self.store if cached is None else cached
        if "detail" in value:
            again = self.responder.exception_headers(
                value, status, cached=cached, private=step.private
            )
            io.raise_error(HttpError(value["status"], value["detail"], list(again.items())))
        code, body, headers = self.responder.parts(
            value,
            status,
            cached=cached,
            private=step.private,
            if_none_match_header=request.headers.get("if-none-match"),
            head=io.strips_head and request.method == "HEAD",
            remember=remember,
        )
        if code == 304:
            step.metrics.not_modified += 1
        return code, body, headers

    def not_shared(self, exc: NotShared, job: Job[N], request: HttpRequest, io: Io[N]) -> N | None:
        """The answer when the flight's response may not be stored: this request's own
        response if it ran the view, the leader's (a 5xx, an un-opted 4xx) if it may be
        shared, else None (run the view for this request)."""
        step = job.step
        if job.response is not None:  # this request ran the view: its own response
            step.metrics.misses += 1
            io.set_header(job.response, "x-cache", MISS)
            if step.private:
                written = io.header(job.response, "cache-control")
                io.set_header(job.response, "cache-control", own_cache_control(written))
            return job.response
        if exc.rendered is None:
            return None
        step.metrics.coalesced += 1
        parts = self.parts(exc.rendered, COALESCED, step, request, io, remember=False, cached=False)
        return io.build(*parts, None)

    def answer(
        self,
        value: dict[str, Any],
        job: Job[N],
        request: HttpRequest,
        io: Io[N],
        started: float,
        remember: bool,
    ) -> N:
        """The response from the core's entry: MISS, COALESCED, STALE or HIT."""
        status = self.status(value, job.ran, started, job.step.metrics)
        parts = self.parts(value, status, job.step, request, io, remember=remember)
        return io.build(*parts, job.response)

    # -- the leader's computation ----------------------------------------------------------

    def entry(self, job: Job[N]) -> dict[str, Any]:
        """The entry of the response the view just gave (raises `NotShared`)."""
        assert job.response is not None
        rendered = job.io.render(job.response)
        job.code = rendered.status
        return entry_from(
            rendered.status,
            rendered.headers,
            rendered.body,
            ttl=job.ttl,
            store=self.store,
            cache_4xx=self.cache_4xx,
        )

    def error_entry(self, job: Job[N], exc: Exception) -> dict[str, Any]:
        """The entry of an HTTP error the view raised, kept with `cache_4xx=True` (a 4xx whose
        headers do not make it personal), else `exc` again."""
        error = job.io.http_error(exc)
        if error is None:
            raise exc
        job.code = error.status
        if not self.keeps_error(error.status):
            raise exc
        entry = error_entry(error.status, error.detail, error.headers, ttl=job.ttl)
        if entry is None:
            raise exc
        return entry

    def record(self, job: Job[Any], started: float) -> None:
        """Count a computation and log one line for it."""
        seconds = time.perf_counter() - started
        self.computed(job.step.metrics, job.step.raw_key, seconds, job.code)

    # -- the two drivers, side by side -----------------------------------------------------

    def compute(self, job: Job[Any]) -> dict[str, Any]:
        """Run the view for the core (the flight's leader) and make its entry."""
        job.ran = True
        started = time.perf_counter()
        try:
            try:
                job.response = job.run()
            except Exception as exc:
                return self.error_entry(job, exc)
            return self.entry(job)
        finally:
            self.record(job, started)

    async def acompute(self, job: Job[Any]) -> dict[str, Any]:
        job.ran = True
        started = time.perf_counter()
        try:
            try:
                job.response = await job.run()
            except Exception as exc:
                return self.error_entry(job, exc)
            return self.entry(job)
        finally:
            self.record(job, started)

    def serve(self, request: HttpRequest, run: Callable[[], N], io: Io[N]) -> N:
        """Answer one request of a sync view (`run` runs the view for it)."""
        cache = self.cache or get_cache()
        if request.method not in _ANSWERS or not cache.enabled:
            return run()
        step = self.plan(request)
        if isinstance(step, Bypass):
            return self.bypassed(run(), step, io)
        if self.wants_fresh(request):
            if not self.drop(cache, step.raw_key):
                return self.bypassed(run(), step.bypass(), io)
        else:  # the hot path: one read, no flight, no view
            value = self.hit(cache, step.raw_key)
            if value is not None and "body" in value:
                return self.answer_hit(value, step, request, io, not cache.local)
        job: Job[N] = Job(run, io, step, self.ttl_now(cache))
        started = time.time()
        try:
            value = self.through(cache, step.raw_key, step.tags, partial(self.compute, job))
        except NotShared as exc:
            answer = self.not_shared(exc, job, request, io)
            return self.bypassed(run(), step.bypass(), io) if answer is None else answer
        except LeaderFailedError:  # another process failed computing it: try here
            return self.bypassed(run(), step.bypass(), io)
        return self.answer(value, job, request, io, started, cache.local)

    async def aserve(self, request: HttpRequest, run: Callable[[], Awaitable[N]], io: Io[N]) -> N:
        """Answer one request of an async view (`run` runs the view for it)."""
        cache = self.cache or get_cache()
        if request.method not in _ANSWERS or not cache.enabled:
            return await run()
        step = self.plan(request)
        if isinstance(step, Bypass):
            return self.bypassed(await run(), step, io)
        if self.wants_fresh(request):
            if not await self.adrop(cache, step.raw_key):
                return self.bypassed(await run(), step.bypass(), io)
        else:  # the hot path: one read, no flight, no view
            if cache.local:  # a local read: nothing to await
                value = self.hit(cache, step.raw_key)
            else:
                value = await self.ahit(cache, step.raw_key)
            if value is not None and "body" in value:
                return self.answer_hit(value, step, request, io, not cache.local)
        job: Job[N] = Job(run, io, step, self.ttl_now(cache))
        started = time.time()
        try:
            value = await self.athrough(cache, step.raw_key, step.tags, partial(self.acompute, job))
        except NotShared as exc:
            answer = self.not_shared(exc, job, request, io)
            return self.bypassed(await run(), step.bypass(), io) if answer is None else answer
        except LeaderFailedError:  # another process failed computing it: try here
            return self.bypassed(await run(), step.bypass(), io)
        return self.answer(value, job, request, io, started, cache.local)

    def answer_hit(
        self, value: dict[str, Any], step: Step, request: HttpRequest, io: Io[N], shared: bool
    ) -> N:
        """The response of a fresh entry (`shared`: read from a shared store, a new dict)."""
        step.metrics.hits += 1
        return io.build(*self.parts(value, HIT, step, request, io, remember=not shared), None)

    # -- invalidation ----------------------------------------------------------------------

    def invalidate(self, values: Mapping[str, Any]) -> bool:
        """Delete every entry (each `vary` variant, query string and host) of the path with
        these path parameters, or of the template key of these values."""
        cache = self.cache or get_cache()
        return cache.invalidate_tag(self.normal(self.request_tag(self.ident(values)))) > 0

    async def ainvalidate(self, values: Mapping[str, Any]) -> bool:
        cache = self.cache or get_cache()
        return await cache.ainvalidate_tag(self.normal(self.request_tag(self.ident(values)))) > 0

    def attach(self, wrapper: Any, *, awaited: bool) -> None:
        """Give a decorated view its methods: `invalidate(**values)` (awaited when `awaited`,
        as in async frameworks), `ainvalidate`, `invalidate_all()`, `ainvalidate_all`,
        `key(path=..., origin=..., **values)` and `stats()`."""

        def invalidate(**values: Any) -> bool:
            """Delete every entry of the path with these path parameters (or of the key
            template's values): each query string, host and `vary` variant."""
            return self.invalidate(values)

        async def ainvalidate(**values: Any) -> bool:
            """`invalidate`, awaited."""
            return await self.ainvalidate(values)

        def key(*, path: str | None = None, origin: str | None = None, **values: Any) -> str:
            """The stored key (without its `vary` part): of a template's values, or of a
            path (and `origin`, default: the only one served) and query values."""
            return self.key(values, path, origin)

        wrapper.invalidate = ainvalidate if awaited else invalidate
        wrapper.invalidate_all = self.ainvalidate_all if awaited else self.invalidate_all
        wrapper.ainvalidate = ainvalidate
        wrapper.ainvalidate_all = self.ainvalidate_all
        wrapper.key = key
        wrapper.stats = self.stats

    def stats(self) -> dict[str, Any]:
        """This view's metrics, per route it served."""
        return {
            route: metrics.snapshot()
            for route, metrics in sorted(self.registry.routes.items())
            if route in self.routes
        }


def view_decorators(
    framework: str, wrap: Callable[[ViewCache, Callable[..., Any]], Callable[..., Any]]
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The `cached` and `coalesced` decorators of one framework's edge (the one signature of
    each, `coalesce.http.options`): `wrap(view, fn)` makes the framework's view from the
    decorated one, and chooses its driver (`serve` or `aserve`)."""

    def make(fn: Callable[..., Any], options: RouteOptions, store: bool) -> Callable[..., Any]:
        view = ViewCache(fn, options, framework=framework, store=store)
        return wrap(view, fn)

    module = f"coalesce.{framework}"
    return route_decorator(make, module), coalescing_decorator(make, module)


def missing_extra(edge: str, framework: str, exc: ImportError) -> MissingDependencyError:
    """The error of importing `coalesce.<edge>` without its framework: names the extra and
    the pip command that installs it."""
    return MissingDependencyError(
        f"coalesce.{edge} needs {framework} ({exc}), which the '{edge}' extra installs: "
        f"pip install 'coalesce-cache[{edge}]'"
    )
