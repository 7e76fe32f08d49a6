"""The Redis fixtures of ``conftest.py`` start real, usable, isolated servers."""

from __future__ import annotations

import socket

import pytest
import redis
import redis.asyncio
from redis.cluster import ClusterNode
from redis.cluster import RedisCluster as ClusterClient
from redis_servers import RedisCluster, RedisServer, cluster_info, free_port


def _accepts_connections(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_session_server_is_private_and_on_loopback(redis_server: RedisServer) -> None:
    assert redis_server.is_running()
    assert redis_server.port != 6379
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"


def test_session_server_sync_set_get(redis_url: str, unique_namespace: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        key = f"{unique_namespace}:k"
        assert client.set(key, b"v", ex=60)
        assert client.get(key) == b"v"
    finally:
        client.close()


async def test_session_server_async_set_get(redis_url: str, unique_namespace: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        key = f"{unique_namespace}:k"
        assert await client.set(key, b"async", ex=60)
        assert await client.get(key) == b"async"
    finally:
        await client.aclose()


_seen_namespaces: set[str] = set()


@pytest.mark.parametrize("attempt", range(3))
def test_unique_namespace_differs_per_test(unique_namespace: str, attempt: int) -> None:
    assert unique_namespace.startswith("t")
    assert len(unique_namespace) == 11
    assert unique_namespace not in _seen_namespaces
    _seen_namespaces.add(unique_namespace)


def test_fresh_redis_stop_and_restart_same_port(fresh_redis: RedisServer) -> None:
    port = fresh_redis.port
    client = redis.Redis.from_url(fresh_redis.url, socket_connect_timeout=1, socket_timeout=1)
    try:
        assert client.set("k", b"before")

        fresh_redis.stop()
        assert not fresh_redis.is_running()
        assert not _accepts_connections(port)
        with pytest.raises(redis.ConnectionError):
            client.ping()

        fresh_redis.restart()
        assert fresh_redis.port == port
        assert client.ping()
        assert client.get("k") is None  # nothing persisted
    finally:
        client.close()


async def test_fresh_redis_kill_and_restart_async(fresh_redis: RedisServer) -> None:
    client = redis.asyncio.Redis.from_url(fresh_redis.url, socket_connect_timeout=1)
    try:
        assert await client.ping()
        fresh_redis.kill()
        with pytest.raises(redis.ConnectionError):
            await client.ping()
        fresh_redis.restart()
        assert await client.ping()
    finally:
        await client.aclose()


def test_password_server() -> None:
    with RedisServer(password="s3cret") as server:
        assert server.url == f"redis://:s3cret@127.0.0.1:{server.port}/0"
        with redis.Redis(port=server.port) as anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
    assert not _accepts_connections(server.port)
    assert not server.dir.exists()


def test_free_port_never_repeats_nor_6379() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    assert 6379 not in ports
    bus_port = free_port(cluster_bus=True)
    assert bus_port < 50000
    assert not _accepts_connections(bus_port + 10000)


def test_cluster_has_three_masters_covering_all_slots(redis_cluster: RedisCluster) -> None:
    assert len(redis_cluster.startup_nodes) == 3
    assert redis_cluster.url == f"redis://127.0.0.1:{redis_cluster.ports[0]}/0"
    for port in redis_cluster.ports:
        with redis.Redis(port=port) as node:
            info = cluster_info(node)
        assert info["cluster_state"] == "ok"
        assert info["cluster_slots_assigned"] == "16384"
        assert info["cluster_size"] == "3"
        assert info["cluster_known_nodes"] == "3"

    with redis.Redis(port=redis_cluster.ports[0]) as node:
        slots = node.execute_command("CLUSTER", "SLOTS")
    masters: set[int] = set()
    covered = 0
    for start, end, master, *_replicas in slots:
        covered += int(end) - int(start) + 1
        masters.add(int(master[1]))
    assert covered == 16384
    assert masters == set(redis_cluster.ports)


def test_cluster_hash_tag_keys_share_a_slot(
    redis_cluster: RedisCluster, unique_namespace: str
) -> None:
    nodes = [ClusterNode(host, port) for host, port in redis_cluster.startup_nodes]
    client = ClusterClient(startup_nodes=nodes)
    try:
        assert len(client.get_primaries()) == 3
        a, b = f"{{x}}{unique_namespace}:a", f"{{x}}{unique_namespace}:b"
        assert client.keyslot(a) == client.keyslot(b)
        assert client.cluster_keyslot(a) == client.cluster_keyslot(b) == client.keyslot("x")
        # A multi-key command only works when every key lives in the same slot.
        assert client.mset({a: b"1", b: b"2"})
        assert client.mget(a, b) == [b"1", b"2"]
        assert client.delete(a, b) == 2
    finally:
        client.close()

    from_url = ClusterClient.from_url(redis_cluster.url)
    try:
        assert from_url.ping()
    finally:
        from_url.close()
