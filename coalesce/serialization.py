"""Turning cached values and entries into bytes and back, for stores that hold bytes (Redis).

`MsgpackSerializer` is the default. It is safe to use on a shared store (decoding never runs
code) and round-trips a fixed set of types to an equal value of the *same* type: None, bool,
int (any size), float, str, bytes, list, dict (any hashable supported key), tuple, set,
frozenset, datetime.datetime/date/time (tz kept: fixed offsets, UTC and ZoneInfo by key),
timedelta, Decimal and UUID, nested freely. Anything else raises `SerializationError` naming
the type, instead of silently coming back as something different.

Tuple strategy (measured): the C packer runs with `strict_types=True`, so it packs only exact
dict/list/str/int/float/bool/bytes/None natively and hands every other type, tuples included,
to the `default=` hook, which encodes it as a msgpack extension type. Plain JSON-like data
never leaves C, and `strict_types` costs nothing on it; the alternative, a Python pre-walk
that converts tuples before packing, made `dumps` of a small dict about 3x slower. As a bonus
the exact-type checks reject subclasses (IntEnum, OrderedDict, str enums) instead of packing
them as their base type. One known limit: the C packer packs `bytearray` and `memoryview`
natively as bytes, so they come back as `bytes`.

`dumps` reuses one `msgpack.Packer` per thread (about 2x faster than `msgpack.packb`, which
builds a new packer on every call); the packer is taken out of the thread's slot while in use,
so a re-entrant call (a finalizer caching something mid-pack) simply builds its own.

`PickleSerializer` handles any picklable object but is an explicit opt-in: unpickling runs
code chosen by whoever can write to the store.

`encode_entry`/`decode_entry` wrap an `Entry` with its metadata and the name of the serializer
that produced the payload, so a cache never decodes data with a serializer that did not write
it (pickle data is never unpickled by a msgpack-configured cache, and vice versa).
"""

from __future__ import annotations

import datetime as dt
import pickle
import threading
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any, Protocol, TypeGuard, runtime_checkable
from zoneinfo import ZoneInfo

import msgpack  # type: ignore[import-untyped]

from coalesce.entry import Entry
from coalesce.errors import ConfigurationError, SerializationError

__all__ = [
    "MsgpackSerializer",
    "PickleSerializer",
    "Serializer",
    "decode_entry",
    "encode_entry",
    "get_serializer",
]


@runtime_checkable
class Serializer(Protocol):
    """Turns a cached value into bytes and back; `name` is recorded with every stored entry."""

    name: str

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


# --- msgpack extension types -------------------------------------------------------------

_EXT_BIGINT = 1
_EXT_TUPLE = 2
_EXT_SET = 3
_EXT_FROZENSET = 4
_EXT_DATETIME = 5
_EXT_DATE = 6
_EXT_TIME = 7
_EXT_TIMEDELTA = 8
_EXT_DECIMAL = 9
_EXT_UUID = 10

_SUPPORTED = (
    "None, bool, int, float, str, bytes, list, tuple, dict, set, frozenset, "
    "datetime/date/time/timedelta, Decimal or UUID (nested freely)"
)


class _Unsupported(TypeError):
    """Raised inside the packer's hook; `dumps` turns it into a `SerializationError`."""

    def __init__(self, what: str, hint: str = "") -> None:
        super().__init__(what)
        self.what = what
        self.hint = hint


def _type_name(cls: type) -> str:
    """The qualified name of a type, without the `builtins.` prefix."""
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _pack_nested(value: Any) -> bytes:
    """Pack the inside of an extension type (a fresh packer: the hook may run mid-pack)."""
    data: bytes = msgpack.packb(value, default=_default, use_bin_type=True, strict_types=True)
    return data


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, strict_map_key=False, raw=False)


def _encode_tz(tz: dt.tzinfo | None, owner: type) -> list[Any] | None:
    """A tzinfo as plain data: None, ["fixed", offset_us, name or None] or ["zone", key]."""
    if tz is None:
        return None
    if type(tz) is dt.timezone:
        offset = tz.utcoffset(None)
        default_name = dt.timezone(offset).tzname(None)
        name = tz.tzname(None)
        return [
            "fixed",
            offset // dt.timedelta(microseconds=1),
            None if name == default_name else name,
        ]
    if type(tz) is ZoneInfo and tz.key is not None:
        return ["zone", tz.key]
    raise _Unsupported(
        f"values of type '{_type_name(owner)}' with a tzinfo of type '{_type_name(type(tz))}'",
        "use datetime.timezone or zoneinfo.ZoneInfo (built from a key) as tzinfo",
    )


def _decode_tz(spec: list[Any] | None) -> dt.tzinfo | None:
    if spec is None:
        return None
    if spec[0] == "fixed":
        offset = dt.timedelta(microseconds=spec[1])
        return dt.timezone(offset) if spec[2] is None else dt.timezone(offset, spec[2])
    if spec[0] == "zone":
        return ZoneInfo(spec[1])
    raise ValueError(f"unknown tzinfo encoding {spec[0]!r}")


def _bigint_bytes(value: int) -> bytes:
    return value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True)


def _datetime_fields(value: dt.datetime) -> list[Any]:
    return [
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
        value.fold,
        _encode_tz(value.tzinfo, dt.datetime),
    ]


def _time_fields(value: dt.time) -> list[Any]:
    tz = _encode_tz(value.tzinfo, dt.time)
    return [value.hour, value.minute, value.second, value.microsecond, value.fold, tz]


# Exact type -> (extension code, payload). Looked up by exact type, so subclasses are refused.
_ENCODERS: dict[type, tuple[int, Callable[[Any], bytes]]] = {
    int: (_EXT_BIGINT, _bigint_bytes),  # only ints beyond 64 bits reach the hook
    tuple: (_EXT_TUPLE, lambda v: _pack_nested(list(v))),
    set: (_EXT_SET, lambda v: _pack_nested(list(v))),
    frozenset: (_EXT_FROZENSET, lambda v: _pack_nested(list(v))),
    dt.datetime: (_EXT_DATETIME, lambda v: _pack_nested(_datetime_fields(v))),
    dt.date: (_EXT_DATE, lambda v: _pack_nested(v.toordinal())),
    dt.time: (_EXT_TIME, lambda v: _pack_nested(_time_fields(v))),
    dt.timedelta: (_EXT_TIMEDELTA, lambda v: _pack_nested([v.days, v.seconds, v.microseconds])),
    Decimal: (_EXT_DECIMAL, lambda v: str(v).encode("ascii")),
    uuid.UUID: (_EXT_UUID, lambda v: v.bytes),
}


def _datetime_from(fields: list[Any]) -> dt.datetime:
    year, month, day, hour, minute, second, micro, fold, tz = fields
    return dt.datetime(
        year, month, day, hour, minute, second, micro, tzinfo=_decode_tz(tz), fold=fold
    )


def _time_from(fields: list[Any]) -> dt.time:
    hour, minute, second, micro, fold, tz = fields
    return dt.time(hour, minute, second, micro, tzinfo=_decode_tz(tz), fold=fold)


_DECODERS: dict[int, Callable[[bytes], Any]] = {
    _EXT_BIGINT: lambda d: int.from_bytes(d, "big", signed=True),
    _EXT_TUPLE: lambda d: tuple(_unpack(d)),
    _EXT_SET: lambda d: set(_unpack(d)),
    _EXT_FROZENSET: lambda d: frozenset(_unpack(d)),
    _EXT_DATETIME: lambda d: _datetime_from(_unpack(d)),
    _EXT_DATE: lambda d: dt.date.fromordinal(_unpack(d)),
    _EXT_TIME: lambda d: _time_from(_unpack(d)),
    _EXT_TIMEDELTA: lambda d: dt.timedelta(*_unpack(d)),
    _EXT_DECIMAL: lambda d: Decimal(d.decode("ascii")),
    _EXT_UUID: lambda d: uuid.UUID(bytes=d),
}


def _default(value: Any) -> Any:
    """The packer's hook: every value that is not exactly a JSON-like builtin comes here."""
    encoder = _ENCODERS.get(type(value))
    if encoder is None:
        raise _Unsupported(f"values of type '{_type_name(type(value))}'")
    code, encode = encoder
    return msgpack.ExtType(code, encode(value))


def _ext_hook(code: int, data: bytes) -> Any:
    decoder = _DECODERS.get(code)
    if decoder is None:
        raise ValueError(f"unknown msgpack extension type {code}")
    return decoder(data)


def _subject(context: str) -> str:
    return f"the result of {context}" if context else "a value"


_PACKERS = threading.local()


class MsgpackSerializer:
    """The default serializer: msgpack plus extension types; never runs code when decoding."""

    name: str = "msgpack"

    def dumps(self, value: Any, *, context: str = "") -> bytes:
        """Encode `value`; `context` (the cached function's name) goes into error messages.

        Packs with this thread's reusable packer, taken out of its slot while in use.
        """
        slot = _PACKERS.__dict__
        packer = slot.pop("packer", None)
        if packer is None:
            packer = msgpack.Packer(default=_default, use_bin_type=True, strict_types=True)
        try:
            data: bytes = packer.pack(value)
            return data
        except _Unsupported as exc:
            hint = exc.hint or f"return {_SUPPORTED}, or choose PickleSerializer explicitly"
            raise SerializationError(
                f"cannot cache {_subject(context)}: {exc.what} are not supported by the "
                f"msgpack serializer; {hint}"
            ) from None
        except Exception as exc:
            raise SerializationError(
                f"cannot cache {_subject(context)}: the msgpack serializer failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        finally:
            slot["packer"] = packer

    def loads(self, data: bytes, *, context: str = "") -> Any:
        """Decode bytes written by `dumps`; anything else raises `SerializationError`."""
        try:
            return _unpack(data)
        except Exception as exc:
            raise SerializationError(
                f"cannot decode the cached value of {context or 'a cache entry'}: not valid "
                f"msgpack data written by coalesce ({type(exc).__name__}: {exc})"
            ) from exc

    def __repr__(self) -> str:
        return "MsgpackSerializer()"


_RECORDS = MsgpackSerializer()  # packs the entry records of `encode_entry`


class PickleSerializer:
    """Pickle any picklable value. Explicit opt-in only.

    WARNING: unpickling runs code chosen by whoever wrote the data. With a shared store (Redis)
    anyone who can write to it can run code in every process that reads from this cache. Use
    it only when the store is as trusted as your own code.
    """

    name: str = "pickle"

    def dumps(self, value: Any, *, context: str = "") -> bytes:
        """Pickle `value`; `context` (the cached function's name) goes into error messages."""
        try:
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise SerializationError(
                f"cannot cache {_subject(context)}: values of type "
                f"'{_type_name(type(value))}' cannot be pickled ({type(exc).__name__}: {exc})"
            ) from exc

    def loads(self, data: bytes, *, context: str = "") -> Any:
        """Unpickle `data`; any failure raises `SerializationError`."""
        try:
            return pickle.loads(data)
        except Exception as exc:
            raise SerializationError(
                f"cannot decode the cached value of {context or 'a cache entry'}: not valid "
                f"pickle data ({type(exc).__name__}: {exc})"
            ) from exc

    def __repr__(self) -> str:
        return "PickleSerializer()"


# --- entries -------------------------------------------------------------------------------

_ENTRY_MARKER = "c1"
_ENTRY_FIELDS = 9


def dump_value(serializer: Serializer, value: Any, context: str) -> bytes:
    """Call `serializer.dumps`, passing `context` to the built-ins and wrapping other errors."""
    if isinstance(serializer, (MsgpackSerializer, PickleSerializer)):
        return serializer.dumps(value, context=context)
    try:
        data = serializer.dumps(value)
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(
            f"cannot cache {_subject(context)}: the {serializer.name!r} serializer failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if type(data) is bytes:
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)  # a subclass or a buffer: stored as the plain bytes it holds
    raise SerializationError(
        f"cannot cache {_subject(context)}: the {serializer.name!r} serializer returned "
        f"{type(data).__name__}, not bytes"
    )


def encode_entry(
    entry: Entry, serializer: Serializer, *, context: str = "", payload: bytes | None = None
) -> bytes:
    """Encode an entry and its metadata as one msgpack array (see `decode_entry`).

    `payload`, when given, is the value already encoded by `serializer` (a frozen value
    keeps it), and `entry.value` is not encoded again.
    """
    if payload is None:
        payload = dump_value(serializer, entry.value, context)
    if not all(type(tag) is str for tag in entry.tags):
        raise SerializationError(f"cannot cache {_subject(context)}: tags must be strings")
    record = [
        _ENTRY_MARKER,
        float(entry.created),
        None if entry.ttl is None else float(entry.ttl),
        float(entry.stale_ttl),
        float(entry.compute_time),
        list(entry.tags),
        serializer.name,
        payload,
        bool(entry.error),
    ]
    if entry.stale_if_error:  # written only when set: 0.2 readers still read other entries
        record.append(float(entry.stale_if_error))
    return _RECORDS.dumps(record)  # only exact builtins in `record`: never reaches the hook


def _valid_record(record: Any) -> bool:
    """Whether `record` is exactly the array `encode_entry` writes (on every Redis hit: kept
    to plain comparisons, no helper calls)."""
    if type(record) is not list or len(record) != _ENTRY_FIELDS:
        if type(record) is not list or len(record) != _ENTRY_FIELDS + 1:
            return False
        if type(record[-1]) is not float:  # stale_if_error
            return False
    marker, created, ttl, stale_ttl, compute_time, tags, name, payload, error = record[
        :_ENTRY_FIELDS
    ]
    return (
        marker == _ENTRY_MARKER
        and type(marker) is str
        and type(created) is float
        and (ttl is None or type(ttl) is float)
        and type(stale_ttl) is float
        and type(compute_time) is float
        and type(tags) is list
        and (not tags or all(type(tag) is str for tag in tags))
        and type(name) is str
        and type(payload) is bytes
        and type(error) is bool
    )


def _read_record(data: bytes, context: str) -> list[Any]:
    what = f"the cache entry of {context}" if context else "a cache entry"
    try:
        record = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:
        raise SerializationError(
            f"cannot decode {what}: not data written by coalesce ({type(exc).__name__}: {exc})"
        ) from exc
    if not _valid_record(record):
        raise SerializationError(
            f"cannot decode {what}: not an entry written by this version of coalesce"
        )
    result: list[Any] = record
    return result


def _loads_value(serializer: Serializer, payload: bytes, context: str) -> Any:
    """Call `serializer.loads`, passing `context` to the built-ins and wrapping other errors."""
    if isinstance(serializer, (MsgpackSerializer, PickleSerializer)):
        return serializer.loads(payload, context=context)
    try:
        return serializer.loads(payload)
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(
            f"cannot decode the cached value of {context or 'a cache entry'}: the "
            f"{serializer.name!r} serializer failed: {type(exc).__name__}: {exc}"
        ) from exc


def decode_entry(data: bytes, serializer: Serializer, *, context: str = "") -> Entry:
    """Decode bytes written by `encode_entry` with a serializer of the same name.

    Raises `SerializationError` for anything else, including an entry written by another
    serializer: pickle data is never handed to a msgpack cache's decoder, and vice versa.
    """
    record = _read_record(data, context)
    _, created, ttl, stale_ttl, compute_time, tags, name, payload, error = record[:_ENTRY_FIELDS]
    stale_if_error = record[_ENTRY_FIELDS] if len(record) > _ENTRY_FIELDS else 0.0
    if name != serializer.name:
        what = f"the cache entry of {context}" if context else "a cache entry"
        raise SerializationError(
            f"cannot decode {what}: it was written by the {name!r} serializer but this cache "
            f"uses {serializer.name!r}; configure the same serializer everywhere that shares "
            "the store, or clear the old entries"
        )
    if type(serializer) is MsgpackSerializer:  # the default: skip the generic wrapper
        value = serializer.loads(payload, context=context)
    else:
        value = _loads_value(serializer, payload, context)
    if error and not _is_failure_spec(value):
        what = f"the cache entry of {context}" if context else "a cache entry"
        raise SerializationError(
            f"cannot decode {what}: a cached failure must be [module, qualname, message]"
        )
    return Entry(value, created, ttl, stale_ttl, compute_time, tuple(tags), error, stale_if_error)


def _is_failure_spec(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and all(isinstance(part, str) for part in value)
    )


# --- configuration -------------------------------------------------------------------------

_CHOICES = "'msgpack' (the default), 'pickle', or an object with name, dumps() and loads()"


def get_serializer(spec: str | Serializer | None) -> Serializer:
    """Resolve the `serializer=` option: None/"msgpack", "pickle", or a Serializer instance."""
    if spec is None or spec == "msgpack":
        return MsgpackSerializer()
    if spec == "pickle":
        return PickleSerializer()
    if _is_serializer_instance(spec):
        return spec
    raise ConfigurationError(f"unknown serializer {spec!r}; choose {_CHOICES}")


def _is_serializer_instance(spec: object) -> TypeGuard[Serializer]:
    """An instance (not a class, not a string) with a str `name`, `dumps` and `loads`."""
    return (
        not isinstance(spec, (str, type))
        and isinstance(spec, Serializer)
        and type(spec.name) is str  # exactly: it is written into every entry's record
        and bool(spec.name)
        and callable(spec.dumps)
        and callable(spec.loads)
    )
