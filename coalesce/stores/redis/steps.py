"""The lease's decisions as pure functions: what a caller does next after what it learned.

The drivers (`lease.Leases.fill` / `afill`, and the batch's in `batch`) do the I/O in the
order these functions decide; nothing here touches Redis, a clock, a lock or a counter (time
and decoding are passed in), so each decision is tested directly (tests/test_lease_steps.py).

    CLAIM reply ──► after_claim ──┬─ LEAD    the lease is ours: compute, then STORE (fenced)
                                  ├─ ENTRY   serve this entry (stored, or handed to us)
                                  ├─ AGAIN   stale or unreadable entry: CLAIM without the check
                                  ├─ FAILED  the leader we waited for failed: raise its error
                                  └─ WAIT    sleep until a wake-up, at most `seconds`
    wake-up or timeout ──► after_wake ──► the awaited lease's pushed entry, or None: CLAIM again
    computation ended  ──► after_compute ──► STORE / HAND (fenced) / FAIL (raised) / RELEASE
    renewal answered   ──► after_renewal ──► keep renewing, or stop (the lease is not ours)

`Claim` is one caller's progress (the mode of its next `CLAIM`, the lease it waits for,
every lease it has seen); `after_claim` returns the next one instead of changing it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from coalesce.entry import Entry
from coalesce.errors import LeaderFailedError
from coalesce.stores.redis.scripts import (
    CLAIM_CHECK,
    CLAIM_ONLY,
    CLAIM_REFRESH,
    decode_failure,
    pushed_entry,
)

__all__ = [
    "AGAIN",
    "ENTRY",
    "FAIL",
    "FAILED",
    "HAND",
    "LEAD",
    "RELEASE",
    "STORE",
    "WAIT",
    "Claim",
    "Step",
    "after_claim",
    "after_compute",
    "after_renewal",
    "after_wake",
    "encodable",
    "first_claim",
    "wait_seconds",
]

# What a `CLAIM` reply means.
LEAD, ENTRY, AGAIN, FAILED, WAIT = "lead", "entry", "again", "failed", "wait"
# What a leader does when its computation ends.
STORE, HAND, FAIL, RELEASE = "store", "hand", "fail", "release"

#: The longest wait while the listener is not subscribed (no wake-up can come).
UNSUBSCRIBED_WAIT = 0.2

#: Turns stored bytes into an entry; None for missing, corrupt or foreign bytes. No I/O.
Decode = Callable[[Any], "Entry | None"]


class Claim(NamedTuple):
    """One caller's progress through `CLAIM` replies."""

    mode: str  # of the next CLAIM: CLAIM_CHECK, CLAIM_ONLY or CLAIM_REFRESH
    seen: str = ""  # the lease waited for last ("" before any wait, or a foreign lease)
    tokens: tuple[str, ...] = ()  # every lease seen: their results are good for this caller
    waited: bool = False  # told to wait at least once


class Step(NamedTuple):
    """The next step after a `CLAIM` reply."""

    kind: str  # LEAD, ENTRY, AGAIN, FAILED or WAIT
    entry: Entry | None = None  # ENTRY: the entry to serve
    seconds: float = 0.0  # WAIT: the longest sleep before claiming again
    error: LeaderFailedError | None = None  # FAILED: what to raise
    trace: bool = False  # look for the leader's traceparent now (see `lease`, tracing)


def encodable(key: str) -> bool:
    """Whether `key` can be sent to Redis (as UTF-8): not so with a lone surrogate, a raw key
    the core stores escaped (the store reads it as missing; the caller asks for that next)."""
    if key.isascii():
        return True
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def first_claim(refresh: bool) -> Claim:
    """A caller's state before its first `CLAIM` (which checks the entry, or refreshes)."""
    return Claim(CLAIM_REFRESH if refresh else CLAIM_CHECK)


def _text(value: Any) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def wait_seconds(pttl_ms: int, wait_check: float, subscribed: bool) -> float:
    """How long a waiter sleeps: at most `wait_check`, never much past the lease's end, and
    briefly while no wake-up can come (the listener is not subscribed)."""
    wait = wait_check if pttl_ms < 0 else min(wait_check, pttl_ms / 1000 + 0.005)
    return wait if subscribed else min(wait, UNSUBSCRIBED_WAIT)


def after_claim(
    key: str,
    claim: Claim,
    reply: Any,
    *,
    decode: Decode,
    now: float,
    wait_check: float,
    subscribed: bool,
) -> tuple[Step, Claim]:
    """The step a `CLAIM` (or one item of `CLAIM_MANY`) reply calls for, and the state after.

    The reply (see `scripts.CLAIM`): 1 (the lease is ours), the stored entry's bytes, or a
    list naming its kind ("handed", "failed", "wait") first.

    An entry, stored or handed, is served only while fresh (`now`, wall-clock seconds);
    otherwise the caller claims again without the check (CLAIM_ONLY), keeping the tokens it
    saw (a handed entry is still theirs). A failure marker (reported only for the lease this
    caller waited for) becomes `LeaderFailedError`. A lease held elsewhere is waited for.
    """
    if type(reply) is int:  # 1: the lease is taken
        return Step(LEAD), claim
    kind = "entry" if isinstance(reply, bytes) else _text(reply[0])
    if kind in ("entry", "handed"):
        entry = decode(reply if kind == "entry" else reply[1])
        if entry is not None and entry.fresh_until > now:
            return Step(ENTRY, entry, trace=claim.waited), claim
        return Step(AGAIN), claim._replace(mode=CLAIM_ONLY)
    if kind == "failed":
        exc_type, message = decode_failure(reply[1])
        return Step(FAILED, error=LeaderFailedError(key, exc_type, message)), claim
    holder = _text(reply[1]) if isinstance(reply[1], bytes) else ""
    seconds = wait_seconds(int(reply[2]), wait_check, subscribed)
    new = bool(holder) and holder not in claim.tokens
    tokens = (*claim.tokens, holder) if new else claim.tokens
    return Step(WAIT, seconds=seconds, trace=new), Claim(CLAIM_CHECK, holder, tokens, True)


def after_wake(message: bytes | None, holder: str, *, decode: Decode, now: float) -> Entry | None:
    """What a wake-up (or a timeout: `message` None) brings a waiter of lease `holder`: the
    fresh entry that lease's `STORE` pushed, else None (claim again, with the check)."""
    data = pushed_entry(message, holder)
    if data is None:
        return None
    entry = decode(data)
    return entry if entry is not None and entry.fresh_until > now else None


def after_compute(error: BaseException | None, may_store: bool) -> str:
    """What a leader does once its computation ended: STORE its entry (fenced by its token);
    HAND it to the waiters when an invalidation reached it (`may_store` false); FAIL (leave
    the failure marker) when the computation raised an exception; RELEASE the lease at once
    on any other exit (cancellation, interrupt), so that a waiter takes over."""
    if error is not None:
        return FAIL if isinstance(error, Exception) else RELEASE
    return STORE if may_store else HAND


def after_renewal(answer: object) -> bool:
    """Whether to keep renewing a lease after `RENEW` answered `answer` (an exception when
    Redis failed: keep trying, the lease may outlive the outage; a falsy reply: the lease is
    not ours any more, its `STORE` will be refused, stop)."""
    return isinstance(answer, BaseException) or bool(answer)
