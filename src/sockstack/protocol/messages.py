"""Session and application messages: typed values <-> frames (docs/PROTOCOL.md §3-§5).

Each message is a small slotted dataclass (read-only by convention: frozen ones cost 4x more to
build, and one is built per message); :func:`decode_message` turns a :class:`Frame` into one,
and each ``encode_*`` function turns fields into wire bytes. Control messages (HELLO, WELCOME,
ERROR, PING, PONG, CLOSE) have fixed binary layouts that need no codec; REQUEST and RESPONSE
bodies are encoded with the codec named in the header.

The message classes themselves are in :mod:`.events`; this module is their wire form.
:data:`CORE_MESSAGES` is the core's :class:`~sockstack.protocol.registry.MessageSet` (types
0x01-0x0F); patterns add theirs to a :class:`~sockstack.protocol.registry.Registry` (see there).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from sockstack.errors import CodecError, ErrorCode, LocalProtocolError, RemoteProtocolError
from sockstack.protocol.codecs import CODECS, MSGPACK, Codec
from sockstack.protocol.events import (
    Close,
    Error,
    Hello,
    Message,
    Ping,
    Pong,
    Request,
    Response,
    Role,
    Welcome,
)
from sockstack.protocol.frames import Frame, MessageType, encode_frame
from sockstack.protocol.registry import BOTH, MessageSet, MessageSpec, Registry

__all__ = [
    "CORE_MESSAGES",
    "FLAG_KWARGS",
    "MAX_HELLO_EXTENSIONS",
    "MAX_HELLO_SIZE",
    "MIN_MAX_FRAME",
    "Close",
    "Error",
    "Hello",
    "Message",
    "Ping",
    "Pong",
    "Request",
    "Response",
    "Role",
    "Welcome",
    "decode_message",
    "encode_close",
    "encode_error",
    "encode_hello",
    "encode_ping",
    "encode_pong",
    "encode_request",
    "encode_response",
    "encode_welcome",
    "hello_too_large",
    "request_codec",
]

FLAG_KWARGS = 0x01
"""REQUEST flag: the body is ``[positional array, named map]`` instead of a positional array."""

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_HELLO = struct.Struct(">BBI")
_WELCOME = struct.Struct(">BI")
_EXT = struct.Struct(">BH")
MAX_PING_PAYLOAD = 125  # PING/PONG payloads are for correlation and timing, not data

# Handshake limits (docs/PROTOCOL.md §5.1), the same on every server: a HELLO is read before the
# peer is authenticated, so what it may cost is bounded before any of it is parsed.
MAX_HELLO_SIZE = 4096
"""Largest HELLO (meta + body), in bytes: refused from its header, before its body is read. As
NATS' 4 KiB control line; a HELLO needs 6 bytes, an agent name and a secret."""
MAX_HELLO_EXTENSIONS = 16
"""Most extensions a HELLO or WELCOME may carry (one type is defined today: the secret)."""
MIN_MAX_FRAME = 512
"""Smallest ``max_frame`` a side may announce. Every control frame fits in it (a PONG carries at
most 125 bytes; ERROR and CLOSE texts are cut to the peer's limit), so the rule "never send above
the peer's limit" can always be kept; a HELLO or WELCOME announcing less ends the session."""


# --------------------------------------------------------------------------- encoding


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"{what} is not valid text: {exc}") from None


def _encode_extensions(extensions: Sequence[tuple[int, bytes]]) -> bytes:
    return b"".join(_EXT.pack(t, len(v)) + v for t, v in extensions)


def encode_hello(hello: Hello) -> bytes:
    body = _HELLO.pack(hello.min_version, hello.max_version, hello.max_frame) + _encode_extensions(
        hello.extensions
    )
    # Sent with the lowest version it speaks in the header, so an older server can read it
    # (there is no version 0: a range from 0 starts at 1).
    return encode_frame(
        MessageType.HELLO, 0, _utf8(hello.agent, "agent"), body, version=max(hello.min_version, 1)
    )


def encode_welcome(welcome: Welcome) -> bytes:
    body = (
        _U8.pack(welcome.version)
        + _U8.pack(len(welcome.codecs))
        + bytes(welcome.codecs)
        + struct.pack(">I", welcome.max_frame)
        + _encode_extensions(welcome.extensions)
    )
    return encode_frame(MessageType.WELCOME, 0, _utf8(welcome.agent, "agent"), body)


def encode_request(
    request_id: int,
    method: str,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    codec: Codec = MSGPACK,
) -> bytes:
    """REQUEST bytes. Raises :class:`CodecError` (nothing is sent) if the arguments don't encode."""
    flags = 0
    if codec.structured:
        if kwargs:
            body = codec.encode([list(args), kwargs])
            flags = FLAG_KWARGS
        else:
            body = codec.encode(args if isinstance(args, list) else list(args))
    else:
        if kwargs or len(args) != 1:
            raise CodecError("the raw codec carries exactly one bytes argument and no keywords")
        body = codec.encode(args[0])
    return encode_frame(
        MessageType.REQUEST, request_id, _utf8(method, "method name"), body, flags, codec.id
    )


def encode_response(request_id: int, result: Any, codec: Codec = MSGPACK) -> bytes:
    """RESPONSE bytes. Raises :class:`CodecError` if the result doesn't encode."""
    return encode_frame(MessageType.RESPONSE, request_id, b"", codec.encode(result), 0, codec.id)


def encode_error(request_id: int, code: int, type: str = "", message: str = "") -> bytes:
    body = _U16.pack(code) + message.encode("utf-8", "replace")
    return encode_frame(MessageType.ERROR, request_id, type.encode("utf-8", "replace"), body)


def encode_ping(request_id: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PING_PAYLOAD:
        raise LocalProtocolError(f"PING payload of {len(payload)} bytes > {MAX_PING_PAYLOAD}")
    return encode_frame(MessageType.PING, request_id, b"", payload)


def encode_pong(request_id: int, payload: bytes = b"") -> bytes:
    return encode_frame(MessageType.PONG, request_id, b"", payload)


def encode_close(code: int = ErrorCode.NORMAL, reason: str = "") -> bytes:
    return encode_frame(
        MessageType.CLOSE, 0, b"", _U16.pack(code) + reason.encode("utf-8", "replace")
    )


# --------------------------------------------------------------------------- decoding


def _text(data: bytes, what: str, code: int = ErrorCode.PROTOCOL_ERROR) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"{what} is not valid UTF-8", code) from None


def _decode_extensions(data: bytes, what: str) -> tuple[tuple[int, bytes], ...]:
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        if len(out) == MAX_HELLO_EXTENSIONS:  # refused before the next one is even read
            raise RemoteProtocolError(
                f"{what} carries more than {MAX_HELLO_EXTENSIONS} extensions",
                ErrorCode.FRAME_TOO_LARGE,
            )
        if len(data) - pos < _EXT.size:
            raise RemoteProtocolError("truncated extension header")
        ext_type, ext_len = _EXT.unpack_from(data, pos)
        pos += _EXT.size
        if len(data) - pos < ext_len:
            raise RemoteProtocolError(f"extension {ext_type} declares {ext_len} bytes, has fewer")
        out.append((ext_type, bytes(data[pos : pos + ext_len])))
        pos += ext_len
    return tuple(out)


def hello_too_large(size: int) -> RemoteProtocolError:
    """The refusal of a HELLO of ``size`` bytes (meta + body) above :data:`MAX_HELLO_SIZE`."""
    return RemoteProtocolError(
        f"HELLO of {size} bytes exceeds the limit of {MAX_HELLO_SIZE} bytes",
        ErrorCode.FRAME_TOO_LARGE,
    )


def _decode_hello(f: Frame) -> Hello:
    # Bounded before anything is parsed (a stream session checks the size from the header
    # already; a datagram is checked here): at most MAX_HELLO_SIZE bytes and
    # MAX_HELLO_EXTENSIONS extensions are ever looked at before the secret is checked.
    size = len(f.meta) + len(f.body)
    if size > MAX_HELLO_SIZE:
        raise hello_too_large(size)
    if len(f.body) < _HELLO.size:
        raise RemoteProtocolError(f"HELLO body shorter than {_HELLO.size} bytes")
    lo, hi, max_frame = _HELLO.unpack_from(f.body)  # versions and limits: the session's to check
    return Hello(
        lo,
        hi,
        max_frame,
        _text(f.meta, "agent"),
        _decode_extensions(f.body[_HELLO.size :], "HELLO"),
    )


def _decode_welcome(f: Frame) -> Welcome:
    body = f.body
    if len(body) < 2 or len(body) < 2 + body[1] + 4:
        raise RemoteProtocolError("WELCOME body truncated")
    n = body[1]
    codecs = tuple(body[2 : 2 + n])
    (max_frame,) = struct.unpack_from(">I", body, 2 + n)
    exts = _decode_extensions(body[6 + n :], "WELCOME")
    return Welcome(body[0], codecs, max_frame, _text(f.meta, "agent"), exts)


def request_codec(f: Frame) -> Codec:
    codec = CODECS.get(f.codec)
    if codec is None:
        raise RemoteProtocolError(f"unknown codec id {f.codec}", ErrorCode.UNSUPPORTED_CODEC)
    return codec


def _decode_request(f: Frame) -> Request:
    if not f.request_id:  # 0 names no request: its answer could not be matched to a call
        raise RemoteProtocolError(
            "REQUEST with request id 0: a request's id is non-zero", ErrorCode.DECODE_ERROR
        )
    codec = request_codec(f)
    method = _text(f.meta, "method name", ErrorCode.DECODE_ERROR)
    if not codec.structured:
        return Request(f.request_id, method, (f.body,), {}, codec.id)
    try:
        value = codec.decode(f.body)
    except CodecError as exc:
        raise RemoteProtocolError(str(exc), ErrorCode.DECODE_ERROR) from None
    if f.flags & FLAG_KWARGS:
        if not (
            isinstance(value, list)
            and len(value) == 2
            and isinstance(value[0], list)
            and isinstance(value[1], dict)
            and all(isinstance(k, str) for k in value[1])
        ):
            raise RemoteProtocolError(
                "REQUEST with the KWARGS flag must carry [array, map of string keys]",
                ErrorCode.DECODE_ERROR,
            )
        return Request(f.request_id, method, value[0], value[1], codec.id)
    if not isinstance(value, list):
        raise RemoteProtocolError(
            "REQUEST body must be an array of arguments", ErrorCode.DECODE_ERROR
        )
    return Request(f.request_id, method, value, {}, codec.id)


def _decode_response(f: Frame) -> Response:
    codec = request_codec(f)
    try:
        return Response(f.request_id, codec.decode(f.body), codec.id)
    except CodecError as exc:
        raise RemoteProtocolError(str(exc), ErrorCode.DECODE_ERROR) from None


def _decode_error(f: Frame) -> Error:
    if len(f.body) < 2:
        raise RemoteProtocolError("ERROR body shorter than 2 bytes")
    (code,) = _U16.unpack_from(f.body)
    return Error(
        f.request_id,
        code,
        f.meta.decode("utf-8", "replace"),
        f.body[2:].decode("utf-8", "replace"),
    )


def _decode_ping(f: Frame) -> Ping:
    if len(f.body) > MAX_PING_PAYLOAD:
        raise RemoteProtocolError(f"PING payload of {len(f.body)} bytes > {MAX_PING_PAYLOAD}")
    return Ping(f.request_id, f.body)


def _decode_pong(f: Frame) -> Pong:
    return Pong(f.request_id, f.body)


def _decode_close(f: Frame) -> Close:
    if len(f.body) < 2:
        raise RemoteProtocolError("CLOSE body shorter than 2 bytes")
    (code,) = _U16.unpack_from(f.body)
    return Close(code, f.body[2:].decode("utf-8", "replace"))


CORE_MESSAGES = MessageSet(
    "session",
    0x01,
    0x0F,
    (
        MessageSpec(MessageType.HELLO, "HELLO", _decode_hello, frozenset({Role.CLIENT})),
        MessageSpec(MessageType.WELCOME, "WELCOME", _decode_welcome, frozenset({Role.SERVER})),
        MessageSpec(MessageType.REQUEST, "REQUEST", _decode_request, frozenset({Role.CLIENT})),
        MessageSpec(MessageType.RESPONSE, "RESPONSE", _decode_response, frozenset({Role.SERVER})),
        MessageSpec(MessageType.ERROR, "ERROR", _decode_error, BOTH),
        MessageSpec(MessageType.PING, "PING", _decode_ping, BOTH),
        MessageSpec(MessageType.PONG, "PONG", _decode_pong, BOTH),
        MessageSpec(MessageType.CLOSE, "CLOSE", _decode_close, BOTH),
    ),
)
"""The session and call messages every sockstack session speaks (docs/PROTOCOL.md §3)."""

_CORE_ONLY = Registry([CORE_MESSAGES], frozen=True)


def decode_message(frame: Frame, registry: Registry | None = None) -> Message:
    """Decode a frame of a type in ``registry`` (default: the core's types alone). Raises
    :class:`RemoteProtocolError` whose ``code`` says what was wrong (``UNKNOWN_TYPE``,
    ``DECODE_ERROR``, ``UNSUPPORTED_CODEC``...)."""
    return (registry or _CORE_ONLY).decode(frame)
