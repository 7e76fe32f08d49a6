"""The Redis store's connection: lazy clients, errors, the breaker, scripts and shared reads.

`RedisConnection` owns everything about talking to one Redis (or Redis Cluster):

* clients are created on first use, never when a `Cache` is built or a function decorated:
  one sync client (thread-safe, pooled) and one asyncio client *per event loop* (an asyncio
  connection belongs to the loop that opened it), unless existing clients were given;
* the pools of the clients we create are bounded (`max_connections`, `DEFAULT_MAX_CONNECTIONS`
  unless given): a burst of threads or tasks waits for a free connection (redis-py's
  `BlockingConnectionPool`, at most `socket_timeout` seconds) instead of opening more; a call
  that waited in vain fails like any store failure, without counting against the breaker
  (Redis did not fail, we were busy). On a cluster the bound holds per node, and redis-py
  raises at once instead of waiting: the same degradation. Given clients keep their pools;
* every call goes through `call` / `acall`: the circuit breaker first (fail fast, no I/O,
  while it is open), then the command, whose redis-py errors become `BackendError` naming
  the URL without its password;
* `script` / `ascript` run a Lua script by EVALSHA and load it on NOSCRIPT (also after a
  restarted Redis forgot it);
* `get` / `aget` share one `GET` among concurrent readers of the same key in this process.

Concurrency contract:

* `_sync_client` and `_loops` are created lazily under `_lock`; `_last_loop` caches the last
  loop's state for the hot path (a stale cache only costs one lookup under the lock).
* `_reads` (pending sync reads): a reader inserts its `_Read` with `dict.setdefault`
  (atomic in CPython), or replaces one begun before the last deletion (`epoch`); only the
  read's leader removes it, if still there, after writing `data`/`error` and before
  releasing `_Read.lock`, which the followers wait on.
* `LoopState.reads` is only touched on its own loop's thread. The leader of an async read
  resolves its future with the bytes, its error, or `_Retry` when it was cancelled, so that
  the followers (awaiting it through `asyncio.shield`) read again instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import PipelineCommand as AsyncPipelineCommand
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.cluster import PipelineCommand
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MaxConnectionsError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.retry import Retry

from coalesce.errors import BackendError, ConfigurationError
from coalesce.stores.redis.breaker import CircuitBreaker, RateLimitedLog
from coalesce.stores.redis.scripts import Script
from coalesce.urls import credentials, path_of, redact, scheme_of

T = TypeVar("T")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


# A step's commands on several cluster nodes go out in one pipeline (`_at_once`) only where
# redis-py hands back every connection of an interrupted pipeline safely: before 7.3 (sync)
# and 8.0.1 (asyncio), one whose read a non-Redis exception interrupted (a signal handler
# raising, a cancelled task) could leave other nodes' connections with replies nobody read,
# back in the pool (sync: the next command on one would take that reply for its own) or
# lost to it (asyncio). With an older redis-py the commands go one after another.
_SYNC_PIPELINES = _version(redis.__version__) >= (7, 3)
_ASYNC_PIPELINES = _version(redis.__version__) >= (8, 0, 1)
#: A script to run, its KEYS and its ARGV (see `RedisConnection.scripts`).
ScriptCall = tuple[Script, Sequence[str], Sequence[Any]]
#: Commands to pipeline on a cluster, each with a key naming its slot (`_at_once`).
Commands = list[tuple[str, tuple[Any, ...]]]
SyncClient = redis.Redis | redis.cluster.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster

#: Errors of redis-py (and of the socket layer below it) that become `BackendError`.
REDIS_ERRORS = (RedisError, RedisClusterException, OSError)

#: Replies to a pipelined script that redis-py answers by sending the command again: a slot
#: moved or migrating (MOVED, ASK), busy (TRYAGAIN) or down, a script the node does not have
#: (it did not run), a connection lost (a pooled socket may be stale after a restart).
_SEND_AGAIN = (AskError, TryAgainError, ClusterDownError, NoScriptError, RedisConnectionError)

#: redis-py 8.1's maintenance-notifications handshake, turned off (see `_options`). Older
#: versions make it only on RESP3, which we do not ask for, and refuse the option: with
#: RESP2 (redis-py 7) or on the asyncio cluster client and its connections (8.0).
_NO_MAINT_NOTIFICATIONS: Any = None
if _version(redis.__version__) >= (8, 1):
    from redis.maint_notifications import MaintNotificationsConfig

    _NO_MAINT_NOTIFICATIONS = MaintNotificationsConfig(enabled=False)

#: Connections per pool of the clients we create (sync: one pool; asyncio: one per event
#: loop; cluster: per node), unless `max_connections` is given.
DEFAULT_MAX_CONNECTIONS = 50

#: What redis-py raises as a plain `ConnectionError` when our pool is full: its
#: `BlockingConnectionPool` when no connection freed up in time, and its `ConnectionPool`
#: (a cluster's nodes) before `MaxConnectionsError` (sync: redis-py < 6.4, asyncio: < 7.2).
_FULL_POOL_MESSAGES = frozenset({"No connection available.", "Too many connections"})

#: Before redis-py 6.0 its cluster clients retry a command that timed out or lost its
#: connection `cluster_error_retry_attempts` times (3 by default), ignoring the `retry` we
#: give; from 6.0 on they take the count from it (one retry). The same on every version:
#: a hung node costs at most two socket timeouts per command.
_CLUSTER_OPTIONS: dict[str, Any] = (
    {} if _version(redis.__version__) >= (6,) else {"cluster_error_retry_attempts": 1}
)


class _Read:
    """One `GET` in flight, shared by the threads that want the same key (see the contract)."""

    __slots__ = ("data", "epoch", "error", "lock")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch  # `RedisConnection.epoch` when the read began
        self.lock = threading.Lock()
        self.lock.acquire()  # released by the read's leader once data/error are written
        self.data: Any = None
        self.error: BaseException | None = None


class _Retry(Exception):
    """The leader of a shared async read was cancelled: its followers read for themselves."""


class LoopState:
    """Per event loop: its asyncio client and its pending reads (touched on that loop only)."""

    __slots__ = ("client", "loop", "owned", "reads")

    def __init__(self, loop: asyncio.AbstractEventLoop, client: AsyncClient, owned: bool) -> None:
        self.loop = loop
        self.client = client
        self.owned = owned  # created by us, so closed by us
        self.reads: dict[str, tuple[asyncio.Future[Any], int]] = {}  # key -> (read, epoch)


class RedisConnection:
    """Clients, breaker and error handling for one Redis URL (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        client: SyncClient | None,
        async_client: AsyncClient | None,
        cluster: bool | None,
        socket_timeout: float,
        socket_connect_timeout: float,
        max_connections: int | None,
        breaker: CircuitBreaker,
        log: RateLimitedLog,
    ) -> None:
        for given in (client, async_client):
            if given is not None and _decodes_responses(given):
                raise ConfigurationError(
                    "the Redis client given to coalesce must use decode_responses=False: "
                    "entries are bytes"
                )
        check_url(url)
        self.url = url
        self.where = redact(url)
        self.cluster = (
            bool(cluster)
            or isinstance(client, redis.cluster.RedisCluster)
            or isinstance(async_client, redis.asyncio.cluster.RedisCluster)
        )
        self.socket_timeout = socket_timeout
        self.socket_connect_timeout = socket_connect_timeout
        self.max_connections = max_connections
        self.breaker = breaker
        self.log = log
        self.errors = 0
        self._lock = threading.Lock()  # guards the lazy creation of clients and `_closed`
        self._sync_client: SyncClient | None = client
        self._sync_owned = client is None
        self._async_given = async_client
        self._loops: dict[asyncio.AbstractEventLoop, LoopState] = {}
        self._last_loop: LoopState | None = None
        self._reads: dict[str, _Read] = {}
        #: Bumped by the store after every deletion (its own, or one broadcast by another
        #: process): a read begun under an older epoch may return the deleted entry, so it is
        #: not joined by readers that began after the deletion.
        self.epoch = 0
        self._closed = False

    def after_fork(self) -> None:
        """In a forked child: new lock, no pending reads, no asyncio clients (their
        connections are the parent's sockets, and their loops do not run here), and a new
        sync client if we made it.

        A given sync client is left alone: redis-py's connection pools notice the new pid and
        drop the parent's connections themselves (without shutting down the parent's sockets).
        Our own is dropped the same way and made again on first use: cheap, and it does not
        depend on any lock of the old client (a cluster client has several).
        """
        self._lock = threading.Lock()
        self._reads = {}
        self._loops = {}
        self._last_loop = None
        if self._sync_owned:
            self._sync_client = None

    # -- clients -------------------------------------------------------------------------------

    def sync(self) -> SyncClient:
        """The sync client, created on first use."""
        client = self._sync_client
        if client is not None:
            return client
        with self._lock:
            if self._sync_client is None:
                if self._closed:
                    raise BackendError(f"the Redis store for {self.where} is closed")
                try:
                    self._sync_client = self._make_sync()  # a cluster client connects here
                except REDIS_ERRORS as exc:
                    raise self.failed(exc) from exc
            return self._sync_client

    def node_clients(self) -> list[redis.Redis]:
        """One sync client per primary node (the sync client itself on one server): a SCAN
        must visit every node of a cluster."""
        client = self.sync()
        if isinstance(client, redis.cluster.RedisCluster):
            primaries = client.get_primaries()  # type: ignore[no-untyped-call]
            return [client.get_redis_connection(node) for node in primaries]
        return [client]

    def _options(self, retry: Any) -> dict[str, Any]:
        options: dict[str, Any] = {
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_connect_timeout,
            # one quick retry after a connection error (a pooled socket may be stale after a
            # restart), none after a timeout: a hung Redis costs one socket_timeout per step
            "retry": retry,
        }
        options["max_connections"] = self.max_connections or DEFAULT_MAX_CONNECTIONS
        if _NO_MAINT_NOTIFICATIONS is not None:
            # redis-py 8.1's handshake for Redis Enterprise maintenance notifications: nothing
            # we use, and its asyncio cluster client once failed inside it on a connection
            # being closed (CI, Python 3.12)
            options["maint_notifications_config"] = _NO_MAINT_NOTIFICATIONS
        return options

    def _make_sync(self) -> SyncClient:
        options = self._options(Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))
        if self.cluster:
            return redis.cluster.RedisCluster.from_url(self.url, **options, **_CLUSTER_OPTIONS)
        # a full pool makes the caller wait (at most socket_timeout) rather than connect more
        pool = redis.BlockingConnectionPool.from_url(
            self.url, timeout=self.socket_timeout, **options
        )
        return redis.Redis.from_pool(pool)

    def _make_async(self) -> AsyncClient:
        options = self._options(
            AsyncRetry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        )
        if self.cluster:
            return redis.asyncio.cluster.RedisCluster.from_url(
                self.url, **options, **_CLUSTER_OPTIONS
            )
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            self.url, timeout=self.socket_timeout, **options
        )
        return redis.asyncio.Redis.from_pool(pool)

    def loop_state(self) -> LoopState:
        """This event loop's asyncio client and pending reads, created on first use."""
        loop = asyncio.get_running_loop()
        state = self._last_loop
        if state is not None and state.loop is loop:
            return state
        with self._lock:
            state = self._loops.get(loop)
            if state is None:
                if self._closed:
                    raise BackendError(f"the Redis store for {self.where} is closed")
                for old in [old for old in self._loops if old.is_closed()]:
                    del self._loops[old]
                if self._async_given is not None:
                    state = LoopState(loop, self._async_given, owned=False)
                else:
                    state = LoopState(loop, self._make_async(), owned=True)
                self._loops[loop] = state
            self._last_loop = state
            return state

    def pubsub(self) -> tuple[Any, Callable[[], None]]:
        """A fresh pub/sub connection for the listener, and how to close it.

        On a cluster it goes to the node of the URL: classic PUBLISH reaches every node.
        """
        given = self._sync_client
        if given is not None and not self._sync_owned and isinstance(given, redis.Redis):
            pubsub = given.pubsub()  # type: ignore[no-untyped-call]
            return pubsub, pubsub.close
        client = redis.Redis.from_url(
            self.url,
            socket_connect_timeout=self.socket_connect_timeout,
            socket_timeout=max(5.0, self.socket_timeout),
            health_check_interval=5,  # a PING now and then notices a silently dead peer
            retry=Retry(NoBackoff(), 0),
        )
        pubsub = client.pubsub()  # type: ignore[no-untyped-call]

        def cleanup() -> None:
            pubsub.close()
            client.close()

        return pubsub, cleanup

    # -- calls, errors and the breaker -----------------------------------------------------------

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one Redis call through the breaker, turning its errors into `BackendError`."""
        if not self.breaker.allow():
            raise self.fast_fail()
        try:
            result = fn(*args)
        except REDIS_ERRORS as exc:
            raise self.failed(exc) from exc
        except Exception as exc:
            if not _raised_in_redis_py(exc):
                raise  # ours: a bug to see, not an outage to hide
            raise self.failed(exc) from exc
        self.breaker.success()
        return result

    async def acall(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`call` for the asyncio client."""
        if not self.breaker.allow():
            raise self.fast_fail()
        try:
            result = await fn(*args)
        except REDIS_ERRORS as exc:
            raise self.failed(exc) from exc
        except Exception as exc:
            if not _raised_in_redis_py(exc):
                raise  # ours: a bug to see, not an outage to hide
            raise self.failed(exc) from exc
        self.breaker.success()
        return result

    async def apublish(self, channel: str, message: str) -> None:
        """`PUBLISH` from asyncio, through `acall`. On a cluster it goes to the client's
        default node (a classic `PUBLISH` reaches every node): redis-py's asyncio cluster
        client has a `publish` method only from 8.0 on."""
        client = self.loop_state().client
        if isinstance(client, redis.asyncio.cluster.RedisCluster):
            # the flag, not the node itself: redis-py looks it up after refreshing the slot
            # map, and keeps its retries (a node given explicitly gets none)
            to_default = functools.partial(client.execute_command, target_nodes=client.DEFAULT_NODE)
            await self.acall(to_default, "PUBLISH", channel, message)
        else:
            await self.acall(client.publish, channel, message)

    def failed(self, exc: BaseException) -> BackendError:
        """Count a failed call (the breaker, the log) and make its `BackendError`."""
        self.errors += 1
        if isinstance(exc, ResponseError):
            self.breaker.success()  # the server answered: it is up, the command was wrong
        elif _pool_exhausted(exc):
            pass  # our own pool was busy: Redis did not fail, the breaker stays as it is
        elif self.breaker.failure():
            self.log.warning(
                "breaker",
                "coalesce: Redis at %s failed %d times in a row (%s: %s); failing fast for "
                "%.1f s, then probing",
                self.where,
                self.breaker.failures,
                type(exc).__name__,
                exc,
                self.breaker.retry_in(),
            )
        return BackendError(f"Redis at {self.where} failed: {type(exc).__name__}: {exc}")

    def fast_fail(self) -> BackendError:
        return BackendError(
            f"Redis at {self.where} is unavailable: circuit breaker open after "
            f"{self.breaker.failures} consecutive failures; next try in "
            f"{self.breaker.retry_in():.1f} s"
        )

    # -- scripts ---------------------------------------------------------------------------------

    def _eval(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        client = self.sync()
        try:
            return client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            client.script_load(script.source)
            return client.evalsha(script.sha, len(keys), *keys, *args)

    async def _aeval(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        client = self.loop_state().client
        try:
            return await client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(script.source)
            return await client.evalsha(script.sha, len(keys), *keys, *args)

    def script(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run `script` on `keys` (all on one slot) with `args`; errors as `BackendError`."""
        return self.call(self._eval, script, keys, args)

    async def ascript(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self.acall(self._aeval, script, keys, args)

    def quietly(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> None:
        """Run a clean-up script; a failure is already counted and logged by the breaker."""
        with contextlib.suppress(BackendError):
            self.script(script, keys, args)

    async def aquietly(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> None:
        with contextlib.suppress(BackendError):
            await self.ascript(script, keys, args)

    def scripts(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Run every `(script, keys, args)` of `calls` (each on its keys' slot, at least one
        key), their replies in order. On a cluster they go out at once: one pipeline that
        writes to every node before reading any, so one round trip of waiting for all, and
        one connection per node (`_at_once`). One call is `script`.

        Errors as `script`: any failure is one `BackendError`, counted once by the breaker
        for the whole lot; the calls that did run are not undone (as with calls sent one
        by one)."""
        if len(calls) <= 1:
            return [self.script(*call) for call in calls]
        return self.call(self._evals, calls)

    async def ascripts(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """`scripts` for the asyncio client (`_aat_once`)."""
        if len(calls) <= 1:
            return [await self.ascript(*call) for call in calls]
        return await self.acall(self._aevals, calls)

    def _evals(self, calls: Sequence[ScriptCall]) -> list[Any]:
        client = self.sync()
        if not isinstance(client, redis.cluster.RedisCluster) or not _SYNC_PIPELINES:
            return [self._eval(*call) for call in calls]  # one server: one slot group
        return self._at_once(client, _evalshas(calls), lambda index: self._eval(*calls[index]))

    async def _aevals(self, calls: Sequence[ScriptCall]) -> list[Any]:
        client = self.loop_state().client
        if not isinstance(client, redis.asyncio.cluster.RedisCluster) or not _ASYNC_PIPELINES:
            return [await self._aeval(*call) for call in calls]  # one server: one slot group
        return await self._aat_once(
            client, _evalshas(calls), lambda index: self._aeval(*calls[index])
        )

    def each(self, calls: Sequence[ScriptCall]) -> None:
        """Run every `(script, keys, args)` of `calls` best effort, through the sync client
        (clean-up: a failed batch's releases). Unlike `scripts` a failed node does not stop
        the others: every node that answers runs its calls, whatever the others do.

        * A node that failed (anything but an error reply: a timeout, a lost connection, a
          full pool) gets none of its further calls: on a hung node one command's timeout
          (and redis-py's one retry of it) for the lot, never one per call.
        * On a cluster with `_SYNC_PIPELINES` the calls go out as in `scripts` (one pipeline,
          the same cost when every node answers); a call told to go elsewhere, to load its
          script or to reconnect is then sent again alone unless its node failed. Without
          pipelines (and on one server) the calls go one after another, in order.
        * A call sent alone whose script its node lacks runs as `EVAL` there, which caches
          it on that node: not `SCRIPT LOAD`, which redis-py sends to every node, the failed
          one too.

        Never raises a Redis failure: the first one (a node's rather than an error reply)
        is counted once by the breaker for the lot and logged, as `quietly` does."""
        with contextlib.suppress(BackendError):
            self.call(self._evals_each, calls)

    def _evals_each(self, calls: Sequence[ScriptCall]) -> None:
        client = self.sync()
        nodes = [""] * len(calls)  # one server: one node
        replies: list[Any] = [_UNSENT] * len(calls)
        if isinstance(client, redis.cluster.RedisCluster):
            nodes = [
                str(client.get_node_from_key(keys[0]).name)  # type: ignore[no-untyped-call]
                for _, keys, _ in calls
            ]
            if _SYNC_PIPELINES and len(calls) > 1:
                # redis-py takes every node's connection before writing to any: one node
                # refusing them fails the lot unsent, and the calls then go one by one
                with contextlib.suppress(*REDIS_ERRORS):
                    replies = self._pipeline(client, _evalshas(calls))
        failures = _Failures()
        for node, reply in zip(nodes, replies, strict=True):
            if not _to_send_alone(reply):
                failures.add(node, reply)  # the pipeline's own: every node's are known first
        for index, reply in enumerate(replies):
            if _to_send_alone(reply) and nodes[index] not in failures.nodes:
                try:
                    self._eval_here(*calls[index], loaded=not isinstance(reply, NoScriptError))
                except REDIS_ERRORS as exc:
                    failures.add(nodes[index], exc)
        failures.raise_first()

    def _eval_here(
        self, script: Script, keys: Sequence[str], args: Sequence[Any], *, loaded: bool
    ) -> Any:
        """`_eval`, loading a missing script on the keys' node only (`EVAL`); straight away
        when the node said it lacks it (not `loaded`)."""
        client = self.sync()
        if loaded:
            with contextlib.suppress(NoScriptError):
                return client.evalsha(script.sha, len(keys), *keys, *args)
        return client.eval(script.source, len(keys), *keys, *args)

    def mget(self, names: list[str]) -> list[Any]:
        """`MGET names` through the breaker, the values in the order of `names`: on a cluster
        one `MGET` per slot, all at once as in `scripts`."""
        return self.call(self._mget, names)

    async def amget(self, names: list[str]) -> list[Any]:
        """`mget` for the asyncio client."""
        return await self.acall(self._amget, names)

    def _mget(self, names: list[str]) -> list[Any]:
        client = self.sync()
        if not isinstance(client, redis.cluster.RedisCluster):
            return client.mget(names)
        groups = slot_groups(names)
        if not _SYNC_PIPELINES:
            return _in_order(names, groups, [client.mget(group) for group in groups])
        replies = self._at_once(client, _mgets(groups), lambda index: client.mget(groups[index]))
        return _in_order(names, groups, replies)

    async def _amget(self, names: list[str]) -> list[Any]:
        client = self.loop_state().client
        if not isinstance(client, redis.asyncio.cluster.RedisCluster):
            return await client.mget(names)
        groups = slot_groups(names)
        if not _ASYNC_PIPELINES:
            return _in_order(names, groups, [await client.mget(group) for group in groups])
        replies = await self._aat_once(
            client, _mgets(groups), lambda index: client.mget(groups[index])
        )
        return _in_order(names, groups, replies)

    @staticmethod
    def _at_once(
        client: redis.cluster.RedisCluster, commands: Commands, alone: Callable[[int], Any]
    ) -> list[Any]:
        """The replies to `commands` (each: a key naming its slot, the command), sent in one
        redis-py cluster pipeline: every node written before any is read.

        Redirections are not followed inside the pipeline: redis-py would send every failed
        command of a node again alone, each with its own retries (on a hung node, two socket
        timeouts per command; redis-py's `mget_nonatomic` does so). A command told to go
        elsewhere, to load its script or to reconnect is sent again alone by `alone(index)`,
        which follows redirections as a single command does; a timeout (or any other error)
        fails the lot at once (`_to_send_again`)."""
        replies = RedisConnection._pipeline(client, commands)
        for index in _to_send_again(replies):
            replies[index] = alone(index)
        return replies

    @staticmethod
    def _pipeline(client: redis.cluster.RedisCluster, commands: Commands) -> list[Any]:
        """The reply or error of each of `commands`, sent in one redis-py cluster pipeline
        (see `_at_once`), none sent again."""
        stack = [
            PipelineCommand(  # type: ignore[no-untyped-call]
                args,
                {"target_nodes": [client.get_node_from_key(key)]},  # type: ignore[no-untyped-call]
                position,
            )
            for position, (key, args) in enumerate(commands)
        ]
        replies: list[Any] = client.pipeline().send_cluster_commands(  # type: ignore[no-untyped-call]
            stack, raise_on_error=False, allow_redirections=False
        )
        return replies

    @staticmethod
    async def _aat_once(
        client: redis.asyncio.cluster.RedisCluster,
        commands: Commands,
        alone: Callable[[int], Awaitable[Any]],
    ) -> list[Any]:
        """`_at_once` for the asyncio client: each node's commands in one pipeline on one
        of its connections, the nodes' pipelines concurrently.

        Not redis-py's asyncio `ClusterPipeline.execute`: when a node's write fails it drops
        the other nodes' replies, closes the whole client and, 0.25 s later, sends every
        command again. Each node's own pipeline (`ClusterNode.execute_pipeline`, one of its
        connections) answers every command with its reply or error; a node whose write
        failed answers each of its commands with that error. So a step takes one connection
        per node, not one per slot group (about 33 per node for a page of 100 ids on 3
        nodes: two such pages at once exhausted the default pool of 50)."""
        await client.initialize()  # the slot table, on the loop's first command
        nodes: dict[str, tuple[AsyncClusterNode, list[AsyncPipelineCommand]]] = {}
        for position, (key, args) in enumerate(commands):
            node = client.get_node_from_key(key)
            if node is None:  # pragma: no cover - None only for a replica
                raise redis.exceptions.SlotNotCoveredError(f"no node serves {key!r}")
            nodes.setdefault(node.name, (node, []))[1].append(AsyncPipelineCommand(position, *args))
        written = await asyncio.gather(
            *(node.execute_pipeline(stack) for node, stack in nodes.values()),
            return_exceptions=True,
        )
        replies: list[Any] = [None] * len(commands)
        for (_, stack), failed in zip(nodes.values(), written, strict=True):
            for command in stack:
                replies[command.position] = (
                    failed if isinstance(failed, BaseException) else command.result
                )
        for index in _to_send_again(replies):
            replies[index] = await alone(index)
        return replies

    # -- shared reads ----------------------------------------------------------------------------

    def get(self, redis_key: str) -> Any:
        """`GET redis_key`, one command for all the threads asking at the same moment."""
        mine = _Read(self.epoch)
        read = self._reads.setdefault(redis_key, mine)
        if read is not mine and read.epoch != mine.epoch:
            read = self._reads[redis_key] = mine  # begun before a deletion: not to be joined
        if read is mine:
            try:
                mine.data = self.call(self._get, redis_key)
            except BaseException as exc:
                mine.error = exc
                raise
            finally:
                if self._reads.get(redis_key) is mine:
                    del self._reads[redis_key]
                mine.lock.release()
            return mine.data
        if not read.lock.acquire(timeout=self.socket_timeout * 4 + 1.0):
            return self.call(self._get, redis_key)  # bounded: read for ourselves
        read.lock.release()
        if read.error is None:
            return read.data
        if isinstance(read.error, BackendError):
            raise read.error
        return self.get(redis_key)  # the leader was interrupted: read again

    def _get(self, redis_key: str) -> Any:
        try:
            return self.sync().get(redis_key)
        except ResponseError as exc:
            return _foreign(exc)

    async def _aget(self, client: AsyncClient, redis_key: str) -> Any:
        try:
            return await client.get(redis_key)
        except ResponseError as exc:
            return _foreign(exc)

    async def aget(self, redis_key: str) -> Any:
        """`GET redis_key`, one command for all the tasks of this loop asking at once."""
        state = self.loop_state()
        while True:
            pending = state.reads.get(redis_key)
            if pending is None or pending[1] != self.epoch:  # none, or begun before a deletion
                return await self._aread(state, redis_key)
            try:
                return await asyncio.shield(pending[0])  # a cancelled follower leaves it intact
            except _Retry:
                continue  # the leader was cancelled: read again (maybe as the leader)

    async def _aread(self, state: LoopState, redis_key: str) -> Any:
        future: asyncio.Future[Any] = state.loop.create_future()
        entry = state.reads[redis_key] = (future, self.epoch)
        try:
            data = await self.acall(self._aget, state.client, redis_key)
        except BaseException as exc:
            future.set_exception(_Retry() if isinstance(exc, asyncio.CancelledError) else exc)
            future.exception()  # mark it retrieved: there may be no followers
            raise
        else:
            future.set_result(data)
        finally:
            if state.reads.get(redis_key) is entry:
                del state.reads[redis_key]
        return data

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the sync client if we created it; given clients stay open."""
        with self._lock:
            self._closed = True
            client, self._sync_client = self._sync_client, None
        if client is not None and self._sync_owned:
            with contextlib.suppress(Exception):
                client.close()

    async def aclose(self) -> None:
        """Close this loop's asyncio client if we created it."""
        loop = asyncio.get_running_loop()
        with self._lock:
            state = self._loops.pop(loop, None)
            self._last_loop = None
        if state is not None and state.owned:
            with contextlib.suppress(Exception):
                await state.client.aclose()


#: What a read returns for a key holding another type (a hash, a list...): bytes that are no
#: entry, so the store treats them as any foreign value (a miss, replaced by the next store).
WRONG_TYPE = b"\x00wrong type"


def _foreign(exc: ResponseError) -> bytes:
    """`WRONG_TYPE` for a WRONGTYPE reply; other errors stay errors."""
    if str(exc).startswith("WRONGTYPE"):
        return WRONG_TYPE
    raise exc


def _evalshas(calls: Sequence[ScriptCall]) -> Commands:
    """The `EVALSHA` of each call, named by its first key (see `_at_once`)."""
    return [
        (keys[0], ("EVALSHA", script.sha, len(keys), *keys, *args)) for script, keys, args in calls
    ]


def slot_groups(items: list[str], name_of: Callable[[str], str] | None = None) -> list[list[str]]:
    """`items` grouped by the cluster slot of their Redis name (`name_of(item)`, else the
    item itself), each group in the given order."""
    slots: dict[int, list[str]] = {}
    for item in items:
        name = item if name_of is None else name_of(item)
        slots.setdefault(key_slot(name.encode("utf-8", "surrogateescape")), []).append(item)
    return list(slots.values())


def _mgets(groups: list[list[str]]) -> Commands:
    """One `MGET` per slot group (see `_at_once`)."""
    return [(group[0], ("MGET", *group)) for group in groups]


def _in_order(names: list[str], groups: list[list[str]], replies: list[Any]) -> list[Any]:
    """The values of the `MGET`s of `groups` (`replies`), in the order of `names`."""
    found = {
        name: value
        for group, values in zip(groups, replies, strict=True)
        for name, value in zip(group, values, strict=True)
    }
    return [found[name] for name in names]


def _to_send_again(replies: list[Any]) -> list[int]:
    """The indexes of the pipelined `replies` to send again alone (`_SEND_AGAIN`), once no
    reply is another error: the first other error (a timeout, a full pool...) is raised, so
    that it fails the lot before anything is sent again."""
    again: list[int] = []
    for index, reply in enumerate(replies):
        if isinstance(reply, _SEND_AGAIN) and not _pool_exhausted(reply):
            again.append(index)
        elif isinstance(reply, BaseException):
            raise reply
    return again


#: A call `RedisConnection.each` has not sent yet (no pipeline).
_UNSENT = object()


def _to_send_alone(reply: Any) -> bool:
    """Whether `RedisConnection.each` sends the call of `reply` alone: not sent yet, or a
    pipelined reply to send again (`_SEND_AGAIN`)."""
    return reply is _UNSENT or (
        isinstance(reply, _SEND_AGAIN)
        and not isinstance(reply, ClusterDownError)  # the node's failure (see `_Failures`)
        and not _pool_exhausted(reply)
    )


class _Failures:
    """The failures of `RedisConnection.each`: the nodes that failed (not merely answered
    an error reply), and the first failure to count, a node's before an error reply."""

    __slots__ = ("first", "nodes")

    def __init__(self) -> None:
        self.nodes: set[str] = set()
        self.first: BaseException | None = None

    def add(self, node: str, reply: Any) -> None:
        """Note `reply` of a call to `node`, if it is an error."""
        if not isinstance(reply, BaseException):
            return
        # the node is up, its other calls go on; not when it says the cluster is down (a
        # failover): each call alone would cost redis-py's wait and slot-map refresh again
        answered = isinstance(reply, ResponseError) and not isinstance(reply, ClusterDownError)
        if self.first is None or (isinstance(self.first, ResponseError) and not answered):
            self.first = reply
        if not answered:
            self.nodes.add(node)

    def raise_first(self) -> None:
        if self.first is not None:
            raise self.first


def _pool_exhausted(exc: BaseException) -> bool:
    """Whether `exc` says our pool had no free connection (not a failure of Redis).

    A cluster pipeline takes a full pool for a failed node and refreshes the slot map,
    which fails in turn when every node's pool is full: an error raised from the full pool
    is the pool's too (one raised merely while handling it is Redis failing)."""
    return _full_pool(exc) or (
        isinstance(exc, RedisClusterException)  # raised `from` the full pool, not merely
        and exc.__cause__ is not None  # while handling it
        and _full_pool(exc.__cause__)
    )


def _full_pool(exc: BaseException) -> bool:
    """Whether redis-py raised `exc` for a full pool of ours (`_FULL_POOL_MESSAGES`)."""
    return isinstance(exc, MaxConnectionsError) or (
        isinstance(exc, RedisConnectionError) and str(exc) in _FULL_POOL_MESSAGES
    )


def _raised_in_redis_py(exc: BaseException) -> bool:
    """Whether `exc` (not a `RedisError`) was raised inside redis-py itself: a client glitch
    (seen: redis-py's asyncio cluster using a connection another task had just closed) is a
    store failure like any other, and must degrade the same way.

    The deepest frame that is not the standard library's (nor `_REDIS_PY_HELPERS`')
    decides: redis-py may fail inside the standard library it calls (seen: asyncio's
    `StreamWriter.writelines` on a transport another task closed, a `TypeError`), which is
    still redis-py's glitch; coalesce's own frames are our bug, to see; any other package's
    is the user's (a signal handler raising to cut a request short, a credential provider):
    those exceptions go up unchanged, never taken for an outage."""
    owner = ""
    tb = exc.__traceback__
    while tb is not None:
        package = str(tb.tb_frame.f_globals.get("__name__", "")).partition(".")[0]
        if package and package not in sys.stdlib_module_names and package not in _REDIS_PY_HELPERS:
            owner = package
        tb = tb.tb_next
    return owner == "redis"


#: Packages whose frames leave the decision to the frame that called them: redis-py's
#: helpers (`async_timeout` before Python 3.11) besides redis-py and coalesce themselves.
_REDIS_PY_HELPERS = frozenset({"async_timeout"})


def check_url(url: str) -> None:
    """Raise `ConfigurationError` unless redis-py can connect with `url` (port, database,
    query options), naming the problem but never any part of the password."""
    try:
        options = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        detail = str(exc)
        secret = credentials(url)
        if secret and any(len(part) > 1 and part in detail for part in _parts(secret)):
            detail = (
                "it cannot be parsed; characters such as / ? # @ in a user name or password "
                "must be percent-encoded (%2F %3F %23 %40)"
            )
        raise ConfigurationError(f"invalid Redis URL {redact(url)!r}: {detail}") from None
    path = "" if scheme_of(url) == "unix" else path_of(url)
    if path.strip("/") and not path.strip("/").isdigit():
        raise ConfigurationError(
            f"invalid Redis URL {redact(url)!r}: the database after the host must be a "
            f"number, like /0, not {path!r}"
        )
    if "db" in options and not 0 <= int(options["db"]) < 1 << 31:
        raise ConfigurationError(f"invalid Redis URL {redact(url)!r}: db out of range")


def _parts(secret: str) -> list[str]:
    return [secret, *secret.replace("/", ":").replace("?", ":").replace("#", ":").split(":")]


def _decodes_responses(client: Any) -> bool:
    try:
        return bool(client.get_encoder().decode_responses)
    except Exception:
        return False
