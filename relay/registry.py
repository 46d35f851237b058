"""The set of connected clients and the fan-out of frames to them.

The registry keeps clients in a dict guarded by a lock and publishes an
immutable tuple snapshot on every change. ``broadcast`` runs on the upstream
thread for every frame, so it takes the lock only to read the snapshot and
iterates without it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any, Callable, Iterable

from .client import WRITTEN, Client, CloseCause
from .frames import relay_message

logger = logging.getLogger(__name__)


class Registry:
    """Lock-protected set of clients with fan-out and per-cause counters."""

    def __init__(self, latency: Any = None) -> None:
        # metrics.LatencyHistogram fed by broadcast(), or None.
        self.latency = latency
        self._lock = threading.Lock()
        self._clients: dict[int, Client] = {}
        self._snapshot: tuple[Client, ...] = ()
        # Slots taken by reserve() before the handshake, so concurrent
        # connects cannot overshoot max_clients or max_clients_per_ip.
        self._pending = 0
        self._per_address: Counter[str] = Counter()
        self._next_id = 1
        self.accepted_total = 0
        # Counted when a client starts closing, under a lock of its own,
        # because clients call count_closing() while holding their own lock.
        self.closed_by_cause: Counter[str] = Counter()
        self._counter_lock = threading.Lock()
        # Totals of clients that have left, so /status keeps them.
        self._departed_frames = 0
        self._departed_bytes = 0
        self._departed_dropped = 0

    def next_id(self) -> int:
        with self._lock:
            client_id = self._next_id
            self._next_id += 1
            return client_id

    def reserve(self, address: str, max_clients: int, max_per_address: int) -> str | None:
        """Take a client slot for ``address``, or return the name of the cap reached.

        A reserved slot becomes the client's in ``add`` or is given back with
        ``release``. ``max_per_address`` 0 means no per-address cap.
        """
        with self._lock:
            if max_per_address and self._per_address[address] >= max_per_address:
                return "max_clients_per_ip"
            if len(self._clients) + self._pending >= max_clients:
                return "max_clients"
            self._pending += 1
            self._per_address[address] += 1
            return None

    def release(self, address: str) -> None:
        """Give back a slot from ``reserve`` whose handshake failed."""
        with self._lock:
            self._pending -= 1
            self._forget_address(address)

    def _forget_address(self, address: str) -> None:
        self._per_address[address] -= 1
        if self._per_address[address] <= 0:
            del self._per_address[address]

    def add(self, client: Client, greeting: Callable[[int], bytes] | None = None) -> int:
        """Start fanning frames out to ``client``; return the new client count.

        ``greeting(count)`` builds the first frame the client gets. It is sent
        under the lock, just before the client joins the snapshot, so it comes
        before any broadcast frame and the client misses none sent after it.
        """
        with self._lock:
            if greeting is not None:
                client.send(greeting(len(self._clients) + 1))
            self._clients[client.id] = client
            self._pending -= 1
            self._snapshot = tuple(self._clients.values())
            self.accepted_total += 1
            return len(self._clients)

    def remove(self, client: Client) -> int:
        """Stop fanning out to ``client`` and fold its counters into the totals."""
        with self._lock:
            if self._clients.pop(client.id, None) is None:
                return len(self._clients)
            self._forget_address(client.address)
            self._snapshot = tuple(self._clients.values())
            self._departed_frames += client.frames_sent
            self._departed_bytes += client.bytes_sent
            self._departed_dropped += client.frames_dropped
            return len(self._clients)

    def count_closing(self, cause: CloseCause) -> None:
        with self._counter_lock:
            self.closed_by_cause[cause.value] += 1

    def clients(self) -> tuple[Client, ...]:
        return self._snapshot

    def count(self) -> int:
        return len(self._snapshot)


    def broadcast(self, frame: bytes, upstream: bool = True, received_at: float | None = None) -> None:
        """Send one encoded frame to every client without blocking on a socket.

        ``received_at`` (``time.monotonic()`` when the upstream frame arrived)
        feeds the delivery latency histogram. Clients written at once count
        with the time the whole pass took, an upper bound, in one
        observation. Queued ones count when their writer finishes the frame.
        """
        # Reading the snapshot under the lock waits out an add() in progress,
        # whose greeting may already be on the wire.
        with self._lock:
            clients = self._snapshot
        written_now = 0
        for client in clients:
            if client.send(frame, upstream, received_at=received_at) == WRITTEN:
                written_now += 1
        if received_at is not None and written_now and self.latency is not None:
            self.latency.observe(time.monotonic() - received_at, written_now)

    def broadcast_message(self, message_type: str, **fields: Any) -> None:
        """Send a relay message (a JSON object) to every client."""
        self.broadcast(relay_message(message_type, **fields), upstream=False)

    def totals(self) -> dict[str, int]:
        """Return delivered frames and bytes and dropped frames, all clients ever."""
        clients = self._snapshot
        with self._lock:
            frames = self._departed_frames
            sent = self._departed_bytes
            dropped = self._departed_dropped
        return {
            "framesDelivered": frames + sum(c.frames_sent for c in clients),
            "bytesDelivered": sent + sum(c.bytes_sent for c in clients),
            "framesDropped": dropped + sum(c.frames_dropped for c in clients),
        }

    def close_all(self, clients: Iterable[Client] | None = None) -> None:
        """Send 1001 to every client because the relay is stopping."""
        for client in clients if clients is not None else self._snapshot:
            client.going_away()


class Keepalive(threading.Thread):
    """One thread that pings every client and closes the silent ones."""

    def __init__(
        self,
        registry: Registry,
        interval: Callable[[], float],
        stop: threading.Event,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name="keepalive", daemon=True)
        self._registry = registry
        # Read on every tick, because a SIGHUP reload may change it.
        self._interval = interval
        self._stop_event = stop
        self._on_tick = on_tick

    def run(self) -> None:
        while not self._stop_event.wait(min(1.0, self._interval() / 4)):
            now = time.monotonic()
            for client in self._registry.clients():
                client.check_keepalive(now)
            if self._on_tick is not None:
                self._on_tick()
