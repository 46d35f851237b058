"""Malformed, oversized, slow and misdirected HTTP requests against the real relay.

Each bad request must get a status line with a clear 4xx (505 for an HTTP
version the relay does not speak) and a JSON body, or be cut when its head is
not complete within header_timeout. Afterwards no thread is left behind and
the relay still serves /health and streams frames.
"""

from __future__ import annotations

import json
import resource
import socket
import time

from tests.support import UNIT, Collector, RelayCase, process_cpu_seconds, wait_for

HEADER_TIMEOUT = 1 * UNIT
MAX_HEADER_BYTES = 4096
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def upgrade(method: str = "GET", path: str = "/relay", **overrides: str | None) -> bytes:
    """Return an upgrade request; an override of None leaves that header out."""
    headers = {"Host": "127.0.0.1", "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": KEY, "Sec-WebSocket-Version": "13"}
    for name, value in overrides.items():
        name = name.replace("_", "-")
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    lines = [f"{method} {path} HTTP/1.1"] + [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# (case, request bytes, expected status)
BAD_REQUESTS = [
    ("garbage request line", b"GARBAGE\r\n\r\n", 400),
    ("TLS ClientHello on the HTTP port", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(32)) + b"\r\n\r\n", 400),
    ("invalid version text", b"GET /health HTTP/one\r\nHost: 127.0.0.1\r\n\r\n", 400),
    ("unsupported HTTP version", b"GET /health HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n", 505),
    ("request line over 64 KiB", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 414),
    ("header over max_header_bytes", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n", 431),
    ("more than 100 headers", b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(120)) + b"\r\n", 431),
    ("unknown method", b"BREW /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405),
    ("TRACE", b"TRACE /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405),
    ("POST with a body", b"POST /status HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello", 405),
    ("unknown path", b"GET /admin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404),
    ("GET /relay without upgrade", b"GET /relay HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    ("upgrade without Connection: Upgrade", upgrade(Connection="keep-alive"), 400),
    ("upgrade without Sec-WebSocket-Key", upgrade(Sec_WebSocket_Key=None), 400),
    ("Sec-WebSocket-Key not 16 bytes", upgrade(Sec_WebSocket_Key="c2hvcnQ="), 400),
    ("Sec-WebSocket-Version 8", upgrade(Sec_WebSocket_Version="8"), 426),
    ("upgrade with POST", upgrade(method="POST"), 405),
    ("Host header not parsable", b"GET /status HTTP/1.1\r\nHost: [\r\n\r\n", 403),
    ("Origin header not parsable", b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://[\r\n\r\n", 403),
    ("upgrade with an unparsable Origin", upgrade(Origin="http://["), 403),
]


def exchange(port: int, request: bytes, timeout: float) -> tuple[bytes, str, float]:
    """Send ``request`` and read until the relay ends the connection.

    Returns (response, "fin" | "reset" | "timeout", seconds taken).
    """
    started = time.monotonic()
    response = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except OSError:
            pass
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return response, "reset", time.monotonic() - started
            except socket.timeout:
                return response, "timeout", time.monotonic() - started
            if not chunk:
                return response, "fin", time.monotonic() - started
            response += chunk


class BadRequestTest(RelayCase):
    sections = {"server": {"header_timeout": HEADER_TIMEOUT, "max_header_bytes": MAX_HEADER_BYTES}}

    def setUp(self) -> None:
        super().setUp()
        self.baseline = self.baseline_process()

    def assert_relay_unaffected(self) -> None:
        """Check threads are back to the baseline, /health is 200 and a client gets a frame."""
        after = self.wait_process_back(self.baseline, 5 * UNIT)
        self.assertLessEqual(after["threads"], self.baseline["threads"])
        self.assertEqual(self.relay.get("/health")[0], 200)
        client = self.raw()
        collector = Collector(client)
        collector.start()
        self.addCleanup(collector.stop)
        collector.wait_messages("relay_status", 1, 5 * UNIT)
        self.connection.send_text(b'["still streaming"]')
        wait_for(lambda: len(collector.frames) >= 2, 5 * UNIT, message="a frame after the bad requests")
        self.assertEqual(collector.frames[1][2], b'["still streaming"]')

    def test_bad_requests_clear_status(self) -> None:
        """Each malformed or misdirected request gets its status line and a JSON error, then FIN."""
        for case, request, expected in BAD_REQUESTS:
            with self.subTest(case):
                response, ended, seconds = exchange(self.relay.port, request, 5 * UNIT)
                self.assertEqual(ended, "fin", response[:80])
                self.assertLess(seconds, 2 * UNIT)
                head, _, body = response.partition(b"\r\n\r\n")
                self.assertRegex(head, rb"^HTTP/1\.[01] \d{3} ", f"no status line: {response[:80]!r}")
                self.assertEqual(int(head.split()[1]), expected)
                self.assertIn(b"content-type: application/json", head.lower())
                self.assertIn("error", json.loads(body))
        self.assertEqual(self.client_count(), 0)
        self.assertNotIn("Traceback", self.relay.output)
        self.assert_relay_unaffected()

    def test_bad_request_logs_bounded(self) -> None:
        """Fifty malformed requests log at most five lines, and a 60 KB request line is not echoed whole."""
        for _ in range(50):
            response, ended, _ = exchange(self.relay.port, b"GARBAGE\r\n\r\n", 5 * UNIT)
            self.assertTrue(response.startswith(b"HTTP/1.1 400 "), response[:80])
        long_line = b"GET /" + b"a" * 60_000 + b" HTTP/one\r\n\r\n"
        response, _, _ = exchange(self.relay.port, long_line, 5 * UNIT)
        self.assertTrue(response.startswith(b"HTTP/1.1 400 "), response[:80])
        self.assertLess(len(response), 2000)
        self.assertEqual(self.status()["clients"]["rejected"].get("http_400"), 51)
        self.assertLessEqual(self.count_lines("HTTP 400"), 5)
        self.assertLess(max(len(line) for line in self.relay.lines), 2000)

    def test_slow_and_idle_heads_cut(self) -> None:
        """Idle, partial and one-byte-at-a-time request heads are cut after header_timeout."""
        outcomes: dict[str, tuple[bytes, str, float]] = {}
        outcomes["idle"] = exchange(self.relay.port, b"", 5 * UNIT)
        outcomes["partial request line"] = exchange(self.relay.port, b"GET /hea", 5 * UNIT)

        started = time.monotonic()
        ended = "timeout"
        with socket.create_connection(("127.0.0.1", self.relay.port), timeout=5 * UNIT) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\n")
            sock.settimeout(0.25 * UNIT)
            # One header byte each quarter UNIT: every gap is far below
            # header_timeout, but the whole head never completes.
            for _ in range(int(5 * UNIT / (0.25 * UNIT))):
                try:
                    sock.sendall(b"X")
                    if sock.recv(1024) == b"":
                        ended = "fin"
                        break
                except socket.timeout:
                    continue
                except OSError:
                    ended = "reset"
                    break
        outcomes["trickled headers"] = (b"", ended, time.monotonic() - started)

        for case, (response, how, seconds) in outcomes.items():
            with self.subTest(case):
                self.assertIn(how, ("fin", "reset"))
                self.assertGreaterEqual(seconds, HEADER_TIMEOUT)
                self.assertLess(seconds, HEADER_TIMEOUT + 2 * UNIT)
                self.assertNotIn(b"101", response)
        # The header deadline, not the socket timeout, cuts all three, so each is logged and counted.
        # The log reaches the test through a pipe, so it can arrive after the FIN.
        self.relay.wait_log("no complete request within header_timeout", 5 * UNIT, count=3)
        self.assertEqual(self.count_lines("no complete request within header_timeout"), 3)
        self.assertEqual(self.status()["clients"]["rejected"].get("header_timeout"), 3)
        self.assert_relay_unaffected()


class ConnectionCapTest(RelayCase):
    MAX_HTTP_CONNECTIONS = 4
    sections = {"server": {"max_http_connections": MAX_HTTP_CONNECTIONS, "header_timeout": 30 * UNIT}}

    def test_idle_connections_capped(self) -> None:
        """Idle connections past max_http_connections get 503; websocket clients are not counted."""
        collectors = []
        for _ in range(self.MAX_HTTP_CONNECTIONS + 1):
            collector = Collector(self.raw())
            collector.start()
            self.addCleanup(collector.stop)
            collector.wait_messages("relay_status", 1, 5 * UNIT)
            collectors.append(collector)
        # Five websocket clients fit under a cap of four, because only this request counts.
        self.assertEqual(self.status()["clients"]["httpConnections"], 1)
        baseline = self.baseline_process()

        idle = [socket.create_connection(("127.0.0.1", self.relay.port), timeout=5 * UNIT) for _ in range(self.MAX_HTTP_CONNECTIONS)]
        for sock in idle:
            self.addCleanup(sock.close)
        response, ended, seconds = exchange(self.relay.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 5 * UNIT)
        head, _, body = response.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 503 "), response[:80])
        self.assertIn(b"retry-after: 5", head.lower())
        self.assertIn("max_http_connections", json.loads(body)["error"])
        self.assertEqual(ended, "fin")
        self.assertLess(seconds, 2 * UNIT)

        # Streaming to the connected clients goes on while the cap is reached.
        self.connection.send_text(b'["during the cap"]')
        for collector in collectors:
            wait_for(lambda: len(collector.frames) >= 2, 5 * UNIT, message="a frame while capped")
            self.assertEqual(collector.frames[1][2], b'["during the cap"]')

        for sock in idle:
            sock.close()
        # The relay frees a slot only when it reads the FIN, so a request can still meet the cap.
        capped = [response]

        def slots_freed() -> dict | None:
            code, body = self.relay.get("/status")
            if code == 503 and "max_http_connections" in body.get("error", ""):
                capped.append(body)
            if code == 200 and body["clients"]["httpConnections"] <= 1:
                return body
            return None

        status = wait_for(slots_freed, 5 * UNIT, message="every idle connection's slot freed")
        self.assertEqual(status["clients"]["rejected"].get("max_http_connections"), len(capped))
        self.assertEqual(status["clients"]["maxHttpConnections"], self.MAX_HTTP_CONNECTIONS)
        self.relay.wait_log(r"rejected connection from 127\.0\.0\.1: max_http_connections \(4\) reached", 5 * UNIT)
        self.wait_process_back(baseline, 5 * UNIT)


class OpenFileLimitTest(RelayCase):
    LIMIT = 128

    def test_descriptor_exhaustion_survived(self) -> None:
        """At the open-file limit the relay logs a few lines, does not spin, and recovers."""
        pid = self.relay.process.pid
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (self.LIMIT, self.LIMIT))
        client = self.raw()
        collector = Collector(client)
        collector.start()
        self.addCleanup(collector.stop)
        collector.wait_messages("relay_status", 1, 5 * UNIT)

        idle = []
        for _ in range(2 * self.LIMIT):
            sock = socket.create_connection(("127.0.0.1", self.relay.port), timeout=5 * UNIT)
            self.addCleanup(sock.close)
            idle.append(sock)
        self.relay.wait_log("cannot accept a connection", 5 * UNIT)
        window = 1 * UNIT
        before = process_cpu_seconds(pid)
        time.sleep(window)
        used = process_cpu_seconds(pid) - before
        self.assertLess(used, 0.15 * window, f"{used:.2f} s of CPU in {window:.1f} s at the limit")

        # The connected client keeps streaming while the limit is reached.
        self.connection.send_text(b'["at the limit"]')
        wait_for(lambda: len(collector.frames) >= 2, 5 * UNIT, message="a frame at the limit")
        self.assertEqual(collector.frames[1][2], b'["at the limit"]')

        for sock in idle:
            sock.close()
        wait_for(lambda: self.relay.get("/health")[0] == 200, 10 * UNIT, interval=0.2, message="/health after the limit")
        self.assertLessEqual(self.count_lines("cannot accept a connection"), 6)
        self.assertGreaterEqual(self.status()["clients"]["rejected"].get("open_file_limit", 0), 1)
        self.assertNotIn("Traceback", self.relay.output)


class OpenFileSoftLimitTest(RelayCase):
    def setUp(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard <= 1024:
            self.skipTest(f"the hard open-file limit {hard} leaves nothing to raise")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        self.hard = hard
        super().setUp()

    def test_soft_limit_raised_to_hard(self) -> None:
        """The relay raises its soft open-file limit, since the default caps need over 2,000 descriptors."""
        with open(f"/proc/{self.relay.process.pid}/limits", encoding="ascii") as limits:
            line = next(line for line in limits if line.startswith("Max open files"))
        soft, hard = line.split()[3:5]
        self.assertEqual(int(soft), self.hard)
        self.assertEqual(int(hard), self.hard)
