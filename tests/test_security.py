"""Access token, origins, caps, probes, metrics and SIGHUP reload, on the real process."""

from __future__ import annotations

import base64
import configparser
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import websocket

from relay.config import TOKEN_FILE_MAX_BYTES, ConfigError, read_token_file
from tests.support import (
    ROOT,
    UNIT,
    FakeUpstream,
    RelayCase,
    RelayClient,
    RelayProcess,
    close_code,
    upgrade_request,
    wait_for,
    write_config,
)

TOKEN = "s3cret-token-0123456789abcdef"
OPEN_PATHS = ("/", "/health", "/live", "/ready")
PROTECTED_PATHS = ("/status", "/api/clients", "/metrics")


def raw_request(port: int, data: bytes, timeout: float) -> bytes:
    """Send raw bytes to the relay and return everything it sends back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else 0


def upgrade_after_clients(test: SecuredRelayTestCase, count: int) -> websocket.WebSocketBadStatusException:
    """Connect ``count`` clients, then return the handshake error the next upgrade must raise."""
    for _ in range(count):
        client = RelayClient(test.relay.ws_url)
        test.addCleanup(client.close)
        client.recv_json()
    with test.assertRaises(websocket.WebSocketBadStatusException) as raised:
        websocket.create_connection(test.relay.ws_url, timeout=5 * UNIT)
    return raised.exception


class SecuredRelayTestCase(unittest.TestCase):
    sections: dict = {}

    def setUp(self) -> None:
        self.upstream = FakeUpstream()
        self.addCleanup(self.upstream.close)
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.relay = RelayProcess(self.upstream.url, self.sections)
        self.addCleanup(self.relay.stop)
        self.relay.wait_listening()
        self.connection = self.upstream.wait_connection(1, 10 * UNIT)


class TokenTest(SecuredRelayTestCase):
    sections = {"security": {"token": TOKEN}, "logging": {"level": "DEBUG"}}

    def test_open_paths_need_no_token(self) -> None:
        for path in OPEN_PATHS:
            with self.subTest(path=path):
                status, _ = self.relay.get(path)
                self.assertIn(status, (200, 503))

    def test_protected_paths_reject_missing_token(self) -> None:
        for path in PROTECTED_PATHS:
            with self.subTest(path=path):
                status, body = self.relay.get(path)
                self.assertEqual(status, 401)
                self.assertIn("Authorization: Bearer", body["error"])

    def test_protected_paths_reject_wrong_token(self) -> None:
        for path in PROTECTED_PATHS:
            with self.subTest(path=path):
                status, _ = self.relay.get(path, {"Authorization": "Bearer wrong-token-value-xyz"})
                self.assertEqual(status, 401)
                status, _ = self.relay.get(path + "?token=wrong-token-value-xyz")
                self.assertEqual(status, 401)

    def test_protected_paths_accept_token(self) -> None:
        for path in PROTECTED_PATHS:
            with self.subTest(path=path):
                status, _ = self.relay.get(path, {"Authorization": f"Bearer {TOKEN}"})
                self.assertEqual(status, 200)
                status, _ = self.relay.get(f"{path}?token={TOKEN}")
                self.assertEqual(status, 200)

    def test_websocket_requires_token(self) -> None:
        with self.assertRaises(websocket.WebSocketBadStatusException) as raised:
            websocket.create_connection(self.relay.ws_url, timeout=5 * UNIT)
        self.assertEqual(raised.exception.status_code, 401)
        with self.assertRaises(websocket.WebSocketBadStatusException) as raised:
            websocket.create_connection(self.relay.ws_url, timeout=5 * UNIT, header=["Authorization: Bearer nope-nope-nope-nope"])
        self.assertEqual(raised.exception.status_code, 401)

    def test_websocket_accepts_header_and_query(self) -> None:
        by_header = RelayClient(self.relay.ws_url, header=[f"Authorization: Bearer {TOKEN}"])
        self.addCleanup(by_header.close)
        self.assertEqual(by_header.recv_json()["type"], "relay_status")
        by_query = RelayClient(f"{self.relay.ws_url}?token={TOKEN}")
        self.addCleanup(by_query.close)
        self.assertEqual(by_query.recv_json()["type"], "relay_status")

    def test_token_never_logged(self) -> None:
        """A full session at DEBUG level, token in header and query, never logs it."""
        client = RelayClient(f"{self.relay.ws_url}?token={TOKEN}")
        client.recv_json()
        self.relay.get(f"/status?token={TOKEN}")
        self.relay.get("/status?token=wrong-but-also-secret-123")
        self.relay.get("/metrics", {"Authorization": f"Bearer {TOKEN}"})
        client.close()
        self.relay.stop()
        self.assertIn("relay.http", self.relay.output)
        self.assertNotIn(TOKEN, self.relay.output)
        self.assertNotIn("wrong-but-also-secret-123", self.relay.output)

    def test_check_masks_token(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "relay", "-c", self.relay.config_path, "--check"],
            cwd=str(ROOT), capture_output=True, text=True, timeout=30,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("token = ********", result.stdout)
        self.assertNotIn(TOKEN, result.stdout + result.stderr)


class OriginTest(SecuredRelayTestCase):
    sections = {"security": {"allowed_origins": "https://good.example"}}

    def handshake(self, origin: str | None) -> int:
        headers = [f"Origin: {origin}"] if origin else []
        try:
            ws = websocket.create_connection(self.relay.ws_url, timeout=5 * UNIT, header=headers, suppress_origin=True)
        except websocket.WebSocketBadStatusException as error:
            return error.status_code
        ws.close()
        return 101

    def test_listed_origin_allowed(self) -> None:
        self.assertEqual(self.handshake("https://good.example"), 101)

    def test_other_origin_refused_403(self) -> None:
        self.assertEqual(self.handshake("https://evil.example"), 403)
        status, body = self.relay.get("/status", {"Origin": "https://evil.example"})
        self.assertEqual(status, 403)
        self.assertIn("allowed_origins", body["error"])

    def test_no_origin_allowed(self) -> None:
        self.assertEqual(self.handshake(None), 101)

    def test_same_origin_allowed(self) -> None:
        self.assertEqual(self.handshake(f"http://127.0.0.1:{self.relay.port}"), 101)

    def test_default_refuses_browser_origins(self) -> None:
        relay = RelayProcess(self.upstream.url)
        self.addCleanup(relay.stop)
        relay.wait_listening()
        with self.assertRaises(websocket.WebSocketBadStatusException) as raised:
            websocket.create_connection(relay.ws_url, timeout=5 * UNIT, header=["Origin: https://good.example"], suppress_origin=True)
        self.assertEqual(raised.exception.status_code, 403)


class CapsTest(SecuredRelayTestCase):
    sections = {"clients": {"max_clients": 3, "max_clients_per_ip": 2}, "server": {"max_header_bytes": 2048, "header_timeout": 1 * UNIT}}

    def test_per_ip_cap_429(self) -> None:
        rejection = upgrade_after_clients(self, 2)
        self.assertEqual(rejection.status_code, 429)
        self.assertIn(b"max_clients_per_ip", rejection.resp_body)

    def test_header_size_cap_431(self) -> None:
        request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n"
        response = raw_request(self.relay.port, request, 5 * UNIT)
        self.assertEqual(status_of(response), 431)
        self.assertIn(b"2048 bytes", response)

    def test_slow_headers_cut(self) -> None:
        """A client trickling its headers is disconnected after header_timeout."""
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.relay.port), timeout=10 * UNIT) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\n")
            closed = False
            for _ in range(int(20 * UNIT)):
                try:
                    sock.sendall(b"X")
                except OSError:
                    closed = True
                    break
                sock.settimeout(0.5)
                try:
                    if sock.recv(1024) == b"":
                        closed = True
                        break
                except socket.timeout:
                    pass
        self.assertTrue(closed)
        self.assertLess(time.monotonic() - started, 8 * UNIT)
        self.assertEqual(self.relay.get("/health")[0], 200)


class MaxClientsTest(SecuredRelayTestCase):
    sections = {"clients": {"max_clients": 2}}

    def test_max_clients_503(self) -> None:
        rejection = upgrade_after_clients(self, 2)
        self.assertEqual(rejection.status_code, 503)
        status = self.relay.get("/status")[1]
        self.assertEqual(status["clients"]["rejected"].get("max_clients"), 1)


class ProbesAndMetricsTest(SecuredRelayTestCase):
    def test_live_and_ready(self) -> None:
        self.relay.wait_health(200, 10 * UNIT)
        self.assertEqual(self.relay.get("/live")[0], 200)
        self.assertEqual(self.relay.get("/ready")[0], 200)
        self.upstream.reject_with = (503, b"down")
        self.connection.reset()
        wait_for(lambda: self.relay.get("/ready")[0] == 503, 5 * UNIT)
        self.assertEqual(self.relay.get("/live")[0], 200)

    def test_metrics_exposition(self) -> None:
        client = RelayClient(self.relay.ws_url)
        self.addCleanup(client.close)
        client.recv_json()
        self.connection.send_text(b'["one"]')
        client.recv()
        wait_for(lambda: b"bptf_relay_frames_delivered_total 1.0" in self._metrics(), 5 * UNIT)
        text = self._metrics().decode()
        for name in (
            "bptf_relay_upstream_connected 1.0",
            'bptf_relay_upstream_state{state="connected"} 1.0',
            "bptf_relay_frames_received_total 1.0",
            "bptf_relay_clients_connected 1.0",
            "bptf_relay_delivery_latency_seconds_bucket",
            "bptf_relay_client_queue_max_bytes",
            # One frame delivered to one client: one latency observation.
            "bptf_relay_delivery_latency_seconds_count 1.0",
        ):
            self.assertIn(name, text)

    def _metrics(self) -> bytes:
        import urllib.request

        with urllib.request.urlopen(self.relay.base + "/metrics", timeout=5 * UNIT) as response:
            self.assertTrue(response.headers["Content-Type"].startswith("text/plain"))
            return response.read()


class ReloadTest(SecuredRelayTestCase):
    def write_config(self, extra: str) -> None:
        """Merge ``extra`` (INI text) into the relay's configuration file."""
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(self.relay.config_path, encoding="utf-8")
        parser.read_string(extra)
        with open(self.relay.config_path, "w", encoding="utf-8") as handle:
            parser.write(handle)

    def test_sighup_applies_changes(self) -> None:
        """A reload applies client limits at once; a new token closes clients that lack it."""
        client = RelayClient(self.relay.ws_url)
        self.addCleanup(client.close)
        client.recv_json()
        self.write_config("[clients]\nqueue_max_frames = 77\n")
        self.relay.signal(signal.SIGHUP)
        self.relay.wait_log(r"reload: \[clients\] queue_max_frames changed from 4096 to 77", 5 * UNIT)
        self.connection.send_text(b'["still here"]')
        self.assertEqual(client.recv()[1], b'["still here"]')

        self.write_config(f"[security]\ntoken = {TOKEN}\n")
        self.relay.signal(signal.SIGHUP)
        self.relay.wait_log(r"reload: \[security\] token changed", 5 * UNIT)
        self.assertEqual(self.relay.get("/status")[0], 401)
        opcode, payload = client.recv(5 * UNIT)
        self.assertEqual(opcode, websocket.ABNF.OPCODE_CLOSE)
        self.assertEqual(close_code(payload), 1008)
        self.assertEqual(payload[2:], b"access revoked")
        self.relay.wait_log(r"client 1 \(127\.0\.0\.1\) closed: its access token is no longer accepted", 5 * UNIT)
        self.assertIsNone(self.relay.process.poll())
        self.assertNotIn(TOKEN, self.relay.output)

    def test_token_rotation_revokes_old_token(self) -> None:
        """After a token change, clients holding the old token are closed and holders of the new one stay."""
        new_token = "rotated-token-9876543210fedcba"
        self.write_config(f"[security]\ntoken = {TOKEN}\n")
        self.relay.signal(signal.SIGHUP)
        self.relay.wait_log(r"reload: \[security\] token changed", 5 * UNIT)
        by_header = RelayClient(self.relay.ws_url, header=[f"Authorization: Bearer {TOKEN}"])
        self.addCleanup(by_header.close)
        by_header.recv_json()
        by_query = RelayClient(f"{self.relay.ws_url}?token={TOKEN}")
        self.addCleanup(by_query.close)
        by_query.recv_json()

        self.write_config(f"[security]\ntoken = {new_token}\n")
        self.relay.signal(signal.SIGHUP)
        self.relay.wait_log(r"reload: \[security\] token changed", 5 * UNIT, count=2)
        for client in (by_header, by_query):
            opcode, payload = client.recv(5 * UNIT)
            self.assertEqual(opcode, websocket.ABNF.OPCODE_CLOSE)
            self.assertEqual(close_code(payload), 1008)
        fresh = RelayClient(self.relay.ws_url, header=[f"Authorization: Bearer {new_token}"])
        self.addCleanup(fresh.close)
        fresh.recv_json()
        self.connection.send_text(b'["after rotation"]')
        self.assertEqual(fresh.recv()[1], b'["after rotation"]')
        status, body = self.relay.get("/status", {"Authorization": f"Bearer {new_token}"})
        self.assertEqual(status, 200)
        self.assertEqual(body["clients"]["closedByCause"].get("access_revoked"), 2)
        self.assertEqual(body["clients"]["connected"], 1)
        self.assertNotIn(new_token, self.relay.output)

    def test_rotation_during_handshakes(self) -> None:
        """Clients mid-handshake with the old token when the token rotates are closed too."""
        token_path = write_config(self.tmp.name, TOKEN, "token")
        self.write_config(f"[security]\ntoken_file = {token_path}\n")
        self.relay.signal(signal.SIGHUP)
        self.relay.wait_log(r"reload: \[security\] token changed", 5 * UNIT)
        upgraded: list[socket.socket] = []
        stop = threading.Event()

        def close_upgraded() -> None:
            for sock in upgraded:
                sock.close()

        self.addCleanup(close_upgraded)

        def connect_repeatedly() -> None:
            while not stop.is_set():
                sock = socket.create_connection(("127.0.0.1", self.relay.port), timeout=5 * UNIT)
                key = base64.b64encode(os.urandom(16)).decode()
                sock.sendall(upgrade_request(key, headers={"Authorization": f"Bearer {TOKEN}"}))
                try:
                    head = sock.recv(200)
                except OSError:
                    head = b""
                if head.startswith(b"HTTP/1.1 101"):
                    upgraded.append(sock)
                else:
                    sock.close()

        threads = [threading.Thread(target=connect_repeatedly, daemon=True) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.5 * UNIT)
        new_token = "rotated-token-9876543210fedcba"
        write_config(self.tmp.name, new_token, "token")
        self.relay.signal(signal.SIGHUP)
        time.sleep(0.3 * UNIT)
        stop.set()
        for thread in threads:
            thread.join(5 * UNIT)
        self.assertGreater(len(upgraded), 0)
        headers = {"Authorization": f"Bearer {new_token}"}
        wait_for(lambda: self.relay.get("/status", headers)[1]["clients"]["connected"] == 0, 10 * UNIT, message="every old-token client closed")
        self.assertEqual(self.relay.get("/status", headers)[1]["clients"]["closedByCause"].get("access_revoked"), len(upgraded))

    def test_sighup_broken_file_keeps_settings(self) -> None:
        self.write_config("[clients]\nqueue_max_frames = lots\n")
        self.relay.signal(signal.SIGHUP)
        self.relay.wait_log(r"reload failed, keeping the current settings: .*queue_max_frames = 'lots'", 5 * UNIT)
        self.assertIsNone(self.relay.process.poll())
        self.assertEqual(self.relay.get("/health")[0], 200)

    def test_sighup_restart_only_keys_reported(self) -> None:
        self.write_config("[upstream]\nstall_timeout = 99\n")
        self.relay.signal(signal.SIGHUP)
        self.relay.wait_log(r"stall_timeout changed to 99.* only after a restart", 5 * UNIT)

    def test_sighup_new_url_key_masked(self) -> None:
        """A changed upstream URL is logged as needing a restart, with its query values masked."""
        self.write_config(f"[upstream]\nurl = {self.upstream.url}?key=reload-secret-42\n")
        self.relay.signal(signal.SIGHUP)
        self.relay.wait_log(r"url changed to .*key=\*\*\*.* only after a restart", 5 * UNIT)
        self.assertNotIn("reload-secret-42", self.relay.output)


class BindSafetyTest(unittest.TestCase):
    def run_check(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "relay", "--check", *args],
            cwd=str(ROOT), capture_output=True, text=True, timeout=30,
            env={k: v for k, v in os.environ.items() if k not in ("PORT", "BACKPACK_WS_URL", "LOG_LEVEL")},
        )

    def test_public_bind_without_token_refused(self) -> None:
        result = self.run_check("--host", "0.0.0.0")
        self.assertEqual(result.returncode, 78)
        self.assertIn("without an access token", result.stderr)
        self.assertIn("token_file", result.stderr)
        self.assertIn("allow_unauthenticated = yes", result.stderr)

    def test_public_bind_with_opt_out_allowed(self) -> None:
        with tempfile.TemporaryDirectory() as directory:
            path = write_config(directory, "[server]\nhost = 0.0.0.0\n[security]\nallow_unauthenticated = yes\n")
            result = self.run_check("-c", path)
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_public_bind_with_token_file(self) -> None:
        with tempfile.TemporaryDirectory() as directory:
            token_path = write_config(directory, TOKEN + "\n", "token")
            path = write_config(directory, f"[server]\nhost = 0.0.0.0\n[security]\ntoken_file = {token_path}\n")
            result = self.run_check("-c", path)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn(TOKEN, result.stdout)

    def test_missing_token_file_78(self) -> None:
        with tempfile.TemporaryDirectory() as directory:
            path = write_config(directory, "[security]\ntoken_file = /nonexistent/token\n")
            result = self.run_check("-c", path)
        self.assertEqual(result.returncode, 78)
        self.assertIn("/nonexistent/token", result.stderr)
        self.assertIn("not found", result.stderr)

    def test_short_token_78(self) -> None:
        with tempfile.TemporaryDirectory() as directory:
            path = write_config(directory, "[security]\ntoken = short\n")
            result = self.run_check("-c", path)
        self.assertEqual(result.returncode, 78)
        self.assertIn("shorter than 16 characters", result.stderr)
        self.assertNotIn("short\n", result.stderr)


# Script that runs ``python -m relay`` with its address space capped at 1 GiB.
# A regression that reads an endless file then fails with MemoryError instead
# of using up the machine's memory.
RELAY_WITH_MEMORY_CAP = """
import resource, runpy
resource.setrlimit(resource.RLIMIT_AS, (1024**3, 1024**3))
runpy.run_module("relay", run_name="__main__", alter_sys=True)
"""


class TokenFileTest(unittest.TestCase):
    """token_file accepts only a small regular file and never blocks."""

    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def run_check(self, token_path: str) -> subprocess.CompletedProcess[str]:
        path = write_config(self.tmp.name, f"[security]\ntoken_file = {token_path}\n")
        return subprocess.run(
            [sys.executable, "-c", RELAY_WITH_MEMORY_CAP, "-c", path, "--check"],
            cwd=str(ROOT), capture_output=True, text=True, timeout=10 * UNIT,
            env={k: v for k, v in os.environ.items() if k not in ("PORT", "BACKPACK_WS_URL", "LOG_LEVEL")},
        )

    def assert_rejected(self, token_path: str, *parts: str) -> None:
        result = self.run_check(token_path)
        self.assertEqual(result.returncode, 78, result.stderr)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertIn(f"token_file = {token_path!r}", lines[0])
        for part in parts:
            self.assertIn(part, lines[0])

    def test_fifo_rejected(self) -> None:
        """A FIFO with no writer is rejected at once instead of blocking the read."""
        fifo = os.path.join(self.tmp.name, "token.fifo")
        os.mkfifo(fifo)
        self.assert_rejected(fifo, "named pipe (FIFO)", "not a regular file")

    @unittest.skipUnless(os.path.exists("/dev/zero"), "needs /dev/zero")
    def test_dev_zero_rejected(self) -> None:
        """/dev/zero is rejected instead of being read until memory runs out."""
        self.assert_rejected("/dev/zero", "character device", "not a regular file")

    def test_directory_rejected(self) -> None:
        self.assert_rejected(self.tmp.name, "a directory", "not a regular file")

    def test_oversized_file_rejected(self) -> None:
        token_path = write_config(self.tmp.name, TOKEN + "\n" + "#" * TOKEN_FILE_MAX_BYTES, "token")
        self.assert_rejected(token_path, f"larger than {TOKEN_FILE_MAX_BYTES} bytes")

    def test_file_at_limit_accepted(self) -> None:
        """A file of exactly TOKEN_FILE_MAX_BYTES still loads, and only its first line counts."""
        padding = "#" * (TOKEN_FILE_MAX_BYTES - len(TOKEN) - 2)
        token_path = write_config(self.tmp.name, TOKEN + "\n" + padding + "\n", "token")
        self.assertEqual(os.path.getsize(token_path), TOKEN_FILE_MAX_BYTES)
        self.assertEqual(read_token_file(token_path, "test"), TOKEN)

    def test_symlink_to_regular_file_accepted(self) -> None:
        """A symbolic link to a regular file is followed, and CRLF is stripped."""
        token_path = write_config(self.tmp.name, TOKEN + "\r\n", "token")
        link = os.path.join(self.tmp.name, "token.link")
        os.symlink(token_path, link)
        self.assertEqual(read_token_file(link, "test"), TOKEN)

    def test_non_utf8_file_rejected(self) -> None:
        token_path = os.path.join(self.tmp.name, "token")
        with open(token_path, "wb") as handle:
            handle.write(TOKEN.encode() + b"\xe9\n")
        with self.assertRaises(ConfigError) as raised:
            read_token_file(token_path, "test")
        self.assertIn("not valid UTF-8", str(raised.exception))


class UrlQueryKeyTest(RelayCase):
    """An API key in the upstream URL's query stays out of /status, client messages and logs."""

    sections = {"logging": {"level": "DEBUG"}}

    def prepare_upstream(self) -> None:
        self.upstream.url += "?key=hunter2secret"

    def test_query_key_never_shown(self) -> None:
        status = self.relay.get("/status")[1]
        self.assertTrue(status["upstream"]["url"].endswith("/events?key=***"), status["upstream"]["url"])
        client = self.connect()
        self.connection.send_close(1001, "restart")
        message = client.recv_message("backpack_connected", 10 * UNIT)
        self.assertEqual(message["url"], status["upstream"]["url"])
        self.relay.stop()
        self.assertIn("?key=***", self.relay.output)
        self.assertNotIn("hunter2secret", self.relay.output)


class JsonLogTest(SecuredRelayTestCase):
    sections = {"logging": {"format": "json"}}

    def test_lines_are_json_objects(self) -> None:
        client = RelayClient(self.relay.ws_url)
        client.recv_json()
        client.close()
        self.relay.wait_log(r"disconnected", 5 * UNIT)
        self.relay.stop()
        lines = [line for line in self.relay.lines if line.strip()]
        self.assertGreater(len(lines), 3)
        for line in lines:
            entry = json.loads(line)
            for key in ("time", "level", "logger", "message"):
                self.assertIn(key, entry)


class RejectionLogTest(SecuredRelayTestCase):
    sections = {"security": {"token": TOKEN}}

    def test_rejection_lines_rate_limited(self) -> None:
        """Fifty wrong-token requests log at most five lines, not fifty."""
        for _ in range(50):
            self.assertEqual(self.relay.get("/status")[0], 401)
        self.relay.stop()
        lines = [line for line in self.relay.lines if "missing or wrong access token" in line]
        self.assertEqual(len(lines), 5)
        status_lines = [line for line in self.relay.lines if "rejected" in line]
        self.assertLessEqual(len(status_lines), 5)


if __name__ == "__main__":
    unittest.main()
