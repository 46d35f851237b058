"""Tests for relay.notify against a real AF_UNIX datagram socket bound by the test."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import uuid

from relay.notify import SystemdNotifier, WatchdogLoop, start_watchdog_loop

# Base time unit in seconds. Raise RELAY_TEST_UNIT on slow machines.
UNIT = float(os.environ.get("RELAY_TEST_UNIT", "1.0"))

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Variables removed for the relay child process: the first three override its
# config file, the others would come from a systemd that runs the test itself.
RELAY_ENVIRONMENT = (
    "PORT",
    "BACKPACK_WS_URL",
    "LOG_LEVEL",
    "JOURNAL_STREAM",
    "WATCHDOG_PID",
)


class NotifyReceiver:
    """Datagram socket standing in for systemd's notify socket."""

    def __init__(self, abstract: bool = False) -> None:
        """Bind a socket in a temporary directory, or in the abstract namespace."""
        self._directory: tempfile.TemporaryDirectory[str] | None = None
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"bptf-relay-test-{os.getpid()}-{uuid.uuid4().hex}"
            self.socket.bind("\0" + name)
            self.environ_value = "@" + name
        else:
            self._directory = tempfile.TemporaryDirectory()
            path = os.path.join(self._directory.name, "notify")
            self.socket.bind(path)
            self.environ_value = path

    def close(self) -> None:
        """Close the socket and remove the temporary directory."""
        self.socket.close()
        if self._directory is not None:
            self._directory.cleanup()

    def receive(self, timeout: float = 2.0 * UNIT) -> str | None:
        """Return the next datagram as text, or None after ``timeout`` seconds."""
        self.socket.settimeout(timeout)
        try:
            data = self.socket.recv(4096)
        except socket.timeout:
            return None
        return data.decode("utf-8")

    def collect(self, duration: float) -> list[tuple[float, str]]:
        """Return (monotonic time, text) of every datagram within ``duration`` s."""
        messages = []
        deadline = time.monotonic() + duration
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return messages
            text = self.receive(remaining)
            if text is not None:
                messages.append((time.monotonic(), text))

    def drain(self) -> list[str]:
        """Return the datagrams already queued, without waiting."""
        messages = []
        self.socket.setblocking(False)
        try:
            while True:
                messages.append(self.socket.recv(4096).decode("utf-8"))
        except BlockingIOError:
            return messages
        finally:
            self.socket.setblocking(True)


class NotifierTestCase(unittest.TestCase):
    """Test case with a bound NotifyReceiver in ``self.receiver``."""

    def setUp(self) -> None:
        self.receiver = NotifyReceiver()
        self.addCleanup(self.receiver.close)

    def make_notifier(self, **extra: str) -> SystemdNotifier:
        environ = {"NOTIFY_SOCKET": self.receiver.environ_value, **extra}
        notifier = SystemdNotifier(environ)
        self.addCleanup(notifier.close)
        return notifier


class SystemdNotifierTest(NotifierTestCase):
    def test_ready_sends_ready(self) -> None:
        notifier = self.make_notifier()

        self.assertTrue(notifier.enabled)
        self.assertTrue(notifier.ready())
        self.assertEqual(self.receiver.receive(), "READY=1")

    def test_abstract_socket_name(self) -> None:
        receiver = NotifyReceiver(abstract=True)
        self.addCleanup(receiver.close)
        notifier = SystemdNotifier({"NOTIFY_SOCKET": receiver.environ_value})
        self.addCleanup(notifier.close)

        self.assertTrue(notifier.enabled)
        self.assertTrue(notifier.ready())
        self.assertEqual(receiver.receive(), "READY=1")
        self.assertTrue(notifier.stopping())
        self.assertEqual(receiver.receive(), "STOPPING=1")

    def test_status_sent_only_on_change(self) -> None:
        notifier = self.make_notifier()

        self.assertTrue(notifier.status("connected, 0 clients"))
        self.assertFalse(notifier.status("connected, 0 clients"))
        self.assertTrue(notifier.status("connected, 1 clients"))
        self.assertFalse(notifier.status("connected, 1 clients"))
        self.assertTrue(notifier.status("connected, 0 clients"))

        self.assertEqual(self.receiver.receive(), "STATUS=connected, 0 clients")
        self.assertEqual(self.receiver.receive(), "STATUS=connected, 1 clients")
        self.assertEqual(self.receiver.receive(), "STATUS=connected, 0 clients")
        self.assertEqual(self.receiver.drain(), [])

    def test_status_line_breaks_become_spaces(self) -> None:
        notifier = self.make_notifier()

        notifier.status("upstream down\nretrying")

        self.assertEqual(self.receiver.receive(), "STATUS=upstream down retrying")

    def test_stopping_sends_stopping(self) -> None:
        notifier = self.make_notifier()

        self.assertTrue(notifier.stopping())
        self.assertEqual(self.receiver.receive(), "STOPPING=1")

    def test_send_raw_message(self) -> None:
        notifier = self.make_notifier()

        self.assertTrue(notifier.send("READY=1\nSTATUS=up"))
        self.assertEqual(self.receiver.receive(), "READY=1\nSTATUS=up")

    def test_close_then_send_reopens(self) -> None:
        notifier = self.make_notifier()
        notifier.ready()
        notifier.close()

        self.assertTrue(notifier.stopping())
        self.assertEqual(self.receiver.receive(), "READY=1")
        self.assertEqual(self.receiver.receive(), "STOPPING=1")

    def test_watchdog_interval_half_of_usec(self) -> None:
        notifier = self.make_notifier(WATCHDOG_USEC="30000000")

        self.assertTrue(notifier.watchdog_enabled)
        self.assertEqual(notifier.watchdog_interval, 15.0)
        self.assertTrue(notifier.watchdog())
        self.assertEqual(self.receiver.receive(), "WATCHDOG=1")

    def test_watchdog_pid_of_this_process(self) -> None:
        notifier = self.make_notifier(
            WATCHDOG_USEC="2000000", WATCHDOG_PID=str(os.getpid())
        )

        self.assertEqual(notifier.watchdog_interval, 1.0)
        self.assertTrue(notifier.watchdog())

    def test_watchdog_pid_of_other_process(self) -> None:
        notifier = self.make_notifier(
            WATCHDOG_USEC="2000000", WATCHDOG_PID=str(os.getpid() + 1)
        )

        self.assertFalse(notifier.watchdog_enabled)
        self.assertIsNone(notifier.watchdog_interval)
        self.assertFalse(notifier.watchdog())
        self.assertEqual(self.receiver.drain(), [])

    def test_watchdog_without_usec(self) -> None:
        notifier = self.make_notifier()

        self.assertIsNone(notifier.watchdog_interval)
        self.assertFalse(notifier.watchdog())
        self.assertEqual(self.receiver.drain(), [])

    def test_invalid_watchdog_values_ignored(self) -> None:
        cases = [
            {"WATCHDOG_USEC": "soon"},
            {"WATCHDOG_USEC": "0"},
            {"WATCHDOG_USEC": "-5"},
            {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "main"},
        ]
        for extra in cases:
            with self.subTest(extra=extra):
                with self.assertLogs("relay.notify", logging.WARNING):
                    notifier = self.make_notifier(**extra)
                self.assertIsNone(notifier.watchdog_interval)

    def test_no_notify_socket_is_noop(self) -> None:
        notifier = SystemdNotifier({"WATCHDOG_USEC": "1000000"})

        self.assertFalse(notifier.enabled)
        self.assertIsNone(notifier.watchdog_interval)
        self.assertFalse(notifier.ready())
        self.assertFalse(notifier.status("up"))
        self.assertFalse(notifier.watchdog())
        self.assertFalse(notifier.stopping())
        self.assertFalse(notifier.send("READY=1"))
        notifier.close()
        self.assertEqual(notifier.send_failures, 0)

    def test_empty_notify_socket_is_noop(self) -> None:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": ""})

        self.assertFalse(notifier.enabled)
        self.assertFalse(notifier.ready())

    def test_relative_notify_socket_rejected(self) -> None:
        with self.assertLogs("relay.notify", logging.WARNING) as logs:
            notifier = SystemdNotifier({"NOTIFY_SOCKET": "run/notify"})

        self.assertFalse(notifier.enabled)
        self.assertFalse(notifier.ready())
        self.assertIn("run/notify", logs.output[0])

    def test_default_environ_is_os_environ(self) -> None:
        saved = os.environ.get("NOTIFY_SOCKET")
        os.environ["NOTIFY_SOCKET"] = self.receiver.environ_value
        try:
            notifier = SystemdNotifier()
        finally:
            if saved is None:
                del os.environ["NOTIFY_SOCKET"]
            else:
                os.environ["NOTIFY_SOCKET"] = saved
        self.addCleanup(notifier.close)

        self.assertTrue(notifier.ready())
        self.assertEqual(self.receiver.receive(), "READY=1")

    def test_send_failure_logged_once_and_counted(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        missing = os.path.join(directory.name, "gone")
        notifier = SystemdNotifier({"NOTIFY_SOCKET": missing})
        self.addCleanup(notifier.close)

        with self.assertLogs("relay.notify", logging.DEBUG) as logs:
            self.assertFalse(notifier.ready())
            self.assertFalse(notifier.status("up"))
            self.assertFalse(notifier.stopping())

        warnings = [r for r in logs.records if r.levelno == logging.WARNING]
        self.assertEqual(len(warnings), 1)
        self.assertIn("READY=1", warnings[0].getMessage())
        self.assertEqual(notifier.send_failures, 3)

    def test_send_recovers_when_socket_returns(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        path = os.path.join(directory.name, "notify")
        notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
        self.addCleanup(notifier.close)
        with self.assertLogs("relay.notify", logging.WARNING):
            self.assertFalse(notifier.status("starting"))

        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(receiver.close)
        receiver.bind(path)
        receiver.settimeout(2.0 * UNIT)

        # The failed status was not recorded as sent, so the same text goes out now.
        self.assertTrue(notifier.status("starting"))
        self.assertEqual(receiver.recv(4096), b"STATUS=starting")
        self.assertEqual(notifier.send_failures, 1)


class WatchdogLoopTest(NotifierTestCase):
    def make_loop(
        self, healthy: threading.Event, **options: object
    ) -> tuple[WatchdogLoop, threading.Event]:
        notifier = self.make_notifier(WATCHDOG_USEC="1000000")
        stop = threading.Event()
        loop = WatchdogLoop(notifier, 1.0, stop, healthy.is_set, **options)
        return loop, stop

    def test_pings_at_requested_interval(self) -> None:
        interval = 0.1 * UNIT
        notifier = self.make_notifier(WATCHDOG_USEC=str(int(2 * interval * 1e6)))
        stop = threading.Event()
        self.assertAlmostEqual(notifier.watchdog_interval, interval, places=6)

        loop = start_watchdog_loop(notifier, stop, lambda: True)
        self.assertIsNotNone(loop)
        self.addCleanup(stop.set)
        messages = self.receiver.collect(10 * interval)
        stop.set()
        loop.join(2.0 * UNIT)

        texts = [text for _, text in messages]
        self.assertEqual(set(texts), {"WATCHDOG=1"})
        # One ping at start, then one per interval: 11 in an ideal run.
        self.assertGreaterEqual(len(texts), 6)
        self.assertLessEqual(len(texts), 12)
        gaps = [later[0] - earlier[0] for earlier, later in zip(messages, messages[1:])]
        median_gap = sorted(gaps)[len(gaps) // 2]
        self.assertGreater(median_gap, 0.5 * interval)
        self.assertLess(median_gap, 2.0 * interval)

    def test_pings_only_while_healthy(self) -> None:
        interval = 0.05 * UNIT
        notifier = self.make_notifier(WATCHDOG_USEC=str(int(2 * interval * 1e6)))
        healthy = threading.Event()
        healthy.set()
        stop = threading.Event()
        loop = WatchdogLoop(notifier, interval, stop, healthy.is_set)

        thread = loop.start()
        self.addCleanup(loop.join, 2.0 * UNIT)
        self.addCleanup(stop.set)
        self.assertEqual(self.receiver.receive(), "WATCHDOG=1")

        with self.assertLogs("relay.notify", logging.WARNING) as logs:
            healthy.clear()
            # A tick already past its health check may still send one ping.
            time.sleep(2 * interval)
            self.receiver.drain()
            withheld_before = loop.pings_withheld
            unhealthy_messages = self.receiver.collect(10 * interval)
            withheld_during = loop.pings_withheld - withheld_before

        self.assertEqual(unhealthy_messages, [])
        self.assertGreaterEqual(withheld_during, 3)
        # The default rate limit allows one warning per minute.
        self.assertEqual(len(logs.records), 1)
        self.assertIn("withholding watchdog ping", logs.records[0].getMessage())

        with self.assertLogs("relay.notify", logging.INFO) as logs:
            healthy.set()
            self.assertEqual(self.receiver.receive(), "WATCHDOG=1")
        self.assertIn("resuming watchdog pings", logs.output[-1])

        stop.set()
        loop.join(2.0 * UNIT)
        self.assertFalse(thread.is_alive())

    def test_thread_named_watchdog_stops_on_event(self) -> None:
        healthy = threading.Event()
        healthy.set()
        loop, stop = self.make_loop(healthy)

        thread = loop.start()
        self.assertEqual(thread.name, "watchdog")
        self.assertTrue(thread.daemon)
        self.assertEqual(self.receiver.receive(), "WATCHDOG=1")

        stop.set()
        thread.join(2.0 * UNIT)
        self.assertFalse(thread.is_alive())

    def test_start_twice_raises(self) -> None:
        healthy = threading.Event()
        healthy.set()
        loop, stop = self.make_loop(healthy)
        loop.start()
        self.addCleanup(loop.join, 2.0 * UNIT)
        self.addCleanup(stop.set)

        with self.assertRaises(RuntimeError):
            loop.start()

    def test_status_text_sent_each_tick_when_changed(self) -> None:
        statuses = iter(["starting", "connected", "connected", "connected, 2 clients"])
        healthy = threading.Event()
        healthy.set()
        loop, _ = self.make_loop(healthy, status_text=lambda: next(statuses))

        for _ in range(4):
            loop.tick()

        self.assertEqual(
            self.receiver.drain(),
            [
                "WATCHDOG=1",
                "STATUS=starting",
                "WATCHDOG=1",
                "STATUS=connected",
                "WATCHDOG=1",
                "WATCHDOG=1",
                "STATUS=connected, 2 clients",
            ],
        )

    def test_status_updated_while_unhealthy(self) -> None:
        healthy = threading.Event()
        loop, _ = self.make_loop(healthy, status_text=lambda: "upstream thread dead")

        with self.assertLogs("relay.notify", logging.WARNING):
            loop.tick()

        self.assertEqual(self.receiver.drain(), ["STATUS=upstream thread dead"])

    def test_withheld_warning_rate_limited(self) -> None:
        healthy = threading.Event()
        loop, _ = self.make_loop(healthy, withheld_log_interval=3600.0)

        with self.assertLogs("relay.notify", logging.WARNING) as logs:
            for _ in range(5):
                loop.tick()

        self.assertEqual(len(logs.records), 1)
        self.assertEqual(loop.pings_withheld, 5)
        self.assertEqual(loop.pings_sent, 0)
        self.assertEqual(self.receiver.drain(), [])

    def test_withheld_warning_repeats_after_interval(self) -> None:
        healthy = threading.Event()
        loop, _ = self.make_loop(healthy, withheld_log_interval=0.0)

        with self.assertLogs("relay.notify", logging.WARNING) as logs:
            for _ in range(3):
                loop.tick()

        self.assertEqual(len(logs.records), 3)
        self.assertIn("3 withheld", logs.records[2].getMessage())

    def test_health_check_exception_withholds(self) -> None:
        def broken_health_check() -> bool:
            raise RuntimeError("registry lock poisoned")

        notifier = self.make_notifier(WATCHDOG_USEC="1000000")
        loop = WatchdogLoop(notifier, 1.0, threading.Event(), broken_health_check)

        with self.assertLogs("relay.notify", logging.WARNING) as logs:
            loop.tick()

        self.assertEqual(loop.pings_withheld, 1)
        self.assertEqual(self.receiver.drain(), [])
        self.assertIn("RuntimeError: registry lock poisoned", logs.output[0])

    def test_status_text_exception_logged(self) -> None:
        def broken_status() -> str:
            raise KeyError("clients")

        healthy = threading.Event()
        healthy.set()
        loop, _ = self.make_loop(healthy, status_text=broken_status)

        with self.assertLogs("relay.notify", logging.ERROR):
            loop.tick()

        self.assertEqual(self.receiver.drain(), ["WATCHDOG=1"])

    def test_invalid_interval_rejected(self) -> None:
        notifier = self.make_notifier()
        for interval in (0, -1.0):
            with self.subTest(interval=interval):
                with self.assertRaises(ValueError):
                    WatchdogLoop(notifier, interval, threading.Event(), lambda: True)

    def test_start_watchdog_loop_without_watchdog(self) -> None:
        notifier = self.make_notifier()
        threads_before = threading.active_count()

        loop = start_watchdog_loop(notifier, threading.Event(), lambda: True)

        self.assertIsNone(loop)
        self.assertEqual(threading.active_count(), threads_before)


class RelayProcessNotifyTest(unittest.TestCase):
    """Runs ``python -m relay`` with NOTIFY_SOCKET set, as systemd would."""

    def setUp(self) -> None:
        self.receiver = NotifyReceiver()
        self.addCleanup(self.receiver.close)
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.directory = directory.name

        # The upstream URL points at a local port that is bound but not listening,
        # so connections are refused and no traffic leaves the machine.
        refusing = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(refusing.close)
        refusing.bind(("127.0.0.1", 0))
        upstream_port = refusing.getsockname()[1]

        self.config_path = os.path.join(self.directory, "relay.conf")
        with open(self.config_path, "w", encoding="utf-8") as config_file:
            config_file.write(
                "[server]\n"
                "host = 127.0.0.1\n"
                "port = 0\n"
                "[upstream]\n"
                f"url = ws://127.0.0.1:{upstream_port}/events\n"
                "[logging]\n"
                "level = DEBUG\n"
            )

    def start_relay(self, watchdog_usec: int) -> subprocess.Popen[bytes]:
        environ = {
            key: value
            for key, value in os.environ.items()
            if key not in RELAY_ENVIRONMENT
        }
        environ["NOTIFY_SOCKET"] = self.receiver.environ_value
        environ["WATCHDOG_USEC"] = str(watchdog_usec)
        environ["PYTHONPATH"] = REPOSITORY

        self.log_path = os.path.join(self.directory, "relay.log")
        log_file = open(self.log_path, "wb")
        self.addCleanup(log_file.close)
        process = subprocess.Popen(
            [sys.executable, "-m", "relay", "-c", self.config_path],
            cwd=self.directory,
            env=environ,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        self.addCleanup(self.stop_process, process)
        return process

    def stop_process(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.kill()
            process.wait()

    def relay_log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as log_file:
            return "relay output:\n" + log_file.read()

    def receive_until(
        self, process: subprocess.Popen[bytes], prefix: str, timeout: float
    ) -> list[str]:
        """Return the datagrams received up to and including one with ``prefix``.

        Fails after ``timeout`` seconds, or soon after the process exits early.
        """
        messages = []
        deadline = time.monotonic() + timeout
        exited = False
        while time.monotonic() < deadline and not exited:
            exited = process.poll() is not None
            text = self.receiver.receive(min(0.2 * UNIT, deadline - time.monotonic()))
            if text is None:
                continue
            messages.append(text)
            if text.startswith(prefix):
                return messages
        self.fail(
            f"no {prefix} within {timeout} s (exit code {process.poll()}), "
            f"got {messages}\n{self.relay_log()}"
        )

    def test_ready_watchdog_status_stopping(self) -> None:
        interval = 0.2 * UNIT
        process = self.start_relay(watchdog_usec=int(2 * interval * 1e6))

        startup = self.receive_until(process, "READY=1", 10 * UNIT)
        running = self.receiver.collect(6 * interval)

        running_texts = [text for _, text in running]
        status_seen = [t for t in startup + running_texts if t.startswith("STATUS=")]
        self.assertNotEqual(status_seen, [], self.relay_log())
        # One ping at start, then one per interval: about 7 in an ideal run.
        pings = running_texts.count("WATCHDOG=1")
        self.assertGreaterEqual(pings, 3, f"{running_texts}\n{self.relay_log()}")
        self.assertIsNone(process.poll(), self.relay_log())

        process.send_signal(signal.SIGTERM)
        self.receive_until(process, "STOPPING=1", 10 * UNIT)
        exit_code = process.wait(15 * UNIT)
        self.assertEqual(exit_code, 0, self.relay_log())


if __name__ == "__main__":
    unittest.main()
