"""The stored entry and the pure decisions about its freshness.

An entry is what every store keeps under a key: the value and the facts needed to decide,
without I/O, what a reader does with it (`decide`):

* `FRESH`: serve it;
* `EARLY`: serve it, and refresh it in the background now, before it expires (XFetch:
  Vattani, Chierichetti and Lowenstein, "Optimal Probabilistic Cache Stampede Prevention",
  VLDB 2015: the closer the expiry and the longer the last computation took, the likelier;
  see `refresh_moment` for the form the decorators use);
* `STALE`: within its `stale_ttl` window (or while its early refresh is landing): serve it
  while one caller refreshes it;
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


@dataclass(slots=True, init=False)
class Entry:
    """One cached value.

    `ttl` is how long the value is fresh; `stale_ttl` how much longer it may be served stale
    while one caller recomputes it; `stale_if_error` how long after its expiry it may still
    be served when recomputing it fails. `ttl=None` means it never expires by time. Entries
    are not changed after they are made (but for the memo `refresh_at`): stores share them
    between readers. `created` defaults to now (`time.time()`).
    """

    value: Any
    created: float
    ttl: float | None
    stale_ttl: float
    compute_time: float
    tags: tuple[str, ...]
    #: True for a negatively cached failure: `value` is [module, qualname, message].
    error: bool
    stale_if_error: float
    #: When the value stops being fresh; derived, read on every hit.
    fresh_until: float = field(repr=False, compare=False)
    #: Until when a store keeps the entry: the later end of its two stale windows; derived,
    #: read by every write of the memory store.
    kept_until: float = field(repr=False, compare=False)
    #: With early refresh: when this process refreshes the entry (`refresh_moment`), NaN
    #: until its first reader here draws it. The one field written after the entry is made:
    #: by any reader without a lock, each write a whole valid moment (a float store is atomic
    #: in CPython); the decorators set it to `fresh_until` once they started a refresh.
    refresh_at: float = field(repr=False, compare=False)

    def __init__(
        self,
        value: Any,
        created: float | None = None,
        ttl: float | None = None,
        stale_ttl: float = 0.0,
        compute_time: float = 0.0,
        tags: tuple[str, ...] = (),
        error: bool = False,
        stale_if_error: float = 0.0,
    ) -> None:
        # written out (not generated) so that making an entry, once per miss, is one call
        self.value = value
        self.created = created = time.time() if created is None else created
        self.ttl = ttl
        self.stale_ttl = stale_ttl
        self.compute_time = compute_time
        self.tags = tags
        self.error = error
        self.stale_if_error = stale_if_error
        self.fresh_until = fresh_until = math.inf if ttl is None else created + ttl
        self.kept_until = fresh_until + max(stale_ttl, stale_if_error)
        self.refresh_at = math.nan

    @property
    def stale_until(self) -> float:
        """The end of the stale-while-revalidate window."""
        return self.fresh_until + self.stale_ttl

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
    entry: Entry, now: float, *, refresh_at: float | None = None, refreshing: bool = False
) -> Freshness:
    """What a reader does with `entry` at `now` (see the module docstring).

    Early refresh: with `refresh_at` (the moment `refresh_moment` drew for the entry), a
    fresh entry is `EARLY` from that moment on.

    `refreshing`: a refresh of the key runs in this process. An early refresh lands before
    the entry expires; one that lands a little late (a slower computation, a busy event
    loop or GIL) would make its callers wait, so while it runs the entry stays `STALE` for
    `late_refresh_grace` after its expiry (and its `stale_ttl`).
    """
    fresh_until = entry.fresh_until
    if now < fresh_until:
        if refresh_at is not None:
            return Freshness.EARLY if now >= refresh_at else Freshness.FRESH
        return Freshness.FRESH
    if now < fresh_until + entry.stale_ttl:
        return Freshness.STALE
    if refreshing and now < fresh_until + late_refresh_grace(entry) and not entry.error:
        return Freshness.STALE
    return Freshness.EXPIRED


#: The least `late_refresh_grace`: a few milliseconds of a busy event loop or of GIL
#: hand-offs between many threads must not turn a refresh of a fast computation into a wait.
MIN_LATE_REFRESH_GRACE = 0.05


def late_refresh_grace(entry: Entry) -> float:
    """How long after its expiry `entry` is still served while this process's refresh of
    it runs: one more computation's time, at least `MIN_LATE_REFRESH_GRACE` seconds. A
    refresh later than that (a hung source) makes its callers wait for it as at a miss.
    Only while the store still hands out the entry: the memory store drops it lazily, at a
    write some time after its stale windows, Redis at their end (no window: at the expiry)."""
    return max(entry.compute_time, MIN_LATE_REFRESH_GRACE)


def refresh_moment(entry: Entry, beta: float, draw: Callable[[], float] = random.random) -> float:
    """When one process refreshes `entry` early: `fresh_until - compute_time * (1 + beta * x)`
    with `x = -ln(u)`, `u = 1 - draw()` in (0, 1]: drawn once per entry and process, then
    kept (`Entry.refresh_at`), so that a hit compares one float with the clock.

    XFetch (Vattani et al., VLDB 2015) tells a read at `t` to recompute when
    `t + compute_time * beta * x >= fresh_until`, drawing `x` (exponential) again per
    read. Here `x` is drawn once, and the test is made for the moment the refresh would
    land, one computation later: the refresh starts at `T` with
    `P(T <= t) = exp(-(fresh_until - compute_time - t) / (compute_time * beta))`, XFetch's
    probability for a read at `t + compute_time`. Why not per read: with `r` reads a second,
    per-read draws make the first refresh come about `compute_time * beta * ln(r *
    compute_time * beta)` before the expiry (0.1 s for a 20 ms computation read 10,000 times
    a second), the hotter the key the earlier: several computations per ttl. That same
    margin is what lands the paper's refresh before the expiry under load; drawn once, the
    margin is one computation (`compute_time * 1`), the refresh lands `compute_time * beta`
    before the expiry on average whatever the load, and the key is computed about
    `ttl / (ttl - compute_time * beta)` times per ttl.

    Across a fleet each process draws its own `x` for the entry, and the process with the
    largest refreshes first: about `compute_time * beta * (ln(n) + 0.58)` beyond the margin
    for `n` processes (the mean largest of `n` exponential draws). The lease (Redis
    `CLAIM`) keeps that refresh the only one: the others pass their own moments while it
    runs, find the lease held and keep serving the entry, and the refreshed entry gets new
    draws. So still about one refresh per expiry for the fleet, never two at once.
    """
    return entry.fresh_until - entry.compute_time * (1.0 - beta * math.log(1.0 - draw()))


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


#: What `Cache._read` returns when the store failed: an entry that is always expired (so every
#: reader treats it as a miss), telling the rest of the call not to try the store again: one
#: wait for a hung Redis per call, not one per step.
STORE_FAILED = Entry(None, created=0.0, ttl=0.0)
