"""``sockstack simulate``: devices sending readings to a relay, paced, for demos and load.

Each device is a stream ``{prefix}{n}`` sending ``{"temp": ...}`` (a random walk around 20)
``rate`` times a second for ``duration`` seconds, as DATA frames (``frames``, numbered, with an
acknowledgement when ``ack`` names a level), JSON lines (``json``) or StatsD lines (``raw``),
over TCP or UDP as the URL says. The report counts what was sent, acknowledged at each level,
refused (by error code) and never answered (over UDP: lost datagrams, or an overloaded relay).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable
from typing import Any

from sockstack.edge.messages import AckLevel, encode_data
from sockstack.edge.records import encode_value
from sockstack.errors import CallError, RemoteError
from sockstack.protocol.frames import HEADER_SIZE, read_header
from sockstack.transport.urls import parse_endpoint

__all__ = ["simulate"]

LEVELS = {"none": 0, "memory": 1, "disk": 2, "forwarded": 3}
MAX_IN_FLIGHT = 2000


async def simulate(
    url: str,
    *,
    devices: int = 10,
    rate: float = 10.0,
    duration: float = 10.0,
    fmt: str = "frames",
    ack: str = "none",
    seed: int | None = None,
    prefix: str = "dev",
    secret: bytes | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the devices; returns the report (a dict, JSON-able)."""
    if fmt not in ("frames", "json", "raw"):
        raise ValueError("format must be frames, json or raw")
    if ack not in LEVELS:
        raise ValueError("ack must be none, memory, disk or forwarded")
    if ack != "none" and fmt != "frames":
        raise ValueError("only frames carry acknowledgements (--format frames)")
    if not (0 < devices <= 100_000 and 0 < rate <= 100_000 and 0 < duration <= 86_400):
        raise ValueError("devices, rate and duration must be positive (and bounded)")
    ep = parse_endpoint(url)
    rng = random.Random(seed)
    temps = [20.0 + rng.uniform(-2, 2) for _ in range(devices)]
    seqs = [0] * devices
    epoch = int(time.time())
    report: dict[str, Any] = {
        "sent": 0,
        "acked": {},
        "refused": {},
        "unanswered": 0,
        "devices": devices,
        "format": fmt,
        "ack": ack,
    }
    level = LEVELS[ack]

    def reading(i: int) -> tuple[str, int, float]:
        temps[i] += rng.gauss(0, 0.1)
        seqs[i] += 1
        return f"{prefix}{i}", seqs[i], round(temps[i], 3)

    def line(i: int) -> bytes:
        stream, seq, temp = reading(i)
        if fmt == "json":
            text = json.dumps(
                {
                    "stream": stream,
                    "seq": seq,
                    "epoch": epoch,
                    "time": time.time(),
                    "value": {"temp": temp},
                }
            )
        else:
            text = f"{stream}:{temp}|g"
        return text.encode() + b"\n"

    sender = await _Sender.open(ep.scheme, ep.host, ep.port, fmt, level, secret, report)
    start = time.monotonic()
    total = devices * rate * duration
    sent = 0
    next_progress = start + 1.0
    try:
        while sent < total:
            now = time.monotonic()
            due = min(total, int((now - start) * devices * rate) + 1)
            while sent < due:
                i = sent % devices
                if fmt == "frames":
                    stream, seq, temp = reading(i)
                    await sender.frame(stream, seq, epoch, {"temp": temp})
                else:
                    sender.line(line(i))
                sent += 1
            report["sent"] = sent
            if progress is not None and now >= next_progress:
                next_progress = now + 1.0
                progress(dict(report, elapsed=round(now - start, 1)))
            await asyncio.sleep(0.01)
        await sender.finish()
    finally:
        await sender.close()
    elapsed = time.monotonic() - start
    report["elapsed"] = round(elapsed, 3)
    report["rate"] = round(sent / elapsed, 1) if elapsed else None
    return report


class _Sender:
    """One connection (TCP) or socket (UDP) carrying every device's readings."""

    def __init__(self, report: dict[str, Any], level: int) -> None:
        self.report = report
        self.level = level
        self.writer: asyncio.StreamWriter | None = None
        self.client: Any = None
        self.udp: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.waiting: dict[int, float] = {}  # UDP: request id -> when sent
        self.rid = 0
        self.slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    @classmethod
    async def open(
        cls,
        scheme: str,
        host: str,
        port: int,
        fmt: str,
        level: int,
        secret: bytes | None,
        report: dict[str, Any],
    ) -> _Sender:
        self = cls(report, level)
        loop = asyncio.get_running_loop()
        if scheme == "udp":
            self.udp, _ = await loop.create_datagram_endpoint(
                lambda: _Answers(self), remote_addr=(host, port)
            )
        elif fmt == "frames":
            from sockstack.clients import AsyncClient

            self.client = await AsyncClient(f"tcp://{host}:{port}", secret=secret).connect()
        else:
            _, self.writer = await asyncio.open_connection(host, port)
        return self

    def count(self, key: str, what: str) -> None:
        d = self.report[key]
        d[what] = d.get(what, 0) + 1

    async def frame(self, stream: str, seq: int, epoch: int, value: Any) -> None:
        body = encode_value(value)
        if self.udp is not None:
            rid = 0
            if self.level:
                self.rid = self.rid % 0xFFFFFFFF + 1
                rid = self.rid
                if len(self.waiting) < 100_000:
                    self.waiting[rid] = time.monotonic()
            self.udp.sendto(
                encode_data(
                    rid, stream, body, seq=seq, epoch=epoch, time=time.time(), level=self.level
                )
            )
            return
        if not self.level:
            from sockstack.edge.device import Device

            Device(self.client, stream, epoch=epoch).post(value)
            return
        await self.slots.acquire()
        task = asyncio.ensure_future(self._send(stream, seq, epoch, value))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, stream: str, seq: int, epoch: int, value: Any) -> None:
        from sockstack.edge.device import Device

        try:
            got = await Device(self.client, stream, epoch=epoch).send(
                value, seq=seq, level=self.level, time=time.time()
            )
            self.count("acked", AckLevel(got).name.lower())
        except RemoteError as exc:
            self.count("refused", exc.type)
        except CallError:
            self.report["unanswered"] += 1
        finally:
            self.slots.release()

    def line(self, data: bytes) -> None:
        if self.udp is not None:
            self.udp.sendto(data)
        else:
            assert self.writer is not None
            self.writer.write(data)

    def answered(self, data: bytes) -> None:
        if len(data) < HEADER_SIZE:
            return
        _, _, mtype, _, _, _, rid, _ = read_header(data)
        if self.waiting.pop(rid, None) is None:
            return
        if mtype == 0x04:  # RESPONSE: the level, one msgpack fixint
            self.count("acked", AckLevel(data[-1]).name.lower() if data[-1] in (1, 2, 3) else "?")
        else:
            self.count("refused", "ERROR")

    async def finish(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for the answers still due."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)
        if self.writer is not None:
            await self.writer.drain()
        deadline = time.monotonic() + min(timeout, 2.0)
        while self.waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.report["unanswered"] += len(self.waiting) + len(self.tasks)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        if self.client is not None:
            await self.client.close()
        if self.udp is not None:
            self.udp.close()


class _Answers(asyncio.DatagramProtocol):
    def __init__(self, sender: _Sender) -> None:
        self.sender = sender

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.sender.answered(data)

    def error_received(self, exc: Exception) -> None:
        pass  # (the relay is not there yet: the datagram is lost, and counted unanswered)
