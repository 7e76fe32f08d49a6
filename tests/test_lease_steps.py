"""The Redis lease's decisions (`coalesce.stores.redis.steps`), tested directly: no Redis, no
clock, no threads. The drivers that do the I/O in this order are covered by the Redis tests."""

from __future__ import annotations

from typing import Any

import pytest

from coalesce.entry import Entry
from coalesce.errors import LeaderFailedError
from coalesce.serialization import MsgpackSerializer, decode_entry, encode_entry
from coalesce.stores.redis.scripts import (
    CLAIM_CHECK,
    CLAIM_ONLY,
    CLAIM_REFRESH,
    encode_failure,
)
from coalesce.stores.redis.steps import (
    AGAIN,
    ENTRY,
    FAIL,
    FAILED,
    HAND,
    LEAD,
    RELEASE,
    STORE,
    UNSUBSCRIBED_WAIT,
    WAIT,
    Claim,
    after_claim,
    after_compute,
    after_renewal,
    after_wake,
    encodable,
    first_claim,
    wait_seconds,
)

NOW = 1_000_000.0
SERIALIZER = MsgpackSerializer()
HOLDER = "a" * 32
OTHER = "b" * 32


def _bytes(value: Any, *, created: float = NOW, ttl: float = 30.0) -> bytes:
    return encode_entry(Entry(value, created=created, ttl=ttl), SERIALIZER)


def _decode(data: Any) -> Entry | None:
    try:
        return decode_entry(data, SERIALIZER)
    except Exception:
        return None


def _claim(reply: Any, claim: Claim | None = None, **options: Any) -> tuple[Any, Claim]:
    settings = {"decode": _decode, "now": NOW, "wait_check": 1.0, "subscribed": True}
    settings.update(options)
    return after_claim("ns:k", claim or first_claim(False), reply, **settings)


def test_first_claim_checks_the_entry_or_refreshes() -> None:
    assert first_claim(False) == Claim(CLAIM_CHECK, "", (), False)
    assert first_claim(True).mode == CLAIM_REFRESH


def test_a_free_lease_is_led_and_the_state_is_kept() -> None:
    claim = Claim(CLAIM_CHECK, HOLDER, (HOLDER,), True)
    step, after = _claim(1, claim)
    assert step.kind == LEAD
    assert after == claim  # the driver counts a takeover from `waited`


@pytest.mark.parametrize("handed", [False, True], ids=["stored", "handed"])
def test_a_fresh_entry_is_served_and_traced_only_after_a_wait(handed: bool) -> None:
    reply: Any = [b"handed", _bytes("v")] if handed else _bytes("v")  # see `scripts.CLAIM`
    step, _ = _claim(reply)
    assert step.kind == ENTRY and step.entry is not None and step.entry.value == "v"
    assert not step.trace
    waited = Claim(CLAIM_CHECK, HOLDER, (HOLDER,), True)
    step, after = _claim(reply, waited)
    assert step.kind == ENTRY and step.trace and after == waited


@pytest.mark.parametrize(
    "data", [_bytes("old", created=NOW - 60, ttl=30), b"not an entry", b"foreign type"]
)
def test_a_stale_or_unreadable_entry_claims_again_without_the_check(data: bytes) -> None:
    claim = Claim(CLAIM_CHECK, HOLDER, (HOLDER, OTHER), True)
    step, after = _claim(data, claim)
    assert step.kind == AGAIN and step.entry is None
    assert after == claim._replace(mode=CLAIM_ONLY)  # the tokens seen stay: handed entries


def test_the_awaited_leaders_failure_becomes_its_error() -> None:
    marker = encode_failure(HOLDER, ValueError("boom"))
    step, after = _claim([b"failed", marker], Claim(CLAIM_CHECK, HOLDER, (HOLDER,), True))
    assert step.kind == FAILED and isinstance(step.error, LeaderFailedError)
    assert "ValueError" in str(step.error) and "boom" in str(step.error)
    assert after.seen == HOLDER


def test_a_held_lease_is_waited_for_until_about_its_end() -> None:
    step, after = _claim([b"wait", HOLDER.encode(), 300])
    assert step.kind == WAIT and step.seconds == pytest.approx(0.305) and step.trace
    assert after == Claim(CLAIM_CHECK, HOLDER, (HOLDER,), True)
    # the same lease again: nothing new to trace, the tokens are not repeated
    step, again = _claim([b"wait", HOLDER.encode(), 5000], after)
    assert step.seconds == 1.0 and not step.trace and again == after
    # another leader: remembered too (its handed entry or failure is good for this caller)
    step, third = _claim([b"wait", OTHER.encode(), 100], again)
    assert step.trace and third.tokens == (HOLDER, OTHER) and third.seen == OTHER


def test_a_foreign_holder_is_nobody_to_hear_from() -> None:
    step, after = _claim([b"wait", 12, 2000])
    assert step.kind == WAIT and not step.trace
    assert after == Claim(CLAIM_CHECK, "", (), True)


def test_wait_seconds() -> None:
    assert wait_seconds(-1, 1.0, True) == 1.0
    assert wait_seconds(250, 1.0, True) == pytest.approx(0.255)
    assert wait_seconds(5000, 1.0, False) == UNSUBSCRIBED_WAIT  # no wake-up can come


def test_a_wake_up_brings_only_the_awaited_leases_fresh_entry() -> None:
    data = _bytes("pushed")
    pushed = b"v" + HOLDER.encode() + b"|" + data
    entry = after_wake(pushed, HOLDER, decode=_decode, now=NOW)
    assert entry is not None and entry.value == "pushed"
    for message, holder in (
        (pushed, OTHER),  # another lease's entry: maybe older than our callers may see
        (pushed, ""),  # a foreign lease
        (b"s", HOLDER),  # a marker: check Redis
        (None, HOLDER),  # a timeout
        (b"v" + HOLDER.encode() + b"|garbage", HOLDER),
    ):
        assert after_wake(message, holder, decode=_decode, now=NOW) is None
    assert after_wake(pushed, HOLDER, decode=_decode, now=NOW + 60) is None  # stale by now


def test_a_leader_stores_hands_fails_or_releases() -> None:
    assert after_compute(None, True) == STORE
    assert after_compute(None, False) == HAND  # an invalidation reached it: waiters only
    assert after_compute(ValueError("x"), True) == FAIL
    assert after_compute(KeyboardInterrupt(), True) == RELEASE  # a waiter takes over at once
    assert after_compute(GeneratorExit(), False) == RELEASE


def test_renewal_stops_only_when_the_lease_is_not_ours() -> None:
    assert after_renewal(1) and after_renewal(True)
    assert after_renewal(ConnectionError("down"))  # the lease may outlive the outage
    assert not after_renewal(0) and not after_renewal(None)


# -- the renewer thread's schedule (real threads, no Redis) ------------------------------------


def test_a_lease_added_while_the_renewer_lingers_is_renewed_in_time() -> None:
    """The renewer is not woken when a lease is added while it lingers after the last one
    went (a stream of short misses must not wake it each time); the new lease, due later
    than the end of the linger, is still renewed every interval."""
    import threading
    import time

    from coalesce.stores.redis.lease import Lease, Renewer

    renewed: list[tuple[str, float]] = []
    second = threading.Event()

    def renew(lease: Lease) -> bool:
        renewed.append((lease.token, time.monotonic()))
        if sum(token == "b" for token, _ in renewed) >= 2:
            second.set()
        return True

    renewer = Renewer(renew, 0.1, "test-renewer")
    try:
        for token in ("x", "y", "z"):  # short computations: gone long before their renewal
            renewer.add(Lease("k", "k:lease", token, []))
            renewer.remove(token)
        time.sleep(0.05)  # the thread lingers now, not idle
        added = time.monotonic()
        renewer.add(Lease("k", "k:lease", "b", []))
        assert second.wait(10), "a lease added during the linger was never renewed"
        times = [at for token, at in renewed if token == "b"]
        assert times[0] >= added + 0.1  # not before its interval
        assert all(token == "b" for token, _ in renewed)  # removed leases are never renewed
    finally:
        renewer.close()


def test_encodable_keys_are_those_utf_8_can_carry() -> None:
    assert encodable("user:42") and encodable("user:é") and encodable("user:🙂")
    assert not encodable("user:\udcff")  # a lone surrogate: the core stores it escaped
