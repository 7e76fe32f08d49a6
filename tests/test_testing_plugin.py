"""The pytest plugin `coalesce.testing` (issue 14), run the way users run it: their test files
in a `pytester` directory, the plugin found through the `pytest11` entry point.

Each user file proves one promise: expiry by moving `coalesce_clock` (no sleeping), one cache
per test (`coalesce_cache` is the default cache, and the previous default comes back),
`assert_computations` passing and failing with a message that says what ran, async
functions and coalesced concurrent callers, `coalesce_disabled`.
"""

from __future__ import annotations

import gc
import importlib.metadata
import math
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

import coalesce
from coalesce import Cache
from coalesce.testing import START, FakeClock, assert_computations

pytest_plugins = ["pytester"]


@pytest.fixture
def pytester(pytester: pytest.Pytester) -> pytest.Pytester:
    """A user's project: pytest-asyncio in auto mode (its own default warns)."""
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    return pytester


# A user's module: a team's loader calls the user loader twice, both on the default cache.
USERS_AND_TEAMS = """
import coalesce
from coalesce.testing import assert_computations

@coalesce.cached(ttl=60, key="user:{user_id}")
def user(user_id):
    return {"id": user_id}

@coalesce.cached(ttl=60)
def team(team_id):
    return [user(team_id), user(team_id + 100)]
"""


# -- the plugin's registration --------------------------------------------------------------


def test_the_plugin_is_registered_as_pytest11_entry_point() -> None:
    (entry,) = [
        e for e in importlib.metadata.entry_points(group="pytest11") if e.name == "coalesce"
    ]
    assert entry.value == "coalesce.testing"


def test_import_coalesce_imports_neither_pytest_nor_the_plugin() -> None:
    code = "import sys, coalesce; print('pytest' in sys.modules, 'coalesce.testing' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["False", "False"]


def test_users_turn_it_off_with_p_no_coalesce(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_it(coalesce_cache):\n    pass\n")
    pytester.runpytest("-p", "no:coalesce").assert_outcomes(errors=1)
    pytester.runpytest().assert_outcomes(passed=1)


def test_a_fresh_pytest_process_finds_the_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import coalesce

        def test_it(coalesce_cache, coalesce_clock):
            assert coalesce.get_cache() is coalesce_cache
            assert coalesce_cache.clock is coalesce_clock
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


# -- FakeClock --------------------------------------------------------------------------------


def test_fake_clock_stands_still_until_moved() -> None:
    clock = FakeClock()
    assert clock() == START == 1_767_225_600.0  # 2026-01-01 00:00:00 UTC
    assert clock.advance(1.5) == START + 1.5 == clock()
    clock.set(10)
    assert clock() == 10.0 and isinstance(clock(), float)
    assert repr(clock) == "FakeClock(10.0)"
    assert FakeClock(5)() == 5.0


@pytest.mark.parametrize("bad", [math.inf, math.nan, "1", None, True])
def test_fake_clock_refuses_what_is_not_a_number_of_seconds(bad: object) -> None:
    clock = FakeClock()
    with pytest.raises(TypeError, match="finite number of seconds"):
        clock.advance(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="finite number of seconds"):
        clock.set(bad)  # type: ignore[arg-type]
    assert clock() == START


def test_fake_clock_moves_back_only_by_set() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError, match="use set"):
        clock.advance(-1)
    clock.set(START - 60)
    assert clock() == START - 60


# -- the fixtures, in a user's suite ----------------------------------------------------------


def test_expiry_follows_the_fake_clock(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import coalesce
        from coalesce.testing import assert_computations

        calls = []

        @coalesce.cached(ttl=60)
        def load(user_id):
            calls.append(user_id)
            return {"id": user_id}

        def test_an_entry_expires_when_the_clock_passes_its_ttl(coalesce_cache, coalesce_clock):
            with assert_computations(1, load):
                assert load(1) == {"id": 1}
                assert load(1) == {"id": 1}
            coalesce_clock.advance(59.9)
            with assert_computations(0, load):
                load(1)
            coalesce_clock.advance(0.2)
            with assert_computations(1, load):
                load(1)
            assert calls == [1, 1]

        def test_stale_ttl_windows_follow_it_too(coalesce_cache, coalesce_clock):
            coalesce_cache.set("greeting", "hello", ttl=10)
            coalesce_clock.advance(9)
            assert coalesce_cache.get("greeting") == "hello"
            coalesce_clock.advance(1)
            assert coalesce_cache.get("greeting") is None
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=2)
    assert result.duration < 30  # nothing slept for a minute


def test_each_test_has_its_own_default_cache_and_the_old_one_comes_back(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import coalesce
        from coalesce.testing import assert_computations

        seen = []

        @coalesce.cached(ttl=3600)
        def load(user_id):
            return user_id

        def test_outside():
            seen.append(coalesce.get_cache())

        def test_first(coalesce_cache):
            seen.append(coalesce_cache)
            coalesce_cache.set("shared", "from the first test")
            with assert_computations(1, load):
                load(1)

        def test_second(coalesce_cache):
            seen.append(coalesce_cache)
            assert coalesce_cache.get("shared") is None
            with assert_computations(1, load):  # the first test's entry is not here
                load(1)
            with assert_computations(0, load):
                load(1)

        def test_after():
            outside, first, second = seen
            assert first is not second and outside not in (first, second)
            assert first.namespace != second.namespace
            assert coalesce.get_cache() is outside
        """
    )
    pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=4)


def test_assert_computations_passes_on_the_exact_count(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        USERS_AND_TEAMS
        + textwrap.dedent(
            """
        def test_functions_caches_and_the_default_cache(coalesce_cache):
            with assert_computations(3):  # the default cache: team 7, users 7 and 107
                team(7)
                team(7)
            with assert_computations(3, user, team):
                team(8)
            with assert_computations(1, team), assert_computations(2, coalesce_cache):
                team(107)  # user 107 is a hit, user 207 is computed
            with assert_computations(0, user, team):
                team(7)
                user(207)

        def test_cache_aside_counts_too(coalesce_cache):
            with assert_computations(1, coalesce_cache):
                assert coalesce_cache.get_or_set("report:today", lambda: 42) == 42
                assert coalesce_cache.get_or_set("report:today", lambda: 43) == 42

        def test_a_cache_of_the_users_own(coalesce_clock):
            cache = coalesce.Cache(clock=coalesce_clock)

            @cache.cached(ttl=5)
            def price(sku):
                return 10

            with assert_computations(1, price), assert_computations(1, cache):
                price("a")
                price("a")
            coalesce_clock.advance(5)
            with assert_computations(1, cache):
                price("a")
            """
        )
    )
    pytester.runpytest().assert_outcomes(passed=3)


def test_assert_computations_fails_saying_what_ran(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        USERS_AND_TEAMS
        + textwrap.dedent(
            """
        import pytest

        def test_one_query_expected(coalesce_cache):
            user(1)
            with assert_computations(1):
                team(1)

        def test_functions_named(coalesce_cache):
            with assert_computations(2, team, user):
                user(5)
                user(5)

        def test_nothing_called(coalesce_cache):
            with assert_computations(1, coalesce_cache):
                pass

        def test_the_blocks_own_error_goes_up(coalesce_cache):
            with assert_computations(5):
                raise LookupError("from the block")

        def test_expected_is_a_count(coalesce_cache):
            with pytest.raises(ValueError, match="number of computations"):
                assert_computations(-1)
            with pytest.raises(TypeError, match="number of computations"):
                assert_computations(1.0)
            with pytest.raises(TypeError, match="decorated with coalesce"):
                assert_computations(1, print)
            """
        )
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=4)
    out = result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*test_one_query_expected*",
            "E*AssertionError: expected 1 computation, counted 2:",
            "E*  test_assert_computations_fails_saying_what_ran.team: 1 computation (misses=1)",
            "E*  user:{user_id}*: 1 computation (hits=1, misses=1)",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "E*AssertionError: expected 2 computations, counted 1:",
            "E*  test_assert_computations_fails_saying_what_ran.team: 0 computations (not called)",
            "E*  test_assert_computations_fails_saying_what_ran.user: 1 computation (hits=1, "
            "misses=1)",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "E*AssertionError: expected 1 computation, counted 0: no function of "
            "Cache('memory://', namespace='test-*', enabled=True) was called"
        ]
    )
    result.stdout.fnmatch_lines(["E*LookupError: from the block"])
    # the plugin's own frames are hidden: the user's `with` line is where it failed
    assert "coalesce/testing.py" not in out


def test_async_functions_and_coalesced_callers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio
        import coalesce
        from coalesce.testing import assert_computations

        queries = []

        @coalesce.cached(ttl=30, key="user:{user_id}")
        async def load(user_id):
            queries.append(user_id)
            await asyncio.sleep(0.05)  # the database, slow enough for every caller to join
            return {"id": user_id}

        async def test_ten_concurrent_callers_make_one_query(coalesce_cache):
            with assert_computations(1, load):
                results = await asyncio.gather(*(load(1) for _ in range(10)))
            assert results == [{"id": 1}] * 10
            assert load.stats()["coalesced"] >= 9 - load.stats()["hits"]

        async def test_expiry_by_the_clock(coalesce_cache, coalesce_clock):
            await load(2)
            coalesce_clock.advance(29)
            with assert_computations(0):
                await load(2)
            coalesce_clock.advance(1)
            with assert_computations(1):
                await load(2)

        async def test_aget_or_set(coalesce_cache, coalesce_clock):
            async def build():
                return "report"

            with assert_computations(1, coalesce_cache):
                await coalesce_cache.aget_or_set("report:1", build, ttl=5)
                await coalesce_cache.aget_or_set("report:1", build, ttl=5)

        async def test_a_failing_async_check(coalesce_cache):
            with assert_computations(1, load):
                await load(3)
                await load(4)
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(
        [
            "E*AssertionError: expected 1 computation, counted 2:",
            "E*  test_async_functions_and_coalesced_callers.load: 2 computations (misses=2)",
        ]
    )


def test_coalesce_disabled_runs_every_call(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import coalesce
        from coalesce.testing import assert_computations

        calls = []

        @coalesce.cached(ttl=60)
        def load(user_id):
            calls.append(user_id)
            return user_id

        def test_plain_calls(coalesce_disabled):
            assert coalesce.get_cache() is coalesce_disabled
            load(1)
            load(1)
            assert calls == [1, 1]

        def test_the_check_says_why_it_counted_nothing(coalesce_disabled):
            with assert_computations(1, load):
                load(1)
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "E*AssertionError: expected 1 computation, counted 0:",
            "E*  test_coalesce_disabled_runs_every_call.load: 0 computations (not called)",
            "E*the default cache Cache('memory://', namespace='test-*', enabled=False) is "
            "disabled (enabled=False or COALESCE_DISABLED=1): its functions run without "
            "being counted",
        ]
    )


# -- the helpers, imported directly ---------------------------------------------------------


@pytest.fixture
def own_cache() -> Iterator[Cache]:
    cache = Cache(clock=FakeClock())
    yield cache
    cache.close()


def test_assert_computations_outside_a_pytester_run(own_cache: Cache) -> None:
    @own_cache.cached(ttl=1)
    def double(x: int) -> int:
        return 2 * x

    with assert_computations(2, double):
        assert double(1) == 2 and double(2) == 4 and double(1) == 2
    check = assert_computations(0, own_cache)
    with pytest.raises(AssertionError, match=r"expected 0 computations, counted 1:\n"), check:
        double(3)


def _user_loader(cache: Cache, name: str) -> coalesce.CachedFunction[[int], int]:
    """A loader of users named `name`; every one shares the key template `user:{user_id}`."""

    def load(user_id: int) -> int:
        return user_id

    load.__qualname__ = name
    return cache.cached(ttl=60, key="user:{user_id}")(load)


def test_a_function_collected_in_the_block_counts_what_it_did(own_cache: Cache) -> None:
    # The CI failure of session 7 ("expected 1 computation, counted -10"): counters read by
    # name lost a function collected while the block ran, and everything it had counted
    # before the block came off the total.
    old, new = _user_loader(own_cache, "old"), _user_loader(own_cache, "new")
    old(1)
    old(2)
    with assert_computations(2, own_cache):
        new(3)
        old(4)
        del old
        gc.collect()
    assert list(own_cache.stats()) == ["user:{user_id}"]  # only `new` is left


def test_a_function_renamed_in_the_block_is_shown_for_what_it_did(own_cache: Cache) -> None:
    # `first` is "user:{user_id}" on entry and "user:{user_id} (...first)" on exit, when
    # `second` shares its template: read by name, its whole past showed up as the block's.
    first = _user_loader(own_cache, "first")
    first(1)
    check = assert_computations(2, own_cache)
    with pytest.raises(AssertionError) as failed, check:
        second = _user_loader(own_cache, "second")
        second(2)
    assert str(failed.value) == (
        "expected 2 computations, counted 1:\n"
        f"  user:{{user_id}} ({__name__}.second): 1 computation (misses=1)"
    )


def test_functions_alike_in_template_and_name_each_count(own_cache: Cache) -> None:
    # closures made in a loop share their key template and their qualified name: one name
    # for both dropped the other's counters from `stats()` and from the check
    loaders = [_user_loader(own_cache, "load") for _ in range(3)]
    with assert_computations(3, own_cache):
        for user_id, load in enumerate(loaders):
            load(user_id)
    assert sorted(own_cache.stats()) == [
        f"user:{{user_id}} ({__name__}.load)",
        f"user:{{user_id}} ({__name__}.load) #2",
        f"user:{{user_id}} ({__name__}.load) #3",
    ]


def test_counters_are_the_live_stats_named_as_stats_names_them(own_cache: Cache) -> None:
    first = _user_loader(own_cache, "first")
    first(1)
    counters = own_cache.counters()
    assert list(counters) == list(own_cache.stats()) == ["user:{user_id}"]
    live = counters["user:{user_id}"]
    assert isinstance(live, coalesce.Stats) and live.computations == 1
    first(2)
    first(2)
    assert (live.computations, live.hits) == (2, 1)  # a copy would still say 1
    assert own_cache.stats()["user:{user_id}"] == live.as_dict()


def test_the_fixtures_leave_the_default_cache_as_they_found_it(
    pytester: pytest.Pytester,
) -> None:
    before = coalesce.get_cache()
    pytester.makepyfile("def test_it(coalesce_cache, coalesce_disabled):\n    pass\n")
    pytester.runpytest().assert_outcomes(passed=1)
    assert coalesce.get_cache() is before
