"""The fast paths of issue 17 give what the general paths give: the broker's route cache
(emptied when subscriptions change), one MSG frame shared by subscriptions with the same id,
the chunked flush of a QoS 0 queue, the subscriber's direct hand-over to a plain callback,
the cached PUB header, and ``publish_many`` in both clients (the same messages as a
``publish`` per value)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from sockstack import AsyncClient, Server, connect
from sockstack.asyncio.stream import StreamLimits
from sockstack.errors import CodecError, TopicError
from sockstack.host.server import ServerLimits
from sockstack.protocol.codecs import CODECS
from sockstack.protocol.frames import FrameDecoder, pack_header
from sockstack.protocol.registry import Registry
from sockstack.pubsub import Broker
from sockstack.pubsub.broker import QUEUED_OVERHEAD
from sockstack.pubsub.client import Message, Subscription, _AsyncState, _message
from sockstack.pubsub.messages import (
    FLAG_RETAIN,
    PUBSUB_MESSAGES,
    Msg,
    encode_msg,
    encode_pub,
    msg_head,
)
from sockstack.rpc.service import Service
from tests.conftest import timeout

_REGISTRY = Registry([PUBSUB_MESSAGES])


class RawPeer:
    """A subscriber's connection that keeps the bytes written to it."""

    def __init__(self) -> None:
        self.can_write = True
        self.data = bytearray()
        self.writes = 0

    def write_soon(self, data: bytes) -> None:
        self.data += data
        self.writes += 1

    def writable(self) -> bool:
        return self.can_write

    def close_slow(self, code: int, reason: str) -> None:
        pass

    def msgs(self) -> list[Msg]:
        out = [_REGISTRY.decode(f) for f in FrameDecoder().feed(bytes(self.data))]
        assert all(isinstance(m, Msg) for m in out)
        return out  # type: ignore[return-value]


def test_encoders_match_the_general_layout() -> None:
    for topic, payload, rid, codec, retain in [
        ("a.b", b"x", 0, 1, False),
        ("h\u00e9llo.w\u00f6rld", b"", 7, 0, True),
        ("a.b", b"y" * 70_000, 1, 2, True),
        ("z" * 300, b"q", 0, 1, False),  # longer than a broker takes: not cached
        ("a.b", b"x", 0, 1, False),  # the second time: from the cache
    ]:
        meta = topic.encode()
        flags = FLAG_RETAIN if retain else 0
        assert (
            encode_pub(topic, payload, rid, codec, retain)
            == pack_header(0x12, flags, codec, len(meta), rid, len(payload)) + meta + payload
        )
        msg_meta = (9).to_bytes(4, "big") + meta
        frame = pack_header(0x13, flags, codec, len(msg_meta), rid, len(payload)) + msg_meta
        assert encode_msg(rid, 9, meta, payload, codec, flags) == frame + payload
        assert msg_head(rid, 9, meta, len(payload), codec, flags) + payload == frame + payload


def test_message_built_by_its_slots_is_the_dataclass() -> None:
    m = _message("t.x", {"v": 1}, True, False)
    assert m == Message("t.x", {"v": 1}, True, False)
    assert hash(_message("t", 1, False, True)) == hash(Message("t", 1, False, True))
    with pytest.raises(AttributeError):
        m.topic = "other"  # type: ignore[misc]


def test_route_cache_follows_subscriptions() -> None:
    broker = Broker()
    a, b = RawPeer(), RawPeer()
    broker.subscribe(a, 1, "t.>", {})
    assert broker.publish("t.x", b"1") == 1
    broker.subscribe(b, 5, "t.x", {})  # after the topic's route was cached
    assert broker.publish("t.x", b"2") == 2
    broker.unsubscribe(a, 1)
    assert broker.publish("t.x", b"3") == 1
    assert [m.payload for m in a.msgs()] == [b"1", b"2"]
    assert [(m.sid, m.payload) for m in b.msgs()] == [(5, b"2"), (5, b"3")]
    broker.peer_gone(b)
    assert broker.publish("t.x", b"4") == 0


def test_one_frame_per_subscription_id_and_groups_still_take_turns() -> None:
    broker = Broker()
    peers = [RawPeer() for _ in range(4)]
    for i, p in enumerate(peers[:3]):
        broker.subscribe(p, 1 if i < 2 else 7, "f.>", {})  # two share id 1, one has id 7
    g1, g2 = RawPeer(), RawPeer()
    broker.subscribe(g1, 1, "f.>", {"group": "w"})
    broker.subscribe(g2, 1, "f.>", {"group": "w"})
    broker.subscribe(peers[3], 2, "f.x", {"qos": 1})  # not on the QoS 0 path
    for i in range(4):
        broker.publish("f.x", str(i).encode())
    for p in peers[:2]:
        assert [(m.sid, m.payload) for m in p.msgs()] == [(1, str(i).encode()) for i in range(4)]
    assert [m.sid for m in peers[2].msgs()] == [7] * 4
    assert [m.delivery_id > 0 for m in peers[3].msgs()] == [True] * 4
    assert len(g1.msgs()) == len(g2.msgs()) == 2
    assert broker.stats()["delivered"] == 4 * 4 + 4


def test_queued_messages_flush_as_the_same_frames_in_chunks() -> None:
    broker = Broker()
    broker.publish("q.kept", b"retained", 1, True)
    slow = RawPeer()
    slow.can_write = False
    sub = broker.subscribe(slow, 3, "q.>", {})
    assert broker.deliver_retained(sub) == 1  # queued first, with the RETAINED flag
    sent: list[tuple[str, bytes, int, bool]] = [("q.kept", b"retained", 1, True)]
    for i in range(3000):  # runs of one topic and size, then changes of topic, size, codec
        topic = "q.a" if i % 700 < 400 else "q.bb"
        payload = b"p" * (10 if i % 500 < 250 else 300)
        codec = 0 if i % 900 == 5 else 1
        broker.publish(topic, payload, codec)
        sent.append((topic, payload, codec, False))
    stats = broker.stats()
    assert stats["pending"] == 3001 and slow.data == b""
    slow.can_write = True
    broker.peer_writable(slow)
    got = slow.msgs()
    assert [(m.topic, m.payload, m.codec, m.retained) for m in got] == sent
    assert {m.sid for m in got} == {3} and {m.delivery_id for m in got} == {0}
    assert slow.writes > 1  # in chunks, not one piece
    stats = broker.stats()
    assert stats["pending"] == stats["pending_bytes"] == stats["held_bytes"] == 0
    assert stats["delivered"] == 3001


def test_flush_stops_when_the_peer_is_full_and_goes_on_later() -> None:
    broker = Broker()
    slow = RawPeer()
    slow.can_write = False
    broker.subscribe(slow, 1, "q", {})
    for i in range(2000):
        broker.publish("q", b"%05d" % i + b"x" * 59)

    state = {"left": 3}  # writable for three chunks

    def writable() -> bool:
        state["left"] -= 1
        return state["left"] >= 0

    slow.writable = writable  # type: ignore[method-assign]
    broker.peer_writable(slow)
    first = slow.msgs()
    assert 0 < len(first) < 2000
    held = broker.stats()["held_bytes"]
    assert held == (2000 - len(first)) * (64 + 1 + QUEUED_OVERHEAD)
    slow.writable = lambda: True  # type: ignore[method-assign]
    broker.peer_writable(slow)
    assert [m.payload[:5] for m in slow.msgs()] == [b"%05d" % i for i in range(2000)]


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with Server(Service(), tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"], broker=True) as srv:
        yield srv


def test_direct_callback_gets_everything_and_skips_the_undecodable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    channel: Any = SimpleNamespace(
        client=SimpleNamespace(registry=Registry([])),
        routes={},
        on_reconnect=[],
        on_close=[],
        stream=None,
        state={},
        send_soon=lambda frame: True,
    )
    state = _AsyncState.of(channel)
    got: list[Message] = []
    sub = Subscription(channel, "d.>", {}, got.append, 100)  # a builtin: not a plain function
    sub.sid = 4
    state.subscriptions[4] = sub
    got_plain: list[Message] = []

    def on(m: Message) -> None:
        got_plain.append(m)

    plain = Subscription(channel, "d.>", {}, on, 100)
    plain.sid = 5
    state.subscriptions[5] = plain
    msgpack_one = CODECS[1].encode({"n": 1})
    with caplog.at_level(logging.WARNING, "sockstack.client"):
        for sid in (4, 5, 6):  # 6: unsubscribed meanwhile
            state.on_msg(Msg(0, sid, "d.1", msgpack_one, 1))
            state.on_msg(Msg(0, sid, "d.bad", b"\xc1", 1))  # not msgpack
            state.on_msg(Msg(0, sid, "d.unknown", b"x", 9))  # no such codec
            state.on_msg(Msg(0, sid, "d.2", b"raw", 0, True, False))
    for received, s in ((got, sub), (got_plain, plain)):
        assert received == [
            Message("d.1", {"n": 1}),
            Message("d.2", b"raw", retained=True),
        ]
        assert s.received == 2
    assert sum("not decodable" in r.getMessage() for r in caplog.records) == 4


async def test_async_publish_many_is_publish_per_value(server: Server) -> None:
    url = str(server.endpoint("tcp"))
    values: list[Any] = [{"i": i, "pad": "x" * (i % 300)} for i in range(3000)]
    async with AsyncClient(url) as sub_c, AsyncClient(url) as pub_c:
        sub = await sub_c.subscribe("m.>", max_pending=10_000)
        assert await pub_c.publish_many("m.x", values) == 3000
        assert await pub_c.publish_many("m.x", iter([1, 2])) == 2
        assert await pub_c.publish_many("m.x", []) == 0
        with pytest.raises(TopicError):
            await pub_c.publish_many("m.*", [1])
        with pytest.raises(CodecError):
            await pub_c.publish_many("m.x", [object()])
        got = [await sub.get(timeout(5)) for _ in range(3002)]
        assert [m.value for m in got] == [*values, 1, 2]
        assert {m.topic for m in got} == {"m.x"}


async def test_publish_many_within_a_small_server_frame_limit_and_over_udp() -> None:
    limits = ServerLimits(stream=StreamLimits(max_frame=1024))
    async with Server(
        Service(), tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"], broker=True, limits=limits
    ) as srv:
        url = str(srv.endpoint("tcp"))
        async with (
            AsyncClient(url) as sub_c,
            AsyncClient(url) as pub_c,
            AsyncClient(str(srv.endpoint("udp"))) as udp_c,
        ):
            sub = await sub_c.subscribe("s.>")
            values = [b"v" * 300 for _ in range(20)]  # 20 x ~320 B: batches above 1 KiB
            assert await pub_c.publish_many("s.x", values) == 20
            assert [(await sub.get(timeout(5))).value for _ in range(20)] == values
            assert await udp_c.publish_many("s.u", ["a", "b"]) == 2
            assert {(await sub.get(timeout(5))).value for _ in range(2)} == {"a", "b"}

            def blocking() -> list[Any]:
                with connect(url, timeout=timeout(5)) as c:
                    assert c.publish_many("s.b", [b"w" * 300] * 10) == 10
                    return []

            await asyncio.to_thread(blocking)
            assert [(await sub.get(timeout(5))).value for _ in range(10)] == [b"w" * 300] * 10


async def test_blocking_publish_many_is_publish_per_value(server: Server) -> None:
    url = str(server.endpoint("tcp"))
    values: list[Any] = [[i, "y" * (i % 200)] for i in range(2500)]

    def scenario() -> list[Any]:
        with connect(url, timeout=timeout(5)) as sub_c, connect(url, timeout=timeout(5)) as pub_c:
            sub = sub_c.subscribe("b.>")
            assert pub_c.publish_many("b.x", values) == 2500
            with pytest.raises(TopicError):
                pub_c.publish_many("b. x", [1])
            pub_c.publish("b.y", "after")
            return [sub.get().value for _ in range(2501)]

    assert await asyncio.to_thread(scenario) == [*values, "after"]


def test_fast_msg_meta_cache_gives_what_decoding_gives() -> None:
    from sockstack.pubsub.messages import _MSG_METAS, _fast_msg

    def parse(frame: bytes) -> Msg | None:
        meta_len = int.from_bytes(frame[6:8], "big")
        rid = int.from_bytes(frame[8:12], "big")
        body = 16 + meta_len
        return _fast_msg(frame, 16, body, len(frame), frame[4], frame[5], rid)

    long_topic = ("x" * 300 + ".y").encode()  # longer than the broker allows: not cached
    for _ in range(2):  # the second time from the cache
        for sid, topic, flags in [
            (1, b"a.b", 0),
            (2, b"a.b", FLAG_RETAIN),
            (1, "\u00e9.t".encode(), 0x08),
            (3, long_topic, 0),
        ]:
            m = parse(encode_msg(5, sid, topic, b"pay", 1, flags))
            assert m == Msg(5, sid, topic.decode(), b"pay", 1, bool(flags & 4), bool(flags & 8))
        assert parse(encode_msg(0, 1, b"\xff\xfe", b"p", 1)) is None  # not UTF-8: general path
    assert len(_MSG_METAS) <= 4096
    assert all(len(k) <= 260 for k in _MSG_METAS)
