"""What a review of the relay found (stop 24), each kept as a test that failed before its fix:
retransmissions behind an async stage, refusals that were stored anyway, a fog relay told
"durable" for rows a failed commit lost, the byte bound with non-ASCII names, a close that
hung, a commit loop a bad pipeline output stopped, and the bound while a batch commits."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from sockstack import AsyncClient
from sockstack.edge import AckLevel, Device, EdgeError, Pipeline, Reading, Relay, StoreLimits
from sockstack.edge.messages import encode_data
from sockstack.edge.records import encode_value, row_crc
from sockstack.edge.store import Batch, Outbox
from sockstack.errors import ErrorCode, RemoteError
from tests.conftest import timeout
from tests.edge.test_relay import committed, relay_at, rows


async def slow(r: Reading) -> Reading:
    await asyncio.sleep(0.05)  # (a stage that takes its time: an enrichment over the network)
    return r


async def until(condition: Any) -> None:
    """Yield to the loop until ``condition()`` holds (bounded)."""
    async with asyncio.timeout(timeout(5)):
        while not condition():
            await asyncio.sleep(0.001)


async def test_a_retransmission_behind_an_async_stage_is_stored_once(tmp_path: Path) -> None:
    async with relay_at(tmp_path / "e.db", pipeline=Pipeline(slow)) as (relay, url, _):
        async with AsyncClient(url) as client:
            d = Device(client, "s", epoch=1)
            await asyncio.gather(d.send(1, seq=1), d.send(1, seq=1))  # the same one twice
            await asyncio.gather(d.send(5, seq=5), d.send(3, seq=3))  # 3 behind 5: a duplicate
        await committed(relay)
        assert relay.store.positions["d:s"] == (1, 5)  # never back to 3
    assert [r[2] for r in rows(tmp_path / "e.db")] == [1, 5]


async def test_a_stream_refused_for_the_stream_limit_is_not_stored(tmp_path: Path) -> None:
    async with relay_at(tmp_path / "e.db", limits=StoreLimits(max_streams=1)) as (relay, url, _):
        async with AsyncClient(url) as client:
            assert await Device(client, "a", epoch=1).send(1) == AckLevel.DISK
            channel = client.stream_channel("DATA")
            with pytest.raises(RemoteError) as info:  # JSON: through take(), not _plain_data
                await channel.exchange(
                    lambda rid: encode_data(rid, "b", b"2", seq=1, epoch=1, codec=2), "DATA", 5.0
                )
            assert info.value.code == ErrorCode.STORE_FULL
        await committed(relay)
    assert [r[1] for r in rows(tmp_path / "e.db")] == ["a"]


def _fog(path: Path, **kwargs: Any) -> Relay:
    relay = Relay(path, **kwargs)
    relay.open()
    relay.loop = asyncio.get_running_loop()
    relay.store.start(relay.loop)
    return relay


def _batch() -> list[list[Any]]:
    body = encode_value(1)
    return [[i, "s", i, 1.0, body, row_crc(i, "s", i, 1.0, body)] for i in (1, 2, 3)]


async def test_a_fog_relay_refused_for_the_stream_limit_stores_nothing(tmp_path: Path) -> None:
    relay = _fog(tmp_path / "fog.db", limits=StoreLimits(max_streams=1))
    relay.store.stage([], 0, "d:dev", (1, 1))  # one device stream: the limit
    for _ in range(3):  # the downstream's forwarder tries again
        with pytest.raises(EdgeError):
            await relay.forward_in("downstream", _batch())
    await relay.store.close()
    assert rows(tmp_path / "fog.db") == []


async def test_a_retry_is_not_told_durable_when_the_commit_fails(tmp_path: Path) -> None:
    relay = _fog(tmp_path / "fog.db")
    store = relay.store
    real = store._commit
    gate = threading.Event()

    def failing(b: Batch) -> None:  # the first commit with rows waits, then fails (a disk error)
        if b.rows:
            gate.wait(timeout(5))
            raise OSError("disk I/O error")
        real(b)

    store._commit = failing  # type: ignore[method-assign]
    first = asyncio.ensure_future(relay.forward_in("downstream", _batch()))
    await until(lambda: store.position("r:downstream")[1] == 3 and store.committing_bytes)
    retry = asyncio.ensure_future(relay.forward_in("downstream", _batch()))  # sent again
    await until(lambda: len(store.pending.done) > 0)  # the retry waits for that commit
    gate.set()
    for call in (first, retry):  # both told it failed: the downstream keeps its rows
        with pytest.raises(EdgeError) as info:
            await call
        assert info.value._sockstack_code == ErrorCode.UNAVAILABLE
    # The pipeline's memory may hold what the failed commit lost: no input until a restart.
    refused = relay._refused(10, False)
    assert refused is not None and refused[0] == ErrorCode.UNAVAILABLE
    store._commit = real  # type: ignore[method-assign]
    await store.close()


async def test_the_byte_bound_holds_with_non_ascii_stream_names(tmp_path: Path) -> None:
    store = Outbox(tmp_path / "o.db")
    store.open()
    store.start(asyncio.get_running_loop())
    stream = "température/é"
    loop = asyncio.get_running_loop()
    try:
        for i in range(100):
            store.stage([(stream, i + 1, 1.0, b"\x01")], len(stream) + 1 + 48)
        done: asyncio.Future[int] = loop.create_future()
        store.pending.done.append(lambda b, e: done.set_result(b.last_id))
        store.forwarded(await done)
        gone: asyncio.Future[None] = loop.create_future()
        store.pending.done.append(lambda b, e: gone.set_result(None))
        await gone
        assert store.stored_bytes == 0 and store.stored_rows == 0
    finally:
        await store.close()


async def test_close_returns_after_a_failed_commit(tmp_path: Path) -> None:
    store = Outbox(tmp_path / "o.db")
    store.open()
    store.start(asyncio.get_running_loop())

    def failing(b: Batch) -> None:
        raise OSError("disk I/O error")

    store._commit = failing  # type: ignore[method-assign]
    failed: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    store.stage([("s", 1, 1.0, b"\x01")], 50, done=lambda b, e: failed.set_result(e))
    assert isinstance(await failed, OSError)
    store.stage([("s", 2, 1.0, b"\x01")], 50)
    async with asyncio.timeout(timeout(5)):
        await store.close()  # its last commit fails too: it still returns


async def test_the_commit_loop_survives_a_pipeline_output_msgpack_cannot_hold(
    tmp_path: Path,
) -> None:
    def odd(r: Reading) -> Reading:  # a complex number (or a numpy scalar) from a user stage
        return Reading(r.stream, r.time, 1j) if r.value == 50 else r

    limits = StoreLimits(max_pending_bytes=300)
    async with relay_at(tmp_path / "e.db", pipeline=Pipeline(odd), limits=limits) as (
        relay,
        url,
        _,
    ):
        port = int(url.rsplit(":", 1)[1])
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"".join(b'{"stream": "l", "value": %d}\n' % i for i in range(100)))
        await writer.drain()
        await until(lambda: relay.totals["in_msgs"] >= 100)
        writer.close()
        async with AsyncClient(url) as client:
            assert await Device(client, "after", epoch=1).send(1) == AckLevel.DISK
        assert relay.sources["pipeline"].dropped == {"output not encodable": 1}


async def test_the_byte_bound_counts_the_batch_being_committed(tmp_path: Path) -> None:
    limits = StoreLimits(max_bytes=1000)
    async with relay_at(tmp_path / "e.db", limits=limits) as (relay, url, _):
        store = relay.store
        real, gate = store._commit, threading.Event()

        def held(b: Batch) -> None:
            if b.rows:
                gate.wait(timeout(5))
            real(b)

        store._commit = held  # type: ignore[method-assign]
        async with AsyncClient(url) as client:
            d = Device(client, "s", epoch=1)
            assert await d.send(b"x" * 600, level=AckLevel.MEMORY) == AckLevel.MEMORY
            await until(lambda: store.committing_bytes > 0)
            with pytest.raises(RemoteError) as info:
                await d.send(b"y" * 600, level=AckLevel.MEMORY)
            assert info.value.code == ErrorCode.STORE_FULL
            gate.set()
        await committed(relay)
        assert store.stored_bytes <= limits.max_bytes
