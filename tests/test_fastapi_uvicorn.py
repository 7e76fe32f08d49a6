"""A cached route behind a real uvicorn server on 127.0.0.1, driven over TCP.

Nothing here depends on how fast the machine is: a burst of requests is made to overlap by a
gate (`App.hold_for`), not by hoping that every request arrives within a fixed time.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from coalesce import Cache
from coalesce.fastapi import MetricsRegistry, admin_router, cached, metrics_router

START_TIMEOUT = 10.0
GATE_TIMEOUT = 10.0  # how long the slow route waits at most for a burst to arrive
TOKEN = "uvicorn-test-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class CountArrivals:
    """Pure ASGI middleware: counts the HTTP requests per path as they enter the app.

    Pure ASGI (not `@app.middleware`), so a request goes on from here to the cached route
    without waiting on anything: once counted, it joins the computation in flight at once.
    """

    def __init__(self, app: Any, arrived: Counter[str]) -> None:
        self.app = app
        self.arrived = arrived

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.arrived[scope["path"]] += 1
        await self.app(scope, receive, send)


class App:
    """A FastAPI app with a slow cached route that counts its computations.

    With `hold_for = n`, the slow route's computation first waits (at most `GATE_TIMEOUT`)
    until n requests for its path have arrived, so that all of them overlap it however
    loaded the machine is; `gate_timed_out` tells whether they never did.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.hold_for = 0
        self.gate_timed_out = False
        self.arrived: Counter[str] = Counter()
        self.registry = MetricsRegistry()
        self.app = FastAPI()
        self.app.add_middleware(CountArrivals, arrived=self.arrived)
        self.cache = Cache()

        @self.app.get("/report/{day}")
        @cached(ttl=60, cache=self.cache, registry=self.registry)
        async def report(day: str) -> dict[str, str]:
            self.calls += 1
            deadline = time.monotonic() + GATE_TIMEOUT
            while self.arrived[f"/report/{day}"] < self.hold_for:
                if time.monotonic() > deadline:
                    self.gate_timed_out = True
                    break
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.3)  # a slow query
            return {"day": day, "total": "42"}

        @self.app.get("/users/{user_id}")
        @cached(ttl=60, cache=self.cache, key="user:{user_id}", tags=["users"])
        async def user(user_id: int) -> dict[str, int]:
            self.calls += 1
            return {"user": user_id, "version": self.calls}

        self.app.include_router(metrics_router(registry=self.registry))
        self.app.include_router(admin_router(self.cache, token=TOKEN))


@pytest.fixture
def server() -> Iterator[tuple[App, str]]:
    """uvicorn serving `App` in a thread; bounded start, always shut down."""
    target = App()
    port = free_port()
    config = uvicorn.Config(
        target.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            srv.should_exit = True
            pytest.fail(f"uvicorn did not start on 127.0.0.1:{port} within {START_TIMEOUT} s")
        time.sleep(0.02)
    try:
        yield target, f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        assert not thread.is_alive(), "uvicorn did not shut down"


async def test_fifty_concurrent_requests_to_a_cold_key_compute_once(
    server: tuple[App, str],
) -> None:
    target, base = server
    target.hold_for = 50  # the computation ends only after all 50 requests reached the app
    limits = httpx.Limits(max_connections=50)
    timeout = GATE_TIMEOUT + 20  # a loaded machine is slow, never wrong
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout) as client:
        responses = await asyncio.gather(*(client.get("/report/monday") for _ in range(50)))
        after = await client.get("/report/monday")
        metrics = (await client.get("/coalesce/metrics")).json()
    assert not target.gate_timed_out, f"the 50 requests did not overlap: {target.arrived}"
    assert all(r.status_code == 200 for r in responses)
    assert {r.content for r in responses} == {after.content}
    assert target.calls == 1
    statuses = Counter(r.headers["x-cache"] for r in responses)
    assert statuses == {"MISS": 1, "COALESCED": 49}  # all overlapped the one computation
    assert after.headers["x-cache"] == "HIT"
    assert len({r.headers["etag"] for r in responses}) == 1
    route = metrics["routes"]["/report/{day}"]
    assert route["computations"] == 1 and route["misses"] == 1 and route["coalesced"] == 49
    assert route["p50_ms"] >= 300


async def test_conditional_request_over_tcp(server: tuple[App, str]) -> None:
    _, base = server
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        first = await client.get("/report/tuesday")
        etag = first.headers["etag"]
        again = await client.get("/report/tuesday", headers={"if-none-match": etag})
        head_ok = await client.head("/report/tuesday")
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == first.headers["etag"]
    assert head_ok.status_code == 405  # @app.get routes no HEAD, cached or not


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real command line, in its own process (`python -m coalesce`)."""
    env = {**os.environ, "COALESCE_TOKEN": ""}
    return subprocess.run(
        [sys.executable, "-m", "coalesce", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


async def test_the_cli_invalidates_through_the_admin_router(server: tuple[App, str]) -> None:
    target, base = server
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        for n in (1, 2, 3):
            await client.get(f"/users/{n}")
        assert (await client.get("/users/1")).headers["x-cache"] == "HIT"

        # a template route's key: the template's key, `@`, the handler's name
        one = "user:1@test_fastapi_uvicorn.App.__init__.<locals>.user"
        nine = one.replace("user:1", "user:9")
        assert target.cache.keys() == sorted([one, one.replace("1", "2"), one.replace("1", "3")])
        done = await asyncio.to_thread(
            run_cli, "invalidate", one, nine, "--app", base, "--token", TOKEN
        )
        assert done.returncode == 0, done.stderr
        assert f"removed        {one}" in done.stdout
        assert f"did not exist  {nine}" in done.stdout
        again = await client.get("/users/1")
        assert again.headers["x-cache"] == "MISS" and again.json()["version"] == 4

        tagged = await asyncio.to_thread(
            run_cli, "invalidate", "--tag", "users", "--app", base, "--token", TOKEN
        )
        assert tagged.returncode == 0, tagged.stderr
        assert "removed        3 entries tagged users" in tagged.stdout
        assert target.cache.keys() == []

        refused = await asyncio.to_thread(
            run_cli, "invalidate", "user:2", "--app", base, "--token", "wrong"
        )
        assert refused.returncode == 2
        assert "refused the token" in refused.stderr + refused.stdout
