"""Tests for coalesce.serialization: exact round trips, clear refusals, safe entry decoding."""

from __future__ import annotations

import collections
import datetime as dt
import enum
import threading
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import hypothesis
import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import strategies as st

from coalesce.entry import Entry
from coalesce.errors import ConfigurationError, SerializationError
from coalesce.serialization import (
    MsgpackSerializer,
    PickleSerializer,
    Serializer,
    decode_entry,
    encode_entry,
    get_serializer,
)


@dataclass
class Point:
    """An arbitrary user type: msgpack refuses it, pickle round-trips it."""

    x: int
    y: int


class Color(enum.IntEnum):
    RED = 1


class Name(str):
    pass


class CustomTz(dt.tzinfo):
    def utcoffset(self, d: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(hours=1)

    def dst(self, d: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(0)

    def tzname(self, d: dt.datetime | None) -> str:
        return "custom"


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def assert_same(a: Any, b: Any) -> None:
    """Equal AND of the same type, recursively (dict keys and set members included)."""
    assert type(a) is type(b), (a, b)
    assert a == b
    if isinstance(a, dict):
        assert len(a) == len(b)
        for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True):
            assert_same(ka, kb)
            assert_same(va, vb)
    elif isinstance(a, list | tuple):
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, set | frozenset):
        for x in a:
            assert_same(x, next(y for y in b if y == x))
    elif isinstance(a, Decimal):
        assert str(a) == str(b)
    elif isinstance(a, dt.datetime | dt.time):
        assert_same_tz(a.tzinfo, b.tzinfo)
        assert a.fold == b.fold
        assert a.utcoffset() == b.utcoffset()


def assert_same_tz(a: dt.tzinfo | None, b: dt.tzinfo | None) -> None:
    assert type(a) is type(b)
    if isinstance(a, ZoneInfo):
        assert isinstance(b, ZoneInfo)
        assert a.key == b.key
        assert a is b  # ZoneInfo(key) is cached: the very same object comes back
    elif a is not None:
        assert a.utcoffset(None) == b.utcoffset(None)  # type: ignore[union-attr]
        assert a.tzname(None) == b.tzname(None)  # type: ignore[union-attr]


PARIS = ZoneInfo("Europe/Paris")
IST = dt.timezone(dt.timedelta(hours=5, minutes=30))

VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    2**64 - 1,
    -(2**63),
    2**64,
    -(2**63) - 1,
    2**200,
    -(2**200),
    1.5,
    -0.0,
    float("inf"),
    "",
    "héllo ✓",
    "\x00",
    b"",
    b"\x00\xff",
    [],
    [1, "a", None],
    {},
    {"a": 1, "b": [1, 2]},
    {1: "one", 2: "two"},
    {(1, 2): "tuple key", ("a", (3,)): "nested tuple key"},
    {None: 1, 2.5: 2, b"k": 3, True: 4},
    (),
    (1,),
    (1, (2, 3), [4, (5,)], {"k": (6,)}),
    [(1, 2), {"k": (3, 4)}, ((),)],
    {"k": (1, 2), "l": [(3,)]},
    set(),
    {1, 2, "a", (1, 2)},
    frozenset(),
    frozenset({1, frozenset({2, 3})}),
    {frozenset({1}): "frozenset key"},
    dt.datetime(2024, 1, 2, 3, 4, 5, 678901),
    dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc),
    dt.datetime(2024, 1, 2, 3, 4, tzinfo=IST),
    dt.datetime(2024, 1, 2, tzinfo=dt.timezone(-dt.timedelta(hours=7), "PDT")),
    dt.datetime(2024, 1, 2, tzinfo=dt.timezone(dt.timedelta(seconds=1, microseconds=5))),
    dt.datetime(2024, 7, 1, 12, tzinfo=PARIS),
    dt.datetime(2024, 10, 27, 2, 30, tzinfo=PARIS, fold=1),
    dt.datetime(1, 1, 1),
    dt.datetime(9999, 12, 31, 23, 59, 59, 999999),
    dt.date(2024, 2, 29),
    dt.date(1, 1, 1),
    dt.time(),
    dt.time(23, 59, 59, 999999),
    dt.time(12, 30, tzinfo=IST),
    dt.time(12, 30, tzinfo=PARIS),
    dt.timedelta(0),
    dt.timedelta(days=-1, seconds=5, microseconds=7),
    dt.timedelta(days=999999999),
    Decimal("1.10"),
    Decimal("-0"),
    Decimal("Infinity"),
    Decimal("1E+100"),
    Decimal("3.141592653589793238462643383279502884197"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    {dt.date(2024, 1, 1): [dt.timedelta(1), {uuid.UUID(int=1): Decimal("2.5")}]},
    {"user": {"id": 1, "tags": ("a", "b"), "seen": {dt.datetime(2024, 1, 1): {1, 2}}}},
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_msgpack_round_trip_keeps_value_and_type(value: Any) -> None:
    serializer = MsgpackSerializer()
    assert_same(value, serializer.loads(serializer.dumps(value)))


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_entry_round_trip_keeps_value_and_type(value: Any) -> None:
    entry = Entry(value, created=100.5, ttl=30.0, stale_ttl=5.0, compute_time=0.25, tags=("a",))
    decoded = decode_entry(encode_entry(entry, MsgpackSerializer()), MsgpackSerializer())
    assert_same(entry.value, decoded.value)
    assert (decoded.created, decoded.ttl, decoded.stale_ttl) == (100.5, 30.0, 5.0)
    assert (decoded.compute_time, decoded.tags) == (0.25, ("a",))


def test_entry_round_trip_without_ttl_and_with_int_fields() -> None:
    entry = Entry({"a": 1}, created=100, ttl=None, stale_ttl=0, compute_time=0, tags=())
    decoded = decode_entry(encode_entry(entry, MsgpackSerializer()), MsgpackSerializer())
    assert decoded == Entry({"a": 1}, created=100.0, ttl=None, stale_ttl=0.0, tags=())
    assert type(decoded.created) is float
    assert type(decoded.tags) is tuple


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(2024, 3, 31, 1, 59, tzinfo=PARIS),
        dt.datetime(2024, 3, 31, 3, 0, tzinfo=PARIS),
        dt.datetime(2024, 6, 1, tzinfo=ZoneInfo("America/New_York")),
        dt.datetime(2024, 6, 1, tzinfo=ZoneInfo("UTC")),
        dt.datetime(2024, 6, 1, tzinfo=dt.timezone.utc),
        dt.datetime(2024, 6, 1, tzinfo=IST),
    ],
    ids=repr,
)
def test_aware_datetimes_keep_offset_and_zone(value: dt.datetime) -> None:
    back = MsgpackSerializer().loads(MsgpackSerializer().dumps(value))
    assert back.utcoffset() == value.utcoffset()
    assert back.tzname() == value.tzname()
    assert_same_tz(value.tzinfo, back.tzinfo)


def test_utc_comes_back_as_the_utc_singleton() -> None:
    back = MsgpackSerializer().loads(MsgpackSerializer().dumps(dt.datetime.now(dt.timezone.utc)))
    assert back.tzinfo is dt.timezone.utc


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (object(), "object"),
        (Point(1, 2), qualname(Point)),
        ([1, {"a": Point(1, 2)}], qualname(Point)),
        ({"k": (1, Point(1, 2))}, qualname(Point)),
        (Color.RED, qualname(Color)),
        (Name("x"), qualname(Name)),
        (collections.OrderedDict(a=1), "collections.OrderedDict"),
        (collections.defaultdict(list), "collections.defaultdict"),
        (1 + 2j, "complex"),
        (lambda: None, "function"),
        (dt.datetime(2024, 1, 1, tzinfo=CustomTz()), qualname(CustomTz)),
        (dt.time(1, tzinfo=CustomTz()), qualname(CustomTz)),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_unsupported_types_name_the_type_and_the_way_out(value: Any, type_name: str) -> None:
    with pytest.raises(SerializationError) as info:
        MsgpackSerializer().dumps(value, context="myapp.load_user")
    message = str(info.value)
    assert f"'{type_name}'" in message
    assert message.startswith("cannot cache the result of myapp.load_user: ")
    assert "msgpack serializer" in message
    assert "PickleSerializer" in message or "zoneinfo.ZoneInfo" in message


def test_unsupported_type_message_matches_the_documented_shape() -> None:
    with pytest.raises(SerializationError) as info:
        MsgpackSerializer().dumps(Point(1, 2), context="myapp.load_user")
    assert str(info.value).startswith(
        f"cannot cache the result of myapp.load_user: values of type '{qualname(Point)}' "
        "are not supported by the msgpack serializer; return "
    )
    assert str(info.value).endswith("or choose PickleSerializer explicitly")


def test_unsupported_type_without_context() -> None:
    with pytest.raises(SerializationError, match="cannot cache a value: values of type"):
        MsgpackSerializer().dumps(Point(1, 2))


def test_encode_entry_passes_context_to_the_error() -> None:
    with pytest.raises(SerializationError, match=r"myapp\.load_user.*Point"):
        encode_entry(Entry(Point(1, 2)), MsgpackSerializer(), context="myapp.load_user")


def test_numpy_values_are_refused() -> None:
    import numpy as np  # installed with matplotlib, in the test extra

    for value in (np.int64(1), np.float64(1.5), np.arange(3)):
        with pytest.raises(SerializationError, match=r"'numpy\."):
            MsgpackSerializer().dumps(value)


def test_cyclic_and_too_deep_values_raise_serialization_error() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(SerializationError, match="cannot cache"):
        MsgpackSerializer().dumps(cyclic)


def test_dumps_works_again_after_a_failure() -> None:
    serializer = MsgpackSerializer()
    with pytest.raises(SerializationError):
        serializer.dumps({"a": [1, 2, Point(1, 2)]})
    assert serializer.loads(serializer.dumps({"b": 1})) == {"b": 1}


def test_dumps_is_thread_safe() -> None:
    serializer = MsgpackSerializer()
    errors: list[Any] = []

    def work(n: int) -> None:
        for i in range(500):
            value = {"n": n, "i": i, "t": (n, i), "s": "x" * (i % 50)}
            back = serializer.loads(serializer.dumps(value))
            if back != value:
                errors.append((value, back))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


GARBAGE = [
    b"",
    b"\xc1",
    b"\x92\x01",
    b"\xd4\x63\x00",  # unknown extension type 99
    b"\xd4\x02\xc1",  # tuple extension with a bad payload
    b"\xc7\x02\x05\x91\x01",  # datetime extension with missing fields
    b"\xd4\x07\x00",  # time extension that is not an array
    b"\x81\x90\x01",  # map with a list key
    b"\x01\x02",  # extra data
    msgpack.packb(msgpack.ExtType(5, msgpack.packb([2024, 1, 1, 0, 0, 0, 0, 0, ["bogus"]]))),
]


@pytest.mark.parametrize("data", GARBAGE, ids=repr)
def test_msgpack_loads_of_garbage_raises_serialization_error(data: bytes) -> None:
    with pytest.raises(SerializationError, match="cannot decode"):
        MsgpackSerializer().loads(data, context="myapp.load_user")


@pytest.mark.parametrize("data", ["text", None, 12], ids=repr)
def test_msgpack_loads_of_non_bytes_raises_serialization_error(data: Any) -> None:
    with pytest.raises(SerializationError):
        MsgpackSerializer().loads(data)


def _record(**changes: Any) -> bytes:
    fields = {
        "marker": "c1",
        "created": 1.0,
        "ttl": 2.0,
        "stale_ttl": 0.0,
        "compute_time": 0.0,
        "tags": [],
        "name": "msgpack",
        "payload": MsgpackSerializer().dumps(1),
        "error": False,
    }
    fields.update(changes)
    return msgpack.packb(list(fields.values()), use_bin_type=True)  # type: ignore[no-any-return]


def test_record_helper_builds_a_valid_entry() -> None:
    assert decode_entry(_record(), MsgpackSerializer()).value == 1


FOREIGN = [
    b"",
    b"garbage",
    b'{"json": true}',
    msgpack.packb({"a": 1}),
    msgpack.packb(["c1"]),
    msgpack.packb(1),
    MsgpackSerializer().dumps([1, 2, 3]),
    _record() + b"\x00",
    _record(marker="c2"),
    _record(marker=b"c1"),
    _record(created=1),
    _record(created="1.0"),
    _record(ttl="2"),
    _record(ttl=True),
    _record(stale_ttl=None),
    _record(compute_time=[]),
    _record(tags="abc"),
    _record(tags=[1]),
    _record(name=1),
    _record(payload="not bytes"),
    msgpack.packb(["c1", 1.0, 2.0, 0.0, 0.0, [], "msgpack"], use_bin_type=True),
    msgpack.packb(["c1", 1.0, 2.0, 0.0, 0.0, [], "msgpack", b"\x01", 9], use_bin_type=True),
    _record(error=1),
    _record(error=None),
    _record(payload=b"\xc1"),
]


@pytest.mark.parametrize("data", FOREIGN, ids=repr)
def test_decode_entry_refuses_foreign_data(data: bytes) -> None:
    with pytest.raises(SerializationError, match="cannot decode"):
        decode_entry(data, MsgpackSerializer())


def test_decode_entry_refuses_every_truncation() -> None:
    data = encode_entry(Entry({"a": (1, 2)}, ttl=5.0, tags=("t",)), MsgpackSerializer())
    for end in range(len(data)):
        with pytest.raises(SerializationError):
            decode_entry(data[:end], MsgpackSerializer())


def test_decode_entry_refuses_non_bytes() -> None:
    with pytest.raises(SerializationError):
        decode_entry("text", MsgpackSerializer())  # type: ignore[arg-type]


def test_pickle_written_entry_is_refused_by_msgpack() -> None:
    data = encode_entry(Entry(Point(1, 2)), PickleSerializer())
    with pytest.raises(SerializationError, match="written by the 'pickle' serializer") as info:
        decode_entry(data, MsgpackSerializer(), context="myapp.load_user")
    assert "'msgpack'" in str(info.value)
    assert "myapp.load_user" in str(info.value)


def test_msgpack_written_entry_is_refused_by_pickle() -> None:
    data = encode_entry(Entry({"a": 1}), MsgpackSerializer())
    with pytest.raises(SerializationError, match="written by the 'msgpack' serializer"):
        decode_entry(data, PickleSerializer())


def test_pickle_round_trips_arbitrary_objects_when_chosen() -> None:
    serializer = PickleSerializer()
    value = {"p": Point(1, 2), "c": Color.RED, "o": collections.OrderedDict(a=(1,))}
    assert serializer.loads(serializer.dumps(value)) == value
    entry = Entry(value, created=1.0, ttl=2.0, tags=("x",))
    decoded = decode_entry(encode_entry(entry, serializer), serializer)
    assert decoded == entry


def test_pickle_errors_are_serialization_errors() -> None:
    with pytest.raises(SerializationError, match=r"myapp\.f.*'function'.*cannot be pickled"):
        PickleSerializer().dumps(lambda: None, context="myapp.f")
    with pytest.raises(SerializationError, match="not valid pickle data"):
        PickleSerializer().loads(b"garbage")
    with pytest.raises(SerializationError):
        decode_entry(_record(name="pickle", payload=b"\x80\x05garbage"), PickleSerializer())


class UpperSerializer:
    """A custom serializer without the `context` keyword: str values only."""

    name = "upper"

    def dumps(self, value: Any) -> bytes:
        return str(value).upper().encode()

    def loads(self, data: bytes) -> Any:
        return data.decode("ascii")


def test_custom_serializer_is_used_and_its_errors_are_wrapped() -> None:
    serializer = get_serializer(UpperSerializer())
    decoded = decode_entry(encode_entry(Entry("abc"), serializer), serializer)
    assert decoded.value == "ABC"
    bad = encode_entry(Entry("x"), serializer)
    bad = bad[:-2] + b"\xff" + bad[-1:]  # payload (before the error flag) is not ASCII
    with pytest.raises(SerializationError, match=r"'upper' serializer failed: UnicodeDecodeError"):
        decode_entry(bad, serializer)
    with pytest.raises(SerializationError, match="written by the 'upper' serializer"):
        decode_entry(encode_entry(Entry("x"), serializer), MsgpackSerializer())


def test_serializers_satisfy_the_protocol() -> None:
    for serializer in (MsgpackSerializer(), PickleSerializer(), UpperSerializer()):
        assert isinstance(serializer, Serializer)


def test_get_serializer_resolves_the_valid_choices() -> None:
    assert type(get_serializer(None)) is MsgpackSerializer
    assert type(get_serializer("msgpack")) is MsgpackSerializer
    assert type(get_serializer("pickle")) is PickleSerializer
    custom = UpperSerializer()
    assert get_serializer(custom) is custom
    existing = PickleSerializer()
    assert get_serializer(existing) is existing


@pytest.mark.parametrize(
    "spec", ["json", "", "MessagePack", 42, MsgpackSerializer, object(), Point(1, 2)], ids=repr
)
def test_get_serializer_refuses_anything_else(spec: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        get_serializer(spec)
    message = str(info.value)
    assert repr(spec) in message
    assert "'msgpack'" in message
    assert "'pickle'" in message


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
    | st.decimals(allow_nan=False)
    | st.uuids()
    | st.timedeltas()
    | st.dates()
    | st.datetimes(timezones=st.none() | st.timezones() | st.just(dt.timezone.utc))
    | st.times(timezones=st.none() | st.just(IST))
)
_KEYS = st.recursive(_SCALARS, lambda inner: st.tuples(inner) | st.frozensets(inner), max_leaves=5)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner)
        | st.lists(inner).map(tuple)
        | st.dictionaries(_KEYS, inner)
        | st.sets(_KEYS)
    ),
    max_leaves=20,
)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(_VALUES)
def test_msgpack_round_trip_property(value: Any) -> None:
    serializer = MsgpackSerializer()
    assert_same(value, serializer.loads(serializer.dumps(value)))


class _Name(str):
    pass


class _BytesSubclass(bytes):
    pass


class _ReturnsWhatItIsGiven(UpperSerializer):
    """`dumps` returns whatever `make` gives (a bytes subclass, a buffer, a str)."""

    def __init__(self, make: Any) -> None:
        self.make = make

    def dumps(self, value: Any) -> Any:
        return self.make(str(value).upper().encode())


def test_a_serializer_named_by_a_str_subclass_is_refused_when_configured() -> None:
    """Its name goes into every entry: a str subclass would fail there, blaming the value."""
    serializer = UpperSerializer()
    serializer.name = _Name("upper")
    with pytest.raises(ConfigurationError, match="unknown serializer"):
        get_serializer(serializer)


@pytest.mark.parametrize("make", [_BytesSubclass, bytearray, memoryview], ids=repr)
def test_a_custom_serializer_may_return_any_bytes_like_object(make: Any) -> None:
    serializer = get_serializer(_ReturnsWhatItIsGiven(make))
    decoded = decode_entry(encode_entry(Entry("abc"), serializer), serializer)
    assert decoded.value == "ABC"


def test_a_custom_serializer_returning_text_is_a_serialization_error_naming_it() -> None:
    serializer = get_serializer(_ReturnsWhatItIsGiven(bytes.decode))
    with pytest.raises(SerializationError, match="'upper' serializer returned str, not bytes"):
        encode_entry(Entry("abc"), serializer, context="load")
