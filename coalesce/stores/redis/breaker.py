"""A circuit breaker for the Redis store, and a logger that speaks at most once per interval.

The breaker stops a dead or hanging Redis from costing every call a socket timeout. It counts
consecutive failures; after `threshold` of them it *opens*: calls fail fast (the store raises
`BackendError` without any I/O) for a cooldown. When the cooldown has passed, exactly one
call is let through as a probe (*half-open*); if it succeeds the breaker closes, if it fails
the breaker opens again with a doubled cooldown (up to `max_cooldown`). No timer thread:
the state moves on when calls arrive, or when the store learns that Redis answers again
(its pub/sub listener subscribed anew: `probe_now`).

Recovery must be noticed quickly: a fail-open cache serves from its local fallback and
computes while the breaker is open, so the defaults (0.5 s, backing off to 1 s) keep a
probe going out at least once a second. A probe against a hung Redis costs the one call
that carries it up to `socket_timeout`; every other call fails fast meanwhile.

Time comes from `clock` (monotonic seconds), which tests replace with a fake.

Concurrency contract: `allow`, `success` and `failure` may be called from any thread. The
hot path (`allow` and `success` while closed) reads two attributes without the lock; every
state change happens under `_lock`. A racing reader may see a state one call late, which is
harmless: at worst one extra call reaches Redis or fails fast.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"


class CircuitBreaker:
    """Fail fast after `threshold` consecutive failures; probe again after a cooldown."""

    def __init__(
        self,
        threshold: int = 5,
        cooldown: float = 0.5,
        max_cooldown: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock  # monotonic seconds; replaced by tests
        self.threshold = max(1, int(threshold))
        self.base_cooldown = float(cooldown)
        self.max_cooldown = max(float(max_cooldown), self.base_cooldown)
        self._lock = threading.Lock()  # guards every write below
        self.state = CLOSED  # read without the lock on the hot path
        self.failures = 0  # consecutive failures; read without the lock on the hot path
        self._cooldown = self.base_cooldown
        self._retry_at = 0.0  # monotonic time when an open breaker lets one probe through
        self._probing = False  # a probe is out (half-open)
        self._probe_at = 0.0  # when it went out: a probe that never reports is replaced
        self.opened = 0  # how often the breaker opened (stats)
        self.rejected = 0  # calls failed fast (stats)
        #: Called (by the thread whose call succeeded, without the lock) when a call succeeds
        #: after failures: the store drops what it served while Redis was unavailable.
        self.on_recover: Callable[[], None] | None = None

    def after_fork(self) -> None:
        """In a forked child: a new lock (another thread of the parent may have held it)."""
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """Whether a call may go to Redis now (False: fail fast, no I/O)."""
        if self.state == CLOSED:
            return True
        now = self.clock()
        with self._lock:
            if self.state == OPEN and now >= self._retry_at:
                self.state = HALF_OPEN
                self._probing = False
            if self.state == HALF_OPEN and (
                not self._probing or now - self._probe_at > self.max_cooldown
            ):
                self._probing = True  # this call is the probe
                self._probe_at = now
                return True
            if self.state == CLOSED:
                return True
            self.rejected += 1
            return False

    def success(self) -> None:
        if self.failures == 0 and self.state == CLOSED:
            return
        with self._lock:
            self.failures = 0
            self.state = CLOSED
            self._probing = False
            self._cooldown = self.base_cooldown
        hook = self.on_recover
        if hook is not None:
            hook()

    def failure(self) -> bool:
        """Count a failure; return True when this failure opened the breaker."""
        with self._lock:
            self.failures += 1
            if self.state == HALF_OPEN:
                self._cooldown = min(self._cooldown * 2, self.max_cooldown)
            elif self.state == OPEN or self.failures < self.threshold:
                return False
            self.state = OPEN
            self._probing = False
            self._retry_at = self.clock() + self._cooldown
            self.opened += 1
            return True

    def probe_now(self) -> None:
        """Redis was seen answering elsewhere (the listener subscribed again): let the next
        call probe at once instead of waiting for the cooldown to pass."""
        if self.state != OPEN:
            return
        with self._lock:
            if self.state == OPEN:
                self._retry_at = self.clock()

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self._retry_at - self.clock())

    def stats(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "consecutive_failures": self.failures,
            "opened": self.opened,
            "rejected": self.rejected,
            "cooldown": self._cooldown,
        }


class RateLimitedLog:
    """Log a warning at most once per `interval` seconds per topic; count the rest."""

    def __init__(self, logger: logging.Logger, interval: float = 30.0) -> None:
        self.logger = logger
        self.interval = interval
        self._lock = threading.Lock()  # guards _last and suppressed
        self._last: dict[str, float] = {}
        self.suppressed = 0

    def after_fork(self) -> None:
        """In a forked child: a new lock (another thread of the parent may have held it)."""
        self._lock = threading.Lock()

    def warning(self, topic: str, message: str, *args: Any) -> bool:
        """Log unless `topic` was logged less than `interval` ago; return whether it logged."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(topic)
            if last is not None and now - last < self.interval:
                self.suppressed += 1
                return False
            self._last[topic] = now
        self.logger.warning(message, *args)
        return True
