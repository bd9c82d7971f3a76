"""sockstack brokers joined through a 3-node NATS cluster, across network-namespace hosts
(issue 16): nats-server on n1, n2, n3; a broker (``sockstack broker --cluster`` with all three
URLs) on each of a, b, c, and client processes beside them.

Each client is a small program driven by JSON lines on its stdin (``sub``, ``pub``) that prints
what it receives, one JSON line a message. Interest crosses the NATS routes asynchronously, so
a round starts by publishing probes until every subscriber has heard one (bounded); then each
round ends with an ``end`` message from the same publisher, so "received once" is read, not
waited for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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

pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]

CLIENT = r"""
import asyncio, json, sys
from sockstack import AsyncClient

async def main(urls):
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with AsyncClient(urls.split(","), timeout=5) as c:
        def on(tag):
            return lambda m: print(json.dumps(["msg", tag, m.value]), flush=True)
        print(json.dumps(["ready"]), flush=True)
        while line := await reader.readline():
            cmd = json.loads(line)
            if cmd[0] == "sub":
                await c.subscribe(cmd[1], group=cmd[2], callback=on(cmd[3]))
                print(json.dumps(["ok"]), flush=True)
            elif cmd[0] == "pub":
                for value in cmd[2]:
                    await c.publish(cmd[1], value)

asyncio.run(main(sys.argv[1]))
"""


@dataclass
class Client:
    host: Host
    proc: subprocess.Popen[str]
    lines: Lines

    def send(self, *cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def sub(self, pattern: str, group: str | None = None, tag: str = "") -> None:
        self.send("sub", pattern, group, tag)
        while True:  # probes of an earlier round may come first
            line = json.loads(self.lines.next(timeout(10)))
            if line == ["ok"]:
                return
            assert line[2][:1] == ["probe"], line

    def pub(self, topic: str, *values: Any) -> None:
        self.send("pub", topic, list(values))

    def messages(
        self, until: Any, wait: float = 10.0, tag: str | None = None
    ) -> list[tuple[str, Any]]:
        """(tag, value) of the messages received, up to and with ``until`` (of the
        subscription ``tag`` if given; probes left out)."""
        out: list[tuple[str, Any]] = []
        while True:
            _, got, value = json.loads(self.lines.next(timeout(wait)))
            if isinstance(value, list) and value[:1] == ["probe"]:
                continue
            out.append((got, value))
            if value == until and tag in (None, got):
                return out


def client(host: Host, urls: Sequence[str]) -> Client:
    proc = host.python(CLIENT, ",".join(urls), stdin=subprocess.PIPE)
    assert proc.stdout is not None
    c = Client(host, proc, Lines(proc.stdout))
    assert json.loads(c.lines.next(timeout(15))) == ["ready"], "client did not start"
    return c


def heard(clients: Sequence[Client], publisher: Client, topic: str) -> None:
    """Publish probes on ``topic`` until each client prints one (interest has crossed NATS;
    the probes still on their way are skipped by :meth:`Client.messages`)."""
    waiting = list(clients)
    deadline = time.monotonic() + timeout(15)
    n = 0
    while waiting:
        assert time.monotonic() < deadline, f"no probe reached {[c.host.name for c in waiting]}"
        publisher.pub(topic, ["probe", n])
        n += 1
        for c in list(waiting):
            with contextlib.suppress(AssertionError):
                json.loads(c.lines.next(0.1))
                waiting.remove(c)


@contextlib.contextmanager
def lab_or_skip(names: Sequence[str]) -> Iterator[Lab]:
    try:
        nats_server_path()
    except Unavailable as e:
        pytest.skip(str(e))
    if importlib.util.find_spec("nats") is None:
        pytest.skip("nats-py is not installed (the dev extra has it)")
    lab = Lab(names)
    try:
        lab.__enter__()
    except Unavailable as e:
        pytest.skip(str(e))
    try:
        yield lab
    finally:
        lab.close()


def start_broker(host: Host, nodes: Sequence[NatsNode]) -> subprocess.Popen[str]:
    urls = ",".join(n.url for n in nodes)
    with (host.lab.dir / f"broker-{host.name}.log").open("w") as log:
        return host.run(
            [
                sys.executable,
                "-m",
                "sockstack.cli",
                "broker",
                "--tcp",
                f"{host.ip}:5052",
                "--insecure",  # no secret: the lab's hosts reach nothing else
                "--cluster",
                urls,
                "--cluster-ping",
                "0.3",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
        )


def connz(node: NatsNode) -> list[dict[str, Any]]:
    """The node's client connections (/connz), fetched inside its host."""
    code = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())"  # noqa: E501
    proc = node.host.python(code, f"{node.monitor}/connz")
    try:
        out, err = proc.communicate(timeout=timeout(10))
    finally:
        node.host.lab.stop(proc)
    assert proc.returncode == 0, err
    conns: list[dict[str, Any]] = json.loads(out).get("connections") or []
    return conns


def test_brokers_across_hosts_share_topics_groups_and_survive_failures() -> None:
    with lab_or_skip(["n1", "n2", "n3", "a", "b", "c"]) as lab:
        n1, n2, n3, a, b, c = lab.hosts
        nodes = start_nats_cluster(lab, [n1, n2, n3], ping_interval="250ms", ping_max=2)
        brokers = {h.name: start_broker(h, nodes) for h in (a, b, c)}
        for h in (a, b, c):
            h.check(f"tcp {h.ip} 5052 0.5", within=timeout(20), alive=brokers[h.name])
        url = {h.name: f"tcp://{h.ip}:5052" for h in (a, b, c)}

        # Publish on host A; subscribers on hosts B and C receive each message once.
        pub = client(a, [url["a"]])
        on_b = client(b, [url["b"]])
        on_c = client(c, [url["c"]])
        on_b.sub("room.>", tag="b")
        on_c.sub("room.*", tag="c")
        heard([on_b, on_c], pub, "room.probe")
        values = [*range(20), "end-1"]
        pub.pub("room.t", *values)
        assert on_b.messages("end-1") == [("b", v) for v in values]
        assert on_c.messages("end-1") == [("c", v) for v in values]

        # Queue group members spread over hosts share the messages: each once, more than one
        # host has some.
        for who in (on_b, on_c):
            who.sub("job.*", group="workers", tag="g" + who.host.name)
        heard([on_b], pub, "job.probe")  # B's only job.* subscription is the group's
        on_c.sub("job.*", tag="all")  # a plain subscriber sees every message
        heard([on_c], pub, "job.probe")
        pub.pub("job.run", *range(60), "end-2")
        seen_c = on_c.messages("end-2", tag="all")
        assert [v for t, v in seen_c if t == "all"] == [*range(60), "end-2"]
        shares = {"gb": 0, "gc": 0}
        got = []
        for t, v in seen_c:
            if t == "gc":
                got.append(v)
                shares[t] += 1
        # Each broker gets its share on another NATS connection (its queue subscriptions'):
        # in no order with the plain one's, so read both until the shares add up (bounded).
        deadline = time.monotonic() + timeout(10)
        while len(got) < 61:
            assert time.monotonic() < deadline, (len(got), shares)
            for who in (on_b, on_c):
                for line in who.lines.pending():
                    _, tag, value = json.loads(line)
                    if tag in shares and not (isinstance(value, list) and value[:1] == ["probe"]):
                        got.append(value)
                        shares[tag] += 1
            time.sleep(0.02)  # the poll's period (bounded by the deadline)
        assert sorted(map(str, got)) == sorted(map(str, [*range(60), "end-2"])), got
        assert shares["gb"] and shares["gc"], shares  # each host had a share

        # Cut off the NATS node broker A is connected to: A's broker moves to another node of
        # its URL list and the traffic goes on.
        def node_of_a() -> NatsNode:
            for node in nodes:
                for conn in connz(node):
                    if conn.get("ip") == a.ip and str(conn.get("name", "")).startswith(
                        "sockstack-broker-"
                    ):
                        return node
            raise AssertionError("broker A is on no NATS node")

        cut = node_of_a()
        cut.host.link_down()
        heard([on_b, on_c], pub, "room.probe")  # (until A's broker has moved)
        pub.pub("room.t", "after-cut")
        assert on_b.messages("after-cut")[-1] == ("b", "after-cut")
        assert on_c.messages("after-cut")[-1] == ("c", "after-cut")

        # Kill B's broker: a client of B with B and C in its URL list fails over to C's broker,
        # resubscribes, and receives again.
        mover = client(b, [url["b"], url["c"]])
        mover.sub("move.>", tag="m")
        heard([mover], pub, "move.probe")
        brokers["b"].send_signal(signal.SIGKILL)
        brokers["b"].wait(timeout(10))
        heard([mover], pub, "move.probe")  # (until it has reconnected and resubscribed)
        pub.pub("move.x", "after-kill")
        assert mover.messages("after-kill")[-1] == ("m", "after-kill")
