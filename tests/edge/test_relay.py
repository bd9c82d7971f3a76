"""A relay over real loopback sockets and a real store: ingest in every format, the
acknowledgement levels, retransmissions, bad input, UDP loss, the store's bounds and policies."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from sockstack import AsyncClient, Server
from sockstack.edge.device import Device
from sockstack.edge.messages import AckLevel, encode_data
from sockstack.edge.pattern import Relay
from sockstack.edge.records import encode_value
from sockstack.edge.store import Outbox, StoreLimits
from sockstack.errors import ErrorCode, RemoteError
from sockstack.protocol.frames import parse_datagram
from sockstack.protocol.messages import CORE_MESSAGES, decode_message
from sockstack.protocol.registry import Registry
from tests.conftest import timeout

CORE = Registry([CORE_MESSAGES], frozen=True)


@asynccontextmanager
async def relay_at(
    path: Path, secret: bytes | None = None, **kwargs: Any
) -> AsyncIterator[tuple[Relay, str, tuple[str, int]]]:
    """A relay with a TCP and a UDP listener; yields (relay, tcp URL, udp address)."""
    relay = Relay(path, listen=["tcp://127.0.0.1:0", "udp://127.0.0.1:0"], **kwargs)
    server = Server(patterns=[relay], secret=secret)
    await server.start()
    try:
        eps = {e.scheme: e for e in relay.endpoints()}
        yield relay, f"tcp://127.0.0.1:{eps['tcp'].port}", ("127.0.0.1", eps["udp"].port)
    finally:
        await server.shutdown()


def rows(path: Path) -> list[tuple[Any, ...]]:
    import sqlite3

    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT id, stream, seq, body FROM outbox ORDER BY id").fetchall()
    finally:
        con.close()


async def committed(relay: Relay) -> None:
    """Wait until what the relay staged so far is on disk."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    relay.store.pending.done.append(lambda b, e: done.done() or done.set_result(None))
    relay.store.flush()
    async with asyncio.timeout(timeout(5)):
        await done


async def test_levels_duplicates_and_order(tmp_path: Path) -> None:
    async with relay_at(tmp_path / "edge.db") as (relay, url, _), AsyncClient(url) as client:
        device = Device(client, "site1/dev1", epoch=1)
        assert await device.send(1.5) == AckLevel.DISK  # the relay's default
        assert await device.send(2.5, level=AckLevel.MEMORY) == AckLevel.MEMORY
        # No upstream: FORWARDED cannot be had; the answer says what was achieved.
        assert await device.send(3.5, level=AckLevel.FORWARDED) == AckLevel.DISK
        # A retransmission of seq 2 (its answer was lost, say): acknowledged, stored once.
        assert await device.send(2.5, seq=2, level=AckLevel.DISK) == AckLevel.DISK
        await committed(relay)
        stats = relay.stats()["sources"]["sessions"]
        assert stats["duplicates"] == 1 and stats["accepted"] == 3
    stored = rows(tmp_path / "edge.db")
    assert [(r[1], r[2]) for r in stored] == [
        ("site1/dev1", 1),
        ("site1/dev1", 2),
        ("site1/dev1", 3),
    ]
    assert [r[0] for r in stored] == [1, 2, 3]


async def test_positions_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    async with relay_at(path) as (_, url, _), AsyncClient(url) as client:
        device = Device(client, "d", epoch=5)
        for i in range(3):
            await device.send(i)
    async with relay_at(path) as (relay, url, _), AsyncClient(url) as client:
        again = Device(client, "d", epoch=5)
        assert await again.send(2, seq=3) == AckLevel.DISK  # seen before the restart
        assert await again.send(9, seq=4) == AckLevel.DISK
        assert relay.stats()["sources"]["sessions"]["duplicates"] == 1
        # A device that restarted numbers from 1 again under a larger epoch: new data.
        rebooted = Device(client, "d", epoch=6)
        assert await rebooted.send(10) == AckLevel.DISK
    assert [r[2] for r in rows(path)] == [1, 2, 3, 4, 1]


async def test_lines_and_datagrams_in_every_format(tmp_path: Path) -> None:
    async with relay_at(tmp_path / "edge.db") as (relay, url, udp):
        port = int(url.rsplit(":", 1)[1])
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b'{"device": "j1", "seq": 1, "time": 1767225600.5, "value": {"t": 3}}\n'
            b"cpu.load:0.5|g|#site:a\n"
            b"disk.free 1234.5 1767225601\n"
            b"{not json\n"
            b'{"stream": "j2", "value": 2}'  # the last line, without a newline: taken at EOF
        )
        writer.write_eof()
        await writer.drain()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"u.count:1|c\nu.gauge:2|g", udp)
            sock.sendto(encode_data(0, "u.frame", encode_value(7), seq=1, epoch=1), udp)
            sock.sendto(b"SK\x01\x30garbage", udp)  # a frame that does not parse
            writer.close()
            async with asyncio.timeout(timeout(5)):
                while relay.stats()["totals"]["in_msgs"] < 7:
                    await asyncio.sleep(0.01)  # (no event for "a datagram arrived")
        await committed(relay)
        sources = relay.stats()["sources"]
    tcp_lines = next(v for k, v in sources.items() if k.startswith("tcp") and "lines" in k)
    assert tcp_lines["received"] == 5 and tcp_lines["accepted"] == 4
    assert tcp_lines["bad"] == {"not JSON": 1}
    udp_frames = next(v for k, v in sources.items() if k.startswith("udp") and "frames" in k)
    assert udp_frames["accepted"] == 1 and sum(udp_frames["bad"].values()) == 1
    stored = {r[1] for r in rows(tmp_path / "edge.db")}
    assert stored == {"j1", "j2", "cpu.load", "disk.free", "u.count", "u.gauge", "u.frame"}


async def test_udp_acknowledgements_and_loss_counted(tmp_path: Path) -> None:
    async with relay_at(tmp_path / "edge.db") as (relay, _, udp):
        loop = asyncio.get_running_loop()
        answers: asyncio.Queue[bytes] = asyncio.Queue()

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                answers.put_nowait(data)

        transport, _ = await loop.create_datagram_endpoint(Proto, remote_addr=udp)
        try:
            sent = []
            for seq in (1, 2, 5, 6):  # 3 and 4 lost on the way
                frame = encode_data(seq, "sensor", encode_value(seq), seq=seq, epoch=1, level=2)
                sent.append(len(frame))
                transport.sendto(frame)
            got = []
            async with asyncio.timeout(timeout(5)):
                for _ in range(4):
                    got.append(await answers.get())
        finally:
            transport.close()
        for answer in got:
            msg = decode_message(parse_datagram(answer, 1024), CORE)
            assert msg.result == AckLevel.DISK  # type: ignore[union-attr]
            assert len(answer) <= min(sent)  # never more bytes than the datagram carried
        frames = next(v for k, v in relay.stats()["sources"].items() if "frames" in k)
        assert frames["lost"] == 2 and frames["accepted"] == 4


async def test_store_full_refuses_with_a_code(tmp_path: Path) -> None:
    limits = StoreLimits(max_bytes=4000, when_full="refuse")
    async with relay_at(tmp_path / "edge.db", limits=limits) as (relay, url, _):
        async with AsyncClient(url) as client:
            device = Device(client, "d", epoch=1)
            accepted = 0
            with pytest.raises(RemoteError) as info:
                for _ in range(200):  # bounded: 4000 bytes hold about 40 readings of 50 bytes
                    await device.send("x" * 50)
                    accepted += 1
            assert info.value.code == ErrorCode.STORE_FULL
            assert 20 <= accepted < 80
            await committed(relay)
            st = relay.stats()
            assert st["store"]["bytes"] <= 4000
            assert st["store"]["refused_full"] >= 1
            assert st["sources"]["sessions"]["dropped"] == {"store full": 1}
    assert len(rows(tmp_path / "edge.db")) == accepted  # everything acknowledged is kept


async def test_drop_oldest_keeps_the_newest(tmp_path: Path) -> None:
    limits = StoreLimits(max_bytes=4000, when_full="drop_oldest")
    async with relay_at(tmp_path / "edge.db", limits=limits) as (relay, url, _):
        async with AsyncClient(url) as client:
            device = Device(client, "d", epoch=1)
            for i in range(200):
                assert await device.send({"i": i, "pad": "x" * 40}) == AckLevel.DISK
        await committed(relay)
        st = relay.stats()["store"]
        assert st["bytes"] <= 4000 and st["dropped_full"] > 100
    kept = rows(tmp_path / "edge.db")
    assert kept[-1][2] == 200  # the newest stays
    assert [r[2] for r in kept] == list(range(kept[0][2], 201))  # a contiguous tail


async def test_a_second_relay_on_the_same_store_is_refused(tmp_path: Path) -> None:
    from sockstack.edge.store import StoreLocked

    async with relay_at(tmp_path / "edge.db"):
        with pytest.raises(StoreLocked):
            Outbox(tmp_path / "edge.db").open()


async def test_with_a_secret_sessions_authenticate_and_lines_are_refused(tmp_path: Path) -> None:
    secret = b"s3cret-for-the-relay"
    async with relay_at(tmp_path / "edge.db", secret=secret) as (relay, url, udp):
        async with AsyncClient(url, secret=secret) as client:
            assert await Device(client, "ok", epoch=1).send(1) == AckLevel.DISK
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b'{"stream": "sneaky", "value": 1}\n')
        async with asyncio.timeout(timeout(5)):
            assert await reader.read() == b""  # closed without a word
        writer.close()
        with pytest.raises(Exception):  # noqa: B017 (whatever the client raises: no session)
            async with AsyncClient(url, secret=b"wrong", reconnect=False) as bad:
                await Device(bad, "bad", epoch=1).send(1, timeout=timeout(2))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"sneaky:1|c", udp)  # an unauthenticated line: dropped, counted
            async with asyncio.timeout(timeout(5)):
                while not (udp_lines := relay.stats()["sources"][f"udp://{udp[0]}:{udp[1]} lines"])[
                    "dropped"
                ]:
                    await asyncio.sleep(0.01)  # (no event for "a datagram arrived")
        assert list(udp_lines["dropped"]) == ["unauthenticated (the relay has a secret)"]
        await committed(relay)
    assert {r[1] for r in rows(tmp_path / "edge.db")} == {"ok"}


async def test_prometheus_metrics_of_a_relay(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    from sockstack.metrics import ServerMetrics

    metrics = ServerMetrics()
    relay = Relay(tmp_path / "edge.db", listen=["tcp://127.0.0.1:0"])
    server = Server(patterns=[relay], interceptors=[metrics])
    await server.start()
    try:
        async with AsyncClient(str(relay.endpoints()[0])) as client:
            device = Device(client, "m", epoch=1)
            for i in (1, 2, 5):  # 3 and 4 never sent: lost
                await device.send(i, seq=i)
        text = generate_latest(metrics.registry).decode()
    finally:
        await server.shutdown()
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("sockstack_edge_")
    }
    assert values["sockstack_edge_backlog_rows"] == 3
    assert values["sockstack_edge_lost_total"] == 2
    assert values["sockstack_edge_committed_rows_total"] == 3
    assert values["sockstack_edge_oldest_age_seconds"] >= 0


async def test_readings_in_one_frame_one_answer(tmp_path: Path) -> None:
    async with relay_at(tmp_path / "edge.db") as (relay, url, udp), AsyncClient(url) as client:
        device = Device(client, "batch", epoch=1)
        assert await device.send_many([1.0, 2.0, 3.0]) == AckLevel.DISK
        assert await device.send_many([4.0, 5.0], level=AckLevel.MEMORY) == AckLevel.MEMORY
        # The first frame again (its answer lost): taken as a retransmission, stored once.
        again = Device(client, "batch", epoch=1)
        assert await again.send_many([1.0, 2.0, 3.0]) == AckLevel.DISK
        loop = asyncio.get_running_loop()
        answers: asyncio.Queue[bytes] = asyncio.Queue()

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                answers.put_nowait(data)

        from sockstack.edge.messages import encode_readings

        transport, _ = await loop.create_datagram_endpoint(Proto, remote_addr=udp)
        try:
            frame = encode_readings(9, [("u", 1, 1, None, 1), ("u", 1, 2, None, 2)], level=2)
            transport.sendto(frame)
            transport.sendto(b"SK\x01\x31" + frame[4:-3])  # a body cut short: refused, counted
            async with asyncio.timeout(timeout(5)):
                answer = await answers.get()
        finally:
            transport.close()
        assert decode_message(parse_datagram(answer, 1024), CORE).result == AckLevel.DISK  # type: ignore[union-attr]
        await committed(relay)
        sessions = relay.stats()["sources"]["sessions"]
        assert sessions["accepted"] == 5 and sessions["duplicates"] == 3
    assert [(r[1], r[2]) for r in rows(tmp_path / "edge.db")] == [
        ("batch", 1), ("batch", 2), ("batch", 3), ("batch", 4), ("batch", 5), ("u", 1), ("u", 2)
    ]  # fmt: skip


async def test_readings_through_a_pipeline(tmp_path: Path) -> None:
    from sockstack.edge import Filter, Map, Pipeline, Reading

    pipeline = Pipeline(
        Filter(lambda r: r.value >= 0), Map(lambda r: Reading(r.stream, r.time, r.value * 10))
    )
    async with relay_at(tmp_path / "edge.db", pipeline=pipeline) as (relay, url, _):
        async with AsyncClient(url) as client:
            device = Device(client, "p", epoch=1)
            assert await device.send_many([1, -5, 2]) == AckLevel.DISK
            assert await device.send_many([1, -5, 2], level=AckLevel.MEMORY) == AckLevel.MEMORY
        await committed(relay)
        stats = relay.stats()
    assert [r[3] for r in rows(tmp_path / "edge.db")] == [b"\x0a", b"\x14", b"\x0a", b"\x14"]
    assert stats["pipeline"]["stages"]["0:filter"]["dropped"] == {"filtered": 2}


async def test_readings_posted_without_an_answer(tmp_path: Path) -> None:
    async with relay_at(tmp_path / "edge.db") as (relay, url, _), AsyncClient(url) as client:
        device = Device(client, "quiet", epoch=1)
        assert all(device.post(i) for i in range(3))  # no answer asked: nothing waits
        assert await device.send(3) == AckLevel.DISK  # after those, on the same connection
        await committed(relay)
    assert [r[2] for r in rows(tmp_path / "edge.db")] == [1, 2, 3, 4]
