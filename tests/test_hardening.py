"""Defences found missing by a review: each test failed before its fix."""

from __future__ import annotations

import configparser
import signal
import threading
import time

import websocket

from tests.support import (
    UNIT,
    RelayCase,
    RelayClient,
    encode_client_frame,
    encode_server_frame,
    upgrade_request,
    wait_for,
)

PING = 0x9
TEXT = 0x1


class ConcurrentCapsTest(RelayCase):
    sections = {"clients": {"max_clients": 3}}

    def test_simultaneous_connects_respect_cap(self) -> None:
        """Twenty connects at once never get more than max_clients in."""
        results: list[object] = []
        start = threading.Event()

        def connect() -> None:
            start.wait()
            try:
                results.append(websocket.create_connection(self.relay.ws_url, timeout=5 * UNIT))
            except websocket.WebSocketBadStatusException as error:
                results.append(error.status_code)
            except OSError as error:
                results.append(error)

        threads = [threading.Thread(target=connect) for _ in range(20)]
        for thread in threads:
            thread.start()
        start.set()
        for thread in threads:
            thread.join(10 * UNIT)
        accepted = [item for item in results if isinstance(item, websocket.WebSocket)]
        for ws in accepted:
            self.addCleanup(ws.close)
        self.assertEqual(len(results), 20)
        self.assertLessEqual(len(accepted), 3)
        self.assertEqual(results.count(503), 20 - len(accepted))
        self.assertLessEqual(self.relay.get("/status")[1]["clients"]["connected"], 3)


class HostHeaderTest(RelayCase):
    def test_rebinding_host_refused(self) -> None:
        """A DNS-rebinding page (foreign Host, matching Origin) gets 403, even without Origin."""
        status, body = self.relay.get("/status", {"Host": f"attacker.example:{self.relay.port}"})
        self.assertEqual(status, 403)
        self.assertIn("allowed_hosts", body["error"])
        with self.assertRaises(websocket.WebSocketBadStatusException) as raised:
            websocket.create_connection(
                self.relay.ws_url,
                timeout=5 * UNIT,
                host=f"attacker.example:{self.relay.port}",
                origin=f"http://attacker.example:{self.relay.port}",
            )
        self.assertEqual(raised.exception.status_code, 403)

    def test_ip_and_localhost_hosts_allowed(self) -> None:
        for host in (f"127.0.0.1:{self.relay.port}", f"localhost:{self.relay.port}"):
            with self.subTest(host=host):
                self.assertEqual(self.relay.get("/status", {"Host": host})[0], 200)

    def test_probes_ignore_host(self) -> None:
        self.assertEqual(self.relay.get("/health", {"Host": "anything.example"})[0], 200)


class AllowedHostsTest(RelayCase):
    sections = {"server": {"allowed_hosts": "relay.example.com"}}

    def test_listed_host_allowed(self) -> None:
        self.assertEqual(self.relay.get("/status", {"Host": "relay.example.com:3001"})[0], 200)
        self.assertEqual(self.relay.get("/status", {"Host": "other.example.com"})[0], 403)


class PingFloodTest(RelayCase):
    sections = {"clients": {"message_rate": 5, "message_burst": 10}}

    def test_ping_flood_closed_1008(self) -> None:
        """Protocol pings count against the message rate, so a ping flood is closed."""
        client = self.raw()
        for _ in range(200):
            try:
                client.send_frame(PING, b"x" * 125)
            except OSError:
                break
        self.relay.wait_log(r"closed: more than 5 messages/s", 5 * UNIT)
        closed = self.relay.get("/status")[1]["clients"]["closedByCause"]
        self.assertEqual(closed.get("rate_limited"), 1)


class PongQueueLimitTest(RelayCase):
    sections = {"clients": {"message_rate": 100000, "message_burst": 1000000, "queue_max_frames": 50}}

    def test_unread_pongs_bounded(self) -> None:
        """A client that pings and never reads is closed once its pongs pass the queue cap."""
        client = self.raw(rcvbuf=4096)
        deadline = time.monotonic() + 10 * UNIT
        while time.monotonic() < deadline:
            try:
                client.sock.sendall(encode_client_frame(PING, b"y" * 125) * 200)
            except OSError:
                break
            if self.relay.get("/status")[1]["clients"]["closedSlow"]:
                break
        wait_for(lambda: self.relay.get("/status")[1]["clients"]["closedSlow"] == 1, 10 * UNIT)
        rows = self.relay.get("/api/clients")[1]["clients"]
        for row in rows:
            # The cap, plus the close frame queued behind it.
            self.assertLessEqual(row["queuedFrames"], 51)


class LeftoverBytesTest(RelayCase):
    sections = {"clients": {"max_message_bytes": 1024}}

    def test_bytes_after_close_not_http(self) -> None:
        """Bytes a client sends after a 1009 close are never parsed as an HTTP request."""
        client = self.raw()
        smuggled = upgrade_request("dGhlIHNhbXBsZSBub25jZQ==", headers={"User-Agent": "smuggled"})
        client.sock.sendall(encode_client_frame(TEXT, b"z" * 4096) + smuggled + b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        client.read_to_end(5 * UNIT)
        time.sleep(0.5 * UNIT)
        status = self.relay.get("/status")[1]
        self.assertEqual(status["clients"]["totalAccepted"], 1)
        self.assertNotIn("smuggled", self.relay.output)
        self.assertNotIn("rejected request", self.relay.output)


class ReloadPingIntervalTest(RelayCase):
    def test_lower_ping_interval_keeps_healthy_clients(self) -> None:
        """After a reload to a short ping interval, auto-ponging clients stay connected."""
        client = self.connect()
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(self.relay.config_path, encoding="utf-8")
        parser.read_string("[clients]\nping_interval = 0.4\n")
        with open(self.relay.config_path, "w", encoding="utf-8") as handle:
            parser.write(handle)
        self.relay.signal(signal.SIGHUP)
        self.relay.wait_log(r"ping_interval changed from 30.0 to 0.4", 5 * UNIT)
        stop = time.monotonic() + 3 * UNIT
        while time.monotonic() < stop:
            client.ws.settimeout(0.1)
            try:
                client.ws.recv_data(control_frame=True)
            except websocket.WebSocketTimeoutException:
                pass
        self.assertEqual(self.relay.get("/health")[1]["connectedClients"], 1)
        self.assertNotIn("ping timeout", self.relay.output)


class TrickleUpstreamTest(RelayCase):
    sections = {"upstream": {"stall_timeout": 1 * UNIT}}

    def test_frame_trickle_reconnects(self) -> None:
        """An upstream stuck inside one frame (a byte now and then) is cut and reconnected."""
        header = encode_server_frame(TEXT, b"x" * 1000)[:4]
        self.connection.send_raw(header)
        deadline = time.monotonic() + 15 * UNIT
        while time.monotonic() < deadline and len(self.upstream.connections) < 2:
            try:
                self.connection.send_raw(b"x")
            except OSError:
                break
            time.sleep(0.3 * UNIT)
        self.upstream.wait_connection(2, 10 * UNIT)
        self.relay.wait_log(r"stalled inside a frame", 5 * UNIT)


class UrlCredentialsTest(RelayCase):
    def prepare_upstream(self) -> None:
        self.upstream.url = self.upstream.url.replace("ws://", "ws://user:hunter2secret@")

    def test_credentials_never_shown(self) -> None:
        status = self.relay.get("/status")[1]
        self.assertNotIn("hunter2secret", status["upstream"]["url"])
        self.assertIn("***@", status["upstream"]["url"])
        client = self.connect()
        self.connection.send_close(1001, "restart")
        message = client.recv_message("backpack_connected", 10 * UNIT)
        self.assertNotIn("hunter2secret", message["url"])
        self.relay.stop()
        self.assertNotIn("hunter2secret", self.relay.output)


class OversizeFrameTest(RelayCase):
    sections = {"upstream": {"max_frame_bytes": 1024 * 1024}}

    def peak_rss(self) -> int:
        """Return the relay's peak resident set size in bytes (VmHWM)."""
        with open(f"/proc/{self.relay.process.pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("VmHWM missing from /proc/PID/status")

    def assert_dropped_unbuffered(self, client: RelayClient, baseline: int) -> None:
        """Check the oversize message was dropped and counted, the connection stayed up, and peak RSS grew under 32 MiB."""
        self.connection.send_text(b'["after"]')
        self.assertEqual(client.recv(10 * UNIT)[1], b'["after"]')
        status = self.relay.get("/status")[1]
        self.assertEqual(status["traffic"]["upstreamFramesDropped"].get("too_large"), 1)
        self.assertEqual(status["upstream"]["disconnects"], 0)
        self.assertEqual(len(self.upstream.connections), 1)
        self.assertLess(self.peak_rss() - baseline, 32 * 1024 * 1024)

    def test_oversize_frame_never_buffered(self) -> None:
        """A 64 MiB frame is read past unbuffered and dropped; the connection stays up."""
        client = self.connect()
        baseline = self.peak_rss()
        size = 64 * 1024 * 1024
        self.connection.send_raw(b"\x81\x7f" + size.to_bytes(8, "big") + b"x" * size)
        self.assert_dropped_unbuffered(client, baseline)

    def test_million_tiny_fragments_bounded(self) -> None:
        """A 1 MB message in one-byte fragments is relayed whole, with peak RSS near its size."""
        client = self.connect()
        baseline = self.peak_rss()
        payload = b'["' + b"x" * 999_996 + b'"]'
        self.connection.send_fragments(0x1, [payload[index : index + 1] for index in range(len(payload))])
        self.assertEqual(client.recv(30 * UNIT), (websocket.ABNF.OPCODE_TEXT, payload))
        self.assertLess(self.peak_rss() - baseline, 32 * 1024 * 1024)

    def test_fragmented_oversize_never_buffered(self) -> None:
        """A 64 MiB message in 512 KiB fragments is dropped without buffering; the connection stays up."""
        client = self.connect()
        baseline = self.peak_rss()
        part = 512 * 1024
        self.connection.send_fragments(0x1, [b"x" * part] * 128)
        self.assert_dropped_unbuffered(client, baseline)
