"""Which parameters of a route handler identify a request, and the cache keys built from them.

FastAPI passes a handler its path, query, header, cookie and body parameters (the request's
identity) along with things that are not: `Request`, `Response`, `BackgroundTasks`,
`SecurityScopes` and every `Depends(...)` / `Security(...)` value (a database session, the
current user object...). `analyse` sorts them once, at decoration time.

The default key of a request is the route's path template (with `<name>` for `{name}`, as
braces are not allowed in keys) followed by its identity parameters in name order,
query-string style, then the `vary` request headers:

    /items/<item_id>?item_id=3&q=red|accept-language=en

* `None` leaves a parameter out; a list repeats it (`tag=a&tag=b`, in order; sets sorted);
  booleans are `true`/`false`; enums give their value; other objects (pydantic models,
  dates...) their JSON with sorted keys. `&`, `=`, `|`, `%`, `?` and whitespace inside
  values are percent-encoded, so distinct requests never share a key.
* Values that are secrets (cookie parameters, `Authorization`-like headers, in parameters or
  in `vary`) enter the key only as `#` + 32 hex digits of their SHA-256: keys show up in
  logs, `coalesce keys` and metrics, tokens must not.
* A missing `vary` header is written without `=`, an empty one with it: they differ.

A `key=` template replaces the default key. It carries the user's identity (so a request
with `Authorization` or `Cookie` may be cached under it, for that user only) only when it
reads a dependency result (`"feed:{user.id}"` with `user = Depends(current_user)`), a cookie
parameter or a credential header parameter (`Authorization`, `X-API-Key`...):
`template_carries_identity`.

The core then makes the key safe (escapes what is left, bounds its length with a hash).
"""

from __future__ import annotations

import enum
import hashlib
import inspect
import json
import string
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from fastapi import BackgroundTasks, params
from fastapi.encoders import jsonable_encoder
from fastapi.security import SecurityScopes
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from starlette.requests import HTTPConnection
from starlette.responses import Response

from coalesce.errors import ConfigurationError
from coalesce.http import SENSITIVE_HEADERS

# Printable ASCII that may stay as it is in a key value; everything else is %-encoded.
_SAFE = "!\"#$'()*+,-./:;<>@[\\]^_`{}~"
_NOT_IDENTITY = (HTTPConnection, Response, BackgroundTasks, SecurityScopes)
_NOT_IDENTITY_NAMES = frozenset(
    {"Request", "WebSocket", "HTTPConnection", "Response", "BackgroundTasks", "SecurityScopes"}
)
REQUIRED = object()


@dataclass(frozen=True)
class IdentityParam:
    """A handler parameter that is part of the request's identity."""

    name: str
    sensitive: bool  # hashed in keys
    default: Any  # the value FastAPI passes when the request omits it, or REQUIRED


def resolved_signature(fn: Callable[..., Any]) -> inspect.Signature:
    """`fn`'s signature with string annotations evaluated where possible (PEP 563 modules)."""
    try:
        return inspect.signature(fn, eval_str=True)
    except (NameError, TypeError):
        return inspect.signature(fn)


def _markers(param: inspect.Parameter) -> list[Any]:
    """The `Annotated` metadata of a parameter plus its default: where FastAPI looks."""
    found: list[Any] = []
    if typing.get_origin(param.annotation) is typing.Annotated:
        found.extend(typing.get_args(param.annotation)[1:])
    found.append(param.default)
    return found


def base_type(annotation: Any) -> Any:
    if typing.get_origin(annotation) is typing.Annotated:
        return typing.get_args(annotation)[0]
    return annotation


def is_class(annotation: Any) -> bool:
    """A real class (on 3.10, `list[str]` passes `isinstance(..., type)` but is not one)."""
    return isinstance(annotation, type) and not isinstance(annotation, types.GenericAlias)


def _default_of(param: inspect.Parameter) -> Any:
    """The value FastAPI passes for `param` when the request omits it, or `REQUIRED`."""
    default = param.default
    if default is param.empty:
        return REQUIRED
    if isinstance(default, FieldInfo):  # old style: `q: str = Query("x")`
        value = default.get_default(call_default_factory=True)
        return REQUIRED if value is PydanticUndefined else value
    return default


def analyse(sig: inspect.Signature) -> list[IdentityParam]:
    """The identity parameters of a handler's signature, in name order."""
    found: list[IdentityParam] = []
    for param in sig.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        markers = _markers(param)
        if any(isinstance(m, params.Depends) for m in markers):
            continue
        base = base_type(param.annotation)
        if is_class(base) and issubclass(base, _NOT_IDENTITY):
            continue
        if isinstance(base, str) and base.rpartition(".")[2] in _NOT_IDENTITY_NAMES:
            continue  # an annotation that could not be evaluated: go by the class name
        sensitive = False
        for marker in markers:
            if isinstance(marker, params.Cookie):
                sensitive = True
            elif isinstance(marker, params.Header):
                header = (marker.alias or param.name.replace("_", "-")).lower()
                sensitive = sensitive or header in SENSITIVE_HEADERS
        found.append(IdentityParam(param.name, sensitive, _default_of(param)))
    return sorted(found, key=lambda p: p.name)


def secret(text: str) -> str:
    """How a secret value appears in a key: `#` + 32 hex digits of its SHA-256."""
    return "#" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def encode_value(value: Any) -> str:
    """One parameter value as key text (see the module docstring)."""
    if isinstance(value, str):
        if value.isalnum() and value.isascii():  # the common case, and nothing to escape
            return value
        return quote(value, safe=_SAFE)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, enum.Enum):
        return encode_value(value.value)
    data = json.dumps(
        jsonable_encoder(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return quote(data, safe=_SAFE)


def encode_params(identity: Sequence[IdentityParam], values: Mapping[str, Any]) -> str:
    """The query-string part of a key: `a=1&b=x&b=y`, names in order, None left out."""
    parts: list[str] = []
    for param in identity:
        value = values.get(param.name)
        if value is None:
            continue
        if type(value) is int and not param.sensitive:  # the common case: an id
            parts.append(f"{param.name}={value}")
            continue
        items: Iterable[Any]
        if isinstance(value, (list, tuple)):
            items = value
        elif isinstance(value, (set, frozenset)):
            items = sorted(value, key=encode_value)
        else:
            items = (value,)
        for item in items:
            text = encode_value(item)
            parts.append(f"{param.name}={secret(text) if param.sensitive else text}")
    return "&".join(parts)


def encode_vary(names: Sequence[str], headers: Mapping[str, str]) -> str:
    """The header part of a key: `|name=value` per `vary` header (names lower-case).

    A header sent on several lines counts with all its lines, joined by commas (RFC 9110
    5.3), when `headers` can tell them apart (Starlette's `Headers.getlist`).
    """
    getlist = getattr(headers, "getlist", None)
    parts: list[str] = []
    for name in names:
        if getlist is not None:
            lines = getlist(name)
            value = ",".join(lines) if lines else None
        else:
            value = headers.get(name)
        if value is None:
            parts.append(f"|{name}")
        elif name in SENSITIVE_HEADERS:
            parts.append(f"|{name}={secret(value)}")
        else:
            parts.append(f"|{name}={quote(value, safe=_SAFE)}")
    return "".join(parts)


def bind_identity(
    identity: Sequence[IdentityParam], given: Mapping[str, Any], where: str
) -> dict[str, Any]:
    """Identity values for `.key()` / `.invalidate()`: given ones, else FastAPI's defaults."""
    known = {p.name for p in identity}
    unknown = set(given) - known
    if unknown:
        raise ConfigurationError(
            f"{where}: {sorted(unknown)} are not request parameters of the route "
            f"(it has: {', '.join(sorted(known)) or 'none'})"
        )
    values: dict[str, Any] = {}
    for param in identity:
        if param.name in given:
            values[param.name] = given[param.name]
        elif param.default is REQUIRED:
            raise ConfigurationError(f"{where}: the route's parameter {param.name!r} is required")
        else:
            values[param.name] = param.default
    return values


def template_fields(template: str) -> set[str]:
    """The parameter names a key template reads: `user` in `"feed:{user.id}"` (nested
    fields of format specs included)."""
    names: set[str] = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:  # malformed: the core refuses it when decorating
        return names
    for _, field, spec, _ in parsed:
        if field is None:
            continue
        for stop in ".[!:":
            field = field.split(stop, 1)[0]
        names.add(field)
        if spec:
            names |= template_fields(spec)
    return names


def carries_identity(param: inspect.Parameter) -> bool:
    """Whether a handler parameter's value tells users apart: a dependency result (the
    current user...), a cookie parameter, or a credential header parameter."""
    for marker in _markers(param):
        if isinstance(marker, (params.Depends, params.Cookie)):
            return True
        if isinstance(marker, params.Header):
            header = (marker.alias or param.name.replace("_", "-")).lower()
            if header in SENSITIVE_HEADERS:
                return True
    return False


def template_carries_identity(sig: inspect.Signature, template: str) -> bool:
    """Whether a key template reads a parameter that tells users apart (`carries_identity`).

    `"item:{item_id}"` does not: the same key for every user, so a request carrying
    credentials must not be served from it nor stored into it.
    """
    parameters = sig.parameters
    return any(
        name in parameters and carries_identity(parameters[name])
        for name in template_fields(template)
    )
