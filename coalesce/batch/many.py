"""A call of a `cached_many` function: read every id's entry in one pass, compute the rest.

1. key per id (`BatchPolicy.make_key`), ids rendering to one key computed once;
2. one `store.get_many` (memory: dict lookups; Redis: the near cache, then one `MGET` per
   slot); `sort` decides without I/O what each entry means: served (fresh, a fresh
   absence, or stale within `stale_ttl`: served and refreshed in the background) or missing;
3. the missing ids through `lead.compute_missing`: each computed once in this process (and
   across processes on Redis), the function given only those ids, in the caller's order;
4. `assemble`: the dict of found ids, each value a private copy, in the caller's order.

A disabled cache (`enabled=False`, `COALESCE_DISABLED=1`) calls the function as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from coalesce.batch.lead import Outcomes, acompute_missing, compute_missing
from coalesce.batch.policy import BatchPolicy, usable
from coalesce.entry import STORE_FAILED, Entry
from coalesce.errors import BackendError, KeyBuildError
from coalesce.values import Frozen

if TYPE_CHECKING:
    from coalesce.cache import Cache

Ids = dict[str, list[Any]]  # full key -> its ids (`keys_of`)


def keys_of(cache: Cache, policy: BatchPolicy, ids: Iterable[Any]) -> Ids:
    """Full key -> the ids rendering to it, in the order the ids were given."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise KeyBuildError(
            f"{policy.name}() takes a list of ids (cached_many), not {type(ids).__name__}"
        )
    try:
        unique = dict.fromkeys(ids)
    except TypeError as exc:
        raise KeyBuildError(f"{policy.name}(): every id must be hashable ({exc})") from None
    by_key: dict[str, list[Any]] = {}
    prefix, make = cache.prefix, policy.make_key
    for id_ in unique:
        by_key.setdefault(prefix + make(id_), []).append(id_)
    return by_key


def sort(
    keys: list[str], entries: list[Entry | None], now: float
) -> tuple[Outcomes, list[str], list[str]]:
    """(served outcomes, stale keys among them to refresh, missing keys); no I/O."""
    served: Outcomes = {}
    stale: list[str] = []
    missing: list[str] = []
    for key, entry in zip(keys, entries, strict=True):
        if usable(entry, now):
            served[key] = entry
        elif entry is not None and not entry.error and now < entry.stale_until:
            served[key] = entry
            stale.append(key)
        else:
            missing.append(key)
    return served, stale, missing


def assemble(by_key: dict[str, list[Any]], outcomes: Outcomes) -> dict[Any, Any]:
    """The caller's result: each found id's own copy of its value, in the caller's order."""
    result: dict[Any, Any] = {}
    for key, ids in by_key.items():
        entry = outcomes.get(key)
        if entry is None or entry.error:
            continue  # absent (or stored as absent)
        value = entry.value
        for id_ in ids:
            result[id_] = value.thaw() if type(value) is Frozen else value
    return result


def _read(cache: Cache, policy: BatchPolicy, keys: list[str]) -> list[Entry | None]:
    try:
        return cache.store.get_many(keys)
    except BackendError as exc:
        return _fallbacks(cache, policy, keys, exc)


async def _aread(cache: Cache, policy: BatchPolicy, keys: list[str]) -> list[Entry | None]:
    if cache.local:
        return cache.store.get_many(keys)
    try:
        return await cache.store.aget_many(keys)
    except BackendError as exc:
        return _fallbacks(cache, policy, keys, exc)


def _fallbacks(
    cache: Cache, policy: BatchPolicy, keys: list[str], exc: BackendError
) -> list[Entry | None]:
    """The read failed: what this process kept (raises when failing closed)."""
    cache._backend_failed(policy, exc)
    return [cache._fallback(key) for key in keys]


def _decide(
    cache: Cache, policy: BatchPolicy, by_key: Ids, entries: list[Entry | None]
) -> tuple[Outcomes, Ids, Ids, bool]:
    """(served outcomes, the stale ids to refresh, the missing ids to compute, whether the
    read failed), the reads counted; no I/O."""
    served, stale, missing = sort(list(by_key), entries, cache.clock())
    policy.count_reads(len(served) - len(stale), len(stale), len(missing))
    failed = bool(missing) and any(entry is STORE_FAILED for entry in entries)  # a miss
    return served, _subset(by_key, stale), _subset(by_key, missing), failed


def _subset(by_key: Ids, keys: list[str]) -> Ids:
    return {key: by_key[key] for key in keys}


# ---------------------------------------------------------------------------------------
# the two drivers


def call_many(policy: BatchPolicy, ids: Iterable[Any]) -> dict[Any, Any]:
    """A call of a sync `cached_many` function with `ids`."""
    cache = policy.cache
    assert cache is not None
    if not cache.enabled:
        return policy.fn(list(ids))  # type: ignore[no-any-return]
    by_key = keys_of(cache, policy, ids)
    entries = _read(cache, policy, list(by_key))
    served, stale, missing, failed = _decide(cache, policy, by_key, entries)
    if stale:
        cache._refresh_in_background(
            next(iter(stale)), lambda: compute_missing(cache, policy, stale, failed=False)
        )
    if missing:
        served.update(compute_missing(cache, policy, missing, failed))
    return assemble(by_key, served)


async def acall_many(policy: BatchPolicy, ids: Iterable[Any]) -> dict[Any, Any]:
    """A call of an async `cached_many` function with `ids`."""
    cache = policy.cache
    assert cache is not None
    if not cache.enabled:
        return await policy.fn(list(ids))  # type: ignore[no-any-return]
    by_key = keys_of(cache, policy, ids)
    entries = await _aread(cache, policy, list(by_key))
    served, stale, missing, failed = _decide(cache, policy, by_key, entries)
    if stale:
        refresh = acompute_missing(cache, policy, stale, False)
        cache._arefresh_in_background(next(iter(stale)), refresh)
    if missing:
        served.update(await acompute_missing(cache, policy, missing, failed))
    return assemble(by_key, served)
