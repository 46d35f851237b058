"""Shared test fixtures: a controllable fake upstream, the real relay process, clients.

Everything listens on 127.0.0.1. Every wait is a multiple of ``UNIT`` seconds,
which ``RELAY_TEST_UNIT`` scales for slow machines.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import unittest
from pathlib import Path
from typing import Any, Callable

import websocket

UNIT = float(os.environ.get("RELAY_TEST_UNIT", "1.0"))

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
SAMPLE_FRAMES = DATA / "bptf-frames-sample.jsonl"

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def load_sample_frames() -> list[bytes]:
    """Return the sample upstream frames, one bytes object per line."""
    with open(SAMPLE_FRAMES, "rb") as handle:
        return [line.rstrip(b"\n") for line in handle if line.strip()]


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.02, message: str = "") -> Any:
    """Poll ``predicate`` until it returns a true value; raise AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {message or predicate}")
        time.sleep(interval)


def write_config(directory: str, text: str, name: str = "relay.conf") -> str:
    """Write ``text`` to ``directory/name`` and return the path."""
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


# -- fake upstream ------------------------------------------------------------------


def _peer_closed(sock: socket.socket) -> bool:
    """Return True when the peer's FIN or RST has arrived on ``sock``, or it is closed."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def encode_server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", first, length)
    elif length < 65536:
        header = struct.pack("!BBH", first, 126, length)
    else:
        header = struct.pack("!BBQ", first, 127, length)
    return header + payload


def read_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            raise ConnectionError("peer closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_client_frame(sock: socket.socket) -> tuple[int, bytes]:
    """Read one masked frame from a websocket client; return (opcode, payload)."""
    first, second = read_exact(sock, 2)
    length = second & 0x7F
    if length == 126:
        length = struct.unpack("!H", read_exact(sock, 2))[0]
    elif length == 127:
        length = struct.unpack("!Q", read_exact(sock, 8))[0]
    mask = read_exact(sock, 4) if second & 0x80 else b""
    payload = read_exact(sock, length)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if length < 4096 else _unmask(payload, mask)
    return first & 0x0F, payload


def _unmask(payload: bytes, mask: bytes) -> bytes:
    repeated = (mask * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(payload), "big")


class UpstreamConnection:
    """One accepted connection on the fake upstream."""

    def __init__(self, server: FakeUpstream, sock: socket.socket, number: int) -> None:
        self.server = server
        self.sock = sock
        self.number = number
        self.closed = threading.Event()
        self.close_frames: list[tuple[int | None, bytes]] = []
        self.pings_received = 0
        self.pongs: list[bytes] = []
        self.answer_pings = True
        # When False, serve() no longer calls recv(), so the relay's pings and
        # close frame go unread; it still notices the relay's FIN or RST.
        self.reading = True
        self.opened_at = time.monotonic()
        self.closed_at: float | None = None
        self._send_lock = threading.Lock()

    def send_raw(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def send_text(self, payload: bytes | str) -> None:
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        self.send_raw(encode_server_frame(0x1, payload))

    def send_binary(self, payload: bytes) -> None:
        self.send_raw(encode_server_frame(0x2, payload))

    def send_close(self, code: int, reason: str = "") -> None:
        self.send_raw(encode_server_frame(0x8, struct.pack("!H", code) + reason.encode()))

    def send_fragments(self, opcode: int, parts: list[bytes]) -> None:
        """Send one message split into frames: ``opcode`` first, then continuation frames."""
        frames = [
            encode_server_frame(opcode if index == 0 else 0x0, part, fin=index == len(parts) - 1)
            for index, part in enumerate(parts)
        ]
        self.send_raw(b"".join(frames))

    def send_ping(self, payload: bytes = b"") -> None:
        self.send_raw(encode_server_frame(0x9, payload))

    def reset(self) -> None:
        """Abort the TCP connection with an RST.

        A close() while serve() blocks in recv() would send nothing, so this
        wakes serve() with shutdown(SHUT_RD), which sends nothing either, and
        serve() then closes the socket with a zero linger time, which sends RST.
        """
        self.server._untrack(self.sock)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        self.closed.wait(5 * UNIT)

    def close(self) -> None:
        self.server._untrack(self.sock)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.closed.set()

    def stop_reading(self) -> None:
        """Stop reading and responding, keeping the TCP connection open.

        The frame that serve() may be blocked on when this is called is still
        read, but it gets no response.
        """
        self.answer_pings = False
        self.reading = False

    def _wait_for_hangup(self) -> None:
        """Block without reading until the peer closes or the fake upstream stops."""
        poller = select.poll()
        poller.register(self.sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        while self.server._running:
            if poller.poll(100):
                return

    def serve(self) -> None:
        try:
            while True:
                if not self.reading:
                    self._wait_for_hangup()
                    break
                opcode, payload = read_client_frame(self.sock)
                if opcode == 0x9:
                    self.pings_received += 1
                    if self.answer_pings and not self.server.frozen:
                        self.send_raw(encode_server_frame(0xA, payload))
                elif opcode == 0xA:
                    self.pongs.append(payload)
                elif opcode == 0x8:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                    self.close_frames.append((code, payload[2:]))
                    try:
                        self.send_raw(encode_server_frame(0x8, payload[:2]))
                    except OSError:
                        pass
                    break
        except (OSError, ConnectionError, ValueError):
            pass
        finally:
            self.closed_at = time.monotonic()
            self.server._untrack(self.sock)
            self.closed.set()
            try:
                self.sock.close()
            except OSError:
                pass


class FakeUpstream:
    """A websocket server on 127.0.0.1 that a test drives frame by frame.

    ``reject_with`` makes handshakes fail with an HTTP status and body, and
    ``frozen`` stops it answering anything (handshakes and pings) while keeping
    TCP open. It records how many connections were open at once.

    ``max_open`` counts connections as a server sees them: a connection is
    open from its accept until this server closes or resets it, or until the
    client's FIN or RST has arrived. Arrival is checked in the kernel at each
    accept, so a client that closed its old socket before connecting again is
    never counted twice, however late this server's threads run.
    """

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}/events"
        self.reject_with: tuple[int, bytes] | None = None
        # Responses to the next handshakes, one (status, body) each, used before
        # reject_with. An empty list means accept.
        self.reject_next: list[tuple[int, bytes]] = []
        # While True, each handshake request is answered with a TCP RST.
        self.reset_handshakes = False
        self.handshake_resets = 0
        # time.monotonic() of each accepted TCP connection, in order.
        self.handshake_times: list[float] = []
        self.frozen = False
        # Seconds between the bytes of the 101 response, or None to send it at once.
        self.trickle_handshake: float | None = None
        self.connections: list[UpstreamConnection] = []
        self.handshakes = 0
        self.rejections = 0
        self.max_open = 0
        # Sockets that count as open connections, handshake phase included.
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._running = True
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept_loop, name="fake-upstream", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while self._running:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handshake, args=(sock,), daemon=True).start()

    def _handshake(self, sock: socket.socket) -> None:
        with self._changed:
            self._open = {tracked for tracked in self._open if not _peer_closed(tracked)}
            self._open.add(sock)
            self.max_open = max(self.max_open, len(self._open))
            self.handshakes += 1
            self.handshake_times.append(time.monotonic())
        try:
            if self.frozen:
                self._held.append(sock)  # counted until close()
                return
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("closed during handshake")
                request += chunk
            if self.reset_handshakes:
                with self._lock:
                    self.handshake_resets += 1
                self._untrack(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                return
            with self._lock:
                scripted = self.reject_next.pop(0) if self.reject_next else None
            if scripted is not None or self.reject_with is not None:
                status, body = scripted or self.reject_with
                with self._lock:
                    self.rejections += 1
                sock.sendall(
                    f"HTTP/1.1 {status} Rejected\r\nContent-Type: text/html\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
                )
                self._untrack(sock)
                sock.close()
                return
            key = re.search(rb"(?i)sec-websocket-key:\s*(\S+)", request).group(1)
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
            response = (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            trickle = self.trickle_handshake
            if trickle is None:
                sock.sendall(response)
            else:
                for index in range(len(response)):
                    if not self._running:
                        raise ConnectionError("fake upstream closed")
                    sock.sendall(response[index : index + 1])
                    time.sleep(trickle)
            connection = UpstreamConnection(self, sock, len(self.connections) + 1)
            with self._changed:
                self.connections.append(connection)
                self._changed.notify_all()
            connection.serve()
        except (OSError, ConnectionError, AttributeError):
            self._untrack(sock)
            try:
                sock.close()
            except OSError:
                pass

    def _untrack(self, sock: socket.socket) -> None:
        """Stop counting ``sock`` as an open connection."""
        with self._changed:
            self._open.discard(sock)
            self._changed.notify_all()

    @property
    def open_now(self) -> int:
        with self._lock:
            return len(self._open)

    def wait_connection(self, number: int, timeout: float) -> UpstreamConnection:
        """Wait for the ``number``-th accepted websocket connection (1-based)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.connections) < number:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"fake upstream: connection {number} not made within {timeout:.1f} s")
                self._changed.wait(remaining)
            return self.connections[number - 1]

    @property
    def current(self) -> UpstreamConnection:
        return self.connections[-1]

    def close(self) -> None:
        self._running = False
        self.listener.close()
        for connection in self.connections:
            connection.close()
        for sock in self._held:
            sock.close()


# -- the relay process ----------------------------------------------------------------


class RelayProcess:
    """The real ``python -m relay`` in a subprocess, with its log captured."""

    def __init__(
        self,
        upstream_url: str,
        sections: dict[str, dict[str, Any]] | None = None,
        env: dict[str, str] | None = None,
        config_text: str | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        # Port 0 lets the relay bind any free port; wait_listening() reads the
        # real one from its log, which avoids racing another process for it.
        self.port = 0
        self.directory = tempfile.TemporaryDirectory()
        self.config_path = os.path.join(self.directory.name, "relay.conf")
        merged: dict[str, dict[str, Any]] = {
            "server": {"host": "127.0.0.1", "port": self.port},
            "upstream": {"url": upstream_url, "backoff_initial": 0.1 * UNIT, "backoff_max": 0.5 * UNIT},
            "logging": {"level": "INFO"},
        }
        for section, values in (sections or {}).items():
            merged.setdefault(section, {}).update(values)
        if config_text is None:
            config_text = "".join(
                f"[{section}]\n" + "".join(f"{key} = {value}\n" for key, value in values.items())
                for section, values in merged.items()
            )
        with open(self.config_path, "w", encoding="utf-8") as handle:
            handle.write(config_text)
        environ = {k: v for k, v in os.environ.items() if k not in ("PORT", "BACKPACK_WS_URL", "LOG_LEVEL", "NOTIFY_SOCKET", "JOURNAL_STREAM")}
        environ["PYTHONUNBUFFERED"] = "1"
        environ.update(env or {})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "relay", "-c", self.config_path],
            cwd=str(ROOT),
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=pass_fds,
        )
        self.lines: list[str] = []
        # time.monotonic() when the test process read each line of ``lines``.
        self.line_times: list[float] = []
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.line_times.append(time.monotonic())
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/relay"

    def wait_listening(self, timeout: float = 10 * UNIT) -> None:
        """Wait for the "listening on" log line and record the port it names."""
        wait_for(lambda: "listening on" in self.output or self.process.poll() is not None, timeout, message="relay to listen")
        if self.process.poll() is not None:
            raise AssertionError(f"relay exited with {self.process.returncode}:\n{self.output}")
        match = re.search(r"listening on http://[^:]+:(\d+)", self.output)
        assert match is not None, self.output
        self.port = int(match.group(1))

    def wait_log(self, pattern: str, timeout: float, count: int = 1) -> None:
        regex = re.compile(pattern)
        wait_for(lambda: sum(1 for line in list(self.lines) if regex.search(line)) >= count, timeout, message=f"log line {pattern!r} x{count}")

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """GET a JSON endpoint; return (status, decoded body)."""
        request = urllib.request.Request(self.base + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=5 * UNIT) as response:
                body = response.read()
                if response.headers.get_content_type() != "application/json":
                    return response.status, body
                return response.status, json.loads(body)
        except urllib.error.HTTPError as error:
            body = error.read()
            try:
                return error.code, json.loads(body)
            except ValueError:
                return error.code, body

    def wait_health(self, status: int, timeout: float) -> None:
        wait_for(lambda: self.get("/health")[0] == status, timeout, message=f"/health {status}")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 10 * UNIT) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout)
        if not self._reader.is_alive() and self.process.stdout is not None:
            self.process.stdout.close()
        self.directory.cleanup()
        return self.process.returncode


# -- clients --------------------------------------------------------------------------


class RelayClient:
    """A websocket-client connection to the relay that records every frame."""

    def __init__(self, url: str, timeout: float = 5 * UNIT, **options: Any) -> None:
        self.ws = websocket.create_connection(url, timeout=timeout, skip_utf8_validation=True, **options)
        self.frames: list[tuple[int, bytes]] = []

    def recv(self, timeout: float = 5 * UNIT) -> tuple[int, bytes]:
        """Return the next data or close frame as (opcode, payload); answers pings."""
        self.ws.settimeout(timeout)
        while True:
            opcode, data = self.ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_PING:
                self.ws.pong(data)
                continue
            if opcode == websocket.ABNF.OPCODE_PONG:
                continue
            self.frames.append((opcode, data))
            return opcode, data

    def recv_json(self, timeout: float = 5 * UNIT) -> Any:
        opcode, data = self.recv(timeout)
        return json.loads(data)

    def recv_message(self, message_type: str, timeout: float = 5 * UNIT) -> dict[str, Any]:
        """Skip frames until a relay message of ``message_type`` arrives."""
        deadline = time.monotonic() + timeout
        while True:
            opcode, data = self.recv(max(0.01, deadline - time.monotonic()))
            if data[:1] == b"{":
                message = json.loads(data)
                if message.get("type") == message_type:
                    return message

    def send(self, text: str) -> None:
        self.ws.send(text)

    def close(self) -> None:
        try:
            self.ws.close(timeout=1 * UNIT)
        except Exception:  # noqa: BLE001 - best effort in teardown
            pass
        finally:
            # close() leaves the socket open when the relay closed first.
            self.ws.shutdown()


def close_code(payload: bytes) -> int | None:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None


# -- fault injection: numbered frames, raw websocket clients, process metrics ---------

# Text that must never appear in the relay's output: an exception that reached
# the top of a thread.
UNCAUGHT_MARKERS = ("Traceback", "Exception in thread")

_FRAME_NUMBER = re.compile(rb'"conn":(\d+),"seq":(\d+)')
_FRAME_SENT_AT = re.compile(rb'"t":([0-9.]+)')


def numbered_frame(number: int, connection: int = 0, pad: int = 0, sent_at: float | None = None) -> bytes:
    """Encode a feed-like JSON array frame that carries its connection and sequence number.

    ``sent_at`` (a ``time.monotonic()`` value) lets a receiver in this process
    compute the delivery latency; ``pad`` adds that many bytes of filler.
    """
    event: dict[str, Any] = {"event": "test", "conn": connection, "seq": number}
    if sent_at is not None:
        event["t"] = round(sent_at, 6)
    if pad:
        event["pad"] = "x" * pad
    return json.dumps([event], separators=(",", ":")).encode()


def frame_number(payload: bytes) -> tuple[int, int] | None:
    """Return (connection, sequence number) of a ``numbered_frame``, or None for other frames."""
    match = _FRAME_NUMBER.search(payload[:200])
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def frame_sent_at(payload: bytes) -> float | None:
    """Return the ``sent_at`` time stored in a ``numbered_frame``, or None."""
    match = _FRAME_SENT_AT.search(payload[:200])
    return float(match.group(1)) if match else None


def encode_client_frame(opcode: int, payload: bytes, fin: bool = True, mask: bool = True) -> bytes:
    """Encode one client-to-server frame, masked unless ``mask`` is False."""
    first = (0x80 if fin else 0) | opcode
    length = len(payload)
    mask_bit = 0x80 if mask else 0
    if length < 126:
        header = struct.pack("!BB", first, mask_bit | length)
    elif length < 65536:
        header = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, length)
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + _unmask(payload, key) if payload else header + key


class FrameParser:
    """Incremental parser of the unmasked frames a server sends."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def next_frame(self) -> tuple[int, bytes, bool] | None:
        """Return (opcode, payload, fin) of the next complete frame, or None if incomplete."""
        buffer = self.buffer
        if len(buffer) < 2:
            return None
        length = buffer[1] & 0x7F
        offset = 2
        if length == 126:
            if len(buffer) < 4:
                return None
            length = struct.unpack_from("!H", buffer, 2)[0]
            offset = 4
        elif length == 127:
            if len(buffer) < 10:
                return None
            length = struct.unpack_from("!Q", buffer, 2)[0]
            offset = 10
        if buffer[1] & 0x80:
            raise ValueError("the server sent a masked frame")
        if len(buffer) < offset + length:
            return None
        opcode = buffer[0] & 0x0F
        fin = bool(buffer[0] & 0x80)
        payload = bytes(buffer[offset : offset + length])
        del buffer[: offset + length]
        return opcode, payload, fin


def upgrade_request(key: str, path: str = "/relay", headers: dict[str, str] | None = None) -> bytes:
    """Return a websocket upgrade request; ``headers`` add to or replace the defaults."""
    fields = {
        "Host": "127.0.0.1",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key,
        "Sec-WebSocket-Version": "13",
    }
    fields.update(headers or {})
    lines = [f"GET {path} HTTP/1.1"] + [f"{name}: {value}" for name, value in fields.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class RawWebSocket:
    """A websocket client on a plain socket, for tests that control every byte.

    ``rcvbuf`` sets SO_RCVBUF before connecting, which caps the TCP receive
    window. With ``handshake=False`` the caller sends the request itself.
    """

    def __init__(
        self,
        port: int,
        path: str = "/relay",
        headers: dict[str, str] | None = None,
        rcvbuf: int | None = None,
        timeout: float = 5 * UNIT,
        handshake: bool = True,
    ) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.key = base64.b64encode(os.urandom(16)).decode()
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.parser = FrameParser()
        if handshake:
            self.handshake(path, headers)

    def handshake(self, path: str = "/relay", headers: dict[str, str] | None = None) -> int:
        """Send the upgrade request and read the response head; return the status code."""
        self.sock.sendall(upgrade_request(self.key, path, headers))
        return self.read_response_head()

    def read_response_head(self) -> int:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"connection closed during the handshake after {head!r}")
            head += chunk
        head, rest = head.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        for line in header_lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.parser.feed(rest)
        return self.status

    def expected_accept(self) -> str:
        return base64.b64encode(hashlib.sha1(self.key.encode() + WS_GUID).digest()).decode()

    def send_frame(self, opcode: int, payload: bytes = b"", fin: bool = True, mask: bool = True) -> None:
        self.sock.sendall(encode_client_frame(opcode, payload, fin, mask))

    def recv_frame(self, timeout: float = 5 * UNIT) -> tuple[int, bytes, bool]:
        """Return the next frame as (opcode, payload, fin); raise on timeout or EOF."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.parser.next_frame()
            if frame is not None:
                return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout(f"no complete frame within {timeout:.1f} s")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(262144)
            if not chunk:
                raise ConnectionError("the relay closed the connection")
            self.parser.feed(chunk)

    def recv_data(self, timeout: float = 5 * UNIT) -> tuple[int, bytes]:
        """Return the next text, binary or close frame, answering pings on the way."""
        deadline = time.monotonic() + timeout
        while True:
            opcode, payload, _ = self.recv_frame(max(0.01, deadline - time.monotonic()))
            if opcode == 0x9:
                self.send_frame(0xA, payload)
            elif opcode != 0xA:
                return opcode, payload

    def read_to_end(self, timeout: float = 5 * UNIT) -> tuple[bytes, str]:
        """Read until the peer ends the connection; return (bytes after the parsed frames, how it ended).

        The second value is "fin" for an orderly close, "reset" for an RST and
        "timeout" when neither came within ``timeout``.
        """
        data = bytes(self.parser.buffer)
        self.parser.buffer.clear()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return data, "timeout"
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(262144)
            except ConnectionResetError:
                return data, "reset"
            except socket.timeout:
                return data, "timeout"
            if not chunk:
                return data, "fin"
            data += chunk

    def abort(self) -> None:
        """Close with a zero linger time, which sends RST instead of FIN."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def parse_frames(data: bytes) -> list[tuple[int, bytes, bool]]:
    """Split bytes from a server into (opcode, payload, fin) frames; raise on a partial frame."""
    parser = FrameParser()
    parser.feed(data)
    frames = []
    while True:
        frame = parser.next_frame()
        if frame is None:
            break
        frames.append(frame)
    if parser.buffer:
        raise ValueError(f"{len(parser.buffer)} bytes after the last complete frame: {bytes(parser.buffer[:40])!r}")
    return frames


def process_cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        text = handle.read()
    # Fields after the command name, which is in parentheses and may hold spaces;
    # utime and stime are fields 14 and 15 of the whole line.
    fields = text[text.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def sockets_in_close_wait(remote_port: int) -> int:
    """Count IPv4 TCP sockets on this host in CLOSE_WAIT towards 127.0.0.1:``remote_port``.

    CLOSE_WAIT means the peer closed and the owner has not: a socket the owner
    forgot to close.
    """
    count = 0
    with open("/proc/net/tcp", encoding="ascii") as handle:
        for line in handle.read().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == remote_port and fields[3] == "08":
                count += 1
    return count


def handles_signal(pid: int, signum: int) -> bool:
    """Return True once the process has installed a handler for ``signum`` (SigCgt in /proc)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    except OSError:
        return False
    return False


def percentile(values: list[float], fraction: float) -> float:
    """Return the value below which ``fraction`` of ``values`` fall (nearest rank)."""
    ordered = sorted(values)
    rank = math.ceil(fraction * len(ordered))
    return ordered[min(len(ordered), max(1, rank)) - 1]


class RelayCase(unittest.TestCase):
    """Starts a fake upstream and the relay process for each test.

    ``sections`` adds configuration keys. At cleanup the relay is stopped and
    its output must show no uncaught exception.
    """

    sections: dict[str, dict[str, Any]] = {}
    wait_upstream = True
    # Descriptors the relay inherits, so that its own sockets get higher numbers.
    pass_fds: tuple[int, ...] = ()

    def setUp(self) -> None:
        self.upstream = FakeUpstream()
        self.addCleanup(self.upstream.close)
        self.prepare_upstream()
        self.relay = RelayProcess(self.upstream.url, self.sections, pass_fds=self.pass_fds)
        self.addCleanup(self._stop_relay)
        self.relay.wait_listening()
        if self.wait_upstream:
            self.connection = self.upstream.wait_connection(1, 10 * UNIT)
            self.relay.wait_health(200, 10 * UNIT)

    def prepare_upstream(self) -> None:
        """Configure ``self.upstream`` before the relay starts; subclasses override."""

    def _stop_relay(self) -> None:
        self.relay.stop()
        for marker in UNCAUGHT_MARKERS:
            self.assertNotIn(marker, self.relay.output)

    def connect(self, **options: Any) -> RelayClient:
        """Open a websocket-client connection and read its relay_status greeting."""
        client = RelayClient(self.relay.ws_url, **options)
        self.addCleanup(client.close)
        greeting = client.recv_json()
        self.assertEqual(greeting["type"], "relay_status")
        return client

    def raw(self, **options: Any) -> RawWebSocket:
        """Open a RawWebSocket to the relay, closed at cleanup."""
        client = RawWebSocket(self.relay.port, **options)
        self.addCleanup(client.close)
        return client

    def status(self) -> dict[str, Any]:
        code, body = self.relay.get("/status")
        self.assertEqual(code, 200)
        return body

    def process(self) -> dict[str, Any]:
        return self.status()["process"]

    def client_count(self) -> int:
        return self.relay.get("/api/clients")[1]["count"]

    def line_time(self, pattern: str) -> float:
        """Return when the test process read the first log line matching ``pattern``."""
        regex = re.compile(pattern)
        for stamp, line in zip(list(self.relay.line_times), list(self.relay.lines)):
            if regex.search(line):
                return stamp
        self.fail(f"no log line matches {pattern!r}")

    def count_lines(self, pattern: str) -> int:
        regex = re.compile(pattern)
        return sum(1 for line in list(self.relay.lines) if regex.search(line))

    def baseline_process(self) -> dict[str, Any]:
        """Return /status process details with the fewest threads and descriptors seen over 0.5 UNIT.

        A request thread from the previous HTTP request may still be ending
        when one sample is taken, so a single sample can be one too high.
        """
        samples = []
        for _ in range(5):
            samples.append(self.process())
            time.sleep(0.1 * UNIT)
        baseline = dict(samples[-1])
        baseline["threads"] = min(sample["threads"] for sample in samples)
        baseline["openFds"] = min(sample["openFds"] for sample in samples)
        return baseline

    def wait_process_back(self, baseline: dict[str, Any], timeout: float, thread_slack: int = 0, fd_slack: int = 0) -> dict[str, Any]:
        """Wait until threads and open descriptors are back within slack of ``baseline``."""

        def settled() -> dict[str, Any] | None:
            now = self.process()
            if now["threads"] <= baseline["threads"] + thread_slack and now["openFds"] <= baseline["openFds"] + fd_slack:
                return now
            return None

        try:
            return wait_for(settled, timeout, interval=0.1)
        except AssertionError:
            self.fail(f"process not back to {baseline} within {timeout:.1f} s: now {self.process()}")


class FrameStreamer(threading.Thread):
    """Send ``numbered_frame``s on one fake-upstream connection until stopped or the socket fails.

    ``sent`` counts frames whose ``sendall`` returned; frames still in flight
    when the connection is reset may never reach the relay.
    """

    def __init__(self, connection: UpstreamConnection, number: int, interval: float, pad: int = 0, limit: int | None = None) -> None:
        super().__init__(name=f"streamer-{number}", daemon=True)
        self.connection = connection
        self.number = number
        self.interval = interval
        self.pad = pad
        self.limit = limit
        self.sent = 0
        self.failed = False
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set() and (self.limit is None or self.sent < self.limit):
            try:
                self.connection.send_text(numbered_frame(self.sent, self.number, self.pad))
            except OSError:
                self.failed = True
                return
            self.sent += 1
            if self.interval:
                self._stop_event.wait(self.interval)

    def finish(self, timeout: float = 5 * UNIT) -> int:
        """Stop sending and return the number of frames sent."""
        self._stop_event.set()
        self.join(timeout)
        return self.sent


class Collector(threading.Thread):
    """Record every text, binary and close frame a RawWebSocket receives, answering pings.

    Each entry of ``frames`` is (time.monotonic() on arrival, opcode, payload),
    where payload is ``transform(payload)`` when a transform is given. The
    thread ends at a close frame, at EOF or after ``stop()``.
    """

    def __init__(self, client: RawWebSocket, transform: Callable[[bytes], Any] | None = None) -> None:
        super().__init__(name="collector", daemon=True)
        self.client = client
        self.transform = transform
        self.frames: list[tuple[float, int, Any]] = []
        self.numbers: list[tuple[int, int]] = []
        self.ended = ""
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                opcode, payload = self.client.recv_data(0.2 * UNIT)
            except socket.timeout:
                continue
            except (ConnectionError, OSError, ValueError) as error:
                self.ended = f"{type(error).__name__}: {error}"
                return
            arrived = time.monotonic()
            number = frame_number(payload) if opcode == 0x1 else None
            if number is not None:
                self.numbers.append(number)
            self.frames.append((arrived, opcode, self.transform(payload) if self.transform else payload))
            if opcode == 0x8:
                self.ended = "close frame"
                return

    def stop(self, timeout: float = 5 * UNIT) -> None:
        self._stop_event.set()
        self.join(timeout)

    def messages(self, message_type: str) -> list[dict[str, Any]]:
        """Return the relay messages of one type received so far."""
        found = []
        for _, opcode, payload in list(self.frames):
            if opcode == 0x1 and isinstance(payload, bytes) and payload[:1] == b"{":
                message = json.loads(payload)
                if message.get("type") == message_type:
                    found.append(message)
        return found

    def wait_messages(self, message_type: str, count: int, timeout: float) -> list[dict[str, Any]]:
        wait_for(lambda: len(self.messages(message_type)) >= count, timeout, message=f"{count} {message_type} messages")
        return self.messages(message_type)

    def wait_numbers(self, count: int, timeout: float) -> list[tuple[int, int]]:
        wait_for(lambda: len(self.numbers) >= count, timeout, message=f"{count} numbered frames")
        return list(self.numbers)
