"""The admin router against hostile input, through real HTTP requests (httpx's ASGI transport).

Every body that is too big, too deep, not UTF-8, not JSON or of the wrong shape is answered
413 or 400 with a `detail` naming the problem, never 500, and invalidates nothing; the token
is checked before a byte of the body is read, and a body is never read much beyond the limit.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI

from coalesce import Cache
from coalesce.fastapi.admin import MAX_BODY_BYTES, MAX_DEPTH, MAX_KEYS, admin_router

TOKEN = "admin-test-token-0123456789abcdef"
AUTH = {"authorization": f"Bearer {TOKEN}"}
URL = "/coalesce/invalidate"
CHUNK = 1024


@pytest.fixture
def cache() -> Iterator[Cache]:
    c = Cache()

    @c.cached(ttl=60, key="k{n}", tags=["t"])
    def value(n: int) -> int:
        return n

    value(1)
    value(2)
    yield c
    c.close()


@pytest.fixture
def app(cache: Cache) -> FastAPI:
    app = FastAPI()
    app.include_router(admin_router(cache, token=TOKEN))
    return app


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=10
    )


class Chunks:
    """A request body of `count` chunks of `CHUNK` bytes, counting how many the app pulled.

    The ASGI transport hands the app the next chunk only when it calls `receive()`, so
    `pulled` is how much of the body the server read.
    """

    def __init__(self, count: int, fill: bytes = b" ") -> None:
        self.count = count
        self.fill = fill
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            self.pulled += 1
            yield self.fill * CHUNK


async def post(
    app: FastAPI, content: bytes, headers: dict[str, str | bytes] | None = None
) -> httpx.Response:
    async with client(app) as c:
        return await c.post(URL, content=content, headers={**AUTH, **(headers or {})})


def assert_refused(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and words in detail, detail


def assert_untouched(cache: Cache) -> None:
    assert sorted(cache.keys()) == ["k1", "k2"]


# ---------------------------------------------------------------------------------------
# what still works


async def test_keys_and_tags_are_invalidated(app: FastAPI, cache: Cache) -> None:
    keys = await post(app, json.dumps({"keys": ["k1", "nope"]}).encode())
    assert keys.json() == {"removed": {"k1": True, "nope": False}, "count": 1}
    tag = await post(app, json.dumps({"tag": "t"}).encode())
    assert tag.json() == {"tag": "t", "removed": 1}
    assert cache.keys() == []


async def test_a_body_of_exactly_the_limit_and_max_keys_are_accepted(
    app: FastAPI, cache: Cache
) -> None:
    body = json.dumps({"tag": ""}).encode()
    exact = json.dumps({"tag": "x" * (MAX_BODY_BYTES - len(body))}).encode()
    assert len(exact) == MAX_BODY_BYTES
    assert (await post(app, exact)).json() == {
        "tag": "x" * (MAX_BODY_BYTES - len(body)),
        "removed": 0,
    }
    many = [f"x{n}" for n in range(MAX_KEYS - 1)] + ["k1"]
    answer = await post(app, json.dumps({"keys": many}, separators=(",", ":")).encode())
    assert answer.status_code == 200 and answer.json()["count"] == 1
    assert cache.keys() == ["k2"]


async def test_brackets_inside_strings_do_not_count_as_nesting(app: FastAPI) -> None:
    tag = "[{" * 500
    answer = await post(app, json.dumps({"tag": tag}).encode())
    assert answer.json() == {"tag": tag, "removed": 0}
    escaped = '{"tag": "\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\\\"}'
    assert (await post(app, escaped.encode())).status_code == 200


# ---------------------------------------------------------------------------------------
# the token first


async def test_the_token_is_checked_before_the_body_is_read(app: FastAPI, cache: Cache) -> None:
    body = Chunks(2000)  # 2 MB, chunked: the app must not pull a single chunk
    async with client(app) as c:
        wrong = await c.post(URL, content=body, headers={"authorization": "Bearer wrong"})
        announced = await c.post(
            URL, content=b"{}", headers={"content-length": str(20 * 2**20)}
        )  # no token and 20 MB announced: 401 (not 413), nothing read
        deep = await c.post(URL, content=b"[" * 200_000)  # no token
    for response in (wrong, announced, deep):
        assert_refused(response, 401, "bearer token")
        assert response.headers["www-authenticate"] == "Bearer"
    assert body.pulled == 0
    assert_untouched(cache)


# ---------------------------------------------------------------------------------------
# size


async def test_a_200000_deep_body_is_refused_not_a_recursion_error(
    app: FastAPI, cache: Cache
) -> None:
    answer = await post(app, b"[" * 200_000 + b"]" * 200_000)
    assert_refused(answer, 413, f"at most {MAX_BODY_BYTES} bytes")
    object_deep = b'{"keys":' * 100_000 + b"1" + b"}" * 100_000
    assert_refused(await post(app, object_deep), 413, "at most")
    assert_untouched(cache)


async def test_a_huge_body_is_refused_from_its_content_length_without_reading_it(
    app: FastAPI, cache: Cache
) -> None:
    body = Chunks(20 * 1024)  # 20 MB, announced in Content-Length
    async with client(app) as c:
        answer = await c.post(
            URL, content=body, headers={**AUTH, "content-length": str(20 * 2**20)}
        )
    assert_refused(answer, 413, f"at most {MAX_BODY_BYTES} bytes")
    assert body.pulled == 0
    assert_untouched(cache)


async def test_a_huge_content_length_with_a_small_body_is_refused(
    app: FastAPI, cache: Cache
) -> None:
    small = json.dumps({"keys": ["k1"]}).encode()
    for length in (MAX_BODY_BYTES + 1, 10**12, 10**40):
        answer = await post(app, small, {"content-length": str(length)})
        assert_refused(answer, 413, "at most")
    assert_untouched(cache)


async def test_a_malformed_content_length_is_refused(app: FastAPI, cache: Cache) -> None:
    small = json.dumps({"keys": ["k1"]}).encode()
    for length in ("abc", "-1", "1e9", "", b"\xb2"):  # b"\xb2": "²", a digit to isdigit()
        answer = await post(app, small, {"content-length": length})
        assert_refused(answer, 400, "Content-Length")
    assert_untouched(cache)


async def test_a_chunked_body_over_the_limit_is_refused_after_reading_the_limit_only(
    app: FastAPI, cache: Cache
) -> None:
    body = Chunks(1000)  # 1 MB, no Content-Length (Transfer-Encoding: chunked)
    async with client(app) as c:
        answer = await c.post(URL, content=body, headers=AUTH)
    assert_refused(answer, 413, f"at most {MAX_BODY_BYTES} bytes")
    assert body.pulled == MAX_BODY_BYTES // CHUNK + 1  # the limit, plus the chunk past it
    assert_untouched(cache)


async def test_a_chunked_body_within_the_limit_is_read_whole(app: FastAPI, cache: Cache) -> None:
    valid = json.dumps({"keys": ["k1"]}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for n in range(0, len(valid), 3):
            yield valid[n : n + 3]

    async with client(app) as c:
        answer = await c.post(URL, content=chunks(), headers=AUTH)
    assert answer.json() == {"removed": {"k1": True}, "count": 1}


# ---------------------------------------------------------------------------------------
# depth, encoding, syntax


@pytest.mark.parametrize(
    "body",
    [
        b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1),
        b'{"keys": ' + b"[" * MAX_DEPTH + b'"k1"' + b"]" * MAX_DEPTH + b"}",
        b"[" * 30_000,  # under the size limit, far over the interpreter's recursion limit
        b"[" * 20_000 + b"]" * 20_000,
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    ],
    ids=["just-too-deep", "deep-keys", "unclosed-30000", "closed-20000", "objects-10000"],
)
async def test_too_deep_json_is_a_400(app: FastAPI, cache: Cache, body: bytes) -> None:
    assert len(body) <= MAX_BODY_BYTES
    assert_refused(await post(app, body), 400, f"deeper than {MAX_DEPTH}")
    assert_untouched(cache)


async def test_json_exactly_at_the_depth_limit_is_parsed(app: FastAPI) -> None:
    body = b'{"keys": ' + b"[" * (MAX_DEPTH - 1) + b'"k1"' + b"]" * (MAX_DEPTH - 1) + b"}"
    assert_refused(await post(app, body), 400, '"keys" must hold non-empty strings')


@pytest.mark.parametrize(
    "body",
    [
        b'{"tag": "\xff"}',
        b'{"keys": ["k1\xc3"]}',
        b'{"tag": "\xed\xa0\x80"}',  # an encoded surrogate
        json.dumps({"tag": "t"}).encode("utf-16"),
    ],
    ids=["ff", "truncated", "surrogate", "utf-16"],
)
async def test_a_body_that_is_not_utf8_is_a_400(app: FastAPI, cache: Cache, body: bytes) -> None:
    assert_refused(await post(app, body), 400, "UTF-8")
    assert_untouched(cache)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"keys": ["k1"]',
        b'{"keys": ["k1"],}',
        b"{'keys': ['k1']}",
        b'{"tag": ' + b"1" * 5000 + b"}",  # over Python's int digit limit
        b'{"tag": "t"} {"tag": "t"}',
    ],
    ids=["empty", "text", "unclosed", "trailing-comma", "quotes", "huge-int", "two-docs"],
)
async def test_malformed_json_is_a_400(app: FastAPI, cache: Cache, body: bytes) -> None:
    assert_refused(await post(app, body), 400, "must be JSON")
    assert_untouched(cache)


# ---------------------------------------------------------------------------------------
# shape


@pytest.mark.parametrize("value", [[], ["k1"], "k1", 1, 1.5, None, True])
async def test_json_that_is_not_an_object_is_a_400(
    app: FastAPI, cache: Cache, value: object
) -> None:
    assert_refused(await post(app, json.dumps(value).encode()), 400, 'exactly one of "keys"')
    assert_untouched(cache)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({}, 'exactly one of "keys"'),
        ({"keys": ["k1"], "tag": "t"}, 'exactly one of "keys"'),
        ({"key": "k1"}, 'exactly one of "keys"'),
        ({"keys": ["k1"], "force": True}, 'unknown member(s) "force"'),
        ({"keys": "k1"}, '"keys" must be a non-empty list'),
        ({"keys": {"k1": 1}}, '"keys" must be a non-empty list'),
        ({"keys": []}, '"keys" must be a non-empty list'),
        ({"keys": [1]}, "non-empty strings"),
        ({"keys": ["k1", None]}, "non-empty strings"),
        ({"keys": ["k1", ["k2"]]}, "non-empty strings"),
        ({"keys": ["k1", {"k2": 1}]}, "non-empty strings"),
        ({"keys": ["k1", ""]}, "non-empty strings"),
        ({"keys": [True]}, "non-empty strings"),
        ({"tag": 3}, '"tag" must be a non-empty string'),
        ({"tag": ["t"]}, '"tag" must be a non-empty string'),
        ({"tag": ""}, '"tag" must be a non-empty string'),
        ({"tag": None}, '"tag" must be a non-empty string'),
    ],
)
async def test_wrong_shapes_are_a_400(app: FastAPI, cache: Cache, body: object, words: str) -> None:
    assert_refused(await post(app, json.dumps(body).encode()), 400, words)
    assert_untouched(cache)


@pytest.mark.parametrize("count", [MAX_KEYS + 1, 10_000])
async def test_too_many_keys_is_a_400_and_invalidates_none(
    app: FastAPI, cache: Cache, count: int
) -> None:
    keys = ["k1"] + ["x"] * (count - 1)  # short keys: 10,000 of them fit in the size limit
    body = json.dumps({"keys": keys}, separators=(",", ":")).encode()
    assert len(body) <= MAX_BODY_BYTES
    assert_refused(await post(app, body), 400, f"too many keys: {count} given, at most {MAX_KEYS}")
    assert_untouched(cache)


async def test_ten_thousand_distinct_keys_are_over_the_size_limit(
    app: FastAPI, cache: Cache
) -> None:
    body = json.dumps({"keys": [f"k{n}" for n in range(10_000)]}).encode()
    assert len(body) > MAX_BODY_BYTES
    assert_refused(await post(app, body), 413, "split a longer list of keys")
    assert_untouched(cache)
