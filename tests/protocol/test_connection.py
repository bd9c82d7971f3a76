"""Session layer, driven with bytes only: two cores back to back, bad input, timers."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockstack.errors import ErrorCode, LocalProtocolError
from sockstack.protocol.auth import token_checker
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
    MAX_HELLO_EXTENSIONS,
    MAX_HELLO_SIZE,
    MIN_MAX_FRAME,
    Close,
    Error,
    Hello,
    Pong,
    Request,
    Response,
    Role,
    Welcome,
    decode_message,
    encode_hello,
    encode_request,
    encode_welcome,
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
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER, max_frame=600)
    pump(client, server)
    server.data_to_send()
    events = server.receive_data(HEADER.pack(MAGIC, 1, 3, 0, 1, 0, 1, 601))
    assert events[0] == ProtocolViolation(
        ErrorCode.FRAME_TOO_LARGE, "frame of 601 bytes exceeds the limit of 600 bytes", 0, True
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
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER, max_frame=600)
    pump(client, server)
    pump(server, client)
    assert client.peer_max_frame == 600
    with pytest.raises(LocalProtocolError) as info:
        client.send_request(1, "m", [b"x" * 600])
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


# ------------------------------------------------------------------ handshake limits (issue 10)
# A HELLO is read before the peer is authenticated: its size is checked from the header (before
# its body is buffered), its extensions are counted before they are decoded, the secret is
# checked before anything else, and the versions and limits it announces follow PROTOCOL.md §5.1.


def hello_frame(
    lo: int = 1,
    hi: int = 1,
    max_frame: int = 1 << 20,
    extensions: tuple[tuple[int, bytes], ...] = (),
    agent: bytes = b"",
) -> bytes:
    """A HELLO as any client may send it (header version 1, body as given)."""
    body = bytes([lo, hi]) + max_frame.to_bytes(4, "big")
    body += b"".join(bytes([t]) + len(v).to_bytes(2, "big") + v for t, v in extensions)
    return encode_frame(MessageType.HELLO, 0, agent, body)


def closed_with(conn: Connection, events: list[Any], code: int, reason: str) -> None:
    assert events == [
        ProtocolViolation(code, reason, 0, True),
        ConnectionTerminated(code, reason, by_peer=False),
    ]
    assert sent_frames(conn) == [Close(code, reason)]
    assert conn.close_expected()


# The attack of issue 10: ~900 KB of HELLO, 300,000 extensions, no secret.
HUGE_HELLO = hello_frame(extensions=((2, b""),) * 300_000)


def test_max_hello_constants_are_the_documented_ones() -> None:
    assert (MAX_HELLO_SIZE, MAX_HELLO_EXTENSIONS, MIN_MAX_FRAME) == (4096, 16, 512)


@pytest.mark.parametrize("cut", [16, 3, 1], ids=["header-in-one-read", "in-3s", "bytewise"])
def test_oversized_hello_is_refused_from_its_header(cut: int) -> None:
    """The header alone (in any split) ends the session: none of the 900 KB body is needed."""
    seen: list[Hello] = []
    server = Connection(Role.SERVER, authenticate=lambda h: bool(seen.append(h)))
    events: list[Any] = []
    for i in range(0, 16, cut):
        assert not server.close_expected()
        events += server.receive_data(HUGE_HELLO[i : min(i + cut, 16)])
    size = len(HUGE_HELLO) - 16
    closed_with(
        server,
        events,
        ErrorCode.FRAME_TOO_LARGE,
        f"HELLO of {size} bytes exceeds the limit of {MAX_HELLO_SIZE} bytes",
    )
    assert server.buffered == 0  # nothing of it is held
    assert server.receive_data(HUGE_HELLO[16:]) == [] and seen == []  # never parsed


def test_oversized_hello_in_one_read_never_reaches_the_secret_check() -> None:
    seen: list[Hello] = []
    server = Connection(Role.SERVER, authenticate=lambda h: bool(seen.append(h)))
    events = server.receive_data(HUGE_HELLO)
    assert events[0].code == ErrorCode.FRAME_TOO_LARGE and server.close_expected()
    assert seen == []


def test_hello_at_the_size_limit_is_accepted() -> None:
    exts = ((2, b"x" * 4000), (1, b"s3cret"))
    data = hello_frame(extensions=exts, agent=b"a" * (4096 - 6 - 4003 - 9))
    assert len(data) - 16 == MAX_HELLO_SIZE
    server = Connection(Role.SERVER, authenticate=token_checker(b"s3cret"))
    assert types(server.receive_data(data)) == [HandshakeComplete, Hello]
    assert server.state is State.OPEN
    over = Connection(Role.SERVER)
    events = over.receive_data(hello_frame(extensions=exts, agent=b"a" * 89))
    assert events[0].code == ErrorCode.FRAME_TOO_LARGE


def test_hello_extensions_are_counted_before_the_secret_is_checked() -> None:
    seen: list[Hello] = []

    def check(hello: Hello) -> bool:
        seen.append(hello)
        return token_checker(b"s3cret")(hello)

    ok = Connection(Role.SERVER, authenticate=check)
    exts = ((2, b""),) * 15 + ((1, b"s3cret"),)
    assert types(ok.receive_data(hello_frame(extensions=exts))) == [HandshakeComplete, Hello]
    assert len(seen[0].extensions) == MAX_HELLO_EXTENSIONS
    seen.clear()
    server = Connection(Role.SERVER, authenticate=check)
    events = server.receive_data(hello_frame(extensions=((2, b""),) * 17 + ((1, b"s3cret"),)))
    closed_with(
        server,
        events,
        ErrorCode.FRAME_TOO_LARGE,
        f"HELLO carries more than {MAX_HELLO_EXTENSIONS} extensions",
    )
    assert seen == []


@pytest.mark.parametrize(
    "hello",
    [
        hello_frame(2, 3, extensions=((1, b"guess"),)),  # no version in common
        hello_frame(3, 2, extensions=((1, b"guess"),)),  # an empty range
        hello_frame(1, 1, 16, extensions=((1, b"guess"),)),  # a tiny max_frame
        hello_frame(0, 255, 0),  # no token at all
        hello_frame(extensions=((1, b"s3cret"), (1, b"s3cret"))),  # two tokens: ambiguous
    ],
    ids=["bad-versions", "empty-range", "tiny-max-frame", "no-token", "two-tokens"],
)
def test_the_secret_is_checked_first(hello: bytes) -> None:
    """A peer without the secret learns nothing else: AUTH_FAILED, whatever else it sent."""
    server = Connection(Role.SERVER, authenticate=token_checker(b"s3cret"))
    closed_with(
        server, server.receive_data(hello), ErrorCode.AUTH_FAILED, "missing or wrong credentials"
    )


@pytest.mark.parametrize(("lo", "hi"), [(0, 255), (0, 1), (1, 255), (1, 1)])
def test_any_version_range_holding_1_gets_version_1(lo: int, hi: int) -> None:
    server = Connection(Role.SERVER)
    events = server.receive_data(hello_frame(lo, hi))
    assert events[0] == HandshakeComplete(1, "", 1 << 20)
    assert encode_hello(Hello(lo, hi)) == hello_frame(lo, hi)  # header version 1, even from 0
    (welcome,) = sent_frames(server)
    assert welcome.version == 1 and server.version == 1 and server.state is State.OPEN


@pytest.mark.parametrize(
    ("lo", "hi", "reason"),
    [
        (0, 0, "client speaks versions 0..0, server 1..1"),
        (2, 3, "client speaks versions 2..3, server 1..1"),
        (2, 255, "client speaks versions 2..255, server 1..1"),
        (3, 2, "HELLO version range 3..2 is empty"),
        (255, 0, "HELLO version range 255..0 is empty"),
    ],
)
def test_version_ranges_without_1_are_unsupported(lo: int, hi: int, reason: str) -> None:
    server = Connection(Role.SERVER)
    events = server.receive_data(hello_frame(lo, hi))
    closed_with(server, events, ErrorCode.UNSUPPORTED_VERSION, reason)


@pytest.mark.parametrize("max_frame", [0, 1, 16, MIN_MAX_FRAME - 1])
def test_hello_announcing_a_tiny_max_frame_is_refused(max_frame: int) -> None:
    """Nothing a server sends could respect a limit of 0, 1 or 16 bytes: refused up front."""
    server = Connection(Role.SERVER)
    client = Connection(Role.CLIENT)
    server.receive_data(client.data_to_send())  # (a client that plays by the rules, first)
    assert server.state is State.OPEN
    server = Connection(Role.SERVER)
    events = server.receive_data(hello_frame(max_frame=max_frame) + encode_request(1, "m", []))
    closed_with(
        server,
        events,
        ErrorCode.PROTOCOL_ERROR,
        f"HELLO announces max_frame {max_frame}, below the minimum of {MIN_MAX_FRAME} bytes",
    )


def test_at_the_minimum_max_frame_every_frame_sent_fits() -> None:
    """A peer at the minimum gets nothing larger than its limit: a long ERROR text is cut."""
    server = Connection(Role.SERVER, keepalive_interval=None)
    events = server.receive_data(hello_frame(max_frame=MIN_MAX_FRAME))
    assert server.state is State.OPEN and server.peer_max_frame == MIN_MAX_FRAME
    server.data_to_send()
    with pytest.raises(LocalProtocolError):
        server.send_response(1, b"x" * MIN_MAX_FRAME)
    assert server.send_error(1, 2002, "E" * 300, "é" * 1000)
    server.send_error(2, ErrorCode.UNKNOWN_METHOD, "UNKNOWN_METHOD", f"no method {'m' * 4000!r}")
    server.receive_data(encode_frame(0x55, 3, b"", b"?"))  # answered by the core itself
    server.send_close(ErrorCode.GOING_AWAY, "r" * 2000)
    frames = FrameDecoder(1 << 20).feed(server.data_to_send())
    assert [len(f.meta) + len(f.body) for f in frames][:2] == [MIN_MAX_FRAME] * 2
    assert all(len(f.meta) + len(f.body) <= MIN_MAX_FRAME for f in frames)
    first, second, third, close = (decode_message(f) for f in frames)
    assert first.code == 2002 and first.type == "E" * 128 and first.message == "é" * 191
    assert second.message.startswith("no method 'mmm") and third.code == ErrorCode.UNKNOWN_TYPE
    assert close == Close(ErrorCode.GOING_AWAY, "r" * (MIN_MAX_FRAME - 2))
    assert events[0] == HandshakeComplete(1, "", MIN_MAX_FRAME)


def test_a_server_below_the_minimum_cannot_be_made() -> None:
    with pytest.raises(ValueError, match="below the protocol's minimum of 512"):
        Connection(Role.SERVER, max_frame=MIN_MAX_FRAME - 1)
    Connection(Role.CLIENT, max_frame=MIN_MAX_FRAME)


@pytest.mark.parametrize(
    ("welcome", "code", "reason"),
    [
        (
            encode_welcome(Welcome(1, (1,), 16, "s")),
            ErrorCode.PROTOCOL_ERROR,
            "WELCOME announces max_frame 16, below the minimum of 512 bytes",
        ),
        (
            encode_welcome(Welcome(2, (1,), 1 << 20, "s")),
            ErrorCode.UNSUPPORTED_VERSION,
            "server chose version 2, client speaks 1..1",
        ),
    ],
    ids=["tiny-max-frame", "version-not-offered"],
)
def test_client_refuses_a_welcome_it_cannot_honour(welcome: bytes, code: int, reason: str) -> None:
    client = Connection(Role.CLIENT)
    client.data_to_send()
    closed_with(client, client.receive_data(welcome), code, reason)


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (encode_frame(MessageType.REQUEST, 1, b"m", b"\x90" * 1_000_000, 0, 1), "REQUEST"),
        (encode_frame(MessageType.RESPONSE, 1, b"", b"\xc0", 0, 1), "RESPONSE"),
        (encode_frame(0x55, 1, b"", b"?"), "type 0x55"),
        (encode_frame(MessageType.CLOSE, 0, b"", b"\x03\xe8" + b"r" * 5000), None),
    ],
    ids=["large-request", "response", "unknown-type", "large-close"],
)
def test_anything_but_a_small_hello_first_is_refused_from_its_header(
    first: bytes, reason: str | None
) -> None:
    """PROTOCOL.md §5.1: HELLO (or CLOSE) first, else CLOSE PROTOCOL_ERROR: decided on the
    header, so a 1 MB frame before HELLO is never buffered, and an unknown type is no exception."""
    server = Connection(Role.SERVER)
    events = server.receive_data(first[:16])
    if reason is None:
        msg = f"CLOSE of {len(first) - 16} bytes before HELLO exceeds the limit of 4096 bytes"
        closed_with(server, events, ErrorCode.FRAME_TOO_LARGE, msg)
    else:
        closed_with(server, events, ErrorCode.PROTOCOL_ERROR, f"expected HELLO, got {reason}")
    assert server.buffered == 0


@pytest.mark.parametrize("codec", [1, 2], ids=["msgpack", "json"])
def test_request_id_0_is_refused_with_an_error(codec: int) -> None:
    """PROTOCOL.md §4: a REQUEST's id is non-zero. ERROR DECODE_ERROR (id 0), nothing delivered,
    the session goes on, on every read path."""
    body = b"\x92\x02\x03" if codec == 1 else b"[2,3]"
    frame = encode_frame(MessageType.REQUEST, 0, b"add", body, 0, codec)
    reason = "REQUEST with request id 0: a request's id is non-zero"
    for feed in ("single", "batch", "behind-a-ping", "bytewise"):
        client, server = pair(keepalive_interval=None)
        pump(client, server)
        server.data_to_send()
        if feed == "single":
            assert server.receive_single(frame) is None
            events = server.receive_data(frame)
        elif feed == "batch":
            events = server.receive_data(frame + encode_request(5, "add", [1, 1]))
        elif feed == "behind-a-ping":
            events = server.receive_data(encode_frame(MessageType.PING, 9, b"", b"") + frame)
        else:
            events = [e for i in range(len(frame)) for e in server.receive_data(frame[i : i + 1])]
        assert events[0] == ProtocolViolation(ErrorCode.DECODE_ERROR, reason, 0), feed
        assert not [e for e in events if isinstance(e, Request) and e.request_id == 0]
        errors = [m for m in sent_frames(server) if isinstance(m, Error)]
        assert errors == [Error(0, ErrorCode.DECODE_ERROR, "DECODE_ERROR", reason)]
        assert server.state is State.OPEN
