"""Write the Markdown tables of a benchmark results file.

Usage: python bench/report.py bench/results/full.json > table.md

Each table row is the median over the rounds of one relay in one cell. Ratios
compare the relay with a peer in the same cell, so a CPU or p99 ratio below
1.0 and a throughput ratio above 1.0 favour the relay.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from harness import cell_label

TARGET_ORDER = ("relay", "node", "asyncio")
TARGET_TITLES = {
    "relay": "relay",
    "node": "Node ws peer",
    "asyncio": "asyncio peer",
}

# Cells in which the relay must match Node's CPU per MB and p99.
PARITY_CLIENTS = (10, 100, 500)
PARITY_RATES = (20.0, 200.0)
RSS_LIMITS_MB = {100: 80.0, 1000: 200.0}


def load(path: Path) -> dict:
    """Read a results file, naming each run's cell the way harness.Cell does."""
    data = json.loads(path.read_text())
    for run in data["runs"]:
        run["cell"] = cell_label(run["clients"], run["rate"], run["pinned"])
    return data


def cell_key(run: dict) -> tuple:
    return (run["pinned"], run["clients"] != 1 or run["rate"] != 0, run["clients"], run["rate"] or 1e9)


def median_of(runs: list[dict], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.median(values) if values else None


def aggregate(runs: list[dict]) -> dict[tuple[str, str], dict]:
    """Return the median metrics per (target, cell label) over successful runs."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["target"], run["cell"]), []).append(run)
    summary = {}
    for (target, cell), group in groups.items():
        ok = [run for run in group if "error" not in run]
        row = {
            "target": target,
            "cell": cell,
            "clients": group[0]["clients"],
            "rate": group[0]["rate"],
            "pinned": group[0]["pinned"],
            "runs": len(group),
            "failed": len(group) - len(ok),
            "errors": [run["error"] for run in group if "error" in run],
        }
        if ok:
            for key in (
                "delivered_mb_s",
                "delivered_fps",
                "delivered_fraction",
                "offered_mb_s",
                "ingest_mb_s",
                "sent_fps",
                "relay_cpu_percent",
                "relay_cpu_s_per_mb",
                "relay_rss_max_mb",
                "relay_threads_max",
                "loadgen_cpu_percent",
                "upstream_cpu_percent",
            ):
                row[key] = median_of(ok, key)
            for percentile in ("p50", "p99", "max"):
                values = [r["latency_ms"][percentile] for r in ok if r["latency_ms"][percentile] is not None]
                row[percentile] = statistics.median(values) if values else None
            row["cpu_per_mb_spread"] = spread([run["relay_cpu_s_per_mb"] for run in ok])
            row["p99_spread"] = spread([run["latency_ms"]["p99"] for run in ok])
            row["mismatches"] = sum(run["mismatches"] + run["out_of_order"] for run in ok)
            row["min_delivered_fraction"] = min(run["delivered_fraction"] for run in ok)
            row["loadgen_saturated"] = any(run["loadgen_saturated"] for run in ok)
            row["upstream_saturated"] = any(run["upstream_saturated"] for run in ok)
            row["deflate_negotiated"] = max(run["deflate_negotiated"] for run in ok)
            row["closes_during_run"] = sum(run["closes_during_run"] for run in ok)
            row["relay_died"] = any(not run["relay_alive"] for run in ok)
            row["noisy"] = any(run.get("noisy") for run in ok)
            row["other_cpu_max"] = max(run.get("other_cpu_percent", 0) for run in ok)
        summary[(target, cell)] = row
    return summary


def spread(values: list[float | None]) -> float | None:
    """Return (max - min) / median of the values, or None for fewer than two."""
    present = [value for value in values if value is not None]
    if len(present) < 2 or not statistics.median(present):
        return None
    return (max(present) - min(present)) / statistics.median(present)


def spread_summary(summary: dict) -> str:
    """Describe how far rounds of one relay in one cell differ, over the cells
    where every client got every frame."""
    cpu = [row["cpu_per_mb_spread"] for row in summary.values() if full_delivery(row) and row["cpu_per_mb_spread"] is not None]
    p99 = [row["p99_spread"] for row in summary.values() if full_delivery(row) and row["p99_spread"] is not None]
    if not cpu or not p99:
        return ""
    return (
        "Rounds of the same relay and cell, where every client got every frame, differ by "
        f"(max - min) / median: CPU per MB median {100 * statistics.median(cpu):.0f} %, "
        f"max {100 * max(cpu):.0f} %; p99 median {100 * statistics.median(p99):.0f} %, "
        f"max {100 * max(p99):.0f} %. Ratios closer to 1.0 than that are within noise."
    )


def full_delivery(row: dict) -> bool:
    return row.get("min_delivered_fraction", 0) >= 1.0


def number(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "TBD"
    return f"{value:,.{digits}f}"


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return value / base


def ordered_cells(runs: list[dict]) -> list[str]:
    cells = {}
    for run in runs:
        cells.setdefault(run["cell"], cell_key(run))
    return sorted(cells, key=lambda cell: cells[cell])


def ordered_targets(runs: list[dict]) -> list[str]:
    present = {run["target"] for run in runs}
    return [target for target in TARGET_ORDER if target in present]


def flags_of(row: dict) -> str:
    flags = []
    if row.get("failed"):
        flags.append(f"{row['failed']} failed")
    if row.get("loadgen_saturated"):
        flags.append("loadgen saturated")
    if row.get("upstream_saturated"):
        flags.append("upstream saturated")
    if row.get("deflate_negotiated"):
        flags.append(f"deflate on {row['deflate_negotiated']} clients")
    if row.get("closes_during_run"):
        flags.append(f"{row['closes_during_run']} clients closed")
    if row.get("noisy"):
        flags.append(f"other processes up to {row['other_cpu_max']:.0f} % CPU")
    if row.get("relay_died"):
        flags.append("relay exited")
    return ", ".join(flags)


def results_table(summary: dict, cells: list[str], targets: list[str]) -> list[str]:
    lines = [
        "| cell | relay | delivered MB/s | frames/s | delivered | p50 ms | p99 ms | max ms "
        "| relay CPU % | CPU ms/MB | RSS MB | threads | mismatches | loadgen CPU % | notes |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for cell in cells:
        for target in targets:
            row = summary.get((target, cell))
            if row is None:
                continue
            if "delivered_mb_s" not in row:
                lines.append(f"| {cell} | {target} | | | | | | | | | | | | | failed: {row['errors'][0]} |")
                continue
            cpu_ms = None if row["relay_cpu_s_per_mb"] is None else 1000 * row["relay_cpu_s_per_mb"]
            lines.append(
                f"| {cell} | {target} | {number(row['delivered_mb_s'])} "
                f"| {number(row['delivered_fps'], 0)} "
                f"| {number(100 * row['delivered_fraction'], 2)} % "
                f"| {number(row['p50'])} | {number(row['p99'])} | {number(row['max'])} "
                f"| {number(row['relay_cpu_percent'], 0)} | {number(cpu_ms, 2)} "
                f"| {number(row['relay_rss_max_mb'], 0)} | {number(row['relay_threads_max'], 0)} "
                f"| {row['mismatches']} | {number(row['loadgen_cpu_percent'], 0)} "
                f"| {flags_of(row)} |"
            )
    return lines


def ratio_table(summary: dict, cells: list[str], peer: str) -> list[str]:
    lines = [
        f"| cell | CPU per MB (relay / {peer}) | p99 (relay / {peer}) "
        f"| delivered MB/s (relay / {peer}) | delivered (relay, {peer}) |",
        "|---|--:|--:|--:|--:|",
    ]
    for cell in cells:
        relay = summary.get(("relay", cell))
        other = summary.get((peer, cell))
        if not relay or not other or "delivered_mb_s" not in other:
            continue
        relay_ok = "delivered_mb_s" in relay
        cpu = ratio(relay.get("relay_cpu_s_per_mb"), other["relay_cpu_s_per_mb"]) if relay_ok else None
        p99 = ratio(relay.get("p99"), other["p99"]) if relay_ok else None
        rate = ratio(relay.get("delivered_mb_s"), other["delivered_mb_s"]) if relay_ok else None
        relay_fraction = (
            f"{number(100 * relay['delivered_fraction'], 2)} %" if relay_ok else "TBD"
        )
        lines.append(
            f"| {cell} | {ratio_text(cpu)} | {ratio_text(p99)} | {ratio_text(rate)} "
            f"| {relay_fraction}, {number(100 * other['delivered_fraction'], 2)} % |"
        )
    return lines


def ratio_text(value: float | None) -> str:
    return "TBD" if value is None else times(value)


def check_targets(summary: dict, cells: list[str]) -> list[str]:
    """Return one Markdown bullet per project target: met, missed or unknown."""
    rows = {cell: (summary.get(("relay", cell)), summary.get(("node", cell))) for cell in cells}

    def measured(row: dict | None) -> bool:
        return bool(row) and "delivered_mb_s" in row

    lines = []
    for metric, title in (("relay_cpu_s_per_mb", "CPU per delivered MB"), ("p99", "p99")):
        for cell, (relay, node) in rows.items():
            if not measured(node) or node["pinned"]:
                continue
            if node["clients"] not in PARITY_CLIENTS or node["rate"] not in PARITY_RATES:
                continue
            value = ratio(relay.get(metric), node[metric]) if measured(relay) else None
            lines.append(verdict(f"{title} at {cell} <= 1.0x Node", value, value is not None and value <= 1.0))

    for cell, (relay, node) in rows.items():
        if not measured(node) or node["min_delivered_fraction"] < 1.0:
            continue
        if not measured(relay):
            lines.append(f"- TBD: 100 % delivered, 0 mismatches at {cell} (Node keeps up)")
            continue
        met = relay["min_delivered_fraction"] >= 1.0 and relay["mismatches"] == 0
        lines.append(
            f"- {'met' if met else 'MISSED'}: 100 % delivered, 0 mismatches at {cell} "
            f"(Node keeps up): relay {100 * relay['min_delivered_fraction']:.2f} %, "
            f"{relay['mismatches']} mismatches"
        )

    for cell, (relay, _) in rows.items():
        if measured(relay) and relay["clients"] == 1000 and relay["rate"] == 20.0:
            met = relay["min_delivered_fraction"] >= 1.0
            lines.append(
                f"- {'met' if met else 'MISSED'}: {cell} fully delivered: "
                f"{100 * relay['min_delivered_fraction']:.2f} %"
            )

    for cell, (relay, node) in rows.items():
        if not measured(node) or node["rate"] != 0:
            continue
        if node["pinned"]:
            name = f"one-core ceiling at {cell} >= 1.0x Node"
        elif node["clients"] == 1:
            name = f"ingest ({cell}) >= 1.0x Node"
        else:
            continue
        value = ratio(relay.get("delivered_mb_s"), node["delivered_mb_s"]) if measured(relay) else None
        line = verdict(name, value, value is not None and value >= 1.0)
        if value is not None:
            line += f" ({ceiling_detail(relay)} against {ceiling_detail(node)})"
            estimate = ratio(one_core_estimate(relay), one_core_estimate(node))
            if node["pinned"] and estimate is not None:
                line += f"; estimated at 100 % of CPU 0: {times(estimate)}"
        lines.append(line)

    for clients, limit in RSS_LIMITS_MB.items():
        values = [
            (relay["relay_rss_max_mb"], cell)
            for cell, (relay, _) in rows.items()
            if measured(relay) and relay["clients"] == clients and relay["relay_rss_max_mb"]
        ]
        if values:
            peak, cell = max(values)
            lines.append(
                f"- {'met' if peak <= limit else 'MISSED'}: RSS <= {limit:g} MB at {clients} "
                f"clients: max {peak:.0f} MB at {cell} ({peak / limit:.2f}x the limit)"
            )
        else:
            lines.append(f"- TBD: RSS <= {limit:g} MB at {clients} clients")
    return lines


def one_core_estimate(row: dict) -> float | None:
    """Return delivered MB/s scaled to 100 % of one core: an estimate that
    assumes CPU per MB stays constant, for runs that some other process
    limited before the relay used its whole core."""
    if not row.get("relay_cpu_percent"):
        return None
    return row["delivered_mb_s"] * 100 / row["relay_cpu_percent"]


def ceiling_detail(row: dict) -> str:
    text = (
        f"{row['target']} {row['delivered_mb_s']:.0f} MB/s at "
        f"{row['relay_cpu_percent']:.0f} % CPU"
    )
    limits = [name for name in ("loadgen", "upstream") if row.get(f"{name}_saturated")]
    if limits:
        text += f", {' and '.join(limits)} saturated"
    return text


def times(value: float) -> str:
    """Format a ratio, with a third decimal where two would show 1.00."""
    if round(value, 2) == 1.0 and value != 1.0:
        return f"{value:.3f}x"
    return f"{value:.2f}x"


def verdict(name: str, value: float | None, met: bool) -> str:
    if value is None:
        return f"- TBD: {name}"
    return f"- {'met' if met else 'MISSED'}: {name}: {times(value)}"


def profile_sections(runs: list[dict]) -> list[str]:
    """Return the py-spy summary of the first profiled relay run of each cell."""
    lines = []
    seen = set()
    for run in runs:
        profile = run.get("profile")
        if not profile or run["cell"] in seen:
            continue
        seen.add(run["cell"])
        lines += ["", f"py-spy ({profile['mode']}) of the relay at {run['cell']}, {profile.get('samples', 0)} samples:", ""]
        if "error" in profile:
            lines.append(f"- failed: {profile['error']}")
            continue
        lines += ["| self % | frame | | cumulative % | frame |", "|--:|---|---|--:|---|"]
        for own, total in zip(profile["self"], profile["cumulative"]):
            lines.append(f"| {own[0]} | `{own[1]}` | | {total[0]} | `{total[1]}` |")
    return lines


def render_markdown(path: Path) -> str:
    data = load(path)
    runs = data["runs"]
    environment = data["environment"]
    summary = aggregate(runs)
    cells = ordered_cells(runs)
    targets = ordered_targets(runs)
    digests = {run["relay_source_sha256"] for run in runs if run.get("relay_source_sha256")}

    frames = environment.get("frames", {})
    lines = [
        f"Mode {environment.get('mode')}, {len(runs)} runs, median of "
        f"{max((row['runs'] for row in summary.values()), default=0)} rounds per row; "
        f"frames: {frames.get('source')} ({frames.get('frames')} frames, median "
        f"{frames.get('median_bytes')} B, mean {frames.get('mean_bytes')} B, max "
        f"{frames.get('max_bytes')} B); load generator {environment.get('loadgen')}, "
        f"clients {'offer' if environment.get('client_deflate_offered') else 'do not offer'} "
        "permessage-deflate.",
        "",
        *results_table(summary, cells, targets),
    ]
    if len(digests) > 1:
        lines.insert(1, f"\nWARNING: the relay's source changed during the run ({len(digests)} versions measured).")

    for peer in ("node", "asyncio"):
        if peer in targets:
            lines += ["", f"Relay against the {TARGET_TITLES[peer]}:", "", *ratio_table(summary, cells, peer)]
    noise = spread_summary(summary)
    if noise:
        lines += ["", noise]

    if "node" in targets:
        lines += ["", "Targets:", "", *check_targets(summary, cells)]
    lines += profile_sections(runs)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="results JSON written by run.py")
    args = parser.parse_args()
    print(render_markdown(args.results), end="")


if __name__ == "__main__":
    main()
