"""Speak the systemd service notification protocol (sd_notify) without libsystemd.

systemd passes the path of an AF_UNIX datagram socket in ``$NOTIFY_SOCKET``. A service
reports its state by sending newline-separated ``KEY=VALUE`` assignments to it, one
datagram per message, for example ``READY=1`` or ``WATCHDOG=1``. A value starting
with ``@`` names a socket in the Linux abstract namespace. Outside systemd the
variable is unset and every method here does nothing.

With ``WatchdogSec=`` set, systemd also passes ``$WATCHDOG_USEC`` (the timeout in
microseconds) and usually ``$WATCHDOG_PID`` (the process expected to ping). The
service must send ``WATCHDOG=1`` more often than the timeout, or systemd kills and,
with ``Restart=on-failure``, restarts it. :class:`WatchdogLoop` sends those pings
only while a health check passes, so a hung relay gets restarted.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable, Mapping

logger = logging.getLogger(__name__)

# Bounds how long a send may block when systemd's receive queue is full, so a stuck
# manager cannot stall the watchdog thread or shutdown.
SEND_TIMEOUT_SECONDS = 1.0

# Minimum time between two "withholding watchdog ping" warnings.
DEFAULT_WITHHELD_LOG_INTERVAL_SECONDS = 60.0


def _parse_socket_address(value: str) -> bytes | None:
    """Convert a ``$NOTIFY_SOCKET`` value to an AF_UNIX address, or None if invalid.

    A leading ``@`` becomes the NUL byte that selects the abstract namespace. Only
    absolute paths and ``@`` names are accepted, as in libsystemd's sd_notify.
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    return None


def _parse_watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """Return ``$WATCHDOG_USEC`` in microseconds if it applies to this process.

    Returns None when the variable is unset, not a positive integer, or when
    ``$WATCHDOG_PID`` names another process (systemd then expects that process to
    send the pings).
    """
    raw_usec = environ.get("WATCHDOG_USEC")
    if raw_usec is None:
        return None

    try:
        usec = int(raw_usec)
    except ValueError:
        usec = 0
    if usec <= 0:
        logger.warning(
            "Ignoring invalid WATCHDOG_USEC=%r: expected a positive integer", raw_usec
        )
        return None

    raw_pid = environ.get("WATCHDOG_PID")
    if raw_pid is not None:
        try:
            pid = int(raw_pid)
        except ValueError:
            logger.warning(
                "Ignoring watchdog: invalid WATCHDOG_PID=%r is not a process id",
                raw_pid,
            )
            return None
        if pid != os.getpid():
            logger.debug(
                "Ignoring watchdog: WATCHDOG_PID=%d is not this process (%d)",
                pid,
                os.getpid(),
            )
            return None

    return usec


class SystemdNotifier:
    """Client for systemd's notification socket, read from an environment mapping.

    All methods are thread-safe. They return True when the datagram was sent and
    False otherwise, and they never raise on a send failure: the first failure is
    logged at WARNING, later ones at DEBUG, and all are counted in
    :attr:`send_failures`.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        ``environ`` defaults to ``os.environ``. The variables are read once here.
        """
        if environ is None:
            environ = os.environ

        self._address: bytes | None = None
        raw_socket = environ.get("NOTIFY_SOCKET")
        if raw_socket:
            self._address = _parse_socket_address(raw_socket)
            if self._address is None:
                logger.warning(
                    "Ignoring NOTIFY_SOCKET=%r: expected an absolute path or an "
                    "abstract socket name starting with '@'",
                    raw_socket,
                )

        self._watchdog_usec: int | None = None
        if self._address is not None:
            self._watchdog_usec = _parse_watchdog_usec(environ)

        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._last_status: str | None = None
        self._send_failures = 0

    @property
    def enabled(self) -> bool:
        """Whether a valid ``$NOTIFY_SOCKET`` was found."""
        return self._address is not None

    @property
    def watchdog_enabled(self) -> bool:
        """Whether systemd expects watchdog pings from this process."""
        return self._watchdog_usec is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Recommended ping interval in seconds (half of ``WATCHDOG_USEC``), or None.

        None means no watchdog applies: no notify socket, no ``WATCHDOG_USEC``, or
        ``WATCHDOG_PID`` names another process.
        """
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    @property
    def send_failures(self) -> int:
        """Number of messages that could not be sent since construction."""
        return self._send_failures

    def send(self, message: str) -> bool:
        """Send one raw notification datagram, e.g. ``"READY=1\\nSTATUS=up"``.

        Returns False without sending when notifications are disabled or the send
        failed.
        """
        if self._address is None:
            return False
        with self._lock:
            return self._send_locked(message)

    def ready(self) -> bool:
        """Send ``READY=1``: startup finished and the service accepts clients."""
        return self.send("READY=1")

    def status(self, text: str) -> bool:
        """Send ``STATUS=text`` unless it equals the last status sent successfully.

        Line breaks in ``text`` become spaces, because each line of a notification
        is a separate assignment. Returns False when nothing was sent.
        """
        if self._address is None:
            return False

        single_line = " ".join(text.splitlines())
        with self._lock:
            if single_line == self._last_status:
                return False
            sent = self._send_locked("STATUS=" + single_line)
            if sent:
                self._last_status = single_line
            return sent

    def watchdog(self) -> bool:
        """Send ``WATCHDOG=1`` if a watchdog applies to this process.

        Returns False without sending when :attr:`watchdog_enabled` is False.
        """
        if self._watchdog_usec is None:
            return False
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        """Send ``STOPPING=1``: shutdown has begun."""
        return self.send("STOPPING=1")

    def close(self) -> None:
        """Close the client socket. A later send opens a new one."""
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def _send_locked(self, message: str) -> bool:
        """Send ``message`` to the notify socket. The caller holds ``self._lock``."""
        assert self._address is not None
        try:
            if self._socket is None:
                client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                client.settimeout(SEND_TIMEOUT_SECONDS)
                self._socket = client
            self._socket.sendto(message.encode("utf-8", "replace"), self._address)
        except OSError as error:
            self._send_failures += 1
            first_line = message.partition("\n")[0]
            if self._send_failures == 1:
                logger.warning(
                    "Failed to send %s to systemd notify socket %r: %s "
                    "(further failures are logged at DEBUG)",
                    first_line,
                    self._address,
                    error,
                )
            else:
                logger.debug(
                    "Failed to send %s to systemd notify socket (failure %d): %s",
                    first_line,
                    self._send_failures,
                    error,
                )
            return False
        return True


class WatchdogLoop:
    """Thread that pings the systemd watchdog while a health check passes.

    Each tick calls ``healthy()``. When it returns True the loop sends
    ``WATCHDOG=1``, otherwise it withholds the ping so that systemd restarts a hung
    relay after ``WatchdogSec``. An exception from ``healthy()`` counts as unhealthy.
    If ``status_text`` is given, each tick also sends its result as ``STATUS=``
    (which the notifier sends only when the text changed).
    """

    def __init__(
        self,
        notifier: SystemdNotifier,
        interval: float,
        stop: threading.Event,
        healthy: Callable[[], bool],
        status_text: Callable[[], str] | None = None,
        withheld_log_interval: float = DEFAULT_WITHHELD_LOG_INTERVAL_SECONDS,
    ) -> None:
        """Store the settings. ``interval`` and ``withheld_log_interval`` are seconds.

        Raises ValueError if ``interval`` is not positive.
        """
        if interval <= 0:
            raise ValueError(
                f"invalid watchdog interval {interval!r}: expected seconds > 0"
            )
        self.notifier = notifier
        self.interval = interval
        self.stop = stop
        self.healthy = healthy
        self.status_text = status_text
        self.withheld_log_interval = withheld_log_interval

        self.pings_sent = 0
        self.pings_withheld = 0
        self._withheld_streak = 0
        self._last_withheld_log: float | None = None
        self._withholding = False
        self._thread: threading.Thread | None = None

    def start(self) -> threading.Thread:
        """Start the loop in a daemon thread named ``watchdog`` and return it."""
        if self._thread is not None:
            raise RuntimeError("watchdog loop already started")
        self._thread = threading.Thread(target=self.run, name="watchdog", daemon=True)
        self._thread.start()
        return self._thread

    def join(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds for the thread to exit after ``stop``."""
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """Tick at once, then every ``interval`` seconds until ``stop`` is set."""
        logger.debug("Watchdog loop started, interval %.3f s", self.interval)
        while not self.stop.is_set():
            self.tick()
            if self.stop.wait(self.interval):
                break
        logger.debug(
            "Watchdog loop stopped: %d pings sent, %d withheld",
            self.pings_sent,
            self.pings_withheld,
        )

    def tick(self) -> None:
        """Run one health check, then send or withhold the ping and update STATUS."""
        if self._check_health():
            if self._withholding:
                logger.info(
                    "Health check passed again, resuming watchdog pings after %d "
                    "withheld",
                    self._withheld_streak,
                )
                self._withholding = False
                self._withheld_streak = 0
                self._last_withheld_log = None
            if self.notifier.watchdog():
                self.pings_sent += 1
        else:
            self._withhold()

        if self.status_text is not None:
            try:
                text = self.status_text()
            except Exception:
                logger.exception("status_text() raised, STATUS not updated")
            else:
                self.notifier.status(text)

    def _check_health(self) -> bool:
        """Return the result of ``healthy()``, or False if it raised."""
        try:
            return bool(self.healthy())
        except Exception:
            logger.exception("Health check raised, treating the relay as unhealthy")
            return False

    def _withhold(self) -> None:
        """Count a withheld ping and log it at most once per withheld_log_interval."""
        self._withholding = True
        self.pings_withheld += 1
        self._withheld_streak += 1

        now = time.monotonic()
        if (
            self._last_withheld_log is not None
            and now - self._last_withheld_log < self.withheld_log_interval
        ):
            return
        self._last_withheld_log = now
        logger.warning(
            "Health check failed, withholding watchdog ping "
            "(%d withheld since the last healthy check); systemd restarts the "
            "service if this lasts longer than WatchdogSec",
            self._withheld_streak,
        )


def start_watchdog_loop(
    notifier: SystemdNotifier,
    stop: threading.Event,
    healthy: Callable[[], bool],
    status_text: Callable[[], str] | None = None,
) -> WatchdogLoop | None:
    """Start a :class:`WatchdogLoop` at the notifier's recommended interval.

    Returns the running loop, or None without starting a thread when no watchdog
    applies to this process (see :attr:`SystemdNotifier.watchdog_interval`).
    """
    interval = notifier.watchdog_interval
    if interval is None:
        return None
    loop = WatchdogLoop(notifier, interval, stop, healthy, status_text)
    loop.start()
    return loop
