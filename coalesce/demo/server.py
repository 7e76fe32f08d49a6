"""The demo's server in a process of its own: `python -m coalesce.demo.server`.

Why a process and not a thread: the load generator and the server would otherwise share one
interpreter lock, and each would spend the other's CPU time; measured, a cached route then
looked about 1.5x slower than it is. In its own process the server is measured alone, the
way a real application is.

The child binds a listening socket on 127.0.0.1, port 0 (the kernel picks a free one), and
prints `PORT <n>` on its standard output before serving, so there is no window in which
another process could take the port. Before that it generates the database (`app.py`).
The cache and database URLs reach it through `COALESCE_URL` and `COALESCE_DEMO_DATABASE`
rather than the command line, where another user's `ps` could read a password. SIGTERM
stops it gracefully: uvicorn runs the app's shutdown, which deletes the demo's entries and
its data.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from typing import IO, Any

START_TIMEOUT = 30.0  # seconds for the child to import FastAPI, make its data and serve
STOP_TIMEOUT = 15.0


def listening_socket() -> socket.socket:
    """A TCP socket listening on 127.0.0.1 on a free port.

    `IPPROTO_TCP` must be given explicitly: asyncio turns Nagle's algorithm off
    (`TCP_NODELAY`) only on sockets whose protocol says TCP, and with Nagle on, every
    keep-alive response waits about 40 ms for a delayed ACK.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    return sock


def serve(argv: Sequence[str] | None = None) -> int:
    """The child: build the demo app, announce the port, serve until SIGTERM."""
    import uvicorn

    from coalesce import Cache
    from coalesce.demo.app import DatabasePool, build_app, open_database, server_timing

    parser = argparse.ArgumentParser(prog="python -m coalesce.demo.server")
    parser.add_argument("--namespace", default="coalesce")
    parser.add_argument("--pool", type=int, default=10)
    parser.add_argument("--ttl", type=float, default=60.0)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--run-id", default=uuid.uuid4().hex[:8])
    args = parser.parse_args(argv)

    cache = Cache(os.environ.get("COALESCE_URL") or "memory://", namespace=args.namespace)
    database = os.environ.get("COALESCE_DEMO_DATABASE") or "sqlite"
    pool = DatabasePool(open_database(database, args.items, args.run_id), args.pool)
    try:
        app = server_timing(build_app(cache, pool, args.run_id, args.ttl))
        sock = listening_socket()
        print(f"PORT {sock.getsockname()[1]}", flush=True)
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="on", timeout_keep_alive=60
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        pool.close()  # if the app's shutdown did not run (it failed to start): the data too
    return 0


class ServerProcess:
    """Runs `serve` in a child process; `with` it to start it and stop it, whatever happens.

    Start-up is bounded (`START_TIMEOUT`) and a child that fails to start is reported with
    the last line it wrote on stderr. The child's stdout is drained by a thread, so it can
    never block on a full pipe.
    """

    def __init__(
        self, url: str, namespace: str, *, database: str, items: int, pool: int, ttl: float
    ) -> None:
        self.command = [
            sys.executable,
            "-m",
            "coalesce.demo.server",
            "--namespace",
            namespace,
            "--items",
            str(items),
            "--pool",
            str(pool),
            "--ttl",
            repr(ttl),
        ]
        self.env = {**os.environ, "COALESCE_URL": url, "COALESCE_DEMO_DATABASE": database}
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        from coalesce.cli.remote import CliError

        self._log = tempfile.TemporaryFile("w+")
        self._proc = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env=self.env,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_drain, args=(self._proc.stdout, lines), daemon=True).start()
        try:
            first = lines.get(timeout=START_TIMEOUT)
        except queue.Empty:
            first = ""
        if not first.startswith("PORT "):
            problem = self._last_words() or f"no answer within {START_TIMEOUT:g} s"
            self.stop()
            raise CliError(f"the demo's server did not start: {problem}")
        self.port = int(first.split()[1])
        self._wait_until_serving()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _wait_until_serving(self) -> None:
        """Until the app answers (the socket accepts before uvicorn serves), bounded."""
        import httpx

        from coalesce.cli.remote import CliError

        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if httpx.get(f"{self.url}/demo/counters", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self._proc is not None
            if self._proc.poll() is not None or time.monotonic() > deadline:
                problem = self._last_words() or "it did not answer"
                self.stop()
                raise CliError(f"the demo's server did not start: {problem}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (graceful: the app deletes its entries), then SIGKILL if it lingers."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _last_words(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        lines = [line.strip() for line in self._log.read().splitlines() if line.strip()]
        return lines[-1] if lines else ""


def _drain(stream: Any, lines: queue.Queue[str]) -> None:
    """Pass on every line the child prints (the first one says its port); "" at its end."""
    for line in stream:
        lines.put(line)
    lines.put("")


if __name__ == "__main__":
    raise SystemExit(serve())
