"""The options of one cached call, checked once: `Options.checked(...)`.

The decorators check theirs when they decorate; `get_or_set` checks each distinct set once
(see `decorators.AsidePolicy`). Every bad value raises `ConfigurationError` naming the
option, so a mistake shows at import time, not at the first call in production.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypedDict

from coalesce.errors import ConfigurationError


class CachedOptions(TypedDict, total=False):
    """The keyword options of `cached` (`Cache.cached` and the module-level one), as a user
    gives them; written once here, the decorators take them as `**options`. What each
    means and its default: `Cache.cached`'s docstring (and the README's Options table)."""

    ttl: float | None
    key: str | None
    exclude: Sequence[str]
    tags: Sequence[str]
    stale_ttl: float
    stale_if_error: float
    cache_errors: float | None
    timeout: float | None
    early_refresh: bool | float
    jitter: float
    copy: bool


def check_option_names(decorator: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """`ConfigurationError` naming an option `decorator` does not take (a typo such as
    `tll=60` would otherwise be a bare `TypeError`)."""
    known = set(allowed)
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigurationError(
            f"{decorator} has no option {unknown[0]!r} (its options: {', '.join(sorted(known))})"
        )


MAX_SECONDS = 315_360_000  # 10 years: a longer time (or inf) is a mistake, and overflows stores


def check_seconds(
    name: str, value: float | None, *, allow_none: bool = False, allow_zero: bool = False
) -> float | None:
    """`value` as float seconds, or `ConfigurationError` naming `name`."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ConfigurationError(f"{name} must be a number of seconds, not {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigurationError(f"{name} must be positive, not {value!r}")
    if value > MAX_SECONDS:
        hint = "; ttl=None keeps entries without expiry" if allow_none else ""
        raise ConfigurationError(
            f"{name} must be at most {MAX_SECONDS:,} seconds (10 years), not {value!r}{hint}"
        )
    return float(value)


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be True or False, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Options:
    """How long an entry lives and how callers are served around its expiry.

    * `ttl`: seconds an entry is fresh (None: the cache's `default_ttl`);
    * `stale_ttl`: seconds after that it is served while one caller refreshes it;
    * `stale_if_error`: seconds after expiry it is served when refreshing it raises
      (RFC 5861); the source is retried about once a second meanwhile;
    * `cache_errors`: seconds a raised exception is cached (None: never);
    * `timeout`: seconds a caller waits for a computation before it gets the stale value
      (when one may be served) or `CoalesceTimeout`; the computation goes on;
    * `early_refresh`: XFetch's `beta` (0.0: off): refresh a hot entry in the background
      before it expires, at a moment each process draws once per entry
      (`entry.refresh_moment`), earlier the larger `beta` is (`early_refresh=True` is 1.0,
      as in the paper);
    * `jitter`: each stored ttl is drawn from `[ttl * (1 - jitter), ttl]`;
    * `copy`: hand each caller a private copy of the value.
    """

    ttl: float | None = None
    stale_ttl: float = 0.0
    stale_if_error: float = 0.0
    cache_errors: float | None = None
    timeout: float | None = None
    early_refresh: float = 0.0
    jitter: float = 0.0
    copy: bool = True

    @classmethod
    def checked(
        cls,
        *,
        ttl: float | None = None,
        stale_ttl: float = 0.0,
        stale_if_error: float = 0.0,
        cache_errors: float | None = None,
        timeout: float | None = None,
        early_refresh: bool | float = False,
        jitter: float = 0.0,
        copy: bool = True,
    ) -> Options:
        """Options from values as a user gave them (`ConfigurationError` naming the bad one).

        `early_refresh` is True (XFetch's `beta` = 1.0) or a number: `beta` itself.
        """
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0 <= jitter < 1:
            raise ConfigurationError(
                f"jitter must be a fraction of the ttl, at least 0 and below 1, not {jitter!r}"
            )
        if isinstance(early_refresh, bool):
            beta = 1.0
        elif isinstance(early_refresh, (int, float)) and 0 < early_refresh <= 100:
            beta = float(early_refresh)
        else:
            raise ConfigurationError(
                "early_refresh must be True, False or XFetch's beta (a number above 0 and at "
                f"most 100; 1.0 is what True means, larger refreshes earlier), not "
                f"{early_refresh!r}"
            )
        return cls(
            ttl=check_seconds("ttl", ttl, allow_none=True),
            stale_ttl=check_seconds("stale_ttl", stale_ttl, allow_zero=True) or 0.0,
            stale_if_error=check_seconds("stale_if_error", stale_if_error, allow_zero=True) or 0.0,
            cache_errors=check_seconds("cache_errors", cache_errors, allow_none=True),
            timeout=check_seconds("timeout", timeout, allow_none=True),
            early_refresh=beta if early_refresh is not False else 0.0,
            jitter=float(jitter),
            copy=_check_bool("copy", copy),
        )
