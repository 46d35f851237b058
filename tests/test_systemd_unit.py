"""Tests for contrib/systemd/bptf-relay.service: syntax, sandbox score, directives.

The checks run ``systemd-analyze`` (package ``systemd`` on Debian and Ubuntu). They
need no running systemd: ``verify`` and ``security --offline=yes`` (systemd 250 or
later) only read unit files.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import unittest
from pathlib import Path

from relay import config

UNIT = float(os.environ.get("RELAY_TEST_UNIT", "1.0"))

REPOSITORY = Path(__file__).resolve().parent.parent
UNIT_PATH = REPOSITORY / "contrib" / "systemd" / "bptf-relay.service"

# Highest overall exposure that systemd-analyze still rates "OK" (scale 0 to 10).
MAX_EXPOSURE = 2.0

COMMAND_TIMEOUT = 60.0 * UNIT

EXPECTED_DIRECTIVES = [
    ("Unit", "After", "network-online.target"),
    ("Unit", "Wants", "network-online.target"),
    ("Unit", "StartLimitIntervalSec", "300"),
    ("Unit", "StartLimitBurst", "5"),
    ("Service", "Type", "notify"),
    ("Service", "NotifyAccess", "main"),
    (
        "Service",
        "ExecStart",
        "/usr/local/bin/bptf-relay -c /etc/bptf-relay/relay.conf",
    ),
    ("Service", "ExecReload", "/bin/kill -HUP $MAINPID"),
    ("Service", "Restart", "on-failure"),
    ("Service", "RestartSec", "5"),
    ("Service", "RestartPreventExitStatus", str(config.EX_CONFIG)),
    ("Service", "TimeoutStopSec", "15"),
    ("Service", "WatchdogSec", "30"),
    ("Service", "LimitNOFILE", "4096"),
    ("Service", "DynamicUser", "yes"),
    ("Service", "ConfigurationDirectory", "bptf-relay"),
    ("Service", "UMask", "0077"),
    ("Service", "CapabilityBoundingSet", ""),
    ("Service", "AmbientCapabilities", ""),
    ("Service", "NoNewPrivileges", "yes"),
    ("Service", "PrivateUsers", "yes"),
    ("Service", "ProtectSystem", "strict"),
    ("Service", "ProtectHome", "yes"),
    ("Service", "PrivateTmp", "yes"),
    ("Service", "PrivateMounts", "yes"),
    ("Service", "PrivateDevices", "yes"),
    ("Service", "DevicePolicy", "closed"),
    ("Service", "ProtectProc", "invisible"),
    ("Service", "ProcSubset", "pid"),
    ("Service", "ProtectKernelTunables", "yes"),
    ("Service", "ProtectKernelModules", "yes"),
    ("Service", "ProtectKernelLogs", "yes"),
    ("Service", "ProtectControlGroups", "yes"),
    ("Service", "ProtectClock", "yes"),
    ("Service", "ProtectHostname", "yes"),
    ("Service", "RestrictNamespaces", "yes"),
    ("Service", "RestrictRealtime", "yes"),
    ("Service", "RestrictSUIDSGID", "yes"),
    ("Service", "LockPersonality", "yes"),
    ("Service", "MemoryDenyWriteExecute", "yes"),
    ("Service", "RemoveIPC", "yes"),
    ("Service", "KeyringMode", "private"),
    ("Service", "RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ("Service", "SystemCallArchitectures", "native"),
    ("Service", "SystemCallFilter", "@system-service"),
    ("Service", "SystemCallFilter", "~@privileged @resources"),
    ("Service", "SystemCallErrorNumber", "EPERM"),
    ("Install", "WantedBy", "multi-user.target"),
]

# The relay must reach the upstream feed on the public internet.
FORBIDDEN_DIRECTIVES = [
    ("Service", "IPAddressDeny"),
    ("Service", "PrivateNetwork"),
]


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Parse unit file text into {section: [(key, value), ...]} in file order.

    Keys may repeat, as systemd allows. Comments and blank lines are skipped. Line
    continuations are not supported, and the unit file uses none.
    """
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        if current is None or "=" not in line:
            raise ValueError(f"line {number}: unexpected {raw_line!r}")
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def parse_seconds(value: str) -> float:
    """Convert a plain number or an ``Ns``/``Nmin`` systemd time span to seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min)?", value)
    if match is None:
        raise ValueError(f"unsupported time span {value!r}")
    number = float(match.group(1))
    return number * 60 if match.group(2) == "min" else number


def run_analyze(*arguments: str) -> subprocess.CompletedProcess[str]:
    """Run systemd-analyze with ``arguments`` and capture its output as text."""
    return subprocess.run(
        ["systemd-analyze", *arguments],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


class UnitDirectivesTest(unittest.TestCase):
    def setUp(self) -> None:
        self.unit = parse_unit(UNIT_PATH.read_text(encoding="utf-8"))

    def test_required_directives(self) -> None:
        for section, key, value in EXPECTED_DIRECTIVES:
            with self.subTest(directive=f"[{section}] {key}={value}"):
                entries = self.unit.get(section, [])
                actual = [v for k, v in entries if k == key]
                self.assertIn(value, actual, f"{key}= values found: {actual}")

    def test_forbidden_directives_absent(self) -> None:
        for section, key in FORBIDDEN_DIRECTIVES:
            with self.subTest(directive=f"[{section}] {key}"):
                keys = [k for k, _ in self.unit.get(section, [])]
                self.assertNotIn(key, keys)

    def test_stop_timeout_exceeds_drain_time(self) -> None:
        timeouts = [v for k, v in self.unit["Service"] if k == "TimeoutStopSec"]
        shutdown = config.FIELDS_BY_NAME[("server", "shutdown_timeout")].default

        self.assertEqual(len(timeouts), 1)
        # Leave room for closing the upstream after the clients are drained.
        self.assertGreaterEqual(parse_seconds(timeouts[0]), 2 * shutdown)

    def test_file_limit_covers_max_clients(self) -> None:
        limits = [v for k, v in self.unit["Service"] if k == "LimitNOFILE"]
        max_clients = config.FIELDS_BY_NAME[("clients", "max_clients")].default

        self.assertEqual(len(limits), 1)
        # One descriptor per client, plus the listener, upstream and Python's own.
        self.assertGreaterEqual(int(limits[0]), max_clients + 64)

    def test_watchdog_longer_than_notify_pings(self) -> None:
        watchdog = [v for k, v in self.unit["Service"] if k == "WatchdogSec"]

        self.assertEqual(len(watchdog), 1)
        # The relay pings every WatchdogSec/2, so a few seconds would be too tight
        # for a loaded VPS.
        self.assertGreaterEqual(parse_seconds(watchdog[0]), 10)


@unittest.skipIf(
    shutil.which("systemd-analyze") is None,
    "systemd-analyze not installed (Debian/Ubuntu: apt-get install systemd)",
)
class SystemdAnalyzeTest(unittest.TestCase):
    def test_verify_passes(self) -> None:
        # verify rejects an ExecStart binary that does not exist, and the console
        # script is not installed here, so a copy points ExecStart at /bin/true.
        text = UNIT_PATH.read_text(encoding="utf-8")
        patched, count = re.subn(
            r"^ExecStart=/usr/local/bin/bptf-relay ",
            "ExecStart=/bin/true ",
            text,
            flags=re.MULTILINE,
        )
        self.assertEqual(count, 1, "ExecStart line not found in the unit file")

        with tempfile.TemporaryDirectory() as directory:
            copy = Path(directory) / UNIT_PATH.name
            copy.write_text(patched, encoding="utf-8")
            result = run_analyze("verify", str(copy))

        output = result.stdout + result.stderr
        if "Failed to initialize manager" in output:
            self.skipTest(f"systemd-analyze verify cannot run here: {output.strip()}")
        self.assertEqual(result.returncode, 0, output)
        # verify exits 0 even for unknown keys or invalid values, which it reports as
        # "FILE:LINE: ..." warnings and ignores.
        unit_messages = [line for line in output.splitlines() if UNIT_PATH.name in line]
        self.assertEqual(unit_messages, [])

    def test_security_exposure_at_most_two(self) -> None:
        threshold = str(round(MAX_EXPOSURE * 10))
        result = run_analyze(
            "security", "--offline=yes", f"--threshold={threshold}", str(UNIT_PATH)
        )

        output = result.stdout + result.stderr
        if re.search(r"unrecognized option|unknown option", output):
            self.skipTest(
                "systemd-analyze security --offline needs systemd 250 or later: "
                + output.strip()
            )
        match = re.search(
            r"Overall exposure level for bptf-relay\.service: (\d+\.\d+) (\w+)",
            output,
        )
        self.assertIsNotNone(match, output)
        score = float(match.group(1))
        self.assertLessEqual(score, MAX_EXPOSURE, output)
        self.assertEqual(result.returncode, 0, output)


if __name__ == "__main__":
    unittest.main()
