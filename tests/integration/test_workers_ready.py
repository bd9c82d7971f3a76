"""Issue 11 item 14: `serve --workers N` learns that each worker serves from a channel of its
own (a pipe named by $SOCKSTACK_READY_FD, one JSON line from Server.start), not by parsing the
workers' output: a service that prints lines like the banner cannot fool it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sockstack import connect
from tests.cli.conftest import Proc, run
from tests.conftest import timeout

CHATTY = """
import os
import sys

from sockstack import Service, method


class Chatty(Service):
    def __init__(self) -> None:
        # Printed by each worker (the supervisor loads the class too; the workers are the
        # processes run with --reuse-port) before it binds anything: a supervisor reading the
        # workers' stdout would take it for readiness, name the wrong service and announce
        # endpoints that serve nothing yet.
        if "--reuse-port" in sys.argv:
            print("serving Impostor on tcp://127.0.0.1:1", flush=True)
            print("serving Impostor on udp://127.0.0.1:1", flush=True)

    @method
    def pid(self) -> int:
        return os.getpid()
"""


def test_workers_report_readiness_on_their_own_channel(tmp_path: Path) -> None:
    (tmp_path / "chatty.py").write_text(CHATTY)
    proc = Proc(
        [
            "sockstack",
            "serve",
            "chatty:Chatty",
            "--workers",
            "2",
            "--tcp",
            "127.0.0.1:0",
            "--udp",
            "127.0.0.1:0",
        ],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path)},
    )
    try:
        tcp = proc.wait_line(r"serving (\S+) on (tcp://\S+)")
        udp = proc.wait_line(r"serving (\S+) on (udp://\S+)")
        assert tcp.group(1) == udp.group(1) == "Chatty"
        line = proc.wait_line(r"2 worker processes \(pids (\d+), (\d+)\)")
        pids = {int(line.group(1)), int(line.group(2))}
        # Announced once both serve: calls over both endpoints are answered by a worker.
        for url in (tcp.group(2), udp.group(2)):
            with connect(url, timeout=timeout(10)) as c:
                assert c.call("pid") in pids
        assert not any("Impostor" in line for line in proc.seen)
    finally:
        assert proc.stop() == 0


def test_a_worker_that_cannot_serve_is_reported(tmp_path: Path) -> None:
    with socket.socket() as taken:  # bound without SO_REUSEPORT: the workers cannot join it
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = run(["sockstack", "serve", "--workers", "2", "--tcp", f"127.0.0.1:{port}"])
    assert out.returncode == 3, out.stderr
    assert "before serving" in out.stderr
    assert "serving Demo" not in out.stdout


def test_server_start_reports_once_per_process() -> None:
    # Server.start writes the line when $SOCKSTACK_READY_FD names a pipe, and removes the
    # variable: a second server in the process (or a child process) says nothing.
    code = (
        "import asyncio, os\n"
        "from sockstack import Server\n"
        "from sockstack.demo import Demo\n"
        "async def main():\n"
        "    r, w = os.pipe()\n"
        "    os.environ['SOCKSTACK_READY_FD'] = str(w)\n"
        "    async with Server(Demo(), tcp=['127.0.0.1:0']) as a:\n"
        "        async with Server(Demo(), tcp=['127.0.0.1:0']):\n"
        "            pass\n"
        "    print(os.read(r, 4096).decode().strip())\n"
        "    print('SOCKSTACK_READY_FD' in os.environ)\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout(30)
    )
    first, second = out.stdout.splitlines()
    assert '"name": "Demo"' in first and "tcp://127.0.0.1:" in first  # the first server, once
    assert second == "False"


SPAWNER = """
import os
import subprocess
import sys

from sockstack import Service, method

CHILD = "import os; print(os.environ.get('SOCKSTACK_READY_FD'))"


class Spawner(Service):
    def __init__(self) -> None:
        # What the service, and a process it starts as it loads, see of the readiness pipe.
        self.own = os.environ.get("SOCKSTACK_READY_FD")
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True)
        self.child = out.stdout.strip()

    @method
    def seen(self) -> list:
        return [self.own, self.child]
"""


def test_the_service_and_its_children_do_not_see_the_readiness_variable(tmp_path: Path) -> None:
    # A child that inherited the variable (not the descriptor) and ran a Server of its own
    # would write JSON into whatever that descriptor number is in it.
    (tmp_path / "spawner.py").write_text(SPAWNER)
    proc = Proc(
        ["sockstack", "serve", "spawner:Spawner", "--workers", "2", "--tcp", "127.0.0.1:0"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path)},
    )
    try:
        url = proc.wait_line(r"serving Spawner on (tcp://\S+)").group(1)
        proc.wait_line(r"2 worker processes")  # both serve: readiness still reached it
        with connect(url, timeout=timeout(10)) as c:
            assert c.call("seen") == [None, "None"]
    finally:
        assert proc.stop() == 0


def test_report_ready_writes_only_into_a_pipe(tmp_path: Path) -> None:
    # The number names a regular file (the pipe closed, the number reused): left untouched.
    code = (
        "import asyncio, os, sys\n"
        "from sockstack import Server\n"
        "from sockstack.demo import Demo\n"
        "async def main():\n"
        "    fd = os.open(sys.argv[1], os.O_WRONLY)\n"
        "    os.environ['SOCKSTACK_READY_FD'] = str(fd)\n"
        "    async with Server(Demo(), tcp=['127.0.0.1:0']):\n"
        "        pass\n"
        "    os.fstat(fd)\n"  # still open: not closed by report_ready either
        "    print('ok')\n"
        "asyncio.run(main())\n"
    )
    target = tmp_path / "not-a-pipe"
    target.write_bytes(b"")
    out = subprocess.run(
        [sys.executable, "-c", code, str(target)],
        capture_output=True,
        text=True,
        timeout=timeout(30),
    )
    assert out.stdout.strip() == "ok", out.stderr
    assert target.read_bytes() == b""


CLOSER = """
import os
import stat
import sys

from sockstack import Service, method


class Closer(Service):
    def __init__(self) -> None:
        # In a worker: close the pipes it inherited (one end here, the other elsewhere), as
        # daemon-style code closing descriptors does, the readiness pipe among them, and
        # serve on. (The event loop's own pipes have both ends here: left alone.)
        if "--reuse-port" in sys.argv:
            ends: dict[str, list[int]] = {}
            for name in os.listdir("/proc/self/fd"):
                try:
                    if int(name) > 2 and stat.S_ISFIFO(os.fstat(int(name)).st_mode):
                        ends.setdefault(os.readlink(f"/proc/self/fd/{name}"), []).append(int(name))
                except OSError:
                    pass
            for fds in ends.values():
                if len(fds) == 1:
                    os.close(fds[0])

    @method
    def pid(self) -> int:
        return os.getpid()
"""


def test_a_worker_that_closes_its_pipe_and_lives_on_is_killed(tmp_path: Path) -> None:
    # End of file on the pipe, and the worker has not exited: the supervisor waits the rest
    # of the ready timeout (3 s here), not for ever, then kills it by its PID.
    (tmp_path / "closer.py").write_text(CLOSER)
    code = (
        "import sys\n"
        "from sockstack.host.workers import run_workers\n"
        "sys.exit(run_workers(['serve', 'closer:Closer'], ['127.0.0.1:0'], [], 2,"
        " ready_timeout=3))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its workers are in its group: all ended if it hangs
    )
    try:
        out, err = proc.communicate(timeout=timeout(60))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this test started, by its leader's PID
        proc.communicate()
        raise AssertionError("the supervisor waited for ever for a worker to exit") from None
    assert proc.returncode == 3, err
    m = re.search(r"worker (\d+) closed its readiness pipe without serving; killed", err)
    assert m, err
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(int(m.group(1)), 0)
    assert "serving" not in out


COUNTED = """
import os

from sockstack import Service, method


class Counted(Service):
    def __init__(self) -> None:
        # One line per instance, from whichever process made it.
        with open(os.environ["COUNT_FILE"], "a") as f:
            f.write(f"{os.getpid()}\\n")

    @method
    def pid(self) -> int:
        return os.getpid()
"""


def test_each_worker_creates_the_service_once_and_the_supervisor_never(tmp_path: Path) -> None:
    (tmp_path / "counted.py").write_text(COUNTED)
    count_file = tmp_path / "made.txt"
    proc = Proc(
        ["sockstack", "serve", "counted:Counted", "--workers", "2", "--tcp", "127.0.0.1:0"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "COUNT_FILE": str(count_file)},
    )
    try:
        line = proc.wait_line(r"2 worker processes \(pids (\d+), (\d+)\)")
        pids = {int(line.group(1)), int(line.group(2))}
    finally:
        assert proc.stop() == 0
    made = [int(p) for p in count_file.read_text().split()]
    assert sorted(made) == sorted(pids)  # once in each worker, never in the supervisor


def test_a_service_that_cannot_be_created_is_bad_usage_with_workers_too(tmp_path: Path) -> None:
    """The supervisor checks the class without creating it; the workers create it: one whose
    ``__init__`` raises exits with 2 (bad usage) and the reason, as without --workers."""
    (tmp_path / "broken.py").write_text(
        "from sockstack import Service\n\n\nclass Broken(Service):\n"
        "    def __init__(self) -> None:\n        raise RuntimeError('no database')\n"
    )
    for extra in ([], ["--workers", "2"]):
        out = run(
            ["sockstack", "serve", "broken:Broken", "--tcp", "127.0.0.1:0", *extra],
            cwd=tmp_path,
            env={"PYTHONPATH": str(tmp_path)},
        )
        assert out.returncode == 2, (extra, out.stderr)
        assert "cannot create Broken(): RuntimeError: no database" in out.stderr
