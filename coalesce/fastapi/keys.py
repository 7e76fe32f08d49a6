"""Which inputs of a route identify a request, and the cache keys built from them.

FastAPI passes a handler its path, query, header, cookie and body parameters (the request's
identity) along with things that are not: `Request`, `Response`, `BackgroundTasks`,
`SecurityScopes` and every `Depends(...)` / `Security(...)` value (a database session, the
current user object...). `analyse` sorts them once, at decoration time. The inputs that
the route's dependencies declare at any depth are known from FastAPI's own dependency tree
of the route at its first request (`route_inputs`), and so are the credentials its
`fastapi.security` schemes read.

The default key of a request is its `scheme://host` (RFC 9111 2: a cache keys on the target
URI), the route's path template (with `<name>` for `{name}`, as braces are not allowed in
keys) and the handler's identity parameters in name order, query-string style, then the
`vary` request headers, then the dependencies' inputs:

    https://shop.example/items/<item_id>?item_id=3&q=red|accept-language=en|query.skip=50

* `None` leaves a parameter out; a list repeats it (`tag=a&tag=b`, in order; sets sorted);
  booleans are `true`/`false`; enums give their value; other objects (pydantic models,
  dates...) their JSON with sorted keys. `&`, `=`, `|`, `%`, `?` and whitespace inside
  values are percent-encoded, so distinct requests never share a key.
* Values that are secrets (cookie parameters, `Authorization`-like headers, parameters
  named like a token, key, secret, password, signature or session: `secret_name`) enter
  the key only as `#` + 32 hex digits of their SHA-256: keys show up in logs,
  `coalesce keys` and metrics, tokens must not.
* A missing `vary` header is written without `=`, an empty one with it: they differ.

A `key=` template replaces the default key. It carries the user's identity (so a request
with credentials may be cached under it, for that user only) only when it reads the result
of a dependency that reads a credential (`"feed:{user.id}"` with `user =
Depends(current_user)` and `current_user` taking a security scheme, an `Authorization`
header...), a cookie parameter or a credential header parameter: `template_carries_identity`.

The core then makes the key safe (escapes what is left, bounds its length with a hash).
"""

from __future__ import annotations

import enum
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
from fastapi.dependencies.utils import request_params_to_args
from fastapi.encoders import jsonable_encoder
from fastapi.security import SecurityScopes
from fastapi.security.api_key import APIKeyBase
from fastapi.security.base import SecurityBase
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from starlette.requests import HTTPConnection
from starlette.responses import Response

from coalesce.errors import ConfigurationError
from coalesce.http.keys import (
    SAFE,
    encode_text,
    secret,
    secret_bytes,
    secret_header,
    secret_name,
)
from coalesce.http.keys import encode_vary as encode_vary  # kept importable from here

# Printable ASCII that may stay as it is in a key value; everything else is %-encoded.
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
        sensitive = secret_name(param.name)
        for marker in markers:
            if isinstance(marker, params.Cookie):
                sensitive = True
            elif isinstance(marker, params.Header):
                sensitive = sensitive or secret_header(header_name(param.name, marker))
            elif isinstance(marker, params.Param) and isinstance(marker.alias, str):
                sensitive = sensitive or secret_name(marker.alias)
        found.append(IdentityParam(param.name, sensitive, _default_of(param)))
    return sorted(found, key=lambda p: p.name)


def header_name(name: str, marker: Any) -> str:
    """The request header a `Header()` parameter reads, lower-case."""
    alias = getattr(marker, "alias", None)
    if isinstance(alias, str):
        return alias.lower()
    if getattr(marker, "convert_underscores", True):
        return name.replace("_", "-").lower()
    return name.lower()


def header_params(sig: inspect.Signature) -> dict[str, str]:
    """The handler's `Header()` parameters: parameter name -> request header name."""
    found: dict[str, str] = {}
    for param in sig.parameters.values():
        for marker in _markers(param):
            if isinstance(marker, params.Header):
                found[param.name] = header_name(param.name, marker)
    return found


def encode_value(value: Any) -> str:
    """One parameter value as key text (see the module docstring)."""
    if isinstance(value, str):
        return encode_text(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, enum.Enum):
        return encode_value(value.value)
    data = json.dumps(
        jsonable_encoder(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return quote(data, safe=SAFE)


def _encode_param(label: str, value: Any, sensitive: bool, parts: list[str]) -> None:
    """Append `label=value` (a list: once per item; None: nothing) to `parts`."""
    if value is None:
        return
    if type(value) is int and not sensitive:  # the common case: an id
        parts.append(f"{label}={value}")
        return
    items: Iterable[Any]
    if isinstance(value, (list, tuple)):
        items = value
    elif isinstance(value, (set, frozenset)):
        items = sorted(value, key=encode_value)
    else:
        items = (value,)
    for item in items:
        text = encode_value(item)
        parts.append(f"{label}={secret(text) if sensitive else text}")


def encode_params(identity: Sequence[IdentityParam], values: Mapping[str, Any]) -> str:
    """The query-string part of a key: `a=1&b=x&b=y`, names in order, None left out."""
    parts: list[str] = []
    for param in identity:
        _encode_param(param.name, values.get(param.name), param.sensitive, parts)
    return "&".join(parts)


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


def carries_identity(param: inspect.Parameter, seen: set[int] | None = None) -> bool:
    """Whether a handler parameter's value tells users apart: a cookie parameter, a
    credential header parameter, or the result of a dependency that reads a credential
    (`reads_credential`: the current user...). `Depends(common_parameters)` does not."""
    for marker in _markers(param):
        if isinstance(marker, params.Cookie):
            return True
        if isinstance(marker, params.Header) and secret_header(header_name(param.name, marker)):
            return True
        if isinstance(marker, params.Depends):
            dependency = marker.dependency or base_type(param.annotation)
            return reads_credential(dependency, set() if seen is None else seen)
    return False


def reads_credential(dependency: Any, seen: set[int]) -> bool:
    """Whether a dependency, or one of its own dependencies at any depth, reads a credential:
    it is a `fastapi.security` scheme, or takes a cookie or credential header parameter."""
    if isinstance(dependency, SecurityBase):
        return True
    if id(dependency) in seen or not callable(dependency):
        return False
    seen.add(id(dependency))
    try:
        sig = resolved_signature(dependency)
    except (TypeError, ValueError):  # a callable without a signature FastAPI could read
        return False
    return any(carries_identity(param, seen) for param in sig.parameters.values())


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


# -- the route's whole dependency tree (known per served route, at its first request) ------


@dataclass(frozen=True)
class TreeInput:
    """A request input that a dependency of the route reads and the handler does not."""

    location: str  # "path", "query", "header" or "cookie"
    field: Any  # FastAPI's ModelField: validated by FastAPI's own rules for the key
    label: str  # its name in keys: `query.skip`, `header.x-tenant`
    sensitive: bool  # hashed in keys


@dataclass(frozen=True)
class RouteInputs:
    """What a served route's dependency tree reads beyond the handler's own parameters.

    FastAPI solves the route's `Dependant` (route, router and app dependencies included);
    its parameters are the route's OpenAPI inputs. The handler's own ones are its identity
    parameters (`analyse`); the others enter default keys as `|query.skip=50`, `|body=#...`.
    """

    inputs: tuple[TreeInput, ...]
    body: bool  # a dependency reads the body: the hash of its bytes is in the key
    headers: tuple[str, ...]  # request headers in the default key (handler's and tree's)
    credential_headers: tuple[str, ...]  # headers a security scheme reads, lower-case
    credential_queries: tuple[str, ...]  # query parameters a security scheme reads
    credential_cookies: bool  # a security scheme reads a cookie


NO_INPUTS = RouteInputs((), False, (), (), (), False)


def _field_header(field: Any) -> str:
    return header_name(field.name, field.field_info).lower()


def _field_params(dependant: Any) -> list[tuple[str, Any]]:
    return [
        *[("path", f) for f in dependant.path_params],
        *[("query", f) for f in dependant.query_params],
        *[("header", f) for f in dependant.header_params],
        *[("cookie", f) for f in dependant.cookie_params],
    ]


def route_inputs(dependant: Any) -> RouteInputs:
    """The inputs of a served route's whole dependency tree (`dependant`, FastAPI's), beyond
    the parameters of its handler (the tree's root)."""
    own = {(location, field.alias) for location, field in _field_params(dependant)}
    headers = {_field_header(f) for f in dependant.header_params}
    inputs: list[TreeInput] = []
    body = False
    credential_headers: set[str] = set()
    credential_queries: set[str] = set()
    credential_cookies = False
    stack = list(dependant.dependencies)
    while stack:
        node = stack.pop()
        stack.extend(node.dependencies)
        call = node.call
        if isinstance(call, APIKeyBase):
            where, name = call.model.in_.value, call.model.name
            if where == "header":
                credential_headers.add(name.lower())
            elif where == "query":
                credential_queries.add(name)
            else:
                credential_cookies = True
        elif isinstance(call, SecurityBase):  # HTTP Basic/Bearer/Digest, OAuth2, OpenID
            credential_headers.add("authorization")
        body = body or bool(node.body_params)
        for location, field in _field_params(node):
            if (location, field.alias) in own:
                continue
            own.add((location, field.alias))
            if location == "header":
                name = _field_header(field)
                headers.add(name)
                label, sensitive = f"header.{name}", secret_header(name)
            else:
                label = f"{location}.{field.alias}"
                sensitive = location == "cookie" or secret_name(field.alias)
            inputs.append(TreeInput(location, field, label, sensitive))
    return RouteInputs(
        inputs=tuple(sorted(inputs, key=lambda i: i.label)),
        body=body,
        headers=tuple(sorted(headers)),
        credential_headers=tuple(sorted(credential_headers)),
        credential_queries=tuple(sorted(credential_queries)),
        credential_cookies=credential_cookies,
    )


async def encode_inputs(inputs: RouteInputs, request: Any) -> str:
    """The key part of the tree's inputs for one request: `|query.skip=50|body=#...`.

    Values are validated by FastAPI's own rules (`request_params_to_args`), so `?skip=050`
    and `?skip=50` share an entry as the dependency cannot tell them apart. Raises
    `ValueError` for a value FastAPI would have refused (the request then runs uncached).
    """
    sources = {
        "path": request.path_params,
        "query": request.query_params,
        "header": request.headers,
        "cookie": request.cookies,
    }
    parts: list[str] = []
    for item in inputs.inputs:
        values, errors = request_params_to_args([item.field], sources[item.location])
        if errors:
            raise ValueError(f"{item.label} is not valid")
        found: list[str] = []
        _encode_param(item.label, values.get(item.field.name), item.sensitive, found)
        parts.extend(found)
    if inputs.body:
        parts.append("body=" + secret_bytes(await request.body()))
    return "".join("|" + part for part in parts)
