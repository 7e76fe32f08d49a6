"""Cache keys: templates over the bound arguments, default keys, and making keys safe.

A key is built on every call, so it sits on the hot path. Rather than binding arguments with
`inspect.Signature.bind` (microseconds), each decorated function gets a *key function*
generated once at decoration time with the same parameter list as the function itself:
Python binds positional and keyword arguments and applies defaults natively, so
`f(1)`, `f(x=1)` and `f()` with `x=1` as default all give the same key.

Rules (documented in the README):

* A template is Python format syntax over parameter names: `"user:{user_id}"`,
  `"{user.id}"`, `"{items[0]}"`, `"{day:%Y-%m-%d}"`. Naming an unknown parameter raises
  `KeyTemplateError` when decorating (every mistake in a template is one, never a
  `SyntaxError`); a field that cannot be rendered at call time is a `KeyBuildError`. The
  template's literal text must itself be safe.
* Without a template the key is `<module>.<qualname>:` followed by a canonical encoding of
  every bound argument (`name=<type tag><value>`), which keeps `1` and `"1"` (and `{1}` and
  `frozenset({1})`) apart and escapes the separators inside strings, so distinct arguments
  never give the same key. `self` and `cls` are left out, and so is every parameter named
  in `exclude`.
* A key is the same in every process (Redis shares entries between them): nothing in it
  depends on `PYTHONHASHSEED` (sets are sorted; records are encoded field by field; a repr
  that would list a set of strings is refused), on memory addresses, or on the process's
  int-to-text limit (ints are written in decimal by `int_text` whatever their size, up to
  `MAX_INT_DIGITS`). Aware datetimes and times keep their zone (`@z:Europe/Paris`, or a
  fixed offset and its name): equal instants in two zones may print differently.
* The function's name must identify it. A lambda's does not (`<lambda>`): its default key is
  refused, naming the fix (`key=...`). A function defined inside another (`<locals>`) adds
  its line and its closure's values (`make.<locals>.handler@12[n=i2]`), identical in every
  process running the same code, rather than being refused: factories of cached functions
  and test helpers are common, and their closures usually hold plain values. Closure
  values with no stable text (a lock, a session) are treated like `self`; two live
  functions of one definition differing only by them are refused when decorating (`claim`).
  Detecting collisions per `Cache` instead would miss two `Cache` objects on one Redis, and
  functions created in other processes or after the first one died.
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
import gc
import hashlib
import inspect
import itertools
import linecache
import re
import string
import threading
import uuid
import weakref
import zoneinfo
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
# (`[01]` is index 1 for `str.format` but a syntax error in an f-string: not matched.)
_FSTRING_FIELD = re.compile(
    r"^\{[A-Za-z_]\w*(\.[A-Za-z_]\w*|\[(0|[1-9][0-9]*)\])*(![rsa])?(:[\w .,<>=^+\-%#:/]*)?\}$",
    re.ASCII,
)
_FORMATTER = string.Formatter()


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


def _canon_fields(tag: str, value: Any, names: Iterable[str]) -> str:
    fields = ",".join(f"{name}={canonical(getattr(value, name))}" for name in names)
    return f"{tag}{_canon_type_name(value)}({fields})"


# Ints of more decimal digits than this are refused: `str` refuses more than 4,300 by
# default (`sys.set_int_max_str_digits`), and converting them through `Decimal` instead
# takes quadratic time (40 ms at this bound).
MAX_INT_DIGITS = 50_000
_MAX_INT_BITS = int(MAX_INT_DIGITS * 3.3219)  # log2(10): fewer bits, fewer digits


def int_text(value: int) -> str:
    """The decimal digits of `value` whatever its size and whatever the process's limit on
    int-to-text conversion, so that every process writes the same key."""
    try:
        return str(int(value))
    except ValueError:  # more than sys.get_int_max_str_digits() digits
        if value.bit_length() > _MAX_INT_BITS:
            raise KeyBuildError(
                f"cannot build a cache key from an int of {value.bit_length():,} bits "
                f"(more than {MAX_INT_DIGITS:,} digits); give the decorator a key template "
                "or leave the parameter out with exclude=(...)"
            ) from None
        return str(decimal.Decimal(value))


def _canon_int(value: int) -> str:
    return "i" + int_text(value)


def _tz_text(tz: datetime.tzinfo | None) -> str:
    """Which time zone a datetime or time carries: its offset alone would let
    `Europe/Paris` and a fixed `+01:00` share a key, though a function may print them
    differently (`%Z`, `.tzname()`, the next DST change)."""
    if tz is None:
        return ""
    if type(tz) is zoneinfo.ZoneInfo and tz.key:
        return "@z:" + tz.key
    if type(tz) is datetime.timezone:
        offset = tz.utcoffset(None)
        return f"@o:{int(offset.total_seconds())}:{tz.tzname(None)}"
    text = repr(tz)
    if " at 0x" in text:
        raise KeyBuildError(
            f"cannot build a cache key from a datetime in the time zone {text}: it has no "
            "stable name; use zoneinfo.ZoneInfo or datetime.timezone, or a key template"
        )
    return f"@r:{_canon_type_name(tz)}:{text}"


def _canon_datetime(value: datetime.datetime) -> str:
    fold = "|1" if value.fold else ""
    return "x" + _quote(f"dt({value.isoformat()}{_tz_text(value.tzinfo)}{fold})")


def _canon_time(value: datetime.time) -> str:
    fold = "|1" if value.fold else ""
    return "x" + _quote(f"tm({value.isoformat()}{_tz_text(value.tzinfo)}{fold})")


def _canon_set(tag: str) -> Callable[[Any], str]:
    # sorted by encoding: iteration order follows string hashes, which differ per process
    return lambda v: tag + "(" + ",".join(sorted(canonical(x) for x in v)) + ")"


_CANON_BY_TYPE: dict[type, Callable[[Any], str]] = {
    type(None): lambda v: "N",
    bool: lambda v: "T" if v else "F",
    int: _canon_int,
    float: lambda v: f"f{v!r}",
    str: _canon_str,
    bytes: lambda v: "b" + v.hex(),
    tuple: lambda v: f"t({_canon_items(v)})",
    list: lambda v: f"l({_canon_items(v)})",
    dict: lambda v: (
        "d(" + ",".join(sorted(f"{canonical(k)}={canonical(x)}" for k, x in v.items())) + ")"
    ),
    set: _canon_set("S"),
    frozenset: _canon_set("z"),  # f({1}) and f(frozenset({1})) may behave differently
    datetime.datetime: _canon_datetime,
    datetime.date: lambda v: f"xd({v.isoformat()})",
    datetime.time: _canon_time,
    decimal.Decimal: lambda v: f"xD({v})",
    uuid.UUID: lambda v: f"xU({v})",
}


def _structured_fields(value: Any) -> tuple[str, list[str]] | None:
    """The tag and field names of a record type encoded field by field (its repr would show
    sets in hash order, which differs between processes)."""
    cls = type(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "D", [f.name for f in dataclasses.fields(value)]
    if isinstance(value, tuple) and isinstance(getattr(cls, "_fields", None), tuple):
        return "n", list(cls._fields)  # a namedtuple
    model_fields = getattr(cls, "model_fields", None)  # a pydantic (v2) model
    if isinstance(model_fields, dict) and hasattr(value, "model_dump"):
        names = list(model_fields)
        extra = getattr(value, "__pydantic_extra__", None)
        return "P", names + sorted(extra) if extra else names
    attrs = getattr(cls, "__attrs_attrs__", None)  # an attrs class
    if isinstance(attrs, tuple):
        return "A", [a.name for a in attrs]
    return None


_SCAN_LIMIT = 1000  # objects looked at before trusting a repr


def _hash_ordered(value: Any, budget: list[int], depth: int = 0) -> bool:
    """Whether `value` holds, anywhere `repr` or `str` would show it, a set of two or more
    items that are not all ints: its printed order follows string hashes, which
    `PYTHONHASHSEED` changes in every process."""
    budget[0] -= 1
    if budget[0] < 0 or depth > 30:
        return False
    if isinstance(value, (str, bytes, int, float, type(None))):
        return False
    if isinstance(value, (set, frozenset)):
        if len(value) > 1 and not all(type(x) is int for x in value):
            return True
        return any(_hash_ordered(x, budget, depth + 1) for x in value)
    if isinstance(value, dict):
        return any(
            _hash_ordered(k, budget, depth + 1) or _hash_ordered(v, budget, depth + 1)
            for k, v in value.items()
        )
    if isinstance(value, (tuple, list)):
        return any(_hash_ordered(x, budget, depth + 1) for x in value)
    state = getattr(value, "__dict__", None)
    if isinstance(state, dict):
        return _hash_ordered(state, budget, depth + 1)
    slots = [name for cls in type(value).__mro__ for name in getattr(cls, "__slots__", ())]
    return any(
        _hash_ordered(getattr(value, name, None), budget, depth + 1)
        for name in slots
        if isinstance(name, str)
    )


def hash_ordered(value: Any) -> bool:
    """True when the text of `value` may list a set's items in another order in another
    process (see `_hash_ordered`)."""
    try:
        return _hash_ordered(value, [_SCAN_LIMIT])
    except RecursionError:
        return False


def canonical(value: Any) -> str:
    """Encode one argument so that unequal arguments (or equal ones of other types) differ,
    identically in every process (Redis shares entries between them).

    Supported: None, bool, int, float, str, bytes, tuple, list, dict, set, frozenset,
    datetime types (with their time zone), Decimal, UUID, enums, dataclasses, namedtuples,
    pydantic models, attrs classes, and objects with their own `__repr__` (which is then
    trusted to identify the value, unless it would show a set of strings, whose order
    changes between processes). Anything else raises `KeyBuildError`.
    """
    encode = _CANON_BY_TYPE.get(type(value))
    try:
        if encode is not None:
            return encode(value)
        if isinstance(value, enum.Enum):
            return f"e{_canon_type_name(value)}.{_quote(value.name)}"
        structured = _structured_fields(value)
        if structured is not None:
            return _canon_fields(structured[0], value, structured[1])
    except RecursionError:  # a container holding itself, or nested thousands deep
        raise KeyBuildError(
            f"cannot build a cache key from a {type(value).__qualname__} nested too deep "
            "(or holding itself); give the decorator a key template"
        ) from None
    if getattr(type(value), "__repr__", None) is not object.__repr__:
        text = repr(value)
        if " at 0x" not in text:  # a memory address identifies nothing across calls
            if hash_ordered(value):
                raise KeyBuildError(
                    f"cannot build a cache key from {text[:80]!r}: its text lists a set in "
                    "an order that changes from one process to the next (PYTHONHASHSEED); "
                    "give the decorator a key template naming stable fields, or make it a "
                    "dataclass, a namedtuple or a pydantic model (encoded field by field)"
                )
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


_generated = itertools.count(1)


def generated_filename(what: str, source: str) -> str:
    """A unique file name for generated `source`, registered with `linecache` so that a
    traceback through it (and pdb) shows the generated lines."""
    filename = f"<coalesce {what} #{next(_generated)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    return filename


def _compile(
    fn: Callable[..., Any], body: str, namespace: dict[str, Any], suffix: str
) -> KeyFunction:
    sig = inspect.signature(fn)
    params, defaults = _signature_source(sig)
    namespace = {**namespace, **defaults}
    source = f"def __coalesce_key({params}):\n    {body}\n"
    name = callable_name(fn)
    filename = generated_filename(f"key of {getattr(fn, '__module__', None)}.{name}", source)
    try:
        code = compile(source, filename, "exec")
    except (SyntaxError, ValueError, UnicodeError) as exc:
        # every mistake a template can hold is caught before, so this is one we missed
        raise KeyTemplateError(f"cannot compile the key of {name}: {exc}") from None
    exec(code, namespace)
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


_LAMBDA_REFUSED = (
    "{name} is a lambda: lambdas have no name of their own (every lambda of a module is "
    "'<lambda>'), so two of them would share cache entries; give it a key template "
    "(key='...') or define it with def"
)


def _cell_is_self(value: Any, code: Any) -> bool:
    """A closure cell pointing back at the decorated function itself (recursion)."""
    return getattr(value, "__code__", None) is code or (
        getattr(getattr(value, "__wrapped__", None), "__code__", None) is code
    )


def _identity(fn: Callable[..., Any]) -> tuple[str, list[int]]:
    """The name a default key starts with, and the closure cells it could not include.

    A module-level function is `<module>.<qualname>`. A function defined inside another
    one (`<locals>` in its qualname) is not identified by that name: a factory makes
    several of them from one definition (`make(2)`, `make(3)`), and a function may define
    two functions of one name. Its name adds the line of its definition and the values of
    its closure (`make.<locals>.handler@12[n=i2]`), which are the same in every process
    running the same code. Closure values without a stable text form (a lock, an event, a
    session) cannot be part of a key shared by processes: they are treated like `self`, and
    returned so that `claim` refuses two live functions that differ only by them.
    """
    func = getattr(fn, "__func__", fn)
    qualname = func.__qualname__
    name = f"{func.__module__}.{qualname}"
    if "<lambda>" in qualname:
        raise KeyTemplateError(_LAMBDA_REFUSED.format(name=name))
    if "<locals>" not in qualname:
        return name, []
    code = func.__code__
    name += f"@{code.co_firstlineno}"
    encoded: list[str] = []
    opaque: list[int] = []
    for index, (var, cell) in enumerate(zip(code.co_freevars, func.__closure__ or (), strict=True)):
        try:
            encoded.append(f"{_quote(var)}={canonical(cell.cell_contents)}")
        except Exception:  # an empty cell (yet), or no stable text
            opaque.append(index)
    if encoded:
        text = ",".join(encoded)
        if len(text) > 64:
            text = "#" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        name += f"[{text}]"
    return name, opaque


# The live functions decorated with a default key whose closure holds values that are
# not part of the key, by key prefix, with the indexes of those cells (see `claim`).
# Read and written under `_claims_lock`.
_claims_lock = threading.Lock()
_claims: dict[str, list[tuple[weakref.ref[Any], list[int]]]] = {}
_EMPTY = object()


def _contents(func: Any, index: int) -> Any:
    try:
        return func.__closure__[index].cell_contents
    except ValueError:  # not assigned yet: the function itself, being decorated
        return _EMPTY


def _conflict(func: Any, prefix: str, opaque: list[int]) -> tuple[str, Any] | None:
    """A cell of another live function claimed under `prefix` holding another value."""
    code = func.__code__
    for ref, _ in _claims.get(prefix, []):
        other = ref()
        if other is None or other is func:
            continue
        for index in opaque:
            a, b = _contents(func, index), _contents(other, index)
            if a is b or all(x is _EMPTY or _cell_is_self(x, code) for x in (a, b)):
                continue
            return code.co_freevars[index], b
    return None


def claim(fn: Callable[..., Any], prefix: str, opaque: list[int]) -> None:
    """Refuse a second live function of one definition whose closure differs only by
    values the key cannot show: both would read each other's entries.

    Checked when decorating, within this process (another process running the same code
    builds the same functions); a function that is gone no longer counts.
    """
    if not opaque:
        return
    func = getattr(fn, "__func__", fn)
    with _claims_lock:
        found = _conflict(func, prefix, opaque)
    if found is not None:
        gc.collect()  # the other one may be garbage not collected yet (a cycle)
    with _claims_lock:
        entries = [e for e in _claims.get(prefix, []) if e[0]() is not None]
        _claims[prefix] = entries
        found = None if found is None else _conflict(func, prefix, opaque)
        if found is None:
            entries.append((weakref.ref(func), opaque))
            return
    var, value = found
    raise KeyTemplateError(
        f"{prefix[:-1]} is decorated twice from one definition with two different values "
        f"of {var!r} in its closure (a {type(value).__qualname__}), which has no stable "
        "text form to put in a key: the two would share cache entries. Give it a key "
        f"template naming what tells them apart (key='...'), or pass {var} as a parameter"
    )


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
    name, opaque = _identity(fn)
    prefix = name + ":"
    names_ = [p.name for p in sig.parameters.values() if p.name not in excluded]
    pieces = [
        # ints are the most common argument: encode them inline, the rest by `canonical`
        f"{n!r} + ('=i' + __coalesce_str({n}) "
        f"if __coalesce_type({n}) is __coalesce_int "
        f"else '=' + __coalesce_c({n}))"
        for n in names_
    ]
    expr = "__coalesce_p + " + (" + ',' + ".join(pieces) if pieces else "''")
    # `str` refuses ints of more than 4,300 digits (ValueError): then every int goes
    # through `canonical`, which writes the same digits without that limit
    slow = "__coalesce_p + " + (
        " + ',' + ".join(f"{n!r} + '=' + __coalesce_c({n})" for n in names_) if names_ else "''"
    )
    names = {
        "__coalesce_c": canonical,
        "__coalesce_p": prefix,
        "__coalesce_s": shorten,
        **_BUILTINS,
    }
    body = (
        f"try:\n        return __coalesce_s({expr})\n"
        f"    except ValueError:\n        return __coalesce_s({slow})"
    )
    make = _compile(fn, body, names, ".key")
    claim(fn, prefix, opaque)
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

    def split(field: str) -> tuple[str, str, str | None]:
        _, name, spec, conversion = next(iter(_FORMATTER.parse(field)))
        return name or "", spec or "", conversion

    fields = [(literal, None if field is None else split(field)) for literal, field in parts]

    def render_field(field: tuple[str, str, str | None], values: dict[str, Any]) -> str:
        name, spec, conversion = field
        obj = _FORMATTER.get_field(name, (), values)[0]
        if hash_ordered(obj):
            raise KeyBuildError(
                f"key template {template!r}: {{{name}}} shows a set, whose items print in an "
                "order that changes from one process to the next (PYTHONHASHSEED); pass a "
                "sorted tuple, or use the default key (which sorts sets)"
            )
        if type(obj) is int and not spec and conversion in (None, "s", "r"):
            return int_text(obj)  # of any size: `str` refuses more than 4,300 digits
        text: str = _FORMATTER.format_field(_FORMATTER.convert_field(obj, conversion), spec)
        if " at 0x" in text:  # a default repr: it would never repeat
            raise KeyBuildError(
                f"key template {template!r}: {{{name}}} gives {text[:80]!r}, which holds "
                "a memory address and would never repeat; name a stable attribute "
                "(like {user.id}) or give the class a __str__"
            )
        return text

    def render_escaped(**values: Any) -> str:
        """The key rendered field by field: for values that need escaping, and for every
        failure of the fast path, which becomes a `KeyBuildError` naming the field."""
        out = []
        for literal, field in fields:
            out.append(literal)
            if field is not None:
                try:
                    text = render_field(field, values)
                except KeyBuildError:
                    raise
                except Exception as exc:
                    raise KeyBuildError(
                        f"key template {template!r}: cannot render {{{field[0]}}} of "
                        f"{type(values.get(_field_root(field[0]))).__qualname__!r}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                out.append(escape(text))
        # `quote` never writes "%-": an empty key cannot collide with an escaped one
        return shorten("".join(out)) or "%-"

    if all(_FSTRING_FIELD.match(field) for _, field in parts if field):
        expr = "f" + repr(template)  # same meaning as str.format for these fields, faster
    else:
        expr = f"__coalesce_t.format({kwargs})"
    body = (
        f"try:\n        __coalesce_k = {expr}\n"
        f"    except Exception:\n        return __coalesce_e({kwargs})\n"
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
