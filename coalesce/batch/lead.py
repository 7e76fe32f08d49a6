"""Computing the missing ids of a batch call: join the flights of ids in flight, lead the rest.

Sync and async side by side, each in three steps:

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
import contextlib
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import coalesce.otel.hook as otel
from coalesce.batch.flights import Abandoned, IdFlight, PartlyFailed, owner_here, settled
from coalesce.batch.policy import BatchPolicy, is_absent
from coalesce.entry import Entry
from coalesce.errors import BackendError, ConfigurationError

if TYPE_CHECKING:
    from coalesce.cache import Cache

Outcomes = dict[str, Entry | None]  # full key -> entry (None, or an ABSENT entry: absent)
_MAX_RESTARTS = 10  # abandoned batches replaced at most this often per call
_perf = time.perf_counter
_tasks: set[asyncio.Task[Any]] = set()  # batch tasks whose callers all left: kept alive


def usable(entry: Entry | None, now: float) -> bool:
    """Whether a stored entry answers for its id now: fresh, or a fresh absence."""
    if entry is None or entry.fresh_until <= now:
        return False
    return not entry.error or is_absent(entry)


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
            out.update(_lead(cache, policy, led, by_key, failed))
        pending = []
        for key, flight in joined.items():
            try:
                out[key] = flight.wait()
            except Abandoned:
                pending.append(key)
        if joined:
            policy.count_shared(len(joined) - len(pending))
        if not pending:
            return out
    raise RuntimeError(f"the batch computing {pending[0]!r} was abandoned {_MAX_RESTARTS} times")


def _lead(
    cache: Cache,
    policy: BatchPolicy,
    led: dict[str, IdFlight],
    by_key: dict[str, list[Any]],
    failed: bool,
) -> Outcomes:
    done: Outcomes = {}
    errors: dict[str, BaseException] = {}
    try:
        todo = _checked_again(cache, led, failed, done)
        if todo:
            done.update(_fill(cache, policy, todo, led, by_key, failed))
        return done
    except PartlyFailed as exc:  # some ids failed: this caller waited on them all
        done.update(exc.outcomes)
        errors.update(exc.errors)
    except Exception as exc:
        errors.update(dict.fromkeys(led, exc))
        raise
    finally:
        _settle(cache, led, done, errors)
    raise next(iter(errors.values()))


def _fill(
    cache: Cache,
    policy: BatchPolicy,
    keys: list[str],
    led: dict[str, IdFlight],
    by_key: dict[str, list[Any]],
    failed: bool,
) -> Outcomes:
    tags = {key: policy.tag_names(cache, by_key[key], {}) for key in keys}
    computed: Outcomes = {}
    tracing = otel.tracing  # None unless coalesce.otel.instrument() was called
    fn = policy.fn if tracing is None else tracing.traced_batch(cache, policy)

    def compute(todo: list[str]) -> Outcomes:
        ids = [by_key[key][0] for key in todo]
        started = _perf()
        try:
            got = fn(ids)
        except Exception:
            policy.count_batch(len(ids), _perf() - started, failed=True)
            raise
        policy.count_batch(len(ids), _perf() - started)
        return _entries(cache, policy, todo, ids, got, started, tags, computed)

    fences = {key: led[key].fence for key in keys}
    with _computing(cache, tags):
        if failed:
            return _remember(cache, compute(keys), fences)
        try:
            return cache.store.fill_many(keys, compute, fences=fences, tags=tags)
        except BackendError as exc:
            cache.backend_failed(policy, exc)
            rest = [key for key in keys if key not in computed]
            if rest:
                compute(rest)
            return _remember(cache, {key: computed[key] for key in keys}, fences)


# ---------------------------------------------------------------------------------------
# async: the same steps, the batch in a task of its own


async def acompute_missing(
    cache: Cache, policy: BatchPolicy, by_key: dict[str, list[Any]], failed: bool
) -> Outcomes:
    """`compute_missing` for async functions."""
    out: Outcomes = {}
    pending = list(by_key)
    me = owner_here()
    loop = asyncio.get_running_loop()
    for _ in range(_MAX_RESTARTS):
        joined, led = cache.batch_flights.join_or_lead(pending, None, me)
        task: asyncio.Task[Outcomes] | None = None
        if led:
            task = loop.create_task(_alead(cache, policy, led, by_key, failed))
            for flight in led.values():
                flight.owner = task
            _tasks.add(task)
            task.add_done_callback(_retrieved)
        pending = []
        if task is not None:
            out.update(await asyncio.shield(task))
        await settled(list(joined.values()))
        for key, flight in joined.items():
            try:
                out[key] = flight.wait()  # settled: no blocking
            except Abandoned:
                pending.append(key)
        if joined:
            policy.count_shared(len(joined) - len(pending))
        if not pending:
            return out
    raise RuntimeError(f"the batch computing {pending[0]!r} was abandoned {_MAX_RESTARTS} times")


def _retrieved(task: asyncio.Task[Any]) -> None:
    """A batch task has ended: drop it, and mark its exception seen (every caller may have
    left; those still waiting received it through the flights)."""
    _tasks.discard(task)
    if not task.cancelled():
        task.exception()


async def _alead(
    cache: Cache,
    policy: BatchPolicy,
    led: dict[str, IdFlight],
    by_key: dict[str, list[Any]],
    failed: bool,
) -> Outcomes:
    done: Outcomes = {}
    errors: dict[str, BaseException] = {}
    try:
        todo = _checked_again(cache, led, failed, done)
        if todo:
            done.update(await _afill(cache, policy, todo, led, by_key, failed))
        return done
    except PartlyFailed as exc:  # some ids failed: this caller waited on them all
        done.update(exc.outcomes)
        errors.update(exc.errors)
    except Exception as exc:
        errors.update(dict.fromkeys(led, exc))
        raise
    finally:
        _settle(cache, led, done, errors)
    raise next(iter(errors.values()))


async def _afill(
    cache: Cache,
    policy: BatchPolicy,
    keys: list[str],
    led: dict[str, IdFlight],
    by_key: dict[str, list[Any]],
    failed: bool,
) -> Outcomes:
    tags = {key: policy.tag_names(cache, by_key[key], {}) for key in keys}
    computed: Outcomes = {}
    tracing = otel.tracing  # None unless coalesce.otel.instrument() was called
    fn = policy.fn if tracing is None else tracing.traced_batch(cache, policy)

    async def compute(todo: list[str]) -> Outcomes:
        ids = [by_key[key][0] for key in todo]
        started = _perf()
        try:
            got = await fn(ids)
        except Exception:
            policy.count_batch(len(ids), _perf() - started, failed=True)
            raise
        policy.count_batch(len(ids), _perf() - started)
        return _entries(cache, policy, todo, ids, got, started, tags, computed)

    fences = {key: led[key].fence for key in keys}
    with _computing(cache, tags):
        if failed:
            return _remember(cache, await compute(keys), fences)
        try:
            return await cache.store.afill_many(keys, compute, fences=fences, tags=tags)
        except BackendError as exc:
            cache.backend_failed(policy, exc)
            rest = [key for key in keys if key not in computed]
            if rest:
                await compute(rest)
            return _remember(cache, {key: computed[key] for key in keys}, fences)


# ---------------------------------------------------------------------------------------
# shared by both


def _entries(
    cache: Cache,
    policy: BatchPolicy,
    keys: list[str],
    ids: list[Any],
    got: Any,
    started: float,
    tags: dict[str, tuple[str, ...]],
    computed: Outcomes,
) -> Outcomes:
    """The entries of one batch's result (`computed` keeps them too, for a failing store)."""
    if not isinstance(got, Mapping):
        raise ConfigurationError(
            f"{policy.name}() is decorated with cached_many: it must return a dict from id to "
            f"value (ids it leaves out are absent), not {type(got).__name__}"
        )
    out: Outcomes = {}
    for key, id_ in zip(keys, ids, strict=True):
        if id_ in got:
            out[key] = policy.make_entry(cache, got[id_], started, tags[key])
        else:
            out[key] = policy.absent_entry(cache, tags[key])
    computed.update(out)
    return out


def _checked_again(
    cache: Cache, led: dict[str, IdFlight], failed: bool, done: Outcomes
) -> list[str]:
    """On a local store, the led keys stored since the caller's read go into `done` (no
    I/O); the keys left to compute. (On Redis, `fill_many`'s claim checks again.)"""
    if cache.local and not failed:
        now = cache.clock()
        for key, entry in zip(led, cache.store.get_many(list(led)), strict=True):
            if usable(entry, now):
                done[key] = entry
    return [key for key in led if key not in done]


def _settle(
    cache: Cache, led: dict[str, IdFlight], done: Outcomes, errors: dict[str, BaseException]
) -> None:
    """Take the led flights off the table, then hand each its outcome, its own error, or
    `Abandoned` (the batch left without either: an interrupt, a cancellation)."""
    cache.batch_flights.finish(led)
    for key, flight in led.items():
        if key in done:
            flight.settle(done[key])
        else:
            flight.settle(error=errors.get(key) or Abandoned())


def _remember(cache: Cache, outcomes: Outcomes, fences: dict[str, Any]) -> Outcomes:
    """Hand entries computed because the store failed to its fallback."""
    for key, entry in outcomes.items():
        if entry is not None:
            cache.remember(key, entry, fences[key])
    return outcomes


@contextlib.contextmanager
def _computing(cache: Cache, tags: dict[str, tuple[str, ...]]) -> Any:
    """Mark every key with tags as computing, so a tag invalidation fences it."""
    with contextlib.ExitStack() as stack:
        for key, names in tags.items():
            if names:
                stack.enter_context(cache.computing(key, names))
        yield


ComputeMany = Callable[[list[str]], Outcomes]
