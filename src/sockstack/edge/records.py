"""What flows through an edge relay: a :class:`Reading` (what a pipeline stage sees) and a
:class:`Row` (a reading as stored in an outbox and forwarded upstream, with its id and checksum).

A reading's value is any msgpack-able value (a number, a string, a map of fields...). In a row it
is kept as its msgpack encoding (``body``), so that a relay forwards and checks it without
decoding it, and a checksum covers every field of the row: a flipped byte anywhere in a stored or
forwarded row is found (CRC-32: it detects every burst of up to 32 flipped bits, and any other
corruption but once in 2**32; it guards against decay, not against an attacker, which the
transport's authentication does).
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, NamedTuple

import msgspec

__all__ = [
    "FIXED",
    "Reading",
    "Row",
    "decode_value",
    "encode_value",
    "row_crc",
    "row_from_reading",
]


class Reading(msgspec.Struct, frozen=True, array_like=True):
    """One reading: from a device, or made by a pipeline stage (an aggregate of a window).

    Readings are ordered per ``stream`` (a device, or the key an aggregate is made for); the
    relay keeps that order from input to the sink."""

    stream: str
    """The device or stream key, e.g. ``"site1/dev42"``."""
    time: float
    """Event time: seconds since the epoch, by the device's clock (or the relay's, for a device
    that sends none)."""
    value: Any
    """The payload: a number, a string, a map of fields... anything msgpack encodes."""
    seq: int = 0
    """The device's sequence number for ``stream`` (0: the device numbers nothing); a relay
    takes a (stream, seq) it has already committed as a retransmission, not new data."""


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


def encode_value(value: Any) -> bytes:
    """A reading's value as msgpack (the ``body`` of its row)."""
    return _encode(value)


def decode_value(body: bytes) -> Any:
    """The value a row's body holds (msgspec.DecodeError for bytes that are not msgpack)."""
    return _decode(body)


FIXED = struct.Struct(">qqd")
"""A row checksum's first bytes: id, seq, time."""


def row_crc(id: int, stream: str, seq: int, time: float, body: bytes) -> int:
    """CRC-32 of a row's fields: its id, seq and time (big-endian i64, i64, f64), the stream in
    UTF-8, a zero byte, then the body (docs/PROTOCOL.md gives the layout and a vector)."""
    crc = zlib.crc32(FIXED.pack(id, seq, time))
    crc = zlib.crc32(stream.encode() + b"\0", crc)
    return zlib.crc32(body, crc)


class Row(NamedTuple):
    """A reading as an outbox stores it and a relay forwards it: ``id`` is the relay's (rising by
    one per row it commits, never reused), ``crc`` is :func:`row_crc` of the other fields."""

    id: int
    stream: str
    seq: int
    time: float
    body: bytes
    crc: int

    def intact(self) -> bool:
        """True when the checksum matches the fields."""
        return row_crc(self.id, self.stream, self.seq, self.time, self.body) == self.crc

    def reading(self) -> Reading:
        """The reading the row holds (msgspec.DecodeError when the body is not msgpack)."""
        return Reading(self.stream, self.time, decode_value(self.body), self.seq)


def row_from_reading(id: int, reading: Reading) -> Row:
    """The row for ``reading`` under ``id``, with its checksum."""
    body = _encode(reading.value)
    stream, seq, time = reading.stream, reading.seq, float(reading.time)
    return Row(id, stream, seq, time, body, row_crc(id, stream, seq, time, body))
