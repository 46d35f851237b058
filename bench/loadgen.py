"""Python fallback of loadgen.js, for machines without Node or the ws package.

Same command line, stdin commands and stdout JSON lines as loadgen.js (see
there). It checks every frame the same way but costs several times more CPU
per frame, so it saturates early: use it for smoke runs, not for numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from array import array

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

STAMP_START = 26
STAMP_END = 32
LARGE_FRAME_BYTES = 256 * 1024
HEX_DIGITS = frozenset(b"0123456789abcdef")


def report(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def read_frames(path: str) -> list[bytes]:
    with open(path, "rb") as file:
        frames = [line for line in file.read().split(b"\n") if line]
    if not frames:
        raise SystemExit(f"{path}: no frames found")
    return frames


def latency_summary(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "p999": None, "max": None, "mean": None}
    values.sort()
    count = len(values)

    def percentile(p: float) -> float:
        return values[min(count - 1, max(0, math.ceil(p * count / 100) - 1))]

    return {
        "count": count,
        "p50": percentile(50),
        "p90": percentile(90),
        "p99": percentile(99),
        "p999": percentile(99.9),
        "max": values[-1],
        "mean": sum(values) / count,
    }


class LoadGenerator:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.frames = read_frames(args.frames)
        self.connections: list[ClientConnection | None] = [None] * args.clients
        self.last_index = [-1] * args.clients
        self.delivered_per_client = [0] * args.clients
        self.delivery_indexes = array("L")
        self.delivery_times = array("d")
        self.delivered_bytes = 0
        self.mismatches = 0
        self.out_of_order = 0
        self.binary_frames = 0
        self.other_frames = 0
        self.control_messages: dict[str, int] = {}
        self.closes_during_run = 0
        self.close_codes: dict[str, int] = {}
        self.connect_failures = 0
        self.connect_errors: dict[str, int] = {}
        self.deflate_negotiated = 0
        self.last_array_frame_ns = 0
        self.running = False
        self.window: dict = {}

    async def connect_all(self) -> float:
        start = time.monotonic()
        limit = asyncio.Semaphore(self.args.connect_concurrency)
        opened = await asyncio.gather(*(self.connect_one(i, limit) for i in range(self.args.clients)))
        for client_id, connection in enumerate(opened):
            if connection is not None:
                asyncio.ensure_future(self.receive(client_id, connection))
        return time.monotonic() - start

    async def connect_one(self, client_id: int, limit: asyncio.Semaphore) -> ClientConnection | None:
        async with limit:
            try:
                connection = await connect(
                    self.args.url,
                    compression="deflate" if self.args.deflate else None,
                    max_size=None,
                    open_timeout=self.args.connect_timeout_ms / 1000,
                )
            except (OSError, InvalidHandshake, asyncio.TimeoutError) as error:
                self.connect_failures += 1
                key = type(error).__name__
                self.connect_errors[key] = self.connect_errors.get(key, 0) + 1
                return None
        self.connections[client_id] = connection
        extensions = connection.response.headers.get("Sec-WebSocket-Extensions", "")
        if "permessage-deflate" in extensions:
            self.deflate_negotiated += 1
        return connection

    async def receive(self, client_id: int, connection: ClientConnection) -> None:
        try:
            async for message in connection:
                self.on_message(client_id, message)
        except ConnectionClosed:
            pass
        code = str(connection.close_code)
        self.close_codes[code] = self.close_codes.get(code, 0) + 1
        if self.running:
            self.closes_during_run += 1
        self.connections[client_id] = None

    def on_message(self, client_id: int, message: str | bytes) -> None:
        time_ns = time.monotonic_ns()
        if isinstance(message, bytes):
            self.binary_frames += 1
            self.mismatches += 1
            return
        data = message.encode("utf-8")

        if data[:1] == b"{":
            try:
                kind = str(json.loads(data).get("type"))
            except (ValueError, AttributeError):
                kind = "invalid-json"
            self.control_messages[kind] = self.control_messages.get(kind, 0) + 1
            return
        if data[:1] != b"[":
            self.other_frames += 1
            self.mismatches += 1
            return

        self.last_array_frame_ns = time_ns
        stamp = data[STAMP_START:STAMP_END]
        if len(stamp) != STAMP_END - STAMP_START or not HEX_DIGITS.issuperset(stamp):
            self.mismatches += 1
            return
        index = int(stamp, 16)
        source = self.frames[index % len(self.frames)]
        if len(data) != len(source) or data[:STAMP_START] != source[:STAMP_START] or data[STAMP_END:] != source[STAMP_END:]:
            self.mismatches += 1
            return
        if index <= self.last_index[client_id]:
            self.out_of_order += 1
            return

        self.last_index[client_id] = index
        self.delivered_per_client[client_id] += 1
        self.delivered_bytes += len(data)
        self.delivery_indexes.append(index)
        self.delivery_times.append(float(time_ns))

    def begin(self) -> None:
        self.running = True
        self.window = {"start_ns": time.monotonic_ns(), "cpu_s": time.process_time()}

    def end_window(self) -> None:
        if "end_ns" not in self.window and self.window:
            self.window["end_ns"] = time.monotonic_ns()
            self.window["cpu_delta_s"] = time.process_time() - self.window["cpu_s"]

    async def wait_drained(self, count: int) -> None:
        quiet_ns = self.args.quiet_ms * 1_000_000
        while True:
            complete = all(
                connection is None or self.last_index[i] >= count - 1
                for i, connection in enumerate(self.connections)
            )
            quiet = time.monotonic_ns() - self.last_array_frame_ns > quiet_ns
            if complete or quiet:
                self.end_window()
                report("drained", reason="complete" if complete else "quiet")
                return
            await asyncio.sleep(0.05)

    def summarize(self, send_times_path: str) -> dict:
        send_times = array("d")
        with open(send_times_path, "rb") as file:
            send_times.frombytes(file.read())
        sent = len(send_times)
        everything, large, small = [], [], []
        first_ns, last_ns = None, None
        for index, time_ns in zip(self.delivery_indexes, self.delivery_times):
            if index >= sent:
                self.mismatches += 1
                continue
            latency_ms = (time_ns - send_times[index]) / 1e6
            everything.append(latency_ms)
            if len(self.frames[index % len(self.frames)]) >= LARGE_FRAME_BYTES:
                large.append(latency_ms)
            else:
                small.append(latency_ms)
            first_ns = time_ns if first_ns is None else min(first_ns, time_ns)
            last_ns = time_ns if last_ns is None else max(last_ns, time_ns)
        connected = self.args.clients - self.connect_failures
        wall_s = (self.window["end_ns"] - self.window["start_ns"]) / 1e9 if "end_ns" in self.window else None
        cpu_s = self.window.get("cpu_delta_s")
        return {
            "clients": self.args.clients,
            "connected": connected,
            "connect_failures": self.connect_failures,
            "connect_errors": self.connect_errors,
            "deflate_negotiated": self.deflate_negotiated,
            "frames_sent": sent,
            "deliveries": len(everything),
            "expected_deliveries": sent * connected,
            "delivered_bytes": self.delivered_bytes,
            "mismatches": self.mismatches,
            "out_of_order": self.out_of_order,
            "binary_frames": self.binary_frames,
            "other_frames": self.other_frames,
            "control_messages": self.control_messages,
            "closes_during_run": self.closes_during_run,
            "close_codes": self.close_codes,
            "min_client_deliveries": min(self.delivered_per_client),
            "max_client_deliveries": max(self.delivered_per_client),
            "first_receive_ns": first_ns,
            "last_receive_ns": last_ns,
            "latency_ms": latency_summary(everything),
            "latency_large_frames_ms": latency_summary(large),
            "latency_small_frames_ms": latency_summary(small),
            "self_cpu": {
                "wall_s": wall_s,
                "cpu_s": cpu_s,
                "percent_of_core": 100 * cpu_s / wall_s if wall_s and cpu_s is not None else None,
                "event_loop_utilization": None,
            },
        }


async def main_async(args: argparse.Namespace) -> None:
    generator = LoadGenerator(args)
    connect_s = await generator.connect_all()
    report(
        "ready",
        clients=args.clients,
        connected=args.clients - generator.connect_failures,
        connect_failures=generator.connect_failures,
        connect_errors=generator.connect_errors,
        deflate_negotiated=generator.deflate_negotiated,
        connect_s=connect_s,
    )
    loop = asyncio.get_running_loop()
    drain_task = None
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        words = line.split()
        if words == ["begin"]:
            generator.begin()
        elif len(words) == 2 and words[0] == "expect":
            drain_task = asyncio.ensure_future(generator.wait_drained(int(words[1])))
        elif len(words) == 2 and words[0] == "stop":
            if drain_task is not None:
                drain_task.cancel()
            generator.end_window()
            generator.running = False
            report("result", **generator.summarize(words[1]))
            for connection in generator.connections:
                if connection is not None:
                    connection.transport.abort()
            return
        else:
            report("error", message=f"invalid command {line.strip()!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="relay URL, ws://127.0.0.1:PORT/relay")
    parser.add_argument("--clients", type=int, default=10, help="number of clients")
    parser.add_argument("--frames", required=True, help="JSON Lines file of the upstream's frames")
    parser.add_argument("--connect-concurrency", type=int, default=50, help="handshakes at once")
    parser.add_argument("--connect-timeout-ms", type=float, default=10000, help="handshake timeout")
    parser.add_argument("--quiet-ms", type=float, default=1000, help="idle time that ends draining")
    parser.add_argument("--deflate", dest="deflate", action="store_true", default=True, help="offer permessage-deflate")
    parser.add_argument("--no-deflate", dest="deflate", action="store_false", help="do not offer it")
    args = parser.parse_args()
    if args.clients < 1:
        parser.error(f"--clients must be at least 1, got {args.clients}")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
