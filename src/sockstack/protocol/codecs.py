"""Presentation layer: codecs turn application values into body bytes and back.

The codec of a body travels in every frame header (one byte), so a server answers each request in
the codec it was asked in, and a UDP datagram needs no handshake. Codecs are data-only: neither
msgpack nor JSON can name a class to instantiate, which is why pickle is not offered.

==  =========  =====================================================================
id  name       values
==  =========  =====================================================================
0   raw        ``bytes`` only, sent as they are (no encoding cost, no structure)
1   msgpack    nil, bool, int, float, str, bytes, array, map — the default
2   json       as msgpack; UTF-8 JSON text, compact separators; bytes as base64 text
==  =========  =====================================================================

Richer Python values (dates and times, UUID, Decimal, sets, enums, dataclasses, TypedDict,
NamedTuple, integers beyond 64 bits) are sent as those plain values (PROTOCOL.md §3.1): an
aware datetime as RFC 3339 text with its offset, a set as an array, a dataclass as a map, an
integer beyond 64 bits as msgpack extension type 1 (JSON: a plain number)... A receiver that
declares the type gets it back with :func:`decode_as` (the server does it from a method's
annotations); one that does not gets the plain value. Nothing on the wire names a class.
"""

from __future__ import annotations

import json
import math
import threading
from typing import Any, Protocol

import msgpack
import msgspec

from sockstack.errors import CodecError

__all__ = [
    "BIG_BYTES",
    "CODECS",
    "EXT_BIGINT",
    "JSON",
    "MAX_BIGINT_BYTES",
    "MAX_CONTAINER",
    "MSGPACK",
    "RAW",
    "Codec",
    "decode_as",
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


EXT_BIGINT = 1
"""msgpack extension type of an integer beyond 64 bits: its big-endian two's-complement bytes."""

MAX_BIGINT_BYTES = 512
"""An integer crosses when its two's complement fits 512 bytes: from -2**4095 to 2**4095 - 1
(~1,233 decimal digits). One outside is refused by the encoder (CodecError) and, as an ext
payload, by the decoder (DECODE_ERROR), so decoding one costs a bounded ``int.from_bytes``."""


def _bigint_ext(value: int) -> msgpack.ExtType:
    bits = (value if value >= 0 else ~value).bit_length() + 1  # two's complement, with sign
    size = (bits + 7) // 8
    if size > MAX_BIGINT_BYTES:
        raise ValueError(
            f"an integer of {bits} bits is outside the wire's range, -2**4095 "
            "to 2**4095 - 1 (512 bytes of two's complement)"
        )
    return msgpack.ExtType(EXT_BIGINT, value.to_bytes(size, "big", signed=True))


def _builtins(value: Any, keep: tuple[type, ...]) -> Any:
    """A value msgpack or JSON cannot take as it is, as the plain values that represent it
    (PROTOCOL.md §3.1): msgspec's ``to_builtins`` (RFC 3339 text for dates and times, ISO 8601
    durations, canonical UUID text, Decimal as text, sets as lists, enums as their value,
    dataclasses and attrs classes as maps). Anything else is refused (TypeError)."""
    return msgspec.to_builtins(value, builtin_types=keep)


_MSGPACK_KEEP = (bytes, bytearray, memoryview)


def _msgpack_default(value: Any) -> Any:
    if isinstance(value, int):  # msgpack calls ``default`` for an int beyond 64 bits only
        return _bigint_ext(int(value))
    return _builtins(value, _MSGPACK_KEEP)


def _json_default(value: Any) -> Any:
    return _builtins(value, ())  # bytes as base64 text


def _ext_hook(code: int, data: bytes) -> Any:
    """msgpack ``ext_hook``: extension type 1 is an integer beyond 64 bits; every other
    application extension type is refused, so that a body is only ever data. (Type -1, the
    timestamp, is msgpack's own: it decodes to an aware UTC ``datetime``.)"""
    if code == EXT_BIGINT:
        if not 0 < len(data) <= MAX_BIGINT_BYTES:
            raise ValueError(
                f"msgpack extension type 1 (integer) of {len(data)} bytes: 1 to "
                f"{MAX_BIGINT_BYTES} are accepted"
            )
        return int.from_bytes(data, "big", signed=True)
    raise ValueError(f"msgpack extension type {code} is not accepted")


refuse_ext = _ext_hook  # the name the fuzzers and older tests use


def decode_as(value: Any, type_: Any, *, str_keys: bool = False) -> Any:
    """``value``, as a codec decoded it, converted to the declared ``type_``, or
    :class:`CodecError` saying what was expected and what came.

    ``type_`` is any annotation the codecs can carry: ``int``, ``datetime``, ``set[UUID]``, a
    dataclass, a ``TypedDict``, a ``NamedTuple``, an enum, ``X | None``, ``list[...]``... The
    plain form of each (PROTOCOL.md §3.1) becomes the Python value again ("2026-11-30" a
    ``date``, an array a ``set``, a map the dataclass); a value of the type itself is kept. No
    coercion between kinds: "2" is not an int, 1 not a bool (but an int is a float).
    ``str_keys``: map keys arrive as text (JSON) and are converted to the declared key type.
    A client gets a typed result with ``decode_as(client.call(...), T)``.
    """
    try:
        if str_keys:
            return msgspec.convert(value, type_, str_keys=True)
        return msgspec.convert(value, type_)  # a keyword argument costs msgspec ~250 ns
    except msgspec.ValidationError as exc:
        raise CodecError(str(exc)) from None
    except TypeError as exc:  # an annotation msgspec cannot convert to
        raise CodecError(f"cannot decode as {type_!r}: {exc}") from None


def _packer() -> msgpack.Packer:
    # ``default`` is only called for what msgpack cannot pack itself: plain values (and ints
    # within 64 bits) take msgpack's C path as before.
    return msgpack.Packer(
        use_bin_type=True, autoreset=True, buf_size=_PACK_BUF, default=_msgpack_default
    )


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
            packer = self._local.packer = _packer()
        try:
            return packer.pack(value)  # type: ignore[no-any-return]  # msgpack ships no type stubs
        except (TypeError, ValueError, OverflowError, msgspec.MsgspecError) as exc:
            self._local.packer = _packer()  # clean state
            raise CodecError(f"msgpack cannot encode this value: {exc}") from None

    def decode(self, data: bytes) -> Any:
        try:
            # strict_map_key=False: maps with int keys are legal msgpack; ext types are refused
            # but type 1 (a big integer) and -1 (a timestamp, to an aware UTC datetime).
            return msgpack.unpackb(
                data,
                raw=False,
                strict_map_key=False,
                use_list=True,
                ext_hook=_ext_hook,
                timestamp=3,
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


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    f = float(text)
    if f in (math.inf, -math.inf):
        raise ValueError(f"{text} is beyond a float's range")
    return f


json_loads = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite).decode
"""JSON text as RFC 8259 has it: no NaN or Infinity, no number beyond a float's range (the
standard library takes them, and the receiver would get values no JSON answer can carry)."""


class JsonCodec:
    id = 2
    name = "json"
    structured = True

    _encoder = json.JSONEncoder(
        separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
    )
    _ascii = json.JSONEncoder(
        separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=_json_default
    )

    def encode(self, value: Any) -> bytes:
        try:
            return self._encoder.encode(value).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800", valid JSON): as an escape
            return self._ascii.encode(value).encode("ascii")
        except (TypeError, ValueError, msgspec.MsgspecError) as exc:
            raise CodecError(f"JSON cannot encode this value: {exc}") from None

    def decode(self, data: bytes) -> Any:
        try:
            return json_loads(data.decode("utf-8"))
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
