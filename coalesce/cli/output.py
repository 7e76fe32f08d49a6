"""How the command line prints: one-line messages, durations, value previews, route tables.

Pure functions of their arguments (no I/O), so the command line's output can be tested
without a store.
"""

from __future__ import annotations

import math
import pprint
import reprlib
from typing import Any

PREVIEW_CHARS = 600


LARGE_VALUE = 100_000  # encoded bytes above which the preview stops pretty-printing


def one_line(text: str) -> str:
    """Collapse whitespace so that any message prints as exactly one line."""
    return " ".join(str(text).split())


_YEAR = 365 * 86_400


def human_seconds(seconds: float) -> str:
    """`0.42 s`, `42.0 s`, `3 min 20 s`, `2 h 5 min`, `3 d 4 h`, `2 y 40 d`: short and exact
    enough. Any float prints: `-3.20 s`, `forever` (inf), `over 10,000 years` (1e300),
    `unknown` (nan): an entry's times come from the store, and a shell must show them."""
    if seconds != seconds:
        return "unknown"
    if seconds < 0:
        return "-" + human_seconds(-seconds)
    if seconds == math.inf:
        return "forever"
    if seconds >= 10_000 * _YEAR:
        return "over 10,000 years"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    if days < 365:
        return f"{days} d {hours} h"
    years, days = divmod(days, 365)
    return f"{years:,} y {days} d"


def human_ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


class _Shortener(reprlib.Repr):
    """`reprlib.Repr` that shows an int too long for `repr` (more than
    `sys.get_int_max_str_digits()` digits, 4,300 by default) by its size and hex ends."""

    def repr_int(self, x: int, level: int) -> str:
        try:
            return super().repr_int(x, level)
        except ValueError:
            digits = f"{abs(x):x}"
            sign = "-" if x < 0 else ""
            return f"{sign}0x{digits[:16]}...{digits[-16:]} (an int of {x.bit_length():,} bits)"


def preview(value: Any, limit: int = PREVIEW_CHARS, *, large: bool = False) -> str:
    """A readable rendering of a cached value, cut to `limit` characters.

    Small values are pretty-printed; a `large` one (megabytes of rows) goes through
    `reprlib`, which stops early instead of formatting everything to show the first lines.
    """
    if isinstance(value, (str, bytes)):
        if len(value) <= limit:
            return repr(value)
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{value[:limit]!r}... ({len(value) - limit:,} more {unit})"
    if not large:
        try:
            text = pprint.pformat(value, width=96, compact=True, sort_dicts=False)
        except ValueError:  # an int of more than 4,300 digits, which `repr` refuses
            large = True
    if large:
        shortener = _Shortener()
        shortener.maxlevel = 4
        shortener.maxdict = shortener.maxlist = shortener.maxtuple = shortener.maxset = 40
        shortener.maxstring = shortener.maxother = 200
        text = shortener.repr(value)
        return text if len(text) <= limit else f"{text[:limit]}... (cut)"
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit:,} more characters)"
    return text


_ROUTE_COLUMNS = (
    ("hits", "hits"),
    ("misses", "misses"),
    ("stale", "stale"),
    ("coalesced", "coalesced"),
    ("computations", "computations"),
    ("errors", "errors"),
    ("hit_ratio", "hit ratio"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
)


def render_routes(routes: dict[str, dict[str, Any]]) -> str:
    """The app's per-route metrics (`metrics_router()` JSON) as an aligned table."""

    def cell(field: str, value: Any) -> str:
        if field == "hit_ratio" and isinstance(value, (int, float)):
            return f"{value:.1%}"
        if isinstance(value, float):
            return f"{value:,.2f}"
        if isinstance(value, int):
            return f"{value:,}"
        return "-" if value is None else str(value)

    rows = [
        [route, *(cell(field, metrics.get(field)) for field, _ in _ROUTE_COLUMNS)]
        for route, metrics in sorted(routes.items())
    ]
    header = ["route", *(title for _, title in _ROUTE_COLUMNS)]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            text.ljust(widths[i]) if i == 0 else text.rjust(widths[i]) for i, text in enumerate(row)
        ).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)
