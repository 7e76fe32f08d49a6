"""`load(id)`: single-id calls gathered into batches, like DataLoader.

* async: the single-id calls made in one event-loop iteration form one batch. The first
  `load` of a batch schedules its dispatch with `loop.call_soon`, which runs after the
  callbacks (tasks) already scheduled for this iteration: `gather(load(1), load(2))` makes
  one call with `[1, 2]`.
* sync: the first thread of a batch waits up to `batch_window` seconds (less once
  `max_batch` ids are in) for other threads to add theirs, then runs the batch for all.

A batch holds at most `max_batch` distinct ids; the next `load` opens a new one. Each batch
is one call of the `cached_many` function (cached ids read, missing ones computed once), so
the two kinds of calls coalesce with each other too. A caller that is cancelled leaves
alone: the batch goes on for the others.

Concurrency contract: an open batch's `futures` and `full` are written under the loader's
`_lock` until the batch is closed (taken off `_open`); after that only its dispatcher reads
them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any


class _Batch:
    __slots__ = ("full", "futures")

    def __init__(self) -> None:
        self.futures: dict[Any, Any] = {}  # id -> its future (asyncio or concurrent)
        self.full = threading.Event()  # set when `max_batch` ids are in (sync)


def _deliver(
    futures: dict[Any, Any], result: dict[Any, Any] | None, error: BaseException | None
) -> None:
    """Hand each id's value (None: absent) or the batch's error to its future."""
    for id_, future in futures.items():
        if future.done():
            continue
        if isinstance(error, asyncio.CancelledError) and isinstance(future, asyncio.Future):
            future.cancel()  # the batch task itself was cancelled (its loop closing)
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(None if result is None else result.get(id_))


@contextlib.contextmanager
def _delivering(futures: dict[Any, Any]) -> Iterator[dict[Any, Any]]:
    """Run a batch: the dict it fills is delivered to `futures`, or the exception it raised
    is (an `Exception` ends here; an interrupt or a cancellation goes on)."""
    result: dict[Any, Any] = {}
    try:
        yield result
    except Exception as exc:
        _deliver(futures, None, exc)
        return
    except BaseException as exc:
        _deliver(futures, None, exc)
        raise
    _deliver(futures, result, None)


class ThreadLoader:
    """`load` for a sync `cached_many` function."""

    def __init__(self, many: Callable[[list[Any]], dict[Any, Any]], window: float, size: int):
        self._many = many
        self._window = window
        self._size = size
        self._lock = threading.Lock()  # guards _open and the open batch
        self._open: _Batch | None = None

    def load(self, id_: Any) -> Any:
        with self._lock:
            batch = self._open
            dispatcher = batch is None
            if batch is None:
                batch = self._open = _Batch()
            future = batch.futures.get(id_)
            if future is None:
                future = batch.futures[id_] = concurrent.futures.Future()
                if len(batch.futures) >= self._size:
                    self._open = None  # closed: the next load opens another
                    batch.full.set()
        if dispatcher:
            batch.full.wait(self._window)
            with self._lock:
                if self._open is batch:
                    self._open = None
            self._run(batch)
        return future.result()

    def _run(self, batch: _Batch) -> None:
        with _delivering(batch.futures) as result:
            result.update(self._many(list(batch.futures)))


class AsyncLoader:
    """`load` for an async `cached_many` function, per event loop."""

    def __init__(self, many: Callable[[list[Any]], Awaitable[dict[Any, Any]]], size: int):
        self._many = many
        self._size = size
        self._lock = threading.Lock()  # guards _open (loops of several threads)
        self._open: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Batch] = (
            weakref.WeakKeyDictionary()
        )
        self._tasks: set[asyncio.Task[None]] = set()

    async def load(self, id_: Any) -> Any:
        loop = asyncio.get_running_loop()
        with self._lock:
            batch = self._open.get(loop)
            if batch is None:
                batch = self._open[loop] = _Batch()
                loop.call_soon(self._dispatch, loop, batch)
            future = batch.futures.get(id_)
            if future is None:
                future = batch.futures[id_] = loop.create_future()
                if len(batch.futures) >= self._size:
                    del self._open[loop]  # closed: the next load opens another
        return await asyncio.shield(future)

    def _dispatch(self, loop: asyncio.AbstractEventLoop, batch: _Batch) -> None:
        with self._lock:
            if self._open.get(loop) is batch:
                del self._open[loop]
        task = loop.create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: _Batch) -> None:
        with _delivering(batch.futures) as result:
            result.update(await self._many(list(batch.futures)))
