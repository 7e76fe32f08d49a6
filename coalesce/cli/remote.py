"""How the command line reaches a cache: Redis by URL, or an application by its admin router.

Every problem the user can fix becomes a `CliError` with one line that names it (an unknown
scheme, a bad port, an unreachable host, a wrong password, a refused token) and the exit code
to use; passwords never appear in them. Redis is reached through a `Cache` (the public API),
plus a plain client for server facts (PING, INFO) that the API does not cover.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from coalesce import Cache, CoalesceError, ConfigurationError, SerializationError
from coalesce.cli.output import one_line
from coalesce.urls import credentials, redact

if TYPE_CHECKING:
    import redis

EXIT_OK = 0


EXIT_MISSING = 1  # `get`: no such key


EXIT_USAGE = 2  # bad input, unreachable or misconfigured store
EXIT_BUG = 3  # an unexpected exception: a bug of ours, not the user's


REDIS_SCHEMES = ("redis", "rediss", "unix")


SCAN_COUNT = 1000  # keys Redis looks at per SCAN call (`keys`, `stats`)


class CliError(Exception):
    """A problem the user can fix: printed as one line on stderr, then exit `code`."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def resolve_url(args: argparse.Namespace) -> str:
    url: str = args.url or os.environ.get("COALESCE_URL") or "memory://"
    return url


def memory_problem(command: str) -> CliError:
    return CliError(
        f"`coalesce {command}` cannot reach a memory:// cache: it lives inside the "
        "application's process. Use --app http://HOST:PORT --token TOKEN (the app's "
        "coalesce.fastapi admin router), or point --url / COALESCE_URL at Redis"
    )


def _userinfo_split_wrongly(url: str) -> str:
    """The characters among `/ ? #` that make `urlsplit` end `url`'s user info too early.

    In `redis://:Zm9v/YmFy@host:6379/0` the password's `/` ends the host part for every URL
    parser (redis-py's too): the password would be taken as host and port, and error messages
    would quote pieces of it. Such a URL has an `@` after the point where the parser's host
    part ends; an `@` in a query value (`?client_name=a@b`) or in a unix socket's path is not
    one, unless the URL does not parse or names no host. Returns "" for a URL without the
    problem.
    """
    _, sep, rest = url.partition("://")
    if not sep:
        return ""
    ends = [index for index in (rest.find(ch) for ch in "/?#") if index >= 0]
    end = min(ends, default=len(rest))
    netloc, remainder = rest[:end], rest[end:]
    if not netloc or "@" not in remainder:
        return ""
    head = remainder[: remainder.index("@")]
    host = netloc.rpartition("@")[2]
    if "=" in head and host and not host.startswith(":"):  # '@' in a query value, maybe
        try:
            urlsplit(url).port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            pass
        else:
            return ""
    return "".join(ch for ch in "/?#" if ch in credentials(url))


_PERCENT = {"/": "%2F", "?": "%3F", "#": "%23", "[": "%5B", "]": "%5D"}


def _percent_hint(chars: str) -> str:
    listed = ", ".join(f"{_PERCENT[ch]} for {ch!r}" for ch in chars)
    return (
        f"special characters in the password (or user name) must be percent-encoded: {listed} "
        "(urllib.parse.quote(password, safe=''))"
    )


def parse_url(url: str, what: str = "cache URL (--url / COALESCE_URL)") -> SplitResult:
    """`urlsplit(url)` and its port, or a `CliError` naming the problem (never the password).

    A password holding `/`, `?` or `#` is refused before parsing: the parser would take part
    of it as the host or port and quote it in its error, so neither the URL (beyond its host)
    nor the parser's message is shown then.
    """
    wrong = _userinfo_split_wrongly(url)
    if wrong:
        scheme = url.partition("://")[0]
        shown = f"{scheme}://***@{url.rpartition('@')[2]}"
        raise CliError(f"invalid {what} {shown!r}: it cannot be parsed: {_percent_hint(wrong)}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        shown = redact(url)
        where = f"invalid {what}" if shown.startswith("<") else f"invalid {what} {shown!r}"
        hint = ""
        brackets = "".join(ch for ch in "[]" if ch in credentials(url))
        if brackets:
            hint = f" ({_percent_hint(brackets)})"
        elif "IPv6" in str(exc):
            hint = " (an IPv6 host goes in brackets, with its port after them: [::1]:6379)"
        elif "port" in str(exc).lower():
            hint = " (the port is a number from 0 to 65535, e.g. HOST:6379)"
        detail = hide_credentials(one_line(str(exc)), url)
        raise CliError(f"{where}: {detail}{hint}") from None
    return parts


def hide_credentials(text: str, *urls: str | None) -> str:
    """`text` with every password (and user info) of `urls` masked: for messages that quote
    an exception, whose text may carry pieces of the URL it was about."""
    secrets: set[str] = set()
    for url in urls:
        if not url:
            continue
        userinfo = credentials(url)
        if userinfo:
            secrets.add(userinfo)
            secrets.add(userinfo.partition(":")[2])
        with contextlib.suppress(ValueError):
            parts = urlsplit(url)
            secrets.add(parts.password or "")
            for key, value in parse_qsl(parts.query):
                if "password" in key.lower():
                    secrets.add(value)
    for secret in sorted(secrets, key=len, reverse=True):
        for form in {secret, unquote(secret)}:
            if len(form) >= 3:  # a shorter one would mask ordinary words, revealing little
                text = text.replace(form, "***")
    return text


def check_scheme(url: str, command: str) -> None:
    parts = parse_url(url)
    scheme = parts.scheme
    if scheme == "memory":
        raise memory_problem(command)
    if scheme not in REDIS_SCHEMES:
        shown = scheme or "(none)"
        raise CliError(
            f"unknown cache URL scheme {shown!r} in {redact(url)!r}: use redis://, rediss:// "
            "or unix:// (memory:// caches are reached with --app)"
        )
    if scheme == "unix" and not parts.path:
        raise CliError(
            f"invalid cache URL {redact(url)!r}: unix:// needs the socket's path, "
            "e.g. unix:///run/redis/redis.sock?db=0"
        )


def describe_redis_error(exc: BaseException, url: str) -> str:
    """One line naming what went wrong with Redis at `url`, and what to check."""
    import redis.exceptions as rex

    shown = redact(url)
    message = hide_credentials(one_line(str(exc)), url) or type(exc).__name__
    text = message.upper()
    # redis-py before 7 keeps only the text after NOAUTH: "Authentication required."
    if any(word in text for word in ("NOAUTH", "ALREADY AUTHENTICATED", "AUTHENTICATION REQUIRED")):
        return (
            f"Redis at {shown} requires a password: put it in the URL, "
            "redis://:PASSWORD@HOST:PORT/DB (or redis://USER:PASSWORD@... with ACL users)"
        )
    if isinstance(exc, rex.AuthenticationError) or any(
        word in text for word in ("WRONGPASS", "INVALID PASSWORD", "INVALID USERNAME")
    ):
        return (
            f"authentication failed at {shown}: {message} "
            "(check the user name and password in --url / COALESCE_URL)"
        )
    if isinstance(exc, rex.TimeoutError):
        return f"Redis at {shown} did not answer in time: {message}"
    if isinstance(exc, (rex.ConnectionError, OSError)):
        return f"cannot connect to Redis at {shown}: {message}"
    return f"Redis at {shown} failed: {message}"


def redis_cause(exc: BaseException) -> BaseException | None:
    """The redis-py or OS error behind `exc` (itself, its cause or its context), if any."""
    import redis.exceptions as rex

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (rex.RedisError, OSError)):
            return current
        current = current.__cause__ or current.__context__
    return None


class RedisTarget:
    """A Redis-backed `Cache` for one command, plus a plain client for server facts.

    The plain client (with connect and read timeouts) answers PING and INFO first, so an
    unreachable host or a wrong password is reported in one clear line, within the timeout,
    before the cache is used at all. The cache fails closed (`on_backend_error="raise"`):
    a command line must report a broken store, not quietly compute around it.
    """

    def __init__(self, url: str, namespace: str, timeout: float) -> None:
        self.url = url
        self.namespace = namespace
        self.timeout = timeout
        self._client: redis.Redis | None = None
        self._cache: Cache | None = None

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            import redis as redis_module

            try:
                self._client = redis_module.Redis.from_url(
                    self.url,
                    socket_connect_timeout=self.timeout,
                    socket_timeout=self.timeout,
                )
            except (ValueError, TypeError) as exc:
                raise self.invalid_url(exc) from None
        return self._client

    @property
    def cache(self) -> Cache:
        if self._cache is None:
            try:
                self._cache = Cache(self.url, namespace=self.namespace, on_backend_error="raise")
            except ConfigurationError as exc:  # names its problem: the namespace, the URL...
                raise CliError(hide_credentials(one_line(str(exc)), self.url)) from None
            except (ValueError, TypeError) as exc:
                raise self.invalid_url(exc) from None
        return self._cache

    def invalid_url(self, exc: Exception) -> CliError:
        """The URL could not be used: say why, without any part of its password."""
        detail = hide_credentials(one_line(str(exc)), self.url)
        return CliError(f"invalid Redis URL {redact(self.url)!r}: {detail}")

    def keys(self, pattern: str, limit: int, max_scans: int) -> tuple[list[str], bool]:
        """Up to `limit` keys (without namespace) matching the glob `pattern`, looking at
        no more than `max_scans` x `SCAN_COUNT` Redis keys; and whether the listing finished.

        `Cache.keys` with `max_scanned`: a pattern matching nothing cannot walk the whole
        database.
        """
        found = self.guard(
            functools.partial(
                self.cache.keys, pattern, limit=limit, max_scanned=max_scans * SCAN_COUNT
            )
        )
        return list(found), found.complete

    def ping(self) -> float:
        """Seconds one PING took; raises `CliError` naming the problem."""
        client = self.client  # built (and redis-py imported) outside the measured time
        started = time.perf_counter()
        self.guard(client.ping)
        return time.perf_counter() - started

    def info(self, section: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self.guard(
            lambda: self.client.info(section) if section else self.client.info()
        )
        return result

    def guard(self, call: Callable[[], Any]) -> Any:
        """Run `call`, turning Redis and OS failures into one-line `CliError`s."""
        import redis.exceptions as rex

        try:
            return call()
        except CliError:
            raise
        except (rex.RedisError, OSError, CoalesceError) as exc:
            cause = redis_cause(exc)
            if cause is None:
                message = hide_credentials(one_line(str(exc)), self.url)
                raise CliError(message or type(exc).__name__) from exc
            raise CliError(describe_redis_error(cause, self.url)) from exc

    def close(self) -> None:
        for closer in (
            self._cache.close if self._cache is not None else None,
            self._client.close if self._client is not None else None,
        ):
            if closer is not None:
                with contextlib.suppress(Exception):  # closing must not hide the result
                    closer()


def check_namespace(namespace: str) -> None:
    """A `CliError` naming the problem if `Cache(namespace=...)` refuses `namespace`.

    Asked of `Cache` itself (in memory, nothing is reached), so the rule is the library's;
    asked before Redis is reached, so the message names the namespace, not the URL.
    """
    if not namespace:
        raise CliError(
            "empty --namespace: give the namespace the application's Cache uses "
            "(the prefix of its keys; default: coalesce)"
        )
    try:
        Cache("memory://", namespace=namespace).close()
    except ConfigurationError as exc:
        raise CliError(f"invalid --namespace {namespace!r}: {one_line(str(exc))}") from None


def open_target(args: argparse.Namespace, command: str) -> RedisTarget:
    url = resolve_url(args)
    check_scheme(url, command)
    check_namespace(args.namespace)
    target = RedisTarget(url, args.namespace, args.timeout)
    target.ping()
    return target


def http_call(
    method: str, url: str, *, token: str | None, body: Any, timeout: float
) -> tuple[int, Any]:
    """One HTTP request with httpx if installed, else urllib; returns (status, JSON or text)."""
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        headers["Content-Type"] = "application/json"
    try:
        import httpx
    except ImportError:
        return _urllib_call(method, url, headers=headers, data=data, timeout=timeout)
    try:
        response = httpx.request(method, url, headers=headers, content=data, timeout=timeout)
    except httpx.HTTPError as exc:
        detail = hide_credentials(one_line(str(exc)), url) or type(exc).__name__
        raise CliError(f"cannot reach the application at {redact(url)}: {detail}") from exc
    return response.status_code, _decode_body(response.content)


def _urllib_call(
    method: str, url: str, *, headers: dict[str, str], data: bytes | None, timeout: float
) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), _decode_body(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), _decode_body(exc.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:  # http.client.InvalidURL too
        reason = hide_credentials(one_line(str(getattr(exc, "reason", exc))), url)
        raise CliError(f"cannot reach the application at {redact(url)}: {reason}") from exc


def _decode_body(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def app_url(args: argparse.Namespace, path: str) -> str:
    base: str = args.app
    parts = parse_url(base, "--app URL")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CliError(f"--app must be an http:// or https:// URL, not {redact(base)!r}")
    return base.rstrip("/") + "/" + path.lstrip("/")


def app_token(args: argparse.Namespace) -> str:
    token: str | None = args.token or os.environ.get("COALESCE_TOKEN")
    if not token:
        raise CliError("--app needs the admin router's token: --token TOKEN or COALESCE_TOKEN")
    return token


def app_failure(status: int, body: Any, url: str) -> CliError:
    detail = body.get("detail") if isinstance(body, dict) else body
    detail = hide_credentials(one_line(str(detail))[:200], url) if detail else ""
    url = redact(url)
    suffix = f": {detail}" if detail else ""
    if status in (401, 403):
        return CliError(f"the application at {url} refused the token (HTTP {status}){suffix}")
    if status in (404, 405):
        return CliError(
            f"no coalesce admin router at {url} (HTTP {status}): mount "
            "coalesce.fastapi.admin_router(cache, token=...) or pass --admin-prefix"
        )
    return CliError(f"the application at {url} answered HTTP {status}{suffix}")


def strict_entry(target: RedisTarget, key: str) -> Any:
    """The entry under `key`, or None; a `CliError` (exit 2) if one exists that cannot be
    decoded (`Cache.get_entry(strict=True)`: by default an unreadable entry counts as none)."""
    try:
        return target.cache.get_entry(key, strict=True)
    except SerializationError as exc:
        raise CliError(
            f"an entry exists for key {key!r} in namespace {target.namespace!r} but could not "
            f"be decoded: {one_line(str(exc))}"
        ) from None
