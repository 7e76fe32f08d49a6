"""HTTP caching semantics as pure functions: ETag, If-None-Match, Cache-Control, Age, X-Cache.

Nothing here does I/O or knows about a web framework: every decision the edges (FastAPI,
Starlette, Flask, Django) make about headers is a function of its inputs, tested directly
(`tests/test_http.py`). The rules
follow RFC 9110 (conditional requests) and RFC 9111 / RFC 5861 (caching):

* The ETag of a cached response is strong, quoted and derived from the body only:
  `"` + the first 32 hex digits of the body's SHA-256 + `"`. Every process on every machine
  computes the same tag for the same bytes, so a client revalidating against another
  worker still gets its 304.
* `If-None-Match` uses the *weak* comparison (RFC 9110 13.1.2): `W/"x"` matches `"x"`.
  `*` matches any current representation. Unparseable members match nothing.
* `Cache-Control: max-age` is the entry's TTL, the same on every response from it, and `Age`
  the whole seconds since the entry was computed: a downstream cache adds `Age` to its own
  clock (RFC 9111 4.2.3), so its freshness lifetime ends when the entry's does. A response
  cached per user is `private`, a shared one `public`. Every delta-seconds value sent is at
  most `MAX_DELTA_SECONDS` (2^31, RFC 9111 1.2.2), whatever the TTL.
* The handler's own `Cache-Control` wins downstream (`cache_control_for`): kept in the entry
  and sent as written, except that a per-user response never says `public`, `s-maxage` or
  `proxy-revalidate`. A response that sets a cookie or says `no-store` / `private` belongs to
  its own request (`personal`): never stored, never handed to another request.
"""

from __future__ import annotations

import hashlib
import math
import re
import string
from collections.abc import Iterable, Sequence

#: The `X-Cache` values: how a response was produced.
HIT = "HIT"  # served from a fresh entry; the handler did not run
MISS = "MISS"  # this request ran the handler (and stored the result)
STALE = "STALE"  # served an expired entry inside its stale window while one caller refreshes
COALESCED = "COALESCED"  # received the result another request was computing at the same time
BYPASS = "BYPASS"  # not cacheable (credentials without identity in the key, method, no-cache)

#: Response headers never stored in an entry: recomputed per response, per hop, or per user.
#: (A handler's own `Vary` is kept: it is sent next to the one the cache adds; so are its
#: `Cache-Control`, which wins over ours, and `Expires`: see `cache_control_for`.)
UNSTORED_HEADERS = frozenset(
    {
        "age",
        "connection",
        "content-length",
        "date",
        "etag",
        "keep-alive",
        "server",
        "set-cookie",
        "transfer-encoding",
        "x-cache",
    }
)

#: Request headers whose values are secrets: they enter a cache key only as a hash.
SENSITIVE_HEADERS = frozenset(
    {"authorization", "cookie", "proxy-authorization", "x-api-key", "x-auth-token"}
)

#: Request headers that identify a user: a request carrying one is never served a shared entry.
CREDENTIAL_HEADERS = ("authorization", "cookie")

#: The largest delta-seconds sent (`max-age`, `Age`, `stale-while-revalidate`): RFC 9111
#: 1.2.2 has caches read any greater value as this one.
MAX_DELTA_SECONDS = 2**31

#: Cache-Control directives addressed to shared caches only (RFC 9111 5.2.2.8 to 5.2.2.10):
#: a per-user response does not carry them (`private_cache_control`).
SHARED_CACHE_DIRECTIVES = frozenset({"public", "s-maxage", "proxy-revalidate"})

#: Response headers a 304 repeats from the response it stands for (RFC 9110 15.4.5), besides
#: the Cache-Control, Age, ETag and Vary that the cache adds itself.
NOT_MODIFIED_HEADERS = frozenset({"content-location", "expires", "vary"})

_TCHARS = frozenset("!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits)


def is_token(text: str) -> bool:
    """Whether `text` is an RFC 9110 token (5.6.2), as a header field name must be."""
    return bool(text) and all(c in _TCHARS for c in text)


def delta_seconds(seconds: float) -> int:
    """`seconds` as a delta-seconds value: rounded up, within 0..`MAX_DELTA_SECONDS`.

    NaN and negative values give 0, anything at or past the bound (infinity included) the
    bound, so no TTL can overflow a header.
    """
    if not seconds > 0:
        return 0
    if seconds >= MAX_DELTA_SECONDS:
        return MAX_DELTA_SECONDS
    return math.ceil(seconds)


def etag_for(body: bytes) -> str:
    """The strong, quoted ETag of a body: identical in every process and on every machine."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def parse_etags(header: str) -> list[str] | None:
    """The opaque tags listed in an `If-None-Match` value (without `W/`); None for `*`.

    `W/"a", "b"` gives `['"a"', '"b"']`. A member that is not a quoted entity-tag is
    skipped (it can match nothing), as is everything after a missing closing quote.
    """
    text = header.strip()
    if text == "*":
        return None
    tags: list[str] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t,":
            i += 1
        if i >= n:
            break
        if text.startswith("W/", i) or text.startswith("w/", i):
            i += 2
        if i < n and text[i] == '"':
            end = text.find('"', i + 1)
            if end < 0:
                break  # unterminated: nothing after it can be trusted
            tags.append(text[i : end + 1])
            i = end + 1
        else:  # not an entity-tag: skip to the next comma
            comma = text.find(",", i)
            i = n if comma < 0 else comma + 1
    return tags


def if_none_match(header: str | None, etag: str) -> bool:
    """True when a request's `If-None-Match` matches `etag` (weak comparison): answer 304."""
    if header is None:
        return False
    tags = parse_etags(header)
    if tags is None:
        return True  # "*": any current representation matches
    opaque = etag[2:] if etag.startswith(("W/", "w/")) else etag
    return opaque in tags


# One member of a comma-separated list: a comma inside a quoted string does not end it
# (`no-cache="Set-Cookie, X-Token"` is one directive, RFC 9111 5.2.2.4).
_MEMBER = re.compile(r'(?:[^,"]|"(?:[^"\\]|\\.)*"?)+')


def list_members(header: str) -> list[str]:
    """The members of a comma-separated header value (RFC 9110 5.6.1), stripped, empty ones
    dropped; commas inside quoted strings do not separate."""
    return [m for m in (raw.strip() for raw in _MEMBER.findall(header)) if m]


def cache_directives(header: str | None) -> dict[str, str | None]:
    """The directives of a `Cache-Control` value, lower-cased: `{"max-age": "0", ...}`."""
    directives: dict[str, str | None] = {}
    if not header:
        return directives
    for part in list_members(header):
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if name:
            directives[name] = value.strip().strip('"') if sep else None
    return directives


def client_wants_fresh(cache_control: str | None, pragma: str | None = None) -> bool:
    """True when a request asks not to be answered from a cache.

    `Cache-Control: no-cache` or `max-age=0` (a browser's reload), or, without any
    Cache-Control, the HTTP/1.0 `Pragma: no-cache`.
    """
    if cache_control:
        directives = cache_directives(cache_control)
        return "no-cache" in directives or directives.get("max-age") == "0"
    return pragma is not None and "no-cache" in pragma.lower()


def age_seconds(created: float, now: float) -> int:
    """The `Age` header value: whole seconds since the entry was computed, never negative."""
    age = now - created
    if not age > 0:
        return 0
    return MAX_DELTA_SECONDS if age >= MAX_DELTA_SECONDS else int(age)


def response_age(created: float, ttl: float | None, now: float) -> int:
    """The `Age` sent with a response from an entry (RFC 9111 5.1).

    `age_seconds`; but once the entry is past its `ttl`, at least `delta_seconds(ttl)` (the
    `max-age` sent), so that an entry served stale is stale downstream too: rounding
    `max-age` up and `Age` down would leave it fresh there for up to a second.
    """
    age = age_seconds(created, now)
    if ttl is not None and now >= created + ttl:
        return max(age, delta_seconds(ttl))
    return age


def cache_control_value(
    max_age: int,
    *,
    private: bool = False,
    stale_while_revalidate: float = 0.0,
    stale_if_error: float = 0.0,
) -> str:
    """The `Cache-Control` the cache writes itself (the handler did not write one)."""
    value = f"{'private' if private else 'public'}, max-age={max_age}"
    if stale_while_revalidate > 0:
        value += f", stale-while-revalidate={delta_seconds(stale_while_revalidate)}"
    if stale_if_error > 0:
        value += f", stale-if-error={delta_seconds(stale_if_error)}"
    return value


def private_cache_control(header: str) -> str:
    """A handler's `Cache-Control` made fit for a per-user response.

    `public`, `s-maxage` and `proxy-revalidate` (`SHARED_CACHE_DIRECTIVES`, RFC 9111 5.2.2.8
    to 5.2.2.10) are removed, and `private` (5.2.2.7) put first unless it is there already;
    every other directive stays as written, in its order: `public, max-age=60, s-maxage=600,
    must-revalidate` becomes `private, max-age=60, must-revalidate`.
    """
    kept: list[str] = []
    has_private = False
    for member in list_members(header):
        name = member.partition("=")[0].strip().lower()
        if name in SHARED_CACHE_DIRECTIVES:
            continue
        has_private = has_private or name == "private"
        kept.append(member)
    return ", ".join(kept if has_private else ["private", *kept])


def cache_control_for(
    handler: str | None,
    *,
    private: bool,
    ttl: float | None,
    stale_ttl: float = 0.0,
    stale_if_error: float = 0.0,
    expires: bool = False,
) -> str | None:
    """The `Cache-Control` of a response produced from an entry (None: send none).

    * The handler wrote one (`handler`): it wins, sent as written, on every response of the
      entry: its directives are addressed to every cache downstream (RFC 9111 5.2.2), and
      coalesce's own store follows its TTL, not them (a `no-cache` or `max-age=0` from the
      handler is still stored: downstream revalidates, coalesce serves). A per-user response
      (`private`) goes through `private_cache_control`.
    * Else the handler wrote an `Expires` (`expires`): that is its freshness (a `max-age`
      would override it, RFC 9111 5.3); only `private` is said, for a per-user response.
    * Else a route that keeps nothing (`ttl` None): nothing, or `private` per user.
    * Else the cache's own: `public` (per user `private`), `max-age=<ttl>` and with a
      `stale_ttl`, `stale-while-revalidate=<stale_ttl>` (RFC 5861 3), and with
      `stale_if_error`, `stale-if-error=<stale_if_error>` (RFC 5861 4). The same on every
      response of the entry: its age is told by `Age`, which a downstream cache adds to its
      own clock (RFC 9111 4.2.3), so that cache's freshness ends when the entry's does.
    """
    if handler is not None:
        return private_cache_control(handler) if private else handler
    if expires or ttl is None:
        return "private" if private else None
    return cache_control_value(
        delta_seconds(ttl),
        private=private,
        stale_while_revalidate=stale_ttl,
        stale_if_error=stale_if_error,
    )


def cache_status(
    *, computed_here: bool, created: float, ttl: float, started: float, now: float
) -> str:
    """The `X-Cache` value of a response produced from an entry.

    `computed_here`: this request ran the handler. Otherwise the entry is past its TTL
    (served stale), or was computed after this request started (it waited for another
    request's computation: coalesced), or is older (a plain hit).
    """
    if computed_here:
        return MISS
    if now >= created + ttl:
        return STALE
    if created >= started:
        return COALESCED
    return HIT


def personal(headers: Iterable[tuple[str, str]]) -> bool:
    """Whether a response belongs to the request it was computed for, and to no other.

    It sets a cookie, or its `Cache-Control` says `no-store` (RFC 9111 5.2.2.5) or
    `private` (5.2.2.7, also with field names: the whole response is kept to its request).
    Such a response is never stored, nor handed to the other requests of its flight (they
    compute for themselves).
    """
    for name, value in headers:
        lowered = name.lower()
        if lowered == "set-cookie":
            return True
        if lowered == "cache-control":
            directives = cache_directives(value)
            if "no-store" in directives or "private" in directives:
                return True
    return False


def storable(status: int, headers: Iterable[tuple[str, str]], *, cache_4xx: bool = False) -> bool:
    """Whether a rendered response may be stored and served to other requests.

    5xx never (a failure must not outlive itself); 4xx only with `cache_4xx=True` (a 404 for
    an id that is created a second later would otherwise stick); 1xx, 206 and 304 never; a
    `personal` response never. (`no-cache` is stored: see `cache_control_for`.)
    """
    if status >= 500 or status < 200 or status in (206, 304):
        return False
    if 400 <= status < 500 and not cache_4xx:
        return False
    return not personal(headers)


def quantile(ordered: Sequence[float], q: float) -> float:
    """The `q` quantile (0..1) of sorted values by the nearest-rank method; 0.0 when empty."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(q * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])
