"""Per-id flights of batch computations: each missing id computed once in this process.

A caller of a `cached_many` function with missing ids asks `BatchFlights.join_or_lead`,
in one step under the table's lock: it *joins* the flights of ids already being computed
and *leads* one new flight per remaining id, which it computes as one batch. So callers of
`[1, 2, 3]` and `[2, 3, 4]` at the same moment make one call with `[1, 2, 3]` and one with
`[4]`, never 2 or 3 twice.

Contract (after `coalesce.flight`, whose single-key tables these mirror):

* A flight's outcome is a `concurrent.futures.Future`: an `Entry`, None (the id is absent),
  or an exception. Threads wait on it; tasks await all of theirs at once (`settled`), with
  nothing chained to the flights, so a cancelled caller leaves alone and the batch goes on
  for the others, on any event loop.
* The leader settles every flight it leads on every exit: with its entry, with the
  exception the batch raised, or with `Abandoned` (an interrupt, a cancelled batch task),
  upon which the waiters start over for those ids. A waiter never hangs.
* `invalidate(key)` fences that id's flight (its result is not stored) and detaches it, so
  new callers compute afresh; callers already waiting still receive its result, as for a
  single key. `invalidate_all` only detaches (see `ThreadFlights.invalidate_all`).
* A batch asking for an id of its own flight gets `ReentrantCallError` instead of waiting for
  itself (`owner`: the leading thread's id, or the batch's task).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
import weakref
from typing import Any

from coalesce.entry import Entry
from coalesce.errors import ReentrantCallError
from coalesce.stores.base import Fence

Outcome = concurrent.futures.Future  # of Entry | None


class Abandoned(Exception):
    """The batch computing an id left without an outcome: its waiters start over."""


class PartlyFailed(Exception):
    """Raised by a store's `fill_many` when some of its keys failed and the others did not:
    an exception reaches exactly the callers of the keys it belongs to (the batch that
    raised, or the leader elsewhere that failed), never those of the other keys."""

    def __init__(self, outcomes: dict[str, Entry | None], errors: dict[str, Exception]):
        super().__init__(next(iter(errors.values())))
        self.outcomes = outcomes  # the keys that did not fail
        self.errors = errors  # failed key -> its exception, this batch's first


class IdFlight:
    """The computation of one id, part of one batch."""

    __slots__ = ("fence", "outcome", "owner")

    def __init__(self, owner: object) -> None:
        self.outcome: Outcome[Entry | None] = concurrent.futures.Future()  # set once, leader
        self.fence = Fence()  # made invalid by `BatchFlights.invalidate`
        self.owner = owner  # the leading thread's id or batch task; written by the leader

    def settle(self, entry: Entry | None = None, error: BaseException | None = None) -> None:
        """Hand the outcome to the waiters (once; later calls are ignored)."""
        if self.outcome.done():
            return
        if error is None:
            self.outcome.set_result(entry)
        else:
            self.outcome.set_exception(error)

    def wait(self) -> Entry | None:
        """The outcome, in a thread (raises the batch's exception, or `Abandoned`)."""
        return self.outcome.result()


class BatchFlights:
    """The flights of one cache's batch computations, by full key."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _flights
        self._flights: dict[str, IdFlight] = {}
        _all.add(self)

    def after_fork(self) -> None:
        """In a forked child: the parent's leaders do not exist here."""
        self._lock = threading.Lock()
        self._flights = {}

    def join_or_lead(
        self, keys: list[str], owner: object, current: object
    ) -> tuple[dict[str, IdFlight], dict[str, IdFlight]]:
        """(flights joined, flights led) for `keys`, in one step. The led flights are new,
        owned by `owner`; `current` (this thread's id, or this task) must own none of the
        joined ones (`ReentrantCallError`)."""
        joined: dict[str, IdFlight] = {}
        led: dict[str, IdFlight] = {}
        with self._lock:
            flights = self._flights
            for key in keys:
                flight = flights.get(key)
                if flight is None:
                    flight = flights[key] = led[key] = IdFlight(owner)
                elif flight.owner is current or flight.owner == current:
                    for new in led:
                        del flights[new]
                    raise ReentrantCallError(key)
                else:
                    joined[key] = flight
        return joined, led

    def finish(self, flights: dict[str, IdFlight]) -> None:
        """Remove ended flights from the table (those still there: not invalidated)."""
        with self._lock:
            table = self._flights
            for key, flight in flights.items():
                if table.get(key) is flight:
                    del table[key]

    def invalidate(self, key: str) -> None:
        with self._lock:
            flight = self._flights.pop(key, None)
        if flight is not None:
            flight.fence.valid = False

    def invalidate_all(self) -> None:
        with self._lock:
            self._flights = {}

    def running(self, key: str) -> bool:
        return key in self._flights


_all: weakref.WeakSet[BatchFlights] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for flights in list(_all):
        flights.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


async def settled(flights: list[IdFlight]) -> None:
    """Return once every flight has its outcome, woken once for all of them (not once per
    flight); cancelling the caller leaves the flights alone (nothing is chained to them)."""
    pending = [flight.outcome for flight in flights if not flight.outcome.done()]
    if not pending:
        return
    loop = asyncio.get_running_loop()
    woken = loop.create_future()
    left = [len(pending)]  # under `lock`: the outcomes may be set on other threads
    lock = threading.Lock()

    def wake(_: object) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:
            here = False
        if here:
            loop.call_soon(_resolve, woken)
        else:
            with contextlib.suppress(RuntimeError):  # its loop closed: nobody waits
                loop.call_soon_threadsafe(_resolve, woken)

    for outcome in pending:
        outcome.add_done_callback(wake)
    await woken


def _resolve(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)


def owner_here() -> Any:
    """Who the current caller is, for `ReentrantCallError`: its task, else its thread."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    return task if task is not None else threading.get_ident()
