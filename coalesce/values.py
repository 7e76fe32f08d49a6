"""How one cached value is shared by many callers without them seeing each other's edits.

A cached value is frozen once, when it is stored, and thawed for every caller that reads it:

* immutable values (str, int, bytes, tuples of immutables, datetimes, ...) are returned
  as they are: nobody can change them;
* flat containers (a dict, list or set whose items are all immutable) keep a private copy
  and every caller gets a shallow copy of it: cheap, and edits stay with the caller;
* anything deeper keeps its serialized bytes and every caller decodes its own copy.

`copy=False` on a decorator opts out: every caller then receives the very same object.
"""

from __future__ import annotations

import datetime
import decimal
import functools
import uuid
from collections.abc import Callable
from typing import Any

from coalesce.entry import Entry
from coalesce.errors import SerializationError
from coalesce.serialization import Serializer, dump_value

_IMMUTABLE = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        decimal.Decimal,
        uuid.UUID,
        datetime.datetime,
        datetime.date,
        datetime.time,
        datetime.timedelta,
    }
)
_FLAT = frozenset({dict, list, set})


class Frozen:
    """A stored value that hands out private copies: see the module docstring.

    `thaw()` returns a copy of the value that the caller may change freely. It is the
    private container's own `copy` (a flat container) or the serializer's `loads` bound to
    the payload: a call into C for a flat container, with no Python frame of ours, on every
    hit.
    """

    __slots__ = ("payload", "thaw")

    def __init__(
        self, payload: bytes, snapshot: Any = None, loads: Callable[[bytes], Any] | None = None
    ) -> None:
        self.payload = payload  # the serialized value, always present
        # `snapshot`, a private flat container, is kept only by its bound `copy`
        self.thaw: Callable[[], Any] = (
            snapshot.copy if loads is None else functools.partial(loads, payload)
        )


def is_immutable(value: Any) -> bool:
    cls = type(value)
    if cls in _IMMUTABLE:
        return True
    if cls is tuple or cls is frozenset:
        return all(is_immutable(item) for item in value)
    return False


def _is_flat(value: Any) -> bool:
    if type(value) is dict:
        return all(is_immutable(k) and is_immutable(v) for k, v in value.items())
    if _IMMUTABLE.issuperset(map(type, value)):
        return True
    return all(is_immutable(item) for item in value)


def freeze(value: Any, serializer: Serializer, context: str = "") -> Any:
    """Check that `value` can be stored and return the form to keep: itself or a `Frozen`."""
    payload = dump_value(serializer, value, context)
    cls = type(value)
    if cls is dict:  # the common case first, in C: scalars only, nothing nested to look into
        if (
            _IMMUTABLE.issuperset(map(type, value.values()))
            and _IMMUTABLE.issuperset(map(type, value))
        ) or _is_flat(value):
            return Frozen(payload, value.copy())
    elif cls in _FLAT:
        if _is_flat(value):
            return Frozen(payload, value.copy())
    elif is_immutable(value):
        return value
    return Frozen(payload, loads=serializer.loads)


def thaw(value: Any) -> Any:
    """The value a caller receives: a private copy of a `Frozen`, else the value itself."""
    return value.thaw() if type(value) is Frozen else value


def freeze_entry(entry: Entry, serializer: Serializer) -> Entry:
    """`entry` with its value frozen, so that callers sharing it in-process get copies.

    For entries decoded from a shared store, which hold a plain value that several callers
    of one flight (or readers of a near cache) would otherwise share.
    """
    value = entry.value
    if type(value) is Frozen or is_immutable(value):
        return entry
    try:
        frozen = freeze(value, serializer)
    except SerializationError:  # it was just decoded by this serializer; keep it as it is
        return entry
    return Entry(
        frozen,
        entry.created,
        entry.ttl,
        entry.stale_ttl,
        entry.compute_time,
        entry.tags,
        entry.error,
        entry.stale_if_error,
    )
