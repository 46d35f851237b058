"""Run the unittest suite and end with a ``N passed, N failed, N skipped`` line.

Usage: ``python -m tests [unittest arguments]`` from the repository root. Set
``RELAY_TEST_UNIT`` (seconds, default 1.0) higher on slow machines; every
timeout in the suite is a multiple of it.
"""

from __future__ import annotations

import sys
import unittest
from pathlib import Path


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    names = sys.argv[1:]
    loader = unittest.TestLoader()
    if names:
        suite = loader.loadTestsFromNames(names)
    else:
        suite = loader.discover(str(root / "tests"), top_level_dir=str(root))
    result = unittest.TextTestRunner(verbosity=1).run(suite)
    # A test with failing subtests appears once per subtest; count it once.
    failed_ids = {
        getattr(test, "test_case", test).id()
        for test, _ in result.failures + result.errors
    }
    failed = len(failed_ids) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 0 if failed == 0 and result.testsRun > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
