"""The stored entry and the pure decisions about its freshness.

An entry is what every store keeps under a key: the value and the facts needed to decide,
without I/O, whether it may be served (`fresh`), served while one caller refreshes it
(`stale`, within the stale-while-revalidate window) or must be recomputed (`expired`).
Times are wall-clock seconds (`time.time()`), so that processes on several machines agree
on an entry's age.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Freshness(Enum):
    FRESH = "fresh"
    STALE = "stale"
    EXPIRED = "expired"


@dataclass(slots=True)
class Entry:
    """One cached value.

    `ttl` is how long the value is fresh; `stale_ttl` how much longer it may be served stale
    while one caller recomputes it. `ttl=None` means it never expires by time. Entries are
    not changed after they are made: stores share them between readers.
    """

    value: Any
    created: float = field(default_factory=time.time)
    ttl: float | None = None
    stale_ttl: float = 0.0
    compute_time: float = 0.0
    tags: tuple[str, ...] = ()
    #: True for a negatively cached failure: `value` is [module, qualname, message].
    error: bool = False
    #: When the value stops being fresh; derived, read on every hit.
    fresh_until: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.fresh_until = float("inf") if self.ttl is None else self.created + self.ttl

    @property
    def stale_until(self) -> float:
        return self.fresh_until + self.stale_ttl

    def freshness(self, now: float) -> Freshness:
        if now < self.fresh_until:
            return Freshness.FRESH
        if now < self.stale_until:
            return Freshness.STALE
        return Freshness.EXPIRED

    def age(self, now: float) -> float:
        return max(0.0, now - self.created)

    def remaining(self, now: float) -> float | None:
        """Seconds of freshness left (never negative), or None for an entry without TTL."""
        if self.ttl is None:
            return None
        return max(0.0, self.fresh_until - now)

    def keep_for(self, now: float) -> float | None:
        """How long a store should keep the entry: until its stale window ends."""
        if self.ttl is None:
            return None
        return max(0.0, self.stale_until - now)


#: What `Cache.read` returns when the store failed: an entry that is always expired (so every
#: reader treats it as a miss), telling the rest of the call not to try the store again: one
#: wait for a hung Redis per call, not one per step.
STORE_FAILED = Entry(None, created=0.0, ttl=0.0)
