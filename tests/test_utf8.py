"""UTF-8 validation of upstream text frames, checked against bytes.decode."""

from __future__ import annotations

import random
import unittest

from relay.upstream import UTF8_STEP, utf8_error_position


def reference_position(data: bytes) -> int | None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start
    return None


class Utf8ValidationTest(unittest.TestCase):
    def test_edge_cases_match_decode(self) -> None:
        cases = [
            b"",
            b'["ok"]',
            '["🔥限定 𝓤"]'.encode(),
            b'["\xff"]',
            b"ok\xc3",
            b"a" * (UTF8_STEP - 1) + "🔥".encode() * 3,
            b"a" * (UTF8_STEP - 2) + b"\xf0\x9f\x94",
            b"a" * (UTF8_STEP * 2) + b"\xed\xa0\x80",
            b"a" * UTF8_STEP + b"\x80",
        ]
        for data in cases:
            with self.subTest(tail=data[-8:]):
                self.assertEqual(utf8_error_position(data), reference_position(data))

    def test_random_corruption_matches_decode(self) -> None:
        rng = random.Random(20261204)
        for _ in range(500):
            data = bytearray("a🔥é限".encode() * rng.randint(0, 8000))
            if data and rng.random() < 0.5:
                data[rng.randrange(len(data))] = rng.randrange(256)
            with self.subTest(size=len(data)):
                self.assertEqual(utf8_error_position(bytes(data)), reference_position(bytes(data)))


if __name__ == "__main__":
    unittest.main()
