"""The Redis store's cross-process single-flight: claim a lease, wait for it, or lead.

This is the write half of `RedisStore`, kept apart from the read half (`store`) so that
the lease protocol can be read in one place. The steps (the scripts are in `scripts`):

1. Register with the listener for the key's wake-ups *first*, then `CLAIM`: one script that
   either takes the lease (`SET NX PX`, a random token), reports a fresh entry, reports the
   failure of the leader this caller waited for, or names the lease's holder and how long it
   still runs. `steps.after_claim` turns the reply into the next step without I/O.
2. A waiter sleeps until a wake-up, at most `wait_check` seconds and never past the lease's
   end (a fallback against lost messages and dead leaders). A wake-up that carries the entry
   stored by the leader of the very lease it waited for (its token is in the message) is
   the answer: decoded and returned without another round trip. Anything else (a marker, a
   large entry, unreadable bytes, a timeout) means: claim again. A lease that vanished
   without an entry (its leader died or was fenced) goes to exactly one claimant.
3. The leader computes while a renewer (the store's one renewer thread for sync, a task for
   async) extends the lease every `lease_ttl / 3`; then `STORE` writes the entry only if the
   lease is still its own (the invalidation fence), ends the lease and, when somebody waits
   for it, publishes the wake-up (with the entry, when it is small). On an exception it
   leaves a failure marker (`FAIL`) instead; on any other exit (cancellation, interrupt) it
   just ends the lease (`RELEASE`), so a waiter takes over at once. A result that may not be
   stored (an invalidation reached the leader, or deleted its lease) is handed to the
   lease's waiters (`HAND`, or the refused `STORE`): each waiter remembers every lease token
   it saw, and its next `CLAIM` returns that result to it, so an invalidation storm cannot
   starve it.
4. A foreign lease (not one of our tokens, or without a sane expiry) gets one lease time.

Early refresh (`fill(..., refresh=True)`): the caller holds a fresh entry and wants it
recomputed before it expires. Its first `CLAIM` takes a free lease whatever is stored, and
the leader computes and stores as above (fenced the same way). When the lease is held,
somebody is refreshing already: `CLAIM` reports the stored entry and the caller returns it
at once, neither computing nor waiting. Only when nothing is stored any more does it wait,
as on a miss.

Tags fence too. `fill` is given the full tag names of the entry it will compute; the caller
that takes the lease records the key in those tags' sets at once (score: the lease's expiry,
raised by every renewal and set to the entry's expiry by `STORE`), so that a `delete_tag`
running during the computation deletes its lease with the other members' entries, and the
`STORE` is refused. On one server `CLAIM` records them atomically with taking the lease. On a
cluster the tag sets lie on other slots, so the leader records them with `TAG` right after
`CLAIM`, best effort: a `delete_tag` that reads the set in between (one round trip), or a
failure of that `TAG`, lets that one computation store its result after the invalidation.

Tracing (only after `coalesce.otel.instrument()`): a leader whose computation span is sampled
writes `<token>|<traceparent>` to the sibling key `ns:{key}:trace` (`_announce`, for
`TRACE_LEASES` lease times); a waiter reads it when it first sees a lease holder, and once more
before returning after a wait if it had not found it, and links its wait to that span when the
token is the holder's (`_follow_trace`). Nothing in the lease protocol reads that key, so
processes of another version ignore it.

`Leases` is the object `RedisStore` composes (as redis-py's `Lock` holds its client and
token): it holds the connection, scripts, listener, renewer and tokens; the batch
(`batch.Batches`) drives the same object. Its decisions are the pure functions of `steps`;
the sync and async drivers (`fill` / `afill`, `lead` / `alead`) only do the I/O those decide,
side by side, to be compared line by line.

Concurrency contract: per call, the token, the waiter and the `Call` belong to that call
alone; shared state is the listener's registry (see `listener`), the renewer's table (under
its own lock, see `Renewer`) and the approximate `counts`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import coalesce.otel.hook as otel
from coalesce.entry import Entry
from coalesce.errors import BackendError, SerializationError
from coalesce.serialization import Serializer, decode_entry, encode_entry
from coalesce.stores.base import Fence
from coalesce.stores.redis.connection import RedisConnection
from coalesce.stores.redis.listener import AsyncWaiter, Listener, ThreadWaiter
from coalesce.stores.redis.near import NearCache
from coalesce.stores.redis.scripts import (
    CLAIM,
    FAIL,
    HAND,
    RELEASE,
    RENEW,
    STORE,
    TAG,
    KeyLayout,
    Script,
    encode_failure,
)
from coalesce.stores.redis.steps import (
    AGAIN,
    ENTRY,
    LEAD,
    WAIT,
    Claim,
    Step,
    after_claim,
    after_compute,
    after_renewal,
    after_wake,
    first_claim,
)
from coalesce.stores.redis.steps import FAIL as FAIL_STEP
from coalesce.stores.redis.steps import HAND as HAND_STEP
from coalesce.values import Frozen, freeze_entry


class Keys:
    """The Redis keys of one cache key (see `scripts.KeyLayout`): those of every miss, and
    (made when asked for) those of the rarer steps."""

    __slots__ = ("entry", "lease", "waiters")

    def __init__(self, layout: KeyLayout, key: str) -> None:
        self.entry = entry = layout.entry(key)
        self.lease = KeyLayout.lease(entry)
        self.waiters = KeyLayout.waiters(entry)

    @property
    def failed(self) -> str:
        return KeyLayout.failed(self.entry)

    @property
    def handed(self) -> str:
        return KeyLayout.handed(self.entry)

    @property
    def channel(self) -> str:
        return KeyLayout.channel(self.entry)


class Lease:
    """One lease held by a computation: what renewing it takes."""

    __slots__ = ("key", "lease", "tag_keys", "token")

    def __init__(self, key: str, lease: str, token: str, tag_keys: list[str]) -> None:
        self.key = key  # the full key (the tag sets' member)
        self.lease = lease  # its lease's Redis key
        self.token = token
        self.tag_keys = tag_keys  # the tag sets that list the key while it is computed


class Call:
    """One caller of `fill` / `afill`: its key's Redis keys, the lease it would hold (its
    token), and its progress through `CLAIM` replies (`steps.Claim`, replaced by each step).
    Belongs to that call alone."""

    __slots__ = ("claim", "k", "key", "lease")

    def __init__(self, key: str, k: Keys, lease: Lease, claim: Claim):
        self.key = key
        self.k = k
        self.lease = lease
        self.claim = claim


class Renewer:
    """One thread per store renews the leases of all its sync computations.

    A thread per computation would be started (and waited for: `Thread.start` blocks until it
    runs) between taking the lease and computing, on every miss; this one starts once. `add`
    and `remove` are a dict update under `_cond`; the thread is woken only when it sleeps
    without a deadline, which it does only after a whole `interval` without any lease added:
    a stream of short computations (each removed long before its renewal) wakes it about once
    per interval, not once per miss. (Waking it is never needed otherwise: a lease added later
    is due later than every lease already there, and the lingering thread looks again within
    an interval.) Every lease is renewed `interval` seconds after it was added or last
    renewed, until removed or no longer ours. Renewals run one after the other, outside the
    lock: a slow Redis delays the others by at most its socket timeout, well inside a lease.

    Concurrency contract: `_leases`, `_adds`, `_idle`, `_thread` and `_closed` are guarded by
    `_cond`.
    """

    def __init__(self, renew: Callable[[Lease], bool], interval: float, name: str) -> None:
        self._renew = renew  # lease -> still ours; raises BackendError
        self._interval = interval
        self._name = name
        self._closed = False
        self.after_fork()

    def after_fork(self) -> None:
        """Forget everything but `_closed` (in a forked child: the thread is not there, the
        leases are the parent's, and the lock may have been held by another thread)."""
        self._cond = threading.Condition(threading.Lock())
        self._leases: dict[str, tuple[Lease, float]] = {}  # token -> (lease, renew at)
        self._thread: threading.Thread | None = None
        self._idle = True  # sleeping without a deadline: `add` must wake it
        self._adds = 0  # leases added so far (the thread lingers while this moves)

    def add(self, lease: Lease) -> None:
        due = time.monotonic() + self._interval
        token = lease.token
        with self._cond:
            self._leases[token] = (lease, due)
            self._adds += 1
            thread = self._thread
            if (thread is None or not thread.is_alive()) and not self._closed:
                # first use (or a forked child, where the parent's thread does not exist)
                self._idle = False
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            elif self._idle:
                self._cond.notify()

    def remove(self, token: str) -> None:
        with self._cond:
            self._leases.pop(token, None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._leases.clear()
            self._cond.notify()

    def _run(self) -> None:
        seen = -1  # `_adds` when the thread last found no lease
        with self._cond:
            while not self._closed:
                if not self._leases:
                    if self._adds == seen:  # none added for a whole interval: sleep until one is
                        self._idle = True
                        self._cond.wait()
                        self._idle = False
                    else:  # linger: leases added meanwhile are due after it ends
                        seen = self._adds
                        self._cond.wait(self._interval)
                    continue
                token, (lease, due) = min(self._leases.items(), key=lambda item: item[1][1])
                now = time.monotonic()
                if due > now:
                    self._cond.wait(due - now)
                    continue
                self._leases[token] = (lease, now + self._interval)
                self._cond.release()
                try:
                    answer: object = self._renew(lease)
                except Exception as exc:  # anything must not stop the thread
                    answer = exc
                finally:
                    self._cond.acquire()
                if not after_renewal(answer) and token in self._leases:
                    del self._leases[token]  # invalidated: the store will be refused anyway


#: How long (in lease times) a leader's traceparent stays readable next to its lease.
TRACE_LEASES = 10


class Leases:
    """The store's lease protocol, composed into `RedisStore`: writing entries, and computing
    each key once across processes (`fill`, `afill`; the batch's `Batches` uses them too).

    It holds what the protocol needs and nothing of the store's: the connection (clients and
    scripts), the key layout, the listener (wake-ups), the near cache (entries it wrote), the
    renewer thread, and the token handling. The decisions are `steps`' pure functions; the
    methods here are the I/O around them. `counts` is the store's dict (approximate).
    """

    def __init__(
        self,
        conn: RedisConnection,
        layout: KeyLayout,
        listener: Listener,
        near: NearCache | None,
        serializer: Serializer,
        *,
        decode: Callable[[str, Any], Entry | None],
        counts: dict[str, int],
        lease_ms: int,
        failure_ms: int,
        wait_check: float,
        where: str,
    ) -> None:
        self.conn = conn
        self.layout = layout
        self.listener = listener
        self.near = near
        self.serializer = serializer
        self._decode = decode  # the store's: counts hits, misses and corrupt bytes (logged)
        self.counts = counts
        self.cluster = conn.cluster
        self.lease_ms = lease_ms
        self.failure_ms = failure_ms
        self.wait_check = wait_check
        #: How long a handed entry waits for its waiters: past their next check.
        self.hand_ms = lease_ms + int(wait_check * 1000)
        #: Renews the leases of sync computations (and of batches, async ones too).
        self.renewer = Renewer(self._renew, lease_ms / 3000, f"coalesce-renew {where}")
        # RELEASEs of cancelled leaders: each task touched only on the loop that owns it
        self._background: set[asyncio.Task[Any]] = set()
        self._subscribe_waited = False  # see `subscribe_wait`

    def after_fork(self) -> None:
        """In a forked child: the renewer's thread and the parent's tasks are not here."""
        self._background = set()
        self._subscribe_waited = False
        self.renewer.after_fork()

    # -- writing an entry (fenced by a lease token, or not) ---------------------------------

    def store_args(
        self, key: str, k: Keys, entry: Entry, token: str
    ) -> tuple[list[str], list[Any], list[str], list[str]] | None:
        """KEYS and ARGV of `STORE`, the tag sets to record separately and the ARGV of `TAG`
        for them; None when the entry is already past its stale window.

        On one server the tags are recorded by the same script, atomically with the entry. On
        a cluster the tag sets live on other slots, so they are recorded right after the
        entry (`tag_args`): an `invalidate_tag` running in between misses that one new entry
        unless its leader had recorded the key at `CLAIM` (as `fill` does). An entry without
        tags sends only what every `STORE` needs (see `scripts.STORE`).
        """
        now = time.time()
        keep = entry.keep_for(now)
        if keep is not None and keep <= 0:
            return None
        value = entry.value
        payload = value.payload if type(value) is Frozen else None
        data = encode_entry(entry, self.serializer, context=key, payload=payload)
        px = "0" if keep is None else str(max(1, int(keep * 1000)))
        keys = [k.entry, k.lease, k.waiters, k.handed]
        args: list[Any] = [token, data, px, self.hand_ms]
        if not entry.tags:
            return keys, args, [], []
        score = "+inf" if keep is None else str(int((now + keep) * 1000) + 1)
        now_ms = str(int(now * 1000))
        tag_keys = [self.layout.tag(tag) for tag in entry.tags]
        if self.cluster:  # other slots: recorded one by one after the entry
            return keys, args, tag_keys, self.tag_args(key, score, now_ms, token)
        return keys + tag_keys, [*args, key, score, now_ms], [], []

    def hand_args(self, key: str, k: Keys, entry: Entry, token: str) -> list[Any]:
        """ARGV of `HAND` (KEYS: lease, waiters, handed)."""
        value = entry.value
        payload = value.payload if type(value) is Frozen else None
        data = encode_entry(entry, self.serializer, context=key, payload=payload)
        return [token, data, k.channel, self.hand_ms]

    def hand(self, key: str, k: Keys, entry: Entry, token: str) -> None:
        """A fenced leader: end the lease, hand the entry to its waiters (never raises)."""
        try:
            args = self.hand_args(key, k, entry, token)
        except Exception:  # an entry that cannot be encoded: its store would have failed too
            self.conn.quietly(RELEASE, [k.lease], [token, k.channel])
            return
        self.conn.quietly(HAND, [k.lease, k.waiters, k.handed], args)

    async def ahand(self, key: str, k: Keys, entry: Entry, token: str) -> None:
        try:
            args = self.hand_args(key, k, entry, token)
        except Exception:
            await self.conn.aquietly(RELEASE, [k.lease], [token, k.channel])
            return
        await self.conn.aquietly(HAND, [k.lease, k.waiters, k.handed], args)

    def store(self, key: str, k: Keys, entry: Entry, token: str) -> bool:
        """Write the entry (fenced by `token` unless it is empty) and record its tags."""
        plan = self.store_args(key, k, entry, token)
        if plan is None:
            if token:
                self.conn.quietly(RELEASE, [k.lease], [token, k.channel])
            return False
        keys, args, separate, tag_args = plan
        generation = self.listener.generation  # before the write: see `NearCache.remember`
        stored = self.stored(key, entry, self.conn.script(STORE, keys, args), generation)
        for tag_key in separate if stored else ():
            self.conn.script(TAG, [tag_key], tag_args)
        return stored

    async def astore(self, key: str, k: Keys, entry: Entry, token: str) -> bool:
        plan = self.store_args(key, k, entry, token)
        if plan is None:
            if token:
                await self.conn.aquietly(RELEASE, [k.lease], [token, k.channel])
            return False
        keys, args, separate, tag_args = plan
        generation = self.listener.generation  # before the write: see `NearCache.remember`
        stored = self.stored(key, entry, await self.conn.ascript(STORE, keys, args), generation)
        for tag_key in separate if stored else ():
            await self.conn.ascript(TAG, [tag_key], tag_args)
        return stored

    def stored(self, key: str, entry: Entry, answer: Any, generation: int) -> bool:
        """After `STORE` answered `answer` for `key`: keep the entry in the near cache (read
        `generation` before the write, see `NearCache.remember`), or count it fenced."""
        if not answer:
            self.counts["fenced"] += 1
            return False
        if self.near is not None:
            self.near.remember(key, entry, generation)
        return True

    @staticmethod
    def tag_args(key: str, score: str, now: str, token: str) -> list[str]:
        """ARGV of `TAG` after a `STORE` on a cluster: a leader's store sets the score (its
        lease is over), a plain `set` only raises it (a computation may hold the lease)."""
        return ["0" if token else "1", now, key, score]

    # -- claim, wait, lead ------------------------------------------------------------------

    def subscribe_wait(self) -> float:
        """Seconds this leader waits for the listener's subscriptions before computing.

        Until the listener is subscribed, a remote invalidation cannot fence this process's
        flight, and the first computation of a process races its own listener's start. So the
        first leader of the store waits for it (once per store, at most a third of the lease,
        a few milliseconds normally); later ones never do, even while the listener is down.
        """
        if self._subscribe_waited or self.listener.ready.is_set():
            return 0.0
        self._subscribe_waited = True
        return min(0.5, self.lease_ms / 3000)

    def claim_args(self, call: Call) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of `CLAIM` for `call` (see `scripts.CLAIM`): a caller that has seen a
        lease holder adds what its checks of that lease need, a leader-to-be with tags (on
        one server) what recording them needs."""
        k, lease, claim = call.k, call.lease, call.claim
        keys = [k.entry, k.lease, k.waiters]
        args: list[Any] = [lease.token, self.lease_ms, claim.mode]
        if claim.tokens:
            keys += (k.failed, k.handed)
            args += (claim.seen, " ".join(claim.tokens))
        if lease.tag_keys and not self.cluster:  # cluster: `claim_tags`
            now = int(time.time() * 1000)
            keys += lease.tag_keys
            args += (call.key, now + self.lease_ms, now)
        return keys, args

    def claim_tags(self, lease: Lease) -> tuple[list[str], list[Any]] | None:
        """On a cluster: the tag sets a new leader records its key in right after `CLAIM`,
        and the ARGV of `TAG` for each. None when there is nothing to record separately."""
        if not self.cluster or not lease.tag_keys:
            return None
        now = int(time.time() * 1000)
        return lease.tag_keys, ["1", now, lease.key, now + self.lease_ms]

    def begin(self, key: str, tags: tuple[str, ...], refresh: bool) -> Call:
        """A new caller of `fill`: its Redis keys, its token, its first `CLAIM`'s state."""
        k = Keys(self.layout, key)
        lease = Lease(key, k.lease, secrets.token_hex(16), [self.layout.tag(t) for t in tags])
        return Call(key, k, lease, first_claim(refresh))

    def claim_step(self, key: str, reply: Any, claim: Claim) -> tuple[Step, Claim]:
        """`steps.after_claim` with this store's decoding, clock and counts; raises
        `LeaderFailedError` when the leader this caller waited for failed. No I/O."""
        step, after = after_claim(
            key,
            claim,
            reply,
            decode=lambda data: self._decode(key, data),
            now=time.time(),
            wait_check=self.wait_check,
            subscribed=self.listener.ready.is_set(),
        )
        if step.kind == WAIT and not claim.waited:
            self.counts["waits"] += 1
        elif step.error is not None:
            self.counts["leader_failed"] += 1
            raise step.error
        return step, after

    def next_step(self, call: Call, reply: Any) -> Step:
        """`claim_step` for `call`, whose state moves on."""
        step, call.claim = self.claim_step(call.key, reply, call.claim)
        return step

    def pushed(self, key: str, message: bytes | None, holder: str) -> Entry | None:
        """The fresh entry (frozen) a wake-up carries from the leader of lease `holder`, else
        None: back to `CLAIM`, which reads Redis and reports (and logs) what is there."""
        entry = after_wake(message, holder, decode=self._decode_pushed(key), now=time.time())
        if entry is None:
            return None
        self.counts["pushed"] += 1
        return freeze_entry(entry, self.serializer)

    def _decode_pushed(self, key: str) -> Callable[[Any], Entry | None]:
        def decode(data: Any) -> Entry | None:
            try:
                return decode_entry(data, self.serializer, context=key)
            except SerializationError:
                return None

        return decode

    def serve(self, entry: Entry | None) -> Entry:
        """An entry read from Redis (a step's ENTRY), frozen for this process's callers."""
        assert entry is not None
        return freeze_entry(entry, self.serializer)

    def taking_over(self, call: Call) -> list[tuple[str, list[Any]]]:
        """A caller that took the lease: count a takeover; on a cluster, the (tag set, ARGV of
        `TAG`) pairs to record right after `CLAIM` (best effort, see the module docstring)."""
        if call.claim.waited:
            self.counts["takeovers"] += 1
        separate = self.claim_tags(call.lease)
        return [] if separate is None else [(tag_key, separate[1]) for tag_key in separate[0]]

    def ending(self, k: Keys, token: str, error: BaseException) -> tuple[Script, list[str], Any]:
        """The script (`FAIL` or `RELEASE`), KEYS and ARGV that end a lease whose computation
        raised `error` (see `steps.after_compute`)."""
        if after_compute(error, True) == FAIL_STEP:
            marker = encode_failure(token, error)
            return FAIL, [k.lease, k.failed], [token, marker, self.failure_ms, k.channel]
        return RELEASE, [k.lease], [token, k.channel]

    # The two drivers of one caller, side by side: the same steps, one awaiting.

    def fill(
        self,
        key: str,
        compute: Callable[[], Entry],
        *,
        fence: Fence,
        tags: tuple[str, ...] = (),
        refresh: bool = False,
    ) -> Entry:
        """Compute `key` once across all processes sharing this Redis (see the module doc);
        `refresh`: early, unless somebody already does (then the stored entry, at once)."""
        call = self.begin(key, tags, refresh)
        waiter = ThreadWaiter()
        self.listener.start()
        self.listener.add(key, waiter)  # subscribe first ...
        try:
            while True:
                waiter.arm()
                subscribed = self.listener.ready.is_set()
                reply = self.conn.script(CLAIM, *self.claim_args(call))
                step = self.next_step(call, reply)  # ... then check
                if step.trace and otel.tracing is not None:
                    self._follow_trace(call.k, call.claim.tokens)
                if step.kind == LEAD:
                    break
                if step.kind == ENTRY:
                    return self.serve(step.entry)
                if step.kind == AGAIN:
                    continue
                if not subscribed:  # the first wait of this store: make sure pushes arrive
                    self.listener.ready.wait(min(step.seconds, 1.0))
                    continue
                entry = self.pushed(key, waiter.wait(step.seconds), call.claim.seen)
                if entry is not None:
                    if otel.tracing is not None:
                        self._follow_trace(call.k, call.claim.tokens)
                    return entry
        finally:
            self.listener.remove(key, waiter)
        for tag_key, tag_args in self.taking_over(call):
            self.conn.quietly(TAG, [tag_key], tag_args)
        pause = self.subscribe_wait()
        if pause:
            self.listener.ready.wait(pause)
        return self.lead(key, call.k, call.lease, compute, fence)

    async def afill(
        self,
        key: str,
        compute: Callable[[], Awaitable[Entry]],
        *,
        fence: Fence,
        tags: tuple[str, ...] = (),
        refresh: bool = False,
    ) -> Entry:
        """`fill` for asyncio: the same steps, awaiting (compare side by side)."""
        call = self.begin(key, tags, refresh)
        waiter = AsyncWaiter(asyncio.get_running_loop())
        self.listener.start()
        self.listener.add(key, waiter)  # subscribe first ...
        try:
            while True:
                waiter.arm()
                subscribed = self.listener.ready.is_set()
                reply = await self.conn.ascript(CLAIM, *self.claim_args(call))
                step = self.next_step(call, reply)  # ... then check
                if step.trace and otel.tracing is not None:
                    await self._afollow_trace(call.k, call.claim.tokens)
                if step.kind == LEAD:
                    break
                if step.kind == ENTRY:
                    return self.serve(step.entry)
                if step.kind == AGAIN:
                    continue
                if not subscribed:
                    await asyncio.to_thread(self.listener.ready.wait, min(step.seconds, 1.0))
                    continue
                entry = self.pushed(key, await waiter.wait(step.seconds), call.claim.seen)
                if entry is not None:
                    if otel.tracing is not None:
                        await self._afollow_trace(call.k, call.claim.tokens)
                    return entry
        finally:
            self.listener.remove(key, waiter)
        for tag_key, tag_args in self.taking_over(call):
            await self.conn.aquietly(TAG, [tag_key], tag_args)
        pause = self.subscribe_wait()
        if pause:
            await asyncio.to_thread(self.listener.ready.wait, pause)
        return await self.alead(key, call.k, call.lease, compute, fence)

    def lead(
        self, key: str, k: Keys, lease: Lease, compute: Callable[[], Entry], fence: Fence
    ) -> Entry:
        """Holding the lease: compute (renewing it), then store fenced, hand the entry to the
        waiters (fenced), or end the lease (`ending`)."""
        self.counts["leads"] += 1
        token, resets = lease.token, self.listener.resets
        if otel.tracing is not None:
            otel.tracing.announce(lambda traceparent: self._announce(k, token, traceparent))
        self.renewer.add(lease)
        try:
            entry = compute()
        except BaseException as exc:
            self.renewer.remove(token)
            self.conn.quietly(*self.ending(k, token, exc))
            raise
        finally:
            self.renewer.remove(token)
        if after_compute(None, self.may_store(fence, resets)) == HAND_STEP:
            self.counts["fenced"] += 1
            self.hand(key, k, entry, token)
            return entry
        try:
            self.store(key, k, entry, token)
        except BaseException:
            self.conn.quietly(RELEASE, [k.lease], [token, k.channel])
            raise
        return entry

    async def alead(
        self, key: str, k: Keys, lease: Lease, compute: Callable[[], Awaitable[Entry]], fence: Fence
    ) -> Entry:
        self.counts["leads"] += 1
        token, resets = lease.token, self.listener.resets
        if otel.tracing is not None:
            otel.tracing.announce(
                lambda traceparent: self.in_background(self._aannounce(k, token, traceparent))
            )
        renewer = asyncio.get_running_loop().create_task(self._arenew(lease))
        try:
            entry = await compute()
        except BaseException as exc:
            renewer.cancel()
            job = self.conn.aquietly(*self.ending(k, token, exc))
            if isinstance(exc, Exception):
                await job
            else:  # cancelled: hand over at once, without awaiting here
                self.in_background(job)
            raise
        finally:
            renewer.cancel()
        if after_compute(None, self.may_store(fence, resets)) == HAND_STEP:
            self.counts["fenced"] += 1
            await self.ahand(key, k, entry, token)
            return entry
        try:
            await self.astore(key, k, entry, token)
        except BaseException:
            self.in_background(self.conn.aquietly(RELEASE, [k.lease], [token, k.channel]))
            raise
        return entry

    def may_store(self, fence: Fence, resets: int) -> bool:
        """Whether a leader may try its `STORE` (which its lease token fences anyway).

        Not when an invalidation of its key or tags reached this process (`fence`). A drop of
        the pub/sub connection (invalidations may have been missed) only detaches flights: on
        one server, every invalidation deletes the leases it concerns, so the token decides.
        On a cluster a tag invalidation can miss a lease recorded just after `CLAIM` (see the
        module docstring), so there a drop during the computation refuses the store too.
        """
        return fence.valid and not (self.cluster and self.listener.resets != resets)

    def _renew_args(self, lease: Lease) -> tuple[list[str], list[Any], list[Any] | None]:
        """KEYS and ARGV of `RENEW`, and on a cluster the ARGV of `TAG` for each tag set."""
        now = int(time.time() * 1000)
        until = now + self.lease_ms
        args = [lease.token, self.lease_ms, lease.key, until, now]
        if not self.cluster:
            return [lease.lease, *lease.tag_keys], args, None
        return [lease.lease], args, (["1", now, lease.key, until] if lease.tag_keys else None)

    def _renew(self, lease: Lease) -> bool:
        """Extend our lease and its tag memberships (on the renewer thread); False once the
        lease is no longer ours."""
        keys, args, tag_args = self._renew_args(lease)
        ours = bool(self.conn.script(RENEW, keys, args))
        if ours and tag_args is not None:
            for tag_key in lease.tag_keys:
                self.conn.script(TAG, [tag_key], tag_args)
        return ours

    async def _arenew(self, lease: Lease) -> None:
        """`_renew` every third of a lease (a task beside an async computation)."""
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            keys, args, tag_args = self._renew_args(lease)
            try:
                answer: object = await self.conn.ascript(RENEW, keys, args)
                if answer and tag_args is not None:
                    for tag_key in lease.tag_keys:
                        await self.conn.ascript(TAG, [tag_key], tag_args)
            except BackendError as exc:
                answer = exc
            if not after_renewal(answer):
                return

    # -- tracing (coalesce.otel, once instrumented; see the module docstring) -----------------

    def _trace_args(self, k: Keys, token: str, traceparent: str) -> tuple[str, str, None, int]:
        """SET's arguments for a leader's traceparent: key, value, (no EX), PX."""
        return k.entry + ":trace", f"{token}|{traceparent}", None, self.lease_ms * TRACE_LEASES

    def _announce(self, k: Keys, token: str, traceparent: str) -> None:
        """Write the leader's traceparent for waiters of other processes (best effort)."""
        with contextlib.suppress(BackendError):
            self.conn.call(self.conn.sync().set, *self._trace_args(k, token, traceparent))

    async def _aannounce(self, k: Keys, token: str, traceparent: str) -> None:
        with contextlib.suppress(BackendError):
            client = self.conn.loop_state().client
            await self.conn.acall(client.set, *self._trace_args(k, token, traceparent))

    @staticmethod
    def _traced_leader(data: Any, tokens: tuple[str, ...]) -> str | None:
        """The traceparent in a `:trace` value, if one of the leases `tokens` wrote it."""
        if not isinstance(data, bytes):
            return None
        token, _, traceparent = data.decode("ascii", "replace").partition("|")
        return traceparent if token in tokens and traceparent else None

    def _follow_trace(self, k: Keys, tokens: tuple[str, ...]) -> None:
        """A waiter: link this step to the span of the leader it waits for (best effort)."""
        tracing = otel.tracing
        if tracing is None or not tracing.wants_remote():
            return
        with contextlib.suppress(BackendError):
            traceparent = self._traced_leader(self.conn.get(k.entry + ":trace"), tokens)
            if traceparent is not None:
                tracing.remote_leader(traceparent)

    async def _afollow_trace(self, k: Keys, tokens: tuple[str, ...]) -> None:
        tracing = otel.tracing
        if tracing is None or not tracing.wants_remote():
            return
        with contextlib.suppress(BackendError):
            traceparent = self._traced_leader(await self.conn.aget(k.entry + ":trace"), tokens)
            if traceparent is not None:
                tracing.remote_leader(traceparent)

    def in_background(self, job: Awaitable[None]) -> None:
        task = asyncio.ensure_future(job)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
