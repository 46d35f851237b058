"""The single upstream connection to the Backpack.tf events feed.

One thread named ``upstream`` owns the connection. It runs one websocket-client
``WebSocketApp.run_forever`` per connection attempt and its own reconnect loop
with exponential backoff and full jitter, so one connection ends (and its socket
is closed) before the next one opens: the relay never holds two.

``run_forever`` is given a dispatcher of this module's own that also watches a
wake-up socket (for a prompt stop) and the time since the last frame (for a
silent stall), which websocket-client's default dispatcher cannot do.
"""

from __future__ import annotations

import enum
import json
import logging
import random
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from typing import Any, Callable

import websocket
from websocket._abnf import continuous_frame, frame_buffer  # websocket-client 1.9: not re-exported
from websocket._dispatcher import DispatcherBase  # websocket-client 1.9: not re-exported

from . import __version__
from .config import redact_url
from .frames import OPCODE_BINARY, OPCODE_TEXT, encode_frame
from .registry import Registry

logger = logging.getLogger(__name__)

CLIENT_LIMIT_EVENT = b"client-limit-exceeded"
CLIENT_LIMIT_SCAN_BYTES = 64 * 1024

# Maximum time, in seconds, the dispatcher sleeps before it re-checks the stall
# and ping timers.
DISPATCH_TICK = 1.0


def dispatch_tick(ping_interval: float, ping_timeout: float) -> float:
    """Return how long the dispatcher may sleep between checks, in seconds.

    websocket-client's check() detects a missing pong only between ping_timeout
    and ping_interval after each ping, because the next ping resets its timer.
    The dispatcher therefore checks at least twice inside that window, or a
    dead upstream could go unnoticed for ever.
    """
    if not ping_interval:
        return DISPATCH_TICK
    return min(DISPATCH_TICK, (ping_interval - ping_timeout) / 2)


# Maximum time abort() waits for websocket-client's send lock.
ABORT_LOCK_SECONDS = 0.2


class UpstreamState(str, enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKING_OFF = "backing_off"
    STOPPED = "stopped"


class Backoff:
    """Exponential backoff with full jitter.

    The n-th consecutive failure waits a uniformly random time in
    ``[0, min(maximum, initial * multiplier ** n)]`` seconds.
    """

    def __init__(
        self,
        initial: float,
        multiplier: float,
        maximum: float,
        rng: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.initial = initial
        self.multiplier = multiplier
        self.maximum = maximum
        self.failures = 0
        self._rng = rng

    def cap(self) -> float:
        """Return the upper bound of the next delay in seconds."""
        exponent = min(self.failures, 64)
        return min(self.maximum, self.initial * self.multiplier**exponent)

    def next_delay(self) -> float:
        """Return the next delay in seconds and count one more failure."""
        delay = self._rng(0.0, self.cap())
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


class _Reassembler(continuous_frame):
    """websocket-client's fragment reassembly, bounded in size and labelled with the first opcode.

    websocket-client 1.9 labels a fragmented message with its last frame's
    opcode (0, continuation) and joins fragments by repeated ``bytes``
    concatenation. This class keeps the first opcode and appends to one
    ``bytearray``, so memory stays near the payload size however small the
    fragments. Past ``max_bytes`` it keeps nothing more, and ``on_dropped``
    makes the relay drop the message, which arrives empty.
    """

    def __init__(self, max_bytes: int, on_dropped: Callable[[int], None]) -> None:
        super().__init__(False, True)
        self.max_bytes = max_bytes
        self.on_dropped = on_dropped
        self.size = 0
        self.discarding = False

    def add(self, frame: websocket.ABNF) -> None:
        if self.cont_data is None:
            if frame.opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                self.recving_frames = frame.opcode
            # An unfragmented frame keeps its bytes object and is never copied.
            self.cont_data = [frame.opcode, frame.data]
            self.size = len(frame.data)
            self.discarding = False
        else:
            self.size += len(frame.data)
            if not self.discarding:
                if isinstance(self.cont_data[1], bytes):
                    self.cont_data[1] = bytearray(self.cont_data[1])
                self.cont_data[1] += frame.data
        if self.size > self.max_bytes and not self.discarding:
            self.discarding = True
            self.cont_data[1] = b""
        if frame.fin:
            self.recving_frames = None

    def extract(self, frame: websocket.ABNF) -> tuple:
        if self.cont_data is None:
            raise websocket.WebSocketProtocolException("no continuation data available")
        opcode, data = self.cont_data
        self.cont_data = None
        frame.data = bytes(data) if isinstance(data, bytearray) else data
        frame.opcode = opcode
        if self.discarding:
            self.on_dropped(self.size)
        return opcode, frame


class FrameTooLarge(websocket.WebSocketPayloadException):
    """An upstream frame announced more bytes than max_frame_bytes."""


class _BoundedFrameBuffer(frame_buffer):
    """websocket-client's frame reader, discarding oversize frames unbuffered.

    When a frame's length header exceeds ``max_bytes``, its payload is read
    in 64 KiB pieces and thrown away, and the frame continues as an empty
    one; ``on_dropped`` tells the relay to drop the message it belongs to. An
    oversize frame so never enters memory, and the connection stays up.
    """

    def __init__(self, recv: Callable[[int], bytes], max_bytes: int, on_dropped: Callable[[int], None]) -> None:
        super().__init__(recv, True)
        self.max_bytes = max_bytes
        self.on_dropped = on_dropped

    def recv_length(self) -> None:
        super().recv_length()
        length = self.length
        if length is None or length <= self.max_bytes:
            return
        if self.has_mask():
            # Servers never mask frames (RFC 6455, section 5.1).
            raise FrameTooLarge(f"masked frame of {length} bytes from the server")
        opcode = self.header[4] if self.header is not None else 0
        if opcode >= 0x8:
            # Control frames carry at most 125 bytes (RFC 6455, section 5.5),
            # so this is a protocol error, not a message to skip.
            raise FrameTooLarge(f"control frame (opcode {opcode}) of {length} bytes from the server")
        remaining = length
        while remaining > 0:
            remaining -= len(self.recv(min(65536, remaining)))
        self.length = 0
        self.on_dropped(length)


class _WakeableDispatcher(DispatcherBase):
    """Read loop for ``run_forever`` that can be woken from another thread.

    The base class supplies ``send``, which websocket-client routes every
    outgoing frame (pings, the close frame) through.
    """

    def __init__(self, app: websocket.WebSocketApp, upstream: Upstream) -> None:
        super().__init__(app, None)
        self.upstream = upstream

    def read(self, sock: Any, read_callback: Callable[[], bool], check_callback: Callable[[], Any]) -> None:
        if self.app.sock is None or self.app.sock.sock is None:
            return
        raw = self.app.sock.sock
        # No data frame has been read yet, so nothing is lost by the swaps.
        settings = self.upstream.settings
        self.app.sock.cont_frame = _Reassembler(settings.upstream_max_frame_bytes, self.upstream.oversize_frame_skipped)
        self.app.sock.frame_buffer = _BoundedFrameBuffer(
            self.app.sock._recv, settings.upstream_max_frame_bytes, self.upstream.oversize_frame_skipped
        )
        tick = dispatch_tick(settings.upstream_ping_interval, settings.upstream_ping_timeout)
        selector = selectors.DefaultSelector()
        selector.register(raw, selectors.EVENT_READ, "upstream")
        selector.register(self.upstream.wake_reader, selectors.EVENT_READ, "wake")
        try:
            while self.app.keep_running:
                pending = getattr(raw, "pending", None)
                if pending is not None and pending():
                    ready = ["upstream"]
                else:
                    ready = [key.data for key, _ in selector.select(tick)]
                if "wake" in ready:
                    self.upstream.drain_wake()
                    if self.upstream.stopping:
                        return
                if "upstream" in ready and not read_callback():
                    return
                check_callback()
                if self.upstream.stalled():
                    return
        finally:
            selector.close()

    def reconnect(self, seconds: int, reconnector: Callable[..., None]) -> None:
        """Never called: the relay passes ``reconnect=0`` and loops itself."""


class _App(websocket.WebSocketApp):
    def __init__(self, upstream: Upstream, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._upstream = upstream

    def create_dispatcher(self, ping_timeout, dispatcher=None, is_ssl=False, handleDisconnect=None):  # type: ignore[override]
        return _WakeableDispatcher(self, self._upstream)


class Upstream(threading.Thread):
    """The ``upstream`` thread: connect, forward frames, reconnect with backoff."""

    def __init__(self, settings: Any, registry: Registry) -> None:
        super().__init__(name="upstream", daemon=True)
        self.settings = settings
        self.registry = registry
        self.url = settings.upstream_url
        # For logs, /status and clients: user:password@ in the URL is masked.
        self.display_url = redact_url(self.url)
        self.backoff = Backoff(
            settings.upstream_backoff_initial,
            settings.upstream_backoff_multiplier,
            settings.upstream_backoff_max,
        )
        self.stopping = False
        self._stop_event = threading.Event()
        self.wake_reader, self._wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self._app: _App | None = None
        # The open connection's socket, closed by _connect_once once it ends.
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()

        self.state = UpstreamState.STOPPED
        self.attempt = 0
        self.connected_since: float | None = None
        self._connected_monotonic: float | None = None
        self._last_frame_monotonic: float | None = None
        self.last_frame_at: float | None = None
        self.next_retry_at: float | None = None
        self.last_close_code: int | None = None
        self.last_close_reason = ""
        self.last_error = ""
        self.client_limit_exceeded = 0
        self.client_limit_message = ""
        self._client_limit_hit = False
        self._stall_detected = False
        self._attempt_started: float | None = None
        self._handshake_cut = False
        # Length of an oversize frame read past unbuffered; its message is dropped.
        self._drop_next_message = 0
        self._disconnect_cause = ""
        self._error_reported = False

        self.connects = 0
        self.disconnects = 0
        self.reconnects = 0
        self.disconnects_by_cause: Counter[str] = Counter()
        self.frames_in = 0
        self.bytes_in = 0
        self.frames_relayed = 0
        self.frames_dropped: Counter[str] = Counter()
        self.frames_binary = 0
        self.frames_not_json_array = 0
        self.observers: list[Callable[[], None]] = []

    # -- control from other threads -------------------------------------------

    def stop(self) -> None:
        """Ask the thread to close the connection with 1000 and end; returns at once."""
        self.stopping = True
        self._stop_event.set()
        try:
            self._wake_writer.send(b"x")
        except OSError:
            pass
        with self._lock:
            app = self._app
        if self.state is UpstreamState.CONNECTING and app is not None:
            # The handshake blocks without looking at the wake-up socket, so
            # cut it short rather than wait up to connect_timeout.
            raw = _raw_socket(app)
            if raw is not None:
                try:
                    raw.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def abort(self) -> None:
        """Send a close frame (1000) and shut the socket down; called after ``stop``.

        Called from another thread when the upstream thread has not ended in
        time, such as when it is blocked inside a frame the upstream stopped
        sending. The close frame is sent under websocket-client's send lock,
        so it does not interleave with a pong.
        """
        with self._lock:
            app = self._app
        sock = app.sock if app is not None else None
        # Read once: the upstream thread sets sock.sock to None when it ends.
        raw = sock.sock if sock is not None else None
        if raw is None:
            return
        logger.warning("upstream thread still busy at shutdown; sending the close frame and cutting the connection")
        close_frame = websocket.ABNF.create_frame(
            struct.pack("!H", websocket.STATUS_NORMAL) + b"relay shutting down", websocket.ABNF.OPCODE_CLOSE
        ).format()
        # The upstream thread may hold the send lock while blocked on a full
        # socket, so wait at most ABORT_LOCK_SECONDS and send with MSG_DONTWAIT.
        if sock.lock.acquire(timeout=ABORT_LOCK_SECONDS):
            try:
                raw.send(close_frame, socket.MSG_DONTWAIT)
            except OSError as error:
                logger.debug("close frame to the upstream failed: %s", error)
            finally:
                sock.lock.release()
        try:
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def drain_wake(self) -> None:
        try:
            while self.wake_reader.recv(64):
                pass
        except (BlockingIOError, OSError):
            pass

    def stalled(self) -> bool:
        """Return True (once, logging it) when no frame has arrived for stall_timeout."""
        timeout = self.settings.upstream_stall_timeout
        if not timeout or self.state is not UpstreamState.CONNECTED:
            return False
        since = self._last_frame_monotonic or self._connected_monotonic or time.monotonic()
        silent = time.monotonic() - since
        if silent < timeout:
            return False
        self._stall_detected = True
        logger.warning(
            "upstream stalled: no frame for %.1f s (stall_timeout %g s); "
            "closing the connection and reconnecting",
            silent,
            timeout,
        )
        return True

    def check_stuck_in_frame(self) -> None:
        """Cut a connection whose upstream thread is stuck inside one frame.

        Called from another thread. The dispatcher checks for stalls only
        between frames; an upstream that sends a frame header and then a byte
        now and then keeps websocket-client reading that frame for ever. Past
        stall_timeout plus a margin for the dispatcher's own check, this shuts
        the socket down, so the read fails and the relay reconnects.
        """
        timeout = self.settings.upstream_stall_timeout
        since = self._last_frame_monotonic
        raw = self._socket
        if not timeout or since is None or raw is None or self.state is not UpstreamState.CONNECTED:
            return
        silent = time.monotonic() - since
        if silent < timeout + 2 * DISPATCH_TICK + 1.0 or self._stall_detected:
            return
        self._stall_detected = True
        logger.warning(
            "upstream stalled inside a frame: no complete frame for %.1f s "
            "(stall_timeout %g s); closing the connection and reconnecting",
            silent,
            timeout,
        )
        try:
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def check_handshake_deadline(self) -> None:
        """Cut an attempt still connecting after connect_timeout plus a margin.

        Called from another thread. websocket-client applies connect_timeout
        to each read, so an upstream that sends its handshake response a byte
        at a time would keep an attempt going far longer than the setting.
        """
        started = self._attempt_started
        timeout = self.settings.upstream_connect_timeout
        if self.state is not UpstreamState.CONNECTING or started is None:
            return
        if time.monotonic() - started < timeout + 1.0 or self._handshake_cut:
            return
        with self._lock:
            app = self._app
        raw = _raw_socket(app)
        if raw is None:
            return
        # _on_error reports the attempt as failed with this reason.
        self._handshake_cut = True
        try:
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- the thread ------------------------------------------------------------

    def run(self) -> None:
        websocket.setdefaulttimeout(self.settings.upstream_connect_timeout)
        while not self.stopping:
            self._connect_once()
            if self.stopping:
                break
            delay = self._next_delay()
            self.next_retry_at = time.time() + delay
            self._set_state(UpstreamState.BACKING_OFF)
            self._report_loss(delay)
            self._stop_event.wait(delay)
            self.next_retry_at = None
        self._set_state(UpstreamState.STOPPED)
        logger.info("upstream thread stopped")

    def _connect_once(self) -> None:
        self.attempt += 1
        if self.attempt > 1:
            self.reconnects += 1
        self._stall_detected = False
        self._drop_next_message = 0
        self._disconnect_cause = ""
        self._error_reported = False
        self._connected_monotonic = None
        self._last_frame_monotonic = None
        self._handshake_cut = False
        self._attempt_started = time.monotonic()
        self._set_state(UpstreamState.CONNECTING)
        logger.debug("connecting to %s (attempt %d)", self.display_url, self.attempt)
        app = _App(
            self,
            url=self.url,
            header={"User-Agent": f"bptf-relay/{__version__}"},
            on_open=self._on_open,
            on_data=self._on_data,
            on_error=self._on_error,
            on_close=self._on_close,
        )
        with self._lock:
            self._app = app
        ping_interval = self.settings.upstream_ping_interval or 0
        try:
            app.run_forever(
                skip_utf8_validation=True,
                ping_interval=ping_interval,
                ping_timeout=self.settings.upstream_ping_timeout if ping_interval else None,
                reconnect=0,
            )
        except Exception as error:  # noqa: BLE001 - the thread must survive anything
            logger.exception("upstream attempt %d ended with an unexpected error", self.attempt)
            self.last_error = f"unexpected error: {error}"
        finally:
            with self._lock:
                self._app = None
            self._close_socket()
        if self._connected_monotonic is not None:
            self._count_disconnect()

    def _count_disconnect(self) -> None:
        if self.stopping and not self._disconnect_cause:
            cause = "shutdown"
        elif self._stall_detected:
            cause = "stall"
        else:
            cause = self._disconnect_cause or "connection_lost"
        self.disconnects += 1
        self.disconnects_by_cause[cause] += 1
        up_for = time.monotonic() - (self._connected_monotonic or time.monotonic())
        if up_for >= self.settings.upstream_backoff_reset_after:
            self.backoff.reset()

    def _next_delay(self) -> float:
        delay = self.backoff.next_delay()
        if self._client_limit_hit:
            # Another connection from this IP holds the only slot; retrying
            # sooner than the cap would just be rejected again.
            self._client_limit_hit = False
            delay = max(delay, self.backoff.maximum)
        return delay

    def _report_loss(self, delay: float) -> None:
        was_connected = self._connected_monotonic is not None
        if was_connected:
            logger.info(
                "upstream disconnected: code %s, reason %r, cause %s; "
                "reconnecting in %.2f s (attempt %d)",
                self.last_close_code,
                self.last_close_reason,
                self._disconnect_cause or ("stall" if self._stall_detected else "connection_lost"),
                delay,
                self.attempt + 1,
            )
            self.registry.broadcast_message(
                "backpack_disconnected",
                code=self.last_close_code,
                reason=self.last_close_reason,
                reconnectIn=round(delay, 3),
            )
        else:
            logger.warning(
                "upstream attempt %d failed: %s; retrying in %.2f s",
                self.attempt,
                self.last_error or "connection closed during the handshake",
                delay,
            )

    def _set_state(self, state: UpstreamState) -> None:
        if state is self.state:
            return
        logger.debug("upstream state %s -> %s", self.state.value, state.value)
        self.state = state
        for observer in self.observers:
            observer()

    # -- websocket-client callbacks (upstream thread) --------------------------

    def _close_socket(self) -> None:
        """Close the finished connection's socket.

        websocket-client 1.9 does not close it after a close frame from the
        server, because ``WebSocket.close`` returns early once the relay has
        replied to that frame. The socket would stay in CLOSE_WAIT until
        garbage collection.
        """
        raw, self._socket = self._socket, None
        if raw is not None:
            raw.close()

    def _on_open(self, app: websocket.WebSocketApp) -> None:
        self._socket = app.sock.sock if app.sock is not None else None
        if self.stopping:
            app.keep_running = False
            return
        now = time.monotonic()
        self._connected_monotonic = now
        self._last_frame_monotonic = now
        self.connected_since = time.time()
        self.connects += 1
        self.last_error = ""
        self._set_state(UpstreamState.CONNECTED)
        self._tune_socket(app)
        logger.info("upstream connected to %s (attempt %d)", self.display_url, self.attempt)
        self.registry.broadcast_message("backpack_connected", url=self.display_url)

    def _tune_socket(self, app: websocket.WebSocketApp) -> None:
        raw = app.sock.sock if app.sock is not None else None
        if raw is None:
            return
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except OSError as error:
            logger.debug("could not tune the upstream socket: %s", error)

    def _on_data(self, app: websocket.WebSocketApp, data: bytes, opcode: int, fin: bool) -> None:
        try:
            self._forward(data, opcode)
        except Exception:  # noqa: BLE001 - one bad frame must not end the connection
            self.frames_dropped["internal_error"] += 1
            logger.exception("dropped upstream frame %d after an internal error", self.frames_in)

    def oversize_frame_skipped(self, length: int) -> None:
        """Drop the next message, of which ``length`` bytes were discarded unread."""
        self._drop_next_message = length

    def _forward(self, data: bytes, opcode: int) -> None:
        now = time.monotonic()
        self._last_frame_monotonic = now
        self.last_frame_at = time.time()
        self.frames_in += 1
        self.bytes_in += len(data)
        if self._drop_next_message:
            length, self._drop_next_message = self._drop_next_message, 0
            self._drop("too_large", "message of %d bytes exceeds max_frame_bytes %d (discarded unread)", length, self.settings.upstream_max_frame_bytes)
            return
        if opcode == OPCODE_TEXT:
            try:
                # Decoding in C is the cheapest validation the standard library
                # offers. Decoding in 16 KiB steps was tried and was slower end
                # to end: most steps of Backpack.tf frames hold an emoji.
                # NOTE: one character above U+FFFF makes the decoded copy take
                # 4 bytes per character, so a 15 MiB frame with an emoji was
                # measured at about 92 MB of peak memory (30 MB in pure ASCII).
                data.decode("utf-8")
            except UnicodeDecodeError as error:
                self._drop("invalid_utf8", "text frame of %d bytes is not valid UTF-8 at byte %d", len(data), error.start)
                return
            if not data[:1] == b"[":
                self.frames_not_json_array += 1
            # NOTE: only frames up to CLIENT_LIMIT_SCAN_BYTES are searched. The
            # notice comes in a short frame of its own, and scanning every
            # ~1 MB batch cost a fifth of the ingest CPU.
            if len(data) <= CLIENT_LIMIT_SCAN_BYTES and CLIENT_LIMIT_EVENT in data:
                self._client_limit(data)
        elif opcode == OPCODE_BINARY:
            self.frames_binary += 1
        else:
            self._drop("unknown_opcode", "frame with opcode %d", opcode)
            return
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("upstream frame %d: %d bytes, opcode %d", self.frames_in, len(data), opcode)
        # Counted before the fan-out, so /status never lags a frame a client has received.
        self.frames_relayed += 1
        self.registry.broadcast(encode_frame(opcode, data), received_at=now)

    def _drop(self, reason: str, message: str, *args: Any) -> None:
        self.frames_dropped[reason] += 1
        count = self.frames_dropped[reason]
        # Log the first few drops of each kind, then every 100th.
        if count <= 3 or count % 100 == 0:
            logger.warning("dropped upstream frame %d (%s, %d so far): " + message, self.frames_in, reason, count, *args)

    def _client_limit(self, data: bytes) -> None:
        message = ""
        try:
            events = json.loads(data)
        except ValueError:
            events = []
        for event in events if isinstance(events, list) else []:
            if isinstance(event, dict) and event.get("event") == "client-limit-exceeded":
                payload = event.get("payload")
                if isinstance(payload, dict):
                    message = str(payload.get("message", ""))
                break
        else:
            return
        self.client_limit_exceeded += 1
        self.client_limit_message = message
        self._client_limit_hit = True
        self.last_error = f"client-limit-exceeded: {message}"
        logger.error(
            "Backpack.tf sent client-limit-exceeded (%r): another websocket connection "
            "from this IP address holds the only allowed slot. Check for a second "
            "relay or a bot connecting directly to Backpack.tf from the same IP; "
            "the next attempt waits at least %g s",
            message,
            self.backoff.maximum,
        )

    def _on_error(self, app: websocket.WebSocketApp, error: BaseException) -> None:
        if getattr(error, "status_code", None) is not None and isinstance(
            error, websocket.WebSocketConnectionClosedException
        ):
            # A close frame from the server; _on_close records it.
            self._disconnect_cause = "closed_by_server"
            return
        text, cause = describe_error(error, self.display_url)
        if self._handshake_cut:
            text = f"handshake not complete within connect_timeout ({self.settings.upstream_connect_timeout:g} s)"
            cause = "handshake_timeout"
        self.last_error = text
        if self._connected_monotonic is not None:
            self._disconnect_cause = cause
            logger.warning("upstream connection failed: %s", text)
        if cause == "frame_too_large":
            self.frames_dropped["too_large"] += 1
        if cause in ("ping_timeout", "frame_too_large"):
            # A dead peer sends no close reply, and a rejected frame's
            # payload must not be read, so the close must not wait.
            self._stop_reading(app)
        if isinstance(error, (websocket.WebSocketProtocolException, websocket.WebSocketPayloadException)):
            # RFC 6455 section 7.4.1: a protocol error closes with 1002.
            # websocket-client would send 1000 when it tears the connection down.
            self._stop_reading(app)
            try:
                app.sock.close(status=websocket.STATUS_PROTOCOL_ERROR, reason=b"protocol error", timeout=0)
            except Exception as close_error:  # noqa: BLE001 - the socket may already be gone
                logger.debug("close frame 1002 to the upstream failed: %s", close_error)
        if not self._error_reported:
            self._error_reported = True
            self.registry.broadcast_message("backpack_error", error=text)

    def _stop_reading(self, app: websocket.WebSocketApp) -> None:
        """Shut the read side so the close that follows does not wait for a reply.

        websocket-client waits up to 3 s for the peer's close frame, which an
        upstream that stopped sending pongs will not send. The relay's own
        close frame is still written.
        """
        raw = app.sock.sock if app.sock is not None else None
        if raw is None:
            return
        try:
            raw.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def _on_close(self, app: websocket.WebSocketApp, code: int | None, reason: str | None) -> None:
        self.last_close_code = code
        self.last_close_reason = reason or ""
        if code is not None and not self._disconnect_cause:
            self._disconnect_cause = "shutdown" if self.stopping else "closed_by_server"

    # -- reporting ---------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.state is UpstreamState.CONNECTED

    def status(self) -> dict[str, Any]:
        """Return the upstream part of ``/status``."""
        retry_in = None
        if self.next_retry_at is not None:
            retry_in = max(0.0, round(self.next_retry_at - time.time(), 3))
        return {
            "url": self.display_url,
            "state": self.state.value,
            "connected": self.connected,
            "connectedSince": self.connected_since if self.connected else None,
            "lastFrameAt": self.last_frame_at,
            "attempt": self.attempt,
            "connects": self.connects,
            "reconnects": self.reconnects,
            "disconnects": self.disconnects,
            "disconnectsByCause": dict(self.disconnects_by_cause),
            "lastCloseCode": self.last_close_code,
            "lastCloseReason": self.last_close_reason,
            "lastError": self.last_error,
            "nextRetryIn": retry_in,
            "clientLimitExceeded": self.client_limit_exceeded,
            "clientLimitMessage": self.client_limit_message,
        }


def _raw_socket(app: Any) -> socket.socket | None:
    """Return the socket under ``app``, or None; safe while another thread tears it down."""
    sock = getattr(app, "sock", None)
    return getattr(sock, "sock", None)


def describe_error(error: BaseException, url: str) -> tuple[str, str]:
    """Return a readable one-line description of a connection error and its cause label."""
    status = getattr(error, "status_code", None)
    if isinstance(error, FrameTooLarge):
        return str(error), "frame_too_large"
    if isinstance(error, websocket.WebSocketBadStatusException) and status is not None:
        return f"handshake rejected with HTTP {status}", "handshake_failed"
    if isinstance(error, ConnectionRefusedError):
        return f"connection refused by {url}", "refused"
    if isinstance(error, websocket.WebSocketTimeoutException):
        text = str(error) or "timed out"
        if "ping" in text:
            return "no pong within ping_timeout: the upstream stopped answering", "ping_timeout"
        return f"timed out: {text}", "timeout"
    if isinstance(error, socket.timeout):
        return "timed out connecting or reading", "timeout"
    if isinstance(error, ConnectionResetError):
        return "connection reset by the upstream", "reset"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the upstream host: {error}", "dns"
    if isinstance(error, websocket.WebSocketConnectionClosedException):
        return f"connection closed: {error}", "connection_lost"
    first_line = (str(error) or type(error).__name__).splitlines()[0][:200]
    return f"{type(error).__name__}: {first_line}", "error"
