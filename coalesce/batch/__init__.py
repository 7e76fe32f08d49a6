"""Batch loading: `Cache.cached_many`, one backend call per missing id among overlapping callers.

Modules: `policy` (keys and tags per id, options, the absent marker), `flights` (per-id
flights of batches), `many` (a call: read in one pass, sort, assemble), `leader` (one led
batch: the steps both drivers share), `lead` (computing the missing ids, sync and async
side by side), `loader` (`load(id)` batching, DataLoader style). The stores' share is
`Store.get_many` / `fill_many` (Redis: `MGET` per slot, leases per id in one script).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from coalesce.batch.loader import AsyncLoader, ThreadLoader
from coalesce.batch.many import acall_many, call_many
from coalesce.batch.policy import DEFAULT_BATCH_WINDOW, DEFAULT_MAX_BATCH, BatchPolicy
from coalesce.errors import ConfigurationError
from coalesce.options import Options

if TYPE_CHECKING:
    from coalesce.cache import Cache

__all__ = [
    "DEFAULT_BATCH_WINDOW",
    "DEFAULT_MAX_BATCH",
    "BatchPolicy",
    "CachedMany",
    "make_cached_many",
]


class CachedMany(Protocol):
    """What `Cache.cached_many` returns: the batch function (a dict of the ids found, or an
    awaitable of it for an async function), plus `load`, `invalidate`, `key` and `stats`."""

    def __call__(self, ids: Iterable[Any], /) -> Any: ...

    def load(self, id_: Any, /) -> Any:
        """One id's value (None: absent), batched with the other `load` calls; awaitable for
        an async function."""
        ...

    def invalidate(self, id_: Any, /) -> Any:
        """Delete one id's entry: `bool`, or an awaitable of it for an async function."""
        ...

    def key(self, id_: Any, /) -> str:
        """The key (without namespace) of one id's entry."""
        ...

    def stats(self) -> dict[str, Any]:
        """This function's counters."""
        ...


def make_cached_many(
    cache: Cache,
    *,
    key: str,
    tags: Sequence[str],
    cache_missing: float | None,
    batch_window: float,
    max_batch: int,
    **options: Any,
) -> Callable[[Callable[..., Any]], CachedMany]:
    """The decorator `Cache.cached_many` returns; every option checked here, once."""
    checked = Options.checked(**options)

    def decorator(fn: Callable[..., Any]) -> CachedMany:
        if not callable(fn):
            raise ConfigurationError(f"cached_many can only decorate functions, not {fn!r}")
        policy = BatchPolicy(
            cache,
            fn,
            key=key,
            tags=tags,
            options=checked,
            cache_missing=cache_missing,
            batch_window=batch_window,
            max_batch=max_batch,
        )
        cache._register(policy)
        return _decorate(cache, policy)

    return decorator


def _decorate(cache: Cache, policy: BatchPolicy) -> CachedMany:
    fn = policy.fn
    wrapper: Any

    if inspect.iscoroutinefunction(fn):

        async def amany(ids: Any) -> dict[Any, Any]:
            return await acall_many(policy, ids)

        async def invalidate(id_: Any) -> bool:
            """Delete the entry of `id_`; True if it existed."""
            policy.stats.invalidations += 1
            return await cache.ainvalidate(policy.make_key(id_))

        wrapper = functools.update_wrapper(amany, fn)
        wrapper.load = AsyncLoader(amany, policy.max_batch).load
    else:

        def many(ids: Any) -> dict[Any, Any]:
            return call_many(policy, ids)

        def invalidate(id_: Any) -> bool:  # type: ignore[misc]
            """Delete the entry of `id_`; True if it existed."""
            policy.stats.invalidations += 1
            return cache.invalidate(policy.make_key(id_))

        wrapper = functools.update_wrapper(many, fn)
        wrapper.load = ThreadLoader(many, policy.batch_window, policy.max_batch).load

    def key(id_: Any) -> str:
        """The key (without namespace) of `id_`'s entry."""
        return policy.make_key(id_)

    def stats() -> dict[str, Any]:
        """This function's counters (`batches`, `batch_ids`: the calls of the function)."""
        return policy.stats.as_dict()

    wrapper.invalidate = invalidate
    wrapper.key = key
    wrapper.stats = stats
    wrapper._policy = policy
    return wrapper  # type: ignore[no-any-return]
