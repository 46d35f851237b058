"""Profile the relay with py-spy during a run and summarize the samples.

``run.py --profile gil`` records only the thread that holds the GIL, which
shows where the relay's Python code spends its time. ``--profile all`` records
every thread that py-spy does not judge idle, including time blocked in
system calls. Each relay run then writes ``py-spy.txt`` (collapsed stacks,
one ``frame;frame;... count`` line per stack) to its log folder, and the
results file gets the top frames by own and by cumulative samples.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path

SAMPLES_PER_SECOND = 200
TOP_FRAMES = 12
CUMULATIVE_MAX_PERCENT = 95.0
RELAY_FRAME = re.compile(r"\((relay/[\w/]+\.py):(\d+)\)")

# Shortens "func (/long/path/site-packages/pkg/mod.py:12)" to "func (pkg/mod.py:12)".
PATH_PREFIX = re.compile(r"\((?:/[^():]*/(?:site-packages|lib/python3\.\d+)/|/[^():]*/(?=relay/))")


def executable() -> str | None:
    """Return the py-spy command: on PATH, or beside this Python (a venv's bin/)."""
    beside_python = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside_python) if beside_python.exists() else None)


def start(pid: int, seconds: float, mode: str, output: Path, log: Path) -> subprocess.Popen:
    """Start ``py-spy record`` on ``pid`` for ``seconds`` (rounded up, at least 1)."""
    argv = [
        executable() or "py-spy",
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, int(seconds + 0.999))),
        "--rate",
        str(SAMPLES_PER_SECOND),
        "--format",
        "raw",
        "--output",
        str(output),
    ]
    if mode == "gil":
        argv.append("--gil")
    # Without --nonblocking, py-spy stops every thread for each sample, which
    # with 1,000 clients (2,000 threads) slowed the relay several times over.
    argv.append("--nonblocking")
    with open(log, "wb") as log_file:
        return subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)


def summarize(path: Path, source_root: Path | None = None) -> dict:
    """Return the sample count and the frames with the most samples.

    "self" counts samples whose innermost frame is the frame, and "cumulative"
    counts samples with the frame anywhere on the stack, leaving out frames
    on more than CUMULATIVE_MAX_PERCENT of the samples (thread entry points).
    Both are in percent of all samples. A frame in ``relay/`` gets its source
    line from ``source_root`` appended.
    """
    own: collections.Counter[str] = collections.Counter()
    cumulative: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, count_text = line.rsplit(" ", 1)
        count = int(count_text)
        total += count
        frames = [PATH_PREFIX.sub("(", frame) for frame in stack.split(";")]
        own[frames[-1]] += count
        for frame in set(frames):
            cumulative[frame] += count

    if total == 0:
        return {"samples": 0, "self": [], "cumulative": []}
    own_top = [
        [round(100 * n / total, 1), with_source(frame, source_root)]
        for frame, n in own.most_common(TOP_FRAMES)
    ]
    cumulative_top = [
        [round(100 * n / total, 1), frame]
        for frame, n in cumulative.most_common()
        if 100 * n / total <= CUMULATIVE_MAX_PERCENT
    ][:TOP_FRAMES]
    return {"samples": total, "self": own_top, "cumulative": cumulative_top}


def with_source(frame: str, source_root: Path | None) -> str:
    """Append the source line of a relay/ frame, as "frame: code"."""
    match = RELAY_FRAME.search(frame)
    if source_root is None or match is None:
        return frame
    try:
        lines = (source_root / match.group(1)).read_text().splitlines()
        return f"{frame}: {lines[int(match.group(2)) - 1].strip()}"
    except (OSError, IndexError):
        return frame
