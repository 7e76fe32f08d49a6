"""The short chaos suite: three scenarios of `benchmarks/chaos.py`, asserting invariants only.

Each scenario runs real processes on loopback (two redis-servers, `uvicorn --workers 2` with
the cached app of `benchmarks/chaos_app.py`, two load-generator processes), breaks something
mid-load and stops everything by pid (`chaos.run_scenario`). The assertions hold whatever
the machine's speed and whatever the fixes in flight change in the numbers:

* no wrong value (another key's value, a version never written, a malformed body);
* nothing stale: no answer older than an invalidation that finished more than
  `BROADCAST_GRACE` (250 ms, the near caches of other processes hear invalidations by a
  pub/sub broadcast) before the request was sent; and the control key, bumped without
  invalidation, *is* seen stale, so the detector works in the very same run;
* every request answered, with a 2xx: the documented fail mode is fail-open
  (`on_backend_error="compute"`, the default), so while the cache Redis is down the app
  computes directly and still answers 200; a request whose connection a killed worker reset
  is retried once (as a proxy retries an idempotent GET) and must then be answered; no request
  waits 10 s (`REQUEST_TIMEOUT`) for an answer.

Timings (latencies, computations per second, recovery) are printed for the log, never
asserted: the full numbers live in `benchmarks/results/chaos.md`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import chaos

pytestmark = pytest.mark.timeout(150)


@pytest.mark.parametrize("name", chaos.CI_SCENARIOS)
def test_chaos_scenario_keeps_the_invariants(name: str) -> None:
    result = chaos.run_scenario(name, quick=True, log=lambda _: None)
    print(chaos.table([result]))
    summary = f"{result}"
    assert not result.notes or all("overran" not in n for n in result.notes), summary
    assert result.requests >= 200, summary  # the load ran (and through the fault)
    assert result.control_stale > 0, summary  # the stale detector sees staleness
    assert result.invalidations >= 5, summary  # and had invalidations to check against
    assert result.wrong == 0, (result.wrong_examples, summary)
    assert result.stale == 0, (result.stale_examples, summary)
    assert result.lost == 0, summary  # no request waited REQUEST_TIMEOUT
    assert result.errors == 0, summary  # answered, at worst after one retry
    assert result.non_2xx == 0, summary  # fail-open: computed directly while Redis is down
