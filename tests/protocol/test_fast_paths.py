"""Every fast path of the protocol core is driven by the same cases as its general path.

The session core (:class:`Connection`) reads through three fast paths in front of its general
decoder: ``receive_single`` (one whole msgpack REQUEST or RESPONSE per read; the adapters try it
first, the blocking client with a memoryview), the batch loop at the top of ``receive_data``
(whole frames parsed in place, PUB and MSG included), and the fast branch of the general loop.
The datagram core has one in ``DatagramServer.receive_datagram`` and one in
``DatagramClient.receive_datagram``. The senders have ``request_frame``/``response_frame`` next
to ``send_request``/``send_response``, and ``request_datagram`` next to ``send_request``.

Each case states the events and the frames sent that docs/PROTOCOL.md requires, and is fed
through every path that can take it (the same bytes whole, through ``receive_single`` or not,
byte by byte, split at random places, behind another frame in the same read): one path that
disagrees fails its case. Oversized cases carry a non-empty meta so that a limit checked on the
body alone is caught.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgpack
import pytest

from sockstack import CodecError, ErrorCode, LocalProtocolError, RemoteProtocolError
from sockstack.protocol import (
    Close,
    ConnectionTerminated,
    Error,
    Frame,
    FrameDecoder,
    HandshakeComplete,
    Hello,
    Pong,
    ProtocolViolation,
    Request,
    Response,
    RetryPolicy,
    Role,
    State,
    Welcome,
    encode_frame,
)
from sockstack.protocol import Connection as _Connection
from sockstack.protocol import DatagramClient as _DatagramClient
from sockstack.protocol import DatagramServer as _DatagramServer
from sockstack.protocol import MessageType as _CoreType
from sockstack.protocol import decode_message as _decode_message
from sockstack.protocol.codecs import CODECS
from sockstack.protocol.datagram import datagram_error_code
from sockstack.protocol.events import BadItem
from sockstack.protocol.messages import (
    CORE_MESSAGES,
    FLAG_DEADLINE,
    FLAG_END,
    FLAG_METADATA,
    FLAG_STREAM,
    FLAG_UPLOAD,
    Cancel,
    Credit,
    Item,
    encode_cancel,
    encode_credit,
    encode_error,
    encode_hello,
    encode_item,
    encode_item_end,
    encode_ping,
    encode_pong,
    encode_request,
    encode_response,
    encode_welcome,
    features_extension,
)
from sockstack.protocol.registry import Registry
from sockstack.pubsub.messages import (
    PUBSUB_MESSAGES,
    Ack,
    Msg,
    Pub,
    PubSubType,
    Sub,
    Unsub,
    encode_msg,
    encode_pub,
)

# Every core here also speaks publish/subscribe, whose PUB and MSG have fast decoders: their fast
# paths are fed the same cases as the general path.
REGISTRY = Registry([CORE_MESSAGES, PUBSUB_MESSAGES])


class MessageType:
    CANCEL, ITEM, CREDIT = _CoreType.CANCEL, _CoreType.ITEM, _CoreType.CREDIT
    REQUEST, RESPONSE, ERROR, PING = (
        _CoreType.REQUEST,
        _CoreType.RESPONSE,
        _CoreType.ERROR,
        _CoreType.PING,
    )
    HELLO, WELCOME, PONG, CLOSE = (
        _CoreType.HELLO,
        _CoreType.WELCOME,
        _CoreType.PONG,
        _CoreType.CLOSE,
    )
    PUB, MSG, SUB = PubSubType.PUB, PubSubType.MSG, PubSubType.SUB
    UNSUB, ACK = PubSubType.UNSUB, PubSubType.ACK


class Connection(_Connection):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, registry=REGISTRY, **kw)


class DatagramServer(_DatagramServer):
    def __init__(self, **kw: Any) -> None:
        super().__init__(registry=REGISTRY, **kw)


class DatagramClient(_DatagramClient):
    def __init__(self, **kw: Any) -> None:
        super().__init__(registry=REGISTRY, **kw)


def decode_message(frame: Frame) -> Any:
    return _decode_message(frame, REGISTRY)


packb = msgpack.packb
EXT = msgpack.ExtType
UNKNOWN_FLAG = 0x40  # a flag bit no message defines: receivers must ignore it (PROTOCOL.md §2)
LIMIT = 1000  # the frame limit of the stream cases


def request(rid: int, meta: bytes, body: bytes, flags: int = 0, codec: int = 1) -> bytes:
    return encode_frame(MessageType.REQUEST, rid, meta, body, flags, codec)


def response(rid: int, body: bytes, meta: bytes = b"", flags: int = 0, codec: int = 1) -> bytes:
    return encode_frame(MessageType.RESPONSE, rid, meta, body, flags, codec)


def args_of_size(size: int) -> bytes:
    """A msgpack array of one bytes value, ``size`` bytes long in all (size >= 260)."""
    for overhead in (3, 4, 6):  # array header + bin8, bin16 or bin32 header
        body = packb([b"x" * (size - overhead)])
        if len(body) == size:
            return body
    raise ValueError(size)


def arg_of_size(size: int) -> bytes:
    """The one argument inside ``args_of_size(size)``."""
    value: bytes = msgpack.unpackb(args_of_size(size))[0]
    return value


# ------------------------------------------------------------------------------ session core


def fatal(code: int, message: str) -> tuple[list[Any], list[Any]]:
    """Events and frames sent when the peer broke framing or a role rule: CLOSE, session over."""
    return (
        [ProtocolViolation(code, message, 0, True), ConnectionTerminated(code, message, False)],
        [Close(code, message)],
    )


def too_large(size: int, limit: int) -> tuple[list[Any], list[Any]]:
    return fatal(
        ErrorCode.FRAME_TOO_LARGE, f"frame of {size} bytes exceeds the limit of {limit} bytes"
    )


def refused(role: Role, rid: int, code: int, message: str) -> tuple[list[Any], list[Any]]:
    """A request-level error: the server answers ERROR, a client reports it as the call's Error;
    the session goes on."""
    violation = ProtocolViolation(code, message, rid)
    error = Error(rid, code, ErrorCode(code).name, message)
    if role is Role.SERVER:
        return [violation], [error]
    return [violation, error], []


def decode_failure(frame: bytes) -> str:
    """The general decoder's message for a frame it refuses (the reference for every path)."""
    (parsed,) = FrameDecoder(1 << 30, 1 << 16).feed(frame)
    try:
        decode_message(parsed)
    except RemoteProtocolError as exc:
        return exc.message
    raise AssertionError(f"the decoder accepts {frame!r}")


@dataclass
class Case:
    name: str
    role: Role
    data: bytes
    events: list[Any]
    sent: list[Any] = field(default_factory=list)
    closed: bool = False
    max_frame: int = LIMIT


def _accepted(name: str, role: Role, data: bytes, *events: Any, max_frame: int = LIMIT) -> Case:
    return Case(name, role, data, list(events), max_frame=max_frame)


def _fatal(
    name: str, role: Role, data: bytes, expected: tuple[list[Any], list[Any]], **kw: Any
) -> Case:
    return Case(name, role, data, expected[0], expected[1], closed=True, **kw)


def _refused(name: str, role: Role, data: bytes, rid: int, code: int, message: str = "") -> Case:
    events, sent = refused(role, rid, code, message or decode_failure(data))
    return Case(name, role, data, events, sent)


S, C = Role.SERVER, Role.CLIENT
ID_0 = "REQUEST with request id 0: a request's id is non-zero"  # PROTOCOL.md §4
BAD_UTF8 = b"\xff\xfe"

TEXT_ARGS = ["é", {"k": ["v", b"b"]}, {1: "int key"}]  # str stays str, bytes bytes, int keys

SERVER_CASES = [
    _accepted("request", S, request(1, b"add", packb([2, 3])), Request(1, "add", [2, 3], {}, 1)),
    _accepted(
        "request-text-and-maps",
        S,
        request(1, "échø".encode(), packb(TEXT_ARGS)),
        Request(1, "échø", TEXT_ARGS, {}, 1),
    ),
    _accepted(
        "request-unknown-flag",
        S,
        request(1, b"add", packb([2, 3]), UNKNOWN_FLAG),
        Request(1, "add", [2, 3], {}, 1),
    ),
    _accepted(
        "request-at-the-limit",  # 500 meta + 500 body = the limit exactly
        S,
        request(2, b"m" * 500, args_of_size(500)),
        Request(2, "m" * 500, [b"x" * 496], {}, 1),
    ),
    _fatal(  # the body alone (1,000) is within the limit: meta + body (5,000) is not
        "meta-and-body-over-the-limit",
        S,
        request(3, b"m" * 4000, args_of_size(1000)),
        too_large(5000, LIMIT),
    ),
    _fatal(
        "one-byte-over-the-limit",
        S,
        request(3, b"m" * 500, args_of_size(501)),
        too_large(1001, LIMIT),
    ),
    _fatal(
        "meta-over-the-meta-limit",
        S,
        request(3, b"m" * 4097, packb([])),
        too_large(4097, 4096),
        max_frame=10_000,
    ),
    _refused("ext-type-argument", S, request(4, b"add", packb([EXT(5, b"x"), 1])), 4, 2003),
    _refused("ext-type-nested", S, request(4, b"add", packb([{"k": [EXT(1, b"")]}])), 4, 2003),
    _refused("bad-utf8-method", S, request(5, BAD_UTF8, packb([1])), 5, 2003),
    _accepted(
        "kwargs-flag",
        S,
        request(6, b"kw", packb([[4], {"scale": 3}]), flags=1),
        Request(6, "kw", [4], {"scale": 3}, 1),
    ),
    _accepted(
        "kwargs-flag-and-unknown-flag",
        S,
        request(6, b"kw", packb([[4], {"scale": 3}]), flags=1 | UNKNOWN_FLAG),
        Request(6, "kw", [4], {"scale": 3}, 1),
    ),
    _refused("kwargs-flag-on-a-positional-body", S, request(7, b"add", packb([1, 2]), 1), 7, 2003),
    _refused("body-not-an-array", S, request(8, b"add", packb(5)), 8, 2003),
    _refused("body-a-map", S, request(8, b"add", packb({"a": 1})), 8, 2003),
    _refused("body-not-msgpack", S, request(8, b"add", b"\xc1"), 8, 2003),
    _refused("body-truncated", S, request(8, b"add", b"\x92\x01"), 8, 2003),
    _refused("body-with-trailing-bytes", S, request(8, b"add", b"\x90\x90"), 8, 2003),
    _accepted("json", S, request(9, b"add", b"[2,3]", codec=2), Request(9, "add", [2, 3], {}, 2)),
    _accepted(
        "raw",
        S,
        request(9, b"blob", b"\x00\xff", codec=0),
        Request(9, "blob", (b"\x00\xff",), {}, 0),
    ),
    _refused("unknown-codec", S, request(9, b"add", packb([]), codec=9), 9, 2004),
    # PROTOCOL.md §4: a REQUEST's id is non-zero; id 0 gets ERROR DECODE_ERROR (id 0), on every
    # path (the msgpack one is what every fast path would take but for its id).
    _refused("request-id-0", S, request(0, b"add", packb([2, 3])), 0, 2003, ID_0),
    _refused("request-id-0-json", S, request(0, b"add", b"[2,3]", codec=2), 0, 2003, ID_0),
    _refused("request-id-0-kwargs", S, request(0, b"kw", packb([[4], {}]), 1), 0, 2003, ID_0),
    _refused("request-id-0-raw", S, request(0, b"blob", b"\x00", codec=0), 0, 2003, ID_0),
    _fatal(
        "bad-magic",
        S,
        b"XX" + request(1, b"add", packb([]))[2:],
        fatal(ErrorCode.PROTOCOL_ERROR, "bad magic 5858, expected 534b"),
    ),
    _fatal(
        "bad-version",
        S,
        request(1, b"add", packb([]))[:2] + b"\x02" + request(1, b"add", packb([]))[3:],
        fatal(
            ErrorCode.UNSUPPORTED_VERSION,
            "unsupported protocol version 2 (this side speaks 1)",
        ),
    ),
    _fatal(
        "response-from-a-client",
        S,
        response(1, packb(5)),
        fatal(ErrorCode.PROTOCOL_ERROR, "RESPONSE may not be sent by a client"),
    ),
    Case(
        "unknown-type",
        S,
        encode_frame(0x55, 10, b"", b"?"),
        [ProtocolViolation(ErrorCode.UNKNOWN_TYPE, "unknown message type 0x55", 10)],
        [Error(10, ErrorCode.UNKNOWN_TYPE, "UNKNOWN_TYPE", "unknown message type 0x55")],
    ),
    _accepted("pub", S, encode_pub("a.b", b"\x01"), Pub(0, "a.b", b"\x01", 1, False)),
    _accepted(
        "pub-qos1-retain", S, encode_pub("a.b", b"p", 9, retain=True), Pub(9, "a.b", b"p", 1, True)
    ),
    _accepted(
        "pub-unknown-flag",
        S,
        encode_frame(MessageType.PUB, 0, b"a.b", b"p", 0x04 | UNKNOWN_FLAG, 1),
        Pub(0, "a.b", b"p", 1, True),
    ),
    # PROTOCOL.md §4.1: a PUB's payload is in the header's codec, one the broker has (else
    # subscribers could not decode it); an empty body is passed on (the broker decides: RETAIN
    # clears, raw is b"", msgpack/JSON refused).
    _refused("pub-codec-3", S, encode_frame(MessageType.PUB, 0, b"a.b", b"p", 0, 3), 0, 2004),
    _refused(
        "pub-codec-3-qos1", S, encode_frame(MessageType.PUB, 12, b"a.b", b"p", 0, 3), 12, 2004
    ),
    _accepted("pub-json", S, encode_pub("a.b", b"21.5", 10, 2), Pub(10, "a.b", b"21.5", 2, False)),
    _accepted("pub-raw", S, encode_pub("a.b", b"\x00", 0, 0), Pub(0, "a.b", b"\x00", 0, False)),
    _accepted("pub-clear", S, encode_pub("a.b", b"", 11, 0, True), Pub(11, "a.b", b"", 0, True)),
    _accepted("pub-empty-msgpack", S, encode_pub("a.b", b""), Pub(0, "a.b", b"", 1, False)),
    # SUB options in the header's codec; no body: no options, whatever the codec byte.
    _accepted(
        "sub-msgpack",
        S,
        encode_frame(MessageType.SUB, 7, b"s.>", packb({"qos": 1}), 0, 1),
        Sub(7, "s.>", {"qos": 1}, 1),
    ),
    _accepted(
        "sub-json",
        S,
        encode_frame(MessageType.SUB, 7, b"s.>", b'{"qos":1}', 0, 2),
        Sub(7, "s.>", {"qos": 1}, 2),
    ),
    _accepted(
        "sub-empty-map-msgpack",
        S,
        encode_frame(MessageType.SUB, 7, b"s.>", b"\x80", 0, 1),
        Sub(7, "s.>", {}, 1),
    ),
    _accepted(
        "sub-empty-map-json",
        S,
        encode_frame(MessageType.SUB, 7, b"s.>", b"{}", 0, 2),
        Sub(7, "s.>", {}, 2),
    ),
    *(
        _accepted(
            f"sub-no-body-codec-{codec}",
            S,
            encode_frame(MessageType.SUB, 7, b"s.>", b"", 0, codec),
            Sub(7, "s.>", {}, codec),
        )
        for codec in (0, 1, 2, 9)
    ),
    _refused(
        "sub-json-options-sent-as-msgpack",
        S,
        encode_frame(MessageType.SUB, 7, b"s.>", b'{"qos":1}', 0, 1),
        7,
        2003,
    ),
    _refused(
        "sub-options-raw", S, encode_frame(MessageType.SUB, 7, b"s.>", b"\x80", 0, 0), 7, 2003
    ),
    _refused(
        "sub-options-codec-9", S, encode_frame(MessageType.SUB, 7, b"s.>", b"{}", 0, 9), 7, 2004
    ),
    _refused(
        "sub-options-json-array", S, encode_frame(MessageType.SUB, 7, b"s.>", b"[]", 0, 2), 7, 2003
    ),
    # UNSUB and ACK have no body: codec 0 is sent, and any codec byte accepted (old peers: 1).
    *(
        _accepted(
            f"unsub-codec-{codec}",
            S,
            encode_frame(MessageType.UNSUB, 7, b"", b"", 0, codec),
            Unsub(7, codec),
        )
        for codec in (0, 1, 2, 9)
    ),
    *(
        _accepted(
            f"ack-codec-{codec}",
            S,
            encode_frame(MessageType.ACK, 3, b"", b"", 0, codec),
            Ack(3),
        )
        for codec in (0, 1, 2, 9)
    ),
    _refused(
        "pub-bad-utf8-topic",
        S,
        encode_frame(MessageType.PUB, 11, BAD_UTF8, b"p", 0, 1),
        11,
        ErrorCode.BAD_TOPIC,
    ),
    _fatal(
        "pub-meta-and-body-over-the-limit",
        S,
        encode_frame(MessageType.PUB, 0, b"t" * 4000, b"p" * 1000, 0, 1),
        too_large(5000, LIMIT),
    ),
]

CLIENT_CASES = [
    _accepted("response", C, response(1, packb(5)), Response(1, 5, 1)),
    _accepted(
        "response-text-and-maps", C, response(1, packb(TEXT_ARGS)), Response(1, TEXT_ARGS, 1)
    ),
    _accepted(
        "response-unknown-flag", C, response(1, packb(5), flags=UNKNOWN_FLAG), Response(1, 5, 1)
    ),
    _accepted("response-with-meta", C, response(1, packb(5), meta=b"x"), Response(1, 5, 1)),
    _accepted(
        "response-at-the-limit",
        C,
        response(1, args_of_size(900), meta=b"m" * 100),
        Response(1, [b"x" * 896], 1),
    ),
    _fatal(
        "response-meta-and-body-over-the-limit",
        C,
        response(1, args_of_size(1000), meta=b"m" * 4000),
        too_large(5000, LIMIT),
    ),
    _refused("response-ext-type", C, response(2, packb([EXT(3, b"e")])), 2, 2003),
    _refused("response-not-msgpack", C, response(2, b"\xc1"), 2, 2003),
    _refused("response-trailing-bytes", C, response(2, b"\x05\x05"), 2, 2003),
    _accepted("response-json", C, response(3, b'{"a":1}', codec=2), Response(3, {"a": 1}, 2)),
    _accepted("response-raw", C, response(3, b"\x00", codec=0), Response(3, b"\x00", 0)),
    _refused("response-unknown-codec", C, response(3, b"", codec=9), 3, 2004),
    _accepted(
        "error",
        C,
        encode_error(4, 2000, "UNKNOWN_METHOD", "no method 'x'"),
        Error(4, 2000, "UNKNOWN_METHOD", "no method 'x'"),
    ),
    _accepted(
        "msg", C, encode_msg(5, 7, b"a.b", b"\x15"), Msg(5, 7, "a.b", b"\x15", 1, False, False)
    ),
    _accepted(
        "msg-retained-redelivered",
        C,
        encode_msg(5, 7, b"a.b", b"\x15", flags=0x0C),
        Msg(5, 7, "a.b", b"\x15", 1, True, True),
    ),
    _accepted(
        "msg-unknown-flag",
        C,
        encode_msg(5, 7, b"a.b", b"\x15", flags=UNKNOWN_FLAG),
        Msg(5, 7, "a.b", b"\x15", 1, False, False),
    ),
    _refused(
        "msg-short-meta", C, encode_frame(MessageType.MSG, 5, b"\x00\x07", b"p", 0, 1), 5, 2003
    ),
    _refused("msg-bad-utf8-topic", C, encode_msg(5, 7, BAD_UTF8, b"p"), 5, ErrorCode.BAD_TOPIC),
    _fatal(
        "msg-meta-and-body-over-the-limit",
        C,
        encode_msg(5, 7, b"t" * 3996, b"p" * 1000),
        too_large(5000, LIMIT),
    ),
    _fatal(
        "request-from-a-server",
        C,
        request(1, b"add", packb([])),
        fatal(ErrorCode.PROTOCOL_ERROR, "REQUEST may not be sent by a server"),
    ),
]

# Issue 12: DEADLINE (the meta's last 4 bytes), METADATA (name, 0x00, msgpack map), trailers on
# RESPONSE and ERROR, CANCEL (PROTOCOL.md §4). The fast paths read DEADLINE alone and give
# everything else to the general path: every path must give the same events.
BUDGET = struct.pack(">I", 1500)
MD = {"trace-id": "abc", "bin": b"\x00\x01"}
MD_META = b"\x00" + packb(MD)
SERVER_CASES += [
    _accepted(
        "request-deadline",
        S,
        request(1, b"add" + BUDGET, packb([2, 3]), FLAG_DEADLINE),
        Request(1, "add", [2, 3], {}, 1, 1500),
    ),
    _accepted(
        "request-deadline-zero",
        S,
        request(1, b"add" + bytes(4), packb([2, 3]), FLAG_DEADLINE),
        Request(1, "add", [2, 3], {}, 1, 0),
    ),
    _accepted(
        "request-deadline-and-unknown-flag",
        S,
        request(1, b"add" + BUDGET, packb([2, 3]), FLAG_DEADLINE | UNKNOWN_FLAG),
        Request(1, "add", [2, 3], {}, 1, 1500),
    ),
    _accepted(
        "request-deadline-empty-name",
        S,
        request(1, BUDGET, packb([]), FLAG_DEADLINE),
        Request(1, "", [], {}, 1, 1500),
    ),
    _accepted(
        "request-deadline-kwargs",
        S,
        request(6, b"kw" + BUDGET, packb([[4], {"scale": 3}]), FLAG_DEADLINE | 1),
        Request(6, "kw", [4], {"scale": 3}, 1, 1500),
    ),
    _accepted(
        "request-deadline-json",
        S,
        request(9, b"add" + BUDGET, b"[2,3]", FLAG_DEADLINE, codec=2),
        Request(9, "add", [2, 3], {}, 2, 1500),
    ),
    _accepted(
        "request-metadata",
        S,
        request(1, b"add" + MD_META, packb([2, 3]), FLAG_METADATA),
        Request(1, "add", [2, 3], {}, 1, None, MD),
    ),
    _accepted(
        "request-metadata-and-deadline",
        S,
        request(1, b"add" + MD_META + BUDGET, packb([2, 3]), FLAG_METADATA | FLAG_DEADLINE),
        Request(1, "add", [2, 3], {}, 1, 1500, MD),
    ),
    _accepted(
        "request-metadata-empty-map",
        S,
        request(1, b"add\x00\x80", packb([2, 3]), FLAG_METADATA),
        Request(1, "add", [2, 3], {}, 1, None, {}),
    ),
    _refused("deadline-meta-too-short", S, request(1, b"ab", packb([]), FLAG_DEADLINE), 1, 2003),
    _refused("metadata-no-separator", S, request(1, b"add", packb([]), FLAG_METADATA), 1, 2003),
    _refused(
        "metadata-bad-key",
        S,
        request(1, b"add\x00" + packb({"Bad Key": "v"}), packb([]), FLAG_METADATA),
        1,
        2003,
    ),
    _refused(
        "metadata-too-many-entries",
        S,
        request(1, b"m\x00" + packb({f"k{i}": "v" for i in range(65)}), packb([]), FLAG_METADATA),
        1,
        2003,
    ),
    _refused(
        "metadata-int-value",
        S,
        request(1, b"add\x00" + packb({"k": 1}), packb([]), FLAG_METADATA),
        1,
        2003,
    ),
    _refused(
        "metadata-not-a-map",
        S,
        request(1, b"add\x00" + packb(["k"]), packb([]), FLAG_METADATA),
        1,
        2003,
    ),
    _refused(
        "metadata-not-msgpack", S, request(1, b"add\x00\xc1", packb([]), FLAG_METADATA), 1, 2003
    ),
    _refused(
        "request-id-0-deadline",
        S,
        request(0, b"add" + BUDGET, packb([2, 3]), FLAG_DEADLINE),
        0,
        2003,
        ID_0,
    ),
    _accepted("cancel", S, encode_cancel(5), Cancel(5)),
    _accepted(  # meta and body of a CANCEL are not read: never refused (an ERROR would end 5)
        "cancel-with-meta-and-body",
        S,
        encode_frame(MessageType.CANCEL, 5, b"x", b"y", 0x40, 1),
        Cancel(5),
    ),
]
CLIENT_CASES += [
    _accepted(
        "response-trailers",
        C,
        response(1, packb(5), meta=MD_META, flags=FLAG_METADATA),
        Response(1, 5, 1, MD),
    ),
    _accepted(
        "response-trailers-json",
        C,
        response(1, b"5", meta=MD_META, flags=FLAG_METADATA, codec=2),
        Response(1, 5, 2, MD),
    ),
    _refused(
        "response-trailers-bad-key",
        C,
        response(2, packb(5), meta=b"\x00" + packb({"K": "v"}), flags=FLAG_METADATA),
        2,
        2003,
    ),
    _accepted(
        "error-trailers",
        C,
        encode_error(4, 2002, "ValueError", "bad", metadata=MD),
        Error(4, 2002, "ValueError", "bad", MD),
    ),
    _fatal(
        "cancel-from-a-server",
        C,
        encode_cancel(1),
        fatal(ErrorCode.PROTOCOL_ERROR, "CANCEL may not be sent by a server"),
    ),
]


# Issue 12 item 6: STREAM (REQUEST flag), ITEM (server -> client; the client's batch loop has a
# fast decoder for msgpack ITEMs without meta or flags), CREDIT (client -> server; general path).
SERVER_CASES += [
    _accepted(
        "request-stream",
        S,
        request(1, b"ticks", packb([3]), FLAG_STREAM),
        Request(1, "ticks", [3], {}, 1, None, None, True),
    ),
    _accepted(
        "request-stream-deadline",
        S,
        request(1, b"ticks" + BUDGET, packb([3]), FLAG_STREAM | FLAG_DEADLINE),
        Request(1, "ticks", [3], {}, 1, 1500, None, True),
    ),
    _accepted("credit", S, encode_credit(5, 131072), Credit(5, 131072)),
    _fatal(
        "credit-short-body",
        S,
        encode_frame(MessageType.CREDIT, 5, b"", b"\x00\x01\x00", 0, 0),
        fatal(ErrorCode.PROTOCOL_ERROR, "CREDIT body of 3 bytes (a u32 is 4)"),
    ),
]

# Issue 12 item 6, uploads (PROTOCOL.md §4.4): REQUEST flag UPLOAD; ITEM from a client (an
# upload's items, then one with flag END and an empty body); CREDIT from a server. The core
# delivers them (the host and the clients drop those for a call that is not an upload in flight);
# a client's undecodable ITEM is not answered by the core: it is an Error event for the host,
# which ends that upload if it is in flight.
BAD_ITEM = encode_frame(MessageType.ITEM, 6, b"", b"\xc1", 0, 1)
SERVER_CASES += [
    _accepted(
        "request-upload",
        S,
        request(1, b"total", packb([2]), FLAG_UPLOAD),
        Request(1, "total", [2], {}, 1, None, None, False, True),
    ),
    _accepted(
        "request-upload-deadline",
        S,
        request(1, b"total" + BUDGET, packb([]), FLAG_UPLOAD | FLAG_DEADLINE),
        Request(1, "total", [], {}, 1, 1500, None, False, True),
    ),
    _accepted("item-from-a-client", S, encode_item(5, 1), Item(5, 1, 1, 1)),
    _accepted("item-end", S, encode_item_end(5), Item(5, None, 1, 0, True)),
    _accepted(
        "item-end-with-a-body",  # the body of an END item is not read
        S,
        encode_frame(MessageType.ITEM, 5, b"", b"\xc1", FLAG_END, 1),
        Item(5, None, 1, 0, True),
    ),
    Case(
        "item-from-a-client-not-msgpack",
        S,
        BAD_ITEM,
        [
            ProtocolViolation(2003, decode_failure(BAD_ITEM), 6),
            BadItem(6, 2003, decode_failure(BAD_ITEM)),  # not an Error: nothing sent
        ],
    ),
]
CLIENT_CASES += [
    _accepted("credit-from-a-server", C, encode_credit(1, 4), Credit(1, 4)),
]
CLIENT_CASES += [
    _accepted("item", C, encode_item(5, [1, "é"]), Item(5, [1, "é"], 1, 5)),
    _accepted("item-json", C, encode_item(5, {"a": 1}, CODECS[2]), Item(5, {"a": 1}, 2, 7)),
    _accepted(
        "item-with-meta-and-unknown-flag",
        C,
        encode_frame(MessageType.ITEM, 5, b"x", packb(7), UNKNOWN_FLAG, 1),
        Item(5, 7, 1, 1),
    ),
    _refused("item-not-msgpack", C, encode_frame(MessageType.ITEM, 6, b"", b"\xc1", 0, 1), 6, 2003),
    _refused(
        "item-ext-type",
        C,
        encode_frame(MessageType.ITEM, 6, b"", packb(EXT(3, b"e")), 0, 1),
        6,
        2003,
    ),
]


def _batch_case(name: str, parts: list[Case]) -> Case:
    """Several cases in one read, in order (none of them fatal but possibly the last)."""
    events: list[Any] = []
    sent: list[Any] = []
    for p in parts:
        events += p.events
        sent += p.sent
    return Case(
        name, parts[0].role, b"".join(p.data for p in parts), events, sent, parts[-1].closed
    )


_by_name = {c.name: c for c in SERVER_CASES + CLIENT_CASES}
BATCH_CASES = [
    _batch_case(
        "server-batch",
        [
            _by_name[n]
            for n in (
                "request",
                "bad-utf8-method",
                "kwargs-flag",
                "request-id-0",
                "pub",
                "json",
                "request",
            )
        ],
    ),
    _batch_case(
        "server-batch-then-oversized",
        [
            _by_name[n]
            for n in ("request", "pub", "ext-type-argument", "meta-and-body-over-the-limit")
        ],
    ),
    _batch_case(
        "server-batch-deadlines",
        [
            _by_name[n]
            for n in (
                "request-deadline",
                "request",
                "request-metadata-and-deadline",
                "cancel",
                "deadline-meta-too-short",
                "request-deadline-zero",
                "pub",
                "request-deadline",
            )
        ],
    ),
    _batch_case(
        "client-batch-trailers",
        [_by_name[n] for n in ("response", "response-trailers", "error-trailers", "response")],
    ),
    _batch_case(
        "client-batch-items",
        [
            _by_name[n]
            for n in ("item", "item", "msg", "item-not-msgpack", "item-json", "item", "response")
        ],
    ),
    _batch_case(
        "server-batch-streams",
        [_by_name[n] for n in ("request-stream", "credit", "request", "cancel", "credit")],
    ),
    _batch_case(
        "client-batch",
        [_by_name[n] for n in ("response", "msg", "response-ext-type", "error", "response")],
    ),
    _batch_case(
        "client-batch-then-oversized",
        [_by_name[n] for n in ("response", "msg", "response-meta-and-body-over-the-limit")],
    ),
]
STREAM_CASES = SERVER_CASES + CLIENT_CASES + BATCH_CASES


def opened(role: Role, max_frame: int = LIMIT) -> Connection:
    """A session of ``role`` past its handshake, with nothing queued, no keepalive."""
    peer = Connection(Role.CLIENT if role is Role.SERVER else Role.SERVER, keepalive_interval=None)
    conn = Connection(role, max_frame=max_frame, keepalive_interval=None)
    if role is Role.SERVER:
        conn.receive_data(peer.data_to_send())
    else:
        peer.receive_data(conn.data_to_send())
        conn.receive_data(peer.data_to_send())
    conn.data_to_send()
    assert conn.state is State.OPEN
    return conn


# How adapters feed a read: the servers and the blocking client try receive_single first.
def adapter_read(conn: Connection, chunk: bytes) -> list[Any]:
    single = conn.receive_single(chunk)
    return [single] if single is not None else conn.receive_data(chunk)


def blocking_read(conn: Connection, chunk: bytes) -> list[Any]:
    """As the blocking client reads: a memoryview of its buffer first, bytes to the general path."""
    single = conn.receive_single(memoryview(bytearray(chunk)))
    return [single] if single is not None else conn.receive_data(chunk)


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *sorted(set(c for c in cuts if 0 < c < len(data))), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


PING = encode_ping(0xABCD, b"order")


@dataclass(frozen=True)
class Path:
    name: str
    feed: Callable[[Connection, bytes], list[Any]]
    behind_ping: bool = False


def _random_splits(seed: int) -> Path:
    def feed(conn: Connection, data: bytes) -> list[Any]:
        rng = random.Random(seed)
        cuts = [rng.randrange(1, len(data)) for _ in range(3)] if len(data) > 1 else []
        events: list[Any] = []
        for piece in chunks(data, cuts):
            events += adapter_read(conn, piece)
        return events

    return Path(f"split-{seed}", feed)


def _bytewise(conn: Connection, data: bytes) -> list[Any]:
    events: list[Any] = []
    for piece in chunks(data, list(range(1, len(data)))):
        events += adapter_read(conn, piece)
    return events


def _header_first(conn: Connection, data: bytes) -> list[Any]:
    """The header alone, then the rest: the limits must be checked on the header."""
    return adapter_read(conn, data[:16]) + adapter_read(conn, data[16:])


STREAM_PATHS = [
    Path("single", adapter_read),  # receive_single, else receive_data with the same bytes
    Path("single-memoryview", blocking_read),
    Path("batch", Connection.receive_data),  # the batch loop alone, then the general path
    Path("header-first", _header_first),
    Path("bytewise", _bytewise),
    _random_splits(1),
    _random_splits(2),
    _random_splits(3),
    # A PING first in the same read: the batch loop stops at once, so every frame goes through
    # the stream decoder and the general loop (its fast branch, then the full decoders).
    Path("behind-a-ping", lambda conn, data: conn.receive_data(PING + data), behind_ping=True),
]


def sent_frames(conn: Connection, path: Path) -> list[Any]:
    sent = [decode_message(f) for f in FrameDecoder(1 << 30, 1 << 16).feed(conn.data_to_send())]
    if path.behind_ping:
        assert sent[:1] == [Pong(0xABCD, b"order")]
        return sent[1:]
    return sent


@pytest.mark.parametrize("path", STREAM_PATHS, ids=lambda p: p.name)
@pytest.mark.parametrize("case", STREAM_CASES, ids=lambda c: f"{c.role.value}-{c.name}")
def test_session_paths_give_the_required_events(case: Case, path: Path) -> None:
    conn = opened(case.role, case.max_frame)
    assert path.feed(conn, case.data) == case.events
    assert sent_frames(conn, path) == case.sent
    assert conn.state is (State.CLOSED if case.closed else State.OPEN)
    if not case.closed:  # the session is intact: the next frame is read normally
        nxt = request(99, b"add", packb([1])) if case.role is S else response(99, packb(1))
        want = Request(99, "add", [1], {}, 1) if case.role is S else Response(99, 1, 1)
        assert path.feed(conn, nxt) == [want]


@pytest.mark.parametrize("case", STREAM_CASES, ids=lambda c: f"{c.role.value}-{c.name}")
def test_receive_single_takes_its_frame_whole_or_consumes_nothing(case: Case) -> None:
    conn = opened(case.role, case.max_frame)
    single = conn.receive_single(case.data)
    if single is not None:
        assert [single] == case.events  # only ever a frame it decodes exactly as required
        assert conn.data_to_send() == b""
        return
    assert conn.state is State.OPEN and conn.buffered == 0 and conn.data_to_send() == b""
    assert conn.receive_data(case.data) == case.events


def test_receive_single_takes_the_common_frames() -> None:
    """The fast path is not dead: a plain REQUEST (server) and RESPONSE (client) take it."""
    server, client = opened(S), opened(C)
    assert server.receive_single(request(1, b"add", packb([2, 3]))) == Request(
        1, "add", [2, 3], {}, 1
    )
    assert client.receive_single(memoryview(response(1, packb(5)))) == Response(1, 5, 1)


# Large frames (above 64 KiB) are gathered piece by piece instead of re-parsed on every read.
BIG = 100_000
LARGE_CASES = [
    _accepted(
        "large-request",
        S,
        request(1, b"echo", args_of_size(BIG)),
        Request(1, "echo", [arg_of_size(BIG)], {}, 1),
        max_frame=BIG + 4,
    ),
    _fatal(
        "large-request-meta-and-body-over-the-limit",
        S,
        request(1, b"m" * 100, args_of_size(BIG)),
        too_large(BIG + 100, BIG + 50),
        max_frame=BIG + 50,
    ),
    _accepted(
        "large-response",
        C,
        response(1, args_of_size(BIG), meta=b"m"),
        Response(1, [arg_of_size(BIG)], 1),
        max_frame=BIG + 1,
    ),
    _fatal(
        "large-response-meta-and-body-over-the-limit",
        C,
        response(1, args_of_size(BIG), meta=b"m" * 100),
        too_large(BIG + 100, BIG + 50),
        max_frame=BIG + 50,
    ),
]


def _in_pieces(size: int) -> Path:
    def feed(conn: Connection, data: bytes) -> list[Any]:
        events: list[Any] = []
        for piece in chunks(data, list(range(size, len(data), size))):
            events += adapter_read(conn, piece)
        return events

    return Path(f"pieces-of-{size}", feed)


LARGE_PATHS = [
    Path("single", adapter_read),
    Path("batch", Connection.receive_data),
    Path("header-first", _header_first),
    _in_pieces(1000),
    _in_pieces(65536),
    _random_splits(4),
    Path("behind-a-ping", lambda conn, data: conn.receive_data(PING + data), behind_ping=True),
]


@pytest.mark.parametrize("path", LARGE_PATHS, ids=lambda p: p.name)
@pytest.mark.parametrize("case", LARGE_CASES, ids=lambda c: c.name)
def test_large_frames_on_every_path(case: Case, path: Path) -> None:
    test_session_paths_give_the_required_events(case, path)


# ------------------------------------------------------------------------------ handshake
# The first frames of a server session (PROTOCOL.md §5.1), through every split of the stream:
# the HELLO's size is checked on its header, its extensions counted before they are decoded,
# any version range holding 1 gets version 1, a tiny max_frame is refused, and anything but
# HELLO first is refused from its header.

DEFAULT_LIMIT = 1 << 20  # the server's frame limit in these cases (a HELLO may take 4,096)


def hello_bytes(
    lo: int = 1,
    hi: int = 1,
    max_frame: int = DEFAULT_LIMIT,
    exts: tuple[tuple[int, bytes], ...] = (),
    agent: bytes = b"",
) -> bytes:
    body = bytes([lo, hi]) + max_frame.to_bytes(4, "big")
    body += b"".join(bytes([t]) + len(v).to_bytes(2, "big") + v for t, v in exts)
    return encode_frame(MessageType.HELLO, 0, agent, body)


def _welcomed(
    name: str, data: bytes, hello: Hello, *after: Any, sent_after: tuple[Any, ...] = ()
) -> Case:
    events = [HandshakeComplete(1, hello.agent, hello.max_frame), hello, *after]
    welcome = Welcome(1, (1, 2, 0), DEFAULT_LIMIT, "sockstack-py/1", (features_extension(),))
    return Case(name, S, data, events, [welcome, *sent_after], max_frame=DEFAULT_LIMIT)


_PAD = ((2, b"p" * 4000), (7, b""))  # 4,006 bytes of extensions
_ID_0 = request(0, b"add", packb([2, 3]))
HANDSHAKE_CASES = [
    _welcomed("hello", hello_bytes(), Hello()),
    _welcomed("hello-versions-0-255", hello_bytes(0, 255), Hello(0, 255)),
    _welcomed("hello-versions-0-1", hello_bytes(0, 1), Hello(0, 1)),
    _welcomed(
        "hello-at-the-size-limit",  # 84 + 6 + 4,006 = 4,096 bytes of meta + body
        hello_bytes(exts=_PAD, agent=b"a" * 84),
        Hello(agent="a" * 84, extensions=_PAD),
    ),
    _welcomed(
        "hello-16-extensions",
        hello_bytes(exts=((9, b"x"),) * 16),
        Hello(extensions=((9, b"x"),) * 16),
    ),
    _welcomed("hello-max-frame-512", hello_bytes(max_frame=512), Hello(max_frame=512)),
    _welcomed(
        "hello-then-request",
        hello_bytes() + request(1, b"add", packb([2, 3])),
        Hello(),
        Request(1, "add", [2, 3], {}, 1),
    ),
    _welcomed(
        "hello-then-request-id-0",
        hello_bytes() + _ID_0,
        Hello(),
        *refused(S, 0, 2003, ID_0)[0],
        sent_after=tuple(refused(S, 0, 2003, ID_0)[1]),
    ),
    _fatal(
        "hello-one-byte-over-the-size-limit",
        S,
        hello_bytes(exts=_PAD, agent=b"a" * 85),
        fatal(ErrorCode.FRAME_TOO_LARGE, "HELLO of 4097 bytes exceeds the limit of 4096 bytes"),
        max_frame=DEFAULT_LIMIT,
    ),
    _fatal(
        "hello-of-30000-extensions",  # the attack of issue 10, scaled down
        S,
        hello_bytes(exts=((2, b""),) * 30_000),
        fatal(ErrorCode.FRAME_TOO_LARGE, "HELLO of 90006 bytes exceeds the limit of 4096 bytes"),
        max_frame=DEFAULT_LIMIT,
    ),
    _fatal(
        "hello-17-extensions",
        S,
        hello_bytes(exts=((9, b"x"),) * 17),
        fatal(ErrorCode.FRAME_TOO_LARGE, "HELLO carries more than 16 extensions"),
        max_frame=DEFAULT_LIMIT,
    ),
    *(
        _fatal(
            f"hello-max-frame-{n}",
            S,
            hello_bytes(max_frame=n),
            fatal(
                ErrorCode.PROTOCOL_ERROR,
                f"HELLO announces max_frame {n}, below the minimum of 512 bytes",
            ),
            max_frame=DEFAULT_LIMIT,
        )
        for n in (0, 1, 16, 511)
    ),
    _fatal(
        "hello-empty-version-range",
        S,
        hello_bytes(2, 1),
        fatal(ErrorCode.UNSUPPORTED_VERSION, "HELLO version range 2..1 is empty"),
        max_frame=DEFAULT_LIMIT,
    ),
    _fatal(
        "hello-versions-without-1",
        S,
        hello_bytes(2, 255),
        fatal(ErrorCode.UNSUPPORTED_VERSION, "client speaks versions 2..255, server 1..1"),
        max_frame=DEFAULT_LIMIT,
    ),
    _fatal(
        "request-first",
        S,
        request(1, b"add", args_of_size(2000)),
        fatal(ErrorCode.PROTOCOL_ERROR, "expected HELLO, got REQUEST"),
        max_frame=DEFAULT_LIMIT,
    ),
    _fatal(
        "unknown-type-first",
        S,
        encode_frame(0x55, 1, b"", b"?"),
        fatal(ErrorCode.PROTOCOL_ERROR, "expected HELLO, got type 0x55"),
        max_frame=DEFAULT_LIMIT,
    ),
]
HANDSHAKE_PATHS = [p for p in STREAM_PATHS if not p.behind_ping]  # a PING first is refused


@pytest.mark.parametrize("path", HANDSHAKE_PATHS, ids=lambda p: p.name)
@pytest.mark.parametrize("case", HANDSHAKE_CASES, ids=lambda c: c.name)
def test_handshake_paths_give_the_required_events(case: Case, path: Path) -> None:
    conn = Connection(Role.SERVER, max_frame=case.max_frame, keepalive_interval=None)
    assert path.feed(conn, case.data) == case.events
    assert sent_frames(conn, path) == case.sent
    assert conn.state is (State.CLOSED if case.closed else State.OPEN)
    assert conn.buffered == 0
    if not case.closed:
        assert path.feed(conn, request(99, b"add", packb([1]))) == [Request(99, "add", [1], {}, 1)]


# ------------------------------------------------------------------------------ stream senders

OPEN_PEER_LIMIT = 1000  # the peer's announced max_frame in the sender tests


def sender(role: Role, peer_max_frame: int = OPEN_PEER_LIMIT) -> Connection:
    """An open session of ``role`` whose peer announced ``peer_max_frame``."""
    conn = Connection(role, keepalive_interval=None)
    peer = Connection(
        Role.SERVER if role is Role.CLIENT else Role.CLIENT,
        max_frame=peer_max_frame,
        keepalive_interval=None,
    )
    if role is Role.CLIENT:
        peer.receive_data(conn.data_to_send())
        conn.receive_data(peer.data_to_send())
    else:
        conn.receive_data(peer.data_to_send())
    conn.data_to_send()
    assert conn.peer_max_frame == peer_max_frame
    return conn


def request_fast(conn: Connection, rid: int, method: str, args: list[Any]) -> bytes:
    """What the blocking client does: request_frame, else the general send_request."""
    pieces = conn.request_frame(rid, method, args)
    if pieces is None:
        conn.send_request(rid, method, args)
        return conn.data_to_send()
    assert conn.data_to_send() == b""  # the fast path queues nothing
    return b"".join(pieces)


def request_slow(conn: Connection, rid: int, method: str, args: list[Any]) -> bytes:
    conn.send_request(rid, method, args)
    return b"".join(conn.buffers_to_send())


def response_fast(conn: Connection, rid: int, result: Any) -> bytes:
    """What the server does for an inline method: response_frame, else send_response."""
    frame = conn.response_frame(rid, result)
    if frame is None:
        conn.send_response(rid, result)
        return conn.data_to_send()
    assert conn.data_to_send() == b""
    return frame


def response_slow(conn: Connection, rid: int, result: Any) -> bytes:
    conn.send_response(rid, result)
    return b"".join(conn.buffers_to_send())


REQUEST_SENDERS = [request_fast, request_slow]
RESPONSE_SENDERS = [response_fast, response_slow]


@pytest.mark.parametrize("send", REQUEST_SENDERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("method", "args", "limit"),
    [
        ("add", [2, 3], OPEN_PEER_LIMIT),
        ("échø", [None, {"k": [1.5]}, "text"], OPEN_PEER_LIMIT),
        ("m" * 496, [b"x" * 500], OPEN_PEER_LIMIT),  # 496 meta + 504 body: the limit exactly
        ("echo", [b"x" * 70_000, 1, b"y" * 70_000], 200_000),  # large bytes: sent by reference
    ],
    ids=["small", "unicode", "at-the-limit", "large-bytes"],
)
def test_request_senders_send_the_same_bytes(
    send: Callable[..., bytes], method: str, args: list[Any], limit: int
) -> None:
    assert len(encode_request(1, "m" * 496, [b"x" * 500])) == 16 + OPEN_PEER_LIMIT
    conn = sender(Role.CLIENT, limit)
    for rid in (1, 2):  # the first time a method name is seen, and after
        data = send(conn, rid, method, args)
        assert data == encode_request(rid, method, args)
        assert FrameDecoder(1 << 30).feed(data)[0].request_id == rid


@pytest.mark.parametrize("send", REQUEST_SENDERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("method", "args"),
    [("m" * 497, [b"x" * 500]), ("m" * 10, [b"x" * 70_000])],
    ids=["one-byte-over", "large-bytes-over"],
)
def test_request_senders_refuse_above_the_peer_limit(
    send: Callable[..., bytes], method: str, args: list[Any]
) -> None:
    conn = sender(Role.CLIENT)
    send(conn, 1, method, [1])  # the method name is known: the fast path is armed
    with pytest.raises(LocalProtocolError) as info:
        send(conn, 2, method, args)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    assert conn.data_to_send() == b""


@pytest.mark.parametrize("send", REQUEST_SENDERS, ids=lambda f: f.__name__)
def test_request_senders_refuse_what_does_not_encode(send: Callable[..., bytes]) -> None:
    conn = sender(Role.CLIENT)
    send(conn, 1, "add", [1])
    with pytest.raises(CodecError):
        send(conn, 2, "add", [object()])
    assert conn.data_to_send() == b""
    assert send(conn, 3, "add", [1]) == encode_request(3, "add", [1])  # nothing half-queued


@pytest.mark.parametrize("send", RESPONSE_SENDERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "result",
    [5, None, "é" * 10, {"k": [1, 2.5, b"b"]}, [b"x" * 996], b"z" * 70_000],
    ids=["int", "nil", "unicode", "map", "at-the-limit", "large-bytes"],
)
def test_response_senders_send_the_same_bytes(send: Callable[..., bytes], result: Any) -> None:
    conn = sender(Role.SERVER, 200_000 if isinstance(result, bytes) else OPEN_PEER_LIMIT)
    assert send(conn, 7, result) == encode_response(7, result)


@pytest.mark.parametrize("send", RESPONSE_SENDERS, ids=lambda f: f.__name__)
def test_response_senders_refuse_what_does_not_encode(send: Callable[..., bytes]) -> None:
    conn = sender(Role.SERVER)
    with pytest.raises(CodecError):
        send(conn, 7, object())
    assert conn.data_to_send() == b""


@pytest.mark.parametrize(
    ("send", "result"),
    [
        (response_fast, b"x" * 5000),
        (response_slow, b"x" * 5000),
        (response_fast, b"x" * 70_000),
        (response_slow, b"x" * 70_000),
    ],
    ids=["fast-small-body", "slow-small-body", "fast-large-body", "slow-large-body"],
)
def test_response_senders_refuse_above_the_peer_limit(
    send: Callable[..., bytes], result: bytes
) -> None:
    conn = sender(Role.SERVER, 1000)
    with pytest.raises(LocalProtocolError) as info:
        send(conn, 7, result)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    assert conn.data_to_send() == b""


# ------------------------------------------------------------------------------ datagram core

ADDR = ("127.0.0.1", 40000)
OTHER = ("127.0.0.1", 40001)
MAX_DATAGRAM = 1200


@dataclass
class DCase:
    name: str
    data: bytes
    events: list[Any]
    sent: list[bytes] = field(default_factory=list)
    max_datagram: int = MAX_DATAGRAM


def _no_larger(data: bytes, rid: int, code: int, message: str) -> list[bytes]:
    """The ERROR a datagram gets: in full, else the code alone, else nothing, whichever first
    is no larger than the datagram (the server never amplifies); a CLOSE-level code becomes
    the request-level one UDP carries (PROTOCOL.md §6)."""
    code = datagram_error_code(code)
    for reply in (encode_error(rid, code, ErrorCode(code).name, message), encode_error(rid, code)):
        if len(reply) <= len(data):
            return [reply]
    return []


def _dgram_refusal(
    name: str, data: bytes, rid: int, code: int, message: str = "", **kw: Any
) -> DCase:
    message = message or decode_failure(data)
    return DCase(
        name,
        data,
        [ProtocolViolation(code, message, rid)],
        _no_larger(data, rid, code, message),
        **kw,
    )


def _dgram_fatal(name: str, data: bytes, rid: int, code: int, message: str, **kw: Any) -> DCase:
    """Framing is wrong but the header is ours: ERROR with its request id, nothing runs."""
    return DCase(
        name,
        data,
        [ProtocolViolation(code, message, rid, True)],
        _no_larger(data, rid, code, message),
        **kw,
    )


def _too_big(size: int, limit: int) -> str:
    return f"frame of {size} bytes exceeds the limit of {limit} bytes"


_ADD = request(1, b"add", packb([2, 3]))
DATAGRAM_CASES = [
    DCase("request", _ADD, [Request(1, "add", [2, 3], {}, 1)]),
    DCase(
        "request-text-and-maps",
        request(1, "échø".encode(), packb(TEXT_ARGS)),
        [Request(1, "échø", TEXT_ARGS, {}, 1)],
    ),
    _dgram_refusal("request-id-0-bad-body", request(0, b"add", b"\xc1"), 0, 2003),
    _dgram_refusal("request-id-0", request(0, b"add", packb([2, 3])), 0, 2003, ID_0),
    _dgram_refusal("request-id-0-json", request(0, b"add", b"[2,3]", codec=2), 0, 2003, ID_0),
    DCase(  # the WELCOME would be larger than this 22-byte HELLO: no answer (no amplifier)
        "hello",
        encode_hello(Hello()),
        [],
        [],
    ),
    DCase(  # a HELLO padded to ask gets the WELCOME, no larger than it
        "hello-padded",
        encode_hello(Hello(agent="x" * 40)),
        [],
        [encode_welcome(Welcome(1, (1, 2, 0), MAX_DATAGRAM, "sockstack-py/1"))],
    ),
    DCase(  # PROTOCOL.md §5.1: any range holding 1 gets version 1
        "hello-versions-0-255",
        hello_bytes(0, 255, agent=b"x" * 40),
        [],
        [encode_welcome(Welcome(1, (1, 2, 0), MAX_DATAGRAM, "sockstack-py/1"))],
    ),
    _dgram_refusal(
        "hello-17-extensions",
        hello_bytes(exts=((9, b"x"),) * 17),
        0,
        ErrorCode.FRAME_TOO_LARGE,
        "HELLO carries more than 16 extensions",
    ),
    _dgram_refusal(
        "hello-over-its-size-limit",
        hello_bytes(exts=((9, b"x" * 4088),)),
        0,
        ErrorCode.FRAME_TOO_LARGE,
        "HELLO of 4097 bytes exceeds the limit of 4096 bytes",
        max_datagram=65507,
    ),
    DCase("ping", encode_ping(6, b"t"), [], [encode_pong(6, b"t")]),
    DCase(
        "response-to-a-server",
        response(6, packb(5)),
        [ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "RESPONSE is not sent to a server", 6)],
    ),
    DCase(
        "welcome-to-a-server",
        encode_welcome(Welcome(1, (1,), 1200, "x")),
        [ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "WELCOME is not sent to a server", 0)],
    ),
    DCase("pub", encode_pub("a.b", b"\x01"), [Pub(0, "a.b", b"\x01", 1, False)]),
    DCase(
        "garbage",
        b"\x00not ours at all",
        [
            ProtocolViolation(
                ErrorCode.PROTOCOL_ERROR,
                "bad magic 006e, expected 534b",
                0,
                True,
            )
        ],
    ),
    DCase(
        "request-at-the-limit",  # 1,200 bytes of meta + body
        request(2, b"m" * 700, args_of_size(500)),
        [Request(2, "m" * 700, [b"x" * 496], {}, 1)],
    ),
    _dgram_fatal(  # a 2,000-byte datagram at max_datagram 1,200
        "request-over-the-limit",
        request(3, b"echo", args_of_size(1980)),
        3,
        ErrorCode.FRAME_TOO_LARGE,
        _too_big(1984, MAX_DATAGRAM),
    ),
    _dgram_fatal(  # the body alone (300) is within the limit: meta + body (1,300) is not
        "request-meta-and-body-over-the-limit",
        request(3, b"m" * 1000, args_of_size(300)),
        3,
        ErrorCode.FRAME_TOO_LARGE,
        _too_big(1300, MAX_DATAGRAM),
    ),
    _dgram_fatal(
        "request-meta-over-the-meta-limit",
        request(3, b"m" * 4097, packb([])),
        3,
        ErrorCode.FRAME_TOO_LARGE,
        _too_big(4097, 4096),
        max_datagram=65507,
    ),
    _dgram_fatal(
        "request-longer-than-its-header",
        _ADD + b"\x00",
        1,
        ErrorCode.PROTOCOL_ERROR,
        f"datagram of {len(_ADD) + 1} bytes does not match its header (16 + 3 + 3)",
    ),
    _dgram_fatal(
        "request-shorter-than-its-header",
        _ADD[:-1],
        1,
        ErrorCode.PROTOCOL_ERROR,
        f"datagram of {len(_ADD) - 1} bytes does not match its header (16 + 3 + 3)",
    ),
    _dgram_refusal("ext-type-argument", request(4, b"add", packb([EXT(5, b"x"), 1])), 4, 2003),
    _dgram_refusal("ext-type-nested", request(4, b"add", packb([[{"k": EXT(127, b"")}]])), 4, 2003),
    _dgram_refusal("bad-utf8-method", request(5, BAD_UTF8, packb([1])), 5, 2003),
    DCase(
        "kwargs-flag",
        request(6, b"kw", packb([[4], {"scale": 3}]), flags=1),
        [Request(6, "kw", [4], {"scale": 3}, 1)],
    ),
    _dgram_refusal(
        "kwargs-flag-on-a-positional-body", request(7, b"add", packb([1, 2]), 1), 7, 2003
    ),
    _dgram_refusal("body-not-an-array", request(8, b"add", packb("x")), 8, 2003),
    _dgram_refusal("body-not-msgpack", request(8, b"add", b"\xc1"), 8, 2003),
    _dgram_refusal("body-with-trailing-bytes", request(8, b"add", b"\x90\x90"), 8, 2003),
    DCase("json", request(9, b"add", b"[2,3]", codec=2), [Request(9, "add", [2, 3], {}, 2)]),
    DCase("raw", request(9, b"blob", b"\x01", codec=0), [Request(9, "blob", (b"\x01",), {}, 0)]),
    _dgram_refusal("unknown-codec", request(9, b"add", packb([]), codec=9), 9, 2004),
    DCase(
        "request-deadline",
        request(1, b"add" + BUDGET, packb([2, 3]), FLAG_DEADLINE),
        [Request(1, "add", [2, 3], {}, 1, 1500)],
    ),
    DCase(
        "request-deadline-and-unknown-flag",
        request(1, b"add" + BUDGET, packb([2, 3]), FLAG_DEADLINE | UNKNOWN_FLAG),
        [Request(1, "add", [2, 3], {}, 1, 1500)],
    ),
    DCase(
        "request-metadata-and-deadline",
        request(1, b"add" + MD_META + BUDGET, packb([2, 3]), FLAG_METADATA | FLAG_DEADLINE),
        [Request(1, "add", [2, 3], {}, 1, 1500, MD)],
    ),
    _dgram_refusal("deadline-meta-too-short", request(1, b"ab", packb([]), FLAG_DEADLINE), 1, 2003),
    _dgram_refusal(
        "metadata-bad-key",
        request(1, b"add\x00" + packb({"Bad Key": "v"}), packb([]), FLAG_METADATA),
        1,
        2003,
    ),
    DCase("cancel-is-dropped", encode_cancel(5), []),  # streams only: no answer over UDP
]


def datagram_fast(data: bytes) -> bytes:
    return data


def datagram_slow(data: bytes) -> bytes:
    """The same request with a flag bit no message defines set: receivers ignore it, and the
    server's fast path (which takes flags == 0 only) declines it."""
    if len(data) < 16:
        return data
    return data[:4] + bytes([data[4] | UNKNOWN_FLAG]) + data[5:]


@pytest.mark.parametrize("variant", [datagram_fast, datagram_slow], ids=["fast", "slow"])
@pytest.mark.parametrize("case", DATAGRAM_CASES, ids=lambda c: c.name)
def test_datagram_server_paths_give_the_required_events(
    case: DCase, variant: Callable[[bytes], bytes]
) -> None:
    server = DatagramServer(max_datagram=case.max_datagram)
    data = variant(case.data)
    assert server.receive_datagram(data, ADDR, 0.0) == case.events
    assert server.datagrams_to_send() == [(d, ADDR) for d in case.sent]
    # A retransmission: a request that runs is not run again (nothing returned, nothing sent
    # while it runs); a refused one is refused again, never remembered as running.
    again = server.receive_datagram(data, ADDR, 1.0)
    if any(type(e) is Request for e in case.events):
        assert again == [] and server.duplicates == 1
        assert server.datagrams_to_send() == []
        # the same request id from another peer is another request
        assert server.receive_datagram(data, OTHER, 1.0) == case.events
    else:
        assert again == case.events and server.duplicates == 0
        assert server.datagrams_to_send() == [(d, ADDR) for d in case.sent]


def test_datagram_server_fast_path_is_taken() -> None:
    """The slow variant really is another path: the flag bit alone changes nothing else."""
    assert datagram_slow(_ADD) != _ADD
    fast, slow = DatagramServer(), DatagramServer()
    assert fast.receive_datagram(_ADD, ADDR, 0.0) == slow.receive_datagram(
        datagram_slow(_ADD), ADDR, 0.0
    )


RID = 77


@dataclass
class CCase:
    name: str
    data: bytes
    events: list[Any]
    still_pending: bool = False


def _client_refusal(name: str, data: bytes, code: int) -> CCase:
    message = decode_failure(data)
    return CCase(
        name,
        data,
        [ProtocolViolation(code, message, RID), Error(RID, code, ErrorCode(code).name, message)],
    )


CLIENT_DATAGRAM_CASES = [
    CCase("response", response(RID, packb(5)), [Response(RID, 5, 1)]),
    CCase("response-text-and-maps", response(RID, packb(TEXT_ARGS)), [Response(RID, TEXT_ARGS, 1)]),
    CCase("response-with-meta", response(RID, packb(5), meta=b"m"), [Response(RID, 5, 1)]),
    CCase(
        "response-unknown-flag", response(RID, packb(5), flags=UNKNOWN_FLAG), [Response(RID, 5, 1)]
    ),
    CCase("response-json", response(RID, b"[1]", codec=2), [Response(RID, [1], 2)]),
    CCase(
        "response-at-the-limit",
        response(RID, args_of_size(1100), meta=b"m" * 100),
        [Response(RID, [b"x" * 1096], 1)],
    ),
    CCase(
        "response-meta-and-body-over-the-limit",
        response(RID, args_of_size(1000), meta=b"m" * 300),
        [ProtocolViolation(ErrorCode.FRAME_TOO_LARGE, _too_big(1300, MAX_DATAGRAM), RID, True)],
        still_pending=True,
    ),
    _client_refusal("response-ext-type", response(RID, packb({"k": EXT(2, b"")})), 2003),
    _client_refusal("response-not-msgpack", response(RID, b"\xc1"), 2003),
    _client_refusal("response-unknown-codec", response(RID, b"", codec=9), 2004),
    CCase(
        "error",
        encode_error(RID, 2001, "BAD_ARGUMENTS", "no"),
        [Error(RID, 2001, "BAD_ARGUMENTS", "no")],
    ),
    CCase("pong", encode_pong(RID, b"t"), [Pong(RID, b"t")], still_pending=True),
    CCase("answer-to-another-call", response(RID + 1, packb(5)), [], still_pending=True),
    CCase("request-to-a-client", request(RID, b"add", packb([])), [], still_pending=True),
    CCase(
        "response-trailers",
        response(RID, packb(5), meta=MD_META, flags=FLAG_METADATA),
        [Response(RID, 5, 1, MD)],
    ),
    CCase(
        "error-trailers",
        encode_error(RID, 2018, "DEADLINE_EXCEEDED", "late", metadata=MD),
        [Error(RID, 2018, "DEADLINE_EXCEEDED", "late", MD)],
    ),
    _client_refusal(
        "response-trailers-not-a-map",
        response(RID, packb(5), meta=b"\x00\x01", flags=FLAG_METADATA),
        2003,
    ),
]


@pytest.mark.parametrize("as_view", [False, True], ids=["bytes", "memoryview"])
@pytest.mark.parametrize("case", CLIENT_DATAGRAM_CASES, ids=lambda c: c.name)
def test_datagram_client_receives_as_required(case: CCase, as_view: bool) -> None:
    client = DatagramClient(max_datagram=MAX_DATAGRAM, seed=1)
    client.send_request(RID, "m", [], now=0.0, timeout=5.0)
    client.datagrams_to_send()
    data: bytes | memoryview = memoryview(bytearray(case.data)) if as_view else case.data
    assert client.receive_datagram(data) == case.events
    assert client.in_flight == (1 if case.still_pending else 0)
    if not case.still_pending:  # answered: the same answer again is no outcome of a call
        again = client.receive_datagram(case.data)
        assert not [e for e in again if not isinstance(e, ProtocolViolation)]


# The blocking client's request_datagram against the general send_request.
def datagram_request_fast(client: DatagramClient, rid: int, method: str, args: list[Any]) -> bytes:
    data = client.request_datagram(rid, method, args, now=0.0, timeout=1.0)
    assert client.datagrams_to_send() == []
    return data


def datagram_request_slow(client: DatagramClient, rid: int, method: str, args: list[Any]) -> bytes:
    client.send_request(rid, method, args, now=0.0, timeout=1.0)
    (data,) = client.datagrams_to_send()
    return data


DATAGRAM_SENDERS = [datagram_request_fast, datagram_request_slow]


@pytest.mark.parametrize("send", DATAGRAM_SENDERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("method", "args"),
    [("add", [2, 3]), ("échø", [None, {"k": 1}]), ("m" * 684, [b"x" * 496])],  # 1,200 whole
    ids=["small", "unicode", "at-the-limit"],
)
def test_datagram_senders_send_the_same_bytes(
    send: Callable[..., bytes], method: str, args: list[Any]
) -> None:
    client = DatagramClient(max_datagram=MAX_DATAGRAM, retry=RetryPolicy(jitter=0.0))
    assert send(client, 5, method, args) == encode_request(5, method, args)
    assert client.in_flight == 1 and client.next_timer() == pytest.approx(0.05)


@pytest.mark.parametrize("send", DATAGRAM_SENDERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("method", "args"),
    [("echo", [b"x" * 1976]), ("m" * 1000, [b"x" * 296])],
    ids=["2000-byte-request", "meta-and-body-over"],
)
def test_datagram_senders_refuse_above_the_limit(
    send: Callable[..., bytes], method: str, args: list[Any]
) -> None:
    client = DatagramClient(max_datagram=MAX_DATAGRAM)
    with pytest.raises(LocalProtocolError) as info:
        send(client, 5, method, args)
    assert info.value.code == ErrorCode.DATAGRAM_TOO_LARGE
    assert (
        client.in_flight == 0 and client.datagrams_to_send() == [] and client.next_timer() is None
    )


@pytest.mark.parametrize("send", DATAGRAM_SENDERS, ids=lambda f: f.__name__)
def test_datagram_senders_refuse_what_does_not_encode(send: Callable[..., bytes]) -> None:
    client = DatagramClient()
    with pytest.raises(CodecError):
        send(client, 5, "add", [object()])
    assert client.in_flight == 0 and client.datagrams_to_send() == []


@pytest.mark.parametrize(
    "path", ["stream-single", "stream-behind-a-ping", "datagram-fast", "datagram-slow"]
)
@pytest.mark.parametrize(
    ("ext", "value"),
    [
        # msgpack's timestamp (type -1), 32- and 96-bit forms: an aware UTC datetime
        (msgpack.Timestamp(0, 0), datetime(1970, 1, 1, tzinfo=UTC)),
        (msgpack.Timestamp(-1, 5000), datetime(1969, 12, 31, 23, 59, 59, 5, tzinfo=UTC)),
        # type 1: an integer beyond 64 bits, big-endian two's complement (PROTOCOL.md §3.1)
        (EXT(1, b"\x01" + bytes(9)), 1 << 72),
        (EXT(1, b"\xff" + bytes(9)), -(1 << 72)),
    ],
    ids=["timestamp-epoch", "timestamp-96-bit", "bigint", "negative-bigint"],
)
def test_the_supported_extension_types_decode_on_every_path(
    path: str, ext: Any, value: Any
) -> None:
    """Types -1 (timestamp) and 1 (big integer) are data (PROTOCOL.md §3.1): every reading
    path gives the same value (they were refused, or a msgpack.Timestamp leaked through)."""
    data = request(4, b"add", packb([ext]))
    if path.startswith("stream"):
        conn = opened(S)
        by_name = {p.name: p for p in STREAM_PATHS}
        events = by_name[path.removeprefix("stream-")].feed(conn, data)
    else:
        server = DatagramServer()
        events = server.receive_datagram(
            data if path == "datagram-fast" else datagram_slow(data), ADDR, 0.0
        )
    assert events == [Request(4, "add", [value], {}, 1)]
    assert type(events[0].args[0]) is type(value)


@pytest.mark.parametrize(
    "path", ["stream-single", "stream-behind-a-ping", "datagram-fast", "datagram-slow"]
)
@pytest.mark.parametrize(
    "body",
    [
        packb([EXT(1, b"")]),
        packb([EXT(1, b"\x01" * 513)]),
        packb([EXT(2, b"x")]),
        b"\x91\xd4\xfe\x78",  # [ext type -2, 1 byte]
        b"\x91\xc7\x05\xff" + bytes(5),  # [ext type -1 of 5 bytes]: no timestamp form
    ],
    ids=["empty-bigint", "bigint-of-513-bytes", "type-2", "type-minus-2", "timestamp-of-5-bytes"],
)
def test_other_extension_payloads_are_refused_on_every_path(path: str, body: bytes) -> None:
    data = request(4, b"add", body)
    if path.startswith("stream"):
        conn = opened(S)
        by_name = {p.name: p for p in STREAM_PATHS}
        events = by_name[path.removeprefix("stream-")].feed(conn, data)
    else:
        server = DatagramServer()
        events = server.receive_datagram(
            data if path == "datagram-fast" else datagram_slow(data), ADDR, 0.0
        )
    assert [type(e) for e in events] == [ProtocolViolation]
    assert events[0].code == ErrorCode.DECODE_ERROR


def _general_path(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the general path was taken")


def test_the_fast_paths_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cases above pin what every path answers; this pins that the common frames do take
    the fast paths (a fast path that silently declines everything is correct, and slow): with
    the general readers disabled, the common traffic still goes through."""
    from sockstack.protocol import datagram

    server, client = opened(S, 1 << 20), opened(C, 1 << 20)
    dgram_server = DatagramServer()
    dgram_client = DatagramClient()
    dgram_client.send_request(1, "m", [], now=0.0, timeout=1.0)
    monkeypatch.setattr(FrameDecoder, "feed", _general_path)  # the stream's general reader
    monkeypatch.setattr(datagram, "parse_datagram", _general_path)  # the datagram one
    req, resp = request(1, b"add", packb([2, 3])), response(1, packb(5))
    assert server.receive_single(req) == Request(1, "add", [2, 3], {}, 1)
    timed = request(1, b"add" + BUDGET, packb([2, 3]), FLAG_DEADLINE)  # the clients' default
    assert server.receive_single(timed) == Request(1, "add", [2, 3], {}, 1, 1500)
    assert server.receive_data(timed + timed) == [Request(1, "add", [2, 3], {}, 1, 1500)] * 2
    assert dgram_server.receive_datagram(timed, OTHER, 0.0) == [
        Request(1, "add", [2, 3], {}, 1, 1500)
    ]
    assert server.receive_single(memoryview(req)) == Request(1, "add", [2, 3], {}, 1)
    assert server.receive_data(req + encode_pub("a.b", b"p") + req) == [
        Request(1, "add", [2, 3], {}, 1),
        Pub(0, "a.b", b"p", 1, False),
        Request(1, "add", [2, 3], {}, 1),
    ]
    assert client.receive_single(memoryview(resp)) == Response(1, 5, 1)
    assert client.receive_data(resp + encode_msg(2, 7, b"a.b", b"p") + resp) == [
        Response(1, 5, 1),
        Msg(2, 7, "a.b", b"p", 1, False, False),
        Response(1, 5, 1),
    ]
    assert dgram_server.receive_datagram(req, ADDR, 0.0) == [Request(1, "add", [2, 3], {}, 1)]
    assert dgram_client.receive_datagram(memoryview(resp)) == [Response(1, 5, 1)]


# Issue 12: the senders' fast paths with a deadline (the clients' default) send the general
# path's bytes.
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "slow"])
@pytest.mark.parametrize(
    ("method", "args"),
    [("add", [2, 3]), ("echo", [b"x" * 70_000, 1])],
    ids=["small", "large-bytes"],
)
@pytest.mark.parametrize("budget", [0, 1500, 0xFFFFFFFF])
def test_request_senders_with_a_deadline_send_the_same_bytes(
    fast: bool, method: str, args: list[Any], budget: int
) -> None:
    conn = sender(Role.CLIENT, 200_000)
    for rid in (1, 2):  # the first time a method name is seen, and after
        pieces = conn.request_frame(rid, method, args, budget) if fast else None
        if pieces is None:
            conn.send_request(rid, method, args, budget_ms=budget)
            data = b"".join(conn.buffers_to_send())
        else:
            data = b"".join(pieces)
        assert data == encode_request(rid, method, args, budget_ms=budget)
        (frame,) = FrameDecoder(1 << 30).feed(data)
        assert decode_message(frame) == Request(rid, method, args, {}, 1, budget)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "slow"])
def test_datagram_senders_with_a_deadline_send_the_same_bytes(fast: bool) -> None:
    client = DatagramClient(max_datagram=MAX_DATAGRAM, seed=1)
    if fast:
        data = client.request_datagram(7, "add", [2, 3], now=0.0, timeout=1.5, deadline=True)
    else:
        client.send_request(7, "add", [2, 3], now=0.0, timeout=1.5, deadline=True)
        (data,) = client.datagrams_to_send()
    assert data == encode_request(7, "add", [2, 3], budget_ms=1500)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "slow"])
def test_a_retransmission_carries_the_time_left_when_it_is_sent(fast: bool) -> None:
    """PROTOCOL.md §6: each retransmission's budget is the call's time left when it leaves, so
    the server's deadline never outlives the caller's."""
    client = DatagramClient(max_datagram=MAX_DATAGRAM, seed=1, retry=RetryPolicy(0.1, 1.0, 1.0, 0))
    if fast:
        client.request_datagram(7, "add", [2, 3], now=0.0, timeout=1.5, deadline=True)
    else:
        client.send_request(7, "add", [2, 3], now=0.0, timeout=1.5, deadline=True)
        client.datagrams_to_send()
    assert client.handle_timer(0.1) == []
    (again,) = client.datagrams_to_send()
    assert again == encode_request(7, "add", [2, 3], budget_ms=1400)
    assert client.handle_timer(1.2) == []
    (late,) = client.datagrams_to_send()
    assert late == encode_request(7, "add", [2, 3], budget_ms=300)


def test_a_method_name_with_a_nul_is_refused_before_sending() -> None:
    """PROTOCOL.md §4: method names never contain 0x00 (METADATA splits the meta on it)."""
    conn = sender(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        conn.send_request(1, "a\x00b", [])
    assert conn.data_to_send() == b""
    client = DatagramClient()
    with pytest.raises(LocalProtocolError):
        client.request_datagram(1, "a\x00b", [], now=0.0, timeout=1.0, deadline=True)
    assert client.in_flight == 0
