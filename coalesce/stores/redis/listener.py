"""One long-lived pub/sub connection per Redis store: wake-ups for waiters, invalidations.

A waiter of a cross-process computation must learn at once when the leader's lease ends
(the value is stored, the leader failed or gave up), without polling and without opening a
subscription per wait. So each store keeps one listener thread with one pub/sub connection:

* `PSUBSCRIBE ns:{*}:done` receives every wake-up of the namespace and wakes the waiters
  registered for that key in this process, handing each the message itself (`wake(message)`:
  it may carry the stored entry, see `scripts`): a `ThreadWaiter` (a bare lock, released
  by the listener) for sync callers, an `AsyncWaiter` (an asyncio future, resolved with the
  message through `call_soon_threadsafe` on the waiter's own loop) for async ones;
* `SUBSCRIBE ns:__invalidate__` receives invalidations ("k:<key>", "t:<tag>") for the near
  cache, handed to `on_invalidate`.

`ready` is set while both subscriptions are confirmed. When the connection drops, `ready` is
cleared, `on_reset` runs (the store flushes its near cache and the cache detaches its
computations in flight, so that no new caller joins one an invalidation may have reached
unheard; whether one did is decided by its lease token when it stores, so none of their
results is thrown away for nothing; it runs again once re-subscribed, but not after an
attempt to reconnect that never got subscribed: nothing was heard since the last reset, and
detaching again would let each attempt of a long outage start a second computation of a key
that is still being computed on the fallback path),
every waiter is woken to check Redis again, and the thread reconnects with a growing pause
(up to 2 s). Waiters never depend on a message alone: they check Redis again
after registering and at least once a second, so a lost message only costs time.

Why a thread, also for async waiters: a reader per event loop (redis.asyncio pub/sub, the
message read on the loop itself) was measured against this in the wake-up benchmark. It saved
about 0.1 ms at the median and nothing at the p99: redis.asyncio's read path costs about what
the thread hop costs, and beside this listener (which sync waiters and invalidations need) a
second subscription makes both wake up for every message.

Concurrency contract: `_waiters` is written by any thread under `_lock` (add/remove) and read
under `_lock` by the listener thread, which wakes waiters after releasing it. `generation` is
bumped under `_lock` (`bump`) whenever local copies may have become stale, and read without
it by the near cache, which refuses to keep an entry read from Redis if the generation moved
meanwhile: here when the connection drops, and by the store's hooks (`on_invalidate`,
`on_reset`) when an invalidation arrives or the subscription is back, after they moved the
store's read epoch and before they drop local copies (see `RedisStore._invalidated`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, Protocol

from redis.client import PubSub

from coalesce.stores.redis.breaker import RateLimitedLog
from coalesce.stores.redis.scripts import KeyLayout

_POLL = 0.25  # seconds the thread blocks on the socket before it looks at `_closed`

#: Makes a subscribed-to-nothing `PubSub` on a fresh connection, and a function to close it.
PubSubFactory = Callable[[], "tuple[PubSub, Callable[[], None]]"]


class Waiter(Protocol):
    def wake(self, message: bytes | None = None) -> None: ...


class ThreadWaiter:
    """A sync waiter: `arm()` before checking Redis, then `wait()`; the listener `wake`s it.

    A bare lock rather than a `threading.Event`: the listener's `wake` is one release, and the
    woken caller needs no second lock to get going. Held = armed; `wait` returns once it is
    released (and holds it again, armed); `message` is the last message handed over (None for
    a plain wake-up), reset by `arm`.
    """

    __slots__ = ("_lock", "message")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.message: bytes | None = None

    def arm(self) -> None:
        self.message = None
        self._lock.acquire(blocking=False)

    def wake(self, message: bytes | None = None) -> None:
        self.message = message
        with contextlib.suppress(RuntimeError):  # already released: woken twice
            self._lock.release()

    def wait(self, timeout: float) -> bytes | None:
        """Block until woken or `timeout` seconds passed; the message, if any."""
        self._lock.acquire(timeout=max(0.0, timeout))
        return self.message


class AsyncWaiter:
    """An async waiter on `loop`: `arm()` before checking Redis, then `await wait(timeout)`.

    `future` is only touched on `loop`'s thread (`arm` and `wait` run there, and `wake` hops
    there with `call_soon_threadsafe`), so no lock is needed. The future is awaited directly,
    its timeout a `call_later` resolving it with None: one loop iteration from the wake-up to
    the waiter (`asyncio.wait` takes two). A wake that lands after a re-arm resolves the new
    future early, with an old message: harmless, the waiter checks what it holds (the lease
    token in a pushed entry) or asks Redis again.
    """

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[bytes | None] = loop.create_future()

    def arm(self) -> None:
        if self.future.done():
            self.future = self.loop.create_future()

    def wake(self, message: bytes | None = None) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            self.loop.call_soon_threadsafe(self._resolve, message)

    def _resolve(self, message: bytes | None) -> None:
        if not self.future.done():
            self.future.set_result(message)

    async def wait(self, timeout: float) -> bytes | None:
        """Until woken or `timeout` seconds passed; the message, if any."""
        future = self.future
        if not future.done():
            timer = self.loop.call_later(max(0.0, timeout), self._resolve, None)
            try:
                await future
            finally:
                timer.cancel()
        return future.result()


class Listener:
    """The store's pub/sub thread, started on first need (see the module docstring)."""

    def __init__(
        self,
        connect: PubSubFactory,
        layout: KeyLayout,
        *,
        on_invalidate: Callable[[bytes], None],
        on_reset: Callable[[], None],
        log: RateLimitedLog,
        where: str,
    ) -> None:
        self._connect = connect
        self._layout = layout
        self._on_invalidate = on_invalidate
        self._on_reset = on_reset
        self._log = log
        self._where = where
        self._lock = threading.Lock()  # guards _waiters, _thread, generation writes
        self._waiters: dict[str, set[Waiter]] = {}
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self.ready = threading.Event()  # set while subscribed; cleared on any trouble
        self.generation = 0  # see the module docstring
        self.resets = 0  # how often the connection dropped (stats)
        # Whether the connection was subscribed since `on_reset` last ran: written by the
        # listener thread only, so without the lock.
        self._heard = False

    def after_fork(self) -> None:
        """In a forked child: no thread runs here, nothing is subscribed, and the waiters
        were the parent's. Start afresh (on next need); a closed listener stays closed.

        The lock and events are new: another thread of the parent may have held them.
        """
        closed = self._closed.is_set()
        self._lock = threading.Lock()
        self._waiters = {}
        self._thread = None
        self._closed = threading.Event()
        if closed:
            self._closed.set()
        self.ready = threading.Event()
        self._heard = False
        self.generation += 1  # a read begun before the fork must not fill the near cache

    # -- called by the store, from any thread ------------------------------------------------

    def start(self) -> None:
        """Start the thread unless it runs (cheap when it does)."""
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(
                    target=self._run, name=f"coalesce-listener {self._where}", daemon=True
                )
                self._thread.start()

    def add(self, key: str, waiter: Waiter) -> None:
        with self._lock:
            self._waiters.setdefault(key, set()).add(waiter)

    def remove(self, key: str, waiter: Waiter) -> None:
        with self._lock:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[key]

    def bump(self) -> None:
        """Note that local copies may be stale (see `generation`)."""
        with self._lock:
            self.generation += 1

    def close(self, timeout: float = 0.0) -> None:
        """Stop the thread: it leaves within `_POLL` seconds (join up to `timeout`)."""
        self._closed.set()
        self.ready.clear()
        thread = self._thread
        if timeout > 0 and thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        pause = 0.05
        while not self._closed.is_set():
            try:
                pubsub, cleanup = self._connect()
            except Exception as exc:
                self._trouble(exc)
            else:
                try:
                    self._listen(pubsub)
                    pause = 0.05
                except Exception as exc:
                    if self.ready.is_set():
                        pause = 0.05  # it worked until now: reconnect quickly
                    self._trouble(exc)
                finally:
                    self._reset()
                    with contextlib.suppress(Exception):
                        cleanup()
            self._closed.wait(pause)
            pause = min(pause * 2, 2.0)

    def _listen(self, pubsub: PubSub) -> None:
        pubsub.psubscribe(self._layout.channel_pattern)
        pubsub.subscribe(self._layout.invalidate_channel)
        confirmed = 0
        while not self._closed.is_set():
            message: dict[str, Any] | None = pubsub.get_message(timeout=_POLL)
            if message is None:
                continue
            kind = message["type"]
            if kind == "pmessage":
                self._dispatch(message["channel"], message["data"])
            elif kind == "message":
                self._on_invalidate(message["data"])  # which moves the generation
            elif kind in ("psubscribe", "subscribe"):
                confirmed += 1
                if confirmed == 2:
                    self._heard = True
                    self.ready.set()
                    self._wake_all()  # anything published before now: check again
                    if self.resets:  # invalidations sent while we were away are lost
                        self._on_reset()

    def _dispatch(self, channel: bytes | str, data: bytes | None) -> None:
        name = channel.decode("utf-8", "surrogateescape") if isinstance(channel, bytes) else channel
        key = self._layout.key_of_channel(name)
        if key is None:
            return
        with self._lock:
            waiters = list(self._waiters.get(key, ()))
        for waiter in waiters:
            waiter.wake(data)

    def _wake_all(self) -> None:
        with self._lock:
            waiters = [w for group in self._waiters.values() for w in group]
        for waiter in waiters:
            waiter.wake()

    def _reset(self) -> None:
        self.ready.clear()
        self.bump()
        self.resets += 1
        try:
            if self._heard:  # else nothing can have been missed since the last `on_reset`
                self._heard = False
                self._on_reset()
        finally:
            self._wake_all()

    def _trouble(self, exc: Exception) -> None:
        if not self._closed.is_set():
            self._log.warning(
                "listener",
                "coalesce: the pub/sub connection to Redis at %s failed (%s: %s); "
                "reconnecting (near cache flushed, waiters fall back to checking)",
                self._where,
                type(exc).__name__,
                exc,
            )
