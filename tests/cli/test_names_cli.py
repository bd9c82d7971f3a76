"""``sockstack names``: serve a name service, list it and look names up, live."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

from sockstack.objects import ObjectClient
from tests.conftest import timeout

SOCKSTACK = [sys.executable, "-m", "sockstack.cli"]


def test_names_serve_list_and_lookup() -> None:
    proc = subprocess.Popen(
        [*SOCKSTACK, "names", "serve", "--tcp", "127.0.0.1:0", "--lease", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"serving names on (tcp://127\.0\.0\.1:\d+)", line)
        assert m, line
        url = m.group(1)
        with ObjectClient(url, timeout=timeout(10)) as oc:
            oc.lookup("names").register("counter", "tcp://127.0.0.1:5054/counter")

            def run(*argv: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [*SOCKSTACK, "names", *argv],
                    capture_output=True,
                    text=True,
                    timeout=timeout(30),
                )

            listed = run("list", url)
            assert listed.returncode == 0, listed.stderr
            assert listed.stdout == "counter tcp://127.0.0.1:5054/counter\n"
            found = run("lookup", url, "counter")
            assert (found.returncode, found.stdout) == (0, "tcp://127.0.0.1:5054/counter\n")
            missing = run("lookup", url, "nobody")
            assert missing.returncode == 1 and "no name 'nobody'" in missing.stderr
        listed = run("list", url)  # the registrant closed: its name went with its session
        assert (listed.returncode, listed.stdout) == (0, "")
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout(20))
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert proc.returncode == 0
