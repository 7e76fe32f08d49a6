"""The HTTP layer shared by every web edge (FastAPI, Starlette, Flask, Django).

Modules, one concern each:

* `headers`: HTTP caching semantics as pure functions (ETag, If-None-Match, Cache-Control,
  Age, X-Cache, what may be stored), citing RFC 9110 / 9111 / 5861; its names are
  importable from `coalesce.http` itself;
* `keys`: key text from the parts of a request (origin, path, query, `vary` headers), the
  credential headers and how secrets enter keys (hashed);
* `render`: a rendered response as a msgpack-friendly entry, and the parts (status, body,
  headers, 304) of the response for an entry;
* `metrics`: per-route counters and compute latency (`MetricsRegistry`, `REGISTRY`);
* `options`: the one signature of every edge's `cached` and `coalesced`, and the check of
  their options, once;
* `endpoint`: one decorated endpoint's calls into the core (`Cache.get_fresh` for hits,
  `Cache.get_or_set` for the rest, `invalidate`), shared by FastAPI and the views;
* `view`: one cached view (`ViewCache`) for the frameworks that hand a view a request
  (Starlette, Flask, Django): the credentials rule, the key and tags of a request, and the
  sync and async paths of one request side by side. Each framework's adapter only
  translates its request and response types to and from `HttpRequest` and `Rendered`.
"""

from coalesce.http.headers import (
    BYPASS,
    COALESCED,
    CREDENTIAL_HEADERS,
    HIT,
    MAX_DELTA_SECONDS,
    MISS,
    NOT_MODIFIED_HEADERS,
    SENSITIVE_HEADERS,
    SHARED_CACHE_DIRECTIVES,
    STALE,
    UNSTORED_HEADERS,
    age_seconds,
    cache_control_for,
    cache_control_value,
    cache_directives,
    cache_status,
    client_wants_fresh,
    delta_seconds,
    etag_for,
    if_none_match,
    is_token,
    list_members,
    parse_etags,
    personal,
    private_cache_control,
    quantile,
    response_age,
    storable,
)

__all__ = [
    "BYPASS",
    "COALESCED",
    "CREDENTIAL_HEADERS",
    "HIT",
    "MAX_DELTA_SECONDS",
    "MISS",
    "NOT_MODIFIED_HEADERS",
    "SENSITIVE_HEADERS",
    "SHARED_CACHE_DIRECTIVES",
    "STALE",
    "UNSTORED_HEADERS",
    "age_seconds",
    "cache_control_for",
    "cache_control_value",
    "cache_directives",
    "cache_status",
    "client_wants_fresh",
    "delta_seconds",
    "etag_for",
    "if_none_match",
    "is_token",
    "list_members",
    "parse_etags",
    "personal",
    "private_cache_control",
    "quantile",
    "response_age",
    "storable",
]
