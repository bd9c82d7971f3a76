"""The edge relays' message (type 0x30, in the range 0x30-0x3F docs/PROTOCOL.md reserves for
them): DATA, one device reading, on a stream or in one datagram.

Byte layout (docs/PROTOCOL.md §4.6):

- header: type 0x30; ``request_id`` 0 = no acknowledgement wanted, else the relay answers with
  RESPONSE (same id; result: the acknowledgement level achieved, a msgpack positive fixint:
  1 memory, 2 disk, 3 forwarded) or ERROR; flags bits 2-3 (``level << 2``): the level
  wanted (0: the relay's configured level for the stream, 1 memory, 2 disk, 3 forwarded);
  codec: the value's codec (0 raw bytes, 1 msgpack, 2 JSON).
- meta: ``epoch`` u32, ``seq`` u64, ``time`` f64 (event time, seconds since the epoch; NaN: the
  relay's clock), all big-endian, then the stream name in UTF-8 (1-255 bytes).
- body: the value in the header's codec.

(epoch, seq) numbers a device's readings per stream: a relay takes a reading whose (epoch, seq)
is not above the last it committed for the stream as a retransmission (acknowledged again, not
stored twice). A device that restarts picks a new, larger epoch (its boot count, or its boot
time in seconds) and may start its seq again at 1. seq 0 means "not numbered": never taken for
a retransmission. The answer (RESPONSE, 17 bytes) is never larger than the DATA it answers (at
least 37 bytes): no amplification over UDP.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Sequence
from typing import Any

import msgspec

from sockstack.errors import ErrorCode, RemoteProtocolError
from sockstack.protocol.codecs import CODECS
from sockstack.protocol.events import PatternMessage, Role, message
from sockstack.protocol.frames import Frame, pack_header
from sockstack.protocol.registry import MessageSet, MessageSpec

__all__ = [
    "DATA",
    "EDGE_MESSAGES",
    "MAX_STREAM",
    "READINGS",
    "AckLevel",
    "Data",
    "Readings",
    "encode_data",
    "encode_readings",
]

DATA = 0x30
READINGS = 0x31
MAX_READINGS = 65_536  # readings in one READINGS frame (the frame's size bounds them first)
MAX_STREAM = 255  # bytes of a stream name
_META = struct.Struct(">IQd")  # epoch, seq, time
_U32 = 1 << 32
_LEVEL_SHIFT = 2  # flag bits 2-3 (bit 1 is AUTH on a sealed datagram, §6.1)
_LEVEL_MASK = 0x03


class AckLevel(enum.IntEnum):
    """What an acknowledgement says was achieved for a reading (docs/EDGE.md)."""

    MEMORY = 1
    """Accepted in the relay's memory: lost if the relay crashes before it commits."""
    DISK = 2
    """Committed to the relay's store and fsync'd: survives a crash or power loss of the relay."""
    FORWARDED = 3
    """What the reading made was acknowledged by the upstream as durable there."""


@message
class Data(PatternMessage):
    request_id: int
    stream: str
    epoch: int
    seq: int
    time: float | None
    """Event time (None: NaN on the wire, the relay's clock)."""
    value: bytes
    codec: int = 1
    level: int = 0
    """The level the device asks for (0: the relay's for the stream)."""


def encode_data(
    request_id: int,
    stream: str,
    value: bytes,
    *,
    seq: int = 0,
    epoch: int = 0,
    time: float | None = None,
    codec: int = 1,
    level: int = 0,
) -> bytes:
    """A DATA frame; ``value`` already in ``codec``."""
    name = stream.encode()
    if not 0 < len(name) <= MAX_STREAM:
        raise ValueError(f"a stream name is 1-{MAX_STREAM} bytes of UTF-8, not {len(name)}")
    meta = _META.pack(epoch, seq, math.nan if time is None else time) + name
    return (
        pack_header(
            DATA, (level & _LEVEL_MASK) << _LEVEL_SHIFT, codec, len(meta), request_id, len(value)
        )
        + meta
        + value
    )


def _decode_data(f: Frame) -> Data:
    if f.codec not in CODECS:
        raise RemoteProtocolError(f"unknown codec id {f.codec}", ErrorCode.UNSUPPORTED_CODEC)
    meta = f.meta
    if not _META.size < len(meta) <= _META.size + MAX_STREAM:
        raise RemoteProtocolError(
            f"DATA meta is epoch, seq, time and a stream name of 1-{MAX_STREAM} bytes",
            ErrorCode.DECODE_ERROR,
        )
    epoch, seq, time = _META.unpack_from(meta)
    try:
        stream = meta[_META.size :].decode()
    except UnicodeDecodeError:
        raise RemoteProtocolError("DATA stream name is not UTF-8", ErrorCode.DECODE_ERROR) from None
    if math.isinf(time):
        raise RemoteProtocolError("DATA time is infinite", ErrorCode.DECODE_ERROR)
    return Data(
        f.request_id,
        stream,
        epoch,
        seq,
        None if math.isnan(time) else time,
        f.body,
        f.codec,
        (f.flags >> _LEVEL_SHIFT) & _LEVEL_MASK,
    )


@message
class Readings(PatternMessage):
    """READINGS: many readings in one frame (a device that batches, or a gateway for many)."""

    request_id: int
    items: list[tuple[str, int, int, float | None, msgspec.Raw]]
    """(stream, epoch, seq, time or None, the value's msgpack bytes), in order."""
    level: int = 0
    size: int = 0
    """Bytes of the body."""


_ITEMS = msgspec.msgpack.Decoder(list[tuple[str, int, int, float | None, msgspec.Raw]])
_encode_items = msgspec.msgpack.Encoder().encode
_U64 = 1 << 64


def encode_readings(
    request_id: int,
    items: Sequence[tuple[str, int, int, float | None, Any]],
    *,
    level: int = 0,
) -> bytes:
    """A READINGS frame: ``items`` are (stream, epoch, seq, time or None, value)."""
    body = _encode_items(items)
    return (
        pack_header(READINGS, (level & _LEVEL_MASK) << _LEVEL_SHIFT, 1, 0, request_id, len(body))
        + body
    )


def _decode_readings(f: Frame) -> Readings:
    if f.codec != 1:
        raise RemoteProtocolError("READINGS is msgpack (codec 1)", ErrorCode.UNSUPPORTED_CODEC)
    try:
        items = _ITEMS.decode(f.body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise RemoteProtocolError(
            f"READINGS body is an array of [stream, epoch, seq, time, value]: {exc}",
            ErrorCode.DECODE_ERROR,
        ) from None
    if not 0 < len(items) <= MAX_READINGS:
        raise RemoteProtocolError(
            f"READINGS holds 1-{MAX_READINGS} readings", ErrorCode.DECODE_ERROR
        )
    for stream, epoch, seq, t, _ in items:
        if (
            not stream
            or (len(stream) > 63 and len(stream.encode()) > MAX_STREAM)
            or not 0 <= epoch < _U32
            or not 0 <= seq < _U64
            or (t is not None and not math.isfinite(t))
        ):
            raise RemoteProtocolError(
                "a READINGS item: stream 1-255 bytes, epoch u32, seq u64, time finite or nil",
                ErrorCode.DECODE_ERROR,
            )
    return Readings(f.request_id, items, (f.flags >> _LEVEL_SHIFT) & _LEVEL_MASK, len(f.body))


_unpack_meta = _META.unpack_from
_META_SIZE = _META.size
_isnan = math.isnan


def _fast_data(
    data: bytes, meta: int, body: int, end: int, flags: int, codec: int, rid: int
) -> Data | None:
    """DATA straight from the receive buffer (the bulk of a relay's input); anything unusual
    goes to :func:`_decode_data`, which says what is wrong."""
    n = body - meta
    if codec > 2 or not _META_SIZE < n <= _META_SIZE + MAX_STREAM:
        return None
    epoch, seq, time = _unpack_meta(data, meta)
    try:
        stream = str(data[meta + _META_SIZE : body], "utf-8")
    except UnicodeDecodeError:
        return None
    if _isnan(time):
        return Data(rid, stream, epoch, seq, None, data[body:end], codec, (flags >> 2) & 3)
    if time - time != 0.0:  # infinite
        return None
    return Data(rid, stream, epoch, seq, time, data[body:end], codec, (flags >> 2) & 3)


EDGE_MESSAGES = MessageSet(
    "edge",
    0x30,
    0x3F,
    (
        MessageSpec(
            DATA, "DATA", _decode_data, frozenset({Role.CLIENT}), fast=_fast_data, cls=Data
        ),
        MessageSpec(READINGS, "READINGS", _decode_readings, frozenset({Role.CLIENT}), cls=Readings),
    ),
)
