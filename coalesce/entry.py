"""The stored entry and the pure decisions about its freshness.

An entry is what every store keeps under a key: the value and the facts needed to decide,
without I/O, what a reader does with it (`decide`):

* `FRESH`: serve it;
* `EARLY`: serve it, and refresh it in the background now, before it expires (XFetch:
  Vattani, Chierichetti and Lowenstein, "Optimal Probabilistic Cache Stampede Prevention",
  VLDB 2015: the closer the expiry and the longer the last computation took, the likelier);
* `STALE`: within its `stale_ttl` window: serve it while one caller refreshes it;
* `EXPIRED`: recompute. An expired entry may still be *kept* (`kept_until`) for
  `stale_if_error`: served only when its recomputation fails or times out
  (`usable_on_error`).

Times are seconds of the cache's clock: wall-clock `time.time()` by default, so that
processes on several machines agree on an entry's age; `Cache(clock=...)` replaces it for
the memory store (tests drive expiry without sleeping).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

Clock = Callable[[], float]


class Freshness(Enum):
    FRESH = "fresh"
    EARLY = "early"  # fresh, but refresh it now (probabilistic early expiration)
    STALE = "stale"
    EXPIRED = "expired"


@dataclass(slots=True)
class Entry:
    """One cached value.

    `ttl` is how long the value is fresh; `stale_ttl` how much longer it may be served stale
    while one caller recomputes it; `stale_if_error` how long after its expiry it may still
    be served when recomputing it fails. `ttl=None` means it never expires by time. Entries
    are not changed after they are made: stores share them between readers.
    """

    value: Any
    created: float = field(default_factory=time.time)
    ttl: float | None = None
    stale_ttl: float = 0.0
    compute_time: float = 0.0
    tags: tuple[str, ...] = ()
    #: True for a negatively cached failure: `value` is [module, qualname, message].
    error: bool = False
    stale_if_error: float = 0.0
    #: When the value stops being fresh; derived, read on every hit.
    fresh_until: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.fresh_until = math.inf if self.ttl is None else self.created + self.ttl

    @property
    def stale_until(self) -> float:
        """The end of the stale-while-revalidate window."""
        return self.fresh_until + self.stale_ttl

    @property
    def kept_until(self) -> float:
        """Until when a store keeps the entry: the later end of its two stale windows."""
        return self.fresh_until + max(self.stale_ttl, self.stale_if_error)

    def usable_on_error(self, now: float) -> bool:
        """Whether the value may stand in for a failed or timed-out recomputation now."""
        return not self.error and now < self.kept_until

    def freshness(self, now: float) -> Freshness:
        """`decide` without early refresh."""
        return decide(self, now)

    def age(self, now: float) -> float:
        return max(0.0, now - self.created)

    def remaining(self, now: float) -> float | None:
        """Seconds of freshness left (never negative), or None for an entry without TTL."""
        if self.ttl is None:
            return None
        return max(0.0, self.fresh_until - now)

    def keep_for(self, now: float) -> float | None:
        """How long a store should keep the entry: until both stale windows end."""
        if self.ttl is None:
            return None
        return max(0.0, self.kept_until - now)


def decide(
    entry: Entry, now: float, beta: float = 0.0, draw: Callable[[], float] = random.random
) -> Freshness:
    """What a reader does with `entry` at `now` (see the module docstring).

    `beta > 0` turns on early refresh: a fresh entry is `EARLY` when
    `now + compute_time * beta * -ln(u) >= fresh_until` for `u = 1 - draw()` in (0, 1].
    """
    fresh_until = entry.fresh_until
    if now < fresh_until:
        if beta and now - entry.compute_time * beta * math.log(1.0 - draw()) >= fresh_until:
            return Freshness.EARLY
        return Freshness.FRESH
    if now < fresh_until + entry.stale_ttl:
        return Freshness.STALE
    return Freshness.EXPIRED


#: How long a value served because its recomputation failed (`stale_if_error`) is served
#: before the source is tried again: about once a second per key, not once per caller.
RETRY_FAILED_AFTER = 1.0


def retry_entry(previous: Entry, now: float) -> Entry:
    """The entry that keeps serving `previous` after its recomputation failed at `now`.

    Fresh for `RETRY_FAILED_AFTER` seconds (or until the stale-if-error window ends, if
    sooner); its own `stale_if_error` ends where `previous`'s did, so repeated failures
    never stretch the window.
    """
    deadline = previous.kept_until
    ttl = max(0.0, min(RETRY_FAILED_AFTER, deadline - now))
    return Entry(
        previous.value,
        now,
        ttl,
        0.0,
        previous.compute_time,
        previous.tags,
        False,
        max(0.0, deadline - now - ttl),
    )


#: What `Cache.read` returns when the store failed: an entry that is always expired (so every
#: reader treats it as a miss), telling the rest of the call not to try the store again: one
#: wait for a hung Redis per call, not one per step.
STORE_FAILED = Entry(None, created=0.0, ttl=0.0)
