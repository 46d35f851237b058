"""Relay with planned faults, to check that the load generators count them.

For the k-th array frame from the upstream (k = 0, 1, ...), by ``k % 10``:
3 flips one ASCII byte in the middle (a mismatch), 5 drops the frame, 7 sends
it twice (the copy is out of order), 9 sends it as 4 fragments (must still be
delivered). Before frame 0 it sends one binary frame (a mismatch). Every
client also gets a ``{"type": "relay_status"}`` greeting and a protocol ping
every 0.2 s, and is closed unless it replies with a pong within 1 s.

Usage: python faulty_relay.py --upstream URL --port PORT
"""

from __future__ import annotations

import argparse
import asyncio
import json

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

CORRUPT, DROP, DUPLICATE, FRAGMENT = 3, 5, 7, 9


def corrupt(frame: str) -> str:
    """Return ``frame`` with the first ASCII letter after its middle changed."""
    position = len(frame) // 2
    while not frame[position].isascii() or not frame[position].isalpha():
        position += 1
    replacement = "b" if frame[position] == "a" else "a"
    return frame[:position] + replacement + frame[position + 1 :]


def fragments(frame: str, count: int = 4) -> list[str]:
    size = -(-len(frame) // count)
    return [frame[i : i + size] for i in range(0, len(frame), size)]


class FaultyRelay:
    def __init__(self) -> None:
        self.clients: set[ServerConnection] = set()

    async def handle(self, connection: ServerConnection) -> None:
        await connection.send(json.dumps({"type": "relay_status", "clients": len(self.clients)}))
        self.clients.add(connection)
        try:
            await connection.wait_closed()
        finally:
            self.clients.discard(connection)

    async def send_all(self, k: int, frame: str) -> None:
        if k == 0:
            await asyncio.gather(*(client.send(b"\x00binary") for client in self.clients))
        fault = k % 10
        if fault == DROP:
            return
        if fault == CORRUPT:
            frame = corrupt(frame)
        for client in list(self.clients):
            if fault == FRAGMENT:
                await client.send(fragments(frame))
            else:
                await client.send(frame)
            if fault == DUPLICATE:
                await client.send(frame)


async def main_async(args: argparse.Namespace) -> None:
    relay = FaultyRelay()
    async with serve(
        relay.handle,
        "127.0.0.1",
        args.port,
        compression=None,
        max_size=None,
        ping_interval=0.2,
        ping_timeout=1.0,
    ):
        async with connect(args.upstream, compression=None, max_size=None) as upstream:
            k = 0
            async for frame in upstream:
                await relay.send_all(k, frame)
                k += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="upstream websocket URL")
    parser.add_argument("--port", type=int, required=True, help="listen port")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
