"""Clients written in other languages receive a fresh corpus byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import unittest

from tests.support import ROOT, UNIT, FakeUpstream, RelayClient, RelayProcess, wait_for

NODE_MODULES = ROOT / "bench" / "node_modules"
NODE_CLIENT = ROOT / "tests" / "interop" / "node_client.js"

# Text that exercises UTF-8: emoji, CJK, mathematical letters, RTL, escapes.
SAMPLES = ["Unusual Burning Flames ", "🔥🦄", "限定版", "𝓤𝓷𝓾𝓼𝓾𝓪𝓵", "مرحبا", "\\u0000 \" \\\\", "key", "ref"]


def make_corpus(seed: int, count: int) -> list[bytes]:
    """Generate Backpack.tf-shaped array frames the relay has never seen.

    Sizes run from a few hundred bytes to about 1 MB, as in the live feed.
    """
    rng = random.Random(seed)
    frames = []
    for index in range(count):
        events = 1500 if index % 10 == 9 else rng.randint(1, 12)
        batch = []
        for _ in range(events):
            name = "".join(rng.choice(SAMPLES) for _ in range(rng.randint(2, 6)))
            batch.append(
                {
                    "id": "%024x" % rng.getrandbits(96),
                    "event": rng.choice(["listing-update", "listing-delete"]),
                    "payload": {"item": {"name": name}, "details": name * rng.randint(1, 20), "value": rng.random() * 1000},
                }
            )
        frames.append(json.dumps(batch, ensure_ascii=False).encode("utf-8"))
    return frames


class InteropTest(unittest.TestCase):
    def setUp(self) -> None:
        self.upstream = FakeUpstream()
        self.addCleanup(self.upstream.close)
        self.relay = RelayProcess(self.upstream.url)
        self.addCleanup(self.relay.stop)
        self.relay.wait_listening()
        self.connection = self.upstream.wait_connection(1, 10 * UNIT)
        self.corpus = make_corpus(seed=20261204, count=40)

    @unittest.skipUnless(shutil.which("node") and (NODE_MODULES / "ws").is_dir(), "needs node and bench/node_modules/ws (npm install in bench/)")
    def test_node_ws_client_byte_identical(self) -> None:
        self.assertGreater(max(len(frame) for frame in self.corpus), 500_000)
        env = dict(os.environ, NODE_PATH=str(NODE_MODULES))
        node = subprocess.Popen(
            ["node", str(NODE_CLIENT), self.relay.ws_url, str(len(self.corpus)), str(int(30_000 * UNIT))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
        )
        self.addCleanup(node.kill)
        assert node.stdout is not None
        self.assertEqual(json.loads(node.stdout.readline()), {"open": True})
        wait_for(lambda: self.relay.get("/health")[1]["connectedClients"] == 1, 5 * UNIT)
        for frame in self.corpus:
            self.connection.send_text(frame)
        output, errors = node.communicate(timeout=40 * UNIT)
        self.assertEqual(node.returncode, 0, errors)
        rows = [json.loads(line) for line in output.splitlines() if line]
        self.assertEqual(len(rows), len(self.corpus))
        for index, (row, frame) in enumerate(zip(rows, self.corpus)):
            self.assertFalse(row["binary"], index)
            self.assertEqual(row["length"], len(frame), index)
            self.assertEqual(row["sha256"], hashlib.sha256(frame).hexdigest(), index)

    def test_python_client_byte_identical(self) -> None:
        client = RelayClient(self.relay.ws_url)
        self.addCleanup(client.close)
        client.recv_json()
        for frame in self.corpus:
            self.connection.send_text(frame)
        received = [client.recv(10 * UNIT)[1] for _ in self.corpus]
        self.assertEqual([hashlib.sha256(f).hexdigest() for f in received], [hashlib.sha256(f).hexdigest() for f in self.corpus])


if __name__ == "__main__":
    unittest.main()
