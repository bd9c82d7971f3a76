"""Streaming results, live over loopback (issue 12 item 6; PROTOCOL.md §4.3).

A generator or async generator method streams its items: a REQUEST with the STREAM flag, ITEMs
under flow control (CREDIT grants bytes back; the window is STREAM_WINDOW), then the call's one
RESPONSE or ERROR. Each test runs a real server on 127.0.0.1 and the asyncio client (raw frames
where the client would never send them: a STREAM datagram).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from sockstack import (
    AsyncClient,
    CallContext,
    CallTimeout,
    ConnectionLost,
    ErrorCode,
    LocalProtocolError,
    RemoteError,
    RemoteProtocolError,
    Server,
    ServerInterceptor,
    Service,
    ServiceError,
    current_context,
    method,
)
from sockstack.protocol.events import Error, Item, Pong
from sockstack.protocol.messages import (
    STREAM_WINDOW,
    encode_cancel,
    encode_credit,
    encode_ping,
    encode_request,
)
from sockstack.transport.tls import client_context, server_context
from tests.conftest import timeout
from tests.integration.test_deadlines_metadata import RawStream, raw_call

HOST = "127.0.0.1"
ITEM = b"x" * 98  # msgpack bin 8: a 100-byte ITEM body


class Streams(Service):
    """Generators that count what they produced and say when their ``finally`` ran."""

    def __init__(self) -> None:
        self.produced = 0
        self.lock = threading.Lock()
        self.closed = threading.Event()  # a generator's finally ran (sync or async)
        self.runs = 0
        self.seen_transport = ""

    def _made(self) -> None:
        with self.lock:
            self.produced += 1

    @method
    def count(self, n: int) -> Iterator[int]:
        self.seen_transport = current_context().transport  # the call's context, in the worker
        yield from range(n)
        return n * 10  # type: ignore[misc]  # the stream's result

    @method
    async def acount(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @method
    def blobs(self, n: int) -> Iterator[bytes]:
        try:
            for _ in range(n):
                self._made()
                yield ITEM
        finally:
            self.closed.set()

    @method
    async def ablobs(self, n: int) -> AsyncIterator[bytes]:
        try:
            for _ in range(n):
                self._made()
                yield ITEM
        finally:
            self.closed.set()

    @method
    def forever(self, pause: float) -> Iterator[int]:
        i = 0
        try:
            while True:
                yield i
                i += 1
                if pause:
                    time.sleep(pause)
        finally:
            self.closed.set()

    @method
    async def aforever(self, pause: float) -> AsyncIterator[int]:
        i = 0
        try:
            while True:
                yield i
                i += 1
                await asyncio.sleep(pause)
        finally:
            self.closed.set()

    @method
    def fails_after(self, n: int) -> Iterator[int]:
        yield from range(n)
        raise ServiceError("broke after the items")

    @method
    async def afails_after(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        raise ServiceError("broke after the items")

    @method
    def unencodable(self) -> Iterator[Any]:
        yield 1
        yield object()
        yield 3

    @method
    def ran(self) -> int:
        return self.runs

    @method
    def plain(self, x: int) -> int:
        return x + 1


@pytest.fixture
async def served() -> AsyncIterator[tuple[Server, Streams]]:
    svc = Streams()
    server = Server(svc, tcp=[f"{HOST}:0"], udp=[f"{HOST}:0"])
    await server.start()
    try:
        yield server, svc
    finally:
        await server.shutdown()


def tcp(server: Server) -> str:
    return f"tcp://{HOST}:{server.endpoint('tcp').port}"


async def closed(svc: Streams) -> bool:
    """Wait (up to a generous bound) until a generator's ``finally`` ran."""
    return await asyncio.to_thread(svc.closed.wait, timeout(10))


# --------------------------------------------------------------------------- items, in order


@pytest.mark.parametrize("name", ["count", "acount"])
async def test_items_arrive_in_order_then_the_result(
    served: tuple[Server, Streams], name: str
) -> None:
    server, svc = served
    async with AsyncClient(tcp(server)) as client:
        stream = client.stream(name, 100_000)  # far more than one window of items
        got = [item async for item in stream]
        assert got == list(range(100_000))
        # A sync generator's return value is the stream's result; an async one has none.
        assert stream.result == (1_000_000 if name == "count" else None)
        assert await client.call("plain", 1) == 2  # the connection is still good
    if name == "count":
        assert svc.seen_transport == "tcp"  # current_context() inside the generator


async def test_a_plain_method_streamed_gives_no_items_and_its_result(
    served: tuple[Server, Streams],
) -> None:
    server, _ = served
    async with AsyncClient(tcp(server)) as client:
        stream = client.stream("plain", 41)
        assert [item async for item in stream] == []
        assert stream.result == 42


# --------------------------------------------------------------------------- flow control


@pytest.mark.parametrize("name", ["blobs", "ablobs"])
async def test_a_reader_that_does_not_read_holds_the_producer_at_the_window(
    served: tuple[Server, Streams], name: str
) -> None:
    server, svc = served
    total = 20 * STREAM_WINDOW // len(ITEM)  # 20 windows' worth
    per_window = STREAM_WINDOW // 100  # 100-byte bodies
    async with AsyncClient(tcp(server)) as client:
        stream = client.stream(name, total)
        it = aiter(stream)
        assert await anext(it) == ITEM  # the stream is open; nothing more is read for now
        items = stream._items
        assert items is not None
        # Round trips on the same connection until the server has sent (about) its window.
        for _ in range(2000):
            if items.items.queued + 100 * 2 >= STREAM_WINDOW:
                break
            await client.ping()
        else:
            pytest.fail(f"only {items.items.queued} bytes arrived")
        for _ in range(20):  # time and round trips for a producer that would go on
            await client.ping()
            await asyncio.to_thread(lambda: None)
        # Held at the window: what was sent and not granted, plus at most one item (and the
        # one being made when the window closed).
        assert svc.produced <= per_window + 3, svc.produced
        assert svc.produced < total // 10
        assert items.items.queued <= STREAM_WINDOW + 100  # the client's memory, too
        rest = [item async for item in it]  # reading again: credit flows, the stream ends
        assert len(rest) == total - 1
        assert svc.produced == total


async def test_a_server_that_breaks_the_window_is_stopped(
    served: tuple[Server, Streams], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client refuses items beyond the window (it bounds its own memory): here a client
    that expects a window of 1,000 bytes meets a server that (rightly) sends 262,144."""
    import sockstack.asyncio.client as client_module
    from sockstack.protocol.calls import ItemStream

    def small(request_id: int, method: str) -> ItemStream:
        return ItemStream(request_id, method, window=1000)

    monkeypatch.setattr(client_module, "ItemStream", small)
    server, svc = served
    async with AsyncClient(tcp(server)) as client:
        got = []
        with pytest.raises(RemoteProtocolError, match="beyond the flow-control window of 1000"):
            async for item in client.stream("forever", 0):
                got.append(item)
        assert got == list(range(len(got)))  # the items before it, in order
        assert 300 <= len(got) <= 1000  # 1-3 bytes each, up to the window
        assert await closed(svc)  # and the client's CANCEL stopped the generator


# --------------------------------------------------------------------------- stopping


@pytest.mark.parametrize("name", ["forever", "aforever"])
async def test_breaking_out_of_the_loop_closes_the_generator(
    served: tuple[Server, Streams], name: str
) -> None:
    server, svc = served
    async with AsyncClient(tcp(server)) as client:
        async for item in client.stream(name, 0.001):
            if item == 5:
                break
        assert await closed(svc)  # CANCEL reached it: its finally ran
        assert await client.call("plain", 1) == 2


async def test_aclose_and_async_with_cancel(served: tuple[Server, Streams]) -> None:
    server, svc = served
    async with AsyncClient(tcp(server)) as client:
        async with client.stream("forever", 0.001) as stream:
            assert await anext(aiter(stream)) == 0
        assert await closed(svc)
        svc.closed.clear()
        stream = client.stream("aforever", 0.001)
        assert await anext(aiter(stream)) == 0
        await stream.aclose()
        assert await closed(svc)
        with pytest.raises(StopAsyncIteration):
            await anext(aiter(stream))


@pytest.mark.parametrize("name", ["forever", "aforever"])
async def test_a_dropped_connection_closes_the_generator(
    served: tuple[Server, Streams], name: str
) -> None:
    server, svc = served
    async with AsyncClient(tcp(server), reconnect=False) as client:
        stream = client.stream(name, 0.001)
        it = aiter(stream)
        assert await anext(it) == 0
        channel = client.channel
        assert channel is not None and channel.stream is not None  # type: ignore[union-attr]
        channel.stream.abort()  # type: ignore[union-attr]
        assert await closed(svc)
        with pytest.raises(ConnectionLost):
            async for _ in it:
                pass


@pytest.mark.parametrize("name", ["fails_after", "afails_after"])
async def test_an_error_mid_stream_comes_after_the_items_before_it(
    served: tuple[Server, Streams], name: str
) -> None:
    server, _ = served
    async with AsyncClient(tcp(server)) as client:
        got = []
        with pytest.raises(RemoteError) as info:
            async for item in client.stream(name, 3):
                got.append(item)
        assert got == [0, 1, 2]
        assert info.value.code == ErrorCode.APPLICATION_ERROR
        assert "broke after the items" in str(info.value)


async def test_an_item_that_does_not_encode_ends_the_stream(
    served: tuple[Server, Streams],
) -> None:
    server, _ = served
    async with AsyncClient(tcp(server)) as client:
        got = []
        with pytest.raises(RemoteError) as info:
            async for item in client.stream("unencodable"):
                got.append(item)
        assert got == [1]
        assert info.value.code == ErrorCode.RESULT_NOT_ENCODABLE


@pytest.mark.parametrize("name", ["forever", "aforever"])
async def test_the_deadline_bounds_the_whole_stream(
    served: tuple[Server, Streams], name: str
) -> None:
    server, svc = served
    async with AsyncClient(tcp(server)) as client:
        got = 0
        with pytest.raises(CallTimeout):  # whichever timer went first, the server's or ours
            async for _ in client.stream(name, 0.01, timeout=0.3):
                got += 1
        assert got > 0
        assert await closed(svc)  # stopped on the server too


# --------------------------------------------------------------------------- refusals


async def test_a_stream_over_udp_is_refused(served: tuple[Server, Streams]) -> None:
    server, svc = served
    async with AsyncClient(f"udp://{HOST}:{server.endpoint('udp').port}") as client:
        with pytest.raises(LocalProtocolError) as info:
            client.stream("count", 3)
        assert info.value.code == ErrorCode.STREAM_MISMATCH
    # A STREAM request that reaches a server over UDP anyway: refused, the method never runs.
    frame = encode_request(7, "blobs", [3], stream=True)
    answer = await raw_call(server, "udp", frame)
    assert type(answer) is Error and answer.code == ErrorCode.STREAM_MISMATCH
    assert "TCP or TLS" in answer.message
    assert svc.produced == 0


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
@pytest.mark.parametrize("name", ["blobs", "ablobs"])
async def test_a_generator_called_with_call_is_refused(
    served: tuple[Server, Streams], scheme: str, name: str
) -> None:
    server, svc = served
    async with AsyncClient(f"{scheme}://{HOST}:{server.endpoint(scheme).port}") as client:
        with pytest.raises(RemoteError) as info:
            await client.call(name, 3)
        assert info.value.code == ErrorCode.STREAM_MISMATCH
        assert "stream()" in str(info.value)
    assert svc.produced == 0  # it did not run


async def test_bad_arguments_are_refused_before_the_generator_runs(
    served: tuple[Server, Streams],
) -> None:
    server, svc = served
    async with AsyncClient(tcp(server)) as client:
        with pytest.raises(RemoteError) as info:
            async for _ in client.stream("blobs", "many"):
                pass
        assert info.value.code == ErrorCode.BAD_ARGUMENTS
    assert svc.produced == 0


# --------------------------------------------------------------------------- interceptors


class Seen(ServerInterceptor):
    def __init__(self) -> None:
        self.log: list[tuple[str, str, Any]] = []

    def before(self, ctx: CallContext) -> None:
        self.log.append(("before", ctx.method, None))

    def after(self, ctx: CallContext, result: Any) -> None:
        self.log.append(("after", ctx.method, result))


async def test_interceptors_see_a_streamed_call_once() -> None:
    seen = Seen()
    async with Server(Streams(), tcp=[f"{HOST}:0"], interceptors=[seen]) as server:
        async with AsyncClient(tcp(server)) as client:
            assert [i async for i in client.stream("count", 50_000)] == list(range(50_000))
    assert seen.log == [("before", "count", None), ("after", "count", 500_000)]


# --------------------------------------------------------------------------- raw frames


async def test_a_credit_never_raises_the_window(served: tuple[Server, Streams]) -> None:
    """A client granting far more than it was sent (2^32-1 bytes) gets one more window, not
    more: the server's memory per stream stays bounded by the window whatever a client sends."""
    server, svc = served
    raw = await RawStream.open(server)
    try:
        raw.send(encode_request(3, "ablobs", [100_000], stream=True))
        pongs = 0

        async def received_until_pong() -> int:
            """ITEM body bytes received up to the answer to one more PING (every item queued
            before that PING was answered has arrived)."""
            nonlocal pongs
            pongs += 1
            raw.send(encode_ping(pongs))
            total = 0
            async with asyncio.timeout(timeout(10)):
                while True:
                    for ev in raw.events:
                        if type(ev) is Item:
                            total += ev.size
                        elif type(ev) is Pong and ev.request_id == pongs:
                            raw.events.clear()
                            return total
                    raw.events.clear()
                    data = await raw.reader.read(65536)
                    assert data, "the server closed the connection"
                    raw.events += raw.core.receive_data(data)

        first = 0
        for _ in range(200):  # round trips until the first window has arrived
            first += await received_until_pong()
            if first >= STREAM_WINDOW:
                break
        assert STREAM_WINDOW <= first <= STREAM_WINDOW + 100
        for _ in range(5):
            assert await received_until_pong() == 0  # held at the window
        raw.send(encode_credit(3, 0xFFFFFFFF))
        second = 0
        for _ in range(200):
            second += await received_until_pong()
            if second >= STREAM_WINDOW:
                break
        for _ in range(5):
            second += await received_until_pong()
        assert STREAM_WINDOW <= second <= STREAM_WINDOW + 100  # one window more, no more
        assert svc.produced <= 2 * (STREAM_WINDOW // 100) + 3
        raw.send(encode_cancel(3))
        answer = await raw.answer()
        assert type(answer) is Error and answer.code == ErrorCode.CANCELLED
        assert await closed(svc)
    finally:
        await raw.close()


# --------------------------------------------------------------------------- TLS


async def test_a_stream_over_tls_with_flow_control_and_cancel(tmp_path: Path) -> None:
    """The same stream over TLS: items in order across many records and windows, then a break
    that closes the generator."""
    ca = trustme.CA()
    cert = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    svc = Streams()
    async with Server(svc, tls=[f"{HOST}:0"], tls_context=server_context(cert)) as server:
        url = str(server.endpoint("tls"))
        async with AsyncClient(url, tls=client_context(ca_file)) as client:
            got = [item async for item in client.stream("blobs", 10_000)]  # ~4 windows
            assert got == [ITEM] * 10_000
            svc.closed.clear()
            async for item in client.stream("aforever", 0.001):
                if item == 3:
                    break
            assert await closed(svc)


async def test_an_unbounded_timeout_for_a_long_lived_stream(served: tuple[Server, Streams]) -> None:
    server, svc = served
    async with AsyncClient(tcp(server)) as client:
        async for item in client.stream("aforever", 0.001, timeout=math.inf):
            if item == 3:
                break
        assert await closed(svc)


async def test_streams_nobody_reads_hold_memory_at_their_windows(
    served: tuple[Server, Streams],
) -> None:
    """Memory measured, not counted: 16 streams on one connection that nobody reads past their
    first item. Server and client share this process, and tracemalloc sees both: what they
    hold together stays near 16 windows (the client's queues; the server keeps about one item
    per stream), far below the 320 windows the generators would make unchecked."""
    import tracemalloc

    server, svc = served
    streams_n = 16
    total = 20 * STREAM_WINDOW // len(ITEM)  # 20 windows' worth per stream
    tracemalloc.start()
    try:
        async with AsyncClient(tcp(server)) as client:
            before = tracemalloc.get_traced_memory()[0]
            streams = [client.stream("ablobs", total) for _ in range(streams_n)]
            its = [aiter(s) for s in streams]
            for it in its:
                assert await anext(it) == ITEM
            for _ in range(4000):  # round trips until every window has arrived
                if all(
                    s._items is not None and s._items.items.queued + 200 >= STREAM_WINDOW
                    for s in streams
                ):
                    break
                await client.ping()
            for _ in range(20):  # room for a producer that would go on
                await client.ping()
            held = tracemalloc.get_traced_memory()[0] - before
            for it in its:
                await it.aclose()  # type: ignore[attr-defined]
    finally:
        tracemalloc.stop()
    assert svc.produced < streams_n * total // 10
    windows = streams_n * STREAM_WINDOW
    # Each queued 100-byte item costs its bytes object and its slot in Python: < 3x its size.
    assert held < 3 * windows, (held, windows)
