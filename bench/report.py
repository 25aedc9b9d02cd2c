"""docs/BENCHMARKS.md from a run's results: issue #14's goals met or missed,
medians with min–max, ratios to Nchan and to pgbench, and what each figure
cost the load generator and the server.

Two rules keep a figure honest on a 2-core machine whose speed drifts:

- a figure taken while the load generator's core was (nearly) full is
  flagged "load generator bound": it may be the harness's, not the server's;
- a ratio to Nchan's latency counts only from runs in which Nchan (the
  anchor) delivered everything with CPU to spare, its server's and the load
  generator's; otherwise it says why it is not valid.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.cost import BOUND_PCT, loadgen_busy, server_busy

# The written analysis survives re-runs: everything below this line is kept.
KEEP_MARKER = "<!-- hand-written below: kept by bench/report.py -->"

NAMES = {"ssehub": "ssehub", "nchan": "Nchan", "baseline": "tutorial", "lean": "lean tutorial"}
ALL_DELIVERED_PCT = 99.9

Rows = list[dict[str, Any]]


# -- numbers ---------------------------------------------------------------------------


def _clean(values: list[float]) -> list[float]:
    return [float(v) for v in values if v == v]  # drop NaN


def _median(values: list[float]) -> float:
    values = _clean(values)
    return statistics.median(values) if values else float("nan")


def _fmt(values: list[float], unit: str = "", scale: float = 1.0, digits: int = 0) -> str:
    """Median (min–max) of the repetitions."""
    values = [v * scale for v in _clean(values)]
    if not values:
        return "n/a"
    med = statistics.median(values)
    if len(values) == 1 or min(values) == max(values):
        return f"{med:,.{digits}f}{unit}"
    return f"{med:,.{digits}f}{unit} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


def _one(value: float, unit: str = "", digits: int = 0) -> str:
    return "n/a" if value != value else f"{value:,.{digits}f}{unit}"


def _ratio(a: float, b: float) -> float:
    return a / b if a == a and b == b and b else float("nan")


def _times(value: float) -> str:
    return "n/a" if value != value else f"{value:.2f}×"


def _col(rows: Rows, key: str) -> list[float]:
    return [float(r.get(key, float("nan"))) for r in rows]


# -- flags -----------------------------------------------------------------------------


def _bound_count(rows: Rows) -> int:
    return sum(1 for r in rows if loadgen_busy(r) >= BOUND_PCT)


def _flags(rows: Rows) -> str:
    """What limited these runs, if not the server alone."""
    flags = []
    bound = _bound_count(rows)
    if bound:
        flags.append(f"**load generator bound** ({bound}/{len(rows)})")
    saturated = sum(1 for r in rows if server_busy(r) >= BOUND_PCT)
    if saturated:
        flags.append(f"server core full ({saturated}/{len(rows)})")
    return ", ".join(flags)


def _mostly_bound(rows: Rows) -> bool:
    return bool(rows) and _bound_count(rows) * 2 > len(rows)


def anchor_fault(row: dict[str, Any]) -> str:
    """Why this run of Nchan is no anchor for a latency ratio ("" if it is one)."""
    faults = []
    if row.get("pct_delivered", 0) < ALL_DELIVERED_PCT:
        faults.append(f"delivered {row.get('pct_delivered', 0):.1f}%")
    if server_busy(row) >= BOUND_PCT:
        faults.append(f"its core {server_busy(row):.0f}% busy")
    if loadgen_busy(row) >= BOUND_PCT:
        faults.append(f"load generator {loadgen_busy(row):.0f}% busy")
    return ", ".join(faults)


def _anchor_runs(rows: Rows) -> tuple[Rows, str]:
    """Nchan's valid runs, and a note saying how many of how many (and why not)."""
    valid = [r for r in rows if not anchor_fault(r)]
    if not rows:
        return [], "no Nchan runs"
    if len(valid) == len(rows):
        return valid, f"valid ({len(rows)}/{len(rows)})"
    faults = "; ".join(anchor_fault(r) for r in rows if anchor_fault(r))
    return valid, f"valid in {len(valid)}/{len(rows)}: {faults}"


# -- the machine -----------------------------------------------------------------------


def _command(*args: str) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, check=False)
    except OSError:
        return "not found"
    return (done.stdout + done.stderr).strip().splitlines()[0] if done.stdout + done.stderr else ""


def _machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    pg = _command("psql", "--version")
    return f"{os.cpu_count()} cores, {cpu}; Python {platform.python_version()}; {pg}; {platform.platform()}"


def _versions() -> str:
    """The libraries the numbers depend on (FastAPI's per-request cost grew between releases)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("fastapi", "starlette", "uvicorn", "uvloop", "httptools", "asyncpg"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    from bench.targets import NGINX

    nginx = _command(NGINX, "-v").removeprefix("nginx version: ")
    nchan = _command("dpkg-query", "-W", "-f", "${Version}", "libnginx-mod-nchan")
    pgbench = _command("pgbench", "--version")
    return ", ".join(found) + f"; {nginx} with libnginx-mod-nchan {nchan}; {pgbench}"


# -- sections --------------------------------------------------------------------------


def _fan_rows(results: dict[str, Any], name: str, n: int, rate: float) -> Rows:
    return [
        r for r in results.get(name, {}).get("fan_out", []) if r["n"] == n and r["rate"] == rate
    ]


def _targets(results: dict[str, Any], key: str) -> list[str]:
    return [name for name in NAMES if results.get(name, {}).get(key)]


def _header(results: dict[str, Any], plan: Any, seconds: float, argv: str) -> list[str]:
    measured = results.get("measured_at", {})
    when = ", ".join(f"{NAMES.get(k, k)} {v}" for k, v in measured.items())
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m bench`); raw numbers in `bench/results/`.",
        f"Machine: {_machine()}.",
        f"Versions: {_versions()}.",
        f"Run: `{' '.join(['python -m bench', argv]).strip()}`, {seconds:.0f} s; "
        f"medians of {plan.reps} runs with (min–max). Measured: {when}.",
    ]
    if "--quick" in argv:
        lines.append(
            "**A smoke run (`--quick`)**: small numbers, one repetition, to check that "
            "every scenario works; not for comparison."
        )
    if len(set(measured.values())) > 1:
        lines.append(
            "**Not one run**: `--only` kept some targets' figures from an earlier run, "
            "so ratios between them compare different hours of a drifting machine."
        )
    lines += [
        "",
        "Each server runs on CPU 0 (`taskset -c 0`), one process or worker: ssehub "
        "(`ssehub serve`, Postgres unpinned), Nchan (Debian's nginx with "
        "libnginx-mod-nchan, `bench/nchan/nginx.conf.template`, one worker). The load "
        "generator (one Python process: asyncio + uvloop, raw protocols) runs on CPU 1. "
        "Nchan is published the event object ssehub would frame, so both send frames "
        "of about the same size (bytes/event below).",
        "",
        "How to read the cost columns: *server busy* is the server's processes' CPU "
        "(utime + stime, `/proc/PID/stat`; ssehub's Postgres not included) + the time "
        "they waited for their core (run queue, `/proc/PID/task/*/schedstat`); *load "
        "gen busy* is the same for the load generator (`getrusage`); both in % of one "
        "core over the measured window. *events/read* is events counted per "
        "`data_received` call of the load generator. A figure taken with the load "
        f"generator ≥ {BOUND_PCT:.0f}% busy is flagged **load "
        "generator bound**: it may be the harness's, not the server's. A ratio to "
        "Nchan's latency counts only from runs in which Nchan delivered "
        f"≥ {ALL_DELIVERED_PCT}% of the events with both its core and the load "
        f"generator's < {BOUND_PCT:.0f}% busy; otherwise the ratio says it is not valid.",
        "",
    ]
    return lines


def _goals(results: dict[str, Any], plan: Any) -> list[str]:
    goals = Goals(results, plan)
    lines = [
        "## Goals (issue #14)",
        "",
        "| figure | goal | ssehub | reference | ratio | met? |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in goals.rows():
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


class Goals:
    """Issue #14's goals, each computed from this run's numbers."""

    def __init__(self, results: dict[str, Any], plan: Any) -> None:
        self.results, self.plan = results, plan
        self.s, self.pg = results.get("ssehub", {}), results.get("pgbench", {})

    def rows(self) -> list[list[str]]:
        rows: list[list[str]] = []
        fan = self.plan.fan_out
        if len(fan) >= 2:
            light, wide = fan[0], fan[1]
            rows.append(self._latency(light, "p99_ms", 1.5))
            rows.append(self._latency(wide, "p99_ms", 1.2))
            rows.append(self._latency(light, "p50_ms", 1.2))
            rows.append(self._latency(wide, "p50_ms", 1.2))
        rows.append(self._opening())
        rows.append(self._storm())
        rows.append(self._memory())
        if len(fan) >= 3:
            rows.append(self._saturation(fan[2]))
        rows.append(self._publishing("batch", 0.7, "1,000-row inserts"))
        rows.append(self._publishing("single", 1.0, "one-row commits"))
        return rows

    def _latency(self, row: tuple[int, float], key: str, limit: float) -> list[str]:
        n, rate = row
        label = f"{key[:3]} at {n:,} × {rate:.0f}/s"
        ours = _fan_rows(self.results, "ssehub", n, rate)
        valid, note = _anchor_runs(_fan_rows(self.results, "nchan", n, rate))
        mine, theirs = _median(_col(ours, key)), _median(_col(valid, key))
        ratio = _ratio(mine, theirs)
        if not valid:
            verdict = f"n/a: Nchan no valid anchor ({note})"
        else:
            verdict = _met(ratio, ratio <= limit) + _bound_note(ours)
        return [
            label,
            f"≤ {limit}× Nchan's",
            _one(mine, " ms"),
            f"Nchan {_one(theirs, ' ms')}",
            _times(ratio),
            verdict,
        ]

    def _opening(self) -> list[str]:
        ours = self.s.get("open_rate", [])
        theirs = self.results.get("nchan", {}).get("open_rate", [])
        mine, ref = _median(_col(ours, "per_s")), _median(_col(theirs, "per_s"))
        ratio = _ratio(mine, ref)
        return [
            f"{self.plan.open_n:,} streams opened (auth + resume position)",
            "≥ 0.6× Nchan's rate",
            _one(mine, "/s"),
            f"Nchan {_one(ref, '/s')}",
            _times(ratio),
            _met(ratio, ratio >= 0.6) + _bound_note(ours, theirs),
        ]

    def _storm(self) -> list[str]:
        ours = self.s.get("storm", [])
        theirs = self.results.get("nchan", {}).get("storm", [])
        mine = _median(_col(ours, "seconds"))
        everyone = all(r["caught_up"] == r["n"] for r in ours)
        return [
            f"{self.plan.storm_n:,} clients reconnect after a restart, {self.plan.storm_missed} missed each",
            "all caught up ≤ 5 s",
            _one(mine, " s", 2),
            f"Nchan {_one(_median(_col(theirs, 'seconds')), ' s', 2)} (not restarted)",
            "",
            _met(mine, everyone and mine <= 5) + _bound_note(ours),
        ]

    def _memory(self) -> list[str]:
        key = f"kib_per_stream_{max(self.plan.memory_counts)}"
        mine = self.s.get("memory", {}).get(key, float("nan"))
        ref = self.results.get("nchan", {}).get("memory", {}).get(key, float("nan"))
        return [
            "memory per idle stream",
            "≤ 10 KiB",
            _one(mine, " KiB", 1),
            f"Nchan {_one(ref, ' KiB', 1)}",
            _times(_ratio(mine, ref)),
            _met(mine, mine <= 10),
        ]

    def _saturation(self, row: tuple[int, float]) -> list[str]:
        n, rate = row
        ours = _fan_rows(self.results, "ssehub", n, rate)
        theirs = _fan_rows(self.results, "nchan", n, rate)
        mine = _median(_col(ours, "delivered_per_s"))
        ref = _median(_col(theirs, "delivered_per_s"))
        ratio = _ratio(mine, ref)
        return [
            f"delivered/s at {n:,} × {rate:.0f}/s",
            "≥ 3× Nchan's",
            _one(mine, "/s"),
            f"Nchan {_one(ref, '/s')}",
            _times(ratio),
            _met(ratio, ratio >= 3) + _bound_note(ours, theirs),
        ]

    def _publishing(self, mode: str, limit: float, what: str) -> list[str]:
        ours = self.s.get("publish", {}).get(mode, [])
        theirs = self.pg.get(mode, [])
        mine, ref = _median(_col(ours, "per_s")), _median(_col(theirs, "per_s"))
        ratio = _ratio(mine, ref)
        label = "events/s in batches of 1,000" if mode == "batch" else "single publishes/s"
        return [
            label,
            f"≥ {limit}× pgbench's {what}",
            _one(mine, "/s"),
            f"pgbench {_one(ref, '/s')}",
            _times(ratio),
            _met(ratio, ratio >= limit) + _bound_note(ours),
        ]


def _met(value: float, ok: bool) -> str:
    """A goal's verdict; "n/a" when its figure is missing (a target not run)."""
    if value != value:
        return "n/a"
    return "yes" if ok else "**no**"


def _bound_note(ours: Rows, theirs: Rows | None = None) -> str:
    """Which side of a figure or ratio the load generator may have set."""
    sides = [
        name for name, rows in (("ssehub", ours), ("Nchan", theirs or [])) if _mostly_bound(rows)
    ]
    if not sides:
        return ""
    return f" ({' and '.join(sides)}: load generator bound, may be the measurement)"


def _memory(results: dict[str, Any], plan: Any) -> list[str]:
    names = _targets(results, "memory")
    lines = [
        "## Idle memory per open stream (server RSS growth / N)",
        "",
        "| N | " + " | ".join(NAMES[n] for n in names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    for count in plan.memory_counts:
        key = f"kib_per_stream_{count}"
        cells = [_one(results[n]["memory"].get(key, float("nan")), " KiB", 1) for n in names]
        lines.append(f"| {count:,} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _busy(rows: Rows, who: str) -> str:
    """``CPU + run-queue wait`` in % of one core, medians: on an idle machine the
    wait is ~0; a large one says another process shared the core."""
    cpu = _median(_col(rows, f"{who}_cpu_pct"))
    if cpu != cpu:
        return "n/a"
    return f"{cpu:.0f} + {_median(_col(rows, f'{who}_wait_pct')):.0f}%"


def _cost_cells(rows: Rows) -> list[str]:
    return [
        _busy(rows, "server"),
        _busy(rows, "loadgen"),
        _one(_median(_col(rows, "events_per_read")), "", 1),
        _one(_median(_col(rows, "bytes_per_event"))),
        _flags(rows),
    ]


def _fan_out(results: dict[str, Any], plan: Any) -> list[str]:
    names = _targets(results, "fan_out")
    lines = [
        f"## Fan-out: N subscribers on one channel, publishing for {plan.seconds:g} s",
        "",
        "| N × events/s | server | delivered/s (wanted) | % | p50 ms | p99 ms "
        "| server busy | load gen busy | events/read | bytes/event | limited by |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n, rate in plan.fan_out:
        for name in names:
            rows = _fan_rows(results, name, n, rate)
            if not rows:
                continue
            cells = [
                f"{n:,} × {rate:g}",
                NAMES[name],
                f"{_fmt(_col(rows, 'delivered_per_s'))} ({n * rate:,.0f})",
                _fmt(_col(rows, "pct_delivered"), "%"),
                _fmt(_col(rows, "p50_ms")),
                _fmt(_col(rows, "p99_ms")),
                *_cost_cells(rows),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "ssehub ÷ Nchan (latency ratios from Nchan's valid runs only):",
        "",
        "| N × events/s | p50 | p99 | delivered/s | Nchan as anchor |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n, rate in plan.fan_out:
        ours = _fan_rows(results, "ssehub", n, rate)
        theirs = _fan_rows(results, "nchan", n, rate)
        valid, note = _anchor_runs(theirs)

        def latency(key: str, ours: Rows = ours, valid: Rows = valid) -> str:
            if not valid:
                return "not valid"
            return _times(_ratio(_median(_col(ours, key)), _median(_col(valid, key))))

        throughput = _ratio(
            _median(_col(ours, "delivered_per_s")), _median(_col(theirs, "delivered_per_s"))
        )
        lines.append(
            f"| {n:,} × {rate:g} | {latency('p50_ms')} | {latency('p99_ms')} "
            f"| {_times(throughput)} | {note} |"
        )
    return [*lines, ""]


def _table(
    title: str, intro: str, header: list[str], names: list[str], cells: Callable[[str], list[str]]
) -> list[str]:
    lines = [title, "", intro, "", "| " + " | ".join(header) + " |"]
    lines.append("|" + " --- |" * len(header))
    for name in names:
        lines.append(f"| {NAMES[name]} | " + " | ".join(cells(name)) + " |")
    return [*lines, ""]


def _opening(results: dict[str, Any], plan: Any) -> list[str]:
    def cells(name: str) -> list[str]:
        rows = results[name]["open_rate"]
        return [
            _fmt(_col(rows, "per_s")),
            f"{_fmt(_col(rows, 'p50_ms'))} / {_fmt(_col(rows, 'p99_ms'))}",
            _fmt(_col(rows, "failed")),
            *_cost_cells(rows)[:2],
            _flags(rows),
        ]

    return _table(
        f"## Opening {plan.open_n:,} streams",
        "As fast as the load generator opens them (1,000 at a time), each with its "
        "credentials (ssehub: a stream token; Nchan needs none) and a resume position "
        "(`Last-Event-ID`: the channel's last event, so nothing is replayed); from the "
        "first connect to the last stream's response headers.",
        [
            "server",
            "streams/s",
            "p50 / p99 ms per stream",
            "failed",
            "server busy",
            "load gen busy",
            "limited by",
        ],
        _targets(results, "open_rate"),
        cells,
    )


def _storm(results: dict[str, Any], plan: Any) -> list[str]:
    def cells(name: str) -> list[str]:
        rows = results[name]["storm"]
        caught = min((r["caught_up"] for r in rows), default=0)
        return [
            _fmt(_col(rows, "seconds"), " s", digits=2),
            f"{caught:,} of {plan.storm_n:,}",
            _fmt(_col(rows, "opened_s"), " s", digits=2),
            "yes" if all(r["restarted"] for r in rows) else "no (history in memory)",
            *_cost_cells(rows),
        ]

    return _table(
        f"## Reconnect storm: {plan.storm_n:,} clients, each {plan.storm_missed} events behind",
        f"{plan.storm_missed} events published, then {plan.storm_n:,} clients connect "
        "(1,000 at a time) with `Last-Event-ID` = the event before them (ssehub: its "
        "integer id; Nchan: its own `<time>:<tag>` id); time from the first connect "
        "until every client has all of them. ssehub is restarted in between (a cold "
        "process, the events only in Postgres).",
        [
            "server",
            "all caught up",
            "clients caught up (worst run)",
            "all connected in",
            "restarted",
            "server busy",
            "load gen busy",
            "events/read",
            "bytes/event",
            "limited by",
        ],
        _targets(results, "storm"),
        cells,
    )


def _resume(results: dict[str, Any], plan: Any) -> list[str]:
    names = _targets(results, "resume")
    lines = [
        "## Resume: one client connects with Last-Event-ID → last missed event received",
        "",
        "| missed events | " + " | ".join(NAMES[n] for n in names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    for size in plan.resume_sizes:
        cells = []
        for name in names:
            runs = results[name]["resume"]
            rows = runs.get(size) or runs.get(str(size)) or []
            cells.append(_fmt(_col(rows, "seconds"), " ms", 1000))
        lines.append(f"| {size:,} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _publishing(results: dict[str, Any], plan: Any) -> list[str]:
    s = results.get("ssehub", {}).get("publish", {})
    pg = results.get("pgbench", {})
    lines = [
        "## Publishing, against Postgres alone (pgbench)",
        "",
        "pgbench inserts into a table of the same shape as ssehub's `events`, in a "
        "scratch database of the same Postgres, rows with data of the same size, with "
        "the same clients for the same seconds as ssehub's publishers (`bench/pgbench.py`).",
        "",
        "| mode | ssehub events/s | pgbench rows/s | ratio | server busy "
        "| load gen busy | pgbench's CPU |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    modes = {"single": "one event per request / one row per commit, 32 clients"}
    modes["batch"] = "1,000 per request / per commit, 4 clients"
    for mode, label in modes.items():
        ours, theirs = s.get(mode, []), pg.get(mode, [])
        ratio = _ratio(_median(_col(ours, "per_s")), _median(_col(theirs, "per_s")))
        lines.append(
            f"| {label} | {_fmt(_col(ours, 'per_s'))} | {_fmt(_col(theirs, 'per_s'))} "
            f"| {_times(ratio)} | {_busy(ours, 'server')} | {_busy(ours, 'loadgen')} "
            f"| {_one(_median(_col(theirs, 'loadgen_cpu_pct')), '%')} |"
        )
    one = pg.get("batch_one", [])
    if one:
        ratio = _ratio(_median(_col(s.get("batch", []), "per_s")), _median(_col(one, "per_s")))
        lines += [
            "",
            f"pgbench with 1 client, 1,000 rows per commit: {_fmt(_col(one, 'per_s'))} rows/s, "
            "what one connection writing one transaction at a time does: the ceiling of "
            "ssehub's one ordered writer (its lock admits one publishing transaction at a "
            f"time). ssehub's batches reach {_times(ratio)} of it.",
        ]
    tutorial = results.get("baseline", {}).get("publish", {}).get("single", [])
    if tutorial:
        lines += [
            "",
            f"The tutorial, which stores nothing: {_fmt(_col(tutorial, 'per_s'))} single publishes/s.",
        ]
    return [*lines, ""]


def _enqueue(results: dict[str, Any]) -> list[str]:
    """``bench.enqueue``: throughput against pgbench, drain, commit -> stream."""
    e = results["enqueue"]
    plain, notify, ours = e.get("plain", []), e.get("notify", []), e.get("enqueue", [])
    base = _median(_col(plain, "per_s"))
    ratio = _ratio(_median(_col(ours, "per_s")), base)
    lines = [
        "## Publishing from SQL: `ssehub_enqueue` against INSERT (pgbench)",
        "",
        "pgbench, 16 clients, one event per transaction, the three legs alternating "
        "(`bench/enqueue.py`): a single-row INSERT into a table shaped like `events`; "
        "the same with `pg_notify` in the transaction; `SELECT ssehub_enqueue(...)` with "
        "one ssehub instance moving the inbox meanwhile. Goal: enqueue ≥ 0.7× plain "
        f"INSERT: {_times(ratio)}, met: {_met(ratio, ratio >= 0.7)}.",
        "",
        "| leg | tx/s | ratio to INSERT | pgbench's CPU | inbox left at stop | drain |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, rows in (
        ("INSERT", plain),
        ("INSERT + pg_notify", notify),
        ("ssehub_enqueue", ours),
    ):
        drained = ""
        backlog = ""
        if rows is ours:
            backlog = _fmt(_col(rows, "backlog"))
            drained = _fmt(_col(rows, "drain_s"), " ms", 1000)
        lines.append(
            f"| {label} | {_fmt(_col(rows, 'per_s'))} "
            f"| {_times(_ratio(_median(_col(rows, 'per_s')), base))} "
            f"| {_one(_median(_col(rows, 'loadgen_cpu_pct')), '%')} | {backlog} | {drained} |"
        )
    lines += _mover_profile(ours)
    lines += [
        "",
        "Commit → stream: 16 connections enqueue on schedule, one transaction each; "
        "the time each commit returned against the time its event arrived on one stream.",
        "",
        "| rate | achieved | delivered | p50 | p99 | max | server busy | load gen busy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in e.get("latency", []):
        lines.append(
            f"| {row['rate']:,.0f}/s | {row['achieved']:,.0f}/s "
            f"| {row['delivered']:,} of {row['sent']:,} | {row['p50_ms']:.1f} ms "
            f"| {row['p99_ms']:.1f} ms | {row['max_ms']:.1f} ms "
            f"| {_busy([row], 'server')} | {_busy([row], 'loadgen')} |"
        )
    lines += [
        "",
        "Why the figures are what they are: *Publishing from SQL: what the figures say*, below.",
    ]
    return [*lines, ""]


def _mover_profile(rows: list[dict[str, Any]]) -> list[str]:
    """The mover's Postgres backend while pgbench enqueued, and while it drained."""
    if not rows or "mover_loaded" not in rows[0]:
        return []
    lines = [
        "",
        "The mover's Postgres backend (`ssehub-writer`), while pgbench enqueues and while "
        "the inbox drains (`bench.enqueue.MoverProfile`): events appended, its CPU and its "
        "wait for a core (% of one core), and where `pg_stat_activity`, sampled every "
        "5 ms, found it.",
        "",
        "| phase | events/s | CPU | waiting for a core | CPU µs per event | where it was |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, key in (("enqueue leg", "mover_loaded"), ("drain", "mover_draining")):
        phase = [row[key] for row in rows]
        states: dict[str, list[float]] = {}
        for one in phase:
            for state, share in one["states"].items():
                states.setdefault(state, []).append(share)
        where = ", ".join(
            f"{state} {statistics.median(shares):.0f}%"
            for state, shares in sorted(states.items(), key=lambda kv: -sum(kv[1]))
        )
        lines.append(
            f"| {label} | {_fmt(_col(phase, 'moved_per_s'))} "
            f"| {_one(_median(_col(phase, 'cpu_pct')), '%')} "
            f"| {_one(_median(_col(phase, 'core_wait_pct')), '%')} "
            f"| {_one(_median(_col(phase, 'cpu_us_per_row')), ' µs')} | {where} |"
        )
    return lines


def write_report(path: Path, results: dict[str, Any], plan: Any, seconds: float, argv: str) -> None:
    lines = _header(results, plan, seconds, argv)
    lines += _goals(results, plan)
    lines += _memory(results, plan)
    lines += _fan_out(results, plan)
    if _targets(results, "open_rate"):
        lines += _opening(results, plan)
    if _targets(results, "storm"):
        lines += _storm(results, plan)
    if _targets(results, "resume"):
        lines += _resume(results, plan)
    lines += _publishing(results, plan)
    if results.get("enqueue"):
        lines += _enqueue(results)
    kept = ""
    if path.exists() and KEEP_MARKER in path.read_text():
        kept = path.read_text().split(KEEP_MARKER, 1)[1]
    path.write_text("\n".join(lines) + "\n" + KEEP_MARKER + (kept or "\n"))
