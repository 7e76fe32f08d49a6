"""What is decided once about a `cached_many` function: its key and tags per id, its options.

A key template of a batch function has one kind of field, filled with each id: `{}`, and
the same with an attribute, an index, a conversion or a spec (`{.id}`, `{!r}`, `{:08d}`).
It is rendered by the decorators' own key builder (`keys.template_key_function`) over a
one-parameter function, so `user:{}` gives `user:2` for 2, as `key="user:{user_id}"` does
for a single-key function: both decorators, `cache.get("user:2")` and
`cache.invalidate("user:2")` meet the same entries.

An id the function does not return is absent. With `cache_missing=<seconds>` its absence is
stored as an entry of its own (`ABSENT`, an error entry read back as "absent", never raised).
"""

from __future__ import annotations

import string
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from coalesce.decorators import Policy
from coalesce.entry import Entry
from coalesce.errors import ConfigurationError, KeyTemplateError
from coalesce.keys import KeyFunction, callable_name, template_key_function
from coalesce.options import Options, check_seconds
from coalesce.stats import Stats
from coalesce.values import Frozen

if TYPE_CHECKING:
    from coalesce.cache import Cache

_FORMATTER = string.Formatter()
#: The value of an entry that stores an id's absence (`cache_missing`): an error entry, as a
#: cached failure is, whose "exception" names this marker; `cache.get` raises `KeyError`.
ABSENT = ["builtins", "KeyError", "coalesce: absent (cache_missing)"]
DEFAULT_BATCH_WINDOW = 0.002  # seconds sync `load` calls wait for others to join a batch
DEFAULT_MAX_BATCH = 1000


def is_absent(entry: Entry) -> bool:
    """Whether `entry` stores an id's absence (see `ABSENT`)."""
    if not entry.error:
        return False
    value = entry.value
    if isinstance(value, Frozen):
        value = value.thaw()
    return list(value) == ABSENT if isinstance(value, (list, tuple)) else False


def usable(entry: Entry | None, now: float) -> bool:
    """Whether a stored entry answers for its id now: fresh, or a fresh absence."""
    if entry is None or entry.fresh_until <= now:
        return False
    return not entry.error or is_absent(entry)


def id_template(template: str, what: str) -> str:
    """`template` with each field rooted at the parameter `id` (`user:{}` -> `user:{id}`);
    `KeyTemplateError` for a field naming anything but the id."""
    if not isinstance(template, str):
        raise KeyTemplateError(f"{what} must be a template string such as 'user:{{}}'")
    out = []
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise KeyTemplateError(f"{what} template {template!r} is not valid: {exc}") from None
    for literal, field, spec, conversion in parsed:
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is None:
            continue
        if field[:1] not in ("", ".", "["):
            raise KeyTemplateError(
                f"{what} template {template!r}: a field of a cached_many template is filled "
                f"with each id: write {{}} (or {{.attr}}, {{!r}}, {{:spec}}), not {{{field}}}"
            )
        out.append("{id" + field + (f"!{conversion}" if conversion else ""))
        out.append((f":{spec}" if spec else "") + "}")
    return "".join(out)


def _id_function(fn: Callable[..., Any]) -> Callable[[Any], None]:
    """A one-parameter function named like `fn`, for the key builder's messages."""

    def each(id: Any) -> None:
        return None

    each.__qualname__ = callable_name(fn)
    each.__module__ = getattr(fn, "__module__", None) or __name__
    return each


class BatchPolicy(Policy):
    """Everything decided about one `cached_many` function when it is decorated.

    Reuses `Policy` for entries (`make_entry`: frozen values, ttl, stale window, tags) and
    for the stats slot `Cache.stats()` lists. `make_key(id)` is the stored key of an id
    (without namespace); `tag_names` the full tag names of its entry.
    """

    def __init__(
        self,
        cache: Cache,
        fn: Callable[..., Any],
        *,
        key: str,
        tags: Sequence[str],
        options: Options,
        cache_missing: float | None,
        batch_window: float,
        max_batch: int,
    ) -> None:
        if isinstance(tags, (str, bytes)) or not all(isinstance(t, str) for t in tags):
            raise ConfigurationError(f"tags must be a list of tag templates, not {tags!r}")
        if "{" not in id_template(key, "key").replace("{{", ""):
            raise KeyTemplateError(
                f"key template {key!r} of a cached_many function needs a field filled with "
                "each id, such as 'user:{}': without one, every id would share one entry"
            )
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigurationError(f"max_batch must be a positive integer, not {max_batch!r}")
        self.use(options)
        each = _id_function(fn)
        self.fn = fn
        self.name = f"{getattr(fn, '__module__', None)}.{callable_name(fn)}"
        self.key_template = key
        self.make_key: KeyFunction = template_key_function(each, id_template(key, "key"))
        self.tag_keys = [template_key_function(each, id_template(t, "tag")) for t in tags]
        self.store = True
        self.stats = Stats(self.stats_name)
        self.fixed_cache = cache
        self.cache = cache
        self.cache_missing = check_seconds("cache_missing", cache_missing, allow_none=True)
        self.batch_window = check_seconds("batch_window", batch_window) or 0.0
        self.max_batch = max_batch
        self.count_lock = threading.Lock()  # the batch counters are exact

    def tag_names(self, cache: Cache, args: Any, kwargs: Any) -> tuple[str, ...]:
        """The full tag names of the entry of the id `args[0]`."""
        if not self.tag_keys:
            return ()
        return tuple(cache.prefix + make(args[0]) for make in self.tag_keys)

    def absent_entry(self, cache: Cache, tags: tuple[str, ...]) -> Entry | None:
        """The entry storing an id's absence, or None when absences are not cached."""
        if self.cache_missing is None:
            return None
        return Entry(list(ABSENT), cache.clock(), self.cache_missing, 0.0, 0.0, tags, True)

    def count_batch(self, ids: int, seconds: float, *, failed: bool = False) -> None:
        """Count one call of the function with `ids` ids."""
        stats = self.stats
        with self.count_lock:
            stats.batches += 1
            stats.batch_ids += ids
            stats.computations += 1
            stats.compute_time += seconds
            if failed:
                stats.errors += 1

    def count_reads(self, hits: int, stale: int, misses: int) -> None:
        stats = self.stats
        with self.count_lock:
            stats.hits += hits
            stats.stale += stale
            stats.misses += misses

    def count_shared(self, ids: int = 1) -> None:
        with self.count_lock:
            self.stats.coalesced += ids
