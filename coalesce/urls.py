"""Cache URLs in messages and logs: never with their password."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


def redact(url: str) -> str:
    """`url` without its password (in the user info or a `password=` query parameter)."""
    try:
        parts = urlsplit(url)
        if parts.password is None and "password" not in parts.query:
            return url
        netloc = parts.netloc
        if parts.password is not None:
            host = netloc.rpartition("@")[2]
            netloc = f"{parts.username or ''}:***@{host}"
        query = parts.query
        if "password" in query:
            pairs = [(k, "***" if k == "password" else v) for k, v in parse_qsl(query)]
            query = urlencode(pairs, safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparsable url>"
