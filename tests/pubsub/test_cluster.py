"""Brokers joined through NATS (sockstack.pubsub.cluster): subjects, and brokers in this process
linked through real nats-server processes on loopback.

Each broker is a real Server on 127.0.0.1:0 with its NatsLink; clients are AsyncClients. A round
of messages ends with an ``end`` message from the same publisher (one publisher's messages keep
their order through one broker, NATS and the next broker), so "received once" is read, not
waited for. ``link.flush()`` returns once the link's interest is subscribed and its NATS server
has seen it (a PING/PONG): a publish after it is delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockstack import AsyncClient, Server
from sockstack.pubsub import Broker, BrokerLimits, matches, validate_pattern, validate_topic
from sockstack.pubsub.cluster import OUTGOING_OVERHEAD, NatsLink, SubjectMap
from sockstack.pubsub.pattern import PubSub
from tests.conftest import timeout

pytestmark = pytest.mark.timeout(30)


# ---------------------------------------------------------------------------- subjects

_TOKEN_CHARS = st.sampled_from(
    [*"abcXYZ019-_%~:é€", "\x01", "\x1f", "\x7f", "\x85", "\u2028", "\U0001f600", "_sockstack"]
)
_TOKEN = st.lists(_TOKEN_CHARS, min_size=1, max_size=4).map("".join)


@st.composite
def topics(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(_TOKEN, min_size=1, max_size=5))
    return ".".join(tokens)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(st.one_of(_TOKEN, st.just("*")), min_size=1, max_size=5))
    if draw(st.booleans()):
        tokens.append(">")
    return ".".join(tokens)


MAPS = [SubjectMap(), SubjectMap(""), SubjectMap("app.eu.")]


def _nats_ok(subject: str) -> bool:
    """What NATS can carry: no whitespace or control characters; wildcards whole tokens."""
    return all(
        not c.isspace() and ord(c) >= 0x20 and not 0x7F <= ord(c) <= 0x9F for c in subject
    ) and all(
        t and (t in ("*", ">") or ("*" not in t and ">" not in t)) for t in subject.split(".")
    )


@settings(max_examples=300, deadline=None)
@given(topic=topics())
def test_topics_map_to_subjects_and_back(topic: str) -> None:
    validate_topic(topic)
    for m in MAPS:
        subject = m.subject(topic)
        assert _nats_ok(subject), subject
        assert subject.startswith(m.prefix) and not subject.startswith(m.control)
        assert len(subject.split(".")) == len(topic.split(".")) + m.prefix.count(".")
        assert m.topic(subject) == topic


@settings(max_examples=300, deadline=None)
@given(pattern=patterns(), topic=topics())
def test_wildcards_keep_their_meaning(pattern: str, topic: str) -> None:
    validate_pattern(pattern)
    for m in MAPS:
        sp = m.subject(pattern)
        assert _nats_ok(sp) and m.topic(sp) == pattern
        # NATS matches subjects token by token as sockstack matches topics (`matches` is that
        # rule on any dotted string), so a NATS subscription to the pattern's subject gets
        # exactly the topics the pattern matches.
        assert matches(sp, m.subject(topic)) == matches(pattern, topic)
        # and a pattern that is a topic matches exactly its own subject
        assert matches(sp, m.subject(pattern.replace("*", "x").replace(">", "y")))


def test_foreign_subjects_are_taken_literally() -> None:
    m = SubjectMap()
    assert m.subject("a%b.\x01") == "sockstack.a%25b.%01"
    assert m.topic("sockstack.a%25b.%01") == "a%b.\x01"
    # What the escaping never writes stays as it is: lower-case hex, an escaped '.', a lone %.
    assert m.topic("sockstack.a%2e.b%zz.%") == "a%2e.b%zz.%"
    assert m.topic("sockstack.%41") == "%41"  # 'A' needs no escape: not one of ours
    assert m.topic("other.a") is None and m.topic("_sockstack.retain.a") is None
    bare = SubjectMap("")
    assert bare.subject("_sockstack.x") == "%5Fsockstack.x"  # out of the control namespace
    assert bare.topic("%5Fsockstack.x") == "_sockstack.x"
    assert bare.topic("_sockstack.retain.x") is None
    assert SubjectMap.queue("a b\t%") == "a%20b%09%25"
    for bad in ("nodot", "a..", "a b.", "*.", "x>."):
        with pytest.raises(ValueError, match="cluster prefix"):
            SubjectMap(bad)


# ---------------------------------------------------------------------------- nats-server


def _nats_server() -> str:
    found = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/bin")
    if found is None:
        pytest.skip("nats-server is not installed (`make test-deps` installs Debian's)")
    if importlib.util.find_spec("nats") is None:
        pytest.skip("nats-py is not installed (the dev extra has it)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NatsServer:
    """A nats-server on loopback this test started (client port, monitoring port)."""

    binary: str
    port: int = field(default_factory=_free_port)
    monitor: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor)],
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

    def connz(self) -> list[dict[str, Any]]:
        """The server's connections with their subscriptions (/connz?subs=1)."""
        url = f"http://127.0.0.1:{self.monitor}/connz?subs=1"
        with urllib.request.urlopen(url, timeout=timeout(5)) as r:
            conns: list[dict[str, Any]] = json.load(r).get("connections") or []
            return conns

    def subjects_of(self, name: str) -> list[str]:
        """The subscriptions of the connection called ``name``."""
        for c in self.connz():
            if c.get("name") == name:
                return sorted(c.get("subscriptions_list") or [])
        raise AssertionError(f"no connection {name!r}")


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    srv = NatsServer(_nats_server())
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


@dataclass
class Node:
    """A broker on loopback joined through NATS."""

    server: Server
    broker: Broker
    link: NatsLink

    @property
    def url(self) -> str:
        return str(self.server.endpoint("tcp"))


@contextlib.asynccontextmanager
async def node(nats: Any, **link_options: Any) -> AsyncIterator[Node]:
    """A broker on loopback joined through ``nats`` (a server with a ``url``, or a list of
    URLs); ``broker=`` one of the test's (e.g. with a store), else ``limits=`` for a new one;
    the other options are the link's (``jetstream=True``...)."""
    limits = link_options.pop("limits", None)
    broker = link_options.pop("broker", None) or Broker(limits)
    urls = nats if isinstance(nats, list) else [nats.url]
    link = NatsLink(broker, urls, reconnect_wait=0.1, **link_options)
    await link.start()
    try:
        async with Server(patterns=[PubSub(broker)], tcp=["127.0.0.1:0"]) as server:
            yield Node(server, broker, link)
    finally:
        await link.close()


class Inbox:
    """What one subscription received, and an event per awaited value."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.topics: list[str] = []
        self.retained: list[tuple[str, Any]] = []
        self._want: dict[str, asyncio.Event] = {}  # by repr(value): lists are values too

    def __call__(self, msg: Any) -> None:
        if msg.retained:
            self.retained.append((msg.topic, msg.value))
            return
        self.values.append(msg.value)
        self.topics.append(msg.topic)
        ev = self._want.get(repr(msg.value))
        if ev is not None:
            ev.set()

    async def until(self, value: Any) -> None:
        if value in self.values:
            return
        ev = self._want.setdefault(repr(value), asyncio.Event())
        await asyncio.wait_for(ev.wait(), timeout(10))


async def wait_for(cond: Callable[[], bool], within: float = 10.0) -> None:
    """A bounded wait for a condition the test cannot await directly (a reconnect)."""
    deadline = time.monotonic() + timeout(within)
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)  # the poll's period (bounded by the deadline)


# ---------------------------------------------------------------------------- delivery


async def test_a_publish_reaches_every_broker_once(nats_server: NatsServer) -> None:
    async with (
        node(nats_server) as a,
        node(nats_server) as b,
        node(nats_server) as c,
        AsyncClient(a.url) as ca,
        AsyncClient(b.url) as cb,
        AsyncClient(c.url) as cc,
    ):
        here, wide, narrow, other = Inbox(), Inbox(), Inbox(), Inbox()
        await ca.subscribe("t.>", callback=here)  # on the publisher's own broker
        await cb.subscribe("t.>", callback=wide)
        await cb.subscribe("t.*", callback=narrow)  # overlapping patterns: each once
        await cc.subscribe("t.*", callback=other)
        for n in (a, b, c):
            await n.link.flush()
        expected: list[Any] = []
        for rnd in (1, 2):  # the second round: no late copy of the first came in between
            for i in range(50):
                await ca.publish("t.x", [rnd, i])
            await ca.publish("t.x", ["end", rnd])
            expected += [*([rnd, i] for i in range(50)), ["end", rnd]]
            for box in (here, wide, narrow, other):
                await box.until(["end", rnd])
                assert box.values == expected  # once each, in the publisher's order
        stats = a.broker.stats()
        assert stats["cluster_sent"] == 102 and stats["cluster_dropped_out"] == 0
        assert stats["cluster_received"] == 0  # no_echo: nothing of its own came back
        assert b.broker.stats()["cluster_received"] == 204  # one per pattern
        assert b.broker.stats()["cluster_interest_subscriptions"] == 2


async def test_codecs_travel_and_plain_nats_clients_see_them(nats_server: NatsServer) -> None:
    import nats

    async with (
        node(nats_server) as a,
        node(nats_server) as b,
        AsyncClient(a.url, codec="json") as pub_json,
        AsyncClient(a.url, codec="raw") as pub_raw,
        AsyncClient(a.url) as pub_msgpack,
        AsyncClient(b.url) as sub,
    ):
        nc = await nats.connect(nats_server.url)
        seen: list[tuple[str, bytes, dict[str, str] | None]] = []

        async def on_nats(msg: Any) -> None:
            seen.append((msg.subject, msg.data, msg.headers))

        await nc.subscribe("sockstack.>", cb=on_nats)
        await nc.flush()
        box = Inbox()
        await sub.subscribe("c.>", callback=box)
        await b.link.flush()
        await pub_json.publish("c.j", {"k": [1, 2]})
        await pub_raw.publish("c.r", b"\x00raw")
        await pub_msgpack.publish("c.m", "end")
        await box.until("end")
        assert box.values == [{"k": [1, 2]}, b"\x00raw", "end"]
        await nc.flush()
        await wait_for(lambda: len(seen) == 3)
        assert seen[0] == ("sockstack.c.j", b'{"k":[1,2]}', {"Sockstack-Codec": "2"})
        assert seen[1] == ("sockstack.c.r", b"\x00raw", {"Sockstack-Codec": "0"})
        assert seen[2][2] is None  # msgpack, the default: no header
        await nc.close()


async def test_queue_groups_give_each_message_to_one_member_across_brokers(
    nats_server: NatsServer,
) -> None:
    async with (
        node(nats_server) as a,
        node(nats_server) as b,
        node(nats_server) as c,
        AsyncClient(a.url) as ca,
        AsyncClient(b.url) as cb,
        AsyncClient(c.url) as cc,
        AsyncClient(a.url) as pub,
    ):
        members = {"a": Inbox(), "b1": Inbox(), "b2": Inbox(), "c": Inbox()}
        await ca.subscribe("jobs.*", group="workers", callback=members["a"])
        await cb.subscribe("jobs.*", group="workers", callback=members["b1"])
        await cb.subscribe("jobs.*", group="workers", callback=members["b2"])
        await cc.subscribe("jobs.*", group="workers", callback=members["c"])
        everyone = Inbox()
        await cc.subscribe("jobs.*", callback=everyone)  # a plain subscriber gets them all
        for n in (a, b, c):
            await n.link.flush()
        n_msgs = 120
        for i in range(n_msgs):
            await pub.publish("jobs.run", i)
        await pub.publish("jobs.run", "end")
        await everyone.until("end")
        # The member that took "end" has everything before it (one path, in order); the others
        # too, since NATS delivered in order to each broker: a PING round trip to each
        # broker's server ends the wait.
        for n in (a, b, c):
            await n.link.flush()
        for client in (ca, cb, cc):
            await client.ping()
        got = [v for m in members.values() for v in m.values]
        assert sorted(v for v in got if v != "end") == list(range(n_msgs))
        assert got.count("end") == 1
        per_broker = {
            "a": len(members["a"].values),
            "b": len(members["b1"].values) + len(members["b2"].values),
            "c": len(members["c"].values),
        }
        assert sum(1 for v in per_broker.values() if v) >= 2, per_broker  # spread over brokers
        assert members["b1"].values and members["b2"].values  # and within one, in turn
        assert everyone.values == [*range(n_msgs), "end"]


async def test_interest_follows_local_subscribers(nats_server: NatsServer) -> None:
    async with (
        node(nats_server) as a,
        node(nats_server) as b,
        AsyncClient(a.url) as pub,
        AsyncClient(b.url) as c1,
        AsyncClient(b.url) as c2,
    ):
        p_name = b.link.name + "-p"
        q_name = b.link.name + "-q"
        base = nats_server.subjects_of(p_name)  # the link's own (retained, snapshots)
        assert "_sockstack.retain.>" in base
        box1, box2 = Inbox(), Inbox()
        s1 = await c1.subscribe("i.>", callback=box1)
        s2 = await c2.subscribe("i.>", callback=box2)  # the same pattern: one NATS sub
        g = await c2.subscribe("i.q", group="g", callback=Inbox())
        await b.link.flush()
        assert nats_server.subjects_of(p_name) == sorted([*base, "sockstack.i.>"])
        assert nats_server.subjects_of(q_name) == ["sockstack.i.q"]
        assert b.broker.stats()["cluster_interest_subscriptions"] == 2
        await pub.publish("i.x", "one")
        await box1.until("one")
        await box2.until("one")

        await s1.unsubscribe()
        await c1.ping()
        await b.link.flush()
        assert nats_server.subjects_of(p_name) == sorted([*base, "sockstack.i.>"])
        await s2.unsubscribe()
        await g.unsubscribe()
        await c2.ping()
        await b.link.flush()
        assert nats_server.subjects_of(p_name) == base
        assert nats_server.subjects_of(q_name) == []
        assert b.broker.stats()["cluster_interest_subscriptions"] == 0
        received = b.broker.stats()["cluster_received"]
        await pub.publish("i.x", "two")
        await pub.ping()
        await a.link.flush()
        await b.link.flush()
        assert b.broker.stats()["cluster_received"] == received  # NATS sent it nothing


# ---------------------------------------------------------------------------- retained


async def test_retained_messages_are_seen_from_every_broker(nats_server: NatsServer) -> None:
    async with node(nats_server) as a, node(nats_server) as b, AsyncClient(a.url) as ca:
        big = "x" * 3000
        for i in range(200):  # ~600 kB: more than one snapshot chunk
            await ca.publish(f"r.{i:03d}", [i, big], retain=True)
        await ca.publish("r.gone", "soon cleared", retain=True)
        await ca.clear_retained("r.gone")
        await ca.ping()
        await a.link.flush()
        await b.link.flush()
        assert set(b.broker.retained) == {f"r.{i:03d}" for i in range(200)}
        async with AsyncClient(b.url) as cb:
            box = Inbox()
            await cb.subscribe("r.001", callback=box)
            await cb.subscribe("r.gone", callback=box)
            await cb.ping()
            assert box.retained == [("r.001", [1, big])]
        # A broker that starts later fetches the store from a peer, in chunks.
        async with node(nats_server) as late, AsyncClient(late.url) as cl:
            assert set(late.broker.retained) == set(a.broker.retained)
            assert late.broker.stats()["cluster_snapshot_entries"] == 200
            box = Inbox()
            await cl.subscribe("r.199", callback=box)
            await cl.ping()
            assert box.retained == [("r.199", [199, big])]
        # Within its own bound: a broker with a small retained store takes what fits.
        small = BrokerLimits(max_retained_bytes=100_000)
        async with node(nats_server, limits=small) as tiny:
            assert 0 < len(tiny.broker.retained) < 200
            assert tiny.broker.retained_bytes <= 100_000


async def test_a_snapshot_never_overwrites_a_newer_live_value(nats_server: NatsServer) -> None:
    """A peer (a plain NATS client here) publishes a live change of a topic, then answers the
    snapshot request with an older value: the live one stays."""
    import msgpack
    import nats

    nc = await nats.connect(nats_server.url)

    async def answer(msg: Any) -> None:
        await nc.publish("_sockstack.retain.s.t", msgpack.packb("new"))
        entries = [["s.t", 1, msgpack.packb("old")], ["s.u", 1, msgpack.packb("kept")]]
        await nc.publish(
            msg.reply, msgpack.packb({"id": "peer", "entries": entries, "more": False})
        )

    await nc.subscribe("_sockstack.snap", queue="snap", cb=answer)
    await nc.flush()
    async with node(nats_server) as b:
        assert b.broker.retained["s.t"][1] == msgpack.packb("new")
        assert b.broker.retained["s.u"][1] == msgpack.packb("kept")
    await nc.close()


# ---------------------------------------------------------------------------- failures


async def test_a_broker_keeps_working_while_nats_goes_and_comes_back(
    nats_server: NatsServer,
) -> None:
    async with (
        node(nats_server) as a,
        node(nats_server) as b,
        AsyncClient(a.url) as pub,
        AsyncClient(b.url) as sub,
    ):
        old, local = Inbox(), Inbox()
        old_sub = await sub.subscribe("old.>", callback=old)
        await pub.subscribe("new.>", callback=local)
        await b.link.flush()
        nats_server.kill()
        await wait_for(lambda: not a.link.connected and not b.link.connected)
        # Meanwhile: local delivery goes on, publishes wait (bounded), interest changes wait.
        new = Inbox()
        await sub.subscribe("new.>", callback=new)
        await old_sub.unsubscribe()
        await pub.publish("new.x", "while away")
        await local.until("while away")
        await pub.ping()
        assert a.broker.stats()["cluster_outgoing"] == 1
        nats_server.start()  # the same port: nats-py reconnects by itself
        await wait_for(lambda: a.link.connected and b.link.connected)
        await b.link.flush()
        await a.link.flush()
        assert a.broker.stats()["cluster_outgoing"] == 0
        p_subs = nats_server.subjects_of(b.link.name + "-p")
        assert "sockstack.new.>" in p_subs and "sockstack.old.>" not in p_subs
        await pub.publish("new.x", "back")
        await new.until("back")
        assert a.broker.stats()["cluster_reconnects"] >= 2  # P and Q
        assert b.broker.stats()["cluster_disconnects"] >= 2


async def test_bad_input_from_a_plain_nats_client_is_counted(nats_server: NatsServer) -> None:
    import msgpack
    import nats

    async with (
        node(nats_server, limits=BrokerLimits(max_payload=1000)) as b,
        AsyncClient(b.url) as sub,
    ):
        box = Inbox()
        await sub.subscribe("in.>", callback=box)
        await b.link.flush()
        nc = await nats.connect(nats_server.url)
        await nc.publish("sockstack.in.codec", b"x", headers={"Sockstack-Codec": "9"})
        await nc.publish("sockstack.in.empty", b"")  # msgpack has no empty value
        await nc.publish("sockstack.in.big", b"x" * 2000)  # above the broker's max_payload
        await nc.publish("sockstack.in.%00", msgpack.packb(1))  # NUL: not a topic
        await nc.publish("_sockstack.retain.in.%0A", msgpack.packb(1))  # nor is a newline
        await nc.publish("sockstack.in.raw", b"bytes", headers={"Sockstack-Codec": "0"})
        await nc.publish("sockstack.in.plain", msgpack.packb("end"))  # no header: msgpack
        await nc.flush()
        await box.until("end")
        assert box.values == [b"bytes", "end"]
        assert box.topics == ["in.raw", "in.plain"]
        assert b.broker.stats()["cluster_bad_in"] == 5
        assert "in.\n" not in b.broker.retained
        await nc.close()


async def test_the_outgoing_queue_is_bounded_in_bytes(nats_server: NatsServer) -> None:
    bound = 1 << 20
    async with node(nats_server, max_outgoing_bytes=bound) as a, node(nats_server) as b:
        box = Inbox()
        b.broker.subscribe_local(_Sink(box), "m.>")
        await b.link.flush()
        nats_server.kill()
        await wait_for(lambda: not a.link.connected)
        payloads = [b"%0300d" % i for i in range(10_000)]  # ~4.7 MB charged: 4 x the bound
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for p in payloads:
            a.broker.publish("m.x", p, codec=0)
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        stats = a.broker.stats()
        assert 0 < stats["cluster_outgoing_bytes"] <= bound
        assert stats["cluster_dropped_out"] == 10_000 - stats["cluster_outgoing"]
        # What the queue really holds is within what it is charged (payload, subject and
        # OUTGOING_OVERHEAD each): the charge is a bound on memory.
        assert held <= stats["cluster_outgoing_bytes"] + 64 * 1024, (held, stats)
        per_entry = (held - 300 * stats["cluster_outgoing"]) / stats["cluster_outgoing"]
        assert per_entry <= OUTGOING_OVERHEAD + len("sockstack.m.x"), per_entry
        kept = stats["cluster_outgoing"]
        nats_server.start()
        await wait_for(lambda: a.link.connected and b.link.connected)
        await a.link.flush()
        assert a.broker.stats()["cluster_sent"] == kept  # what was kept went, oldest first
        assert a.broker.stats()["cluster_outgoing_bytes"] == 0


class _Sink:
    """An in-process subscriber (Broker.subscribe_local) feeding an Inbox."""

    def __init__(self, box: Inbox) -> None:
        self.box = box

    def message(self, seq: int, topic: bytes, payload: bytes, codec: int, flags: int) -> None:
        self.box.values.append(payload)

    def write_soon(self, data: bytes) -> None:  # (never called for a local subscriber)
        raise AssertionError

    def writable(self) -> bool:
        return True

    def close_slow(self, code: int, reason: str) -> None:
        raise AssertionError(reason)


async def test_no_nats_server_is_a_clear_error() -> None:
    from sockstack.errors import ConnectError

    _nats_server()
    link = NatsLink(Broker(), [f"nats://127.0.0.1:{_free_port()}"], connect_timeout=1)
    with pytest.raises(ConnectError, match=r"cannot reach NATS at nats://127\.0\.0\.1"):
        await link.start()


def test_without_nats_py_the_error_says_what_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['nats'] = None\n"
        "from sockstack.pubsub import Broker\n"
        "from sockstack.pubsub.cluster import NatsLink\n"
        "try:\n    NatsLink(Broker(), ['nats://127.0.0.1:4222'])\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout(20)
    )
    assert "pip install 'sockstack[nats]'" in out.stdout, out.stderr


# ---------------------------------------------------------------------------- the CLI


def _sockstack(*args: str, **popen: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "sockstack.cli", *args], text=True, env=env, **popen
    )


def test_workers_with_a_broker_need_a_cluster() -> None:
    proc = _sockstack(
        "serve", "--broker", "--workers", "2", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, err = proc.communicate(timeout=timeout(20))
    assert proc.returncode == 2 and "--cluster nats://HOST:4222" in err
    proc = _sockstack("serve", "--cluster", "nats://127.0.0.1:1", stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=timeout(20))
    assert proc.returncode == 2 and "add --broker" in err


async def test_serve_workers_broker_cluster(nats_server: NatsServer) -> None:
    port = _free_port()
    proc = _sockstack(
        "serve",
        "--broker",
        "--workers",
        "2",
        "--tcp",
        f"127.0.0.1:{port}",
        "--udp",
        "127.0.0.1:0",
        "--cluster",
        nats_server.url,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout(20)
        line = ""
        while "worker processes" not in line:  # the supervisor's line once both are ready
            assert time.monotonic() < deadline and proc.poll() is None, line
            line = await asyncio.to_thread(proc.stdout.readline)
        # Each worker's broker joined NATS (two connections each).
        names = [c.get("name", "") for c in nats_server.connz()]
        assert len([n for n in names if n.startswith("sockstack-broker-")]) == 4, names
        url = f"tcp://127.0.0.1:{port}"
        async with contextlib.AsyncExitStack() as stack:
            subs = [await stack.enter_async_context(AsyncClient(url)) for _ in range(8)]
            pubs = [await stack.enter_async_context(AsyncClient(url)) for _ in range(4)]
            boxes = [Inbox() for _ in subs]
            for s, box in zip(subs, boxes, strict=True):
                await s.subscribe("w.>", callback=box)
            # Interest reaches NATS asynchronously: ping through until every box hears.
            probe = 0
            deadline = time.monotonic() + timeout(10)
            while not all(box.values for box in boxes):
                assert time.monotonic() < deadline, [len(b.values) for b in boxes]
                for p in pubs:
                    await p.publish("w.probe", ["probe", probe])
                probe += 1
                await asyncio.sleep(0.05)  # the probe's period (bounded by the deadline)
            for i, p in enumerate(pubs):
                for k in range(25):
                    await p.publish("w.x", [i, k])
                await p.publish("w.x", ["end", i])
            for box in boxes:
                for i in range(len(pubs)):
                    await box.until(["end", i])
                real = sorted(repr(v) for v in box.values if v[0] != "probe")
                want = [[i, k] for i in range(4) for k in range(25)] + [
                    ["end", i] for i in range(4)
                ]
                assert real == sorted(map(repr, want))  # each once, whichever worker had it
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout(15))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
