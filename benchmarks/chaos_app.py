"""The application under fault for `chaos.py`: one cached FastAPI route on Redis.

`uvicorn chaos_app:app --workers N` runs it; everything comes from the environment, which
`chaos.py` sets:

* `CHAOS_CACHE_URL`: the Redis that holds the cache (the one the faults hit), with a near
  cache (`local_maxsize`, `local_ttl`) when `CHAOS_NEAR=1`;
* `CHAOS_DB_URL`: another Redis, never faulted, standing for the database: the version of
  each key (bumped by the driver before it invalidates the key) and a log of every
  computation (`comps`: "key monotonic-time pid"), so computations can be counted per key and
  per second across every worker;
* `CHAOS_TTL`, `CHAOS_COMPUTE_MS`, `CHAOS_PAD` (bytes of padding in each value, to fill a
  small `maxmemory`).

`GET /item/{name}` answers `{"key", "version", "pid", "pad"}`: the version read from the
database when the value was computed, so a reader can tell a wrong value (another key, a
version that was never written) and a stale one (older than an invalidation that finished
before the request was sent). The stored key is `item:{name}@chaos_app.item`.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import redis.asyncio
from fastapi import FastAPI

from coalesce import Cache
from coalesce.fastapi import cached

CACHE_URL = os.environ.get("CHAOS_CACHE_URL", "redis://127.0.0.1:6390/0")
DB_URL = os.environ.get("CHAOS_DB_URL", "redis://127.0.0.1:6391/0")
TTL = float(os.environ.get("CHAOS_TTL", "2"))
COMPUTE = float(os.environ.get("CHAOS_COMPUTE_MS", "70")) / 1000
PAD = "x" * int(os.environ.get("CHAOS_PAD", "0"))
NAMESPACE = "chaos"

near: dict[str, Any] = {"local_maxsize": 10_000, "local_ttl": 5}
cache = Cache(
    CACHE_URL, namespace=NAMESPACE, **(near if os.environ.get("CHAOS_NEAR", "1") == "1" else {})
)
app = FastAPI()
_db: list[redis.asyncio.Redis] = []


def db() -> redis.asyncio.Redis:
    """The database client of this worker (one event loop per uvicorn worker)."""
    if not _db:
        _db.append(redis.asyncio.Redis.from_url(DB_URL, socket_timeout=5))
    return _db[0]


@app.get("/item/{name}")
@cached(ttl=TTL, key="item:{name}", cache=cache)
async def item(name: str) -> dict[str, Any]:
    """The "database query": read the key's version, log the computation, take COMPUTE s.

    (The parameter is not called `key`: coalesce hashes parameters named like secrets.)
    """
    version = int(await db().get(f"version:{name}") or 0)
    await db().rpush("comps", f"{name} {time.monotonic():.6f} {os.getpid()}")
    await asyncio.sleep(COMPUTE)
    return {"key": name, "version": version, "pid": os.getpid(), "pad": PAD}


@app.get("/health")
async def health() -> dict[str, int]:
    return {"pid": os.getpid()}
