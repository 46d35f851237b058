"""Configuration loading, precedence and error messages; backoff arithmetic."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import stat
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

from relay.config import (
    COMMAND_LINE_FLAGS,
    EX_CONFIG,
    FIELDS,
    ConfigError,
    describe,
    example_text,
    load_settings,
    redact_url,
)
from relay.upstream import Backoff
from tests.support import ROOT, UNIT, write_config


class SettingsTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def test_defaults_without_file(self) -> None:
        """With no file and no environment, every field has its default."""
        settings = load_settings(None, environ={})
        for field in FIELDS:
            self.assertEqual(getattr(settings, field.attr), field.default, field.attr)

    def test_documented_defaults(self) -> None:
        """The defaults users rely on are the documented ones."""
        settings = load_settings(None, environ={})
        self.assertEqual(settings.server_host, "127.0.0.1")
        self.assertEqual(settings.server_port, 3001)
        self.assertEqual(settings.upstream_url, "wss://ws.backpack.tf/events")
        self.assertEqual(settings.upstream_backoff_initial, 1.0)
        self.assertEqual(settings.upstream_backoff_multiplier, 2.0)
        self.assertEqual(settings.upstream_backoff_max, 60.0)
        self.assertEqual(settings.upstream_backoff_reset_after, 30.0)
        self.assertEqual(settings.upstream_stall_timeout, 120.0)
        self.assertGreaterEqual(settings.upstream_max_frame_bytes, 16 * 1024 * 1024)
        self.assertEqual(settings.clients_ping_interval, 30.0)
        self.assertEqual(settings.clients_max_message_bytes, 64 * 1024)
        self.assertEqual(settings.server_shutdown_timeout, 5.0)

    def test_file_values_parsed(self) -> None:
        path = write_config(
            self.tmp.name,
            "[server]\nport = 4000\n[clients]\nsend_timeout = 2.5\n[logging]\nlevel = warn\n",
        )
        settings = load_settings(path, environ={})
        self.assertEqual(settings.server_port, 4000)
        self.assertEqual(settings.clients_send_timeout, 2.5)
        self.assertEqual(settings.logging_level, "WARNING")

    def test_precedence_flag_env_file(self) -> None:
        """Command-line flag beats environment, which beats the file."""
        path = write_config(self.tmp.name, "[server]\nport = 4000\n[upstream]\nurl = ws://127.0.0.1:1/a\n")
        environ = {"PORT": "5000", "BACKPACK_WS_URL": "ws://127.0.0.1:2/b", "LOG_LEVEL": "DEBUG"}
        settings = load_settings(path, environ=environ, overrides={("server", "port"): "6000"})
        self.assertEqual(settings.server_port, 6000)
        self.assertEqual(settings.upstream_url, "ws://127.0.0.1:2/b")
        self.assertEqual(settings.logging_level, "DEBUG")
        settings = load_settings(path, environ={})
        self.assertEqual(settings.server_port, 4000)

    def test_node_relay_warn_level(self) -> None:
        settings = load_settings(None, environ={"LOG_LEVEL": "WARN"})
        self.assertEqual(settings.logging_level, "WARNING")

    def test_example_file_is_valid_and_complete(self) -> None:
        """relay.conf.example loads, and documents every key with its default."""
        path = str(ROOT / "relay.conf.example")
        settings = load_settings(path, environ={})
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        for field in FIELDS:
            self.assertRegex(text, rf"(?m)^#? ?{field.key} =", f"{field.section}.{field.key} missing")
            self.assertEqual(getattr(settings, field.attr), field.default, field.attr)
        self.assertEqual(text.strip(), example_text().strip(), "regenerate relay.conf.example")

    def test_describe_lists_every_key(self) -> None:
        text = describe(load_settings(None, environ={}))
        for field in FIELDS:
            self.assertIn(f"{field.key} = ", text)


class ConfigErrorTest(unittest.TestCase):
    """Each bad input raises one line naming file, section, key, value and the fix."""

    CASES = [
        # (file text, substrings the message must contain)
        ("[server]\nport = abc\n", ["[server]", "port", "'abc'", "whole number from 0 to 65535"]),
        ("[server]\nport = 70000\n", ["port", "'70000'", "too large", "0 to 65535"]),
        ("[server]\nport = -1\n", ["port", "too small"]),
        ("[server]\nport = 3.5\n", ["port", "'3.5'", "whole number"]),
        ("[server]\nhost = bad host\n", ["host", "'bad host'", "IP address"]),
        ("[server]\nbacklog = 0\n", ["backlog", "too small"]),
        ("[server]\nheader_timeout = soon\n", ["header_timeout", "'soon'", "seconds"]),
        ("[server]\nshutdown_timeout = nan\n", ["shutdown_timeout", "'nan'"]),
        ("[upstream]\nurl = http://example.invalid/\n", ["url", "ws:// or wss://"]),
        ("[upstream]\nurl = ws://\n", ["url", "no host"]),
        ("[upstream]\nurl = ws://127.0.0.1:99999/x\n", ["url", "invalid port"]),
        ("[upstream]\nbackoff_multiplier = 0.5\n", ["backoff_multiplier", "too small"]),
        ("[upstream]\nping_interval = 5\nping_timeout = 5\n", ["ping_timeout", "less than ping_interval"]),
        ("[upstream]\nbackoff_initial = 10\nbackoff_max = 5\n", ["backoff_initial", "backoff_max"]),
        ("[upstream]\nmax_frame_bytes = 10\n", ["max_frame_bytes", "too small", "bytes"]),
        ("[clients]\nqueue_max_bytes = lots\n", ["[clients]", "queue_max_bytes", "'lots'", "bytes"]),
        ("[clients]\nqueue_max_frames = 0\n", ["queue_max_frames", "too small"]),
        ("[clients]\nping_interval = 0\n", ["ping_interval", "too small", "seconds"]),
        ("[clients]\nmax_message_bytes = 1e9\n", ["max_message_bytes", "whole number"]),
        ("[clients]\nmax_clients = 0\n", ["max_clients", "too small"]),
        ("[clients]\nmessage_rate = fast\n", ["message_rate", "'fast'"]),
        ("[logging]\nlevel = LOUD\n", ["level", "'LOUD'", "DEBUG, INFO, WARNING"]),
        ("[logging]\nformat = xml\n", ["format", "'xml'", "text or json"]),
        ("[server]\nprot = 3001\n", ["[server]", "unknown key 'prot'", "port"]),
        ("[serverr]\nport = 3001\n", ["unknown section [serverr]", "[server]"]),
        ("port = 3001\n", ["invalid INI syntax"]),
        ("[server]\nport\n", ["invalid INI syntax"]),
        ("[server]\nport = 1\nport = 2\n", ["invalid INI syntax"]),
    ]

    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def test_bad_values_table(self) -> None:
        for text, expected in self.CASES:
            with self.subTest(config=text):
                path = write_config(self.tmp.name, text)
                with self.assertRaises(ConfigError) as raised:
                    load_settings(path, environ={})
                message = str(raised.exception)
                self.assertNotIn("\n", message)
                self.assertIn(path, message)
                for part in expected:
                    self.assertIn(part, message)

    def test_bad_environment_value(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            load_settings(None, environ={"PORT": "http"})
        self.assertIn("environment variable PORT", str(raised.exception))
        self.assertIn("'http'", str(raised.exception))

    def test_bad_flag_value(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            load_settings(None, environ={}, overrides={("server", "port"): "x"})
        self.assertIn("command line --port", str(raised.exception))

    def test_missing_file(self) -> None:
        path = os.path.join(self.tmp.name, "absent.conf")
        with self.assertRaises(ConfigError) as raised:
            load_settings(path, environ={})
        self.assertIn("not found", str(raised.exception))
        self.assertIn(path, str(raised.exception))

    @unittest.skipIf(os.geteuid() == 0, "root can read a file without read permission")
    def test_unreadable_file(self) -> None:
        path = write_config(self.tmp.name, "[server]\n")
        os.chmod(path, 0)
        with self.assertRaises(ConfigError) as raised:
            load_settings(path, environ={})
        self.assertIn("not readable", str(raised.exception))

    def test_directory_instead_of_file(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            load_settings(self.tmp.name, environ={})
        self.assertIn("is a directory", str(raised.exception))

    def test_non_utf8_file(self) -> None:
        path = os.path.join(self.tmp.name, "latin1.conf")
        with open(path, "wb") as handle:
            handle.write(b"[server]\n# caf\xe9\n")
        with self.assertRaises(ConfigError) as raised:
            load_settings(path, environ={})
        self.assertIn("UTF-8", str(raised.exception))


# One row per key: (section, key, value of the wrong type, out-of-range value or
# None when the key has no range, text the message must contain).
EVERY_KEY = [
    ("server", "host", "bad host", None, "IP address or host name"),
    ("server", "port", "http", "65536", "a whole number from 0 to 65535"),
    ("server", "backlog", "many", "0", "a whole number from 1 to 65535 connections"),
    ("server", "header_timeout", "soon", "0.05", "a number from 0.1 to 3600 seconds"),
    ("server", "allowed_hosts", "a..b", None, "IP address or host name"),
    ("server", "max_header_bytes", "big", "1023", "a whole number from 1024 to 1048576 bytes"),
    ("server", "max_http_connections", "lots", "0", "a whole number from 1 to 100000 connections"),
    ("server", "shutdown_timeout", "later", "601", "a number from 0.1 to 600 seconds"),
    ("upstream", "url", "http://example.invalid/", None, "ws:// or wss://"),
    ("upstream", "connect_timeout", "10s", "0", "a number from 0.1 to 600 seconds"),
    ("upstream", "ping_interval", "often", "3601", "a number from 0 to 3600 seconds"),
    ("upstream", "ping_timeout", "1,5", "0.05", "a number from 0.1 to 3600 seconds"),
    ("upstream", "stall_timeout", "never", "-1", "a number from 0 to 86400 seconds"),
    ("upstream", "backoff_initial", "one", "0.001", "a number from 0.01 to 3600 seconds"),
    ("upstream", "backoff_multiplier", "double", "0.5", "a number from 1 to 100"),
    ("upstream", "backoff_max", "1m", "86401", "a number from 0.01 to 86400 seconds"),
    ("upstream", "backoff_reset_after", "x", "-0.5", "a number from 0 to 86400 seconds"),
    ("upstream", "max_frame_bytes", "16MB", "65535", "a whole number from 65536 to 1073741824 bytes"),
    ("clients", "max_clients", "all", "0", "a whole number from 1 to 100000 clients"),
    ("clients", "max_clients_per_ip", "2.5", "100001", "a whole number from 0 to 100000 clients"),
    ("clients", "queue_max_bytes", "lots", "4294967297", "a whole number from 65536 to 4294967296 bytes"),
    ("clients", "queue_max_frames", "many", "10000001", "a whole number from 1 to 10000000 frames"),
    ("clients", "send_timeout", "30 s", "0", "a number from 0.1 to 3600 seconds"),
    ("clients", "ping_interval", "often", "inf", "a number from 0.1 to 3600 seconds"),
    ("clients", "max_message_bytes", "64k", "124", "a whole number from 125 to 16777216 bytes"),
    ("clients", "message_rate", "fast", "0.01", "a number from 0.1 to 100000 messages/second"),
    ("clients", "message_burst", "1e3", "0", "a whole number from 1 to 1000000 messages"),
    ("clients", "close_timeout", "2s", "601", "a number from 0.01 to 600 seconds"),
    ("security", "token", "short", None, "shorter than 16 characters"),
    ("security", "token_file", "relative/token", None, "absolute path"),
    ("security", "allow_unauthenticated", "maybe", None, "yes or no"),
    ("security", "allowed_origins", "ftp://example.com", None, "scheme://host"),
    ("logging", "level", "LOUD", None, "DEBUG, INFO, WARNING"),
    ("logging", "format", "xml", None, "text or json"),
]


class EveryKeyTest(unittest.TestCase):
    """Every key rejects a wrong type and an out-of-range value with one line naming it."""

    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def test_table_covers_every_key(self) -> None:
        """EVERY_KEY has exactly one row for each key in FIELDS."""
        self.assertEqual(sorted((row[0], row[1]) for row in EVERY_KEY), sorted((f.section, f.key) for f in FIELDS))

    def test_wrong_type_and_range(self) -> None:
        """Each bad value yields one line with the file, section, key, value and allowed range."""
        secret = {(f.section, f.key) for f in FIELDS if f.secret}
        for section, key, wrong, out_of_range, expected in EVERY_KEY:
            for value in (wrong, out_of_range):
                if value is None:
                    continue
                with self.subTest(key=f"[{section}] {key}", value=value):
                    path = write_config(self.tmp.name, f"[{section}]\n{key} = {value}\n")
                    with self.assertRaises(ConfigError) as raised:
                        load_settings(path, environ={})
                    message = str(raised.exception)
                    self.assertNotIn("\n", message)
                    self.assertIn(path, message)
                    self.assertIn(f"[{section}]", message)
                    self.assertIn(key, message)
                    self.assertIn(expected, message)
                    if (section, key) in secret:
                        self.assertNotIn(repr(value), message)
                    else:
                        self.assertIn(repr(value), message)


# (section, key, text, expected value) for numbers written in plain ASCII.
ACCEPTED_NUMBERS = [
    ("server", "port", "3001", 3001),
    ("server", "port", "+3001", 3001),
    ("server", "port", "03001", 3001),
    ("server", "port", "-0", 0),
    ("clients", "queue_max_bytes", "1000000", 1000000),
    ("server", "header_timeout", "10", 10.0),
    ("server", "header_timeout", "2.5", 2.5),
    ("server", "header_timeout", "+2.5", 2.5),
    ("server", "header_timeout", ".5", 0.5),
    ("server", "header_timeout", "5.", 5.0),
    ("server", "header_timeout", "1e1", 10.0),
    ("server", "header_timeout", "1E+1", 10.0),
    ("server", "header_timeout", "25e-1", 2.5),
]

# (section, key, text) that int() or float() would accept, or that are not
# decimal notation at all.
REJECTED_NUMBERS = [
    ("clients", "queue_max_bytes", "1_000_000"),
    ("server", "port", "३००१"),  # Devanagari digits
    ("server", "port", "٣٠٠١"),  # Arabic-Indic digits
    ("server", "port", "３００１"),  # fullwidth digits
    ("server", "port", "0x10"),
    ("server", "port", "0o7"),
    ("server", "port", "0b1"),
    ("server", "port", "30 01"),
    ("server", "port", "+"),
    ("server", "port", "--1"),
    ("server", "port", "1e3"),
    ("server", "port", "9" * 5000),
    ("server", "header_timeout", "1_0.5"),
    ("server", "header_timeout", "١٠"),
    ("server", "header_timeout", "１０"),
    ("server", "header_timeout", "nan"),
    ("server", "header_timeout", "NaN"),
    ("server", "header_timeout", "inf"),
    ("server", "header_timeout", "-inf"),
    ("server", "header_timeout", "Infinity"),
    ("server", "header_timeout", "1e999"),
    ("server", "header_timeout", "0x1p3"),
    ("server", "header_timeout", "1e"),
    ("server", "header_timeout", "e5"),
    ("server", "header_timeout", "."),
    ("server", "header_timeout", "1.5.2"),
]


class NumberSyntaxTest(unittest.TestCase):
    """Integers and floats accept only ASCII digits, a sign, a point and an exponent."""

    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def load(self, section: str, key: str, text: str) -> object:
        path = write_config(self.tmp.name, f"[{section}]\n{key} = {text}\n")
        return load_settings(path, environ={})

    def test_plain_numbers_accepted(self) -> None:
        for section, key, text, expected in ACCEPTED_NUMBERS:
            with self.subTest(key=key, text=text):
                value = getattr(self.load(section, key, text), f"{section}_{key}")
                self.assertEqual(value, expected)
                self.assertIs(type(value), type(expected))

    def test_other_spellings_rejected(self) -> None:
        for section, key, text in REJECTED_NUMBERS:
            with self.subTest(key=key, text=text[:20]):
                with self.assertRaises(ConfigError) as raised:
                    self.load(section, key, text)
                message = str(raised.exception)
                self.assertNotIn("\n", message)
                self.assertIn(f"{key} = ", message)
                self.assertIn("is invalid", message)

    def test_underscore_and_script_hint(self) -> None:
        """The message explains why a value Python would accept is rejected."""
        for section, key, text in (("clients", "queue_max_bytes", "1_000_000"), ("server", "port", "३००१")):
            with self.subTest(text=text):
                with self.assertRaises(ConfigError) as raised:
                    self.load(section, key, text)
                self.assertIn("in ASCII digits without underscores", str(raised.exception))


# (URL, redacted form) pairs. Credentials, query values and fragments are
# masked, and the rest stays as written.
REDACTED_URLS = [
    ("wss://ws.backpack.tf/events", "wss://ws.backpack.tf/events"),
    ("WSS://ws.backpack.tf:443/events?", "WSS://ws.backpack.tf:443/events?"),
    ("wss://ws.backpack.tf/events?key=SECRET", "wss://ws.backpack.tf/events?key=***"),
    ("wss://host/events?key=SECRET&v=2", "wss://host/events?key=***&v=***"),
    ("wss://user:SECRET@host/events", "wss://***@host/events"),
    ("wss://user:SECRET@host:8443/events?key=SECRET", "wss://***@host:8443/events?key=***"),
    ("wss://host/events?SECRET", "wss://host/events?***"),
    ("wss://host/events?key=", "wss://host/events?key="),
    ("wss://host/events?key=SECRET=more", "wss://host/events?key=***"),
    ("wss://host/events?key=SEC%26RET", "wss://host/events?key=***"),
    ("wss://host/events?a=1;key=SECRET", "wss://host/events?a=***"),
    ("wss://host/events?&&key=SECRET", "wss://host/events?&&key=***"),
    ("wss://host/events#SECRET", "wss://host/events#***"),
    ("ws://[::1]:3001/events?token=SECRET", "ws://[::1]:3001/events?token=***"),
]


class RedactUrlTest(unittest.TestCase):
    """redact_url hides secrets but keeps the URL readable."""

    def test_redacted_forms(self) -> None:
        for url, expected in REDACTED_URLS:
            with self.subTest(url=url):
                redacted = redact_url(url)
                self.assertEqual(redacted, expected)
                self.assertNotIn("SECRET", redacted)
                self.assertNotIn("SEC", redacted)

    def run_relay(self, *args: str) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if k not in ("PORT", "BACKPACK_WS_URL", "LOG_LEVEL")}
        return subprocess.run(
            [sys.executable, "-m", "relay", *args],
            cwd=str(ROOT), env=environ, capture_output=True, text=True, timeout=10 * UNIT,
        )

    def test_check_masks_query_key(self) -> None:
        """--check prints the upstream URL with its key masked and opens no connection."""
        result = self.run_relay("--upstream-url", "wss://127.0.0.1:9/events?key=SECRET", "--check")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("url = wss://127.0.0.1:9/events?key=***", result.stdout)
        self.assertNotIn("SECRET", result.stdout)
        self.assertNotIn("SECRET", result.stderr)

    def test_invalid_url_error_masks_key(self) -> None:
        result = self.run_relay("--upstream-url", "https://127.0.0.1:9/events?key=SECRET", "--check")
        self.assertEqual(result.returncode, EX_CONFIG, result.stderr)
        self.assertIn("'https://127.0.0.1:9/events?key=***'", result.stderr)
        self.assertIn("ws:// or wss://", result.stderr)
        self.assertNotIn("SECRET", result.stderr)

    def test_unparsable_url_error_hides_value(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            load_settings(None, environ={"BACKPACK_WS_URL": "wss://[::1/events?key=SECRET"})
        message = str(raised.exception)
        self.assertIn("environment variable BACKPACK_WS_URL", message)
        self.assertIn("cannot be parsed", message)
        self.assertNotIn("SECRET", message)


def unreadable_path(directory: str) -> str | None:
    """Return a path this process cannot open for reading, or None.

    As root, permission bits do not stop a read, but write-only sysctl files
    do: the kernel checks their owner bits even for root.
    """
    if os.geteuid() != 0:
        path = write_config(directory, "[server]\n", "unreadable.conf")
        os.chmod(path, 0)
        return path
    for candidate in ("/proc/sys/vm/compact_memory", "/proc/sys/vm/drop_caches"):
        try:
            with open(candidate, encoding="utf-8"):
                pass
        except PermissionError:
            return candidate
        except OSError:
            continue
    return None


class ConfigExitTest(unittest.TestCase):
    """The real process exits 78 with one stderr line for each kind of bad configuration."""

    def run_relay(self, path: str) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if k not in ("PORT", "BACKPACK_WS_URL", "LOG_LEVEL")}
        return subprocess.run(
            [sys.executable, "-m", "relay", "-c", path], cwd=str(ROOT), env=environ, capture_output=True, text=True, timeout=30
        )

    def assert_one_line(self, result: subprocess.CompletedProcess[str], *parts: str) -> None:
        self.assertEqual(result.returncode, EX_CONFIG, result.stderr)
        self.assertEqual(result.stdout, "")
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertTrue(lines[0].startswith("bptf-relay: invalid configuration: "), lines[0])
        for part in parts:
            self.assertIn(part, lines[0])

    def test_exit_78_one_line(self) -> None:
        """Out-of-range value, unknown key and unknown section each exit 78 with one line."""
        cases = [
            ("[upstream]\nbackoff_max = 0\n", ["[upstream]", "backoff_max = '0'", "too small", "from 0.01 to 86400 seconds"]),
            ("[clients]\nsend_timout = 5\n", ["[clients]", "unknown key 'send_timout'", "send_timeout"]),
            ("[client]\nsend_timeout = 5\n", ["unknown section [client]", "[clients]"]),
        ]
        with tempfile.TemporaryDirectory() as directory:
            for text, parts in cases:
                with self.subTest(config=text):
                    path = write_config(directory, text)
                    self.assert_one_line(self.run_relay(path), path, *parts)

    def test_unreadable_file_exits_78(self) -> None:
        """A file the process cannot read exits 78 with one line naming it."""
        with tempfile.TemporaryDirectory() as directory:
            path = unreadable_path(directory)
            if path is None:
                self.skipTest("no unreadable file available to this user")
            self.assert_one_line(self.run_relay(path), path, "not readable")


class CommandLineTest(unittest.TestCase):
    """The real ``python -m relay`` entry point: exit statuses and output."""

    def run_relay(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if k not in ("PORT", "BACKPACK_WS_URL", "LOG_LEVEL")}
        environ.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "relay", *args],
            cwd=str(ROOT),
            env=environ,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def test_invalid_file_exits_78(self) -> None:
        with tempfile.TemporaryDirectory() as directory:
            path = write_config(directory, "[clients]\nqueue_max_frames = many\n")
            result = self.run_relay("-c", path)
        self.assertEqual(result.returncode, EX_CONFIG)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertIn("queue_max_frames = 'many'", lines[0])
        self.assertIn(path, lines[0])

    def test_missing_file_exits_78(self) -> None:
        result = self.run_relay("-c", "/nonexistent/relay.conf")
        self.assertEqual(result.returncode, EX_CONFIG)
        self.assertIn("/nonexistent/relay.conf", result.stderr)

    def test_bad_flag_exits_78(self) -> None:
        result = self.run_relay("--port", "99999", "--check")
        self.assertEqual(result.returncode, EX_CONFIG)
        self.assertIn("--port", result.stderr)

    def test_check_prints_effective_settings(self) -> None:
        result = self.run_relay("-c", str(ROOT / "relay.conf.example"), "--check", env={"PORT": "4567"})
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("port = 4567", result.stdout)
        self.assertIn("url = wss://ws.backpack.tf/events", result.stdout)

    def test_version(self) -> None:
        result = self.run_relay("--version")
        self.assertEqual(result.returncode, 0)
        self.assertRegex(result.stdout, r"^bptf-relay \d+\.\d+\.\d+")

    def test_port_in_use_is_clear(self) -> None:
        import socket

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            result = self.run_relay("--port", str(port), "--upstream-url", "ws://127.0.0.1:9/events")
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"cannot listen on 127.0.0.1:{port}", result.stderr)
        self.assertIn("another [server] port", result.stderr)
        self.assertNotIn("Traceback", result.stderr)


def import_main_module():
    """Import relay.__main__ and restore the signal handlers its import installs."""
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    handlers = {number: signal.getsignal(number) for number in signals}
    try:
        import relay.__main__ as main_module
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    return main_module


class FlagNameTest(unittest.TestCase):
    """The error for an invalid command-line value names the flag the user typed."""

    def setUp(self) -> None:
        self.main_module = import_main_module()
        self.parser = self.main_module.build_parser()
        # Flags that take a value, except -c/--config, which names a file.
        self.value_actions = [
            action
            for action in self.parser._actions
            if action.option_strings and action.nargs != 0 and action.dest != "config"
        ]

    def test_every_flag_maps_to_a_setting(self) -> None:
        """Each value flag of the parser sets a setting, so no flag is left untested."""
        self.assertEqual(
            sorted(action.dest for action in self.value_actions),
            sorted(self.main_module.FLAGS),
        )

    def test_config_table_matches_parser(self) -> None:
        """COMMAND_LINE_FLAGS gives each setting the flag that the parser defines for it."""
        for action in self.value_actions:
            name = self.main_module.FLAGS[action.dest]
            with self.subTest(setting=name):
                self.assertEqual(COMMAND_LINE_FLAGS[name], max(action.option_strings, key=len))
        self.assertEqual(len(COMMAND_LINE_FLAGS), len(self.value_actions))

    def test_error_names_exact_flag(self) -> None:
        wrong_values = {(section, key): wrong for section, key, wrong, _, _ in EVERY_KEY}
        environ = {k: v for k, v in os.environ.items() if k not in ("PORT", "BACKPACK_WS_URL", "LOG_LEVEL")}
        self.assertGreater(len(self.value_actions), 0)
        for action in self.value_actions:
            flag = max(action.option_strings, key=len)
            value = wrong_values[self.main_module.FLAGS[action.dest]]
            with self.subTest(flag=flag, value=value):
                stderr = io.StringIO()
                with mock.patch.dict(os.environ, environ, clear=True), contextlib.redirect_stderr(stderr):
                    status = self.main_module.main([flag, value, "--check"])
                self.assertEqual(status, EX_CONFIG, stderr.getvalue())
                self.assertIn(f"command line {flag}: ", stderr.getvalue())
                self.assertIn(repr(value), stderr.getvalue())


class BackoffTest(unittest.TestCase):
    def test_caps_grow_and_saturate(self) -> None:
        backoff = Backoff(1.0, 2.0, 60.0, rng=lambda low, high: high)
        delays = [backoff.next_delay() for _ in range(9)]
        self.assertEqual(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60])

    def test_full_jitter_range(self) -> None:
        calls: list[tuple[float, float]] = []
        backoff = Backoff(1.0, 2.0, 60.0, rng=lambda low, high: calls.append((low, high)) or low)
        for _ in range(3):
            self.assertEqual(backoff.next_delay(), 0.0)
        self.assertEqual(calls, [(0.0, 1.0), (0.0, 2.0), (0.0, 4.0)])

    def test_real_jitter_varies_within_cap(self) -> None:
        backoff = Backoff(1.0, 2.0, 8.0)
        samples = []
        for _ in range(200):
            backoff.failures = 3
            samples.append(backoff.next_delay())
        self.assertTrue(all(0.0 <= value <= 8.0 for value in samples))
        self.assertGreater(len(set(samples)), 150)

    def test_reset(self) -> None:
        backoff = Backoff(1.0, 2.0, 60.0, rng=lambda low, high: high)
        for _ in range(5):
            backoff.next_delay()
        backoff.reset()
        self.assertEqual(backoff.next_delay(), 1.0)

    def test_huge_failure_count_does_not_overflow(self) -> None:
        backoff = Backoff(1.0, 100.0, 60.0, rng=lambda low, high: high)
        backoff.failures = 10_000
        self.assertEqual(backoff.next_delay(), 60.0)


if __name__ == "__main__":
    unittest.main()
