"""In-process single-flight: one computation per key, shared by every overlapping caller.

Two small implementations side by side, one for threads and one for asyncio, with the same
contract (after Go's `singleflight`):

* Only one computation per key is in flight at a time (per event loop for asyncio). A caller
  arriving while it runs waits and receives the same outcome, value or exception; `run`
  returns `(value, shared)` where `shared` is True for those followers.
* When the computation raises an `Exception`, every waiter gets that exception and the key
  is free at once: the next call starts a new computation.
* A waiter never hangs: the flight is completed on every exit of the leader, including
  `BaseException`s. When the leader is *abandoned* (a thread's leader interrupted by
  `KeyboardInterrupt`/`SystemExit`, or an asyncio computation cancelled while others still
  wait), the remaining waiters do not inherit that exception: one of them starts over.
* asyncio only: the computation runs in its own task and callers await it through
  `asyncio.shield`, so cancelling a caller (or `asyncio.wait_for` timing it out) affects
  that caller alone. The computation is cancelled only when no caller waits any more.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from coalesce.stores.base import Fence

T = TypeVar("T")

_MAX_RESTARTS = 10  # an abandoned leader is replaced at most this often per call


def _nothing() -> None:
    pass


class _ThreadFlight(Generic[T]):
    """One computation in flight among threads."""

    __slots__ = ("abandoned", "done", "error", "fence", "value")

    def __init__(self) -> None:
        self.done = threading.Event()  # set once by the leader, after value/error are written
        self.value: T | None = None  # written by the leader before `done` is set
        self.error: BaseException | None = None  # likewise
        self.abandoned = False  # likewise: the leader left without an outcome for others
        self.fence = Fence()  # made invalid by `ThreadFlights.invalidate`


class ThreadFlights(Generic[T]):
    """Single-flight for threads (sync functions): the leader computes in its own thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _flights
        self._flights: dict[str, _ThreadFlight[T]] = {}

    def run(
        self, key: str, compute: Callable[[Fence], T], on_shared: Callable[[], None] = _nothing
    ) -> tuple[T, bool]:
        """Run `compute` once for all overlapping callers of `key`; return (value, shared).

        `on_shared` is called once by every follower that receives the leader's outcome,
        value or exception.
        """
        for _ in range(_MAX_RESTARTS):
            with self._lock:
                flight = self._flights.get(key)
                leader = flight is None
                if flight is None:
                    flight = self._flights[key] = _ThreadFlight()
            if leader:
                return self._lead(key, flight, compute), False
            flight.done.wait()
            if flight.abandoned:
                continue
            on_shared()
            if flight.error is not None:
                raise flight.error
            return flight.value, True  # type: ignore[return-value]
        raise RuntimeError(f"the computation of {key!r} was abandoned {_MAX_RESTARTS} times")

    def _lead(self, key: str, flight: _ThreadFlight[T], compute: Callable[[Fence], T]) -> T:
        try:
            flight.value = compute(flight.fence)
            return flight.value
        except Exception as exc:
            flight.error = exc
            raise
        except BaseException:
            flight.abandoned = True
            raise
        finally:
            with self._lock:
                if self._flights.get(key) is flight:
                    del self._flights[key]
            flight.done.set()

    def invalidate(self, key: str) -> None:
        """Fence the computation of `key` in flight and let new callers start afresh."""
        with self._lock:
            flight = self._flights.pop(key, None)
        if flight is not None:
            flight.fence.valid = False

    def running(self, key: str) -> bool:
        """Whether a computation of `key` is in flight."""
        return key in self._flights


class _AsyncFlight:
    """One computation in flight on one event loop."""

    __slots__ = ("fence", "task", "waiters")

    def __init__(self, task: asyncio.Task[Any], fence: Fence) -> None:
        self.task = task  # the shared computation; never awaited directly, only shielded
        self.fence = fence
        self.waiters = 0  # callers awaiting the task; only touched on the task's loop


def _caller_cancelled() -> bool:
    """True when the current task itself was asked to cancel (3.11+ can tell for sure)."""
    task = asyncio.current_task()
    if task is None or sys.version_info < (3, 11):
        return True
    return task.cancelling() > 0


class AsyncFlights:
    """Single-flight for asyncio: flights are per key and per event loop.

    Followers on another event loop (another thread) start their own flight: futures cannot
    be awaited across loops, and the cross-process store still lets only one of them compute.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _flights against other threads' loops
        self._flights: dict[tuple[str, asyncio.AbstractEventLoop], _AsyncFlight] = {}

    async def run(
        self,
        key: str,
        compute: Callable[[Fence], Awaitable[T]],
        on_shared: Callable[[], None] = _nothing,
    ) -> tuple[T, bool]:
        """Await `compute` once for all overlapping callers of `key`; return (value, shared).

        `on_shared` is called once by every follower that receives the leader's outcome.
        """
        loop = asyncio.get_running_loop()
        slot = (key, loop)
        for _ in range(_MAX_RESTARTS):
            with self._lock:
                flight = self._flights.get(slot)
                shared = flight is not None
                if flight is None:
                    flight = self._start(slot, loop, compute)
            flight.waiters += 1
            try:
                value = await asyncio.shield(flight.task)
            except asyncio.CancelledError:
                if flight.task.cancelled() and not _caller_cancelled():
                    continue  # the computation was cancelled, not us: start over
                raise
            except BaseException:
                if shared:
                    on_shared()
                raise
            else:
                if shared:
                    on_shared()
                return value, shared
            finally:
                flight.waiters -= 1
                if flight.waiters == 0 and not flight.task.done():
                    flight.task.cancel()  # nobody is left to receive the result
        raise RuntimeError(f"the computation of {key!r} was abandoned {_MAX_RESTARTS} times")

    def _start(
        self,
        slot: tuple[str, asyncio.AbstractEventLoop],
        loop: asyncio.AbstractEventLoop,
        compute: Callable[[Fence], Awaitable[T]],
    ) -> _AsyncFlight:
        fence = Fence()

        async def guarded() -> T:
            return await compute(fence)

        flight = _AsyncFlight(loop.create_task(guarded()), fence)
        self._flights[slot] = flight

        def forget(_: asyncio.Task[Any]) -> None:
            with self._lock:
                if self._flights.get(slot) is flight:
                    del self._flights[slot]
            if not flight.task.cancelled():
                flight.task.exception()  # mark retrieved: waiters got it, or nobody waited

        flight.task.add_done_callback(forget)
        return flight

    def invalidate(self, key: str) -> None:
        """Fence the computations of `key` in flight (on any loop); new callers start afresh."""
        with self._lock:
            slots = [slot for slot in self._flights if slot[0] == key]
            flights = [self._flights.pop(slot) for slot in slots]
        for flight in flights:
            flight.fence.valid = False

    def running(self, key: str) -> bool:
        """Whether a computation of `key` is in flight on the running loop."""
        return (key, asyncio.get_running_loop()) in self._flights
