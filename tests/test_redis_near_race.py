"""The near cache never keeps a value read before a deletion that another process made.

Each test pins one interleaving with events, on real redis-servers: a reader's `GET` (or a
writer's `STORE`) is answered with the entry as it was before the deletion, and the thread
that asked is held right after the answer, as a descheduled thread would be.

* A heard invalidation reaches the store's hook on the listener thread, which moves the
  read epoch, then the generation. A reader that came before the hook still joins a `GET`
  begun before the deletion; the value that `GET` returns must not be kept (commit 2433bdf
  moved the generation again after the epoch; now the hook alone moves it, in that order).
* A deletion made while the pub/sub connection is down is never heard. A read or write
  answered before it, whose thread keeps the result only after the listener subscribed
  again, must not be kept either: the re-subscription moves the generation too.

Without either, the near cache serves the deleted value for up to `local_ttl` seconds.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from redis_servers import RedisServer

from coalesce.entry import Entry
from coalesce.stores.redis import RedisStore
from coalesce.stores.redis.scripts import STORE

WAIT = 10.0  # bound of every wait: each step here takes milliseconds
KEY = "k"


@pytest.fixture
def stores(redis_url: str, unique_namespace: str) -> Iterator[tuple[RedisStore, RedisStore]]:
    """A store with a near cache, subscribed, and another one (no near cache, no listener)
    sharing its namespace, like a second process; `KEY` holds "old"."""
    near = RedisStore(redis_url, namespace=unique_namespace, local_maxsize=10, local_ttl=30)
    other = RedisStore(redis_url, namespace=unique_namespace)
    near._listener.start()
    assert near._listener.ready.wait(WAIT)
    assert other.set(KEY, Entry("old", ttl=30))
    yield near, other
    near.close()
    other.close()


class HeldListener:
    """Holds `store`'s listener thread when it hears `message`, before the store's own hook
    runs (`held`), until `go`; `done` once the hook returned."""

    def __init__(self, store: RedisStore, message: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
        self.held, self.go, self.done = threading.Event(), threading.Event(), threading.Event()
        listener = store._listener
        hook = listener._on_invalidate

        def held_hook(data: bytes) -> None:
            if data == message and not self.held.is_set():
                self.held.set()
                self.go.wait(WAIT)
                hook(data)
                self.done.set()
            else:
                hook(data)

        monkeypatch.setattr(listener, "_on_invalidate", held_hook)


def hold_first_answer(
    monkeypatch: pytest.MonkeyPatch, target: Any, method: str, when: Callable[..., bool]
) -> tuple[threading.Event, threading.Event]:
    """Wrap `target.method`: the first call that `when(*args)` accepts gets Redis's answer,
    sets `answered`, and returns it only once `release` is set."""
    answered, release = threading.Event(), threading.Event()
    original = getattr(target, method)

    def held(*args: Any) -> Any:
        answer = original(*args)
        if when(*args) and not answered.is_set():
            answered.set()
            release.wait(WAIT)
        return answer

    monkeypatch.setattr(target, method, held)
    return answered, release


class WatchedLock:
    """A lock that sets `waiting` when a thread starts waiting for it: a follower joining a
    shared read (`RedisConnection.get`) waits on that read's lock."""

    def __init__(self, lock: threading.Lock, waiting: threading.Event) -> None:
        self.lock = lock
        self.waiting = waiting

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        self.waiting.set()
        return self.lock.acquire(blocking, timeout)

    def release(self) -> None:
        self.lock.release()


def test_a_reader_joining_a_read_begun_before_a_heard_deletion_keeps_nothing(
    stores: tuple[RedisStore, RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    near, other = stores
    listener = HeldListener(near, b"k:" + KEY.encode(), monkeypatch)
    conn = near._conn
    answered, release = hold_first_answer(monkeypatch, conn, "_get", lambda key: True)
    first: list[Entry | None] = []
    second: list[Entry | None] = []
    reader_a = threading.Thread(target=lambda: first.append(near.get(KEY)))
    reader_b = threading.Thread(target=lambda: second.append(near.get(KEY)))
    try:
        reader_a.start()
        assert answered.wait(WAIT)  # A's GET answered "old", A not back yet
        joined = threading.Event()
        read = conn._reads[near._layout.entry(KEY)]
        read.lock = WatchedLock(read.lock, joined)  # type: ignore[assignment]
        assert other.delete(KEY)  # another process: broadcast "k:k"
        assert listener.held.wait(WAIT)  # heard: neither the epoch nor the generation moved
        reader_b.start()  # reads the generation the hook is about to move
        assert joined.wait(WAIT)  # and joins A's GET
        listener.go.set()
        assert listener.done.wait(WAIT)  # the hook ran: epoch, generation; nothing to drop yet
    finally:
        listener.go.set()
        release.set()
        reader_a.join(WAIT)
        reader_b.join(WAIT)
    assert [e and e.value for e in first + second] == ["old", "old"]  # B did join A's GET
    kept = near.get(KEY)
    assert kept is None, f"the near cache kept {kept.value!r}, read before the deletion"


async def test_a_task_joining_a_read_begun_before_a_heard_deletion_keeps_nothing(
    stores: tuple[RedisStore, RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    near, other = stores
    listener = HeldListener(near, b"k:" + KEY.encode(), monkeypatch)
    conn = near._conn
    answered, release = asyncio.Event(), asyncio.Event()
    original = conn._aget

    async def held_aget(client: Any, redis_key: str) -> Any:
        answer = await original(client, redis_key)
        if not answered.is_set():
            answered.set()
            await release.wait()
        return answer

    monkeypatch.setattr(conn, "_aget", held_aget)
    task_a = asyncio.ensure_future(near.aget(KEY))
    task_b: asyncio.Future[Entry | None] | None = None
    try:
        await asyncio.wait_for(answered.wait(), WAIT)  # A's GET answered "old"
        assert await other.adelete(KEY)
        assert await asyncio.to_thread(listener.held.wait, WAIT)  # heard, not handled
        task_b = asyncio.ensure_future(near.aget(KEY))
        # B runs first, up to its first suspension: awaiting A's read (nothing else awaits
        # before it); the assertion on its value below checks that it did join
        await asyncio.sleep(0)
        listener.go.set()
        assert await asyncio.to_thread(listener.done.wait, WAIT)
    finally:
        listener.go.set()
        release.set()
        first = await asyncio.wait_for(task_a, WAIT)
        second = None if task_b is None else await asyncio.wait_for(task_b, WAIT)
    try:
        assert [e and e.value for e in (first, second)] == ["old", "old"]  # B did join A's GET
        kept = await near.aget(KEY)
        assert kept is None, f"the near cache kept {kept.value!r}, read before the deletion"
    finally:
        await near.aclose()
        await other.aclose()


@pytest.mark.parametrize("path", ["read", "write"])
def test_an_answer_from_before_a_deletion_missed_while_unsubscribed_is_not_kept(
    fresh_redis: RedisServer, unique_namespace: str, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """The pub/sub connection is killed; a `GET` (or this store's own `STORE`) is answered,
    then another process deletes the key, unheard; the listener subscribes again, and only
    then does the thread keep what Redis answered it."""
    near = RedisStore(fresh_redis.url, namespace=unique_namespace, local_maxsize=10, local_ttl=30)
    other = RedisStore(fresh_redis.url, namespace=unique_namespace)
    admin = fresh_redis.client()
    listener = near._listener
    listener.start()
    assert listener.ready.wait(WAIT)
    dropped, subscribed_again, reconnect = threading.Event(), threading.Event(), threading.Event()
    connect, on_reset = listener._connect, listener._on_reset

    def held_connect() -> Any:
        reconnect.wait(WAIT)
        return connect()

    def watched_reset() -> None:
        on_reset()
        (subscribed_again if listener.ready.is_set() else dropped).set()

    monkeypatch.setattr(listener, "_connect", held_connect)
    monkeypatch.setattr(listener, "_on_reset", watched_reset)
    if path == "read":
        assert other.set(KEY, Entry("old", ttl=30))
        answered, release = hold_first_answer(monkeypatch, near._conn, "_get", lambda key: True)
        work: Callable[[], Any] = lambda: near.get(KEY)  # noqa: E731
    else:
        answered, release = hold_first_answer(
            monkeypatch, near._conn, "script", lambda script, keys, args: script is STORE
        )
        work = lambda: near.set(KEY, Entry("old", ttl=30))  # noqa: E731
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(work()))
    try:
        try:
            assert admin.client_kill_filter(_type="pubsub") == 1
            assert dropped.wait(WAIT)  # near cache flushed, reconnection held
            worker.start()
            assert answered.wait(WAIT)  # Redis answered with (or wrote) "old"
            assert other.delete(KEY)  # broadcast to nobody of `near`
            reconnect.set()
            assert subscribed_again.wait(WAIT)  # the store's reset hook ran again
        finally:
            reconnect.set()
            release.set()
            worker.join(WAIT)
        assert len(results) == 1 and results[0]  # the read's "old" entry, or the write's True
        kept = near.get(KEY)
        assert kept is None, f"the near cache kept {kept.value!r}, deleted while unsubscribed"
    finally:
        admin.close()
        near.close()
        other.close()
