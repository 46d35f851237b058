"""End-to-end: the real relay process between a fake upstream and real clients."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import unittest

import websocket

from tests.support import (
    UNIT,
    FakeUpstream,
    RelayClient,
    RelayProcess,
    close_code,
    load_sample_frames,
    wait_for,
)

ISO_TIMESTAMP = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"


class RelayTestCase(unittest.TestCase):
    """Starts a fake upstream and the relay process for each test."""

    sections: dict = {}

    def setUp(self) -> None:
        self.upstream = FakeUpstream()
        self.addCleanup(self.upstream.close)
        self.relay = RelayProcess(self.upstream.url, self.sections)
        self.addCleanup(self._stop_relay)
        self.relay.wait_listening()
        self.connection = self.upstream.wait_connection(1, 10 * UNIT)
        self.relay.wait_health(200, 10 * UNIT)

    def _stop_relay(self) -> None:
        self.relay.stop()
        self.assertNotIn("Traceback", self.relay.output)

    def connect(self, **options) -> RelayClient:
        client = RelayClient(self.relay.ws_url, **options)
        self.addCleanup(client.close)
        status = client.recv_json()
        self.assertEqual(status["type"], "relay_status")
        return client


class FanOutTest(RelayTestCase):
    def test_frames_reach_every_client_unchanged(self) -> None:
        """60 sample frames, one of ~1 MB, reach three clients byte-identical, in order."""
        frames = load_sample_frames()
        self.assertGreater(max(len(frame) for frame in frames), 1_000_000)
        clients = [self.connect() for _ in range(3)]
        for frame in frames:
            self.connection.send_text(frame)
        for index, client in enumerate(clients):
            received = [client.recv(10 * UNIT) for _ in frames]
            self.assertTrue(all(opcode == websocket.ABNF.OPCODE_TEXT for opcode, _ in received))
            payloads = [payload for _, payload in received]
            self.assertEqual(len(payloads), len(frames))
            for position, (sent, got) in enumerate(zip(frames, payloads)):
                self.assertEqual(got, sent, f"client {index} frame {position} differs")

    def test_relay_status_is_first_message(self) -> None:
        client = RelayClient(self.relay.ws_url)
        self.addCleanup(client.close)
        opcode, data = client.recv()
        self.assertEqual(opcode, websocket.ABNF.OPCODE_TEXT)
        message = json.loads(data)
        self.assertEqual(message["type"], "relay_status")
        for key in ("clientId", "backpackConnected", "connectedClients", "uptime", "messagesRelayed", "timestamp"):
            self.assertIn(key, message)
        self.assertIs(message["backpackConnected"], True)
        self.assertEqual(message["connectedClients"], 1)
        self.assertRegex(message["timestamp"], ISO_TIMESTAMP)

    def test_binary_and_non_json_frames_forwarded(self) -> None:
        client = self.connect()
        self.connection.send_binary(b"\x00\x01binary\xff")
        self.connection.send_text(b"not json at all")
        self.assertEqual(client.recv(), (websocket.ABNF.OPCODE_BINARY, b"\x00\x01binary\xff"))
        self.assertEqual(client.recv(), (websocket.ABNF.OPCODE_TEXT, b"not json at all"))
        status = self.relay.get("/status")[1]
        self.assertEqual(status["traffic"]["binaryFrames"], 1)
        self.assertEqual(status["traffic"]["notJsonArrayFrames"], 1)

    def test_invalid_utf8_frame_dropped(self) -> None:
        client = self.connect()
        self.connection.send_text(b'["\xff\xfe invalid"]')
        self.connection.send_text(b'["valid"]')
        self.assertEqual(client.recv(), (websocket.ABNF.OPCODE_TEXT, b'["valid"]'))
        status = self.relay.get("/status")[1]
        self.assertEqual(status["traffic"]["upstreamFramesDropped"].get("invalid_utf8"), 1)

    def test_counters_after_traffic(self) -> None:
        clients = [self.connect() for _ in range(2)]
        for number in range(5):
            self.connection.send_text(f'[{{"n":{number}}}]')
        for client in clients:
            for _ in range(5):
                client.recv()
        wait_for(lambda: self.relay.get("/status")[1]["traffic"]["framesDelivered"] >= 10, 5 * UNIT)
        health = self.relay.get("/health")[1]
        self.assertEqual(health["messagesRelayed"], 5)
        self.assertEqual(health["connectedClients"], 2)
        listing = self.relay.get("/api/clients")[1]
        self.assertEqual(listing["count"], 2)
        for row in listing["clients"]:
            self.assertEqual(row["framesSent"], 5)
            self.assertEqual(row["queuedFrames"], 0)
            self.assertEqual(set(row), {"id", "address", "connectedAt", "userAgent", "framesSent", "bytesSent", "queuedFrames", "queuedBytes"})


class ClientMessagesTest(RelayTestCase):
    def test_ping_gets_pong(self) -> None:
        client = self.connect()
        client.send('{"type": "ping"}')
        message = client.recv_json()
        self.assertEqual(message["type"], "pong")
        self.assertRegex(message["timestamp"], ISO_TIMESTAMP)

    def test_invalid_json_keeps_connection(self) -> None:
        client = self.connect()
        client.send("{not json")
        error = client.recv_json()
        self.assertEqual(error["type"], "error")
        self.assertIn("invalid JSON", error["error"])
        client.send('{"type": "subscribe"}')
        error = client.recv_json()
        self.assertEqual(error["type"], "error")
        self.assertIn("unknown message type", error["error"])
        client.send('{"type": "ping"}')
        self.assertEqual(client.recv_json()["type"], "pong")

    def test_binary_message_closed_1003(self) -> None:
        client = self.connect()
        client.ws.send_binary(b"\x01\x02")
        opcode, payload = client.recv()
        self.assertEqual(opcode, websocket.ABNF.OPCODE_CLOSE)
        self.assertEqual(close_code(payload), 1003)

    def test_oversize_message_closed_1009(self) -> None:
        client = self.connect()
        client.send("[" + "1," * 40_000 + "1]")
        # recv_frame, unlike recv, does not echo the close frame. The relay may
        # already have closed the socket, so an echo could fail with EPIPE.
        client.ws.settimeout(5 * UNIT)
        frame = client.ws.recv_frame()
        while frame.opcode in (websocket.ABNF.OPCODE_PING, websocket.ABNF.OPCODE_PONG):
            frame = client.ws.recv_frame()
        self.assertEqual(frame.opcode, websocket.ABNF.OPCODE_CLOSE)
        self.assertEqual(close_code(frame.data), 1009)


class ReconnectTest(RelayTestCase):
    def test_upstream_drop_and_reconnect(self) -> None:
        """Clients see disconnected then connected; never two upstream sockets."""
        client = self.connect()
        self.connection.send_text(b'["before"]')
        self.assertEqual(client.recv()[1], b'["before"]')
        self.upstream.reject_with = (503, b"<html>down</html>")
        self.connection.reset()
        disconnected = client.recv_message("backpack_disconnected", 5 * UNIT)
        self.assertIn("code", disconnected)
        self.assertIn("reason", disconnected)
        self.assertGreaterEqual(disconnected["reconnectIn"], 0)
        self.relay.wait_health(503, 5 * UNIT)
        error = client.recv_message("backpack_error", 5 * UNIT)
        self.assertIn("503", error["error"])
        self.upstream.reject_with = None
        client.recv_message("backpack_connected", 10 * UNIT)
        self.relay.wait_health(200, 5 * UNIT)
        second = self.upstream.wait_connection(2, 5 * UNIT)
        second.send_text(b'["after"]')
        self.assertEqual(client.recv()[1], b'["after"]')
        self.assertEqual(self.upstream.max_open, 1)
        status = self.relay.get("/status")[1]["upstream"]
        self.assertEqual(status["disconnects"], 1)
        self.assertGreaterEqual(status["reconnects"], 1)

    def test_clean_close_frame_reconnects(self) -> None:
        client = self.connect()
        self.connection.send_close(1001, "proxy restart")
        message = client.recv_message("backpack_disconnected", 5 * UNIT)
        self.assertEqual(message["code"], 1001)
        self.assertEqual(message["reason"], "proxy restart")
        client.recv_message("backpack_connected", 10 * UNIT)
        self.assertEqual(self.upstream.max_open, 1)


class ShutdownTest(RelayTestCase):
    def test_sigterm_closes_clients_1001(self) -> None:
        clients = [self.connect() for _ in range(3)]
        started = time.monotonic()
        self.relay.signal()
        for client in clients:
            opcode, payload = client.recv(5 * UNIT)
            self.assertEqual(opcode, websocket.ABNF.OPCODE_CLOSE)
            self.assertEqual(close_code(payload), 1001)
            client.close()
        self.assertEqual(self.relay.process.wait(10 * UNIT), 0)
        self.assertLess(time.monotonic() - started, 5 + 2 * UNIT)
        wait_for(lambda: self.connection.closed.is_set(), 5 * UNIT)
        self.assertEqual([code for code, _ in self.connection.close_frames], [1000])
        self.assertNotIn("Traceback", self.relay.output)


class HttpEndpointTest(RelayTestCase):
    def test_index_lists_endpoints(self) -> None:
        status, body = self.relay.get("/")
        self.assertEqual(status, 200)
        self.assertEqual(body["service"], "bptf-relay")
        self.assertIn("version", body)
        for path in ("/health", "/status", "/api/clients", "/relay"):
            self.assertIn(path, body["endpoints"])

    def test_health_body(self) -> None:
        status, body = self.relay.get("/health")
        self.assertEqual(status, 200)
        self.assertEqual(set(body), {"healthy", "backpackConnected", "connectedClients", "uptime", "messagesRelayed"})
        self.assertIs(body["healthy"], True)

    def test_status_sections(self) -> None:
        status, body = self.relay.get("/status")
        self.assertEqual(status, 200)
        upstream = body["upstream"]
        for key in ("url", "state", "connectedSince", "lastFrameAt", "reconnects", "lastCloseCode", "lastCloseReason", "lastError", "nextRetryIn"):
            self.assertIn(key, upstream)
        self.assertEqual(upstream["state"], "connected")
        for key in ("connected", "totalAccepted", "closedSlow", "droppedNoPong"):
            self.assertIn(key, body["clients"])
        for key in ("framesIn", "bytesIn", "framesDelivered", "bytesDelivered", "framesDropped"):
            self.assertIn(key, body["traffic"])
        for key in ("pid", "uptime", "threads", "rssBytes"):
            self.assertIn(key, body["process"])
        self.assertEqual(body["process"]["pid"], self.relay.process.pid)

    def test_unknown_path_404_json(self) -> None:
        status, body = self.relay.get("/nope")
        self.assertEqual(status, 404)
        self.assertIn("/nope", body["error"])

    def test_wrong_method_405_json(self) -> None:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.relay.base + "/health", method="POST", data=b"")
        with self.assertRaises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=5 * UNIT)
        self.assertEqual(raised.exception.code, 405)
        self.assertEqual(raised.exception.headers["Content-Type"], "application/json")
        self.assertIn("POST", json.loads(raised.exception.read())["error"])

    def test_relay_without_upgrade_400(self) -> None:
        status, body = self.relay.get("/relay")
        self.assertEqual(status, 400)
        self.assertIn("websocket", body["error"])

    def test_nothing_written_after_close(self) -> None:
        """After the close handshake the relay sends FIN and no HTTP bytes."""
        client = self.connect()
        client.ws.send_close(1000, b"bye")
        raw = client.ws.sock
        raw.settimeout(5 * UNIT)
        data = b""
        while True:
            chunk = raw.recv(65536)
            if not chunk:
                break
            data += chunk
        self.assertEqual(data[:1], b"\x88", data[:40])
        self.assertEqual(struct.unpack("!H", data[2:4])[0], 1000)
        self.assertNotIn(b"HTTP/1.1", data)
        self.assertEqual(len(data), 2 + (data[1] & 0x7F))


class SlowConsumerTest(RelayTestCase):
    sections = {"clients": {"queue_max_bytes": 256 * 1024, "queue_max_frames": 10_000, "close_timeout": 10 * UNIT}}

    def test_stalled_client_closed_4008(self) -> None:
        stalled = RelayClient(self.relay.ws_url)
        self.addCleanup(stalled.close)
        healthy = self.connect()
        frame = b'["' + b"x" * 100_000 + b'"]'
        # Enough to fill the kernel's socket buffers (up to a few MB on
        # loopback) and then the 256 KiB queue of the stalled client.
        count = 150
        # At most two frames (200 KB) wait unread by the healthy reader, under
        # its 256 KiB cap, so only the stalled client can overflow.
        window = 2
        received: list[bytes] = []
        progress = threading.Condition()

        def read() -> None:
            for _ in range(count):
                payload = healthy.recv(10 * UNIT)[1]
                with progress:
                    received.append(payload)
                    progress.notify_all()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        for index in range(count):
            with progress:
                progress.wait_for(lambda: len(received) >= index + 1 - window, 10 * UNIT)
            self.connection.send_text(frame)
        reader.join(30 * UNIT)
        self.assertEqual(len(received), count, "\n".join(line for line in self.relay.lines if "client" in line))
        self.assertTrue(all(payload == frame for payload in received))
        self.relay.wait_log(r"client 1 .*slow consumer", 10 * UNIT)
        status = self.relay.get("/status")[1]
        self.assertEqual(status["clients"]["closedSlow"], 1)
        self.assertEqual(len([line for line in self.relay.lines if "slow consumer" in line]), 1)
        # The stalled client finds the close frame after the frames it did get.
        stalled.ws.sock.settimeout(5 * UNIT)
        codes = []
        while True:
            opcode, payload = stalled.recv(5 * UNIT)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                codes.append(close_code(payload))
                break
        self.assertEqual(codes, [4008])


if __name__ == "__main__":
    unittest.main()
