"""Read CPU time, RSS and thread count of running processes from /proc."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def read_cpu_ns(pid: int) -> int | None:
    """Return the CPU time of all live threads of ``pid`` in nanoseconds.

    Sums the first field of /proc/PID/task/*/schedstat (time on CPU, ns),
    which is far finer than the 10 ms clock ticks of /proc/PID/stat. Returns
    None if the process is gone.

    NOTE: threads that exited are not counted, so take both readings of a
    window while the process keeps the same threads (clients connected).
    """
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as file:
                total += int(file.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread exited between listdir and open
    return total


def read_system_cpu() -> tuple[float, float]:
    """Return (busy, steal) CPU seconds of the whole machine since boot.

    Busy is every /proc/stat "cpu" field except idle, iowait and steal,
    summed over all cores.
    """
    with open("/proc/stat") as file:
        fields = [int(value) for value in file.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    busy = user + nice + system + irq + softirq
    return busy / CLOCK_TICKS_PER_SECOND, steal / CLOCK_TICKS_PER_SECOND


@dataclass
class Sample:
    """One reading of a process: monotonic time in seconds, CPU seconds
    (user + system, all threads), resident set size in bytes, thread count."""

    time_s: float
    cpu_s: float
    rss_bytes: int
    threads: int


def read_sample(pid: int) -> Sample | None:
    """Read one sample of ``pid``, or return None if the process is gone."""
    now = time.monotonic()
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name in field 2 may contain spaces, so split after its ")".
    fields = stat[stat.rindex(b")") + 2 :].split()
    utime_ticks = int(fields[11])
    stime_ticks = int(fields[12])
    threads = int(fields[17])
    rss_pages = int(fields[21])
    return Sample(
        time_s=now,
        cpu_s=(utime_ticks + stime_ticks) / CLOCK_TICKS_PER_SECOND,
        rss_bytes=rss_pages * PAGE_SIZE,
        threads=threads,
    )


@dataclass
class ProcessSampler:
    """Background thread that samples a set of processes every ``interval_s``."""

    pids: dict[str, int]
    interval_s: float = 0.1
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.samples = {name: [] for name in self.pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proc-sampler", daemon=True)

    def start(self) -> None:
        self._sample_all()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample_all()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample_all()

    def _sample_all(self) -> None:
        for name, pid in self.pids.items():
            sample = read_sample(pid)
            if sample is not None:
                self.samples[name].append(sample)

    def window_max(self, name: str, start_s: float, end_s: float) -> Sample | None:
        """Return the largest RSS and thread count seen between two times."""
        inside = [s for s in self.samples[name] if start_s <= s.time_s <= end_s]
        if not inside:
            return None
        return Sample(
            time_s=end_s,
            cpu_s=inside[-1].cpu_s,
            rss_bytes=max(s.rss_bytes for s in inside),
            threads=max(s.threads for s in inside),
        )

