"""Publish/subscribe messages (types 0x10-0x14): layouts, encoders, decoders, and
:data:`PUBSUB_MESSAGES`, the set the host and the clients add to their sessions' registry.

Byte layouts (docs/PROTOCOL.md §4.1):

- SUB (client): ``request_id`` = subscription id (non-zero, chosen by the client); meta = the
  pattern, UTF-8; body = options, a map in the header's codec (msgpack or JSON), or no bytes
  at all (then no body is decoded and the codec byte selects only the answer's codec, an
  unknown one: codec 0, empty body; 0 is sent). Answered with RESPONSE (same id, result nil in
  the SUB's codec) once the broker has the subscription, or ERROR.
- UNSUB (client): ``request_id`` = subscription id; no body, codec 0 sent, any accepted (it
  selects the answer's codec, as for a SUB without options). Answered with RESPONSE (nil, in
  the UNSUB's codec) or ERROR.
- PUB (client): ``request_id`` 0 = QoS 0 (no answer); non-zero = QoS 1 (RESPONSE, nil in the
  PUB's codec, once the broker has accepted it). meta = topic; body = the payload, opaque to
  the broker, in the codec the header names (one the broker has: else UNSUPPORTED_CODEC).
  Flag 0x04 RETAIN: keep it as the topic's last message; an empty RETAIN body clears it.
- MSG (broker): ``request_id`` = delivery id, 0 at QoS 0 (else ACK it); meta = subscription id
  (u32) then the topic; body and codec as published. Flags: 0x04 RETAINED (from the retained
  store), 0x08 REDELIVERED.
- ACK (client): ``request_id`` = delivery id; no body, codec 0 sent, any accepted (no effect:
  an ACK is never answered with RESPONSE).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from typing import Any

from sockstack.errors import CodecError, ErrorCode, RemoteProtocolError
from sockstack.protocol.codecs import CODECS
from sockstack.protocol.events import PatternMessage, Role, message
from sockstack.protocol.frames import HEADER, MAGIC, PROTOCOL_VERSION, Frame, pack_header
from sockstack.protocol.registry import MessageSet, MessageSpec

__all__ = [
    "FLAG_REDELIVERED",
    "FLAG_RETAIN",
    "PUBSUB_MESSAGES",
    "Ack",
    "Msg",
    "Pub",
    "PubSubType",
    "Sub",
    "Unsub",
    "encode_ack",
    "encode_msg",
    "encode_pub",
    "encode_sub",
    "encode_unsub",
    "msg_head",
    "sub_options",
]


class PubSubType(enum.IntEnum):
    """Publish/subscribe's message types, in the range 0x10-0x1F PROTOCOL.md reserves for it."""

    SUB = 0x10
    UNSUB = 0x11
    PUB = 0x12
    MSG = 0x13
    ACK = 0x14


FLAG_RETAIN = 0x04
"""PUB: keep as the topic's retained message. MSG: delivered from the retained store."""
FLAG_REDELIVERED = 0x08
_SID = struct.Struct(">I")
_MSG_HEAD = struct.Struct(HEADER.format + "I")  # a MSG's header, then its subscription id
_FAST_FLAGS = FLAG_RETAIN | FLAG_REDELIVERED  # frames with other flags take the general path
_SUB, _UNSUB, _PUB, _MSG, _ACK = (
    int(PubSubType.SUB),
    int(PubSubType.UNSUB),
    int(PubSubType.PUB),
    int(PubSubType.MSG),
    int(PubSubType.ACK),
)


@message
class Sub(PatternMessage):
    sid: int
    pattern: str
    options: dict[str, Any]
    codec: int = 1
    """The header's codec byte: the options' codec (when there are options) and the answer's."""


@message
class Unsub(PatternMessage):
    sid: int
    codec: int = 0
    """The header's codec byte (there is no body): the answer's codec when the broker has it."""


@message
class Pub(PatternMessage):
    request_id: int
    topic: str
    payload: bytes
    codec: int = 1
    retain: bool = False


@message
class Msg(PatternMessage):
    delivery_id: int
    sid: int
    topic: str
    payload: bytes
    codec: int = 1
    retained: bool = False
    redelivered: bool = False


@message
class Ack(PatternMessage):
    delivery_id: int


def _frame(type_: int, rid: int, meta: bytes, body: bytes, flags: int = 0, codec: int = 0) -> bytes:
    return pack_header(type_, flags, codec, len(meta), rid, len(body)) + (meta + body)


def sub_options(
    group: str | None = None,
    qos: int = 0,
    policy: str | None = None,
    max_msgs: int | None = None,
    max_bytes: int | None = None,
    durable: str | None = None,
    max_age: float | None = None,
) -> dict[str, Any]:
    """The SUB options map, with only what differs from the broker's defaults."""
    options: dict[str, Any] = {}
    for key, value in (
        ("group", group),
        ("qos", qos or None),
        ("policy", policy),
        ("max_msgs", max_msgs),
        ("max_bytes", max_bytes),
        ("durable", durable),
        ("max_age", max_age),
    ):
        if value is not None:
            options[key] = value
    return options


def encode_sub(
    sid: int, pattern: str, options: dict[str, Any] | None = None, codec: int = 1
) -> bytes:
    """SUB with ``options`` encoded in ``codec`` (1 msgpack, 2 JSON); without options, no body
    and codec 0 (PROTOCOL.md §4.1)."""
    if not options:
        return _frame(_SUB, sid, pattern.encode(), b"")
    if codec not in (1, 2):
        raise CodecError(f"SUB options are a map: msgpack (1) or JSON (2), not codec {codec}")
    return _frame(_SUB, sid, pattern.encode(), CODECS[codec].encode(options), 0, codec)


def encode_unsub(sid: int) -> bytes:
    """UNSUB: no body, codec 0."""
    return _frame(_UNSUB, sid, b"", b"")


_PUB_TOPICS: dict[str, tuple[Callable[..., bytes], bytes]] = {}
"""A published topic -> a packer of a PUB's header with a topic of its length after it, and the
topic's UTF-8 (publishers repeat their topics). Bounded: topics up to 256 bytes (the longest
a broker takes), 4,096 of them, emptied when full (under 3 MB); one packer per length."""
_PUB_PACKS: dict[int, Callable[..., bytes]] = {}


def encode_pub(
    topic: str, payload: bytes, request_id: int = 0, codec: int = 1, retain: bool = False
) -> bytes:
    cached = _PUB_TOPICS.get(topic)
    if cached is None:
        meta = topic.encode()
        if len(meta) > 256:
            return _frame(_PUB, request_id, meta, payload, FLAG_RETAIN if retain else 0, codec)
        pack = _PUB_PACKS.get(len(meta))
        if pack is None:
            pack = _PUB_PACKS[len(meta)] = struct.Struct(f"{HEADER.format}{len(meta)}s").pack
        if len(_PUB_TOPICS) >= 4096:
            _PUB_TOPICS.clear()
        cached = _PUB_TOPICS[topic] = (pack, meta)
    pack, meta = cached
    return (
        pack(
            MAGIC,
            PROTOCOL_VERSION,
            _PUB,
            FLAG_RETAIN if retain else 0,
            codec,
            len(meta),
            request_id,
            len(payload),
            meta,
        )
        + payload
    )


def encode_msg(
    delivery_id: int,
    sid: int,
    topic: bytes,
    payload: bytes,
    codec: int = 1,
    flags: int = 0,
) -> bytes:
    """``topic`` already UTF-8 (the broker encodes it once per publish, not per subscriber)."""
    return (
        _MSG_HEAD.pack(
            MAGIC,
            PROTOCOL_VERSION,
            _MSG,
            flags,
            codec,
            4 + len(topic),
            delivery_id,
            len(payload),
            sid,
        )
        + topic
        + payload
    )


def msg_head(
    delivery_id: int, sid: int, topic: bytes, payload_len: int, codec: int = 1, flags: int = 0
) -> bytes:
    """A MSG frame without its payload (``msg_head(...) + payload`` is
    :func:`encode_msg`): the broker reuses it for a run of messages of the same topic and size."""
    return (
        _MSG_HEAD.pack(
            MAGIC,
            PROTOCOL_VERSION,
            _MSG,
            flags,
            codec,
            4 + len(topic),
            delivery_id,
            payload_len,
            sid,
        )
        + topic
    )


def encode_ack(delivery_id: int) -> bytes:
    """ACK: no body, codec 0."""
    return _frame(_ACK, delivery_id, b"", b"")


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"{what} is not valid UTF-8", ErrorCode.BAD_TOPIC) from None


def _decode_sub(f: Frame) -> Sub:
    """Options in the header's codec; no body: no options (the byte is the answer's codec)."""
    if f.request_id == 0:
        raise RemoteProtocolError("SUB needs a non-zero subscription id", ErrorCode.DECODE_ERROR)
    options: Any = {}
    if f.body:
        codec = CODECS.get(f.codec)
        if codec is None:
            raise RemoteProtocolError(f"unknown codec id {f.codec}", ErrorCode.UNSUPPORTED_CODEC)
        if not codec.structured:
            raise RemoteProtocolError(
                "SUB options are a map, in msgpack (codec 1) or JSON (codec 2), not raw",
                ErrorCode.DECODE_ERROR,
            )
        try:
            options = codec.decode(f.body)
        except CodecError as exc:
            raise RemoteProtocolError(str(exc), ErrorCode.DECODE_ERROR) from None
        if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
            raise RemoteProtocolError("SUB options must be a map", ErrorCode.DECODE_ERROR)
    return Sub(f.request_id, _text(f.meta, "pattern"), options, f.codec)


def _decode_pub(f: Frame) -> Pub:
    if f.codec not in CODECS:  # subscribers could not decode it (PROTOCOL.md §3, §4.1)
        raise RemoteProtocolError(f"unknown codec id {f.codec}", ErrorCode.UNSUPPORTED_CODEC)
    return Pub(f.request_id, _text(f.meta, "topic"), f.body, f.codec, bool(f.flags & FLAG_RETAIN))


def _decode_msg(f: Frame) -> Msg:
    if len(f.meta) < 4:
        raise RemoteProtocolError(
            "MSG meta must start with a subscription id", ErrorCode.DECODE_ERROR
        )
    (sid,) = _SID.unpack_from(f.meta)
    return Msg(
        f.request_id,
        sid,
        _text(f.meta[4:], "topic"),
        f.body,
        f.codec,
        bool(f.flags & FLAG_RETAIN),
        bool(f.flags & FLAG_REDELIVERED),
    )


def _fast_pub(
    data: bytes, meta: int, body: int, end: int, flags: int, codec: int, rid: int
) -> Pub | None:
    """PUB straight from the receive buffer (the bulk of a broker's input)."""
    if flags & ~_FAST_FLAGS or codec > 2:
        return None
    try:
        topic = data[meta:body].decode()  # (UTF-8: str(..., "utf-8") looks the codec up)
    except UnicodeDecodeError:
        return None
    return Pub(rid, topic, data[body:end], codec, bool(flags & FLAG_RETAIN) if flags else False)


_MSG_METAS: dict[bytes, tuple[int, str]] = {}
"""A MSG's meta (subscription id, topic) -> both decoded: a subscriber sees the same few again
and again. Bounded: metas up to 260 bytes (a topic of the broker's 256 at most), 4,096 of
them, emptied when full (under 3 MB)."""


def _fast_msg(
    data: bytes, meta: int, body: int, end: int, flags: int, codec: int, rid: int
) -> Msg | None:
    """MSG straight from the receive buffer (the bulk of a subscriber's input)."""
    if flags & ~_FAST_FLAGS or codec > 2 or body - meta < 4:
        return None
    key = data[meta:body]
    known = _MSG_METAS.get(key)
    if known is None:
        try:
            topic = key[4:].decode()
        except UnicodeDecodeError:
            return None
        known = (_SID.unpack_from(key)[0], topic)
        if len(key) <= 260:
            if len(_MSG_METAS) >= 4096:
                _MSG_METAS.clear()
            _MSG_METAS[key] = known
    if not flags:
        return Msg(rid, known[0], known[1], data[body:end], codec, False, False)
    return Msg(
        rid,
        known[0],
        known[1],
        data[body:end],
        codec,
        bool(flags & FLAG_RETAIN),
        bool(flags & FLAG_REDELIVERED),
    )


def _decode_unsub(f: Frame) -> Unsub:
    return Unsub(f.request_id, f.codec)  # any codec byte: there is no body to decode


def _decode_ack(f: Frame) -> Ack:
    return Ack(f.request_id)  # any codec byte (old peers send 1): there is no body


_CLIENT = frozenset({Role.CLIENT})
PUBSUB_MESSAGES = MessageSet(
    "pubsub",
    0x10,
    0x1F,
    (
        MessageSpec(PubSubType.SUB, "SUB", _decode_sub, _CLIENT, cls=Sub),
        MessageSpec(PubSubType.UNSUB, "UNSUB", _decode_unsub, _CLIENT, cls=Unsub),
        MessageSpec(PubSubType.PUB, "PUB", _decode_pub, _CLIENT, _fast_pub, Pub),
        MessageSpec(PubSubType.MSG, "MSG", _decode_msg, frozenset({Role.SERVER}), _fast_msg, Msg),
        MessageSpec(PubSubType.ACK, "ACK", _decode_ack, _CLIENT, cls=Ack),
    ),
)
"""Publish/subscribe's messages (range 0x10-0x1F), to add to a session registry."""
