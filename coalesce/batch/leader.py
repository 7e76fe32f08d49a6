"""One batch a caller leads: its state, and the steps the sync and async drivers share.

`lead` drives a `Leader` in the order these steps decide, once with threads and once with
asyncio; nothing here waits on anything (the only I/O is `todo`'s look on a local store,
dict lookups, and `remember`, this process's fallback).

    todo ──► compute (the function, once per `fill_many` call) ──► entries
     │              ▲ the store failed: `uncomputed` keys computed directly, `remember`ed
     └──────────────┴──► `leading` ends: every led flight settled (`settle`), then `result`

Concurrency contract: a `Leader` belongs to the thread or task that leads its batch and is
written there only. Its flights are settled once, on every exit of `leading`: with their
entry (`done`), their own exception (`errors`), or `Abandoned` (an interrupt, a cancelled
batch task), upon which their waiters start over.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import coalesce.otel.hook as otel
from coalesce.batch.flights import Abandoned, IdFlight, PartlyFailed
from coalesce.batch.policy import BatchPolicy, usable
from coalesce.entry import Entry
from coalesce.errors import BackendError, ConfigurationError
from coalesce.stores.base import Fence

if TYPE_CHECKING:
    from coalesce.cache import Cache

Outcomes = dict[str, Entry | None]  # full key -> entry (None, or an ABSENT entry: absent)
_perf = time.perf_counter


class Leader:
    """The batch of the flights `led`, computed for the ids `by_key` names."""

    __slots__ = (
        "by_key",
        "cache",
        "computed",
        "done",
        "errors",
        "failed",
        "fn",
        "led",
        "policy",
        "tags",
    )

    def __init__(
        self,
        cache: Cache,
        policy: BatchPolicy,
        led: dict[str, IdFlight],
        by_key: dict[str, list[Any]],
        failed: bool,
    ) -> None:
        self.cache = cache
        self.policy = policy
        self.led = led  # the flights this batch settles
        self.by_key = by_key  # full key -> its ids (the first is the one computed)
        self.failed = failed  # the caller's read failed: compute without the store
        self.done: Outcomes = {}  # led keys settled with their entry
        self.errors: dict[str, BaseException] = {}  # led keys settled with this exception
        self.computed: Outcomes = {}  # every entry the function gave (for a failing store)
        self.tags: dict[str, tuple[str, ...]] = {}  # the keys to compute -> their tags
        tracing = otel.tracing  # None unless coalesce.otel.instrument() was called
        self.fn = policy.fn if tracing is None else tracing.traced_batch(cache, policy)

    # -- before computing ----------------------------------------------------------------------

    def todo(self) -> list[str]:
        """The led keys to compute. On a local store, those stored since the caller's read
        are `done` first (on Redis, `fill_many`'s claim checks again)."""
        cache = self.cache
        if cache.local and not self.failed:
            now = cache.clock()
            for key, entry in zip(self.led, cache.store.get_many(list(self.led)), strict=True):
                if usable(entry, now):
                    self.done[key] = entry
        keys = [key for key in self.led if key not in self.done]
        self.tags = {key: self.policy.tag_names(cache, self.by_key[key], {}) for key in keys}
        return keys

    def fences(self) -> dict[str, Fence]:
        return {key: self.led[key].fence for key in self.tags}

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        """Every key to compute that has tags marked computing: a tag invalidation fences it."""
        with contextlib.ExitStack() as stack:
            for key, names in self.tags.items():
                if names:
                    stack.enter_context(self.cache._computing(key, names))
            yield

    # -- one run of the function ---------------------------------------------------------------

    def ids(self, todo: list[str]) -> list[Any]:
        """The ids the function receives for the keys `todo`, in their order."""
        return [self.by_key[key][0] for key in todo]

    @contextlib.contextmanager
    def counting(self, ids: list[Any], started: float) -> Iterator[None]:
        """Count the run of the function with `ids` (failed or not)."""
        try:
            yield
        except Exception:
            self.policy.count_batch(len(ids), _perf() - started, failed=True)
            raise
        self.policy.count_batch(len(ids), _perf() - started)

    def entries(self, todo: list[str], ids: list[Any], got: Any, started: float) -> Outcomes:
        """The entries of one run's result (`computed` keeps them too)."""
        policy, cache, tags = self.policy, self.cache, self.tags
        if not isinstance(got, Mapping):
            raise ConfigurationError(
                f"{policy.name}() is decorated with cached_many: it must return a dict from "
                f"id to value (ids it leaves out are absent), not {type(got).__name__}"
            )
        out: Outcomes = {}
        for key, id_ in zip(todo, ids, strict=True):
            if id_ in got:
                out[key] = policy.make_entry(cache, got[id_], started, tags[key])
            else:
                out[key] = policy.absent_entry(cache, tags[key])
        self.computed.update(out)
        return out

    # -- without the store ---------------------------------------------------------------------

    def store_failed(self, exc: BackendError) -> None:
        """`fill_many` failed on the store: count it (raises when failing closed)."""
        self.cache._backend_failed(self.policy, exc)

    def uncomputed(self, keys: list[str]) -> list[str]:
        return [key for key in keys if key not in self.computed]

    def remember(self, keys: list[str]) -> Outcomes:
        """The entries of `keys`, computed without the store, handed to its fallback."""
        outcomes = {key: self.computed[key] for key in keys}
        for key, entry in outcomes.items():
            if entry is not None:
                self.cache._remember(key, entry, self.led[key].fence)
        return outcomes

    # -- every exit ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def leading(self) -> Iterator[None]:
        """Settle every led flight on every exit; an exception is kept for `result`."""
        try:
            yield
        except PartlyFailed as exc:  # some keys failed, the others did not
            self.done.update(exc.outcomes)
            self.errors.update(exc.errors)
        except Exception as exc:
            self.errors.update(dict.fromkeys(self.led, exc))
        finally:
            self.cache.batch_flights.finish(self.led)
            for key, flight in self.led.items():
                if key in self.done:
                    flight.settle(self.done[key])
                else:
                    flight.settle(error=self.errors.get(key) or Abandoned())

    def result(self) -> Outcomes:
        """The led keys' entries; or the first exception, as this caller waited on them all."""
        for error in self.errors.values():
            raise error
        return self.done
