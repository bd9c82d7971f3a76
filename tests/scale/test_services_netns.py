"""Services found by name across hosts (issue 16, item 4; tests/helpers/netns.py): the name
service on host a, servers of "calc" on b and c, the caller on d.

The servers bind 0.0.0.0 and announce the address they reach the name service from (their
eth0). The caller is one process driven over its stdin: ``call N`` makes N calls and prints
what answered them (a JSON count, errors under "error"), ``list`` prints the servers it holds.
The name service's lease is short (1.5 s) so that a host that dies or is cut off is gone from
the listing quickly; every wait is a bounded poll.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from tests.conftest import timeout
from tests.helpers.netns import Host, Lab, Lines, Unavailable

pytestmark = pytest.mark.timeout(60)

LEASE = 1.5
NAMES_PORT = 5055
CALC_PORT = 5050

NAME_SERVICE = r"""
import asyncio, sys
from sockstack.objects import ObjectServer

async def main() -> None:
    server = ObjectServer(tcp=[sys.argv[1]], host_names=True, lease=float(sys.argv[2]),
                          insecure=True)  # (a lab of its own: nothing else reaches it)
    await server.start()
    print("ready", flush=True)
    await server.run(handle_signals=True)

asyncio.run(main())
"""

SERVER = r"""
import asyncio, signal, socket, sys
from sockstack import Server, Service, method
from sockstack.discovery import announce

NAME = socket.gethostname() if sys.argv[2] == "-" else sys.argv[2]

class Calc(Service):
    @method(inline=True)
    def who(self) -> str:
        return NAME

async def main() -> None:
    server = Server(Calc(), tcp=["0.0.0.0:" + sys.argv[3]], insecure=True)
    await server.start()
    announcer = await announce(server, "calc", names=sys.argv[1])
    print(announcer.url, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await announcer.aclose()
    await server.shutdown()

asyncio.run(main())
"""

CALLER = r"""
import json, sys
from collections import Counter
from sockstack import connect
from sockstack.discovery import resolve

names = sys.argv[1]
with connect("name://calc", names=names, timeout=float(sys.argv[2])) as client:
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "call":
            got = Counter()
            for _ in range(int(arg)):
                try:
                    got[client.call("who")] += 1
                except Exception as exc:
                    got["error"] += 1
            print(json.dumps(got), flush=True)
        elif cmd == "list":
            print(json.dumps({"held": [s["url"] for s in client.servers()],
                              "up": [s["url"] for s in client.servers() if s["state"] == "up"],
                              "listed": resolve("calc", names=names)}),
                  flush=True)
"""


@contextlib.contextmanager
def lab_or_skip(names: Sequence[str]) -> Iterator[Lab]:
    lab = Lab(names)
    try:
        lab.__enter__()
    except Unavailable as e:
        pytest.skip(str(e))
    try:
        yield lab
    finally:
        lab.close()


class Caller:
    def __init__(self, host: Host, names: str) -> None:
        self.host = host
        self.proc = host.python(CALLER, names, str(timeout(1)), stdin=subprocess.PIPE)
        assert self.proc.stdout is not None
        self.lines = Lines(self.proc.stdout)
        assert self.lines.next(timeout(10)) == "ready"

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        out: dict[str, Any] = json.loads(self.lines.next(timeout(20)))
        return out

    def until(self, command: str, cond: Any, within: float, what: str) -> dict[str, Any]:
        """Ask ``command`` until its answer satisfies ``cond`` (bounded by ``within`` s)."""
        deadline = time.monotonic() + timeout(within)
        tick = threading.Event()
        while True:
            got = self.ask(command)
            if cond(got):
                return got
            assert time.monotonic() < deadline, f"not within {within} s: {what} (last: {got})"
            tick.wait(0.05)  # the poll's period


def serve(lab: Lab, host: Host, names: str) -> subprocess.Popen[Any]:
    proc = host.python(SERVER, names, host.name, str(CALC_PORT))
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    assert url == f"tcp://{host.ip}:{CALC_PORT}", f"{host.name} announced {url!r}"
    return proc


def kill9(proc: subprocess.Popen[Any]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # (its own group: started by the lab)
    proc.wait(timeout(10))


def test_callers_move_between_hosts_as_servers_come_and_go() -> None:
    with lab_or_skip(["a", "b", "c", "d"]) as lab:
        a, b, c, d = (lab.host(n) for n in "abcd")
        names = f"tcp://{a.ip}:{NAMES_PORT}"
        ns = a.python(NAME_SERVICE, f"{a.ip}:{NAMES_PORT}", str(LEASE))
        assert ns.stdout is not None and ns.stdout.readline().strip() == "ready"
        on_b = serve(lab, b, names)
        serve(lab, c, names)
        url_b, url_c = f"tcp://{b.ip}:{CALC_PORT}", f"tcp://{c.ip}:{CALC_PORT}"
        caller = Caller(d, names)
        caller.until("list", lambda g: sorted(g["up"]) == sorted([url_b, url_c]), 10, "b and c up")
        # calls spread over b and c
        assert caller.ask("call 20") == {"b": 10, "c": 10}

        # the server on b is killed: its connection ends, calls go to c at once; the name
        # service drops it within the lease, and so does the caller at its next reading
        kill9(on_b)
        got = caller.ask("call 10")
        assert got == {"c": 10}, got
        caller.until("list", lambda g: url_b not in g["listed"], 4 * LEASE, "b unlisted")
        caller.until("list", lambda g: url_b not in g["held"], 4 * LEASE, "b dropped")

        # a server on b again: picked up without restarting the caller
        serve(lab, b, names)
        caller.until("list", lambda g: url_b in g["up"], 10, "b up again")
        assert caller.ask("call 20") == {"b": 10, "c": 10}

        # b cut off (its link down): its connections stay open (no FIN reaches anyone);
        # calls to it time out until the name service lets b's entry go (b stops announcing
        # it: within the lease) and the caller drops it
        b.link_down()
        caller.until("call 4", lambda g: g == {"c": 4}, 8 * LEASE + 10, "only c answering")
        assert caller.ask("call 10") == {"c": 10}
        # plugged back in: b announces again (a new session) and is used again
        b.link_up()
        caller.until("list", lambda g: url_b in g["up"], 20, "b back")
        assert caller.ask("call 20") == {"b": 10, "c": 10}
