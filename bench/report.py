"""docs/BENCHMARKS.md from a run's results: medians of the repetitions, min–max, ratios, goals."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

# The written analysis survives re-runs: everything below this line is kept.
KEEP_MARKER = "<!-- hand-written below: kept by bench/report.py -->"


def _fmt(values: list[float], unit: str = "", scale: float = 1.0, digits: int = 0) -> str:
    values = [v * scale for v in values if v == v]  # drop NaN
    if not values:
        return "n/a"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:,.{digits}f}{unit}"
    return f"{med:,.{digits}f}{unit} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def _ratio(a: float, b: float) -> str:
    if a != a or b != b or b == 0:
        return "n/a"
    return f"{a / b:.2f}×"


def _machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    pg = subprocess.run(["psql", "--version"], capture_output=True, text=True).stdout.strip()
    return f"{os.cpu_count()} cores, {cpu}; Python {platform.python_version()}; {pg}; {platform.platform()}"


def _versions() -> str:
    """The libraries the numbers depend on (FastAPI's per-request cost grew between releases)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in (
        "fastapi",
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "asyncpg",
        "sse-starlette",
    ):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)


def _fan_rows(results: dict[str, Any], name: str, n: int, rate: float) -> list[dict[str, Any]]:
    return [
        r for r in results.get(name, {}).get("fan_out", []) if r["n"] == n and r["rate"] == rate
    ]


def write_report(path: Path, results: dict[str, Any], plan: Any, seconds: float, argv: str) -> None:
    s, b = results.get("ssehub", {}), results.get("baseline", {})
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m bench`); raw numbers in `bench/results/`.",
        f"Machine: {_machine()}. Server pinned to CPU 0 (`taskset -c 0`), one worker; "
        "load generator (asyncio + uvloop, raw protocols) on CPU 1; Postgres unpinned.",
        f"Libraries: {_versions()}.",
        f"Run: `{' '.join(['python -m bench', argv]).strip()}`, {seconds:.0f} s; medians of {plan.reps} runs with (min–max).",
        "The baseline is the usual FastAPI tutorial (`bench/baseline/app.py`): dict of queues, "
        "JSON per subscriber, sse-starlette, no auth, no persistence.",
        "",
        "## Idle memory per open stream (server RSS growth / N)",
        "",
        "| N | ssehub | baseline |",
        "| --- | --- | --- |",
    ]
    for n in plan.memory_counts:
        key = f"kib_per_stream_{n}"
        lines.append(
            f"| {n:,} | {s.get('memory', {}).get(key, float('nan')):.1f} KiB "
            f"| {b.get('memory', {}).get(key, float('nan')):.1f} KiB |"
        )
    lines += [
        "",
        f"## Fan-out: N subscribers on one channel, publishing for {plan.seconds:.0f} s",
        "",
        "| N × events/s | wanted/s | ssehub delivered/s | % | p50 / p99 ms | baseline delivered/s | % | p50 / p99 ms | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in plan.fan_out_n:
        for rate in plan.rates:
            sr, br = _fan_rows(results, "ssehub", n, rate), _fan_rows(results, "baseline", n, rate)

            def cell(rows: list[dict[str, Any]]) -> list[str]:
                return [
                    _fmt([r["delivered_per_s"] for r in rows]),
                    _fmt([r["pct_delivered"] for r in rows], "%"),
                    f"{_fmt([r['p50_ms'] for r in rows])} / {_fmt([r['p99_ms'] for r in rows])}",
                ]

            ratio = _ratio(
                _median([r["delivered_per_s"] for r in sr]),
                _median([r["delivered_per_s"] for r in br]),
            )
            lines.append(
                f"| {n:,} × {rate:.0f} | {n * rate:,.0f} | "
                + " | ".join(cell(sr))
                + " | "
                + " | ".join(cell(br))
                + f" | {ratio} |"
            )
    lean = results.get("lean", {}).get("fan_out", [])
    if lean:
        lines += [
            "",
            "## sse-starlette vs. a lean response (same tutorial server otherwise)",
            "",
            "`bench/baseline/lean.py` is the baseline with only the response replaced: a raw "
            "ASGI response, frame encoded once per event, one writer task per stream, all "
            "pending frames in one `send`. One run each.",
            "",
            "| N × events/s | wanted/s | sse-starlette delivered/s | % | p50 / p99 ms "
            "| lean delivered/s | % | p50 / p99 ms | ratio |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in lean:
            base = _fan_rows(results, "baseline", row["n"], row["rate"])

            def brief(rows: list[dict[str, Any]]) -> str:
                return " | ".join(
                    [
                        _fmt([r["delivered_per_s"] for r in rows]),
                        _fmt([r["pct_delivered"] for r in rows], "%"),
                        f"{_fmt([r['p50_ms'] for r in rows])} / {_fmt([r['p99_ms'] for r in rows])}",
                    ]
                )

            ratio = _ratio(row["delivered_per_s"], _median([r["delivered_per_s"] for r in base]))
            lines.append(
                f"| {row['n']:,} × {row['rate']:.0f} | {row['n'] * row['rate']:,.0f} | "
                f"{brief(base)} | {brief([row])} | {ratio} |"
            )
    lines += [
        "",
        "## Resume: connect with Last-Event-ID → last missed event received",
        "",
        "| missed events | ssehub | baseline |",
        "| --- | --- | --- |",
    ]
    for size in plan.resume_sizes:
        times = s.get("resume", {}).get(size) or s.get("resume", {}).get(str(size)) or []
        lines.append(f"| {size:,} | {_fmt(times, ' ms', 1000)} | n/a (no history) |")
    lines += [
        "",
        "## Publish throughput",
        "",
        "| mode | ssehub events/s | baseline events/s |",
        "| --- | --- | --- |",
        f"| single events, 32 concurrent clients | {_fmt(s.get('publish_single', []))} "
        f"| {_fmt(b.get('publish_single', []))} (in memory, nothing stored) |",
        f"| batches of 1000, 4 concurrent clients | {_fmt(s.get('publish_batch', []))} | n/a |",
        "",
        "## Goals",
        "",
        "| figure | goal | ssehub | met? |",
        "| --- | --- | --- | --- |",
    ]
    big = max(plan.fan_out_n)
    r10 = _fan_rows(results, "ssehub", big, 10)
    r100 = _fan_rows(results, "ssehub", big, 100)
    b100 = _fan_rows(results, "baseline", big, 100)
    pct10, p99_10 = _median([r["pct_delivered"] for r in r10]), _median([r["p99_ms"] for r in r10])
    sat, base_sat = (
        _median([r["delivered_per_s"] for r in r100]),
        _median([r["delivered_per_s"] for r in b100]),
    )
    mem = s.get("memory", {}).get(f"kib_per_stream_{max(plan.memory_counts)}", float("nan"))
    res = _median(
        s.get("resume", {}).get(max(plan.resume_sizes))
        or s.get("resume", {}).get(str(max(plan.resume_sizes)))
        or []
    )
    single, batch = _median(s.get("publish_single", [])), _median(s.get("publish_batch", []))

    def met(ok: bool) -> str:
        return "yes" if ok else "**no**"

    lines += [
        f"| {big:,} subscribers × 10 events/s | all delivered, p99 ≤ 200 ms | {pct10:.1f}%, p99 {p99_10:.0f} ms | {met(pct10 >= 99.9 and p99_10 <= 200)} |",
        f"| delivered/s at saturation ({big:,} × 100/s) | ≥ 2 × baseline | {sat:,.0f}/s vs {base_sat:,.0f}/s = {_ratio(sat, base_sat)} | {met(sat >= 2 * base_sat)} |",
        f"| memory per idle stream | ≤ 15 KiB | {mem:.1f} KiB | {met(mem <= 15)} |",
        f"| resume {max(plan.resume_sizes):,} missed events | ≤ 150 ms | {res * 1000:.0f} ms | {met(res <= 0.150)} |",
        f"| single publishes, 32 clients | ≥ 2,000/s | {single:,.0f}/s | {met(single >= 2000)} |",
        f"| events/s in batches | ≥ 50,000/s | {batch:,.0f}/s | {met(batch >= 50000)} |",
        "",
    ]
    kept = ""
    if path.exists() and KEEP_MARKER in path.read_text():
        kept = path.read_text().split(KEEP_MARKER, 1)[1]
    path.write_text("\n".join(lines) + "\n" + KEEP_MARKER + (kept or "\n"))
