"""Run one benchmark cell: fake upstream, relay under test, load generator.

Every process listens on or connects to 127.0.0.1 only. Each run has a
bounded frame count and time limit, and every process it starts is stopped
before it returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import pyspy
from procstat import ProcessSampler, read_cpu_ns, read_system_cpu

logger = logging.getLogger("bench")

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
HOST = "127.0.0.1"

# Paced runs send whole cycles of this many frames, because every 60th frame
# is a ~1 MB batch and p99 depends on how many of those a run contains.
FRAME_CYCLE = 60

# A load generator or upstream above this share of one core may be the limit.
SATURATION_PERCENT = 90.0

# Other processes using more than this share of one core during a run (see
# "other_cpu_percent") make its numbers suspect.
NOISE_PERCENT = 15.0

STARTUP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0


class RunError(Exception):
    """A benchmark process failed to start, exited early or timed out."""


@dataclass(frozen=True)
class Cell:
    """One point of the matrix: client count and upstream rate in frames/s
    (0 means as fast as the relay reads). ``pinned`` runs the relay on CPU 0
    and the upstream and load generator on CPU 1."""

    clients: int
    rate: float
    pinned: bool = False

    @property
    def label(self) -> str:
        return cell_label(self.clients, self.rate, self.pinned)


def cell_label(clients: int, rate: float, pinned: bool) -> str:
    """Return a cell's name in tables, such as "500 clients x max pinned"."""
    rate_text = "max" if rate == 0 else f"{rate:g}/s"
    noun = "client" if clients == 1 else "clients"
    label = f"{clients} {noun} x {rate_text}"
    if pinned:
        label += " pinned"
    return label


@dataclass(frozen=True)
class Settings:
    """Settings shared by every run of one benchmark invocation."""

    frames_path: Path
    duration_s: float
    drain_timeout_s: float
    python: str
    loadgen: str  # "node" or "python"
    loadgen_client: str  # Node load generator's client: "raw" or "ws"
    client_deflate: bool
    work_dir: Path
    # Directory from which `python -m relay` runs: a copy of the repository's
    # relay/ package taken when the benchmark starts (see snapshot_relay), so
    # that edits made during a long run do not change the code under test.
    relay_root: Path = REPO_DIR
    # py-spy mode for runs of the project's relay: None, "gil" or "all".
    profile: str | None = None


@dataclass(frozen=True)
class Target:
    """A relay implementation: ``command(port, upstream_url, config_path)``
    returns its argv, and ``health`` is True if it serves GET /health."""

    name: str
    argv: tuple[str, ...]
    health: bool

    def command(self, port: int, upstream_url: str, config_path: Path) -> list[str]:
        return [
            part.format(port=port, upstream=upstream_url, config=config_path)
            for part in self.argv
        ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class Managed:
    """A child process whose stdout JSON lines are read into a queue."""

    def __init__(self, name: str, argv: list[str], log_path: Path, **popen) -> None:
        self.name = name
        self.log_path = log_path
        self.log_file = open(log_path, "wb")
        self.events: queue.Queue[dict] = queue.Queue()
        logger.debug("start %s: %s", name, " ".join(argv))
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            **popen,
        )
        self.reader = threading.Thread(
            target=self._read_stdout, name=f"{name}-stdout", daemon=True
        )
        self.reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                self.log_file.write(line)
                continue
            self.events.put(event)

    def send(self, command: str) -> None:
        try:
            self.process.stdin.write(command.encode() + b"\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as error:
            raise RunError(f"{self.name} exited before command {command!r}: {error}")

    def wait_for(self, event_name: str, timeout_s: float, watch: Managed | None = None) -> dict:
        """Return the next stdout event named ``event_name``.

        Raises:
            RunError: on timeout, an "error" event, exit of this process, or
                exit of ``watch`` (the relay, while a helper waits for it).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunError(f"{self.name}: timed out after {timeout_s:g} s waiting for {event_name!r}")
            try:
                event = self.events.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                if watch is not None and watch.process.poll() is not None:
                    raise RunError(
                        f"{watch.name} exited with code {watch.process.returncode}; "
                        f"see {watch.log_path}"
                    )
                if self.process.poll() is not None:
                    # Let the reader thread queue the last lines before giving up.
                    self.reader.join(timeout=2)
                    if self.events.empty():
                        raise RunError(
                            f"{self.name} exited with code {self.process.returncode} "
                            f"while waiting for {event_name!r}; see {self.log_path}"
                        )
                continue
            if event.get("event") == event_name:
                return event
            if event.get("event") == "error":
                raise RunError(f"{self.name}: {event.get('message')}")

    def stop(self, grace_s: float = 0.0) -> None:
        """Wait up to ``grace_s`` for the process to exit, then terminate it."""
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) ignored SIGTERM, killing it", self.name, self.pid)
                self.process.kill()
                self.process.wait()
        self.reader.join(timeout=1)
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass  # stdin of an exited process may fail to flush
        self.log_file.close()


def wait_until_serving(target: Target, process: Managed, port: int, timeout_s: float) -> None:
    """Wait until the relay accepts TCP connections and, if it has one, its
    /health endpoint returns 200 (upstream connected)."""
    deadline = time.monotonic() + timeout_s
    last_error = "no attempt"
    while time.monotonic() < deadline:
        if process.process.poll() is not None:
            raise RunError(
                f"{target.name} exited with code {process.process.returncode}; "
                f"see {process.log_path}"
            )
        try:
            if target.health:
                url = f"http://{HOST}:{port}/health"
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            else:
                with socket.create_connection((HOST, port), timeout=1):
                    return
        except urllib.error.HTTPError as error:
            last_error = f"HTTP {error.code}"
        except OSError as error:
            last_error = str(error)
        time.sleep(0.05)
    raise RunError(f"{target.name} not serving on port {port} after {timeout_s:g} s: {last_error}")


def frame_count(cell: Cell, duration_s: float) -> int:
    """Return the number of frames a paced run sends: at least ``duration_s``
    worth, rounded up to whole FRAME_CYCLE cycles. Unpaced runs return 0 (no
    count limit, only the time limit)."""
    if cell.rate == 0:
        return 0
    return max(1, math.ceil(cell.rate * duration_s / FRAME_CYCLE)) * FRAME_CYCLE


def write_relay_config(path: Path, port: int, upstream_url: str) -> None:
    path.write_text(
        "[server]\n"
        f"host = {HOST}\n"
        f"port = {port}\n"
        "[upstream]\n"
        f"url = {upstream_url}\n"
        "[logging]\n"
        "level = WARNING\n"
    )


def loadgen_command(settings: Settings, port: int, clients: int) -> list[str]:
    args = [
        "--url",
        f"ws://{HOST}:{port}/relay",
        "--clients",
        str(clients),
        "--frames",
        str(settings.frames_path),
        "--deflate" if settings.client_deflate else "--no-deflate",
    ]
    if settings.loadgen == "node":
        node_options = os.environ.get("BENCH_LOADGEN_NODE_OPTIONS", "").split()
        return [
            "node",
            *node_options,
            str(BENCH_DIR / "loadgen.js"),
            *args,
            "--client",
            settings.loadgen_client,
        ]
    return [settings.python, str(BENCH_DIR / "loadgen.py"), *args]


def run_once(target: Target, cell: Cell, settings: Settings, run_id: str) -> dict:
    """Run one cell against one target and return its measurements."""
    run_dir = settings.work_dir / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    send_times_path = run_dir / "send-times.f64"
    relay_cpus = ["taskset", "-c", "0"] if cell.pinned else []
    helper_cpus = ["taskset", "-c", "1"] if cell.pinned else []
    started: list[Managed] = []
    try:
        upstream = Managed(
            "upstream",
            [
                *helper_cpus,
                settings.python,
                str(BENCH_DIR / "upstream.py"),
                "--frames",
                str(settings.frames_path),
                "--send-times",
                str(send_times_path),
            ],
            run_dir / "upstream.log",
        )
        started.append(upstream)
        upstream_port = upstream.wait_for("listening", STARTUP_TIMEOUT_S)["port"]
        upstream_url = f"ws://{HOST}:{upstream_port}/events"

        port = free_port()
        config_path = run_dir / "relay.conf"
        write_relay_config(config_path, port, upstream_url)
        env = dict(os.environ, PORT=str(port), BACKPACK_WS_URL=upstream_url)
        relay = Managed(
            target.name,
            [*relay_cpus, *target.command(port, upstream_url, config_path)],
            run_dir / f"{target.name}.log",
            cwd=settings.relay_root if target.name == "relay" else REPO_DIR,
            env=env,
        )
        started.append(relay)
        upstream.wait_for("connected", STARTUP_TIMEOUT_S, watch=relay)
        wait_until_serving(target, relay, port, STARTUP_TIMEOUT_S)

        loadgen = Managed(
            "loadgen",
            [*helper_cpus, *loadgen_command(settings, port, cell.clients)],
            run_dir / "loadgen.log",
        )
        started.append(loadgen)
        ready = loadgen.wait_for("ready", STARTUP_TIMEOUT_S + cell.clients / 20)
        if ready["connected"] == 0:
            raise RunError(f"no client connected: {ready['connect_errors']}")
        time.sleep(0.5)  # let the relay's greeting messages go out first

        sampler = ProcessSampler(
            {"relay": relay.pid, "loadgen": loadgen.pid, "upstream": upstream.pid}
        )
        sampler.start()
        rss_idle = sampler.samples["relay"][-1].rss_bytes
        count = frame_count(cell, settings.duration_s)
        time_limit_s = settings.duration_s if count == 0 else 2 * count / cell.rate + 5
        pids = {"relay": relay.pid, "upstream": upstream.pid, "loadgen": loadgen.pid}
        cpu_begin_ns = {name: read_cpu_ns(pid) for name, pid in pids.items()}
        system_begin = read_system_cpu()
        begin_s = time.monotonic()
        relay_source = None
        profiler = None
        if target.name == "relay":
            relay_source = source_digest(settings.relay_root / "relay")
        loadgen.send("begin")
        upstream.send(f"start {cell.rate:g} {count} {time_limit_s:g}")
        if settings.profile and target.name == "relay":
            expected_s = settings.duration_s if count == 0 else count / cell.rate
            profiler = pyspy.start(
                relay.pid,
                expected_s,
                settings.profile,
                run_dir / "py-spy.txt",
                run_dir / "py-spy.log",
            )
        done = upstream.wait_for("done", time_limit_s + 10)
        loadgen.send(f"expect {done['sent']}")
        drain_timed_out = False
        try:
            drained = loadgen.wait_for("drained", settings.drain_timeout_s)
            drain_reason = drained["reason"]
        except RunError:
            drain_timed_out = True
            drain_reason = "timeout"
        cpu_end_ns = {name: read_cpu_ns(pid) for name, pid in pids.items()}
        system_end = read_system_cpu()
        end_s = time.monotonic()
        sampler.stop()
        cpu_s = {
            name: (cpu_end_ns[name] - cpu_begin_ns[name]) / 1e9
            if cpu_end_ns[name] is not None and cpu_begin_ns[name] is not None
            else None
            for name in pids
        }
        loadgen.send(f"stop {send_times_path}")
        result = loadgen.wait_for("result", 60)
        relay_alive = relay.process.poll() is None
        profile = None
        if profiler is not None:
            try:
                profiler.wait(30)
            except subprocess.TimeoutExpired:
                profiler.kill()
                profiler.wait()
            profile_path = run_dir / "py-spy.txt"
            if profile_path.exists():
                summary = pyspy.summarize(profile_path, settings.relay_root)
                profile = {"mode": settings.profile, **summary}
            else:
                profile = {"mode": settings.profile, "error": f"no output; see {run_dir / 'py-spy.log'}"}
        return summarize(
            target=target,
            cell=cell,
            ready=ready,
            done=done,
            result=result,
            sampler=sampler,
            cpu_s=cpu_s,
            system_busy_s=system_end[0] - system_begin[0],
            system_steal_s=system_end[1] - system_begin[1],
            begin_s=begin_s,
            end_s=end_s,
            rss_idle=rss_idle,
            drain_reason=drain_reason,
            drain_timed_out=drain_timed_out,
            relay_alive=relay_alive,
        ) | {"relay_source_sha256": relay_source, "profile": profile}
    finally:
        for process in reversed(started):
            grace_s = 0.0
            if process.name in ("upstream", "loadgen"):
                # Both exit by themselves after "quit" or "stop".
                grace_s = 2.0
                if process.name == "upstream":
                    try:
                        process.send("quit")
                    except RunError:
                        pass
            process.stop(grace_s)


def summarize(
    *,
    target: Target,
    cell: Cell,
    ready: dict,
    done: dict,
    result: dict,
    sampler: ProcessSampler,
    cpu_s: dict[str, float | None],
    system_busy_s: float,
    system_steal_s: float,
    begin_s: float,
    end_s: float,
    rss_idle: int,
    drain_reason: str,
    drain_timed_out: bool,
    relay_alive: bool,
) -> dict:
    """Turn the raw events of one run into the metrics that the report uses."""
    sent = done["sent"]
    connected = result["connected"]
    send_elapsed_s = done["elapsed_s"]
    first_send_s = (done["first_send_ns"] or 0) / 1e9
    last_receive_s = (result["last_receive_ns"] or 0) / 1e9
    last_send_s = (done["last_send_ns"] or 0) / 1e9
    # The delivery window runs from the first send to the last frame received.
    window_end_s = max(last_receive_s, last_send_s)
    window_s = max(window_end_s - first_send_s, 1e-9)
    delivered_mb = result["delivered_bytes"] / 1e6

    # CPU is read when the load generator reports "drained", at most --quiet-ms
    # after the last delivery while the relay idles, so the CPU window ends
    # with the delivery window.
    relay_cpu_s = cpu_s["relay"]
    loadgen_cpu_s = cpu_s["loadgen"]
    upstream_cpu_s = cpu_s["upstream"]
    relay_peak = sampler.window_max("relay", begin_s, end_s)
    cpu_window_s = max(window_end_s - begin_s, 1e-9)
    self_cpu = result["self_cpu"]
    loadgen_percent = self_cpu["percent_of_core"]
    event_loop = self_cpu["event_loop_utilization"]
    upstream_percent = None if upstream_cpu_s is None else 100 * upstream_cpu_s / cpu_window_s

    # CPU that neither the relay, the load generator nor the upstream used
    # during the run: other processes on the machine, the runner itself and
    # /proc rounding. A large value means the numbers are disturbed.
    measured_cpu_s = sum(value for value in cpu_s.values() if value is not None)
    read_window_s = max(end_s - begin_s, 1e-9)
    other_cpu_percent = 100 * max(system_busy_s - measured_cpu_s, 0.0) / read_window_s

    expected = result["expected_deliveries"]
    return {
        "target": target.name,
        "clients": cell.clients,
        "rate": cell.rate,
        "pinned": cell.pinned,
        "cell": cell.label,
        "connected": connected,
        "connect_s": ready["connect_s"],
        "deflate_negotiated": result["deflate_negotiated"],
        "frames_sent": sent,
        "bytes_sent": done["bytes"],
        "send_elapsed_s": send_elapsed_s,
        "sent_fps": sent / send_elapsed_s if send_elapsed_s else None,
        "ingest_mb_s": done["bytes"] / 1e6 / send_elapsed_s if send_elapsed_s else None,
        "offered_mb_s": done["bytes"] * connected / 1e6 / send_elapsed_s if send_elapsed_s else None,
        "deliveries": result["deliveries"],
        "expected_deliveries": expected,
        "delivered_fraction": result["deliveries"] / expected if expected else 0.0,
        "delivered_mb": delivered_mb,
        "window_s": window_s,
        "delivered_fps": result["deliveries"] / window_s,
        "delivered_mb_s": delivered_mb / window_s,
        "mismatches": result["mismatches"],
        "out_of_order": result["out_of_order"],
        "control_messages": result["control_messages"],
        "closes_during_run": result["closes_during_run"],
        "close_codes": result["close_codes"],
        "min_client_deliveries": result["min_client_deliveries"],
        "latency_ms": result["latency_ms"],
        "latency_large_frames_ms": result["latency_large_frames_ms"],
        "latency_small_frames_ms": result["latency_small_frames_ms"],
        "relay_cpu_s": relay_cpu_s,
        "relay_cpu_s_from_ticks": ticks_cpu_seconds(sampler, "relay", begin_s, end_s),
        "relay_cpu_percent": None if relay_cpu_s is None else 100 * relay_cpu_s / cpu_window_s,
        "relay_cpu_s_per_mb": (
            relay_cpu_s / delivered_mb if relay_cpu_s is not None and delivered_mb else None
        ),
        "relay_rss_idle_mb": rss_idle / 1e6,
        "relay_rss_max_mb": relay_peak.rss_bytes / 1e6 if relay_peak else None,
        "relay_threads_max": relay_peak.threads if relay_peak else None,
        "relay_alive": relay_alive,
        "loadgen_cpu_percent": loadgen_percent,
        "loadgen_proc_cpu_percent": (
            None if loadgen_cpu_s is None else 100 * loadgen_cpu_s / cpu_window_s
        ),
        "loadgen_event_loop_utilization": event_loop,
        "loadgen_saturated": bool(
            (loadgen_percent or 0) > SATURATION_PERCENT
            or (event_loop or 0) * 100 > SATURATION_PERCENT
        ),
        "upstream_cpu_percent": upstream_percent,
        "upstream_saturated": bool((upstream_percent or 0) > SATURATION_PERCENT),
        "other_cpu_percent": other_cpu_percent,
        "steal_cpu_percent": 100 * system_steal_s / read_window_s,
        "noisy": other_cpu_percent > NOISE_PERCENT,
        "drain": drain_reason,
        "drain_timed_out": drain_timed_out,
    }


# Prints the versions of the Python packages that the relay and peers use.
PACKAGE_VERSIONS_SCRIPT = """
import importlib.metadata, json
versions = {}
for name in ("websockets", "simple-websocket", "websocket-client", "Werkzeug", "wsproto"):
    try:
        versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
print(json.dumps(versions))
"""


def ticks_cpu_seconds(sampler: ProcessSampler, name: str, start_s: float, end_s: float) -> float | None:
    """Return CPU seconds from /proc/PID/stat (10 ms ticks, exited threads
    included) between the first and last sample of a window, as a check on
    the schedstat reading."""
    inside = [s for s in sampler.samples[name] if start_s - 0.2 <= s.time_s <= end_s + 0.2]
    if len(inside) < 2:
        return None
    return inside[-1].cpu_s - inside[0].cpu_s


def snapshot_relay(destination: Path) -> Path:
    """Copy the repository's relay/ package into ``destination`` and return
    the directory to run ``python -m relay`` from.

    ``python -m`` puts the working directory first on sys.path, so the copy
    shadows the repository, including an editable install of it.
    """
    shutil.copytree(
        REPO_DIR / "relay",
        destination / "relay",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    return destination


def source_digest(directory: Path) -> str:
    """Return a SHA-256 over the names and bytes of the .py files under
    ``directory``, identifying the relay code measured when it is uncommitted."""
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*.py")):
        digest.update(str(path.relative_to(directory)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def describe_environment(settings: Settings, targets: list[Target]) -> dict:
    """Collect the machine and software versions that the report prints."""
    cpu_model = "unknown"
    with open("/proc/cpuinfo") as file:
        for line in file:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as file:
        mem_kb = int(file.readline().split()[1])

    def version(argv: list[str], cwd: Path = REPO_DIR) -> str | None:
        try:
            output = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=cwd)
        except (OSError, subprocess.TimeoutExpired):
            return None
        text = (output.stdout or output.stderr).strip()
        return text.splitlines()[-1] if output.returncode == 0 and text else None

    python_packages = version([settings.python, "-c", PACKAGE_VERSIONS_SCRIPT])
    environment = {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "ram_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": os.uname().release,
        "python": version([settings.python, "--version"]),
        "python_packages": json.loads(python_packages) if python_packages else {},
        "node": version(["node", "--version"]) if shutil.which("node") else None,
        "ws": version(["node", "-p", "require('ws/package.json').version"], cwd=BENCH_DIR)
        if shutil.which("node")
        else None,
        "loadgen": settings.loadgen,
        "loadgen_client": settings.loadgen_client if settings.loadgen == "node" else "websockets",
        "client_deflate_offered": settings.client_deflate,
    }
    if any(t.name == "relay" for t in targets):
        environment["relay_version"] = version(
            [settings.python, "-m", "relay", "--version"], cwd=settings.relay_root
        )
        environment["relay_source_sha256"] = source_digest(settings.relay_root / "relay")
    return environment


def results_json(environment: dict, settings: Settings, runs: list[dict]) -> str:
    payload = {
        "environment": environment,
        "settings": {
            key: str(value) if isinstance(value, Path) else value
            for key, value in asdict(settings).items()
            if key != "work_dir"
        },
        "runs": runs,
    }
    return json.dumps(payload, indent=1, ensure_ascii=False)
