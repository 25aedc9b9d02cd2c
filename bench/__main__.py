"""Run every scenario against ssehub, Nchan and the FastAPI tutorial, pgbench for
the publish ceiling, and ssehub_enqueue against pgbench's INSERT; write docs/BENCHMARKS.md.

    python -m bench             # the full plan (about 7 minutes on 2 cores)
    python -m bench --quick     # a smoke run with small numbers (bench/results/quick.md)
    python -m bench --lean      # also the tutorial with a lean response (+2 min)
    python -m bench --only enqueue   # publishing from SQL alone (bench.enqueue)

Each server runs pinned to CPU 0 (taskset), one process or worker; this load
generator runs on CPU 1; Postgres is the machine's own, unpinned. The plan
goes scenario by scenario, each target in turn, so the figures a ratio
compares are taken minutes apart, not a whole run apart: the machine's speed
drifts.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop

from bench import enqueue, pgbench
from bench.scenarios import (
    fan_out,
    idle_memory,
    open_rate,
    publish_throughput,
    reconnect_storm,
    resume,
)
from bench.targets import ROOT, Target, start

# Changes when the shape of the raw results does: `--only` keeps other targets'
# figures from the last run only if they are in this shape.
RESULTS_FORMAT = 2

DEFAULT_TARGETS = ["ssehub", "nchan", "baseline", "pgbench", "enqueue"]
LEAN_TARGETS = ["lean"]
WITH_HISTORY = {"ssehub", "nchan"}
# Not servers the scenarios run against: measured beside the publishing step.
BESIDE = {"pgbench", "enqueue"}


@dataclass
class Plan:
    memory_counts: list[int]
    # (subscribers, events/s): the latency row at few subscribers, the latency row
    # at many, and saturation, in that order (the report's goals read them so).
    fan_out: list[tuple[int, float]]
    seconds: float
    reps: int
    open_n: int
    storm_n: int
    storm_missed: int
    resume_sizes: list[int]
    publish_seconds: float

    def fan_out_by_n(self) -> dict[int, list[float]]:
        """Rates per subscriber count: the streams are opened once per count."""
        grouped: dict[int, list[float]] = {}
        for n, rate in self.fan_out:
            grouped.setdefault(n, []).append(rate)
        return grouped


# The default: medians of three in about 7 minutes on 2 cores (`make bench`
# is meant to stay within 10). `--seconds 10` publishes for the 10 s per fan-out run.
FULL = Plan(
    memory_counts=[1000, 5000, 10000],
    fan_out=[(1000, 100), (10000, 10), (10000, 100)],
    seconds=5,
    reps=3,
    open_n=10000,
    storm_n=10000,
    storm_missed=100,
    resume_sizes=[1000, 10000],
    publish_seconds=5,
)
QUICK = Plan(
    memory_counts=[500, 1000],
    fan_out=[(500, 100), (1000, 10), (1000, 100)],
    seconds=2,
    reps=1,
    open_n=1000,
    storm_n=1000,
    storm_missed=100,
    resume_sizes=[1000],
    publish_seconds=2,
)


@dataclass
class Step:
    """One scenario against one kind of target, on a freshly started server."""

    key: str
    label: str
    work: Callable[[Target], Coroutine[Any, Any, Any]]
    applies: Callable[[str], bool]


def steps(plan: Plan) -> list[Step]:
    def everyone(name: str) -> bool:
        return True

    def servers(name: str) -> bool:
        return name != "lean"  # only its fan-out differs from the tutorial's

    def with_history(name: str) -> bool:
        return name in WITH_HISTORY

    def publishers(name: str) -> bool:
        return name in ("ssehub", "baseline")  # Nchan's publishes are not on the table

    out = [Step("memory", "idle memory", lambda t: idle_memory(t, plan.memory_counts), servers)]
    for n, rates in plan.fan_out_by_n().items():
        work = functools.partial(_fan_out, n=n, rates=rates, plan=plan)
        out.append(Step("fan_out", f"fan-out to {n:,}", work, everyone))
    out += [
        Step(
            "open_rate", "opening streams", lambda t: open_rate(t, plan.open_n, plan.reps), servers
        ),
        Step(
            "storm",
            "reconnect storm",
            lambda t: reconnect_storm(t, plan.storm_n, plan.storm_missed, plan.reps),
            with_history,
        ),
        Step("resume", "resume", lambda t: _resumes(t, plan), with_history),
        Step("publish", "publishing", lambda t: _publishing(t, plan), publishers),
    ]
    return out


async def _fan_out(target: Target, n: int, rates: list[float], plan: Plan) -> list[dict[str, Any]]:
    return await fan_out(target, n, rates, plan.seconds, plan.reps)


async def _resumes(target: Target, plan: Plan) -> dict[int, list[dict[str, Any]]]:
    return {size: await resume(target, size, plan.reps) for size in plan.resume_sizes}


async def _publishing(target: Target, plan: Plan) -> dict[str, list[dict[str, Any]]]:
    """The clients of pgbench's runs (``bench.pgbench.MODES``), for the same seconds."""
    seconds = plan.publish_seconds
    out = {"single": [await publish_throughput(target, seconds, 1, 32) for _ in range(plan.reps)]}
    if target.takes_batches:
        out["batch"] = [
            await publish_throughput(target, seconds, 1000, 4) for _ in range(plan.reps)
        ]
    return out


def _run_step(step: Step, name: str) -> Any:
    began = time.monotonic()
    print(f"[{name}] {step.label}", flush=True)
    target = start(name)
    try:
        return asyncio.run(step.work(target))
    finally:
        target.stop()
        print(f"[{name}]   took {time.monotonic() - began:.0f} s", flush=True)


def run(names: list[str], plan: Plan, results: dict[str, Any]) -> None:
    """Scenario by scenario, each target in turn; pgbench right after ssehub publishes."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    for name in names:
        results[name] = {}
        results.setdefault("measured_at", {})[name] = now
    for step in steps(plan):
        for name in names:
            if name in BESIDE or not step.applies(name):
                continue
            value = _run_step(step, name)
            if step.key == "fan_out":
                results[name].setdefault("fan_out", []).extend(value)
            else:
                results[name][step.key] = value
        if step.key == "publish" and "pgbench" in names:
            print("[pgbench] one-row and 1,000-row inserts", flush=True)
            began = time.monotonic()
            results["pgbench"] = pgbench.run(plan.publish_seconds, plan.reps)
            print(f"[pgbench]   took {time.monotonic() - began:.0f} s", flush=True)
        if step.key == "publish" and "enqueue" in names:
            print("[enqueue] ssehub_enqueue against INSERT, then commit -> stream", flush=True)
            began = time.monotonic()
            results["enqueue"] = enqueue.run(plan.publish_seconds, plan.reps)
            print(f"[enqueue]   took {time.monotonic() - began:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="small numbers, one repetition")
    parser.add_argument(
        "--only",
        choices=DEFAULT_TARGETS + LEAN_TARGETS,
        help="run one target; the others' figures are kept from the last run's raw results",
    )
    parser.add_argument(
        "--lean",
        action="store_true",
        help="also the tutorial with a lean single-writer response (beyond the 10-minute budget)",
    )
    parser.add_argument("--reps", type=int, help="repetitions per scenario (default 3)")
    parser.add_argument("--seconds", type=float, help="publishing time per fan-out run")
    parser.add_argument(
        "--out", help="the report (default docs/BENCHMARKS.md; --quick: bench/results/quick.md)"
    )
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.sched_setaffinity(0, {1})
    uvloop.install()
    plan = QUICK if args.quick else FULL
    if args.reps:
        plan.reps = args.reps
    if args.seconds:
        plan.seconds = args.seconds
    started = time.time()
    results_dir = ROOT / "bench" / "results"
    raw = results_dir / ("quick.json" if args.quick else "latest.json")
    out = Path(
        args.out or (results_dir / "quick.md" if args.quick else ROOT / "docs" / "BENCHMARKS.md")
    )
    results: dict[str, Any] = {}
    if args.only and raw.exists():
        results = json.loads(raw.read_text())
        if results.get("format") != RESULTS_FORMAT:
            results = {}
    results["format"] = RESULTS_FORMAT
    names = [args.only] if args.only else DEFAULT_TARGETS + (LEAN_TARGETS if args.lean else [])
    run(names, plan, results)
    raw.parent.mkdir(exist_ok=True)
    raw.write_text(json.dumps(results, indent=1, default=str))
    from bench.report import write_report

    write_report(out, results, plan, time.time() - started, " ".join(sys.argv[1:]))
    print(f"wrote {out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
