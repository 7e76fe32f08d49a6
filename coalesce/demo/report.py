"""The demo's report: the tables, where the time went, the verdict, and the chart.

Pure functions of the measured `Phase`s, so they are tested without running any load. The
report is built so that it cannot mislead by omission: the cold start (an empty cache, every
item asked for a first time) is shown apart from the steady state, because a cache changes
the second and not the first; whatever did not improve is said in words next to the numbers;
and a latency that is mostly the load generator's own work is shown as such, from the time
each response spent in the application and the CPU time each process used.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from coalesce.demo.load import LoadResult

COLD = "cold start"
STEADY = "steady state"
UNPROTECTED = "unprotected"
CACHED = "@cached"
RED, GREEN = "#c0392b", "#27ae60"


@dataclass
class Phase:
    """One route in one part of the load: the client's view (`load`) and the server's."""

    route: str  # UNPROTECTED or CACHED
    part: str  # COLD or STEADY
    load: LoadResult
    queries: int  # item queries the database ran, as the database counted them
    app_cpu: float = 0.0  # seconds of CPU the server process used (the app, and SQLite in it)
    hit_ratio: float | None = None  # cached route only
    coalesced: int | None = None  # cached route only


def pick(phases: Sequence[Phase], route: str, part: str) -> Phase:
    for phase in phases:
        if phase.route == route and phase.part == part:
            return phase
    raise LookupError(f"no {route} {part} phase")


def _ms(seconds: float) -> str:
    milliseconds = seconds * 1000
    if milliseconds >= 100:
        return f"{milliseconds:,.0f} ms"
    return f"{milliseconds:,.2f} ms" if milliseconds < 10 else f"{milliseconds:,.1f} ms"


def render_table(before: Phase, after: Phase) -> str:
    """One part's table: a measure per line, the unprotected route and then `@cached`."""

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    def count(value: int | None) -> str:
        return "-" if value is None else f"{value:,}"

    def cpu(phase: Phase) -> str:
        return f"{phase.app_cpu:.1f} s / {phase.load.cpu:.1f} s"

    rows = [
        ("requests", f"{before.load.planned:,}", f"{after.load.planned:,}"),
        ("database queries", f"{before.queries:,}", f"{after.queries:,}"),
        ("p50 latency", _ms(before.load.p(50)), _ms(after.load.p(50))),
        ("p99 latency", _ms(before.load.p(99)), _ms(after.load.p(99))),
        ("p50 time in the app", _ms(before.load.app_p(50)), _ms(after.load.app_p(50))),
        ("errors", f"{before.load.errors:,}", f"{after.load.errors:,}"),
        ("hit ratio", ratio(before.hit_ratio), ratio(after.hit_ratio)),
        ("coalesced followers", count(before.coalesced), count(after.coalesced)),
        (
            "throughput",
            f"{before.load.throughput:,.0f} req/s",
            f"{after.load.throughput:,.0f} req/s",
        ),
        ("wall time", f"{before.load.wall:.2f} s", f"{after.load.wall:.2f} s"),
        ("CPU app / load gen.", cpu(before), cpu(after)),
    ]
    label_width = max(len(row[0]) for row in rows)
    width = max(14, *(len(cell) for row in rows for cell in row[1:]))
    lines = [f"{'':<{label_width}}  {before.route:>{width}}  {after.route:>{width}}"]
    lines.append("-" * len(lines[0]))
    lines += [f"{label:<{label_width}}  {b:>{width}}  {a:>{width}}" for label, b, a in rows]
    return "\n".join(lines)


def where_the_time_goes(phases: Sequence[Phase], cores: int) -> list[str]:
    """Sentences that account for the latency left, from the app's timing and CPU times."""
    slow, fast = pick(phases, UNPROTECTED, STEADY), pick(phases, CACHED, STEADY)
    cold = pick(phases, CACHED, COLD)
    client, in_app = fast.load.p(50), fast.load.app_p(50)
    busy = fast.load.cpu / fast.load.wall if fast.load.wall > 0 else 0.0
    lines = [
        f"- @cached, steady state: a request took {_ms(client)} (p50) at the client, of which "
        f"{_ms(in_app)} in the application. The rest is the load generator: "
        f"its HTTP clients, all in one Python process, used {fast.load.cpu:.1f} s of CPU in "
        f"{fast.load.wall:.1f} s ({busy:.0%} of a core), on the {cores} cores it shares with "
        f"the server; a request waits for that process to get to it. A faster client, or the "
        f"server on its own machine, lowers this; the database queries saved stay saved.",
        f"- unprotected: {_ms(slow.load.app_p(50))} (p50) of each request is spent in the "
        f"application, most of it waiting for a database connection and then for the query "
        f"({slow.queries:,} queries, the server process used {slow.app_cpu:.1f} s of CPU "
        f"in {slow.load.wall:.1f} s).",
        f"- @cached, cold start: the cache was empty, so each item's first request still ran "
        f"its query ({cold.queries:,} queries for {cold.load.planned:,} requests"
        + (
            f"; {cold.coalesced:,} concurrent requests shared a query already running"
            if cold.coalesced
            else ""
        )
        + "): a cache makes repeated requests cheap, not first ones.",
    ]
    return lines


def verdict(phases: Sequence[Phase]) -> list[str]:
    """The headline, then a note for every measure @cached did not improve, with its reason."""
    lines = []
    total_before = sum(p.queries for p in phases if p.route == UNPROTECTED)
    total_after = sum(p.queries for p in phases if p.route == CACHED)
    requests = sum(p.load.planned for p in phases if p.route == CACHED)
    lines.append(
        f"result: {requests:,} requests cost {total_after:,} database queries with @cached "
        f"instead of {total_before:,} ({_fewer(total_before, total_after)})"
    )
    for part in (STEADY, COLD):
        before, after = pick(phases, UNPROTECTED, part), pick(phases, CACHED, part)
        lines.append(
            f"  {part + ':':<14}queries {before.queries:,} -> {after.queries:,}, "
            f"p50 {_ms(before.load.p(50))} -> {_ms(after.load.p(50))}, "
            f"p99 {_ms(before.load.p(99))} -> {_ms(after.load.p(99))}"
        )
    for part in (STEADY, COLD):
        before, after = pick(phases, UNPROTECTED, part), pick(phases, CACHED, part)
        worse = [
            name
            for name, b, a in (
                ("database queries", before.queries, after.queries),
                ("p50 latency", before.load.p(50), after.load.p(50)),
                ("p99 latency", before.load.p(99), after.load.p(99)),
            )
            if a >= b
        ]
        if not worse:
            continue
        why = (
            "each item's first request must still wait for its own query, so the slowest "
            "requests cost what they cost without a cache"
            if part == COLD
            else "something else took this machine's CPU during the run (run it again), or "
            "--ttl is shorter than the run"
        )
        lines.append(f"note: in the {part}, @cached did not lower the {', '.join(worse)}: {why}")
    return lines


def _fewer(before: int, after: int) -> str:
    if before == 0:
        return "no queries either way"
    if after == 0:
        return "all of them avoided"
    return f"{1 - after / before:.0%} fewer, {before / after:.1f}x"


def _wrap(line: str) -> str:
    """`line` in lines of at most 100 characters, never between a number and its unit."""
    glued = re.sub(r"(\d) (s|ms|queries)\b", "\\1\u00a0\\2", line)
    return textwrap.fill(glued, width=100, subsequent_indent="  ").replace("\u00a0", " ")


def render(phases: Sequence[Phase], cores: int) -> str:
    """The whole report: both tables, where the time goes, the verdict."""
    cold, steady = pick(phases, CACHED, COLD), pick(phases, CACHED, STEADY)
    blocks = [
        f"cold start: the cache is empty; every item is asked for a first time "
        f"({cold.load.planned:,} requests)\n" + render_table(pick(phases, UNPROTECTED, COLD), cold),
        f"steady state: the items are in the cache ({steady.load.planned:,} requests)\n"
        + render_table(pick(phases, UNPROTECTED, STEADY), steady),
        "where the time goes:\n"
        + "\n".join(_wrap(line) for line in where_the_time_goes(phases, cores)),
        "\n".join(_wrap(line) if line.startswith("note:") else line for line in verdict(phases)),
    ]
    return "\n\n".join(blocks)


def write_plot(pyplot: Any, path: str, phases: Sequence[Phase], database: str = "") -> None:
    """Three panels (database queries, p50, p99), each with both parts, values on the bars.

    The title is the headline: how many database queries `@cached` saved.
    """
    import importlib

    from coalesce.cli.remote import CliError

    ticker = importlib.import_module("matplotlib.ticker")
    figure, panels = pyplot.subplots(1, 3, figsize=(13, 4.8))
    parts = (COLD, STEADY)
    measures: tuple[tuple[str, Callable[[Phase], float], str], ...] = (
        ("database queries", lambda p: p.queries, "{:,.0f}"),
        ("p50 latency (ms)", lambda p: p.load.p(50) * 1000, "{:,.0f}"),
        ("p99 latency (ms)", lambda p: p.load.p(99) * 1000, "{:,.0f}"),
    )
    width = 0.38
    for panel, (title, measure, label) in zip(panels, measures, strict=True):
        for offset, route, color in ((-width / 2, UNPROTECTED, RED), (width / 2, CACHED, GREEN)):
            values = [measure(pick(phases, route, part)) for part in parts]
            bars = panel.bar(
                [i + offset for i in range(len(parts))], values, width, label=route, color=color
            )
            panel.bar_label(bars, labels=[label.format(v) for v in values], padding=2, fontsize=9)
        panel.set_xticks(range(len(parts)), list(parts))
        panel.set_title(title)
        panel.margins(y=0.15)
        panel.yaxis.set_major_formatter(ticker.StrMethodFormatter("{x:,.0f}"))
        panel.spines[["top", "right"]].set_visible(False)
    panels[0].legend(frameon=False)
    before = sum(p.queries for p in phases if p.route == UNPROTECTED)
    after = sum(p.queries for p in phases if p.route == CACHED)
    requests = sum(p.load.planned for p in phases if p.route == CACHED)
    figure.suptitle(
        f"@cached: {after:,} database queries instead of {before:,} for the same "
        f"{requests:,} requests ({_fewer(before, after)})",
        fontsize=14,
        fontweight="bold",
    )
    steady = pick(phases, CACHED, STEADY)
    figure.text(
        0.5,
        0.865,
        f"coalesce demo{' on ' + database if database else ''}. Cold start: an empty cache, "
        f"each item asked for a first time. Steady state: {steady.load.planned:,} requests, "
        "the items cached.\nLatency as measured by the load generator, which shares the "
        "machine's CPU cores with the server.",
        ha="center",
        fontsize=9.5,
        color="#555555",
    )
    figure.tight_layout(rect=(0, 0, 1, 0.85))
    try:
        figure.savefig(path, dpi=110)
    except OSError as exc:
        raise CliError(f"cannot write the chart to {path!r}: {exc.strerror or exc}") from exc
    finally:
        pyplot.close(figure)
