"""Shared test fixtures: a controllable fake upstream, the real relay process, clients.

Everything listens on 127.0.0.1. Every wait is a multiple of ``UNIT`` seconds,
which ``RELAY_TEST_UNIT`` scales for slow machines.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- fake upstream ------------------------------------------------------------------


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
        self.answer_pings = True
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

    def reset(self) -> None:
        """Abort the TCP connection with an RST.

        A close() while serve() blocks in recv() would send nothing, so this
        wakes serve() with shutdown(SHUT_RD), which sends nothing either, and
        serve() then closes the socket with a zero linger time, which sends RST.
        """
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        self.closed.wait(5 * UNIT)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.closed.set()

    def serve(self) -> None:
        try:
            while True:
                opcode, payload = read_client_frame(self.sock)
                if opcode == 0x9:
                    self.pings_received += 1
                    if self.answer_pings and not self.server.frozen:
                        self.send_raw(encode_server_frame(0xA, payload))
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
            self.closed.set()
            try:
                self.sock.close()
            except OSError:
                pass
            self.server._connection_ended(self)


class FakeUpstream:
    """A websocket server on 127.0.0.1 that a test drives frame by frame.

    ``reject_with`` makes handshakes fail with an HTTP status and body, and
    ``frozen`` stops it answering anything (handshakes and pings) while keeping
    TCP open. It records how many connections were open at once.
    """

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}/events"
        self.reject_with: tuple[int, bytes] | None = None
        self.frozen = False
        self.connections: list[UpstreamConnection] = []
        self.handshakes = 0
        self.rejections = 0
        self.open_now = 0
        self.max_open = 0
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
        with self._lock:
            self.open_now += 1
            self.max_open = max(self.max_open, self.open_now)
            self.handshakes += 1
        counted = True
        try:
            if self.frozen:
                self._held.append(sock)
                counted = False  # released in close()
                return
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("closed during handshake")
                request += chunk
            if self.reject_with is not None:
                status, body = self.reject_with
                with self._lock:
                    self.rejections += 1
                sock.sendall(
                    f"HTTP/1.1 {status} Rejected\r\nContent-Type: text/html\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
                )
                sock.close()
                return
            key = re.search(rb"(?i)sec-websocket-key:\s*(\S+)", request).group(1)
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
            sock.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            connection = UpstreamConnection(self, sock, len(self.connections) + 1)
            with self._changed:
                self.connections.append(connection)
                self._changed.notify_all()
            counted = False  # serve() decrements when the connection ends
            connection.serve()
        except (OSError, ConnectionError, AttributeError):
            try:
                sock.close()
            except OSError:
                pass
        finally:
            if counted:
                with self._changed:
                    self.open_now -= 1
                    self._changed.notify_all()

    def _connection_ended(self, connection: UpstreamConnection) -> None:
        with self._changed:
            self.open_now -= 1
            self._changed.notify_all()

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

    def __init__(self, upstream_url: str, sections: dict[str, dict[str, Any]] | None = None, env: dict[str, str] | None = None, config_text: str | None = None) -> None:
        self.port = free_port()
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
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/relay"

    def _read_output(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_listening(self, timeout: float = 10 * UNIT) -> None:
        wait_for(lambda: "listening on" in self.output or self.process.poll() is not None, timeout, message="relay to listen")
        if self.process.poll() is not None:
            raise AssertionError(f"relay exited with {self.process.returncode}:\n{self.output}")

    def wait_log(self, pattern: str, timeout: float, count: int = 1) -> None:
        regex = re.compile(pattern)
        wait_for(lambda: sum(1 for line in list(self.lines) if regex.search(line)) >= count, timeout, message=f"log line {pattern!r} x{count}")

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """GET a JSON endpoint; return (status, decoded body)."""
        request = urllib.request.Request(self.base + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=5 * UNIT) as response:
                return response.status, json.loads(response.read())
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


def close_code(payload: bytes) -> int | None:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
