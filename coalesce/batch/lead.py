"""Computing the missing ids of a batch call: join the flights of ids in flight, lead the rest.

Sync and async side by side, each in three steps, over the shared steps of `leader.Leader`:

1. `compute_missing` / `acompute_missing`: `BatchFlights.join_or_lead` in one step; lead the
   new flights as one batch, then wait for the joined ones (an `Abandoned` flight: start
   over for its ids). The async leader runs its batch in a task of its own, which the caller
   awaits through `asyncio.shield`: a cancelled caller leaves alone, the batch goes on.
2. `_lead` / `_alead`: on a local store, check again (a batch may have stored since the
   caller's read); then fill the rest, and settle every led flight on every exit.
3. `_fill` / `_afill`: mark the ids computing for their tags, then the store's
   `fill_many` (memory: compute, store each fenced; Redis: leases per id in one script).
   A failing store degrades to computing directly, as `decorators._fill` does.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from coalesce.batch.flights import Abandoned, IdFlight, owner_here, settled
from coalesce.batch.leader import Leader, Outcomes
from coalesce.batch.policy import BatchPolicy
from coalesce.errors import BackendError

if TYPE_CHECKING:
    from coalesce.cache import Cache

__all__ = ["Outcomes", "acompute_missing", "compute_missing"]

_MAX_RESTARTS = 10  # abandoned batches replaced at most this often per call
_perf = time.perf_counter
_tasks: set[asyncio.Task[Any]] = set()  # batch tasks whose callers all left: kept alive

# ---------------------------------------------------------------------------------------
# sync


def compute_missing(
    cache: Cache, policy: BatchPolicy, by_key: dict[str, list[Any]], failed: bool
) -> Outcomes:
    """The outcome of every key of `by_key`, each computed once among overlapping callers."""
    out: Outcomes = {}
    pending = list(by_key)
    me = owner_here()
    for _ in range(_MAX_RESTARTS):
        joined, led = cache.batch_flights.join_or_lead(pending, me, me)
        if led:
            out.update(_lead(Leader(cache, policy, led, by_key, failed)))
        pending = _collect(policy, joined, out)
        if not pending:
            return out
    raise _abandoned(pending)


def _lead(leader: Leader) -> Outcomes:
    with leader.leading():
        keys = leader.todo()
        if keys:
            leader.done.update(_fill(leader, keys))
    return leader.result()


def _fill(leader: Leader, keys: list[str]) -> Outcomes:
    def compute(todo: list[str]) -> Outcomes:
        ids, started = leader.ids(todo), _perf()
        with leader.counting(ids, started):
            got = leader.fn(ids)
        return leader.entries(todo, ids, got, started)

    with leader.computing():
        if not leader.failed:
            try:
                store = leader.cache.store
                return store.fill_many(keys, compute, fences=leader.fences(), tags=leader.tags)
            except BackendError as exc:
                leader.store_failed(exc)
        rest = leader.uncomputed(keys)
        if rest:
            compute(rest)
        return leader.remember(keys)


# ---------------------------------------------------------------------------------------
# async: the same steps, the batch in a task of its own


async def acompute_missing(
    cache: Cache, policy: BatchPolicy, by_key: dict[str, list[Any]], failed: bool
) -> Outcomes:
    """`compute_missing` for async functions."""
    out: Outcomes = {}
    pending = list(by_key)
    me = owner_here()
    for _ in range(_MAX_RESTARTS):
        joined, led = cache.batch_flights.join_or_lead(pending, None, me)
        if led:
            task = _batch_task(Leader(cache, policy, led, by_key, failed))
            out.update(await asyncio.shield(task))
        await settled(list(joined.values()))
        pending = _collect(policy, joined, out)
        if not pending:
            return out
    raise _abandoned(pending)


async def _alead(leader: Leader) -> Outcomes:
    with leader.leading():
        keys = leader.todo()
        if keys:
            leader.done.update(await _afill(leader, keys))
    return leader.result()


async def _afill(leader: Leader, keys: list[str]) -> Outcomes:
    async def compute(todo: list[str]) -> Outcomes:
        ids, started = leader.ids(todo), _perf()
        with leader.counting(ids, started):
            got = await leader.fn(ids)
        return leader.entries(todo, ids, got, started)

    with leader.computing():
        if not leader.failed:
            try:
                store = leader.cache.store
                return await store.afill_many(
                    keys, compute, fences=leader.fences(), tags=leader.tags
                )
            except BackendError as exc:
                leader.store_failed(exc)
        rest = leader.uncomputed(keys)
        if rest:
            await compute(rest)
        return leader.remember(keys)


def _batch_task(leader: Leader) -> asyncio.Task[Outcomes]:
    """The task running `leader`'s batch, owner of its flights, kept alive until it ends."""
    task = asyncio.get_running_loop().create_task(_alead(leader))
    for flight in leader.led.values():
        flight.owner = task
    _tasks.add(task)
    task.add_done_callback(_retrieved)
    return task


def _retrieved(task: asyncio.Task[Any]) -> None:
    """A batch task has ended: drop it, and mark its exception seen (every caller may have
    left; those still waiting received it through the flights)."""
    _tasks.discard(task)
    if not task.cancelled():
        task.exception()


# ---------------------------------------------------------------------------------------
# shared by both


def _collect(policy: BatchPolicy, joined: dict[str, IdFlight], out: Outcomes) -> list[str]:
    """The outcomes of the joined flights into `out` (a thread waits for each here; a task
    has awaited them all first); the keys whose batch was abandoned, to start over."""
    again: list[str] = []
    for key, flight in joined.items():
        try:
            out[key] = flight.wait()
        except Abandoned:
            again.append(key)
    if joined:
        policy.count_shared(len(joined) - len(again))
    return again


def _abandoned(pending: list[str]) -> RuntimeError:
    return RuntimeError(f"the batch computing {pending[0]!r} was abandoned {_MAX_RESTARTS} times")
