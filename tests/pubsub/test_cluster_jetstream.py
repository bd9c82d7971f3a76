"""QoS 1 and durable subscriptions across brokers through NATS JetStream
(``NatsLink(..., jetstream=True)``, ``--cluster-jetstream``), against a real nats-server with
JetStream (``-js``, its store in the test's tmp directory) on loopback.

Brokers are real Servers in this process (their links inspected), or ``sockstack broker``
processes where one is killed with SIGKILL. A QoS 1 publish that returned is one JetStream
acknowledged: every such message must reach the durable subscriber, whatever broker it is on
and whichever broker died meanwhile (duplicates allowed, flagged redelivered).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import subprocess
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sockstack import AsyncClient
from sockstack.errors import ConnectError, ErrorCode, RemoteError
from sockstack.protocol.calls import Backoff
from sockstack.protocol.codecs import CODECS
from sockstack.pubsub import Broker, BrokerLimits
from sockstack.pubsub.cluster import (
    CONFIRM_OVERHEAD,
    OUTGOING_OVERHEAD,
    NatsLink,
    consumer_name,
    stream_name,
)
from sockstack.pubsub.pattern import PubSub, _Answer
from tests.conftest import timeout
from tests.pubsub.test_cluster import Node, _free_port, _nats_server, _sockstack, wait_for
from tests.pubsub.test_cluster import node as cluster_node

pytestmark = pytest.mark.timeout(60)

FAST = Backoff(initial=0.01, factor=2.0, max_delay=0.2)


@dataclass
class JsServer:
    """A nats-server with JetStream on loopback, its store in ``store``."""

    binary: str
    store: Path
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout(10)
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError("nats-server did not start") from None
                time.sleep(0.01)  # the poll's period (bounded by the deadline)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout(5))


@pytest.fixture
def js(tmp_path: Path) -> Iterator[JsServer]:
    srv = JsServer(_nats_server(), tmp_path / "js")
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


@contextlib.asynccontextmanager
async def node(js: JsServer, **options: Any) -> AsyncIterator[Node]:
    async with cluster_node(js, jetstream=True, **options) as n:
        yield n


@contextlib.asynccontextmanager
async def admin(js: JsServer) -> AsyncIterator[Any]:
    """A plain nats-py JetStream manager, to look at the stream and consumers."""
    import nats

    nc = await nats.connect(js.url)
    try:
        yield nc.jsm()
    finally:
        await nc.close()


async def stored(jsm: Any, stream: str = "SOCKSTACK") -> int:
    info = await jsm.stream_info(stream)
    return int(info.state.messages)


# ---------------------------------------------------------------------------- names


def test_stream_and_consumer_names() -> None:
    assert stream_name("sockstack.") == "SOCKSTACK"
    assert stream_name("app.eu.") == "APP_EU"
    assert consumer_name("billing-1") == "billing-1"
    assert consumer_name("a.b c_é") == "a_2Eb_20c_5F_C3_A9"
    assert consumer_name("a_2E") != consumer_name("a.")  # '_' is escaped too: no clash
    long = consumer_name("x" * 255)
    assert len(long) <= 200 and long != consumer_name("x" * 254)
    with pytest.raises(ValueError, match="prefix"):
        NatsLink(Broker(), ["nats://127.0.0.1:1"], prefix="", jetstream=True)


# ---------------------------------------------------------------------------- publishing


async def test_a_qos1_publish_is_answered_once_jetstream_has_it(js: JsServer) -> None:
    async with node(js) as a, admin(js) as jsm, AsyncClient(a.url, timeout=timeout(5)) as c:
        assert await stored(jsm) == 0
        for i in range(5):
            await c.publish("orders.new", {"n": i}, qos=1)
            assert await stored(jsm) == i + 1  # the answer came after the PubAck
        assert a.broker.stats()["cluster_js_confirmed"] == 5
        js.kill()
        await wait_for(lambda: not a.link.connected)
        with pytest.raises(RemoteError) as err:
            await c.publish("orders.new", {"n": 5}, qos=1)
        assert err.value.code == ErrorCode.UNAVAILABLE and "NATS is unreachable" in str(err.value)
        assert a.broker.stats()["cluster_js_refused"] == 1


async def test_no_jetstream_or_another_stream_config_is_a_clear_error(js: JsServer) -> None:
    async with node(js, stream_max_bytes=1 << 20):
        link = NatsLink(Broker(), [js.url], jetstream=True)
        with pytest.raises(ConnectError, match=r"other settings \(max_bytes") as err:
            await link.start()
        assert "nats stream edit SOCKSTACK" in str(err.value)
    plain = subprocess.Popen(
        [js.binary, "-a", "127.0.0.1", "-p", str(port := _free_port())],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_for(lambda: _listening(port))
        link = NatsLink(Broker(), [f"nats://127.0.0.1:{port}"], jetstream=True)
        with pytest.raises(ConnectError, match="have no JetStream"):
            await link.start()
        proc = _sockstack(
            "broker",
            "--tcp",
            "127.0.0.1:0",
            "--udp",
            "127.0.0.1:0",
            "--cluster",
            f"nats://127.0.0.1:{port}",
            "--cluster-jetstream",
            stderr=subprocess.PIPE,
        )
        _, out = await asyncio.to_thread(proc.communicate, timeout=timeout(20))
        assert proc.returncode == 3 and "have no JetStream (start nats-server with -js" in out
    finally:
        plain.kill()
        plain.wait()
    proc = _sockstack("broker", "--cluster-jetstream", stderr=subprocess.PIPE)
    _, out = await asyncio.to_thread(proc.communicate, timeout=timeout(20))
    assert proc.returncode == 2 and "add --cluster nats://HOST:4222" in out


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------- durables


async def test_a_durable_subscriber_resumes_on_another_broker(js: JsServer) -> None:
    async with node(js) as a, node(js) as b, admin(js) as jsm:
        async with AsyncClient(a.url, timeout=timeout(5)) as pub:
            async with AsyncClient(b.url, timeout=timeout(5)) as c:
                sub = await c.subscribe("bill.>", durable="billing")
                for i in range(100):  # (the consumer is made from the SUB's time)
                    await pub.publish("bill.x", i, qos=1)
                got = [await sub.get(timeout(10)) for _ in range(100)]
                assert [m.value for m in got] == list(range(100))
                assert not any(m.redelivered for m in got)
                info = await jsm.consumer_info("SOCKSTACK", "billing")
                assert info.config.filter_subject == "sockstack.bill.>"
                assert info.config.max_ack_pending == b.broker.limits.max_inflight
            # The subscriber is away: what is published now waits in JetStream.
            await wait_for(lambda: b.link.stats()["cluster_js_durables"] == 0)
            for i in range(100, 130):
                await pub.publish("bill.y", i, qos=1)
            # Back, on the other broker, under the same name.
            async with AsyncClient(a.url, timeout=timeout(5)) as c:
                sub = await c.subscribe("bill.>", durable="billing")
                got = [await sub.get(timeout(10)) for _ in range(30)]
                assert [m.value for m in got] == list(range(100, 130))
                assert [m.topic for m in got] == ["bill.y"] * 30
                # Another pattern under that name is refused (its subscriber's connection
                # closed with the reason), and the consumer is left as it is.
                async with AsyncClient(b.url, timeout=timeout(5), reconnect=False) as other:
                    await other.subscribe("other.>", durable="billing")
                    await wait_for(lambda: not b.broker.durables)
                info = await jsm.consumer_info("SOCKSTACK", "billing")
                assert info.config.filter_subject == "sockstack.bill.>"
                await sub.unsubscribe()  # deletes the durable subscription: its consumer
                await wait_for(lambda: not a.broker.durables)
                await _until_deleted(jsm, "billing")


async def _until_deleted(jsm: Any, name: str) -> None:
    from nats.js.errors import NotFoundError

    deadline = time.monotonic() + timeout(10)
    while True:
        try:
            await jsm.consumer_info("SOCKSTACK", name)
        except NotFoundError:
            return
        assert time.monotonic() < deadline, f"consumer {name} still there"
        await asyncio.sleep(0.05)  # the poll's period (bounded by the deadline)


async def test_a_leaving_subscriber_gives_back_what_it_did_not_acknowledge(js: JsServer) -> None:
    """A subscriber that leaves with messages unacknowledged: they are nak'ed at once and come
    (flagged redelivered) to the next subscriber on another broker, long before ack_wait: once
    the leaving broker's pull request has ended (pull_expires)."""
    limits = BrokerLimits(ack_wait=30.0, max_inflight=5)
    quick = {"limits": limits, "pull_expires": 0.5}
    async with node(js, **quick) as a, node(js, **quick) as b:
        async with AsyncClient(a.url, timeout=timeout(5)) as pub:
            async with AsyncClient(b.url, timeout=timeout(5)) as c:
                # a callback that never returns: nothing is acknowledged
                await c.subscribe("v.>", durable="v", callback=_never)
                for i in range(3):
                    await pub.publish("v.x", i, qos=1)
                await wait_for(lambda: b.link.stats()["cluster_js_fed"] >= 3)
            await wait_for(lambda: b.link.stats()["cluster_js_naks"] >= 3)
            async with AsyncClient(a.url, timeout=timeout(5)) as c:
                sub = await c.subscribe("v.>", durable="v")
                got = [await sub.get(timeout(10)) for _ in range(3)]  # well within ack_wait
                assert [m.value for m in got] == [0, 1, 2]
                assert all(m.redelivered for m in got)


async def _never(msg: Any) -> None:
    await asyncio.Event().wait()


async def test_kill_9_the_broker_of_a_durable_subscriber(js: JsServer) -> None:
    """Two ``sockstack broker --cluster-jetstream`` processes; the durable subscriber is on the
    first, the publisher on the second. SIGKILL the first mid-stream: the subscriber fails over
    to the second, resubscribes, and gets every message whose QoS 1 publish returned."""
    ports = [_free_port(), _free_port()]
    procs = [_broker_process(js, port) for port in ports]
    try:
        urls = [f"tcp://127.0.0.1:{p}" for p in ports]
        for proc in procs:
            await _ready(proc)
        seen: list[tuple[int, bool]] = []
        enough = asyncio.Event()

        def on(m: Any) -> None:
            seen.append((m.value, m.redelivered))
            if len(seen) >= 300:
                enough.set()

        acked: list[int] = []
        async with (
            AsyncClient(urls, timeout=timeout(5), backoff=FAST) as c,
            AsyncClient(urls[1], timeout=timeout(5)) as pub,
        ):
            await c.subscribe("pay.>", durable="payments", callback=on)

            async def publish() -> None:
                for i in range(3000):
                    try:
                        await pub.publish("pay.x", i, qos=1)
                    except RemoteError:
                        continue  # not acknowledged: not owed
                    acked.append(i)

            publisher = asyncio.create_task(publish())
            await asyncio.wait_for(enough.wait(), timeout(20))
            procs[0].send_signal(signal.SIGKILL)  # mid-stream
            procs[0].wait(timeout(5))
            await asyncio.wait_for(publisher, timeout(30))
            want = set(acked)
            deadline = time.monotonic() + timeout(30)
            while not want <= {v for v, _ in seen}:
                assert time.monotonic() < deadline, sorted(want - {v for v, _ in seen})[:20]
                await asyncio.sleep(0.05)  # the poll's period (bounded by the deadline)
        assert len(acked) == 3000  # (the publisher's broker lives: all were kept)
        first: set[int] = set()
        for value, redelivered in seen:
            if value in first:
                assert redelivered, f"{value} came twice, the second time not flagged"
            first.add(value)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout(10))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def _broker_process(js: JsServer, port: int) -> subprocess.Popen[str]:
    return _sockstack(
        "broker",
        "--tcp",
        f"127.0.0.1:{port}",
        "--udp",
        "127.0.0.1:0",
        "--cluster",
        js.url,
        "--cluster-jetstream",
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


async def _ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout(20)
    line = ""
    while "kept in JetStream" not in line:  # the banner's line, once joined and listening
        assert time.monotonic() < deadline and proc.poll() is None, line
        line = await asyncio.to_thread(proc.stdout.readline)


# ---------------------------------------------------------------------------- bounds


async def test_what_the_link_holds_is_bounded(js: JsServer) -> None:
    """The PubAcks a link waits for: CONFIRM_OVERHEAD each (measured), refused beyond
    max_confirm_bytes, timed out after publish_timeout (and then never sent)."""
    async with node(js, publish_timeout=0.3) as a, admin(js) as jsm:
        link = a.link
        pattern = PubSub(Broker())
        codec = CODECS[1]
        answers: list[tuple[bool, str]] = []

        def note(ok: bool, why: str) -> None:
            answers.append((ok, why))

        link._draining = True  # nothing goes out meanwhile: everything waits
        n = 5000
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            held = [_Answer(pattern, None, i, codec) for i in range(n)]  # type: ignore[arg-type]
            for ans in held:
                link.publish_confirmed("m.t", b"x", 1, False, ans.link)
            del held
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
        per = grown / n
        assert per <= CONFIRM_OVERHEAD + OUTGOING_OVERHEAD, per
        assert per >= CONFIRM_OVERHEAD / 4, per  # (the measure measured something)
        assert link.stats()["cluster_js_waiting"] == n
        # Timed out by the tick: answered UNAVAILABLE, and then not sent at all.
        await wait_for(lambda: not link._confirms)
        link._draining = False
        link._kick_drain()
        await link.flush()
        assert await stored(jsm) == 0
        assert link.stats()["cluster_js_refused"] == n

    async with node(js, max_confirm_bytes=10 * CONFIRM_OVERHEAD) as a:
        link = a.link
        link._draining = True
        for _ in range(11):
            link.publish_confirmed("m.t", b"x", 1, False, note)
        assert answers[-1][0] is False and "max_confirm_bytes" in answers[-1][1]
        answers.clear()
        link._draining = False
        link._kick_drain()
        await wait_for(lambda: len(answers) == 10)
        assert answers == [(True, "")] * 10


async def test_control_messages_are_bounded(js: JsServer, caplog: Any) -> None:
    async with node(js, max_control_bytes=4096) as a:
        link = a.link
        link._draining = True
        caplog.set_level(logging.WARNING, "sockstack.cluster")
        d: Any = object()
        for i in range(100):
            link.durable_ack(d, f"$JS.ACK.SOCKSTACK.x.1.{i}.{i}.0.0")
        assert link._ctl_bytes <= 4096
        assert link.stats()["cluster_js_control_dropped"] > 0
        assert "max_control_bytes" in caplog.text
        link._draining = False
        link._kick_drain()
        await link.flush()
        assert not link._ctl and link._ctl_bytes == 0
