"""The argument parser and `main`, the entry point of the `coalesce` console script.

Errors the user can fix (an unknown URL scheme, an unparsable URL, an unreachable host, a
wrong password, an empty key, a tag nothing carries, an entry written with another
serializer) print one line on stderr and exit with code 2, never a traceback: an operator
reading it during an incident needs the problem, not our stack. `get` of a missing key exits
with 1, so scripts can tell "absent" from "broken"; an unexpected exception (a bug of ours)
exits with 3 (`COALESCE_DEBUG=1` shows its traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from coalesce import CoalesceError, __version__
from coalesce.cli.commands import (
    cmd_check,
    cmd_demo,
    cmd_get,
    cmd_invalidate,
    cmd_keys,
    cmd_stats,
)
from coalesce.cli.output import PREVIEW_CHARS, one_line
from coalesce.cli.remote import (
    EXIT_BUG,
    EXIT_OK,
    EXIT_USAGE,
    SCAN_COUNT,
    CliError,
    describe_redis_error,
    hide_credentials,
    redis_cause,
)

DEFAULT_NAMESPACE = "coalesce"
DEFAULT_TIMEOUT = 5.0
DEFAULT_ADMIN_PREFIX = "/coalesce"
DEFAULT_METRICS_PATH = "/coalesce/metrics"
DEFAULT_MAX_SCANS = 1000  # SCAN calls before `keys` / `stats` stop: a bound on the work
MAX_TIMEOUT = 3600.0  # seconds: more is a typo (or inf), and would look like a hang
MAX_COUNT = 10_000_000  # --limit, --max-chars: more keys or characters than a shell can use
MAX_SCANS = 1_000_000  # --max-scans: a billion keys looked at


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
