"""Upstream faults against the real relay process: resets, closes, rejected
handshakes, silence, an unresponsive peer, client-limit-exceeded, bad frames
and SIGTERM at awkward moments.

The fake upstream runs in this process on 127.0.0.1. Numbered frames
(``tests.support.numbered_frame``) show loss, duplication and reordering.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import unittest

import websocket

from tests.support import (
    UNIT,
    Collector,
    FakeUpstream,
    FrameStreamer,
    RelayCase,
    RelayProcess,
    close_code,
    encode_server_frame,
    handles_signal,
    sockets_in_close_wait,
    wait_for,
)

# The relay's upstream dispatcher re-checks its stall and ping timers at least
# this often (relay/upstream.py DISPATCH_TICK).
DISPATCH_TICK = 1.0
# websocket-client 1.9 waits up to 3 s for the peer's close frame when it
# closes a connection (WebSocket.close(timeout=3)).
CLOSE_WAIT = 3.0
REJECTION_LINE = re.compile(
    r"upstream attempt (\d+) failed: handshake rejected with HTTP (\d+); retrying in ([0-9.]+) s"
)


def html_body(size: int) -> bytes:
    """Return an HTML error page of ``size`` bytes, like a CDN's 5xx page."""
    head = b"<!DOCTYPE html><html><head><title>503 Service Unavailable</title></head><body>"
    tail = b"</body></html>"
    return head + b"<p>temporarily unavailable</p>" * ((size - len(head) - len(tail)) // 30 + 1) + tail


def assert_contiguous(test: unittest.TestCase, numbers: list[tuple[int, int]], connection: int) -> list[int]:
    """Assert that the frames numbered for ``connection`` arrived as 0, 1, 2, ...; return them."""
    sequence = [seq for conn, seq in numbers if conn == connection]
    test.assertEqual(sequence, list(range(len(sequence))), f"connection {connection}: lost, duplicated or reordered")
    return sequence


class UpstreamResetTest(RelayCase):
    sections = {"upstream": {"backoff_initial": 0.05 * UNIT, "backoff_max": 0.3 * UNIT}}

    def _outage(self, collector: Collector, drop: int) -> None:
        """Check the relay reports the upstream as down while handshakes are being reset."""
        collector.wait_messages("backpack_disconnected", drop, 5 * UNIT)
        self.relay.wait_health(503, 5 * UNIT)
        upstream_status = self.status()["upstream"]
        self.assertNotEqual(upstream_status["state"], "connected")
        self.assertIs(upstream_status["connected"], False)
        # The relay is reconnecting, and its attempts are reset mid-handshake.
        resets = self.upstream.handshake_resets
        wait_for(lambda: self.upstream.handshake_resets > resets, 5 * UNIT, message="a reset handshake")
        self.assertEqual(self.relay.get("/health")[0], 503)
        self.assertEqual(self.client_count(), 1)

    def test_two_resets_no_duplicates(self) -> None:
        """Two TCP resets mid-stream: counted once each, frames never duplicated or reordered."""
        client = self.raw()
        self.assertEqual(client.status, 101)
        collector = Collector(client)
        collector.start()
        self.addCleanup(collector.stop)
        collector.wait_messages("relay_status", 1, 5 * UNIT)

        # First drop: an established connection is reset while frames flow.
        streamer = FrameStreamer(self.connection, 1, 0.002)
        streamer.start()
        wait_for(lambda: streamer.sent >= 50, 5 * UNIT)
        self.upstream.reset_handshakes = True
        first_drop = time.monotonic()
        self.connection.reset()
        streamer.finish()
        self._outage(collector, 1)

        # The relay reconnects; the second drop comes about one UNIT after the
        # first, while the relay is still in its reconnect backoff sequence.
        self.upstream.reset_handshakes = False
        second = self.upstream.wait_connection(2, 10 * UNIT)
        collector.wait_messages("backpack_connected", 1, 5 * UNIT)
        streamer = FrameStreamer(second, 2, 0.002)
        streamer.start()
        wait_for(lambda: streamer.sent >= 50, 5 * UNIT)
        time.sleep(max(0.0, first_drop + 1 * UNIT - time.monotonic()))
        self.upstream.reset_handshakes = True
        second.reset()
        streamer.finish()
        self._outage(collector, 2)

        self.upstream.reset_handshakes = False
        third = self.upstream.wait_connection(3, 10 * UNIT)
        collector.wait_messages("backpack_connected", 2, 5 * UNIT)
        self.relay.wait_health(200, 5 * UNIT)
        final = FrameStreamer(third, 3, 0, limit=100)
        final.start()
        final.join(5 * UNIT)
        wait_for(lambda: sum(1 for conn, _ in collector.numbers if conn == 3) >= 100, 5 * UNIT)
        numbers = list(collector.numbers)

        self.assertEqual(self.upstream.max_open, 1)
        self.assertEqual([conn for conn, _ in numbers], sorted(conn for conn, _ in numbers))
        first_frames = assert_contiguous(self, numbers, 1)
        second_frames = assert_contiguous(self, numbers, 2)
        self.assertEqual(assert_contiguous(self, numbers, 3), list(range(100)))
        self.assertGreaterEqual(len(first_frames), 50)
        self.assertGreaterEqual(len(second_frames), 50)
        kinds = [
            json.loads(payload)["type"]
            for _, opcode, payload in collector.frames
            if opcode == 0x1 and payload[:1] == b"{"
        ]
        transitions = [kind for kind in kinds if kind in ("backpack_disconnected", "backpack_connected")]
        self.assertEqual(transitions, ["backpack_disconnected", "backpack_connected"] * 2)
        self.assertGreaterEqual(kinds.count("backpack_error"), 2)
        upstream_status = self.status()["upstream"]
        self.assertEqual(upstream_status["disconnects"], 2)
        self.assertEqual(sum(upstream_status["disconnectsByCause"].values()), 2)
        self.assertGreaterEqual(upstream_status["reconnects"], 2 + self.upstream.handshake_resets)
        self.assertEqual(self.client_count(), 1)
        self.assertEqual(collector.ended, "")


class CleanCloseTest(RelayCase):
    sections = {"upstream": {"backoff_initial": 0.5 * UNIT, "backoff_max": 0.5 * UNIT}}

    def _close_and_reconnect(self, code: int, reason: str) -> None:
        client = self.connect()
        closed_at = time.monotonic()
        self.connection.send_close(code, reason)
        message = client.recv_message("backpack_disconnected", 5 * UNIT)
        self.assertEqual(message["code"], code)
        self.assertEqual(message["reason"], reason)
        self.upstream.wait_connection(2, 10 * UNIT)
        waited = self.upstream.handshake_times[1] - closed_at
        # reconnectIn is rounded to milliseconds.
        self.assertGreaterEqual(waited, message["reconnectIn"] - 0.001)
        client.recv_message("backpack_connected", 5 * UNIT)
        self.relay.wait_health(200, 5 * UNIT)
        upstream_status = self.status()["upstream"]
        self.assertEqual(upstream_status["lastCloseCode"], code)
        self.assertEqual(upstream_status["lastCloseReason"], reason)
        self.assertEqual(upstream_status["disconnects"], 1)
        self.assertEqual(upstream_status["disconnectsByCause"], {"closed_by_server": 1})
        self.assertEqual(self.upstream.max_open, 1)
        self.assertEqual(self.upstream.handshakes, 2)
        # The relay closed its end of the first connection, not left it to the garbage collector.
        self.assertEqual(sockets_in_close_wait(self.upstream.port), 0)

    def test_close_1000_reconnects(self) -> None:
        """A close frame 1000 is reported, then the relay reconnects after its backoff delay."""
        self._close_and_reconnect(1000, "")

    def test_close_1001_reason_reconnects(self) -> None:
        """A close frame 1001 with a reason is reported with the reason, then reconnects."""
        self._close_and_reconnect(1001, "proxy restart")


class RejectedHandshakeTest(RelayCase):
    sections = {
        "upstream": {"backoff_initial": 0.05 * UNIT, "backoff_multiplier": 2, "backoff_max": 0.8 * UNIT}
    }
    wait_upstream = False
    REJECTIONS = [503] * 5 + [526] * 3

    def prepare_upstream(self) -> None:
        body = html_body(30 * 1024)
        self.assertGreaterEqual(len(body), 30 * 1024)
        self.upstream.reject_next = [(status, body) for status in self.REJECTIONS]

    def test_rejections_back_off_then_connect(self) -> None:
        """HTTP 503/526 with a 30 KB page: one log line each, growing jittered delays, then connected."""
        samples: list[tuple[int, float]] = []
        polling = threading.Event()

        def poll_health() -> None:
            while not polling.is_set():
                started = time.monotonic()
                try:
                    code = self.relay.get("/health")[0]
                except OSError:
                    code = 0
                samples.append((code, time.monotonic() - started))
                polling.wait(0.1 * UNIT)

        poller = threading.Thread(target=poll_health, daemon=True)
        poller.start()
        try:
            connection = self.upstream.wait_connection(1, 10 * UNIT + 4 * 0.8 * UNIT)
            self.relay.wait_health(200, 5 * UNIT)
        finally:
            polling.set()
            poller.join(5 * UNIT)
        del connection

        self.relay.wait_log(REJECTION_LINE.pattern, 5 * UNIT, count=len(self.REJECTIONS))
        attempts = []
        for line in self.relay.lines:
            match = REJECTION_LINE.search(line)
            if match:
                attempts.append((int(match.group(1)), int(match.group(2)), float(match.group(3))))
        self.assertEqual(self.upstream.rejections, len(self.REJECTIONS))
        self.assertEqual([number for number, _, _ in attempts], list(range(1, len(self.REJECTIONS) + 1)))
        self.assertEqual([status for _, status, _ in attempts], self.REJECTIONS)
        delays = [delay for _, _, delay in attempts]
        caps = [min(0.8 * UNIT, 0.05 * UNIT * 2**index) for index in range(len(delays))]
        for index, (delay, cap) in enumerate(zip(delays, caps)):
            # The log shows the delay rounded to 10 ms.
            self.assertLessEqual(delay, cap + 0.005, f"attempt {index + 1}")
            waited = self.upstream.handshake_times[index + 1] - self.upstream.handshake_times[index]
            self.assertGreaterEqual(waited, delay - 0.005, f"attempt {index + 1}")
        self.assertGreater(max(delays), caps[0] + 0.005, "delay caps did not grow")
        self.assertTrue(any(delay < 0.9 * cap for delay, cap in zip(delays, caps)), "no jitter")

        self.assertGreater(len(samples), 5)
        self.assertEqual({code for code, _ in samples} - {200, 503}, set())
        self.assertIn(503, {code for code, _ in samples})
        self.assertLess(max(seconds for _, seconds in samples), 2 * UNIT)
        upstream_status = self.status()["upstream"]
        self.assertEqual(upstream_status["state"], "connected")
        self.assertEqual(upstream_status["connects"], 1)
        self.assertEqual(upstream_status["disconnects"], 0)


class SlowHandshakeTest(RelayCase):
    CONNECT_TIMEOUT = 1 * UNIT
    sections = {"upstream": {"connect_timeout": CONNECT_TIMEOUT}}
    wait_upstream = False

    def prepare_upstream(self) -> None:
        # Each byte arrives well within connect_timeout, the whole response far outside it.
        self.upstream.trickle_handshake = 0.2 * UNIT

    def test_trickled_handshake_cut(self) -> None:
        """A 101 response sent a byte at a time is cut after connect_timeout, then the relay connects."""
        started = time.monotonic()
        self.relay.wait_log("handshake not complete within connect_timeout", self.CONNECT_TIMEOUT + 10 * UNIT)
        cut_after = self.line_time("handshake not complete within connect_timeout") - started
        self.assertLess(cut_after, self.CONNECT_TIMEOUT + 4 * UNIT)
        self.assertIn(self.status()["upstream"]["state"], ("backing_off", "connecting"))
        self.upstream.trickle_handshake = None
        self.upstream.wait_connection(1, 10 * UNIT)
        self.relay.wait_health(200, 5 * UNIT)
        self.assertEqual(self.upstream.max_open, 1)


class StallTest(RelayCase):
    sections = {"upstream": {"stall_timeout": 1 * UNIT, "ping_interval": 0.4 * UNIT, "ping_timeout": 0.2 * UNIT}}

    def test_silent_upstream_reconnects(self) -> None:
        """Frames every 0.3 UNIT keep the connection; silence past stall_timeout replaces it."""
        for number in range(5):
            self.connection.send_text(f'[{{"n":{number}}}]')
            time.sleep(0.3 * UNIT)
        self.assertEqual(self.count_lines("stalled"), 0)

        last_frame = time.monotonic()
        self.connection.send_text(b'["last"]')
        self.relay.wait_log("upstream stalled", 1 * UNIT + DISPATCH_TICK + 3 * UNIT)
        logged_at = self.line_time("upstream stalled")
        self.assertGreaterEqual(logged_at - last_frame, 1 * UNIT)
        self.assertGreater(self.connection.pings_received, 0)
        self.assertTrue(self.connection.closed.wait(CLOSE_WAIT + 2 * UNIT))
        self.assertEqual([code for code, _ in self.connection.close_frames], [1000])
        self.upstream.wait_connection(2, 10 * UNIT)
        self.relay.wait_health(200, 5 * UNIT)
        upstream_status = self.status()["upstream"]
        self.assertEqual(upstream_status["disconnectsByCause"], {"stall": 1})
        self.assertEqual(self.count_lines("upstream stalled"), 1)
        self.assertEqual(self.upstream.max_open, 1)


class UnresponsiveUpstreamTest(RelayCase):
    PING_INTERVAL = 0.5 * UNIT
    PING_TIMEOUT = 0.25 * UNIT
    sections = {
        "upstream": {"ping_interval": PING_INTERVAL, "ping_timeout": PING_TIMEOUT, "stall_timeout": 0}
    }

    def test_ping_timeout_one_reconnect(self) -> None:
        """An upstream that stops reading is detected by pings; one reconnect, threads flat."""
        wait_for(lambda: self.connection.pings_received >= 2, 5 * UNIT, message="pings to the upstream")
        baseline = self.baseline_process()

        stopped = time.monotonic()
        self.connection.stop_reading()
        self.relay.wait_log("no pong within ping_timeout", self.PING_INTERVAL + self.PING_TIMEOUT + 5 * UNIT)
        detected_at = self.line_time("no pong within ping_timeout")
        self.assertLessEqual(detected_at - stopped, self.PING_INTERVAL + self.PING_TIMEOUT + 2 * UNIT)
        # The relay does not wait for a close frame from a peer that stopped responding.
        self.relay.wait_log("upstream disconnected: .*cause ping_timeout", 5 * UNIT)
        self.assertLess(self.line_time("upstream disconnected") - detected_at, min(CLOSE_WAIT, 1.5 * UNIT))
        self.upstream.wait_connection(2, 10 * UNIT)
        self.relay.wait_health(200, 5 * UNIT)

        self.assertIsNotNone(self.connection.closed_at)
        self.assertLessEqual(self.connection.closed_at, self.upstream.handshake_times[1])
        self.assertEqual(self.upstream.max_open, 1)
        upstream_status = self.status()["upstream"]
        self.assertEqual(upstream_status["reconnects"], 1)
        self.assertEqual(upstream_status["disconnects"], 1)
        self.assertEqual(upstream_status["disconnectsByCause"], {"ping_timeout": 1})
        after = self.wait_process_back(baseline, 5 * UNIT)
        self.assertLessEqual(after["threads"], baseline["threads"])


class ClientLimitTest(RelayCase):
    BACKOFF_MAX = 1.5 * UNIT
    sections = {"upstream": {"backoff_initial": 0.05 * UNIT, "backoff_max": BACKOFF_MAX}}
    MESSAGE = "You have reached the maximum number of connections"

    def test_client_limit_frame_relayed_logged(self) -> None:
        """client-limit-exceeded inside a normal frame: relayed, logged, shown, next try waits backoff_max."""
        client = self.connect()
        decoy = b'[{"event":"listing-update","payload":{"details":"client-limit-exceeded"}}]'
        self.connection.send_text(decoy)
        self.assertEqual(client.recv(), (websocket.ABNF.OPCODE_TEXT, decoy))
        self.assertEqual(self.status()["upstream"]["clientLimitExceeded"], 0)

        frame = json.dumps(
            [
                {"event": "listing-update", "payload": {"id": "440_1"}},
                {"event": "client-limit-exceeded", "payload": {"message": self.MESSAGE}},
            ]
        ).encode()
        self.connection.send_text(frame)
        self.assertEqual(client.recv(), (websocket.ABNF.OPCODE_TEXT, frame))
        self.relay.wait_log(r"\[ERROR\].*client-limit-exceeded", 5 * UNIT)
        error_lines = [line for line in self.relay.lines if "[ERROR]" in line]
        self.assertEqual(len(error_lines), 1)
        self.assertIn(self.MESSAGE, error_lines[0])
        self.assertIn("another websocket connection from this IP address", error_lines[0])
        self.assertIn("Check for a second relay", error_lines[0])
        upstream_status = self.status()["upstream"]
        self.assertEqual(upstream_status["clientLimitExceeded"], 1)
        self.assertEqual(upstream_status["clientLimitMessage"], self.MESSAGE)

        closed_at = time.monotonic()
        self.connection.send_close(1000)
        message = client.recv_message("backpack_disconnected", 5 * UNIT)
        self.assertGreaterEqual(message["reconnectIn"], self.BACKOFF_MAX)
        self.upstream.wait_connection(2, self.BACKOFF_MAX + 10 * UNIT)
        self.assertGreaterEqual(self.upstream.handshake_times[1] - closed_at, self.BACKOFF_MAX)


class UpstreamFrameTest(RelayCase):
    sections = {"upstream": {"max_frame_bytes": 65536}}
    INVALID_UTF8 = [
        b'["\xff"]',  # never valid in UTF-8
        b'["\xc0\xaf"]',  # overlong encoding of "/"
        b'["\xed\xa0\x80"]',  # UTF-16 surrogate U+D800
        b'["\xe2\x82"]',  # truncated three-byte sequence
        b'["\x80"]',  # lone continuation byte
        b'["\xf4\x90\x80\x80"]',  # above U+10FFFF
    ]

    def test_invalid_utf8_never_forwarded(self) -> None:
        """Six kinds of invalid UTF-8, one fragmented: all dropped and counted, valid ones in order."""
        client = self.connect()
        expected = []
        for index, bad in enumerate(self.INVALID_UTF8):
            self.connection.send_text(bad)
            valid = f'["valid {index} \u00e9\u20ac\U0001f600"]'.encode()
            self.connection.send_text(valid)
            expected.append(valid)
        self.connection.send_fragments(0x1, [b'["split ', b"\xe2\x82", b'"]'])
        valid = '["split \u20ac"]'.encode()
        # A valid character split across two fragments is valid.
        self.connection.send_fragments(0x1, [valid[:8], valid[8:10], valid[10:]])
        expected.append(valid)
        received = [client.recv() for _ in expected]
        self.assertEqual(received, [(websocket.ABNF.OPCODE_TEXT, frame) for frame in expected])
        status = self.status()
        self.assertEqual(status["traffic"]["upstreamFramesDropped"], {"invalid_utf8": len(self.INVALID_UTF8) + 1})
        self.assertEqual(status["traffic"]["framesRelayed"], len(expected))
        self.assertEqual(status["traffic"]["framesIn"], len(expected) + len(self.INVALID_UTF8) + 1)
        # The log shows the first three drops of a kind, then every 100th.
        self.relay.wait_log("invalid_utf8", 5 * UNIT, count=3)
        self.assertEqual(self.count_lines("invalid_utf8"), 3)

    def test_binary_and_non_json_unchanged(self) -> None:
        """Binary, non-JSON and non-array text frames arrive unchanged, in order, and are counted."""
        client = self.connect()
        binary = [b"", b"\x00\xff\x00", os.urandom(60_000)]
        text = [b"", b"not json at all", b'{"an":"object"}', b"[unterminated"]
        sequence = [(0x2, binary[0]), (0x1, text[0]), (0x2, binary[1]), (0x1, text[1]),
                    (0x1, text[2]), (0x2, binary[2]), (0x1, text[3])]
        for opcode, payload in sequence:
            if opcode == 0x2:
                self.connection.send_binary(payload)
            else:
                self.connection.send_text(payload)
        received = [client.recv() for _ in sequence]
        self.assertEqual(received, sequence)
        traffic = self.status()["traffic"]
        self.assertEqual(traffic["binaryFrames"], len(binary))
        # "[unterminated" starts like an array; the relay checks only the first byte.
        self.assertEqual(traffic["notJsonArrayFrames"], 3)
        self.assertEqual(traffic["upstreamFramesDropped"], {})

    def test_oversize_frame_dropped(self) -> None:
        """A frame over max_frame_bytes is dropped and counted; one at the limit is relayed."""
        client = self.connect()
        at_limit = b"[" + b"1," * 32767 + b"1"
        at_limit = at_limit[: 65536 - 1] + b"]"
        self.assertEqual(len(at_limit), 65536)
        over = b"[" + b"0," * 32768 + b"0]"
        self.connection.send_text(over)
        self.connection.send_text(at_limit)
        self.assertEqual(client.recv(10 * UNIT), (websocket.ABNF.OPCODE_TEXT, at_limit))
        traffic = self.status()["traffic"]
        self.assertEqual(traffic["upstreamFramesDropped"], {"too_large": 1})
        self.assertEqual(traffic["framesRelayed"], 1)

    def test_fragmented_oversize_dropped(self) -> None:
        """A fragmented message over max_frame_bytes is dropped; one at the limit is relayed whole."""
        client = self.connect()
        over = [b"[" + b"0" * 29_999, b"1" * 30_000, b"2" * 29_999 + b"]"]
        at_limit = [b"[" + b"3" * 32_767, b"4" * 32_767 + b"]"]
        self.assertEqual(sum(map(len, at_limit)), 65536)
        self.connection.send_fragments(0x1, over)
        self.connection.send_fragments(0x1, at_limit)
        self.assertEqual(client.recv(10 * UNIT), (websocket.ABNF.OPCODE_TEXT, b"".join(at_limit)))
        traffic = self.status()["traffic"]
        self.assertEqual(traffic["upstreamFramesDropped"], {"too_large": 1})
        self.assertEqual(traffic["framesRelayed"], 1)
        self.assertEqual(self.status()["upstream"]["disconnects"], 0)
        self.relay.wait_log(r"message of 90000 bytes exceeds max_frame_bytes 65536", 5 * UNIT)

    def test_text_frame_inside_fragments_reconnects(self) -> None:
        """A new text frame before the last fragment is a protocol error: nothing relayed, one reconnect."""
        client = self.connect()
        self.connection.send_raw(encode_server_frame(0x1, b'["half', fin=False) + encode_server_frame(0x1, b'"]'))
        self.upstream.wait_connection(2, 10 * UNIT)
        self.assertTrue(self.connection.closed.wait(5 * UNIT))
        self.assertEqual([code for code, _ in self.connection.close_frames], [1002])
        message = client.recv_message("backpack_disconnected", 5 * UNIT)
        self.assertEqual(message["type"], "backpack_disconnected")
        self.assertEqual(self.status()["traffic"]["framesRelayed"], 0)
        self.assertEqual(self.upstream.max_open, 1)

    def test_oversize_ping_reconnects(self) -> None:
        """A ping over max_frame_bytes is a protocol error: one reconnect, and the next message is not dropped."""
        client = self.connect()
        size = 70_000
        self.connection.send_raw(b"\x89\x7f" + size.to_bytes(8, "big") + b"p" * size)
        second = self.upstream.wait_connection(2, 10 * UNIT)
        self.assertEqual(client.recv_message("backpack_disconnected", 5 * UNIT)["type"], "backpack_disconnected")
        client.recv_message("backpack_connected", 5 * UNIT)
        second.send_text(b'["after the bad ping"]')
        self.assertEqual(client.recv(5 * UNIT), (websocket.ABNF.OPCODE_TEXT, b'["after the bad ping"]'))
        self.assertEqual(self.status()["traffic"]["framesRelayed"], 1)
        self.assertEqual(self.upstream.max_open, 1)

    def test_upstream_ping_gets_pong(self) -> None:
        """A ping from the upstream gets a pong carrying its payload."""
        self.connection.send_ping(b"are you there")
        wait_for(lambda: self.connection.pongs, 5 * UNIT, message="a pong")
        self.assertEqual(self.connection.pongs, [b"are you there"])


class SigtermTest(RelayCase):
    SHUTDOWN_TIMEOUT = 2 * UNIT
    sections = {
        "server": {"shutdown_timeout": SHUTDOWN_TIMEOUT},
        "upstream": {"backoff_initial": 0.05 * UNIT, "backoff_max": 30 * UNIT},
    }

    def _terminate(self) -> float:
        """Send SIGTERM, check exit status 0, and return the seconds it took."""
        started = time.monotonic()
        self.relay.signal(signal.SIGTERM)
        self.assertEqual(self.relay.process.wait(self.SHUTDOWN_TIMEOUT + 5 * UNIT), 0)
        return time.monotonic() - started

    def test_sigterm_steady_state(self) -> None:
        """SIGTERM while connected: clients get 1001, the upstream 1000, exit 0, no new handshake."""
        clients = [self.connect() for _ in range(2)]
        handshakes = self.upstream.handshakes
        elapsed = self._terminate()
        self.assertLessEqual(elapsed, self.SHUTDOWN_TIMEOUT + 1 * UNIT)
        for client in clients:
            opcode, payload = client.recv(5 * UNIT)
            self.assertEqual(opcode, websocket.ABNF.OPCODE_CLOSE)
            self.assertEqual(close_code(payload), 1001)
        self.assertTrue(self.connection.closed.wait(5 * UNIT))
        self.assertEqual([code for code, _ in self.connection.close_frames], [1000])
        self.assertEqual(self.upstream.handshakes, handshakes)

    def test_sigterm_inside_frame(self) -> None:
        """SIGTERM while the upstream has sent only part of a frame: exit 0 in time, close 1000 sent."""
        stalled = self.raw(rcvbuf=4096)
        self.assertEqual(stalled.status, 101)
        size = 1_000_000
        self.connection.send_raw(b"\x81\x7f" + size.to_bytes(8, "big") + b"[" + b"x" * 1023)
        time.sleep(0.2 * UNIT)
        elapsed = self._terminate()
        self.assertLessEqual(elapsed, self.SHUTDOWN_TIMEOUT + 1 * UNIT)
        self.assertTrue(self.connection.closed.wait(5 * UNIT))
        self.assertEqual([code for code, _ in self.connection.close_frames], [1000])

    def test_sigterm_upstream_not_reading(self) -> None:
        """SIGTERM while the upstream reads nothing and the relay's pongs fill the socket: exit 0 in time."""
        self.connection.reading = False
        self.connection.answer_pings = False
        ping = encode_server_frame(0x9, b"p" * 125)
        self.connection.sock.settimeout(1 * UNIT)
        try:
            for _ in range(400):
                self.connection.sock.sendall(ping * 250)
        except OSError:
            pass  # the buffers are full: the relay's pongs no longer fit
        self.connection.sock.settimeout(None)
        self.connection.send_raw(b"\x81\x7e" + (1000).to_bytes(2, "big") + b"[" + b"a" * 9)
        time.sleep(0.2 * UNIT)
        elapsed = self._terminate()
        self.assertLessEqual(elapsed, self.SHUTDOWN_TIMEOUT + 1 * UNIT)

    def test_sigterm_during_backoff(self) -> None:
        """SIGTERM while waiting to reconnect: exit 0 at once, no further handshake."""
        # client-limit-exceeded makes the next delay exactly backoff_max (30 UNIT),
        # so the relay is certainly still waiting when the signal arrives.
        self.connection.send_text(b'[{"event":"client-limit-exceeded","payload":{"message":"limit"}}]')
        self.relay.wait_log("client-limit-exceeded", 5 * UNIT)
        self.connection.send_close(1000)
        wait_for(lambda: self.status()["upstream"]["state"] == "backing_off", 5 * UNIT)
        self.assertGreater(self.status()["upstream"]["nextRetryIn"], 10 * UNIT)
        handshakes = self.upstream.handshakes
        elapsed = self._terminate()
        self.assertLessEqual(elapsed, self.SHUTDOWN_TIMEOUT + 1 * UNIT)
        self.assertEqual(self.upstream.handshakes, handshakes)
        self.assertEqual(len(self.upstream.connections), 1)


class EarlySigtermTest(unittest.TestCase):
    def test_sigterm_right_after_start(self) -> None:
        """SIGTERM as soon as the handler is installed (well before listening): exit 0, no handshake."""
        upstream = FakeUpstream()
        self.addCleanup(upstream.close)
        relay = RelayProcess(upstream.url, {"server": {"shutdown_timeout": 2 * UNIT}})
        self.addCleanup(relay.stop)
        wait_for(lambda: handles_signal(relay.process.pid, signal.SIGTERM) or relay.process.poll() is not None, 5 * UNIT, interval=0.001)
        relay.signal(signal.SIGTERM)
        handshakes = upstream.handshakes
        self.assertEqual(relay.process.wait(2 * UNIT + 5 * UNIT), 0, relay.output)
        time.sleep(0.2 * UNIT)
        self.assertEqual(handshakes, 0)
        self.assertEqual(upstream.handshakes, 0, "the relay connected to the upstream after SIGTERM")
        self.assertNotIn("Traceback", relay.output)


if __name__ == "__main__":
    unittest.main()
