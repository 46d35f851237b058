"""Prometheus metrics for ``GET /metrics``, read from the relay's counters at scrape time.

A custom collector reads the counters the relay keeps anyway, so the fan-out
path does no extra work per frame for metrics. The one exception is the
delivery latency histogram, which ``LatencyHistogram`` fills cheaply: one
observation per frame for all clients written at once, and one per queued
frame when its writer finishes it.
"""

from __future__ import annotations

import bisect
import threading
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from . import __version__
from .upstream import UpstreamState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds from an upstream frame's arrival to its write on a client socket.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LatencyHistogram:
    """A fixed-bucket histogram with a cheaper ``observe`` than prometheus_client's."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self._counts = [0] * (len(buckets) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float, count: int = 1) -> None:
        """Record ``count`` deliveries that each took ``seconds``."""
        index = bisect.bisect_left(self.buckets, seconds)
        with self._lock:
            self._counts[index] += count
            self._sum += seconds * count

    def observe_many(self, values: list[float]) -> None:
        """Record one delivery per value, taking the lock once."""
        indexes = [bisect.bisect_left(self.buckets, value) for value in values]
        with self._lock:
            for index in indexes:
                self._counts[index] += 1
            self._sum += sum(values)

    def snapshot(self) -> tuple[list[tuple[str, int]], float]:
        """Return cumulative ``(le, count)`` pairs ending with +Inf, and the sum."""
        with self._lock:
            counts = list(self._counts)
            total = self._sum
        cumulative = []
        running = 0
        for bound, count in zip(self.buckets, counts):
            running += count
            cumulative.append((repr(bound), running))
        running += counts[-1]
        cumulative.append(("+Inf", running))
        return cumulative, total


class RelayCollector:
    """Collector that turns ``service.Relay`` state into metric families."""

    def __init__(self, relay: Any) -> None:
        self.relay = relay

    def collect(self) -> Iterator[Any]:
        relay = self.relay
        upstream = relay.upstream
        registry = relay.registry
        totals = registry.totals()

        info = GaugeMetricFamily("bptf_relay_info", "Relay version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info

        yield GaugeMetricFamily(
            "bptf_relay_uptime_seconds", "Seconds since the relay started", value=relay.uptime()
        )
        yield GaugeMetricFamily(
            "bptf_relay_upstream_connected",
            "1 while the Backpack.tf connection is open",
            value=1 if upstream.connected else 0,
        )
        state = GaugeMetricFamily("bptf_relay_upstream_state", "Upstream connection state", labels=["state"])
        for candidate in UpstreamState:
            state.add_metric([candidate.value], 1 if upstream.state is candidate else 0)
        yield state

        yield CounterMetricFamily(
            "bptf_relay_upstream_connects", "Upstream connections opened", value=upstream.connects
        )
        disconnects = CounterMetricFamily(
            "bptf_relay_upstream_disconnects",
            "Upstream connections lost, by cause (a reconnect follows each)",
            labels=["cause"],
        )
        for cause, count in sorted(upstream.disconnects_by_cause.items()):
            disconnects.add_metric([cause], count)
        yield disconnects
        yield CounterMetricFamily(
            "bptf_relay_upstream_attempts", "Upstream connection attempts", value=upstream.attempt
        )
        yield CounterMetricFamily(
            "bptf_relay_upstream_client_limit_exceeded",
            "client-limit-exceeded events from Backpack.tf",
            value=upstream.client_limit_exceeded,
        )

        yield CounterMetricFamily(
            "bptf_relay_frames_received", "Frames received from the upstream", value=upstream.frames_in
        )
        yield CounterMetricFamily(
            "bptf_relay_bytes_received", "Payload bytes received from the upstream", value=upstream.bytes_in
        )
        yield CounterMetricFamily(
            "bptf_relay_frames_relayed", "Upstream frames handed to the fan-out", value=upstream.frames_relayed
        )
        yield CounterMetricFamily(
            "bptf_relay_frames_delivered", "Upstream frames written to clients", value=totals["framesDelivered"]
        )
        yield CounterMetricFamily(
            "bptf_relay_bytes_delivered", "Bytes written to clients", value=totals["bytesDelivered"]
        )
        dropped = CounterMetricFamily(
            "bptf_relay_frames_dropped", "Frames not delivered, by reason", labels=["reason"]
        )
        for reason, count in sorted(upstream.frames_dropped.items()):
            dropped.add_metric([reason], count)
        dropped.add_metric(["client_closing"], totals["framesDropped"])
        yield dropped

        yield GaugeMetricFamily(
            "bptf_relay_clients_connected", "Websocket clients connected", value=registry.count()
        )
        yield CounterMetricFamily(
            "bptf_relay_clients_accepted", "Websocket clients accepted", value=registry.accepted_total
        )
        closed = CounterMetricFamily("bptf_relay_clients_closed", "Websocket clients closed, by reason", labels=["reason"])
        for reason, count in sorted(registry.closed_by_cause.items()):
            closed.add_metric([reason], count)
        yield closed
        rejected = CounterMetricFamily(
            "bptf_relay_clients_rejected", "Requests rejected before the upgrade, by reason", labels=["reason"]
        )
        for reason, count in sorted(relay.rejections.items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield GaugeMetricFamily(
            "bptf_relay_http_connections",
            "Open connections that are not websocket clients (capped by max_http_connections)",
            value=relay.connections.count(),
        )

        clients = registry.clients()
        yield GaugeMetricFamily(
            "bptf_relay_client_queue_max_bytes",
            "Largest number of bytes queued for one client",
            value=max((client.queued_bytes for client in clients), default=0),
        )
        yield GaugeMetricFamily(
            "bptf_relay_client_queue_max_frames",
            "Largest number of frames queued for one client",
            value=max((client.queued_frames for client in clients), default=0),
        )

        buckets, total = relay.latency.snapshot()
        histogram = HistogramMetricFamily(
            "bptf_relay_delivery_latency_seconds",
            "Time from an upstream frame's arrival to its write on a client socket",
        )
        histogram.add_metric([], buckets, total)
        yield histogram

        process = relay.process_info()
        yield GaugeMetricFamily(
            "bptf_relay_threads", "Threads in the relay process", value=process["threads"]
        )
        if process["rssBytes"] is not None:
            yield GaugeMetricFamily(
                "bptf_relay_resident_memory_bytes", "Resident set size", value=process["rssBytes"]
            )
        if process["openFds"] is not None:
            yield GaugeMetricFamily(
                "bptf_relay_open_fds", "Open file descriptors", value=process["openFds"]
            )


def render(relay: Any) -> bytes:
    """Return the Prometheus text exposition of the relay's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(relay))
    return generate_latest(registry)
