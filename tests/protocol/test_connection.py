"""Session layer, driven with bytes only: two cores back to back, bad input, timers."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockstack.errors import ErrorCode, LocalProtocolError
from sockstack.protocol.codecs import JSON, RAW
from sockstack.protocol.connection import (
    Connection,
    ConnectionTerminated,
    HandshakeComplete,
    ProtocolViolation,
    State,
)
from sockstack.protocol.frames import HEADER, MAGIC, FrameDecoder, MessageType, encode_frame
from sockstack.protocol.messages import (
    CORE_MESSAGES,
    Close,
    Error,
    Hello,
    Pong,
    Request,
    Response,
    Role,
    decode_message,
    encode_hello,
    encode_request,
)
from sockstack.protocol.registry import Registry
from sockstack.pubsub.messages import PUBSUB_MESSAGES, PubSubType


def pair(**kw: Any) -> tuple[Connection, Connection]:
    return Connection(Role.CLIENT, **kw), Connection(Role.SERVER, **kw)


def pump(src: Connection, dst: Connection) -> list[Any]:
    return dst.receive_data(src.data_to_send())


def sent_frames(conn: Connection) -> list[Any]:
    return [decode_message(f) for f in FrameDecoder().feed(conn.data_to_send())]


def types(events: list[Any]) -> list[type]:
    return [type(e) for e in events]


def test_handshake_and_pipelined_request_before_welcome() -> None:
    client, server = pair()
    assert client.state is State.HELLO_SENT and server.state is State.AWAIT_HELLO
    client.send_request(1, "add", [2, 3])
    client.send_request(2, "echo", ["x"], {"k": 1}, JSON)
    events = pump(client, server)
    assert types(events) == [HandshakeComplete, Hello, Request, Request]
    assert events[2] == Request(1, "add", [2, 3], {}, 1)
    assert events[3] == Request(2, "echo", ["x"], {"k": 1}, 2)
    assert server.state is State.OPEN
    server.send_response(1, 5)
    server.send_response(2, "x", JSON)
    events = pump(server, client)
    assert types(events) == [HandshakeComplete, Response, Response]
    assert events[1:] == [Response(1, 5, 1), Response(2, "x", 2)]
    assert client.state is State.OPEN


def test_raw_codec_request() -> None:
    client, server = pair()
    client.send_request(9, "blob", [b"\x00\x01"], codec=RAW)
    req = pump(client, server)[-1]
    assert req == Request(9, "blob", (b"\x00\x01",), {}, 0)


def test_ping_answered_by_core() -> None:
    client, server = pair()
    pump(client, server)
    pump(server, client)
    client.send_ping(77, b"hi")
    assert pump(client, server) == []
    assert pump(server, client) == [Pong(77, b"hi")]


def test_orderly_close_both_ways() -> None:
    client, server = pair()
    pump(client, server)
    pump(server, client)
    client.send_close(ErrorCode.NORMAL, "bye")
    assert client.state is State.CLOSING
    events = pump(client, server)
    assert events == [ConnectionTerminated(ErrorCode.NORMAL, "bye", by_peer=True)]
    assert server.close_expected()
    events = pump(server, client)
    assert types(events) == [ConnectionTerminated] and not events[0].by_peer
    assert client.close_expected()
    assert client.receive_data(b"more") == []  # nothing after the end


def test_eof_without_close() -> None:
    client, server = pair()
    pump(client, server)
    assert server.receive_eof() == [
        ConnectionTerminated(None, "connection lost without CLOSE", by_peer=True)
    ]
    assert server.receive_eof() == []


def test_request_before_hello_is_fatal() -> None:
    server = Connection(Role.SERVER)
    events = server.receive_data(encode_request(1, "add", [1, 2]))
    assert types(events) == [ProtocolViolation, ConnectionTerminated]
    assert events[0].fatal and "expected HELLO" in events[0].message
    assert sent_frames(server) == [Close(ErrorCode.PROTOCOL_ERROR, events[0].message)]
    assert server.close_expected()


def test_response_sent_by_client_is_fatal() -> None:
    client, server = pair()
    pump(client, server)
    server.data_to_send()
    events = server.receive_data(encode_frame(MessageType.RESPONSE, 1, b"", b"\x01", 0, 1))
    assert events[0].code == ErrorCode.PROTOCOL_ERROR and server.close_expected()


def test_unknown_type_answered_with_error_and_session_survives() -> None:
    client, server = pair()
    pump(client, server)
    server.data_to_send()
    events = server.receive_data(encode_frame(0x7E, 5, b"", b"?") + encode_request(6, "m", []))
    assert types(events) == [ProtocolViolation, Request]
    assert sent_frames(server) == [
        Error(5, ErrorCode.UNKNOWN_TYPE, "UNKNOWN_TYPE", "unknown message type 0x7e")
    ]
    assert server.state is State.OPEN


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (encode_frame(MessageType.REQUEST, 3, b"m", b"\xc1", 0, 1), ErrorCode.DECODE_ERROR),
        (encode_frame(MessageType.REQUEST, 3, b"m", b"\x01", 0, 1), ErrorCode.DECODE_ERROR),
        (encode_frame(MessageType.REQUEST, 3, b"m", b"\x90", 0, 77), ErrorCode.UNSUPPORTED_CODEC),
        (encode_frame(MessageType.REQUEST, 3, b"\xff", b"\x90", 0, 1), ErrorCode.DECODE_ERROR),
        (encode_frame(MessageType.REQUEST, 3, b"m", b"\x91\x01", 1, 1), ErrorCode.DECODE_ERROR),
    ],
    ids=["bad-msgpack", "not-an-array", "unknown-codec", "bad-method-utf8", "bad-kwargs-shape"],
)
def test_request_level_errors_keep_session(frame: bytes, code: int) -> None:
    client, server = pair()
    pump(client, server)
    server.data_to_send()
    events = server.receive_data(frame)
    assert types(events) == [ProtocolViolation] and events[0].code == code
    (err,) = sent_frames(server)
    assert isinstance(err, Error) and err.request_id == 3 and err.code == code
    assert server.state is State.OPEN


def test_oversized_frame_closes_with_code() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER, max_frame=100)
    pump(client, server)
    server.data_to_send()
    events = server.receive_data(HEADER.pack(MAGIC, 1, 3, 0, 1, 0, 1, 101))
    assert events[0] == ProtocolViolation(
        ErrorCode.FRAME_TOO_LARGE, "frame of 101 bytes exceeds the limit of 100 bytes", 0, True
    )
    assert sent_frames(server)[0].code == ErrorCode.FRAME_TOO_LARGE


def test_frames_before_a_bad_header_are_still_delivered() -> None:
    client, server = pair()
    client.send_request(1, "a", [])
    events = server.receive_data(client.data_to_send() + b"JUNKJUNKJUNKJUNK")
    assert types(events) == [
        HandshakeComplete,
        Hello,
        Request,
        ProtocolViolation,
        ConnectionTerminated,
    ]


def test_unsupported_version_in_hello() -> None:
    server = Connection(Role.SERVER)
    events = server.receive_data(
        encode_hello(Hello(1, 1, 1 << 20)).replace(b"\x01\x01", b"\x02\x03", 1)
    )
    # header version 1 stays readable; the body asks for versions 2..3 only
    assert any(
        isinstance(e, ProtocolViolation) and e.code == ErrorCode.UNSUPPORTED_VERSION for e in events
    )
    assert server.close_expected()


def test_send_refused_above_peer_limit() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER, max_frame=50)
    pump(client, server)
    pump(server, client)
    assert client.peer_max_frame == 50
    with pytest.raises(LocalProtocolError) as info:
        client.send_request(1, "m", [b"x" * 100])
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    assert client.data_to_send() == b""


def test_handshake_timeout() -> None:
    server = Connection(Role.SERVER, now=100.0, handshake_timeout=10.0)
    assert server.next_timer(100.0) == 110.0
    assert server.handle_timer(109.9) == []
    events = server.handle_timer(110.0)
    assert events[0].code == ErrorCode.HANDSHAKE_TIMEOUT and server.close_expected()
    assert sent_frames(server)[0].code == ErrorCode.HANDSHAKE_TIMEOUT


def test_keepalive_pings_then_closes_silent_peer() -> None:
    client, server = pair(keepalive_interval=20.0, keepalive_timeout=20.0)
    pump(client, server)
    pump(server, client)
    assert server.next_timer(0.0) == 20.0
    assert server.handle_timer(20.0) == []  # the HELLO counted as activity
    assert server.next_timer(20.0) == 40.0
    assert server.handle_timer(40.0) == []
    (ping,) = sent_frames(server)
    assert ping.__class__.__name__ == "Ping"
    assert server.next_timer(40.0) == 60.0
    events = server.handle_timer(60.0)
    assert events[-1] == ConnectionTerminated(
        ErrorCode.IDLE_TIMEOUT, "peer did not answer keepalive PING", False
    )


def test_keepalive_pong_keeps_session() -> None:
    client, server = pair(keepalive_interval=20.0, keepalive_timeout=20.0)
    pump(client, server)
    pump(server, client)
    server.next_timer(0.0)
    server.handle_timer(20.0)
    server.handle_timer(40.0)  # sends PING
    pump(server, client)  # the client core answers PONG by itself
    assert types(pump(client, server)) == [Pong]
    assert server.handle_timer(60.0) == []
    assert server.state is State.OPEN


SERVER_INPUTS = {
    "hello": encode_hello(Hello()),
    "request": encode_request(1, "m", []),
    "welcome": encode_frame(MessageType.WELCOME, 0, b"", b"\x01\x00\x00\x10\x00\x00"),
    "response": encode_frame(MessageType.RESPONSE, 1, b"", b"\xc0", 0, 1),
    "ping": encode_frame(MessageType.PING, 1, b"", b""),
    "pong": encode_frame(MessageType.PONG, 1, b"", b""),
    "close": encode_frame(MessageType.CLOSE, 0, b"", b"\x03\xe8"),
    "error": encode_frame(MessageType.ERROR, 1, b"", b"\x07\xd0"),
    "unknown": encode_frame(0x55, 1, b"", b""),
    "garbage": b"\x00" * 16,
}


@settings(max_examples=300)
@given(st.lists(st.sampled_from(sorted(SERVER_INPUTS)), max_size=6), st.sampled_from(list(Role)))
def test_state_sweep(inputs: list[str], role: Role) -> None:
    """Every sequence of inputs leaves the core in a valid state; a fatal error ends CLOSED."""
    conn = Connection(role)
    for name in inputs:
        events = conn.receive_data(SERVER_INPUTS[name])
        assert conn.state in State
        if any(isinstance(e, ProtocolViolation) and e.fatal for e in events):
            assert conn.state is State.CLOSED
        conn.data_to_send()


# Sessions that also speak a pattern's messages (publish/subscribe's PUB and MSG have fast
# decoders), so the fast paths of registered patterns are compared with the general path too.
_WITH_PUBSUB = Registry([CORE_MESSAGES, PUBSUB_MESSAGES])


def _open_pair() -> tuple[Connection, Connection]:
    client, server = pair(keepalive_interval=None, registry=_WITH_PUBSUB)
    pump(client, server)
    pump(server, client)
    return client, server


@settings(max_examples=500)
@given(
    st.sampled_from([MessageType.REQUEST, MessageType.RESPONSE, 0x55]),
    st.integers(0, 3),
    st.sampled_from([0, 1, 2, 9]),
    st.binary(max_size=8) | st.sampled_from([b"add", b"\xff"]),
    st.binary(max_size=16) | st.sampled_from([b"\x92\x01\x02", b"\x05", b"\x90", b"\xc1"]),
    st.integers(-2, 2),
)
def test_receive_single_agrees_with_receive_data(
    type_: int, flags: int, codec: int, meta: bytes, body: bytes, trim: int
) -> None:
    """The fast path returns exactly what the general path would, or declines untouched."""
    frame = encode_frame(type_, 7, meta, body, flags, codec)
    data = frame[: len(frame) + trim] if trim < 0 else frame + b"\x00" * trim
    for role_index in (0, 1):  # the client's fast path takes RESPONSE, the server's REQUEST
        conn = _open_pair()[role_index]
        single = conn.receive_single(data)
        if single is None:
            continue
        general = _open_pair()[role_index]._receive(data)  # the general path alone
        assert general == [single]


def test_receive_single_declines_when_bytes_are_buffered() -> None:
    _, server = _open_pair()
    req = encode_request(1, "add", [1, 2])
    assert server.receive_single(req) == Request(1, "add", [1, 2], {}, 1)
    assert server.receive_data(req[:5]) == []
    assert server.receive_single(req) is None  # a partial frame is waiting: order matters
    assert server.receive_data(req[5:]) == [Request(1, "add", [1, 2], {}, 1)]


_frames = st.builds(
    encode_frame,
    st.sampled_from(
        [
            MessageType.REQUEST,
            MessageType.RESPONSE,
            MessageType.PING,
            PubSubType.PUB,
            PubSubType.MSG,
            PubSubType.SUB,
            0x55,
        ]
    ),
    st.integers(0, 9),
    st.binary(max_size=8) | st.sampled_from([b"add", b"\xff", b"\x00\x00\x00\x07a.b", b"\x00"]),
    st.binary(max_size=16) | st.sampled_from([b"\x92\x01\x02", b"\x05", b"\x90", b"\xc1"]),
    st.sampled_from([0, 0, 1, 4, 8, 12, 2]),
    st.sampled_from([1, 1, 1, 0, 2, 3]),
)


@settings(max_examples=400)
@given(st.lists(_frames, max_size=8), st.binary(max_size=20))
def test_batch_fast_path_agrees_with_byte_by_byte(frames: list[bytes], tail: bytes) -> None:
    """A batch read at once (fast path) gives the same events and output as the same bytes fed
    one at a time (general path only)."""
    stream = b"".join(frames) + tail
    for role_index in (0, 1):
        fast = _open_pair()[role_index]
        slow = _open_pair()[role_index]
        got = fast.receive_data(stream)
        want: list[Any] = []
        for i in range(len(stream)):
            want += slow.receive_data(stream[i : i + 1])
        assert got == want
        assert fast.data_to_send() == slow.data_to_send()
        assert fast.state is slow.state
