"""A pytest plugin for the tests of code that uses coalesce.

Registered through the `pytest11` entry point (named `coalesce`), so installing
coalesce-cache is enough; `-p no:coalesce` turns it off. It gives:

* `coalesce_clock`: a `FakeClock` that tests move by hand (`advance`, `set`), never sleeping;
* `coalesce_cache`: a fresh memory `Cache` on that clock, made the default cache (the one the
  module-level `coalesce.cached` / `coalesce.coalesced` use) for one test, then restored;
* `coalesce_disabled`: a disabled cache as the default for one test: every call computes;
* `assert_computations(expected, *functions_or_caches)`: a context manager failing unless
  the block caused exactly that many computations, listing what ran when it did not.

Only the public names of the core are used: `Cache`, `configure`, `get_cache`, `stats()`.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

import pytest

from coalesce import Cache, CachedFunction, configure, get_cache

__all__ = [
    "FakeClock",
    "assert_computations",
    "coalesce_cache",
    "coalesce_clock",
    "coalesce_disabled",
]

#: Where a `FakeClock` starts: 2026-01-01 00:00:00 UTC, a plausible wall-clock time.
START = 1_767_225_600.0

# counters shown, when they moved, next to the computations of a function that failed the check
_SHOWN = (
    "hits",
    "stale",
    "misses",
    "coalesced",
    "errors",
    "early_refreshes",
    "stale_on_error",
    "timeouts",
    "invalidations",
    "backend_errors",
)


class FakeClock:
    """A clock that stands still until moved: `Cache(clock=FakeClock())`.

    Calling it returns the current time in seconds (it starts at `START`, 2026-01-01 UTC);
    `advance(seconds)` moves it forward, `set(t)` to any time, backwards included.
    """

    def __init__(self, start: float = START) -> None:
        self.now = _finite("start", start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move forward by `seconds` (not negative: `set` moves back); return the new time."""
        seconds = _finite("seconds", seconds)
        if seconds < 0:
            raise ValueError(f"advance() moves forward, not by {seconds!r}: use set() to go back")
        self.now += seconds
        return self.now

    def set(self, t: float) -> None:
        """Move to time `t` (seconds)."""
        self.now = _finite("t", t)

    def __repr__(self) -> str:
        return f"FakeClock({self.now!r})"


def _finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number of seconds, not {value!r}")
    return float(value)


@contextlib.contextmanager
def _as_default(cache: Cache) -> Iterator[Cache]:
    """`cache` as the default cache while in the block; the previous default afterwards."""
    previous = get_cache()
    configure(cache)
    try:
        yield cache
    finally:
        configure(previous)
        cache.close()


def _test_namespace() -> str:
    return "test-" + uuid.uuid4().hex[:12]


@pytest.fixture
def coalesce_clock() -> FakeClock:
    """A `FakeClock` for this test: move it with `advance(seconds)` to expire entries."""
    return FakeClock()


@pytest.fixture
def coalesce_cache(coalesce_clock: FakeClock) -> Iterator[Cache]:
    """A fresh memory cache on `coalesce_clock`, the default cache for this test only.

    Functions decorated with the module-level `coalesce.cached` / `coalesce.coalesced` use
    it (even those called before); no entry of another test is in it. Afterwards the
    previous default cache is restored and this one closed.
    """
    with _as_default(Cache(namespace=_test_namespace(), clock=coalesce_clock)) as cache:
        yield cache


@pytest.fixture
def coalesce_disabled() -> Iterator[Cache]:
    """A disabled cache as the default for this test: every call of a function decorated
    with the module-level decorators runs it, as with `COALESCE_DISABLED=1`."""
    with _as_default(Cache(namespace=_test_namespace(), enabled=False)) as cache:
        yield cache


Counts = Mapping[str, Any]
# what one target counts into, by the id of an object the entry keeps alive: its name in the
# failure message and how to read its counters now
Sources = dict[int, tuple[str, Callable[[], Counts]]]


def _reader(target: object) -> tuple[Callable[[], Sources], Cache | None]:
    """How to list what one target counts into, and the target itself when it is a cache."""
    if isinstance(target, Cache):
        cache = target

        def read_cache() -> Sources:
            # the live Stats, not names: a function may be renamed in `stats()` (another one
            # with its key template appears) or collected while the block runs
            return {id(stats): (name, stats.as_dict) for name, stats in cache.counters().items()}

        return read_cache, cache
    stats = getattr(target, "stats", None)
    if not callable(stats) or isinstance(target, type):
        raise TypeError(
            "assert_computations() counts the computations of functions decorated with "
            f"coalesce, or of a Cache, not {target!r}"
        )
    label = f"{getattr(target, '__module__', None)}.{getattr(target, '__qualname__', target)}"

    def read() -> Sources:
        return {id(target): (label, stats)}

    return read, None


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def assert_computations(
    expected: int, *targets: Cache | CachedFunction[..., Any]
) -> AbstractContextManager[None]:
    """Fail unless the `with` block causes exactly `expected` computations.

    Counted are the computations (runs of the decorated function itself, or of the `fn` of
    `get_or_set`) of the given decorated functions, or of every function of the given
    caches, by default of the default cache: `with assert_computations(1, load_user): ...`.
    The counts of all targets are added up (a function and its own cache together count it
    twice). When the block raises, its exception goes up unchecked.

    Background refreshes (`stale_ttl`, `early_refresh`) count when they have run, which may
    be after the block. A disabled cache counts nothing.
    """
    if isinstance(expected, bool) or not isinstance(expected, int):
        raise TypeError(f"expected must be a number of computations, not {expected!r}")
    if expected < 0:
        raise ValueError(f"expected must be a number of computations (0 or more), not {expected}")
    readers = [_reader(target) for target in targets or (get_cache(),)]
    return _Check(expected, readers)


class _Check(AbstractContextManager[None]):
    """The context manager of `assert_computations`: counters read on entry and on exit.

    Counted per counting object (a function's live `Stats`), never per name: those seen on
    entry are kept, so one whose function is collected in the block, or renamed in
    `Cache.stats()`, still counts exactly what it did in the block.
    """

    def __init__(self, expected: int, readers: list[tuple[Callable[[], Sources], Cache | None]]):
        self.expected = expected
        self.readers = readers
        self.sources: list[Sources] = []
        self.before: list[dict[int, Counts]] = []

    def __enter__(self) -> None:
        self.sources = [read() for read, _ in self.readers]
        self.before = [{key: counts() for key, (_, counts) in s.items()} for s in self.sources]

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        __tracebackhide__ = True  # the failure points at the user's `with` line
        if kind is not None:
            return  # the block's own exception goes up unchecked
        lines: list[str] = []
        total = 0
        for (read, cache), sources, before in zip(
            self.readers, self.sources, self.before, strict=True
        ):
            for key, (label, counts) in sorted({**sources, **read()}.items(), key=_by_label):
                new, old = counts(), before.get(key, {})
                moved = {
                    name: new.get(name, 0) - old.get(name, 0) for name in ("computations", *_SHOWN)
                }
                total += moved["computations"]
                if cache is not None and not any(moved.values()):
                    continue  # a function of the cache that was not called
                details = ", ".join(
                    f"{name}={count}" for name, count in moved.items() if count and name in _SHOWN
                )
                line = f"  {label}: {_plural(moved['computations'], 'computation')}"
                lines.append(line + (f" ({details})" if details else " (not called)"))
        if total == self.expected:
            return
        message = f"expected {_plural(self.expected, 'computation')}, counted {total}"
        caches = [cache for _, cache in self.readers if cache is not None]
        if not lines:
            message += ": no function of " + ", ".join(map(repr, caches)) + " was called"
        else:
            message += ":\n" + "\n".join(lines)
        for cache in caches or [get_cache()]:
            if not cache.enabled:
                which = "" if caches else "the default cache "
                message += f"\n{which}{cache!r} is disabled (enabled=False or COALESCE_DISABLED=1)"
                message += ": its functions run without being counted"
        raise AssertionError(message)


def _by_label(item: tuple[int, tuple[str, Callable[[], Counts]]]) -> str:
    return item[1][0]
