"""Fake Backpack.tf events feed for the relay benchmark.

Serves ``ws://127.0.0.1:PORT/events`` and replays frames from a JSON Lines
file to every connected client (normally the one relay under test). The
process is driven by one-line commands on stdin and reports JSON lines on
stdout, so that ``run.py`` can script it:

``start RATE COUNT SECONDS``
    Send frames 0, 1, 2, ... at RATE frames per second (0 sends as fast as the
    relay reads), stopping after COUNT frames (0 for no limit) or SECONDS
    seconds, whichever comes first. Frame ``i`` is ``frames[i % len(frames)]``
    with ``i`` written into the last 6 hex digits of its first event's id, so
    every frame of a run is distinct and a client can tell which one it got.
``quit``
    Close the server and exit.

Before each send the server records ``time.monotonic_ns()`` (CLOCK_MONOTONIC,
the clock that Node's ``process.hrtime`` reads). At the end of a run it writes
those times, one little-endian float64 per frame index, to ``--send-times``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from array import array
from pathlib import Path

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_frames import read_frames  # noqa: E402

# Byte offsets of the sequence number inside '[{"id":"' + 24 hex digits.
STAMP_START = 26
STAMP_END = 32
STAMP_MODULUS = 1 << 24


def report(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def stamp_frame(template: bytes, index: int) -> bytes:
    """Return ``template`` with ``index`` written into its first event's id."""
    stamp = b"%06x" % (index % STAMP_MODULUS)
    return template[:STAMP_START] + stamp + template[STAMP_END:]


class Feed:
    """The set of connected relays and the replay loop that feeds them."""

    def __init__(self, frames: list[bytes], send_times_path: Path) -> None:
        self.frames = frames
        self.send_times_path = send_times_path
        self.connections: set[ServerConnection] = set()

    async def handle(self, connection: ServerConnection) -> None:
        if connection.request is None or connection.request.path != "/events":
            await connection.close(1008, "unknown path")
            return
        self.connections.add(connection)
        report("connected", peer=str(connection.remote_address), count=len(self.connections))
        try:
            await connection.wait_closed()
        finally:
            self.connections.discard(connection)
            report(
                "disconnected",
                peer=str(connection.remote_address),
                count=len(self.connections),
            )

    async def replay(self, rate: float, count: int, seconds: float) -> None:
        """Send frames at ``rate`` per second until ``count`` or ``seconds`` runs out."""
        send_times = array("d")
        sent_bytes = 0
        send_errors = 0
        stalled = False
        frames = self.frames
        frame_count = len(frames)
        interval_ns = int(1e9 / rate) if rate > 0 else 0
        start_ns = time.monotonic_ns()
        deadline_ns = start_ns + int(seconds * 1e9)
        index = 0
        while (count == 0 or index < count) and time.monotonic_ns() < deadline_ns:
            if interval_ns:
                # Keep to the schedule. A late frame goes out at once, as a real
                # feed's backlog would, instead of shifting every later frame.
                delay_ns = start_ns + index * interval_ns - time.monotonic_ns()
                if delay_ns > 0:
                    await asyncio.sleep(delay_ns / 1e9)
            frame = stamp_frame(frames[index % frame_count], index)
            send_times.append(float(time.monotonic_ns()))
            for connection in list(self.connections):
                # send() returns once the frame is in the transport's buffer
                # and that buffer has drained below its limit. A relay that
                # stops reading blocks it, so the wait is bounded by the
                # deadline. Cancelling the wait leaves the frame whole in the
                # buffer.
                remaining_s = max((deadline_ns - time.monotonic_ns()) / 1e9, 0.001)
                try:
                    await asyncio.wait_for(connection.send(frame, text=True), remaining_s)
                except ConnectionClosed:
                    send_errors += 1
                except asyncio.TimeoutError:
                    stalled = True
            sent_bytes += len(frame)
            index += 1
            if stalled:
                break

        end_ns = time.monotonic_ns()
        with open(self.send_times_path, "wb") as file:
            send_times.tofile(file)
        report(
            "done",
            sent=index,
            bytes=sent_bytes,
            first_send_ns=send_times[0] if send_times else None,
            last_send_ns=send_times[-1] if send_times else None,
            elapsed_s=(end_ns - start_ns) / 1e9,
            connections=len(self.connections),
            send_errors=send_errors,
            stalled=stalled,
        )


async def read_commands(feed: Feed) -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.strip() == "quit":
            return
        words = line.split()
        if words[0] == "start" and len(words) == 4:
            await feed.replay(float(words[1]), int(words[2]), float(words[3]))
        else:
            report("error", message=f"invalid command {line.strip()!r}")


async def main_async(args: argparse.Namespace) -> None:
    frames = read_frames(args.frames)
    feed = Feed(frames, args.send_times)
    async with serve(
        feed.handle,
        args.host,
        args.port,
        compression=None,
        max_size=None,
        ping_interval=None,
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        report("listening", port=port, pid=os.getpid(), frames=len(frames))
        await read_commands(feed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="listen address")
    parser.add_argument("--port", type=int, default=0, help="listen port (0 picks one)")
    parser.add_argument(
        "--frames", type=Path, required=True, help="JSON Lines file of frames to replay"
    )
    parser.add_argument(
        "--send-times",
        type=Path,
        required=True,
        help="output file for per-frame send times (float64 ns, CLOCK_MONOTONIC)",
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
