"""Cache keys: templates over the bound arguments, default keys, and making keys safe.

A key is built on every call, so it sits on the hot path. Rather than binding arguments with
`inspect.Signature.bind` (microseconds), each decorated function gets a *key function*
generated once at decoration time with the same parameter list as the function itself:
Python binds positional and keyword arguments and applies defaults natively, so
`f(1)`, `f(x=1)` and `f()` with `x=1` as default all give the same key.

Rules (documented in the README):

* A template is Python format syntax over parameter names: `"user:{user_id}"`,
  `"{user.id}"`, `"{items[0]}"`, `"{day:%Y-%m-%d}"`. Naming an unknown parameter raises
  `KeyTemplateError` when decorating. The template's literal text must itself be safe.
* Without a template the key is `<module>.<qualname>:` followed by a canonical encoding of
  every bound argument (`name=<type tag><value>`), which keeps `1` and `"1"` apart and escapes
  the separators inside strings, so distinct arguments never give the same key. `self` and
  `cls` are left out, and so is every parameter named in `exclude`.
* Keys are printable, without whitespace, and at most 250 characters. When a substituted
  value contains whitespace, control characters, `%` or braces, the values of that key are
  percent-encoded (UTF-8, as in URLs; printable non-ASCII text alone stays as it is). A
  value whose text holds a memory address (`<Foo object at 0x...>`) raises
  `KeyBuildError`: it would never repeat. A key longer than 250 characters keeps its first
  200 characters and ends with `%#` and 40 hex digits of its SHA-256, so it stays distinct
  and readable.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import hashlib
import inspect
import re
import string
import uuid
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

from coalesce.errors import KeyBuildError, KeyTemplateError

MAX_KEY_LENGTH = 250
_HASHED_PREFIX_LENGTH = 200

# Printable ASCII punctuation that may stay as it is inside a substituted template value.
_TEMPLATE_SAFE = "!\"#$&'()*+,-./:;<=>?@[\\]^_`|~"
# Inside the canonical encoding the structural characters must be escaped too.
_CANONICAL_SAFE = "!\"#$&'*+-./;<>?@\\^_`|~"

KeyFunction = Callable[..., str]

# Builtins the generated code calls, under names no parameter can shadow.
_BUILTINS: dict[str, Any] = {"__coalesce_str": str, "__coalesce_type": type, "__coalesce_int": int}

# A format field that means the same in an f-string: attributes, integer indexes, a
# conversion and a plain format spec.
_FSTRING_FIELD = re.compile(r"^\{[A-Za-z_]\w*(\.[A-Za-z_]\w*|\[\d+\])*(![rsa])?(:[^{}\\'\"]*)?\}$")


def is_safe_key(key: str) -> bool:
    """True when `key` needs no escaping: printable, no whitespace, no `%`, no braces (they
    would cut a Redis Cluster hash tag short), not empty, not too long."""
    return (
        len(key) <= MAX_KEY_LENGTH
        and key.isprintable()
        and " " not in key
        and "%" not in key
        and "{" not in key
        and "}" not in key
        and key != ""
    )


def escape(text: str) -> str:
    """Percent-encode whitespace, control characters, non-ASCII text, braces and `%`."""
    return quote(text, safe=_TEMPLATE_SAFE, errors="surrogatepass")


def shorten(key: str) -> str:
    """Bound a key to `MAX_KEY_LENGTH` characters while keeping it distinct (SHA-256)."""
    if len(key) <= MAX_KEY_LENGTH:
        return key
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    # "%#" cannot occur in a key otherwise (values always escape "%"): no key can pose as
    # the shortened form of another
    return f"{key[:_HASHED_PREFIX_LENGTH]}%#{digest}"


# ---------------------------------------------------------------------------------------
# Canonical encoding of arguments for default keys


def _quote(text: str) -> str:
    return quote(text, safe=_CANONICAL_SAFE, errors="surrogatepass")


def _canon_str(value: str) -> str:
    if value.isascii() and value.isalnum():
        return "s" + value  # nothing to escape: skip `quote`, which is slow
    return "s" + _quote(value)


def _canon_items(values: Iterable[Any]) -> str:
    return ",".join(canonical(v) for v in values)


def _canon_type_name(value: Any) -> str:
    cls = type(value)
    return _quote(f"{cls.__module__}.{cls.__qualname__}")


def _canon_dataclass(value: Any) -> str:
    fields = ",".join(
        f"{f.name}={canonical(getattr(value, f.name))}" for f in dataclasses.fields(value)
    )
    return f"D{_canon_type_name(value)}({fields})"


_CANON_BY_TYPE: dict[type, Callable[[Any], str]] = {
    type(None): lambda v: "N",
    bool: lambda v: "T" if v else "F",
    int: lambda v: f"i{v}",
    float: lambda v: f"f{v!r}",
    str: _canon_str,
    bytes: lambda v: "b" + v.hex(),
    tuple: lambda v: f"t({_canon_items(v)})",
    list: lambda v: f"l({_canon_items(v)})",
    dict: lambda v: (
        "d(" + ",".join(sorted(f"{canonical(k)}={canonical(x)}" for k, x in v.items())) + ")"
    ),
    set: lambda v: "S(" + ",".join(sorted(canonical(x) for x in v)) + ")",
    frozenset: lambda v: "S(" + ",".join(sorted(canonical(x) for x in v)) + ")",
    datetime.datetime: lambda v: "x" + _quote(f"dt({v.isoformat()})"),
    datetime.date: lambda v: f"xd({v.isoformat()})",
    datetime.time: lambda v: "x" + _quote(f"tm({v.isoformat()})"),
    decimal.Decimal: lambda v: f"xD({v})",
    uuid.UUID: lambda v: f"xU({v})",
}


def canonical(value: Any) -> str:
    """Encode one argument so that unequal arguments (or equal ones of other types) differ.

    Supported: None, bool, int, float, str, bytes, tuple, list, dict, set, frozenset,
    datetime types, Decimal, UUID, enums, dataclasses, and objects with their own `__repr__`
    (which is then trusted to identify the value). Anything else raises `KeyBuildError`.
    """
    encode = _CANON_BY_TYPE.get(type(value))
    if encode is not None:
        try:
            return encode(value)
        except RecursionError:  # a container holding itself, or nested thousands deep
            raise KeyBuildError(
                f"cannot build a cache key from a {type(value).__qualname__} nested too deep "
                "(or holding itself); give the decorator a key template"
            ) from None
    if isinstance(value, enum.Enum):
        return f"e{_canon_type_name(value)}.{_quote(value.name)}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _canon_dataclass(value)
    if getattr(type(value), "__repr__", None) is not object.__repr__:
        text = repr(value)
        if " at 0x" not in text:  # a memory address identifies nothing across calls
            return f"r{_canon_type_name(value)}({_quote(text)})"
    raise KeyBuildError(
        f"cannot build a cache key from an argument of type {type(value).__qualname__!r}: "
        "it has no stable text form; give the decorator a key template "
        "(key='...{param.id}...') or leave the parameter out with exclude=(...)"
    )


# ---------------------------------------------------------------------------------------
# Key functions


def _signature_source(sig: inspect.Signature) -> tuple[str, dict[str, Any]]:
    """The parameter list of `sig` as source text, with defaults referenced by name."""
    parts: list[str] = []
    defaults: dict[str, Any] = {}
    seen_kw_only_marker = False
    seen_pos_only = False
    for index, param in enumerate(sig.parameters.values()):
        if param.name.startswith("__coalesce"):
            raise KeyTemplateError(f"parameter name {param.name!r} is reserved by coalesce")
        text = param.name
        if param.kind is param.VAR_POSITIONAL:
            text = "*" + text
            seen_kw_only_marker = True
        elif param.kind is param.VAR_KEYWORD:
            text = "**" + text
        elif param.kind is param.KEYWORD_ONLY and not seen_kw_only_marker:
            parts.append("*")
            seen_kw_only_marker = True
        if param.kind is not param.POSITIONAL_ONLY and seen_pos_only:
            parts.append("/")
            seen_pos_only = False
        if param.kind is param.POSITIONAL_ONLY:
            seen_pos_only = True
        if param.default is not param.empty:
            name = f"__coalesce_d{index}"
            defaults[name] = param.default
            text += "=" + name
        parts.append(text)
    if seen_pos_only:
        parts.append("/")
    return ", ".join(parts), defaults


def signature_source(fn: Callable[..., Any]) -> tuple[str, dict[str, Any], str, str]:
    """`fn`'s parameter list as source, its defaults by name, and the source of a tuple and
    a dict passing every parameter on as it was bound: `(a, *args)` and `{'c': c, **kw}`."""
    sig = inspect.signature(fn)
    params, defaults = _signature_source(sig)
    positional, keywords = [], []
    for param in sig.parameters.values():
        if param.kind is param.VAR_POSITIONAL:
            positional.append("*" + param.name)
        elif param.kind is param.VAR_KEYWORD:
            keywords.append("**" + param.name)
        elif param.kind is param.KEYWORD_ONLY:
            keywords.append(f"{param.name!r}: {param.name}")
        else:
            positional.append(param.name)
    args = "(" + "".join(f"{p}, " for p in positional) + ")"
    return params, defaults, args, "{" + ", ".join(keywords) + "}"


def callable_name(fn: Callable[..., Any]) -> str:
    """`fn`'s qualified name; a `functools.partial` or a callable object has none of its own."""
    name = getattr(fn, "__qualname__", None)
    return name if isinstance(name, str) else type(fn).__qualname__


def _compile(
    fn: Callable[..., Any], body: str, namespace: dict[str, Any], suffix: str
) -> KeyFunction:
    sig = inspect.signature(fn)
    params, defaults = _signature_source(sig)
    namespace = {**namespace, **defaults}
    source = f"def __coalesce_key({params}):\n    {body}\n"
    name = callable_name(fn)
    exec(compile(source, f"<coalesce key of {name}>", "exec"), namespace)
    key_fn: KeyFunction = namespace["__coalesce_key"]
    key_fn.__name__ = name.rpartition(".")[2]
    key_fn.__qualname__ = f"{name}{suffix}"
    return key_fn


def _skipped_first(fn: Callable[..., Any]) -> set[str]:
    params = list(inspect.signature(fn).parameters)
    return {params[0]} if params and params[0] in ("self", "cls") else set()


@dataclasses.dataclass(frozen=True)
class KeyPlan:
    """How a decorated function turns its arguments into a key.

    `make` is the key function (safe keys, as documented above). `expr` is a Python
    expression over the function's parameters giving the *raw* key, which the generated
    hot path of the decorator evaluates inline, with `names` as its globals. Stores only
    ever hold safe keys, so a raw key that finds an entry is the safe key itself, provided
    `hit_guard` holds (a template's raw key may contain `%` that escaping would change).
    `guard_holds` is the same test for the slow path, which must know whether the hot path
    already read the raw key.
    """

    make: KeyFunction
    expr: str
    names: dict[str, Any]
    hit_guard: str
    guard_holds: Callable[[str], bool]


def _default_plan(fn: Callable[..., Any], exclude: Iterable[str] = ()) -> KeyPlan:
    """`<module>.<qualname>:` plus the canonical encoding of the arguments."""
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)):
        raise KeyTemplateError(
            f"{fn!r} is not a plain function (a functools.partial or a callable object): "
            "its name does not tell its bound arguments or state apart, so it needs a key "
            "template: key='...'"
        )
    sig = inspect.signature(fn)
    excluded = set(exclude)
    unknown = excluded - set(sig.parameters)
    if unknown:
        raise KeyTemplateError(
            f"exclude names {sorted(unknown)} which {callable_name(fn)}() has no parameter for"
        )
    excluded |= _skipped_first(fn)
    prefix = f"{fn.__module__}.{fn.__qualname__}:"
    pieces = [
        # ints are the most common argument: encode them inline, the rest by `canonical`
        f"{param.name!r} + ('=i' + __coalesce_str({param.name}) "
        f"if __coalesce_type({param.name}) is __coalesce_int "
        f"else '=' + __coalesce_c({param.name}))"
        for param in sig.parameters.values()
        if param.name not in excluded
    ]
    expr = "__coalesce_p + " + (" + ',' + ".join(pieces) if pieces else "''")
    names = {
        "__coalesce_c": canonical,
        "__coalesce_p": prefix,
        "__coalesce_s": shorten,
        **_BUILTINS,
    }
    make = _compile(fn, f"return __coalesce_s({expr})", names, ".key")
    return KeyPlan(make, expr, names, "True", lambda raw_key: True)


def _field_root(field: str) -> str:
    """The parameter a format field starts from: `user` in `user.id!r:>5`."""
    for stop in ".[!:":
        field = field.split(stop, 1)[0]
    return field


def _parse_template(template: str, fn: Callable[..., Any]) -> list[tuple[str, str | None]]:
    """Split a template into (literal, field) pairs, checking every field's parameter."""
    params = set(inspect.signature(fn).parameters)
    parts: list[tuple[str, str | None]] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise KeyTemplateError(f"key template {template!r} is not valid: {exc}") from None
    for literal, field, spec, conversion in parsed:
        if literal and len(literal) > MAX_KEY_LENGTH:
            raise KeyTemplateError(
                f"key template {template[:60]!r}...: its literal text is longer than "
                f"{MAX_KEY_LENGTH} characters, the longest key"
            )
        if literal and not is_safe_key(literal):
            raise KeyTemplateError(
                f"key template {template!r}: its literal text must be printable, without "
                "whitespace, '%' or braces"
            )
        if conversion not in (None, "r", "s", "a"):
            raise KeyTemplateError(
                f"key template {template!r}: !{conversion} is not a conversion (use !r, !s or !a)"
            )
        if spec and ("{" in spec or "}" in spec):
            raise KeyTemplateError(
                f"key template {template!r}: a format spec cannot hold another field "
                f"({spec!r}); keys are built from the arguments only"
            )
        if field is None:
            parts.append((literal, None))
            continue
        root = _field_root(field)
        if root == "" or root.isdigit():
            raise KeyTemplateError(
                f"key template {template!r}: fields must name parameters, like {{user_id}}"
            )
        if root not in params:
            raise KeyTemplateError(
                f"key template {template!r} names {{{root}}}, but {callable_name(fn)}() has "
                f"no such parameter (it has: {', '.join(sorted(params)) or 'none'})"
            )
        whole = "{" + field + (f"!{conversion}" if conversion else "")
        whole += (f":{spec}" if spec else "") + "}"
        parts.append((literal, whole))
    return parts


def _template_plan(fn: Callable[..., Any], template: str) -> KeyPlan:
    """Render `template` over the bound arguments, then make the result safe.

    The fast path formats once and checks the result; only a key that is not safe as it is
    is rendered again field by field with each value percent-encoded.
    """
    parts = _parse_template(template, fn)
    roots = sorted({_field_root(field[1:-1]) for _, field in parts if field})
    kwargs = ", ".join(f"{r}={r}" for r in roots)

    def render_escaped(**values: Any) -> str:
        out = []
        for literal, field in parts:
            out.append(literal)
            if field is not None:
                text = field.format(**values)
                if " at 0x" in text:  # only reached with a space: default reprs have them
                    raise KeyBuildError(
                        f"key template {template!r}: {field} gives {text[:80]!r}, which holds "
                        "a memory address and would never repeat; name a stable attribute "
                        "(like {user.id}) or give the class a __str__"
                    )
                out.append(escape(text))
        # `quote` never writes "%-": an empty key cannot collide with an escaped one
        return shorten("".join(out)) or "%-"

    if all(_FSTRING_FIELD.match(field) for _, field in parts if field):
        expr = "f" + repr(template)  # same meaning as str.format for these fields, faster
    else:
        expr = f"__coalesce_t.format({kwargs})"
    body = (
        f"__coalesce_k = {expr}\n"
        f"    if __coalesce_ok(__coalesce_k):\n"
        "        return __coalesce_k\n"
        f"    return __coalesce_e({kwargs})"
    )
    names = {"__coalesce_t": template, "__coalesce_e": render_escaped, "__coalesce_ok": is_safe_key}
    make = _compile(fn, body, names, ".key")
    return KeyPlan(make, expr, names, "'%' not in __coalesce_k", lambda raw_key: "%" not in raw_key)


def template_key_function(fn: Callable[..., Any], template: str) -> KeyFunction:
    """Key function rendering `template` over the bound arguments (see `_template_plan`)."""
    return _template_plan(fn, template).make


def plan_key(fn: Callable[..., Any], template: str | None, exclude: Iterable[str] = ()) -> KeyPlan:
    """The key plan for `fn`: from `template` if given, else the default key."""
    if template is None:
        return _default_plan(fn, exclude)
    if not isinstance(template, str):
        raise KeyTemplateError(f"key must be a template string, not {type(template).__name__}")
    if exclude:
        raise KeyTemplateError("exclude=... only applies to default keys, not to a template")
    return _template_plan(fn, template)


def key_function(
    fn: Callable[..., Any], template: str | None, exclude: Iterable[str] = ()
) -> KeyFunction:
    """The key function for `fn`: from `template` if given, else the default key."""
    return plan_key(fn, template, exclude).make
