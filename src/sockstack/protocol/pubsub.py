"""Publish/subscribe messages (types 0x10-0x14): layouts, encoders, decoders, registration.

Byte layouts (docs/PROTOCOL.md §4.1):

- SUB (client): ``request_id`` = subscription id (non-zero, chosen by the client); meta = the
  pattern, UTF-8; body = options, a msgpack map (may be empty). Answered with RESPONSE (same
  id) once the broker has the subscription, or ERROR.
- UNSUB (client): ``request_id`` = subscription id. Answered with RESPONSE or ERROR.
- PUB (client): ``request_id`` 0 = QoS 0 (no answer); non-zero = QoS 1 (RESPONSE once the
  broker has accepted it). meta = topic; body = the payload, opaque to the broker, in the codec
  the header names. Flag 0x04 RETAIN: keep it as the topic's last message.
- MSG (broker): ``request_id`` = delivery id, 0 at QoS 0 (else ACK it); meta = subscription id
  (u32) then the topic; body and codec as published. Flags: 0x04 RETAINED (from the retained
  store), 0x08 REDELIVERED.
- ACK (client): ``request_id`` = delivery id. Nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from sockstack.errors import CodecError, ErrorCode, RemoteProtocolError
from sockstack.protocol.codecs import MSGPACK
from sockstack.protocol.frames import HEADER, MAGIC, PROTOCOL_VERSION, Frame, MessageType
from sockstack.protocol.messages import Role, register_message

__all__ = [
    "FLAG_REDELIVERED",
    "FLAG_RETAIN",
    "Ack",
    "Msg",
    "Pub",
    "Sub",
    "Unsub",
    "encode_ack",
    "encode_msg",
    "encode_pub",
    "encode_sub",
    "encode_unsub",
    "sub_options",
]

FLAG_RETAIN = 0x04
"""PUB: keep as the topic's retained message. MSG: delivered from the retained store."""
FLAG_REDELIVERED = 0x08
_SID = struct.Struct(">I")
_pack_header = HEADER.pack
_SUB, _UNSUB, _PUB, _MSG, _ACK = (
    int(MessageType.SUB),
    int(MessageType.UNSUB),
    int(MessageType.PUB),
    int(MessageType.MSG),
    int(MessageType.ACK),
)


@dataclass(slots=True)
class Sub:
    sid: int
    pattern: str
    options: dict[str, Any]


@dataclass(slots=True)
class Unsub:
    sid: int


@dataclass(slots=True)
class Pub:
    request_id: int
    topic: str
    payload: bytes
    codec: int = 1
    retain: bool = False


@dataclass(slots=True)
class Msg:
    delivery_id: int
    sid: int
    topic: str
    payload: bytes
    codec: int = 1
    retained: bool = False
    redelivered: bool = False


@dataclass(slots=True)
class Ack:
    delivery_id: int


def _frame(type_: int, rid: int, meta: bytes, body: bytes, flags: int = 0, codec: int = 1) -> bytes:
    return _pack_header(MAGIC, PROTOCOL_VERSION, type_, flags, codec, len(meta), rid, len(body)) + (
        meta + body
    )


def sub_options(
    group: str | None = None,
    qos: int = 0,
    policy: str | None = None,
    max_msgs: int | None = None,
    max_bytes: int | None = None,
) -> dict[str, Any]:
    """The SUB options map, with only what differs from the broker's defaults."""
    options: dict[str, Any] = {}
    for key, value in (
        ("group", group),
        ("qos", qos or None),
        ("policy", policy),
        ("max_msgs", max_msgs),
        ("max_bytes", max_bytes),
    ):
        if value is not None:
            options[key] = value
    return options


def encode_sub(sid: int, pattern: str, options: dict[str, Any] | None = None) -> bytes:
    return _frame(_SUB, sid, pattern.encode(), MSGPACK.encode(options) if options else b"")


def encode_unsub(sid: int) -> bytes:
    return _frame(_UNSUB, sid, b"", b"")


def encode_pub(
    topic: str, payload: bytes, request_id: int = 0, codec: int = 1, retain: bool = False
) -> bytes:
    return _frame(_PUB, request_id, topic.encode(), payload, FLAG_RETAIN if retain else 0, codec)


def encode_msg(
    delivery_id: int,
    sid: int,
    topic: bytes,
    payload: bytes,
    codec: int = 1,
    flags: int = 0,
) -> bytes:
    """``topic`` already UTF-8 (the broker encodes it once per publish, not per subscriber)."""
    meta = _SID.pack(sid) + topic
    return _pack_header(
        MAGIC, PROTOCOL_VERSION, _MSG, flags, codec, len(meta), delivery_id, len(payload)
    ) + (meta + payload)


def encode_ack(delivery_id: int) -> bytes:
    return _frame(_ACK, delivery_id, b"", b"")


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"{what} is not valid UTF-8", ErrorCode.BAD_TOPIC) from None


def _decode_sub(f: Frame) -> Sub:
    if f.request_id == 0:
        raise RemoteProtocolError("SUB needs a non-zero subscription id", ErrorCode.DECODE_ERROR)
    options: Any = {}
    if f.body:
        try:
            options = MSGPACK.decode(f.body)
        except CodecError as exc:
            raise RemoteProtocolError(str(exc), ErrorCode.DECODE_ERROR) from None
        if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
            raise RemoteProtocolError("SUB options must be a map", ErrorCode.DECODE_ERROR)
    return Sub(f.request_id, _text(f.meta, "pattern"), options)


def _decode_pub(f: Frame) -> Pub:
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


_CLIENT = frozenset({Role.CLIENT})
register_message(MessageType.SUB, _decode_sub, _CLIENT)
register_message(MessageType.UNSUB, lambda f: Unsub(f.request_id), _CLIENT)
register_message(MessageType.PUB, _decode_pub, _CLIENT)
register_message(MessageType.MSG, _decode_msg, frozenset({Role.SERVER}))
register_message(MessageType.ACK, lambda f: Ack(f.request_id), _CLIENT)
