"""Presentation layer: every codec round-trips the values it claims and refuses the rest."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockstack.errors import CodecError
from sockstack.protocol.codecs import (
    BIG_BYTES,
    JSON,
    MAX_CONTAINER,
    MSGPACK,
    RAW,
    get_codec,
    msgpack_bin_header,
    msgpack_parts,
)

# integers of any size up to the wire's 4,096 bits (msgpack: ext type 1 beyond 64 bits, §3.1)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**4095), 2**4095 - 1)
    | st.integers(-(2**70), 2**70)
    | st.text(max_size=20)
)
floats = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    scalars | floats,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
msgpack_values = st.recursive(
    scalars | floats | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(0, 100), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(msgpack_values)
def test_msgpack_round_trip(value: object) -> None:
    assert MSGPACK.decode(MSGPACK.encode(value)) == value


@given(json_values)
def test_json_round_trip(value: object) -> None:
    out = JSON.decode(JSON.encode(value))
    assert out == value or (isinstance(value, float) and math.isclose(out, value))


@given(st.binary(max_size=100))
def test_raw_round_trip(value: bytes) -> None:
    assert RAW.decode(RAW.encode(value)) == value


def test_refusals_are_codec_errors() -> None:
    with pytest.raises(CodecError):
        MSGPACK.encode(object())
    with pytest.raises(CodecError, match="outside the wire's range"):
        MSGPACK.encode(2**4095)  # integers beyond 64 bits cross within 512 bytes (§3.1)
    with pytest.raises(CodecError):
        JSON.encode(object())  # bytes are base64 text in JSON now (§3.1)
    with pytest.raises(CodecError):
        JSON.encode(float("nan"))
    with pytest.raises(CodecError):
        RAW.encode("text")
    with pytest.raises(CodecError):
        MSGPACK.decode(b"\xc1")  # reserved byte: never valid msgpack
    with pytest.raises(CodecError):
        MSGPACK.decode(b"\x92\x01")  # truncated array
    with pytest.raises(CodecError):
        JSON.decode(b"\xff{")
    with pytest.raises(CodecError, match="unknown codec"):
        get_codec("pickle")


def test_codec_lookup_by_name_and_id() -> None:
    assert get_codec("msgpack") is MSGPACK and get_codec(1) is MSGPACK
    assert get_codec("json") is JSON and get_codec(2) is JSON
    assert get_codec("raw") is RAW and get_codec(0) is RAW


_small = st.one_of(
    st.none(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=20), st.binary(max_size=50)
)


@settings(max_examples=60, deadline=None)
@given(
    items=st.lists(
        st.one_of(_small, st.integers(BIG_BYTES + 1, BIG_BYTES + 3000).map(lambda n: b"b" * n)),
        max_size=20,
    ),
    pad=st.integers(0, 70_000),
)
def test_msgpack_parts_join_to_the_plain_encoding(items: list[object], pad: int) -> None:
    """Large bytes go out by reference; the pieces are byte-identical to the plain encoding."""
    items = items + [None] * pad if pad > 65_530 else items  # array headers of every width
    parts = msgpack_parts(items, True)
    if not any(type(x) is bytes and len(x) > BIG_BYTES for x in items):
        assert parts is None
        return
    assert parts is not None
    assert b"".join(parts) == MSGPACK.encode(items)
    if len(items) <= MAX_CONTAINER:
        assert MSGPACK.decode(b"".join(parts)) == items
    else:  # an array that long is refused from its header (issue 10 item 5)
        with pytest.raises(CodecError, match="max_array_len"):
            MSGPACK.decode(b"".join(parts))


def test_containers_above_the_element_bound_are_refused_from_their_header() -> None:
    ok = {f"k{i}": i for i in range(MAX_CONTAINER)}
    assert MSGPACK.decode(MSGPACK.encode(ok)) == ok
    for value in ({**ok, "one more": 0}, [0] * (MAX_CONTAINER + 1), [[0] * (MAX_CONTAINER + 1)]):
        with pytest.raises(CodecError, match="exceeds max_"):
            MSGPACK.decode(MSGPACK.encode(value))


@pytest.mark.parametrize("n", [0, 255, 256, 65_535, 65_536, BIG_BYTES + 1, 1 << 20])
def test_msgpack_bin_header_matches_msgpack(n: int) -> None:
    value = b"v" * n
    assert msgpack_bin_header(n) + value == MSGPACK.encode(value)
    assert msgpack_parts(value, False) == (
        [msgpack_bin_header(n), value] if n > BIG_BYTES else None
    )


def test_msgpack_extension_types_are_refused() -> None:
    import msgpack

    with pytest.raises(CodecError, match="extension type 5"):
        MSGPACK.decode(msgpack.packb([1, msgpack.ExtType(5, b"obj")]))


def test_extension_types_on_the_wire_get_decode_error() -> None:
    """Every decoding path (batch, single frame, general) refuses them the same way."""
    import msgpack

    from sockstack.protocol.connection import Connection
    from sockstack.protocol.frames import MessageType, encode_frame
    from sockstack.protocol.messages import Error, Role

    body = msgpack.packb([msgpack.ExtType(5, b"obj")])
    frame = encode_frame(MessageType.REQUEST, 9, b"m", body, 0, 1)
    for feed in ("receive_data", "receive_single"):
        client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
        if feed == "receive_single":
            assert server.receive_single(frame) is None  # declined: the general path reports
        server.receive_data(frame)
        (err,) = client.receive_data(server.data_to_send())
        assert isinstance(err, Error) and err.code == 2003, err  # DECODE_ERROR


def test_json_refuses_what_json_cannot_carry_and_sends_lone_surrogates_escaped() -> None:
    """RFC 8259 has no NaN or Infinity; a number beyond a float's range would decode as inf,
    which no JSON answer can carry: all three are a CodecError (DECODE_ERROR), not a value
    that fails later as the server's error. A lone surrogate escape is valid JSON text: it
    goes back as the escape it came as."""
    from sockstack.protocol.codecs import JSON as J

    for text in (b"NaN", b"[Infinity]", b'{"a": -Infinity}', b"1e999"):
        with pytest.raises(CodecError):
            J.decode(text)
    assert J.decode(b"1e300") == 1e300
    value = J.decode(b'"a\\ud800"')
    assert J.encode(value) == b'"a\\ud800"'
    assert J.encode("é") == '"é"'.encode()  # (not escaped when it need not be)
