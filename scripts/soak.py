"""Soak test: many upstream drops while clients stay connected.

Starts the real relay (``python -m relay``) against the fake upstream from
``tests/support.py`` on 127.0.0.1 and connects ``--clients`` websocket
clients. The upstream then drops ``--drops`` times at random points, either
with a TCP reset in the middle of a frame stream or with a clean close frame
(1000, 1001 or 1011). Every frame carries its upstream connection number and
sequence number.

Frames sent while the upstream is down do not exist, and a TCP reset
discards frames still queued or in flight, so the script checks what the
relay did receive. Each client must see exactly the frames the relay counts
as relayed, per connection in order 0, 1, 2, ... with no gap, duplicate or
reordering. The script also reports reconnects, the most upstream
connections open at once (expected 1), and threads, open descriptors and RSS
before and after.

Usage: python scripts/soak.py [--drops 100] [--duration 120] [--clients 20] [--seed N]
Exit status 0 when every check passes, 1 otherwise. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import (  # noqa: E402
    UNCAUGHT_MARKERS,
    Collector,
    FakeUpstream,
    FrameStreamer,
    RawWebSocket,
    RelayProcess,
    numbered_frame,
    wait_for,
)

CLOSE_CODES = {"close_1000": (1000, ""), "close_1001": (1001, "proxy restart"), "close_1011": (1011, "internal error")}
FINAL_FRAMES = 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Drop the fake upstream many times under the real relay and check delivery.")
    parser.add_argument("--drops", type=int, default=100, help="upstream drops to inject (default 100)")
    parser.add_argument("--duration", type=float, default=120.0, help="target length of the drop phase in seconds (default 120)")
    parser.add_argument("--clients", type=int, default=20, help="websocket clients held for the whole run (default 20)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock, printed)")
    return parser.parse_args(argv)


def process_stats(relay: RelayProcess) -> dict[str, int]:
    body = relay.get("/status")[1]["process"]
    return {"threads": body["threads"], "openFds": body["openFds"], "rssBytes": body["rssBytes"]}


def check_client(numbers: list[tuple[int, int]], relayed: dict[int, int]) -> dict[str, int]:
    """Count frames lost, duplicated and reordered for one client.

    ``relayed`` maps an upstream connection number to the frames the relay
    relayed from it, which is the most any client saw from that connection.
    """
    seen: set[tuple[int, int]] = set()
    duplicated = reordered = 0
    previous = (0, -1)
    for number in numbers:
        if number in seen:
            duplicated += 1
        elif number < previous:
            reordered += 1
        seen.add(number)
        previous = max(previous, number)
    expected = {(conn, seq) for conn, count in relayed.items() for seq in range(count)}
    return {"lost": len(expected - seen), "duplicated": duplicated, "reordered": reordered, "received": len(numbers)}


def run(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    upstream = FakeUpstream()
    relay = RelayProcess(
        upstream.url,
        {
            "upstream": {"backoff_initial": 0.05, "backoff_max": 0.2, "backoff_reset_after": 0.5},
            "clients": {"ping_interval": 5},
        },
    )
    collectors: list[Collector] = []
    try:
        relay.wait_listening()
        upstream.wait_connection(1, 10)
        relay.wait_health(200, 10)
        for _ in range(args.clients):
            # Keep relay messages (JSON objects), not the numbered frames'
            # payloads; the collector records their numbers anyway.
            collector = Collector(RawWebSocket(relay.port), lambda payload: payload if payload[:1] == b"{" else None)
            collector.start()
            collectors.append(collector)
        wait_for(lambda: relay.get("/health")[1]["connectedClients"] == args.clients, 10)
        before = process_stats(relay)
        started = time.monotonic()

        kinds: dict[str, int] = {}
        sent: dict[int, int] = {}
        clean: set[int] = set()
        reconnect_delays: list[float] = []
        mean_gap = args.duration / max(1, args.drops)
        for drop in range(1, args.drops + 1):
            connection = upstream.wait_connection(drop, 10)
            streamer = FrameStreamer(connection, drop, rng.choice([0.0005, 0.001, 0.002]), pad=rng.randint(0, 2000))
            streamer.start()
            time.sleep(rng.uniform(0, 2 * mean_gap))
            kind = rng.choice(["reset", "reset", *CLOSE_CODES])
            kinds[kind] = kinds.get(kind, 0) + 1
            dropped_at = time.monotonic()
            if kind == "reset":
                connection.reset()
                sent[drop] = streamer.finish()
            else:
                sent[drop] = streamer.finish()
                clean.add(drop)
                code, reason = CLOSE_CODES[kind]
                try:
                    connection.send_close(code, reason)
                except OSError:
                    pass
            upstream.wait_connection(drop + 1, 10)
            reconnect_delays.append(upstream.connections[drop].opened_at - dropped_at)
            if drop % 10 == 0:
                print(f"  {drop} drops, {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)

        last = upstream.wait_connection(args.drops + 1, 10)
        relay.wait_health(200, 10)
        for number in range(FINAL_FRAMES):
            last.send_text(numbered_frame(number, args.drops + 1))
        sent[args.drops + 1] = FINAL_FRAMES
        for collector in collectors:
            wait_for(lambda: sum(1 for conn, _ in collector.numbers if conn == args.drops + 1) >= FINAL_FRAMES, 20)
        drop_phase = time.monotonic() - started
        time.sleep(1.0)
        after = process_stats(relay)
        status = relay.get("/status")[1]

        relayed: dict[int, int] = {}
        for collector in collectors:
            for conn, seq in collector.numbers:
                relayed[conn] = max(relayed.get(conn, 0), seq + 1)
        results = [check_client(list(collector.numbers), relayed) for collector in collectors]
        disconnected = [len(collector.messages("backpack_disconnected")) for collector in collectors]
        connected_messages = [len(collector.messages("backpack_connected")) for collector in collectors]
        report = {
            "seed": seed,
            "drops": args.drops,
            "dropsByKind": kinds,
            "clients": args.clients,
            "dropPhaseSeconds": round(drop_phase, 1),
            "framesSent": sum(sent.values()),
            "framesReceivedByRelay": status["traffic"]["framesIn"],
            "framesRelayedByRelay": status["traffic"]["framesRelayed"],
            "framesLostInFlightAtResets": sum(sent[conn] - relayed.get(conn, 0) for conn in sent if conn not in clean),
            "framesLostAtCleanCloses": sum(sent[conn] - relayed.get(conn, 0) for conn in clean),
            "healthyClients": {
                "framesLost": sum(r["lost"] for r in results),
                "framesDuplicated": sum(r["duplicated"] for r in results),
                "framesReordered": sum(r["reordered"] for r in results),
                "framesReceivedEach": sorted({r["received"] for r in results}),
                "stillConnected": sum(1 for c in collectors if c.is_alive() and not c.ended),
                "backpackDisconnectedEach": sorted(set(disconnected)),
                "backpackConnectedEach": sorted(set(connected_messages)),
            },
            "upstream": {
                "disconnects": status["upstream"]["disconnects"],
                "disconnectsByCause": status["upstream"]["disconnectsByCause"],
                "reconnects": status["upstream"]["reconnects"],
                "handshakes": upstream.handshakes,
                "maxConcurrentConnections": upstream.max_open,
                "reconnectSeconds": {
                    "min": round(min(reconnect_delays), 3),
                    "median": round(statistics.median(reconnect_delays), 3),
                    "max": round(max(reconnect_delays), 3),
                },
            },
            "process": {"before": before, "after": after},
        }
    finally:
        for collector in collectors:
            collector.client.close()
            collector.stop(2)
        exit_code = relay.stop()
        upstream.close()

    report["relayExitCode"] = exit_code
    report["uncaughtExceptions"] = sum(relay.output.count(marker) for marker in UNCAUGHT_MARKERS)
    healthy = report["healthyClients"]
    checks = {
        "no frame lost for a healthy client": healthy["framesLost"] == 0,
        "no frame duplicated": healthy["framesDuplicated"] == 0,
        "no frame reordered": healthy["framesReordered"] == 0,
        "every client got the relay's frame count": healthy["framesReceivedEach"] == [report["framesRelayedByRelay"]],
        "nothing lost before a clean close": report["framesLostAtCleanCloses"] == 0,
        "relay relayed every frame it received": report["framesReceivedByRelay"] == report["framesRelayedByRelay"],
        "every client stayed connected": healthy["stillConnected"] == args.clients,
        "one disconnect counted per drop": report["upstream"]["disconnects"] == args.drops,
        "never two upstream connections": report["upstream"]["maxConcurrentConnections"] == 1,
        "relay exited 0": exit_code == 0,
        "no uncaught exception": report["uncaughtExceptions"] == 0,
    }
    report["checks"] = checks
    print(json.dumps(report, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(run(parse_args()))
