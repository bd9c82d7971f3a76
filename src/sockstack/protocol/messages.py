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

import msgpack

from sockstack.errors import CodecError, ErrorCode, LocalProtocolError, RemoteProtocolError
from sockstack.protocol.codecs import CODECS, MAX_CONTAINER, MSGPACK, Codec, refuse_ext
from sockstack.protocol.events import (
    Cancel,
    Close,
    Credit,
    Error,
    Hello,
    Item,
    Message,
    Metadata,
    Ping,
    Pong,
    Request,
    Response,
    Role,
    Welcome,
)
from sockstack.protocol.frames import DEFAULT_MAX_META, Frame, MessageType, encode_frame
from sockstack.protocol.registry import BOTH, MessageSet, MessageSpec, Registry

__all__ = [
    "CORE_MESSAGES",
    "EXT_FEATURES",
    "FEATURES",
    "FEATURE_BATCH",
    "FEATURE_CANCEL",
    "FEATURE_DEADLINE",
    "FEATURE_METADATA",
    "FEATURE_STREAM",
    "FEATURE_UPLOAD",
    "FLAG_BATCH",
    "FLAG_DEADLINE",
    "FLAG_END",
    "FLAG_KWARGS",
    "FLAG_METADATA",
    "FLAG_STREAM",
    "FLAG_UPLOAD",
    "MAX_BATCH_CALLS",
    "MAX_HELLO_EXTENSIONS",
    "MAX_HELLO_SIZE",
    "MAX_METADATA_ENTRIES",
    "MAX_METADATA_KEY",
    "MIN_MAX_FRAME",
    "STREAM_WINDOW",
    "Cancel",
    "Close",
    "Credit",
    "Error",
    "Hello",
    "Item",
    "Message",
    "Ping",
    "Pong",
    "Request",
    "Response",
    "Role",
    "Welcome",
    "check_metadata",
    "decode_message",
    "decode_metadata",
    "encode_batch_answer",
    "encode_cancel",
    "encode_close",
    "encode_credit",
    "encode_error",
    "encode_hello",
    "encode_item",
    "encode_item_end",
    "encode_metadata",
    "encode_ping",
    "encode_pong",
    "encode_request",
    "encode_response",
    "encode_welcome",
    "features_extension",
    "features_of",
    "hello_too_large",
    "request_codec",
    "split_meta",
]

FLAG_KWARGS = 0x01
"""REQUEST flag: the body is ``[positional array, named map]`` instead of a positional array."""
FLAG_DEADLINE = 0x04
"""REQUEST flag: the last 4 bytes of the meta section are the caller's remaining budget, a u32
in milliseconds when the frame was sent (0: already late)."""
FLAG_METADATA = 0x08
"""REQUEST, RESPONSE, ERROR flag: the meta section holds, after its text (method name, error
type, or nothing), one 0x00 byte and a msgpack map of string keys to str or bytes values."""
FLAG_STREAM = 0x10
"""REQUEST flag: the caller accepts a streamed result (ITEMs under flow control, then the call's
one RESPONSE or ERROR). TCP and TLS only."""
FLAG_UPLOAD = 0x20
"""REQUEST flag: an argument of the call follows as ITEMs from the client, under flow control,
ended by an ITEM with flag END (PROTOCOL.md §4.4). TCP and TLS only."""
FLAG_BATCH = 0x80
"""REQUEST flag: a batch of calls of one method (PROTOCOL.md §4.7): the body is an array of
argument arrays, one per call; the RESPONSE's body is ``[results, errors]``. TCP and TLS only."""
MAX_BATCH_CALLS = 10_000
"""The most calls one BATCH request carries."""
FLAG_END = 0x01
"""ITEM flag (client -> server, an upload's): no more items; the body is empty."""
STREAM_WINDOW = 262_144
"""Bytes of ITEM bodies a server may have sent on one stream and not yet had granted back by
CREDIT (it may pass it by one item): the flow-control window every STREAM request starts with."""

EXT_FEATURES = 2
"""WELCOME extension type 2: a u32 bit set of the optional features the server understands."""
FEATURE_DEADLINE = 1 << 0
FEATURE_METADATA = 1 << 1
FEATURE_CANCEL = 1 << 2
FEATURE_STREAM = 1 << 3
FEATURE_UPLOAD = 1 << 4
FEATURE_BATCH = 1 << 5
FEATURES = (
    FEATURE_DEADLINE
    | FEATURE_METADATA
    | FEATURE_CANCEL
    | FEATURE_STREAM
    | FEATURE_UPLOAD
    | FEATURE_BATCH
)
"""What this implementation understands (announced by its servers)."""

MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY = 64
MAX_BUDGET_MS = 0xFFFFFFFF
_KEY_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789._-")
_BUDGET = struct.Struct(">I")

_unpackb = msgpack.unpackb
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


def features_of(extensions: Sequence[tuple[int, bytes]]) -> int:
    """The feature bits a WELCOME's extensions announce (0: none, an older server). A features
    extension shorter than 4 bytes announces none; bytes after the first 4 are ignored."""
    for ext_type, value in extensions:
        if ext_type == EXT_FEATURES and len(value) >= 4:
            return int(_BUDGET.unpack_from(value)[0])
    return 0


def features_extension(features: int = FEATURES) -> tuple[int, bytes]:
    """The WELCOME extension announcing ``features``."""
    return (EXT_FEATURES, _BUDGET.pack(features))


_GOOD_KEYS: set[str] = set()
"""Metadata keys found to keep the rules (at most _MAX_GOOD_KEYS: a bound in bytes, as keys are
at most 64 bytes)."""
_MAX_GOOD_KEYS = 1024


def _bad_key(key: object) -> str | None:
    if not isinstance(key, str):
        return f"metadata key {key!r} is not a string"
    data = key.encode("utf-8", "replace")
    if not 1 <= len(data) <= MAX_METADATA_KEY or not _KEY_CHARS.issuperset(data):
        return f"metadata key {key[:80]!r}: keys are 1-{MAX_METADATA_KEY} bytes of a-z 0-9 . _ -"
    return None


def check_metadata(metadata: Metadata) -> str | None:
    """None when ``metadata`` keeps the rules (PROTOCOL.md §4: at most 64 entries, keys of 1-64
    bytes of ``[a-z0-9._-]``, values str or bytes), else what is wrong."""
    if len(metadata) > MAX_METADATA_ENTRIES:
        return f"{len(metadata)} metadata entries (at most {MAX_METADATA_ENTRIES})"
    good = _GOOD_KEYS
    for key, value in metadata.items():
        if type(key) is not str or key not in good:
            problem = _bad_key(key)
            if problem is not None:
                return problem
            if len(good) < _MAX_GOOD_KEYS:  # keys repeat (tenant, traceparent): checked once
                good.add(key)
        if type(value) is not str and type(value) is not bytes:
            return f"metadata {key!r}: value of type {type(value).__name__} (str or bytes only)"
    return None


def encode_metadata(metadata: Metadata) -> bytes:
    """The 0x00 byte and msgpack map that follow a meta section's text. Raises
    :class:`LocalProtocolError` (code DECODE_ERROR: the peer would refuse it) for bad metadata."""
    problem = check_metadata(metadata)
    if problem is not None:
        raise LocalProtocolError(problem, ErrorCode.DECODE_ERROR)
    packed: bytes = msgpack.packb(dict(metadata), use_bin_type=True)
    return b"\x00" + packed


def decode_metadata(data: bytes) -> dict[str, str | bytes]:
    """The metadata map after a meta section's 0x00 byte. Raises :class:`RemoteProtocolError`
    (DECODE_ERROR) naming what is wrong."""
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_map_len=MAX_METADATA_ENTRIES,
            max_array_len=0,
            max_ext_len=0,
        )
    except ValueError as exc:
        if "exceeds max_map_len" in str(exc):
            raise RemoteProtocolError(
                f"more than {MAX_METADATA_ENTRIES} metadata entries", ErrorCode.DECODE_ERROR
            ) from None
        raise RemoteProtocolError(
            f"metadata is not msgpack: {exc}", ErrorCode.DECODE_ERROR
        ) from None
    except Exception as exc:
        raise RemoteProtocolError(
            f"metadata is not msgpack: {exc}", ErrorCode.DECODE_ERROR
        ) from None
    if not isinstance(value, dict):
        raise RemoteProtocolError("metadata is not a map", ErrorCode.DECODE_ERROR)
    problem = check_metadata(value)
    if problem is not None:
        raise RemoteProtocolError(problem, ErrorCode.DECODE_ERROR)
    return value


def _meta_with(
    text: bytes, metadata: Metadata | None, budget_ms: int | None, what: str
) -> tuple[bytes, int]:
    """A meta section with its optional parts, and the flags saying so."""
    flags = 0
    if metadata is not None:
        text += encode_metadata(metadata)
        flags = FLAG_METADATA
    if budget_ms is not None:
        text += _BUDGET.pack(min(max(budget_ms, 0), MAX_BUDGET_MS))
        flags |= FLAG_DEADLINE
    if len(text) > DEFAULT_MAX_META:
        raise LocalProtocolError(
            f"{what} of {len(text)} bytes exceeds the meta limit of {DEFAULT_MAX_META} bytes",
            ErrorCode.DECODE_ERROR,
        )
    return text, flags


def encode_request(
    request_id: int,
    method: str,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    codec: Codec = MSGPACK,
    *,
    budget_ms: int | None = None,
    metadata: Metadata | None = None,
    stream: bool = False,
    upload: bool = False,
    batch: bool = False,
) -> bytes:
    """REQUEST bytes. Raises :class:`CodecError` (nothing is sent) if the arguments don't
    encode, :class:`LocalProtocolError` for bad metadata or a meta section over 4,096 bytes.
    ``budget_ms``: the DEADLINE flag's budget; ``metadata``: the METADATA map; ``stream``: the
    STREAM flag; ``upload``: the UPLOAD flag (its items follow as ITEMs, §4.4); ``batch``: the
    BATCH flag, ``args`` then being the calls' argument arrays (§4.7)."""
    name = _utf8(method, "method name")
    if 0 in name:
        raise LocalProtocolError("a method name never contains a NUL character")
    meta, flags = _meta_with(name, metadata, budget_ms, "REQUEST meta (method name, metadata)")
    if stream:
        flags |= FLAG_STREAM
    if upload:
        flags |= FLAG_UPLOAD
    if batch:
        if kwargs or stream or upload or not codec.structured:
            raise LocalProtocolError(
                "a BATCH request carries positional arguments only, with a structured codec, "
                "and no STREAM or UPLOAD"
            )
        if len(args) > MAX_BATCH_CALLS:
            raise LocalProtocolError(
                f"a BATCH request carries at most {MAX_BATCH_CALLS} calls, not {len(args)}"
            )
        flags |= FLAG_BATCH
    if codec.structured:
        if kwargs:
            body = codec.encode([list(args), kwargs])
            flags |= FLAG_KWARGS
        else:
            body = codec.encode(args if isinstance(args, list) else list(args))
    else:
        if kwargs or len(args) != 1:
            raise CodecError("the raw codec carries exactly one bytes argument and no keywords")
        body = codec.encode(args[0])
    return encode_frame(MessageType.REQUEST, request_id, meta, body, flags, codec.id)


def encode_response(
    request_id: int, result: Any, codec: Codec = MSGPACK, *, metadata: Metadata | None = None
) -> bytes:
    """RESPONSE bytes (``metadata``: the trailers). Raises :class:`CodecError` if the result
    doesn't encode, :class:`LocalProtocolError` for bad trailers."""
    meta, flags = _meta_with(b"", metadata, None, "RESPONSE trailers")
    return encode_frame(
        MessageType.RESPONSE, request_id, meta, codec.encode(result), flags, codec.id
    )


def encode_error(
    request_id: int,
    code: int,
    type: str = "",
    message: str = "",
    *,
    metadata: Metadata | None = None,
) -> bytes:
    """ERROR bytes (``metadata``: the trailers; raises :class:`LocalProtocolError` if bad)."""
    body = _U16.pack(code) + message.encode("utf-8", "replace")
    name = type.encode("utf-8", "replace")
    if metadata is not None:  # the type name ends at the first 0x00
        name = name.replace(b"\x00", b"?")
    meta, flags = _meta_with(name, metadata, None, "ERROR meta (type name, trailers)")
    return encode_frame(MessageType.ERROR, request_id, meta, body, flags)


def encode_cancel(request_id: int) -> bytes:
    """CANCEL bytes: stop call ``request_id`` (streams only)."""
    return encode_frame(MessageType.CANCEL, request_id, b"", b"")


def encode_item(request_id: int, value: Any, codec: Codec = MSGPACK) -> bytes:
    """ITEM bytes: one item of stream ``request_id``. Raises :class:`CodecError` if it does
    not encode."""
    return encode_frame(MessageType.ITEM, request_id, b"", codec.encode(value), 0, codec.id)


def encode_item_end(request_id: int, codec: Codec = MSGPACK) -> bytes:
    """The ITEM with flag END that ends upload ``request_id`` (an empty body, §4.4)."""
    return encode_frame(MessageType.ITEM, request_id, b"", b"", FLAG_END, codec.id)


def encode_credit(request_id: int, granted: int) -> bytes:
    """CREDIT bytes: ``granted`` (0..2^32-1) more bytes of ITEM bodies for stream
    ``request_id``."""
    if not 0 <= granted <= 0xFFFFFFFF:
        raise LocalProtocolError(f"a CREDIT grants 0..2^32-1 bytes, not {granted}")
    return encode_frame(MessageType.CREDIT, request_id, b"", _BUDGET.pack(granted))


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


def split_meta(
    meta: bytes, flags: int, what: str
) -> tuple[bytes, dict[str, str | bytes] | None, int | None]:
    """(text, metadata or None, budget in ms or None) of a meta section with these flags:
    DEADLINE's 4 bytes come off the end first, then METADATA splits on the first 0x00."""
    budget = None
    if flags & FLAG_DEADLINE:
        if len(meta) < 4:
            raise RemoteProtocolError(
                f"{what} with the DEADLINE flag has a meta section of {len(meta)} bytes (the "
                "budget takes its last 4)",
                ErrorCode.DECODE_ERROR,
            )
        (budget,) = _BUDGET.unpack_from(meta, len(meta) - 4)
        meta = meta[:-4]
    metadata = None
    if flags & FLAG_METADATA:
        cut = meta.find(0)
        if cut < 0:
            raise RemoteProtocolError(
                f"{what} with the METADATA flag has no 0x00 byte in its meta section",
                ErrorCode.DECODE_ERROR,
            )
        metadata = decode_metadata(meta[cut + 1 :])
        meta = meta[:cut]
    return meta, metadata, budget


def _msgpack_array_head(n: int) -> bytes:
    return bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big")


def encode_batch_answer(
    results: list[Any], errors: list[list[Any]], codec: Codec, limit: int
) -> bytes:
    """A BATCH RESPONSE's body ``[results, errors]`` (§4.7), encoded 256 results at a time:
    a result that does not encode fails its call alone (RESULT_NOT_ENCODABLE in ``errors``,
    which this extends), and the encoding stops as soon as the body passes ``limit`` bytes
    (:class:`LocalProtocolError` FRAME_TOO_LARGE): never built whole only to be refused."""
    msgpack_ = codec.id == MSGPACK.id
    parts: list[bytes | memoryview] = []
    size = 0
    failed = False
    start, n, step = 0, len(results), 16
    while start < n:
        chunk = results[start : start + step]
        try:
            data = codec.encode(chunk)
        except CodecError:
            for j, result in enumerate(chunk):
                try:
                    codec.encode(result)
                except CodecError as exc:
                    chunk[j] = None
                    code = int(ErrorCode.RESULT_NOT_ENCODABLE)
                    errors.append([start + j, code, "RESULT_NOT_ENCODABLE", str(exc)])
                    failed = True
            data = codec.encode(chunk)
        size += len(data)
        if size > limit:
            raise LocalProtocolError(
                f"the answer to a batch of {n} calls exceeds the peer's limit of {limit} bytes",
                ErrorCode.FRAME_TOO_LARGE,
            )
        view = memoryview(data)
        parts.append(view[1 if len(chunk) < 16 else 3 :] if msgpack_ else view[1:-1])
        start += len(chunk)
        # the next chunk about an eighth of the limit at this chunk's bytes per result
        step = max(1, min(256, limit * len(chunk) // (8 * len(data))))
    if failed:
        errors.sort(key=lambda e: int(e[0]))
    tail = codec.encode(errors)
    if msgpack_:
        body = b"\x92" + _msgpack_array_head(len(results)) + b"".join(parts) + tail
    else:
        body = b"[[" + b",".join(parts) + b"]," + tail + b"]"
    if len(body) > limit:
        raise LocalProtocolError(
            f"the answer to a batch of {n} calls exceeds the peer's limit of {limit} bytes",
            ErrorCode.FRAME_TOO_LARGE,
        )
    return body


def _decode_batch(
    f: Frame, codec: Codec, method: str, budget: int | None, metadata: Metadata | None, size: int
) -> Request:
    """A REQUEST with flag BATCH (§4.7): the body an array of at most MAX_BATCH_CALLS argument
    arrays; KWARGS, STREAM and UPLOAD not with it, a structured codec."""
    if f.flags & (FLAG_KWARGS | FLAG_STREAM | FLAG_UPLOAD) or not codec.structured:
        raise RemoteProtocolError(
            "a BATCH request has no KWARGS, STREAM or UPLOAD flag and a structured codec",
            ErrorCode.DECODE_ERROR,
        )
    try:
        value = codec.decode(f.body)
    except CodecError as exc:
        raise RemoteProtocolError(str(exc), ErrorCode.DECODE_ERROR) from None
    if not isinstance(value, list) or not all(isinstance(a, list) for a in value):
        raise RemoteProtocolError(
            "a BATCH request's body is an array of argument arrays", ErrorCode.DECODE_ERROR
        )
    if len(value) > MAX_BATCH_CALLS:
        raise RemoteProtocolError(
            f"a BATCH request carries at most {MAX_BATCH_CALLS} calls, not {len(value)}",
            ErrorCode.DECODE_ERROR,
        )
    return Request(
        f.request_id, method, value, {}, codec.id, budget, metadata, False, False, size, True
    )


def _decode_request(f: Frame) -> Request:
    if not f.request_id:  # 0 names no request: its answer could not be matched to a call
        raise RemoteProtocolError(
            "REQUEST with request id 0: a request's id is non-zero", ErrorCode.DECODE_ERROR
        )
    codec = request_codec(f)
    meta: bytes = f.meta
    metadata = budget = None
    if f.flags & (FLAG_DEADLINE | FLAG_METADATA):
        meta, metadata, budget = split_meta(meta, f.flags, "REQUEST")
    method = _text(meta, "method name", ErrorCode.DECODE_ERROR)
    stream = bool(f.flags & FLAG_STREAM)
    upload = bool(f.flags & FLAG_UPLOAD)
    size = len(f.meta) + len(f.body)
    if f.flags & FLAG_BATCH:
        return _decode_batch(f, codec, method, budget, metadata, size)
    if not codec.structured:
        return Request(
            f.request_id, method, (f.body,), {}, codec.id, budget, metadata, stream, upload, size
        )
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
        return Request(
            f.request_id,
            method,
            value[0],
            value[1],
            codec.id,
            budget,
            metadata,
            stream,
            upload,
            size,
        )
    if not isinstance(value, list):
        raise RemoteProtocolError(
            "REQUEST body must be an array of arguments", ErrorCode.DECODE_ERROR
        )
    return Request(
        f.request_id, method, value, {}, codec.id, budget, metadata, stream, upload, size
    )


def _decode_response(f: Frame) -> Response:
    codec = request_codec(f)
    metadata = None
    if f.flags & FLAG_METADATA:
        metadata = split_meta(f.meta, FLAG_METADATA, "RESPONSE")[1]
    try:
        return Response(f.request_id, codec.decode(f.body), codec.id, metadata)
    except CodecError as exc:
        raise RemoteProtocolError(str(exc), ErrorCode.DECODE_ERROR) from None


def _decode_error(f: Frame) -> Error:
    if len(f.body) < 2:
        raise RemoteProtocolError("ERROR body shorter than 2 bytes")
    (code,) = _U16.unpack_from(f.body)
    meta: bytes = f.meta
    metadata = None
    if f.flags & FLAG_METADATA:
        meta, metadata, _ = split_meta(meta, FLAG_METADATA, "ERROR")
    return Error(
        f.request_id,
        code,
        meta.decode("utf-8", "replace"),
        f.body[2:].decode("utf-8", "replace"),
        metadata,
    )


def _decode_cancel(f: Frame) -> Cancel:
    # Meta and body are not read (a CANCEL carries none; bytes there are ignored): a CANCEL is
    # never answered, not even to refuse it, since an ERROR with its id would end that call.
    return Cancel(f.request_id)


def _decode_item(f: Frame) -> Item:
    # Meta is not read (an ITEM carries none). Flag END (an upload's last ITEM, §4.4): the body
    # is empty and not read, nor is the codec byte; other flags are none defined.
    if f.flags & FLAG_END:
        return Item(f.request_id, None, f.codec, 0, True)
    codec = request_codec(f)
    try:
        return Item(f.request_id, codec.decode(f.body), codec.id, len(f.body))
    except CodecError as exc:
        raise RemoteProtocolError(f"ITEM: {exc}", ErrorCode.DECODE_ERROR) from None


def _fast_item(
    data: bytes, meta_start: int, body_start: int, end: int, flags: int, codec: int, rid: int
) -> Item | None:
    """The client's fast decoder of a msgpack ITEM (no meta, no flags); None: general path."""
    if codec != 1 or flags or meta_start != body_start or not rid:
        return None
    try:
        value = _unpackb(
            data[body_start:end],
            raw=False,
            strict_map_key=False,
            ext_hook=refuse_ext,
            timestamp=3,
            max_array_len=MAX_CONTAINER,
            max_map_len=MAX_CONTAINER,
        )
    except Exception:
        return None
    return Item(rid, value, 1, end - body_start)


def _decode_credit(f: Frame) -> Credit:
    # A CREDIT is never answered (an ERROR with its id would end that stream): a malformed one
    # is a broken peer, and ends the session (PROTOCOL_ERROR).
    if len(f.body) != 4:
        raise RemoteProtocolError(f"CREDIT body of {len(f.body)} bytes (a u32 is 4)")
    return Credit(f.request_id, int(_BUDGET.unpack_from(f.body)[0]))


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
        MessageSpec(MessageType.CANCEL, "CANCEL", _decode_cancel, frozenset({Role.CLIENT})),
        MessageSpec(
            MessageType.ITEM, "ITEM", _decode_item, BOTH, fast=_fast_item
        ),  # a server's for a stream (§4.3), a client's for an upload (§4.4)
        MessageSpec(MessageType.CREDIT, "CREDIT", _decode_credit, BOTH),
    ),
)
"""The session and call messages every sockstack session speaks (docs/PROTOCOL.md §3)."""

_CORE_ONLY = Registry([CORE_MESSAGES], frozen=True)


def decode_message(frame: Frame, registry: Registry | None = None) -> Message:
    """Decode a frame of a type in ``registry`` (default: the core's types alone). Raises
    :class:`RemoteProtocolError` whose ``code`` says what was wrong (``UNKNOWN_TYPE``,
    ``DECODE_ERROR``, ``UNSUPPORTED_CODEC``...)."""
    return (registry or _CORE_ONLY).decode(frame)
