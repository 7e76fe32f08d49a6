"""Throw-away HTTP servers for the proxy tests: a real nginx with `proxy_cache` in front of a
real uvicorn, each its own process on a free port of 127.0.0.1.

* :class:`UvicornProcess` runs ``python -m uvicorn module:app`` (the app module is imported
  from ``app_dir``) and waits until its port accepts connections.
* :class:`NginxServer` writes its own ``nginx.conf`` into a temporary directory (pid file,
  logs, every ``*_temp_path`` and the ``proxy_cache_path`` live there too; nothing under
  /etc, /var or port 80 is touched), starts ``nginx -p <dir> -c <conf> -e <log>`` in the
  foreground (``daemon off``) and waits for its port. Each response carries
  ``X-Proxy-Cache: $upstream_cache_status`` (MISS, HIT, EXPIRED...).

The cache key is nginx's default, ``$scheme$proxy_host$request_uri``: it does not contain
``Authorization``, ``X-API-Key`` or any other request header, so whether nginx hands one
client's response to another is decided by the response alone (``Cache-Control``,
``Vary``, ``Set-Cookie``), which is what the tests want to check. nginx ignores RFC 9111's
rule about requests carrying ``Authorization`` (it stores such responses like any other) and
``proxy_cache_valid`` is not set, so nginx stores exactly the responses whose
``Cache-Control``/``Expires`` let it.

``close()`` stops the process (SIGTERM, then SIGKILL after a bound), asserts that it exited
and removes the directory. Failures to start raise :class:`ServerStartError` with the
process's log. This module imports nothing from ``coalesce``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class ServerStartError(RuntimeError):
    """A server process could not be started (the message carries its log)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no log)"


class ServerProcess:
    """A server subprocess in its own process group, logging to `log`; `start()` in
    subclasses starts it and returns it."""

    name = "server"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"coalesce-{self.name}-"))
        self.port = free_port()
        self.log = self.dir / "output.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        raise NotImplementedError

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=env,
                start_new_session=True,  # its own group: its workers are stopped with it
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not _accepts(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                state = (
                    f"exited with {self.proc.returncode}"
                    if self.proc.poll() is not None
                    else f"not listening after {START_TIMEOUT} s"
                )
                log = self.logs()
                self.close(check=False)
                raise ServerStartError(f"{self.name} on 127.0.0.1:{self.port} {state}; log:\n{log}")
            time.sleep(0.02)

    def logs(self) -> str:
        return _tail(self.log)

    def close(self, *, check: bool = True) -> None:
        """Stop the process (bounded), assert it exited, remove the directory."""
        proc, self.proc = self.proc, None
        try:
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=STOP_TIMEOUT)
            if proc is not None and check:
                assert proc.poll() is not None, f"{self.name} (pid {proc.pid}) did not exit"
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class UvicornProcess(ServerProcess):
    """``python -m uvicorn <target>`` (e.g. ``"nginx_app:app"``) with ``app_dir`` on its path."""

    name = "uvicorn"

    def __init__(self, target: str, app_dir: Path) -> None:
        super().__init__()
        self.target = target
        self.app_dir = app_dir

    def start(self) -> UvicornProcess:
        argv = [sys.executable, "-m", "uvicorn", self.target, "--app-dir", str(self.app_dir)]
        argv += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        self._spawn(argv, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        return self


def nginx_binary() -> str:
    """The nginx executable: on PATH, else Debian's /usr/sbin/nginx (not on a user's PATH)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise ServerStartError(
            "nginx is not installed (apt-get install nginx; .ci/run installs it)"
        )
    return found


CONFIG = """\
# written by tests/nginx_server.py: everything lives in {dir}
daemon off;
master_process on;
worker_processes 1;  # one event loop: a stored response is visible to the next request
{user}pid {dir}/nginx.pid;
error_log {dir}/error.log info;

events {{
    worker_connections 64;
}}

http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy_temp;
    fastcgi_temp_path {dir}/fastcgi_temp;
    uwsgi_temp_path {dir}/uwsgi_temp;
    scgi_temp_path {dir}/scgi_temp;

    proxy_cache_path {dir}/cache levels=1:2 keys_zone=coalesce_test:1m max_size=16m
                     inactive=10m use_temp_path=off;

    server {{
        listen 127.0.0.1:{port};
        server_name localhost;

        location / {{
            proxy_pass {upstream};
            proxy_set_header Host $host;
            proxy_cache coalesce_test;
            proxy_cache_key $scheme$proxy_host$request_uri;  # nginx's default: no headers
            proxy_read_timeout 10s;
            proxy_connect_timeout 5s;
            add_header X-Proxy-Cache $upstream_cache_status always;
        }}
    }}
}}
"""


class NginxServer(ServerProcess):
    """nginx with `proxy_cache` on, proxying everything to `upstream` (``http://host:port``)."""

    name = "nginx"

    def __init__(self, upstream: str) -> None:
        super().__init__()
        self.upstream = upstream
        self.conf = self.dir / "nginx.conf"

    def config(self) -> str:
        # As root, the master would run its worker as "nobody", which cannot write into our
        # private directory: keep the worker as the user we are.
        user = "user root;\n" if os.geteuid() == 0 else ""
        return CONFIG.format(dir=self.dir, port=self.port, upstream=self.upstream, user=user)

    def start(self) -> NginxServer:
        binary = nginx_binary()
        self.conf.write_text(self.config())
        # -e (nginx >= 1.19.5): the log used before the configuration is read, instead of
        # the packaged /var/log/nginx/error.log.
        early_log = ["-e", str(self.dir / "error.log")] if _supports_e(binary) else []
        self._spawn([binary, "-p", f"{self.dir}/", "-c", str(self.conf), *early_log])
        return self

    def logs(self) -> str:
        return f"{_tail(self.log)}\n--- error.log ---\n{_tail(self.dir / 'error.log')}"


def _supports_e(binary: str) -> bool:
    done = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10, check=False)
    return "-e filename" in done.stdout + done.stderr
