"""``serve --announce NAME --names URL`` and ``call name://NAME``: servers found by name from
the command line; a server stopped with SIGTERM leaves the listing at once."""

from __future__ import annotations

import time

from sockstack.objects import ObjectClient
from tests.cli.conftest import Proc, run, serving
from tests.conftest import timeout


def test_call_by_name_spreads_over_announced_servers_and_a_stopped_one_goes() -> None:
    names = Proc(["sockstack", "names", "serve", "--tcp", "127.0.0.1:0", "--lease", "5"])
    try:
        ns = names.wait_line(r"serving names on (tcp://\S+)").group(1)
        opts = ("--announce", "calc", "--names", ns)
        with serving(*opts) as one, serving(*opts) as two:
            urls = {one.urls[0], two.urls[0]}
            with ObjectClient(ns, timeout=timeout(10)) as oc:
                registry = oc.lookup("names")
                listed = {s["url"] for s in registry.servers("calc")}
                assert listed == urls
                for _ in range(4):
                    done = run(["sockstack", "call", "name://calc", "add", "2", "3", "--names", ns])
                    assert (done.returncode, done.stdout.strip()) == (0, "5"), done.stderr
                pinged = run(["sockstack", "ping", "name://calc", "--count", "2", "--names", ns])
                assert pinged.returncode == 0, pinged.stderr
                assert two.stop() == 0  # SIGTERM: its session ends, its entry with it
                deadline = time.monotonic() + timeout(10)  # (the close reaches it just after)
                while {s["url"] for s in registry.servers("calc")} != {one.urls[0]}:
                    assert time.monotonic() < deadline, registry.servers("calc")
                    time.sleep(0.02)
                done = run(["sockstack", "call", "name://calc", "add", "1", "1", "--names", ns])
                assert (done.returncode, done.stdout.strip()) == (0, "2"), done.stderr
    finally:
        assert names.stop() == 0, names.stderr()
