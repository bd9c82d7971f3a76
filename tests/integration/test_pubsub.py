"""Publish/subscribe over real loopback sockets: fan-out, queue groups, QoS 1, retained
messages, slow consumers, bad input, broker restart."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from sockstack import AsyncClient, ErrorCode, RemoteError, Server, connect
from sockstack.protocol.frames import FrameDecoder
from sockstack.protocol.messages import (
    CORE_MESSAGES,
    Close,
    Error,
    Hello,
    Response,
    decode_message,
    encode_hello,
)
from sockstack.protocol.registry import Registry
from sockstack.pubsub import Broker, BrokerLimits
from sockstack.pubsub.messages import PUBSUB_MESSAGES, Msg, encode_ack, encode_pub, encode_sub
from sockstack.rpc.service import Service
from sockstack.transport.urls import Endpoint
from tests.conftest import timeout

REGISTRY = Registry([CORE_MESSAGES, PUBSUB_MESSAGES])


async def eventually(cond: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait, bounded, for a condition the test cannot be told about by an event."""
    async with asyncio.timeout(timeout(seconds)):
        while not cond():
            await asyncio.sleep(0.01)


@pytest.fixture
async def broker_server() -> AsyncIterator[Server]:
    broker = Broker(BrokerLimits(ack_wait=0.2, max_deliveries=3))
    async with Server(Service(), tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"], broker=broker) as srv:
        yield srv


def tcp(server: Server) -> str:
    return str(server.endpoint("tcp"))


async def test_fan_out_to_ten_subscribers_loses_nothing_at_qos1(broker_server: Server) -> None:
    url = tcp(broker_server)
    subscribers = [AsyncClient(url, timeout=timeout(10)) for _ in range(10)]
    for c in subscribers:
        await c.connect()
    try:
        subs = [await c.subscribe("fan.>", qos=1) for c in subscribers]
        async with AsyncClient(url, timeout=timeout(10)) as pub:
            for i in range(500):
                await pub.publish(f"fan.{i % 7}", i, qos=1)
        for sub in subs:
            got = [(await sub.get(timeout(10))).value for _ in range(500)]
            assert got == list(range(500))  # everything, once, in order
        stats = broker_server.broker.stats()  # type: ignore[union-attr]
        assert stats["delivered"] == 5000 and stats["dropped"] == 0
        await eventually(lambda: broker_server.broker.stats()["inflight"] == 0)  # type: ignore[union-attr]
    finally:
        for c in subscribers:
            await c.close()


async def test_queue_group_balances(broker_server: Server) -> None:
    """Each message goes to one member of the group, in turn: 300 messages, 100 each, every
    third one; a subscriber outside the group gets them all."""
    url = tcp(broker_server)
    async with AsyncClient(url) as a, AsyncClient(url) as b, AsyncClient(url) as c:
        members = [await x.subscribe("jobs.*", group="workers") for x in (a, b, c)]
        everyone = await a.subscribe("jobs.*")  # not in the group: gets every message
        async with AsyncClient(url) as pub:
            for i in range(300):
                await pub.publish("jobs.new", i, qos=1)
            for i in range(300, 303):  # one marker more per member: what came before is all
                await pub.publish("jobs.end", i, qos=1)
        received: list[list[int]] = []
        for m in members:
            values: list[int] = []
            for _ in range(302):  # bounded: 100 messages and a marker expected
                values.append((await m.get(timeout(5))).value)
                if values[-1] >= 300:
                    break
            received.append(values)
        shares = [len(v) - 1 for v in received]
        assert shares == [100, 100, 100]
        assert sorted(v for values in received for v in values[:-1]) == list(range(300))
        for values in received:  # in turn: each member got one residue class, the marker too
            assert len({v % 3 for v in values}) == 1, values[:10]
        assert [(await everyone.get(timeout(5))).value for _ in range(303)] == list(range(303))


async def test_retained_message_is_delivered_on_subscribe(broker_server: Server) -> None:
    url = tcp(broker_server)
    broker = broker_server.broker
    assert broker is not None

    async def first(sub: Any) -> tuple[str, Any, bool]:
        msg = await sub.get(timeout(5))
        return (msg.topic, msg.value, msg.retained)

    async with AsyncClient(url) as pub, AsyncClient(url) as sub_c:
        await pub.publish("home.door", "open", retain=True, qos=1)
        await pub.publish("home.door", "closed", retain=True, qos=1)  # the last one is kept
        await pub.publish("home.light", "on", qos=1)  # not retained
        sub = await sub_c.subscribe("home.*")
        assert await first(sub) == ("home.door", "closed", True)
        await pub.publish("home.light", "off", qos=1)
        # Retained messages come right after the SUB's answer: the next one is live, so
        # "home.light" "on" was not retained.
        assert await first(sub) == ("home.light", "off", False)
        assert set(broker.retained) == {"home.door"}
        # A msgpack b"" is a payload (c4 00), not an empty message: it is retained.
        await pub.publish("home.door", b"", retain=True, qos=1)
        assert await first(sub) == ("home.door", b"", False)  # live to those subscribed
        late = await sub_c.subscribe("home.door")
        assert await first(late) == ("home.door", b"", True)  # retained for those who come
        # clear_retained (an empty RETAIN publish) clears the topic's retained message, and is
        # not a message (PROTOCOL.md §4.1): those subscribed get nothing for it, so what they
        # get next is the live marker published after it.
        await pub.clear_retained("home.door")
        assert broker.retained == {}
        await pub.publish("home.door", "marker", qos=1)  # not retained
        assert await first(sub) == ("home.door", "marker", False)
        assert await first(late) == ("home.door", "marker", False)
        # A raw client's empty value with retain=True is the same clear (the wire cannot tell).
        await pub.publish("home.door", "again", retain=True, qos=1)
        assert await first(sub) == ("home.door", "again", False)
        async with AsyncClient(url, codec="raw") as raw:
            await raw.publish("home.door", b"", retain=True, qos=1)
        assert broker.retained == {}
        await pub.publish("home.door", "marker 2", qos=1)
        assert await first(sub) == ("home.door", "marker 2", False)
        after = await sub_c.subscribe("home.*")
        await pub.publish("home.light", "dim", qos=1)
        assert await first(after) == ("home.light", "dim", False)  # nothing retained came first


async def test_qos1_redelivers_until_acked(broker_server: Server) -> None:
    """A raw subscriber that does not ACK gets the message again (REDELIVERED), until it acks;
    a publish returns only once the broker has accepted it."""
    ep = broker_server.endpoint("tcp")
    reader, writer = await asyncio.open_connection(ep.host, ep.port)
    dec = FrameDecoder()
    inbox: asyncio.Queue[Any] = asyncio.Queue()

    async def pump() -> None:
        while chunk := await reader.read(65536):
            for f in dec.feed(chunk):
                inbox.put_nowait(decode_message(f, REGISTRY))

    task = asyncio.ensure_future(pump())
    try:
        writer.write(encode_hello(Hello()) + encode_sub(5, "q.>", {"qos": 1}))
        await asyncio.wait_for(inbox.get(), timeout(5))  # WELCOME
        assert await asyncio.wait_for(inbox.get(), timeout(5)) == Response(5, None, 1)
        async with AsyncClient(str(ep)) as pub:
            await pub.publish("q.x", 42, qos=1)
        first = await asyncio.wait_for(inbox.get(), timeout(5))
        assert isinstance(first, Msg) and first.delivery_id and not first.redelivered
        again = await asyncio.wait_for(inbox.get(), timeout(5))  # ack_wait 0.2 s, tick 1 s
        assert isinstance(again, Msg) and again.redelivered
        assert again.delivery_id == first.delivery_id
        writer.write(encode_ack(first.delivery_id))
        await eventually(lambda: broker_server.broker.stats()["inflight"] == 0)  # type: ignore[union-attr]
        writer.write(encode_ack(first.delivery_id))  # a second ACK: unknown by now
        err = await asyncio.wait_for(inbox.get(), timeout(5))
        assert isinstance(err, Error) and err.code == ErrorCode.UNKNOWN_DELIVERY
    finally:
        task.cancel()
        writer.close()


async def test_bad_input_gets_clear_errors_and_others_are_unaffected(
    broker_server: Server,
) -> None:
    url = tcp(broker_server)
    async with AsyncClient(url) as good, AsyncClient(url) as bad:
        watch = await good.subscribe("ok.>")
        with pytest.raises(ValueError, match="wildcards"):
            await bad.publish("ok.*", 1)  # refused locally
        with pytest.raises(RemoteError) as info:
            await bad.subscribe("ok..bad")
        assert info.value.code == ErrorCode.BAD_TOPIC
        with pytest.raises(RemoteError) as info:
            await bad.subscribe("ok.>", policy="explode")
        assert info.value.code == ErrorCode.DECODE_ERROR
        with pytest.raises(RemoteError) as info:
            await bad.publish("ok.big", b"x" * 1_000_100, qos=1)  # under the frame limit
        assert info.value.code == ErrorCode.PAYLOAD_TOO_LARGE
        # Raw frames the clients would refuse to send: wildcard publish, unknown ack.
        ep = broker_server.endpoint("tcp")
        reader, writer = await asyncio.open_connection(ep.host, ep.port)
        writer.write(
            encode_hello(Hello())
            + encode_pub("ok.*", b"\x01", 3)
            + encode_ack(999)
            + encode_pub("ok.fine", b"\x07", 4)
        )
        dec = FrameDecoder()
        got: list[Any] = []
        async with asyncio.timeout(timeout(5)):
            while len(got) < 4:
                got += [decode_message(f, REGISTRY) for f in dec.feed(await reader.read(65536))]
        writer.close()
        codes = [
            (type(m).__name__, getattr(m, "code", None), getattr(m, "request_id", None))
            for m in got[1:]
        ]
        assert codes == [
            ("Error", ErrorCode.BAD_TOPIC, 3),
            ("Error", ErrorCode.UNKNOWN_DELIVERY, 0),  # an ACK is not a request: id 0
            ("Response", None, 4),
        ]
        msg = await watch.get(timeout(5))
        assert (msg.topic, msg.value) == ("ok.fine", 7)  # the bystander is served throughout


async def _raw_subscriber(ep: Endpoint, options: dict[str, Any]) -> tuple[socket.socket, int]:
    """A subscriber that will not read: tiny receive buffer, blocking socket left alone."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((ep.host, ep.port))
    sock.sendall(encode_hello(Hello()) + encode_sub(1, "flood.>", options))
    sock.settimeout(timeout(5))
    dec = FrameDecoder()
    seen: list[Any] = []
    while not any(isinstance(m, Response) for m in seen):
        seen += [decode_message(f, REGISTRY) for f in dec.feed(sock.recv(4096))]
    return sock, 1


def _read_until_close(sock: socket.socket) -> list[Any]:
    """What the server sends until its CLOSE, or the end of the connection (bounded)."""
    sock.settimeout(timeout(5))
    dec = FrameDecoder()
    msgs: list[Any] = []
    try:
        while not any(isinstance(m, Close) for m in msgs):
            data = sock.recv(65536)
            if not data:
                break
            msgs += [decode_message(f, REGISTRY) for f in dec.feed(data)]
    except (ConnectionError, TimeoutError):
        pass  # the caller asserts what arrived
    return msgs


@pytest.mark.parametrize("policy", ["drop-oldest", "drop-newest", "disconnect"])
async def test_slow_consumer_policies_bound_memory(broker_server: Server, policy: str) -> None:
    ep = broker_server.endpoint("tcp")
    broker = broker_server.broker
    assert broker is not None
    slow, _ = await asyncio.to_thread(
        lambda: asyncio.run(_raw_subscriber(ep, {"policy": policy, "max_msgs": 50}))
    )
    slow_reader: asyncio.Future[list[Any]] | None = None
    try:
        async with (
            AsyncClient(tcp(broker_server)) as fast_c,
            AsyncClient(tcp(broker_server)) as pub,
        ):
            fast = await fast_c.subscribe("flood.>", max_pending=10_000)
            payload = b"p" * 1000
            for i in range(3000):  # ~3 MB towards a subscriber that reads nothing
                await pub.publish("flood.x", [i, payload])
                if i % 100 == 99:
                    # A round trip on the publisher's connection: the broker has routed (and
                    # written or queued) every message published before it.
                    await pub.ping(timeout(5))
                    if slow_reader is None and broker.stats()["slow_consumers_disconnected"]:
                        # Disconnected: its CLOSE is on its way; read it now, before the
                        # server cuts off a subscriber that still does not read.
                        slow_reader = asyncio.ensure_future(
                            asyncio.to_thread(_read_until_close, slow)
                        )
            # The fast subscriber is not slowed by the slow one: it gets all 3000.
            got = [(await fast.get(timeout(10))).value[0] for _ in range(3000)]
            assert got == list(range(3000))
            stats = broker.stats()
            slow_subs = [s for s in stats["slow"] if s["pattern"] == "flood.>"]
            if policy == "disconnect":
                assert stats["slow_consumers_disconnected"] == 1
                assert not slow_subs
            else:
                (s,) = slow_subs
                assert s["pending"] <= 50 and s["pending_bytes"] <= 50 * 1100
                # Every message is accounted for: written (into kernel buffers that the reader
                # never empties), waiting in the bounded queue, or dropped and counted.
                assert s["delivered"] + s["pending"] + s["dropped"] == 3000
                assert s["dropped"] > 0 and stats["dropped"] == s["dropped"]
            stream_buffers = [
                st.transport.get_write_buffer_size()
                for st in broker_server._streams
                if st.transport is not None
            ]
            assert max(stream_buffers) <= 1 << 20  # bounded: no unbounded queue anywhere
        if policy == "disconnect":
            assert slow_reader is not None
            msgs = await asyncio.wait_for(slow_reader, timeout(10))
            closes = [m for m in msgs if isinstance(m, Close)]
            assert closes and closes[-1].code == ErrorCode.SLOW_CONSUMER
        else:
            assert slow_reader is None
    finally:
        slow.close()


async def test_udp_publish_reaches_tcp_subscribers(broker_server: Server) -> None:
    async with (
        AsyncClient(tcp(broker_server)) as c,
        AsyncClient(str(broker_server.endpoint("udp"))) as u,
    ):
        sub = await c.subscribe("u.>")
        await u.publish("u.1", "over udp")
        msg = await sub.get(timeout(5))
        assert (msg.topic, msg.value) == ("u.1", "over udp")


async def test_blocking_client_publish_and_subscribe(broker_server: Server) -> None:
    url = tcp(broker_server)

    def scenario() -> list[Any]:
        with connect(url, timeout=timeout(5)) as sub_c, connect(url, timeout=timeout(5)) as pub_c:
            sub = sub_c.subscribe("b.>", qos=1)
            pub_c.publish("b.1", "one", qos=1)
            pub_c.publish("b.2", {"two": 2})
            first, second = sub.get(), sub.get()
            assert sub_c.call("broker.stats")["subscriptions"] >= 1  # RPC on the same client
            return [(first.topic, first.value), (second.topic, second.value)]

    assert await asyncio.to_thread(scenario) == [("b.1", "one"), ("b.2", {"two": 2})]


async def test_broker_restart_subscribers_resubscribe_on_their_own() -> None:
    first = Server(Service(), tcp=["127.0.0.1:0"], broker=True)
    await first.start()
    ep = first.endpoint("tcp")
    async with AsyncClient(str(ep), timeout=timeout(5)) as c:
        sub = await c.subscribe("r.>")
        await first.shutdown()
        second = Server(Service(), tcp=[f"127.0.0.1:{ep.port}"], broker=True)
        await second.start()
        try:
            broker = second.broker
            assert broker is not None
            await eventually(lambda: broker.stats()["subscriptions"] == 1, 10)
            async with AsyncClient(str(ep)) as pub:
                await pub.publish("r.after", "restart", qos=1)
            msg = await sub.get(timeout(5))
            assert (msg.topic, msg.value) == ("r.after", "restart")
        finally:
            await second.shutdown()
