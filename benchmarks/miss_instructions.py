"""Instructions per sync memory miss, counted by valgrind's callgrind (noise-free).

    python benchmarks/miss_instructions.py            # coalesce and cachetools, ~2 minutes

Each library runs twice under `valgrind --tool=callgrind` (1,000 and 6,000 misses after a
10,100-call warm-up that fills the 10,000-entry cache, so every timed miss also evicts);
the difference divided by 5,000 is the cost of one miss, start-up and warm-up cancelled
out. The miss is `bench_core.py`'s: a key template, a flat 4-key dict, `copy=True` for
coalesce, `cachetools.cached(TTLCache(10_000, 60), lock=Lock())` for the reference.
Counts repeat exactly for the same binary, inputs and `PYTHONHASHSEED`, whatever else the
machine does; time ratios (`bench_core.py`) also pay for data-cache misses, which these
counts do not.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading


def _workload(which: str, misses: int) -> None:
    from cachetools import TTLCache, cached

    from coalesce import Cache

    def flat(i: int) -> dict[str, object]:
        return {"id": i, "name": "n", "email": "e", "active": True}

    if which == "coalesce":
        cache = Cache(maxsize=10_000)

        @cache.cached(ttl=60, key="user:{user_id}")
        def f(user_id: int) -> dict[str, object]:
            return flat(user_id)

    else:

        @cached(TTLCache(10_000, 60), lock=threading.Lock())
        def f(user_id: int) -> dict[str, object]:
            return flat(user_id)

    for i in range(10_100):
        f(i)
    for i in range(1_000_000, 1_000_000 + misses):
        f(i)


def _instructions(which: str, misses: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/out",
                sys.executable,
                __file__,
                "--run",
                which,
                str(misses),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
            check=True,
        )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no count:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    if sys.argv[1:2] == ["--run"]:
        _workload(sys.argv[2], int(sys.argv[3]))
        return
    per_miss = {}
    for which in ("coalesce", "cachetools"):
        per_miss[which] = (_instructions(which, 6_000) - _instructions(which, 1_000)) // 5_000
        print(f"{which}: {per_miss[which]:,} instructions per miss")
    print(f"ratio: {per_miss['coalesce'] / per_miss['cachetools']:.2f}x (goal: time <= 1.5x)")


if __name__ == "__main__":
    main()
