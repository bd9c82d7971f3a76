"""UDP core with injected time: retransmission schedule, deadlines, de-duplication."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockstack.errors import ErrorCode, LocalProtocolError
from sockstack.protocol.codecs import MSGPACK
from sockstack.protocol.connection import ProtocolViolation
from sockstack.protocol.datagram import (
    CallExpired,
    DatagramClient,
    DatagramServer,
    ReplyCache,
    RetryPolicy,
)
from sockstack.protocol.frames import HEADER, MAGIC, encode_frame, parse_datagram
from sockstack.protocol.messages import (
    CORE_MESSAGES,
    Close,
    Error,
    Hello,
    Pong,
    Request,
    Response,
    Welcome,
    decode_message,
    encode_hello,
    encode_ping,
)
from sockstack.protocol.registry import Registry
from sockstack.pubsub.messages import PUBSUB_MESSAGES, Ack, Pub, Sub, Unsub

ADDR = ("127.0.0.1", 40000)
NO_JITTER = RetryPolicy(initial=0.1, factor=2.0, max_interval=1.0, jitter=0.0)


def test_thirty_seconds_of_retransmissions_in_microseconds() -> None:
    client = DatagramClient(retry=NO_JITTER, seed=1)
    client.send_request(7, "add", [1, 2], now=0.0, timeout=30.0)
    sends = [0.0] if client.datagrams_to_send() else []
    now = 0.0
    expired: list[CallExpired] = []
    for _ in range(1000):  # bounded
        nxt = client.next_timer()
        if nxt is None:
            break
        now = nxt
        expired += client.handle_timer(now)
        if client.datagrams_to_send():
            sends.append(round(now, 6))
    assert sends[:6] == [0.0, 0.1, 0.3, 0.7, 1.5, 2.5]  # 0.1, 0.2, 0.4, 0.8, then capped at 1 s
    assert len(sends) == 6 + 28 - 1 and now == 30.0
    assert expired == [CallExpired(7, len(sends))]
    assert client.in_flight == 0 and client.next_timer() is None


def test_answer_stops_retransmission_and_duplicates_are_ignored() -> None:
    client = DatagramClient(retry=NO_JITTER)
    server = DatagramServer()
    client.send_request(5, "m", [], now=0.0, timeout=5.0)
    (dgram,) = client.datagrams_to_send()
    assert len(server.receive_datagram(dgram, ADDR, 0.0)) == 1
    server.send_response(ADDR, 5, "ok", MSGPACK, 0.0)
    ((answer, addr),) = server.datagrams_to_send()
    assert addr == ADDR
    assert client.receive_datagram(answer) == [Response(5, "ok", 1)]
    assert client.receive_datagram(answer) == []  # duplicate answer
    assert client.next_timer() is None


def test_server_runs_a_retried_request_once() -> None:
    server = DatagramServer()
    client = DatagramClient(retry=NO_JITTER)
    client.send_request(11, "m", [1], now=0.0, timeout=5.0)
    (dgram,) = client.datagrams_to_send()
    assert server.receive_datagram(dgram, ADDR, 0.0) == [Request(11, "m", [1], {}, 1)]
    # retransmission while still running: dropped, nothing sent
    assert server.receive_datagram(dgram, ADDR, 0.1) == []
    assert server.datagrams_to_send() == []
    server.send_response(ADDR, 11, 42, MSGPACK, 0.2)
    first = server.datagrams_to_send()
    # retransmission after the answer (the answer was lost): the same answer again, not a rerun
    assert server.receive_datagram(dgram, ADDR, 0.3) == []
    assert server.datagrams_to_send() == first
    assert server.duplicates == 2
    # the same id from another peer is another request
    assert len(server.receive_datagram(dgram, ("127.0.0.1", 40001), 0.4)) == 1


def test_reply_cache_window_and_bounds() -> None:
    cache = ReplyCache(window=10.0, max_entries=3, max_bytes=100)
    cache.begin("a", 0.0)
    cache.complete("a", b"x" * 10, 0.0)
    assert cache.lookup("a", 9.9) == (True, b"x" * 10)
    assert cache.lookup("a", 10.0) == (False, None)  # expired
    for k in "bcde":
        cache.begin(k, 20.0)
    assert len(cache) == 3 and cache.evicted == 1
    cache.complete("c", b"y" * 60, 20.0)
    cache.complete("d", b"z" * 60, 20.0)  # 120 bytes > 100: oldest goes
    assert cache.lookup("c", 20.0) == (False, None)
    assert cache.lookup("d", 20.0) == (True, b"z" * 60)


def test_server_answers_control_messages_itself() -> None:
    server = DatagramServer(max_datagram=1200)
    assert server.receive_datagram(encode_ping(3, b"t"), ADDR, 0.0) == []
    assert (
        server.receive_datagram(
            encode_hello(Hello(agent="padded to ask for the WELCOME")), ADDR, 0.0
        )
        == []
    )
    (pong, _), (welcome, _) = server.datagrams_to_send()
    assert decode_message(parse_datagram(pong, 1200)) == Pong(3, b"t")
    w = decode_message(parse_datagram(welcome, 1200))
    assert isinstance(w, Welcome) and w.max_frame == 1200


def test_garbage_datagram_is_reported_not_answered() -> None:
    server = DatagramServer()
    (v,) = server.receive_datagram(b"\x00garbage", ADDR, 0.0)
    assert isinstance(v, ProtocolViolation) and v.fatal
    assert server.datagrams_to_send() == []


def test_bad_body_is_answered_with_error() -> None:
    server = DatagramServer()
    (v,) = server.receive_datagram(encode_frame(3, 9, b"m", b"\xc1", 0, 1), ADDR, 0.0)
    assert v.code == ErrorCode.DECODE_ERROR
    ((data, _),) = server.datagrams_to_send()
    err = decode_message(parse_datagram(data, 65507))
    assert isinstance(err, Error) and err.request_id == 9 and err.code == ErrorCode.DECODE_ERROR


def test_oversized_request_refused_locally() -> None:
    client = DatagramClient(max_datagram=1200)
    with pytest.raises(LocalProtocolError) as info:
        client.send_request(1, "m", [b"x" * 2000], now=0.0, timeout=1.0)
    assert info.value.code == ErrorCode.DATAGRAM_TOO_LARGE
    assert "1200" in str(info.value)
    assert client.datagrams_to_send() == [] and client.in_flight == 0


def test_oversized_result_becomes_error() -> None:
    server = DatagramServer(max_datagram=100)
    server.send_response(ADDR, 4, b"x" * 500, MSGPACK, 0.0)
    ((data, _),) = server.datagrams_to_send()
    err = decode_message(parse_datagram(data, 1000))
    assert err.code == ErrorCode.DATAGRAM_TOO_LARGE


_datagrams = st.binary(max_size=300) | st.builds(
    encode_frame,
    st.sampled_from([1, 3, 4, 5, 6, 7, 8, 0x10, 0x11, 0x12, 0x13, 0x14, 0x55]),
    st.integers(0, 5),
    st.binary(max_size=8) | st.just(b"add"),
    st.binary(max_size=40) | st.sampled_from([b"\x92\x01\x02", b"\x90", b"\xc1"]),
    st.integers(0, 255),
    st.integers(0, 3),
)


FROM_CLIENTS = Request | Error | Pong | Close | Sub | Unsub | Pub | Ack
# A server that also hosts publish/subscribe: pattern messages come out of the core too.
WITH_PUBSUB = Registry([CORE_MESSAGES, PUBSUB_MESSAGES])


@given(_datagrams)
def test_any_datagram_yields_events_or_violations(data: bytes) -> None:
    server = DatagramServer(max_datagram=200, registry=WITH_PUBSUB)
    events = server.receive_datagram(data, ADDR, 0.0)
    sent = server.datagrams_to_send()
    assert len(events) <= 1
    for ev in events:
        # A violation, or a message a client may send that the core does not answer itself
        # (HELLO and PING are answered here; WELCOME, RESPONSE and MSG come from servers).
        assert isinstance(ev, ProtocolViolation | FROM_CLIENTS), ev
        if not isinstance(ev, ProtocolViolation):
            assert ev == decode_message(parse_datagram(data, 200), WITH_PUBSUB)  # the decoder's
            assert sent == []  # the application answers it, not the core
    if data[:2] != MAGIC:
        assert events == [] or events[0].fatal  # not ours: reported...
        assert sent == []  # ...and never answered (that would reflect spoofed traffic)
    for answer, addr in sent:
        assert addr == ADDR and answer[:2] == MAGIC
        reply = decode_message(parse_datagram(answer, 1 << 16), WITH_PUBSUB)
        assert isinstance(reply, Error | Pong | Welcome)
        if isinstance(reply, Error):  # an ERROR names the offending request's id
            assert reply.request_id == HEADER.unpack_from(data)[6]
    client = DatagramClient(max_datagram=200, registry=WITH_PUBSUB)
    for ev in client.receive_datagram(data):
        assert isinstance(ev, ProtocolViolation | Welcome | Pong)


@given(
    st.sampled_from([3, 4]),
    st.integers(0, 2),
    st.sampled_from([0, 1, 2]),
    st.binary(max_size=6) | st.just(b"add"),
    st.binary(max_size=12) | st.sampled_from([b"\x92\x01\x02", b"\x90", b"\x05"]),
)
def test_fast_paths_agree_with_general_decoding(
    type_: int, flags: int, codec: int, meta: bytes, body: bytes
) -> None:
    data = encode_frame(type_, 9, meta, body, flags, codec)
    try:
        expected = decode_message(parse_datagram(data, 65507))
    except Exception:
        expected = None
    server = DatagramServer()
    got = [
        e for e in server.receive_datagram(data, ADDR, 0.0) if not isinstance(e, ProtocolViolation)
    ]
    if type_ == 3:
        assert got == ([expected] if expected is not None else [])
    client = DatagramClient()
    client.send_request(9, "m", [], now=0.0, timeout=1.0)
    got = [e for e in client.receive_datagram(data) if isinstance(e, Response)]
    if type_ == 4 and isinstance(expected, Response):
        assert got == [expected]


@pytest.mark.parametrize(
    ("method", "args"), [("add", [1, 2]), ("add", (1, 2)), ("échø", [b"x" * 100, None, {"k": 1}])]
)
def test_request_datagram_is_send_request_without_the_queue(method: str, args: object) -> None:
    """The blocking client's fast path sends the same bytes and keeps the same schedule."""
    fast = DatagramClient(retry=NO_JITTER, seed=1)
    slow = DatagramClient(retry=NO_JITTER, seed=1)
    data = fast.request_datagram(9, method, args, now=0.0, timeout=0.25)  # type: ignore[arg-type]
    slow.send_request(9, method, args, now=0.0, timeout=0.25)  # type: ignore[arg-type]
    assert [data] == slow.datagrams_to_send() and fast.datagrams_to_send() == []
    for now in (0.1, 0.25):  # one retransmission, then the deadline
        assert fast.next_timer() == slow.next_timer() == now
        assert fast.handle_timer(now) == slow.handle_timer(now)
        assert fast.datagrams_to_send() == slow.datagrams_to_send()
    assert fast.in_flight == slow.in_flight == 0


def test_request_datagram_refuses_what_does_not_fit() -> None:
    client = DatagramClient(max_datagram=100)
    with pytest.raises(LocalProtocolError) as info:
        client.request_datagram(1, "echo", [b"x" * 200], now=0.0, timeout=1.0)
    assert info.value.code == ErrorCode.DATAGRAM_TOO_LARGE
    assert client.in_flight == 0 and client.datagrams_to_send() == []


def test_a_small_hello_gets_no_larger_welcome() -> None:
    """A spoofed 22-byte HELLO must not make the server send a 39-byte WELCOME (amplifier)."""
    server = DatagramServer(max_datagram=1200)
    hello = encode_hello(Hello())
    assert server.receive_datagram(hello, ADDR, 0.0) == []
    assert all(len(d) <= len(hello) for d, _ in server.datagrams_to_send())
