"""The host's rules for patterns, and behaviours the restructure must keep (review findings)."""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref
from collections.abc import AsyncIterator

import pytest
from examples.custom_pattern.reverse import REVERSE_MESSAGES, Reverse

from sockstack import (
    AsyncClient,
    Broker,
    ConnectionClosed,
    ErrorCode,
    PubSub,
    Server,
    Service,
    connect,
)
from sockstack.protocol import Connection, Role
from sockstack.protocol.frames import encode_frame
from sockstack.protocol.registry import MessageSet, MessageSpec
from sockstack.pubsub.messages import PubSubType
from tests.conftest import Probe, timeout


def test_a_pattern_routes_only_its_own_datagram_types() -> None:
    squatter = Reverse()
    squatter.datagram_types = frozenset({0x03})  # REQUEST: would bypass the reply cache
    with pytest.raises(ValueError, match="not one of its own"):
        Server(patterns=[squatter], tcp=["127.0.0.1:0"])


def test_a_client_message_needs_a_class_to_be_routed_by() -> None:
    p = Reverse()
    spec = REVERSE_MESSAGES.specs[0]
    p.messages = MessageSet(
        "reverse", 0x50, 0x5F, (MessageSpec(spec.type, spec.name, spec.decode, spec.sent_by),)
    )
    with pytest.raises(ValueError, match="names no message class"):
        Server(patterns=[p], tcp=["127.0.0.1:0"])


def test_shared_default_registries_are_frozen() -> None:
    conn = Connection(Role.SERVER)
    with pytest.raises(ValueError, match="frozen"):
        conn.registry.add(REVERSE_MESSAGES)


def test_an_empty_service_is_allowed_beside_another_pattern_only() -> None:
    class Empty(Service):
        pass

    Server(Empty(), patterns=[PubSub()], tcp=["127.0.0.1:0"])
    Server(Empty(), broker=True, tcp=["127.0.0.1:0"])
    with pytest.raises(ValueError, match="exposes no @method"):
        Server(Empty(), tcp=["127.0.0.1:0"])
    assert [p.name for p in Server(Probe(), broker=0, tcp=["127.0.0.1:0"]).patterns] == ["rpc"]


@pytest.fixture
async def rpc_only() -> AsyncIterator[Server]:
    async with Server(Probe(), tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"]) as srv:
        yield srv


async def test_unknown_pattern_datagrams_get_no_larger_answer(rpc_only: Server) -> None:
    """A server without pub/sub gets a 16-byte ACK: the full ERROR would be 3x larger (an
    amplifier for spoofed traffic); the code alone (18 bytes) is larger too: no answer."""
    ep = rpc_only.endpoint("udp")
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, (ep.host, ep.port))
        small = encode_frame(PubSubType.ACK, 9, b"", b"")
        large = encode_frame(PubSubType.ACK, 10, b"", b"x" * 100)
        for datagram in (small, large):
            await loop.sock_sendall(sock, datagram)
        # Datagrams on loopback keep their order: the first answer is the large one's (10).
        reply = await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout(5))
        assert reply[3] == 0x05 and int.from_bytes(reply[8:12], "big") == 10  # its ERROR
        assert len(reply) <= len(large)
    async with AsyncClient(str(ep)) as client:  # and the endpoint still serves
        assert await client.call("add", 1, 2) == 3


async def test_udp_clients_start_their_ids_at_random_points(rpc_only: Server) -> None:
    """A restarted client on a reused port must not meet its predecessor's cached answers."""
    url = str(rpc_only.endpoint("udp"))
    firsts = []
    for _ in range(3):
        async with AsyncClient(url) as client:
            channel = client.channel
            assert channel is not None
            firsts.append(channel.calls.new_id())
            assert await client.call("add", 2, 2) == 4
    assert len(set(firsts)) == 3  # collisions: 3 in 2^32


async def test_closed_connections_are_freed_without_the_cycle_collector(
    rpc_only: Server,
) -> None:
    url = str(rpc_only.endpoint("tcp"))
    refs = []
    gc.disable()
    try:
        for _ in range(10):
            async with AsyncClient(url) as client:
                assert await client.call("add", 1, 1) == 2
                (stream,) = rpc_only._streams
                refs.append(weakref.ref(stream))
                closed = stream.closed  # set when the server has seen the connection go
                del stream
            await asyncio.wait_for(closed, timeout(5))
        alive = [r for r in refs if r() is not None]
        assert alive == []
    finally:
        gc.enable()


@pytest.fixture
async def broker() -> AsyncIterator[Server]:
    async with Server(patterns=[PubSub(Broker())], tcp=["127.0.0.1:0"]) as srv:
        yield srv


async def test_blocking_subscribe_gets_every_retained_message(broker: Server) -> None:
    url = str(broker.endpoint("tcp"))
    async with AsyncClient(url) as pub:
        for i in range(50):
            await pub.publish(f"t.{i}", i, retain=True, qos=1)

    def blocking() -> list[int]:
        with connect(url) as client:
            sub = client.subscribe("t.*")
            got = sorted(sub.get(timeout=timeout(5)).value for _ in range(50))
            return got

    # Retained messages may share a read with the SUB's answer (how often depends on timing):
    # several subscribers make that case likely in every run.
    for _ in range(10):
        assert await asyncio.to_thread(blocking) == list(range(50))


async def test_blocking_subscription_reports_the_brokers_close_code() -> None:
    srv = Server(patterns=[PubSub(Broker())], tcp=["127.0.0.1:0"])
    await srv.start()
    url = str(srv.endpoint("tcp"))
    client = await asyncio.to_thread(connect, url)
    try:
        sub = await asyncio.to_thread(client.subscribe, "x.>")
        waiting = asyncio.ensure_future(asyncio.to_thread(sub.get, timeout(10)))
        await srv.shutdown()  # CLOSE GOING_AWAY to every connection
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(waiting, timeout(10))
        assert info.value.code == ErrorCode.GOING_AWAY
    finally:
        await asyncio.to_thread(client.close)


async def test_a_server_can_start_again_on_its_ports_at_once() -> None:
    first = Server(Probe(), tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"])
    await first.start()
    tcp, udp = first.endpoint("tcp"), first.endpoint("udp")
    await first.shutdown()
    again = Server(Probe(), tcp=[f"127.0.0.1:{tcp.port}"], udp=[f"127.0.0.1:{udp.port}"])
    async with again:  # no EADDRINUSE: shutdown waited for its sockets to close
        async with AsyncClient(str(again.endpoint("udp"))) as client:
            assert await client.call("add", 1, 1) == 2
