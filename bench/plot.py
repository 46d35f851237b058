"""Plot delivered MB/s and p99 latency against offered load, per relay.

Usage: python bench/plot.py bench/results/full.json -o bench/results/full.png

Offered load is what the upstream sent times the connected clients, in MB/s
(1 MB = 10^6 bytes). Each point is the median over rounds of one cell. Lines
join the cells of one relay and one client count in order of offered load.
The ingest cell (1 client) and the pinned cell are drawn as separate markers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from report import aggregate, load  # noqa: E402

COLORS = {"relay": "tab:blue", "node": "tab:orange", "asyncio": "tab:green"}
LABELS = {"relay": "relay", "node": "Node ws peer", "asyncio": "asyncio peer"}
MARKERS = {1: "*", 10: "o", 100: "s", 500: "^", 1000: "D"}


def plot(results_path: Path, output_path: Path) -> None:
    data = load(results_path)
    summary = aggregate(data["runs"])
    rows = [row for row in summary.values() if row.get("offered_mb_s")]

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(13, 5.5))
    series: dict[tuple, list[dict]] = {}
    for row in rows:
        series.setdefault((row["target"], row["clients"], row["pinned"]), []).append(row)

    for (target, clients, pinned), points in sorted(series.items()):
        points.sort(key=lambda row: row["offered_mb_s"])
        x = [row["offered_mb_s"] for row in points]
        style = {
            "color": COLORS.get(target, "gray"),
            "marker": "P" if pinned else MARKERS.get(clients, "x"),
            "linestyle": ":" if pinned else "-",
            "markersize": 9 if pinned else 6,
            "fillstyle": "none" if pinned else "full",
        }
        throughput.plot(x, [row["delivered_mb_s"] for row in points], **style)
        latency.plot(x, [row["p99"] for row in points], **style)

    low = min((row["offered_mb_s"] for row in rows), default=1)
    high = min(
        max((row["offered_mb_s"] for row in rows), default=10),
        10 * max((row["delivered_mb_s"] for row in rows), default=1),
    )
    throughput.plot([low, high], [low, high], color="lightgray", linewidth=1, zorder=0)
    throughput.set_title("Delivered MB/s (gray: all offered load delivered)")
    latency.set_title("p99 latency, upstream send to client receive")
    throughput.set_ylabel("delivered MB/s")
    latency.set_ylabel("p99 latency (ms)")
    for axis in (throughput, latency):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("offered load (MB/s, upstream rate x clients)")
        axis.grid(True, which="both", alpha=0.3)

    handles = [
        plt.Line2D([], [], color=color, linewidth=3, label=LABELS[target])
        for target, color in COLORS.items()
        if any(row["target"] == target for row in rows)
    ]
    handles += [
        plt.Line2D([], [], color="black", marker=marker, linestyle="", label=f"{clients} client{'s' if clients > 1 else ''}")
        for clients, marker in MARKERS.items()
        if any(row["clients"] == clients and not row["pinned"] for row in rows)
    ]
    if any(row["pinned"] for row in rows):
        handles.append(
            plt.Line2D([], [], color="black", marker="P", fillstyle="none", linestyle="", label="relay pinned to CPU 0")
        )
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    environment = data["environment"]
    figure.suptitle(
        f"Relay fan-out on {environment.get('nproc')} cores ({environment.get('cpu_model')}), "
        f"frames: {environment.get('frames', {}).get('source')}"
    )
    figure.tight_layout(rect=(0, 0.07, 1, 0.95))
    figure.savefig(output_path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="results JSON written by run.py")
    parser.add_argument("-o", "--output", type=Path, help="PNG path (default: beside the results, .png)")
    args = parser.parse_args()
    plot(args.results, args.output or args.results.with_suffix(".png"))


if __name__ == "__main__":
    main()
