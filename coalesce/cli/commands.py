"""The commands of the `coalesce` command line: look at and clear cache entries, run the demo.

Everything here goes through the public API (`Cache`, its methods, `coalesce.fastapi`'s
admin router over HTTP), so the command line sees exactly what an application sees.

Where the entries live decides how the command line reaches them:

* Redis (`--url redis://...` or `COALESCE_URL`, with `--namespace` or `COALESCE_NAMESPACE`):
  directly. `invalidate` deletes through
  `Cache.invalidate`, so the store broadcasts the deletion and near caches drop it too.
* memory: the entries live inside the application's process, out of reach of another
  process. `invalidate` and `stats` then go through the application itself
  (`--app http://127.0.0.1:8000 --token ...`, served by `coalesce.fastapi.admin_router`).

A KEY or TAG is given as the application's author writes it (`user:a b`) or as it is stored
(`user:a%20b`, as `coalesce keys` lists it): one that is not safe as it is
(`coalesce.keys.is_safe_key`) is looked up in the escaped form the core stores
(`coalesce.keys.escape`), and the output says which form was used (`key_forms`).

`keys` and `stats` bound their work, not only their results: at most `--max-scans` SCAN
calls of `SCAN_COUNT` keys each, then they say that the listing was cut short.

The commands live here; the argument parser and `main` (errors as one line and an exit
code) in `main`, how the output is worded in `output`, how Redis and an application are
reached (and their failures named) in `remote`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from coalesce.cli.output import (
    LARGE_VALUE,
    human_ms,
    human_seconds,
    one_line,
    preview,
    render_routes,
)
from coalesce.cli.remote import (
    EXIT_MISSING,
    EXIT_OK,
    SCAN_COUNT,
    CliError,
    RedisTarget,
    app_failure,
    app_token,
    app_url,
    check_namespace,
    check_scheme,
    http_call,
    open_target,
    parse_url,
    resolve_url,
    strict_entry,
)
from coalesce.keys import escape, is_safe_key
from coalesce.urls import redact

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
        elif now < entry.stale_until:
            status = f"stale, served while refreshing for {human_seconds(entry.stale_until - now)}"
        else:
            kept = human_seconds(max(0.0, entry.kept_until - now))
            status = f"expired, served only if its refresh fails, for {kept} (stale_if_error)"
        ttl = "none" if entry.ttl is None or entry.ttl == math.inf else human_seconds(entry.ttl)
        if entry.stale_ttl:
            ttl += f" (+ {human_seconds(entry.stale_ttl)} stale)"
        if entry.stale_if_error:
            ttl += f" (+ {human_seconds(entry.stale_if_error)} stale if error)"
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
