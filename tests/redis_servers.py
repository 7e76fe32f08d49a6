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
* :func:`make_tls_files` writes a throw-away CA and a server certificate for 127.0.0.1, so
  that ``RedisServer(tls=True)`` can serve ``rediss://`` (no network needed).

Failures to start raise :class:`RedisStartError` carrying the server's log, so a broken
environment shows up as a clear test failure rather than a hang or a skip.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import inspect
import ipaddress
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote

import redis

__all__ = [
    "HOST",
    "RedisCluster",
    "RedisServer",
    "RedisStartError",
    "TlsFiles",
    "cluster_info",
    "free_port",
    "make_tls_files",
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


def take_connection(pool: Any) -> Any:
    """A connection out of a redis-py pool (give it back with `pool.release`), on every
    redis-py we support: before 5.3 `get_connection` needs a command name, from 6.0 on
    naming one is deprecated."""
    command_name = inspect.signature(pool.get_connection).parameters.get("command_name")
    if command_name is not None and command_name.default is inspect.Parameter.empty:
        return pool.get_connection("GET")
    return pool.get_connection()


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


# -- TLS ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a throw-away certificate authority and of a server certificate it signed.

    The server certificate is valid for ``127.0.0.1`` and ``localhost`` (subject alternative
    names), for one day.
    """

    directory: Path

    @property
    def ca(self) -> Path:
        """The CA's certificate: what clients trust (``ssl_ca_certs``)."""
        return self.directory / "ca.pem"

    @property
    def cert(self) -> Path:
        """The server's certificate (``--tls-cert-file``)."""
        return self.directory / "server.pem"

    @property
    def key(self) -> Path:
        """The server's private key, unencrypted (``--tls-key-file``)."""
        return self.directory / "server.key"

    def exist(self) -> bool:
        return all(path.is_file() for path in (self.ca, self.cert, self.key))


def make_tls_files(
    directory: Path | str, *, tool: Literal["auto", "cryptography", "openssl"] = "auto"
) -> TlsFiles:
    """Write a new CA and a server certificate for 127.0.0.1 into ``directory``.

    Uses the ``cryptography`` package when it is importable (``tool="auto"``), else the
    ``openssl`` command line. Nothing goes over the network. The keys are P-256 EC keys, so
    this takes milliseconds.

    Raises:
        RedisStartError: neither ``cryptography`` nor ``openssl`` is available, or
            ``openssl`` failed.
    """
    files = TlsFiles(Path(directory))
    files.directory.mkdir(parents=True, exist_ok=True)
    if tool == "auto":
        try:
            import cryptography  # noqa: F401
        except ImportError:
            tool = "openssl"
        else:
            tool = "cryptography"
    if tool == "cryptography":
        _tls_with_cryptography(files)
    else:
        _tls_with_openssl(files)
    return files


def _tls_with_cryptography(files: TlsFiles) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)

    def usage(*, cert_sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=cert_sign,
            crl_sign=cert_sign,
            encipher_only=False,
            decipher_only=False,
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coalesce test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    files.key.chmod(0o600)


def _tls_with_openssl(files: TlsFiles) -> None:
    openssl = _executable("openssl")
    work = files.directory
    ca_key, csr, ext = work / "ca.key", work / "server.csr", work / "server.ext"
    ext.write_text(
        f"subjectAltName=IP:{HOST},DNS:localhost\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        [
            *[openssl, "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(files.ca)],
            *["-days", "1", "-subj", "/CN=coalesce test CA"],
            *["-addext", "basicConstraints=critical,CA:TRUE,pathlen:0"],
            *["-addext", "keyUsage=critical,digitalSignature,keyCertSign,cRLSign"],
        ],
        [openssl, "req", *ec, "-keyout", str(files.key), "-out", str(csr), "-subj", f"/CN={HOST}"],
        [
            *[
                openssl,
                "x509",
                "-req",
                "-in",
                str(csr),
                "-CA",
                str(files.ca),
                "-CAkey",
                str(ca_key),
            ],
            *["-set_serial", str(random.getrandbits(63)), "-days", "1"],
            *["-out", str(files.cert), "-extfile", str(ext)],
        ],
    ]
    for cmd in steps:
        result = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise RedisStartError(f"{' '.join(cmd)} failed ({result.returncode}):\n{output}")


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
        tls: serve TLS only (``--port 0 --tls-port PORT``, no client certificates asked
            for) with a throw-away CA and certificate written into :attr:`tls_files` on
            the first start (unless files are already there); :attr:`url` is then
            ``rediss://...?ssl_ca_certs=...`` and :meth:`client` verifies the server.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        password: str | None = None,
        extra_args: Sequence[str] = (),
        name: str = "redis",
        tls: bool = False,
    ) -> None:
        self._fixed_port = port is not None
        self._port = port if port is not None else free_port()
        self.password = password
        self.extra_args = list(extra_args)
        self.name = name
        self.host = HOST
        self.dir = Path(tempfile.mkdtemp(prefix=f"coalesce-{name}-"))
        self.tls = tls
        self.tls_files = TlsFiles(self.dir / "tls")
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
        """``redis://`` URL of database 0, including the password when there is one.

        With ``tls=True``: ``rediss://...:PORT/0?ssl_ca_certs=/path/to/ca.pem``.
        """
        auth = f":{self.password}@" if self.password is not None else ""
        if self.tls:
            ca = quote(str(self.tls_files.ca), safe="/")
            return f"rediss://{auth}{self.host}:{self._port}/0?ssl_ca_certs={ca}"
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
        if self.tls:
            ports = ["--port", "0", "--tls-port", str(self._port)]
            ports += ["--tls-cert-file", str(self.tls_files.cert)]
            ports += ["--tls-key-file", str(self.tls_files.key)]
            ports += ["--tls-ca-cert-file", str(self.tls_files.ca)]
            ports += ["--tls-auth-clients", "no"]
        else:
            ports = ["--port", str(self._port)]
        cmd = [
            _executable("redis-server"),
            "--bind",
            self.host,
            *ports,
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
        """A new synchronous redis-py client for this server (caller closes it).

        With ``tls=True`` it speaks TLS and verifies the server against :attr:`tls_files`.
        """
        if self.tls:
            kwargs = {"ssl": True, "ssl_ca_certs": str(self.tls_files.ca), **kwargs}
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
        if self.tls and not self.tls_files.exist():
            make_tls_files(self.tls_files.directory)
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
        """Kill the server and delete its temporary directory.  Idempotent.

        A kill, not :meth:`stop`: the server keeps nothing, and a graceful shutdown waits
        for its next cron tick (about 100 ms) at the end of every test that made one.
        """
        self.kill()
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
        tls = " tls" if self.tls else ""
        return f"<RedisServer {self.host}:{self._port}{tls} {state}>"


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
