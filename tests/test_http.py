"""The pure HTTP caching decisions of `coalesce.http`, without any server."""

from __future__ import annotations

import hashlib

import pytest

from coalesce.http import (
    BYPASS,
    COALESCED,
    HIT,
    MISS,
    STALE,
    age_seconds,
    cache_control_value,
    cache_directives,
    cache_status,
    client_wants_fresh,
    etag_for,
    if_none_match,
    max_age_seconds,
    parse_etags,
    quantile,
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


def test_age_and_max_age_are_whole_non_negative_seconds() -> None:
    assert age_seconds(100.0, 100.0) == 0
    assert age_seconds(100.0, 102.9) == 2
    assert age_seconds(100.0, 99.0) == 0  # a clock behind the writer's
    assert max_age_seconds(100.0, 60.0, 100.0) == 60
    assert max_age_seconds(100.0, 60.0, 100.5) == 60
    assert max_age_seconds(100.0, 60.0, 101.5) == 59
    assert max_age_seconds(100.0, 60.0, 160.0) == 0
    assert max_age_seconds(100.0, 60.0, 161.0) == 0


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
