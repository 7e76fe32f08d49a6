"""Counters per decorated function: plain integer attributes, cheap to bump on the hot path.

Increments are not locked: under heavy thread contention a hit or two may go uncounted, the
price of a hit path without a lock. Counts made on the miss path happen once per
computation and are exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Stats:
    """What happened to the calls of one decorated function."""

    name: str
    hits: int = 0  # fresh entries served from the store
    stale: int = 0  # stale entries served while one caller refreshed them
    misses: int = 0  # calls that found no usable entry
    coalesced: int = 0  # callers that received a result computed for another caller
    computations: int = 0  # times the function itself ran (the expensive part)
    errors: int = 0  # computations that raised
    early_refreshes: int = 0  # fresh entries refreshed before expiry (early_refresh)
    stale_on_error: int = 0  # expired entries served because their refresh failed
    timeouts: int = 0  # callers that stopped waiting for a computation (timeout)
    invalidations: int = 0  # entries deleted through this function's invalidate()
    backend_errors: int = 0  # store failures that degraded to computing directly
    compute_time: float = 0.0  # seconds spent in computations, in total
    batches: int = 0  # runs of a `cached_many` function (calls all of whose ids hit: none)
    batch_ids: int = 0  # ids passed to those calls, in total (ids per batch: the ratio)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def ids_per_batch(self) -> float:
        """Ids a `cached_many` function computed per call, on average (0.0: none)."""
        return self.batch_ids / self.batches if self.batches else 0.0

    @property
    def hit_ratio(self) -> float:
        served = self.hits + self.stale + self.misses
        return (self.hits + self.stale) / served if served else 0.0
