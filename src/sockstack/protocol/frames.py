"""Framing layer: one frame = a 16-byte header, a meta section and a body (docs/PROTOCOL.md §2).

::

    offset size field
    0      2    magic      b"SK" (0x53 0x4B)
    2      1    version    protocol version (1)
    3      1    type       MessageType
    4      1    flags      per-type bits; unknown bits are ignored by receivers
    5      1    codec      Codec id of the body (0 raw, 1 msgpack, 2 json)
    6      2    meta_len   length of the meta section, big-endian u16
    8      4    request_id big-endian u32, 0 when the frame belongs to no request
    12     4    body_len   length of the body, big-endian u32

On a stream (TCP, TLS) frames follow each other; the header's two lengths delimit them. On UDP one
datagram carries exactly one frame, and its size must equal 16 + meta_len + body_len.

This module owns bytes <-> :class:`Frame` only. It knows nothing of sockets, sessions or codecs.
The size limit is a required argument of every reader and is checked on the header, before any
payload byte is buffered.
"""

from __future__ import annotations

import enum
import functools
import struct
from dataclasses import dataclass
from typing import cast

from sockstack.errors import ErrorCode, FrameTooLarge, RemoteProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME",
    "DEFAULT_MAX_META",
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "PROTOCOL_VERSION",
    "Frame",
    "FrameDecoder",
    "MessageType",
    "declared_size",
    "encode_frame",
    "pack_header",
    "parse_datagram",
    "peek_flags",
    "peek_request_id",
    "peek_type",
    "read_header",
    "with_flags",
]

MAGIC = b"SK"
PROTOCOL_VERSION = 1
HEADER = struct.Struct(">2sBBBBHII")
HEADER_SIZE = HEADER.size  # 16
DEFAULT_MAX_FRAME = 1 << 20  # 1 MiB of meta + body, as websockets' max_size and NATS' max payload
DEFAULT_MAX_META = 4096  # 4 KiB, as NATS' control line: method names and topics are short

_LENGTHS = struct.Struct(">HII")  # meta_len, request_id, body_len at offset 6
_TYPE_OFFSET = 3
_FLAGS_OFFSET = 4
_REQUEST_ID = struct.Struct(">I")
_REQUEST_ID_OFFSET = 8

# The header codecs every other module uses (the hot paths included), so that this module stays
# the only one that knows the layout. Both are C-level callables (a ``struct`` method and a
# ``functools.partial`` of one): no Python frame per frame.
pack_header = functools.partial(HEADER.pack, MAGIC, PROTOCOL_VERSION)
"""``pack_header(type, flags, codec, meta_len, request_id, body_len) -> bytes``: a version-1
header."""
read_header = HEADER.unpack_from
"""``read_header(data, offset=0) -> (magic, version, type, flags, codec, meta_len, request_id,
body_len)``; the caller checks magic and version (:data:`MAGIC`, :data:`PROTOCOL_VERSION`)."""
_GATHER_ABOVE = 64 * 1024
_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFFFFFF


def peek_type(data: bytes | bytearray | memoryview) -> int | None:
    """The message type of the frame ``data`` starts with, or None if it is no sockstack frame
    (too short, or not our magic). Reads nothing else."""
    if len(data) < HEADER_SIZE or data[:2] != MAGIC:
        return None
    return data[_TYPE_OFFSET]


def peek_request_id(data: bytes | bytearray | memoryview) -> int | None:
    """The request id of the frame ``data`` starts with, or None if it is no sockstack frame."""
    if len(data) < HEADER_SIZE or data[:2] != MAGIC:
        return None
    rid: int = _REQUEST_ID.unpack_from(data, _REQUEST_ID_OFFSET)[0]
    return rid


def declared_size(data: bytes | bytearray | memoryview) -> int | None:
    """Header + meta + body as the header at the start of ``data`` declares them (unchecked
    against any limit), or None if ``data`` starts with no sockstack header."""
    if len(data) < HEADER_SIZE or data[:2] != MAGIC:
        return None
    meta_len, _, body_len = _LENGTHS.unpack_from(data, 6)
    size: int = HEADER_SIZE + meta_len + body_len
    return size


def peek_flags(data: bytes | bytearray | memoryview) -> int | None:
    """The flags of the frame ``data`` starts with, or None if it is no sockstack frame."""
    if len(data) < HEADER_SIZE or data[:2] != MAGIC:
        return None
    return data[_FLAGS_OFFSET]


def with_flags(frame: bytes | bytearray | memoryview, flags: int, clear: int = 0) -> bytes:
    """A copy of an encoded frame with ``flags`` set and ``clear`` cleared in its header
    (e.g. REDELIVERED on a redelivery, the AUTH flag when a datagram is sealed or opened)."""
    out = bytearray(frame)
    out[_FLAGS_OFFSET] = (out[_FLAGS_OFFSET] | flags) & ~clear & 0xFF
    return bytes(out)


class MessageType(enum.IntEnum):
    """The core's message types (session and calls, range 0x01-0x0F). The other ranges are
    reserved for patterns, which define their types in their own folder and register them
    (:mod:`sockstack.protocol.registry`): 0x10-0x1F publish/subscribe, 0x20-0x2F remote objects,
    0x30-0x3F edge relays, 0x40-0x4F gateway, 0x50-0xEF free, 0xF0-0xFF private use."""

    HELLO = 0x01
    WELCOME = 0x02
    REQUEST = 0x03
    RESPONSE = 0x04
    ERROR = 0x05
    PING = 0x06
    PONG = 0x07
    CLOSE = 0x08
    CANCEL = 0x09
    ITEM = 0x0A
    CREDIT = 0x0B


@dataclass(slots=True)
class Frame:
    """One frame as it travels. ``type`` is an int so that unknown types can still be reported.
    Not frozen only because a frozen dataclass costs 4x more to build on the hot path: treat it
    as read-only."""

    type: int
    request_id: int = 0
    flags: int = 0
    codec: int = 0
    meta: bytes = b""
    body: bytes = b""
    version: int = PROTOCOL_VERSION

    def serialize(self) -> bytes:
        return encode_frame(
            self.type, self.request_id, self.meta, self.body, self.flags, self.codec, self.version
        )


def encode_frame(
    type: int,
    request_id: int,
    meta: bytes,
    body: bytes,
    flags: int = 0,
    codec: int = 0,
    version: int = PROTOCOL_VERSION,
) -> bytes:
    """Serialize one frame. Raises ``ValueError`` when a field does not fit its width."""
    if len(meta) > _U16_MAX:
        raise ValueError(f"meta section of {len(meta)} bytes does not fit in u16")
    if not 0 <= request_id <= _U32_MAX:
        raise ValueError(f"request id {request_id} does not fit in u32")
    return (
        HEADER.pack(MAGIC, version, type, flags, codec, len(meta), request_id, len(body))
        + meta
        + body
    )


def _check_header(
    magic: bytes, version: int, meta_len: int, body_len: int, max_frame: int, max_meta: int
) -> None:
    if magic != MAGIC:
        raise RemoteProtocolError(f"bad magic {magic.hex()}, expected {MAGIC.hex()}")
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            f"unsupported protocol version {version} (this side speaks {PROTOCOL_VERSION})",
            ErrorCode.UNSUPPORTED_VERSION,
        )
    if meta_len > max_meta:
        raise FrameTooLarge(meta_len, max_meta)
    if meta_len + body_len > max_frame:
        raise FrameTooLarge(meta_len + body_len, max_frame)


class FrameDecoder:
    """Incremental decoder for a byte stream. Feed it any split of the stream; it returns every
    complete frame and keeps the rest. When framing breaks (bad magic, oversized length), the
    frames completed before the bad header are still returned and ``error`` is set; the call
    raises only when it has no frame to return, and every later call raises the same error."""

    __slots__ = ("_buf", "_error", "_have", "_need", "_parts", "max_frame", "max_meta")

    def __init__(
        self, max_frame: int = DEFAULT_MAX_FRAME, max_meta: int = DEFAULT_MAX_META
    ) -> None:
        self.max_frame = max_frame
        self.max_meta = max_meta
        self._buf = bytearray()
        # A large frame is gathered as a list of chunks and joined once when complete, instead
        # of growing (and re-copying) one buffer read by read.
        self._parts: list[bytes] = []
        self._have = 0
        self._need = 0
        self._error: RemoteProtocolError | None = None

    @property
    def error(self) -> RemoteProtocolError | None:
        """Why framing broke, or None while the stream is sound."""
        return self._error

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a complete frame (at most 16 + max_frame)."""
        return len(self._buf) + self._have

    def take_partial(self) -> bytes | None:
        """Hand back the bytes of an incomplete frame held from earlier reads (and forget them),
        so that the caller can parse them with what follows; None while a large frame is being
        gathered (feed that one) or after framing broke."""
        if self._need or self._error is not None:
            return None
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def feed(self, data: bytes) -> list[Frame]:
        if self._error is not None:
            raise self._error
        if self._need:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            return self._gathered()
        buf = self._buf
        # Common case: nothing left over from the last read, so parse ``data`` in place (no copy
        # into the buffer); only an incomplete tail is kept.
        src: bytes | bytearray
        if buf:
            buf += data
            src = buf
        else:
            src = data
        frames: list[Frame] = []
        is_bytes = type(src) is bytes
        bsrc = cast(bytes, src)  # read only where is_bytes holds
        pos = 0
        end = len(src)
        unpack = HEADER.unpack_from
        max_meta, max_frame = self.max_meta, self.max_frame
        try:
            while end - pos >= HEADER_SIZE:
                magic, version, type_, flags, codec, meta_len, rid, body_len = unpack(src, pos)
                if (
                    magic != MAGIC
                    or version != PROTOCOL_VERSION
                    or meta_len > max_meta
                    or meta_len + body_len > max_frame
                ):
                    _check_header(magic, version, meta_len, body_len, max_frame, max_meta)
                start = pos + HEADER_SIZE
                mid = start + meta_len
                stop = mid + body_len
                if stop > end:
                    break
                if is_bytes:  # slicing bytes already gives bytes
                    frames.append(Frame(type_, rid, flags, codec, bsrc[start:mid], bsrc[mid:stop]))
                else:
                    frames.append(
                        Frame(type_, rid, flags, codec, bytes(src[start:mid]), bytes(src[mid:stop]))
                    )
                pos = stop
        except RemoteProtocolError as exc:
            self._error = exc
            buf.clear()
            if not frames:
                raise
            return frames
        if end - pos >= HEADER_SIZE:  # an incomplete frame whose header was checked above
            meta_len, _, body_len = _LENGTHS.unpack_from(src, pos + 6)
            total = HEADER_SIZE + meta_len + body_len
            if total >= _GATHER_ABOVE:
                self._parts = [bytes(src[pos:end])]
                self._have, self._need = end - pos, total
                buf.clear()
                return frames
        if src is buf:
            if pos:
                del buf[:pos]
        elif pos < end:
            buf += data[pos:]
        return frames

    def _gathered(self) -> list[Frame]:
        """The large frame being gathered is complete: build it with one copy of its body (not a
        join of the whole frame and then a slice of it), then parse what followed it."""
        parts, extra = self._parts, self._have - self._need
        self._parts, self._have, self._need = [], 0, 0
        rest = b""
        if extra:
            last = parts[-1]
            parts[-1], rest = last[: len(last) - extra], last[len(last) - extra :]
        first = parts[0]
        _, _, type_, flags, codec, meta_len, rid, _ = HEADER.unpack_from(first, 0)
        head = HEADER_SIZE + meta_len
        if len(first) < head:  # the meta itself was split (a tiny first read): join it all
            joined = b"".join(parts)
            meta, body = joined[HEADER_SIZE:head], joined[head:]
        else:
            meta = bytes(first[HEADER_SIZE:head])
            parts[0] = first[head:]
            body = b"".join(parts)
        frames = [Frame(type_, rid, flags, codec, meta, body)]
        if rest:
            try:
                frames += self.feed(rest)
            except RemoteProtocolError:
                pass  # self.error is set: the next call raises it
        return frames


def parse_datagram(data: bytes, max_size: int, max_meta: int = DEFAULT_MAX_META) -> Frame:
    """Parse one datagram that must hold exactly one frame; ``max_size`` bounds meta + body."""
    if len(data) < HEADER_SIZE:
        raise RemoteProtocolError(
            f"datagram of {len(data)} bytes is shorter than the 16-byte header"
        )
    magic, version, type_, flags, codec, meta_len, rid, body_len = HEADER.unpack_from(data)
    _check_header(magic, version, meta_len, body_len, max_size, max_meta)
    if HEADER_SIZE + meta_len + body_len != len(data):
        raise RemoteProtocolError(
            f"datagram of {len(data)} bytes does not match its header "
            f"({HEADER_SIZE} + {meta_len} + {body_len})"
        )
    meta = bytes(data[HEADER_SIZE : HEADER_SIZE + meta_len])
    body = bytes(data[HEADER_SIZE + meta_len :])
    return Frame(type_, rid, flags, codec, meta, body, version)
