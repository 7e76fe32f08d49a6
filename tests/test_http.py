"""The pure HTTP caching decisions of `coalesce.http`, without any server."""

from __future__ import annotations

import hashlib

import pytest

from coalesce.http import (
    BYPASS,
    COALESCED,
    HIT,
    MAX_DELTA_SECONDS,
    MISS,
    STALE,
    age_seconds,
    cache_control_for,
    cache_control_value,
    cache_directives,
    cache_status,
    client_wants_fresh,
    etag_for,
    if_none_match,
    list_members,
    parse_etags,
    personal,
    private_cache_control,
    quantile,
    response_age,
    storable,
)


def test_etag_is_strong_quoted_sha256_prefix() -> None:
    body = b'{"id":3}'
    tag = etag_for(body)
    assert tag == '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    assert not tag.startswith("W/")
    assert len(tag) == 34


def test_etag_depends_only_on_the_body() -> None:
    assert etag_for(b"a") == etag_for(b"a")
    assert etag_for(b"a") != etag_for(b"b")
    assert etag_for(b"") == '"' + hashlib.sha256(b"").hexdigest()[:32] + '"'


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('"a"', ['"a"']),
        ('"a", "b"', ['"a"', '"b"']),
        ('W/"a",W/"b" ,  "c"', ['"a"', '"b"', '"c"']),
        ('w/"a"', ['"a"']),
        ("*", None),
        (" * ", None),
        ("", []),
        ("garbage", []),
        ('garbage, "x"', ['"x"']),
        ('"a", "unterminated', ['"a"']),
        ('"a,b", "c"', ['"a,b"', '"c"']),
        (",,,", []),
    ],
)
def test_parse_etags(header: str, expected: list[str] | None) -> None:
    assert parse_etags(header) == expected


@pytest.mark.parametrize(
    ("header", "matches"),
    [
        (None, False),
        ('"abc"', True),
        ('W/"abc"', True),  # weak comparison
        ('"x", "abc"', True),
        ('"x", W/"abc"', True),
        ('"x"', False),
        ("*", True),
        ("abc", False),  # unquoted: not an entity-tag
        ('"ABC"', False),  # opaque tags are case-sensitive
        ("", False),
    ],
)
def test_if_none_match(header: str | None, matches: bool) -> None:
    assert if_none_match(header, '"abc"') is matches


def test_if_none_match_against_a_weak_etag() -> None:
    assert if_none_match('"abc"', 'W/"abc"')


def test_cache_directives() -> None:
    assert cache_directives(None) == {}
    assert cache_directives("No-Cache, max-age=0, private") == {
        "no-cache": None,
        "max-age": "0",
        "private": None,
    }
    assert cache_directives('max-age="10"') == {"max-age": "10"}
    # a comma inside a quoted argument does not end the directive (RFC 9111 5.2.2.4)
    assert cache_directives('no-cache="Set-Cookie, X-Token", max-age=5') == {
        "no-cache": "Set-Cookie, X-Token",
        "max-age": "5",
    }


@pytest.mark.parametrize(
    ("header", "members"),
    [
        ("", []),
        ("a", ["a"]),
        (" a , b ,, ", ["a", "b"]),
        ('a="x, y", b', ['a="x, y"', "b"]),
        ('a="x\\", y", b', ['a="x\\", y"', "b"]),  # an escaped quote stays inside
        ('a="unterminated, b', ['a="unterminated, b']),
    ],
)
def test_list_members(header: str, members: list[str]) -> None:
    assert list_members(header) == members


@pytest.mark.parametrize(
    ("cache_control", "pragma", "fresh"),
    [
        (None, None, False),
        ("no-cache", None, True),
        ("NO-CACHE", None, True),
        ("max-age=0", None, True),
        ("max-age=10", None, False),
        ("no-store", None, False),
        (None, "no-cache", True),
        ("max-age=10", "no-cache", False),  # Cache-Control wins over Pragma
    ],
)
def test_client_wants_fresh(cache_control: str | None, pragma: str | None, fresh: bool) -> None:
    assert client_wants_fresh(cache_control, pragma) is fresh


def test_age_is_whole_non_negative_seconds() -> None:
    assert age_seconds(100.0, 100.0) == 0
    assert age_seconds(100.0, 102.9) == 2
    assert age_seconds(100.0, 99.0) == 0  # a clock behind the writer's


def test_response_age_is_the_entrys_age_and_stale_downstream_once_stale_here() -> None:
    assert response_age(100.0, 8.0, 105.0) == 5  # at age 5 of ttl 8: Age 5 (max-age=8)
    assert response_age(100.0, 8.0, 107.99) == 7
    assert response_age(100.0, 8.0, 108.0) == 8  # stale here: Age >= max-age, stale there
    assert response_age(100.0, 8.0, 130.5) == 30
    # a fractional TTL: max-age=1 is sent, so a stale entry is at least 1 s old
    assert response_age(100.0, 0.3, 100.5) == 1
    assert response_age(100.0, 0.3, 100.2) == 0
    assert response_age(100.0, None, 150.0) == 50  # a route that keeps nothing
    assert response_age(100.0, 8.0, 90.0) == 0  # a clock behind the writer's
    assert response_age(0.0, 1e308, 1e10) == MAX_DELTA_SECONDS


def test_a_downstream_cache_keeps_a_response_exactly_as_long_as_the_entry() -> None:
    """RFC 9111 4.2: downstream, a response is fresh while its freshness lifetime
    (`max-age`) exceeds its current age (`Age` plus the time it has held it, 4.2.3). So
    `max-age - Age` must be what is left of the entry's TTL (to the second), at any age."""
    created, ttl = 1000.0, 8.0
    control = cache_control_for(None, private=False, ttl=ttl)
    assert control == "public, max-age=8"
    max_age = int(cache_directives(control)["max-age"] or 0)
    for elapsed in (0.0, 0.5, 3.0, 5.0, 7.2, 7.99):
        left_downstream = max_age - response_age(created, ttl, created + elapsed)
        assert 0 <= left_downstream - (ttl - elapsed) < 1
    for elapsed in (8.0, 8.5, 20.0):  # served stale: stale downstream too
        assert max_age - response_age(created, ttl, created + elapsed) <= 0


@pytest.mark.parametrize(
    ("handler", "private", "expected"),
    [
        # no Cache-Control from the handler: ours, max-age the whole TTL
        (None, False, "public, max-age=60, stale-while-revalidate=30"),
        (None, True, "private, max-age=60, stale-while-revalidate=30"),
        # the handler's wins, as written
        ("no-cache", False, "no-cache"),
        ("No-Cache, Max-Age=0", False, "No-Cache, Max-Age=0"),
        ("public, max-age=5, s-maxage=600", False, "public, max-age=5, s-maxage=600"),
        ("max-age=600, must-revalidate", False, "max-age=600, must-revalidate"),
        # per user: never public, s-maxage or proxy-revalidate; always private
        ("no-cache", True, "private, no-cache"),
        (
            "public, max-age=60, s-maxage=600, proxy-revalidate, must-revalidate",
            True,
            "private, max-age=60, must-revalidate",
        ),
        ("Public, S-MaxAge=600", True, "private"),
        ("private, max-age=5", True, "private, max-age=5"),
        ('private="X-Token", public', True, 'private="X-Token"'),
        ('no-cache="Set-Cookie, X-Token", public', True, 'private, no-cache="Set-Cookie, X-Token"'),
        ("", True, "private"),
    ],
)
def test_cache_control_for(handler: str | None, private: bool, expected: str) -> None:
    assert cache_control_for(handler, private=private, ttl=60.0, stale_ttl=30.0) == expected


def test_cache_control_for_expires_and_routes_that_keep_nothing() -> None:
    # the handler's Expires is its freshness: no max-age of ours to override it (5.3)
    assert cache_control_for(None, private=False, ttl=60.0, expires=True) is None
    assert cache_control_for(None, private=True, ttl=60.0, expires=True) == "private"
    assert cache_control_for("max-age=5", private=False, ttl=60.0, expires=True) == "max-age=5"
    # a coalesced route (ttl None) adds nothing of its own, but per user says private
    assert cache_control_for(None, private=False, ttl=None) is None
    assert cache_control_for(None, private=True, ttl=None) == "private"
    assert cache_control_for("no-cache", private=False, ttl=None) == "no-cache"
    assert cache_control_for("public", private=True, ttl=None) == "private"
    # delta-seconds stay bounded (RFC 9111 1.2.2); a fractional TTL is rounded up
    assert cache_control_for(None, private=False, ttl=1e308) == "public, max-age=2147483648"
    assert cache_control_for(None, private=False, ttl=0.3) == "public, max-age=1"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("public, max-age=60", "private, max-age=60"),
        ("max-age=60, public", "private, max-age=60"),
        ("s-maxage=60", "private"),
        ("no-store", "private, no-store"),
        ("private", "private"),
        ("max-age=60, PRIVATE", "max-age=60, PRIVATE"),
    ],
)
def test_private_cache_control(header: str, expected: str) -> None:
    assert private_cache_control(header) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], False),
        ([("content-type", "text/plain")], False),
        ([("Set-Cookie", "a=b")], True),
        ([("cache-control", "no-store")], True),
        ([("Cache-Control", "max-age=5, Private")], True),
        ([("cache-control", 'private="x-token"')], True),
        ([("cache-control", "no-cache")], False),  # stored: revalidated downstream
        ([("cache-control", 'no-cache="set-cookie, private"')], False),
        ([("cache-control", "public, max-age=60")], False),
        ([("pragma", "no-cache"), ("expires", "0")], False),
    ],
)
def test_personal(headers: list[tuple[str, str]], expected: bool) -> None:
    assert personal(headers) is expected


def test_cache_control_value() -> None:
    assert cache_control_value(30) == "public, max-age=30"
    assert cache_control_value(30, private=True) == "private, max-age=30"
    assert (
        cache_control_value(0, stale_while_revalidate=9.5)
        == "public, max-age=0, stale-while-revalidate=10"
    )


@pytest.mark.parametrize(
    ("computed_here", "created", "started", "now", "expected"),
    [
        (True, 100.0, 99.0, 100.0, MISS),
        (True, 10.0, 99.0, 100.0, MISS),  # ran it: a miss whatever the times
        (False, 50.0, 99.0, 100.0, HIT),
        (False, 99.5, 99.0, 100.0, COALESCED),  # computed while this request waited
        (False, 30.0, 99.0, 100.0, STALE),  # past its 60 s TTL
    ],
)
def test_cache_status(
    computed_here: bool, created: float, started: float, now: float, expected: str
) -> None:
    status = cache_status(
        computed_here=computed_here, created=created, ttl=60.0, started=started, now=now
    )
    assert status == expected
    assert status != BYPASS


@pytest.mark.parametrize(
    ("status", "headers", "cache_4xx", "expected"),
    [
        (200, [("content-type", "application/json")], False, True),
        (201, [], False, True),
        (301, [("location", "/x")], False, True),
        (404, [], False, False),
        (404, [], True, True),
        (410, [], True, True),
        (500, [], True, False),
        (503, [], False, False),
        (206, [], False, False),
        (304, [], False, False),
        (101, [], False, False),
        (200, [("Set-Cookie", "session=1")], False, False),
        (200, [("Cache-Control", "no-store")], False, False),
        (200, [("cache-control", "private, max-age=10")], False, False),
        (200, [("cache-control", "public, max-age=10")], False, True),
        (200, [("cache-control", "no-cache")], False, True),
        (200, [("cache-control", "max-age=0, must-revalidate")], False, True),
        (500, [("cache-control", "public, max-age=10")], True, False),
    ],
)
def test_storable(
    status: int, headers: list[tuple[str, str]], cache_4xx: bool, expected: bool
) -> None:
    assert storable(status, headers, cache_4xx=cache_4xx) is expected


def test_quantile_nearest_rank() -> None:
    assert quantile([], 0.5) == 0.0
    assert quantile([1.0], 0.99) == 1.0
    values = [float(i) for i in range(1, 101)]
    assert quantile(values, 0.5) == 50.0
    assert quantile(values, 0.99) == 99.0
    assert quantile(values, 1.0) == 100.0
    assert quantile(values, 0.0) == 1.0
