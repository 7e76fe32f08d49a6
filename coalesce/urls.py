"""Cache URLs in messages and logs: never with their password.

`redact` does not parse the URL with `urllib`: a password holding `/`, `?` or `#` (common in
generated secrets) makes `urlsplit` cut the URL in the wrong place and show part of it as
the host or port. Instead everything between `scheme://` and the last `@` is user info, and
only its user name (before the first `:`) is kept; `password`-like query values are masked.
Masking too much is harmless; showing a secret is not.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)(.*)", re.DOTALL)
_PASSWORD_PARAM = re.compile(r"([?&;][^=&;#]*password[^=&;#]*=)[^&;#]*", re.IGNORECASE)


def redact(url: str) -> str:
    """`url` without its password (user info, or a `password=`-like query parameter)."""
    text = str(url)
    match = _SCHEME.fullmatch(text)
    if match is None:
        return "<unparsable url>" if "@" in text or "password" in text.lower() else text
    scheme, rest = match.groups()
    if "@" in rest:
        userinfo, _, after = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}:***@{after}" if colon else f"***@{after}"
    return scheme + _PASSWORD_PARAM.sub(r"\1***", rest)


def credentials(url: str) -> str:
    """The user info of `url` (between `scheme://` and the last `@`), or "" without one:
    text that must not appear in a message about this URL."""
    match = _SCHEME.fullmatch(str(url))
    if match is None or "@" not in match.group(2):
        return ""
    return match.group(2).rpartition("@")[0]


def scheme_of(url: str) -> str:
    """The scheme of `url` in lower case ("" without one), without parsing the rest."""
    head, sep, _ = str(url).partition("://")
    return head.lower() if sep else ""


def path_of(url: str) -> str:
    """The path of a `scheme://[userinfo@]host[:port]/path?query` URL, without parsing the
    user info (a password may hold `/`)."""
    _, _, rest = str(url).partition("://")
    hostpath = rest.rpartition("@")[2].split("?", 1)[0].split("#", 1)[0]
    slash = hostpath.find("/")
    return hostpath[slash:] if slash >= 0 else ""


#: TLS settings of a redis-py connection that a `rediss://` URL's query can carry (redis-py
#: passes query options it does not parse itself to the connection as strings).
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_ca_path")


def url_of_settings(settings: Mapping[str, Any], *, tls: bool) -> str:
    """The `redis://`, `rediss://` or `unix://` URL that reaches the server named by a
    redis-py client's connection settings (`host`, `port` or `path`, `db`, `username`,
    `password`, the TLS files), so that connections we open ourselves (the pub/sub
    listener, a sync client next to a given asyncio one) go where the given client goes.

    The user name and password are percent-encoded into the user info, which `redact`
    masks in every message; a `credential_provider` cannot be written into a URL.
    """
    username, password = settings.get("username"), settings.get("password")
    userinfo = ""
    if username or password:
        userinfo = quote(str(username or ""), safe="")
        if password:
            userinfo += ":" + quote(str(password), safe="")
        userinfo += "@"
    db = int(settings.get("db") or 0)
    path = settings.get("path")
    if path:
        return f"unix://{userinfo}{quote(str(path), safe='/')}?db={db}"
    host = str(settings.get("host") or "localhost")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    port = int(settings.get("port") or 6379)
    url = f"{'rediss' if tls else 'redis'}://{userinfo}{host}:{port}/{db}"
    if tls:
        query = {
            name: settings[name] for name in _TLS_OPTIONS if isinstance(settings.get(name), str)
        }
        if settings.get("ssl_check_hostname") is False:
            query["ssl_check_hostname"] = "false"
        if query:
            url += "?" + urlencode(query, safe="/")
    return url
