"""Edge -> fog -> cloud over loopback: the edge filters and averages per device, the fog
aggregates the devices' averages per site, the cloud stores the sites' figures exactly once,
and says how much each relay reduced the data."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from sockstack import AsyncClient, Server
from sockstack.edge import AckLevel, Device, ForwardSettings, Reading, Relay, Sink
from sockstack.edge.pipeline import Filter, Pipeline, TumblingWindow
from sockstack.protocol.calls import Backoff
from tests.conftest import timeout

FAST = ForwardSettings(backoff=Backoff(0.01, 2.0, 0.1))
# Event times an hour ahead (a device's clock): the relays' wall-clock ticks close no window, the
# readings' own times do (each window stage's watermark), so the test does not depend on timing.
T0 = (int(time.time()) // 10 + 360) * 10.0


def site(r: Reading) -> str:
    return r.stream.split("/")[0]


async def test_edge_fog_cloud(tmp_path: Path) -> None:
    from sockstack.edge.sink import open_sink

    sink = open_sink(str(tmp_path / "cloud.db"))
    cloud = Server(patterns=[Sink(sink)], tcp=["127.0.0.1:0"])
    await cloud.start()
    fog = Relay(
        tmp_path / "fog.db",
        Pipeline(TumblingWindow(10.0, key=site, field="mean", aggregates=("count", "mean"))),
        upstream=f"tcp://127.0.0.1:{cloud.endpoints[0].port}",
        listen=["tcp://127.0.0.1:0"],
        forward=FAST,
    )
    fog_server = Server(patterns=[fog])
    await fog_server.start()
    edge = Relay(
        tmp_path / "edge.db",
        Pipeline(
            Filter(lambda r: r.value < 100),  # a broken sensor's 999s go no further
            TumblingWindow(10.0, aggregates=("count", "mean", "max")),
        ),
        upstream=str(fog.endpoints()[0]),
        listen=["tcp://127.0.0.1:0"],
        forward=FAST,
    )
    edge_server = Server(patterns=[edge])
    await edge_server.start()
    try:
        values = {"a/dev1": [20.0, 22.0], "a/dev2": [30.0, 32.0], "b/dev1": [10.0, 999.0, 14.0]}
        async with AsyncClient(str(edge.endpoints()[0])) as client:
            for stream, vs in values.items():
                device = Device(client, stream, epoch=1)
                for i, v in enumerate(vs):
                    assert await device.send(v, time=T0 + i) == AckLevel.DISK
            later = Device(client, "c/dev9", epoch=1)  # moves the watermarks on: at the edge
            await later.send(1.0, time=T0 + 25)  # [T0, T0+10) closes; its means reach the fog
            await later.send(1.0, time=T0 + 45)  # [T0+20, T0+30) closes: the fog's [T0+10, ...)
        got: list[tuple[Any, ...]] = []

        async with asyncio.timeout(timeout(20)):
            while len(got) < 2:
                await asyncio.sleep(0.05)  # (no event from the cloud's store to wait on)
                got = await asyncio.to_thread(sink.readings, None, None, 100)
        by_site = {r[2]: r[5] for r in got}
        fog_stats, edge_stats = fog.stats(), edge.stats()
        cloud_stats = await asyncio.to_thread(sink.stats)
    finally:
        await edge_server.shutdown()
        await fog_server.shutdown()
        await cloud.shutdown()
    assert set(by_site) == {"a", "b"} and len(got) == 2  # once each
    assert by_site["a"]["count"] == 2 and by_site["a"]["mean"] == 26.0  # (21 + 31) / 2
    assert by_site["b"]["count"] == 1 and by_site["b"]["mean"] == 12.0  # the 999 filtered out
    assert {r[0] for r in got} == {fog.store.origin}  # the cloud hears the fog, not the edge
    assert edge_stats["totals"]["in_msgs"] == 9 and edge_stats["totals"]["out_msgs"] == 4
    assert fog_stats["totals"]["in_msgs"] == 4 and fog_stats["totals"]["out_msgs"] == 2
    assert edge_stats["pipeline"] is not None
    origins = str(cloud_stats)
    assert fog.store.origin in origins  # what the fog reported of its reduction
