"""Presentation layer: codecs turn application values into body bytes and back.

The codec of a body travels in every frame header (one byte), so a server answers each request in
the codec it was asked in, and a UDP datagram needs no handshake. Codecs are data-only: neither
msgpack nor JSON can name a class to instantiate, which is why pickle is not offered.

==  =========  =====================================================================
id  name       values
==  =========  =====================================================================
0   raw        ``bytes`` only, sent as they are (no encoding cost, no structure)
1   msgpack    nil, bool, int (64-bit), float, str, bytes, array, map — the default
2   json       as msgpack but no bytes; UTF-8 JSON text, compact separators
==  =========  =====================================================================
"""

from __future__ import annotations

import json
import threading
from typing import Any, Protocol

import msgpack

from sockstack.errors import CodecError

__all__ = [
    "BIG_BYTES",
    "CODECS",
    "JSON",
    "MAX_CONTAINER",
    "MSGPACK",
    "RAW",
    "Codec",
    "get_codec",
    "msgpack_bin_header",
    "msgpack_parts",
]


class Codec(Protocol):
    id: int
    name: str
    structured: bool
    """False for ``raw``: a body is one bytes value, not an encoded array or map."""

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


class RawCodec:
    id = 0
    name = "raw"
    structured = False

    def encode(self, value: Any) -> bytes:
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
        if value is None:
            return b""
        raise CodecError(f"the raw codec carries bytes only, not {type(value).__name__}")

    def decode(self, data: bytes) -> Any:
        return data


# msgpack's default 256 KiB Packer buffer is above glibc's mmap threshold: every pack() would
# then mmap, mremap and munmap it (3 system calls per message, seen with strace). Small
# messages fit 8 KiB; larger ones grow the buffer as needed.
_PACK_BUF = 8192


MAX_CONTAINER = 65_536
"""Elements in one msgpack array or map of a body. A larger one is refused (DECODE_ERROR) from its
header, before any of its elements is decoded: a 1 MiB body of 90,000 keys would otherwise hold
the event loop ~60 ms per frame. Every decoding path passes it (the fast paths too)."""


def refuse_ext(code: int, data: bytes) -> Any:
    """msgpack ``ext_hook``: extension types are application-defined objects; refuse them so
    that a body is only ever plain data (nil, bool, numbers, str, bytes, arrays, maps)."""
    raise ValueError(f"msgpack extension type {code} is not accepted")


class MsgpackCodec:
    id = 1
    name = "msgpack"
    structured = True

    def __init__(self) -> None:
        # One Packer per thread: a Packer is not thread-safe, and building one per call
        # (msgpack.packb) costs 3-4x the packing of a small value.
        self._local = threading.local()

    def encode(self, value: Any) -> bytes:
        try:
            packer = self._local.packer
        except AttributeError:
            packer = self._local.packer = msgpack.Packer(
                use_bin_type=True, autoreset=True, buf_size=_PACK_BUF
            )
        try:
            return packer.pack(value)  # type: ignore[no-any-return]  # msgpack ships no type stubs
        except (TypeError, ValueError, OverflowError) as exc:
            self._local.packer = msgpack.Packer(
                use_bin_type=True, autoreset=True, buf_size=_PACK_BUF
            )  # clean state
            raise CodecError(f"msgpack cannot encode this value: {exc}") from None

    def decode(self, data: bytes) -> Any:
        try:
            # strict_map_key=False: maps with int keys are legal msgpack; ext types are refused.
            return msgpack.unpackb(
                data,
                raw=False,
                strict_map_key=False,
                use_list=True,
                ext_hook=refuse_ext,
                max_array_len=MAX_CONTAINER,
                max_map_len=MAX_CONTAINER,
            )
        except Exception as exc:  # msgpack raises several unrelated types on bad input
            raise CodecError(f"body is not valid msgpack: {type(exc).__name__}: {exc}") from None


BIG_BYTES = 64 * 1024
"""Bytes values above this size are sent by reference (a gathering write), not copied."""


def msgpack_bin_header(n: int) -> bytes:
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def msgpack_parts(value: Any, is_array: bool) -> list[bytes] | None:
    """The msgpack encoding of ``value`` as pieces that leave large ``bytes`` uncopied.

    ``value`` is a bytes value (``is_array`` False) or a list of values (``is_array`` True) whose
    top-level bytes items above :data:`BIG_BYTES` become pieces of their own; the pieces join to
    exactly ``MSGPACK.encode(value)``. None when nothing is large enough to be worth it (the caller
    then encodes as usual). A 1 MiB body thus costs no user-space copy on the way out.
    """
    if not is_array:
        if type(value) is bytes and len(value) > BIG_BYTES:
            return [msgpack_bin_header(len(value)), value]
        return None
    for item in value:
        if type(item) is bytes and len(item) > BIG_BYTES:
            break
    else:
        return None
    parts: list[bytes] = []
    small: list[Any] = []
    head = _array_header(len(value))
    for item in value:
        if type(item) is bytes and len(item) > BIG_BYTES:
            parts.append(
                head + b"".join(MSGPACK.encode(x) for x in small) + msgpack_bin_header(len(item))
            )
            parts.append(item)
            head, small = b"", []
        else:
            small.append(item)
    if small:
        parts.append(b"".join(MSGPACK.encode(x) for x in small))
    return parts


class JsonCodec:
    id = 2
    name = "json"
    structured = True

    _encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    def encode(self, value: Any) -> bytes:
        try:
            return self._encoder.encode(value).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise CodecError(f"JSON cannot encode this value: {exc}") from None

    def decode(self, data: bytes) -> Any:
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CodecError(f"body is not valid UTF-8 JSON: {exc}") from None


RAW = RawCodec()
MSGPACK = MsgpackCodec()
JSON = JsonCodec()
CODECS: dict[int, Codec] = {c.id: c for c in (RAW, MSGPACK, JSON)}
_BY_NAME: dict[str, Codec] = {c.name: c for c in CODECS.values()}


def get_codec(codec: int | str) -> Codec:
    """The codec with that id or name; ``CodecError`` if there is none."""
    found = CODECS.get(codec) if isinstance(codec, int) else _BY_NAME.get(codec)
    if found is None:
        raise CodecError(f"unknown codec {codec!r}; known: {', '.join(_BY_NAME)}")
    return found
