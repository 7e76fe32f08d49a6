"""The Redis store on a real 3-master Redis Cluster: cached, fill, tags and invalidation, and
batches (`cached_many`, sync and asyncio) whose slot groups go out at once, one connection
per node.

A node is made slow or failing with `CLIENT PAUSE ... WRITE` (its scripts wait until
`CLIENT UNPAUSE`; reads and the cluster bus go on), the other nodes are looked at directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
import redis.asyncio.connection
import redis.connection
from redis.cluster import RedisCluster as ClusterClient
from redis.crc import key_slot
from redis.exceptions import MaxConnectionsError, RedisClusterException
from redis_servers import RedisCluster, cluster_info, take_connection
from test_batch import BOUND, run_thread, wait_until
from test_redis_degraded import _frozen

from coalesce import BackendError
from coalesce.cache import Cache
from coalesce.entry import Entry
from coalesce.stores.base import Fence
from coalesce.stores.redis import RedisStore, connection
from coalesce.stores.redis.lease import Keys
from coalesce.stores.redis.scripts import CLAIM_MANY, RELEASE, STORE_MANY, TAG, Script


@pytest.fixture
def cluster_client(redis_cluster: RedisCluster) -> Iterator[ClusterClient]:
    client = ClusterClient.from_url(redis_cluster.url)
    yield client
    client.close()


def test_cluster_cached_fill_tags_and_invalidate(
    redis_cluster: RedisCluster, cluster_client: ClusterClient, unique_namespace: str
) -> None:
    a = Cache(redis_cluster.url, namespace=unique_namespace, cluster=True)
    b = Cache(redis_cluster.url, namespace=unique_namespace, cluster=True)
    assert isinstance(a.store, RedisStore) and a.store.cluster
    calls: list[tuple[str, int]] = []

    def make(cache: Cache, name: str, delay: float) -> object:
        @cache.cached(ttl=30, key="user:{uid}", tags=["team:{team}", "all"])
        def user(uid: int, team: int) -> dict[str, int]:
            calls.append((name, uid))
            started_event.set()
            time.sleep(delay)
            return {"uid": uid, "team": team}

        return user

    user_a = make(a, "a", 0.3)
    user_b = make(b, "b", 0.0)
    # fill across two caches: b waits for a's computation through the lease and a push
    started_event = threading.Event()
    t = threading.Thread(target=lambda: user_a(1, 7))  # type: ignore[operator]
    t.start()
    assert started_event.wait(10)
    assert user_b(1, 7) == {"uid": 1, "team": 7}  # type: ignore[operator]
    t.join(5)
    assert calls == [("a", 1)]
    # many keys over several slots (and nodes)
    for uid in range(2, 20):
        user_b(uid, uid % 2)  # type: ignore[operator]
    slots = {key_slot(f"{unique_namespace}:{{user:{uid}}}".encode()) for uid in range(1, 20)}
    assert len(slots) > 3
    lease_slot = key_slot(f"{unique_namespace}:{{user:1}}:lease".encode())
    assert lease_slot == key_slot(f"{unique_namespace}:{{user:1}}".encode())
    listed = a.keys("user:*")
    assert sorted(listed, key=lambda k: int(k.split(":")[1])) == [
        f"user:{uid}" for uid in range(1, 20)
    ]
    assert listed.complete  # every master was scanned
    assert not a.keys("user:*", limit=5).complete
    before = len(calls)
    assert user_a(5, 1) == {"uid": 5, "team": 1}  # type: ignore[operator]
    assert len(calls) == before  # a hit
    assert a.invalidate("user:5") is True
    assert user_a(5, 1) == {"uid": 5, "team": 1}  # type: ignore[operator]
    assert len(calls) == before + 1
    assert b.invalidate_tag("team:0") == 9  # uids 2, 4, ..., 18: many slots
    assert b.invalidate_tag("all") == 10
    assert a.keys() == []
    stray = [
        k
        for k in cluster_client.scan_iter(match=f"*{unique_namespace}*")
        if not k.startswith(f"{unique_namespace}:".encode())
    ]
    assert stray == []
    a.close()
    b.close()


async def test_cluster_async(redis_cluster: RedisCluster, unique_namespace: str) -> None:
    cache = Cache(redis_cluster.url, namespace=unique_namespace, cluster=True)
    calls: list[int] = []

    @cache.cached(ttl=30, key="item:{i}", tags=["items"])
    async def item(i: int) -> list[int]:
        calls.append(i)
        await asyncio.sleep(0.05)
        return [i]

    results = await asyncio.gather(*[item(i % 5) for i in range(50)])
    assert results == [[i % 5] for i in range(50)]
    assert sorted(calls) == [0, 1, 2, 3, 4]
    assert await item(3) == [3] and len(calls) == 5
    assert await cache.ainvalidate("item:3") is True
    assert await cache.ainvalidate_tag("items") == 4
    assert await item(3) == [3] and len(calls) == 6
    await cache.aclose()


def test_cluster_client_is_detected(redis_cluster: RedisCluster, unique_namespace: str) -> None:
    client = ClusterClient.from_url(redis_cluster.url)
    cache = Cache(redis_cluster.url, namespace=unique_namespace, client=client)
    assert isinstance(cache.store, RedisStore) and cache.store.cluster

    @cache.cached(ttl=30, key="k", tags=["t"])
    def k() -> int:
        return 1

    assert k() == 1 and k() == 1
    assert cache.invalidate_tag("t") == 1
    cache.close()
    client.close()


def test_cluster_near_cache_invalidation(
    redis_cluster: RedisCluster, unique_namespace: str
) -> None:
    near = Cache(redis_cluster.url, namespace=unique_namespace, cluster=True, local_maxsize=10)
    other = Cache(redis_cluster.url, namespace=unique_namespace, cluster=True)
    store = near.store
    assert isinstance(store, RedisStore)
    version = [1]

    @near.cached(ttl=30, key="cfg:{n}", tags=["cfg"])
    def cfg(n: int) -> int:
        return version[0]

    assert cfg(1) == 1
    deadline = time.monotonic() + 5
    while not store.stats()["listener"]["subscribed"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert cfg(1) == 1 and cfg(1) == 1
    assert store.stats()["local_hits"] >= 1
    version[0] = 2
    other.invalidate("cfg:1")  # published on another node than the listener's, maybe
    deadline = time.monotonic() + 1
    while len(store._near or ()) != 0:
        assert time.monotonic() < deadline, "the near cache was not invalidated"
        time.sleep(0.001)
    assert cfg(1) == 2
    near.close()
    other.close()


def test_cluster_tag_invalidation_fences_a_computation_in_flight(
    redis_cluster: RedisCluster, cluster_client: ClusterClient, unique_namespace: str
) -> None:
    """On a cluster the leader records its key in the tag sets right after `CLAIM` (other
    slots): from then on a `delete_tag` deletes its lease and the result is refused."""
    a = Cache(redis_cluster.url, namespace=unique_namespace, cluster=True)
    b = Cache(redis_cluster.url, namespace=unique_namespace, cluster=True)
    sa, sb = a.store, b.store
    assert isinstance(sa, RedisStore) and isinstance(sb, RedisStore)
    tag = a.prefix + "team:7"
    keys = [a.prefix + f"member:{i}" for i in range(6)]  # several slots, other than the tag's
    assert len({key_slot(sa._layout.entry(k).encode()) for k in keys}) > 1
    started = threading.Barrier(len(keys) + 1)
    release = threading.Event()
    calls: list[str] = []

    def compute(key: str) -> Entry:
        calls.append(key)
        started.wait(10)
        assert release.wait(30)
        return Entry("stale", time.time(), 30.0, 0.0, 0.0, (tag,))

    threads = [
        threading.Thread(
            target=lambda key=key: sa.fill(key, lambda: compute(key), fence=Fence(), tags=(tag,))
        )
        for key in keys
    ]
    for t in threads:
        t.start()
    try:
        started.wait(10)
        members = cluster_client.zrange(sa._layout.tag(tag), 0, -1)
        assert sorted(members) == sorted(k.encode() for k in keys)
        assert sb.delete_tag(tag) == 0
    finally:
        release.set()
        for t in threads:
            t.join(10)
    assert sa.counts["fenced"] == len(keys)
    assert all(sb.get(k) is None for k in keys)
    fresh = sb.fill(
        keys[0],
        lambda: Entry("fresh", time.time(), 30.0, 0.0, 0.0, (tag,)),
        fence=Fence(),
        tags=(tag,),
    )
    assert fresh.value == "fresh"
    assert sb.delete_tag(tag) == 1
    a.close()
    b.close()


# ---------------------------------------------------------------------------------------
# sync batches: every slot group at once


#: The name of the test's own connections to the nodes (not counted by `writes`).
_OWN = "test-nodes"


class Nodes:
    """The cluster's nodes as a cache sees them: which one holds an id of `user:{}`, what it
    holds; holding back one node's writes (`CLIENT PAUSE WRITE`) until `resume`."""

    def __init__(self, cluster: RedisCluster, cache: Cache) -> None:
        self.cache = cache
        self.store = store = cache.store
        assert isinstance(store, RedisStore)
        self.client: ClusterClient = store._conn.sync()  # type: ignore[assignment]
        self.processes = {node.port: node for node in cluster.nodes}
        self.servers = {node.port: node.client(client_name=_OWN) for node in cluster.nodes}
        self.pausing = True  # `pause` holds back a node (until `resume`)

    def keys(self, uid: int) -> Keys:
        return Keys(self.store._layout, f"{self.cache.prefix}user:{uid}")

    def port(self, uid: int) -> int:
        """The port of the node holding the keys of `uid` (its slot), as the cache knows it."""
        return int(self.client.get_node_from_key(self.keys(uid).entry).port)

    def spread(self, uids: Iterable[int], per_node: int = 2) -> list[int]:
        """`per_node` ids of each node, those of the first id's node first."""
        by_port: dict[int, list[int]] = {}
        for uid in uids:
            by_port.setdefault(self.port(uid), []).append(uid)
        assert len(by_port) == len(self.servers)
        return [uid for group in by_port.values() for uid in group[:per_node]]

    def holds(self, uid: int, what: str, port: int | None = None) -> bool:
        """Whether the node of `uid` (or on `port`) holds its `what` ("entry", "lease")."""
        node = self.servers[self.port(uid) if port is None else port]
        return bool(node.exists(getattr(self.keys(uid), what)))

    def pause(self, port: int) -> None:
        if self.pausing:
            self.servers[port].execute_command("CLIENT", "PAUSE", int(BOUND * 3000), "WRITE")

    def unpause(self, port: int) -> None:
        self.servers[port].execute_command("CLIENT", "UNPAUSE")

    def resume(self) -> None:
        """Every node unpaused, and no more pauses."""
        self.pausing = False
        for port in self.servers:
            self.unpause(port)

    def close(self) -> None:
        self.resume()
        for client in self.servers.values():
            client.close()


@pytest.fixture
def nodes_of(redis_cluster: RedisCluster, unique_namespace: str) -> Iterator[Callable[..., Nodes]]:
    """`nodes_of(**options)`: `Nodes` of a cluster cache of its own (`Cache(**options)`, its
    scripts loaded on every node), closed afterwards."""
    made: list[Nodes] = []

    def make(**options: Any) -> Nodes:
        cache = Cache(redis_cluster.url, namespace=unique_namespace, cluster=True, **options)
        made.append(Nodes(redis_cluster, cache))
        warm = cache.cached_many(key="warm:{}", ttl=60, tags=["warm"])(_values)
        warm([0])  # the scripts, TAG too: a cluster's SCRIPT LOAD goes to every node
        return made[-1]

    yield make
    for nodes in made:
        nodes.close()
        nodes.cache.close()


def _values(uids: Iterable[int]) -> dict[int, str]:
    return {uid: f"v{uid}" for uid in uids}


class Batch:
    """`cache.cached_many(key="user:{}", ttl=60)` over `source`, sync or on asyncio (an
    event loop of its own, kept between calls as a server's is): `batch(ids)` either way."""

    def __init__(
        self, cache: Cache, source: Callable[[list[int]], dict[int, str]], driver: str
    ) -> None:
        async def asource(ids: list[int]) -> dict[int, str]:
            return source(ids)

        self.cache = cache
        self.driver = driver
        self.users = cache.cached_many(key="user:{}", ttl=60)(
            asource if driver == "async" else source
        )
        self.loop = asyncio.new_event_loop()

    def __call__(self, ids: list[int]) -> Any:
        if self.driver == "async":
            return self.loop.run_until_complete(self.users(ids))
        return self.users(ids)

    def close(self) -> None:
        self.loop.run_until_complete(self.cache.aclose())  # this loop's client
        self.loop.close()


@pytest.fixture
def batches() -> Iterator[Callable[..., Batch]]:
    """`batches(cache, source, driver)`: a `Batch`, closed afterwards."""
    made: list[Batch] = []

    def make(cache: Cache, source: Callable[[list[int]], dict[int, str]], driver: str) -> Batch:
        made.append(Batch(cache, source, driver))
        return made[-1]

    yield make
    for batch in made:
        batch.close()


def _pipelined(driver: str = "sync") -> bool:
    """Whether the installed redis-py gets a step's commands on several nodes in one pipeline
    (`connection._SYNC_PIPELINES`, `_ASYNC_PIPELINES`): else one slot group after another,
    each a command of its own, and a failing one fails the step (the rest is not sent)."""
    return connection._ASYNC_PIPELINES if driver == "async" else connection._SYNC_PIPELINES


class Writes(Counter[int]):
    """`writes`: the count by port, and `sent`: what each write carried, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[int, bytes]] = []

    def clear(self) -> None:
        super().clear()
        self.sent.clear()

    def of(self, port: int, command: Script | str) -> list[bytes]:
        """The writes to `port` carrying `command` (a script's `EVALSHA`, or a command name)."""
        name = command.sha if isinstance(command, Script) else command
        return [data for to, data in self.sent if to == port and f"\r\n{name}\r\n".encode() in data]


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Writes:
    """Writes by the caches' redis-py connections in this process, by the port written to:
    a command, a pipeline's commands to one node, each step of a new connection's handshake
    (not the listener's PING and SUBSCRIBE, nor `Nodes`'s own). Counted, not changed."""
    counts = Writes()
    send = redis.connection.AbstractConnection.send_packed_command
    asend = redis.asyncio.connection.AbstractConnection.send_packed_command

    def count(connection: Any, command: Any) -> None:
        data = command.encode() if isinstance(command, str) else command
        data = data if isinstance(data, bytes) else b"".join(data)
        if connection.client_name != _OWN and b"PING" not in data and b"SUBSCRIBE" not in data:
            counts[connection.port] += 1
            counts.sent.append((connection.port, data))

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        count(self, command)
        send(self, command, check_health)

    async def acounting(self: Any, command: Any, check_health: bool = True) -> None:
        count(self, command)
        await asend(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    monkeypatch.setattr(
        redis.asyncio.connection.AbstractConnection, "send_packed_command", acounting
    )
    return counts


def test_a_sync_batch_claims_and_stores_every_slot_group_at_once(
    nodes_of: Callable[..., Nodes], writes: Writes
) -> None:
    """While the node of the first slot group holds back its scripts, the other nodes get
    theirs: the claims, then the stores. (Sent one group after another, the held-back first
    group kept the others from being sent at all: so it is with an older redis-py.)"""
    nodes = nodes_of(socket_timeout=BOUND)  # a held-back script is waited for, not failed
    uids = nodes.spread(range(1, 60))
    slow = nodes.port(uids[0])
    others = [uid for uid in uids if nodes.port(uid) != slow]

    def source(batch: list[int]) -> dict[int, str]:
        nodes.pause(slow)  # again for the stores
        return _values(batch)

    users = nodes.cache.cached_many(key="user:{}", ttl=60)(source)
    nodes.pause(slow)
    writes.clear()
    thread, out = run_thread(lambda: users(uids))
    try:
        for script, what in ((CLAIM_MANY, "lease"), (STORE_MANY, "entry")):
            if _pipelined():
                wait_until(lambda what=what: all(nodes.holds(uid, what) for uid in others))
            else:  # the first group's script held back, the others' are not sent
                wait_until(lambda script=script: bool(writes.of(slow, script)))
                assert not any(writes.of(port, script) for port in writes if port != slow)
                assert not any(nodes.holds(uid, what) for uid in others)
            nodes.unpause(slow)
    finally:
        nodes.resume()  # (failing: no pause left behind for the next test)
        thread.join(BOUND)
        nodes.resume()
    assert out == [_values(uids)]
    assert all(nodes.holds(uid, "entry") for uid in uids)


def test_a_sync_batch_records_its_ids_in_every_tag_set_at_once(
    nodes_of: Callable[..., Nodes], writes: Writes
) -> None:
    """Right after the claims the leader records its ids in their tag sets (on a cluster,
    other slots than the ids'): while the node of one tag set holds back its writes, another
    node's tag set gets every id. (Sent one after another, the first write held back all:
    so it is with an older redis-py.)"""
    nodes = nodes_of(socket_timeout=BOUND)
    tag_sets = {
        name: nodes.store._layout.tag(nodes.cache.prefix + name)
        for name in ("a", "b", "c", "d", "e", "f")
    }

    def port(name: str) -> int:
        return int(nodes.client.get_node_from_key(tag_sets[name]).port)

    first = "a"
    other = next(name for name in tag_sets if port(name) != port(first))
    slow = port(first)
    uids = [uid for uid in nodes.spread(range(1, 60)) if nodes.port(uid) != slow]
    users = nodes.cache.cached_many(key="user:{}", ttl=60, tags=[first, other])(_values)
    nodes.pause(slow)
    writes.clear()
    thread, out = run_thread(lambda: users(uids))
    try:
        if _pipelined():
            wait_until(lambda: nodes.servers[port(other)].zcard(tag_sets[other]) == len(uids))
        else:  # the first id's write to the first tag set held back, nothing after it sent
            wait_until(lambda: bool(writes.of(slow, TAG)))
            assert not writes.of(port(other), TAG)
            assert nodes.servers[port(other)].zcard(tag_sets[other]) == 0
    finally:
        nodes.resume()  # (failing: no pause left behind for the next test)
        thread.join(BOUND)
    assert out == [_values(uids)]
    assert [nodes.servers[port(name)].zcard(tag_sets[name]) for name in (first, other)] == [
        len(uids),
        len(uids),
    ]


@pytest.mark.parametrize("driver", ["sync", "async"])
@pytest.mark.parametrize("step", ["read", "claim"])
def test_a_hung_node_gets_each_step_once(
    nodes_of: Callable[..., Nodes],
    batches: Callable[..., Batch],
    writes: Writes,
    step: str,
    driver: str,
) -> None:
    """A node that does not answer (stopped: at the read; its writes paused: at the claim)
    gets the commands of a step once, in one write, and the batch fails after one socket
    timeout: its slot groups are not sent again one by one on new connections (redis-py's
    own pipeline would, two socket timeouts each; its asyncio `mget_nonatomic` wrote to the
    node 5 times here). Sync and asyncio alike. With an older redis-py each slot group is a
    write of its own, and the step stops at the hung node's first group (sent again once at
    most, by redis-py's retry of a single command): no later group is sent. That costs two
    socket timeouts: a longer timeout there keeps the bound of three clear of this machine's
    noise (the bug it guards against, redis-py < 6 retrying 3 times, costs four)."""
    timeout = 0.2 if _pipelined(driver) else 0.5
    nodes = nodes_of(socket_timeout=timeout, on_backend_error="raise")
    uids = nodes.spread(range(1, 90), per_node=4)
    slow = nodes.port(uids[0])
    users = batches(nodes.cache, _values, driver)
    # an idle connection to every node (and for the read, the ids cached: only MGETs then)
    users(uids if step == "read" else nodes.spread(range(1000, 1100), per_node=1))
    if step == "claim":
        nodes.pause(slow)
    hung = _frozen(nodes.processes[slow]) if step == "read" else contextlib.nullcontext()
    writes.clear()
    started = time.monotonic()
    with hung, pytest.raises(BackendError):
        users(uids)
    assert time.monotonic() - started < 3 * timeout
    if _pipelined(driver):
        assert writes[slow] == (
            1 if step == "read" else 2
        )  # the MGETs (then the claims): one write
        return
    command = "MGET" if step == "read" else CLAIM_MANY
    sent = {(port, data) for port in writes for data in writes.of(port, command)}
    assert len(sent) == 1 and next(iter(sent))[0] == slow  # one group's: the first
    if step == "claim":  # every group read before: one write each
        groups = connection.slot_groups([nodes.keys(uid).entry for uid in uids])
        assert sum(len(writes.of(port, "MGET")) for port in writes) == len(groups)


def test_overlapping_sync_batches_of_two_caches_compute_each_id_once(
    nodes_of: Callable[..., Nodes],
) -> None:
    """Six threads of two caches (like two processes), overlapping pages over every node:
    each id computed once; the tags recorded for every id (the stores' tag writes, sent at
    once after the stores)."""
    a, b = nodes_of().cache, nodes_of().cache
    computed: Counter[int] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(6)

    def source(batch: list[int]) -> dict[int, str]:
        with lock:
            computed.update(batch)
        return _values(batch)

    pages = [list(range(n * 5, n * 5 + 20)) for n in range(6)]
    funcs = [cache.cached_many(key="user:{}", ttl=60, tags=["users"])(source) for cache in (a, b)]

    def page(n: int) -> dict[int, str]:
        start.wait(BOUND)
        return funcs[n % 2](pages[n])

    runs = [run_thread(lambda n=n: page(n)) for n in range(6)]
    for thread, _ in runs:
        thread.join(BOUND)
    assert [out for _, out in runs] == [[_values(ids)] for ids in pages]
    assert sorted(computed) == list(range(45)) and set(computed.values()) == {1}
    assert b.invalidate_tag("users") == 45
    assert funcs[0]([3, 44]) == _values([3, 44]) and computed[3] == 2


@pytest.mark.parametrize("step", ["claim", "store"])
@pytest.mark.parametrize("driver", ["sync", "async"])
def test_a_node_failing_mid_batch_degrades_to_computing(
    nodes_of: Callable[..., Nodes], step: str, driver: str
) -> None:
    """One node stops answering at the claims or at the stores: the batch's own computation
    serves every id (each computed once), the failure is counted, and after a failed store
    the other nodes hold the stored entries (with an older redis-py, none: the first group's
    failure ended the step) and no lease (released). Sync and asyncio alike."""
    nodes = nodes_of(socket_timeout=0.3)
    uids = nodes.spread(range(1, 60))
    slow = nodes.port(uids[0])
    calls: list[list[int]] = []

    def source(batch: list[int]) -> dict[int, str]:
        calls.append(batch)
        if step == "store":
            nodes.pause(slow)
        return _values(batch)

    async def asource(batch: list[int]) -> dict[int, str]:
        return source(batch)

    users = nodes.cache.cached_many(key="user:{}", ttl=60)(source)
    ausers = nodes.cache.cached_many(key="user:{}", ttl=60)(asource)
    if step == "claim":
        nodes.pause(slow)
    got = users(uids) if driver == "sync" else asyncio.run(ausers(uids))
    assert got == _values(uids) and calls == [uids]
    assert (users if driver == "sync" else ausers).stats()["backend_errors"] == 1
    if step == "store":
        others = [uid for uid in uids if nodes.port(uid) != slow]
        if _pipelined(driver):
            assert all(nodes.holds(uid, "entry") for uid in others)
        else:  # one group after another: the first (the slow node's) failed the step
            assert not any(nodes.holds(uid, "entry") for uid in uids)
        assert not any(nodes.holds(uid, "lease") for uid in others)


def test_a_node_failing_mid_batch_raises_when_failing_closed(
    nodes_of: Callable[..., Nodes],
) -> None:
    nodes = nodes_of(socket_timeout=0.3, on_backend_error="raise")
    uids = nodes.spread(range(1, 60))
    users = nodes.cache.cached_many(key="user:{}", ttl=60)(_values)
    nodes.pause(nodes.port(uids[-1]))  # the last group's node: the others claimed
    with pytest.raises(BackendError):
        users(uids)


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_a_node_that_forgot_the_scripts_loads_them_again(
    nodes_of: Callable[..., Nodes], batches: Callable[..., Batch], driver: str
) -> None:
    """A node without the scripts (restarted, flushed) answers NOSCRIPT inside the pipeline:
    that group is sent again alone, which loads the scripts, and the batch goes on."""
    nodes = nodes_of()
    uids = nodes.spread(range(1, 60))
    nodes.servers[nodes.port(uids[-1])].script_flush()
    users = batches(nodes.cache, _values, driver)
    assert users(uids) == _values(uids)
    assert users.users.stats()["backend_errors"] == 0
    assert all(nodes.holds(uid, "entry") for uid in uids)


class Slot:
    """The slot of one id, moved between nodes by hand (as a resharding does) behind the
    cache's back: its client keeps sending the slot's scripts to the old node, which answers
    MOVED. (While a slot migrates, scripts of several keys get TRYAGAIN from Redis until it
    is done: a store failure, here as for single keys.)"""

    def __init__(self, nodes: Nodes, uid: int) -> None:
        self.nodes = nodes
        self.slot = key_slot(nodes.keys(uid).entry.encode())
        self.home = nodes.port(uid)
        self.away = next(port for port in nodes.servers if port != self.home)

    def move(self, source: int, target: int) -> None:
        """The slot and its keys moved from the node on port `source` to `target`."""
        src, dst = self.nodes.servers[source], self.nodes.servers[target]
        src_id, dst_id = (node.execute_command("CLUSTER", "MYID") for node in (src, dst))
        dst.execute_command("CLUSTER", "SETSLOT", self.slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", self.slot, "MIGRATING", dst_id)
        keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, 1000)
        if keys:
            src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        for node in (dst, src, *(n for n in self.nodes.servers.values() if n not in (src, dst))):
            node.execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", dst_id)


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_a_slot_group_told_moved_is_sent_again_alone(
    nodes_of: Callable[..., Nodes], batches: Callable[..., Batch], driver: str
) -> None:
    """A slot moved (with its lease) during the computation: that group's `STORE_MANY` comes
    back MOVED from the pipeline and is sent again alone, where redis-py follows it."""
    nodes = nodes_of()
    uid = 10**6 + 7  # a slot (hash tag {user:1000007}) that no other test writes to
    uids = [uid, *nodes.spread(range(1, 60))]
    slot = Slot(nodes, uid)
    calls: list[list[int]] = []

    def fetch(batch: list[int]) -> dict[int, str]:
        calls.append(batch)
        slot.move(slot.home, slot.away)
        return _values(batch)

    users = batches(nodes.cache, fetch, driver)
    try:
        assert users(uids) == _values(uids) and calls == [uids]
        assert nodes.holds(uid, "entry", port=slot.away)
        assert not nodes.holds(uid, "lease", port=slot.away)
        assert users.users.stats()["backend_errors"] == 0
    finally:
        slot.move(slot.away, slot.home)


# ---------------------------------------------------------------------------------------
# async batches: one connection per node and step


def test_concurrent_async_pages_of_two_caches_compute_each_id_once(
    nodes_of: Callable[..., Nodes],
) -> None:
    """Two caches (like two processes), each with two concurrent async pages of 100 ids on
    its default pool (50 connections per node): each id computed once, no backend error.
    (Sent one slot group per connection, each page took about 33 connections per node at
    once: `MaxConnectionsError`, and the pages computed without Redis.)"""
    a, b = nodes_of().cache, nodes_of().cache
    computed: Counter[int] = Counter()

    async def source(batch: list[int]) -> dict[int, str]:
        computed.update(batch)
        await asyncio.sleep(0.05)  # the other cache's claims meet these leases
        return _values(batch)

    funcs = [cache.cached_many(key="user:{}", ttl=60)(source) for cache in (a, b)]
    pages = [(0, range(0, 100)), (0, range(100, 200)), (1, range(50, 150)), (1, range(150, 250))]

    async def main() -> list[dict[int, str]]:
        return await asyncio.gather(*(funcs[n](list(ids)) for n, ids in pages))

    assert asyncio.run(main()) == [_values(ids) for _, ids in pages]
    assert sorted(computed) == list(range(250)) and set(computed.values()) == {1}
    assert [func.stats()["backend_errors"] for func in funcs] == [0, 0]


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_with_an_older_redis_py_a_step_s_commands_go_one_by_one(
    nodes_of: Callable[..., Nodes],
    batches: Callable[..., Batch],
    monkeypatch: pytest.MonkeyPatch,
    driver: str,
) -> None:
    """Before redis-py 7.3 (sync) and 8.0.1 (asyncio), an interrupted cluster pipeline could
    put connections with unread replies back in the pool (the next command on one would
    read another's reply): there a step's commands go one after another, never through a
    pipeline, and batches work the same."""
    monkeypatch.setattr(connection, "_SYNC_PIPELINES", False)
    monkeypatch.setattr(connection, "_ASYNC_PIPELINES", False)

    def no_pipeline(*args: Any) -> Any:
        raise AssertionError("a pipeline was used")

    monkeypatch.setattr(connection.RedisConnection, "_at_once", staticmethod(no_pipeline))
    monkeypatch.setattr(connection.RedisConnection, "_aat_once", staticmethod(no_pipeline))
    nodes = nodes_of()
    computed: Counter[int] = Counter()

    def source(ids: list[int]) -> dict[int, str]:
        computed.update(ids)
        return _values(ids)

    batch = batches(nodes.cache, source, driver)
    ids = nodes.spread(range(60), per_node=3)
    assert batch(ids) == _values(ids)
    assert batch(ids) == _values(ids)  # read back: one MGET per slot, one after another
    assert set(computed) == set(ids) and set(computed.values()) == {1}
    assert all(nodes.holds(uid, "entry") for uid in ids)
    assert batch.users.stats()["backend_errors"] == 0


def test_a_full_pool_in_a_pipelined_step_does_not_count_against_the_breaker(
    redis_cluster: RedisCluster, unique_namespace: str
) -> None:
    """Our own pool being full is not Redis failing (as for a single command): a pipeline
    that takes a full pool for a failed node and then cannot refresh the slot map (every
    pool full) fails the step without a breaker failure."""
    cache = Cache(redis_cluster.url, namespace=unique_namespace, cluster=True, max_connections=2)
    try:
        store = cache.store
        assert isinstance(store, RedisStore)
        conn = store._conn
        client: ClusterClient = conn.sync()  # type: ignore[assignment]
        names: dict[str, str] = {}
        for i in range(5000):
            names.setdefault(client.get_node_from_key(f"k{i}").name, f"k{i}")
        keys = list(names.values())
        assert len(keys) == 3
        assert conn.mget(keys) == [None, None, None]  # every node's pool made
        pools = [client.get_redis_connection(node).connection_pool for node in client.get_nodes()]
        held = [(pool, take_connection(pool)) for pool in pools for _ in range(2)]
        try:
            failures = conn.breaker.failures
            for step in (lambda: conn.mget(keys), lambda: conn.scripts([_echo(k) for k in keys])):
                with pytest.raises(BackendError):
                    step()
                assert conn.breaker.failures == failures
        finally:
            for pool, held_connection in held:
                pool.release(held_connection)
        assert conn.mget(keys) == [None, None, None]
    finally:
        cache.close()


_ECHO = Script.of("echo", "return ARGV[1]")


def _echo(key: str) -> tuple[Script, list[str], list[str]]:
    return (_ECHO, [key], [key])


def test_a_failed_store_releases_its_leases_at_once(
    nodes_of: Callable[..., Nodes], writes: Writes
) -> None:
    """A node hangs at the stores of a batch with many ids on it: the leases are handed over
    in one step (one timeout), not one release per lease (two timeouts each: about 12 s for
    these 20 ids at a 0.3 s timeout). With an older redis-py each slot group is a write of
    its own (the reads, the claims), the stores stop at their first command to the hung
    node, and the releases go on past it to the other nodes, the hung node's first one
    sent (again once at most, by redis-py's retry), none of its later ones."""
    nodes = nodes_of(socket_timeout=0.3)
    spread = nodes.spread(range(1, 200), per_node=20)
    uids = [
        uid for trio in zip(spread[:20], spread[20:40], spread[40:], strict=True) for uid in trio
    ]
    slow = nodes.port(uids[0])  # its leases alternate with the others' (no breaker opens)

    def source(batch: list[int]) -> dict[int, str]:
        nodes.pause(slow)
        return _values(batch)

    users = nodes.cache.cached_many(key="user:{}", ttl=60)(source)
    writes.clear()
    started = time.monotonic()
    assert users(uids) == _values(uids)
    assert time.monotonic() - started < 10 * 0.3
    if _pipelined():
        assert writes[slow] <= 12  # claims, stores, releases, reconnections: not one per lease
    else:
        groups = len({key_slot(nodes.keys(uid).entry.encode()) for uid in spread[:20]})
        assert [len(writes.of(slow, command)) for command in ("MGET", CLAIM_MANY)] == [groups] * 2
        assert [len(set(writes.of(slow, script))) for script in (STORE_MANY, RELEASE)] == [1, 1]
    assert users.stats()["backend_errors"] == 1
    assert not any(nodes.holds(uid, "lease") for uid in uids if nodes.port(uid) != slow)


def test_a_cancelled_async_batch_releases_its_leases_on_every_node_that_answers(
    nodes_of: Callable[..., Nodes], writes: Writes
) -> None:
    """An asyncio batch cancelled while it computes, one node hung: its leases on the other
    nodes are released at once (their waiters elsewhere go on), even where the release
    script was never loaded (sent again alone there as EVAL; not SCRIPT LOAD, which goes to
    every node, the hung one too), and the hung node costs one timeout for the lot, not one
    per lease. With pipelines or without."""
    nodes = nodes_of(socket_timeout=0.3)
    uids = nodes.spread(range(1, 200), per_node=6)
    slow = nodes.port(uids[0])
    others = [uid for uid in uids if nodes.port(uid) != slow]
    for port, server in nodes.servers.items():
        if port != slow:
            server.script_flush()  # RELEASE too: NOSCRIPT there

    async def main() -> None:
        computing = asyncio.Event()

        async def source(batch: list[int]) -> dict[int, str]:
            nodes.pause(slow)
            computing.set()
            await asyncio.sleep(BOUND * 10)
            return _values(batch)

        users = nodes.cache.cached_many(key="user:{}", ttl=60)(source)
        task = asyncio.ensure_future(users(uids))
        await asyncio.wait_for(computing.wait(), BOUND)
        assert all(nodes.holds(uid, "lease") for uid in others)
        writes.clear()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    started = time.monotonic()
    asyncio.run(main())  # and the release's thread (the loop's default executor)
    assert time.monotonic() - started < 10 * 0.3
    assert not any(nodes.holds(uid, "lease") for uid in others)
    assert 1 <= len(writes.of(slow, RELEASE)) <= 2  # one, or one and redis-py's retry


@contextlib.contextmanager
def _refusing_new_clients(nodes: Nodes, port: int) -> Iterator[None]:
    """The node on `port` refuses new connections inside the block ("max number of clients
    reached"), the cache's open ones closed; its own (`Nodes`) and the listener's kept."""
    server = nodes.servers[port]
    maxclients = server.config_get("maxclients")["maxclients"]
    server.config_set("maxclients", 1)
    try:
        server.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        yield
    finally:
        server.config_set("maxclients", maxclients)


def test_a_node_refusing_connections_does_not_keep_the_others_from_releasing(
    nodes_of: Callable[..., Nodes],
) -> None:
    """A node stops taking connections while a batch computes: its stores fail, and so do
    its releases, but every other node releases the batch's leases before the call returns
    (their waiters elsewhere go on at once, not after `lease_ttl`). (redis-py 8.1's pipeline
    takes every node's connection before writing to any: the refused one failed the whole
    release unsent.)"""
    nodes = nodes_of(socket_timeout=BOUND)
    uids = nodes.spread(range(1, 200), per_node=6)
    slow = nodes.port(uids[0])
    others = [uid for uid in uids if nodes.port(uid) != slow]
    refusing = contextlib.ExitStack()

    def source(batch: list[int]) -> dict[int, str]:
        assert all(nodes.holds(uid, "lease") for uid in others)
        refusing.enter_context(_refusing_new_clients(nodes, slow))
        return _values(batch)

    users = nodes.cache.cached_many(key="user:{}", ttl=60)(source)
    with refusing:
        started = time.monotonic()
        assert users(uids) == _values(uids)
        elapsed = time.monotonic() - started
        assert not any(nodes.holds(uid, "lease") for uid in others)
        assert nodes.holds(uids[0], "lease")  # refused: kept until it expires
    assert elapsed < BOUND / 2
    assert users.stats()["backend_errors"] == 1


def test_a_node_answering_clusterdown_gets_its_releases_once(
    nodes_of: Callable[..., Nodes], writes: Writes
) -> None:
    """A node whose cluster state turns to fail while a batch computes (a slot of its own
    unassigned: it answers CLUSTERDOWN to every key) fails the stores; its leases' releases
    cost one CLUSTERDOWN for the lot, as a timeout does, not one per lease sent again alone
    (each redis-py's 0.25 s wait and slot-map refresh, twice: about 10 s for these 20),
    and the other nodes release theirs."""
    nodes = nodes_of()
    spread = nodes.spread(range(1, 300), per_node=20)
    slow = nodes.port(spread[0])
    uids = [*spread[:20], *spread[20:26], *spread[40:46]]  # 20 on the slow node, 6 on each other
    others = [uid for uid in uids if nodes.port(uid) != slow]
    spare = next(uid for uid in range(10**6 + 100, 10**6 + 1000) if nodes.port(uid) == slow)
    slot = key_slot(nodes.keys(spare).entry.encode())  # no test's key: none of the batch's
    server = nodes.servers[slow]

    def state(port: int) -> str:
        return cluster_info(nodes.servers[port])["cluster_state"]

    def source(batch: list[int]) -> dict[int, str]:
        server.execute_command("CLUSTER", "DELSLOTS", slot)
        wait_until(lambda: state(slow) == "fail")
        writes.clear()
        return _values(batch)

    users = nodes.cache.cached_many(key="user:{}", ttl=60)(source)
    try:
        started = time.monotonic()
        assert users(uids) == _values(uids)
        elapsed = time.monotonic() - started
        assert not any(nodes.holds(uid, "lease") for uid in others)
    finally:
        server.execute_command("CLUSTER", "ADDSLOTS", slot)
        wait_until(lambda: all(state(port) == "ok" for port in nodes.servers))
    assert len(writes.of(slow, RELEASE)) <= 2  # the pipeline's, or the first alone and its retry
    assert elapsed < 4.0
    assert users.stats()["backend_errors"] == 1


def test_a_cluster_error_met_while_a_pool_was_full_still_counts_as_a_failure() -> None:
    """Only an error raised *from* our full pool is our pool's (`_pool_exhausted`); one that
    redis-py raised while handling it (the slot map refreshed because a node looked failed,
    and found slots uncovered) is Redis failing, for the breaker to count."""
    full = MaxConnectionsError("Too many connections")
    from_full = RedisClusterException("Redis Cluster cannot be connected")
    from_full.__cause__ = full
    during_full = RedisClusterException("All slots are not covered after query all startup_nodes")
    during_full.__context__ = full
    assert connection._pool_exhausted(from_full)
    assert not connection._pool_exhausted(during_full)
