"""Batches of calls (``call_many``/``iter_many``, PROTOCOL.md §4.5): BATCH requests on the
wire, each call run as it would be alone, answers in order, failures in place, bounded memory;
the fallback to a request per call for servers without BATCH, interceptors and UDP."""

from __future__ import annotations

import asyncio
import gc
import threading
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from sockstack import AsyncClient, RemoteError, Server, ServerLimits, connect
from sockstack.errors import CallTimeout, ErrorCode
from sockstack.interceptors import ServerInterceptor
from sockstack.protocol.events import Error, Response
from sockstack.protocol.frames import MessageType, encode_frame
from sockstack.protocol.messages import (
    FEATURE_BATCH,
    FEATURES,
    FLAG_BATCH,
    FLAG_KWARGS,
    MAX_BATCH_CALLS,
    encode_request,
)
from sockstack.rpc.context import CallContext
from tests.conftest import Probe, timeout, url
from tests.integration.test_deadlines_metadata import RawStream, raw_call

PAIRS = [(i, i) for i in range(2500)]


async def test_results_come_in_order(server: Server) -> None:
    async with AsyncClient(url(server, "tcp")) as c:
        assert await c.call_many("add", PAIRS) == [2 * i for i in range(2500)]
        assert await c.call_many("add", []) == []
        got = [r async for r in c.iter_many("add", ((i, 1) for i in range(777)), window=64)]
        assert got == [i + 1 for i in range(777)]


async def test_results_come_in_order_blocking(server: Server) -> None:
    def body() -> None:
        with connect(url(server, "tcp")) as c:
            assert c.call_many("add", PAIRS) == [2 * i for i in range(2500)]
            assert list(c.iter_many("add", ((i, 1) for i in range(777)), window=10)) == [
                i + 1 for i in range(777)
            ]

    await asyncio.to_thread(body)


def _mixed() -> list[tuple[Any, ...]]:
    """Calls of ``add``: every 7th one fails on the server (int + str)."""
    return [(i, "x") if i % 7 == 3 else (i, 1) for i in range(300)]


async def test_a_failed_call_takes_its_place_or_raises(server: Server) -> None:
    async with AsyncClient(url(server, "tcp")) as c:
        out = await c.call_many("add", _mixed(), return_exceptions=True)
        for i, value in enumerate(out):
            if i % 7 == 3:
                assert isinstance(value, RemoteError)
                assert value.code == ErrorCode.UNEXPECTED_ERROR
            else:
                assert value == i + 1
        with pytest.raises(RemoteError) as info:
            await c.call_many("add", _mixed())
        assert info.value.code == ErrorCode.UNEXPECTED_ERROR
        # bad arguments fail their call alone, worded as for a call of its own
        out = await c.call_many("add", [(1, 2), (1,), (3, 4)], return_exceptions=True)
        assert out[0] == 3 and out[2] == 7
        assert isinstance(out[1], RemoteError) and out[1].code == ErrorCode.BAD_ARGUMENTS
        with pytest.raises(RemoteError) as info:
            await c.call("add", 1)
        assert str(info.value) == str(out[1])
        assert await c.call("add", 1, 1) == 2  # the connection is fine


async def test_a_failed_call_takes_its_place_or_raises_blocking(server: Server) -> None:
    def body() -> None:
        with connect(url(server, "tcp")) as c:
            out = c.call_many("add", _mixed(), return_exceptions=True)
            assert [isinstance(v, RemoteError) for v in out] == [i % 7 == 3 for i in range(300)]
            with pytest.raises(RemoteError):
                c.call_many("add", _mixed())
            assert c.call("add", 1, 1) == 2

    await asyncio.to_thread(body)


async def test_unknown_and_streaming_methods_fail_every_call(server: Server) -> None:
    async with AsyncClient(url(server, "tcp")) as c:
        out = await c.call_many("nope", [(1,), (2,)], return_exceptions=True)
        assert [e.code for e in out] == [ErrorCode.UNKNOWN_METHOD] * 2
        with pytest.raises(RemoteError) as info:
            await c.call_many("nope", [(1,)])
        assert info.value.code == ErrorCode.UNKNOWN_METHOD


async def test_async_and_threaded_methods_run_one_after_the_other(
    server: Server, probe: Probe
) -> None:
    async with AsyncClient(url(server, "tcp")) as c:
        assert await c.call_many("count", [("k",)] * 50) == list(range(1, 51))
        assert await c.call_many("threaded_add", [(i, 1) for i in range(40)]) == list(range(1, 41))
        # an async method between inline ones, several batch requests in flight
        out = await c.call_many("blob", [(i % 3,) for i in range(30)], window=8)
        assert out == [b"b" * (i % 3) for i in range(30)]


async def test_each_call_goes_through_the_servers_interceptors(probe: Probe) -> None:
    seen: list[Any] = []

    class Recorder(ServerInterceptor):
        def before(self, ctx: CallContext) -> None:
            seen.append(ctx.method)

    server = Server(probe, tcp=["127.0.0.1:0"], interceptors=[Recorder()])
    await server.start()
    try:
        async with AsyncClient(url(server, "tcp")) as c:
            assert await c.call_many("add", [(1, 2), (3, 4), (5, 6)]) == [3, 7, 11]
        assert seen == ["add"] * 3
    finally:
        await server.shutdown()


async def test_a_server_without_batch_gets_a_request_per_call(server: Server) -> None:
    server.features = FEATURES & ~FEATURE_BATCH  # its next WELCOMEs: a server before batches
    async with AsyncClient(url(server, "tcp")) as c:
        assert await c.call_many("add", PAIRS[:500], window=50) == [2 * i for i in range(500)]
        out = await c.call_many("add", _mixed(), return_exceptions=True)
        assert [isinstance(v, RemoteError) for v in out] == [i % 7 == 3 for i in range(300)]

    def body() -> None:
        with connect(url(server, "tcp")) as b:
            assert b.call_many("add", PAIRS[:300], window=7) == [2 * i for i in range(300)]

    await asyncio.to_thread(body)


async def test_udp_and_client_interceptors_call_one_by_one(server: Server) -> None:
    async with AsyncClient(url(server, "udp")) as c:
        assert await c.call_many("add", PAIRS[:200], window=20) == [2 * i for i in range(200)]

    def body() -> None:
        with connect(url(server, "udp")) as b:
            assert b.call_many("add", PAIRS[:50]) == [2 * i for i in range(50)]

    await asyncio.to_thread(body)
    # a raw BATCH datagram is refused: batches need a session
    ans = await raw_call(server, "udp", encode_request(5, "add", [[1, 2]], batch=True))
    assert type(ans) is Error and ans.code == ErrorCode.STREAM_MISMATCH
    assert "batches need TCP or TLS" in ans.message


async def test_a_batch_over_the_frame_limit_is_split(probe: Probe) -> None:
    from sockstack import StreamLimits

    server = Server(
        probe, tcp=["127.0.0.1:0"], limits=ServerLimits(stream=StreamLimits(max_frame=65536))
    )
    await server.start()
    try:
        async with AsyncClient(url(server, "tcp")) as c:
            blobs = [(bytes([i % 256]) * 1000,) for i in range(400)]  # 400 KB: many frames
            assert await c.call_many("echo", blobs, window=400) == [b[0] for b in blobs]

        def body() -> None:
            with connect(url(server, "tcp")) as b:
                assert b.call_many("echo", blobs[:100], window=100) == [x[0] for x in blobs[:100]]

        await asyncio.to_thread(body)
    finally:
        await server.shutdown()


async def test_the_deadline_stops_a_batch(server: Server, probe: Probe) -> None:
    probe.gate = asyncio.Event()  # ``wait`` never returns
    async with AsyncClient(url(server, "tcp")) as c:
        out = await c.call_many("wait", [("d",)] * 5, timeout=0.3, return_exceptions=True)
        assert all(isinstance(e, CallTimeout) for e in out)
        assert probe.runs["d"] == 1  # the first call held the batch: the others never ran
        assert await c.call("add", 2, 2) == 4


async def test_leaving_iter_many_early_cancels_the_rest(server: Server, probe: Probe) -> None:
    probe.gate = asyncio.Event()
    probe.entered = asyncio.Event()
    async with AsyncClient(url(server, "tcp"), timeout=timeout(30)) as c:
        calls = [("c",)] * 20
        gen = c.iter_many("wait", calls, window=8)  # 2 BATCH requests of 4 calls in flight
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.wait_for(probe.entered.wait(), timeout(5))
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await gen.aclose()  # CANCEL for each batch request in flight
        # answered after the CANCELs were read (in order on the connection): they took effect
        assert await c.call("count", "after") == 1
        probe.gate.set()
        assert await c.call("count", "after") == 2
        # each request ran its first call (they run side by side) and stopped there: none of
        # their other calls, nor the 12 calls never sent, ran
        assert probe.runs["c"] == 2


async def test_memory_stays_bounded_by_the_window(server: Server) -> None:
    """20,000 calls of 1 KiB each way (40 MB) through iter_many with a window of 100: the
    client's and the (in-process) server's memory peak stays within a small bound."""
    payload = b"m" * 1024

    def calls() -> Iterator[tuple[bytes]]:
        for _ in range(20_000):
            yield (payload,)

    async with AsyncClient(url(server, "tcp"), timeout=timeout(60)) as c:
        await c.call_many("echo", [(payload,)] * 200, window=100)  # warm-up
        gc.collect()
        tracemalloc.start()
        try:
            n = 0
            async for result in c.iter_many("echo", calls(), window=100):
                n += len(result)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert n == 20_000 * 1024
    assert peak < 4 * 2**20, f"peak {peak} bytes for 40 MB through a window of 100"


# ---------------------------------------------------------------------------- wire (§4.5)


async def test_the_wire_form(server: Server) -> None:
    raw = await RawStream.open(server)
    try:
        raw.send(encode_request(7, "add", [[1, 2], [3, "x"], [4]], batch=True))
        ans = await raw.answer()
        assert type(ans) is Response and ans.request_id == 7
        results, errors = ans.result
        assert results == [3, None, None]
        assert [e[:3] for e in errors] == [
            [1, int(ErrorCode.UNEXPECTED_ERROR), "TypeError"],
            [2, int(ErrorCode.BAD_ARGUMENTS), "BAD_ARGUMENTS"],
        ]
        # refused, the session kept: a body that is not an array of arrays, KWARGS with
        # BATCH, too many calls
        bad = [
            encode_frame(MessageType.REQUEST, 8, b"add", b"\x92\x01\x02", FLAG_BATCH, 1),
            encode_frame(
                MessageType.REQUEST, 9, b"add", b"\x92\x91\x01\x80", FLAG_BATCH | FLAG_KWARGS, 1
            ),
            encode_frame(
                MessageType.REQUEST,
                10,
                b"add",
                b"\xdd"
                + (MAX_BATCH_CALLS + 1).to_bytes(4, "big")
                + b"\x90" * (MAX_BATCH_CALLS + 1),
                FLAG_BATCH,
                1,
            ),
        ]
        for rid, frame in zip((8, 9, 10), bad, strict=True):
            raw.send(frame)
            ans = await raw.answer()
            assert type(ans) is Error and ans.request_id == rid
            assert ans.code == ErrorCode.DECODE_ERROR, ans
        raw.send(encode_request(11, "add", [[5, 5]], batch=True))
        ans = await raw.answer()
        assert type(ans) is Response and ans.result == [[10], []]
    finally:
        await raw.close()


async def test_threads_share_a_blocking_client_for_batches(server: Server) -> None:
    await asyncio.to_thread(_threads_share, url(server, "tcp"))


def _threads_share(address: str) -> None:
    with connect(address) as c:
        failures: list[BaseException] = []

        def worker(k: int) -> None:
            try:
                for _ in range(5):
                    got = c.call_many("add", [(k, i) for i in range(300)], window=64)
                    assert got == [k + i for i in range(300)]
            except BaseException as exc:  # reported below
                failures.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout(30))
        assert not failures, failures
        assert not any(t.is_alive() for t in threads)
