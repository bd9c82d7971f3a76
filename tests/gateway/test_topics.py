"""``/topics`` over real loopback HTTP: publishing (as TCP subscribers see it), Server-Sent
Events from every transport, replay with ``Last-Event-ID`` and its gap, slow readers under the
broker's policies with bounded memory, keep-alive, disconnect and drain (docs/HTTP.md,
"Publish/subscribe"); and the broker's local subscribers that the streams are made of."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import sys
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sockstack import AsyncClient, Server, ServerLimits
from sockstack.demo import Demo
from sockstack.gateway import topics as topics_module
from sockstack.gateway.pattern import Gateway
from sockstack.gateway.topics import (
    RING_OVERHEAD,
    SUBJECT_PATTERN,
    TOPIC_PATTERN,
    Topics,
    TopicsLimits,
    configure,
    openapi_paths,
)
from sockstack.pubsub import Broker, BrokerError, BrokerLimits
from sockstack.pubsub.broker import QUEUED_OVERHEAD, Subscription
from sockstack.pubsub.messages import FLAG_RETAIN
from sockstack.pubsub.topics import TopicError, validate_pattern, validate_topic
from tests.conftest import timeout
from tests.gateway.support import arequest

# ---------------------------------------------------------------------------- helpers


async def eventually(cond: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait, bounded, for a condition the test cannot be told about by an event."""
    async with asyncio.timeout(timeout(seconds)):
        while not cond():
            await asyncio.sleep(0.01)


@dataclass
class Event:
    event: str = "message"
    id: str | None = None
    data: str = ""
    comment: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class Sse:
    """A Server-Sent Events client on a raw loopback socket: the request written as bytes, the
    chunked response read incrementally, each read bounded by a timeout."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int
    headers: dict[str, str]
    body: bytes = b""  # a response that is not a stream (an error), whole
    text: str = ""  # event-stream text read but not parsed yet
    ended: bool = False

    @classmethod
    async def open(cls, port: int, path: str, headers: dict[str, str] | None = None) -> Sse:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
        for k, v in (headers or {}).items():
            head += f"{k}: {v}\r\n"
        writer.write((head + "\r\n").encode())
        async with asyncio.timeout(timeout(5)):
            raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                hdrs[k.strip().lower()] = v.strip()
        sse = cls(reader, writer, status, hdrs)
        if "content-length" in hdrs:
            async with asyncio.timeout(timeout(5)):
                sse.body = await reader.readexactly(int(hdrs["content-length"]))
            sse.ended = True
        return sse

    async def _chunk(self) -> bytes | None:
        line = await self.reader.readuntil(b"\r\n")
        size = int(line.strip(), 16)
        if size > 16 << 20:
            raise AssertionError(f"a chunk of {size} bytes")
        data = await self.reader.readexactly(size + 2)
        return data[:-2] if size else None

    async def next(self, seconds: float = 5.0) -> Event | None:
        """The next event or comment block; None at the end of the stream."""
        async with asyncio.timeout(timeout(seconds)):
            while "\n\n" not in self.text:
                if self.ended:
                    return None
                chunk = await self._chunk()
                if chunk is None:
                    self.ended = True
                    continue
                self.text += chunk.decode()
        block, _, self.text = self.text.partition("\n\n")
        ev = Event()
        data: list[str] = []
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if not name:
                ev.comment = value
            elif name == "data":
                data.append(value)
            elif name == "event":
                ev.event = value
            elif name == "id":
                ev.id = value
        ev.data = "\n".join(data)
        return ev

    async def message(self, seconds: float = 5.0) -> Event:
        """The next event that is not a comment."""
        for _ in range(1000):
            ev = await self.next(seconds)
            assert ev is not None, "the stream ended"
            if ev.comment is None:
                return ev
        raise AssertionError("only comments")

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


@asynccontextmanager
async def served(
    topics_limits: TopicsLimits | None = None, broker: Broker | bool = True, **kwargs: Any
) -> AsyncIterator[tuple[Server, int, Topics]]:
    server = Server(
        broker=broker, tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"], http=["127.0.0.1:0"], **kwargs
    )
    gateway = next(p for p in server.patterns if isinstance(p, Gateway))
    if topics_limits is not None:
        configure(gateway, topics_limits)
    await server.start()
    try:
        yield server, server.endpoint("http").port, Topics.of(gateway)
    finally:
        await server.shutdown()


def broker_of(server: Server) -> Broker:
    broker = server.broker
    assert isinstance(broker, Broker)
    return broker


async def publish(
    port: int, topic: str, body: bytes | str, ctype: str = "application/json", query: str = ""
) -> Any:
    return await arequest(
        port, "POST", f"/topics/{topic}{query}", body, headers={"content-type": ctype}
    )


# ---------------------------------------------------------------------------- publishing


async def test_http_publishers_reach_tcp_subscribers_with_the_value_they_sent() -> None:
    packed = msgpack.packb({"k": [1, 2, None]})
    async with served() as (server, port, _):
        async with AsyncClient(str(server.endpoint("tcp")), timeout=timeout(5)) as c:
            sub = await c.subscribe("sensors.>")
            sent: list[tuple[bytes | str, str, Any]] = [
                (b'{"t": 21.5, "tags": ["a"]}', "application/json", {"t": 21.5, "tags": ["a"]}),
                (b'"text"', "application/problem+json", "text"),
                (packed, "application/msgpack", {"k": [1, 2, None]}),
                (b"hello", "text/plain; charset=utf-8", b"hello"),
                (b"\xff\x00\x01", "application/octet-stream", b"\xff\x00\x01"),
                (b"21.5", "application/x-www-form-urlencoded", 21.5),  # curl -d 21.5
                (b"a=1&b=2", "application/x-www-form-urlencoded", b"a=1&b=2"),
                (b"", "application/octet-stream", b""),  # the empty raw value is a message
            ]
            for body, ctype, _ in sent:
                answer = await publish(port, "sensors.room1", body, ctype)
                assert answer.status == 202, answer
                assert answer.body == b""
            for _, _, value in sent:
                msg = await sub.get(timeout(5))
                assert (msg.topic, msg.value) == ("sensors.room1", value)

            answer = await publish(port, "sensors.room2", b"[1]", query="?qos=1")
            assert answer.status == 200
            assert answer.json() == {"id": broker_of(server).last_seq, "delivered": 1}
            assert (await sub.get(timeout(5))).value == [1]
            answer = await publish(port, "nobody.listens", b"1", query="?qos=1")
            assert answer.json()["delivered"] == 0


async def test_topic_in_the_path_is_percent_decoded_segment_by_segment() -> None:
    async with served() as (server, port, _):
        async with AsyncClient(str(server.endpoint("tcp")), timeout=timeout(5)) as c:
            sub = await c.subscribe("a/events.>")
            # %2F is a slash of the topic: this is a publish, not the event stream of "a"
            answer = await publish(port, "a%2Fevents.%C3%A9t%C3%A9", b"1")
            assert answer.status == 202
            msg = await sub.get(timeout(5))
            assert (msg.topic, msg.value) == ("a/events.été", 1)


async def test_publish_errors_are_problems_with_their_codes() -> None:
    limits = BrokerLimits(max_payload=1000, max_retained=1)
    async with served(broker=Broker(limits)) as (_, port, _):
        for topic in ("a..b", "a.*", "a.%3E", "%20"):
            answer = await publish(port, topic, b"1")
            assert answer.status == 400 and answer.problem["title"] == "BAD_TOPIC", topic
        answer = await publish(port, "a", b"x" * 1001, "application/octet-stream")
        assert answer.status == 413 and answer.problem["title"] == "PAYLOAD_TOO_LARGE"
        assert (await publish(port, "a", b"x" * 1000, "application/octet-stream")).status == 202
        for body, ctype, query in (
            (b"{nope", "application/json", ""),
            (b"[1e400]", "application/json", ""),  # (no float holds it)
            (b"\xc1", "application/msgpack", ""),
            (b"", "application/json", ""),  # no JSON value: refused by the broker
            (b"1", "application/json", "?qos=2"),
            (b"1", "application/json", "?retain=maybe"),
            (b"1", "application/json", "?retain=true"),  # (the document's 0 or 1 only)
            (b"1", "application/json", "?retain="),
            (b"1", "application/json", "?qos=01"),
        ):
            answer = await publish(port, "a", body, ctype, query)
            assert answer.status == 400, (body, query)
            assert answer.problem["title"] == "DECODE_ERROR"
        assert (await publish(port, "r1", b"1", query="?retain=1")).status == 202
        answer = await publish(port, "r2", b"1", query="?retain=1")
        assert answer.status == 507 and answer.problem["title"] == "RETAINED_STORE_FULL"
        answer = await arequest(port, "GET", "/topics/a")
        assert answer.status == 405 and answer.headers["allow"] == "POST"
        answer = await arequest(port, "POST", "/topics/a/events", b"1")
        assert answer.status == 405 and answer.headers["allow"] == "GET"
        for path in ("/topics", "/topics/a/b/events", "/topics/a/feed"):
            answer = await arequest(port, "GET", path)
            assert answer.status == 404 and answer.problem["title"] == "NOT_FOUND", path


async def test_no_broker_is_404() -> None:
    server = Server(Demo(), http=["127.0.0.1:0"], tcp=["127.0.0.1:0"])
    async with server:
        port = server.endpoint("http").port
        answer = await publish(port, "a", b"1")
        assert answer.status == 404 and answer.problem["title"] == "NOT_FOUND"
        assert "broker" in answer.problem["detail"]
        sse = await Sse.open(port, "/topics/a/events")
        assert sse.status == 404
        await sse.close()


# ---------------------------------------------------------------------------- events


async def test_events_from_tcp_udp_and_http_publishers() -> None:
    async with served() as (server, port, _):
        sse = await Sse.open(port, "/topics/sensors.%3E/events")
        assert sse.status == 200
        assert sse.headers["content-type"] == "text/event-stream"
        assert sse.headers["cache-control"] == "no-store"
        async with (
            AsyncClient(str(server.endpoint("tcp")), timeout=timeout(5)) as tcp,
            AsyncClient(str(server.endpoint("udp")), timeout=timeout(5)) as udp,
            AsyncClient(str(server.endpoint("tcp")), codec="json", timeout=timeout(5)) as tj,
        ):
            await tcp.publish("sensors.a", {"v": [1, 2]}, qos=1)  # msgpack
            await tcp.publish("other.a", 0, qos=1)  # not matching
            await tcp.publish("sensors", 0, qos=1)  # not matching: '>' is one token or more
            await udp.publish("sensors.b.c", "over udp")
            await tj.publish("sensors.j", [True, None], qos=1)  # JSON
            await tcp.publish("sensors.bin", b"\x00\xff", qos=1)  # bytes in msgpack
            await publish(port, "sensors.h", b"plain", "text/plain")
            await publish(port, "sensors.h", b"\x80", "application/octet-stream")
            got = [await sse.message() for _ in range(6)]
        data = [e.json() for e in got]
        assert data[0] == {"topic": "sensors.a", "codec": "msgpack", "payload": {"v": [1, 2]}}
        by_topic = {d["topic"]: d for d in data[1:4]}  # (UDP may overtake a QoS 1 publish)
        assert by_topic["sensors.b.c"] == {
            "topic": "sensors.b.c",
            "codec": "msgpack",
            "payload": "over udp",
        }
        assert by_topic["sensors.j"] == {
            "topic": "sensors.j",
            "codec": "json",
            "payload": [True, None],
        }
        # bytes in msgpack: their JSON form, base64 text (PROTOCOL.md §3.1)
        assert by_topic["sensors.bin"]["payload"] == base64.b64encode(b"\x00\xff").decode()
        assert data[4] == {"topic": "sensors.h", "codec": "raw", "text": "plain"}
        assert data[5] == {"topic": "sensors.h", "codec": "raw", "base64": "gA=="}
        assert all(e.event == "message" for e in got)
        ids = [int(e.id or 0) for e in got]
        assert ids == sorted(ids) and len(set(ids)) == 6 and ids[0] > 0
        await sse.close()


async def test_count_ends_the_stream_after_that_many_messages() -> None:
    async with served() as (server, port, _):
        sse = await Sse.open(port, "/topics/sensors.%3E/events?count=2")
        assert sse.status == 200
        await publish(port, "sensors.a", b"1", "application/json")
        await publish(port, "sensors.b", b"2", "application/json")
        await publish(port, "sensors.c", b"3", "application/json")
        got = [await sse.message(), await sse.message()]
        assert [e.json()["payload"] for e in got] == [1, 2]
        assert await sse.next() is None  # the end of the response: curl -N exits by itself
        await eventually(lambda: server.broker.stats()["local_subscriptions"] == 1)  # the ring
        await sse.close()
        bad = await Sse.open(port, "/topics/sensors.%3E/events?count=0")
        assert bad.status == 400
        await bad.close()


async def test_payloads_that_do_not_decode_are_sent_as_base64() -> None:
    """The broker does not check payloads (a TCP publisher may send anything in any codec):
    what does not decode reaches the stream as base64, and nothing breaks."""
    async with served() as (server, port, _):
        sse = await Sse.open(port, "/topics/odd/events")
        broker = broker_of(server)
        for payload, codec in ((b"{bad", 2), (b"[1e400]", 2), (b"\xc1", 1), (b"\xd4\x05\x00", 1)):
            broker.publish("odd", payload, codec)
            data = (await sse.message()).json()
            assert base64.b64decode(data["base64"]) == payload, data
        broker.publish("odd", b'{\n"multi": "line"\n}', 2)  # one data line all the same
        assert (await sse.message()).json()["payload"] == {"multi": "line"}
        await sse.close()


async def test_an_unforeseen_formatting_error_does_not_fail_the_publish(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with served() as (server, port, _):
        sse = await Sse.open(port, "/topics/odd/events")

        def boom(data: bytes) -> Any:
            raise TypeError("unforeseen")

        monkeypatch.setattr(topics_module.MSGPACK, "decode", boom)
        assert broker_of(server).publish("odd", b"\x01", 1) == 2  # the stream and the ring
        data = (await sse.message()).json()
        assert data == {"topic": "odd", "codec": "msgpack", "base64": "AQ=="}
        await sse.close()


async def test_retained_messages_come_first_without_an_id() -> None:
    async with served() as (server, port, _):
        assert (await publish(port, "cfg.a", b'{"on": true}', query="?retain=1")).status == 202
        sse = await Sse.open(port, "/topics/cfg.*/events")
        first = await sse.message()
        assert first.id is None
        assert first.json() == {
            "topic": "cfg.a",
            "codec": "json",
            "payload": {"on": True},
            "retained": True,
        }
        async with AsyncClient(str(server.endpoint("tcp")), timeout=timeout(5)) as c:
            sub = await c.subscribe("cfg.>")
            msg = await sub.get(timeout(5))
            assert (msg.value, msg.retained) == ({"on": True}, True)
        # an empty body with retain clears it: a new stream gets the live marker first
        assert (await publish(port, "cfg.a", b"", "", query="?retain=1")).status == 202
        again = await Sse.open(port, "/topics/cfg.*/events")
        await publish(port, "cfg.b", b"2")
        assert (await again.message()).json()["topic"] == "cfg.b"
        assert (await sse.message()).json()["topic"] == "cfg.b"  # the clear is no message
        await sse.close()
        await again.close()


async def test_stream_refusals() -> None:
    async with served(TopicsLimits(max_streams=1)) as (_, port, _):
        for path, headers, title in (
            ("/topics/a.%3E.b/events", {}, "BAD_TOPIC"),
            ("/topics/a/events?policy=drop-all", {}, "DECODE_ERROR"),
            ("/topics/a/events", {"Last-Event-ID": "yesterday"}, "DECODE_ERROR"),
            ("/topics/a/events?last_event_id=-1", {}, "DECODE_ERROR"),
            # digits only, as documented (int() would take these)
            ("/topics/a/events", {"Last-Event-ID": "+5"}, "DECODE_ERROR"),
            ("/topics/a/events", {"Last-Event-ID": "1_0"}, "DECODE_ERROR"),
            ("/topics/a/events?last_event_id=%D9%A1", {}, "DECODE_ERROR"),  # Arabic-Indic 1
            (f"/topics/a/events?last_event_id={2**63}", {}, "DECODE_ERROR"),
            ("/topics/a/events?count=%C2%B2", {}, "DECODE_ERROR"),  # (was a 500)
            ("/topics/a/events?count=+1", {}, "DECODE_ERROR"),
            (f"/topics/a/events?count={2**31 + 1}", {}, "DECODE_ERROR"),
        ):
            sse = await Sse.open(port, path, headers)
            assert sse.status == 400, path
            assert json.loads(sse.body)["title"] == title
            await sse.close()
        one = await Sse.open(port, "/topics/a/events")
        assert one.status == 200
        two = await Sse.open(port, "/topics/a/events")
        assert two.status == 503 and json.loads(two.body)["title"] == "OVERLOADED"
        assert two.headers["retry-after"]
        await one.close()
        await two.close()


async def test_event_stream_with_the_secret_as_access_token() -> None:
    async with served(secret="s3cret") as (_, port, _):
        sse = await Sse.open(port, "/topics/a/events")
        assert sse.status == 401
        await sse.close()
        sse = await Sse.open(port, "/topics/a/events?access_token=s3cret")
        assert sse.status == 200
        answer = await arequest(
            port,
            "POST",
            "/topics/a",
            b"1",
            headers={"authorization": "Bearer s3cret", "content-type": "application/json"},
        )
        assert answer.status == 202
        assert (await sse.message()).json()["payload"] == 1
        await sse.close()


# ---------------------------------------------------------------------------- replay


async def test_last_event_id_resends_what_was_missed() -> None:
    async with served() as (_, port, _):
        sse = await Sse.open(port, "/topics/t.*/events")
        await publish(port, "t.1", b"1")
        seen = await sse.message()
        await sse.close()
        for i in range(2, 5):  # while disconnected, with other topics between
            await publish(port, f"t.{i}", str(i))
            await publish(port, f"u.{i}", str(i))
        expected = [2, 3, 4]
        for live, headers, path in (
            (10, {"Last-Event-ID": str(seen.id)}, "/topics/t.*/events"),
            (11, {}, f"/topics/t.*/events?last_event_id={seen.id}"),
        ):
            again = await Sse.open(port, path, headers)
            await publish(port, "t.live", str(live))  # after the replay, live
            expected.append(live)
            got = [await again.message() for _ in expected]
            assert [e.json()["payload"] for e in got] == expected
            assert [e.event for e in got] == ["message"] * len(expected)
            ids = [int(e.id or 0) for e in got]
            assert ids == sorted(ids) and ids[0] > int(str(seen.id))
            await again.close()
        # up to date: nothing replayed, no gap
        last = await Sse.open(port, "/topics/t.*/events", {"Last-Event-ID": str(ids[-1])})
        await publish(port, "t.5", b"5")
        assert (await last.message()).json()["payload"] == 5
        await last.close()


async def test_a_gap_is_said_when_the_ring_no_longer_holds_it() -> None:
    async with served(TopicsLimits(replay_count=3)) as (_, port, topics):
        sse = await Sse.open(port, "/topics/g.%3E/events")
        await publish(port, "g.0", b"0")
        first = await sse.message()
        await sse.close()
        for i in range(1, 11):
            await publish(port, "g.x", str(i))
        again = await Sse.open(port, "/topics/g.%3E/events", {"Last-Event-ID": str(first.id)})
        gap = await again.message()
        assert gap.event == "gap" and gap.id is None
        problem = gap.json()
        assert problem["code"] == 2034 and problem["title"] == "REPLAY_GAP"
        assert problem["last_event_id"] == int(str(first.id))
        kept = [await again.message() for _ in range(3)]
        assert [e.json()["payload"] for e in kept] == [8, 9, 10]
        assert problem["first_id"] == int(str(kept[0].id))
        assert topics.stats()["gaps"] == 1
        await again.close()
        # an id this server never gave (a restart): a gap, then what is kept
        ahead = await Sse.open(port, "/topics/g.%3E/events?last_event_id=999999")
        assert (await ahead.message()).event == "gap"
        assert [(await ahead.message()).json()["payload"] for _ in range(3)] == [8, 9, 10]
        await ahead.close()


async def test_a_replay_the_ring_outruns_says_gap_then_goes_on_live() -> None:
    """A replay goes a window at a time; when the ring lets go of what it had still to send,
    a gap event says so, and the live messages follow, none lost."""
    async with served(TopicsLimits(replay_count=2000, window=512)) as (server, port, _):
        broker = broker_of(server)
        sse = await Sse.open(port, "/topics/o.x/events")
        broker.publish("o.x", b"start", 0)
        start = await sse.message()
        await sse.close()
        for i in range(2000):
            broker.publish("o.x", b"r%d" % i, 0)
        again = await Sse.open(port, "/topics/o.x/events", {"Last-Event-ID": str(start.id)})
        for i in range(2000):  # at once: the ring now holds only these
            broker.publish("o.x", b"l%d" % i, 0)
        events = []
        for _ in range(4100):
            ev = await again.message()
            events.append(ev)
            if ev.event == "message" and ev.json()["text"] == "l1999":
                break
        kinds = [e.event for e in events]
        assert kinds.count("gap") == 1
        g = kinds.index("gap")
        replayed = [e.json()["text"] for e in events[:g]]
        assert 0 < len(replayed) < 2000
        assert replayed == [f"r{i}" for i in range(len(replayed))]
        assert [e.json()["text"] for e in events[g + 1 :]] == [f"l{i}" for i in range(2000)]
        await again.close()


async def test_the_replay_ring_is_bounded_in_bytes() -> None:
    limits = TopicsLimits(replay_bytes=10 * (1000 + len("big.topic") + RING_OVERHEAD))
    async with served(limits) as (_, port, topics):
        await publish(port, "warm.up", b"0")  # (the ring is made on the first request)
        for _ in range(50):
            await publish(port, "big.topic", os.urandom(1000), "application/octet-stream")
        replay = topics.stats()["replay"]
        assert replay["messages"] == 10
        assert replay["bytes"] <= limits.replay_bytes


async def test_ring_overhead_covers_what_an_entry_costs() -> None:
    """RING_OVERHEAD is at least what tracemalloc sees per ring entry beyond payload and topic
    (each payload its own bytes object, as from a network read)."""
    ring_limits = TopicsLimits(replay_count=20_000, replay_bytes=1 << 30)
    async with served(ring_limits) as (server, port, topics):
        await publish(port, "warm.up", b"0")
        broker = broker_of(server)
        payloads = [os.urandom(64) for _ in range(5000)]
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for p in payloads:
                broker.publish("ring.entry", p, 0)
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert topics.stats()["replay"]["messages"] == 5001
        assert grown / 5000 <= RING_OVERHEAD, grown / 5000


# ---------------------------------------------------------------------------- slow readers


def _silent_reader(port: int, path: str) -> socket.socket:
    """A client that sends its GET and never reads (a small receive buffer, so that the
    server's side fills soon)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    s.setblocking(False)
    return s


def _slow_subs(broker: Broker, pattern: str) -> list[Subscription]:
    return [s for s in broker.index.subscribers() if s.pattern == pattern]


async def test_a_reader_that_does_not_read_is_bounded_and_others_get_everything() -> None:
    """drop-oldest (the broker's default): the silent stream's queue stays within its byte
    bound, drops are counted in broker.stats, the process's memory stays bounded while a TCP
    publisher sends 32 MiB, and a reading stream gets every message."""
    limits = TopicsLimits(
        stream_bytes=256 << 10, window=64 << 10, replay_bytes=1 << 20, keep_alive=60
    )
    n, size = 2000, 16 << 10
    async with served(limits) as (server, port, topics):
        broker = broker_of(server)
        reader = await Sse.open(port, "/topics/flood.fast/events")
        silent = _silent_reader(port, "/topics/flood.%3E/events")
        publisher = AsyncClient(str(server.endpoint("tcp")), codec="raw", timeout=timeout(5))
        await publisher.connect()
        try:
            await eventually(lambda: bool(_slow_subs(broker, "flood.>")))
            received = 0
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                for i in range(n):
                    await publisher.publish("flood.fast", os.urandom(size))  # QoS 0, over TCP
                    if i % 10 == 9:  # paced by the reader (within its bounds), not the silent one
                        while received < i + 1:
                            await reader.message()
                            received += 1
                while received < n:
                    await reader.message()
                    received += 1
                peak = tracemalloc.get_traced_memory()[1] - base
            finally:
                tracemalloc.stop()
            (slow,) = _slow_subs(broker, "flood.>")
            stats = broker.stats()
            assert slow.dropped > 0 and stats["dropped"] >= slow.dropped
            assert slow.held <= limits.stream_bytes
            assert any(s["pattern"] == "flood.>" and s["dropped"] for s in stats["slow"])
            # 32 MiB published (measured peak ~1.7 MiB); held at once: the silent stream's queue
            # (256 KiB), window and write buffer, the ring (1 MiB), the reader's and the
            # publisher's few messages.
            assert peak < 4 << 20, peak
            assert topics.stats()["streams"] == 2
        finally:
            silent.close()
            await reader.close()
            await publisher.close()
        await eventually(lambda: broker.stats()["local_subscriptions"] == 1)  # the ring


async def test_disconnect_policy_ends_the_stream_with_slow_consumer() -> None:
    limits = TopicsLimits(stream_bytes=64 << 10, window=16 << 10, keep_alive=60)
    async with served(limits, limits=ServerLimits(close_timeout=5.0)) as (server, port, topics):
        broker = broker_of(server)
        silent = _silent_reader(port, "/topics/slow.%3E/events?policy=disconnect")
        try:
            await eventually(lambda: bool(_slow_subs(broker, "slow.>")))
            for _ in range(2000):  # bounded: it is cut off long before
                broker.publish("slow.x", os.urandom(4096), 0)
                if broker.counters["slow_consumers_disconnected"]:
                    break
                await asyncio.sleep(0)
            assert broker.counters["slow_consumers_disconnected"] == 1
            assert not _slow_subs(broker, "slow.>")
            assert topics.stats()["slow_consumers_disconnected"] == 1
            # Now it reads: what was written, then the error event, then the end.
            received = bytearray()

            def done() -> bool:
                for _ in range(10_000):  # what the socket has now (a small buffer: many reads)
                    try:
                        chunk = silent.recv(1 << 20)
                    except BlockingIOError:
                        return False
                    received.extend(chunk)
                    if not chunk or received.endswith(b"0\r\n\r\n"):
                        return True
                return False

            await eventually(done)
        finally:
            silent.close()
        tail = bytes(received[-2000:])
        assert b"event: error\ndata: " in tail
        problem = json.loads(tail.split(b"event: error\ndata: ")[1].split(b"\n")[0])
        assert problem["code"] == 1010 and problem["title"] == "SLOW_CONSUMER"
        await eventually(lambda: topics.stats()["streams"] == 0)


# ---------------------------------------------------------------------------- life


async def test_keep_alive_comments_on_an_idle_stream() -> None:
    async with served(TopicsLimits(keep_alive=0.2)) as (_, port, _):
        sse = await Sse.open(port, "/topics/quiet/events")
        ev = await sse.next(seconds=5)
        assert ev is not None and ev.comment == "keep-alive"
        await publish(port, "quiet", b"1")
        assert (await sse.message()).json()["payload"] == 1
        await sse.close()


async def test_a_client_that_goes_takes_its_subscription_with_it() -> None:
    async with served() as (server, port, topics):
        broker = broker_of(server)
        sse = await Sse.open(port, "/topics/x/events")
        assert broker.stats()["local_subscriptions"] == 2  # the stream and the replay ring
        await sse.close()
        await eventually(lambda: broker.stats()["local_subscriptions"] == 1)
        await eventually(lambda: topics.stats()["streams"] == 0)
        assert (await arequest(port, "GET", "/healthz")).status == 200  # in_flight released
        assert topics.gateway.in_flight == 0


async def test_drain_ends_the_streams_and_their_subscriptions() -> None:
    async with served() as (server, port, topics):
        broker = broker_of(server)
        streams = [await Sse.open(port, f"/topics/d.{i}/events") for i in range(3)]
        await publish(port, "d.1", b"1")
        assert (await streams[1].message()).json()["payload"] == 1
        shutdown = asyncio.ensure_future(server.shutdown())
        for sse in streams:
            assert await sse.next(seconds=5) is None  # the stream ended, cleanly
            await sse.close()
        await asyncio.wait_for(shutdown, timeout(10))
        assert broker.stats()["subscriptions"] == 0
        assert topics.stats()["streams"] == 0


# ---------------------------------------------------------------------------- OpenAPI


def test_openapi_paths_describe_both_operations() -> None:
    paths = openapi_paths(Gateway(["127.0.0.1:0"]))
    post = paths["/topics/{topic}"]["post"]
    assert {"202", "200", "400", "404", "413"} <= set(post["responses"])
    assert [p["name"] for p in post["parameters"]] == ["topic", "qos", "retain"]
    assert post["parameters"][0]["schema"]["pattern"] == TOPIC_PATTERN
    for flag in post["parameters"][1:]:
        assert flag["schema"] == {"type": "integer", "enum": [0, 1], "default": 0}
    get = paths["/topics/{pattern}/events"]["get"]
    assert "text/event-stream" in get["responses"]["200"]["content"]
    assert json.loads(json.dumps(paths)) == paths  # plain JSON


def _valid(check: Callable[[str], Any], text: str) -> bool:
    try:
        check(text)
    except TopicError:
        return False
    return True


def _ecma(pattern: str) -> re.Pattern[str]:
    """A JSON Schema pattern as it means (ECMA-262: ``$`` is the end of the text, where Python's
    also matches before a last newline), as schemathesis reads it."""
    assert pattern.endswith("$")
    return re.compile(pattern[:-1] + r"\Z")


_ECMA_TOPIC = _ecma(TOPIC_PATTERN)
_ECMA_SUBJECT = _ecma(SUBJECT_PATTERN)
_PIECES = st.sampled_from(["a", "é", "/", "%", ".", "*", ">", " ", "\t", "\r", "\n", "\x00", "𝄞"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=40).map("".join))
@example("a." * 31 + "a")  # 32 tokens
@example("a." * 32 + "a")  # 33
@example("*." * 31 + ">")
@example("é" * 128)  # 256 bytes
@example("é" * 128 + "a")  # 257: the one bound the pattern cannot count
@example("a>")
@example("a.>.b")
def test_the_documented_patterns_are_the_broker_s_rules(text: str) -> None:
    """``TOPIC_PATTERN`` and ``SUBJECT_PATTERN`` (with at most 256 bytes of UTF-8, which the
    document says in words) take exactly what ``validate_topic`` and ``validate_pattern`` do."""
    fits = len(text.encode()) <= 256
    assert (bool(_ECMA_TOPIC.search(text)) and fits) is _valid(validate_topic, text)
    assert (bool(_ECMA_SUBJECT.search(text)) and fits) is _valid(validate_pattern, text)


# ---------------------------------------------------------------------------- the broker's part


class Sink:
    """A local subscriber whose reading the test steers."""

    def __init__(self) -> None:
        self.got: list[tuple[int, bytes, bytes, int, int]] = []
        self.open = True
        self.closed: tuple[int, str] | None = None

    def message(self, seq: int, topic: bytes, payload: bytes, codec: int, flags: int) -> None:
        self.got.append((seq, topic, payload, codec, flags))

    def writable(self) -> bool:
        return self.open

    def write_soon(self, data: bytes) -> None:
        raise AssertionError("a local subscriber gets no frames")

    def close_slow(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def test_local_subscribers_get_numbered_messages_also_after_waiting() -> None:
    broker = Broker()
    sink = Sink()
    broker.publish("r.t", b"kept", 0, retain=True)
    sub = broker.subscribe_local(sink, "r.>", {"policy": "drop-oldest", "max_msgs": 2})
    assert broker.deliver_retained(sub) == 1
    assert sink.got == [(0, b"r.t", b"kept", 0, FLAG_RETAIN)]
    broker.publish("r.a", b"1", 0)
    assert sink.got[-1] == (broker.last_seq, b"r.a", b"1", 0, 0)
    sink.open = False
    for i in range(2, 6):
        broker.publish("r.a", str(i).encode(), 0)
        broker.publish("other", b"x", 0)
    last = broker.last_seq
    sink.open = True
    broker.peer_writable(sink)
    # the two newest waited (drop-oldest, max_msgs 2), with the numbers they were given
    assert sink.got[-2:] == [(last - 3, b"r.a", b"4", 0, 0), (last - 1, b"r.a", b"5", 0, 0)]
    stats = broker.stats()
    assert stats["dropped"] == 2 and stats["local_subscriptions"] == 1
    assert stats["subscriptions"] == 1
    with pytest.raises(BrokerError):
        broker.subscribe_local(Sink(), "q", {"qos": 1})
    broker.peer_gone(sink)
    assert broker.stats()["subscriptions"] == 0


def test_local_subscriber_disconnect_policy() -> None:
    broker = Broker()
    sink = Sink()
    broker.subscribe_local(sink, "d", {"policy": "disconnect", "max_msgs": 1})
    sink.open = False
    broker.publish("d", b"1", 0)
    broker.publish("d", b"2", 0)
    assert sink.closed is not None and sink.closed[0] == 1010
    assert broker.stats()["subscriptions"] == 0


def test_queued_overhead_still_covers_an_entry() -> None:
    """A queue entry now holds the message's number too (0, a cached int, but for local
    subscriptions): QUEUED_OVERHEAD still covers it."""
    topic, payload = b"t" * 10, b"p" * 10

    def header(obj: bytes) -> int:
        return sys.getsizeof(obj) - len(obj)

    entry = (topic, payload, 1, 0, 2**40)
    queued = sys.getsizeof(entry) + 8 + header(payload) + header(topic) + sys.getsizeof(2**40)
    assert QUEUED_OVERHEAD >= queued
