"""`cached` and `coalesced`: build a Policy once, then wrap a sync or an async function.

The wrappers are written twice on purpose, sync and async side by side, each short enough to
compare line by line. Both follow the same path:

1. hot path: build the key, read the store, return a private copy of a fresh value;
2. an entry to refresh (`entry.decide`: early, or stale within its `stale_ttl` window):
   return it and refresh it in the background;
3. miss: join the key's in-process flight (waiting at most `timeout`); its leader checks the
   store again, then lets the store `fill` the entry (on Redis: one process computes, the
   others receive its result). A computation that raises while the previous value is
   within its `stale_if_error` window stores that value again for a second instead
   (`entry.retry_entry`), so callers keep being served and the source is retried about
   once a second.

A store that fails degrades to computing directly (`on_backend_error="compute"`, the default)
or raises `BackendError` (`"raise"`). Decisions that need no I/O live in `entry.py`,
`options.py`, `keys.py` and `values.py`; this module only does the I/O in the order they
decide. Time comes from `cache.clock` (`Cache(clock=...)`).
"""

from __future__ import annotations

import contextlib
import copy as _copy
import functools
import gc
import inspect
import random
import sys
import threading
import time
import types
import typing
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, cast

import coalesce.otel.hook as otel
from coalesce.entry import STORE_FAILED, Entry, Freshness, decide, refresh_moment, retry_entry
from coalesce.errors import BackendError, CoalesceTimeout, ConfigurationError
from coalesce.keys import (
    KeyFunction,
    KeyPlan,
    callable_name,
    generated_filename,
    is_safe_key,
    plan_key,
    signature_source,
    template_key_function,
)
from coalesce.options import Options
from coalesce.stats import Stats
from coalesce.stores.base import Fence
from coalesce.values import Frozen, freeze, freeze_entry

if TYPE_CHECKING:
    from coalesce.cache import Cache

F = TypeVar("F", bound=Callable[..., Any])
P = ParamSpec("P")
R = TypeVar("R", covariant=True)


class CachedFunction(Protocol[P, R]):
    """What the decorators return: the function, plus `key`, `invalidate` and `stats`.

    Type checkers see calls with the original parameters and result. Accessed on an
    instance (a decorated method) it is typed `Any`: a protocol cannot drop `self`.
    """

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The key (without namespace) a call with these arguments uses."""
        ...

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Delete that entry: `bool`, or an awaitable of it for async functions."""
        ...

    def stats(self) -> dict[str, Any]:
        """This function's counters."""
        ...

    def __get__(self, instance: object, owner: type | None = None) -> Any: ...


class Decorator(Protocol):
    """A decorator configured by `cached(...)` / `coalesced(...)`."""

    def __call__(self, fn: Callable[P, R], /) -> CachedFunction[P, R]: ...


_perf = time.perf_counter
_count_lock = threading.Lock()  # miss-path counters are exact; hits are counted lock-free
_FRESH, _EARLY, _STALE = Freshness.FRESH, Freshness.EARLY, Freshness.STALE


#: How a function without a cache of its own finds one at its first call: the default
#: cache's binding, set by `coalesce.cache` when it is imported, so that this module needs
#: no import of it (`coalesce.cache` imports this one).
bind_default: Callable[[Policy], Cache] | None = None


class Policy:
    """Everything decided about one decorated function when it is decorated."""

    #: Whether the hot path skips its read while `expect_miss` (see `_may_skip_reads`).
    skips_reads = False
    #: A hint, written by any thread without a lock: the last read of this function missed.
    expect_miss = False
    #: Whether entries may carry tags (else `tag_names` is ()): set by each kind of policy.
    tagged = False

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        cache: Cache | None,
        key: str | None,
        exclude: Sequence[str],
        tags: Sequence[str],
        options: Options,
        store: bool,
    ) -> None:
        self.use(options)
        self.fn = fn
        self.name = f"{getattr(fn, '__module__', None)}.{callable_name(fn)}"
        self.key_template = key
        self.plan = plan_key(fn, key, exclude)
        self.make_key: KeyFunction = self.plan.make
        self.tag_keys: list[KeyFunction] = [template_key_function(fn, tag) for tag in tags]
        self.tagged = bool(tags)  # whether entries may carry tags (else `tag_names` is ())
        self.skips_reads = self.expect_miss = False
        self.store = store  # False for `coalesced`: share calls, keep nothing
        self.stats = Stats(self.stats_name)
        self.fixed_cache = cache
        self.cache: Cache | None = cache  # the default cache is bound at the first call
        # early refresh on a shared store: key -> (fresh_until, refresh moment) of the entry
        # last read, whose decoded copies are new objects per read (see `_moment`)
        self.moments: dict[str, tuple[float, float]] = {}

    def use(self, options: Options) -> None:
        """Keep checked options, each also as an attribute of its own (read per call)."""
        self.ttl = options.ttl
        self.stale_ttl = options.stale_ttl
        self.stale_if_error = options.stale_if_error
        self.cache_errors = options.cache_errors
        self.timeout = options.timeout
        self.beta = options.early_refresh  # XFetch's beta; 0.0: no early refresh
        self.jitter = options.jitter
        self.copy = options.copy

    @property
    def stats_name(self) -> str:
        return self.key_template or self.name

    def bind(self) -> Cache:
        """The cache this function uses; for the default cache, looked up now."""
        assert bind_default is not None  # coalesce.cache sets it, and the package imports it
        return bind_default(self)

    def count_shared(self) -> None:
        """Count a follower that received another caller's outcome."""
        with _count_lock:
            self.stats.coalesced += 1

    def tag_names(self, cache: Cache, args: Any, kwargs: Any) -> tuple[str, ...]:
        """The full names of the tags a call's entry carries (asked only when `tagged`)."""
        return tuple(cache.prefix + make(*args, **kwargs) for make in self.tag_keys)

    def make_entry(self, cache: Cache, value: Any, started: float, tags: tuple[str, ...]) -> Entry:
        elapsed = _perf() - started
        if self.store and (self.copy or cache.store.shared):
            value = freeze(value, cache.serializer, self.name)
        ttl = cache.default_ttl if self.ttl is None else self.ttl
        if self.jitter and ttl is not None:  # uniform in [ttl * (1 - jitter), ttl]
            ttl -= ttl * self.jitter * random.random()
        now = cache.clock()
        return Entry(value, now, ttl, self.stale_ttl, elapsed, tags, False, self.stale_if_error)

    def error_entry(self, cache: Cache, exc: Exception, started: float) -> Entry:
        assert self.cache_errors is not None
        spec = [_text(type(exc).__module__), _text(type(exc).__qualname__), _message(exc)]
        return Entry(spec, cache.clock(), self.cache_errors, 0.0, _perf() - started, (), True)

    def count(self, counter: str) -> None:
        """Add one to a miss-path counter (exact: under the lock)."""
        with _count_lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)


def _call_given(fn: Callable[[], Any], key: str, tags: tuple[str, ...]) -> Any:
    """The "function" of a cache-aside policy: the call's own `fn`, without arguments."""
    return fn()


def _given_key(fn: Callable[[], Any], key: str, tags: tuple[str, ...]) -> str:
    return key


_GIVEN_KEY = KeyPlan(_given_key, "", {}, "True", lambda raw_key: True)
_ASIDE_DEFAULTS = Options()


class AsidePolicy(Policy):
    """The policy of cache-aside calls (`Cache.get_or_set`) counted under one stats name.

    The same path as a decorated function's, with the call's arguments standing for what
    a decorator would get from its parameters: every step receives `args` =
    `(fn, key, tags)`, the function to compute (no arguments), the key in its stored form
    and the full tag names; `policy.fn` calls `fn`, `make_key` returns `key`. Options
    (ttl...) may change from one call to the next: `with_options` gives a per-call copy
    sharing the name's `Stats`.
    """

    def __init__(self, cache: Cache, name: str) -> None:
        self.use(_ASIDE_DEFAULTS)
        self.fn = _call_given
        self.name = name  # named in messages: "cannot encode ... of user"
        self.key_template = None
        self.plan = _GIVEN_KEY
        self.make_key = _given_key
        self.tag_keys = []
        self.tagged = True  # tags come with each call (`tag_names`)
        self.store = True
        self.stats = Stats(name)
        self.fixed_cache = cache
        self.cache = cache
        self.moments = {}
        # this policy with other options, by the options as given (already checked)
        self._variants: dict[tuple[Any, ...], AsidePolicy] = {}

    def with_options(self, given: dict[str, Any]) -> AsidePolicy:
        """This policy with one call's options (checked here), counting into its stats."""
        # by value and type: `ttl=True` must not find the variant of `ttl=1`; NaN finds none
        values = tuple(given.values())
        options = values + tuple(map(type, values))
        variant = self._variants.get(options)
        if variant is None:
            variant = _copy.copy(self)
            variant.use(Options.checked(**given))  # raises when wrong
            if len(self._variants) >= 64:  # ttls computed per call: keep a few
                self._variants.clear()
            self._variants[options] = variant
        return variant

    def tag_names(self, cache: Cache, args: Any, kwargs: Any) -> tuple[str, ...]:
        return cast(tuple[str, ...], args[2])


def _message(exc: Exception) -> str:
    """The text an exception is rebuilt from: its one string argument as it is (`str` of a
    `KeyError` would quote it again), else `str(exc)`."""
    args = exc.args
    return _text(args[0] if len(args) == 1 and isinstance(args[0], str) else str(exc))


def _text(text: str) -> str:
    """`text` as valid UTF-8 (a lone surrogate would make the entry unstorable)."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _result(entry: Entry) -> Any:
    """What a caller receives from an entry: a private copy, or the cached error raised."""
    if entry.error:
        raise _rebuild_error(entry.value)
    value = entry.value
    return value.thaw() if type(value) is Frozen else value


def _rebuild_error(spec: Any) -> Exception:
    """The exception a negatively cached entry stands for, without importing anything."""
    from coalesce.errors import CachedError

    if isinstance(spec, Frozen):
        spec = spec.thaw()
    module, qualname, message = spec
    cls: Any = sys.modules.get(module)
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)  # type: ignore[no-any-return,unused-ignore]
        except Exception:
            pass
    return CachedError(f"{module}.{qualname}", message)


# ---------------------------------------------------------------------------------------
# the hot path, generated per function
#
# A hit is the common case, so it runs in a wrapper generated with the decorated function's
# own parameter list: Python binds the arguments natively and the key is rendered inline
# (see `keys.KeyPlan`). Everything else leaves it for `_slow` / `_aslow` below. The two
# sources differ only in `async`/`await`; `{fresh}` is the hit test (`_FRESH_TEST`, or with
# early refresh `_EARLY_TEST`, which sends the call to `_slow` once the entry's refresh
# moment has come).

_SYNC_WRAPPER = """
def __coalesce_wrapper({params}):
    __coalesce_cache = __coalesce_policy.cache or __coalesce_policy.bind()
    if not __coalesce_cache.enabled:
        return __coalesce_fn(*{args}, **{kwargs})
    try:
        __coalesce_k = __coalesce_cache.prefix + {expr}
    except Exception:  # a huge int, a field that cannot render: the slow path says why
        return __coalesce_slow(__coalesce_cache, __coalesce_policy, "", None, {args}, {kwargs})
    __coalesce_e = __coalesce_cache._read(__coalesce_k) if {guard} else None
    if __coalesce_e is not None and ({fresh}) and not __coalesce_e.error:
        __coalesce_stats.hits += 1
        __coalesce_v = __coalesce_e.value
        if __coalesce_type(__coalesce_v) is __coalesce_Frozen:
            return __coalesce_v.thaw()
        return __coalesce_v
    return __coalesce_slow(
        __coalesce_cache, __coalesce_policy, __coalesce_k, __coalesce_e, {args}, {kwargs}
    )
"""

_ASYNC_WRAPPER = """
async def __coalesce_wrapper({params}):
    __coalesce_cache = __coalesce_policy.cache or __coalesce_policy.bind()
    if not __coalesce_cache.enabled:
        return await __coalesce_fn(*{args}, **{kwargs})
    try:
        __coalesce_k = __coalesce_cache.prefix + {expr}
    except Exception:  # a huge int, a field that cannot render: the slow path says why
        return await __coalesce_slow(
            __coalesce_cache, __coalesce_policy, "", None, {args}, {kwargs}
        )
    if not {guard}:
        __coalesce_e = None
    elif __coalesce_cache.local:
        __coalesce_e = __coalesce_cache._read(__coalesce_k)
    else:
        __coalesce_e = await __coalesce_cache._aread(__coalesce_k)
    if __coalesce_e is not None and ({fresh}) and not __coalesce_e.error:
        __coalesce_stats.hits += 1
        __coalesce_v = __coalesce_e.value
        if __coalesce_type(__coalesce_v) is __coalesce_Frozen:
            return __coalesce_v.thaw()
        return __coalesce_v
    return await __coalesce_slow(
        __coalesce_cache, __coalesce_policy, __coalesce_k, __coalesce_e, {args}, {kwargs}
    )
"""

_FRESH_TEST = "__coalesce_e.fresh_until > __coalesce_cache.clock()"
# With early refresh: a hit until the entry's refresh moment (`entry.refresh_moment`, at or
# before its expiry), drawn by the first read of the entry in this process (`_moment`: the
# moment is NaN until then, and NaN compares false), then kept on the entry: one comparison
# per hit. Once a refresh has started, the moment is moved to the expiry (`_refreshing`).
_EARLY_TEST = (
    "(__coalesce_r := __coalesce_e.refresh_at) > (__coalesce_n := __coalesce_cache.clock())"
    " or __coalesce_r != __coalesce_r and __coalesce_moment("
    "__coalesce_cache, __coalesce_policy, __coalesce_k, __coalesce_e) > __coalesce_n"
)


def _generate(policy: Policy, is_async: bool) -> Callable[..., Any]:
    """Compile the hot-path wrapper of `policy.fn` (see the sources above)."""
    params, defaults, args, kwargs = signature_source(policy.fn)
    template = _ASYNC_WRAPPER if is_async else _SYNC_WRAPPER
    guard = policy.plan.hit_guard if policy.store else "False"  # `coalesced` never reads
    policy.skips_reads = _may_skip_reads(policy)
    if policy.skips_reads:
        guard = f"(({guard}) and not __coalesce_policy.expect_miss)"
    fresh = _EARLY_TEST if policy.beta else _FRESH_TEST
    source = template.format(
        params=params, args=args, kwargs=kwargs, expr=policy.plan.expr, guard=guard, fresh=fresh
    )
    names: dict[str, Any] = {
        **policy.plan.names,
        **defaults,
        "__coalesce_policy": policy,
        "__coalesce_fn": policy.fn,
        "__coalesce_stats": policy.stats,
        "__coalesce_moment": _moment,
        "__coalesce_type": type,
        "__coalesce_Frozen": Frozen,
        "__coalesce_slow": _aslow if is_async else _slow,
    }
    filename = generated_filename(f"wrapper of {policy.name}", source)
    exec(compile(source, filename, "exec"), names)
    return cast(Callable[..., Any], names["__coalesce_wrapper"])


def _slow(
    cache: Cache, policy: Policy, raw_key: str, entry: Entry | None, args: Any, kwargs: Any
) -> Any:
    """Everything but a fresh hit: escaped keys, entries to refresh, cached errors, misses."""
    reread = False  # whether this call read its key again here (not skipped any more)
    if is_safe_key(raw_key[len(cache.prefix) :]):
        key = raw_key  # the key itself, which the hot path read (see `KeyPlan`)
    else:
        key = cache.prefix + policy.make_key(*args, **kwargs)
        if policy.store and (key != raw_key or not policy.plan.guard_holds(raw_key)):
            entry = cache._read(key)
            reread = True
    if policy.store:
        if entry is None:
            if policy.expect_miss and not reread:  # the hot path skipped its read
                began = cache.clock()
                policy.stats.misses += 1  # until it turns out a hit (`_unread`)
                return _result(_unread(policy, _miss(cache, policy, key, args, kwargs), began))
            policy.expect_miss = policy.skips_reads  # the next call skips its read
            policy.stats.misses += 1
        else:
            state = _served(cache, policy, key, entry)
            if state is not None:
                if state is not _FRESH and not cache.flights.running(key):
                    early = state is _EARLY
                    cache._refresh_in_background(
                        key, lambda: _miss(cache, policy, key, args, kwargs, entry, refresh=early)
                    )
                return _result(entry)
    return _result(_miss(cache, policy, key, args, kwargs, entry))


async def _aslow(
    cache: Cache, policy: Policy, raw_key: str, entry: Entry | None, args: Any, kwargs: Any
) -> Any:
    """`_slow` for async functions."""
    reread = False  # whether this call read its key again here (not skipped any more)
    if is_safe_key(raw_key[len(cache.prefix) :]):
        key = raw_key
    else:
        key = cache.prefix + policy.make_key(*args, **kwargs)
        if policy.store and (key != raw_key or not policy.plan.guard_holds(raw_key)):
            entry = await cache._aread(key)
            reread = True
    if policy.store:
        if entry is None:
            if policy.expect_miss and not reread:
                began = cache.clock()
                policy.stats.misses += 1
                entry = await _amiss(cache, policy, key, args, kwargs)
                return _result(_unread(policy, entry, began))
            policy.expect_miss = policy.skips_reads
            policy.stats.misses += 1
        else:
            state = _served(cache, policy, key, entry)
            if state is not None:
                if state is not _FRESH and not cache.aflights.running(key):
                    early = state is _EARLY
                    cache._arefresh_in_background(
                        key, _amiss(cache, policy, key, args, kwargs, entry, refresh=early)
                    )
                return _result(entry)
    return _result(await _amiss(cache, policy, key, args, kwargs, entry))


def _served(cache: Cache, policy: Policy, key: str, entry: Entry) -> Freshness | None:
    """What a call that read `entry` serves, counted: `_FRESH` (a hit), `_EARLY` (a hit, to
    refresh early) or `_STALE` (stale), served while its caller starts a refresh in the
    background unless one runs; None: a miss to compute (an expired entry, a failed read)."""
    stats = policy.stats
    state = _decide(cache, policy, key, entry)
    if state is _FRESH:
        stats.hits += 1
        return state
    if state is _EARLY:
        stats.hits += 1
        _refreshing(cache, policy, key, entry)
        return state
    if state is _STALE:
        stats.stale += 1
        return state
    stats.misses += 1
    return None


def _decide(cache: Cache, policy: Policy, key: str, entry: Entry) -> Freshness:
    """`entry.decide` now, with early refresh at the entry's moment in this process."""
    if not policy.beta:
        return decide(entry, cache.clock())
    moment = entry.refresh_at
    if moment != moment:  # NaN: not drawn yet
        moment = _moment(cache, policy, key, entry)
    refreshing = key in cache.refreshing
    return decide(entry, cache.clock(), refresh_at=moment, refreshing=refreshing)


#: At most this many keys keep their refresh moments per function on a shared store
_MOMENTS = 10_000


def _moment(cache: Cache, policy: Policy, key: str, entry: Entry) -> float:
    """The moment this process refreshes `entry` early, drawn at its first read here.

    Kept on the entry (`Entry.refresh_at`): the memory store and the near cache hand every
    reader the same object. A shared store decodes a new object per read, so the moment is
    also kept per key in `policy.moments`, for the entry of the same `fresh_until`: one
    draw per entry and process there too, not one per read. Written without a lock: two
    readers drawing at once each keep a valid draw, and the last one stays. While this
    process refreshes the key, the entry read counts as fresh until it expires, without
    keeping that (the refresh may be about to store this very entry).
    """
    if key in cache.refreshing:
        return entry.fresh_until
    if cache.local:
        entry.refresh_at = moment = refresh_moment(entry, policy.beta)
        return moment
    moments = policy.moments
    kept = moments.get(key)
    if kept is not None and kept[0] == entry.fresh_until:
        moment = kept[1]
    else:
        moment = refresh_moment(entry, policy.beta)
        if len(moments) >= _MOMENTS:
            moments.clear()
        moments[key] = (entry.fresh_until, moment)
    entry.refresh_at = moment
    return moment


def _refreshing(cache: Cache, policy: Policy, key: str, entry: Entry) -> None:
    """A refresh of `entry` has started (or another computation of its key runs): no other
    early refresh of it in this process, its readers hit until it expires."""
    entry.refresh_at = entry.fresh_until
    if not cache.local:
        policy.moments[key] = (entry.fresh_until, entry.fresh_until)


def _miss(
    cache: Cache,
    policy: Policy,
    key: str,
    args: Any,
    kwargs: Any,
    previous: Entry | None = None,
    *,
    refresh: bool = False,
) -> Entry:
    """Compute `key` once in this process (and across processes on a shared store).

    `previous` is what this call read (`STORE_FAILED`: the store failed, so its leader
    computes without it); `refresh`: it is fresh, refresh it anyway (early refresh).
    """
    raised: list[Exception] = []
    if refresh:
        policy.count("early_refreshes")
    try:
        entry, _ = cache.flights.run(
            key,
            # a partial, not a closure: one object per miss instead of a cell per name
            functools.partial(_lead, cache, policy, key, args, kwargs, raised, previous, refresh),
            policy.count_shared,
            policy.timeout,
            cache._compute_pool() if policy.timeout is not None else None,
        )
    except CoalesceTimeout as exc:
        return _after_timeout(cache, policy, previous, exc)
    if raised and entry.error:
        raise raised[0]  # the leader's caller gets its own exception, traceback and all
    return entry


def _after_timeout(
    cache: Cache, policy: Policy, previous: Entry | None, exc: CoalesceTimeout
) -> Entry:
    """A caller that stopped waiting: the previous entry when it may stand in, else `exc`."""
    policy.count("timeouts")
    if previous is not None and policy.store and previous.usable_on_error(cache.clock()):
        policy.count("stale")
        return previous
    raise exc


def _lead(
    cache: Cache,
    policy: Policy,
    key: str,
    args: Any,
    kwargs: Any,
    raised: list[Exception],
    previous: Entry | None,
    refresh: bool,
    fence: Fence,
) -> Entry:
    """The leader of this process: check again, then compute once (across processes).

    A failure cached with `cache_errors` goes into `raised`, so that the leader's own caller
    gets the original exception and the others its rebuilt form. After a failed read
    (`previous` is `STORE_FAILED`, or this one) it computes without the store. On a shared
    store the check again is the first step of `fill` itself (Redis: the `CLAIM` script
    reads the entry atomically with taking the lease), so nothing can be stored between
    them. An early refresh (`refresh`) checks only that the entry it refreshes is still the
    one stored (a caller that read it just before the last refresh landed may start another).
    """
    failed = previous is STORE_FAILED
    if policy.store and not failed and cache.local:
        entry = cache._read(key)
        # found fresh, and not the very entry an early refresh refreshes
        if (
            entry is not None
            and entry.fresh_until > cache.clock()
            and not (refresh and entry is previous)
        ):
            return _shareable(cache, policy, entry)
        failed = entry is STORE_FAILED
    if failed:
        kept = _fallback(cache, policy, key)
        if kept is not None:
            return kept
    tags = policy.tag_names(cache, args, kwargs) if policy.tagged else ()
    computed: list[Entry] = []
    tracing = otel.tracing  # None unless coalesce.otel.instrument() was called
    fn = policy.fn if tracing is None else tracing.traced(cache, policy, key, previous, refresh)

    compute = functools.partial(
        _compute, cache, policy, fn, args, kwargs, tags, previous, raised, computed
    )
    if not policy.store:
        return compute()
    if failed:
        cache._remember(key, compute(), fence)
        return computed[0]
    if not tags:  # nothing for a tag invalidation to fence: no need to mark it computing
        if cache.local:  # a memory store: it cannot fail, keeps entries frozen, and `fill`
            entry = compute()  # is compute-then-set there (one call fewer per miss)
            cache.store.set(key, entry, fence=fence)
            return entry
        return _fill(cache, policy, key, fence, tags, refresh, compute, raised, computed)
    with cache._computing(key, tags):
        return _fill(cache, policy, key, fence, tags, refresh, compute, raised, computed)


def _compute(
    cache: Cache,
    policy: Policy,
    fn: Callable[..., Any],
    args: Any,
    kwargs: Any,
    tags: tuple[str, ...],
    previous: Entry | None,
    raised: list[Exception],
    computed: list[Entry],
) -> Entry:
    """`_lead`'s computation: call `fn`, make the entry its outcome leaves (`_failed` when it
    raised), keep it in `computed` (a store that fails after computing: not computed again)."""
    started = _perf()
    try:
        value = fn(*args, **kwargs)
    except Exception as exc:
        computed.append(_failed(cache, policy, exc, started, previous, raised))
        return computed[0]
    stats = policy.stats
    with _count_lock:  # `_count_computation`, written out: one call fewer per sync miss
        stats.computations += 1
        stats.compute_time += _perf() - started
    computed.append(policy.make_entry(cache, value, started, tags))
    return computed[0]


def _may_skip_reads(policy: Policy) -> bool:
    """Whether the hot path may skip its read while this function's reads keep missing.

    On a store whose `fill` reads the entry in its claim (`Store.checks_in_fill`: Redis
    without a near cache), a function that has no use for an entry that is not fresh (no
    stale windows, no early refresh) needs nothing of a read that the claim does not tell:
    after a miss (`_slow` sets `expect_miss`) the next call goes straight to the claim, so
    a run of misses costs the claim and the store, not a read besides (`_unread`). Not with
    `timeout`: a stored entry would then wait for the compute pool like a computation. The
    cache must be known when decorating: the default cache is looked up at the first call.
    """
    cache = policy.fixed_cache
    return (
        cache is not None
        and cache.store.checks_in_fill
        and policy.store
        and not policy.stale_ttl
        and not policy.stale_if_error
        and not policy.beta
        and policy.timeout is None
    )


def _unread(policy: Policy, entry: Entry, began: float) -> Entry:
    """Count a call that skipped its read (`_slow` counted a miss): a hit after all when the
    claim served it an entry made before the call began (stored already; then reads resume,
    the next call of the function reads first), else the miss it was (computed here, or by
    another process while this one waited). Followers in this process count the same way."""
    if entry.created < began:
        policy.expect_miss = False
        stats = policy.stats
        stats.misses -= 1
        stats.hits += 1
    return entry


def _fill(
    cache: Cache,
    policy: Policy,
    key: str,
    fence: Fence,
    tags: tuple[str, ...],
    refresh: bool,
    compute: Callable[[], Entry],
    raised: list[Exception],
    computed: list[Entry],
) -> Entry:
    """`_lead`'s last step: compute and store through the store; compute anyway when it fails.

    A `BackendError` the function itself raised (a cache it calls failed) is its outcome, not
    a failure of this store: it goes up like any exception of the function."""
    try:
        options = {"refresh": True} if refresh else {}
        return _shareable(
            cache, policy, cache.store.fill(key, compute, fence=fence, tags=tags, **options)
        )
    except BackendError as exc:
        if raised and raised[-1] is exc:
            raise
        policy.expect_miss = False  # read again: a failing store's reads serve its fallback
        cache._backend_failed(policy, exc)  # (raises when failing closed)
        entry = computed[0] if computed else compute()
        cache._remember(key, entry, fence)
        return entry


def _fallback(cache: Cache, policy: Policy, key: str) -> Entry | None:
    """After a failed read: count it, and check the fallback again (no I/O): a leader of
    this process may have just kept an entry there while this caller's read was failing."""
    policy.count("backend_errors")
    kept = cache.store.fallback(key) if policy.store else None
    if kept is not None and kept.fresh_until > cache.clock():
        return _shareable(cache, policy, kept)
    return None


def _failed(
    cache: Cache,
    policy: Policy,
    exc: Exception,
    started: float,
    previous: Entry | None,
    raised: list[Exception],
) -> Entry:
    """The entry a computation that raised `exc` leaves, or raise it.

    Within the previous value's `stale_if_error` window: that value again, fresh for a
    second (`retry_entry`); with `cache_errors`: the failure as an entry (the leader's own
    caller gets `exc` itself, from `raised`); else `exc` goes up to every caller. Either way
    `exc` goes into `raised`: `_fill` tells the function's exceptions from the store's.
    """
    _count_computation(policy, started, failed=True)
    if policy.stale_if_error and previous is not None and previous is not STORE_FAILED:
        now = cache.clock()
        if previous.usable_on_error(now):
            policy.count("stale_on_error")
            return retry_entry(previous, now)
    raised.append(exc)
    if policy.cache_errors is None:
        raise exc
    return policy.error_entry(cache, exc, started)


def _shareable(cache: Cache, policy: Policy, entry: Entry) -> Entry:
    """An entry read by a flight's leader, safe to hand to all its followers.

    The memory store keeps values frozen already; an entry decoded from a shared store
    holds a plain value, which followers would otherwise share.
    """
    if cache.local or not policy.copy:
        return entry
    return freeze_entry(entry, cache.serializer)


def _count_computation(policy: Policy, started: float, *, failed: bool = False) -> None:
    stats = policy.stats
    with _count_lock:
        stats.computations += 1
        stats.compute_time += _perf() - started
        if failed:
            stats.errors += 1


# ---------------------------------------------------------------------------------------
# the miss path, async: the same steps, awaiting


async def _amiss(
    cache: Cache,
    policy: Policy,
    key: str,
    args: Any,
    kwargs: Any,
    previous: Entry | None = None,
    *,
    refresh: bool = False,
) -> Entry:
    raised: list[Exception] = []
    if refresh:
        policy.count("early_refreshes")
    try:
        entry, _ = await cache.aflights.run(
            key,
            functools.partial(_alead, cache, policy, key, args, kwargs, raised, previous, refresh),
            policy.count_shared,
            policy.timeout,
        )
    except CoalesceTimeout as exc:
        return _after_timeout(cache, policy, previous, exc)
    if raised and entry.error:
        raise raised[0]
    return entry


async def _alead(
    cache: Cache,
    policy: Policy,
    key: str,
    args: Any,
    kwargs: Any,
    raised: list[Exception],
    previous: Entry | None,
    refresh: bool,
    fence: Fence,
) -> Entry:
    """The leader of this process on this loop: check again, then compute once."""
    failed = previous is STORE_FAILED
    if policy.store and not failed and cache.local:
        entry = cache._read(key)  # a local store's read: no I/O to await
        if (
            entry is not None
            and entry.fresh_until > cache.clock()
            and not (refresh and entry is previous)
        ):
            return _shareable(cache, policy, entry)
        failed = entry is STORE_FAILED
    if failed:
        kept = _fallback(cache, policy, key)
        if kept is not None:
            return kept
    tags = policy.tag_names(cache, args, kwargs) if policy.tagged else ()
    computed: list[Entry] = []
    tracing = otel.tracing  # as in `_lead`
    fn = policy.fn if tracing is None else tracing.atraced(cache, policy, key, previous, refresh)

    compute = functools.partial(
        _acompute, cache, policy, fn, args, kwargs, tags, previous, raised, computed
    )
    if not policy.store:
        return await compute()
    if failed:
        cache._remember(key, await compute(), fence)
        return computed[0]
    if not tags:  # as in `_lead`
        if cache.local:
            entry = await compute()
            cache.store.set(key, entry, fence=fence)
            return entry
        return await _afill(cache, policy, key, fence, tags, refresh, compute, raised, computed)
    with cache._computing(key, tags):
        return await _afill(cache, policy, key, fence, tags, refresh, compute, raised, computed)


async def _acompute(
    cache: Cache,
    policy: Policy,
    fn: Callable[..., Any],
    args: Any,
    kwargs: Any,
    tags: tuple[str, ...],
    previous: Entry | None,
    raised: list[Exception],
    computed: list[Entry],
) -> Entry:
    """`_compute` for async functions."""
    started = _perf()
    try:
        value = await fn(*args, **kwargs)
    except Exception as exc:
        computed.append(_failed(cache, policy, exc, started, previous, raised))
        return computed[0]
    _count_computation(policy, started)
    computed.append(policy.make_entry(cache, value, started, tags))
    return computed[0]


async def _afill(
    cache: Cache,
    policy: Policy,
    key: str,
    fence: Fence,
    tags: tuple[str, ...],
    refresh: bool,
    compute: Callable[[], Awaitable[Entry]],
    raised: list[Exception],
    computed: list[Entry],
) -> Entry:
    """`_fill` for async functions."""
    try:
        options = {"refresh": True} if refresh else {}
        entry = await cache.store.afill(key, compute, fence=fence, tags=tags, **options)
        return _shareable(cache, policy, entry)
    except BackendError as exc:
        if raised and raised[-1] is exc:
            raise
        policy.expect_miss = False
        cache._backend_failed(policy, exc)
        entry = computed[0] if computed else await compute()
        cache._remember(key, entry, fence)
        return entry


# ---------------------------------------------------------------------------------------
# cache-aside calls (`Cache.get_or_set`, `get`): the hot path above written out by hand for
# a key that is given, then the decorators' own `_slow` / `_aslow`


def get_or_set(
    cache: Cache, policy: AsidePolicy, key: str, fn: Callable[[], Any], tags: tuple[str, ...]
) -> Any:
    """`key` (stored form, without namespace) from the store, else `fn()` computed once."""
    full = cache.prefix + key
    entry = cache._read(full)
    # with early refresh: a hit until the entry's refresh moment (NaN until drawn in `_slow`)
    if (
        entry is not None
        and (entry.refresh_at if policy.beta else entry.fresh_until) > cache.clock()
        and not entry.error
    ):
        policy.stats.hits += 1
        value = entry.value
        return value.thaw() if type(value) is Frozen else value
    return _slow(cache, policy, full, entry, (fn, key, tags), {})


async def aget_or_set(
    cache: Cache,
    policy: AsidePolicy,
    key: str,
    fn: Callable[[], Awaitable[Any]],
    tags: tuple[str, ...],
) -> Any:
    """`get_or_set` for async code: `await fn()` computed once."""
    full = cache.prefix + key
    entry = cache._read(full) if cache.local else await cache._aread(full)
    if (
        entry is not None
        and (entry.refresh_at if policy.beta else entry.fresh_until) > cache.clock()
        and not entry.error
    ):
        policy.stats.hits += 1
        value = entry.value
        return value.thaw() if type(value) is Frozen else value
    return await _aslow(cache, policy, full, entry, (fn, key, tags), {})


def served(entry: Entry | None, default: Any, now: float) -> Any:
    """What `Cache.get` returns for an entry it read: what a decorated call would serve
    (a private copy of a fresh or stale value, a cached failure raised), else `default`."""
    if entry is None or entry.stale_until <= now:
        return default  # missing, expired, or `STORE_FAILED`
    return _result(entry)


# ---------------------------------------------------------------------------------------
# the decorator


def decorate(policy: Policy) -> Callable[..., Any]:
    """Wrap `policy.fn`, keeping its identity, and attach `key`, `invalidate` and `stats`."""
    fn = policy.fn
    is_async = inspect.iscoroutinefunction(fn)
    wrapper: Any = functools.update_wrapper(_generate(policy, is_async), fn)

    def key(*args: Any, **kwargs: Any) -> str:
        """The key (without namespace) that a call with these arguments uses."""
        return policy.make_key(*args, **kwargs)

    def stats() -> dict[str, Any]:
        """This function's counters."""
        return policy.stats.as_dict()

    if is_async:

        async def invalidate(*args: Any, **kwargs: Any) -> bool:
            """Delete the entry a call with these arguments would use; True if it existed."""
            cache = policy.cache or policy.bind()
            policy.stats.invalidations += 1
            return await cache.ainvalidate(policy.make_key(*args, **kwargs))

    else:

        def invalidate(*args: Any, **kwargs: Any) -> bool:  # type: ignore[misc]
            """Delete the entry a call with these arguments would use; True if it existed."""
            cache = policy.cache or policy.bind()
            policy.stats.invalidations += 1
            return cache.invalidate(policy.make_key(*args, **kwargs))

    wrapper.key = key
    wrapper.invalidate = invalidate
    wrapper.stats = stats
    wrapper._policy = policy  # internal: not part of the public surface
    return cast(Callable[..., Any], wrapper)


# ---------------------------------------------------------------------------------------
# FastAPI route handlers: refused by the core decorators
#
# A handler's parameters are filled by FastAPI (`Depends`, `Query`, `Header`...): the core
# would key on a database session or a credential, and fail (or share) on every request.
# `coalesce.fastapi.cached` keys on the request instead. Detected without importing fastapi:
# a marker is an instance of a class defined under `fastapi.`.


def _is_fastapi_marker(value: Any) -> bool:
    return type(value).__module__.startswith("fastapi.")


def _fastapi_parameter(fn: Callable[..., Any]) -> str | None:
    """The first parameter of `fn` that FastAPI fills: a marker as its default or in its
    `Annotated[...]` metadata."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    func = getattr(fn, "__func__", fn)
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception:  # one name does not resolve: resolve the others one by one
        hints = {}
        for name, hint in dict(getattr(func, "__annotations__", None) or {}).items():
            try:
                hints[name] = (
                    eval(hint, getattr(func, "__globals__", {})) if isinstance(hint, str) else hint
                )
            except Exception:
                continue
    for name, param in params.items():
        hint = hints.get(name, param.annotation)
        metadata = _annotated_metadata(hint)
        if _is_fastapi_marker(param.default) or any(map(_is_fastapi_marker, metadata)):
            return name
    return None


def _annotated_metadata(hint: Any) -> tuple[Any, ...]:
    """The `Annotated[...]` metadata of a type hint, also inside `Optional[...]` (Python
    3.10's `get_type_hints` wraps `Annotated[X | None, ...] = None` so)."""
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        return tuple(getattr(hint, "__metadata__", ()))
    if origin is typing.Union or origin is types.UnionType:
        return tuple(m for arg in typing.get_args(hint) for m in _annotated_metadata(arg))
    return ()


# See `_registered_route`: at most this many references when not routed (frames hold more
# of them on 3.10); a routed function has at least 3 more (9 on 3.11, 12 on 3.10).
_UNROUTED_REFERENCES = 6 if sys.version_info >= (3, 11) else 11


def _registered_route(fn: Callable[..., Any]) -> bool:
    """Whether a FastAPI route already holds `fn` as its endpoint: the core decorator was
    put above `@app.get(...)`, which registered the undecorated function."""
    if "fastapi" not in sys.modules:  # no app can exist: skip the heap scan
        return False
    # A function being decorated is held by a few frames (this one, the decorator's, its
    # caller's); a route holding it adds several references. Only then scan the heap.
    if sys.getrefcount(fn) <= _UNROUTED_REFERENCES:
        return False
    for holder in gc.get_referrers(fn):
        state = holder
        if not isinstance(holder, dict):
            mro = type(holder).__mro__
            if not any(cls.__module__.startswith("fastapi.") for cls in mro):
                continue
            state = getattr(holder, "__dict__", None)
        # an APIRoute (its instance dict, or the object when its attributes are inline)
        if isinstance(state, dict) and state.get("endpoint") is fn and "dependant" in state:
            return True
    return False


def refuse_route_handler(fn: Callable[..., Any], store: bool) -> None:
    """Raise `ConfigurationError` for a FastAPI route handler (see above)."""
    edge = "coalesce.fastapi.cached" if store else "coalesce.fastapi.coalesced"
    core = "cached" if store else "coalesced"
    name = callable_name(fn)
    parameter = _fastapi_parameter(fn)
    if parameter is not None:
        raise ConfigurationError(
            f"{name}() is a FastAPI route handler (FastAPI fills its parameter "
            f"{parameter!r}): the core @{core} would build keys from what FastAPI injects "
            f"(a session, a credential) and fail on every request. Decorate route handlers "
            f"with @{edge} (under @app.get(...)), which keys on the request"
        )
    if _registered_route(fn):
        raise ConfigurationError(
            f"{name}() is already a FastAPI route: @{core} is above @app.get(...), so "
            f"FastAPI calls the undecorated function and nothing is cached. Put the "
            f"decorator under @app.get(...), and use @{edge} for route handlers"
        )


def make_decorator(
    cache: Cache | None,
    fn: Callable[..., Any] | None,
    *,
    store: bool,
    key: str | None = None,
    exclude: Sequence[str] = (),
    tags: Sequence[str] = (),
    **options: Any,
) -> Any:
    """Shared by `Cache.cached`, `Cache.coalesced` and the module-level decorators;
    `options` are those of `Options.checked`, checked here, once."""
    for name, given in (("exclude", exclude), ("tags", tags)):
        if isinstance(given, (str, bytes)) or not all(isinstance(x, str) for x in given):
            what = "parameter names" if name == "exclude" else "tag templates"
            raise ConfigurationError(f"{name} must be a list of {what}, not {given!r}")
    checked = Options.checked(**options)

    def decorator(func: F) -> F:
        if not callable(func):
            raise ConfigurationError(f"can only decorate functions, not {func!r}")
        if isinstance(func, (staticmethod, classmethod)):
            raise ConfigurationError(
                "put @staticmethod/@classmethod above the coalesce decorator, not below it"
            )
        refuse_route_handler(func, store)
        policy = Policy(
            func,
            cache=cache,
            key=key,
            exclude=tuple(exclude),
            tags=tuple(tags),
            options=checked,
            store=store,
        )
        if cache is not None:
            cache._register(policy)
        return cast(F, decorate(policy))

    if fn is not None:
        return decorator(fn)  # used bare: @cached
    return decorator


def run_sync_refresh(job: Callable[[], Any]) -> None:
    """Run a background refresh, swallowing its error (the next caller will see it)."""
    with contextlib.suppress(Exception):
        job()
