"""Storage that heals itself: flip random bytes in a relay's store; `verify` reports the damage,
the relay starts on it (never a crash loop), quarantines what is bad, and forwards every row that
was intact to the sink: nothing good is lost, nothing damaged goes upstream."""

from __future__ import annotations

import asyncio
import random
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from sockstack import AsyncClient, Server
from sockstack.edge import Device, ForwardSettings, Relay, Sink
from sockstack.edge.records import decode_value
from sockstack.edge.tools import verify
from sockstack.protocol.calls import Backoff
from tests.conftest import timeout
from tests.edge.test_salvage import _row_pages, needs_dbstat

ROWS = 1500
PAGE = 4096


def _rows(path: Path) -> dict[int, tuple[Any, ...]]:
    con = sqlite3.connect(path)
    try:
        return {
            r[0]: r[1:]
            for r in con.execute("SELECT id, stream, seq, time, body FROM outbox ORDER BY id")
        }
    finally:
        con.close()


@pytest.fixture(scope="module")
def original(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[int, Any], dict[int, set[int]]]:
    """A relay's store with ROWS rows (some larger than a page), stopped cleanly."""
    path = tmp_path_factory.mktemp("heal") / "edge.db"

    async def fill() -> None:
        relay = Relay(path, listen=["tcp://127.0.0.1:0"])
        server = Server(patterns=[relay])
        await server.start()
        try:
            async with AsyncClient(str(relay.endpoints()[0])) as client:
                devices = [Device(client, f"site/dev{i}", epoch=1) for i in range(10)]
                for n in range(ROWS // 10):
                    big = "x" * 6000 if n % 37 == 0 else ""
                    await asyncio.gather(*(d.send({"n": n, "pad": big}) for d in devices))
        finally:
            await server.shutdown()

    asyncio.run(fill())
    rows = _rows(path)
    assert len(rows) == ROWS
    return path, rows, _row_pages(path)


@needs_dbstat
@pytest.mark.parametrize(
    "how", ["anywhere-0", "anywhere-1", "anywhere-2", "anywhere-3", "values", "page-headers"]
)
async def test_flipped_bytes_are_reported_quarantined_and_the_rest_forwarded(
    tmp_path: Path, how: str, original: tuple[Path, dict[int, Any], dict[int, set[int]]]
) -> None:
    source, rows, pages = original
    path = tmp_path / "edge.db"
    shutil.copy(source, path)
    rng = random.Random(how)
    data = bytearray(path.read_bytes())
    touched: set[int] = set()
    if how == "values":  # inside three rows' values only: SQLite sees nothing wrong
        for i in rng.sample(sorted(rows), 3):
            at = data.find(rows[i][3]) + len(rows[i][3]) // 2
            data[at] ^= 0x10
            touched.add(at // PAGE + 1)
    elif how == "page-headers":  # two table-leaf pages' headers: SQLite refuses the file
        leaves = sorted({min(p) for p in pages.values()})
        for page in rng.sample(leaves, 2):
            data[(page - 1) * PAGE] = 0x55
            touched.add(page)
    else:
        for _ in range(rng.randint(1, 12)):
            at = rng.randrange(100, len(data))
            data[at] ^= 1 << rng.randrange(8)
            touched.add(at // PAGE + 1)
    path.write_bytes(bytes(data))
    untouched = {i for i, p in pages.items() if not p & touched}

    found = verify(str(path), repair=False)  # reports; changes nothing
    damaged = len(untouched) < ROWS
    if damaged:
        assert found["integrity"] != "ok" or found.get("rows_bad", 0) > 0, found

    from sockstack.edge.sink import open_sink

    sink = open_sink(str(tmp_path / "cloud.db"))
    cloud = Server(patterns=[Sink(sink)], tcp=["127.0.0.1:0"])
    await cloud.start()
    relay = Relay(
        path,
        upstream=f"tcp://127.0.0.1:{cloud.endpoints[0].port}",
        listen=["tcp://127.0.0.1:0"],
        forward=ForwardSettings(backoff=Backoff(0.01, 2.0, 0.1)),
    )
    edge = Server(patterns=[relay])
    await edge.start()  # starts on a damaged store: never a crash loop
    try:
        async with asyncio.timeout(timeout(30)):
            while relay.store.stored_rows:  # drained: forwarded, or quarantined
                await asyncio.sleep(0.02)  # (the backlog shrinks commit by commit)
        stats = relay.stats()["store"]
        got = await asyncio.to_thread(sink.readings, None, None, 100_000)
    finally:
        await edge.shutdown()
        await cloud.shutdown()
    by_id = {r[1]: r for r in got}
    for i in untouched:  # every intact row reached the sink...
        assert i in by_id, f"row {i} (untouched) lost; {stats}"
    for i, (_, _, stream, seq, t, value) in by_id.items():  # ...and only rows as written
        o_stream, o_seq, o_time, o_body = rows[i]
        assert (stream, seq, t, value) == (o_stream, o_seq, o_time, decode_value(o_body))
    if stats["heals"]:
        assert stats["damaged_file"] and Path(stats["damaged_file"]).exists()
    assert len(untouched) <= len(by_id) <= ROWS - stats["quarantined"]
    if how == "values":  # found by the rows' checksums: exactly those three quarantined
        assert stats["heals"] == 0 and stats["quarantined"] == 3 and len(by_id) == ROWS - 3
    if how == "page-headers":  # found by SQLite: the store rebuilt from what is intact
        assert stats["heals"] == 1 and stats["salvaged"] >= len(untouched)
    if stats["heals"] == 0:  # every row either reached the sink or is in quarantine
        assert len(by_id) + stats["quarantined"] == ROWS
