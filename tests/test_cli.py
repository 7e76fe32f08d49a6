"""The command line as an operator runs it: the installed `coalesce` script in a subprocess.

Entries are written by a `Cache` in this process and inspected or deleted by the command
line in another, against a real `redis-server` started by the fixtures (`conftest.py`); the
`--app` tests talk to a real uvicorn server on loopback with the admin router mounted.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_servers import RedisServer, free_port

from coalesce import Cache
from coalesce.cli.output import human_seconds, one_line, preview
from coalesce.entry import Entry
from coalesce.serialization import encode_entry
from coalesce.stores.memory import MemoryStore
from coalesce.urls import redact

TOKEN = "test-admin-token-5f1c"


def console_script() -> str | None:
    """The `coalesce` script that `pip install -e .` put next to this interpreter."""
    beside = Path(sys.executable).with_name("coalesce")
    if beside.exists():
        return str(beside)
    return shutil.which("coalesce")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the variables the command line reads, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COALESCE_")}
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the real console script (or `python -m coalesce` if it is not installed)."""
    script = console_script()
    command = [script] if script else [sys.executable, "-m", "coalesce"]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env() if env is None else env,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit code 2, exactly one line on stderr naming the problem, and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("coalesce: error: ")
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------
# fixtures: a Redis-backed cache with a few entries


@pytest.fixture
def cache(redis_server: RedisServer, unique_namespace: str) -> Iterator[Cache]:
    cache = Cache(redis_server.url, namespace=unique_namespace)
    yield cache
    cache.close()


@pytest.fixture
def user(cache: Cache) -> Callable[..., dict[str, Any]]:
    """A cached function whose entries are `user:<id>`, tagged `users` and `team:<id % 2>`."""

    @cache.cached(ttl=120, key="user:{user_id}", tags=["users", "team:{team}"])
    def load_user(user_id: int, team: int = 0) -> dict[str, Any]:
        return {"id": user_id, "name": f"User {user_id}", "roles": ["reader"]}

    return load_user


def redis_args(redis_server: RedisServer, namespace: str) -> list[str]:
    return ["--url", redis_server.url, "--namespace", namespace]


# ---------------------------------------------------------------------------------------
# invalidate


def test_invalidate_reports_removed_and_missing_keys(
    redis_server: RedisServer, unique_namespace: str, cache: Cache, user: Any
) -> None:
    user(1)
    assert cache.get_entry("user:1") is not None

    result = run_cli(
        "invalidate", "user:1", "user:404", *redis_args(redis_server, unique_namespace)
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["removed", "user:1"]
    assert lines[1].split() == ["did", "not", "exist", "user:404"]
    assert cache.get_entry("user:1") is None


def test_the_environment_names_url_and_namespace_so_an_incident_needs_no_flags(
    redis_server: RedisServer, unique_namespace: str, cache: Cache, user: Any
) -> None:
    user(1)
    env = clean_env(COALESCE_URL=redis_server.url, COALESCE_NAMESPACE=unique_namespace)
    result = run_cli("invalidate", "user:1", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["removed", "user:1"]
    assert cache.get_entry("user:1") is None
    flag = run_cli("invalidate", "user:1", "--namespace", "other", env=env)  # flags win
    assert flag.returncode == 0 and flag.stdout.split() == ["did", "not", "exist", "user:1"]
    bad = run_cli("invalidate", "user:1", env={**env, "COALESCE_NAMESPACE": "a b"})
    assert bad.returncode == 2 and "namespace" in bad.stderr


def test_keys_with_unsafe_characters_are_found_in_their_escaped_form(
    redis_server: RedisServer, unique_namespace: str, cache: Cache
) -> None:
    """The core stores `user:{name}` with name "a b" as `user:a%20b`: the command line looks
    up that form when given the key as the application's author writes it, and says so."""

    @cache.cached(ttl=120, key="user:{name}", tags=["team:{name}"])
    def load(name: str) -> dict[str, str]:
        return {"name": name}

    load("a b")
    assert cache.keys() == ["user:a%20b"]
    args = redis_args(redis_server, unique_namespace)

    shown = run_cli("get", "user:a b", *args)
    assert shown.returncode == 0, shown.stderr
    assert "user:a%20b" in shown.stdout and "escaped form of 'user:a b'" in shown.stdout
    assert "'name': 'a b'" in shown.stdout

    removed = run_cli("invalidate", "user:a b", *args)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.split()[:2] == ["removed", "user:a%20b"]
    assert "escaped form of 'user:a b'" in removed.stdout
    assert cache.keys() == []

    load("a b")  # the escaped form, as `coalesce keys` lists it, works as it is
    pasted = run_cli("invalidate", "user:a%20b", *args)
    assert pasted.stdout.split()[:2] == ["removed", "user:a%20b"], pasted.stdout
    assert "as given" in pasted.stdout
    assert cache.keys() == []

    load("a b")
    tagged = run_cli("invalidate", "--tag", "team:a b", *args)
    assert tagged.returncode == 0, tagged.stderr
    assert "tagged team:a%20b" in tagged.stdout
    assert cache.keys() == []

    missing = run_cli("invalidate", "user:a b", *args)
    assert missing.returncode == 0
    assert missing.stdout.split()[:4] == ["did", "not", "exist", "user:a%20b"]
    absent = run_cli("get", "user:a b", *args)
    assert absent.returncode == 1
    assert "'user:a%20b' (the escaped form of 'user:a b')" in absent.stderr


def test_invalidate_of_only_missing_keys_still_exits_0(
    redis_server: RedisServer, unique_namespace: str
) -> None:
    result = run_cli("invalidate", "nothing:here", *redis_args(redis_server, unique_namespace))
    assert result.returncode == 0, result.stderr
    assert "did not exist" in result.stdout


def test_options_may_come_before_the_command_and_url_from_the_environment(
    redis_server: RedisServer, unique_namespace: str, cache: Cache, user: Any
) -> None:
    user(5)
    result = run_cli(
        "--namespace",
        unique_namespace,
        "invalidate",
        "user:5",
        env=clean_env(COALESCE_URL=redis_server.url),
    )
    assert result.returncode == 0, result.stderr
    assert "removed" in result.stdout
    assert cache.get_entry("user:5") is None


def test_invalidate_tag_removes_every_entry_carrying_it(
    redis_server: RedisServer, unique_namespace: str, cache: Cache, user: Any
) -> None:
    user(1, team=7)
    user(2, team=7)
    user(3, team=8)

    result = run_cli("invalidate", "--tag", "team:7", *redis_args(redis_server, unique_namespace))

    assert result.returncode == 0, result.stderr
    assert "removed" in result.stdout and "2 entries" in result.stdout
    assert cache.get_entry("user:1") is None
    assert cache.get_entry("user:2") is None
    assert cache.get_entry("user:3") is not None


def test_invalidate_unknown_tag_is_one_line_and_exit_2(
    redis_server: RedisServer, unique_namespace: str
) -> None:
    result = run_cli(
        "invalidate", "--tag", "team:none", *redis_args(redis_server, unique_namespace)
    )
    assert_one_line_error(result, "no such tag", "team:none")


def test_invalidate_reaches_a_near_cache_in_another_process(
    redis_server: RedisServer, unique_namespace: str
) -> None:
    """The deletion is broadcast: a process holding the entry in its near cache drops it."""
    near = Cache(redis_server.url, namespace=unique_namespace, local_maxsize=100, local_ttl=60)
    try:

        @near.cached(ttl=120, key="item:{item_id}")
        def item(item_id: int) -> str:
            return f"item {item_id}"

        item(1)
        assert near.get_entry("item:1") is not None  # now also held in this process
        result = run_cli("invalidate", "item:1", *redis_args(redis_server, unique_namespace))
        assert result.returncode == 0, result.stderr
        assert "removed" in result.stdout
        deadline = time.monotonic() + 2.0
        while near.get_entry("item:1") is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert near.get_entry("item:1") is None, "the near cache still serves a deleted entry"
    finally:
        near.close()


def test_empty_key_is_one_line_and_exit_2(redis_server: RedisServer, unique_namespace: str) -> None:
    result = run_cli("invalidate", "", *redis_args(redis_server, unique_namespace))
    assert_one_line_error(result, "empty key")
    result = run_cli("get", "  ", *redis_args(redis_server, unique_namespace))
    assert_one_line_error(result, "empty key")


def test_invalidate_without_keys_or_tag_is_exit_2(
    redis_server: RedisServer, unique_namespace: str
) -> None:
    result = run_cli("invalidate", *redis_args(redis_server, unique_namespace))
    assert_one_line_error(result, "nothing to invalidate")


# ---------------------------------------------------------------------------------------
# get and keys


def test_get_shows_age_ttl_size_tags_and_a_preview(
    redis_server: RedisServer, unique_namespace: str, user: Any
) -> None:
    user(42, team=3)

    result = run_cli("get", "user:42", *redis_args(redis_server, unique_namespace))

    assert result.returncode == 0, result.stderr
    fields = {
        line.split(None, 1)[0]: line.split(None, 1)[1]
        for line in result.stdout.splitlines()
        if line and not line.startswith(" ")
    }
    assert fields["key"] == "user:42"
    assert fields["status"].startswith("fresh, expires in")
    assert fields["age"].endswith(" s")
    assert fields["ttl"] == "2 min 0 s"
    assert "min" in fields["remaining"] or fields["remaining"].endswith(" s")
    size = int(fields["size"].split()[0].replace(",", ""))
    assert 20 < size < 200  # the msgpack encoding of the small dict
    assert set(fields["tags"].split(", ")) == {"users", "team:3"}
    assert "'name': 'User 42'" in fields["value"]


def test_get_truncates_a_long_value(
    redis_server: RedisServer, unique_namespace: str, cache: Cache
) -> None:
    @cache.cached(ttl=60, key="report:{day}")
    def report(day: str) -> list[int]:
        return list(range(5000))

    report("monday")
    result = run_cli(
        "get", "report:monday", "--max-chars", "200", *redis_args(redis_server, unique_namespace)
    )
    assert result.returncode == 0, result.stderr
    assert "more characters)" in result.stdout
    assert len(result.stdout) < 1500


def get_fields(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """`coalesce get`'s `name  value` lines (exit 0 asserted, no traceback)."""
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return {
        line.split(None, 1)[0]: line.split(None, 1)[1]
        for line in result.stdout.splitlines()
        if line and not line.startswith(" ") and len(line.split(None, 1)) == 2
    }


def test_get_shows_ints_beyond_the_int_to_text_limit(
    redis_server: RedisServer, unique_namespace: str, cache: Cache
) -> None:
    """Issue 9 item 6: an int of more than 4,300 digits, as a value and nested, written by a
    cached function, is shown by its size instead of exiting 3."""

    @cache.cached(ttl=60, key="big:{shape}")
    def big(shape: str) -> Any:
        n = 7**20_000  # 16,902 digits
        return n if shape == "flat" else {"n": [n, -n], "small": 1}

    for shape in ("flat", "nested"):
        big(shape)
        fields = get_fields(
            run_cli("get", f"big:{shape}", *redis_args(redis_server, unique_namespace))
        )
        assert "(an int of 56,148 bits)" in fields["value"], fields
        assert fields["status"].startswith("fresh, expires in")


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        ({"ttl": math.inf}, {"ttl": "none", "remaining": "no expiry"}),
        ({"ttl": 60.0, "stale_ttl": math.inf}, {"ttl": "1 min 0 s (+ forever stale)"}),
        ({"ttl": 1e300}, {"remaining": "over 10,000 years"}),
        ({"ttl": math.nan}, {"ttl": "unknown"}),
        ({"ttl": 60.0, "compute_time": math.inf}, {"computed": "in inf ms"}),
    ],
    ids=["ttl-inf", "stale-ttl-inf", "ttl-1e300", "ttl-nan", "compute-time-inf"],
)
def test_get_shows_entries_whose_times_are_not_finite(
    redis_server: RedisServer,
    unique_namespace: str,
    cache: Cache,
    times: dict[str, float],
    expected: dict[str, str],
) -> None:
    """Issue 9 item 6: an entry whose ttl is inf (no expiry, as ttl=None) or otherwise not a
    finite number of seconds, encoded by the library's own entry codec, is shown (exit 0)
    instead of exiting 3 ("a bug of ours")."""

    @cache.cached(ttl=60, key="odd")
    def odd() -> dict[str, int]:
        return {"a": 1}

    odd()
    client = redis_server.client()
    try:
        (stored,) = client.scan_iter(match=f"{unique_namespace}:*odd*")  # where the store put it
        client.set(stored, encode_entry(Entry({"a": 1}, **times), cache.serializer))
    finally:
        client.close()
    fields = get_fields(run_cli("get", "odd", *redis_args(redis_server, unique_namespace)))
    assert fields["value"] == "{'a': 1}"
    for name, text in expected.items():
        assert fields[name] == text, fields
    if times["ttl"] == math.inf:
        assert fields["status"] == "fresh, never expires by time"


def test_get_missing_key_says_so_and_exits_1(
    redis_server: RedisServer, unique_namespace: str
) -> None:
    result = run_cli("get", "user:404", *redis_args(redis_server, unique_namespace))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "no entry for key 'user:404'" in result.stderr
    assert "Traceback" not in result.stderr


def test_keys_lists_this_namespace_only(
    redis_server: RedisServer, unique_namespace: str, user: Any
) -> None:
    for user_id in range(3):
        user(user_id)
    other = Cache(redis_server.url, namespace=unique_namespace + "x")
    try:

        @other.cached(ttl=60, key="user:{user_id}")
        def other_user(user_id: int) -> int:
            return user_id

        other_user(99)
        result = run_cli("keys", *redis_args(redis_server, unique_namespace))
    finally:
        other.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["user:0", "user:1", "user:2"]


def test_keys_with_pattern_and_limit(
    redis_server: RedisServer, unique_namespace: str, cache: Cache, user: Any
) -> None:
    for user_id in range(5):
        user(user_id)

    @cache.cached(ttl=60, key="order:{order_id}")
    def order(order_id: int) -> int:
        return order_id

    order(1)
    result = run_cli("keys", "order:*", *redis_args(redis_server, unique_namespace))
    assert result.stdout.split() == ["order:1"]

    result = run_cli("keys", "user:*", "--limit", "2", *redis_args(redis_server, unique_namespace))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 2
    assert "--limit 2" in result.stderr

    result = run_cli("keys", "nomatch:*", *redis_args(redis_server, unique_namespace))
    assert result.returncode == 0
    assert result.stdout == ""
    assert "no keys match" in result.stderr


def test_get_of_an_entry_written_with_another_serializer_says_it_exists(
    redis_server: RedisServer, unique_namespace: str
) -> None:
    pickled = Cache(redis_server.url, namespace=unique_namespace, serializer="pickle")
    try:

        @pickled.cached(ttl=60, key="report:{day}")
        def report(day: str) -> dict[str, str]:
            return {"day": day}

        report("monday")
        result = run_cli("get", "report:monday", *redis_args(redis_server, unique_namespace))
    finally:
        pickled.close()
    line = assert_one_line_error(result, "an entry exists", "could not be decoded", "'pickle'")
    assert "report:monday" in line
    assert "no entry" not in line


@pytest.fixture
def filler(redis_server: RedisServer, unique_namespace: str) -> Iterator[int]:
    """2,500 keys of another program in the database, so that a SCAN takes several calls."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    names = [f"{unique_namespace}-other:{i}" for i in range(2500)]
    client.mset(dict.fromkeys(names, b"x"))
    yield len(names)
    client.delete(*names)
    client.close()


def test_keys_bounds_the_scan_not_only_the_results(
    redis_server: RedisServer, unique_namespace: str, user: Any, filler: int
) -> None:
    args = redis_args(redis_server, unique_namespace)
    user(1)
    cut = run_cli("keys", "nomatch:*", "--max-scans", "1", *args)
    assert cut.returncode == 0, cut.stderr
    assert cut.stdout == ""
    assert "cut short" in cut.stderr and "--max-scans" in cut.stderr
    assert "narrower pattern" in cut.stderr

    whole = run_cli("keys", "nomatch:*", *args)  # the default bound walks this database
    assert "no keys match" in whole.stderr and "cut short" not in whole.stderr
    assert run_cli("keys", "user:*", *args).stdout.split() == ["user:1"]

    stats = run_cli("stats", "--max-scans", "1", *args)
    assert stats.returncode == 0, stats.stderr
    assert "counting stopped at --max-scans 1" in stats.stdout
    assert_one_line_error(run_cli("keys", "--max-scans", "0", *args), "--max-scans")


# ---------------------------------------------------------------------------------------
# stats and check


def test_stats_counts_the_namespace_and_shows_the_server(
    redis_server: RedisServer, unique_namespace: str, user: Any
) -> None:
    user(1)
    user(2)
    result = run_cli("stats", *redis_args(redis_server, unique_namespace))
    assert result.returncode == 0, result.stderr
    assert f"namespace  {unique_namespace} (2 keys)" in result.stdout
    assert "server     Redis " in result.stdout
    assert "connected" in result.stdout


def test_check_writes_reads_and_deletes_a_probe(
    redis_server: RedisServer, unique_namespace: str
) -> None:
    result = run_cli("check", *redis_args(redis_server, unique_namespace))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("OK")
    version = redis_server.client().info("server")["redis_version"]
    assert f"Redis {version}" in result.stdout
    for step in ("ping", "write", "read", "delete"):
        assert any(line.startswith(step) and " ms" in line for line in lines), step
    # The probe key is gone: nothing of ours is left in the namespace.
    client = redis_server.client()
    try:
        assert list(client.scan_iter(match=f"{unique_namespace}:*")) == []
    finally:
        client.close()


def test_check_against_a_closed_port_is_one_line_exit_2() -> None:
    port = free_port()
    started = time.monotonic()
    result = run_cli("check", "--url", f"redis://127.0.0.1:{port}/0")
    assert_one_line_error(result, "cannot connect", str(port))
    assert time.monotonic() - started < 30


def test_unknown_scheme_is_one_line_exit_2() -> None:
    result = run_cli("check", "--url", "mysql://db:3306/0")
    assert_one_line_error(result, "unknown cache URL scheme", "mysql")
    result = run_cli("keys", env=clean_env(COALESCE_URL="memcached://127.0.0.1:11211"))
    assert_one_line_error(result, "memcached")


@pytest.mark.parametrize(
    ("url", "needles"),
    [
        ("redis://[::1", ("invalid cache URL", "IPv6", "[::1]")),
        ("rediss://:s3cret@[::1:6379/0", ("invalid cache URL", "IPv6")),
        ("redis://127.0.0.1:99999/0", ("invalid", "port")),
        ("redis://127.0.0.1:port/0", ("invalid", "port")),
        ("redis://:s3cret@127.0.0.1:nope/0", ("invalid", "port")),
        ("unix://", ("invalid cache URL", "socket's path")),
        ("redis://127.0.0.1:6379/0?db=x", ("invalid Redis URL", "db")),
    ],
)
def test_unparsable_urls_are_one_line_exit_2(url: str, needles: tuple[str, ...]) -> None:
    for command in ("get", "keys", "invalidate", "check"):
        args = ["k"] if command in ("get", "invalidate") else []
        line = assert_one_line_error(run_cli(command, *args, "--url", url), *needles)
        assert "s3cret" not in line  # the password is never printed


def test_an_unparsable_app_url_is_one_line_exit_2() -> None:
    result = run_cli("invalidate", "k", "--app", "http://[::1", "--token", "t")
    assert_one_line_error(result, "invalid --app URL", "IPv6")
    result = run_cli("demo", "--url", "redis://[::1")
    assert_one_line_error(result, "invalid cache URL", "IPv6")


def test_wrong_or_missing_password_is_one_line_exit_2() -> None:
    with RedisServer(name="cli-auth", password="right-password") as server:
        wrong = f"redis://:wrong-password@127.0.0.1:{server.port}/0"
        line = assert_one_line_error(run_cli("check", "--url", wrong), "authentication failed")
        assert "wrong-password" not in line  # the password is never printed
        missing = f"redis://127.0.0.1:{server.port}/0"
        assert_one_line_error(run_cli("stats", "--url", missing), "requires a password")
        assert run_cli("check", "--url", server.url).returncode == 0


def test_memory_cache_points_to_app() -> None:
    result = run_cli("invalidate", "user:1")  # no --url, no COALESCE_URL: memory://
    assert_one_line_error(result, "memory://", "--app")
    result = run_cli("keys", "--url", "memory://")
    assert_one_line_error(result, "inside the application")


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        *(("keys", "--timeout", value) for value in ("-1", "nan", "inf", "1e300", "0", "3601")),
        ("check", "--timeout", "nan"),
        *(("keys", "--limit", value) for value in ("nan", "inf", "1e300", "99999999999999999999")),
        ("stats", "--limit", "10000001"),
        *(("keys", "--max-scans", value) for value in ("nan", "-3", "99999999999999999999")),
        *(("get", "--max-chars", value) for value in ("inf", "0", "99999999999999999999")),
    ],
)
def test_a_number_out_of_range_is_one_line_naming_its_option(
    command: str, option: str, value: str
) -> None:
    """nan, inf, huge or non-positive: refused before anything is reached (the port is closed,
    so a value let through shows up as "cannot connect" instead of naming the option)."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    args = ["k"] if command in ("get", "invalidate") else []
    line = assert_one_line_error(run_cli(command, *args, option, value, "--url", url), option)
    assert "unexpected" not in line and "cannot connect" not in line


def test_a_timeout_is_refused_before_the_app_is_reached() -> None:
    app = f"http://127.0.0.1:{free_port()}"
    result = run_cli("invalidate", "k", "--app", app, "--token", TOKEN, "--timeout", "inf")
    line = assert_one_line_error(result, "--timeout")
    assert "cannot reach" not in line


@pytest.mark.parametrize(
    ("namespace", "needles"),
    [
        ("", ("empty --namespace",)),
        ("a b", ("--namespace", "spaces")),
        ("a:b", ("'a:b'", "may not contain")),
    ],
)
def test_an_invalid_namespace_is_named_not_the_url(
    redis_server: RedisServer, namespace: str, needles: tuple[str, ...]
) -> None:
    for command in ("keys", "get", "invalidate", "stats", "check", "demo"):
        args = ["k"] if command in ("get", "invalidate") else []
        result = run_cli(command, *args, "--url", redis_server.url, "--namespace", namespace)
        line = assert_one_line_error(result, *needles)
        assert "url" not in line.lower(), line


def test_keys_refuses_an_unclosed_bracket_and_explains_glob_syntax(
    redis_server: RedisServer, unique_namespace: str, cache: Cache
) -> None:
    """The namespace wraps keys in braces (ns:{user:1}): an unclosed `[` swallowed the closing
    brace, and `coalesce keys 'user:['` listed the key `user:`."""

    @cache.cached(ttl=60, key="user:{name}")
    def load(name: str) -> str:
        return name

    load("")
    load("[1]")
    assert sorted(cache.keys()) == ["user:", "user:[1]"]
    args = redis_args(redis_server, unique_namespace)

    line = assert_one_line_error(run_cli("keys", "user:[", *args), "'['", "character class")
    assert "\\[" in line  # how to write a literal bracket
    assert_one_line_error(run_cli("keys", "[a-z", *args), "no ']' closes")
    assert_one_line_error(run_cli("keys", "user:\\", *args), "lone backslash")

    assert run_cli("keys", "user:\\[*", *args).stdout.split() == ["user:[1]"]
    assert run_cli("keys", "user:[[]*", *args).stdout.split() == ["user:[1]"]
    assert run_cli("keys", "user:*", *args).stdout.split() == ["user:", "user:[1]"]


@pytest.mark.parametrize(
    ("password", "code"),
    [("Zm9v/YmFy+", "%2F"), ("ab#cd/ef", "%23"), ("qx?cd=ef", "%3F"), ("9876/xyz", "%2F")],
)
def test_a_password_with_unencoded_specials_is_named_and_never_quoted(
    password: str, code: str
) -> None:
    """`/`, `?` or `#` end the host part for every URL parser: the password was taken as host
    and port, and quoted ("Port could not be cast to integer value as 'Zm9v'"), or another
    port was dialled ("9876/xyz": localhost:9876)."""
    port = free_port()
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    fragments = [part for part in re.split(r"[/?#=+]", password) if len(part) >= 2]
    runs = [
        run_cli(command, *(["k"] if command in ("get", "invalidate") else []), "--url", url)
        for command in ("keys", "get", "invalidate", "stats", "check", "demo")
    ]
    runs.append(run_cli("keys", env=clean_env(COALESCE_URL=url)))
    for result in runs:
        line = assert_one_line_error(result, "cannot be parsed", "percent-encoded", code)
        rest = line.replace(f"127.0.0.1:{port}", "")
        for fragment in fragments:
            assert fragment not in rest, line


def test_an_app_url_password_is_never_printed(app_server: tuple[Cache, str]) -> None:
    _cache, url = app_server
    secret = "app-s3cret-pw"
    with_password = url.replace("http://", f"http://ops:{secret}@")
    closed = f"http://ops:{secret}@127.0.0.1:{free_port()}"
    results = [
        run_cli("invalidate", "k", "--app", closed, "--token", TOKEN),  # cannot reach
        run_cli("stats", "--app", closed),
        run_cli("stats", "--app", closed.replace("http:", "ftp:")),  # not http(s)
        run_cli("invalidate", "k", "--app", with_password, "--token", "wrong"),  # 401
        run_cli(
            "invalidate", "k", "--app", with_password, "--token", TOKEN, "--admin-prefix", "/no"
        ),  # 404
        run_cli("stats", "--app", with_password, "--metrics-path", "/nope"),  # no metrics
    ]
    without_httpx = (
        "import sys; sys.modules['httpx'] = None\n"
        "from coalesce.cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    results.append(
        subprocess.run(
            [sys.executable, "-c", without_httpx, "invalidate", "k", "--app", closed],
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env(COALESCE_TOKEN=TOKEN),
        )
    )
    for result in results:
        line = assert_one_line_error(result)
        assert secret not in line and "s3cret" not in line, line
        assert "127.0.0.1" in line, line


def test_redis_errors_never_quote_the_password() -> None:
    """The message of a redis-py error is quoted, minus any password of the URL."""
    import redis.exceptions as rex

    from coalesce.cli.remote import describe_redis_error

    url = "redis://ops:pa55word-x@127.0.0.1:1/0"
    line = describe_redis_error(rex.ConnectionError("Error with ops:pa55word-x"), url)
    assert "pa55word" not in line and "cannot connect" in line
    encoded = "redis://:p%2Fss-word@127.0.0.1:1/0"
    line = describe_redis_error(rex.AuthenticationError("bad p/ss-word"), encoded)
    assert "ss-word" not in line and "authentication failed" in line


def test_usage_errors_are_one_line_too() -> None:
    assert_one_line_error(run_cli("keys", "--limit", "many"), "--limit", "invalid int")
    assert_one_line_error(run_cli("frobnicate"), "invalid choice")
    assert_one_line_error(run_cli("demo", "--requests", "1e9x"), "--requests")


def test_no_command_prints_usage_and_exits_2() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert "invalidate" in result.stderr and "demo" in result.stderr


def test_console_script_and_python_m_are_the_same_program() -> None:
    script = console_script()
    assert script is not None, "run `pip install -e .` to install the coalesce console script"
    by_script = subprocess.run(
        [script, "--version"], capture_output=True, text=True, timeout=30, env=clean_env()
    )
    by_module = subprocess.run(
        [sys.executable, "-m", "coalesce", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert by_script.returncode == by_module.returncode == 0
    assert by_script.stdout == by_module.stdout
    assert by_script.stdout.startswith("coalesce ")


# ---------------------------------------------------------------------------------------
# --app: an in-memory cache, reached through the application's admin router


@pytest.fixture(scope="module")
def app_process() -> Iterator[tuple[Cache, str]]:
    """uvicorn on loopback serving an app with the admin and metrics routers of a memory cache,
    started once for the module's tests (see `app_server`)."""
    import uvicorn
    from fastapi import FastAPI

    from coalesce.demo.server import listening_socket
    from coalesce.fastapi import MetricsRegistry, admin_router, cached, metrics_router

    cache = Cache()
    registry = MetricsRegistry()
    app = FastAPI()
    app.include_router(admin_router(cache, token=TOKEN))
    app.include_router(metrics_router(registry=registry))

    @app.get("/items/{item_id}")
    @cached(ttl=60, cache=cache, registry=registry)
    async def read_item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    sock = listening_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield cache, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture
def app_server(app_process: tuple[Cache, str]) -> tuple[Cache, str]:
    """`app_process`, its cache emptied for this test (no test sees another's entries)."""
    cache, url = app_process
    assert isinstance(cache.store, MemoryStore)
    cache.store.clear()
    return cache, url


def _seed_memory(cache: Cache) -> Any:
    @cache.cached(ttl=60, key="user:{user_id}", tags=["users"])
    def load_user(user_id: int) -> int:
        return user_id

    return load_user


def test_invalidate_over_the_apps_admin_router(app_server: tuple[Cache, str]) -> None:
    cache, url = app_server
    load_user = _seed_memory(cache)
    load_user(1)
    result = run_cli("invalidate", "user:1", "user:2", "--app", url, "--token", TOKEN)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["removed", "user:1"]
    assert lines[1].split() == ["did", "not", "exist", "user:2"]
    assert cache.get_entry("user:1") is None


def test_invalidate_of_many_keys_over_the_app_is_split_into_accepted_requests(
    app_server: tuple[Cache, str],
) -> None:
    """The admin router takes at most 1,000 keys and 64 KiB per request: 2,500 long keys
    go in several requests, and every answer is reported."""
    cache, url = app_server
    load_user = _seed_memory(cache)
    for user_id in (7, 2400):
        load_user(user_id)
    keys = [f"user:{n}" + "x" * 60 * (n > 2400) for n in range(2500)]
    result = run_cli("invalidate", *keys, "--app", url, "--token", TOKEN)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2500
    assert sorted(line.split()[-1] for line in lines if line.startswith("removed")) == [
        "user:2400",
        "user:7",
    ]
    assert cache.get_entry("user:7") is None and cache.get_entry("user:2400") is None


def test_invalidate_tag_over_the_app_with_token_from_the_environment(
    app_server: tuple[Cache, str],
) -> None:
    cache, url = app_server
    load_user = _seed_memory(cache)
    load_user(1)
    load_user(2)
    result = run_cli(
        "invalidate", "--tag", "users", "--app", url, env=clean_env(COALESCE_TOKEN=TOKEN)
    )
    assert result.returncode == 0, result.stderr
    assert "2 entries" in result.stdout
    assert cache.get_entry("user:1") is None and cache.get_entry("user:2") is None

    result = run_cli("invalidate", "--tag", "users", "--app", url, "--token", TOKEN)
    assert_one_line_error(result, "no such tag")


def test_app_with_a_wrong_or_missing_token_is_exit_2(app_server: tuple[Cache, str]) -> None:
    cache, url = app_server
    load_user = _seed_memory(cache)
    load_user(1)
    result = run_cli("invalidate", "user:1", "--app", url, "--token", "wrong")
    line = assert_one_line_error(result, "refused the token", "401")
    assert "wrong" not in line.split("token")[-1]
    assert cache.get_entry("user:1") is not None
    assert_one_line_error(run_cli("invalidate", "user:1", "--app", url), "--token")


def test_invalidate_over_the_app_without_httpx_uses_urllib(app_server: tuple[Cache, str]) -> None:
    cache, url = app_server
    load_user = _seed_memory(cache)
    load_user(3)
    code = (
        "import sys; sys.modules['httpx'] = None\n"
        "from coalesce.cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "invalidate", "user:3", "user:4", "--app", url],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(COALESCE_TOKEN=TOKEN),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0].split() == ["removed", "user:3"]
    assert cache.get_entry("user:3") is None


def test_stats_over_the_app_shows_its_metrics(app_server: tuple[Cache, str]) -> None:
    import httpx

    _cache, url = app_server
    for _ in range(3):
        httpx.get(f"{url}/items/1", timeout=10).raise_for_status()
    result = run_cli("stats", "--app", url)
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split()[:5] == ["route", "hits", "misses", "stale", "coalesced"]
    assert row.split()[:3] == ["/items/{item_id}", "2", "1"]

    result = run_cli("stats", "--app", url, "--json")
    assert result.returncode == 0, result.stderr
    routes = json.loads(result.stdout)["routes"]
    assert routes["/items/{item_id}"]["hits"] == 2


def test_app_that_is_not_listening_is_one_line_exit_2() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run_cli("invalidate", "user:1", "--app", url, "--token", TOKEN)
    assert_one_line_error(result, "cannot reach the application")


def test_get_over_app_is_refused_with_a_hint() -> None:
    result = run_cli("get", "user:1", "--app", "http://127.0.0.1:1", "--token", TOKEN)
    assert_one_line_error(result, "--url")


# ---------------------------------------------------------------------------------------
# helpers, in process


def test_redact_hides_passwords_only() -> None:
    assert redact("redis://:secret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact("redis://user:secret@host/0") == "redis://user:***@host/0"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"


def test_human_seconds_and_one_line() -> None:
    assert human_seconds(0.5) == "0.50 s"
    assert human_seconds(42) == "42.0 s"
    assert human_seconds(200) == "3 min 20 s"
    assert human_seconds(7500) == "2 h 5 min"
    assert human_seconds(200_000) == "2 d 7 h"
    assert human_seconds(400 * 86_400) == "1 y 35 d"
    assert human_seconds(-200) == "-3 min 20 s"
    assert human_seconds(math.inf) == "forever"
    assert human_seconds(1e300) == "over 10,000 years"
    assert human_seconds(math.nan) == "unknown"
    assert one_line("a\n  b\tc") == "a b c"


def test_preview_is_readable_and_bounded() -> None:
    assert preview("hi") == "'hi'"
    assert preview({"a": 1}) == "{'a': 1}"
    long = preview(list(range(10_000)), limit=50)
    assert long.startswith("[0, 1, 2") and "more characters)" in long


def test_an_unexpected_exception_is_one_line_and_exit_code_3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from coalesce import cli

    def broken(args: Any) -> int:
        raise ZeroDivisionError("a bug of ours")

    # the parser's module (the name `coalesce.cli.main` itself is the function `main`)
    monkeypatch.setattr(importlib.import_module("coalesce.cli.main"), "cmd_keys", broken)
    monkeypatch.delenv("COALESCE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exited:
        cli.main(["keys", "--url", "redis://127.0.0.1:1/0"])
    assert exited.value.code == 3  # not 1 ("no such key"), not 2 (the user's input)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ZeroDivisionError: a bug of ours" in err[0]
    assert "COALESCE_DEBUG=1" in err[0]
    monkeypatch.setenv("COALESCE_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["keys", "--url", "redis://127.0.0.1:1/0"])
