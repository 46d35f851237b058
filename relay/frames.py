"""Websocket frame encoding and the JSON messages the relay itself sends.

Server-to-client frames are never masked (RFC 6455, section 5.1), so one encoded
frame is valid on every client connection. The fan-out encodes each upstream
frame once and hands the same ``bytes`` object to every client.
"""

from __future__ import annotations

import json
import struct
import time
from datetime import datetime, timezone
from typing import Any

OPCODE_CONTINUATION = 0x0
OPCODE_TEXT = 0x1
OPCODE_BINARY = 0x2
OPCODE_CLOSE = 0x8
OPCODE_PING = 0x9
OPCODE_PONG = 0xA

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
# Application-defined code (RFC 6455 reserves 4000-4999 for applications).
CLOSE_SLOW_CONSUMER = 4008


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """Encode one unmasked, unfragmented frame with FIN set and RSV bits clear."""
    length = len(payload)
    first = 0x80 | opcode
    if length < 126:
        header = struct.pack("!BB", first, length)
    elif length < 65536:
        header = struct.pack("!BBH", first, 126, length)
    else:
        header = struct.pack("!BBQ", first, 127, length)
    return header + payload


def encode_close(code: int, reason: str = "") -> bytes:
    """Encode a close frame; the reason is cut to fit the 125-byte control limit."""
    reason_bytes = reason.encode("utf-8")[:123]
    # Cutting may split a UTF-8 sequence; drop the partial character.
    reason_bytes = reason_bytes.decode("utf-8", "ignore").encode("utf-8")
    return encode_frame(OPCODE_CLOSE, struct.pack("!H", code) + reason_bytes)


PING_FRAME = encode_frame(OPCODE_PING, b"")


def utc_timestamp(seconds: float | None = None) -> str:
    """Format a Unix time as ISO 8601 UTC with milliseconds, e.g. 2026-01-01T10:30:00.000Z."""
    moment = datetime.fromtimestamp(time.time() if seconds is None else seconds, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def relay_message(message_type: str, **fields: Any) -> bytes:
    """Encode a relay message as a text frame holding a JSON object.

    Relay messages are objects and upstream frames are arrays, so a client can
    tell them apart by the first character.
    """
    body = {"type": message_type, **fields, "timestamp": utc_timestamp()}
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    return encode_frame(OPCODE_TEXT, text.encode("utf-8"))
