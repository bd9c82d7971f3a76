"""A device's side: send readings to a relay and learn what each acknowledgement achieved.

::

    async with AsyncClient("tcp://127.0.0.1:5061") as client:
        device = Device(client, "site1/dev42")
        level = await device.send({"temp": 21.5})        # AckLevel.DISK: on the relay's disk

Over TCP (a sockstack session, authenticated when the relay has a secret). Readings are
numbered (epoch, seq): ``epoch`` defaults to the current time in seconds, so a device that
restarts never repeats a number the relay has already taken; a reading sent again after a lost
answer is acknowledged again and stored once.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from sockstack.edge.messages import AckLevel, encode_data, encode_readings
from sockstack.edge.records import encode_value

__all__ = ["Device"]


class Device:
    """Readings of one stream over ``client`` (a connected :class:`sockstack.AsyncClient`)."""

    def __init__(self, client: Any, stream: str, *, epoch: int | None = None) -> None:
        self.client = client
        self.stream = stream
        self.epoch = int(time.time()) if epoch is None else epoch
        self._seq = itertools.count(1)

    def next_seq(self) -> int:
        return next(self._seq)

    async def send(
        self,
        value: Any,
        *,
        time: float | None = None,
        level: AckLevel | int = 0,
        seq: int | None = None,
        timeout: float = 10.0,
    ) -> AckLevel:
        """Send one reading; returns the level the relay achieved (raises RemoteError when it
        refused: STORE_FULL, OVERLOADED...). ``level`` 0: the relay's level for the stream."""
        channel = self.client.stream_channel("DATA")
        body = encode_value(value)
        n = self.next_seq() if seq is None else seq
        _, result = await channel.exchange(
            lambda rid: encode_data(
                rid, self.stream, body, seq=n, epoch=self.epoch, time=time, level=int(level)
            ),
            "DATA",
            timeout,
        )
        return AckLevel(result)

    async def send_many(
        self,
        values: list[Any],
        *,
        times: list[float | None] | None = None,
        level: AckLevel | int = 0,
        timeout: float = 10.0,
    ) -> AckLevel:
        """Send readings in one READINGS frame (numbered one after another); returns the lowest
        level the relay achieved over them (RemoteError when it refused them: all or none)."""
        channel = self.client.stream_channel("READINGS")
        first = next(self._seq)
        for _ in range(len(values) - 1):
            next(self._seq)
        stamps = times if times is not None else [None] * len(values)
        items = [
            (self.stream, self.epoch, first + i, t, v)
            for i, (v, t) in enumerate(zip(values, stamps, strict=True))
        ]
        _, result = await channel.exchange(
            lambda rid: encode_readings(rid, items, level=int(level)), "READINGS", timeout
        )
        return AckLevel(result)

    def post(self, value: Any, *, time: float | None = None) -> bool:
        """Send one reading without asking for an acknowledgement (False: not connected)."""
        channel = self.client.stream_channel("DATA")
        frame = encode_data(
            0,
            self.stream,
            encode_value(value),
            seq=self.next_seq(),
            epoch=self.epoch,
            time=time,
        )
        return bool(channel.send_soon(frame))
