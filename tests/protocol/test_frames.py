"""Framing: round trips, split-read invariance, limits checked on the header."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockstack.errors import ErrorCode, FrameTooLarge, RemoteProtocolError
from sockstack.protocol.frames import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    Frame,
    FrameDecoder,
    encode_frame,
    parse_datagram,
)

frames = st.builds(
    Frame,
    type=st.integers(0, 255),
    request_id=st.integers(0, 2**32 - 1),
    flags=st.integers(0, 255),
    codec=st.integers(0, 255),
    meta=st.binary(max_size=64),
    body=st.binary(max_size=512),
)


@given(frames)
def test_round_trip(frame: Frame) -> None:
    data = frame.serialize()
    assert len(data) == HEADER_SIZE + len(frame.meta) + len(frame.body)
    assert FrameDecoder().feed(data) == [frame]
    assert parse_datagram(data, 1 << 20) == frame


@given(st.lists(frames, max_size=8), st.randoms(use_true_random=False))
def test_split_read_invariance(items: list[Frame], rnd: random.Random) -> None:
    stream = b"".join(f.serialize() for f in items)
    whole = FrameDecoder().feed(stream)
    assert whole == items
    bytewise: list[Frame] = []
    dec = FrameDecoder()
    for i in range(len(stream)):
        bytewise += dec.feed(stream[i : i + 1])
    assert bytewise == items
    assert dec.buffered == 0
    chunks: list[Frame] = []
    dec = FrameDecoder()
    pos = 0
    while pos < len(stream):
        step = rnd.randint(1, 40)
        chunks += dec.feed(stream[pos : pos + step])
        pos += step
    assert chunks == items


def test_empty_and_exactly_max_payload() -> None:
    limit = 1000
    empty = Frame(3, 1)
    exact = Frame(3, 2, meta=b"m" * 10, body=b"b" * (limit - 10))
    dec = FrameDecoder(max_frame=limit)
    assert dec.feed(empty.serialize() + exact.serialize()) == [empty, exact]


@pytest.mark.parametrize("declared", [1001, 2**32 - 1])
def test_oversized_length_rejected_from_header(declared: int) -> None:
    # Only the 16-byte header is fed: the limit must trip before any payload is buffered.
    header = HEADER.pack(MAGIC, 1, 3, 0, 1, 0, 7, declared)
    dec = FrameDecoder(max_frame=1000)
    with pytest.raises(FrameTooLarge) as info:
        dec.feed(header)
    assert info.value.size == declared and info.value.limit == 1000
    assert str(declared) in str(info.value) and "1000" in str(info.value)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    assert dec.buffered == 0
    with pytest.raises(FrameTooLarge):  # the stream stays failed
        dec.feed(b"")


def test_oversized_meta_rejected() -> None:
    header = HEADER.pack(MAGIC, 1, 3, 0, 1, 5000, 7, 0)
    with pytest.raises(FrameTooLarge):
        FrameDecoder(max_meta=4096).feed(header)


def test_bad_magic_and_version() -> None:
    with pytest.raises(RemoteProtocolError, match="bad magic") as info:
        FrameDecoder().feed(b"GET / HTTP/1.1\r\n\r\n")
    assert info.value.code == ErrorCode.PROTOCOL_ERROR
    with pytest.raises(RemoteProtocolError) as info:
        FrameDecoder().feed(encode_frame(3, 1, b"", b"", version=9))
    assert info.value.code == ErrorCode.UNSUPPORTED_VERSION


def test_datagram_must_match_header() -> None:
    data = encode_frame(3, 1, b"m", b"body")
    with pytest.raises(RemoteProtocolError, match="does not match"):
        parse_datagram(data + b"x", 1000)
    with pytest.raises(RemoteProtocolError, match="does not match"):
        parse_datagram(data[:-1], 1000)
    with pytest.raises(RemoteProtocolError, match="shorter than the 16-byte header"):
        parse_datagram(data[:5], 1000)
    with pytest.raises(FrameTooLarge):
        parse_datagram(data, 4)


@settings(max_examples=2000)
@given(st.binary(max_size=200))
def test_garbage_only_yields_frames_or_protocol_errors(data: bytes) -> None:
    dec = FrameDecoder(max_frame=128)
    try:
        out = dec.feed(data)
    except RemoteProtocolError:
        return
    assert all(isinstance(f, Frame) for f in out)
    assert dec.buffered <= HEADER_SIZE + 128


@pytest.mark.parametrize("seed", range(20))
def test_large_frames_gathered_across_reads(seed: int) -> None:
    """Frames above 64 KiB are collected as chunks and joined once; any split still works."""
    rnd = random.Random(seed)
    size = rnd.randint(64 * 1024 - 100, 300 * 1024)
    meta = bytes(rnd.randrange(256) for _ in range(rnd.randint(0, 300)))
    big = Frame(3, 1, meta=meta, body=(bytes(range(256)) * (size // 256 + 1))[:size])
    small = Frame(4, 2, body=b"after")
    stream = big.serialize() + small.serialize() + big.serialize()
    dec = FrameDecoder(max_frame=1 << 20)
    out: list[Frame] = []
    pos = 0
    while pos < len(stream):
        step = rnd.choice((rnd.randint(1, 40), rnd.randint(1, 70_000)))
        out += dec.feed(stream[pos : pos + step])
        assert dec.buffered <= HEADER_SIZE + (1 << 20)
        pos += step
    assert out == [big, small, big]
    assert dec.buffered == 0


def test_large_frame_followed_by_garbage_in_the_same_read() -> None:
    """The frame completed before broken framing is delivered; the error comes on the next call."""
    big = Frame(3, 1, body=b"x" * 100_000)
    data = big.serialize()
    dec = FrameDecoder(max_frame=1 << 20)
    assert dec.feed(data[:1000]) == []
    assert dec.feed(data[1000:] + b"GARBAGE-GARBAGE-GARBAGE") == [big]
    assert dec.error is not None
    with pytest.raises(RemoteProtocolError):
        dec.feed(b"more")


class _FakeMallopt:
    """glibc's mallopt as ctypes shows it: records its calls, answers ``result``."""

    def __init__(self, result: int) -> None:
        self.calls: list[tuple[int, int]] = []
        self.result = result
        self.argtypes: list[object] = []

    def __call__(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


class _FakeLibc:
    def __init__(self, result: int) -> None:
        self.mallopt = _FakeMallopt(result)
        self.calls = self.mallopt.calls


def test_malloc_tuning_sets_both_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes
    import ctypes.util

    from sockstack.transport import memory

    libc = _FakeLibc(1)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libc.so.6")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    assert memory.tune_malloc() is True
    # M_MMAP_THRESHOLD (-3) and M_TRIM_THRESHOLD (-1), with the documented defaults
    assert libc.calls == [(-3, 16 << 20), (-1, 64 << 20)]
    assert libc.mallopt.argtypes == [ctypes.c_int, ctypes.c_int]  # ints, not Python objects
    libc.calls.clear()
    assert memory.tune_malloc(1 << 20, 2 << 20) is True
    assert libc.calls == [(-3, 1 << 20), (-1, 2 << 20)]


@pytest.mark.parametrize("failure", ["refused", "no-libc", "not-loadable", "no-mallopt"])
def test_malloc_tuning_reports_when_it_cannot(
    monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    import ctypes
    import ctypes.util

    from sockstack.transport import memory

    libc = _FakeLibc(0)  # glibc's mallopt returns 0 when it refuses a value

    def load(name: str) -> object:
        if failure == "not-loadable":
            raise OSError("cannot load")
        if failure == "no-mallopt":
            return object()
        return libc

    monkeypatch.setattr(
        ctypes.util, "find_library", lambda name: None if failure == "no-libc" else "libc.so.6"
    )
    monkeypatch.setattr(ctypes, "CDLL", load)
    assert memory.tune_malloc() is False
    assert libc.calls == ([(-3, 16 << 20)] if failure == "refused" else [])


def test_malloc_tuning_applies_on_glibc() -> None:
    import platform

    from sockstack.transport.memory import tune_malloc

    # glibc accepts both thresholds; elsewhere the tuning is a no-op that says so
    assert tune_malloc() is (platform.libc_ver()[0] == "glibc")
