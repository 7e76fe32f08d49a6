"""Run real, throw-away ``redis-server`` processes for the test-suite.

Every server started here listens on ``127.0.0.1`` on a port picked at run time, keeps
nothing on disk (``--save "" --appendonly no``) and works in its own temporary directory.
The well-known port 6379 is never used, so a Redis that happens to run on the machine is
left alone.

* :func:`free_port` picks a free TCP port on the loopback interface.
* :class:`RedisServer` is one standalone server that tests may stop, kill and restart
  (on the same port).
* :class:`RedisCluster` is a three-master Redis Cluster formed with
  ``redis-cli --cluster create``.

Failures to start raise :class:`RedisStartError` carrying the server's log, so a broken
environment shows up as a clear test failure rather than a hang or a skip.
"""

from __future__ import annotations

import atexit
import contextlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

__all__ = [
    "HOST",
    "RedisCluster",
    "RedisServer",
    "RedisStartError",
    "cluster_info",
    "free_port",
]

HOST = "127.0.0.1"
"""Interface every test server binds to."""

START_TIMEOUT = 10.0
"""Seconds a server gets to answer ``PING`` after being spawned."""

STOP_TIMEOUT = 10.0
"""Seconds a server gets to exit after ``SIGTERM`` before it is killed."""

CLUSTER_TIMEOUT = 30.0
"""Seconds a cluster gets to be created and to report ``cluster_state:ok``."""

CLUSTER_BUS_OFFSET = 10000
"""Redis Cluster nodes also listen on ``port + 10000`` (the cluster bus)."""

_RESERVED_PORTS = frozenset({6379, 6379 + CLUSTER_BUS_OFFSET})
_handed_out: set[int] = set()
_live_processes: set[subprocess.Popen[bytes]] = set()


class RedisStartError(RuntimeError):
    """A ``redis-server`` (or the cluster around it) could not be started."""


def _kill_leftovers() -> None:
    """Kill servers still running when the interpreter exits (e.g. after a crash)."""
    for proc in list(_live_processes):
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    _live_processes.clear()


atexit.register(_kill_leftovers)


def _port_is_free(port: int) -> bool:
    """Return whether ``port`` can be bound on :data:`HOST` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # redis-server binds with SO_REUSEADDR too, so TIME_WAIT leftovers do not matter.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(*, cluster_bus: bool = False) -> int:
    """Return a TCP port on 127.0.0.1 that is free right now.

    Ports already returned by this process are never returned again, so servers started
    one after another cannot pick the same port before either has bound it.  6379 (and its
    cluster bus port) is never returned.

    Args:
        cluster_bus: also require ``port + 10000`` to be free, as Redis Cluster nodes need
            it for the cluster bus.  Such ports are chosen below 50000.

    Raises:
        RuntimeError: when no free port was found.
    """
    for _ in range(500):
        if cluster_bus:
            port = random.randrange(20000, 50000)
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((HOST, 0))
                port = int(sock.getsockname()[1])
        candidates = [port, port + CLUSTER_BUS_OFFSET] if cluster_bus else [port]
        if any(p in _RESERVED_PORTS or p in _handed_out for p in candidates):
            continue
        if all(_port_is_free(p) for p in candidates):
            _handed_out.update(candidates)
            return port
    raise RuntimeError("could not find a free TCP port on 127.0.0.1")


def _executable(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RedisStartError(
            f"{name!r} was not found on PATH; install it first "
            "(Debian/Ubuntu: apt-get install redis-server redis-tools)"
        )
    return path


def cluster_info(client: redis.Redis) -> dict[str, str]:
    """``CLUSTER INFO`` as a ``{field: value}`` dict, whatever redis-py's parsing does."""
    execute: Callable[..., Any] = client.execute_command  # untyped in some redis-py versions
    raw = execute("CLUSTER", "INFO")
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    fields = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in fields}


class RedisServer:
    """One ``redis-server`` subprocess on 127.0.0.1, for tests.

    The server keeps no data on disk: after :meth:`restart` (or :meth:`kill` followed by
    :meth:`start`) it comes back empty, on the same port.

    Usage::

        with RedisServer() as server:
            client = redis.Redis.from_url(server.url)

    Args:
        port: port to listen on; a free one is picked when omitted.
        password: when given, the server requires it (``--requirepass``) and :attr:`url`
            contains it.
        extra_args: more ``redis-server`` command-line arguments, e.g.
            ``["--maxmemory", "10mb"]``.
        name: label used in the temporary directory's name and in error messages.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        password: str | None = None,
        extra_args: Sequence[str] = (),
        name: str = "redis",
    ) -> None:
        self._fixed_port = port is not None
        self._port = port if port is not None else free_port()
        self.password = password
        self.extra_args = list(extra_args)
        self.name = name
        self.host = HOST
        self.dir = Path(tempfile.mkdtemp(prefix=f"coalesce-{name}-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)

    # -- properties -----------------------------------------------------------------------

    @property
    def port(self) -> int:
        """TCP port the server listens on (kept across restarts)."""
        return self._port

    @property
    def url(self) -> str:
        """``redis://`` URL of database 0, including the password when there is one."""
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}{self.host}:{self._port}/0"

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or ``None``."""
        return self._proc.pid if self.is_running() and self._proc is not None else None

    @property
    def log_path(self) -> Path:
        """File receiving the server's log (appended to across restarts)."""
        return self.dir / "redis.log"

    def log(self, max_chars: int = 4000) -> str:
        """Return the tail of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return text[-max_chars:]

    def is_running(self) -> bool:
        """Whether the server process exists and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ------------------------------------------------------------------------

    def command(self) -> list[str]:
        """The ``redis-server`` command line used to start the server."""
        cmd = [
            _executable("redis-server"),
            "--bind",
            self.host,
            "--port",
            str(self._port),
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]
        if self.password is not None:
            cmd += ["--requirepass", self.password]
        return cmd + self.extra_args

    def client(self, **kwargs: object) -> redis.Redis:
        """A new synchronous redis-py client for this server (caller closes it)."""
        return redis.Redis(
            host=self.host,
            port=self._port,
            password=self.password,
            **kwargs,  # type: ignore[arg-type]
        )

    def start(self, timeout: float = START_TIMEOUT) -> RedisServer:
        """Start the server and wait until it answers ``PING``.

        Does nothing when it is already running.  On the very first start with an
        automatically chosen port, a port taken in the meantime by someone else is replaced
        by another free port; afterwards the port never changes.

        Raises:
            RedisStartError: the server exited or did not answer within ``timeout`` seconds;
                the message contains the tail of its log.
        """
        if self.is_running():
            return self
        attempts = 1 if (self._fixed_port or self._started_once) else 3
        for attempt in range(attempts):
            try:
                self._spawn_and_wait(timeout)
            except RedisStartError:
                in_use = "Address already in use" in self.log()
                if in_use and attempt + 1 < attempts:
                    self._port = free_port()
                    continue
                raise
            self._started_once = True
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn_and_wait(self, timeout: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        with self.log_path.open("ab") as log:
            log.write(f"--- starting: {' '.join(cmd)!s}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
        self._proc = proc
        _live_processes.add(proc)
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        client = self.client(socket_connect_timeout=0.5, socket_timeout=1.0)
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    self._forget(proc)
                    raise RedisStartError(
                        f"{self.name} ({' '.join(cmd)}) exited with code {proc.returncode} "
                        f"before answering PING; log:\n{self.log()}"
                    )
                try:
                    if client.ping():
                        return
                except redis.RedisError as exc:
                    last_error = exc
                time.sleep(0.05)
        finally:
            client.close()
        self._stop_process(proc)
        raise RedisStartError(
            f"{self.name} on {self.host}:{self._port} did not answer PING within "
            f"{timeout:.0f}s (last error: {last_error!r}); log:\n{self.log()}"
        )

    def _forget(self, proc: subprocess.Popen[bytes]) -> None:
        _live_processes.discard(proc)
        if self._proc is proc:
            self._proc = None

    def _stop_process(self, proc: subprocess.Popen[bytes], graceful: bool = True) -> None:
        if proc.poll() is None:
            if graceful:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=STOP_TIMEOUT)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT)
        self._forget(proc)

    def stop(self) -> None:
        """Stop the server: ``SIGTERM``, then ``SIGKILL`` after 10 s.  Idempotent.

        The temporary directory (and log) is kept so that :meth:`start` can be called
        again; :meth:`close` removes it.
        """
        if self._proc is not None:
            self._stop_process(self._proc, graceful=True)

    def kill(self) -> None:
        """Kill the server abruptly with ``SIGKILL`` (simulates a crash).  Idempotent."""
        if self._proc is not None:
            self._stop_process(self._proc, graceful=False)

    def restart(self, timeout: float = START_TIMEOUT) -> RedisServer:
        """Stop the server (if running) and start it again on the same port, empty."""
        self.stop()
        self._fixed_port = True
        return self.start(timeout)

    def close(self) -> None:
        """Stop the server and delete its temporary directory.  Idempotent."""
        self.stop()
        self._finalizer()

    def __enter__(self) -> RedisServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<RedisServer {self.host}:{self._port} {state}>"


class RedisCluster:
    """A Redis Cluster of three masters (no replicas) on 127.0.0.1, for tests.

    Each node is a :class:`RedisServer` started with ``--cluster-enabled yes``; the cluster
    is formed with ``redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes`` and
    :meth:`start` returns once every node reports ``cluster_state:ok``.

    Usage::

        with RedisCluster() as cluster:
            client = redis.cluster.RedisCluster.from_url(cluster.url)
    """

    def __init__(self, masters: int = 3) -> None:
        if masters < 3:
            raise ValueError("Redis Cluster needs at least 3 masters")
        self.nodes: list[RedisServer] = []
        for index in range(masters):
            port = free_port(cluster_bus=True)
            self.nodes.append(
                RedisServer(
                    port=port,
                    name=f"cluster{index}",
                    extra_args=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "5000",
                    ],
                )
            )

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every master, for cluster clients."""
        return [(node.host, node.port) for node in self.nodes]

    @property
    def ports(self) -> list[int]:
        """Port of every master."""
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis://`` URL of the first node (clients discover the others)."""
        return self.nodes[0].url

    def start(self, timeout: float = CLUSTER_TIMEOUT) -> RedisCluster:
        """Start the nodes, create the cluster and wait for ``cluster_state:ok``.

        Raises:
            RedisStartError: a node did not start, ``redis-cli --cluster create`` failed, or
                the cluster did not become healthy within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        try:
            for node in self.nodes:
                node.start()
            self._create(deadline)
            self._wait_ok(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self, deadline: float) -> None:
        cmd = [
            _executable("redis-cli"),
            "--cluster",
            "create",
            *(f"{host}:{port}" for host, port in self.startup_nodes),
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ]
        try:
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RedisStartError(
                f"{' '.join(cmd)} timed out; output:\n{exc.output!r}\n{self._logs()}"
            ) from exc
        output = result.stdout.decode(errors="replace")
        if result.returncode != 0:
            raise RedisStartError(
                f"{' '.join(cmd)} failed with code {result.returncode}; output:\n{output}\n"
                f"{self._logs()}"
            )

    def _wait_ok(self, deadline: float) -> None:
        pending = list(self.nodes)
        last: dict[int, str] = {}
        while pending and time.monotonic() < deadline:
            for node in list(pending):
                client = node.client(socket_connect_timeout=0.5, socket_timeout=1.0)
                try:
                    info = cluster_info(client)
                    last[node.port] = repr(info)
                    if info.get("cluster_state") == "ok" and info.get("cluster_known_nodes") == str(
                        len(self.nodes)
                    ):
                        pending.remove(node)
                except redis.RedisError as exc:
                    last[node.port] = repr(exc)
                finally:
                    client.close()
            if pending:
                time.sleep(0.1)
        if pending:
            details = "\n".join(f"{n.port}: {last.get(n.port, '?')}" for n in pending)
            raise RedisStartError(
                f"cluster did not reach cluster_state:ok in time:\n{details}\n{self._logs()}"
            )

    def _logs(self) -> str:
        return "\n".join(f"--- log of node {n.port}:\n{n.log(2000)}" for n in self.nodes)

    def stop(self) -> None:
        """Stop every node and delete their temporary directories.  Idempotent."""
        for node in self.nodes:
            node.close()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisCluster {', '.join(f'{h}:{p}' for h, p in self.startup_nodes)}>"
