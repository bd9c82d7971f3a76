"""A new pattern is a folder plus one registration line (issue 9's "done when").

The pattern lives in examples/custom_pattern/ and touches nothing else: its own message type in
a free range (0x50), answered over TCP and UDP on a live server next to RPC and pub/sub.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from examples.custom_pattern.reverse import (
    REVERSE,
    REVERSE_MESSAGES,
    Reverse,
    encode_reverse,
    reverse,
)

from sockstack import AsyncClient, Broker, PubSub, RemoteError, Server, connect
from sockstack.errors import ErrorCode
from sockstack.protocol.codecs import RAW
from sockstack.protocol.events import Error, Response
from sockstack.protocol.frames import MessageType, encode_frame, parse_datagram
from sockstack.protocol.messages import decode_message
from sockstack.protocol.registry import MessageSet, MessageSpec
from sockstack.rpc.pattern import RPC
from tests.conftest import Probe, timeout


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server(
        patterns=[RPC(Probe()), PubSub(Broker()), Reverse()],  # <- the one registration line
        tcp=["127.0.0.1:0"],
        udp=["127.0.0.1:0"],
    )
    async with srv:
        yield srv


async def test_pattern_answers_over_tcp_next_to_rpc_and_pubsub(server: Server) -> None:
    url = str(server.endpoint("tcp"))
    async with AsyncClient(url) as client:
        sub = await client.subscribe("t.>")
        assert await reverse(client, b"sockets") == b"stekcos"  # the new pattern
        assert await client.call("add", 2, 3) == 5  # RPC beside it
        await client.publish("t.x", "hello")  # pub/sub beside it
        msg = await sub.get(timeout=timeout(5))
        assert (msg.topic, msg.value) == ("t.x", "hello")
        results = await asyncio.gather(*(reverse(client, bytes([i]) * 3 + b"x") for i in range(50)))
        assert results == [b"x" + bytes([i]) * 3 for i in range(50)]  # each call its own answer
        assert await client.call("reverse.count") == 51  # the pattern's own method
        assert await client.call("broker.stats") is not None  # pub/sub's method still there


async def test_pattern_answers_over_udp_never_larger_than_asked(server: Server) -> None:
    ep = server.endpoint("udp")
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, (ep.host, ep.port))
        request = encode_reverse(7, b"datagram")
        await loop.sock_sendall(sock, request)
        reply = await asyncio.wait_for(loop.sock_recv(sock, 2048), timeout(5))
        assert decode_message(parse_datagram(reply, 2048)) == Response(7, b"margatad", RAW.id)
        assert len(reply) <= len(request)  # no amplification
        # A REVERSE without a request id is refused with a code, no larger than it came
        bad = encode_frame(REVERSE, 0, b"", b"zz")
        await loop.sock_sendall(sock, bad)
        reply = await asyncio.wait_for(loop.sock_recv(sock, 2048), timeout(5))
        err = decode_message(parse_datagram(reply, 2048))
        assert isinstance(err, Error) and err.code == ErrorCode.DECODE_ERROR
        assert len(reply) <= len(bad)
    # RPC over UDP on the same endpoint still works beside it
    async with AsyncClient(str(ep)) as client:
        assert await client.call("add", 1, 1) == 2


async def test_pattern_works_from_the_blocking_client_too(server: Server) -> None:
    url = str(server.endpoint("tcp"))

    def blocking() -> bytes:
        with connect(url) as client:
            conn = client.stream_connection("REVERSE")
            with client.lock:
                _, result = conn.exchange(lambda rid: encode_reverse(rid, b"abc"), "REVERSE", 5.0)
            assert client.call("add", 1, 2) == 3
            return bytes(result)

    assert await asyncio.to_thread(blocking) == b"cba"


async def test_bad_request_of_the_pattern_gets_a_coded_error_and_the_session_goes_on(
    server: Server,
) -> None:
    url = str(server.endpoint("tcp"))
    async with AsyncClient(url) as client:
        channel = client.stream_channel("REVERSE")
        with pytest.raises(RemoteError) as info:
            await channel.exchange(lambda rid: encode_reverse(rid, b"x" * 2000), "REVERSE", 5.0)
        assert info.value.code == ErrorCode.DECODE_ERROR
        assert await reverse(client, b"ok") == b"ko"


def test_a_pattern_cannot_take_another_patterns_types() -> None:
    clash = Reverse()
    clash.name = "clash"
    clash.messages = MessageSet(
        "clash",
        0x10,
        0x1F,
        (MessageSpec(0x15, "CLASH", REVERSE_MESSAGES.specs[0].decode, frozenset()),),
    )
    with pytest.raises(ValueError, match="overlaps pubsub"):
        Server(patterns=[PubSub(), clash], tcp=["127.0.0.1:0"])
    with pytest.raises(ValueError, match="outside its range"):
        MessageSet(
            "core-squatter", 0x50, 0x5F, (MessageSpec(MessageType.PING, "P", print, frozenset()),)
        )
    with pytest.raises(ValueError, match="two patterns are named"):
        Server(patterns=[Reverse(), Reverse()], tcp=["127.0.0.1:0"])
