"""docs/PROTOCOL.md §8: every test vector, byte for byte, both directions."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from sockstack.protocol.codecs import JSON, RAW
from sockstack.protocol.frames import FrameDecoder, parse_datagram
from sockstack.protocol.messages import (
    CORE_MESSAGES,
    Close,
    Error,
    Hello,
    Ping,
    Pong,
    Request,
    Response,
    Welcome,
    decode_message,
    encode_close,
    encode_error,
    encode_hello,
    encode_ping,
    encode_pong,
    encode_request,
    encode_response,
    encode_welcome,
)
from sockstack.protocol.registry import Registry
from sockstack.pubsub.messages import (
    PUBSUB_MESSAGES,
    Ack,
    Msg,
    Pub,
    Sub,
    Unsub,
    encode_ack,
    encode_msg,
    encode_pub,
    encode_sub,
    encode_unsub,
)

REGISTRY = Registry([CORE_MESSAGES, PUBSUB_MESSAGES])

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def doc_vectors() -> dict[str, bytes]:
    text = DOC.read_text()
    out: dict[str, bytes] = {}
    for name, block in re.findall(r"```hex name=(\S+)\n(.*?)```", text, flags=re.S):
        hex_text = " ".join(line.split("#", 1)[0] for line in block.splitlines())
        out[name] = bytes.fromhex(hex_text)
    return out


# name -> (bytes from our encoder, the message a decoder must produce)
EXPECTED: dict[str, tuple[bytes, Any]] = {
    "hello": (encode_hello(Hello(1, 1, 1048576, "py")), Hello(1, 1, 1048576, "py")),
    "hello-ext": (
        encode_hello(Hello(1, 1, 65536, "", ((1, b"tok"),))),
        Hello(1, 1, 65536, "", ((1, b"tok"),)),
    ),
    "welcome": (
        encode_welcome(Welcome(1, (1, 2, 0), 1048576, "srv")),
        Welcome(1, (1, 2, 0), 1048576, "srv"),
    ),
    "request-msgpack": (encode_request(1, "add", [2, 3]), Request(1, "add", [2, 3], {}, 1)),
    "request-kwargs": (
        encode_request(2, "kw", [4], {"scale": 3}),
        Request(2, "kw", [4], {"scale": 3}, 1),
    ),
    "request-json": (
        encode_request(3, "add", [2, 3], None, JSON),
        Request(3, "add", [2, 3], {}, 2),
    ),
    "request-raw": (
        encode_request(4, "blob", [b"\x00\xff"], None, RAW),
        Request(4, "blob", (b"\x00\xff",), {}, 0),
    ),
    "response-msgpack": (encode_response(1, 5), Response(1, 5, 1)),
    "response-json": (encode_response(3, {"sum": 5}, JSON), Response(3, {"sum": 5}, 2)),
    "error": (
        encode_error(9, 2000, "UNKNOWN_METHOD", "no method 'nope'"),
        Error(9, 2000, "UNKNOWN_METHOD", "no method 'nope'"),
    ),
    "ping": (encode_ping(7, b"hi"), Ping(7, b"hi")),
    "pong": (encode_pong(7, b"hi"), Pong(7, b"hi")),
    "close": (encode_close(1001, "bye"), Close(1001, "bye")),
    "sub": (encode_sub(7, "sensors.>", {"qos": 1}), Sub(7, "sensors.>", {"qos": 1})),
    "unsub": (encode_unsub(7), Unsub(7)),
    "pub": (
        encode_pub("a.b", bytes.fromhex("cb4035800000000000"), 9, 1, retain=True),
        Pub(9, "a.b", bytes.fromhex("cb4035800000000000"), 1, True),
    ),
    "msg": (encode_msg(3, 7, b"a.b", b"\x15"), Msg(3, 7, "a.b", b"\x15", 1, False, False)),
    "ack": (encode_ack(3), Ack(3)),
    "demo-set": (encode_request(1, "set", ["color", "blue"]), Request(1, "set", ["color", "blue"])),
    "demo-set-answer": (encode_response(1, True), Response(1, True, 1)),
    "demo-sleep-kwargs": (
        encode_request(2, "sleep", [], {"seconds": 61}),
        Request(2, "sleep", [], {"seconds": 61}, 1),
    ),
    "demo-sleep-error": (
        encode_error(2, 2002, "ServiceError", "seconds must be a number between 0 and 60"),
        Error(2, 2002, "ServiceError", "seconds must be a number between 0 and 60"),
    ),
}


def test_every_vector_is_documented_and_every_documented_vector_is_tested() -> None:
    assert sorted(doc_vectors()) == sorted([*EXPECTED, "sealed-request", "sealed-refusal"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_vector(name: str) -> None:
    wire = doc_vectors()[name]
    encoded, message = EXPECTED[name]
    assert encoded.hex(" ") == wire.hex(" ")  # our encoder produces the documented bytes
    (frame,) = FrameDecoder().feed(wire)  # and the documented bytes decode to the message
    assert decode_message(frame, REGISTRY) == message
    datagram = parse_datagram(wire, 1 << 20)  # the same bytes as a datagram
    assert decode_message(datagram, REGISTRY) == message


def test_every_message_type_has_a_vector() -> None:
    documented = {doc_vectors()[n][3] for n in EXPECTED}
    assert documented == set(REGISTRY.specs)


def test_sealed_datagram_vector() -> None:
    """§6.1: the documented sealed REQUEST is what seal() produces for secret "k", the
    documented epoch and time, and opens back to the request-msgpack frame."""
    from sockstack.protocol.auth import DatagramAuth

    vectors = doc_vectors()
    sealed = vectors["sealed-request"]
    auth = DatagramAuth(b"k", epoch=bytes.fromhex("3c91e70a5d28b4f6"))
    assert auth.seal(vectors["request-msgpack"], 1_700_000_000.0).hex(" ") == sealed.hex(" ")
    assert auth.open(sealed, 1_700_000_010.0) == vectors["request-msgpack"]


def test_sealed_refusal_vector() -> None:
    """§6.1: a server with another epoch refuses the documented sealed REQUEST with exactly the
    documented sealed ERROR (its epoch, the refused datagram's time), which a client opens."""
    import pytest

    from sockstack.protocol.auth import NO_EPOCH, AuthFailure, DatagramAuth, refusal_of

    vectors = doc_vectors()
    restarted = DatagramAuth(b"k", epoch=bytes.fromhex("a71462c90e8b3fd5"))
    with pytest.raises(AuthFailure) as info:
        restarted.open(vectors["sealed-request"], 1_700_000_010.0)
    assert info.value.answer is not None
    assert info.value.answer.hex(" ") == vectors["sealed-refusal"].hex(" ")
    client = DatagramAuth(b"k", epoch=NO_EPOCH)
    frame = client.open(vectors["sealed-refusal"], 1_700_000_010.0, track=False)
    assert decode_message(parse_datagram(frame, 1 << 20), REGISTRY) == Error(1, 2009, "", "")
    assert refusal_of(vectors["sealed-refusal"], frame) == (
        bytes.fromhex("a71462c90e8b3fd5"),
        1_700_000_000_000,
    )
