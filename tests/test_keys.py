"""Cache keys: templates, default keys, exclusion, methods, and safety of hostile input.

Every test goes through the public API (`fn.key(...)`, decoration errors); keys must be
printable, without whitespace or control characters, at most 250 characters, and distinct
whenever the arguments differ.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import uuid
from decimal import Decimal
from typing import Any

import pytest

from coalesce import Cache, KeyBuildError, KeyTemplateError
from coalesce.keys import key_function

MAX_KEY = 250


def assert_safe(key: str) -> None:
    assert isinstance(key, str)
    assert 0 < len(key) <= MAX_KEY, (len(key), key)
    assert key.isprintable(), repr(key)
    assert not any(ch.isspace() for ch in key), repr(key)
    assert not any(ord(ch) < 32 or ord(ch) == 127 for ch in key), repr(key)


@pytest.fixture
def cache() -> Cache:
    return Cache()


# ---------------------------------------------------------------------------------------
# templates


def test_template_positional_keyword_and_default_give_the_same_key(cache: Cache) -> None:
    @cache.cached(ttl=60, key="report:{day}:{region}")
    def report(day: str, region: str = "eu") -> str:
        return day + region

    expected = "report:mon:eu"
    assert report.key("mon") == expected
    assert report.key("mon", "eu") == expected
    assert report.key(day="mon") == expected
    assert report.key(region="eu", day="mon") == expected
    assert report.key("mon", region="eu") == expected
    assert report.key("mon", "us") == "report:mon:us"


def test_template_simple(cache: Cache) -> None:
    @cache.cached(ttl=60, key="user:{user_id}")
    async def load_user(user_id: int) -> dict[str, int]:
        return {"id": user_id}

    assert load_user.key(42) == "user:42"
    assert load_user.key(user_id=42) == "user:42"
    assert load_user.key(7) != load_user.key(42)


def test_template_attribute_access(cache: Cache) -> None:
    @dataclasses.dataclass
    class User:
        id: int
        name: str

    @cache.cached(ttl=60, key="user:{user.id}")
    def profile(user: User) -> str:
        return user.name

    assert profile.key(User(5, "ann")) == "user:5"
    assert profile.key(User(5, "bob")) == "user:5"  # only the id is in the key
    assert profile.key(user=User(6, "ann")) == "user:6"


def test_template_index_and_format_spec(cache: Cache) -> None:
    @cache.cached(ttl=60, key="d:{day:%Y-%m-%d}:{items[0]}")
    def f(day: dt.date, items: list[str]) -> int:
        return 1

    assert f.key(dt.date(2024, 3, 9), ["a", "b"]) == "d:2024-03-09:a"


def test_template_default_applied_when_field_has_default(cache: Cache) -> None:
    @cache.cached(ttl=60, key="page:{n}")
    def page(n: int = 1) -> int:
        return n

    assert page.key() == "page:1" == page.key(1) == page.key(n=1)


def test_template_keyword_only_parameter(cache: Cache) -> None:
    @cache.cached(ttl=60, key="k:{a}:{b}")
    def f(a: int, *, b: int = 3) -> int:
        return a + b

    assert f.key(1) == "k:1:3" == f.key(1, b=3) == f.key(a=1)


def test_template_unknown_parameter_raises_at_decoration(cache: Cache) -> None:
    with pytest.raises(KeyTemplateError) as info:

        @cache.cached(ttl=60, key="user:{user_id}")
        def load(uid: int) -> int:
            return uid

    message = str(info.value)
    assert "user_id" in message
    assert "uid" in message  # says which parameters exist


def test_template_unknown_attribute_root_raises_at_decoration(cache: Cache) -> None:
    with pytest.raises(KeyTemplateError):

        @cache.cached(ttl=60, key="{usr.id}")
        def load(user: Any) -> int:
            return 1


def test_template_unknown_parameter_raises_for_coalesced_too(cache: Cache) -> None:
    with pytest.raises(KeyTemplateError):

        @cache.coalesced(key="rates:{cur}")
        async def rates(currency: str) -> dict[str, float]:
            return {}


@pytest.mark.parametrize("template", ["user {id}", "user:\t{id}", "user:\n{id}", "a\x00{id}"])
def test_template_literal_with_whitespace_or_control_rejected(cache: Cache, template: str) -> None:
    with pytest.raises(KeyTemplateError):

        @cache.cached(ttl=60, key=template)
        def f(id: int) -> int:
            return id


@pytest.mark.parametrize("template", ["user:{", "user:{}", "user:{0}", "x:{id"])
def test_template_malformed_or_positional_rejected(cache: Cache, template: str) -> None:
    with pytest.raises(KeyTemplateError):

        @cache.cached(ttl=60, key=template)
        def f(id: int) -> int:
            return id


def test_template_must_be_a_string(cache: Cache) -> None:
    with pytest.raises(KeyTemplateError):

        @cache.cached(ttl=60, key=123)  # type: ignore[arg-type]
        def f(id: int) -> int:
            return id


def test_template_key_errors_are_configuration_errors(cache: Cache) -> None:
    from coalesce import ConfigurationError

    assert issubclass(KeyTemplateError, ConfigurationError)


def test_template_substituted_whitespace_is_escaped_and_distinct(cache: Cache) -> None:
    @cache.cached(ttl=60, key="q:{text}")
    def search(text: str) -> str:
        return text

    values = ["a b", "a%20b", "a\nb", "a\tb", "a\r\nb", "ab", "a  b", "a+b", "a_b", "a\x00b"]
    keys = [search.key(v) for v in values]
    for k in keys:
        assert_safe(k)
        assert k.startswith("q:")
    assert len(set(keys)) == len(values), dict(zip(values, keys, strict=True))


def test_template_empty_and_nul_values_are_distinct(cache: Cache) -> None:
    @cache.cached(ttl=60, key="{q}")
    def f(q: str) -> str:
        return q

    keys = {v: f.key(v) for v in ["", "\x00", "%00", "%", " "]}
    for k in keys.values():
        assert_safe(k)
    assert len(set(keys.values())) == len(keys), keys


def test_template_huge_values_are_bounded_and_distinct(cache: Cache) -> None:
    @cache.cached(ttl=60, key="doc:{body}")
    def f(body: str) -> str:
        return body

    base = "x" * 10_000
    k1, k2, k3 = f.key(base + "1"), f.key(base + "2"), f.key(base + " 2")
    for k in (k1, k2, k3):
        assert_safe(k)
    assert len({k1, k2, k3}) == 3


def test_template_unicode_values_are_safe_and_distinct(cache: Cache) -> None:
    @cache.cached(ttl=60, key="name:{name}")
    def f(name: str) -> str:
        return name

    values = [
        "José",
        "Jose\u0301",  # combining accent: different text, must be a different key
        "日本語 テキスト",
        "emoji 🎉",
        "nbsp\u00a0here",
        "line\u2028sep",
        "zero\u200bwidth",
        "ogham\u1680space",
        "bidi\u202eoverride",
    ]
    keys = [f.key(v) for v in values]
    for k in keys:
        assert_safe(k)
    assert len(set(keys)) == len(values)


def test_template_lone_surrogate_from_json_gives_safe_key(cache: Cache) -> None:
    # json.loads happily produces lone surrogates from user input like "\ud800".
    hostile = json.loads('"a\\ud800b"')

    @cache.cached(ttl=60, key="q:{text}")
    def f(text: str) -> str:
        return text

    k = f.key(hostile)
    assert_safe(k)
    assert k != f.key("ab")


def test_template_non_string_values_with_spaces_are_escaped(cache: Cache) -> None:
    class Thing:
        def __init__(self, text: str) -> None:
            self.text = text

        def __str__(self) -> str:
            return self.text

    @cache.cached(ttl=60, key="t:{thing}")
    def f(thing: Thing) -> int:
        return 1

    k1, k2 = f.key(Thing("a b")), f.key(Thing("a\nb"))
    assert_safe(k1)
    assert_safe(k2)
    assert k1 != k2


def test_exclude_cannot_be_combined_with_template(cache: Cache) -> None:
    with pytest.raises(KeyTemplateError):

        @cache.cached(ttl=60, key="u:{a}", exclude=("b",))
        def f(a: int, b: int) -> int:
            return a


# ---------------------------------------------------------------------------------------
# default keys


def test_default_key_prefix_is_module_and_qualname(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f(x: int) -> int:
        return x

    key = f.key(1)
    # defined inside a function: the line of its definition is part of its name
    line = f.__wrapped__.__code__.co_firstlineno
    assert key == f"{f.__module__}.{f.__qualname__}@{line}:x=i1"
    assert_safe(key)


def test_default_key_separator_injection_does_not_collide(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f(a: str, b: str) -> str:
        return a + b

    assert f.key("1:b:2", "3") != f.key("1", "2:b:3")
    assert f.key("a,b=s", "c") != f.key("a", "b=sc")
    assert f.key("a", ",b=sc") != f.key("a,b=s", "c")
    assert f.key("x)", "y") != f.key("x", ")y")


def test_default_key_type_is_part_of_the_key(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f(x: Any) -> Any:
        return x

    distinct = [
        1,
        "1",
        1.0,
        True,
        None,
        "None",
        b"1",
        (1,),
        [1],
        {1},
        {1: 1},
        Decimal("1"),
        "",
        (),
        [],
        {},
        0,
        False,
    ]
    keys = [f.key(v) for v in distinct]
    assert len(set(keys)) == len(distinct), dict(zip(map(repr, distinct), keys, strict=True))
    for k in keys:
        assert_safe(k)


def test_default_key_positional_and_keyword_and_default_are_equal(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f(x: int, y: int = 2, *, z: str = "z") -> int:
        return x

    assert f.key(1) == f.key(x=1) == f.key(1, 2) == f.key(1, y=2) == f.key(1, 2, z="z")
    assert f.key(1) != f.key(1, 3)
    assert f.key(1) != f.key(1, z="w")


def test_default_key_positional_only_parameters(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f(a: int, /, b: int = 0) -> int:
        return a + b

    assert f.key(1) == f.key(1, 0) == f.key(1, b=0)
    assert f.key(1, 2) != f.key(2, 1)


def test_default_key_nested_containers_do_not_collide(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f(x: Any) -> Any:
        return x

    distinct = [
        [1, [2, 3]],
        [[1, 2], 3],
        [1, 2, 3],
        (1, (2, 3)),
        ((1, 2), 3),
        ["a,b"],
        ["a", "b"],
        [("a", "b")],
        {"a": [1, 2]},
        {"a": [1], "2": []},
        {"a": (1, 2)},
        [{"a": 1}, {"b": 2}],
        [{"a": 1, "b": 2}],
    ]
    keys = [f.key(v) for v in distinct]
    assert len(set(keys)) == len(distinct)


def test_default_key_dict_and_set_order_independent(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f(x: Any) -> Any:
        return x

    assert f.key({"a": 1, "b": 2}) == f.key({"b": 2, "a": 1})
    assert f.key({"outer": {"a": 1, "b": [1, 2]}}) == f.key({"outer": {"b": [1, 2], "a": 1}})
    assert f.key({3, 1, 2}) == f.key({2, 3, 1})
    assert f.key({"a": 1, "b": 2}) != f.key({"a": 2, "b": 1})


def test_default_key_varargs_and_kwargs(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f(*args: Any, **kwargs: Any) -> Any:
        return args

    assert f.key(1, 2) != f.key((1, 2))
    assert f.key(1, 2) != f.key(2, 1)
    assert f.key(a=1, b=2) == f.key(b=2, a=1)
    assert f.key(1, a=1) != f.key(a=1)
    assert f.key(1) != f.key(a=1)


def test_default_key_supported_argument_types(cache: Cache) -> None:
    class Color(enum.Enum):
        RED = 1
        BLUE = 2

    @dataclasses.dataclass(frozen=True)
    class Point:
        x: int
        y: int

    @cache.cached(ttl=60)
    def f(x: Any) -> Any:
        return x

    u1, u2 = uuid.uuid4(), uuid.uuid4()
    tz = dt.timezone(dt.timedelta(hours=2))
    values = [
        Color.RED,
        Color.BLUE,
        Point(1, 2),
        Point(2, 1),
        u1,
        u2,
        dt.date(2024, 1, 2),
        dt.datetime(2024, 1, 2, 3, 4, 5),
        dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=tz),
        dt.time(3, 4, 5),
        Decimal("1.10"),
        Decimal("1.1"),
        frozenset({1, 2}),
        b"\x00\xff",
        float("inf"),
        -0.5,
        10**40,
    ]
    keys = [f.key(v) for v in values]
    for k in keys:
        assert_safe(k)
    assert len(set(keys)) == len(values)
    assert f.key(Point(1, 2)) == f.key(Point(1, 2))
    assert f.key(u1) == f.key(uuid.UUID(str(u1)))


def test_default_key_unsupported_argument_raises_key_build_error(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f(conn: Any) -> int:
        return 1

    with pytest.raises(KeyBuildError) as info:
        f.key(object())
    message = str(info.value)
    assert "object" in message
    assert "exclude" in message or "key" in message
    with pytest.raises(KeyBuildError):
        f(object())


def test_default_key_hostile_strings_safe_and_distinct(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f(text: str) -> str:
        return text

    huge = "y" * 100_000
    values = [
        "hello world",
        "hello%20world",
        "hello\nworld",
        "hello\r\nworld",
        "tab\there",
        "nul\x00byte",
        "esc\x1b[31m",
        "del\x7f",
        "日本語",
        "emoji 🎉🎉",
        "nbsp\u00a0x",
        "ls\u2028x",
        huge,
        huge + "z",
        huge[:-1] + "z",
        " ",
        "",
        "%",
        "=",
        ",",
        ":",
    ]
    keys = [f.key(v) for v in values]
    for k in keys:
        assert_safe(k)
    assert len(set(keys)) == len(values)


def test_default_key_lone_surrogate_gives_safe_key(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f(text: str) -> str:
        return text

    hostile = json.loads('"\\udcff"')
    k = f.key(hostile)
    assert_safe(k)
    assert k != f.key("")


def test_default_key_long_keys_stay_distinct_and_bounded_for_many_args(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f(*parts: str) -> int:
        return len(parts)

    a = ["word"] * 200
    b = ["word"] * 199 + ["word2"]
    ka, kb = f.key(*a), f.key(*b)
    assert_safe(ka)
    assert_safe(kb)
    assert ka != kb
    assert f.key(*a) == ka  # deterministic


def test_default_key_long_qualname_still_bounded(cache: Cache) -> None:
    namespace: dict[str, Any] = {}
    name = "f" + "_" * 300
    exec(f"def {name}(x):\n    return x\n", namespace)
    fn = cache.cached(ttl=60)(namespace[name])
    k1, k2 = fn.key(1), fn.key(2)
    assert_safe(k1)
    assert_safe(k2)
    assert k1 != k2


def test_default_keys_of_two_functions_differ(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f(x: int) -> int:
        return x

    @cache.cached(ttl=60)
    def g(x: int) -> int:
        return x

    assert f.key(1) != g.key(1)


def test_key_is_deterministic_across_calls(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f(x: Any) -> Any:
        return x

    arg = {"b": [1, {"c": (2, 3)}], "a": {4, 5}}
    same = {"a": {5, 4}, "b": [1, {"c": (2, 3)}]}  # equal, built in another order
    assert f.key(arg) == f.key(same)
    assert f.key(arg) == f.key(arg)


def test_key_with_wrong_arguments_raises_type_error(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f(x: int) -> int:
        return x

    with pytest.raises(TypeError):
        f.key()
    with pytest.raises(TypeError):
        f.key(1, 2)
    with pytest.raises(TypeError):
        f.key(y=1)


# ---------------------------------------------------------------------------------------
# exclude


def test_exclude_leaves_parameter_out(cache: Cache) -> None:
    calls = []

    @cache.cached(ttl=60, exclude=("db",))
    def load(user_id: int, db: Any) -> int:
        calls.append(user_id)
        return user_id * 10

    db1, db2 = object(), object()  # not even key-able: must not be looked at
    assert load.key(1, db1) == load.key(1, db2) == load.key(user_id=1, db=None)
    assert "db" not in load.key(1, db1)
    assert load.key(1, db1) != load.key(2, db1)
    assert load(1, db1) == 10
    assert load(1, db2) == 10
    assert calls == [1]


def test_exclude_unknown_parameter_rejected(cache: Cache) -> None:
    with pytest.raises(KeyTemplateError) as info:

        @cache.cached(ttl=60, exclude=("dbb",))
        def load(user_id: int, db: Any) -> int:
            return user_id

    assert "dbb" in str(info.value)


# ---------------------------------------------------------------------------------------
# methods


def test_method_self_left_out_of_default_key(cache: Cache) -> None:
    class Repo:
        @cache.cached(ttl=60)
        def get(self, item_id: int) -> int:
            return item_id

    a, b = Repo(), Repo()  # Repo has no stable repr: a key using self would fail
    key = Repo.get.key(a, 3)
    assert key == Repo.get.key(b, 3)
    assert key != Repo.get.key(a, 4)
    assert "self" not in key.split(":", 1)[1]
    assert_safe(key)


def test_classmethod_cls_left_out_of_default_key(cache: Cache) -> None:
    class Repo:
        @classmethod
        @cache.cached(ttl=60)
        def make(cls, item_id: int) -> int:
            return item_id

    key = Repo.make.key(Repo, 3)
    assert "cls" not in key.split(":", 1)[1]
    assert key != Repo.make.key(Repo, 4)


def test_template_on_method(cache: Cache) -> None:
    class Repo:
        prefix = "p"

        @cache.cached(ttl=60, key="repo:{item_id}")
        def get(self, item_id: int) -> int:
            return item_id

    assert Repo.get.key(Repo(), 9) == "repo:9"


def test_template_may_use_self_attributes(cache: Cache) -> None:
    class Repo:
        def __init__(self, name: str) -> None:
            self.name = name

        @cache.cached(ttl=60, key="repo:{self.name}:{item_id}")
        def get(self, item_id: int) -> int:
            return item_id

    assert Repo.get.key(Repo("a"), 1) == "repo:a:1"
    assert Repo.get.key(Repo("b"), 1) == "repo:b:1"


# ---------------------------------------------------------------------------------------
# stored key


def test_stored_key_is_namespace_colon_key() -> None:
    cache = Cache(namespace="myapp")

    @cache.cached(ttl=60, key="user:{uid}")
    def f(uid: int) -> int:
        return uid

    assert f(1) == 1
    assert cache.keys() == ["user:1"]
    assert cache.store.get("myapp:user:1") is not None
    assert cache.get_entry("user:1") is not None


def test_stored_default_key_matches_fn_key() -> None:
    cache = Cache()

    @cache.cached(ttl=60)
    def f(a: str, b: int = 2) -> str:
        return a * b

    f("x y")
    assert cache.keys() == [f.key("x y")]
    assert cache.get_entry(f.key("x y", 2)) is not None


# -- names and values that once broke keys ------------------------------------------------


def test_parameters_named_like_builtins_work_on_hits_and_misses() -> None:
    cache = Cache()

    @cache.cached(ttl=60, key="s:{q}:{type}")
    def templated(q: int, type: str = "x", len: int = 3, str: str = "a", int: int = 1) -> int:
        return q

    @cache.cached(ttl=60)
    def default(type: int, str: int = 2, int: int = 3, k: int = 4, len: int = 5) -> int:
        return type

    for _ in range(2):  # a miss, then a hit
        assert templated(1) == 1
        assert default(7) == 7
    assert templated.stats()["hits"] == 1
    assert default.stats()["hits"] == 1


def test_a_value_cannot_pose_as_the_shortened_form_of_another_key() -> None:
    cache = Cache()
    calls: list[str] = []

    @cache.cached(ttl=60, key="q:{s}")
    def f(s: str) -> int:
        calls.append(s)
        return len(s)

    long_value = "a" * 300
    shortened = f.key(long_value)
    assert len(shortened) <= 250 and "%#" in shortened
    forged = shortened[len("q:") :]  # a caller sends the shortened form as its value
    assert f(long_value) == 300
    assert f(forged) == len(forged)  # computed for itself, not the other key's value
    assert calls == [long_value, forged]
    assert f.key(forged) != shortened


def test_braces_in_values_are_escaped_for_redis_cluster_hash_tags() -> None:
    def f(q: str) -> None: ...

    key = key_function(f, "q:{q}")("}x{")
    assert "{" not in key and "}" not in key
    assert key == "q:%7Dx%7B"
    with pytest.raises(KeyTemplateError):
        key_function(f, "q:{{literal}}:{q}")


def test_reprs_with_memory_addresses_are_refused_in_default_keys() -> None:
    def apply(fn: Any, x: int) -> int:
        return int(fn(x))

    make = key_function(apply, None)
    with pytest.raises(KeyBuildError, match="function"):
        make(lambda v: v + 1, 1)


def test_reprs_with_memory_addresses_are_refused_in_templates_too() -> None:
    class Plain:
        pass

    class Named:
        def __init__(self, name: str) -> None:
            self.name = name

        def __str__(self) -> str:
            return self.name

    def load(obj: Any) -> int:
        return 1

    make = key_function(load, "x:{obj}")
    with pytest.raises(KeyBuildError, match="memory address"):
        make(Plain())
    with pytest.raises(KeyBuildError, match="memory address"):
        make(lambda: 1)
    assert make(Named("a b")) == "x:a%20b"  # a stable text form is fine
    assert key_function(load, "x:{obj.name}")(Named("é")) == "x:é"  # printable non-ASCII kept


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("u:{user_id!x}", "not a conversion"),
        ("u:{user_id:{flag}}", "cannot hold another field"),
        ("x" * 300 + "{user_id}", "longer than 250"),
        ("u {user_id}", "printable, without whitespace"),
    ],
)
def test_template_mistakes_are_named_when_decorating(template: str, problem: str) -> None:
    def load(user_id: int, flag: int = 1) -> int:
        return user_id

    with pytest.raises(KeyTemplateError, match=problem):
        key_function(load, template)


def test_partials_and_callable_objects_need_a_template() -> None:
    import functools

    def add(a: int, b: int) -> int:
        return a + b

    class Doubler:
        def __call__(self, x: int) -> int:
            return 2 * x

    cache = Cache()
    for fn in (functools.partial(add, 1), Doubler()):
        with pytest.raises(KeyTemplateError, match="needs a key template"):
            cache.cached(ttl=5)(fn)
    plus_one = cache.cached(ttl=5, key="plus1:{b}")(functools.partial(add, 1))
    assert plus_one(2) == plus_one(2) == 3 and plus_one.stats()["hits"] == 1
    double = cache.cached(ttl=5, key="double:{x}")(Doubler())
    assert double(4) == 8


def test_self_referencing_or_very_deep_arguments_are_key_build_errors() -> None:
    def load(items: Any) -> int:
        return 1

    make = key_function(load, None)
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(KeyBuildError, match="nested too deep"):
        make(loop)
    deep: list[Any] = []
    tip = deep
    for _ in range(5000):
        tip.append([])
        tip = tip[0]
    with pytest.raises(KeyBuildError, match="nested too deep"):
        make(deep)
    assert make([1, [2, [3]]]) == make([1, [2, [3]]])
