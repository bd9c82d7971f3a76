"""The relay's promise under crashes: kill -9 at 50 random moments while devices send and the
uplink flaps, restart it each time; every reading acknowledged at DISK reaches the sink exactly
once, in order per device.

The relay runs as a real process (``sockstack edge``) on real files; devices, a flapping TCP
proxy (resets and stalls) and the sink (SQLite) run in the test's loop, over loopback.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from sockstack import AsyncClient, Server
from sockstack.edge.device import Device
from sockstack.edge.messages import AckLevel
from sockstack.edge.pattern import Sink
from sockstack.errors import CallError
from tests.conftest import timeout
from tests.helpers.faultproxy import TCPFaultProxy

KILLS = 50
DEVICES = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Relay:
    """``sockstack edge`` as a child process, restarted on the same store and port."""

    def __init__(self, store: Path, port: int, upstream: str) -> None:
        self.args = [
            sys.executable, "-m", "sockstack", "--log-level", "WARNING", "edge",
            "--store", str(store), "--listen", f"tcp://127.0.0.1:{port}",
            "--upstream", upstream, "--batch-rows", "50",
        ]  # fmt: skip
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout(20)):
            while b"Ctrl-C stops" not in await self.proc.stdout.readline():
                pass
        self.starts += 1

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


class Devices:
    """Numbered readings, one at a time per device, each sent again until acknowledged."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.acked: dict[str, list[int]] = {f"dev{i}": [] for i in range(DEVICES)}
        self.total = 0
        self.progress = asyncio.Event()
        self.stopping = False
        self.errors = 0

    async def run(self, name: str) -> None:
        async with AsyncClient(f"tcp://127.0.0.1:{self.port}", timeout=5.0) as client:
            device = Device(client, name, epoch=7)
            seq = 0
            while not self.stopping:
                seq += 1
                while not self.stopping:
                    try:
                        level = await device.send(
                            {"n": seq}, seq=seq, level=AckLevel.DISK, timeout=timeout(5)
                        )
                    except CallError:
                        self.errors += 1
                        await asyncio.sleep(0.02)  # (a device's pause before it sends again)
                        continue
                    assert level >= AckLevel.DISK
                    self.acked[name].append(seq)
                    self.total += 1
                    self.progress.set()
                    break

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(timeout(20)):
            while self.total < count:
                self.progress.clear()
                await self.progress.wait()


async def flap(proxy: TCPFaultProxy, rng: random.Random, stop: asyncio.Event) -> None:
    """The uplink fails often: connections reset, or everything stalls for a while."""
    stalled = False
    while not stop.is_set():
        try:
            async with asyncio.timeout(rng.uniform(0.05, 0.3)):
                await stop.wait()
        except TimeoutError:
            pass
        if rng.random() < 0.5:
            proxy.reset()
        else:
            stalled = not stalled
            proxy.stall(stalled)


@pytest.mark.timeout(240)
async def test_kill_9_at_random_moments_loses_and_repeats_nothing(tmp_path: Path) -> None:
    from sockstack.edge.sink import open_sink

    rng = random.Random(int(os.environ.get("SOCKSTACK_CRASH_SEED", "15")))
    arrived = asyncio.Event()
    loop = asyncio.get_running_loop()
    store = open_sink(str(tmp_path / "cloud.db"))
    accept = store.accept

    def accept_and_tell(*args: Any, **kwargs: Any) -> int:
        through = accept(*args, **kwargs)
        loop.call_soon_threadsafe(arrived.set)
        return int(through)

    store.accept = accept_and_tell  # type: ignore[method-assign]
    cloud = Server(patterns=[Sink(store)], tcp=["127.0.0.1:0"])
    await cloud.start()
    cloud_port = cloud.endpoints[0].port
    proxy = await TCPFaultProxy(("127.0.0.1", cloud_port)).start()
    relay_port = free_port()
    relay = Relay(tmp_path / "edge.db", relay_port, f"tcp://127.0.0.1:{proxy.port}")
    devices = Devices(relay_port)
    stop_flapping = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        await relay.start()
        tasks = [asyncio.create_task(devices.run(name)) for name in devices.acked]
        flapper = asyncio.create_task(flap(proxy, rng, stop_flapping))
        for _ in range(KILLS):
            await devices.wait_for(devices.total + rng.randint(1, 40))
            await asyncio.sleep(rng.uniform(0, 0.02))  # (a random moment, not a wait for one)
            await relay.kill()
            await relay.start()
        devices.stopping = True
        async with asyncio.timeout(timeout(20)):
            await asyncio.gather(*tasks)
        stop_flapping.set()
        await flapper
        proxy.stall(False)
        acked = {name: set(seqs) for name, seqs in devices.acked.items()}
        wanted = sum(len(s) for s in acked.values())
        # Everything acknowledged reaches the sink once the uplink holds (bounded wait).
        async with asyncio.timeout(timeout(60)):
            while True:
                arrived.clear()
                got = await asyncio.to_thread(store.readings, None, None, 1_000_000)
                have = {(r[2], r[3]) for r in got}
                if all((name, s) in have for name, seqs in acked.items() for s in seqs):
                    break
                await arrived.wait()
        await relay.stop()
        got = await asyncio.to_thread(store.readings, None, None, 1_000_000)
    finally:
        devices.stopping = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if relay.proc is not None and relay.proc.returncode is None:
            relay.proc.kill()
            await relay.proc.wait()
        await proxy.close()
        await cloud.shutdown()
    assert relay.starts == KILLS + 1
    assert proxy.resets > 0 and devices.errors > 0  # the faults did happen
    assert wanted >= KILLS
    per_stream: dict[str, list[int]] = {}
    for _origin, _id, stream, seq, _time, value in got:
        per_stream.setdefault(stream, []).append(seq)
        assert value == {"n": seq}
    for name, seqs in acked.items():
        arrived_seqs = per_stream.get(name, [])
        assert arrived_seqs == sorted(set(arrived_seqs)), f"{name}: out of order or twice"
        assert seqs <= set(arrived_seqs), f"{name}: acknowledged readings missing"
    origins = {r[0] for r in got}
    assert len(origins) == 1  # one relay, one identity across its 51 lives
