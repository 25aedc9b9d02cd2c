"""Plan a deployment from the per-unit costs ``python -m bench.scaling`` measured.

    python -m bench.scaling_model                            # 1,000,000 streams x 10 events/s
    python -m bench.scaling_model --streams 200000 --rate 2  # another load
    python -m bench.scaling_model --results other.json       # figures measured on other hardware

Pure standard library: it reads bench/results/scaling.json, takes medians of
the measured figures, and prints for each shape of traffic how many
instances (one Python process = one core each), how much memory, what
Postgres and NATS carry, and where each component stops scaling. Every input
is printed with where it comes from; every assumption is a flag.

The shapes: ``S streams x r events/s`` says how many deliveries are needed
(S x r per second), not how many events are published. That depends on how
many streams share each event: ``m`` streams per channel means S x r / m
publishes per second. The plan is printed for one channel fanned out to all
(m = S), for groups (m = 1,000 and m = 100) and for personal channels (m = 1).

The model, per instance (k of them, streams and publishes spread evenly):

    cpu = (S r / k) d  +  (E / k) p  +  E_in e    <=  headroom (of one core)

with ``d`` the CPU per delivery of a large fan-out, ``p`` the CPU per
published event at the front door (singles or batches), ``e`` the CPU per
event an instance takes in beyond its deliveries (its broker, framing), and
``E_in`` the events it takes in: all E with the Postgres broker (every
instance reads the whole log), E x P(it carries the channel) with NATS.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "scaling.json"


# -- the measured units --------------------------------------------------------------


def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    if len(points) < 2:
        return (points[0][1] if points else float("nan")), 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


def units(results: dict[str, Any], per_stream_rate: float) -> dict[str, Any]:
    """The per-unit costs, each with its source."""
    phases = results["phases"]
    u: dict[str, Any] = {}

    rss = phases["memory"]["value"]["rss"]
    largest = max(int(k.rsplit("_", 1)[1]) for k in rss if k.startswith("kib_per_stream_"))
    kernel = phases["memory"]["value"]["kernel"]
    u["rss_kib"] = (rss[f"kib_per_stream_{largest}"], f"RSS growth per idle stream at {largest:,}")
    u["kernel_kib"] = (
        max(0.0, kernel["slab_kib_per_connection"])
        + max(0.0, kernel["tcp_buffer_kib_per_connection"]),
        f"kernel slab + TCP buffers per idle connection at {kernel['n']:,} (estimate)",
    )

    # Per delivery: a stream receiving events r/s apart gets one socket write per
    # event; at saturation several events share a write. The row at the planned
    # rate per stream is the one the plan uses.
    fan = phases["fanout"]["value"]
    rates = sorted({r["rate"] for r in fan})
    planned = min(rates, key=lambda x: abs(math.log(x / per_stream_rate)))
    n = fan[0]["n"]
    for name, rate in (("delivery_us", planned), ("delivery_us_saturated", rates[-1])):
        rows = [r for r in fan if r["rate"] == rate]
        u[name] = (
            _median([r["cpu_us_per_delivery"] for r in rows]),
            f"server CPU / deliveries, one channel to {n:,} streams at {rate:g} events/s"
            f" ({_median([r['delivered_per_s'] for r in rows]):,.0f} deliveries/s,"
            f" {_median([r['server_cpu_pct'] for r in rows]):.0f}% of a core,"
            f" {_median([r['events_per_read'] for r in rows]):.1f} events per read)",
        )

    pub = phases["publish"]["value"]
    for mode, plural in (("single", "singles"), ("batch", "batches")):
        rows = pub[mode]
        u[f"ceiling_{mode}"] = (
            _median([r["per_s"] for r in rows]),
            f"events/s committed, one instance, {'32 clients' if mode == 'single' else '4 clients, 1,000 per batch'}",
        )
        u[f"publish_us_{mode}"] = (
            _median([r["server_cpu_us_per_event"] for r in rows]),
            f"instance CPU per event published ({plural}, at the ceiling)",
        )
        u[f"pg_publish_us_{mode}"] = (
            _median([r["postgres_cpu_us_per_event"] for r in rows]),
            f"Postgres CPU per event published ({plural}, at the ceiling)",
        )
    two = phases["publish"].get("two_writers") or []
    if two:
        u["ceiling_batch_two_writers"] = (
            _median([r["per_s"] for r in two]),
            "events/s committed in batches through two instances at once (one lock)",
        )

    for broker in ("postgres", "nats"):
        # The highest rate measured: the broker's reads and messages coalesce as it grows.
        personal = [r for r in phases["personal"]["value"] if r["broker"] == broker]
        row = max(personal, key=lambda r: r["rate"])
        received = row["receiver_cpu_us_per_event"]
        u[f"event_us_{broker}"] = (
            max(0.0, received - u["delivery_us"][0]),
            f"receiving instance's CPU per event ({received:.0f} us at {row['rate']:g} events/s"
            f" to personal channels, {broker} broker) less one delivery",
        )

    rate = results["plan"]["rate"]
    for broker in ("postgres", "nats"):
        rows = [
            r
            for r in phases["cluster"]["value"]
            if r["broker"] == broker and r["variant"] == "all" and r["rate"] == rate
        ]
        for key in (
            "pg_cpu_us",
            "pg_backends_cpu_us",
            "pg_db_xact_commit",
            "pg_events_idx_tup_fetch",
            "log_rows",
            "nats_in_msgs",
            "nats_out_msgs",
        ):
            a, b = _fit([(r["k"], r["per_event_net"][key]) for r in rows])
            u[f"{broker}_{key}"] = (
                (a, b),
                f"per event, fit a + b k over k = {[r['k'] for r in rows]} at {rate:g} events/s",
            )
        high = [
            r
            for r in phases["cluster"]["value"]
            if r["broker"] == broker and r["variant"] == "all" and r["rate"] > rate
        ]
        for r in high:
            low = [x for x in rows if x["k"] == r["k"]]
            if low:
                u[f"{broker}_pg_cpu_us_k{r['k']}_at_{r['rate']:g}"] = (
                    r["per_event_net"]["pg_cpu_us"],
                    f"Postgres CPU per event with k = {r['k']} at {r['rate']:g} events/s"
                    f" ({low[0]['per_event_net']['pg_cpu_us']:.0f} us at {rate:g}/s)",
                )

    nats = phases["nats"]["value"]
    u["nats_us_per_msg"] = (
        max(r["server_cpu_us_per_msg"] for r in nats),
        "nats-server CPU per message in or out (the larger of 1->1 and 1->4, nats-py driving it)",
    )
    u["nats_py_msgs_per_s"] = (
        max(r["in_per_s"] for r in nats),
        "messages/s through one nats-py process publishing and receiving them (its core"
        " full, 1 -> 1): the order of an instance's NATS ceiling",
    )
    return u


# -- the plan ------------------------------------------------------------------------


def carried(k: int, m: float) -> float:
    """Share of instances carrying a channel of m streams spread at random over k."""
    return 1.0 - (1.0 - 1.0 / k) ** m if k > 1 else 1.0


def instances_needed(
    u: dict[str, Any],
    broker: str,
    streams: float,
    rate: float,
    m: float,
    headroom: float,
    affinity: bool = False,
) -> dict[str, Any]:
    """The smallest k that keeps every instance within ``headroom``. With
    ``affinity`` (NATS only) a channel's streams are routed to as few instances
    as hold them (a load balancer hashing on the channel), not spread at random."""
    deliveries = streams * rate
    events = deliveries / m
    d = u["delivery_us"][0]
    mode = "single" if events <= u["ceiling_single"][0] else "batch"
    p = u[f"publish_us_{mode}"][0]
    e = u[f"event_us_{broker}"][0]
    budget = headroom * 1e6  # us of CPU per second per instance
    if broker == "postgres" and events * e >= budget:
        return {
            "k": None,
            "why": f"each instance reads all {events:,.0f} events/s from the log: "
            f"{events * e / 1e6:.1f} cores each, more than one process has",
        }
    k = max(1, math.ceil((deliveries * d + events * p) / budget))
    for _ in range(100000):
        if broker == "postgres":
            intake = events
        elif affinity:
            intake = events / k * math.ceil(m / (streams / k))
        else:
            intake = events * carried(k, m)
        cpu = (deliveries * d + events * p) / k + intake * e
        if cpu <= budget:
            return {"k": k, "cpu_share": cpu / 1e6, "publish_mode": mode, "intake": intake}
        k = max(k + 1, math.ceil(k * cpu / budget))
    return {"k": None, "why": "no k found"}


def plan(u: dict[str, Any], args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    say = out.append
    S, r = args.streams, args.rate
    D = S * r
    say(f"# Plan: {S:,.0f} streams x {r:g} events/s = {D:,.0f} deliveries/s")
    say("")
    say("## Measured per-unit costs (from the results file)")
    for key, (value, source) in u.items():
        if isinstance(value, tuple):
            shown = f"{value[0]:.3g} + {value[1]:.3g} k"
        else:
            shown = f"{value:,.3g}"
        say(f"- {key} = {shown}   [{source}]")
    say("")
    say("## Assumptions (flags)")
    say(f"- headroom: an instance is planned at {args.headroom:.0%} of its core (bursts,")
    say("  the first seconds after a quiet spell cost the kernel ~1.5x, reconnect storms, GC)")
    say(f"- Postgres and NATS are planned at {args.infra_headroom:.0%} of their cores")
    say(f"- a NATS node has {args.nats_node_cores} cores; a Postgres server {args.pg_cores}")
    say(f"- SSEHUB_DB_POOL_SIZE {args.pool} per instance (+ writer + listener connections)")
    say("- streams are spread evenly over instances; a channel's streams at random")
    say("- costs scale linearly from this machine (2 cores, loopback: the sender pays")
    say("  for the receiver's TCP processing, which a real NIC does not)")
    say("")

    d = u["delivery_us"][0]
    mem = u["rss_kib"][0] + u["kernel_kib"][0]
    say("## Common to every shape")
    say(
        f"- deliveries: {D:,.0f}/s x {d:.2f} us = {D * d / 1e6:,.1f} cores of delivery alone "
        f"({1e6 / d:,.0f} deliveries/s per core, {args.headroom * 1e6 / d:,.0f} at headroom)"
    )
    say(
        f"- memory: {S:,.0f} x ({u['rss_kib'][0]:.1f} KiB process + {u['kernel_kib'][0]:.1f} KiB kernel)"
        f" = {S * mem / 2**20:,.1f} GiB in all"
    )
    say("")

    shapes = [("one channel fanned out to all", S)] + [
        (f"channels of {m:,} streams", m) for m in (1000, 100) if m < S
    ]
    shapes.append(("personal channels (one stream each)", 1))
    c1, cb = u["ceiling_single"][0], u["ceiling_batch"][0]
    # The lock's ceiling: one writer leaves it idle while its instance parses the
    # next batch; two writers keep it busy (measured), so the larger figure.
    lock = max(cb, u.get("ceiling_batch_two_writers", (0.0, ""))[0])
    for name, m in shapes:
        E = D / m
        say(f"## Shape: {name} (m = {m:,.0f})")
        say(f"- publishes: {E:,.0f} events/s into {S / m:,.0f} channel(s)")
        if c1 >= E:
            verdict = f"within what one instance publishes as singles ({c1:,.0f}/s): {E / c1:.1%}"
        elif lock >= E:
            verdict = (
                f"{E / lock:.0%} of the lock's ceiling ({lock:,.0f}/s, measured with batches);"
                f" singles beyond {c1:,.0f}/s need several instances' writers or batches"
            )
        else:
            verdict = (
                f"{E / lock:,.0f}x the one-lock ceiling ({lock:,.0f}/s): does not fit one"
                " ordered log at any k: shard it (docs/SCALING.md)"
            )
        say(f"- the one ordered writer: {verdict}")
        mode = "single" if c1 >= E else "batch"
        pg_write = E * u[f"pg_publish_us_{mode}"][0] / 1e6
        # Writer transactions/s: every instance's broker wakes once per transaction.
        # Singles at low rates are one event each (as measured at 200/s); the writer
        # coalesces up to 1,000 events into one as the rate grows.
        tx_hi, tx_lo = E, max(1.0, E / 1000)
        for broker in ("postgres", "nats"):
            need = instances_needed(u, broker, S, r, m, args.headroom)
            if need["k"] is None:
                say(f"- {broker} broker: impossible: {need['why']}")
                continue
            k = need["k"]
            (_a, b) = u[f"{broker}_pg_cpu_us"][0]
            wake = max(0.0, b)
            say(
                f"- {broker} broker: {k:,} instances at {need['cpu_share']:.0%} of a core each"
                f" ({S / k:,.0f} streams, {S / k * mem / 2**20:.1f} GiB each)"
            )
            rows = f"{E * k:,.0f} log rows/s read (every instance reads every event)"
            if broker == "nats":
                rows = "no log rows read (only to fill gaps)"
            lo, hi = tx_lo * wake * k / 1e6, tx_hi * wake * k / 1e6
            say(
                f"    Postgres: the publishes ~{pg_write:,.2f} cores ({'singles' if mode == 'single' else 'batches'}); the k instances"
                f" add {wake:.0f} us each per writer transaction: {lo:,.2f} cores (1,000 events"
                f" per transaction) to {hi:,.2f} (one each); {rows};"
                f" {k * (args.pool + 2):,} connections ({k:,} of them LISTEN)"
            )
            if broker == "nats":
                carriers = k * carried(k, m)
                channels_per_tx = min(1000.0, S / m) if tx_lo < tx_hi else 1.0
                for label, tx, per in (
                    ("one event each", tx_hi, 1.0),
                    ("coalesced", tx_lo, channels_per_tx),
                ):
                    msgs_in = tx * (1 + per)
                    msgs_out = tx * (k + per * carriers)
                    cores = (msgs_in + msgs_out) * u["nats_us_per_msg"][0] / 1e6
                    nodes = max(1, math.ceil(cores / (args.nats_node_cores * args.infra_headroom)))
                    say(
                        f"    NATS ({label}): {tx:,.0f} transactions/s -> in {msgs_in:,.0f}"
                        f" msgs/s, out {msgs_out:,.0f} msgs/s (of which the ssehub.tx chain to"
                        f" all {k:,} instances: {tx * k:,.0f}/s); {cores:,.2f} cores of"
                        f" nats-server at {u['nats_us_per_msg'][0]:.2f} us/msg -> {nodes:,}"
                        f" node(s) of {args.nats_node_cores} cores at"
                        f" {args.infra_headroom:.0%}"
                    )
                    if tx_lo == tx_hi:
                        break
                if m > 1 and m < S:
                    aff = instances_needed(u, broker, S, r, m, args.headroom, affinity=True)
                    if aff["k"] is not None:
                        say(
                            f"    with channel affinity (a channel's streams routed to the same"
                            f" instances): {aff['k']:,} instances, each taking in"
                            f" {aff['intake']:,.0f} events/s instead of {need['intake']:,.0f}"
                        )
                per_instance = tx_hi * (1 + carried(k, m))
                if per_instance > u["nats_py_msgs_per_s"][0] * args.headroom:
                    say(
                        f"    each instance would receive up to {per_instance:,.0f} msgs/s: more than"
                        f" {args.headroom:.0%} of what one nats-py process moved here ({u['nats_py_msgs_per_s'][0]:,.0f}/s)"
                    )
        say("")

    say("## Where each component stops scaling")
    say(
        f"- one instance: {args.headroom * 1e6 / d:,.0f} deliveries/s at headroom; more"
        " instances scale deliveries linearly as long as the broker does"
    )
    e_pg = u["event_us_postgres"][0]
    say(
        f"- Postgres broker, per instance: every instance reads every event; at {e_pg:.0f} us"
        f" per event one core takes in at most {1e6 / max(e_pg, 1e-9):,.0f} events/s"
        f" ({args.headroom * 1e6 / max(e_pg, 1e-9):,.0f} at headroom), whatever k is"
    )
    (_a, b) = u["postgres_pg_cpu_us"][0]
    if b > 0:
        budget = args.pg_cores * args.infra_headroom * 1e6
        say(
            f"- Postgres broker, in Postgres: each instance adds {b:.0f} us of Postgres CPU per"
            f" writer transaction (the NOTIFY wake-up, the tail query, an inbox check); a"
            f" {args.pg_cores}-core server at {args.infra_headroom:.0%} allows"
            f" k x transactions/s <= {budget / b:,.0f}"
        )
        for T in (10, 100, 1000):
            say(f"    at {T:,} transactions/s: k <= {max(0, int(budget / b / T)):,}")
    (_na, nb) = u["nats_pg_cpu_us"][0]
    say(
        f"- NATS broker, in Postgres: {nb:+.0f} us per writer transaction per instance: the"
        " listener still LISTENs (control, inbox), so Postgres still signals it on every"
        " NOTIFY ssehub_events and it reads the queue in a transaction; no log rows"
    )
    say(
        f"- the one ordered writer: {c1:,.0f} single events/s through one instance, {cb:,.0f} in batches, for the"
        " whole deployment: every instance's writer takes the same lock"
        + (
            f" (two instances at once: {u['ceiling_batch_two_writers'][0]:,.0f}/s)"
            if "ceiling_batch_two_writers" in u
            else ""
        )
    )
    say(
        f"- NATS: the ssehub.tx chain is k messages per transaction; a node moves"
        f" {1e6 / u['nats_us_per_msg'][0]:,.0f} msgs/s per core (measured, not saturated)"
    )
    say(
        f"- connections: k x (pool + 2) = {args.pool + 2} per instance directly to Postgres"
        " (100 by default): beyond a few dozen instances, PgBouncer for the pools and"
        " SSEHUB_LISTEN_DATABASE_URL for the one direct LISTEN connection per instance"
    )
    return out


def tables(results: dict[str, Any]) -> list[str]:
    """The k-instance figures as Markdown tables, one per broker (docs/SCALING.md)."""
    out: list[str] = []
    rows = results["phases"]["cluster"]["value"]
    for broker in ("postgres", "nats"):
        out.append(f"### SSEHUB_BROKER={broker}")
        out.append("")
        out.append(
            "| k | streams on | events/s | delivered | Postgres xacts | `events` rows fetched"
            " | log rows read | Postgres CPU µs | its backends µs | NATS msgs in / out"
            " | NATS bytes out | instances CPU µs | p50 / p99 ms |"
        )
        out.append("| " + " | ".join(["---"] * 13) + " |")
        for r in rows:
            if r["broker"] != broker:
                continue
            e = r["per_event_net"]
            nats = (
                f"{e['nats_in_msgs']:.2f} / {e['nats_out_msgs']:.2f}" if broker == "nats" else "–"
            )
            nats_bytes = f"{e['nats_out_bytes']:.0f}" if broker == "nats" else "–"
            flag = " ⚠" if r["disturbed"] else ""
            out.append(
                f"| {r['k']} | {r['variant']} | {r['rate']:g} | {r['pct_delivered']:.1f}%{flag}"
                f" | {e['pg_db_xact_commit']:.2f} | {e['pg_events_idx_tup_fetch']:.2f}"
                f" | {e['log_rows']:.2f} | {e['pg_cpu_us']:,.0f} | {e['pg_backends_cpu_us']:,.0f}"
                f" | {nats} | {nats_bytes} | {e['instances_cpu_us']:,.0f}"
                f" | {r['p50_ms']:.0f} / {r['p99_ms']:.0f} |"
            )
        out.append("")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling_model")
    parser.add_argument("--streams", type=float, default=1_000_000)
    parser.add_argument("--rate", type=float, default=10, help="events/s each stream receives")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--headroom", type=float, default=0.6, help="share of a core an instance may use"
    )
    parser.add_argument(
        "--infra-headroom", type=float, default=0.5, help="share of Postgres's and NATS's cores"
    )
    parser.add_argument("--nats-node-cores", type=int, default=8)
    parser.add_argument("--pg-cores", type=int, default=16)
    parser.add_argument("--pool", type=int, default=20, help="SSEHUB_DB_POOL_SIZE")
    parser.add_argument("--tables", action="store_true", help="print the k-instance tables")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    if args.tables:
        print("\n".join(tables(results)))
        return
    print("\n".join(plan(units(results, args.rate), args)))


if __name__ == "__main__":
    main()
