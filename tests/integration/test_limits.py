"""Limits against a live server: connection floods, slowloris, clients that do not read.
Each limit holds, says why with a code where the protocol can, and the server keeps serving a
well-behaved client beside the abuse."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sockstack import AsyncClient, ConnectError, ErrorCode, Server, ServerLimits, StreamLimits
from sockstack.protocol.frames import FrameDecoder
from sockstack.protocol.messages import (
    Close,
    Hello,
    Welcome,
    decode_message,
    encode_hello,
    encode_request,
)
from tests.conftest import Probe, timeout

HELLO = encode_hello(Hello())


async def read_until_closed(reader: asyncio.StreamReader, seconds: float) -> list[Any]:
    """Every message until the server closes the connection (bounded by ``seconds``)."""
    dec = FrameDecoder()
    out: list[Any] = []
    async with asyncio.timeout(timeout(seconds)):
        while chunk := await reader.read(65536):
            out += [decode_message(f) for f in dec.feed(chunk)]
    return out


@pytest.fixture
async def limited(probe: Probe) -> AsyncIterator[Server]:
    limits = ServerLimits(
        max_connections=5,
        stream=StreamLimits(handshake_timeout=timeout(0.5), max_frame=64 * 1024),
    )
    async with Server(probe, tcp=["127.0.0.1:0"], limits=limits) as srv:
        yield srv


async def test_connection_flood_is_refused_with_a_code(
    limited: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    ep = limited.endpoint("tcp")
    async with AsyncClient(str(ep), timeout=timeout(5)) as bystander:
        assert await bystander.call("add", 1, 1) == 2
        held = []
        for _ in range(4):  # with the bystander: at the limit of 5
            reader, writer = await asyncio.open_connection(ep.host, ep.port)
            writer.write(HELLO)
            held.append((reader, writer))
        for reader, _ in held:
            dec = FrameDecoder()
            assert isinstance(decode_message(dec.feed(await reader.read(4096))[0]), Welcome)
        assert len(limited._streams) == 5

        refused = []
        for _ in range(50):  # a bounded flood beyond the limit
            reader, writer = await asyncio.open_connection(ep.host, ep.port)
            writer.write(HELLO)
            refused.append((reader, writer))
        for reader, writer in refused:
            out = await read_until_closed(reader, 5)
            assert len(out) == 1 and isinstance(out[0], Close)
            assert out[0].code == ErrorCode.TOO_MANY_CONNECTIONS
            writer.close()
        with pytest.raises(ConnectError, match="TOO_MANY_CONNECTIONS"):
            async with AsyncClient(str(ep), timeout=timeout(5), reconnect=False) as extra:
                await extra.call("add", 1, 1)
        assert await bystander.call("add", 2, 2) == 4  # never disturbed

        # Refusals are logged, but a flood is summarised rather than logged line by line.
        lines = [r for r in caplog.records if "TOO_MANY_CONNECTIONS" in r.getMessage()]
        assert 1 <= len(lines) <= limited.bad_log.burst

        # One held connection goes away: a new client gets its place.
        stream = next(s for s in limited._streams if s.peer != bystander_peer(bystander))
        held_writer = next(w for _, w in held if port_of(w) == peer_port(stream.peer))
        held_writer.close()
        await asyncio.wait_for(stream.closed, timeout(5))
        async with AsyncClient(str(ep), timeout=timeout(5)) as late:
            assert await late.call("add", 3, 4) == 7
        for _, writer in held:
            writer.close()


def bystander_peer(client: AsyncClient) -> str:
    stream = client._channel.stream  # type: ignore[union-attr]
    assert stream is not None and stream.transport is not None
    host, port = stream.transport.get_extra_info("sockname")[:2]
    return f"{host}:{port}"


def port_of(writer: asyncio.StreamWriter) -> int:
    return int(writer.get_extra_info("sockname")[1])


def peer_port(peer: str) -> int:
    return int(peer.rsplit(":", 1)[1])


async def test_slowloris_is_closed_by_the_handshake_timeout(limited: Server) -> None:
    """A client that sends its HELLO one byte every 100 ms never completes it in time."""
    ep = limited.endpoint("tcp")
    async with AsyncClient(str(ep), timeout=timeout(5)) as bystander:
        reader, writer = await asyncio.open_connection(ep.host, ep.port)
        closed_by_server = asyncio.ensure_future(read_until_closed(reader, 10))
        for byte in HELLO:  # bounded: 22 bytes; the pacing is the behaviour under test
            if closed_by_server.done() or writer.is_closing():
                break
            try:
                writer.write(bytes([byte]))
            except (ConnectionError, RuntimeError):
                break
            await asyncio.sleep(0.1)
            assert await bystander.call("add", 1, 1) == 2
        out = await closed_by_server
        assert out and isinstance(out[-1], Close)
        assert out[-1].code == ErrorCode.HANDSHAKE_TIMEOUT
        writer.close()


async def test_client_that_does_not_read_cannot_grow_server_memory(probe: Probe) -> None:
    """A client pipelines 64 KiB echoes and never reads: the server stops reading it, so its
    buffered answers stay near the write high-water mark instead of growing with the flood."""
    limits = ServerLimits(stream=StreamLimits(max_frame=1 << 20))
    async with Server(probe, tcp=["127.0.0.1:0"], limits=limits) as srv:
        ep = srv.endpoint("tcp")
        sock = socket.create_connection((ep.host, ep.port))
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        request = encode_request(1, "echo", [b"p" * 65536])
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, HELLO)
        sent = peak = 0
        try:
            for _ in range(2000):  # bounded: at most 128 MiB offered
                try:
                    sent += sock.send(request)
                except BlockingIOError:
                    # Our send buffer is full: the server has stopped reading us. Let its loop
                    # run, then look at what it holds for us.
                    await asyncio.sleep(0)
                    held = [
                        s.transport.get_write_buffer_size() for s in srv._streams if s.transport
                    ]
                    peak = max([peak, *held])
                    if all(not s.transport.is_reading() for s in srv._streams if s.transport):
                        break
            else:
                pytest.fail("the server kept reading a client that never reads")
            assert sent < 64 << 20  # the flood was stopped long before 2000 requests
            assert peak <= 1 << 20, peak  # answers buffered stay near the high-water mark
            async with AsyncClient(str(ep), timeout=timeout(5)) as bystander:
                assert await bystander.call("add", 1, 2) == 3
        finally:
            sock.close()


async def test_answers_piling_up_beyond_the_hard_bound_reset_the_connection(
    probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    """Async methods keep answering after the server stopped reading; a client that still
    does not read is reset once its unsent answers pass max_outbound."""
    caplog.set_level(logging.WARNING)
    limits = ServerLimits(
        stream=StreamLimits(max_frame=64 * 1024, max_outbound=256 * 1024, write_high_water=1024)
    )
    async with Server(probe, tcp=["127.0.0.1:0"], limits=limits) as srv:
        ep = srv.endpoint("tcp")
        _, writer = await asyncio.open_connection(ep.host, ep.port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer.write(HELLO + b"".join(encode_request(i, "blob", [60_000]) for i in range(1, 80)))
        await writer.drain()
        stream = next(iter(srv._streams))
        await asyncio.wait_for(stream.closed, timeout(10))  # reset by the server
        assert any("does not read" in r.getMessage() for r in caplog.records)
        async with AsyncClient(str(ep), timeout=timeout(5)) as bystander:
            assert await bystander.call("add", 1, 2) == 3
        writer.close()


async def test_udp_requests_beyond_the_in_flight_bound_are_refused(probe: Probe) -> None:
    """UDP has no connection to stop reading: past max_udp_in_flight, slow methods are refused
    with ERROR OVERLOADED (they do not run), and the ones running finish normally."""
    from sockstack import RemoteError

    probe.gate = asyncio.Event()
    probe.entered = asyncio.Event()
    limits = ServerLimits(max_udp_in_flight=2)
    async with Server(probe, udp=["127.0.0.1:0"], limits=limits) as srv:
        async with AsyncClient(str(srv.endpoint("udp")), timeout=timeout(5)) as c:
            first = [asyncio.ensure_future(c.call("wait", "held")) for _ in range(2)]
            await eventually_runs(probe, "held", 2)
            refused = await asyncio.gather(
                *(c.call("wait", "extra") for _ in range(3)), return_exceptions=True
            )
            assert all(
                isinstance(r, RemoteError) and r.code == ErrorCode.OVERLOADED for r in refused
            ), refused
            assert "extra" not in probe.runs  # refused calls never ran
            assert await c.call("add", 1, 1) == 2  # inline methods are not held back
            probe.gate.set()
            assert sorted(await asyncio.gather(*first)) == [1, 2]


async def eventually_runs(probe: Probe, key: str, n: int) -> None:
    async with asyncio.timeout(timeout(5)):
        while probe.runs.get(key, 0) < n:  # bounded by the timeout
            await asyncio.sleep(0.01)


async def test_one_address_cannot_take_every_connection_slot() -> None:
    """Issue 10 item 4: per-address limits beside the global one (connections, handshakes)."""
    limits = ServerLimits(
        max_connections=100, max_connections_per_address=3, max_handshakes_per_address=2
    )
    async with Server(Probe(), tcp=["127.0.0.1:0"], limits=limits) as srv:
        ep = srv.endpoint("tcp")
        # Two connections that never send HELLO fill this address's handshake budget.
        idle = [await asyncio.open_connection(ep.host, ep.port) for _ in range(2)]
        try:
            reader, writer = await asyncio.open_connection(ep.host, ep.port)
            data = await asyncio.wait_for(reader.read(1024), timeout(5))
            (close,) = FrameDecoder().feed(data)
            assert decode_message(close) == Close(
                ErrorCode.TOO_MANY_CONNECTIONS, "too many handshakes in progress from your address"
            )
            writer.close()
            waiting = [st.closed for st in srv._streams]  # the two idle ones, accepted first
        finally:
            for _, w in idle:
                w.close()
        await asyncio.wait_for(asyncio.gather(*waiting), timeout(5))
        assert srv._handshaking == {}
        # Handshaken connections count against the per-address limit.
        clients = [AsyncClient(str(ep), reconnect=False) for _ in range(3)]
        for c in clients:
            await c.connect()
        try:
            with pytest.raises(ConnectError, match="from your address"):
                await AsyncClient(str(ep), reconnect=False).connect()
            assert await clients[0].call("add", 1, 2) == 3  # the ones let in are served
            waiting = [st.closed for st in srv._streams]
        finally:
            for c in clients:
                await c.close()
        await asyncio.wait_for(asyncio.gather(*waiting), timeout(5))
        assert srv._by_address == {} and srv._handshaking == {}
        async with AsyncClient(str(ep)) as c:  # slots are given back
            assert await c.call("add", 2, 2) == 4
