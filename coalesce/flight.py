"""In-process single-flight: one computation per key, shared by every overlapping caller.

Two small implementations side by side, one for threads and one for asyncio, with the same
contract (after Go's `singleflight`):

* Only one computation per key is in flight at a time (per event loop for asyncio). A caller
  arriving while it runs waits and receives the same outcome, value or exception; `run`
  returns `(value, shared)` where `shared` is True for those followers.
* When the computation raises an `Exception`, every waiter gets that exception and the key
  is free at once: the next call starts a new computation.
* A computation that asks for its own key (directly or through another function sharing
  the key) gets `ReentrantCallError` at once instead of waiting for itself forever.
* A waiter never hangs: the flight is completed on every exit of the leader, including
  `BaseException`s. When the leader is *abandoned* (a thread's leader interrupted by
  `KeyboardInterrupt`/`SystemExit`, or an asyncio computation cancelled while others still
  wait), the remaining waiters do not inherit that exception: one of them starts over.
* asyncio only: the computation runs in its own task and callers await its outcome through
  `asyncio.shield`, so cancelling a caller (or `asyncio.wait_for` timing it out) affects
  that caller alone. The computation is cancelled only when no caller waits any more; a
  caller that arrived meanwhile starts over. Callers on several event loops of one process
  share one computation too.
* `timeout`: a caller that has waited that long gets `CoalesceTimeout`, alone; the
  computation goes on for the others and ends as if nobody had left (a timeout is not a
  cancellation: an asyncio computation every caller timed out on is never cancelled). Sync
  leaders with a timeout compute on the given thread pool, so that they can leave too.
* Tracing (only after `coalesce.otel.instrument()`): each flight carries a `FlightTrace`,
  made in its leader caller's context; the leader's step runs inside it, followers count
  themselves in under the table lock and record their wait once they have the outcome (or
  leave on their timeout), and it is finished once the flight has left the table.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import coalesce.otel.hook as otel
from coalesce.errors import CoalesceTimeout, ReentrantCallError
from coalesce.stores.base import Fence

if TYPE_CHECKING:
    from coalesce.otel.instruments import FlightTrace

T = TypeVar("T")

_MAX_RESTARTS = 10  # an abandoned leader is replaced at most this often per call

# Every flight table, so that a forked child (gunicorn --preload, multiprocessing) starts
# with none of its parent's flights: their leaders are threads or tasks that did not fork.
_all_flights: weakref.WeakSet[ThreadFlights[Any] | AsyncFlights] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for flights in list(_all_flights):
        flights.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _nothing() -> None:
    pass


class _ThreadFlight(Fence, Generic[T]):
    """One computation in flight among threads; also its computation's fence (`valid`, made
    False by `ThreadFlights.invalidate`): one object fewer to make per miss."""

    __slots__ = ("abandoned", "done", "error", "thread", "trace", "value")

    def __init__(self) -> None:
        self.valid = True
        self.thread = threading.get_ident()  # the leader's thread, which creates the flight
        # made held by the first caller that waits for the outcome (`waited`), then released
        # once, by the thread that computes, after it has written value/error; waiters
        # acquire and release it at once. None while nobody waits: most flights have no
        # follower, and their leader then makes no lock at all. A plain lock, not a
        # `threading.Event` (a Condition and its lock): a twentieth as much to make.
        self.done: threading.Lock | None = None
        self.value: T | None = None  # written by the leader before `done` is released
        self.error: BaseException | None = None  # likewise
        self.abandoned = False  # likewise: the leader left without an outcome for others
        # tracing (coalesce.otel, when instrumented): set by the leader's caller before the
        # flight is published; see `FlightTrace` for who writes what in it
        self.trace: FlightTrace | None = None

    def waited(self) -> threading.Lock:
        """The lock a caller waits on for the outcome, made (held) by the first one.

        Called with the table lock held, while the flight is in the table: its leader takes
        `done` under that lock as it leaves the table, so no lock is made after it looked.
        """
        if self.done is None:
            self.done = threading.Lock()
            self.done.acquire()
        return self.done


class ThreadFlights(Generic[T]):
    """Single-flight for threads (sync functions): the leader computes in its own thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _flights
        self._flights: dict[str, _ThreadFlight[T]] = {}
        _all_flights.add(self)

    def after_fork(self) -> None:
        """In a forked child: the parent's leaders do not exist here, forget their flights."""
        self._lock = threading.Lock()
        self._flights = {}

    def run(
        self,
        key: str,
        compute: Callable[[Fence], T],
        on_shared: Callable[[], None] = _nothing,
        timeout: float | None = None,
        pool: concurrent.futures.Executor | None = None,
    ) -> tuple[T, bool]:
        """Run `compute` once for all overlapping callers of `key`; return (value, shared).

        `on_shared` is called once by every follower that receives the leader's outcome,
        value or exception. With `timeout` (and the `pool` a leader computes on), a caller
        that has waited that long raises `CoalesceTimeout`.
        """
        for _ in range(_MAX_RESTARTS):
            with self._lock:
                flight = self._flights.get(key)
                leader = flight is None
                if flight is None:
                    flight = self._flights[key] = _ThreadFlight()
                    if otel.tracing is not None:
                        flight.trace = otel.tracing.flight(key)
                    # computes here, waiting for nobody; or on the pool, waiting like a follower
                    done = None if timeout is None or pool is None else flight.waited()
                elif flight.thread == threading.get_ident():
                    raise ReentrantCallError(key)
                else:
                    done = flight.waited()
                    if flight.trace is not None:
                        flight.trace.followers += 1
                        joined = time.time_ns()
            if done is None:
                return self._lead(key, flight, compute), False
            if leader:
                assert pool is not None  # a leader waits only when it computes on the pool
                pool.submit(self._lead_in_pool, key, flight, compute)
            if not done.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
                if not leader and flight.trace is not None:
                    flight.trace.followed(joined, CoalesceTimeout(key, timeout or 0.0))
                raise CoalesceTimeout(key, timeout or 0.0)
            done.release()  # for the next waiter
            if flight.abandoned:
                continue
            if not leader:
                on_shared()
                if flight.trace is not None:
                    flight.trace.followed(joined, flight.error)
            if flight.error is not None:
                raise flight.error
            return flight.value, not leader  # type: ignore[return-value]
        raise RuntimeError(f"the computation of {key!r} was abandoned {_MAX_RESTARTS} times")

    def _lead_in_pool(
        self, key: str, flight: _ThreadFlight[T], compute: Callable[[Fence], T]
    ) -> None:
        flight.thread = threading.get_ident()  # the computing thread, for `ReentrantCallError`
        with contextlib.suppress(Exception):  # handed to the callers through the flight
            self._lead(key, flight, compute)

    def _lead(self, key: str, flight: _ThreadFlight[T], compute: Callable[[Fence], T]) -> T:
        trace = flight.trace
        entered = None if trace is None else trace.enter()
        try:
            flight.value = compute(flight)
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
                done = flight.done  # out of the table: nobody starts waiting any more
            if trace is not None and entered is not None:
                trace.leave(entered)
                trace.finish(flight.error)  # out of the table: its follower count is final
            if done is not None:
                done.release()

    def invalidate(self, key: str) -> None:
        """Fence the computation of `key` in flight and let new callers start afresh."""
        with self._lock:
            flight = self._flights.pop(key, None)
        if flight is not None:
            flight.valid = False

    def invalidate_all(self) -> None:
        """Detach every computation in flight: invalidations may have been missed (a shared
        store's subscription dropped), so new callers start afresh instead of joining one.

        Their fences stay valid: whether an invalidation really reached one of them is for
        the shared store to tell, which fences by itself (on Redis, the lease token: an
        invalidation deletes the lease, and a store without it is refused). Invalidating
        them all would throw away every result in flight at each reconnect, and each
        process would then compute the key again (issue 9, item 3).
        """
        with self._lock:
            self._flights = {}

    def running(self, key: str) -> bool:
        """Whether a computation of `key` is in flight."""
        return key in self._flights


class _Cancelled(Exception):
    """The shared computation was cancelled (not the caller awaiting it): start over."""


def _copy_into(
    future: concurrent.futures.Future[Any], value: Any, error: BaseException | None
) -> None:
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


class _AsyncFlight:
    """One computation in flight, running on the event loop of the caller that started it.

    Callers never await the task itself: the task settles the flight as its last step
    (`settle_value`, `settle_error`), setting the outcome on each waiting caller's own
    future (`waiting`: callers on the task's loop; a caller cancelled meanwhile cancelled
    its own, and is skipped) and, for callers on other loops, on `outcome`, a
    `concurrent.futures.Future` made by the first of them (most flights have none); a task
    cancelled before its first step is settled by its done-callback (`settle`). A future
    per caller, set directly, resumes each caller in the next loop iteration; one shared
    future awaited through `asyncio.shield` would take two more (its callback, then the
    shield's). A cancelled
    computation (or one interrupted by `KeyboardInterrupt` / `SystemExit`, which escape the
    event loop itself) is turned into `_Cancelled`: its callers start over. So a
    `CancelledError` a caller receives is always its own, and telling the two apart needs no
    `Task.cancelling()` (3.11+).
    """

    __slots__ = (
        "_lock",
        "_outcome",
        "_settled",
        "fence",
        "loop",
        "task",
        "timed_out",
        "trace",
        "waiters",
        "waiting",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, fence: Fence) -> None:
        self.task: asyncio.Task[Any]  # the shared computation; cancelled only when nobody
        # waits; set by `AsyncFlights._start` right after, before any caller sees the flight
        self.loop = loop  # the task's loop: only it may touch `task` and `waiting`
        self.fence = fence
        self.waiting: list[asyncio.Future[Any]] = []  # one per caller on `loop`
        self.waiters = 0  # callers awaiting the outcome; guarded by `AsyncFlights._lock`
        self.timed_out = False  # a caller left on its timeout: never cancel; likewise
        self._lock = threading.Lock()  # guards _outcome and _settled
        # written once, by the task's loop, when the computation ends: (value, error)
        self._settled: tuple[Any, BaseException | None] | None = None
        # for callers on other loops: made by the first of them, filled when settled
        self._outcome: concurrent.futures.Future[Any] | None = None
        self.trace: FlightTrace | None = None  # as `_ThreadFlight.trace`

    def done(self) -> bool:
        return self._settled is not None

    def settle_value(self, value: Any) -> None:
        self._settle(value, None)
        for waiter in self.waiting:
            if not waiter.done():  # else cancelled with its caller
                waiter.set_result(value)

    def settle_error(self, error: BaseException) -> None:
        self._settle(None, error)
        for waiter in self.waiting:
            if not waiter.done():
                waiter.set_exception(error)

    def settle(self, task: asyncio.Task[Any]) -> None:
        """Settle from the ended task (its done-callback, when it never ran a step)."""
        error = _Cancelled() if task.cancelled() else task.exception()
        if error is not None and not isinstance(error, Exception):
            error = _Cancelled()  # KeyboardInterrupt, SystemExit: abandoned, not a failure
        if error is None:
            self.settle_value(task.result())
        else:
            self.settle_error(error)

    def _settle(self, value: Any, error: BaseException | None) -> None:
        with self._lock:
            self._settled = (value, error)
            if self._outcome is not None:
                _copy_into(self._outcome, value, error)

    def _outcome_for_other_loops(self) -> concurrent.futures.Future[Any]:
        with self._lock:
            if self._outcome is None:
                self._outcome = concurrent.futures.Future()
                if self._settled is not None:
                    _copy_into(self._outcome, *self._settled)
            return self._outcome

    async def wait(self, loop: asyncio.AbstractEventLoop) -> Any:
        """The outcome, awaited from `loop`; cancelling the caller leaves it running.

        Raises `_Cancelled` when the computation was cancelled.
        """
        if loop is self.loop:
            settled = self._settled
            if settled is not None:  # ended before this caller came to wait
                value, error = settled
                if error is not None:
                    raise error
                return value
            waiter = loop.create_future()  # cancelled with this caller alone
            self.waiting.append(waiter)
            return await waiter
        return await asyncio.shield(asyncio.wrap_future(self._outcome_for_other_loops()))

    def cancel(self) -> None:
        """Cancel the computation, from any thread."""
        if asyncio.get_running_loop() is self.loop:
            self.task.cancel()
        else:
            with contextlib.suppress(RuntimeError):  # its loop is closed: it is over anyway
                self.loop.call_soon_threadsafe(self.task.cancel)


class AsyncFlights:
    """Single-flight for asyncio, across the event loops of one process.

    The computation runs as a task on the loop of the caller that started it. Callers on
    that loop await a future of their own, which the task sets; callers on other loops
    (other threads) await a `concurrent.futures.Future` the task's outcome is copied into
    when it ends. Should the starting loop shut down first, the task is cancelled and those
    callers start over.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _flights and every flight's `waiters`
        self._flights: dict[str, _AsyncFlight] = {}
        _all_flights.add(self)

    def after_fork(self) -> None:
        """In a forked child: the parent's computations do not run here, forget them."""
        self._lock = threading.Lock()
        self._flights = {}

    async def run(
        self,
        key: str,
        compute: Callable[[Fence], Awaitable[T]],
        on_shared: Callable[[], None] = _nothing,
        timeout: float | None = None,
    ) -> tuple[T, bool]:
        """Await `compute` once for all overlapping callers of `key`; return (value, shared).

        `on_shared` is called once by every follower that receives the leader's outcome.
        With `timeout`, a caller that has waited that long raises `CoalesceTimeout`.
        """
        loop = asyncio.get_running_loop()
        for _ in range(_MAX_RESTARTS):
            with self._lock:
                flight = self._flights.get(key)
                shared = flight is not None
                if flight is None:
                    flight = self._start(key, loop, compute)
                elif flight.task is asyncio.current_task():
                    raise ReentrantCallError(key)
                elif flight.trace is not None:
                    flight.trace.followers += 1
                    joined = time.time_ns()
                flight.waiters += 1
            try:
                if timeout is None:
                    value = await flight.wait(loop)
                else:
                    value = await asyncio.wait_for(flight.wait(loop), timeout)
            except asyncio.TimeoutError:
                with self._lock:
                    flight.timed_out = True
                if shared and flight.trace is not None:
                    flight.trace.followed(joined, CoalesceTimeout(key, timeout or 0.0))
                raise CoalesceTimeout(key, timeout or 0.0) from None
            except _Cancelled:
                continue  # the computation was cancelled, not this caller: start over
            except BaseException as exc:
                if shared:
                    on_shared()
                    if flight.trace is not None:
                        flight.trace.followed(joined, exc)
                raise
            else:
                if shared:
                    on_shared()
                    if flight.trace is not None:
                        flight.trace.followed(joined, None)
                return value, shared
            finally:
                with self._lock:
                    flight.waiters -= 1
                    abandoned = flight.waiters == 0 and not flight.done() and not flight.timed_out
                if abandoned:
                    flight.cancel()  # nobody is left to receive the result
        raise RuntimeError(f"the computation of {key!r} was abandoned {_MAX_RESTARTS} times")

    def _start(
        self, key: str, loop: asyncio.AbstractEventLoop, compute: Callable[[Fence], Awaitable[T]]
    ) -> _AsyncFlight:
        fence = Fence()
        flight = _AsyncFlight(loop, fence)
        if otel.tracing is not None:  # in the leader caller's context, the task's parent
            flight.trace = otel.tracing.flight(key)

        def leave(error: BaseException | None = None) -> None:
            with self._lock:
                if self._flights.get(key) is flight:
                    del self._flights[key]
            if flight.trace is not None:
                flight.trace.finish(error)  # out of the table: its follower count is final

        async def guarded() -> None:
            # settles the flight itself, so that its callers resume one loop iteration
            # sooner than through a done-callback
            if flight.trace is not None:
                flight.trace.enter()  # in this task's own context: never reset
            try:
                value = await compute(fence)
            except Exception as exc:
                leave(exc)
                flight.settle_error(exc)
                return  # handed to the callers: the task itself ends without an exception
            except GeneratorExit:  # closed unfinished with its loop: nothing to settle on it
                raise
            except BaseException:
                leave()
                flight.settle_error(_Cancelled())
                raise
            leave()
            flight.settle_value(value)

        def finish(task: asyncio.Task[Any]) -> None:
            if not flight.done():  # cancelled before its first step: guarded never ran
                leave()
                flight.settle(task)
            elif not task.cancelled():
                task.exception()  # retrieved (KeyboardInterrupt...): the callers were told

        flight.task = loop.create_task(guarded())
        self._flights[key] = flight
        flight.task.add_done_callback(finish)
        return flight

    def invalidate(self, key: str) -> None:
        """Fence the computation of `key` in flight; new callers start afresh."""
        with self._lock:
            flight = self._flights.pop(key, None)
        if flight is not None:
            flight.fence.valid = False

    def invalidate_all(self) -> None:
        """Detach every computation in flight, fences left valid (see `ThreadFlights`)."""
        with self._lock:
            self._flights = {}

    def running(self, key: str) -> bool:
        """Whether a computation of `key` is in flight."""
        return key in self._flights
