"""The Redis store: entries shared by every process, and single-flight across processes.

One concern per module: `store` (the store itself: reads, deletes, tags, listing), `lease`
(writing entries and the lease protocol of `fill`: the `Leases` object the store composes),
`steps` (the lease's decisions as pure functions), `batch` (`get_many`, `fill_many`),
`scripts` (key layout and Lua scripts, pure), `connection` (lazy clients, errors, shared
reads), `listener` (the one pub/sub connection: wake-ups and invalidations), `near` (the
optional near cache and the fallback while Redis is down), `breaker` (the circuit breaker
and rate-limited logging).
"""

from coalesce.stores.redis.store import RedisStore, redact

__all__ = ["RedisStore", "redact"]
