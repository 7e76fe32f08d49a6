"""Key text from the parts of a request, the same for every framework.

A key is printable text the core then makes safe (escapes what is left, bounds its length
with a hash). Values are written so that distinct requests never share a key:

* `&`, `=`, `|`, `%`, `?` and whitespace inside names and values are percent-encoded
  (`encode_text`), so no value can pose as a separator;
* secrets (cookie values, credential headers, parameters named like a token, key, secret,
  password, signature or session: `secret_name`, `secret_header`) enter a key only as
  `#` + 32 hex digits of their SHA-256 (`secret`): keys show up in logs, `coalesce keys`
  and metrics, tokens must not;
* a missing `vary` header is written without `=`, an empty one with it: they differ.

The default key of a view (Starlette, Flask, Django) is `view_key`: the request's
`scheme://host` (RFC 9111 2: a cache keys on the target URI), its path and its whole query
string, pairs sorted (the view may read any of them), then the `vary` headers:

    https://shop.example/items/3?lang=en&page=2|accept-language=en

The FastAPI edge builds its default keys from the handler's validated parameters instead
(`coalesce.fastapi.keys`), with these same pieces.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import Protocol
from urllib.parse import quote

from coalesce.http.headers import CREDENTIAL_HEADERS, SENSITIVE_HEADERS

# Printable ASCII that may stay as it is in a key value; everything else is %-encoded.
SAFE = "!\"#$'()*+,-./:;<>@[\\]^_`{}~"
# Parameter names whose values are secrets (`secret_name`): whole words, and stems.
_SECRET_WORDS = frozenset({"key", "sig", "auth", "pwd", "sid", "jwt", "otp"})
_SECRET_STEMS = (
    "token",
    "secret",
    "passw",
    "signature",
    "session",
    "apikey",
    "credential",
    "cookie",
)
_WORD_SPLIT = re.compile(r"[^a-z0-9]+")
_CREDENTIAL_HEADER_NAMES: dict[bytes, str | None] = {}  # see `credential_header`


def secret_name(name: str) -> bool:
    """Whether a parameter's name says its value is a secret: one of its words is `key`,
    `sig`, `auth`, `pwd`, `sid`, `jwt` or `otp`, or it holds `token`, `secret`, `passw`,
    `signature`, `session`, `apikey`, `credential` or `cookie` (`api_token`, `X-Api-Key`,
    `sessionid`, `signature`; not `keyword` nor `monkey`)."""
    lowered = name.lower()
    if any(part in _SECRET_WORDS for part in _WORD_SPLIT.split(lowered)):
        return True
    return any(stem in lowered for stem in _SECRET_STEMS)


def credential_name(name: str) -> str | None:
    """A request header's name, lower-case, if it carries a credential, else None: the
    `CREDENTIAL_HEADERS` (`authorization`, `cookie`) and any header `secret_header` names
    (`x-api-key`, `x-auth-token`...), which an authentication middleware may read without
    the view declaring it."""
    text = name.lower()
    return text if text in CREDENTIAL_HEADERS or secret_header(text) else None


def credential_header(name: bytes) -> str | None:
    """`credential_name` of a raw (ASGI) header name, remembered per name (at most 4096
    names, then forgotten)."""
    if name in _CREDENTIAL_HEADER_NAMES:
        return _CREDENTIAL_HEADER_NAMES[name]
    known = credential_name(name.decode("latin-1"))
    if len(_CREDENTIAL_HEADER_NAMES) >= 4096:
        _CREDENTIAL_HEADER_NAMES.clear()
    _CREDENTIAL_HEADER_NAMES[name] = known
    return known


def secret_header(name: str) -> bool:
    """Whether a request header's values are secrets (hashed in keys): `Authorization`,
    `Cookie`, `Proxy-Authorization`, or a name that says so (`X-API-Key`, `X-Auth-Token`)."""
    return name in SENSITIVE_HEADERS or secret_name(name)


def secret(text: str) -> str:
    """How a secret value appears in a key: `#` + 32 hex digits of its SHA-256."""
    return secret_bytes(text.encode("utf-8", "surrogatepass"))


def secret_bytes(data: bytes) -> str:
    return "#" + hashlib.sha256(data).hexdigest()[:32]


def encode_text(value: str) -> str:
    """A name or value as key text: as it is when it is ASCII letters and digits, else
    percent-encoded but for `SAFE`."""
    if value.isalnum() and value.isascii():  # the common case, and nothing to escape
        return value
    return quote(value, safe=SAFE)


class HeaderLookup(Protocol):
    """Request headers by lower-case name (Starlette's `Headers`, a dict, `RequestHeaders`)."""

    def get(self, name: str, /) -> str | None: ...


def encode_vary(names: Sequence[str], headers: HeaderLookup) -> str:
    """The header part of a key: `|name=value` per `vary` header (names lower-case).

    A header sent on several lines counts with all its lines, joined by commas (RFC 9110
    5.3), when `headers` can tell them apart (a `getlist` method, as Starlette's `Headers`
    and `coalesce.http.view.RequestHeaders` have).
    """
    getlist = getattr(headers, "getlist", None)
    parts: list[str] = []
    for name in names:
        if getlist is not None:
            lines = getlist(name)
            value = ",".join(lines) if lines else None
        else:
            value = headers.get(name)
        if value is None:
            parts.append(f"|{name}")
        elif secret_header(name):
            parts.append(f"|{name}={secret(value)}")
        else:
            parts.append(f"|{name}={quote(value, safe=SAFE)}")
    return "".join(parts)


def encode_origin(scheme: str, host: str | None) -> str:
    """`scheme://host` of a request's target URI (RFC 9110 7.1), host lower-case and escaped:
    the `Host` header is the client's to choose."""
    text = (host or "").lower()
    if not (text.isascii() and text.replace(".", "").replace(":", "").replace("-", "").isalnum()):
        text = quote(text, safe="")
    return f"{scheme}://{text}"


def encode_pairs(pairs: Iterable[tuple[str, str]]) -> str:
    """Name-value pairs (a query string, path parameters) as key text: `a=1&b=x&b=y`, sorted
    by name then value (their order tells a view nothing it should answer differently to),
    a secret's value (`secret_name`) as its hash."""
    encoded = sorted(
        (encode_text(name), secret(value) if secret_name(name) else encode_text(value))
        for name, value in pairs
    )
    return "&".join(f"{name}={value}" for name, value in encoded)


def view_key(origin: str, path: str, query: Iterable[tuple[str, str]]) -> str:
    """The default key of a view's request (without its `vary` part): `origin`, the path
    as received (percent-encoded where unsafe), `?` and the sorted query pairs."""
    return f"{origin}{quote(path, safe=SAFE)}?{encode_pairs(query)}"
