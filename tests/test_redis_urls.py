"""Cache URLs for a secured Redis, as users write them, against real servers.

* an ACL user: ``redis://app:secret@127.0.0.1:PORT/0``;
* TLS: ``rediss://127.0.0.1:PORT/0?ssl_ca_certs=/path/ca.pem``, the server verified against
  a throw-away CA written at test time (:func:`redis_servers.make_tls_files`);
* both at once: ``rediss://app:secret@...?ssl_ca_certs=...``.

Each URL must carry a cached sync and async function through a computation and then hits,
for the data connections and for the pub/sub connection of the near cache. Wrong
credentials and an untrusted server fail open (computing directly) or, with
``on_backend_error="raise"``, raise ``BackendError`` without the password in it. The
command line's ``check`` works with the same URLs.

(Passwords of the default user and ``unix://`` sockets are covered in
``test_redis_store.py``.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis_servers import RedisServer, RedisStartError, make_tls_files

from coalesce import Cache
from coalesce.errors import BackendError, ConfigurationError
from coalesce.stores.redis import RedisStore

pytestmark = pytest.mark.timeout(30)

USER = "app"
PASSWORD = "acl-s3cret-pw"
WRONG_PASSWORD = "wr0ng-acl-pw"
DEFAULT_PASSWORD = "default-user-pw"  # the ACL server's default user: not what we connect as


def add_acl_user(server: RedisServer) -> None:
    """``ACL SETUSER app on >PASSWORD ~* &* +@all``."""
    client = server.client()
    execute: Callable[..., Any] = client.execute_command  # untyped in some redis-py versions
    try:
        execute("ACL", "SETUSER", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all")
    finally:
        client.close()


def start(server: RedisServer) -> RedisServer:
    try:
        server.start()
    except (RedisStartError, OSError) as exc:
        server.close()
        raise pytest.fail.Exception(
            f"could not start {server.name} for the tests: {exc}", pytrace=False
        ) from None
    add_acl_user(server)
    return server


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    """Plain TCP; the default user needs another password, so only `app` can get in."""
    server = start(RedisServer(name="acl", password=DEFAULT_PASSWORD))
    yield server
    server.close()


@pytest.fixture(scope="module")
def tls_server() -> Iterator[RedisServer]:
    """TLS only (no plain port), with the `app` user too; the default user has no password."""
    server = start(RedisServer(name="tls", tls=True))
    yield server
    server.close()


def acl_url(server: RedisServer, password: str = PASSWORD, user: str = USER) -> str:
    return f"redis://{user}:{password}@{server.host}:{server.port}/0"


def tls_url(server: RedisServer, ca: Path | None = None, auth: str = "") -> str:
    """``rediss://[auth@]host:port/0?ssl_ca_certs=CA`` (the server's own CA by default)."""
    ca_file = quote(str(ca or server.tls_files.ca), safe="/")
    return f"rediss://{auth}{server.host}:{server.port}/0?ssl_ca_certs={ca_file}"


@pytest.fixture(params=["acl", "tls", "tls+acl"])
def secured(
    request: pytest.FixtureRequest, acl_server: RedisServer, tls_server: RedisServer
) -> tuple[str, RedisServer]:
    """(URL a user writes, the server it reaches), once per kind of secured Redis."""
    kind = request.param
    if kind == "acl":
        return acl_url(acl_server), acl_server
    if kind == "tls":
        url = tls_url(tls_server)
        assert url == tls_server.url  # the helper's URL is the user's URL
        return url, tls_server
    return tls_url(tls_server, auth=f"{USER}:{PASSWORD}@"), tls_server


@pytest.fixture
def caches(unique_namespace: str) -> Iterator[Callable[..., Cache]]:
    """`make(url, **options)`: `Cache(url, namespace=unique_namespace, ...)`, closed after."""
    made: list[Cache] = []

    def make(url: str, **options: Any) -> Cache:
        cache = Cache(url, namespace=unique_namespace, **options)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


def our_keys(server: RedisServer, namespace: str) -> list[bytes]:
    client = server.client()
    try:
        return list(client.scan_iter(match=f"{namespace}:*"))
    finally:
        client.close()


def users_connected(server: RedisServer) -> list[str]:
    client = server.client()
    try:
        return [str(info.get("user")) for info in client.client_list()]
    finally:
        client.close()


def hits(cache: Cache) -> int:
    return sum(int(stats["hits"]) for stats in cache.stats().values())


def wait_until(condition: Callable[[], Any], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def no_secret(text: str) -> None:
    for secret in (PASSWORD, WRONG_PASSWORD, DEFAULT_PASSWORD):
        assert secret not in text, text


# -- round trips through each kind of URL ----------------------------------------------------


def test_sync_round_trip(
    secured: tuple[str, RedisServer], caches: Callable[..., Cache], unique_namespace: str
) -> None:
    url, server = secured
    cache = caches(url, on_backend_error="raise")  # a connection problem must not hide here
    calls: list[int] = []

    @cache.cached(ttl=30, key="square:{x}")
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    assert square(7) == 49 and calls == [7]
    assert square(7) == 49 and square(7) == 49 and calls == [7]
    assert hits(cache) == 2
    assert our_keys(server, unique_namespace) == [f"{unique_namespace}:{{square:7}}".encode()]

    other = caches(url, on_backend_error="raise")  # another "process": meets only in Redis

    @other.cached(ttl=30, key="square:{x}")
    def square_elsewhere(x: int) -> int:
        calls.append(-x)
        return -1

    assert square_elsewhere(7) == 49 and calls == [7] and hits(other) == 1
    if f"//{USER}:" in url:
        assert USER in users_connected(server)  # authenticated as the ACL user


async def test_async_round_trip(
    secured: tuple[str, RedisServer], caches: Callable[..., Cache], unique_namespace: str
) -> None:
    url, server = secured
    cache = caches(url, on_backend_error="raise")
    calls: list[int] = []

    @cache.cached(ttl=30, key="cube:{x}")
    async def cube(x: int) -> int:
        calls.append(x)
        return x**3

    try:
        assert await cube(3) == 27 and calls == [3]
        assert await cube(3) == 27 and await cube(3) == 27 and calls == [3]
        assert hits(cache) == 2
        assert our_keys(server, unique_namespace) == [f"{unique_namespace}:{{cube:3}}".encode()]
        if f"//{USER}:" in url:
            assert USER in users_connected(server)
    finally:
        await cache.aclose()


def test_near_cache_invalidation_reaches_over_the_pubsub_connection(
    secured: tuple[str, RedisServer], caches: Callable[..., Cache]
) -> None:
    """The listener's own connection is built from the same URL (TLS options, user)."""
    url, _ = secured
    near = caches(url, local_maxsize=100, local_ttl=30, on_backend_error="raise")
    writer = caches(url, on_backend_error="raise")
    version = ["v1"]

    @near.cached(ttl=30, key="cfg")
    def cfg() -> str:
        return version[0]

    assert cfg() == "v1"
    store = near.store
    assert isinstance(store, RedisStore)
    stats = store.stats
    wait_until(lambda: stats()["listener"]["subscribed"])
    assert cfg() == "v1"  # from Redis, now kept in the near cache
    local_hits = stats()["local_hits"]
    assert cfg() == "v1" and stats()["local_hits"] == local_hits + 1
    version[0] = "v2"
    assert writer.invalidate("cfg")
    wait_until(lambda: cfg() == "v2", timeout=1.0)
    assert stats()["listener"]["resets"] == 0  # the pub/sub connection never failed


# -- an existing client as the only argument (issue 9 item 7) --------------------------------


def client_settings(kind: str, server: RedisServer) -> dict[str, Any]:
    """Constructor arguments of a redis-py client that reaches `server` as `kind` does."""
    settings: dict[str, Any] = {"host": server.host, "port": server.port}
    if "acl" in kind:
        settings.update(username=USER, password=PASSWORD)
    if "tls" in kind:
        settings.update(ssl=True, ssl_ca_certs=str(server.tls_files.ca))
    return settings


@pytest.fixture(params=["acl", "tls", "tls+acl"])
def secured_kind(
    request: pytest.FixtureRequest, acl_server: RedisServer, tls_server: RedisServer
) -> tuple[str, RedisServer]:
    kind = str(request.param)
    return kind, acl_server if kind == "acl" else tls_server


async def test_a_sync_or_asyncio_client_alone_is_the_cache(
    secured_kind: tuple[str, RedisServer], unique_namespace: str
) -> None:
    """`Cache(redis.Redis(...))` and `Cache(redis.asyncio.Redis(...))`, as the README shows:
    both functions work, the connections we open ourselves (pub/sub, the other client) reach
    the same server as the same user, and the server is named without the password."""
    kind, server = secured_kind
    settings = client_settings(kind, server)
    sync_client = redis.Redis(**settings)
    async_client = redis.asyncio.Redis(**settings)
    by_sync = Cache(sync_client, namespace=unique_namespace, on_backend_error="raise")
    by_async = Cache(
        async_client,
        namespace=unique_namespace,
        on_backend_error="raise",
        local_maxsize=100,
        local_ttl=30,
    )
    calls: list[str] = []
    try:
        for cache in (by_sync, by_async):
            text = repr(cache)
            assert f"127.0.0.1:{server.port}" in text, text
            no_secret(text)
            assert cache.url.startswith("rediss://" if "tls" in kind else "redis://")

        @by_sync.cached(ttl=30, key="s")
        def sync_fn() -> str:
            calls.append("sync")
            return "s"

        @by_async.cached(ttl=30, key="a")
        async def async_fn() -> str:
            calls.append("async")
            return f"a{len(calls)}"

        assert [sync_fn(), sync_fn()] == ["s", "s"]
        assert [await async_fn(), await async_fn()] == ["a2", "a2"]
        assert calls == ["sync", "async"]
        keys = sorted(our_keys(server, unique_namespace))
        assert keys == [f"{unique_namespace}:{{{k}}}".encode() for k in ("a", "s")]
        if "acl" in kind:
            assert USER in users_connected(server)
        # the near cache of the asyncio-only cache hears invalidations on a pub/sub
        # connection made from the client's settings
        store = by_async.store
        assert isinstance(store, RedisStore)
        wait_until(lambda: store.stats()["listener"]["subscribed"])
        assert await async_fn() == "a2"
        assert by_sync.invalidate("a")
        deadline = time.monotonic() + 2.0
        while (value := await async_fn()) == "a2" and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert value == "a3"
        assert store.stats()["listener"]["resets"] == 0
    finally:
        await by_async.aclose()
        by_async.close()
        by_sync.close()
        sync_client.close()
        await async_client.aclose()


def test_a_client_alone_names_its_server_in_errors_without_the_password(
    acl_server: RedisServer, unique_namespace: str
) -> None:
    client = redis.Redis(
        host=acl_server.host,
        port=acl_server.port,
        username=USER,
        password=WRONG_PASSWORD,
        retry=Retry(NoBackoff(), 0),  # redis-py's default retries (~4 s) change no message
    )
    cache = Cache(client, namespace=unique_namespace, on_backend_error="raise")

    @cache.cached(ttl=30)
    def f() -> int:
        return 1

    try:
        with pytest.raises(BackendError) as info:
            f()
    finally:
        cache.close()
        client.close()
    message = str(info.value)
    assert f"redis://{USER}:***@127.0.0.1:{acl_server.port}/0" in message, message
    no_secret(message)
    no_secret("".join(traceback.format_exception(info.value)))


def test_a_client_given_twice_or_a_foreign_object_is_refused(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        with pytest.raises(ConfigurationError, match="given twice"):
            Cache(client, client=client)
        with pytest.raises(ConfigurationError, match="redis-py client"):
            Cache(object())  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="decode_responses"):
            Cache(redis.Redis.from_url(redis_url, decode_responses=True))
    finally:
        client.close()


def test_url_of_settings_covers_unix_sockets_ipv6_and_encoded_secrets() -> None:
    from coalesce.urls import url_of_settings

    assert url_of_settings({"path": "/run/redis.sock", "db": 2}, tls=False) == (
        "unix:///run/redis.sock?db=2"
    )
    assert url_of_settings({"host": "::1", "port": 7000}, tls=False) == "redis://[::1]:7000/0"
    url = url_of_settings({"host": "h", "username": "u", "password": "p/w?#@"}, tls=True)
    assert url == "rediss://u:p%2Fw%3F%23%40@h:6379/0"
    assert redis.connection.parse_url(url)["password"] == "p/w?#@"  # type: ignore[no-untyped-call]


# -- ACL user: wrong credentials -------------------------------------------------------------

WRONG_CREDENTIALS = pytest.mark.parametrize(
    ("user", "password"),
    [(USER, WRONG_PASSWORD), ("nobody", PASSWORD), ("default", PASSWORD)],
    ids=["wrong-password", "unknown-user", "other-users-password"],
)


@WRONG_CREDENTIALS
async def test_wrong_credentials_fail_open_and_every_call_is_answered(
    acl_server: RedisServer, caches: Callable[..., Cache], user: str, password: str
) -> None:
    cache = caches(acl_url(acl_server, password, user))  # on_backend_error="compute"
    calls: list[str] = []

    @cache.cached(ttl=30, key="s:{x}")
    def sync_fn(x: int) -> int:
        calls.append("sync")
        return x + 1

    @cache.cached(ttl=30, key="a:{x}")
    async def async_fn(x: int) -> int:
        calls.append("async")
        return x + 2

    try:
        assert [sync_fn(1), sync_fn(1), await async_fn(1), await async_fn(1)] == [2, 2, 3, 3]
        # each function computed (nothing came from Redis); its second call may be served
        # from what this process kept while the store fails (the fail-open fallback)
        assert calls.count("sync") in (1, 2) and calls.count("async") in (1, 2), calls
        assert calls[0] == "sync" and len(calls) <= 4
        assert cache.backend_errors >= 2
    finally:
        await cache.aclose()


@WRONG_CREDENTIALS
async def test_wrong_credentials_fail_closed_without_the_password(
    acl_server: RedisServer, caches: Callable[..., Cache], user: str, password: str
) -> None:
    cache = caches(acl_url(acl_server, password, user), on_backend_error="raise")
    calls: list[int] = []

    @cache.cached(ttl=30)
    def sync_fn() -> int:
        calls.append(1)
        return 1

    @cache.cached(ttl=30)
    async def async_fn() -> int:
        calls.append(2)
        return 2

    try:
        with pytest.raises(BackendError) as sync_error:
            sync_fn()
        with pytest.raises(BackendError) as async_error:
            await async_fn()
    finally:
        await cache.aclose()
    assert calls == []
    for info in (sync_error, async_error):
        message = str(info.value)
        assert f"127.0.0.1:{acl_server.port}" in message and "***" in message
        assert "AuthenticationError" in message
        no_secret(message)
        no_secret("".join(traceback.format_exception(info.value)))  # causes included


def test_fail_open_log_does_not_contain_the_password(
    acl_server: RedisServer, caches: Callable[..., Cache], caplog: pytest.LogCaptureFixture
) -> None:
    cache = caches(acl_url(acl_server, WRONG_PASSWORD))

    @cache.cached(ttl=30)
    def f() -> int:
        return 1

    with caplog.at_level(logging.WARNING, logger="coalesce"):
        assert f() == 1
    assert "failed" in caplog.text and "computing" in caplog.text
    no_secret(caplog.text)


def test_cache_repr_does_not_contain_the_password(
    acl_server: RedisServer, caches: Callable[..., Cache]
) -> None:
    cache = caches(acl_url(acl_server))
    assert f"127.0.0.1:{acl_server.port}" in repr(cache)
    no_secret(repr(cache))


def test_unknown_scheme_error_does_not_contain_the_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        Cache(f"redis+sentinel://app:{PASSWORD}@127.0.0.1:1/0")
    assert "redis+sentinel" in str(info.value)
    no_secret(str(info.value))


# -- TLS: a server the client must not trust -------------------------------------------------


@pytest.fixture(params=["other-ca", "system-trust-store"])
def untrusting_url(request: pytest.FixtureRequest, tls_server: RedisServer, tmp_path: Path) -> str:
    """A rediss:// URL to `tls_server` whose client does not trust the server's CA."""
    if request.param == "other-ca":
        return tls_url(tls_server, ca=make_tls_files(tmp_path / "other").ca)
    return f"rediss://{tls_server.host}:{tls_server.port}/0"  # default verification


async def test_untrusted_server_certificate_fails_closed(
    untrusting_url: str, caches: Callable[..., Cache]
) -> None:
    cache = caches(untrusting_url, on_backend_error="raise")
    calls: list[int] = []

    @cache.cached(ttl=30)
    def sync_fn() -> int:
        calls.append(1)
        return 1

    @cache.cached(ttl=30)
    async def async_fn() -> int:
        calls.append(2)
        return 2

    try:
        with pytest.raises(BackendError, match="CERTIFICATE_VERIFY_FAILED") as sync_error:
            sync_fn()
        with pytest.raises(BackendError, match="CERTIFICATE_VERIFY_FAILED"):
            await async_fn()
    finally:
        await cache.aclose()
    assert calls == []
    assert untrusting_url.split("?")[0] in str(sync_error.value)


def test_plain_redis_url_cannot_reach_the_tls_port(
    tls_server: RedisServer, caches: Callable[..., Cache]
) -> None:
    """The TLS server has no plain port: the round trips above really went through TLS."""
    cache = caches(f"redis://{tls_server.host}:{tls_server.port}/0", on_backend_error="raise")

    @cache.cached(ttl=30)
    def f() -> int:
        return 1

    started = time.monotonic()
    with pytest.raises(BackendError):
        f()
    assert time.monotonic() - started < 3


# -- the command line ------------------------------------------------------------------------


def run_check(url: str, namespace: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COALESCE_")}
    return subprocess.run(
        [sys.executable, "-m", "coalesce", "check", "--url", url, "--namespace", namespace],
        capture_output=True,
        text=True,
        timeout=20,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def test_cli_check_over_tls_and_with_an_acl_user(
    acl_server: RedisServer, tls_server: RedisServer, unique_namespace: str
) -> None:
    url = tls_url(tls_server, auth=f"{USER}:{PASSWORD}@")
    result = run_check(url, unique_namespace)
    assert result.returncode == 0, (result.stdout, result.stderr)
    first = result.stdout.splitlines()[0]
    assert first.startswith("OK") and f"rediss://{USER}:***@" in first
    assert "ssl_ca_certs=" in first
    no_secret(result.stdout + result.stderr)
    assert our_keys(tls_server, unique_namespace) == []  # the probe was deleted

    result = run_check(acl_url(acl_server), unique_namespace)
    assert result.returncode == 0, (result.stdout, result.stderr)
    no_secret(result.stdout + result.stderr)


def test_cli_check_against_an_untrusted_tls_server_is_one_line_exit_2(
    tls_server: RedisServer, unique_namespace: str, tmp_path: Path
) -> None:
    url = tls_url(tls_server, ca=make_tls_files(tmp_path / "other").ca)
    result = run_check(url, unique_namespace)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "cannot connect" in lines[0] and "CERTIFICATE_VERIFY_FAILED" in lines[0], lines[0]


# -- the TLS helper itself -------------------------------------------------------------------


def test_openssl_fallback_certificates_are_accepted(tmp_path: Path) -> None:
    """`make_tls_files` without `cryptography` (the `openssl` CLI) makes working files too."""
    server = RedisServer(name="tls-openssl", tls=True)
    try:
        files = make_tls_files(server.tls_files.directory, tool="openssl")
        assert files == server.tls_files
        start(server)
        client = redis.Redis.from_url(server.url, socket_timeout=2)
        try:
            assert client.ping()
        finally:
            client.close()
    finally:
        server.close()
