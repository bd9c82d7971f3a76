"""A durable broker (SQLite store) killed with SIGKILL mid-stream, again and again: every QoS 1
message the broker acknowledged reaches the durable subscriber, in order, and the retained
message survives (issue 16, item 1)."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from sockstack import AsyncClient
from sockstack.errors import SockstackError
from tests.conftest import timeout

KILLS = 6
PER_ROUND = 200  # messages acknowledged between kills
PUBLISHERS = 4

BROKER = """
import asyncio, sys
from sockstack import Broker, PubSub, Server
from sockstack.pubsub import SQLiteStore

async def main():
    server = Server(patterns=[PubSub(Broker(store=SQLiteStore(sys.argv[1])))],
                    tcp=["127.0.0.1:" + sys.argv[2]])
    await server.run(on_ready=lambda: print("ready", flush=True))

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BrokerProc:
    def __init__(self, store: Path, port: int) -> None:
        self.args = [sys.executable, "-c", BROKER, str(store), str(port)]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout(20)):
            while b"ready" not in (line := await self.proc.stdout.readline()):
                assert line, "the broker exited before it was ready"

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        async with asyncio.timeout(timeout(10)):
            await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(timeout(20)):
                await self.proc.wait()


async def test_kill_9_mid_stream_loses_no_acknowledged_qos1_message(tmp_path: Path) -> None:
    """Four publishers (QoS 1, each sending again what was not acknowledged) and a durable
    subscriber; the broker is killed while publishes are in flight, every other round with the
    subscriber away (its messages wait on disk) and back under the same name afterwards."""
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    broker = BrokerProc(tmp_path / "broker.db", port)
    await broker.start()
    received: list[int] = []
    arrived = asyncio.Event()

    def on_message(msg: Any) -> None:
        received.append(int(msg.value))
        arrived.set()

    acked: list[int] = []
    next_of = dict.fromkeys(range(PUBLISHERS), 0)

    async def publisher(client: AsyncClient, k: int, until: int) -> None:
        while len(acked) < until:
            n = k * 1_000_000 + next_of[k]
            try:
                await client.publish(f"orders.{k}", n, qos=1, timeout=timeout(2))
            except SockstackError:
                continue  # not acknowledged: sent again (maybe twice: at least once)
            acked.append(n)
            next_of[k] += 1

    async def subscriber() -> AsyncClient:
        client = AsyncClient(url, timeout=timeout(5))
        await client.connect()
        await client.subscribe("orders.>", durable="billing", callback=on_message)
        return client

    sub_client: AsyncClient | None = await subscriber()
    pub_client = AsyncClient(url, timeout=timeout(5))
    try:
        await pub_client.connect()
        await pub_client.publish("config", "v1", qos=1, retain=True)
        for r in range(KILLS):
            away = r % 2 == 1
            if away and sub_client is not None:
                await sub_client.close()
                sub_client = None
            target = len(acked) + PER_ROUND
            async with asyncio.timeout(timeout(30)):
                await asyncio.gather(*(publisher(pub_client, k, target) for k in range(PUBLISHERS)))
            # Killed with publishes in flight (they are sent again after the restart).
            racing = [
                asyncio.ensure_future(publisher(pub_client, k, target + PUBLISHERS))
                for k in range(PUBLISHERS)
            ]
            await broker.kill()
            await broker.start()
            async with asyncio.timeout(timeout(30)):
                await asyncio.gather(*racing)
            if sub_client is None and away:
                sub_client = await subscriber()
        async with asyncio.timeout(timeout(30)):
            while not set(acked) <= set(received):
                arrived.clear()
                await arrived.wait()
        assert set(acked) <= set(received)
        for k in range(PUBLISHERS):  # in order: each message's first arrival after the one before
            first = [n for n in dict.fromkeys(received) if n // 1_000_000 == k]
            assert first == sorted(first)
        assert len(acked) >= KILLS * PER_ROUND
        check = AsyncClient(url, timeout=timeout(5))
        await check.connect()
        try:
            sub = await check.subscribe("config")
            msg = await sub.get(timeout(5))
            assert msg.value == "v1" and msg.retained
        finally:
            await check.close()
    finally:
        if sub_client is not None:
            await sub_client.close()
        await pub_client.close()
        await broker.stop()
