"""What a key identifies (issue 8): which function, which value, in every process.

Each test here failed before its fix: lambdas and factory-made functions sharing keys, sets
and frozensets sharing keys, huge ints raising `ValueError`, keys that changed with
`PYTHONHASHSEED`, template mistakes raising `SyntaxError`, time zones lost from keys, and
FastAPI route handlers accepted by the core decorators.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import fastapi
import pytest
from fastapi import Depends, Header, Query
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_servers import RedisServer

import coalesce
from coalesce import Cache, ConfigurationError, KeyBuildError, KeyTemplateError
from coalesce.cli.output import preview


@pytest.fixture
def cache() -> Cache:
    return Cache("memory://")


# ---------------------------------------------------------------------------------------
# 11. functions whose qualified name does not identify them


def module_level(x: int) -> int:
    return x


def test_a_module_level_function_keeps_its_plain_name(cache: Cache) -> None:
    f = cache.cached()(module_level)
    assert f.key(1) == f"{__name__}.module_level:x=i1"


def test_default_keys_of_lambdas_are_refused_naming_the_fix(cache: Cache) -> None:
    for decorator in (cache.cached(), cache.coalesced(), coalesce.cached(), coalesce.coalesced()):
        with pytest.raises(KeyTemplateError, match=r"lambda.*key="):
            decorator(lambda x: x * 2)


def test_lambdas_with_key_templates_work_and_do_not_mix(cache: Cache) -> None:
    double = cache.cached(key="double:{x}")(lambda x: x * 2)
    triple = cache.cached(key="triple:{x}")(lambda x: x * 3)
    assert (double(5), triple(5), double(5), triple(5)) == (10, 15, 10, 15)


def make_multiplier(n: int) -> Callable[[int], int]:
    def handler(x: int) -> int:
        return x * n

    return handler


def test_functions_made_by_one_factory_have_keys_of_their_own(cache: Cache) -> None:
    by_two = cache.cached()(make_multiplier(2))
    by_three = cache.cached()(make_multiplier(3))
    assert (by_two(5), by_three(5), by_two(5), by_three(5)) == (10, 15, 10, 15)
    assert by_two.key(5) != by_three.key(5)
    # the closure's values are part of the name, the same in every process
    assert by_two.key(5).startswith(f"{__name__}.make_multiplier.<locals>.handler@")
    assert "[n=i2]:x=i5" in by_two.key(5)
    assert cache.cached()(make_multiplier(2)).key(5) == by_two.key(5)


def test_a_factory_function_with_a_key_template_still_works(cache: Cache) -> None:
    def make(n: int) -> Any:
        @cache.cached(key="mul{n}:{x}".replace("{n}", str(n)))
        def handler(x: int) -> int:
            return x * n

        return handler

    two, three = make(2), make(3)
    assert (two(5), three(5), two(5)) == (10, 15, 10)
    assert two.key(5) == "mul2:5"


def test_closure_values_without_a_stable_text_are_refused_while_both_live(cache: Cache) -> None:
    class Session:  # no __repr__: cannot be part of a key
        pass

    def make(session: Session) -> Any:
        def handler(x: int) -> str:
            return f"{id(session)}:{x}"

        return handler

    first = cache.cached()(make(Session()))
    with pytest.raises(KeyTemplateError, match=r"'session'.*key="):
        cache.cached()(make(Session()))
    del first  # gone: it no longer counts
    # the same closure values twice are the same function: allowed
    session = Session()
    same = make(session)
    cache.cached()(same)
    cache.cached()(make(session))
    del same
    gc.collect()
    # a template names what tells them apart
    assert cache.cached(key="h:{x}")(make(Session()))(1).endswith(":1")


def test_one_definition_decorated_twice_with_different_closures_does_not_collide(
    cache: Cache,
) -> None:
    def make(settings: dict[str, str]) -> Any:
        @cache.cached()
        def greet(name: str) -> str:
            return f"{settings['greeting']} {name}"

        return greet

    hello, bonjour = make({"greeting": "hello"}), make({"greeting": "bonjour"})
    assert [hello("ann"), bonjour("ann"), hello("ann")] == ["hello ann", "bonjour ann", "hello ann"]


def test_recursive_local_functions_can_be_decorated_again(cache: Cache) -> None:
    def make() -> Any:
        @cache.cached()
        def fib(n: int) -> int:
            return n if n < 2 else fib(n - 1) + fib(n - 2)

        return fib

    first, second = make(), make()
    assert first(20) == second(20) == 6765


def test_two_local_functions_of_one_name_have_different_keys(cache: Cache) -> None:
    def make(negate: bool) -> Any:
        if negate:

            def f(x: int) -> int:
                return -x

        else:

            def f(x: int) -> int:
                return x

        return cache.cached()(f)

    assert (make(True)(3), make(False)(3)) == (-3, 3)


# ---------------------------------------------------------------------------------------
# 12. sets and frozensets


def test_sets_and_frozensets_have_different_keys(cache: Cache) -> None:
    @cache.cached()
    def kind(x: Any) -> str:
        return type(x).__name__

    assert kind.key({1}) != kind.key(frozenset({1}))
    assert (kind({1}), kind(frozenset({1}))) == ("set", "frozenset")
    assert kind.key(({1},)) != kind.key((frozenset({1}),))


# ---------------------------------------------------------------------------------------
# 13. ints of more than 4,300 digits


BIG = 10**5000 + 7


def test_huge_ints_give_correct_keys_in_default_keys(cache: Cache) -> None:
    calls = []

    @cache.cached()
    def f(n: int) -> int:
        calls.append(n)
        return n % 1000

    assert (f(BIG), f(BIG), f(BIG + 1)) == (7, 7, 8)
    assert len(calls) == 2
    assert f.key(BIG) != f.key(BIG + 1)
    assert len(f.key(BIG)) <= 250
    assert f.key((BIG,)) != f.key((BIG + 1,))
    # the same digits whatever the process's limit: keys are shared between processes
    keys = f.key(BIG), f.key((BIG, {BIG}))
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        assert (f.key(BIG), f.key((BIG, {BIG}))) == keys
    finally:
        sys.set_int_max_str_digits(limit)


def test_huge_ints_give_correct_keys_in_templates(cache: Cache) -> None:
    @cache.cached(key="n:{n}")
    def f(n: int) -> int:
        return n % 1000

    assert (f(BIG), f(BIG + 1), f(BIG)) == (7, 8, 7)
    assert f.key(BIG) != f.key(BIG + 1)

    @cache.cached(key="n:{n:,}")
    def g(n: int) -> int:
        return n

    with pytest.raises(KeyBuildError, match="n:,"):
        g(BIG)


def test_absurdly_large_ints_are_key_build_errors(cache: Cache) -> None:
    f = cache.cached()(module_level)
    with pytest.raises(KeyBuildError, match="digits"):
        f(10**60000)


def test_the_preview_of_a_huge_int_is_sensible() -> None:
    text = preview([BIG, "x"])
    assert "an int of 16,610 bits" in text and "'x'" in text
    assert "bits" in preview(-BIG, large=True)


def test_cli_get_of_a_huge_int_value_exits_0(
    redis_server: RedisServer, unique_namespace: str
) -> None:
    cache = Cache(redis_server.url, namespace=unique_namespace)
    try:

        @cache.cached(ttl=60, key="big")
        def big() -> int:
            return BIG

        assert big() == BIG
    finally:
        cache.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COALESCE_")}
    command = [sys.executable, "-m", "coalesce", "get", "big", "--url", redis_server.url]
    result = subprocess.run(
        [*command, "--namespace", unique_namespace],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert "an int of 16,610 bits" in result.stdout


# ---------------------------------------------------------------------------------------
# 14. the same key in every process


_KEYS_SCRIPT = textwrap.dedent(
    """
    import collections, dataclasses, datetime, json, zoneinfo
    import attrs, pydantic
    from coalesce import Cache, KeyBuildError

    cache = Cache("memory://")
    Point = collections.namedtuple("Point", "name tags")

    @dataclasses.dataclass(frozen=True)
    class Spec:
        name: str
        tags: frozenset

    class Model(pydantic.BaseModel):
        name: str
        tags: set[str]

    @attrs.frozen
    class Rec:
        tags: frozenset

    class Opaque:  # trusted by its repr, which shows a set
        def __init__(self):
            self.tags = {"alpha", "beta", "gamma"}
        def __repr__(self):
            return f"Opaque({self.tags})"

    @cache.cached()
    def default(x):
        return x

    @cache.cached(key="t:{x}")
    def template(x):
        return x

    @cache.cached(key="n:{x.name}:{x.tags}")
    def fields(x):
        return x

    words = [f"w{i}" for i in range(12)]
    values = {
        "frozenset": frozenset(words),
        "set": set(words),
        "namedtuple": Point("p", frozenset(words)),
        "dataclass": Spec("s", frozenset(words)),
        "pydantic": Model(name="m", tags=set(words)),
        "attrs": Rec(frozenset(words)),
        "dict of sets": {"a": set(words), "b": {frozenset(words[:3]): (1, set(words))}},
        "nested": [(set(words), {"k": [frozenset(words)]})],
        "opaque": Opaque(),
        "paris": datetime.datetime(2024, 1, 1, 12, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")),
    }
    out = {}
    for name, value in values.items():
        for fn in (default, template, fields):
            try:
                out[f"{fn.__name__} {name}"] = fn.key(value)
            except KeyBuildError:
                out[f"{fn.__name__} {name}"] = "refused"
    print(json.dumps(out))
    """
)


def _keys_under(seed: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    done = subprocess.run(
        [sys.executable, "-c", _KEYS_SCRIPT], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    keys: dict[str, str] = json.loads(done.stdout)
    return keys


def test_keys_are_identical_under_every_hash_seed_or_refused() -> None:
    runs = [_keys_under(seed) for seed in ("0", "1", "2", "12345")]
    for name in runs[0]:
        assert len({run[name] for run in runs}) == 1, (name, [run[name] for run in runs])
    keys = runs[0]
    for kind in (
        "frozenset",
        "set",
        "namedtuple",
        "dataclass",
        "pydantic",
        "attrs",
        "dict of sets",
        "nested",
    ):
        assert keys[f"default {kind}"] != "refused", kind
    assert keys["default set"] != keys["default frozenset"]
    # a repr that lists a set, a set rendered by a template: refused, never unstable
    assert keys["default opaque"] == "refused"
    for kind in ("frozenset", "set", "namedtuple", "pydantic", "dict of sets", "opaque"):
        assert keys[f"template {kind}"] == "refused", kind
    assert keys["fields namedtuple"] == keys["fields pydantic"] == "refused"
    assert keys["template paris"] != "refused"


# ---------------------------------------------------------------------------------------
# 15. every template mistake is a KeyTemplateError


def test_an_index_with_a_leading_zero_means_what_str_format_means(cache: Cache) -> None:
    @cache.cached(key="t:{x[01]}")
    def f(x: list[str]) -> str:
        return x[1]

    assert f.key(["a", "b"]) == "t:b"
    assert f(["a", "b"]) == "b"


_PIECES = st.sampled_from(
    [
        *("{", "}", "x", "y", "[", "]", ".", "!", ":", "r", "0", "01", "a", "%", "'", '"', "\\"),
        *("{x}", "{y}", "{x[0]}", "{x.real}", ":>5", "!r", "\x00", "\n", " ", "é", "\ud800"),
        *("{{", "}}", "__class__", "{x!z}", "{x:{y}}", "=", "f'", "#", "%Y", ",", "_", "-"),
    ]
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template=st.one_of(st.text(max_size=40), st.lists(_PIECES, max_size=12).map("".join)))
def test_any_template_is_accepted_or_a_key_template_error(template: str) -> None:
    def f(x: Any, y: Any = 0) -> Any:
        return x

    try:
        decorated = Cache("memory://").cached(key=template, tags=[template])(f)
    except KeyTemplateError:
        return
    for arg in (1, "a b", [1, 2], BIG):
        try:
            key = decorated.key(arg)
        except KeyBuildError:
            continue
        assert isinstance(key, str) and len(key) <= 250


# ---------------------------------------------------------------------------------------
# 16. time zones


def test_equal_datetimes_in_different_zones_have_different_keys(cache: Cache) -> None:
    paris = datetime.datetime(2024, 1, 1, 12, tzinfo=ZoneInfo("Europe/Paris"))
    fixed = datetime.datetime(2024, 1, 1, 12, tzinfo=datetime.timezone(datetime.timedelta(hours=1)))
    utc = paris.astimezone(datetime.timezone.utc)
    assert paris == fixed == utc

    @cache.cached()
    def zone(when: Any) -> str:
        return f"{when:%H:%M %Z}"

    assert len({zone.key(paris), zone.key(fixed), zone.key(utc)}) == 3
    assert [zone(paris), zone(fixed), zone(utc)] == ["12:00 CET", "12:00 UTC+01:00", "11:00 UTC"]
    assert zone.key(paris) == zone.key(paris.replace())
    naive = paris.replace(tzinfo=None)
    assert zone.key(naive) != zone.key(paris)


def test_aware_and_naive_times_have_different_keys(cache: Cache) -> None:
    @cache.cached()
    def show(when: datetime.time) -> str:
        return repr(when.tzinfo)

    naive = datetime.time(12)
    fixed = datetime.time(12, tzinfo=datetime.timezone(datetime.timedelta(hours=1)))
    zoned = datetime.time(12, tzinfo=ZoneInfo("Europe/Paris"))
    assert len({show.key(naive), show.key(fixed), show.key(zoned)}) == 3
    assert show(naive) == "None" and show(zoned).startswith("zoneinfo.ZoneInfo")


# ---------------------------------------------------------------------------------------
# 8. FastAPI route handlers refused by the core decorators


def _decorators(cache: Cache) -> list[tuple[Any, str]]:
    return [
        (coalesce.cached(ttl=30), "coalesce.fastapi.cached"),
        (cache.cached(ttl=30), "coalesce.fastapi.cached"),
        (coalesce.coalesced(), "coalesce.fastapi.coalesced"),
        (cache.coalesced(), "coalesce.fastapi.coalesced"),
    ]


def _session() -> str:
    return "session"


def test_core_decorators_refuse_fastapi_handlers_with_markers(cache: Cache) -> None:
    def by_default(item_id: int, db: str = Depends(_session)) -> dict[str, Any]:
        return {"id": item_id}

    def by_annotation(item_id: int, q: Annotated[str, Query()] = "") -> dict[str, Any]:
        return {"id": item_id}

    def by_header(user_agent: Annotated[str | None, Header()] = None) -> str:
        return "ok"

    for handler in (by_default, by_annotation, by_header):
        for decorator, edge in _decorators(cache):
            with pytest.raises(ConfigurationError, match=edge.replace(".", r"\.")):
                decorator(handler)


def test_core_decorator_above_a_route_is_refused(cache: Cache) -> None:
    app = fastapi.FastAPI()

    for decorator, edge in _decorators(cache):

        @app.get("/item/{item_id}")
        def item(item_id: int) -> dict[str, int]:
            return {"id": item_id}

        with pytest.raises(ConfigurationError, match=r"under @app\.get.*" + edge):
            decorator(item)


def test_plain_functions_and_handlers_without_markers_are_unaffected(cache: Cache) -> None:
    @cache.cached(ttl=30)
    def plain(x: int, name: str = "a") -> str:
        return f"{name}{x}"

    assert plain(1) == "a1"
    app = fastapi.FastAPI()
    calls = []

    @app.get("/square/{n}")
    @cache.cached(ttl=30)
    def square(n: int) -> int:
        calls.append(n)
        return n * n

    client = TestClient(app)
    assert [client.get("/square/3").json() for _ in range(2)] == [9, 9]
    assert calls == [3]


def test_ordinary_decoration_does_not_scan_the_heap(
    cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Looking for a route that holds the function scans every object of the process: only
    a function held by more than its decorating frames (a route's) is looked up so."""
    from coalesce.fastapi import cached as route_cached

    scanned: list[str] = []
    real = gc.get_referrers

    def counting(*objects: Any) -> list[Any]:
        scanned.append(getattr(objects[0], "__name__", "?"))
        return real(*objects)

    monkeypatch.setattr(gc, "get_referrers", counting)
    app = fastapi.FastAPI()

    @cache.cached(ttl=30)
    def plain(x: int) -> int:
        return x

    @coalesce.cached
    def bare(x: int) -> int:
        return x

    @app.get("/fine/{n}")
    @route_cached(ttl=30, cache=cache)
    def fine(n: int) -> int:
        return n

    assert scanned == []
    with pytest.raises(ConfigurationError):

        @cache.cached(ttl=30)
        @app.get("/late")
        def late() -> int:
            return 1

    assert scanned == ["late"]


# ---------------------------------------------------------------------------------------
# the slow path takes a call's raw key as its key when that key is safe (`decorators._slow`)

_ARGUMENTS = st.one_of(
    st.integers(),
    st.integers(min_value=10**4000, max_value=10**4400),
    st.text(max_size=300),
    st.sampled_from(["a b", "a%20b", "%-", "{x}", "a}", "é", "\x00", "a" * 260, "\ud800"]),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True),
    st.tuples(st.integers(), st.text(max_size=5)),
    st.lists(st.integers(), max_size=3),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=_ARGUMENTS, y=_ARGUMENTS, template=st.sampled_from([None, "u:{x}", "{x}/{y}", "{x}"]))
def test_a_raw_key_that_is_a_safe_key_is_the_key_function_s_own(
    x: Any, y: Any, template: str | None
) -> None:
    """A miss skips rendering the key again when the hot path's raw key (the plan's `expr`)
    is a safe key: that must be exactly what the key function gives for the same arguments,
    or one call would be served another's entry."""
    from coalesce.keys import is_safe_key, plan_key

    def f(x: Any, y: Any = 0) -> Any:
        return x

    plan = plan_key(f, template)
    render = eval(f"lambda x, y: {plan.expr}", dict(plan.names))
    try:
        raw = render(x, y)
    except Exception:  # the hot path then hands the slow path no raw key at all
        return
    if is_safe_key(raw):
        assert plan.make(x, y) == raw
