"""Batches on Redis (`Cache.cached_many`): one read for many keys, leases per key in one script.

* `get_many`: the near cache first, then one `MGET` for the rest (on a cluster one `MGET`
  per slot, all at once: `RedisConnection.mget` / `amget`).
* `fill_many`, the cross-process share of a batch (the cache has made sure one caller per
  key and process gets here): register a waiter per key with the listener *first*, then one
  `CLAIM_MANY` per slot group (one on a single server) reports per key a stored entry (its
  check again), a lease taken, or the holder to wait for. Stale entries are claimed again
  (`CLAIM_ONLY`). The keys whose leases it took are computed in *one* call, renewed by the
  store's renewer thread meanwhile, then written by one `STORE_MANY` per slot group, each
  key fenced by its own lease token exactly as `STORE` does (an invalidation deletes the
  lease: that id's result does not land). On a cluster a step's slot groups go out at once,
  one round trip of waiting for all and one connection per node, not per group
  (`RedisConnection.scripts` / `ascripts`). The keys other processes compute are waited for
  like single keys: the holder's `STORE` pushes the entry to the waiter registered for it;
  anything else (a marker, a timeout) sends that key to one `CLAIM` of its own that knows
  the lease it waited for, exactly as a single key's waiter: the failure of that leader
  raises `LeaderFailedError` for that key, its handed entry is taken, a free lease is led
  alone, a lease still held is waited for through the single-key `fill`.
* An exception belongs to the keys it was raised for: when this call's computation raises,
  or a leader elsewhere failed, the other keys are still waited for, and `PartlyFailed`
  carries both (the cache hands each key's callers their key's own outcome).

So a batch miss on one server is three round trips in all: `MGET`, `CLAIM_MANY`,
`STORE_MANY`. Sync and async side by side, as in `lease`.

Concurrency contract: everything here belongs to one call (its tokens, leases and waiters);
shared state is the listener's registry, the renewer's table and the approximate `counts`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from coalesce.batch.flights import PartlyFailed
from coalesce.entry import Entry
from coalesce.errors import BackendError
from coalesce.stores.base import Fence
from coalesce.stores.redis.connection import ScriptCall, slot_groups
from coalesce.stores.redis.lease import Call, Keys, Lease, Leases
from coalesce.stores.redis.listener import AsyncWaiter, Listener, ThreadWaiter
from coalesce.stores.redis.scripts import (
    CLAIM,
    CLAIM_CHECK,
    CLAIM_MANY,
    CLAIM_ONLY,
    RELEASE,
    STORE_MANY,
    TAG,
    KeyLayout,
)
from coalesce.stores.redis.steps import ENTRY, LEAD, WAIT, Claim, encodable

#: A batch's claim state: every key's first `CLAIM` checks the entry.
_CHECKING = Claim(CLAIM_CHECK)

Outcomes = dict[str, Entry | None]
#: A slot group's (key, entry) pairs to store; None: only end the lease.
_Items = list[tuple[str, Entry | None]]
#: Per slot group of `STORE_MANY`: its items, and per item the tag sets to record it in
#: separately (a cluster's) with the ARGV of `TAG`.
_Tags = list[tuple[_Items, list[tuple[list[str], list[str]]]]]
#: What a key computed alone (the single-key `fill` fallback) stands for when the function
#: left its id out: already expired, so `STORE` is skipped and the lease just released.
_NOTHING = Entry(None, created=0.0, ttl=0.0)


class _Plan:
    """The Redis keys, token and lease of each key of one `fill_many` call."""

    __slots__ = ("keys", "leases")

    def __init__(self, layout: KeyLayout, keys: list[str], tags: dict[str, tuple[str, ...]]):
        self.keys = {key: Keys(layout, key) for key in keys}
        self.leases = {
            key: Lease(
                key, k.lease, secrets.token_hex(16), [layout.tag(t) for t in tags.get(key, ())]
            )
            for key, k in self.keys.items()
        }


class _Fill:
    """One `fill_many` call: its plan, its waiters, what its claims said and what came of
    each key. Belongs to that call (its thread or task) only."""

    __slots__ = ("errors", "lead", "outcomes", "plan", "todo", "wait", "waiters")

    def __init__(
        self,
        layout: KeyLayout,
        keys: list[str],
        tags: dict[str, tuple[str, ...]],
        waiters: dict[str, Any],
    ) -> None:
        self.plan = _Plan(layout, keys, tags)
        self.waiters = waiters  # key -> its ThreadWaiter or AsyncWaiter
        self.todo = keys  # to claim (again, without the check)
        self.outcomes: Outcomes = {}  # entries found (stored, fresh, pushed) or computed
        self.lead: list[str] = []  # leases taken
        self.wait: dict[str, tuple[str, float]] = {}  # key -> (lease holder, seconds)
        self.errors: dict[str, Exception] = {}  # key -> the exception that is its outcome

    def claimed(self, listener: Listener) -> list[str]:
        """The claims are done: unregister the waiters of the keys not waiting; the keys to
        lead."""
        for key in (*self.lead, *self.outcomes):
            listener.remove(key, self.waiters[key])
        return self.lead

    def alone(self, key: str, entry: Entry) -> None:
        self.outcomes[key] = None if entry is _NOTHING else entry

    @contextlib.contextmanager
    def errors_of(self, keys: list[str]) -> Iterator[None]:
        """An exception of the computation of `keys` (here, or the `LeaderFailedError` of
        their leader elsewhere) becomes theirs alone: the other keys of the call go on. A
        failing store (`BackendError`) and cancellations still end the whole call."""
        try:
            yield
        except BackendError:
            raise
        except Exception as exc:
            self.errors.update(dict.fromkeys(keys, exc))

    def result(self) -> Outcomes:
        """Every key's outcome, or `PartlyFailed` when some keys have an exception instead."""
        if self.errors:
            raise PartlyFailed(self.outcomes, self.errors)
        return self.outcomes


class Batches:
    """`get_many` and `fill_many` (and their async twins) for `RedisStore`, over its `Leases`
    (the same connection, listener, near cache, renewer and lease protocol)."""

    def __init__(self, leases: Leases) -> None:
        self.leases = leases
        self._conn = leases.conn
        self._layout = leases.layout
        self._listener = leases.listener
        self._near = leases.near
        self._renewer = leases.renewer
        self.serializer = leases.serializer
        self.counts = leases.counts
        self.cluster = leases.cluster
        self.lease_ms = leases.lease_ms

    # -- reads -------------------------------------------------------------------------------

    def _mget_plan(self, keys: list[str]) -> tuple[list[Entry | None], list[int], list[str]]:
        """(entries found in the near cache, indexes of the rest, their Redis names)."""
        found: list[Entry | None] = [None] * len(keys)
        todo: list[int] = []
        names: list[str] = []
        near = self._near
        for index, key in enumerate(keys):
            if not encodable(key):
                continue  # a raw key the core stores escaped (see `RedisStore.get`)
            entry = near.get(key) if near is not None else None
            if entry is not None:
                found[index] = entry
                continue
            todo.append(index)
            names.append(self._layout.entry(key))
        return found, todo, names

    def _decoded(
        self,
        keys: list[str],
        found: list[Entry | None],
        todo: list[int],
        values: list[Any],
        generation: int,
    ) -> list[Entry | None]:
        near = self._near
        for index, data in zip(todo, values, strict=True):
            entry = self.leases._decode(keys[index], data)
            found[index] = entry
            if entry is not None and near is not None:
                near.remember(keys[index], entry, generation)
        return found

    def get_many(self, keys: list[str]) -> list[Entry | None]:
        """The near cache, then one `MGET` (per slot on a cluster) for the rest."""
        generation = self._listener.generation
        found, todo, names = self._mget_plan(keys)
        if not names:
            return found
        return self._decoded(keys, found, todo, self._conn.mget(names), generation)

    async def aget_many(self, keys: list[str]) -> list[Entry | None]:
        generation = self._listener.generation
        found, todo, names = self._mget_plan(keys)
        if not names:
            return found
        return self._decoded(keys, found, todo, await self._conn.amget(names), generation)

    # -- the scripts' arguments (no I/O) ------------------------------------------------------

    def _groups(self, keys: list[str]) -> list[list[str]]:
        """`keys` by cluster slot (one group on a single server), each in the given order."""
        if not keys:
            return []
        if not self.cluster:
            return [keys]
        return slot_groups(keys, self._layout.entry)

    def _claim_many_args(
        self, group: list[str], plan: _Plan, mode: str, now: int
    ) -> tuple[list[str], list[Any]]:
        keys: list[str] = []
        args: list[Any] = [self.lease_ms, mode, now + self.lease_ms, now]
        for key in group:
            k, lease = plan.keys[key], plan.leases[key]
            tag_keys = [] if self.cluster else lease.tag_keys  # cluster: `_tag_leases`
            keys += [k.entry, k.lease, k.waiters, *tag_keys]
            args += [len(tag_keys), lease.token, key]
        return keys, args

    def _store_many_args(
        self, group: list[tuple[str, Entry | None]], plan: _Plan
    ) -> tuple[list[str], list[Any], list[tuple[list[str], list[str]]]]:
        """KEYS and ARGV of `STORE_MANY`, and per key the tag sets to record separately (a
        cluster) with the ARGV of `TAG`."""
        keys: list[str] = []
        args: list[Any] = []
        separate: list[tuple[list[str], list[str]]] = []
        for key, entry in group:
            k, token = plan.keys[key], plan.leases[key].token
            stored = None if entry is None else self.leases.store_args(key, k, entry, token)
            if stored is None:  # absent, or past its window already: only end the lease
                keys += [k.entry, k.lease, k.waiters, k.handed]
                args += [0, token, "", "-1", 0]
                separate.append(([], []))
                continue
            item_keys, item_args, tag_keys, tag_args = stored
            keys += item_keys
            args += [len(item_keys) - 4, *item_args]
            separate.append((tag_keys, tag_args))
        return keys, args, separate

    def _sort_claims(self, groups: list[list[str]], replies: list[Any], claims: _Fill) -> None:
        """Sort each key by its `CLAIM_MANY` reply (`replies`: one list per group) into
        `claims`, whose `todo` becomes the keys to claim again without the check (stale,
        corrupt or foreign entries)."""
        again: list[str] = []
        for group, group_replies in zip(groups, replies, strict=True):
            for key, reply in zip(group, group_replies, strict=True):
                step, claim = self.leases.claim_step(key, reply, _CHECKING)
                if step.kind == LEAD:
                    claims.lead.append(key)
                elif step.kind == ENTRY:
                    claims.outcomes[key] = self.leases.serve(step.entry)
                elif step.kind == WAIT:
                    claims.wait[key] = (claim.seen, step.seconds)
                else:
                    again.append(key)
        claims.todo = again

    def _claim_calls(self, groups: list[list[str]], plan: _Plan, mode: str) -> list[ScriptCall]:
        """`CLAIM_MANY` of each slot group, to send at once (no waiting group by group)."""
        now = self._now_ms()
        return [(CLAIM_MANY, *self._claim_many_args(group, plan, mode, now)) for group in groups]

    def _alone(self, key: str, holder: str, tags: tuple[str, ...]) -> Call:
        """For `_claim_alone`: a caller of `key` alone that waited for lease `holder`."""
        call = self.leases.begin(key, tags, False)
        call.claim = Claim(CLAIM_CHECK, holder, (holder,) if holder else (), True)
        return call

    # -- sync -------------------------------------------------------------------------------

    def fill_many(
        self,
        keys: list[str],
        compute: Callable[[list[str]], Outcomes],
        *,
        fences: dict[str, Fence],
        tags: dict[str, tuple[str, ...]],
    ) -> Outcomes:
        """Compute each key once across every process sharing this Redis (module doc)."""
        call = _Fill(self._layout, keys, tags, {key: ThreadWaiter() for key in keys})
        pause = self._start()
        if pause:
            self._listener.ready.wait(pause)
        with self._listening(call):  # subscribe first ...
            for mode in (CLAIM_CHECK, CLAIM_ONLY):  # ... then check; claim the stale again
                groups = self._groups(call.todo)
                replies = self._conn.scripts(self._claim_calls(groups, call.plan, mode))
                self._sort_claims(groups, replies, call)
            lead = call.claimed(self._listener)
            if lead:
                with call.errors_of(lead):
                    call.outcomes.update(self._lead_many(lead, call.plan, compute, fences))
            for key, (holder, seconds) in call.wait.items():
                if self._pushed(call, key, call.waiters[key].wait(seconds), holder):
                    continue
                with call.errors_of([key]):
                    one = _one(compute, key)
                    call.alone(key, self._claim_alone(key, holder, one, fences[key], tags[key]))
            return call.result()

    def _claim_alone(
        self,
        key: str,
        holder: str,
        compute: Callable[[], Entry],
        fence: Fence,
        tags: tuple[str, ...],
    ) -> Entry:
        """A key whose wait was not answered by the push of lease `holder`: one `CLAIM` that
        knows that lease (its failure raises `LeaderFailedError` here, as for a single key;
        its handed entry is taken), then lead it alone, or wait through the single-key
        `fill`."""
        call = self._alone(key, holder, tags)
        reply = self._conn.script(CLAIM, *self.leases.claim_args(call))
        step = self.leases.next_step(call, reply)
        if step.kind == ENTRY:
            return self.leases.serve(step.entry)
        if step.kind != LEAD:
            return self.leases.fill(key, compute, fence=fence, tags=tags)
        for tag_key, tag_args in self.leases.taking_over(call):
            self._conn.quietly(TAG, [tag_key], tag_args)
        return self.leases.lead(key, call.k, call.lease, compute, fence)

    def _lead_many(
        self, lead: list[str], plan: _Plan, compute: Callable[[list[str]], Outcomes], fences: Any
    ) -> Outcomes:
        """Holding the leases of `lead`: compute them in one call, then store each fenced."""
        leases, resets, tag_writes = self._leading(lead, plan)
        with contextlib.suppress(BackendError):  # best effort, as `quietly`; all at once
            self._conn.scripts(tag_writes)
        try:
            outcomes = compute(lead)
        except BaseException as exc:  # FAIL (an exception) or RELEASE each lease
            for ending in self._endings(leases, plan, exc):
                self._conn.quietly(*ending)
            raise
        finally:
            self._not_renewing(leases)
        items, fenced = self._storable(lead, outcomes, fences, resets)
        for key, entry in fenced:
            self.leases.hand(key, plan.keys[key], entry, plan.leases[key].token)
        try:
            self._store_groups(self._item_groups(items), plan)
        except BaseException:
            self._release(leases, plan)
            raise
        return outcomes

    def _store_groups(self, groups: list[_Items], plan: _Plan) -> None:
        """`STORE_MANY` of every slot group at once, then the tag writes of the entries they
        stored (a cluster's) at once: one round trip of waiting each, not one per group."""
        generation = self._listener.generation  # before the write: see `NearCache.remember`
        stores, tags = self._store_calls(groups, plan)
        self._conn.scripts(self._tag_writes(tags, self._conn.scripts(stores), generation))

    def _release(self, leases: list[Lease], plan: _Plan) -> None:
        """Hand a failed batch's leases over, best effort (`RedisConnection.each`): every
        node that answers releases its leases, whichever other node failed (else waiters in
        other processes stall until `lease_ttl`); a failed node costs one timeout for the
        lot, not one per lease, and keeps its leases until they expire. A failure is
        counted and logged by the breaker, never raised."""
        self._conn.each(
            [
                (RELEASE, [lease.lease], [lease.token, plan.keys[lease.key].channel])
                for lease in leases
            ]
        )

    # -- async ------------------------------------------------------------------------------

    async def afill_many(
        self,
        keys: list[str],
        compute: Callable[[list[str]], Awaitable[Outcomes]],
        *,
        fences: dict[str, Fence],
        tags: dict[str, tuple[str, ...]],
    ) -> Outcomes:
        """`fill_many` for asyncio: the same steps, awaiting."""
        loop = asyncio.get_running_loop()
        call = _Fill(self._layout, keys, tags, {key: AsyncWaiter(loop) for key in keys})
        pause = self._start()
        if pause:
            await asyncio.to_thread(self._listener.ready.wait, pause)
        with self._listening(call):  # subscribe first ...
            for mode in (CLAIM_CHECK, CLAIM_ONLY):  # ... then check; claim the stale again
                groups = self._groups(call.todo)
                replies = await self._conn.ascripts(self._claim_calls(groups, call.plan, mode))
                self._sort_claims(groups, replies, call)
            lead = call.claimed(self._listener)
            if lead:
                with call.errors_of(lead):
                    call.outcomes.update(await self._alead_many(lead, call.plan, compute, fences))
            for key, (holder, seconds) in call.wait.items():
                if self._pushed(call, key, await call.waiters[key].wait(seconds), holder):
                    continue
                with call.errors_of([key]):
                    one = _aone(compute, key)
                    alone = await self._aclaim_alone(key, holder, one, fences[key], tags[key])
                    call.alone(key, alone)
            return call.result()

    async def _aclaim_alone(
        self,
        key: str,
        holder: str,
        compute: Callable[[], Awaitable[Entry]],
        fence: Fence,
        tags: tuple[str, ...],
    ) -> Entry:
        call = self._alone(key, holder, tags)
        reply = await self._conn.ascript(CLAIM, *self.leases.claim_args(call))
        step = self.leases.next_step(call, reply)
        if step.kind == ENTRY:
            return self.leases.serve(step.entry)
        if step.kind != LEAD:
            return await self.leases.afill(key, compute, fence=fence, tags=tags)
        for tag_key, tag_args in self.leases.taking_over(call):
            await self._conn.aquietly(TAG, [tag_key], tag_args)
        return await self.leases.alead(key, call.k, call.lease, compute, fence)

    async def _alead_many(
        self,
        lead: list[str],
        plan: _Plan,
        compute: Callable[[list[str]], Awaitable[Outcomes]],
        fences: Any,
    ) -> Outcomes:
        leases, resets, tag_writes = self._leading(lead, plan)  # renewed by the thread too
        with contextlib.suppress(BackendError):
            await self._conn.ascripts(tag_writes)
        try:
            outcomes = await compute(lead)
        except Exception as exc:
            for ending in self._endings(leases, plan, exc):
                await self._conn.aquietly(*ending)
            raise
        except BaseException:  # cancelled: hand over at once, without awaiting here
            self.leases.in_background(asyncio.to_thread(self._release, leases, plan))
            raise
        finally:
            self._not_renewing(leases)
        items, fenced = self._storable(lead, outcomes, fences, resets)
        for key, entry in fenced:
            await self.leases.ahand(key, plan.keys[key], entry, plan.leases[key].token)
        try:
            await self._astore_groups(self._item_groups(items), plan)
        except BaseException:
            self.leases.in_background(asyncio.to_thread(self._release, leases, plan))
            raise
        return outcomes

    async def _astore_groups(self, groups: list[_Items], plan: _Plan) -> None:
        generation = self._listener.generation
        stores, tags = self._store_calls(groups, plan)
        await self._conn.ascripts(
            self._tag_writes(tags, await self._conn.ascripts(stores), generation)
        )

    # -- shared --------------------------------------------------------------------------------

    def _start(self) -> float:
        """Start the listener; how long to wait for it to subscribe (once per store, so that
        pushes reach its waiters), 0: no wait."""
        self._listener.start()
        return self.leases.subscribe_wait()

    @contextlib.contextmanager
    def _listening(self, call: _Fill) -> Iterator[None]:
        """`call`'s waiters registered with the listener meanwhile (before any claim)."""
        for key, waiter in call.waiters.items():
            self._listener.add(key, waiter)
        try:
            yield
        finally:
            for key, waiter in call.waiters.items():
                self._listener.remove(key, waiter)

    def _pushed(self, call: _Fill, key: str, message: bytes | None, holder: str) -> bool:
        """Whether the wait for `key` ended with the entry lease `holder` pushed (kept)."""
        self._listener.remove(key, call.waiters[key])
        entry = self.leases.pushed(key, message, holder)
        if entry is not None:
            call.outcomes[key] = entry
        return entry is not None

    def _leading(self, lead: list[str], plan: _Plan) -> tuple[list[Lease], int, list[ScriptCall]]:
        """The leases of `lead` taken: counted and renewed from now on; (those leases, the
        listener's resets now, the tag writes a cluster records right after the claim)."""
        self.counts["leads"] += len(lead)
        resets = self._listener.resets
        leases = [plan.leases[key] for key in lead]
        writes: list[ScriptCall] = [
            (TAG, [tag_key], tag_args)
            for tag_keys, tag_args in self._tag_leases(leases)
            for tag_key in tag_keys
        ]
        for lease in leases:
            self._renewer.add(lease)
        return leases, resets, writes

    def _not_renewing(self, leases: list[Lease]) -> None:
        for lease in leases:
            self._renewer.remove(lease.token)

    def _endings(
        self, leases: list[Lease], plan: _Plan, exc: BaseException
    ) -> list[tuple[Any, list[str], Any]]:
        """The computation raised `exc`: the script ending each lease (FAIL or RELEASE).
        (The caller's `finally` takes the leases off the renewer.)"""
        return [self.leases.ending(plan.keys[lease.key], lease.token, exc) for lease in leases]

    def _store_calls(self, groups: list[_Items], plan: _Plan) -> tuple[list[ScriptCall], _Tags]:
        """(the `STORE_MANY` of each slot group, to send at once; per group its items with
        the tag sets each records separately (a cluster), for `_tag_writes`)."""
        calls: list[ScriptCall] = []
        tags: _Tags = []
        for group in groups:
            keys, args, separate = self._store_many_args(group, plan)
            calls.append((STORE_MANY, keys, args))
            tags.append((group, separate))
        return calls, tags

    def _tag_writes(self, tags: _Tags, stored: list[Any], generation: int) -> list[ScriptCall]:
        """After the `STORE_MANY`s answered `stored` (one reply list per group of `tags`):
        the tag writes of the entries they stored, to send at once."""
        writes: list[ScriptCall] = []
        for (group, separate), replies in zip(tags, stored, strict=True):
            for (key, entry), ok, (tag_keys, tag_args) in zip(
                group, replies, separate, strict=True
            ):
                if entry is not None and self.leases.stored(key, entry, ok, generation):
                    writes += [(TAG, [tag_key], tag_args) for tag_key in tag_keys]
        return writes

    @staticmethod
    def _now_ms() -> int:
        return int(time.time() * 1000)

    def _tag_leases(self, leases: list[Lease]) -> list[tuple[list[str], list[Any]]]:
        """On a cluster: per lease, the tag sets to record its key in right after the claim
        (best effort, as `fill` does; see `lease`)."""
        found = (self.leases.claim_tags(lease) for lease in leases)
        return [tags for tags in found if tags is not None]

    def _storable(
        self, lead: list[str], outcomes: Outcomes, fences: dict[str, Fence], resets: int
    ) -> tuple[list[tuple[str, Entry | None]], list[tuple[str, Entry]]]:
        """(the (key, entry) pairs to store, None: only end the lease; the fenced pairs, whose
        entries are handed to their waiters instead, see `HAND`)."""
        items: list[tuple[str, Entry | None]] = []
        fenced: list[tuple[str, Entry]] = []
        for key in lead:
            entry = outcomes[key]
            if entry is not None and not self.leases.may_store(fences[key], resets):
                self.counts["fenced"] += 1
                fenced.append((key, entry))
            else:
                items.append((key, entry))
        return items, fenced

    def _item_groups(self, items: _Items) -> list[_Items]:
        by_key = dict(items)
        return [[(key, by_key[key]) for key in group] for group in self._groups(list(by_key))]


def _one(compute: Callable[[list[str]], Outcomes], key: str) -> Callable[[], Entry]:
    """`compute` for `key` alone, as the single-key `fill` wants it."""

    def one() -> Entry:
        entry = compute([key])[key]
        return _NOTHING if entry is None else entry

    return one


def _aone(compute: Callable[[list[str]], Awaitable[Outcomes]], key: str) -> Callable[[], Any]:
    async def one() -> Entry:
        entry = (await compute([key]))[key]
        return _NOTHING if entry is None else entry

    return one
