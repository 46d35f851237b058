"""Process lifecycle: start the threads, serve, and shut down on a signal.

Threads:

- ``upstream``: the Backpack.tf connection.
- ``http``: Werkzeug's accept loop, which starts one thread per request. A
  websocket request's thread becomes that client's writer, named
  ``client-N``, and simple-websocket adds a reader, ``client-N-reader``.
- ``keepalive``: pings clients and watches for an upstream stuck in a frame.
- ``header-reaper``: cuts requests whose head is not complete in time.
- ``watchdog``: under systemd only, pings the watchdog while healthy.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import threading
import time
from collections import Counter
import dataclasses
from typing import Any, Callable

from werkzeug.serving import make_server

from . import __version__
from .config import FIELDS, ConfigError, redact_url
from .http import ConnectionLimit, RelayApp, make_handler
from .logs import configure_logging, set_secrets
from .metrics import LatencyHistogram
from .notify import SystemdNotifier, start_watchdog_loop
from .registry import Keepalive, Registry
from .security import AccessPolicy
from .upstream import Upstream

logger = logging.getLogger(__name__)

# Stack size for threads started after startup, which are mostly one writer
# and one reader per client. The default 8 MiB of address space per thread
# adds up at 1,000 clients, and 512 KiB leaves room for this code's call depth.
THREAD_STACK_BYTES = 512 * 1024


class StartupError(Exception):
    """The relay cannot start (for example, the port is taken)."""


# Descriptors beyond the two caps: log files, the upstream, pipes and sockets
# of the libraries.
SPARE_FILES = 64


def raise_open_file_limit(needed: int) -> int:
    """Raise the soft open-file limit up to the hard limit; warn if ``needed`` is still over it.

    Every client and every HTTP connection uses a descriptor, and the usual
    soft limit of 1024 is lower than the default caps need.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            logger.warning("failed to raise the open-file limit from %d to %d: %s", soft, target, error)
    if soft != resource.RLIM_INFINITY and soft < needed:
        logger.warning(
            "the open-file limit is %d, under the %d that max_clients + max_http_connections + %d need; "
            "past it new connections fail. Raise LimitNOFILE (ulimit -n) or lower those caps",
            soft,
            needed,
            SPARE_FILES,
        )
    return soft


class Relay:
    """The running relay: owns the registry, the upstream and the HTTP server."""

    def __init__(
        self,
        settings: Any,
        environ: dict[str, str] | None = None,
        stop_event: threading.Event | None = None,
        load_settings: Callable[[], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.access = AccessPolicy(settings)
        self.latency = LatencyHistogram()
        # Re-reads the same file, environment and flags; used on SIGHUP.
        self._load_settings = load_settings
        self.reload_requested = threading.Event()
        # Signal numbers recorded by the command line's handlers, for the log.
        self.received_signals: list[int] = []
        self.registry = Registry(self.latency)
        self.upstream = Upstream(settings, self.registry)
        self.app = RelayApp(self)
        self.notifier = SystemdNotifier(os.environ if environ is None else environ)
        self.stopping = False
        self.rejections: Counter[str] = Counter()
        self.connections = ConnectionLimit(settings.server_max_http_connections, self.count_rejection)
        self._started = time.monotonic()
        # Set by a signal handler (possibly before start) or request_stop.
        self._stop_event = stop_event if stop_event is not None else threading.Event()
        self._server: Any = None
        self._server_thread: threading.Thread | None = None
        self._keepalive: Keepalive | None = None
        self.port = settings.server_port

    # -- start -------------------------------------------------------------------

    def start(self) -> None:
        """Listen, then start the upstream, keepalive and HTTP threads.

        Raises StartupError when the address cannot be bound.
        """
        threading.stack_size(THREAD_STACK_BYTES)
        raise_open_file_limit(
            self.settings.clients_max_clients + self.settings.server_max_http_connections + SPARE_FILES
        )
        # websocket-client logs every connection loss at ERROR on its own;
        # relay.upstream reports each one with the attempt number instead.
        logging.getLogger("websocket").setLevel(logging.CRITICAL)
        listener = self._listen()
        try:
            self._server = make_server(
                self.settings.server_host,
                self.port,
                self.app,
                threaded=True,
                request_handler=make_handler(
                    self.settings.server_header_timeout, self.settings.server_max_header_bytes
                ),
                fd=listener.fileno(),
            )
        finally:
            listener.close()
        self._server.count_rejection = self.count_rejection
        self.connections.install(self._server)
        self.port = self._server.port
        self._server_thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True
        )
        self._server_thread.start()
        logger.info(
            "bptf-relay %s listening on http://%s:%d (websocket ws://%s:%d/relay)",
            __version__,
            self.settings.server_host,
            self.port,
            self.settings.server_host,
            self.port,
        )
        self.upstream.observers.append(self._publish_status)
        if self._stop_event.is_set():
            # A signal arrived during start-up: the thread must exit before
            # its first connection attempt.
            self.upstream.stop()
        self.upstream.start()
        self._keepalive = Keepalive(
            self.registry,
            lambda: self.settings.clients_ping_interval,
            self._stop_event,
            on_tick=self._tick,
        )
        self._keepalive.start()
        self.notifier.ready()
        self._publish_status()
        start_watchdog_loop(self.notifier, self._stop_event, self.alive, self.status_line)

    def _listen(self) -> socket.socket:
        host, port = self.settings.server_host, self.settings.server_port
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as error:
            raise StartupError(
                f"cannot resolve [server] host = {host!r}: {error}; set an IP address such as 127.0.0.1"
            ) from None
        family, kind, proto, _, address = infos[0]
        listener = socket.socket(family, kind, proto)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(self.settings.server_backlog)
        except OSError as error:
            listener.close()
            hint = "stop the other program or set another [server] port (or PORT)"
            if error.errno == 13:
                hint = "ports below 1024 need privileges; choose a port above 1024"
            elif error.errno == 99:
                hint = "the address is not on this machine; use 127.0.0.1 or 0.0.0.0"
            raise StartupError(f"cannot listen on {host}:{port}: {error.strerror}; {hint}") from None
        return listener

    # -- running -------------------------------------------------------------------

    def uptime(self) -> float:
        return time.monotonic() - self._started

    def alive(self) -> bool:
        """Return True while the upstream and HTTP threads are running."""
        return (
            self.upstream.is_alive()
            and self._server_thread is not None
            and self._server_thread.is_alive()
        )

    def count_rejection(self, reason: str) -> None:
        self.rejections[reason] += 1

    def status_line(self) -> str:
        """Return a one-line summary for systemd's STATUS=."""
        upstream = self.upstream
        return (
            f"upstream {upstream.state.value}, {self.registry.count()} clients, "
            f"{upstream.frames_relayed} frames relayed"
        )

    def _publish_status(self) -> None:
        self.notifier.status(self.status_line())

    def _tick(self) -> None:
        """Run once a second or faster on the keepalive thread."""
        self.upstream.check_stuck_in_frame()
        self.upstream.check_handshake_deadline()
        if self.notifier.enabled:
            self._publish_status()

    def status(self) -> dict[str, Any]:
        """Return the body of ``/status``."""
        registry = self.registry
        upstream = self.upstream
        totals = registry.totals()
        closed = registry.closed_by_cause
        return {
            "service": "bptf-relay",
            "version": __version__,
            "upstream": upstream.status(),
            "clients": {
                "connected": registry.count(),
                "totalAccepted": registry.accepted_total,
                "closedSlow": closed.get("slow_consumer", 0),
                "droppedNoPong": closed.get("ping_timeout", 0),
                "closedByCause": dict(closed),
                "rejected": dict(self.rejections),
                "httpConnections": self.connections.count(),
                "maxHttpConnections": self.connections.maximum,
            },
            "traffic": {
                "framesIn": upstream.frames_in,
                "bytesIn": upstream.bytes_in,
                "framesRelayed": upstream.frames_relayed,
                "framesDelivered": totals["framesDelivered"],
                "bytesDelivered": totals["bytesDelivered"],
                "framesDropped": totals["framesDropped"] + sum(upstream.frames_dropped.values()),
                "upstreamFramesDropped": dict(upstream.frames_dropped),
                "clientFramesDropped": totals["framesDropped"],
                "binaryFrames": upstream.frames_binary,
                "notJsonArrayFrames": upstream.frames_not_json_array,
            },
            "process": self.process_info(),
        }

    def process_info(self) -> dict[str, Any]:
        return process_info(self.uptime())

    # -- stop ----------------------------------------------------------------------

    def request_stop(self, signum: int | None = None) -> None:
        """Ask ``run`` to stop; safe to call from a signal handler."""
        if signum is not None and not self._stop_event.is_set():
            logger.info("received %s; shutting down", signal.Signals(signum).name)
        self._stop_event.set()

    def run(self) -> None:
        """Serve until the stop event is set, reloading on request; then shut down."""
        while not self._stop_event.wait(0.2):
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
        names = [signal.Signals(number).name for number in self.received_signals]
        logger.info("stop requested (%s); shutting down", ", ".join(names) or "request_stop")
        self.shutdown()

    def reload(self) -> None:
        """Re-read the configuration and apply what can change while running.

        Log settings, client limits and the access rules change at once and
        apply to connected clients too; a changed address, port or upstream
        URL is logged as needing a restart. An invalid file keeps the old
        settings.
        """
        if self._load_settings is None:
            return
        try:
            new = self._load_settings()
        except ConfigError as error:
            logger.error("reload failed, keeping the current settings: %s", error)
            return
        old = self.settings
        changed = [
            field for field in FIELDS if getattr(old, field.attr) != getattr(new, field.attr)
        ]
        if not changed:
            logger.info("reload: configuration unchanged")
            return
        restart_needed = [f for f in changed if f.section in ("server", "upstream")]
        applied = [f for f in changed if f not in restart_needed]
        if applied:
            set_secrets([new.security_token])
            configure_logging(new.logging_level, new.logging_format)
            self.settings = replace_sections(old, new, {"clients", "security", "logging"})
            self.access = AccessPolicy(self.settings)
            for client in self.registry.clients():
                client.apply_limits(self.settings)
            if any(field.section == "security" for field in applied):
                self._revoke_access()
        for field in applied:
            logger.info(
                "reload: [%s] %s changed from %s to %s",
                field.section,
                field.key,
                _shown(field, getattr(old, field.attr)),
                _shown(field, getattr(new, field.attr)),
            )
        for field in restart_needed:
            logger.warning(
                "reload: [%s] %s changed to %s, which takes effect only after a restart",
                field.section,
                field.key,
                _shown(field, getattr(new, field.attr)),
            )

    def _revoke_access(self) -> None:
        """Close clients whose upgrade request the new access rules would reject."""
        for client in self.registry.clients():
            if client.credentials is None:
                continue
            failed = self.access.revoked(client.credentials)
            if failed:
                client.revoke_access(failed)

    def shutdown(self) -> None:
        """Stop accepting, close clients with 1001 and the upstream with 1000."""
        deadline = time.monotonic() + self.settings.server_shutdown_timeout
        self.stopping = True
        self._stop_event.set()
        self.notifier.stopping()
        self.upstream.stop()
        if self._server is not None:
            stopper = threading.Thread(target=self._server.shutdown, name="http-stop", daemon=True)
            stopper.start()
            stopper.join(max(0.0, deadline - time.monotonic()))
        # Keep a margin to cut an upstream thread that is stuck, so the
        # process still exits within shutdown_timeout.
        margin = min(1.0, self.settings.server_shutdown_timeout / 4)
        self.registry.close_all()
        while self.registry.count() and time.monotonic() < deadline - margin:
            time.sleep(0.02)
        self.upstream.join(max(0.0, deadline - margin - time.monotonic()))
        if self.upstream.is_alive():
            self.upstream.abort()
            self.upstream.join(max(0.0, deadline - time.monotonic()))
        if self._server is not None:
            self._server.server_close()
        remaining = self.registry.count()
        if remaining or self.upstream.is_alive():
            logger.warning(
                "exiting with %d clients still closing%s, %.1f s after the stop request (shutdown_timeout %g s)",
                remaining,
                " and the upstream still closing" if self.upstream.is_alive() else "",
                self.settings.server_shutdown_timeout - (deadline - time.monotonic()),
                self.settings.server_shutdown_timeout,
            )
        logger.info(
            "stopped after %.1f s: %d frames relayed, %d clients served",
            self.uptime(),
            self.upstream.frames_relayed,
            self.registry.accepted_total,
        )
        self.notifier.close()


def _shown(field: Any, value: Any) -> str:
    if field.secret:
        return "(hidden)"
    if field.kind == "url":
        return repr(redact_url(value))
    return repr(value)


def replace_sections(old: Any, new: Any, sections: set[str]) -> Any:
    """Return ``old`` with every field of ``sections`` taken from ``new``."""
    values = {f.attr: getattr(new, f.attr) for f in FIELDS if f.section in sections}
    return dataclasses.replace(old, **values)


def process_info(uptime: float) -> dict[str, Any]:
    """Return pid, uptime, thread count, RSS and open descriptors of this process."""
    info: dict[str, Any] = {
        "pid": os.getpid(),
        "uptime": round(uptime, 3),
        "threads": threading.active_count(),
        "rssBytes": None,
        "openFds": None,
    }
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    info["rssBytes"] = int(line.split()[1]) * 1024
                elif line.startswith("Threads:"):
                    info["threads"] = int(line.split()[1])
        info["openFds"] = len(os.listdir("/proc/self/fd"))
    except OSError:
        pass
    return info
