"""One websocket client: its outgoing queue, its writer and its inbound messages.

Every byte bound for a client, from any thread, goes through ``Client.send``:
upstream frames from the fan-out, relay messages, pings from the keepalive
thread, and the pongs and close frames that simple-websocket's reader thread
produces (through ``ClientSocket``). When nothing is queued, ``send`` writes
straight to the socket without blocking. Otherwise it appends to the client's
queue. The client's writer thread, which is the HTTP request thread that
upgraded the connection, drains the queue many frames per system call. A
frame is removed from the queue only once it is fully written, so "the queue
is empty" means "nothing is in flight" and ordering holds without a second
flag.

The queue is a ``collections.deque`` guarded by the client's ``Condition``
rather than a ``queue.Queue``, because the fast path has to check "empty" and
write in one atomic step, which ``queue.Queue`` does not offer.
"""

from __future__ import annotations

import enum
import fcntl
import itertools
import json
import logging
import select
import socket
import struct
import termios
import threading
import time
from collections import deque
from typing import Any, Callable

from simple_websocket import ConnectionClosed

from .frames import (
    CLOSE_GOING_AWAY,
    CLOSE_INVALID_PAYLOAD,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_POLICY_VIOLATION,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_SLOW_CONSUMER,
    CLOSE_UNSUPPORTED_DATA,
    OPCODE_CLOSE,
    OPCODE_PONG,
    PING_FRAME,
    encode_close,
    relay_message,
)

logger = logging.getLogger(__name__)

# Buffers passed to one sendmsg() call; Linux allows 1024 (IOV_MAX). A cap of
# 64 let writers fall behind with the relay pinned to one core: at 500 clients
# and the maximum rate, all 500 were closed as slow consumers. bench/run.py
# measured 475 MB/s with 64 buffers and 1,074 MB/s with 512.
SENDMSG_MAX_BUFFERS = 512
# Results of Client.send besides 0 (rejected): written at once, or queued.
WRITTEN = 2
QUEUED = 1

# Maximum time, in seconds, a blocked writer sleeps before it re-checks close
# requests.
WAIT_SLICE = 0.5


class ClientState(enum.IntEnum):
    OPEN = 1
    CLOSING = 2
    CLOSED = 3


def _unsent_bytes(sock: Any) -> int:
    """Return the bytes in ``sock``'s kernel send queue not yet acknowledged, or 0."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return 0


class CloseCause(str, enum.Enum):
    """Reason a client connection ended, also used as a counter label."""

    CLIENT_CLOSED = "client_closed"
    CONNECTION_LOST = "connection_lost"
    SLOW_CONSUMER = "slow_consumer"
    SEND_TIMEOUT = "send_timeout"
    PING_TIMEOUT = "ping_timeout"
    RATE_LIMITED = "rate_limited"
    MESSAGE_TOO_BIG = "message_too_big"
    PROTOCOL_ERROR = "protocol_error"
    BINARY_MESSAGE = "binary_message"
    ACCESS_REVOKED = "access_revoked"
    SHUTDOWN = "shutdown"


class ClientSocket:
    """The socket object handed to simple-websocket.

    Reads go to the real socket and mark the client as alive; writes (the 101
    response, pongs, close frames) go through the client's ordered write path so
    they never interleave with a frame another thread is writing.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._response_sent = False

    def fileno(self) -> int:
        return self._client.sock.fileno()

    def recv(self, size: int) -> bytes:
        data = self._client.sock.recv(size)
        self._client.last_receive = time.monotonic()
        return data

    def send(self, data: bytes) -> int:
        # The first write is the 101 response, which is not a websocket
        # frame. Every later one is: the reader thread may already answer
        # pings before simple_websocket.Server has returned.
        framed = self._response_sent
        self._response_sent = True
        self._client.send(bytes(data), framed=framed)
        return len(data)

    def close(self) -> None:
        self._client.reader_finished()


class InboundSignal:
    """The event object handed to simple-websocket for "a message arrived".

    ``set`` runs on the reader thread once per complete message; it enforces the
    message rate limit there, before an unread backlog can build up, and wakes
    the client's writer thread, which handles the message.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._flag = threading.Event()

    def set(self) -> None:
        self._client.message_arrived()

    def clear(self) -> None:
        self._flag.clear()

    def wait(self, timeout: float | None = None) -> bool:
        return self._flag.wait(timeout)

    def is_set(self) -> bool:
        return self._flag.is_set()


class Client:
    """State and write path of one connected websocket client.

    Thread-safe: ``send``, ``close`` and the counters' readers may be called
    from any thread. ``serve`` runs on the client's own writer thread.
    """

    def __init__(
        self,
        client_id: int,
        address: str,
        user_agent: str,
        sock: socket.socket,
        settings: Any,
        on_message: Callable[[Client, Any], None] | None = None,
        on_closing: Callable[[CloseCause], None] | None = None,
        latency: Any = None,
    ) -> None:
        self.id = client_id
        self.address = address
        self.user_agent = user_agent
        self.sock = sock
        self.connected_at = time.time()
        self.ws: Any = None  # the simple_websocket.Server, set after the upgrade
        # security.Credentials from the upgrade request, re-checked on reload.
        self.credentials: Any = None

        self._cond = threading.Condition(threading.Lock())
        self.apply_limits(settings)
        self._on_message = on_message
        # metrics.LatencyHistogram for queued upstream frames, or None.
        self._latency = latency
        # Called once, with the lock held, when the client starts closing.
        self._on_closing = on_closing

        # Items are [data, is_upstream_frame, received_at or None]; the head
        # may be partly written.
        self._queue: deque[list[Any]] = deque()
        self._head_offset = 0
        self._drop_backlog = False
        self._close_frame_started = False
        self._reader_done = False
        self._messages_pending = False
        self.state = ClientState.OPEN
        self.close_code: int | None = None
        self.close_reason = ""
        self.close_cause: CloseCause | None = None
        self._close_deadline: float | None = None
        # select.poll object, created when the writer first waits for the socket to drain.
        self._poller: Any = None

        self.queued_bytes = 0
        self.queued_frames = 0
        self.frames_sent = 0
        self.bytes_sent = 0
        self.frames_dropped = 0
        # Equal at first: no ping is outstanding until one is sent.
        self.last_receive = self._last_ping = time.monotonic()
        # bytes_sent and the socket's unsent byte count at the last keepalive check.
        self._progress_sent = 0
        self._progress_unsent = 0
        # When the last ping left the queue for the socket. The client cannot
        # reply to a ping still queued behind a backlog, so its timer starts here.
        self._ping_written_at = 0.0
        self._tokens = float(self._message_burst)
        self._tokens_at = time.monotonic()

    # -- writing ---------------------------------------------------------------

    def send(
        self,
        data: bytes,
        upstream: bool = False,
        framed: bool = True,
        received_at: float | None = None,
    ) -> int:
        """Queue ``data`` (one or more encoded frames) for this client.

        ``framed`` is False only for the HTTP 101 response. ``received_at``
        (``time.monotonic()`` at the upstream frame's arrival) lets the writer
        record the delivery latency of a queued frame. Writes at once, without
        blocking, when nothing is queued. Returns WRITTEN or QUEUED, or 0 when
        the client is closing or the queue overflowed, in which case the
        client is being closed as a slow consumer.
        """
        accepted, problem = self._enqueue(data, upstream, framed, received_at)
        if problem == "overflow":
            logger.warning(
                "client %d (%s) closed as slow consumer: %d bytes in %d frames queued "
                "(limits %d bytes, %d frames)",
                self.id,
                self.address,
                self.queued_bytes,
                self.queued_frames,
                self._queue_max_bytes,
                self._queue_max_frames,
            )
            self.close(CLOSE_SLOW_CONSUMER, "slow consumer", CloseCause.SLOW_CONSUMER)
        elif problem == "rate_limited":
            self._rate_limited()
        return accepted

    def _enqueue(
        self, data: bytes, upstream: bool, framed: bool, received_at: float | None
    ) -> tuple[int, str | None]:
        """Write or queue ``data``; return (WRITTEN, QUEUED or 0, problem to act on after the lock)."""
        problem: str | None = None
        is_close = framed and _is_close_frame(data)
        with self._cond:
            if self._close_frame_started or self.state is ClientState.CLOSED:
                if upstream:
                    self.frames_dropped += 1
                return 0, None
            if is_close:
                self._close_frame_started = True
                if self.state is ClientState.OPEN:
                    self._closed_by_library(data)
            elif framed and not upstream and (data[0] & 0x0F) == OPCODE_PONG:
                # Pongs answer a client's pings, which simple-websocket handles
                # without telling us, so pings count as messages. One write
                # may carry several pongs.
                if self._charge_message(_count_pongs(data)):
                    problem = "rate_limited"
            if not self._queue:
                written = self._write_now(data)
                if written is None:
                    return 0, None
                if written == len(data):
                    self.bytes_sent += written
                    if upstream:
                        self.frames_sent += 1
                    elif data is PING_FRAME:
                        self._ping_written_at = time.monotonic()
                    return WRITTEN, problem
            else:
                written = 0
                frames_after = self.queued_frames + 1
                bytes_after = self.queued_bytes + len(data)
                # Every frame but a close counts: a client that floods pings
                # and never reads would otherwise grow its queue of pongs.
                if not is_close and (
                    frames_after > self._queue_max_frames
                    or bytes_after > self._queue_max_bytes
                ):
                    self.frames_dropped += 1 if upstream else 0
                    return 0, "overflow"
            self._queue.append([data, upstream, received_at])
            self._head_offset += written if len(self._queue) == 1 else 0
            self.bytes_sent += written
            self.queued_bytes += len(data) - written
            self.queued_frames += 1
            self._cond.notify()
            return QUEUED, problem

    def send_message(self, message_type: str, **fields: Any) -> bool:
        """Send a relay message (a JSON object) to this client."""
        return self.send(relay_message(message_type, **fields))

    def _write_now(self, data: bytes) -> int | None:
        """Write without blocking; return bytes written, or None if the socket failed."""
        try:
            return self.sock.send(data, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as error:
            self._connection_failed(error)
            return None

    def _connection_failed(self, error: OSError) -> None:
        """Record a failed write; the caller holds the lock."""
        if self.state is ClientState.OPEN:
            logger.info(
                "client %d (%s) connection lost while writing: %s",
                self.id,
                self.address,
                error,
            )
            self._begin_closing(CloseCause.CONNECTION_LOST)
        self._drop_backlog = True
        self._close_frame_started = True
        self._close_deadline = time.monotonic()
        self._cond.notify()

    def _flush(self) -> bool:
        """Write everything queued; run on the writer thread only.

        Returns False when the socket failed or accepted no byte for
        ``send_timeout`` seconds (or past the close deadline).
        """
        idle_since = time.monotonic()
        while True:
            with self._cond:
                if self._drop_backlog:
                    self._discard_backlog()
                if not self._queue:
                    return True
                if self.state is ClientState.CLOSED:
                    return False
                buffers = [
                    memoryview(item[0])
                    for item in itertools.islice(self._queue, SENDMSG_MAX_BUFFERS)
                ]
                buffers[0] = buffers[0][self._head_offset :]
            try:
                written = self.sock.sendmsg(buffers, (), socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                written = 0
            except OSError as error:
                with self._cond:
                    self._connection_failed(error)
                return False
            with self._cond:
                self._account_written(written)
                close_deadline = self._close_deadline
            now = time.monotonic()
            if written:
                idle_since = now
                continue
            deadline = idle_since + self._send_timeout
            if close_deadline is not None:
                deadline = min(deadline, close_deadline)
            if now >= deadline:
                if close_deadline is None or now < close_deadline:
                    self._log_send_timeout()
                return False
            if self._poller is None:
                # poll, unlike select, takes descriptors above 1023, which a
                # relay with a thousand clients uses.
                self._poller = select.poll()
                self._poller.register(self.sock, select.POLLOUT)
            try:
                self._poller.poll(max(1, int(min(WAIT_SLICE, deadline - now) * 1000)))
            except (OSError, ValueError):
                return False

    def _account_written(self, written: int) -> None:
        """Pop fully written items and record their latency; the caller holds the lock."""
        self.bytes_sent += written
        self.queued_bytes -= written
        latencies: list[float] = []
        while written and self._queue:
            data, upstream, received_at = self._queue[0]
            remaining = len(data) - self._head_offset
            if written < remaining:
                self._head_offset += written
                break
            written -= remaining
            self._queue.popleft()
            self._head_offset = 0
            self.queued_frames -= 1
            if upstream:
                self.frames_sent += 1
                if received_at is not None:
                    latencies.append(time.monotonic() - received_at)
            elif data is PING_FRAME:
                self._ping_written_at = time.monotonic()
        if latencies and self._latency is not None:
            self._latency.observe_many(latencies)

    def _discard_backlog(self) -> None:
        """Drop queued frames, keeping a partly written head and any close frame."""
        kept: deque[list[Any]] = deque()
        for index, item in enumerate(self._queue):
            if (index == 0 and self._head_offset) or _is_close_frame(item[0]):
                kept.append(item)
            elif item[1]:
                self.frames_dropped += 1
        self._queue = kept
        self.queued_frames = len(kept)
        self.queued_bytes = sum(len(item[0]) for item in kept) - self._head_offset
        self._drop_backlog = False

    def _log_send_timeout(self) -> None:
        with self._cond:
            first = self.state is ClientState.OPEN
            if first:
                self._begin_closing(CloseCause.SEND_TIMEOUT)
            queued = self.queued_bytes
        if first:
            logger.warning(
                "client %d (%s) cut: its socket accepted no data for %.1f s "
                "(%d bytes queued)",
                self.id,
                self.address,
                self._send_timeout,
                queued,
            )

    # -- closing ---------------------------------------------------------------

    def close(self, code: int, reason: str, cause: CloseCause) -> None:
        """Start closing with a close frame; the writer thread finishes it.

        Safe from any thread and idempotent. A slow consumer's backlog is
        dropped so its memory is freed at once.
        """
        with self._cond:
            if self.state is not ClientState.OPEN:
                return
            self._begin_closing(cause, code, reason)
            if cause in (CloseCause.SLOW_CONSUMER, CloseCause.SEND_TIMEOUT):
                self._drop_backlog = True
            if not self._close_frame_started:
                frame = encode_close(code, reason)
                self._queue.append([frame, False, None])
                self.queued_frames += 1
                self.queued_bytes += len(frame)
                self._close_frame_started = True
            self._cond.notify()

    def abort(self) -> None:
        """Shut the socket down at once, waking every thread blocked on it."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def reader_finished(self) -> None:
        """Record that simple-websocket's reader thread has ended."""
        with self._cond:
            self._reader_done = True
            if self.state is ClientState.OPEN:
                self._begin_closing(CloseCause.CONNECTION_LOST)
            self._cond.notify()

    def _closed_by_library(self, frame: bytes) -> None:
        """Record a close frame written by simple-websocket; the caller holds the lock.

        simple-websocket writes one when it echoes the client's close frame, when
        a message exceeds ``max_message_bytes`` (code 1009) and when the client
        breaks the protocol (1002, or 1007 for invalid UTF-8).
        """
        code = struct.unpack("!H", frame[2:4])[0] if len(frame) >= 4 else None
        if code == CLOSE_MESSAGE_TOO_BIG:
            self._begin_closing(CloseCause.MESSAGE_TOO_BIG, code, "message too big")
        elif code in (CLOSE_PROTOCOL_ERROR, CLOSE_INVALID_PAYLOAD):
            self._begin_closing(CloseCause.PROTOCOL_ERROR, code, "protocol error")
        else:
            self._begin_closing(CloseCause.CLIENT_CLOSED, code)

    def _begin_closing(self, cause: CloseCause, code: int | None = None, reason: str = "") -> None:
        """Leave the OPEN state, the one place that does; the caller holds the lock."""
        self.state = ClientState.CLOSING
        self.close_cause = cause
        self.close_code = code
        self.close_reason = reason
        self._close_deadline = time.monotonic() + self._close_timeout
        if self._on_closing is not None:
            self._on_closing(cause)

    # -- inbound ---------------------------------------------------------------

    def _charge_message(self, count: int = 1) -> bool:
        """Take ``count`` tokens from the rate-limit bucket; return True if it ran dry.

        The caller holds the lock.
        """
        now = time.monotonic()
        self._tokens = min(
            float(self._message_burst),
            self._tokens + (now - self._tokens_at) * self._message_rate,
        )
        self._tokens_at = now
        self._tokens -= count
        return self._tokens < 0

    def message_arrived(self) -> None:
        """Count one inbound message against the rate limit; reader thread."""
        with self._cond:
            limited = self._charge_message()
            self._messages_pending = True
            self._cond.notify()
        if limited:
            self._rate_limited()

    def _rate_limited(self) -> None:
        if self.state is ClientState.OPEN:
            logger.warning(
                "client %d (%s) closed: more than %g messages/s (burst %d)",
                self.id,
                self.address,
                self._message_rate,
                self._message_burst,
            )
            self.close(
                CLOSE_POLICY_VIOLATION, "message rate limit exceeded", CloseCause.RATE_LIMITED
            )

    def _handle_messages(self) -> None:
        while self.state is ClientState.OPEN:
            try:
                message = self.ws.receive(timeout=0)
            except ConnectionClosed:
                return
            if message is None:
                return
            if isinstance(message, (bytes, bytearray)):
                logger.info(
                    "client %d (%s) closed: sent a binary message (%d bytes)",
                    self.id,
                    self.address,
                    len(message),
                )
                self.close(
                    CLOSE_UNSUPPORTED_DATA,
                    "binary messages are not supported",
                    CloseCause.BINARY_MESSAGE,
                )
                return
            self._handle_text(message)

    def _handle_text(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            self.send_message("error", error="invalid JSON; send an object such as {\"type\": \"ping\"}")
            return
        if not isinstance(message, dict) or "type" not in message:
            self.send_message("error", error='expected a JSON object with a "type" key')
            return
        if message["type"] == "ping":
            self.send_message("pong")
            return
        if self._on_message is not None and self._on_message(self, message):
            return
        shown = json.dumps(message["type"])[:64]
        self.send_message("error", error=f"unknown message type {shown}; supported: ping")

    # -- keepalive -------------------------------------------------------------

    def check_keepalive(self, now: float) -> bool:
        """Send a ping when due, or close a client silent for two intervals.

        Returns True when the client was closed for silence.
        """
        if self.state is not ClientState.OPEN:
            return False
        silent = now - self.last_receive
        # Close only once a ping written after the last byte received has had
        # a full interval for its pong. After a reload that shortens the
        # interval, a client must first get a ping. A client with a backlog
        # that hides the ping is left to the queue cap and send_timeout.
        ping_unanswered = self._ping_written_at > self.last_receive and (
            now - self._ping_written_at >= self._ping_interval
        )
        # Bytes leaving the relay, or leaving its socket's send queue, show
        # that the client is still reading, just behind.
        sent, unsent = self.bytes_sent, _unsent_bytes(self.sock)
        draining = sent != self._progress_sent or unsent < self._progress_unsent
        self._progress_sent, self._progress_unsent = sent, unsent
        if silent > 2 * self._ping_interval and ping_unanswered and not draining:
            logger.info(
                "client %d (%s) closed: nothing received for %.1f s (ping interval %g s)",
                self.id,
                self.address,
                silent,
                self._ping_interval,
            )
            self.close(CLOSE_POLICY_VIOLATION, "ping timeout", CloseCause.PING_TIMEOUT)
            return True
        if now - self._last_ping >= self._ping_interval:
            self._last_ping = now
            self.send(PING_FRAME)
        return False

    # -- writer thread ---------------------------------------------------------

    def serve(self) -> None:
        """Run the writer loop until the connection has ended; writer thread only."""
        while True:
            with self._cond:
                while not (
                    self._queue
                    or self._messages_pending
                    or self._reader_done
                    or self.state is not ClientState.OPEN
                ):
                    self._cond.wait()
                self._messages_pending = False
                state = self.state
            if state is ClientState.OPEN:
                self._handle_messages()
            if not self._flush():
                break
            with self._cond:
                if self.state is ClientState.OPEN:
                    continue
                if self._queue and self._close_deadline and time.monotonic() < self._close_deadline:
                    continue
                if self._reader_done:
                    break
                remaining = (self._close_deadline or 0) - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                if self._reader_done or time.monotonic() >= (self._close_deadline or 0):
                    break
        self._finish()

    def _finish(self) -> None:
        with self._cond:
            if self.state is ClientState.OPEN:
                self._begin_closing(CloseCause.CONNECTION_LOST)
            self.state = ClientState.CLOSED
            self._queue.clear()
            self.queued_bytes = 0
            self.queued_frames = 0
        self.abort()
        if self.ws is not None:
            self.ws.thread.join(self._close_timeout)
        try:
            self.sock.close()
        except OSError:
            pass

    def revoke_access(self, rule: str) -> None:
        """Close with 1008 because a reload's access rules reject ``rule`` (Host, Origin or access token)."""
        logger.info(
            "client %d (%s) closed: its %s is no longer accepted after the reload",
            self.id,
            self.address,
            rule,
        )
        self.close(CLOSE_POLICY_VIOLATION, "access revoked", CloseCause.ACCESS_REVOKED)

    def going_away(self, reason: str = "relay shutting down") -> None:
        """Close with 1001 because the relay is stopping."""
        self.close(CLOSE_GOING_AWAY, reason, CloseCause.SHUTDOWN)

    def apply_limits(self, settings: Any) -> None:
        """Adopt the queue, timeout, ping and rate limits of ``settings``.

        Called at construction and again after a SIGHUP reload.
        """
        with self._cond:
            self._queue_max_bytes = settings.clients_queue_max_bytes
            self._queue_max_frames = settings.clients_queue_max_frames
            self._send_timeout = settings.clients_send_timeout
            self._close_timeout = settings.clients_close_timeout
            self._ping_interval = settings.clients_ping_interval
            self._message_rate = settings.clients_message_rate
            self._message_burst = settings.clients_message_burst
        if self.ws is not None:
            self.ws.max_message_size = settings.clients_max_message_bytes

    def describe(self) -> dict[str, Any]:
        """Return this client's row for ``/api/clients``."""
        return {
            "id": self.id,
            "address": self.address,
            "connectedAt": round(self.connected_at, 3),
            "userAgent": self.user_agent,
            "framesSent": self.frames_sent,
            "bytesSent": self.bytes_sent,
            "queuedFrames": self.queued_frames,
            "queuedBytes": self.queued_bytes,
        }


def _is_close_frame(data: bytes) -> bool:
    return bool(data) and (data[0] & 0x0F) == OPCODE_CLOSE


def _count_pongs(data: bytes) -> int:
    """Count the pong frames in ``data``, a run of unmasked control frames."""
    count = 0
    position = 0
    while position + 2 <= len(data):
        length = data[position + 1] & 0x7F
        if length > 125:
            break  # not a control frame; nothing simple-websocket writes
        if data[position] & 0x0F == OPCODE_PONG:
            count += 1
        position += 2 + length
    return max(count, 1)
