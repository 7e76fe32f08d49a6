"""HTTP caching semantics as pure functions: ETag, If-None-Match, Cache-Control, Age, X-Cache.

Nothing here does I/O or knows about FastAPI: every decision the FastAPI edge makes about
headers is a function of its inputs, tested directly (`tests/test_http.py`). The rules
follow RFC 9110 (conditional requests) and RFC 9111 / RFC 5861 (caching):

* The ETag of a cached response is strong, quoted and derived from the body only:
  `"` + the first 32 hex digits of the body's SHA-256 + `"`. Every process on every machine
  computes the same tag for the same bytes, so a client revalidating against another
  worker still gets its 304.
* `If-None-Match` uses the *weak* comparison (RFC 9110 13.1.2): `W/"x"` matches `"x"`.
  `*` matches any current representation. Unparseable members match nothing.
* `Cache-Control: max-age` is the *remaining* freshness in whole seconds (never negative),
  `Age` the whole seconds since the entry was computed; a response cached per user is
  `private`, a shared one `public`. Every delta-seconds value sent is at most
  `MAX_DELTA_SECONDS` (2^31, RFC 9111 1.2.2), whatever the TTL.
"""

from __future__ import annotations

import hashlib
import math
import string
from collections.abc import Iterable, Sequence

#: The `X-Cache` values: how a response was produced.
HIT = "HIT"  # served from a fresh entry; the handler did not run
MISS = "MISS"  # this request ran the handler (and stored the result)
STALE = "STALE"  # served an expired entry inside its stale window while one caller refreshes
COALESCED = "COALESCED"  # received the result another request was computing at the same time
BYPASS = "BYPASS"  # not cacheable (credentials without identity in the key, method, no-cache)

#: Response headers never stored in an entry: recomputed per response, per hop, or per user.
#: (A handler's own `Vary` is kept: it is sent next to the one the cache adds.)
UNSTORED_HEADERS = frozenset(
    {
        "age",
        "cache-control",
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


def cache_directives(header: str | None) -> dict[str, str | None]:
    """The directives of a `Cache-Control` value, lower-cased: `{"max-age": "0", ...}`."""
    directives: dict[str, str | None] = {}
    if not header:
        return directives
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
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


def max_age_seconds(created: float, ttl: float, now: float) -> int:
    """Remaining freshness in whole seconds (`max-age`): rounded up, never negative.

    Rounded up so that a response computed a moment ago says `max-age=<ttl>`, not
    `<ttl - 1>`; it overstates the remaining time by less than a second. At most
    `MAX_DELTA_SECONDS`.
    """
    return delta_seconds(created + ttl - now)


def cache_control_value(
    max_age: int, *, private: bool = False, stale_while_revalidate: float = 0.0
) -> str:
    """The `Cache-Control` of a cached response."""
    value = f"{'private' if private else 'public'}, max-age={max_age}"
    if stale_while_revalidate > 0:
        value += f", stale-while-revalidate={delta_seconds(stale_while_revalidate)}"
    return value


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


def storable(status: int, headers: Iterable[tuple[str, str]], *, cache_4xx: bool = False) -> bool:
    """Whether a rendered response may be stored and served to other requests.

    5xx never (a failure must not outlive itself); 4xx only with `cache_4xx=True` (a 404 for
    an id that is created a second later would otherwise stick); 1xx, 206 and 304 never; a
    response that sets a cookie or says `no-store` / `private` never.
    """
    if status >= 500 or status < 200 or status in (206, 304):
        return False
    if 400 <= status < 500 and not cache_4xx:
        return False
    for name, value in headers:
        lowered = name.lower()
        if lowered == "set-cookie":
            return False
        if lowered == "cache-control":
            directives = cache_directives(value)
            if "no-store" in directives or "private" in directives:
                return False
    return True


def quantile(ordered: Sequence[float], q: float) -> float:
    """The `q` quantile (0..1) of sorted values by the nearest-rank method; 0.0 when empty."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(q * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])
