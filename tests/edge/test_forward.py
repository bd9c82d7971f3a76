"""Forwarding from a relay to the sink over loopback: FORWARDED acknowledgements, an upstream that
is down then back (the backlog drains, in order, once), refusals of damaged batches, a sink's
de-duplication of batches sent again, and a fog relay in between."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from sockstack import AsyncClient, Server
from sockstack.edge import AckLevel, Device, ForwardSettings, Relay, Sink
from sockstack.edge.records import Reading, row_from_reading
from sockstack.errors import ErrorCode, RemoteError
from sockstack.protocol.calls import Backoff
from tests.conftest import timeout
from tests.helpers.faultproxy import TCPFaultProxy

FAST = ForwardSettings(backoff=Backoff(0.01, 2.0, 0.1))


class Cloud:
    """A sink server whose store tells the test each time a batch is stored."""

    def __init__(self, path: Path) -> None:
        from sockstack.edge.sink import open_sink

        self.store = open_sink(str(path))
        self.arrived = asyncio.Event()
        accept = self.store.accept
        loop = asyncio.get_running_loop()

        def accept_and_tell(*args: Any, **kwargs: Any) -> int:
            through = accept(*args, **kwargs)
            loop.call_soon_threadsafe(self.arrived.set)
            return int(through)

        self.store.accept = accept_and_tell  # type: ignore[method-assign]
        self.server = Server(patterns=[Sink(self.store)], tcp=["127.0.0.1:0"])

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.server.endpoints[0].port}"

    async def wait_rows(self, n: int) -> list[tuple[Any, ...]]:
        async with asyncio.timeout(timeout(10)):
            while True:
                self.arrived.clear()
                got = await asyncio.to_thread(self.store.readings, None, None, 100_000)
                if len(got) >= n:
                    return list(got)
                await self.arrived.wait()


async def test_forwarded_acknowledgement_and_order(tmp_path: Path) -> None:
    cloud = Cloud(tmp_path / "cloud.db")
    await cloud.server.start()
    relay = Relay(
        tmp_path / "edge.db", upstream=cloud.url, listen=["tcp://127.0.0.1:0"], forward=FAST
    )
    edge = Server(patterns=[relay])
    await edge.start()
    try:
        url = str(relay.endpoints()[0])
        async with AsyncClient(url) as client:
            device = Device(client, "d1", epoch=1)
            levels = [await device.send(i, level=AckLevel.FORWARDED) for i in range(5)]
        assert levels == [AckLevel.FORWARDED] * 5
        got = await cloud.wait_rows(5)
        assert [(r[2], r[3], r[5]) for r in got] == [("d1", i + 1, i) for i in range(5)]
        stats = await asyncio.to_thread(cloud.store.stats)
        assert relay.store.origin in str(stats)
    finally:
        await edge.shutdown()
        await cloud.server.shutdown()


async def test_upstream_down_then_back_drains_the_backlog_once(tmp_path: Path) -> None:
    cloud = Cloud(tmp_path / "cloud.db")
    await cloud.server.start()
    proxy = await TCPFaultProxy(("127.0.0.1", cloud.server.endpoints[0].port)).start()
    proxy.stall(True)  # the uplink is down: nothing gets through
    relay = Relay(
        tmp_path / "edge.db",
        upstream=f"tcp://127.0.0.1:{proxy.port}",
        listen=["tcp://127.0.0.1:0"],
        forward=ForwardSettings(batch_rows=50, timeout=0.5, backoff=Backoff(0.01, 2.0, 0.1)),
    )
    edge = Server(patterns=[relay])
    await edge.start()
    try:
        async with AsyncClient(str(relay.endpoints()[0])) as client:
            devices = [Device(client, f"d{i}", epoch=1) for i in range(4)]
            for n in range(100):
                for d in devices:
                    assert await d.send(n) == AckLevel.DISK
        assert relay.store.stored_rows == 400  # kept while the uplink is down
        for _ in range(3):  # and connections reset while it comes and goes
            await proxy.reset_and_wait()
        proxy.stall(False)
        got = await cloud.wait_rows(400)
        per: dict[str, list[int]] = {}
        for _origin, _id, stream, seq, _t, _v in got:
            per.setdefault(stream, []).append(seq)
        assert per == {f"d{i}": list(range(1, 101)) for i in range(4)}  # in order, once each
        ids = [r[1] for r in got]
        assert ids == sorted(set(ids))
        async with asyncio.timeout(timeout(10)):  # deleted here once the sink has them
            while relay.store.stored_rows:
                await asyncio.sleep(0.01)  # (the deletion commits with the next batch)
        assert relay.forwarder is not None and relay.forwarder.failures > 0
    finally:
        await edge.shutdown()
        await proxy.close()
        await cloud.server.shutdown()


async def test_the_sink_refuses_damaged_batches_and_skips_repeats(tmp_path: Path) -> None:
    cloud = Cloud(tmp_path / "cloud.db")
    await cloud.server.start()
    try:
        rows = [list(row_from_reading(i, Reading("s", 1.0 + i, i, i))) for i in range(1, 4)]
        async with AsyncClient(cloud.url) as client:
            assert (await client.call("edge.forward", "relay-a", rows, None))["through"] == 3
            again = await client.call("edge.forward", "relay-a", rows, None)
            assert again["through"] == 3  # the same batch again: nothing stored twice
            bad = [list(r) for r in rows]
            bad[1][4] = b"\x00"  # a flipped body: its checksum no longer matches
            nxt = [list(row_from_reading(4, Reading("s", 5.0, 4, 4)))]
            with pytest.raises(RemoteError) as info:
                await client.call("edge.forward", "relay-b", bad + nxt, None)
            assert info.value.code == ErrorCode.BAD_RECORD
            with pytest.raises(RemoteError) as info:  # ids that do not rise
                await client.call("edge.forward", "relay-b", [rows[1], rows[0]], None)
            assert info.value.code == ErrorCode.BAD_RECORD
        got = await asyncio.to_thread(cloud.store.readings, None, None, 100)
        assert [(r[0], r[1]) for r in got] == [("relay-a", 1), ("relay-a", 2), ("relay-a", 3)]
    finally:
        await cloud.server.shutdown()


async def test_disk_space_comes_back_as_the_outbox_drains(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"

    def size() -> int:
        return sum(p.stat().st_size for p in tmp_path.glob("edge.db*") if p.suffix != ".lock")

    relay = Relay(path, listen=["tcp://127.0.0.1:0"])  # no upstream yet: the backlog grows
    server = Server(patterns=[relay])
    await server.start()
    try:
        async with AsyncClient(str(relay.endpoints()[0])) as client:
            devices = [Device(client, f"d{i}", epoch=1) for i in range(8)]
            for n in range(150):
                await asyncio.gather(*(d.send({"n": n, "pad": "x" * 1000}) for d in devices))
    finally:
        await server.shutdown()  # (checkpointed: the file holds it all)
    full = size()
    assert full > 1_200_000
    cloud = Cloud(tmp_path / "cloud.db")
    await cloud.server.start()
    relay = Relay(path, upstream=cloud.url, listen=["tcp://127.0.0.1:0"], forward=FAST)
    server = Server(patterns=[relay])
    await server.start()
    try:
        assert len(await cloud.wait_rows(1200)) == 1200
        async with asyncio.timeout(timeout(10)):
            while relay.store.stored_rows:
                await asyncio.sleep(0.01)  # (the deletion commits with the next batch)
    finally:
        await server.shutdown()
        await cloud.server.shutdown()
    assert size() < full / 4  # pages given back (auto_vacuum=INCREMENTAL), the WAL truncated
