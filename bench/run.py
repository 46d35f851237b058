"""Benchmark the relay against two minimal peers on this machine.

Starts, for every run, a fake Backpack.tf upstream, one relay (the project's
relay, a Node `ws` broadcaster or a Python asyncio broadcaster) and a load
generator with N clients, all as separate processes on 127.0.0.1. Relays run
interleaved per cell (A B C A B C ...) so that drift on the machine hits all of
them alike.

Modes:
  --smoke   One 10-client cell of 2 s with the relay and one peer, for CI.
  --quick   100 clients at 20 and 200 frames/s, plus ingest, in one round.
  (none)    The full matrix in two rounds. It covers 10/100/500/1000 clients
            x 20/200/max frames/s, ingest (1 client, max rate), and 500
            clients x 60/s and x max with the relay pinned to CPU 0.

Results go to bench/results/MODE.json and MODE.md unless --out is given.
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyspy  # noqa: E402
from gen_frames import describe_frames, load_frames  # noqa: E402
from harness import (  # noqa: E402
    BENCH_DIR,
    REPO_DIR,
    Cell,
    RunError,
    Settings,
    Target,
    describe_environment,
    results_json,
    run_once,
    snapshot_relay,
)
from report import render_markdown  # noqa: E402

logger = logging.getLogger("bench")

# File descriptors: each client costs one in the load generator and one in the
# relay, plus the relay's own files and sockets.
FDS_PER_CLIENT = 2
FD_RESERVE = 256


def make_targets(python: str) -> dict[str, Target]:
    return {
        "relay": Target("relay", (python, "-m", "relay", "-c", "{config}"), health=True),
        "node": Target(
            "node",
            (
                "node",
                str(BENCH_DIR / "peers" / "node_ws_relay.js"),
                "--upstream",
                "{upstream}",
                "--port",
                "{port}",
            ),
            health=False,
        ),
        "asyncio": Target(
            "asyncio",
            (
                python,
                str(BENCH_DIR / "peers" / "asyncio_relay.py"),
                "--upstream",
                "{upstream}",
                "--port",
                "{port}",
            ),
            health=False,
        ),
    }


def node_ws_available() -> tuple[bool, str]:
    """Return whether `node` runs and resolves the `ws` package from bench/."""
    if shutil.which("node") is None:
        return False, "node not found on PATH"
    check = subprocess.run(
        ["node", "-e", "require.resolve('ws')"],
        cwd=BENCH_DIR,
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        return False, "the ws package is missing: run `npm ci` in bench/"
    return True, "ok"


def relay_available(python: str) -> tuple[bool, str]:
    """Return whether `python -m relay --version` runs from the repository."""
    if not (REPO_DIR / "relay" / "__main__.py").exists():
        return False, "relay/__main__.py not found"
    check = subprocess.run(
        [python, "-m", "relay", "--version"],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if check.returncode != 0:
        detail = (check.stderr or check.stdout).strip().splitlines()
        return False, "`python -m relay --version` failed: " + (detail[-1] if detail else "")
    return True, "ok"


def parse_list(text: str, convert) -> list:
    return [convert(item) for item in text.split(",") if item]


def parse_rate(text: str) -> float:
    return 0.0 if text == "max" else float(text)


def build_cells(args: argparse.Namespace) -> list[Cell]:
    if args.smoke:
        return [Cell(10, 20)]
    if args.quick:
        return [Cell(100, 20), Cell(100, 200), Cell(1, 0)]
    cells = [Cell(n, rate) for n in args.clients for rate in args.rates]
    if args.ingest:
        cells.append(Cell(1, 0))
    if args.pinned_clients:
        cells += [Cell(args.pinned_clients, rate, pinned=True) for rate in args.pinned_rates]
    return cells


def raise_fd_limit(clients: int) -> None:
    """Raise RLIMIT_NOFILE to the hard limit; children inherit it.

    Raises:
        SystemExit: if even the hard limit is too low for ``clients``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = clients * FDS_PER_CLIENT + FD_RESERVE
    if hard != resource.RLIM_INFINITY and hard < needed:
        sys.exit(
            f"open-file hard limit {hard} is below the {needed} needed for {clients} "
            "clients; raise it (ulimit -Hn) or run fewer clients"
        )
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="one tiny cell; exits 0 if it ran")
    mode.add_argument("--quick", action="store_true", help="three cells, one round")
    parser.add_argument(
        "--targets",
        default="relay,node,asyncio",
        help="comma-separated relays to run, from relay, node, asyncio (default: all)",
    )
    parser.add_argument(
        "--clients", default="10,100,500,1000", help="client counts of the full matrix"
    )
    parser.add_argument(
        "--rates",
        default="20,200,max",
        help="upstream rates of the full matrix in frames/s; max = as fast as the relay reads",
    )
    parser.add_argument(
        "--no-ingest", dest="ingest", action="store_false", help="skip the 1-client max-rate cell"
    )
    parser.add_argument(
        "--pinned-clients",
        type=int,
        default=500,
        help="clients of the cells with the relay pinned to CPU 0 (0 skips them)",
    )
    parser.add_argument(
        "--pinned-rates",
        default="60,max",
        help="upstream rates of the pinned cells in frames/s (default: 60,max)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        help="seconds of upstream traffic per run; paced runs round up to whole "
        "60-frame cycles (default: 5, quick 3, smoke 2)",
    )
    parser.add_argument("--rounds", type=int, help="repetitions of each cell (default: full 2, else 1)")
    parser.add_argument(
        "--drain-timeout",
        type=float,
        help="seconds to wait for delivery after the upstream stops (default: max(5, duration))",
    )
    parser.add_argument(
        "--frames",
        type=Path,
        help="JSON Lines file of frames to replay (default: 300 frames from gen_frames.py)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed for generated frames")
    parser.add_argument(
        "--loadgen",
        choices=("auto", "node", "python"),
        default="auto",
        help="load generator; auto uses Node when node and ws are installed",
    )
    parser.add_argument(
        "--loadgen-client",
        choices=("raw", "ws"),
        default="raw",
        help="client of the Node load generator: raw (lean, no deflate support) or ws",
    )
    parser.add_argument(
        "--no-client-deflate",
        dest="client_deflate",
        action="store_false",
        help="clients do not offer permessage-deflate (browsers always offer it)",
    )
    parser.add_argument(
        "--python", default=sys.executable, help="Python that runs the relay, peer and upstream"
    )
    parser.add_argument(
        "--profile",
        choices=("gil", "all"),
        help="record the relay with py-spy in every relay run: gil = only the thread "
        "holding the GIL, all = every busy thread (needs py-spy installed)",
    )
    parser.add_argument(
        "--retry-noisy",
        type=int,
        default=0,
        help="repeat a run up to this many times while other processes use more "
        "than 15 %% of a core during it (default: 0)",
    )
    parser.add_argument("--out", type=Path, help="results JSON path (the .md goes beside it)")
    parser.add_argument("--keep-logs", action="store_true", help="keep per-run logs and print their folder")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each process start")
    args = parser.parse_args(argv)

    args.clients = parse_list(args.clients, int)
    args.rates = parse_list(args.rates, parse_rate)
    args.pinned_rates = parse_list(args.pinned_rates, parse_rate)
    args.targets = parse_list(args.targets, str)
    unknown = set(args.targets) - {"relay", "node", "asyncio"}
    if unknown:
        parser.error(f"unknown target(s) {', '.join(sorted(unknown))}; expected relay, node, asyncio")
    if args.smoke:
        mode = "smoke"
    elif args.quick:
        mode = "quick"
    else:
        mode = "full"
    args.mode = mode
    if args.duration is None:
        args.duration = {"smoke": 2.0, "quick": 3.0, "full": 5.0}[mode]
    if args.rounds is None:
        args.rounds = 2 if mode == "full" else 1
    if args.drain_timeout is None:
        args.drain_timeout = max(5.0, args.duration)
    if args.out is None:
        args.out = BENCH_DIR / "results" / f"{mode}.json"
    return args


def choose_targets(args: argparse.Namespace, node_ok: bool, node_reason: str) -> list[str]:
    """Drop the relays that cannot run here, printing why."""
    chosen = list(args.targets)
    if args.smoke:
        # Smoke: the relay plus one peer, the Node one when it can run.
        chosen = ["relay", "node" if node_ok else "asyncio"]
        if not node_ok:
            print(f"smoke: skipping the Node peer ({node_reason}); using the asyncio peer", file=sys.stderr)
    if "node" in chosen and not node_ok:
        print(f"skipping the Node peer: {node_reason}", file=sys.stderr)
        chosen.remove("node")
    if "relay" in chosen:
        relay_ok, relay_reason = relay_available(args.python)
        if not relay_ok:
            print(f"skipping the relay: {relay_reason}", file=sys.stderr)
            chosen.remove("relay")
            if args.smoke and "asyncio" not in chosen:
                chosen.append("asyncio")
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s"
    )

    node_ok, node_reason = node_ws_available()
    loadgen = args.loadgen
    if loadgen == "auto":
        loadgen = "node" if node_ok else "python"
        if not node_ok:
            print(f"using the Python load generator: {node_reason}", file=sys.stderr)
    elif loadgen == "node" and not node_ok:
        sys.exit(f"--loadgen node failed: {node_reason}")

    if args.profile and pyspy.executable() is None:
        sys.exit("--profile needs py-spy on PATH or beside this Python: pip install py-spy")
    target_names = choose_targets(args, node_ok, node_reason)
    if not target_names:
        sys.exit("no relay to benchmark: every requested target was skipped")
    targets = [make_targets(args.python)[name] for name in target_names]
    cells = build_cells(args)
    raise_fd_limit(max(cell.clients for cell in cells))

    work_dir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    frames, frames_source = load_frames(args.frames, 300, args.seed)
    frames_path = work_dir / "frames.jsonl"
    frames_path.write_bytes(b"".join(frame + b"\n" for frame in frames))
    settings = Settings(
        frames_path=frames_path,
        duration_s=args.duration,
        drain_timeout_s=args.drain_timeout,
        python=args.python,
        loadgen=loadgen,
        loadgen_client=args.loadgen_client,
        client_deflate=args.client_deflate,
        work_dir=work_dir,
        profile=args.profile,
        relay_root=snapshot_relay(work_dir / "relay-snapshot") if "relay" in target_names else REPO_DIR,
    )
    environment = describe_environment(settings, targets)
    environment["frames"] = {"source": frames_source, **describe_frames(frames)}
    environment["mode"] = args.mode
    total = len(cells) * args.rounds * len(targets)
    print(
        f"{args.mode}: {len(cells)} cells x {args.rounds} rounds x {len(targets)} relays "
        f"({', '.join(target_names)}) = {total} runs of ~{args.duration:g} s; "
        f"load generator {loadgen}; logs in {work_dir}",
        file=sys.stderr,
    )

    runs: list[dict] = []
    failures = 0
    started_s = time.monotonic()
    number = 0
    for cell in cells:
        for round_number in range(1, args.rounds + 1):
            for target in targets:
                number += 1
                run = measure(target, cell, settings, f"{number:03d}", args.retry_noisy)
                if "error" in run:
                    failures += 1
                    print(f"[{number}/{total}] {target.name:8} {cell.label}: FAILED: {run['error']}", file=sys.stderr)
                else:
                    print(f"[{number}/{total}] {target.name:8} {format_run(run)}", file=sys.stderr)
                run["round"] = round_number
                runs.append(run)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(results_json(environment, settings, runs))

    environment["wall_time_s"] = round(time.monotonic() - started_s, 1)
    args.out.write_text(results_json(environment, settings, runs))
    markdown = render_markdown(args.out)
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"results: {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    if args.keep_logs:
        print(f"logs: {work_dir}", file=sys.stderr)
    else:
        shutil.rmtree(work_dir, ignore_errors=True)

    if args.smoke:
        return smoke_status(runs)
    return 1 if failures == len(runs) else 0


def measure(target: Target, cell: Cell, settings: Settings, prefix: str, retries: int) -> dict:
    """Run one cell, repeating it up to ``retries`` times while it is noisy.

    Returns the last attempt's metrics, or a dict with an "error" key.
    """
    for attempt in range(retries + 1):
        run_id = f"{prefix}-{attempt}-{target.name}-{cell.clients}c-{cell.rate:g}r"
        try:
            run = run_once(target, cell, settings, run_id)
        except RunError as error:
            return {
                "target": target.name,
                "cell": cell.label,
                "clients": cell.clients,
                "rate": cell.rate,
                "pinned": cell.pinned,
                "error": str(error),
            }
        run["attempts"] = attempt + 1
        if not run["noisy"]:
            break
        if attempt < retries:
            print(
                f"  repeating {target.name} {cell.label}: other processes used "
                f"{run['other_cpu_percent']:.0f} % CPU",
                file=sys.stderr,
            )
    return run


def format_run(run: dict) -> str:
    latency = run["latency_ms"]
    flags = []
    if run["loadgen_saturated"]:
        flags.append("LOADGEN SATURATED")
    if run["upstream_saturated"]:
        flags.append("UPSTREAM SATURATED")
    if run["noisy"]:
        flags.append(f"NOISY (other processes {run['other_cpu_percent']:.0f} % CPU)")
    if run["mismatches"]:
        flags.append(f"{run['mismatches']} MISMATCHES")
    return (
        f"{run['cell']}: {run['delivered_mb_s']:.1f} MB/s, "
        f"{100 * run['delivered_fraction']:.1f} % delivered, "
        f"p50/p99 {fmt(latency['p50'])}/{fmt(latency['p99'])} ms, "
        f"relay CPU {fmt(run['relay_cpu_percent'])} %, "
        f"RSS {fmt(run['relay_rss_max_mb'])} MB, loadgen {fmt(run['loadgen_cpu_percent'])} % "
        + " ".join(flags)
    )


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def smoke_status(runs: list[dict]) -> int:
    """Return 0 if every smoke run delivered frames without a mismatch.

    Speed is not checked: CI machines vary too much for that.
    """
    status = 0
    for run in runs:
        if "error" in run:
            print(f"smoke: {run['target']} failed: {run['error']}", file=sys.stderr)
            status = 1
        elif run["deliveries"] == 0:
            print(f"smoke: {run['target']} delivered no frame", file=sys.stderr)
            status = 1
        elif run["mismatches"] or run["out_of_order"]:
            print(
                f"smoke: {run['target']} delivered {run['mismatches']} mismatched and "
                f"{run['out_of_order']} out-of-order frames",
                file=sys.stderr,
            )
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
