"""Remote objects' messages (types 0x20-0x24, docs/PROTOCOL.md §4.5): layouts, encoders,
decoders, and :data:`OBJECTS_MESSAGES`, the set the host and the clients add to their
sessions' registry.

- CALL (0x20, either role): request id the caller's call id (0 with ONEWAY); meta the target,
  the method name, [0x00 and a metadata map], [u32 budget]; body the arguments as REQUEST's, in
  msgpack only.
- RETURN (0x21, client): the server's CALL id; body the result in msgpack; with FAILED, ERROR's
  layout (meta the error's type name, body ``code`` u16 then its message, codec 0).
- RELEASE (0x22, either): id 0; body ``[[[id, count], ...], [question, ...]]`` in msgpack, or
  none at all.
- RENEW (0x23, client): id 0, no meta, no body, codec 0.
- ABORT (0x24, server): the server's CALL id, no meta, no body, codec 0.

Flags: CALL 0x01 KWARGS, 0x02 ONEWAY, 0x04 DEADLINE, 0x08 METADATA, 0x40 KEEP; RETURN 0x02
FAILED; RELEASE 0x01 END. Other bits are ignored (PROTOCOL.md §2).

CALL has a fast decoder (``_fast_call``, registered on the MessageSpec): the common CALL is
read straight from the receive buffer, as the core reads REQUEST; anything else (keywords,
metadata, references, paths) takes the general decoder.

A client's CALL is answered with core RESPONSE or ERROR (its RESPONSE may hold references:
:func:`encode_response_with_refs`, :func:`decode_response_refs`); a server's CALL with RETURN.
ONEWAY CALLs, RELEASE, RENEW and ABORT are never answered.

**Errors.** Decoders raise :class:`RemoteProtocolError` with a code: ``DECODE_ERROR`` (a body,
a request id, a flag combination or a RELEASE that breaks the rules), ``UNSUPPORTED_CODEC`` (a
CALL not in msgpack), ``BAD_TARGET`` (a malformed target). Two exceptions, because their id is
not one the receiver's peer could match: a RETURN whose body cannot be read decodes as a failed
:class:`Return` (code ``DECODE_ERROR`` or ``UNSUPPORTED_CODEC``), failing that server call
without sending anything; a RETURN with request id 0 answers no CALL (``PROTOCOL_ERROR``: the
session ends). RENEW and ABORT are never refused. Encoders raise
:class:`~sockstack.errors.LocalProtocolError` (with the code the peer would refuse with) or
:class:`~sockstack.errors.CodecError` before anything is sent.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from sockstack.errors import CodecError, ErrorCode, LocalProtocolError, RemoteProtocolError
from sockstack.objects.refs import (
    ID_SIZE,
    MAX_NAME,
    MAX_PATH,
    MAX_QUESTION,
    ToRef,
    check_path,
    pack,
    unpack,
)
from sockstack.protocol.codecs import CODECS, MAX_CONTAINER, MSGPACK, Codec, refuse_ext
from sockstack.protocol.events import Metadata, PatternMessage, Role, message
from sockstack.protocol.frames import DEFAULT_MAX_META, Frame, MessageType, pack_header
from sockstack.protocol.messages import decode_metadata, encode_metadata
from sockstack.protocol.registry import BOTH, MessageSet, MessageSpec

__all__ = [
    "FLAG_DEADLINE",
    "FLAG_END",
    "FLAG_FAILED",
    "FLAG_KEEP",
    "FLAG_KWARGS",
    "FLAG_METADATA",
    "FLAG_ONEWAY",
    "MAX_RELEASE_ENTRIES",
    "OBJECTS_MESSAGES",
    "TARGET_ANSWER",
    "TARGET_NAME",
    "TARGET_OBJECT",
    "Abort",
    "AnswerTarget",
    "Call",
    "NameTarget",
    "ObjectTarget",
    "ObjectsType",
    "Release",
    "Renew",
    "Return",
    "Target",
    "answer_meta",
    "call_meta",
    "decode_response_refs",
    "decode_target",
    "encode_abort",
    "encode_call",
    "encode_call_meta",
    "encode_release",
    "encode_renew",
    "encode_response_with_refs",
    "encode_return",
    "encode_return_error",
    "encode_target",
]


class ObjectsType(enum.IntEnum):
    """Remote objects' message types, in the range 0x20-0x2F PROTOCOL.md reserves for them."""

    CALL = 0x20
    RETURN = 0x21
    RELEASE = 0x22
    RENEW = 0x23
    ABORT = 0x24


# CALL flags (KWARGS, DEADLINE and METADATA mean what they mean on a REQUEST, §4)
FLAG_KWARGS = 0x01
"""CALL: the body is ``[positional array, named map]``."""
FLAG_ONEWAY = 0x02
"""CALL: never answered; the request id is 0."""
FLAG_DEADLINE = 0x04
"""CALL: the meta's last 4 bytes are the caller's budget, a u32 of milliseconds."""
FLAG_METADATA = 0x08
"""CALL: after the method name, one 0x00 byte and a msgpack map (REQUEST's metadata rules)."""
FLAG_KEEP = 0x40
"""CALL: the receiver keeps the references of this call's answer for pipelined calls (target
ANSWER, reference form 3) until the caller finishes the question (RELEASE)."""
# RETURN flag
FLAG_FAILED = 0x02
"""RETURN: the call failed; meta is the error's type name, body ``code u16`` and its message."""
# RELEASE flag
FLAG_END = 0x01
"""RELEASE: the sender's session is over (everything it holds is released)."""

MAX_RELEASE_ENTRIES = 10_000
"""Most entries (releases plus finished questions) in one RELEASE frame; beyond, DECODE_ERROR
(:func:`encode_release` splits a longer batch into several frames)."""

TARGET_OBJECT = 0x01
TARGET_ANSWER = 0x02
TARGET_NAME = 0x03
_STEP_INDEX = 0x00
_STEP_KEY = 0x01

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_MAX_U32 = 0xFFFFFFFF
_CALL, _RETURN, _RELEASE, _RENEW, _ABORT = (int(t) for t in ObjectsType)
_RESPONSE = int(MessageType.RESPONSE)
_DECODE = ErrorCode.DECODE_ERROR
_BAD_TARGET = ErrorCode.BAD_TARGET


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True, slots=True)
class ObjectTarget:
    """An object the receiver exported to this session: its 16-byte id."""

    id: bytes


@dataclass(frozen=True, slots=True)
class AnswerTarget:
    """The reference at ``path`` in the answer to the sender's KEEP call ``question`` (promise
    pipelining). A step is an int (index into an array, 0..65535) or a str (key of a map, at
    most 255 UTF-8 bytes); at most 8 steps."""

    question: int
    path: tuple[int | str, ...] = ()


@dataclass(frozen=True, slots=True)
class NameTarget:
    """An object registered on the receiver under ``name`` (1-255 UTF-8 bytes)."""

    name: str


Target = ObjectTarget | AnswerTarget | NameTarget


def encode_target(target: Target) -> bytes:
    """The target's bytes (the start of a CALL's meta). :class:`LocalProtocolError` (code
    BAD_TARGET) for a target that breaks the rules."""
    if type(target) is ObjectTarget:
        if type(target.id) is not bytes or len(target.id) != ID_SIZE:
            raise LocalProtocolError(
                f"an OBJECT target's id is {ID_SIZE} bytes, not {_size(target.id)}", _BAD_TARGET
            )
        return b"\x01" + target.id
    if type(target) is NameTarget:
        name = _utf8(target.name, "a NAME target")
        if not 1 <= len(name) <= MAX_NAME:
            raise LocalProtocolError(
                f"a NAME target is 1-{MAX_NAME} bytes of UTF-8, not {len(name)}", _BAD_TARGET
            )
        return b"\x03" + bytes((len(name),)) + name
    if type(target) is AnswerTarget:
        q = target.question
        if type(q) is not int or not 1 <= q <= MAX_QUESTION:
            raise LocalProtocolError(
                f"an ANSWER target's question is 1..{MAX_QUESTION}, not {q!r}", _BAD_TARGET
            )
        problem = check_path(target.path)
        if problem is not None:
            raise LocalProtocolError(f"an ANSWER target's path: {problem}", _BAD_TARGET)
        out = bytearray(b"\x02")
        out += _U32.pack(q)
        out.append(len(target.path))
        for step in target.path:
            if type(step) is int:
                out.append(_STEP_INDEX)
                out += _U16.pack(step)
            else:
                key = str(step).encode("utf-8")
                out.append(_STEP_KEY)
                out.append(len(key))
                out += key
        return bytes(out)
    raise LocalProtocolError(f"not a target: {target!r}", _BAD_TARGET)


def _size(value: object) -> str:
    return f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except (UnicodeEncodeError, AttributeError) as exc:
        raise LocalProtocolError(f"{what} is not valid text: {exc}", _BAD_TARGET) from None


def _bad_target(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"CALL target: {message}", _BAD_TARGET)


def decode_target(meta: bytes, offset: int = 0) -> tuple[Target, int]:
    """The target at ``meta[offset:]`` and the offset just after it. Raises
    :class:`RemoteProtocolError` (code BAD_TARGET) naming what is wrong: truncated, an unknown
    kind or step, an id that is not 16 bytes, a path of more than 8 steps, question 0, text
    that is not UTF-8, an empty name."""
    n = len(meta)
    if offset >= n:
        raise _bad_target("missing (the meta section is empty)")
    kind = meta[offset]
    pos = offset + 1
    if kind == TARGET_OBJECT:
        end = pos + ID_SIZE
        if end > n:
            raise _bad_target(f"OBJECT with {n - pos} bytes of id ({ID_SIZE} needed)")
        return ObjectTarget(bytes(meta[pos:end])), end
    if kind == TARGET_NAME:
        if pos >= n:
            raise _bad_target("NAME truncated before its length")
        size = meta[pos]
        end = pos + 1 + size
        if size == 0:
            raise _bad_target("NAME of 0 bytes (1-255)")
        if end > n:
            raise _bad_target(f"NAME of {size} bytes truncated at {n - pos - 1}")
        return NameTarget(_decode_text(meta[pos + 1 : end], "NAME")), end
    if kind == TARGET_ANSWER:
        if pos + 5 > n:
            raise _bad_target("ANSWER truncated before its question id and step count")
        (question,) = _U32.unpack_from(meta, pos)
        if question == 0:
            raise _bad_target("ANSWER of question 0 (question ids are non-zero)")
        count = meta[pos + 4]
        if count > MAX_PATH:
            raise _bad_target(f"ANSWER path of {count} steps (at most {MAX_PATH})")
        pos += 5
        path: list[int | str] = []
        for i in range(count):
            if pos >= n:
                raise _bad_target(f"ANSWER path truncated at step {i}")
            step = meta[pos]
            if step == _STEP_INDEX:
                if pos + 3 > n:
                    raise _bad_target(f"ANSWER path truncated in step {i} (an index)")
                path.append(_U16.unpack_from(meta, pos + 1)[0])
                pos += 3
            elif step == _STEP_KEY:
                if pos + 2 > n:
                    raise _bad_target(f"ANSWER path truncated in step {i} (a key)")
                size = meta[pos + 1]
                end = pos + 2 + size
                if end > n:
                    raise _bad_target(f"ANSWER path step {i}: key of {size} bytes truncated")
                path.append(_decode_text(meta[pos + 2 : end], f"ANSWER path step {i}"))
                pos = end
            else:
                raise _bad_target(f"ANSWER path step {i} of unknown kind 0x{step:02x}")
        return AnswerTarget(question, tuple(path)), pos
    raise _bad_target(f"unknown kind 0x{kind:02x} (0x01 OBJECT, 0x02 ANSWER, 0x03 NAME)")


def _decode_text(data: bytes, what: str) -> str:
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise _bad_target(f"{what} is not valid UTF-8") from None


# --------------------------------------------------------------------------- messages


@message
class Call(PatternMessage):
    """CALL: ``method`` on ``target`` with ``args`` and ``kwargs`` (which hold :class:`Ref`
    placeholders where references came: ``has_refs`` says whether any did)."""

    request_id: int
    target: Target
    method: str
    args: list[Any]
    kwargs: dict[str, Any]
    codec: int = 1
    budget_ms: int | None = None
    """Flag DEADLINE: the caller's budget in milliseconds when it sent the frame."""
    metadata: Metadata | None = None
    """Flag METADATA: the metadata map."""
    oneway: bool = False
    keep: bool = False
    has_refs: bool = False
    """Any reference (ext 2) was decoded in ``args`` or ``kwargs``."""
    size: int = field(default=0, compare=False)
    """meta + body bytes of the frame (0 when not known), as :attr:`Request.size`."""


@message
class Return(PatternMessage):
    """RETURN: the client's answer to the server's CALL ``request_id``: ``ok`` with ``result``,
    or failed with ``code``, ``type`` and ``message`` (ERROR's fields)."""

    request_id: int
    ok: bool
    result: Any = None
    code: int = 0
    type: str = ""
    message: str = ""
    codec: int = 1
    has_refs: bool = False


@message
class Release(PatternMessage):
    """RELEASE: ``releases`` (object id, count) give back counts of the receiver's exports;
    ``finished`` ends KEEP questions of the sender's; ``end``: the sender's session is over."""

    releases: tuple[tuple[bytes, int], ...] = ()
    finished: tuple[int, ...] = ()
    end: bool = False


@message
class Renew(PatternMessage):
    """RENEW: the client's session (and with it every reference it holds) is alive."""


@message
class Abort(PatternMessage):
    """ABORT: the server gave up its CALL ``request_id`` (timed out): stop it if it runs."""

    request_id: int


# --------------------------------------------------------------------------- encoding


def _frame(type_: int, rid: int, meta: bytes, body: bytes, flags: int = 0, codec: int = 0) -> bytes:
    return pack_header(type_, flags, codec, len(meta), rid, len(body)) + meta + body


def _msgpack_only(codec: Codec, what: str) -> None:
    if codec.id != 1:
        raise LocalProtocolError(
            f"{what} is msgpack (codec 1) only in protocol version 1, not {codec.name}",
            ErrorCode.UNSUPPORTED_CODEC,
        )


def _check_id(request_id: int, what: str) -> None:
    if type(request_id) is not int or not 1 <= request_id <= _MAX_U32:
        raise LocalProtocolError(
            f"{what}'s request id is 1..2^32-1, not {request_id!r}", ErrorCode.DECODE_ERROR
        )


def encode_call(
    request_id: int,
    target: Target,
    method: str,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    codec: Codec = MSGPACK,
    *,
    budget_ms: int | None = None,
    metadata: Metadata | None = None,
    oneway: bool = False,
    keep: bool = False,
    to_ref: ToRef | None = None,
) -> bytes:
    """CALL bytes. ``to_ref`` maps a value to the reference it crosses as (or None: by value).
    A ONEWAY call has request id 0 and is never KEEP. Raises :class:`LocalProtocolError` (a
    request id, target, method name, metadata or meta size the receiver would refuse; a codec
    other than msgpack: UNSUPPORTED_CODEC) or :class:`CodecError` (arguments that do not
    encode); nothing is sent."""
    _msgpack_only(codec, "a CALL")
    flags = 0
    if oneway:
        if request_id != 0:
            raise LocalProtocolError(
                f"a ONEWAY CALL carries request id 0, not {request_id!r}", ErrorCode.DECODE_ERROR
            )
        if keep:
            raise LocalProtocolError(
                "a ONEWAY CALL cannot be KEEP: nothing names its answer", ErrorCode.DECODE_ERROR
            )
        flags = FLAG_ONEWAY
    else:
        _check_id(request_id, "a CALL")
    if keep:
        flags |= FLAG_KEEP
    name = method.encode("utf-8")
    if 0 in name:
        raise LocalProtocolError("a method name never contains a NUL character", _DECODE)
    meta = encode_target(target) + name
    if metadata is not None:
        meta += encode_metadata(metadata)
        flags |= FLAG_METADATA
    if budget_ms is not None:
        meta += _U32.pack(min(max(int(budget_ms), 0), _MAX_U32))
        flags |= FLAG_DEADLINE
    if len(meta) > DEFAULT_MAX_META:
        raise LocalProtocolError(
            f"CALL meta (target, method name, metadata) of {len(meta)} bytes exceeds the meta "
            f"limit of {DEFAULT_MAX_META} bytes",
            _DECODE,
        )
    if kwargs:
        body = pack([list(args), kwargs], to_ref)
        flags |= FLAG_KWARGS
    else:
        body = pack(args if type(args) is list else list(args), to_ref)
    return _frame(_CALL, request_id, meta, body, flags, 1)


def call_meta(target: Target, method: str) -> bytes:
    """A CALL's target and method name, encoded once for :func:`encode_call_meta` (a client
    calls the same few methods again and again). :class:`LocalProtocolError` as
    :func:`encode_call` (the 4 bytes of a DEADLINE budget counted in the meta limit)."""
    name = method.encode("utf-8")
    if 0 in name:
        raise LocalProtocolError("a method name never contains a NUL character", _DECODE)
    meta = encode_target(target) + name
    if len(meta) + 4 > DEFAULT_MAX_META:
        raise LocalProtocolError(
            f"CALL meta (target, method name) of {len(meta)} bytes exceeds the meta limit of "
            f"{DEFAULT_MAX_META} bytes",
            _DECODE,
        )
    return meta


def encode_call_meta(
    request_id: int,
    meta: bytes,
    args: Sequence[Any],
    budget_ms: int | None,
    to_ref: ToRef | None,
    keep: bool = False,
    *,
    _pack_u32: Callable[[int], bytes] = _U32.pack,
) -> bytes:
    """:func:`encode_call` for the common call: positional arguments, the meta from
    :func:`call_meta` (or :func:`answer_meta`), a DEADLINE budget or none, no metadata, not
    ONEWAY; KEEP with ``keep``. The request id is the caller's to keep in 1..2^32-1.
    :class:`CodecError` for arguments that do not encode."""
    body = pack(args if type(args) is list else list(args), to_ref)
    flags = FLAG_KEEP if keep else 0
    if budget_ms is None:
        return pack_header(_CALL, flags, 1, len(meta), request_id, len(body)) + meta + body
    meta += _pack_u32(budget_ms if 0 <= budget_ms <= _MAX_U32 else min(max(budget_ms, 0), _MAX_U32))
    flags |= FLAG_DEADLINE
    return pack_header(_CALL, flags, 1, len(meta), request_id, len(body)) + meta + body


def answer_meta(question: int, name: bytes) -> bytes:
    """:func:`call_meta` of an ANSWER target without steps, from a method name already checked
    by :func:`call_meta` (its UTF-8 bytes): a promise's calls, one per question."""
    return b"\x02" + _U32.pack(question) + b"\x00" + name


def encode_return(
    request_id: int, result: Any, codec: Codec = MSGPACK, *, to_ref: ToRef | None = None
) -> bytes:
    """RETURN bytes: the result of the server's CALL ``request_id``. :class:`CodecError` if it
    does not encode."""
    _msgpack_only(codec, "a RETURN")
    _check_id(request_id, "a RETURN")
    return _frame(_RETURN, request_id, b"", pack(result, to_ref), 0, 1)


def encode_return_error(request_id: int, code: int, type: str, message: str) -> bytes:
    """RETURN with flag FAILED: ERROR's layout (meta the type name, body ``code`` u16 then the
    message), codec byte 0."""
    _check_id(request_id, "a RETURN")
    name = type.encode("utf-8", "replace")
    if len(name) > DEFAULT_MAX_META:
        raise LocalProtocolError(
            f"an error type name of {len(name)} bytes exceeds the meta limit", _DECODE
        )
    body = _U16.pack(code) + message.encode("utf-8", "replace")
    return _frame(_RETURN, request_id, name, body, FLAG_FAILED, 0)


def encode_release(
    releases: Iterable[tuple[bytes, int]] = (),
    finished: Iterable[int] = (),
    end: bool = False,
    *,
    per_frame: int = MAX_RELEASE_ENTRIES,
) -> bytes:
    """RELEASE bytes: give back ``count`` of each object ``id``, finish the KEEP ``questions``,
    and with ``end`` end the session. Nothing to say (and not ``end``): ``b""``.

    At most ``per_frame`` entries (releases + finished, at most 10,000) go in one frame; a
    longer batch becomes several frames back to back (END on the last). An entry takes at most
    24 bytes: for a peer with a small ``max_frame``, pass ``(max_frame - 8) // 24``. Raises
    :class:`LocalProtocolError` (DECODE_ERROR) for an id that is not 16 bytes, a count or a
    question outside 1..2^32-1."""
    if not 1 <= per_frame <= MAX_RELEASE_ENTRIES:
        raise ValueError(f"per_frame is 1..{MAX_RELEASE_ENTRIES}, not {per_frame}")
    rel = [[oid, count] for oid, count in releases]
    fin = list(finished)
    for oid, count in rel:
        if type(oid) is not bytes or len(oid) != ID_SIZE:
            raise LocalProtocolError(f"an object id is {ID_SIZE} bytes, not {_size(oid)}", _DECODE)
        if type(count) is not int or not 1 <= count <= _MAX_U32:
            raise LocalProtocolError(f"a release count is 1..2^32-1, not {count!r}", _DECODE)
    for q in fin:
        if type(q) is not int or not 1 <= q <= MAX_QUESTION:
            raise LocalProtocolError(f"a finished question is 1..2^32-1, not {q!r}", _DECODE)
    flags = FLAG_END if end else 0
    if not rel and not fin:
        return _frame(_RELEASE, 0, b"", b"", flags) if end else b""
    frames: list[bytes] = []
    while rel or fin:
        r, rel = rel[:per_frame], rel[per_frame:]
        f, fin = fin[: per_frame - len(r)], fin[per_frame - len(r) :]
        body = msgpack.packb([r, f], use_bin_type=True)
        frames.append(_frame(_RELEASE, 0, b"", body, 0 if rel or fin else flags, 1))
    return b"".join(frames)


def encode_renew() -> bytes:
    """RENEW bytes: 16 bytes, no meta, no body, codec 0."""
    return _frame(_RENEW, 0, b"", b"")


def encode_abort(request_id: int) -> bytes:
    """ABORT bytes: the server gives up its CALL ``request_id``."""
    _check_id(request_id, "an ABORT")
    return _frame(_ABORT, request_id, b"", b"")


def encode_response_with_refs(
    request_id: int, result: Any, *, to_ref: ToRef | None, metadata: Metadata | None = None
) -> bytes:
    """Core RESPONSE (type 0x04) bytes whose msgpack body may hold references (PROTOCOL.md
    §4.5: the answer to a client's CALL, or to ``objects.*`` methods); ``metadata``: trailers
    (flag METADATA). :class:`CodecError` if the result does not encode."""
    meta, flags = b"", 0
    if metadata is not None:
        meta, flags = encode_metadata(metadata), FLAG_METADATA
    return _frame(_RESPONSE, request_id, meta, pack(result, to_ref), flags, 1)


# --------------------------------------------------------------------------- decoding


def decode_response_refs(source: Frame | bytes | bytearray | memoryview) -> tuple[Any, bool]:
    """``(result, any_reference_seen)`` of a RESPONSE frame, or of a RESPONSE body in msgpack,
    on a session where references may come (one that attached objects, §4.5). A frame in
    another codec (JSON) decodes as usual (it holds no reference). Trailers (flag METADATA) stay
    in the frame's meta: :func:`~sockstack.protocol.messages.split_meta` reads them. Raises
    :class:`RemoteProtocolError` (DECODE_ERROR, UNSUPPORTED_CODEC) for bad input."""
    if isinstance(source, Frame):
        if source.type != _RESPONSE:
            raise RemoteProtocolError(
                f"frame of type 0x{source.type:02x} is not a RESPONSE", _DECODE
            )
        codec = CODECS.get(source.codec)
        if codec is None:
            raise RemoteProtocolError(
                f"unknown codec id {source.codec}", ErrorCode.UNSUPPORTED_CODEC
            )
        if codec.id != 1:
            try:
                return codec.decode(source.body), False
            except CodecError as exc:
                raise RemoteProtocolError(str(exc), _DECODE) from None
        source = source.body
    try:
        return unpack(source)
    except CodecError as exc:
        raise RemoteProtocolError(str(exc), _DECODE) from None


def _decode_call(f: Frame) -> Call:
    flags = f.flags
    rid = f.request_id
    oneway = bool(flags & FLAG_ONEWAY)
    keep = bool(flags & FLAG_KEEP)
    if oneway:
        if rid:
            raise RemoteProtocolError(
                f"a ONEWAY CALL carries request id 0, not {rid}", ErrorCode.DECODE_ERROR
            )
        if keep:
            raise RemoteProtocolError("a ONEWAY CALL cannot be KEEP", _DECODE)
    elif not rid:
        raise RemoteProtocolError(
            "CALL with request id 0 and no ONEWAY flag: its answer could not be matched", _DECODE
        )
    if f.codec != 1:
        known = f.codec in CODECS
        raise RemoteProtocolError(
            f"CALL in codec {f.codec}: "
            + ("calls on objects are msgpack (codec 1) in version 1" if known else "unknown"),
            ErrorCode.UNSUPPORTED_CODEC,
        )
    meta = f.meta
    budget = None
    if flags & FLAG_DEADLINE:
        if len(meta) < 4:
            raise RemoteProtocolError(
                f"CALL with the DEADLINE flag has a meta section of {len(meta)} bytes", _DECODE
            )
        (budget,) = _U32.unpack_from(meta, len(meta) - 4)
        meta = meta[:-4]
    target, pos = decode_target(meta)
    rest = meta[pos:]
    metadata = None
    if flags & FLAG_METADATA:
        cut = rest.find(0)
        if cut < 0:
            raise RemoteProtocolError(
                "CALL with the METADATA flag has no 0x00 byte after its method name", _DECODE
            )
        metadata = decode_metadata(rest[cut + 1 :])
        rest = rest[:cut]
    try:
        method = rest.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError("CALL method name is not valid UTF-8", _DECODE) from None
    try:
        value, has_refs = unpack(f.body)
    except CodecError as exc:
        raise RemoteProtocolError(f"CALL arguments: {exc}", _DECODE) from None
    if flags & FLAG_KWARGS:
        if not (
            type(value) is list
            and len(value) == 2
            and type(value[0]) is list
            and type(value[1]) is dict
            and all(type(k) is str for k in value[1])
        ):
            raise RemoteProtocolError(
                "CALL with the KWARGS flag must carry [array, map of string keys]", _DECODE
            )
        args, kwargs = value
    elif type(value) is list:
        args, kwargs = value, {}
    else:
        raise RemoteProtocolError("CALL body must be an array of arguments", _DECODE)
    size = len(f.meta) + len(f.body)
    return Call(
        rid, target, method, args, kwargs, 1, budget, metadata, oneway, keep, has_refs, size
    )


_unpackb = msgpack.unpackb
_u32_from = _U32.unpack_from
_OBJECT_TARGETS: dict[bytes, ObjectTarget] = {}
"""The OBJECT targets the fast decoder built lately, by id: a server's calls name the same few
objects again and again, and a frozen dataclass costs ~3x a dict lookup to build. Bounded:
cleared at 4,096 entries."""


def _fast_call(
    data: bytes,
    meta: int,
    body: int,
    end: int,
    flags: int,
    codec: int,
    rid: int,
    *,
    _targets: dict[bytes, ObjectTarget] = _OBJECT_TARGETS,
    _call: type[Call] = Call,
    _maxc: int = MAX_CONTAINER,
) -> Call | None:
    """The common CALL straight from the receive buffer: msgpack positional arguments without
    references, target OBJECT, NAME or ANSWER without steps, flags DEADLINE and KEEP at most.
    None for anything else (the general path decodes it, and reports the exact error)."""
    # (literals and keyword defaults rather than module globals: this runs once per call)
    if codec != 1 or not rid or flags & 0xBB or meta >= body:  # flags other than 0x04, 0x40
        return None
    if flags & 0x04:  # DEADLINE
        stop = body - 4
        if stop <= meta:
            return None
        budget: int | None = _u32_from(data, stop)[0]
    else:
        stop, budget = body, None
    kind = data[meta]
    target: Target | None
    if kind == 1:  # OBJECT
        pos = meta + 17
        if pos > stop:
            return None
        oid = bytes(data[meta + 1 : pos])
        target = _targets.get(oid)
        if target is None:
            if len(_targets) >= 4096:
                _targets.clear()
            target = _targets[oid] = ObjectTarget(oid)
    elif kind == 3:  # NAME
        if meta + 1 >= stop:
            return None
        pos = meta + 2 + data[meta + 1]
        if pos > stop or pos == meta + 2:
            return None
        try:
            target = NameTarget(str(data[meta + 2 : pos], "utf-8"))
        except UnicodeDecodeError:
            return None
    elif kind == 2:  # ANSWER, without steps
        pos = meta + 6
        if pos > stop or data[meta + 5]:
            return None
        question: int = _u32_from(data, meta + 1)[0]
        if not question:
            return None
        target = AnswerTarget(question)
    else:
        return None
    try:
        method = str(data[pos:stop], "utf-8")
        args = _unpackb(
            data[body:end],
            raw=False,
            strict_map_key=False,
            ext_hook=refuse_ext,  # a reference: the general path
            timestamp=3,
            max_array_len=_maxc,
            max_map_len=_maxc,
        )
    except Exception:
        return None
    if type(args) is not list:
        return None
    keep = flags > 0x3F  # KEEP (0x40): the only flag above DEADLINE left here
    return _call(rid, target, method, args, {}, 1, budget, None, False, keep, False, end - meta)


def _failed(rid: int, code: int, message: str, codec: int) -> Return:
    return Return(rid, False, None, code, ErrorCode(code).name, message, codec)


def _decode_return(f: Frame) -> Return:
    rid = f.request_id
    if not rid:  # no CALL to fail, and an ERROR with an id would name a call of the client's
        raise RemoteProtocolError("RETURN with request id 0 answers no CALL")
    if f.flags & FLAG_FAILED:
        body = f.body
        if len(body) < 2:
            return _failed(rid, _DECODE, "a failed RETURN's body is shorter than 2 bytes", f.codec)
        (code,) = _U16.unpack_from(body)
        return Return(
            rid,
            False,
            None,
            code,
            bytes(f.meta).decode("utf-8", "replace"),
            bytes(body[2:]).decode("utf-8", "replace"),
            f.codec,
        )
    if f.codec != 1:
        return _failed(
            rid,
            ErrorCode.UNSUPPORTED_CODEC,
            f"RETURN in codec {f.codec}: a RETURN answers a CALL, in msgpack (codec 1)",
            f.codec,
        )
    try:
        value, has_refs = unpack(f.body)
    except CodecError as exc:
        return _failed(rid, _DECODE, f"RETURN: {exc}", 1)
    return Return(rid, True, value, 0, "", "", 1, has_refs)


def _entries_error(n: int) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"RELEASE of {n} entries or more (at most {MAX_RELEASE_ENTRIES} per frame)", _DECODE
    )


def _decode_release(f: Frame) -> Release:
    end = bool(f.flags & FLAG_END)
    body = f.body
    if not body:  # nothing released or finished (END alone); the codec byte is not read
        return Release((), (), end)
    if f.codec != 1:
        raise RemoteProtocolError(
            f"RELEASE body in codec {f.codec}: it is msgpack (codec 1)", _DECODE
        )
    try:
        value = msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            max_array_len=MAX_RELEASE_ENTRIES,
            max_map_len=0,
            max_str_len=0,
            max_bin_len=ID_SIZE,
            max_ext_len=0,
        )
    except ValueError as exc:
        if "max_array_len" in str(exc):
            raise _entries_error(MAX_RELEASE_ENTRIES + 1) from None
        raise RemoteProtocolError(f"RELEASE body is not valid: {exc}", _DECODE) from None
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise RemoteProtocolError(
            f"RELEASE body is not valid: {type(exc).__name__}: {exc}", _DECODE
        ) from None
    if not (type(value) is list and len(value) == 2):
        raise RemoteProtocolError("RELEASE body must be [releases, finished]", _DECODE)
    rel, fin = value
    if type(rel) is not list or type(fin) is not list:
        raise RemoteProtocolError("RELEASE body must be [releases, finished]: two arrays", _DECODE)
    if len(rel) + len(fin) > MAX_RELEASE_ENTRIES:
        raise _entries_error(len(rel) + len(fin))
    releases: list[tuple[bytes, int]] = []
    for entry in rel:
        if not (
            type(entry) is list
            and len(entry) == 2
            and type(entry[0]) is bytes
            and len(entry[0]) == ID_SIZE
            and type(entry[1]) is int
            and 1 <= entry[1] <= _MAX_U32
        ):
            raise RemoteProtocolError(
                f"RELEASE entry {len(releases)}: [id of {ID_SIZE} bytes, count 1..2^32-1]",
                _DECODE,
            )
        releases.append((entry[0], entry[1]))
    for q in fin:
        if type(q) is not int or not 1 <= q <= MAX_QUESTION:
            raise RemoteProtocolError(f"RELEASE finished question {q!r} outside 1..2^32-1", _DECODE)
    return Release(tuple(releases), tuple(fin), end)


def _fast_release(
    data: bytes, meta: int, body: int, end: int, flags: int, codec: int, rid: int
) -> Release | None:
    """RELEASE straight from the receive buffer (the frames after it in a read stay on the
    fast path too); None for one with meta or that does not decode (the general path reports
    it)."""
    if meta != body:
        return None
    try:
        return _decode_release(Frame(_RELEASE, rid, flags, codec, b"", bytes(data[body:end])))
    except RemoteProtocolError:
        return None


def _decode_renew(f: Frame) -> Renew:
    return Renew()  # meta, body, codec and id are not read: a RENEW is never refused


def _decode_abort(f: Frame) -> Abort:
    return Abort(f.request_id)  # never refused; an id not in flight (0 included) is ignored


_CLIENT = frozenset({Role.CLIENT})
_SERVER = frozenset({Role.SERVER})
OBJECTS_MESSAGES = MessageSet(
    "objects",
    0x20,
    0x2F,
    (
        MessageSpec(ObjectsType.CALL, "CALL", _decode_call, BOTH, _fast_call, Call),
        MessageSpec(ObjectsType.RETURN, "RETURN", _decode_return, _CLIENT, cls=Return),
        MessageSpec(ObjectsType.RELEASE, "RELEASE", _decode_release, BOTH, _fast_release, Release),
        MessageSpec(ObjectsType.RENEW, "RENEW", _decode_renew, _CLIENT, cls=Renew),
        MessageSpec(ObjectsType.ABORT, "ABORT", _decode_abort, _SERVER, cls=Abort),
    ),
)
"""Remote objects' messages (range 0x20-0x2F), to add to a session registry."""
