"""Timing, table and redis-server helpers shared by the benchmark scripts.

Every measurement here is a median over several repeats, and repeats of the cases compared
in one table are interleaved (case A, case B, case A, case B, ...), so a slow phase of the
machine hurts every case alike instead of skewing one ratio. Nothing here talks to anything
but the loopback interface, and every loop is bounded.
"""

from __future__ import annotations

import gc
import importlib.metadata
import itertools
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# Benchmark the working tree this file belongs to, whatever is installed: the scripts import
# `common` before `coalesce` (isort puts third-party-looking `common` first).
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

# -- statistics -------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], pct: float) -> float:
    """The `pct` percentile (0-100) by the nearest-rank method: a value that was measured."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil(n * pct / 100)
    return float(ordered[int(rank) - 1])


def verdict(value: float, goal: float) -> str:
    """PASS when `value` is at most `goal` (information only: the scripts always exit 0)."""
    return "PASS" if value <= goal else "FAIL"


# -- micro-benchmarks ---------------------------------------------------------------------


@dataclass
class Timing:
    """Nanoseconds per call of each repeat, and its median."""

    per_call_ns: list[float] = field(default_factory=list)

    @property
    def median_ns(self) -> float:
        return median(self.per_call_ns)

    @property
    def spread(self) -> float:
        """(max - min) / median of the repeats: how noisy the measurement was."""
        return (max(self.per_call_ns) - min(self.per_call_ns)) / self.median_ns


def paired_ratio(timing: Timing, reference: Timing) -> float:
    """Median over repeats of timing / reference in the same round: robust to drift."""
    pairs = zip(timing.per_call_ns, reference.per_call_ns, strict=True)
    return median([value / ref for value, ref in pairs])


def calibrate(run: Callable[[int], float], target_s: float) -> int:
    """A loop count whose run takes about `target_s` seconds (`run(n)` returns seconds)."""
    number = 1
    while True:
        elapsed = run(number)
        if elapsed >= target_s / 10 or number >= 10_000_000:
            break
        number *= 10
    return max(1, min(10_000_000, int(number * target_s / max(elapsed, 1e-9))))


def time_sync_calls(
    cases: dict[str, Callable[[Any], Any]], arg: Any, *, repeat: int, target_s: float
) -> dict[str, Timing]:
    """ns per `f(arg)` call for each case: `timeit` loops (GC off), repeats interleaved."""
    timers = {
        name: timeit.Timer("f(arg)", globals={"f": f, "arg": arg}) for name, f in cases.items()
    }
    numbers = {name: calibrate(timer.timeit, target_s) for name, timer in timers.items()}
    results = {name: Timing() for name in cases}
    for _ in range(repeat):
        for name, timer in timers.items():
            elapsed = timer.timeit(numbers[name])
            results[name].per_call_ns.append(elapsed * 1e9 / numbers[name])
    return results


async def _await_loop(f: Callable[[Any], Awaitable[Any]], arg: Any, number: int) -> float:
    """Seconds for `for _ in range(number): await f(arg)`, GC off as in `timeit`."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(number):
            await f(arg)
        return time.perf_counter() - start
    finally:
        if gc_was_enabled:
            gc.enable()


async def time_async_calls(
    cases: dict[str, Callable[[Any], Awaitable[Any]]], arg: Any, *, repeat: int, target_s: float
) -> dict[str, Timing]:
    """ns per `await f(arg)` for each case, in one loop inside the running coroutine."""
    numbers: dict[str, int] = {}
    for name, f in cases.items():
        number = 1
        while True:
            elapsed = await _await_loop(f, arg, number)
            if elapsed >= target_s / 10 or number >= 10_000_000:
                break
            number *= 10
        numbers[name] = max(1, min(10_000_000, int(number * target_s / max(elapsed, 1e-9))))
    results = {name: Timing() for name in cases}
    for _ in range(repeat):
        for name, f in cases.items():
            elapsed = await _await_loop(f, arg, numbers[name])
            results[name].per_call_ns.append(elapsed * 1e9 / numbers[name])
    return results


def distinct_keys(f: Callable[[int], Any], start: int = 1) -> Callable[[Any], Any]:
    """`f` called with a new integer on every call (the timer's argument is unused): every
    call of a cached `f` is a miss."""
    ids = itertools.count(start)
    return lambda _: f(next(ids))


def loop_overhead_ns(*, repeat: int, target_s: float) -> float:
    """ns per iteration of an empty `f(arg)` timeit loop: included in every sync row."""

    def nothing(_: Any) -> None:
        return None

    return time_sync_calls({"nothing": nothing}, 1, repeat=repeat, target_s=target_s)[
        "nothing"
    ].median_ns


# -- tables ---------------------------------------------------------------------------------


def fmt_ns(ns: float) -> str:
    return f"{ns:,.0f} ns" if ns >= 100 else f"{ns:.1f} ns"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def fmt_ratio(ratio: float) -> str:
    return f"{ratio:.2f}x"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table whose columns line up in a terminal too."""
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(row) for row in rows)])


def versions(*distributions: str) -> str:
    found = []
    for dist in distributions:
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{dist} (not installed)")
    return ", ".join(found)


def source_revision() -> str:
    """The commit measured, and whether `coalesce/` had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "coalesce"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "commit unknown"
    return f"commit {head}" + (" + uncommitted changes in coalesce/" if dirty else "")


def environment(*distributions: str) -> str:
    """One line saying where the numbers come from."""
    return (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {source_revision()}; "
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} at the end; "
        f"{versions('coalesce-cache', *distributions)}"
    )


def write_result(path: Path, text: str) -> None:
    """Write a results file atomically (through a `.tmp` file next to it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def command_line() -> str:
    return " ".join(["python", *[Path(sys.argv[0]).as_posix(), *sys.argv[1:]]])


# -- redis-server -----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that is free on the loopback interface now (never Redis's 6379)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in (6379, 16379):
            return port


class RedisServer:
    """A throw-away `redis-server` on a free loopback port, nothing kept on disk."""

    def __init__(self, binary: str = "redis-server") -> None:
        path = shutil.which(binary)
        if path is None:
            raise FileNotFoundError(f"{binary} not found on PATH (apt-get install redis-server)")
        self.binary = path
        self.port = free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="coalesce-bench-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> RedisServer:
        log = Path(self._dir.name) / "redis.log"
        self._proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir.name,
                "--logfile",
                str(log),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {log.read_text(errors='replace')}")
            if self._answers_ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING on port {self.port}")

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
