"""Shared pytest fixtures: real, throw-away Redis servers started by the test-suite itself.

The tests never touch a Redis that may already run on the machine (e.g. on port 6379):
every server here is started on a free port of 127.0.0.1 and stopped at the end.

* ``redis_server`` (session): one :class:`RedisServer` shared by all tests.  Tests must not
  flush it; they isolate themselves with ``unique_namespace``.
* ``redis_url`` (function): URL of ``redis_server``.
* ``unique_namespace`` (function): a fresh key namespace such as ``"t3f9a0c1d2e"``.
* ``fresh_redis`` (function): a dedicated :class:`RedisServer` the test may stop, kill or
  restart.
* ``redis_cluster`` (session): a 3-master :class:`RedisCluster`, started on first use.
* ``uvicorn_process`` / ``nginx_proxy`` (module): start a ``python -m uvicorn module:app``
  process, and a real nginx with ``proxy_cache`` in front of a URL (``nginx_server``); both
  on free loopback ports, stopped (and checked to have exited) after the module.

A server that cannot be started fails the requesting test with the reason and the
server's log; it is never skipped.

This module deliberately imports nothing from ``coalesce``.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nginx_server import NginxServer, ServerProcess, ServerStartError, UvicornProcess
from redis_servers import RedisCluster, RedisServer, RedisStartError


def _fail_to_start(what: str, exc: Exception) -> NoReturn:
    # "from None": the message already carries the cause (and the server's log).
    raise pytest.fail.Exception(
        f"could not start {what} for the tests: {exc}", pytrace=False
    ) from None


def _running_server(name: str) -> Iterator[RedisServer]:
    """Start a redis-server (failing the test, never skipping it, if it cannot start),
    yield it, and remove it afterwards."""
    server = RedisServer(name=name)
    try:
        server.start()
    except (RedisStartError, OSError) as exc:
        server.close()
        _fail_to_start("redis-server", exc)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on 127.0.0.1 (random port), shared by the whole session."""
    yield from _running_server("session")


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL (``redis://127.0.0.1:PORT/0``) of the shared session server.

    The server is not flushed between tests: use ``unique_namespace`` for your keys.
    """
    return redis_server.url


@pytest.fixture
def unique_namespace() -> str:
    """A key namespace no other test uses, e.g. ``"t3f9a0c1d2e"``."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def redis_caches(redis_url: str, unique_namespace: str) -> Iterator[Callable[..., Any]]:
    """Make `Cache(redis_url, namespace=unique_namespace, **options)`s, closed afterwards.

    Two caches made here have separate in-process flights and meet only in Redis, like two
    processes.
    """
    from coalesce import Cache

    made: list[Cache] = []

    def make(**options: Any) -> Cache:
        cache = Cache(redis_url, namespace=unique_namespace, **options)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, which the test may stop, kill or restart.

    ``restart()`` brings it back on the same port, empty.  It is stopped and its
    temporary directory removed after the test.
    """
    yield from _running_server("fresh")


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A 3-master Redis Cluster on 127.0.0.1, started the first time a test asks for it."""
    cluster = RedisCluster()
    try:
        cluster.start()
    except (RedisStartError, OSError) as exc:
        cluster.stop()
        _fail_to_start("a Redis Cluster", exc)
    try:
        yield cluster
    finally:
        cluster.stop()


Server = TypeVar("Server", bound=ServerProcess)


def _server_factory(what: str, make: Callable[..., Server]) -> Iterator[Callable[..., Server]]:
    """Yield `start(*args)`: `make(*args).start()`, failing the test (never skipping it) when
    the server cannot start; every server made is closed afterwards."""
    made: list[Server] = []

    def start(*args: Any) -> Server:
        server = make(*args)
        made.append(server)
        try:
            server.start()
        except (ServerStartError, OSError) as exc:
            _fail_to_start(what, exc)
        return server

    try:
        yield start
    finally:
        for server in made:
            server.close()


@pytest.fixture(scope="module")
def uvicorn_process() -> Iterator[Callable[[str, Path], UvicornProcess]]:
    """Start `python -m uvicorn <module:app>` (imported from a directory) on a free port.

    ``uvicorn_process("nginx_app:app", tests_dir).url`` is its ``http://127.0.0.1:PORT``;
    every process started is stopped (and checked to have exited) after the module.
    """
    yield from _server_factory("uvicorn", UvicornProcess)


@pytest.fixture(scope="module")
def nginx_proxy() -> Iterator[Callable[[str], NginxServer]]:
    """Start a real nginx with `proxy_cache` in front of an upstream URL, on a free port.

    ``nginx_proxy(upstream).url`` is its ``http://127.0.0.1:PORT``; its configuration, logs
    and cache live in a temporary directory; every nginx started is stopped (and checked to
    have exited) after the module.
    """
    yield from _server_factory("nginx", NginxServer)
