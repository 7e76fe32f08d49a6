"""The demo's load generator: a bounded, concurrent HTTP load and what it measured.

Kept apart from the demo's application so that the two halves read on their own: this module
knows nothing about caching, it only sends a fixed list of requests, `concurrency` at a time,
and records how long each took and whether it failed. Count and time are both bounded: a
phase never sends more than its plan and stops sending once its time limit has passed (the
requests it did not send are reported as errors, not silently dropped).

Latency is measured here, at the client, so it includes the client's own work: httpx costs
about 1 ms of CPU per request, against about 0.3 ms for the server to answer a cache hit, so
with 50 requests in flight a hit's latency is mostly this process taking its turn. That is
why each response's own `Server-Timing` (the time spent in the application) is recorded as
well, and the CPU time this process used: the report can then say where the time went.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

import httpx


def request_plan(requests: int, keys: int, *, hot_share: float = 0.8, seed: int = 7) -> list[int]:
    """Which key each request asks for: `hot_share` of them go to the hottest 10% of keys.

    Real traffic is skewed (a few popular products, the home page); the rest spreads over all
    keys, so some keys are asked for once (cold) and many are asked for over and over (hot).
    The plan is the same on every run (fixed seed), so two phases get the very same requests.
    """
    rng = random.Random(seed)
    hot = max(1, keys // 10)
    return [
        rng.randrange(hot) if rng.random() < hot_share else rng.randrange(keys)
        for _ in range(requests)
    ]


def cold_start_plan(keys: int, *, seed: int = 5) -> list[int]:
    """The first pass over the keys: each key once, mixed with as many requests of hot traffic.

    This is what an empty cache meets: every item is asked for a first time (a miss that must
    go to the database), while the popular items are asked for again and again meanwhile,
    some of them while their first query is still running (the requests coalescing shares).
    """
    rng = random.Random(seed)
    plan = list(range(keys)) + request_plan(keys, keys, seed=seed + 1)
    rng.shuffle(plan)
    return plan


def percentile(sorted_values: list[float], q: float) -> float:
    """The `q`-th percentile (0-100) of already sorted values, nearest-rank; 0.0 if empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class LoadResult:
    """What one phase of load measured, from the client's side."""

    label: str
    planned: int
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests only
    app_times: list[float] = field(default_factory=list)  # seconds in the app (Server-Timing)
    errors: int = 0  # failed responses, exceptions, and requests not sent in time
    wall: float = 0.0  # seconds from the first request sent to the last answer
    cpu: float = 0.0  # seconds of CPU this process (the load generator) used meanwhile

    @property
    def sorted_latencies(self) -> list[float]:
        return sorted(self.latencies)

    def p(self, q: float) -> float:
        """The `q`-th percentile of the latency seen by the client, in seconds."""
        return percentile(self.sorted_latencies, q)

    def app_p(self, q: float) -> float:
        """The `q`-th percentile of the time the application took, in seconds."""
        return percentile(sorted(self.app_times), q)

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall if self.wall > 0 else 0.0


class ProgressBar:
    """A plain text progress bar on a stream (stderr), redrawn at most ten times a second."""

    def __init__(self, total: int, label: str, *, enabled: bool, stream: TextIO | None = None):
        self.total = max(1, total)
        self.label = label
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.started = time.perf_counter()
        self._drawn = 0.0

    def advance(self, count: int = 1) -> None:
        self.done += count
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._drawn >= 0.1 or self.done >= self.total:
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        width = 30
        filled = min(width, int(width * self.done / self.total))
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(
            f"\r  {self.label:<12} [{bar}] {self.done:>7,}/{self.total:,}  "
            f"{now - self.started:5.1f} s"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()


async def run_load(
    base_url: str,
    paths: list[str],
    *,
    label: str,
    concurrency: int,
    time_limit: float,
    progress: bool,
    request_timeout: float = 30.0,
) -> LoadResult:
    """GET every path of `paths`, `concurrency` at a time, for at most `time_limit` seconds.

    `concurrency` workers take the next path from a shared cursor, so exactly that many
    requests are in flight until the plan runs out: the shape of `concurrency` users
    clicking as fast as the server answers. Each worker has its own client and keep-alive
    connection, like a user's browser: measured, one `httpx.AsyncClient` whose pool is
    shared by 50 workers spends more time in its pool than the server spends answering
    (about 400 requests/s instead of 2,000 against a constant endpoint), which would
    measure the client rather than the server.
    """
    result = LoadResult(label, len(paths))
    bar = ProgressBar(len(paths), label, enabled=progress)
    cursor = iter(paths)
    started = deadline = 0.0  # set when the clients are ready

    async def worker(client: httpx.AsyncClient) -> None:
        for path in cursor:
            if time.perf_counter() > deadline:
                result.errors += 1  # not sent: the phase ran out of time
                bar.advance()
                continue
            sent = time.perf_counter()
            try:
                response = await client.get(path)
                ok = response.status_code < 400
            except httpx.HTTPError:
                ok = False
            if ok:
                result.latencies.append(time.perf_counter() - sent)
                app_time = app_seconds(response.headers.get("server-timing", ""))
                if app_time is not None:
                    result.app_times.append(app_time)
            else:
                result.errors += 1
            bar.advance()

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    # One TLS context for every client: httpx builds a new one (about 20 ms, loading the CA
    # bundle) per client otherwise. It is never used on plain http:// to loopback.
    tls = ssl.create_default_context()
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=base_url, limits=limits, timeout=request_timeout, verify=tls
                )
            )
            for _ in range(max(1, concurrency))
        ]
        started = time.perf_counter()
        deadline = started + time_limit
        cpu_started = time.process_time()
        try:
            await asyncio.gather(*(worker(client) for client in clients))
        finally:
            result.wall = time.perf_counter() - started
            result.cpu = time.process_time() - cpu_started
            bar.close()
    return result


def app_seconds(server_timing: str) -> float | None:
    """The `app` metric's duration of a `Server-Timing` header, in seconds (None if absent)."""
    for metric in server_timing.split(","):
        name, _, params = metric.strip().partition(";")
        if name.strip() != "app":
            continue
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur":
                try:
                    return float(value) / 1000
                except ValueError:
                    return None
    return None
