"""Helpers to run the `sockstack` command and the examples as real subprocesses."""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    """A subprocess whose stdout lines can be awaited with a timeout; ended by its PID. With
    ``group=True`` it leads a process group of its own, and :meth:`stop` signals that group
    (``make run`` and ``bash -c`` lines have children that a signal to the PID alone misses,
    as a terminal's Ctrl-C reaches the whole foreground group)."""

    def __init__(
        self,
        args: list[str],
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        group: bool = False,
    ) -> None:
        full = _env()
        full.update(env or {})
        self.group = group
        self.popen = subprocess.Popen(
            args,
            cwd=cwd,
            env=full,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=group,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.err_lines: list[str] = []
        self.urls: tuple[str, str] = ("", "")  # set by serving()
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
        """The first line from here on that matches ``pattern``, within ``seconds`` in all
        (a process printing other lines for ever does not keep the wait going)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout(seconds)
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
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
            self._signal(signal.SIGKILL)
            self.popen.wait()
            raise AssertionError(f"process {self.popen.args} did not exit") from None
        finally:
            self._close()
        return code

    def stop(self, sig: int = signal.SIGTERM, seconds: float = 10.0) -> int:
        if self.popen.poll() is None:
            self._signal(sig)
        return self.wait(seconds)

    def _signal(self, sig: int) -> None:
        if self.group:
            try:
                os.killpg(self.popen.pid, sig)  # the group this process leads, by its PID
            except ProcessLookupError:
                pass
        else:
            self.popen.send_signal(sig)

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


def free_port_both() -> int:
    """A loopback port free for TCP and for UDP at once (for a README port that either uses)."""
    for _ in range(100):  # bounded: a port the kernel gives for TCP is nearly always free for UDP
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise AssertionError("no port free for both TCP and UDP in 100 tries")


@contextmanager
def serving(*options: str, command: str = "serve", cwd: Path | None = None) -> Iterator[Proc]:
    """``sockstack COMMAND --tcp 127.0.0.1:0 --udp 127.0.0.1:0 OPTIONS...``, once it serves
    (its banner printed): the one way tests start a server process. Port 0: the server binds
    and its banner names the ports, so no port is picked first and taken by a parallel test
    meanwhile. :attr:`Proc.urls` holds (tcp_url, udp_url); stopped (exit 0) afterwards."""
    proc = Proc(
        ["sockstack", command, "--tcp", "127.0.0.1:0", "--udp", "127.0.0.1:0", *options], cwd=cwd
    )
    try:
        tcp = proc.wait_line(r"serving .+ on (tcp://\S+)").group(1)
        udp = proc.wait_line(r"serving .+ on (udp://\S+)").group(1)
        proc.wait_line("Ctrl-C stops")
        proc.urls = (tcp, udp)
        yield proc
    finally:
        assert proc.stop() == 0, proc.stderr()


@pytest.fixture
def demo_server() -> Iterator[tuple[str, str]]:
    """`sockstack serve` (built-in demo) on free ports: yields (tcp_url, udp_url)."""
    with serving() as proc:
        yield proc.urls


def command_of(line: str) -> tuple[str, str | None]:
    """The command of a line (its comment cut) and the output its ``# prints X`` promises."""
    words = shlex.split(line, comments=True)
    m = re.search(r"\s#\s*prints (.*)$", line)
    return shlex.join(words), (m.group(1).strip() if m else None)


def run_suggestions(banner: list[str], where: str) -> None:
    """Run every ``try:`` command line of a serve/broker banner: each must work as printed
    (a ``sub`` in the background, ended by the ``pub`` printed after it)."""
    tries = [line.split("try: ", 1)[1] for line in banner if line.startswith("try: ")]
    assert tries, f"{where}: the banner suggests nothing to try: {banner}"
    waiting: list[Proc] = []
    for line in tries:
        command, _ = command_of(line)
        words = shlex.split(command)
        if words[1] == "sub":
            before = subscriptions(words[2])
            proc = Proc(["bash", "-c", f"exec {command}"], cwd=ROOT, group=True)
            waiting.append(proc)
            wait_subscriptions(words[2], before + 1, proc, where)
            continue
        out = run(["bash", "-c", command], cwd=ROOT, seconds=30)
        assert out.returncode == 0, f"{where}: suggested `{command}` failed: {out.stderr}"
    for proc in waiting:
        assert proc.wait(20) == 0, f"{where}: the suggested sub did not end: {proc.stderr()}"


def subscriptions(url: str) -> int:
    from sockstack import connect

    with connect(url) as c:
        return int(c.call("broker.stats")["subscriptions"])


def wait_subscriptions(url: str, at_least: int, proc: Proc, where: str) -> None:
    """Until the broker at ``url`` counts ``at_least`` subscriptions (``sub`` prints nothing
    once subscribed), or the bounded deadline; ``proc`` is the subscriber."""
    from sockstack import connect

    deadline = time.monotonic() + timeout(20)
    with connect(url) as c:
        while c.call("broker.stats")["subscriptions"] < at_least:  # bounded by the deadline
            assert proc.popen.poll() is None, f"{where}: sub exited: {proc.stderr()}"
            assert time.monotonic() < deadline, f"{where}: the subscriber never subscribed"
            time.sleep(0.01)
