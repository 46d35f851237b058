"""Check that each load generator counts deliveries and faults exactly.

Runs the fake upstream, tests/faulty_relay.py and one load generator on
127.0.0.1 and compares the counts with the faults that the relay injects.
Run from the repository root: python -m unittest discover -s bench/tests
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCH_DIR))

from gen_frames import generate_frames  # noqa: E402
from harness import Cell, Settings, Target, run_once  # noqa: E402

CLIENTS = 3
FRAMES = 60  # one cycle: frame 59 is the ~1 MB batch, which the relay fragments
# Per client, by k % 10: 3 corrupted, 5 dropped, 7 duplicated, 9 fragmented.
EXPECTED_DELIVERIES = FRAMES - 2 * FRAMES // 10
EXPECTED_MISMATCHES = FRAMES // 10 + 1  # corrupted frames plus one binary frame
EXPECTED_OUT_OF_ORDER = FRAMES // 10


def node_ws_available() -> bool:
    if shutil.which("node") is None:
        return False
    check = subprocess.run(["node", "-e", "require.resolve('ws')"], cwd=BENCH_DIR, capture_output=True)
    return check.returncode == 0


class LoadGeneratorCountsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.work_dir = Path(tempfile.mkdtemp(prefix="relay-bench-test-"))
        cls.frames_path = cls.work_dir / "frames.jsonl"
        cls.frames_path.write_bytes(b"".join(f + b"\n" for f in generate_frames(FRAMES, seed=7)))
        cls.target = Target(
            "faulty",
            (sys.executable, str(BENCH_DIR / "tests" / "faulty_relay.py"), "--upstream", "{upstream}", "--port", "{port}"),
            health=False,
        )

    @classmethod
    def tearDownClass(cls) -> None:
        shutil.rmtree(cls.work_dir, ignore_errors=True)

    def run_with(self, loadgen: str, client: str) -> dict:
        settings = Settings(
            frames_path=self.frames_path,
            duration_s=0.5,
            drain_timeout_s=10,
            python=sys.executable,
            loadgen=loadgen,
            loadgen_client=client,
            client_deflate=True,
            work_dir=self.work_dir,
        )
        return run_once(self.target, Cell(CLIENTS, 120), settings, f"{loadgen}-{client}")

    def check_counts(self, run: dict) -> None:
        self.assertEqual(run["frames_sent"], FRAMES)
        self.assertEqual(run["connected"], CLIENTS)
        self.assertEqual(run["deliveries"], CLIENTS * EXPECTED_DELIVERIES)
        self.assertEqual(run["mismatches"], CLIENTS * EXPECTED_MISMATCHES)
        self.assertEqual(run["out_of_order"], CLIENTS * EXPECTED_OUT_OF_ORDER)
        self.assertEqual(run["control_messages"], {"relay_status": CLIENTS})
        self.assertEqual(run["closes_during_run"], 0)
        self.assertEqual(run["min_client_deliveries"], EXPECTED_DELIVERIES)
        self.assertIsNotNone(run["latency_ms"]["p99"])

    def test_node_raw_client(self) -> None:
        if not node_ws_available():
            self.skipTest("node or the ws package is missing (run npm ci in bench/)")
        self.check_counts(self.run_with("node", "raw"))

    def test_node_ws_client(self) -> None:
        if not node_ws_available():
            self.skipTest("node or the ws package is missing (run npm ci in bench/)")
        self.check_counts(self.run_with("node", "ws"))

    def test_python_client(self) -> None:
        self.check_counts(self.run_with("python", "raw"))


if __name__ == "__main__":
    unittest.main()
