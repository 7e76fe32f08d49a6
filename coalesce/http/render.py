"""Rendered responses: how a response's parts become a stored entry and an entry a response.

An *entry* is what the cache keeps for one request: a msgpack-friendly dict (so it works on
Redis as well as in memory)

    {"v": 1, "status": 200, "headers": [["content-type", "application/json"], ...],
     "body": b'...', "etag": '"3f2a..."', "created": 1732520000.1, "ttl": 60.0}

or, for a raised 4xx exception an edge keeps (`cache_4xx=True`, `error_entry`), `"detail"`
instead of a body.
Headers that are per response, per hop or per user are not kept (`UNSTORED_HEADERS`); the
handler's own `Cache-Control` is, and is sent as written (`cache_control_for`).

Every edge renders its framework's response to parts (status, lower-case header pairs, body
bytes) for `entry_from`, and turns the parts `Responder.parts` gives back into its
framework's response. Nothing here does I/O or imports a web framework.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NoReturn

from coalesce.errors import CoalesceError
from coalesce.http.headers import (
    COALESCED,
    HIT,
    MISS,
    NOT_MODIFIED_HEADERS,
    STALE,
    UNSTORED_HEADERS,
    cache_control_for,
    etag_for,
    if_none_match,
    personal,
    response_age,
    storable,
)

RawHeaders = list[tuple[bytes, bytes]]
_X_CACHE = {s: (b"x-cache", s.encode()) for s in (HIT, MISS, STALE, COALESCED)}
_NOT_MODIFIED = frozenset(name.encode() for name in NOT_MODIFIED_HEADERS)


class NotShared(Exception):
    """A computed response that must not be stored, and maybe not shared either.

    The request that ran the handler answers with its own response (`own_response`); the
    others answer with `rendered` when sharing it is safe (a 5xx, an un-opted 4xx), else run
    the handler themselves (`rendered` is None: a cookie was set, `no-store` or `private`
    said, or a stream).
    """

    def __init__(self, rendered: dict[str, Any] | None) -> None:
        super().__init__("response not stored")
        self.rendered = rendered


def entry_from(
    status: int,
    headers: Sequence[tuple[str, str]],
    body: bytes | None,
    *,
    ttl: float | None,
    store: bool,
    cache_4xx: bool,
) -> dict[str, Any]:
    """The entry of a rendered response; raises `NotShared` when it may not be kept.

    `headers`: name-value pairs, names lower-case; `body` None for a streaming response
    (nothing to keep or share). A `personal` response (a cookie set, `no-store`, `private`)
    is handed to no other request: `NotShared(None)`. One that is not stored for its status
    (5xx; 4xx unless `cache_4xx`; anything on a route that does not store) may still be
    shared by the requests of its flight: `NotShared(rendered)`.
    """
    if body is None or personal(headers):
        raise NotShared(None)
    rendered = {
        "v": 1,
        "status": status,
        "headers": [[k, v] for k, v in headers if k not in UNSTORED_HEADERS],
        "body": body,
        "etag": etag_for(body),
        "created": time.time(),
        "ttl": ttl,
    }
    if not storable(status, headers, cache_4xx=cache_4xx or not store):
        raise NotShared(rendered)
    return rendered


def error_entry(
    status: int, detail: Any, headers: Sequence[tuple[str, str]], *, ttl: float | None
) -> dict[str, Any] | None:
    """The entry of a raised 4xx exception (`cache_4xx=True`), kept to be raised again on
    hits so that the framework's exception handlers render it: `"detail"` (msgpack-friendly,
    as given) instead of a body. None when its headers make it `personal` (a cookie set,
    `private`...): such an exception is not kept, as without `cache_4xx`."""
    pairs = [[k, v] for k, v in headers]
    if personal((k, v) for k, v in pairs):
        return None
    return {
        "v": 1,
        "status": status,
        "headers": pairs,
        "detail": detail,
        "etag": "",
        "created": time.time(),
        "ttl": ttl,
    }


def own_cache_control(written: Sequence[str]) -> str:
    """The `Cache-Control` of a per-user response the request that ran the view answers
    with (not stored): the view's own made private (`cache_control_for`: never `public`
    nor `s-maxage`), else `private`."""
    control = cache_control_for(", ".join(written) if written else None, private=True, ttl=None)
    return control or "private"


def _split(headers: list[list[str]]) -> tuple[list[list[str]], str | None, bool]:
    """An entry's headers but Cache-Control, the handler's Cache-Control (several lines
    joined; None when it wrote none) and whether it wrote an `Expires`."""
    rest: list[list[str]] = []
    control: str | None = None
    expires = False
    for pair in headers:
        name = pair[0].lower()
        if name == "cache-control":
            control = pair[1] if control is None else f"{control}, {pair[1]}"
        else:
            expires = expires or name == "expires"
            rest.append(pair)
    return rest, control, expires


class Encoded:
    """An entry's parts encoded once: its stored headers but Cache-Control (with
    Content-Length), the handler's Cache-Control and `Expires` (see
    `http.cache_control_for`), its ETag, and the complete headers of its latest public `HIT`
    response with the `Age` they carry (it changes at most once a second)."""

    __slots__ = ("control", "etag", "expires", "hit", "hit_age", "raw", "value")

    def __init__(self, value: dict[str, Any]) -> None:
        self.value = value
        # One pass: a shared store's hit encodes its entry every time. Names are lower-case
        # (`entry_of`).
        raw: RawHeaders = []
        control: str | None = None
        expires = False
        for k, v in value["headers"]:
            if k == "cache-control":
                control = v if control is None else f"{control}, {v}"
                continue
            if k == "expires":
                expires = True
            raw.append((k.encode("latin-1"), v.encode("latin-1")))
        raw.append((b"content-length", str(len(value["body"])).encode()))
        self.raw = raw
        self.control = control
        self.expires = expires
        self.etag = value["etag"].encode()
        self.hit: RawHeaders = []
        self.hit_age = -1


class Responder:
    """Builds responses from entries for one route, remembering each entry's encoded parts.

    In memory a hit returns the very same entry dict every time, so its headers are encoded
    once and kept (for at most `memo_size` entries, by identity); entries read from a shared
    store are new dicts on every read and are not remembered.
    """

    def __init__(
        self,
        *,
        vary_header: bytes,
        stale_ttl: float,
        stale_if_error: float = 0.0,
        memo_size: int = 256,
    ) -> None:
        self.vary_header = vary_header
        self.stale_ttl = stale_ttl
        self.stale_if_error = stale_if_error
        self.memo_size = memo_size
        self._memo: dict[int, Encoded] = {}
        # (handler's Cache-Control, its Expires, private, ttl) -> the Cache-Control sent
        # (b"" for none): a handful per route, each built once.
        self._controls: dict[tuple[str | None, bool, bool, float | None], bytes] = {}

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

    def _control(
        self, handler: str | None, expires: bool, private: bool, ttl: float | None
    ) -> bytes:
        """The `Cache-Control` sent (b"" for none): `http.cache_control_for`, remembered."""
        key = (handler, expires, private, ttl)
        control = self._controls.get(key)
        if control is None:
            text = cache_control_for(
                handler,
                private=private,
                ttl=ttl,
                stale_ttl=self.stale_ttl,
                stale_if_error=self.stale_if_error,
                expires=expires,
            )
            control = b"" if text is None else text.encode("latin-1")
            if len(self._controls) >= self.memo_size:
                self._controls.clear()
            self._controls[key] = control
        return control

    def _caching_headers(self, status: str, control: bytes, age: int | None) -> RawHeaders:
        """`X-Cache`, then `Cache-Control` (unless empty), `Age` (for cached routes), `Vary`."""
        extra: RawHeaders = [_X_CACHE.get(status) or (b"x-cache", status.encode())]
        if control:
            extra.append((b"cache-control", control))
        if age is not None:
            extra.append((b"age", b"%d" % age))
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
        if_none_match_header: str | None,
        head: bool,
        remember: bool = True,
    ) -> tuple[int, bytes, RawHeaders]:
        """The status, body and raw headers of the response for an entry: its stored parts
        plus this response's caching headers.

        `cached`: add `Age` and the cache's own Cache-Control (False for `coalesced` routes,
        which keep nothing: only the handler's, if it wrote one). `Age` is the entry's
        (`http.response_age`: past the TTL, at least the max-age sent, so a stale entry is
        stale downstream too). A 304 carries the same Cache-Control, Age, ETag and
        Vary, and the entry's `Expires` and `Content-Location` (RFC 9110 15.4.5). An entry
        of a raised exception (with `"detail"`) goes through `exception_headers` instead.
        """
        if "detail" in value:
            self.raise_cached(value, status, cached=cached, private=private)
        ttl: float | None = value["ttl"] if cached else None
        age = response_age(value["created"], ttl, time.time()) if cached else None
        encoded = self._encoded(value, remember)
        code: int = value["status"]
        body = b"" if head else value["body"]
        if status == HIT and age is not None and not private and if_none_match_header is None:
            # The common hit: the same headers as the previous one within the same second.
            if encoded.hit_age != age:
                control = self._control(encoded.control, encoded.expires, False, ttl)
                extra = self._caching_headers(HIT, control, age)
                encoded.hit = [*encoded.raw, *extra, (b"etag", encoded.etag)]
                encoded.hit_age = age
            return code, body, list(encoded.hit)  # a copy: middleware may add to it
        control = self._control(encoded.control, encoded.expires, private, ttl)
        extra = self._caching_headers(status, control, age)
        extra.append((b"etag", encoded.etag))
        if 200 <= code < 300 and if_none_match(if_none_match_header, value["etag"]):
            repeated = [(k, v) for k, v in encoded.raw if k in _NOT_MODIFIED]
            return 304, b"", [*repeated, *extra]
        return code, body, encoded.raw + extra

    def raise_cached(
        self, value: dict[str, Any], status: str, *, cached: bool, private: bool
    ) -> NoReturn:
        """Raise the exception an entry holds (with `"detail"` instead of a body): each
        edge raises its framework's exception again (FastAPI here; the views through
        `Io.raise_error`)."""
        raise CoalesceError(f"an entry of a raised exception (HTTP {value['status']}) has no body")

    def exception_headers(
        self, value: dict[str, Any], status: str, *, cached: bool, private: bool
    ) -> dict[str, str]:
        """The headers of an entry of a raised exception (`"detail"` instead of a body, kept
        with `cache_4xx=True`): its own and this response's caching headers, for the
        exception raised again."""
        ttl: float | None = value["ttl"] if cached else None
        age = response_age(value["created"], ttl, time.time()) if cached else None
        rest, handler, expires = _split(value["headers"])
        control = self._control(handler, expires, private, ttl)
        headers = {k: v for k, v in rest}
        extra = self._caching_headers(status, control, age)
        headers.update((k.decode(), v.decode()) for k, v in extra)
        return headers
