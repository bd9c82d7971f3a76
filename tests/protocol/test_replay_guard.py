"""Authenticated datagrams (docs/PROTOCOL.md §6.1): the replay guard, with time driven by hand,
and the edges of sealing and opening.

A sealed datagram is fresh while its time is within ``window`` of the receiver's clock, on
either side: the server may first see it up to ``window`` before its sealing time (the sender's
clock runs ahead) and a replay may come up to ``window`` after it. So it stays acceptable for
two windows, and the server must remember its MAC for that long: at every moment it would
still pass the time check, a second copy must be refused as a replay, whatever other traffic
arrived in between.

A guard lives in one process's memory, so each is bound to an epoch: a datagram sealed for one
process is refused by every other (a restarted server, another worker), which remembers nothing
of it. And when a guard must forget a MAC early (it is full), its floor refuses the datagram
instead: nothing it forgot is accepted again, whatever the load and even if the clock steps
back.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockstack.protocol import MessageType, encode_frame
from sockstack.protocol.auth import (
    NO_EPOCH,
    TRAILER_SIZE,
    AuthFailure,
    DatagramAuth,
    unsealed_refusal,
)
from sockstack.protocol.messages import encode_error, encode_ping, encode_request

WINDOW = 30.0
SEALED = 1_000_000.0  # the sender's clock when it sealed the datagram under test


def sealed(auth: DatagramAuth, rid: int, at: float) -> bytes:
    return auth.seal(encode_request(rid, "add", [1, 2]), at)


def steps(start: float, stop: float, step: float = 0.5) -> list[float]:
    """start, start + step, ... up to stop included (exact binary fractions: no rounding)."""
    out = []
    t = start
    while t <= stop:
        out.append(t)
        t += step
    return out


@pytest.mark.parametrize("first_seen", steps(SEALED - WINDOW, SEALED + WINDOW, 2.5))
def test_a_replay_is_refused_whenever_it_would_still_be_fresh(first_seen: float) -> None:
    """First seen at any time in its validity, replayed at every later time of its validity,
    with other sealed traffic at each step (which is when old MACs are forgotten)."""
    auth = DatagramAuth(b"k", window=WINDOW)
    datagram = sealed(auth, 1, SEALED)
    auth.open(datagram, first_seen)
    rid = 100
    for now in steps(first_seen, SEALED + WINDOW):
        rid += 1
        auth.open(sealed(auth, rid, now), now)  # fresh traffic: the guard may forget old MACs
        with pytest.raises(AuthFailure, match="replayed"):
            auth.open(datagram, now)


def test_the_longest_life_at_its_exact_bounds() -> None:
    """Seen exactly one window early, replayed exactly one window late: two windows apart."""
    auth = DatagramAuth(b"k", window=WINDOW)
    datagram = sealed(auth, 1, SEALED)
    auth.open(datagram, SEALED - WINDOW)
    late = SEALED + WINDOW
    auth.open(sealed(auth, 2, late), late)  # traffic at the very end of its life
    with pytest.raises(AuthFailure, match="replayed"):
        auth.open(datagram, late)
    # A moment later it is refused by its age instead, never accepted.
    with pytest.raises(AuthFailure, match="window"):
        auth.open(datagram, late + 0.001)
    with pytest.raises(AuthFailure, match="window"):
        auth.open(datagram, SEALED - WINDOW - 0.001)  # and before its life


def test_a_copy_is_refused_once_the_original_is_accepted_whatever_the_order() -> None:
    """Two copies in flight: whichever arrives first is accepted, the other refused."""
    for skew in (-WINDOW, -1.0, 0.0, 1.0, WINDOW):
        auth = DatagramAuth(b"k", window=WINDOW)
        datagram = sealed(auth, 1, SEALED)
        assert auth.open(datagram, SEALED + skew) == encode_request(1, "add", [1, 2])
        with pytest.raises(AuthFailure, match="replayed"):
            auth.open(datagram, SEALED + skew)


def test_macs_are_forgotten_only_after_two_windows() -> None:
    """Memory is bounded by time too: a MAC leaves once no copy could be fresh any more."""
    auth = DatagramAuth(b"k", window=WINDOW)
    auth.open(sealed(auth, 1, SEALED), SEALED - WINDOW)
    auth.open(sealed(auth, 2, SEALED + WINDOW), SEALED + WINDOW)
    assert len(auth._seen) == 2  # 2 windows after it was seen: still remembered
    later = SEALED + WINDOW + 0.5
    auth.open(sealed(auth, 3, later), later)
    assert len(auth._seen) == 2  # the first is gone, the second and third remain


def test_the_client_side_does_not_track() -> None:
    """Clients open with track=False: a server's duplicate answer is not an attack on them."""
    auth = DatagramAuth(b"k", window=WINDOW)
    datagram = sealed(auth, 1, SEALED)
    for now in (SEALED - WINDOW, SEALED, SEALED + WINDOW):
        auth.open(datagram, now, track=False)
    assert len(auth._seen) == 0
    auth.open(datagram, SEALED)  # so a server-side open still accepts it once
    with pytest.raises(AuthFailure, match="replayed"):
        auth.open(datagram, SEALED)


def test_open_gives_back_the_frame_exactly_with_its_other_flags() -> None:
    """Only FLAG_AUTH is cleared: a sealed KWARGS request keeps its KWARGS flag (and a flag
    bit no message defines stays as sent)."""
    auth = DatagramAuth(b"k", window=WINDOW)
    frame = encode_request(3, "kw", [4], {"scale": 3})
    assert frame[4] == 0x01  # KWARGS
    for flags in (0x01, 0x41, 0xFD):  # every bit but AUTH
        sent = frame[:4] + bytes([flags]) + frame[5:]
        assert auth.open(auth.seal(sent, SEALED), SEALED) == sent


def test_the_smallest_sealed_datagram_opens_and_anything_shorter_is_refused() -> None:
    auth = DatagramAuth(b"k", window=WINDOW)
    frame = encode_ping(1)  # 16 bytes, no meta, no body
    sealed_ping = auth.seal(frame, SEALED)
    assert len(sealed_ping) == 16 + TRAILER_SIZE
    assert auth.open(sealed_ping, SEALED) == frame
    for short in (sealed_ping[:-1], sealed_ping[:16], b"SK"):
        with pytest.raises(AuthFailure, match="not a sealed frame"):
            auth.open(short, SEALED)
    with pytest.raises(AuthFailure, match="not a sealed frame"):
        auth.open(b"XX" + sealed_ping[2:], SEALED)  # not ours at all
    with pytest.raises(AuthFailure, match="FLAG_AUTH clear"):
        auth.open(frame + bytes(TRAILER_SIZE), SEALED)


@pytest.mark.parametrize(
    ("datagram", "accepted"),
    [
        (encode_error(3, 2009), True),  # what servers send: 18 bytes, empty type and message
        (encode_error(3, 2009, "UNAUTHENTICATED", "no"), True),
        (encode_error(3, 2009, "t" * 300, "a longer message"), True),  # meta_len above 255
        (encode_error(3, 2008), False),
        (encode_error(3, 2009 + 256), False),
        (encode_error(3, 2009)[:17], False),  # no whole code
        (b"XX" + encode_error(3, 2009)[2:], False),  # not our magic
        (encode_frame(MessageType.RESPONSE, 3, b"", b"\x07\xd9"), False),  # 2009, not an ERROR
    ],
    ids=[
        "plain",
        "with-text",
        "long-type",
        "other-code",
        "code-high-byte",
        "short",
        "magic",
        "type",
    ],
)
def test_the_one_unsealed_datagram_a_client_accepts(datagram: bytes, accepted: bool) -> None:
    assert unsealed_refusal(datagram) is accepted


def test_a_datagram_accepted_by_one_process_is_refused_by_every_other_at_every_moment() -> None:
    """A restart or another worker: a new guard (new epoch, empty memory) refuses it during
    its whole life, without having seen it."""
    first = DatagramAuth(b"k", window=WINDOW)
    datagram = sealed(first, 1, SEALED)
    first.open(datagram, SEALED)
    for now in steps(SEALED - WINDOW, SEALED + WINDOW, 2.5):
        other = DatagramAuth(b"k", window=WINDOW)  # as after a restart, or in another worker
        with pytest.raises(AuthFailure, match="another server epoch"):
            other.open(datagram, now)
        assert len(other._seen) == 0


def test_a_datagram_sealed_for_no_epoch_runs_nowhere() -> None:
    client = DatagramAuth(b"k", window=WINDOW, epoch=NO_EPOCH)
    datagram = sealed(client, 1, SEALED)
    for _ in range(3):
        with pytest.raises(AuthFailure, match="another server epoch"):
            DatagramAuth(b"k", window=WINDOW).open(datagram, SEALED)


def test_the_floor_holds_when_the_clock_steps_back() -> None:
    """Forgotten because the clock went past its life, then the clock steps back into it: the
    datagram is refused by the floor (the time check alone would accept it)."""
    auth = DatagramAuth(b"k", window=WINDOW)
    datagram = sealed(auth, 1, SEALED)
    auth.open(datagram, SEALED)
    later = SEALED + WINDOW + 1.0
    auth.open(sealed(auth, 2, later), later)  # traffic after its life: its MAC is forgotten
    assert len(auth._seen) == 1 and auth.floor_ms == int(SEALED * 1000)
    with pytest.raises(AuthFailure, match="replay guard has forgotten"):
        auth.open(datagram, SEALED)  # the clock stepped back 31 s


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 6),
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 40), st.integers(-40, 40)), min_size=1, max_size=60
    ),
)
def test_no_datagram_is_ever_accepted_twice(
    max_seen: int, ops: list[tuple[bool, int, int]]
) -> None:
    """Whatever the order of fresh datagrams and replays, the clock (which may step back) and
    a guard far too small for the traffic: each datagram is accepted at most once."""
    auth = DatagramAuth(b"k", window=WINDOW, max_seen=max_seen)
    sent: list[bytes] = []
    accepted: set[bytes] = set()
    for i, (replay, arrival, skew) in enumerate(ops):
        now = SEALED + arrival
        if replay and sent:
            datagram = sent[arrival % len(sent)]
        else:
            datagram = sealed(auth, i + 1, now + skew)
            sent.append(datagram)
        try:
            auth.open(datagram, now)
        except AuthFailure:
            continue
        assert datagram not in accepted
        accepted.add(datagram)
    assert len(auth._seen) <= max_seen


@pytest.mark.parametrize("max_seen", [1000, 100])
def test_fresh_traffic_is_accepted_whether_the_guard_has_room_or_not(max_seen: int) -> None:
    """20 datagrams a second, each sealed when it arrives: 600 are fresh at once. With room
    they are remembered while fresh; without, the earliest sealed are forgotten first, so the
    floor stays behind the clock and every fresh datagram is accepted."""
    auth = DatagramAuth(b"k", window=WINDOW, max_seen=max_seen)
    for i in range(2000):
        now = SEALED + i / 20
        auth.open(sealed(auth, i + 1, now), now)
    assert len(auth._seen) == min(max_seen, 601)
    assert int(SEALED * 1000) < auth.floor_ms < int(now * 1000)
