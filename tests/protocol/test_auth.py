"""The sans-I/O authentication pieces: token check, sealing and opening datagrams."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockstack.protocol.auth import (
    FLAG_AUTH,
    NO_EPOCH,
    REFUSAL_SIZE,
    TRAILER_SIZE,
    AuthFailure,
    DatagramAuth,
    refusal_of,
    token_checker,
    token_extension,
    trailer_of,
    unsealed_refusal,
)
from sockstack.protocol.codecs import RAW
from sockstack.protocol.messages import (
    Hello,
    encode_error,
    encode_ping,
    encode_request,
    encode_response,
)

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


def test_replay_memory_is_bounded_and_what_it_forgets_is_still_refused() -> None:
    """At most max_seen MACs; the ones forgotten to make room (the earliest sealed) are
    refused by the floor, never accepted again."""
    auth = DatagramAuth(b"k", max_seen=10)
    sent = [auth.seal(encode_request(i + 1, "m"), 1000.0 + i / 100) for i in range(100)]
    for d in sent:
        auth.open(d, 1001.0)
    assert len(auth._seen) == 10
    assert auth.floor_ms == 1_000_890  # the 90th, the latest forgotten
    for d in sent[:90]:
        with pytest.raises(AuthFailure, match="replay guard has forgotten"):
            auth.open(d, 1001.0)
    for d in sent[90:]:
        with pytest.raises(AuthFailure, match="replayed"):
            auth.open(d, 1001.0)


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


# ---------------------------------------------------------------------------- epochs


def test_every_server_draws_its_own_epoch_and_clients_start_with_none() -> None:
    epochs = {DatagramAuth(b"k").epoch for _ in range(100)}
    assert len(epochs) == 100 and NO_EPOCH not in epochs
    assert all(len(e) == 8 for e in epochs)
    assert DatagramAuth(b"k", epoch=NO_EPOCH).epoch == NO_EPOCH
    with pytest.raises(ValueError):
        DatagramAuth(b"k", epoch=b"short")


def test_the_trailer_names_the_epoch_and_the_time() -> None:
    auth = DatagramAuth(b"k")
    sealed = auth.seal(FRAME, 1000.25)
    assert trailer_of(sealed) == (auth.epoch, 1_000_250)
    assert trailer_of(auth.seal(FRAME, 1000.0, NO_EPOCH)) == (NO_EPOCH, 1_000_000)
    assert auth.seal_ms(FRAME, 1_000_250) == sealed


@pytest.mark.parametrize("epoch", [NO_EPOCH, b"\x01" * 8], ids=["none", "another"])
def test_a_datagram_for_another_epoch_is_refused_with_a_sealed_refusal(epoch: bytes) -> None:
    """It never runs; the answer names the server's epoch and echoes the refused datagram's
    time (so the client knows which datagram it was), and is sealed (a client trusts it)."""
    server = DatagramAuth(b"k")
    client = DatagramAuth(b"k", epoch=epoch)
    sealed = client.seal(FRAME, 1000.123)
    with pytest.raises(AuthFailure, match="another server epoch") as info:
        server.open(sealed, 1000.0)
    answer = info.value.answer
    assert answer is not None and len(answer) == REFUSAL_SIZE <= len(sealed)
    frame = client.open(answer, 1000.0, track=False)
    assert frame == encode_error(5, 2009)  # the request's id, the code alone
    assert refusal_of(answer, frame) == (server.epoch, 1_000_123)
    assert len(server._seen) == 0  # not remembered: it was not accepted
    client.epoch = server.epoch  # what the client learns; sealed again, it is accepted once
    again = client.seal(FRAME, 1000.2)
    assert server.open(again, 1000.0) == FRAME
    with pytest.raises(AuthFailure, match="replayed"):
        server.open(again, 1000.0)


def test_the_sealed_refusal_is_never_longer_than_what_it_answers() -> None:
    server = DatagramAuth(b"k")
    client = DatagramAuth(b"k", epoch=NO_EPOCH)
    raw_empty = encode_request(5, "m", [b""], None, RAW)
    sizes = {}
    for name, frame in (("raw-empty", raw_empty), ("smallest-msgpack", encode_request(5, "m"))):
        sealed = client.seal(frame, 1000.0)
        with pytest.raises(AuthFailure) as info:
            server.open(sealed, 1000.0)
        sizes[name] = (len(sealed), info.value.answer)
    assert sizes["raw-empty"][0] == REFUSAL_SIZE - 1 and sizes["raw-empty"][1] is None
    assert sizes["smallest-msgpack"][0] == REFUSAL_SIZE
    assert sizes["smallest-msgpack"][1] is not None


def test_a_ping_is_accepted_for_any_epoch_once_and_its_pong_names_the_epoch() -> None:
    server = DatagramAuth(b"k")
    client = DatagramAuth(b"k", epoch=NO_EPOCH)
    ping = client.seal(encode_ping(9, b"hi"), 1000.0)
    assert server.open(ping, 1000.0) == encode_ping(9, b"hi")
    with pytest.raises(AuthFailure, match="replayed"):
        server.open(ping, 1000.0)
    pong = server.seal(encode_ping(9, b"hi"), 1000.0)
    assert len(pong) == len(ping) and trailer_of(pong)[0] == server.epoch


def test_clients_open_datagrams_of_any_epoch() -> None:
    client = DatagramAuth(b"k", epoch=NO_EPOCH)
    for epoch in (NO_EPOCH, b"\x02" * 8):
        sealed = DatagramAuth(b"k", epoch=epoch).seal(FRAME, 1000.0)
        assert client.open(sealed, 1000.0, track=False) == FRAME


def test_a_copy_of_an_accepted_datagram_gets_a_sealed_refusal_naming_its_epoch() -> None:
    """A network duplicate (or a replay): the refusal names the epoch the datagram was sealed
    for, which tells its sender the refusal was of a copy, not of its call."""
    server = DatagramAuth(b"k")
    client = DatagramAuth(b"k", epoch=server.epoch)
    sealed = client.seal(FRAME, 1000.5)
    server.open(sealed, 1000.0)
    with pytest.raises(AuthFailure, match="replayed") as info:
        server.open(sealed, 1000.0)
    answer = info.value.answer
    assert answer is not None and len(answer) == REFUSAL_SIZE <= len(sealed)
    frame = client.open(answer, 1000.0, track=False)
    assert refusal_of(answer, frame) == (server.epoch, 1_000_500)
    # No answer for a copy that names no request, or one shorter than the refusal.
    for frame in (encode_request(0, "m", [1]), encode_request(5, "m", [b""], None, RAW)):
        sealed = client.seal(frame, 1000.0)
        server.open(sealed, 1000.0)
        with pytest.raises(AuthFailure, match="replayed") as info:
            server.open(sealed, 1000.0)
        assert info.value.answer is None
