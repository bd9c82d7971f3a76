"""A relay's memory stays bounded under floods and attacks, measured (tracemalloc), not taken from
its own counters: half-received lines, a flood faster than the disk, and many connections."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from pathlib import Path

from sockstack import Server
from sockstack.edge import Relay, StoreLimits
from tests.conftest import timeout

MiB = 1 << 20


async def _relay(tmp_path: Path, **limits: int) -> tuple[Relay, Server, int]:
    relay = Relay(tmp_path / "edge.db", listen=["tcp://127.0.0.1:0"], limits=StoreLimits(**limits))
    server = Server(patterns=[relay])
    await server.start()
    return relay, server, relay.endpoints()[0].port


async def test_lines_that_never_end_hold_at_most_max_line_each(tmp_path: Path) -> None:
    relay, server, port = await _relay(tmp_path)
    writers = []
    try:
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        chunk = b"x" * 65536
        for _ in range(20):
            _, w = await asyncio.open_connection("127.0.0.1", port)
            writers.append(w)
        for _ in range(32):  # 2 MiB per connection, no newline ever
            for w in writers:
                w.write(chunk)
            await asyncio.gather(*(w.drain() for w in writers))
        # Each line connection has read its 2 MiB (or is reading them): wait until every
        # connection skipped its line as too long.
        async with asyncio.timeout(timeout(10)):
            while True:
                src = next(v for k, v in relay.sources.items() if "lines" in k)
                if src.bad.get("line too long", 0) >= 20:
                    break
                await asyncio.sleep(0.01)  # (no event for "bytes were read")
        held = tracemalloc.get_traced_memory()[0] - base
        # 20 connections x 64 KiB of a line at most, plus their transports' read buffers
        assert held < 20 * 64 * 1024 + 6 * MiB, held
        for line in relay._lines:  # (the decoders themselves)
            assert line.decoder.buffered <= relay.max_line
    finally:
        tracemalloc.stop()
        for w in writers:
            w.close()
        await server.shutdown()


async def test_a_flood_faster_than_the_disk_is_held_back_not_buffered(tmp_path: Path) -> None:
    relay, server, port = await _relay(tmp_path, max_pending_bytes=256 * 1024)
    try:
        lines = b"".join(b"dev%d:%d|g\n" % (i % 100, i) for i in range(100_000))
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(lines)
        w.write_eof()
        await w.drain()
        async with asyncio.timeout(timeout(60)):
            while relay.totals["in_msgs"] < 100_000:
                await asyncio.sleep(0.05)  # (no event for "the relay took them all")
        peak = tracemalloc.get_traced_memory()[1] - base
        w.close()
    finally:
        tracemalloc.stop()
        await server.shutdown()
    # The 1.3 MB written sit in the kernel's socket buffers and in our own writer until the
    # relay reads them: what the relay holds itself is its staged batch (256 KiB of rows,
    # their Python objects several times that) and a read chunk.
    assert peak < len(lines) + 16 * MiB, peak
    assert relay.store.counters.commits > 10  # many group commits, not one huge batch
