"""docs/PROTOCOL.md §4.1 as another implementation would read it, over real loopback sockets:
the codec byte of each pub/sub type, the codec of the answers, "options may be empty", the QoS
of a delivery, delivery ids and the refusal of a bad ACK, clearing a retained topic, and the
broker's own codes for a full subscription table and a full retained store.

The raw-socket tests send the documented vectors (§8) and compare what comes back byte for byte
with the documented answers."""

from __future__ import annotations

import asyncio
import logging
import re
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sockstack import AsyncClient, ErrorCode, RemoteError, Server, connect
from sockstack.protocol.codecs import MSGPACK
from sockstack.protocol.frames import FrameDecoder, encode_frame
from sockstack.protocol.messages import (
    CORE_MESSAGES,
    Error,
    Hello,
    Request,
    Welcome,
    decode_message,
    encode_error,
    encode_hello,
    encode_response,
    encode_welcome,
)
from sockstack.protocol.registry import Registry
from sockstack.pubsub import Broker, BrokerLimits
from sockstack.pubsub.messages import (
    FLAG_RETAIN,
    PUBSUB_MESSAGES,
    Msg,
    PubSubType,
    encode_ack,
    encode_pub,
    encode_sub,
    encode_unsub,
)
from tests.conftest import Probe, timeout

REGISTRY = Registry([CORE_MESSAGES, PUBSUB_MESSAGES])
DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
_HEADER = struct.Struct(">2sBBBBHII")


def vectors() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name, block in re.findall(r"```hex name=(\S+)\n(.*?)```", DOC.read_text(), flags=re.S):
        out[name] = bytes.fromhex(" ".join(line.split("#", 1)[0] for line in block.splitlines()))
    return out


V = vectors()


class RawPeer:
    """A client written from the spec: it sends exactly the bytes it is given and returns
    every frame it receives whole, as bytes (and decoded)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buf = b""

    @classmethod
    async def open(cls, server: Server) -> RawPeer:
        ep = server.endpoint("tcp")
        reader, writer = await asyncio.open_connection(ep.host, ep.port)
        peer = cls(reader, writer)
        peer.send(encode_hello(Hello(agent="spec")))
        welcome = await peer.frame()
        assert welcome[3] == 0x02  # WELCOME
        return peer

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def frame(self) -> bytes:
        async with asyncio.timeout(timeout(5)):
            while True:
                if len(self.buf) >= 16:
                    *_, meta_len, _, body_len = _HEADER.unpack_from(self.buf)
                    end = 16 + meta_len + body_len
                    if len(self.buf) >= end:
                        frame, self.buf = self.buf[:end], self.buf[end:]
                        return frame
                chunk = await self.reader.read(65536)
                assert chunk, "the broker closed the connection"
                self.buf += chunk

    async def message(self) -> Any:
        (frame,) = FrameDecoder().feed(await self.frame())
        return decode_message(frame, REGISTRY)

    async def answer(self, data: bytes) -> bytes:
        self.send(data)
        return await self.frame()

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def broker_server() -> AsyncIterator[Server]:
    async with Server(Probe(), tcp=["127.0.0.1:0"], broker=Broker()) as srv:
        yield srv


def tcp(server: Server) -> str:
    return str(server.endpoint("tcp"))


def response(rid: int, codec: int, body: bytes) -> bytes:
    return encode_frame(0x04, rid, b"", body, 0, codec)


# ------------------------------------------------------------------ the documented bytes


async def test_documented_requests_get_the_documented_answers(broker_server: Server) -> None:
    """§4.1 "Answers": each in the request's codec. The vectors sent as they are get exactly the
    documented answers: msgpack c0, JSON null, raw with no body; a bad ACK gets ERROR
    UNKNOWN_DELIVERY with request id 0 (vector error-unknown-delivery)."""
    sub = await RawPeer.open(broker_server)
    pub = await RawPeer.open(broker_server)
    try:
        assert await sub.answer(V["sub"]) == V["response-nil-msgpack"]
        assert await sub.answer(V["sub-json"]) == response(8, 2, b"null")
        assert await sub.answer(V["sub-no-options"]) == V["response-nil-raw"]
        assert await pub.answer(V["pub-json"]) == V["response-nil-json"]
        live = await sub.message()  # sub-no-options: "a.b", QoS 0, as published (JSON)
        assert live == Msg(0, 9, "a.b", b"21.5", 2, False, False)
        assert await pub.answer(V["pub"]) == response(9, 1, b"\xc0")  # RETAIN, msgpack
        assert await sub.message() == Msg(0, 9, "a.b", V["pub"][-9:], 1, False, False)
        assert await pub.answer(V["pub-clear"]) == response(11, 0, b"")
        assert broker_server.broker is not None and broker_server.broker.retained == {}
        assert await pub.answer(V["ack"]) == V["error-unknown-delivery"]  # nothing delivered
        # The clear was delivered to no one: the next thing the subscriber gets is this marker.
        pub.send(encode_pub("a.b", b"m", 0, 0))
        assert await sub.message() == Msg(0, 9, "a.b", b"m", 0, False, False)
        assert await sub.answer(V["unsub"]) == response(7, 0, b"")
    finally:
        sub.close()
        pub.close()


async def test_json_options_are_honoured_and_both_ack_and_unsub_codecs_work(
    broker_server: Server,
) -> None:
    """§4.1: SUB options in JSON (codec 2) take effect (here QoS 1); UNSUB and ACK with codec 0
    (sent now) and codec 1 (older peers) both work; a QoS 0 publish is delivered at the
    subscription's QoS 1 (a delivery id to ACK)."""
    broker = broker_server.broker
    assert broker is not None
    sub = await RawPeer.open(broker_server)
    pub = await RawPeer.open(broker_server)
    try:
        assert await sub.answer(V["sub-json"]) == response(8, 2, b"null")  # sensors.>, qos 1
        assert await sub.answer(V["sub"]) == V["response-nil-msgpack"]  # sensors.>, qos 1 too
        pub.send(encode_pub("sensors.t", b"\x15", 0, 1))  # QoS 0 publish
        got = sorted([await sub.message(), await sub.message()], key=lambda m: m.sid)
        assert [(m.sid, m.payload) for m in got] == [(7, b"\x15"), (8, b"\x15")]
        assert all(m.delivery_id for m in got)  # delivered at the subscriptions' QoS 1
        assert got[0].delivery_id != got[1].delivery_id
        old_ack = bytearray(encode_ack(got[0].delivery_id))
        old_ack[5] = 1  # the codec byte older peers sent
        sub.send(bytes(old_ack) + encode_ack(got[1].delivery_id))
        old_unsub = bytearray(encode_unsub(7))
        old_unsub[5] = 1
        # Both ACKs were taken (no ERROR came before these answers), and the answers to UNSUB
        # follow the UNSUB's codec: msgpack nil for the old one, no body for codec 0.
        assert await sub.answer(bytes(old_unsub)) == V["response-nil-msgpack"]
        assert await sub.answer(encode_unsub(8)) == response(8, 0, b"")
        assert broker.stats()["inflight"] == 0
        weird = encode_frame(PubSubType.UNSUB, 5, b"", b"", 0, 9)  # a codec it does not have
        assert await sub.answer(encode_sub(5, "x") + weird) == response(5, 0, b"")  # the SUB's
        assert await sub.frame() == response(5, 0, b"")  # UNSUB with codec 9: answered raw
    finally:
        sub.close()
        pub.close()


@pytest.mark.parametrize(
    ("name", "codec", "body", "answer_codec", "answer"),
    [
        ("no body, codec 0", 0, b"", 0, b""),
        ("no body, codec 1", 1, b"", 1, b"\xc0"),
        ("no body, codec 2", 2, b"", 2, b"null"),
        ("no body, a codec it does not have", 9, b"", 0, b""),
        ("empty msgpack map", 1, b"\x80", 1, b"\xc0"),
        ("empty JSON object", 2, b"{}", 2, b"null"),
    ],
)
async def test_no_options_either_way(
    broker_server: Server, name: str, codec: int, body: bytes, answer_codec: int, answer: bytes
) -> None:
    """§4.1 "No options" may be no body or an empty map; the subscription then has the
    defaults (QoS 0: deliveries carry id 0)."""
    sub = await RawPeer.open(broker_server)
    try:
        frame = encode_frame(PubSubType.SUB, 3, b"o.>", body, 0, codec)
        assert await sub.answer(frame) == response(3, answer_codec, answer)
        sub.send(encode_pub("o.1", b"\x01"))
        assert await sub.message() == Msg(0, 3, "o.1", b"\x01", 1, False, False)
    finally:
        sub.close()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (encode_frame(PubSubType.SUB, 4, b"o.>", b"\x80", 0, 0), ErrorCode.DECODE_ERROR),
        (encode_frame(PubSubType.SUB, 4, b"o.>", b"{}", 0, 7), ErrorCode.UNSUPPORTED_CODEC),
        (encode_frame(PubSubType.SUB, 4, b"o.>", b'{"qos":1}', 0, 1), ErrorCode.DECODE_ERROR),
        (encode_frame(PubSubType.SUB, 4, b"o.>", b'{"qos":true}', 0, 2), ErrorCode.DECODE_ERROR),
        (encode_frame(PubSubType.PUB, 4, b"o.1", b"x", 0, 3), ErrorCode.UNSUPPORTED_CODEC),
        (encode_pub("o.1", b"", 4, 1), ErrorCode.DECODE_ERROR),  # empty msgpack: no value
        (encode_pub("o.1", b"", 4, 2), ErrorCode.DECODE_ERROR),  # empty JSON: no value
        (encode_pub("o.1", b"", 0, 1), ErrorCode.DECODE_ERROR),  # QoS 0: refused with id 0
        # A clear (RETAIN, no body) is a PUB: a codec the broker does not have is refused first.
        (encode_frame(PubSubType.PUB, 4, b"o.1", b"", FLAG_RETAIN, 3), ErrorCode.UNSUPPORTED_CODEC),
    ],
)
async def test_what_the_codec_byte_refuses(broker_server: Server, frame: bytes, code: int) -> None:
    """§4.1 "The codec byte": options in raw or an unknown codec, options that are not what
    the codec byte says, a PUB in a codec the broker does not have, and an empty body that is
    no value are refused with the documented code; nothing reaches a subscriber."""
    rid = struct.unpack_from(">I", frame, 8)[0]
    sub = await RawPeer.open(broker_server)
    bad = await RawPeer.open(broker_server)
    try:
        assert await sub.answer(encode_sub(1, "o.>")) == response(1, 0, b"")
        (parsed,) = FrameDecoder().feed(await bad.answer(frame))
        err = decode_message(parsed, REGISTRY)
        assert isinstance(err, Error) and (err.request_id, err.code) == (rid, code)
        assert err.type == ErrorCode(code).name and err.message
        bad.send(encode_pub("o.2", b"", 0, 0))  # an empty raw value is a message: b""
        assert await sub.message() == Msg(0, 1, "o.2", b"", 0, False, False)
    finally:
        sub.close()
        bad.close()


async def test_retained_messages_go_at_the_subscriptions_qos(broker_server: Server) -> None:
    """§4.1 "QoS of a delivery": a message published at QoS 1 and retained goes to a QoS 0
    subscription with delivery id 0, and to a QoS 1 one with a delivery id, live and retained."""
    pub = await RawPeer.open(broker_server)
    sub = await RawPeer.open(broker_server)
    try:
        assert await pub.answer(encode_pub("k.v", b"\x01", 5, 1, retain=True)) == response(
            5, 1, b"\xc0"
        )
        assert await sub.answer(encode_sub(1, "k.v")) == response(1, 0, b"")
        assert await sub.message() == Msg(0, 1, "k.v", b"\x01", 1, True, False)
        assert await sub.answer(encode_sub(2, "k.v", {"qos": 1})) == response(2, 1, b"\xc0")
        retained = await sub.message()
        assert (retained.sid, retained.retained) == (2, True) and retained.delivery_id
        pub.send(encode_pub("k.v", b"\x02", 6, 1))  # QoS 1 publish, not retained
        live = sorted([await sub.message(), await sub.message()], key=lambda m: m.sid)
        assert [(m.sid, bool(m.delivery_id)) for m in live] == [(1, False), (2, True)]
        sub.send(encode_ack(retained.delivery_id) + encode_ack(live[1].delivery_id))
        assert await sub.answer(encode_unsub(2)) == response(2, 0, b"")  # no ERROR before it
    finally:
        pub.close()
        sub.close()


# ------------------------------------------------------------------ the Python clients


@pytest.mark.parametrize("codec", ["msgpack", "json", "raw"])
async def test_asyncio_client_reads_answers_in_its_codec(broker_server: Server, codec: str) -> None:
    """SUB (with and without options), QoS 1 PUB and UNSUB answered in the client's codec
    (raw: SUB options go in msgpack, the answer with them)."""
    value: Any = b"\x00v" if codec == "raw" else {"v": [1, 2]}
    async with AsyncClient(tcp(broker_server), codec=codec, timeout=timeout(5)) as c:
        plain = await c.subscribe("c.>")
        reliable = await c.subscribe("c.>", qos=1)
        await c.publish("c.1", value, qos=1)
        for sub in (plain, reliable):
            msg = await sub.get(timeout(5))
            assert (msg.topic, msg.value) == ("c.1", value)
        await plain.unsubscribe()
        await reliable.unsubscribe()
        assert await c.call("echo", b"x" if codec == "raw" else 1) in (b"x", 1)
    broker = broker_server.broker
    assert broker is not None
    assert broker.stats()["subscriptions"] == 0 and broker.stats()["inflight"] == 0


@pytest.mark.parametrize("codec", ["msgpack", "json", "raw"])
async def test_blocking_client_reads_answers_in_its_codec(
    broker_server: Server, codec: str
) -> None:
    value: Any = b"\x00v" if codec == "raw" else {"v": [1, 2]}
    url = tcp(broker_server)

    def scenario() -> list[Any]:
        with connect(url, codec=codec, timeout=timeout(5)) as c:
            plain = c.subscribe("c.>")
            reliable = c.subscribe("c.>", qos=1)
            c.publish("c.1", value, qos=1)
            got = [plain.get(timeout(5)).value, reliable.get(timeout(5)).value]
            plain.unsubscribe()
            reliable.unsubscribe()
            c.clear_retained("c.none")  # QoS 1: answered with codec 0, no body
            return got

    assert await asyncio.to_thread(scenario) == [value, value]


def blocking_clear(url: str, topic: str) -> None:
    with connect(url, timeout=timeout(5)) as c:
        c.clear_retained(topic)


async def test_clear_retained_from_both_clients(broker_server: Server) -> None:
    """clear_retained forgets the topic's retained message and delivers nothing: a subscriber
    gets the marker published after it next; a later subscriber gets nothing retained."""
    url = tcp(broker_server)
    broker = broker_server.broker
    assert broker is not None
    async with AsyncClient(url, timeout=timeout(5)) as c:
        watch = await c.subscribe("r.>")
        for clear in ("async", "blocking"):
            await c.publish("r.x", clear, qos=1, retain=True)
            assert (await watch.get(timeout(5))).value == clear
            assert set(broker.retained) == {"r.x"}
            if clear == "async":
                await c.clear_retained("r.x")
            else:
                await asyncio.to_thread(blocking_clear, url, "r.x")
            assert broker.retained == {}
            await c.publish("r.x", "marker", qos=1)
            msg = await watch.get(timeout(5))
            assert (msg.value, msg.retained) == ("marker", False)
        late = await c.subscribe("r.>")
        await c.publish("r.y", "live", qos=1)
        assert (await late.get(timeout(5))).value == "live"  # nothing retained came first
        with pytest.raises(ValueError, match="wildcards"):
            await c.clear_retained("r.*")


async def test_a_bad_ack_does_not_answer_a_pending_call_of_the_same_number(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """§4.1: delivery ids and request ids are separate; the ERROR for a bogus ACK N has request
    id 0 and never ends the client's pending call N, which gets its own answer."""
    probe = Probe()
    probe.gate, probe.entered = asyncio.Event(), asyncio.Event()
    async with (
        Server(probe, tcp=["127.0.0.1:0"], broker=True) as srv,
        AsyncClient(tcp(srv), timeout=timeout(5)) as c,
    ):
        pending = asyncio.ensure_future(c.call("wait", "k"))
        await asyncio.wait_for(probe.entered.wait(), timeout(5))
        channel = c.stream_channel("test")
        (n,) = channel.calls.pending
        with caplog.at_level(logging.WARNING, logger="sockstack.client"):
            assert channel.send_soon(encode_ack(n))  # no delivery N: the broker refuses it
            assert await c.call("echo", "after") == "after"  # the ERROR came before this
        assert not pending.done()
        assert any("UNKNOWN_DELIVERY" in r.getMessage() for r in caplog.records)
        probe.gate.set()
        assert await asyncio.wait_for(pending, timeout(5)) == 1  # its own answer


async def _old_broker() -> tuple[asyncio.Server, int, list[int]]:
    """A broker as they were before this revision: it refuses a bad ACK with ERROR
    UNKNOWN_DELIVERY carrying the delivery id. This one answers every request-like frame
    (REQUEST, SUB, PUB with an id) with such an ERROR for the same number first, then its
    RESPONSE (msgpack nil, or the REQUEST's first argument)."""
    seen: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dec = FrameDecoder()
        try:
            while chunk := await reader.read(65536):
                for f in dec.feed(chunk):
                    if f.type == 0x01:
                        writer.write(encode_welcome(Welcome(1, (1, 2, 0), 1 << 20, "old")))
                    elif f.request_id and f.type in (0x03, 0x10, 0x12):
                        seen.append(f.type)
                        m = decode_message(f, REGISTRY)
                        result = m.args[0] if isinstance(m, Request) else None
                        writer.write(
                            encode_error(f.request_id, 2011, "UNKNOWN_DELIVERY", "no delivery")
                            + encode_response(f.request_id, result)
                        )
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1], seen


async def test_clients_never_end_a_call_on_unknown_delivery_from_an_older_broker() -> None:
    """Both clients: an ERROR UNKNOWN_DELIVERY with the number of a pending call, a SUB or a
    QoS 1 PUB (what brokers before this revision sent for a bad ACK) is not its answer."""
    srv, port, seen = await _old_broker()
    url = f"tcp://127.0.0.1:{port}"
    try:
        async with AsyncClient(url, timeout=timeout(5)) as c:
            assert await c.call("echo", 41) == 41
            await c.subscribe("a.>")
            await c.publish("a.b", 1, qos=1)

        def blocking() -> Any:
            with connect(url, timeout=timeout(5)) as b:
                b.subscribe("a.>")
                b.publish("a.b", 1, qos=1)
                return b.call("echo", 42)

        assert await asyncio.to_thread(blocking) == 42
        assert seen == [0x03, 0x10, 0x12, 0x10, 0x12, 0x03]
    finally:
        srv.close()
        await srv.wait_closed()


# ------------------------------------------------------------------ the broker's own codes


async def test_too_many_subscriptions_has_its_own_code() -> None:
    broker = Broker(BrokerLimits(max_subscriptions_per_peer=2))
    async with Server(Probe(), tcp=["127.0.0.1:0"], broker=broker) as srv:
        async with AsyncClient(tcp(srv), timeout=timeout(5)) as c, AsyncClient(tcp(srv)) as d:
            await c.subscribe("a")
            await c.subscribe("b")
            with pytest.raises(RemoteError) as info:
                await c.subscribe("c")
            assert info.value.code == ErrorCode.TOO_MANY_SUBSCRIPTIONS == 2015
            assert info.value.type == "TOO_MANY_SUBSCRIPTIONS"
            assert "max_subscriptions_per_peer" in info.value.message
            await d.subscribe("c")  # per connection: another one may


async def test_retained_store_full_has_its_own_code_and_nothing_is_delivered() -> None:
    broker = Broker(BrokerLimits(max_retained=1))
    async with Server(Probe(), tcp=["127.0.0.1:0"], broker=broker) as srv:
        async with AsyncClient(tcp(srv), timeout=timeout(5)) as c:
            watch = await c.subscribe("s.>")
            await c.publish("s.a", 1, qos=1, retain=True)
            with pytest.raises(RemoteError) as info:
                await c.publish("s.b", 2, qos=1, retain=True)
            assert info.value.code == ErrorCode.RETAINED_STORE_FULL == 2016
            assert "max_retained" in info.value.message
            await c.publish("s.m", "marker", qos=1)
            got = [await watch.get(timeout(5)) for _ in range(2)]
            assert [(m.topic, m.value) for m in got] == [("s.a", 1), ("s.m", "marker")]  # no s.b
            assert set(broker.retained) == {"s.a"}
            assert broker.stats()["retained_refused"] == 1


async def test_udp_pub_datagrams_follow_the_same_codec_rules() -> None:
    """§4.1 over UDP: a PUB datagram in a codec the broker does not have, or with an empty
    msgpack body, is dropped (never answered); an empty RETAIN datagram clears without being
    delivered; the next good datagram is what the subscriber gets."""
    async with Server(Probe(), tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"], broker=True) as srv:
        broker = srv.broker
        assert broker is not None
        udp = srv.endpoint("udp")
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=(udp.host, udp.port)
        )
        try:
            async with AsyncClient(tcp(srv), timeout=timeout(5)) as c:
                watch = await c.subscribe("u.>")
                await c.publish("u.kept", "old", qos=1, retain=True)
                assert (await watch.get(timeout(5))).value == "old"
                transport.sendto(encode_frame(PubSubType.PUB, 0, b"u.a", b"\x01", 0, 3))
                transport.sendto(encode_pub("u.b", b"", 0, 1))
                transport.sendto(encode_pub("u.kept", b"", 0, 0, retain=True))  # a clear
                transport.sendto(encode_pub("u.c", b"\x07", 0, 1))
                msg = await watch.get(timeout(5))
                assert (msg.topic, msg.value) == ("u.c", 7)  # nothing of the three before it
                assert broker.retained == {}
        finally:
            transport.close()


async def test_sub_options_go_in_msgpack_whatever_the_client_codec() -> None:
    """Brokers before this version decode SUB options as msgpack only: a JSON client keeps
    working with them because its options (and so the SUB's answer) go in msgpack."""
    seen: list[tuple[int, Any]] = []
    done = asyncio.Event()

    async def old_broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        writer.write(encode_welcome(Welcome()))
        while not done.is_set():
            data = await reader.read(65536)
            if not data:
                break
            for frame in decoder.feed(data):
                if frame.type == PubSubType.SUB:
                    seen.append((frame.codec, msgpack_decode(frame.body)))
                    writer.write(encode_response(frame.request_id, None))
                    done.set()
        writer.close()

    srv = await asyncio.start_server(old_broker, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        async with AsyncClient(f"tcp://127.0.0.1:{port}", codec="json", timeout=timeout(5)) as c:
            await c.subscribe("a.>", qos=1)
        await asyncio.wait_for(done.wait(), timeout(5))
    finally:
        srv.close()
        await srv.wait_closed()
    assert seen == [(1, {"qos": 1})]


def msgpack_decode(body: bytes) -> Any:
    return MSGPACK.decode(body)


@pytest.mark.parametrize("codec", [0, 1, 2])
async def test_a_clear_in_codec_0_1_or_2(broker_server: Server, codec: int) -> None:
    """§4.1: a RETAIN PUB with no body clears the topic in codec 0, 1 or 2 (0 recommended);
    a QoS 1 clear is answered in its codec."""
    broker = broker_server.broker
    assert broker is not None
    pub = await RawPeer.open(broker_server)
    try:
        assert await pub.answer(encode_pub("k.c", b"\x01", 5, 1, retain=True)) == response(
            5, 1, b"\xc0"
        )
        assert "k.c" in broker.retained
        clear = encode_frame(PubSubType.PUB, 6, b"k.c", b"", FLAG_RETAIN, codec)
        assert await pub.answer(clear) == response(
            6, codec, {0: b"", 1: b"\xc0", 2: b"null"}[codec]
        )
        assert "k.c" not in broker.retained
    finally:
        pub.close()
