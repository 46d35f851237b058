"""Slow, frozen, killed and hostile clients against the real relay process.

Clients are raw sockets (``tests.support.RawWebSocket``) so a test controls
every byte and every read, plus the websockets library and Node's ws for
handshakes as real libraries send them.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import unittest

from tests.support import (
    ROOT,
    UNIT,
    Collector,
    FrameStreamer,
    RawWebSocket,
    RelayCase,
    encode_client_frame,
    frame_sent_at,
    numbered_frame,
    parse_frames,
    percentile,
    process_cpu_seconds,
    upgrade_request,
    wait_for,
)

MIB = 1024 * 1024
NODE_MODULES = ROOT / "bench" / "node_modules"
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def close_code_of(payload: bytes) -> int | None:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None


def start_collector(test: unittest.TestCase, client: RawWebSocket, transform=None) -> Collector:
    collector = Collector(client, transform)
    collector.start()
    test.addCleanup(collector.stop)
    return collector


class StalledClientTest(RelayCase):
    QUEUE_MAX_BYTES = 2 * MIB
    FRAMES = 200
    PAD = 100_000
    WINDOW = 10
    sections = {
        "clients": {"queue_max_bytes": QUEUE_MAX_BYTES, "queue_max_frames": 100_000, "close_timeout": 5 * UNIT}
    }

    def _push(self, phase: int, collectors: list[Collector]) -> None:
        """Send FRAMES frames of about 100 KB, each stamped with its send time, 5 ms apart.

        Sending pauses while a collector has WINDOW frames (1 MB) unread, so
        a collector scheduled late stays under its 2 MiB queue cap.
        """
        # Every earlier phase has fully arrived, so this phase's frames are
        # the ones past the current length of each collector's list.
        starts = [len(collector.numbers) for collector in collectors]
        for number in range(self.FRAMES):
            for collector, start in zip(collectors, starts):
                wait_for(
                    lambda: len(collector.numbers) - start >= number + 1 - self.WINDOW,
                    20 * UNIT,
                    interval=0.001,
                    message=f"phase {phase} frame {number - self.WINDOW}",
                )
            self.connection.send_text(numbered_frame(number, phase, self.PAD, sent_at=time.monotonic()))
            time.sleep(0.005)

    def _p99(self, collectors: list[Collector], phase: int) -> float:
        for collector in collectors:
            wait_for(lambda: sum(1 for conn, _ in collector.numbers if conn == phase) >= self.FRAMES, 20 * UNIT, message=f"phase {phase} frames")
        latencies = []
        for collector in collectors:
            for arrived, opcode, sent_at in list(collector.frames):
                if opcode == TEXT and sent_at is not None and sent_at >= self.phase_started[phase]:
                    latencies.append(arrived - sent_at)
        self.assertEqual(len(latencies), self.FRAMES * len(collectors))
        return percentile(latencies, 0.99)

    def test_stalled_client_others_unaffected(self) -> None:
        """One of ten clients stops reading: the nine keep their latency, it gets 4008, RSS recovers."""
        healthy = [self.raw() for _ in range(9)]
        collectors = [start_collector(self, client, frame_sent_at) for client in healthy]
        wait_for(lambda: all(collector.frames for collector in collectors), 5 * UNIT)
        baseline_rss = self.process()["rssBytes"]
        self.phase_started = {1: time.monotonic()}
        self._push(1, collectors)
        baseline_p99 = self._p99(collectors, 1)

        stalled = self.raw(rcvbuf=4096)
        self.assertEqual(stalled.status, 101)
        wait_for(lambda: self.client_count() == 10, 5 * UNIT)
        self.phase_started[2] = time.monotonic()
        self._push(2, collectors)
        stalled_p99 = self._p99(collectors, 2)
        self.relay.wait_log("slow consumer", 10 * UNIT)

        # Read what the stalled client was sent: whole frames, then the close frame.
        stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 * MIB)
        codes = []
        while not codes:
            opcode, payload, _ = stalled.recv_frame(5 * UNIT)
            if opcode == CLOSE:
                codes.append(close_code_of(payload))
                reason = payload[2:]
        stalled.send_frame(CLOSE, struct.pack("!H", 4008))
        self.assertEqual(codes, [4008])
        self.assertEqual(reason, b"slow consumer")
        wait_for(lambda: self.client_count() == 9, 10 * UNIT)

        self.assertLessEqual(stalled_p99, max(5 * baseline_p99, baseline_p99 + 0.5 * UNIT), f"baseline p99 {baseline_p99:.4f} s")
        self.assertEqual(self.count_lines("slow consumer"), 1)
        status = self.status()
        self.assertEqual(status["clients"]["closedSlow"], 1)
        self.assertEqual(status["clients"]["connected"], 9)
        for collector in collectors:
            self.assertEqual(collector.ended, "")
        # NOTE: glibc keeps some freed memory, so RSS gets a generous margin:
        # four times the queue cap plus 16 MiB over the level before the bursts.
        bound = baseline_rss + 4 * self.QUEUE_MAX_BYTES + 16 * MIB
        wait_for(lambda: self.process()["rssBytes"] <= bound, 10 * UNIT, interval=0.2, message=f"RSS under {bound}")


class ZeroWindowClientTest(RelayCase):
    SEND_TIMEOUT = 1 * UNIT
    sections = {
        "clients": {
            "send_timeout": SEND_TIMEOUT,
            "queue_max_bytes": 256 * MIB,
            "queue_max_frames": 100_000,
            "close_timeout": 0.5 * UNIT,
        }
    }

    def test_blocked_writer_cut(self) -> None:
        """A client that never reads blocks its writer; after send_timeout it is cut and removed."""
        stuck = self.raw(rcvbuf=4096)
        self.assertEqual(stuck.status, 101)
        reader = start_collector(self, self.raw())
        wait_for(lambda: self.client_count() == 2, 5 * UNIT)
        frame = numbered_frame(0, 1, 100_000)
        first_push = time.monotonic()
        for _ in range(100):
            self.connection.send_text(frame)
        last_push = time.monotonic()
        self.relay.wait_log("cut: its socket accepted no data", self.SEND_TIMEOUT + 10 * UNIT)
        cut_at = self.line_time("cut: its socket accepted no data")
        # The writer cannot block before the first frame, and it blocks by the last.
        self.assertGreaterEqual(cut_at - first_push, self.SEND_TIMEOUT)
        self.assertLessEqual(cut_at - last_push, self.SEND_TIMEOUT + 3 * UNIT)
        wait_for(lambda: self.client_count() == 1, 5 * UNIT)
        reader.wait_numbers(100, 10 * UNIT)
        status = self.status()
        self.assertEqual(status["clients"]["closedByCause"].get("send_timeout"), 1)
        self.assertEqual(status["clients"]["closedSlow"], 0)
        self.assertEqual(self.count_lines("cut: its socket accepted no data"), 1)
        listing = self.relay.get("/api/clients")[1]
        self.assertEqual([row["id"] for row in listing["clients"]], [2])


class BehindClientTest(RelayCase):
    PING_INTERVAL = 0.5 * UNIT
    sections = {"clients": {"ping_interval": PING_INTERVAL, "queue_max_bytes": 256 * MIB}}

    def test_reader_behind_not_ping_timeout(self) -> None:
        """A client that reads steadily but far behind is not closed for ping timeout."""
        client = self.raw(rcvbuf=65536)
        self.assertEqual(client.status, 101)
        self.assertEqual(client.recv_data(5 * UNIT)[0], TEXT)
        frames = [numbered_frame(number, 1, 100_000) for number in range(300)]
        for frame in frames:
            self.connection.send_text(frame)
        # About 10 MB/s at most, so the 30 MB backlog hides each ping for
        # several ping intervals.
        received = []
        for _ in frames:
            received.append(client.recv_data(10 * UNIT))
            time.sleep(0.01)
        self.assertEqual(received, [(TEXT, frame) for frame in frames])
        status = self.status()
        self.assertEqual(status["clients"]["connected"], 1)
        self.assertEqual(status["clients"]["droppedNoPong"], 0)


    def test_slow_reader_behind_socket_buffers(self) -> None:
        """A client reading at half the feed rate, behind its socket buffers, keeps its connection."""
        client = self.raw()
        self.assertEqual(client.status, 101)
        stop = threading.Event()
        frame = json.dumps([{"pad": "x" * 9900}]).encode()

        def feed() -> None:
            # About 200 KB/s for as long as the client reads.
            while not stop.is_set():
                self.connection.send_text(frame)
                time.sleep(0.05)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        self.addCleanup(feeder.join, 5 * UNIT)
        self.addCleanup(stop.set)
        # Read about 100 KB/s, replying to every ping, for eight ping intervals.
        client.sock.settimeout(1 * UNIT)
        ended = ""
        deadline = time.monotonic() + 8 * self.PING_INTERVAL
        while time.monotonic() < deadline and not ended:
            try:
                chunk = client.sock.recv(10_000)
            except socket.timeout:
                continue
            if not chunk:
                ended = "EOF"
                break
            client.parser.feed(chunk)
            while (parsed := client.parser.next_frame()) is not None:
                opcode, payload, _ = parsed
                if opcode == PING:
                    client.send_frame(PONG, payload)
                elif opcode == CLOSE:
                    ended = f"close {close_code_of(payload)} {payload[2:]!r}"
            time.sleep(0.1)
        stop.set()
        self.assertEqual(ended, "")
        self.assertEqual(self.status()["clients"]["droppedNoPong"], 0)


class HighDescriptorTest(RelayCase):
    """A client whose socket number is above 1023, the highest select() accepts."""

    INHERITED = 1100

    def setUp(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        needed = self.INHERITED + 256
        if soft < needed:
            if hard != resource.RLIM_INFINITY and hard < needed:
                self.skipTest(f"the open-file limit {hard} is under {needed}")
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(self.INHERITED)]
        for descriptor in fillers:
            self.addCleanup(os.close, descriptor)
        self.pass_fds = tuple(fillers)
        super().setUp()

    def test_blocked_writer_resumes(self) -> None:
        """A client that stops reading, then reads again, gets every frame."""
        pid = self.relay.process.pid
        self.assertGreater(len(os.listdir(f"/proc/{pid}/fd")), self.INHERITED)
        client = self.raw(rcvbuf=4096)
        self.assertEqual(client.status, 101)
        self.assertEqual(client.recv_data(5 * UNIT)[0], TEXT)
        # 8 MB is more than the socket buffers hold with Linux defaults (the
        # send side stops at 4 MiB), so the relay's writer waits for the socket.
        frames = [numbered_frame(number, 1, 50_000) for number in range(160)]
        for frame in frames:
            self.connection.send_text(frame)
        wait_for(lambda: any(entry["queuedBytes"] > 0 for entry in self.relay.get("/api/clients")[1]["clients"]), 5 * UNIT, message="a backlog")
        time.sleep(0.5 * UNIT)
        received = [client.recv_data(5 * UNIT) for _ in frames]
        self.assertEqual(received, [(TEXT, frame) for frame in frames])
        self.assertEqual(self.status()["clients"]["connected"], 1)


class FrozenClientTest(RelayCase):
    PING_INTERVAL = 0.5 * UNIT
    CLOSE_TIMEOUT = 0.5 * UNIT
    sections = {"clients": {"ping_interval": PING_INTERVAL, "close_timeout": CLOSE_TIMEOUT}}

    def test_frozen_client_removed(self) -> None:
        """A client silent after its handshake goes within two ping intervals; one that pongs stays."""
        baseline = self.baseline_process()
        answering = start_collector(self, self.raw())
        started = time.monotonic()
        frozen = self.raw()
        self.assertEqual(frozen.status, 101)
        wait_for(lambda: self.client_count() == 2, 5 * UNIT)
        wait_for(lambda: self.client_count() == 1, 2 * self.PING_INTERVAL + self.CLOSE_TIMEOUT + 5 * UNIT, interval=0.05)
        removed_after = time.monotonic() - started
        self.assertGreaterEqual(removed_after, 2 * self.PING_INTERVAL)
        self.assertLessEqual(removed_after, 2 * self.PING_INTERVAL + self.PING_INTERVAL / 4 + self.CLOSE_TIMEOUT + 3 * UNIT)
        self.relay.wait_log(r"client 2 .*closed: nothing received for", 5 * UNIT)
        self.assertEqual(self.count_lines(r"client 2 .*closed: nothing received for"), 1)
        self.assertEqual(self.status()["clients"]["droppedNoPong"], 1)
        frozen.close()
        # The client that sends pongs outlives three ping intervals.
        time.sleep(max(0.0, started + 3 * self.PING_INTERVAL - time.monotonic()))
        self.assertEqual(self.client_count(), 1)
        self.assertEqual(answering.ended, "")
        answering.client.sock.shutdown(socket.SHUT_RDWR)
        answering.stop()
        wait_for(lambda: self.client_count() == 0, 5 * UNIT)
        after = self.wait_process_back(baseline, 5 * UNIT)
        self.assertLessEqual(after["threads"], baseline["threads"])


# A child process that opens N connections and reads them until killed or
# 60 UNIT have passed.
HOLDER = """
import selectors, sys, time
sys.path.insert(0, sys.argv[1])
from tests.support import RawWebSocket
port, count, lifetime = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
clients = [RawWebSocket(port) for _ in range(count)]
selector = selectors.DefaultSelector()
for client in clients:
    client.sock.setblocking(False)
    selector.register(client.sock, selectors.EVENT_READ)
print("ready", flush=True)
deadline = time.monotonic() + lifetime
while time.monotonic() < deadline:
    for key, _ in selector.select(0.5):
        try:
            key.fileobj.recv(262144)
        except OSError:
            pass
"""


class KilledClientsTest(RelayCase):
    def test_half_killed_during_burst(self) -> None:
        """25 of 50 clients die by kill -9 mid-burst: survivors get every frame in order."""
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(ROOT), str(self.relay.port), "25", str(60 * UNIT)],
            stdout=subprocess.PIPE,
        )
        self.addCleanup(holder.wait)
        self.addCleanup(holder.kill)
        survivors = [start_collector(self, self.raw()) for _ in range(25)]
        self.assertEqual(holder.stdout.readline().strip(), b"ready")
        wait_for(lambda: self.client_count() == 50, 5 * UNIT)

        streamer = FrameStreamer(self.connection, 1, 0.001, pad=1000, limit=1500)
        streamer.start()
        wait_for(lambda: streamer.sent >= 500, 10 * UNIT)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(5 * UNIT)
        streamer.join(20 * UNIT)
        self.assertEqual(streamer.sent, 1500)

        for index, collector in enumerate(survivors):
            numbers = collector.wait_numbers(1500, 10 * UNIT)
            self.assertEqual(numbers, [(1, n) for n in range(1500)], f"survivor {index}")
        wait_for(lambda: self.client_count() == 25, 10 * UNIT)
        status = self.status()
        self.assertEqual(status["clients"]["connected"], 25)
        self.assertEqual(sum(status["clients"]["closedByCause"].values()), 25)
        self.assertEqual(status["clients"]["totalAccepted"], 50)
        self.assertEqual(self.relay.get("/health")[1]["connectedClients"], 25)
        self.assertNotIn("Traceback", self.relay.output)
        self.assertNotIn("Exception in thread", self.relay.output)


def cycle(port: int, mode: int) -> str:
    """Run one connect/close cycle; return "101", "closed" or a failure text."""
    sock = socket.socket()
    sock.settimeout(5 * UNIT)
    try:
        sock.connect(("127.0.0.1", port))
    except OSError as error:
        sock.close()
        return f"connect failed: {error}"
    try:
        if mode == 0:
            return "closed"
        request = upgrade_request("dGhlIHNhbXBsZSBub25jZQ==")
        if mode == 1:
            sock.sendall(request[:20])
            return "closed"
        sock.sendall(request)
        if mode == 2:
            return "closed"
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                return f"closed before the response: {head!r}"
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            return f"not upgraded: {head[:40]!r}"
        if mode == 4:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif mode == 5:
            sock.sendall(encode_client_frame(CLOSE, struct.pack("!H", 1000)))
        return "101"
    except OSError as error:
        return f"failed: {error}"
    finally:
        sock.close()


class ConnectChurnTest(RelayCase):
    CYCLES = 1000
    WORKERS = 8

    def test_thousand_cycles_no_leak(self) -> None:
        """1,000 connect/close cycles (some mid-handshake, some after the 101): no leak, idle CPU."""
        baseline = self.baseline_process()
        results: list[str] = []
        lock = threading.Lock()

        def worker(offset: int) -> None:
            for index in range(offset, self.CYCLES, self.WORKERS):
                outcome = cycle(self.relay.port, index % 6)
                with lock:
                    results.append(outcome)

        workers = [threading.Thread(target=worker, args=(offset,), daemon=True) for offset in range(self.WORKERS)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(120 * UNIT)

        self.assertEqual(len(results), self.CYCLES)
        failures = [outcome for outcome in results if outcome not in ("101", "closed")]
        self.assertEqual(failures, [])
        upgraded = results.count("101")
        self.assertEqual(upgraded, sum(1 for index in range(self.CYCLES) if index % 6 >= 3))
        wait_for(lambda: self.client_count() == 0, 10 * UNIT)
        after = self.wait_process_back(baseline, 10 * UNIT, thread_slack=1, fd_slack=2)
        self.assertLessEqual(after["threads"], baseline["threads"] + 1)
        self.assertLessEqual(after["openFds"], baseline["openFds"] + 2)
        self.assertGreaterEqual(self.status()["clients"]["totalAccepted"], upgraded)
        self.assertEqual(self.relay.get("/health")[0], 200)

        pid = self.relay.process.pid
        window = 1 * UNIT
        before_cpu = process_cpu_seconds(pid)
        time.sleep(window)
        used = process_cpu_seconds(pid) - before_cpu
        self.assertLess(used, 0.05 * window, f"{used:.3f} s of CPU in {window:.1f} s idle")


class LargeFramesTest(RelayCase):
    SIZES = [1 * MIB, 4 * MIB, 2 * MIB + 12345, 3 * MIB + 7]

    def test_large_frames_every_client(self) -> None:
        """1-4 MiB text and binary frames reach 20 clients byte-identical."""
        collectors = [start_collector(self, self.raw(), lambda payload: hashlib.sha256(payload).hexdigest()) for _ in range(20)]
        wait_for(lambda: self.client_count() == 20, 5 * UNIT)
        frames = []
        for index, size in enumerate(self.SIZES):
            if index % 2:
                payload = os.urandom(size)
                self.connection.send_binary(payload)
                frames.append((BINARY, hashlib.sha256(payload).hexdigest()))
            else:
                payload = json.dumps([{"event": "big", "blob": os.urandom(size // 2 - 40).hex()}]).encode()
                self.assertGreaterEqual(len(payload), 1 * MIB - 100)
                self.connection.send_text(payload)
                frames.append((TEXT, hashlib.sha256(payload).hexdigest()))
        for index, collector in enumerate(collectors):
            wait_for(lambda: len(collector.frames) >= 1 + len(frames), 30 * UNIT, message=f"client {index} frames")
            received = [(opcode, digest) for _, opcode, digest in collector.frames[1:]]
            self.assertEqual(received, frames, f"client {index}")
        wait_for(lambda: self.status()["traffic"]["framesDelivered"] == 20 * len(frames), 5 * UNIT)
        self.assertEqual(self.status()["clients"]["closedSlow"], 0)


class ClientInputTest(RelayCase):
    sections = {"clients": {"max_message_bytes": 1024, "message_rate": 5, "message_burst": 10}}

    def open(self) -> RawWebSocket:
        client = self.raw()
        self.assertEqual(client.status, 101)
        opcode, payload = client.recv_data()
        self.assertEqual(json.loads(payload)["type"], "relay_status")
        return client

    def assert_closed_with(self, client: RawWebSocket, code: int) -> bytes:
        opcode, payload = client.recv_data()
        self.assertEqual(opcode, CLOSE)
        self.assertEqual(close_code_of(payload), code)
        return payload[2:]

    def test_message_size_limit(self) -> None:
        """A message of max_message_bytes gets a reply; one byte more closes with 1009."""
        client = self.open()
        client.send_frame(TEXT, b"x" * 1024)
        self.assertEqual(json.loads(client.recv_data()[1])["type"], "error")
        client.send_frame(TEXT, b"x" * 1025)
        self.assert_closed_with(client, 1009)

    def test_fragmented_binary_closed_1003(self) -> None:
        """A binary message sent in two fragments closes with 1003."""
        client = self.open()
        client.send_frame(BINARY, b"\x01\x02", fin=False)
        client.send_frame(0x0, b"\x03")
        self.assert_closed_with(client, 1003)

    def test_invalid_json_then_ping(self) -> None:
        """Invalid JSON and a non-object get error replies; the connection stays open."""
        client = self.open()
        for text in (b"{oops", b"[1, 2]", b'"ping"'):
            client.send_frame(TEXT, text)
            self.assertEqual(json.loads(client.recv_data()[1])["type"], "error")
        client.send_frame(TEXT, b'{"type": "ping"}')
        self.assertEqual(json.loads(client.recv_data()[1])["type"], "pong")

    def test_flood_closed_1008(self) -> None:
        """Ten messages (the burst) get replies; a flood past the rate limit closes with 1008."""
        client = self.open()
        for _ in range(10):
            client.send_frame(TEXT, b'{"type":"ping"}')
        for _ in range(10):
            self.assertEqual(json.loads(client.recv_data()[1])["type"], "pong")
        for _ in range(50):
            try:
                client.send_frame(TEXT, b'{"type":"ping"}')
            except OSError:
                break
        while True:
            opcode, payload = client.recv_data()
            if opcode == CLOSE:
                break
        self.assertEqual(close_code_of(payload), 1008)
        self.assertEqual(payload[2:], b"message rate limit exceeded")
        # The log line may reach the reader thread after the close frame.
        self.relay.wait_log("closed: more than 5 messages/s", 5 * UNIT)
        self.assertEqual(self.count_lines("closed: more than 5 messages/s"), 1)

    def test_fragmented_ping_gets_pong(self) -> None:
        """A {"type":"ping"} split over a text frame and a continuation frame gets a pong."""
        client = self.open()
        client.send_frame(TEXT, b'{"type":', fin=False)
        client.send_frame(0x0, b' "ping"}')
        self.assertEqual(json.loads(client.recv_data()[1])["type"], "pong")

    def test_ping_between_fragments(self) -> None:
        """A protocol ping between two fragments gets its pong before the message gets its reply."""
        client = self.open()
        client.send_frame(TEXT, b'{"type":', fin=False)
        client.send_frame(PING, b"mid")
        client.send_frame(0x0, b'"ping"}')
        self.assertEqual(client.recv_frame()[:2], (PONG, b"mid"))
        opcode, payload, _ = client.recv_frame()
        self.assertEqual(json.loads(payload)["type"], "pong")

    def test_protocol_ping_gets_pong(self) -> None:
        """A protocol ping gets a pong with the same payload; the connection stays open."""
        client = self.open()
        client.send_frame(PING, b"hello")
        self.assertEqual(client.recv_frame(), (PONG, b"hello", True))
        client.send_frame(TEXT, b'{"type":"ping"}')
        self.assertEqual(json.loads(client.recv_data()[1])["type"], "pong")

    def test_protocol_violations_closed_1002(self) -> None:
        """Frames RFC 6455 forbids close the connection with 1002 (1007 for bad UTF-8)."""
        cases = [
            ("unmasked frame", encode_client_frame(TEXT, b'{"type":"ping"}', mask=False), 1002),
            ("control frame over 125 bytes", encode_client_frame(PING, b"a" * 126), 1002),
            ("fragmented control frame", encode_client_frame(PING, b"a", fin=False), 1002),
            ("continuation without a start", encode_client_frame(0x0, b"abc"), 1002),
            ("reserved opcode 3", encode_client_frame(0x3, b"abc"), 1002),
            ("RSV1 without an extension", bytes([0xC1]) + encode_client_frame(TEXT, b"{}")[1:], 1002),
            ("close code 999", encode_client_frame(CLOSE, struct.pack("!H", 999)), 1002),
            ("text not valid UTF-8", encode_client_frame(TEXT, b'"\xff"'), 1007),
        ]
        for name, frame, code in cases:
            with self.subTest(name):
                client = self.open()
                client.sock.sendall(frame)
                self.assert_closed_with(client, code)
                data, ended = client.read_to_end(5 * UNIT)
                self.assertEqual(data, b"")
                self.assertEqual(ended, "fin")
        wait_for(lambda: self.client_count() == 0, 5 * UNIT)


class CloseSequenceTest(RelayCase):
    def test_client_close_echoed_then_fin(self) -> None:
        """A client's close frame is echoed once, then FIN; no byte follows."""
        client = self.raw()
        client.recv_data()
        client.send_frame(CLOSE, struct.pack("!H", 1000) + b"bye")
        data, ended = client.read_to_end(5 * UNIT)
        self.assertEqual(ended, "fin")
        frames = parse_frames(data)
        self.assertEqual(len(frames), 1)
        self.assertEqual(frames[0][0], CLOSE)
        self.assertEqual(close_code_of(frames[0][1]), 1000)
        self.assertNotIn(b"HTTP/", data)

    def test_relay_close_then_fin(self) -> None:
        """The relay's own close (1003 for binary) comes as a close frame, then FIN after the reply."""
        client = self.raw()
        client.recv_data()
        client.send_frame(BINARY, b"\x00")
        opcode, payload = client.recv_data()
        self.assertEqual(opcode, CLOSE)
        self.assertEqual(close_code_of(payload), 1003)
        client.send_frame(CLOSE, payload[:2])
        data, ended = client.read_to_end(5 * UNIT)
        self.assertEqual(data, b"")
        self.assertEqual(ended, "fin")


class HandshakeTest(RelayCase):
    ORIGIN = "http://localhost:8080"
    sections = {"security": {"allowed_origins": ORIGIN}}
    CHROME = {
        "Host": "127.0.0.1",
        "Connection": "Upgrade",
        "Pragma": "no-cache",
        "Cache-Control": "no-cache",
        "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
        "Upgrade": "websocket",
        "Origin": ORIGIN,
        "Sec-WebSocket-Version": "13",
        "Accept-Encoding": "gzip, deflate, br, zstd",
        "Accept-Language": "en-US,en;q=0.9",
        "Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits",
        "Sec-WebSocket-Protocol": "json, bptf.v1",
    }
    FIREFOX = {
        "Host": "127.0.0.1",
        "User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
        "Accept": "*/*",
        "Accept-Language": "en-US,en;q=0.5",
        "Accept-Encoding": "gzip, deflate, br, zstd",
        "Sec-WebSocket-Version": "13",
        "Origin": ORIGIN,
        "Sec-WebSocket-Extensions": "permessage-deflate",
        "Connection": "keep-alive, Upgrade",
        "Sec-Fetch-Dest": "empty",
        "Sec-Fetch-Mode": "websocket",
        "Sec-Fetch-Site": "same-site",
        "Pragma": "no-cache",
        "Cache-Control": "no-cache",
        "Upgrade": "websocket",
    }

    def test_browser_handshakes_accepted(self) -> None:
        """Chrome- and Firefox-like upgrades get a 101 without extensions and uncompressed frames."""
        for name, headers in (("chrome", self.CHROME), ("firefox", self.FIREFOX)):
            with self.subTest(name):
                client = RawWebSocket(self.relay.port, handshake=False)
                self.addCleanup(client.close)
                self.assertEqual(client.handshake(headers=headers), 101)
                self.assertEqual(client.headers["sec-websocket-accept"], client.expected_accept())
                self.assertNotIn("sec-websocket-extensions", client.headers)
                # Like a Node ws server, the relay accepts the first subprotocol offered.
                offered = headers.get("Sec-WebSocket-Protocol")
                expected = offered.split(",")[0].strip() if offered else None
                self.assertEqual(client.headers.get("sec-websocket-protocol"), expected)
                first = bytes(client.parser.buffer[:1]) or client.sock.recv(1, socket.MSG_PEEK)
                # FIN and text opcode, RSV1 clear: not compressed.
                self.assertEqual(first, b"\x81")
                opcode, payload = client.recv_data()
                self.assertEqual(json.loads(payload)["type"], "relay_status")

    def test_websockets_library_client(self) -> None:
        """The websockets library's client (which offers permessage-deflate) connects and receives."""
        try:
            from websockets.sync.client import connect
        except ImportError:
            self.skipTest("the websockets package is not installed (pip install websockets)")

        with connect(self.relay.ws_url, open_timeout=5 * UNIT, close_timeout=1 * UNIT) as ws:
            self.assertIsNone(ws.response.headers.get("Sec-WebSocket-Extensions"))
            self.assertEqual(json.loads(ws.recv(timeout=5 * UNIT))["type"], "relay_status")
            frame = b'[{"event":"listing-update","payload":{"id":"\xc3\xa9"}}]'
            self.connection.send_text(frame)
            self.assertEqual(ws.recv(timeout=5 * UNIT, decode=False), frame)

    @unittest.skipUnless(shutil.which("node") and (NODE_MODULES / "ws").is_dir(), "needs node and bench/node_modules/ws (npm install in bench/)")
    def test_node_ws_handshake(self) -> None:
        """Node's ws client, permessage-deflate offered, connects with no extension negotiated."""
        script = (
            "const WebSocket = require('ws');"
            "const ws = new WebSocket(process.argv[1], {perMessageDeflate: true, origin: process.argv[2]});"
            "const timer = setTimeout(() => { console.log(JSON.stringify({error: 'timeout'})); process.exit(2); }, Number(process.argv[3]));"
            "ws.on('message', (data, binary) => { console.log(JSON.stringify({extensions: ws.extensions, protocol: ws.protocol,"
            " type: JSON.parse(data).type})); clearTimeout(timer); ws.close(); });"
            "ws.on('error', (error) => { console.log(JSON.stringify({error: String(error)})); process.exit(1); });"
        )
        result = subprocess.run(
            ["node", "-e", script, self.relay.ws_url, self.ORIGIN, str(int(5000 * UNIT))],
            capture_output=True, text=True, timeout=10 * UNIT, env=dict(os.environ, NODE_PATH=str(NODE_MODULES)),
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        row = json.loads(result.stdout.splitlines()[0])
        self.assertEqual(row, {"extensions": "", "protocol": "", "type": "relay_status"})


if __name__ == "__main__":
    unittest.main()
