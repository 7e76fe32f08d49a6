"""`coalesce.flask.cached` behind Flask's real (werkzeug) threaded server, in its own
process on a free port of 127.0.0.1, driven over TCP: this module's `served` app."""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from nginx_server import ServerProcess, ServerStartError
from test_flask import App

TESTS = Path(__file__).resolve().parent

# What the server process serves (it imports this module).
served = App()
served.hold_for = 12  # /slow answers once 12 requests for its path arrived


@served.app.get("/calls")
def calls() -> dict[str, int]:
    return dict(served.calls)


@served.app.post("/drop/<int:item_id>")
def drop(item_id: int) -> dict[str, bool]:
    return {"removed": served.item.invalidate(item_id=item_id)}


class FlaskProcess(ServerProcess):
    """`app.run(threaded=True)`: werkzeug's development server, one thread per request."""

    name = "flask"

    def start(self) -> FlaskProcess:
        code = (
            f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
            "import test_flask_server\n"
            f"test_flask_server.served.app.run('127.0.0.1', {self.port}, threaded=True)\n"
        )
        self._spawn(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        )
        return self


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    server = FlaskProcess()
    try:
        server.start()
    except (ServerStartError, OSError) as exc:
        pytest.fail(f"could not start Flask's server: {exc}", pytrace=False)
    try:
        yield server.url
    finally:
        server.close()


def test_threads_of_a_real_server_compute_once(base: str) -> None:
    with httpx.Client(base_url=base, timeout=30) as client, ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: client.get("/slow/tcp"), range(12)))
        runs = client.get("/calls").json()
        after = client.get("/slow/tcp")
    assert runs["slow"] == 1
    assert [r.status_code for r in responses] == [200] * 12
    statuses = Counter(r.headers["x-cache"] for r in responses)
    assert statuses["MISS"] == 1 and statuses["COALESCED"] + statuses["HIT"] == 11
    assert after.headers["x-cache"] == "HIT" and after.json() == {"name": "tcp"}


def test_users_etag_and_invalidate_over_tcp(base: str) -> None:
    with httpx.Client(base_url=base, timeout=10) as client:
        for _ in range(3):
            alice = client.get("/me", headers={"authorization": "alice"})
            bob = client.get("/me", headers={"authorization": "bob"})
            mallory = client.get("/whoami", headers={"authorization": "mallory"})
            assert alice.json() == {"user": "alice"} and bob.json() == {"user": "bob"}
            assert mallory.json() == {"user": "mallory"}
            assert mallory.headers["x-cache"] == "BYPASS"
        assert client.get("/calls").json()["me"] == 2

        first = client.get("/items/5")
        again = client.get("/items/5", headers={"if-none-match": first.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        assert client.post("/drop/5").json() == {"removed": True}
        fresh = client.get("/items/5")
        assert fresh.headers["x-cache"] == "MISS" and fresh.json()["run"] == 2
