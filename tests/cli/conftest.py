"""Helpers to run the `sockstack` command and the examples as real subprocesses."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import timeout

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["PYTHONUNBUFFERED"] = "1"
    return e


class Proc:
    """A subprocess whose stdout lines can be awaited with a timeout; ended by its PID."""

    def __init__(
        self, args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        full = _env()
        full.update(env or {})
        self.popen = subprocess.Popen(
            args, cwd=cwd, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.err_lines: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, daemon=True),
            threading.Thread(target=self._pump_err, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))

    def _pump_err(self) -> None:  # drained continuously so a chatty log never fills the pipe
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.err_lines.append(line)

    def wait_line(self, pattern: str, seconds: float = 10.0) -> re.Match[str]:
        rx = re.compile(pattern)
        while True:
            try:
                line = self.lines.get(timeout=timeout(seconds))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r}; saw {self.seen}") from None
            self.seen.append(line)
            m = rx.search(line)
            if m:
                return m

    def wait(self, seconds: float = 10.0) -> int:
        try:
            code = self.popen.wait(timeout(seconds))
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(f"process {self.popen.args} did not exit") from None
        finally:
            self._close()
        return code

    def stop(self, sig: int = signal.SIGTERM, seconds: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        return self.wait(seconds)

    def _close(self) -> None:
        for t in self._threads:
            t.join(timeout(5))
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()

    def stderr(self) -> str:
        return "".join(self.err_lines)


def run(
    args: list[str],
    cwd: Path | None = None,
    seconds: float = 30.0,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    full = _env()
    full.update(env or {})
    return subprocess.run(
        args, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout(seconds)
    )


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def demo_server() -> Iterator[tuple[str, str]]:
    """`sockstack serve` (built-in demo) on free ports: yields (tcp_url, udp_url)."""
    proc = Proc(["sockstack", "serve", "--tcp", "127.0.0.1:0", "--udp", "127.0.0.1:0"])
    try:
        tcp = proc.wait_line(r"serving Demo on (tcp://\S+)").group(1)
        udp = proc.wait_line(r"serving Demo on (udp://\S+)").group(1)
        yield tcp, udp
    finally:
        assert proc.stop() == 0
