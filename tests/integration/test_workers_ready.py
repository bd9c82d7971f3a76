"""Issue 11 item 14: `serve --workers N` learns that each worker serves from a channel of its
own (a pipe named by $SOCKSTACK_READY_FD, one JSON line from Server.start), not by parsing the
workers' output: a service that prints lines like the banner cannot fool it."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

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
