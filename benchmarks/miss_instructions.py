"""Instructions per sync memory miss, counted by valgrind's callgrind (noise-free).

    python benchmarks/miss_instructions.py            # coalesce and cachetools, ~2 minutes
    python benchmarks/miss_instructions.py --d1       # also first-level data-cache misses, ~4 min

Each library runs twice under `valgrind --tool=callgrind` (1,000 and 6,000 misses after a
10,100-call warm-up that fills the 10,000-entry cache, so every timed miss also evicts);
the difference divided by 5,000 is the cost of one miss, start-up and warm-up cancelled
out. The miss is `bench_core.py`'s: a key template, a flat 4-key dict, `copy=True` for
coalesce, `cachetools.cached(TTLCache(10_000, 60), lock=Lock())` for the reference.
Counts repeat exactly for the same binary, inputs and `PYTHONHASHSEED`, whatever else the
machine does; time ratios (`bench_core.py`) also pay for data-cache misses, which these
counts do not: `--d1` counts those too (valgrind's cachegrind, simulating this machine's
first-level caches and an 8 MB last level), the part of the time gap the counts miss.
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


def _counts(which: str, misses: int, d1: bool) -> tuple[int, int]:
    """(instructions, first-level data-cache read misses; 0 without `d1`) of one run."""
    with tempfile.TemporaryDirectory() as tmp:
        tool = (
            ["--tool=cachegrind", "--cache-sim=yes", "--LL=8388608,16,64"]
            if d1
            else ["--tool=callgrind"]
        )
        done = subprocess.run(
            [
                "valgrind",
                *tool,
                f"--{'cachegrind' if d1 else 'callgrind'}-out-file={tmp}/out",
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
    if not d1:
        found = re.search(r"Collected : (\d+)", done.stderr)
        if found is None:
            raise RuntimeError(f"callgrind printed no count:\n{done.stderr[-2000:]}")
        return int(found.group(1)), 0
    refs = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    d1_misses = re.search(r"D1  misses:\s+[\d,]+\s+\(\s*([\d,]+) rd", done.stderr)
    if refs is None or d1_misses is None:
        raise RuntimeError(f"cachegrind printed no counts:\n{done.stderr[-2000:]}")
    return int(refs.group(1).replace(",", "")), int(d1_misses.group(1).replace(",", ""))


def main() -> None:
    if sys.argv[1:2] == ["--run"]:
        _workload(sys.argv[2], int(sys.argv[3]))
        return
    d1 = "--d1" in sys.argv[1:]
    per_miss: dict[str, tuple[int, int]] = {}
    for which in ("coalesce", "cachetools"):
        few, many = _counts(which, 1_000, d1), _counts(which, 6_000, d1)
        per_miss[which] = ((many[0] - few[0]) // 5_000, (many[1] - few[1]) // 5_000)
        instructions, reads_missed = per_miss[which]
        extra = f", {reads_missed:,} D1 read misses" if d1 else ""
        print(f"{which}: {instructions:,} instructions per miss{extra}")
    ours, theirs = per_miss["coalesce"], per_miss["cachetools"]
    print(f"ratio: {ours[0] / theirs[0]:.2f}x in instructions (goal: time <= 1.5x)")
    if d1:
        print(f"ratio: {ours[1] / theirs[1]:.2f}x in D1 read misses")


if __name__ == "__main__":
    main()
