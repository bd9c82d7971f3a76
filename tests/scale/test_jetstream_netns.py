"""QoS 1 and durable subscriptions across hosts through NATS JetStream (issue 16 item 5): a
3-node JetStream cluster on n1, n2, n3 (stream replicas 3), ``sockstack broker --cluster
--cluster-jetstream`` on a and b, client processes on c.

- Kill -9 the broker of a durable subscriber mid-stream: the subscriber (URL list a, b) fails
  over to b, resubscribes under the same name, and receives every message whose QoS 1 publish
  was acknowledged (duplicates allowed, flagged redelivered).
- Cut the NATS node b's broker is on off the network: QoS 1 publishes are still acknowledged
  (the broker moves to another node; the stream and its consumer keep a quorum of two) and
  delivered. A publish refused meanwhile (ERROR UNAVAILABLE) is published again, as a client
  should.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import timeout
from tests.helpers.netns import Host, Lines, NatsNode, start_nats_cluster
from tests.scale.test_cluster_netns import connz, lab_or_skip

pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]

CLIENT = r"""
import asyncio, json, sys, time
from sockstack import AsyncClient
from sockstack.protocol.calls import Backoff

async def main(urls):
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    quick = Backoff(initial=0.05, factor=2.0, max_delay=0.5)
    async with AsyncClient(urls.split(","), timeout=5, backoff=quick) as c:
        def on(m):
            print(json.dumps(["msg", m.value, m.redelivered]), flush=True)
        print(json.dumps(["ready"]), flush=True)
        while line := await reader.readline():
            cmd = json.loads(line)
            if cmd[0] == "dsub":
                await c.subscribe(cmd[1], durable=cmd[2], callback=on)
                print(json.dumps(["ok"]), flush=True)
            elif cmd[0] == "pub1":  # topic, first value, count, seconds to keep trying one
                topic, first, count, retry = cmd[1:]
                acked, refused = [], 0
                for v in range(first, first + count):
                    deadline = time.monotonic() + retry
                    while True:
                        try:
                            await c.publish(topic, v, qos=1)
                            acked.append(v)
                            break
                        except Exception:  # UNAVAILABLE, a timeout, the connection lost
                            refused += 1
                            if time.monotonic() >= deadline:
                                break
                            await asyncio.sleep(0.05)  # the retry's pace
                print(json.dumps(["acked", acked, refused]), flush=True)

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

    def next(self, wait: float = 10.0) -> list[Any]:
        line: list[Any] = json.loads(self.lines.next(timeout(wait)))
        return line


def client(host: Host, urls: Sequence[str]) -> Client:
    proc = host.python(CLIENT, ",".join(urls), stdin=subprocess.PIPE)
    assert proc.stdout is not None
    c = Client(host, proc, Lines(proc.stdout))
    assert c.next(15) == ["ready"], "client did not start"
    return c


def start_broker(host: Host, nodes: Sequence[NatsNode]) -> subprocess.Popen[str]:
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
                ",".join(n.url for n in nodes),
                "--cluster-ping",
                "0.3",
                "--cluster-jetstream",
                "--cluster-replicas",
                "3",
                "--cluster-stream-bytes",
                str(64 << 20),  # (the lab's nodes have 256 MB of file store)
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
        )


class Received:
    """What the durable subscriber printed: values in order, and whether each repeat was
    flagged redelivered."""

    def __init__(self, sub: Client) -> None:
        self.sub = sub
        self.values: list[Any] = []
        self.unflagged_repeats: list[Any] = []
        self._seen: set[Any] = set()

    def take(self, wait: float) -> None:
        line = self.sub.next(wait)
        assert line[0] == "msg", line
        _, value, redelivered = line
        if value in self._seen and not redelivered:
            self.unflagged_repeats.append(value)
        self._seen.add(value)
        self.values.append(value)

    def until_count(self, n: int) -> None:
        deadline = time.monotonic() + timeout(20)
        while len(self.values) < n:
            assert time.monotonic() < deadline, len(self.values)
            self.take(10)

    def until_all(self, want: set[Any]) -> None:
        deadline = time.monotonic() + timeout(30)
        while not want <= self._seen:
            missing = sorted(want - self._seen)
            assert time.monotonic() < deadline, f"{len(missing)} missing: {missing[:20]}"
            self.take(20)


def test_durable_subscribers_resume_without_loss_across_hosts() -> None:
    with lab_or_skip(["n1", "n2", "n3", "a", "b", "c"]) as lab:
        n1, n2, n3, a, b, c = lab.hosts
        nodes = start_nats_cluster(
            lab, [n1, n2, n3], jetstream=True, ping_interval="250ms", ping_max=2
        )
        brokers = {h.name: start_broker(h, nodes) for h in (a, b)}
        for h in (a, b):
            h.check(f"tcp {h.ip} 5052 0.5", within=timeout(25), alive=brokers[h.name])
        url = {h.name: f"tcp://{h.ip}:5052" for h in (a, b)}

        sub = client(c, [url["a"], url["b"]])  # on a's broker (the first of its list)
        pub = client(c, [url["b"]])
        sub.send("dsub", "pay.>", "payments")
        assert sub.next(15) == ["ok"]
        got = Received(sub)

        # Kill -9 the subscriber's broker mid-stream.
        pub.send("pub1", "pay.x", 0, 1500, 0)
        got.until_count(150)
        brokers["a"].send_signal(signal.SIGKILL)
        brokers["a"].wait(timeout(10))
        tag, acked, _ = pub.next(40)
        assert tag == "acked" and len(acked) == 1500  # (b's broker lived: all were kept)
        got.until_all(set(acked))  # failed over to b, resubscribed, nothing lost
        assert not got.unflagged_repeats, got.unflagged_repeats[:20]

        # Cut off the NATS node b's broker is on: QoS 1 publishes still acknowledged and
        # delivered (a refused one is published again by the client, up to 20 s each).
        def node_of_b() -> NatsNode:
            for node in nodes:
                for conn in connz(node):
                    if conn.get("ip") == b.ip and str(conn.get("name", "")).startswith(
                        "sockstack-broker-"
                    ):
                        return node
            raise AssertionError("broker B is on no NATS node")

        node_of_b().host.link_down()
        pub.send("pub1", "pay.y", 10_000, 100, 20)
        tag, acked, refused = pub.next(50)
        assert tag == "acked" and acked == list(range(10_000, 10_100)), (len(acked), refused)
        got.until_all(set(acked))
        assert not got.unflagged_repeats, got.unflagged_repeats[:20]
