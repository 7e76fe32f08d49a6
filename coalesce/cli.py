"""The `coalesce` command line: look at and clear cache entries from a shell, and run the demo.

Everything here goes through the public API (`Cache`, its methods, `coalesce.fastapi`'s
admin router over HTTP), so the command line sees exactly what an application sees.

Where the entries live decides how the command line reaches them:

* Redis (`--url redis://...` or `COALESCE_URL`, with `--namespace` or `COALESCE_NAMESPACE`):
  directly. `invalidate` deletes through
  `Cache.invalidate`, so the store broadcasts the deletion and near caches drop it too.
* memory: the entries live inside the application's process, out of reach of another
  process. `invalidate` and `stats` then go through the application itself
  (`--app http://127.0.0.1:8000 --token ...`, served by `coalesce.fastapi.admin_router`).

Errors the user can fix (an unknown URL scheme, an unparsable URL, an unreachable host, a
wrong password, an empty key, a tag nothing carries, an entry written with another
serializer) print one line on stderr and exit with code 2, never a traceback: an operator
reading it during an incident needs the problem, not our stack. `get` of a missing key exits
with 1, so scripts can tell "absent" from "broken"; an unexpected exception (a bug of ours)
exits with 3 (`COALESCE_DEBUG=1` shows its traceback).

A KEY or TAG is given as the application's author writes it (`user:a b`) or as it is stored
(`user:a%20b`, as `coalesce keys` lists it): one that is not safe as it is
(`coalesce.keys.is_safe_key`) is looked up in the escaped form the core stores
(`coalesce.keys.escape`), and the output says which form was used (`key_forms`).

`keys` and `stats` bound their work, not only their results: at most `--max-scans` SCAN
calls of `SCAN_COUNT` keys each, then they say that the listing was cut short.

The commands and the argument parser live here; how the output is worded in `cli_output`,
how Redis and an application are reached (and their failures named) in `cli_remote`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NoReturn
from urllib.parse import unquote

from coalesce import CoalesceError, __version__
from coalesce.cli_output import (
    LARGE_VALUE,
    PREVIEW_CHARS,
    human_ms,
    human_seconds,
    one_line,
    preview,
    render_routes,
)
from coalesce.cli_remote import (
    EXIT_BUG,
    EXIT_MISSING,
    EXIT_OK,
    EXIT_USAGE,
    SCAN_COUNT,
    CliError,
    RedisTarget,
    app_failure,
    app_token,
    app_url,
    check_namespace,
    check_scheme,
    describe_redis_error,
    hide_credentials,
    http_call,
    open_target,
    parse_url,
    redis_cause,
    resolve_url,
    strict_entry,
)
from coalesce.keys import escape, is_safe_key
from coalesce.urls import redact

DEFAULT_NAMESPACE = "coalesce"
DEFAULT_TIMEOUT = 5.0
DEFAULT_ADMIN_PREFIX = "/coalesce"
DEFAULT_METRICS_PATH = "/coalesce/metrics"
DEFAULT_MAX_SCANS = 1000  # SCAN calls before `keys` / `stats` stop: a bound on the work
MAX_TIMEOUT = 3600.0  # seconds: more is a typo (or inf), and would look like a hang
MAX_COUNT = 10_000_000  # --limit, --max-chars: more keys or characters than a shell can use
MAX_SCANS = 1_000_000  # --max-scans: a billion keys looked at


# ---------------------------------------------------------------------------------------
# key forms


def _validate_key(key: str, what: str = "key") -> str:
    if not key or not key.strip():
        raise CliError(f"empty {what}: give the {what} without the namespace, e.g. user:42")
    return key


def key_forms(key: str) -> list[str]:
    """The stored names a KEY given on the command line may mean, the likelier first.

    The core stores a key as it is when it is safe (`coalesce.keys.is_safe_key`), else
    percent-encoded (`coalesce.keys.escape`): `user:a b` is stored as `user:a%20b`. A key
    that is already in that encoded form (copied from `coalesce keys`, say) is taken as it
    is first, then encoded once more (the raw value may contain `%20` itself).
    """
    if is_safe_key(key):
        return [key]
    escaped = escape(key)
    if escape(unquote(key, errors="surrogatepass")) == key:  # only %XX: already encoded
        return [key, escaped]
    return [escaped]


def form_note(given: str, used: str, forms: list[str], found: bool) -> str:
    """How a KEY given on the command line was looked up, when not only as it was typed."""
    if forms == [given]:
        return ""
    if used != given:
        return f"  (the escaped form of {given!r}, as coalesce stores it)"
    if found:
        return "  (as given: already in the escaped form coalesce stores)"
    return f"  (as given, and as its escaped form {forms[-1]}: neither exists)"


def missing_tag(tag: str, forms: list[str]) -> str:
    """A tag no entry carries, with the forms it was looked up as."""
    if forms == [tag]:
        return repr(tag)
    if forms[0] != tag:
        return f"{tag!r} (looked up as {forms[0]!r})"
    return f"{tag!r} (nor {forms[-1]!r})"


def _check_length(key: str, what: str = "key") -> str:
    if len(key_forms(key)[0]) > 250:
        raise CliError(
            f"{what} {key[:40]!r}... is longer than 250 characters once escaped: coalesce "
            "stores such keys shortened (their first 200 characters, then %# and a SHA-256); "
            "give that stored form, as `coalesce keys` lists it"
        )
    return key


def _check_pattern(pattern: str) -> str:
    """`pattern` if it is a complete Redis glob, else a `CliError` saying how to write it.

    The namespace layout wraps keys in braces (`ns:{user:42}`), so the glob is matched as
    `ns:{PATTERN}`: a `[` never closed, or a trailing lone backslash, would swallow the closing
    brace and match other keys than the user typed (`user:[` matched the key `user:`).
    Refused rather than escaped: `[abc]` is a character class, so a literal `[` is written
    `\\[` in every pattern, and a forgotten `]` (`user:[0-9*`) gets said, not searched for.
    """
    if not pattern:
        raise CliError("empty pattern: use * for every key of the namespace")
    index, end = 0, len(pattern)
    while index < end:
        char = pattern[index]
        if char == "\\":
            if index + 1 == end:
                raise CliError(
                    f"invalid pattern {pattern!r}: it ends with a lone backslash, which "
                    "escapes nothing; write \\\\ for a literal backslash"
                )
            index += 2
        elif char == "[":
            close = index + 1
            while close < end and pattern[close] != "]":
                close += 2 if pattern[close] == "\\" else 1
            if close >= end:
                raise CliError(
                    f"invalid pattern {pattern!r}: '[' starts a character class ([abc] "
                    "matches a, b or c) that no ']' closes; write \\[ for a literal '[', "
                    "e.g. 'user:\\[*'"
                )
            index = close + 1
        else:
            index += 1
    return pattern


# ---------------------------------------------------------------------------------------
# commands


def cmd_invalidate(args: argparse.Namespace) -> int:
    keys: list[str] = [_check_length(_validate_key(key)) for key in args.keys]
    tags: list[str] = [_check_length(_validate_key(tag, "tag"), "tag") for tag in args.tag or []]
    if not keys and not tags:
        raise CliError("nothing to invalidate: give one or more KEYs or --tag TAG")
    if args.app:
        return _invalidate_over_http(args, keys, tags)
    target = open_target(args, "invalidate")
    try:
        missing_tags: list[str] = []
        for key in keys:
            forms = key_forms(key)
            for used in forms:  # the first form that existed, else the likeliest one
                removed = target.guard(functools.partial(target.cache.invalidate, used))
                if removed:
                    break
            used = used if removed else forms[0]
            note = form_note(key, used, forms, bool(removed))
            print(f"removed        {used}{note}" if removed else f"did not exist  {used}{note}")
        for tag in tags:
            forms = key_forms(tag)
            for used in forms:
                count = int(target.guard(functools.partial(target.cache.invalidate_tag, used)))
                if count:
                    break
            used = used if count else forms[0]
            note = form_note(tag, used, forms, bool(count))
            if count:
                plural = "entry" if count == 1 else "entries"
                print(f"removed        {count:,} {plural} tagged {used}{note}")
            else:
                missing_tags.append(missing_tag(tag, forms))
        if missing_tags:
            raise CliError(f"no such tag: no entry carries {', '.join(missing_tags)}")
    finally:
        target.close()
    return EXIT_OK


def _invalidate_over_http(args: argparse.Namespace, keys: list[str], tags: list[str]) -> int:
    """`invalidate` through the app's admin router (`coalesce.fastapi.admin` documents it).

    `POST {prefix}/invalidate` with `{"keys": [...]}` answers `{"removed": {key: bool}}`;
    with `{"tag": "..."}` it answers `{"tag": ..., "removed": count}`.
    """
    token = app_token(args)
    url = app_url(args, args.admin_prefix.rstrip("/") + "/invalidate")

    def post(body: dict[str, Any]) -> Any:
        status, answer = http_call("POST", url, token=token, body=body, timeout=args.timeout)
        if not 200 <= status < 300:
            raise app_failure(status, answer, url)
        removed = answer.get("removed") if isinstance(answer, dict) else None
        if isinstance(removed, dict if "keys" in body else int):
            return removed
        raise CliError(
            f"unexpected answer from {redact(url)}: {one_line(json.dumps(answer))[:200]}"
        )

    def post_keys(names: list[str]) -> dict[str, Any]:
        """`{"keys": names}` in requests the admin router accepts (at most 1,000 keys and
        64 KiB each: `coalesce.fastapi.admin`), their answers merged."""
        removed: dict[str, Any] = {}
        batch: list[str] = []
        size = 0
        for name in names:
            length = len(json.dumps(name)) + 2
            if batch and (len(batch) >= 500 or size + length > 32 * 1024):
                removed.update(post({"keys": batch}))
                batch, size = [], 0
            batch.append(name)
            size += length
        if batch:
            removed.update(post({"keys": batch}))
        return removed

    if keys:  # each key's likeliest stored form; the other one for those that did not exist
        forms = {key: key_forms(key) for key in keys}
        removed = post_keys(sorted({f[0] for f in forms.values()}))
        used = {key: f[0] for key, f in forms.items()}
        retry = {key: f[1] for key, f in forms.items() if len(f) > 1 and not removed.get(f[0])}
        if retry:
            again = post_keys(sorted(set(retry.values())))
            for key, other in retry.items():
                if again.get(other):
                    used[key], removed[other] = other, True
        for key in keys:
            form = used[key]
            done = "removed       " if removed.get(form) else "did not exist "
            note = form_note(key, form, forms[key], bool(removed.get(form)))
            print(f"{done} {form}{note}")
    missing_tags: list[str] = []
    for tag in tags:
        tag_forms = key_forms(tag)
        for form in tag_forms:
            count = int(post({"tag": form}))
            if count:
                break
        if count:
            plural = "entry" if count == 1 else "entries"
            note = form_note(tag, form, tag_forms, True)
            print(f"removed        {count:,} {plural} tagged {form}{note}")
        else:
            missing_tags.append(missing_tag(tag, tag_forms))
    if missing_tags:
        raise CliError(f"no such tag: no entry carries {', '.join(missing_tags)}")
    return EXIT_OK


def cmd_get(args: argparse.Namespace) -> int:
    given = _check_length(_validate_key(args.key))
    if args.app:
        raise CliError(
            "`coalesce get` reads Redis directly (--url); over --app only "
            "invalidate and stats are available"
        )
    target = open_target(args, "get")
    try:
        cache = target.cache
        forms = key_forms(given)
        unreadable: CliError | None = None
        for key in forms:
            try:
                entry = target.guard(functools.partial(strict_entry, target, key))
            except CliError as exc:  # unreadable under this form: maybe readable under another
                entry, unreadable = None, unreadable or exc
            if entry is not None:
                break
        if entry is None:
            if unreadable is not None:
                raise unreadable
            key = forms[0]
            shown = repr(key) if key == given else f"{key!r} (the escaped form of {given!r})"
            print(f"no entry for key {shown} in namespace {args.namespace!r}", file=sys.stderr)
            return EXIT_MISSING
        now = time.time()
        thawed = entry.value
        encoded = -1
        try:
            encoded = len(cache.serializer.dumps(thawed))
            size = f"{encoded:,} bytes ({cache.serializer.name})"
        except Exception as exc:  # an odd value must not hide the rest of the entry
            size = f"unknown ({one_line(str(exc))})"
        remaining = entry.remaining(now)
        if remaining == math.inf:  # a ttl of inf: no expiry, as with None
            remaining = None
        if remaining is None:
            status = "fresh, never expires by time"
        elif remaining > 0:
            status = f"fresh, expires in {human_seconds(remaining)}"
        else:
            status = f"stale, served while refreshing for {human_seconds(entry.stale_until - now)}"
        ttl = "none" if entry.ttl is None or entry.ttl == math.inf else human_seconds(entry.ttl)
        if entry.stale_ttl:
            ttl += f" (+ {human_seconds(entry.stale_ttl)} stale)"
        tags = entry.tags
        print(f"key        {key}{form_note(given, key, forms, True)}")
        print(f"status     {status}")
        print(f"age        {human_seconds(entry.age(now))}")
        print(f"ttl        {ttl}")
        print(f"remaining  {'no expiry' if remaining is None else human_seconds(remaining)}")
        print(f"size       {size}")
        print(f"computed   in {human_ms(entry.compute_time)}")
        print(f"tags       {', '.join(tags) if tags else '(none)'}")
        if entry.error:
            module, qualname, message = list(thawed)
            print(f"error      cached failure {module}.{qualname}: {preview(message)}")
        else:
            print(
                f"type       {type(thawed).__module__}.{type(thawed).__qualname__}".replace(
                    "builtins.", ""
                )
            )
            large = encoded < 0 or encoded > LARGE_VALUE
            text = preview(thawed, args.max_chars, large=large).replace("\n", "\n" + " " * 11)
            print(f"value      {text}")
    finally:
        target.close()
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    if args.app:
        raise CliError(
            "`coalesce keys` scans Redis directly (--url); over --app only "
            "invalidate and stats are available"
        )
    pattern = _check_pattern(args.pattern)
    target = open_target(args, "keys")
    try:
        found, complete = target.keys(pattern, args.limit, args.max_scans)
    finally:
        target.close()
    for key in sorted(found):
        print(key)
    if len(found) >= args.limit:
        print(
            f"(stopped at --limit {args.limit:,}: there may be more; narrow the pattern or "
            "raise --limit)",
            file=sys.stderr,
        )
    elif not complete:
        print(
            f"(listing cut short: {len(found):,} match{'' if len(found) == 1 else 'es'} among "
            f"the first ~{args.max_scans * SCAN_COUNT:,} keys of the database, which has more; "
            "give a narrower pattern with a literal start, e.g. user:42*, or raise "
            f"--max-scans, now {args.max_scans:,})",
            file=sys.stderr,
        )
    elif not found:
        print(f"no keys match {pattern!r} in namespace {args.namespace!r}", file=sys.stderr)
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    if args.app:
        return _stats_over_http(args)
    target = open_target(args, "stats")
    try:
        keys, complete = target.keys("*", args.limit, args.max_scans)
        info = target.info()
    finally:
        target.close()
    counted = f"{len(keys):,} key{'' if len(keys) == 1 else 's'}"
    if len(keys) >= args.limit:
        counted += f", counting stopped at --limit {args.limit:,}"
    elif not complete:
        counted = f"at least {counted}, counting stopped at --max-scans {args.max_scans:,}"
    hits, misses = int(info.get("keyspace_hits", 0)), int(info.get("keyspace_misses", 0))
    ratio = f"{hits / (hits + misses):.1%}" if hits + misses else "n/a"
    maxmemory = int(info.get("maxmemory", 0))
    print(f"url        {redact(target.url)}")
    print(f"namespace  {args.namespace} ({counted})")
    print(
        f"server     Redis {info.get('redis_version', '?')} ({info.get('redis_mode', '?')}), "
        f"up {human_seconds(float(info.get('uptime_in_seconds', 0)))}"
    )
    print(f"clients    {info.get('connected_clients', '?')} connected")
    print(
        f"memory     {info.get('used_memory_human', '?')} used, maxmemory "
        f"{info.get('maxmemory_human', '?') if maxmemory else 'unlimited'}, policy "
        f"{info.get('maxmemory_policy', '?')}"
    )
    print(
        f"keyspace   {hits:,} hits, {misses:,} misses ({ratio}), "
        f"{int(info.get('expired_keys', 0)):,} expired, {int(info.get('evicted_keys', 0)):,} "
        "evicted (whole server)"
    )
    print(f"load       {info.get('instantaneous_ops_per_sec', '?')} ops/s")
    return EXIT_OK


def _stats_over_http(args: argparse.Namespace) -> int:
    url = app_url(args, args.metrics_path)
    token = args.token or os.environ.get("COALESCE_TOKEN")
    status, answer = http_call("GET", url, token=token, body=None, timeout=args.timeout)
    if status == 404:
        raise CliError(
            f"no coalesce metrics at {redact(url)} (HTTP 404): mount "
            "coalesce.fastapi.metrics_router() or pass --metrics-path"
        )
    if not 200 <= status < 300:
        raise app_failure(status, answer, url)
    routes = answer.get("routes") if isinstance(answer, dict) else None
    if args.json or not isinstance(routes, dict):
        print(answer.rstrip() if isinstance(answer, str) else json.dumps(answer, indent=2))
        return EXIT_OK
    idle = f"no cached routes have served requests yet ({redact(url)})"
    print(render_routes(routes) if routes else idle)
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    if args.app:
        raise CliError(
            "`coalesce check` tests a Redis store (--url); for an application use "
            "`coalesce stats --app URL`"
        )
    url = resolve_url(args)
    check_scheme(url, "check")
    check_namespace(args.namespace)
    target = RedisTarget(url, args.namespace, args.timeout)
    try:
        connect = target.ping()
        ping = target.ping()
        server = target.info("server")
        cache = target.cache
        probe_id = uuid.uuid4().hex
        probe_key = f"coalesce-check:{probe_id}"
        expected = {"probe": probe_id}

        def make_probe() -> dict[str, str]:
            return dict(expected)

        probe: Callable[[], dict[str, str]] = cache.cached(ttl=30, key=probe_key)(make_probe)

        write = _timed(target, probe)
        entry, read = _timed_value(target, lambda: cache.get_entry(probe_key))
        if entry is None:
            raise CliError(f"the probe key {probe_key!r} was written but cannot be read back")
        value = entry.value
        if value != expected:
            raise CliError(f"the probe key read back {value!r}, expected {expected!r}")
        removed, delete = _timed_value(target, lambda: cache.invalidate(probe_key))
        if not removed or target.guard(lambda: cache.get_entry(probe_key)) is not None:
            raise CliError(f"the probe key {probe_key!r} could not be deleted")
    finally:
        target.close()
    print(f"OK         {redact(url)}, namespace {args.namespace!r}")
    print(
        f"server     Redis {server.get('redis_version', '?')} ({server.get('redis_mode', '?')})"
        f", up {human_seconds(float(server.get('uptime_in_seconds', 0)))}"
    )
    print(f"connect    {human_ms(connect)}  (first PING, with the connection handshake)")
    print(f"ping       {human_ms(ping)}")
    print(f"write      {human_ms(write)}  (probe key {cache.prefix}coalesce-check:...)")
    print(f"read       {human_ms(read)}")
    print(f"delete     {human_ms(delete)}")
    return EXIT_OK


def _timed(target: RedisTarget, call: Callable[[], Any]) -> float:
    return _timed_value(target, call)[1]


def _timed_value(target: RedisTarget, call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = target.guard(call)
    return result, time.perf_counter() - started


def cmd_demo(args: argparse.Namespace) -> int:
    from coalesce.demo import run_demo

    parse_url(resolve_url(args))  # a malformed URL: one line, exit 2, before any load
    check_namespace(args.namespace)
    return run_demo(args)


# ---------------------------------------------------------------------------------------
# the parser


def _seconds(high: float) -> Callable[[str], float]:
    """An argparse `type`: a finite number of seconds above 0 and at most `high`."""

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0 < value <= high:  # False for nan; inf and 1e300 are above `high`
            raise argparse.ArgumentTypeError(
                f"must be a number of seconds above 0 and at most {high:,g}, not {text!r}"
            )
        return value

    return seconds


def _count(high: int) -> Callable[[str], int]:
    """An argparse `type`: a whole number from 1 to `high`."""

    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid int value: {text!r} (a whole number from 1 to {high:,})"
            ) from None
        if not 1 <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be a whole number from 1 to {high:,}, not {text!r}"
            )
        return value

    return count


def _connection_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """`--url` and friends, accepted both before and after the command name.

    On the sub-commands the defaults are SUPPRESS, so an option given before the command is
    not overwritten by the sub-command's default.
    """

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("where the cache is")
    group.add_argument(
        "--url",
        default=default(None),
        help="cache URL: redis://[:PASSWORD@]HOST:PORT/DB, rediss://, unix:// "
        "(default: $COALESCE_URL, else memory://)",
    )
    group.add_argument(
        "--namespace",
        default=default(os.environ.get("COALESCE_NAMESPACE") or DEFAULT_NAMESPACE),
        help="the cache's namespace, the prefix of every key "
        f"(default: $COALESCE_NAMESPACE, else {DEFAULT_NAMESPACE})",
    )
    group.add_argument(
        "--app",
        default=default(None),
        metavar="URL",
        help="reach an application's in-memory cache through its coalesce admin router, "
        "e.g. http://127.0.0.1:8000",
    )
    group.add_argument(
        "--token",
        default=default(None),
        help="bearer token of the app's admin router (default: $COALESCE_TOKEN)",
    )
    group.add_argument(
        "--admin-prefix",
        default=default(DEFAULT_ADMIN_PREFIX),
        help=f"path prefix of the app's admin router (default: {DEFAULT_ADMIN_PREFIX})",
    )
    group.add_argument(
        "--metrics-path",
        default=default(DEFAULT_METRICS_PATH),
        help=f"path of the app's metrics endpoint (default: {DEFAULT_METRICS_PATH})",
    )
    group.add_argument(
        "--timeout",
        type=_seconds(MAX_TIMEOUT),
        default=default(DEFAULT_TIMEOUT),
        help=f"seconds to wait for Redis or the app (default: {DEFAULT_TIMEOUT:g})",
    )


def _max_scans_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-scans",
        type=_count(MAX_SCANS),
        default=DEFAULT_MAX_SCANS,
        metavar="N",
        help=f"stop after N SCAN calls of {SCAN_COUNT:,} keys each, matching or not "
        f"(default: {DEFAULT_MAX_SCANS:,}): a pattern that matches little cannot walk a "
        "huge database",
    )


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line too, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="coalesce",
        description="Inspect and clear coalesce cache entries, and run the demo.",
        epilog="Start with `coalesce demo`. Exit codes: 0 done, 1 no such key (get), "
        "2 bad input or unreachable store, 3 a bug of ours (COALESCE_DEBUG=1 for a traceback).",
    )
    parser.add_argument("--version", action="version", version=f"coalesce {__version__}")
    _connection_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str, run: Callable[[argparse.Namespace], int]) -> Any:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _connection_options(sub, top=False)
        sub.set_defaults(run=run)
        return sub

    sub = command(
        "invalidate",
        "delete entries by key or tag (near caches of every process drop them too)",
        cmd_invalidate,
    )
    sub.add_argument("keys", nargs="*", metavar="KEY", help="key without the namespace")
    sub.add_argument("--tag", action="append", metavar="TAG", help="delete every entry tagged TAG")

    sub = command("get", "show one entry: age, TTL, size, tags and a preview", cmd_get)
    sub.add_argument("key", metavar="KEY", help="key without the namespace")
    sub.add_argument(
        "--max-chars",
        type=_count(MAX_COUNT),
        default=PREVIEW_CHARS,
        help="length of the value preview",
    )

    sub = command("keys", "list keys of the namespace (bounded SCAN)", cmd_keys)
    sub.add_argument("pattern", nargs="?", default="*", metavar="PATTERN", help="glob, e.g. user:*")
    sub.add_argument(
        "--limit", type=_count(MAX_COUNT), default=1000, help="stop after this many keys"
    )
    _max_scans_option(sub)

    sub = command(
        "stats", "keys in the namespace and Redis server facts, or the app's metrics", cmd_stats
    )
    sub.add_argument(
        "--limit", type=_count(MAX_COUNT), default=10_000, help="stop counting keys here"
    )
    _max_scans_option(sub)
    sub.add_argument("--json", action="store_true", help="with --app: the metrics as JSON")

    command("check", "write, read and delete a probe key; report latency and version", cmd_check)

    sub = command("demo", "run a load against a slow endpoint, unprotected then @cached", cmd_demo)
    from coalesce.demo import add_demo_arguments

    add_demo_arguments(sub)
    return parser


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    print(f"coalesce: error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    urls = (
        getattr(args, "url", None),
        os.environ.get("COALESCE_URL"),
        getattr(args, "app", None),
    )
    try:
        code: int = args.run(args)
        return code
    except CliError as exc:
        _fail(hide_credentials(str(exc), *urls), exc.code)
    except KeyboardInterrupt:
        print("coalesce: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `coalesce keys | head`: the reader left; say nothing more.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        cause = redis_cause(exc)
        url = getattr(args, "url", None) or os.environ.get("COALESCE_URL") or ""
        if cause is not None and not isinstance(cause, BrokenPipeError):
            _fail(hide_credentials(describe_redis_error(cause, url), *urls))
        if isinstance(exc, CoalesceError):
            _fail(hide_credentials(str(exc), *urls) or type(exc).__name__)
        if os.environ.get("COALESCE_DEBUG"):
            raise
        _fail(
            f"unexpected {type(exc).__name__}: {hide_credentials(str(exc), *urls)} "
            "(set COALESCE_DEBUG=1 for a traceback)",
            EXIT_BUG,
        )
