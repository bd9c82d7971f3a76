"""The sans-I/O authentication pieces: token check, sealing and opening datagrams."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockstack.protocol.auth import (
    FLAG_AUTH,
    TRAILER_SIZE,
    AuthFailure,
    DatagramAuth,
    token_checker,
    token_extension,
    unsealed_refusal,
)
from sockstack.protocol.messages import Hello, encode_error, encode_request, encode_response

FRAME = encode_request(5, "add", [1, 2])


def test_token_checker() -> None:
    check = token_checker(b"s3cret")
    assert check(Hello(extensions=(token_extension(b"s3cret"),)))
    assert not check(Hello())
    assert not check(Hello(extensions=(token_extension(b"s3cre"),)))
    assert not check(Hello(extensions=((2, b"s3cret"),)))  # another extension type


def test_seal_and_open_round_trip() -> None:
    auth = DatagramAuth(b"k")
    sealed = auth.seal(FRAME, 1000.0)
    assert len(sealed) == len(FRAME) + TRAILER_SIZE and sealed[4] & FLAG_AUTH
    assert auth.open(sealed, 1000.0) == FRAME


def test_window_and_replay() -> None:
    auth = DatagramAuth(b"k", window=30.0)
    for skew in (-30.0, 29.9):
        assert auth.open(auth.seal(FRAME, 1000.0 + skew), 1000.0) == FRAME
    for skew in (-30.1, 31.0):
        with pytest.raises(AuthFailure, match="window"):
            auth.open(auth.seal(FRAME, 1000.0 + skew), 1000.0)
    sealed = auth.seal(FRAME, 1000.0)
    auth.open(sealed, 1000.0)
    with pytest.raises(AuthFailure, match="replayed"):
        auth.open(sealed, 1001.0)
    assert auth.open(sealed, 1001.0, track=False) == FRAME  # clients do not track


def test_replay_memory_is_bounded() -> None:
    auth = DatagramAuth(b"k", max_seen=10)
    for i in range(100):
        auth.open(auth.seal(encode_request(i + 1, "m"), 1000.0), 1000.0)
    assert len(auth._seen) == 10


def test_other_secret_and_unsealed_are_refused() -> None:
    with pytest.raises(AuthFailure, match="MAC"):
        DatagramAuth(b"k").open(DatagramAuth(b"other").seal(FRAME, 1.0), 1.0)
    with pytest.raises(AuthFailure, match="FLAG_AUTH"):
        DatagramAuth(b"k").open(FRAME + bytes(TRAILER_SIZE), 1.0)
    with pytest.raises(AuthFailure):
        DatagramAuth(b"k").open(b"junk", 1.0)
    with pytest.raises(ValueError):
        DatagramAuth(b"")


@settings(max_examples=300)
@given(st.data())
def test_any_altered_byte_is_refused(data: st.DataObject) -> None:
    auth = DatagramAuth(b"k")
    sealed = bytearray(auth.seal(FRAME, 50.0))
    i = data.draw(st.integers(0, len(sealed) - 1))
    sealed[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(AuthFailure):
        auth.open(bytes(sealed), 50.0)


def test_unsealed_refusal_is_only_the_unauthenticated_error() -> None:
    assert unsealed_refusal(encode_error(3, 2009))
    assert not unsealed_refusal(encode_error(3, 2000))
    assert not unsealed_refusal(encode_response(3, "x"))
    assert not unsealed_refusal(b"")
