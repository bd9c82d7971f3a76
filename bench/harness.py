"""Process control and measurement for the benchmarks: start a server pinned to CPUs, wait for
it, sample its CPU time and peak memory, time a client loop, stop the server by its PID; the
median of interleaved rounds (shared by the request/response and pub/sub runners)."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

__all__ = [
    "Result",
    "Server",
    "free_port",
    "median_round",
    "percentiles",
    "pin",
    "spawn",
    "stats",
    "timed_loop",
    "wait_port",
]


class SkipSystem(Exception):
    """A peer that cannot run here (not installed, no compiler...): the reason is reported."""


def pin(cpus: set[int]) -> None:
    os.sched_setaffinity(0, cpus)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, seconds: float = 10.0) -> None:
    """Wait until something accepts TCP connections on the port (bounded)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SkipSystem(f"nothing listened on port {port} within {seconds:g} s") from None
            time.sleep(0.02)  # polling a port that a foreign binary opens; bounded above


@dataclass
class Server:
    """Processes that together make one system's server side."""

    name: str
    procs: list[subprocess.Popen[bytes]]
    port: int = 0
    url: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def processes(self) -> list[psutil.Process]:
        """The server's processes and all their descendants (workers), alive now."""
        out: list[psutil.Process] = []
        for p in self.procs:
            try:
                proc = psutil.Process(p.pid)
                out += [proc, *proc.children(recursive=True)]
            except psutil.Error:
                pass
        return out

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes()]

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server's processes (psutil)."""
        total = 0.0
        for proc in self.processes():
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system
        return total

    def rss_bytes(self, key: str = "VmHWM") -> int:
        """Resident memory of the server's processes together: the peak (``VmHWM``, default)
        or the current size (``VmRSS``, from psutil). psutil has no peak on Linux, so the peak
        is the kernel's own figure, read from /proc/PID/status."""
        total = 0
        for proc in self.processes():
            try:
                if key == "VmRSS":
                    total += proc.memory_info().rss
                    continue
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith(key + ":"):
                        total += int(line.split()[1]) * 1024
            except (OSError, psutil.Error):
                pass
        return total

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            for pipe in (p.stdout, p.stderr):
                if pipe is not None:
                    pipe.close()


def spawn(
    args: Sequence[str],
    cpus: set[int],
    ready: str | None = r"listening (\d+)",
    seconds: float = 20.0,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], re.Match[str] | None]:
    """Start a process pinned to ``cpus``; with ``ready``, wait for a stdout line matching it."""
    exe = args[0]
    if os.sep not in exe and shutil.which(exe) is None:
        raise SkipSystem(f"{exe} is not installed")
    proc = subprocess.Popen(
        list(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        env={**os.environ, **(env or {})},
    )
    if ready is None:
        return proc, None
    assert proc.stdout is not None
    rx = re.compile(ready)
    deadline = time.monotonic() + seconds
    buf = b""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
        for line in buf.decode(errors="replace").splitlines():
            m = rx.search(line)
            if m:
                return proc, m
    proc.kill()
    proc.wait()
    raise SkipSystem(f"{' '.join(args[:3])} did not start: {buf.decode(errors='replace')[-200:]}")


@dataclass
class Result:
    """One row of a benchmark table."""

    scenario: str
    system: str
    placement: str
    calls: int = 0
    seconds: float = 0.0
    payload: int = 64
    p50_us: float | None = None
    p99_us: float | None = None
    p999_us: float | None = None
    cpu_s_per_m: float | None = None
    peak_rss_mb: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.rate * self.payload / 1e6

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "system": self.system,
            "placement": self.placement,
            "calls": self.calls,
            "seconds": round(self.seconds, 4),
            "payload": self.payload,
            "calls_per_s": round(self.rate, 1),
            "mb_per_s": round(self.mb_per_s, 2),
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "p999_us": self.p999_us,
            "cpu_s_per_million": self.cpu_s_per_m,
            "peak_rss_mb": self.peak_rss_mb,
            "note": self.note,
            **self.extra,
        }


def percentiles(values: Sequence[float], points: Sequence[float]) -> list[float]:
    """The values at ``points`` (percent, 0-100; 99.9 works), by the standard library's
    ``statistics.quantiles`` (method "inclusive": linear between the two nearest samples, as
    numpy's default). One value is every percentile of itself."""
    if len(values) < 2:
        return [float(values[0]) if values else 0.0 for _ in points]
    cuts = statistics.quantiles(values, n=1000, method="inclusive")  # 0.1 % steps
    return [float(cuts[round(p * 10) - 1]) if p < 100 else float(max(values)) for p in points]


def stats(latencies_ns: list[int]) -> tuple[float, float, float]:
    """p50, p99, p99.9 in microseconds."""
    if not latencies_ns:
        return (0.0, 0.0, 0.0)
    p50, p99, p999 = (round(v / 1000, 1) for v in percentiles(latencies_ns, (50, 99, 99.9)))
    return p50, p99, p999


def median_round(rounds: list[Result]) -> Result:
    """The round with the median rate; every round's rate is kept in ``extra``."""
    ordered = sorted(rounds, key=lambda r: r.rate)
    pick = ordered[(len(ordered) - 1) // 2]
    if len(rounds) > 1:
        pick.extra["round_calls_per_s"] = [round(r.rate, 1) for r in rounds]
    return pick


def timed_loop(
    call: Callable[[], object], count: int, cap_seconds: float, warmup: int = 200
) -> tuple[list[int], float]:
    """Run ``call`` up to ``count`` times or ``cap_seconds``; per-call latencies in ns."""
    for _ in range(warmup):
        call()
    lat: list[int] = []
    append = lat.append
    now = time.perf_counter_ns
    start = now()
    stop_at = start + int(cap_seconds * 1e9)
    t = start
    for _ in range(count):
        call()
        t2 = now()
        append(t2 - t)
        t = t2
        if t2 > stop_at:
            break
    return lat, (t - start) / 1e9


def python() -> str:
    return sys.executable
