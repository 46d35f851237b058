"""Minimal asyncio relay used as a benchmark peer.

One upstream websocket, every frame broadcast to the clients of
``ws://HOST:PORT/relay`` with ``websockets.broadcast``. Compression is off, and
a client whose transport write buffer exceeds ``--max-buffered`` bytes misses
frames until it catches up, as the Node peer does. It sends no messages of
its own and exits when the upstream closes.

Usage: python asyncio_relay.py --upstream URL --port PORT
(PORT and BACKPACK_WS_URL in the environment set the same values.)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, broadcast, serve

logger = logging.getLogger("asyncio_relay")


class Relay:
    def __init__(self, max_buffered: int) -> None:
        self.max_buffered = max_buffered
        self.clients: set[ServerConnection] = set()
        self.skipped = 0

    async def handle(self, connection: ServerConnection) -> None:
        if connection.request is None or connection.request.path != "/relay":
            await connection.close(1008, "unknown path")
            return
        self.clients.add(connection)
        try:
            await connection.wait_closed()
        finally:
            self.clients.discard(connection)

    def forward(self, message: str | bytes) -> None:
        ready = []
        for client in self.clients:
            if client.transport.get_write_buffer_size() > self.max_buffered:
                self.skipped += 1
            else:
                ready.append(client)
        broadcast(ready, message)


async def run(args: argparse.Namespace) -> None:
    relay = Relay(args.max_buffered)
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with serve(relay.handle, args.host, args.port, compression=None, max_size=None):
        async with connect(args.upstream, compression=None, max_size=None) as upstream:
            logger.warning("upstream %s open, serving ws://%s:%d/relay", args.upstream, args.host, args.port)
            reader = asyncio.ensure_future(forward_all(upstream, relay))
            await asyncio.wait([reader, stop], return_when=asyncio.FIRST_COMPLETED)
            reader.cancel()
    logger.warning("stopping; %d sends skipped", relay.skipped)


async def forward_all(upstream, relay: Relay) -> None:
    async for message in upstream:
        relay.forward(message)
    logger.warning("upstream closed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", default=os.environ.get("BACKPACK_WS_URL"), help="upstream websocket URL")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "3001")), help="listen port")
    parser.add_argument("--host", default="127.0.0.1", help="listen address")
    parser.add_argument(
        "--max-buffered",
        type=int,
        default=4 * 1024 * 1024,
        help="skip a client while its write buffer contains more than this many bytes",
    )
    args = parser.parse_args()
    if not args.upstream:
        parser.error("missing upstream URL: pass --upstream or set BACKPACK_WS_URL")
    logging.basicConfig(level=logging.WARNING, format="asyncio_relay: %(message)s")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
