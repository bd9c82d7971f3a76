"""Hosts as network namespaces (tests/helpers/netns.py), and a real 3-node NATS cluster across
them: the ground the scale-out tests of issue 16 stand on.

The NATS clients are nats-py scripts run inside the hosts (a subscriber that prints what it
gets, one line a message, and a publisher). A publisher first asks each subscriber for a reply
(``scale.ping.NAME``) until one comes: then the subscriber's interest has reached the
publisher's server through the routes, and what is published next is delivered. Each round ends
with an ``end-N`` message after ``hello-N`` (one publisher's messages keep their order), so
"arrives once" is read, not waited for; a later round shows no late duplicate came between.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import timeout
from tests.helpers.netns import (
    Host,
    Lab,
    Lines,
    NatsNode,
    Unavailable,
    nats_server_path,
    start_nats_cluster,
)

pytestmark = pytest.mark.timeout(30)


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


@pytest.fixture
def nats_ready() -> None:
    """Skip unless nats-server and nats-py are installed."""
    try:
        nats_server_path()
    except Unavailable as e:
        pytest.skip(str(e))
    if importlib.util.find_spec("nats") is None:
        pytest.skip("nats-py is not installed (it is in the bench extra, not in dev)")


def _root(*args: str) -> Any:
    """What `ip -j ...` says about the root namespace (read only)."""
    done = subprocess.run(
        ["ip", "-j", *args], capture_output=True, text=True, timeout=timeout(10), check=True
    )
    return json.loads(done.stdout or "[]")


LISTEN = r"""
import socket, sys
with socket.create_server((sys.argv[1], int(sys.argv[2]))) as s:
    print("listening", flush=True)
    while True:
        c, _ = s.accept()
        c.close()
"""

# Inside a host: its routes, and for each address given, whether a route lookup (a UDP
# connect: no packet is sent) finds a way there.
ROUTES = r"""
import errno, json, socket, subprocess, sys
out = {"routes": json.loads(subprocess.run(["ip", "-j", "route"], capture_output=True,
                                            text=True, check=True).stdout or "[]")}
for addr in sys.argv[1:]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((addr, 9))
            out[addr] = "routed"
        except OSError as e:
            out[addr] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(out))
"""

SUBSCRIBE = r"""
import asyncio, sys
import nats

async def main(url, name):
    nc = await nats.connect(url, connect_timeout=5)
    async def on_msg(msg):
        print(msg.data.decode(), flush=True)
    async def on_ping(msg):
        await msg.respond(name.encode())
    await nc.subscribe("scale.msg", cb=on_msg)
    await nc.subscribe(f"scale.ping.{name}", cb=on_ping)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()  # until the lab stops it

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""

PUBLISH = r"""
import asyncio, sys, time
import nats
from nats.errors import NoRespondersError, TimeoutError

async def main(url, within, pings, payloads):
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    deadline = time.monotonic() + within
    for name in pings:
        while True:
            try:
                await nc.request(f"scale.ping.{name}", b"", timeout=0.25)
                break
            except (TimeoutError, NoRespondersError) as e:
                if time.monotonic() >= deadline:
                    sys.exit(f"no answer from {name} within {within} s: {e!r}")
                await asyncio.sleep(0.02)  # the poll's period (bounded by the deadline)
    for data in payloads:
        await nc.publish("scale.msg", data.encode())
    await nc.flush()
    await nc.close()
    print("sent", flush=True)

asyncio.run(main(sys.argv[1], float(sys.argv[2]), sys.argv[3].split(","), sys.argv[4:]))
"""


@dataclass
class Subscriber:
    host: Host
    proc: subprocess.Popen[Any]
    lines: Lines
    errors: Path

    def expect(self, *wanted: str) -> None:
        """The next lines are exactly ``wanted``, in order."""
        got: list[str] = []
        try:
            for _ in wanted:
                got.append(self.lines.next(timeout(10)))
        except AssertionError as e:
            raise AssertionError(f"{self.host.name} got {got}: {e}\n{self.stderr()}") from None
        assert got == list(wanted), f"{self.host.name} got {got}, wanted {list(wanted)}"

    def stderr(self) -> str:
        return self.errors.read_text(errors="replace")[-2000:]


def subscribe(lab: Lab, host: Host, node: NatsNode) -> Subscriber:
    errors = lab.dir / f"sub-{host.name}.err"
    with errors.open("w") as err:
        proc = host.python(SUBSCRIBE, node.url, host.name, stderr=err)
    assert proc.stdout is not None
    sub = Subscriber(host, proc, Lines(proc.stdout), errors)
    sub.expect("ready")
    return sub


def publish(host: Host, node: NatsNode, to: Sequence[Subscriber], *payloads: str) -> None:
    """Publish from ``host`` through ``node`` once every subscriber in ``to`` is reachable."""
    within = timeout(10)
    names = ",".join(s.host.name for s in to)
    proc = host.python(PUBLISH, node.url, str(within), names, *payloads)
    try:
        out, err = proc.communicate(timeout=within + timeout(10))
    finally:
        host.lab.stop(proc)
    assert proc.returncode == 0 and out.strip() == "sent", f"publisher on {host.name}: {err}"


def test_hosts_reach_each_other_and_nothing_beyond_the_lab() -> None:
    links_before = sorted(link["ifname"] for link in _root("link", "show"))
    routes_before = _root("route", "show")
    root_addrs = [
        a["local"]
        for link in _root("-4", "addr", "show")
        for a in link.get("addr_info", [])
        if not a["local"].startswith("127.")
    ]
    with lab_or_skip(["a", "b"]) as lab:
        a, b = lab.host("a"), lab.host("b")
        assert a.ip != b.ip and a.netns != b.netns and lab.tag in a.netns
        for here, there in ((a, b), (b, a)):
            proc = here.python(LISTEN, here.ip, "7000")
            assert proc.stdout is not None
            assert Lines(proc.stdout).next(timeout(10)) == "listening"
            there.wait_tcp(here.ip, 7000)

        # The hosts' only routes are the lab's /24: the root namespace's addresses (and any
        # address outside the lab) have no route from a host.
        check = a.python(ROUTES, *root_addrs, "198.51.100.1")
        out, err = check.communicate(timeout=timeout(10))
        assert check.returncode == 0, err
        seen = json.loads(out)
        assert [r["dst"] for r in seen["routes"]] == ["10.77.0.0/24"], seen["routes"]
        for addr in [*root_addrs, "198.51.100.1"]:
            assert seen[addr] == "ENETUNREACH", (addr, seen[addr])

        # A host's loopback is its own: a listener on the root namespace's loopback is not there.
        with socket.create_server(("127.0.0.1", 0)) as root_listener:
            port = root_listener.getsockname()[1]
            assert not a.can_connect("127.0.0.1", port)

        # A tbf rate limit can be put on a host's link (netem cannot, on these kernels).
        a.rate_limit("10mbit")
        assert " tbf " in a.qdisc()
        b.wait_tcp(a.ip, 7000)
        a.clear_rate_limit()
        assert " tbf " not in a.qdisc()
        names = [a.netns, b.netns, lab.netns]

    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert not any(n in left.stdout.split() for n in names), left.stdout
    assert sorted(link["ifname"] for link in _root("link", "show")) == links_before
    assert _root("route", "show") == routes_before


@pytest.mark.slow
@pytest.mark.usefixtures("nats_ready")
def test_nats_cluster_delivers_once_across_hosts() -> None:
    with lab_or_skip(["a", "b", "c"]) as lab:
        a, b, c = lab.hosts
        node_a, node_b, node_c = start_nats_cluster(lab, [a, b, c])
        assert {r["ip"] for r in node_a.routez()["routes"]} == {b.ip, c.ip}
        on_b = subscribe(lab, b, node_b)
        on_c = subscribe(lab, c, node_c)
        publish(a, node_a, [on_b, on_c], "hello-1", "end-1")
        on_b.expect("hello-1", "end-1")
        on_c.expect("hello-1", "end-1")
        # A second round: no late copy of the first came in between.
        publish(a, node_a, [on_b, on_c], "hello-2", "end-2")
        on_b.expect("hello-2", "end-2")
        on_c.expect("hello-2", "end-2")
        assert on_b.lines.pending() == [] and on_c.lines.pending() == []


@pytest.mark.slow
@pytest.mark.usefixtures("nats_ready")
def test_nats_traffic_continues_with_a_node_cut_off() -> None:
    with lab_or_skip(["a", "b", "c"]) as lab:
        a, b, c = lab.hosts
        # Pings every 250 ms, two unanswered drop a route: a cut is noticed in about a second
        # (NATS's default is minutes).
        nodes = start_nats_cluster(lab, [a, b, c], ping_interval="250ms", ping_max=2)
        node_a, node_b, node_c = nodes
        on_b = subscribe(lab, b, node_b)
        publish(a, node_a, [on_b], "hello-1", "end-1")
        on_b.expect("hello-1", "end-1")

        c.link_down()
        assert not a.can_connect(c.ip, 4222)
        publish(a, node_a, [on_b], "hello-2", "end-2")  # A -> B does not need C
        on_b.expect("hello-2", "end-2")
        node_a.wait_ready(routes=1)  # A and B notice C is gone and keep their route
        node_b.wait_ready(routes=1)

        c.link_up()
        for node in nodes:  # the routes come back by themselves
            node.wait_ready()
        publish(c, node_c, [on_b], "hello-3", "end-3")  # and C's clients reach B again
        on_b.expect("hello-3", "end-3")
        assert on_b.lines.pending() == []
