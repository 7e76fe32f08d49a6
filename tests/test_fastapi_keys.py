"""Which handler parameters identify a request, and the key text made from them."""

from __future__ import annotations

import datetime
import enum
import hashlib
import inspect
from typing import Annotated, Any

import pytest
from fastapi import BackgroundTasks, Cookie, Depends, Header, Query, Request, Response, Security
from fastapi.security import SecurityScopes
from pydantic import BaseModel
from starlette.requests import HTTPConnection

from coalesce import ConfigurationError
from coalesce.fastapi.keys import (
    REQUIRED,
    analyse,
    bind_identity,
    encode_params,
    encode_value,
    encode_vary,
    is_class,
    resolved_signature,
)


def dep() -> int:
    return 1


class Color(enum.Enum):
    RED = "red"


class Filters(BaseModel):
    b: int = 2
    a: str = "x"


def handler(
    item_id: int,
    request: Request,
    response: Response,
    tasks: BackgroundTasks,
    conn: HTTPConnection,
    scopes: SecurityScopes,
    q: Annotated[str | None, Query()] = None,
    limit: int = Query(10),
    db: int = Depends(dep),
    user: Annotated[int, Depends(dep)] = 0,
    key: int = Security(dep),
    session: Annotated[str | None, Cookie()] = None,
    authorization: Annotated[str | None, Header()] = None,
    x_trace: Annotated[str | None, Header()] = None,
) -> None: ...


def test_analyse_keeps_only_the_request_identity() -> None:
    found = {p.name: p for p in analyse(resolved_signature(handler))}
    assert sorted(found) == ["authorization", "item_id", "limit", "q", "session", "x_trace"]
    assert found["session"].sensitive and found["authorization"].sensitive
    assert not found["x_trace"].sensitive and not found["q"].sensitive
    assert found["item_id"].default is REQUIRED
    assert found["limit"].default == 10  # unwrapped from Query(10)
    assert found["q"].default is None


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("plain", "plain"),
        ("a&b=c|d?e%f g", "a%26b%3Dc%7Cd%3Fe%25f%20g"),
        ("é", "%C3%A9"),
        (True, "true"),
        (3, "3"),
        (1.5, "1.5"),
        (Color.RED, "red"),
        (datetime.date(2024, 1, 2), '"2024-01-02"'),
        (Filters(), '{"a":"x","b":2}'),
    ],
)
def test_encode_value(value: Any, text: str) -> None:
    assert encode_value(value) == text


def test_generic_aliases_are_not_classes() -> None:
    # on Python 3.10 `isinstance(list[str], type)` is True and `issubclass` then raises
    assert is_class(int) and is_class(Request)
    assert not is_class(list[str]) and not is_class(dict[str, int]) and not is_class("Request")
    sig = inspect.signature(lambda tags, page: None)
    sig = sig.replace(
        parameters=[
            sig.parameters["tags"].replace(annotation=Annotated[list[str], Query()]),
            sig.parameters["page"].replace(annotation=int),
        ]
    )
    assert [p.name for p in analyse(sig)] == ["page", "tags"]


def test_string_annotations_that_cannot_be_evaluated_are_still_recognised() -> None:
    def fn(request: Any, item: Any, tasks: Any) -> None: ...

    # What an annotation that names something missing (NameError) leaves behind: strings.
    fn.__annotations__.update(request="Request", item="Unknown", tasks="fastapi.BackgroundTasks")
    assert [p.name for p in analyse(resolved_signature(fn))] == ["item"]


def test_encode_params_sorted_repeated_and_hashed() -> None:
    identity = analyse(resolved_signature(handler))
    values = {
        "item_id": 3,
        "q": None,
        "limit": 10,
        "session": "abc",
        "authorization": None,
        "x_trace": "t",
    }
    digest = hashlib.sha256(b"abc").hexdigest()[:32]
    assert encode_params(identity, values) == f"item_id=3&limit=10&session=#{digest}&x_trace=t"


TAGS = Query([])
IDS = Query(set())


def test_lists_keep_their_order_and_sets_are_sorted() -> None:
    def fn(tags: list[str] = TAGS, ids: set[int] = IDS) -> None: ...

    identity = analyse(resolved_signature(fn))
    text = encode_params(identity, {"tags": ["b", "a"], "ids": {2, 1}})
    assert text == "ids=1&ids=2&tags=b&tags=a"
    assert encode_params(identity, {"tags": [], "ids": set()}) == ""


def test_encode_vary_missing_empty_and_secret_headers() -> None:
    names = ("accept-language", "x-empty", "x-missing", "authorization")
    headers = {"accept-language": "en, fr", "x-empty": "", "authorization": "Bearer t"}
    digest = hashlib.sha256(b"Bearer t").hexdigest()[:32]
    assert encode_vary(names, headers) == (
        f"|accept-language=en,%20fr|x-empty=|x-missing|authorization=#{digest}"
    )


def test_bind_identity_applies_defaults_and_checks_names() -> None:
    identity = analyse(resolved_signature(handler))
    values = bind_identity(identity, {"item_id": 1}, "f")
    assert values["limit"] == 10 and values["q"] is None
    with pytest.raises(ConfigurationError, match="required"):
        bind_identity(identity, {}, "f")
    with pytest.raises(ConfigurationError, match="not request parameters"):
        bind_identity(identity, {"item_id": 1, "db": 2}, "f")


def test_encode_vary_joins_a_header_sent_on_several_lines() -> None:
    from starlette.datastructures import Headers

    one = Headers(raw=[(b"accept-language", b"en"), (b"accept-language", b"fr")])
    two = Headers(raw=[(b"accept-language", b"en")])
    assert encode_vary(("accept-language",), one) == "|accept-language=en,fr"
    assert encode_vary(("accept-language",), two) == "|accept-language=en"
    assert encode_vary(("accept-language",), Headers(raw=[])) == "|accept-language"
