"""Remote objects' wire layer (docs/PROTOCOL.md §4.5), sans-I/O: every message and target kind
and reference form round trips; bad input gets the code §4.5 states; decoders raise nothing but
RemoteProtocolError (CodecError for a reference payload or body on its own) whatever the bytes;
and two real session cores carry the types with their role rules."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockstack.errors import CodecError, ErrorCode, LocalProtocolError, RemoteProtocolError
from sockstack.objects.messages import (
    FLAG_DEADLINE,
    FLAG_END,
    FLAG_FAILED,
    FLAG_KEEP,
    FLAG_KWARGS,
    FLAG_METADATA,
    FLAG_ONEWAY,
    MAX_RELEASE_ENTRIES,
    OBJECTS_MESSAGES,
    Abort,
    AnswerTarget,
    Call,
    NameTarget,
    ObjectsType,
    ObjectTarget,
    Release,
    Renew,
    Return,
    Target,
    decode_response_refs,
    decode_target,
    encode_abort,
    encode_call,
    encode_release,
    encode_renew,
    encode_response_with_refs,
    encode_return,
    encode_return_error,
    encode_target,
)
from sockstack.objects.messages import _fast_call as fast_call
from sockstack.objects.refs import (
    EXT_REF,
    FORM_HOME,
    FORM_PROMISE,
    FORM_SENDER,
    FORM_THIRD,
    MAX_REF_PAYLOAD,
    Ref,
    decode_ref,
    encode_ref,
    pack,
    unpack,
)
from sockstack.protocol.codecs import JSON, MSGPACK
from sockstack.protocol.connection import Connection, ConnectionTerminated, ProtocolViolation
from sockstack.protocol.frames import Frame, FrameDecoder, MessageType, encode_frame, parse_datagram
from sockstack.protocol.messages import (
    CORE_MESSAGES,
    Error,
    Response,
    Role,
    decode_message,
    encode_request,
)
from sockstack.protocol.registry import Registry
from sockstack.pubsub.messages import PUBSUB_MESSAGES
from tests.conftest import timeout

REGISTRY = Registry([CORE_MESSAGES, PUBSUB_MESSAGES, OBJECTS_MESSAGES])
ID_A = bytes.fromhex("5e0f3c2a9b8d7e6f1029384756aabbcc")
ID_B = bytes.fromhex("a1b2c3d4e5f60718293a4b5c6d7e8f90")
TOKEN = bytes(range(16))


def frame_of(wire: bytes) -> Frame:
    (frame,) = FrameDecoder().feed(wire)
    assert parse_datagram(wire, 1 << 20) == frame
    return frame


def decode(wire: bytes) -> Any:
    return decode_message(frame_of(wire), REGISTRY)


def refused(wire: bytes) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decode(wire)
    return info.value


def raw_frame(
    type_: int, rid: int, meta: bytes, body: bytes, flags: int = 0, codec: int = 1
) -> bytes:
    return encode_frame(type_, rid, meta, body, flags, codec)


# --------------------------------------------------------------------------- round trips

TARGETS: list[Target] = [
    ObjectTarget(ID_B),
    NameTarget("counter"),
    NameTarget("ü" * 127),  # 254 bytes of UTF-8
    AnswerTarget(8),
    AnswerTarget(0xFFFFFFFF, (0, "items", 65535, "", "k" * 255, 1, 2, 3)),
]


@pytest.mark.parametrize("target", TARGETS, ids=repr)
def test_every_target_kind_round_trips_and_is_self_delimiting(target: Target) -> None:
    data = encode_target(target)
    assert decode_target(data) == (target, len(data))
    assert decode_target(b"xy" + data + b"\x00tail", 2) == (target, 2 + len(data))


REFS = [
    Ref(FORM_SENDER, ID_A, iface="Counter"),
    Ref(FORM_HOME, ID_B),
    Ref(FORM_HOME, name="counter"),
    Ref(FORM_PROMISE, question=8),
    Ref(FORM_PROMISE, question=0xFFFFFFFF, path=(0, "k" * 255, 65535, "", 1, 2, 3, 4)),
    Ref(FORM_THIRD, iface="Counter", url="tcp://127.0.0.1:5055", token=TOKEN),
]


@pytest.mark.parametrize("ref", REFS, ids=repr)
def test_every_reference_form_round_trips(ref: Ref) -> None:
    payload = encode_ref(ref)
    assert msgpack.unpackb(payload)[0] == ref.form  # one array, its form first
    assert decode_ref(payload) == ref
    value, seen = unpack(pack({"r": [ref]}, None))
    assert (value, seen) == ({"r": [ref]}, True)


def test_the_reference_payloads_are_the_documented_arrays() -> None:
    assert msgpack.unpackb(encode_ref(REFS[0])) == [1, ID_A, "Counter"]
    assert msgpack.unpackb(encode_ref(REFS[1])) == [2, ID_B]
    assert msgpack.unpackb(encode_ref(REFS[2])) == [2, "counter"]
    assert msgpack.unpackb(encode_ref(REFS[3])) == [3, 8, []]
    assert msgpack.unpackb(encode_ref(REFS[5])) == [4, "tcp://127.0.0.1:5055", TOKEN, "Counter"]


@pytest.mark.parametrize("target", TARGETS, ids=repr)
def test_call_round_trips_with_every_option(target: Target) -> None:
    wire = encode_call(
        12,
        target,
        "incr",
        [1, Ref(FORM_HOME, ID_A)],
        {"by": Ref(FORM_PROMISE, question=3, path=("x",))},
        budget_ms=1500,
        metadata={"trace-id": "abc", "bin": b"\x00"},
        keep=True,
    )
    frame = frame_of(wire)
    assert frame.flags == FLAG_KWARGS | FLAG_DEADLINE | FLAG_METADATA | FLAG_KEEP
    call = decode(wire)
    assert call == Call(
        12,
        target,
        "incr",
        [1, Ref(FORM_HOME, ID_A)],
        {"by": Ref(FORM_PROMISE, question=3, path=("x",))},
        1,
        1500,
        {"trace-id": "abc", "bin": b"\x00"},
        False,
        True,
        True,
    )
    assert call.size == len(frame.meta) + len(frame.body)


def test_call_without_references_says_so_and_oneway_has_id_0() -> None:
    call = decode(encode_call(0, NameTarget("log"), "write", ["x"], oneway=True))
    assert call == Call(0, NameTarget("log"), "write", ["x"], {}, oneway=True)
    assert call.has_refs is False and call.budget_ms is None and call.metadata is None


def test_call_packs_exposed_objects_through_to_ref_only() -> None:
    class Exposed:
        pass

    obj = Exposed()
    asked: list[object] = []

    def to_ref(value: object) -> Ref | None:
        asked.append(value)
        return Ref(FORM_SENDER, ID_A, iface="Exposed") if value is obj else None

    when = datetime.datetime(2026, 11, 30, 12, 30, tzinfo=datetime.UTC)
    wire = encode_call(3, ObjectTarget(ID_B), "f", [obj, 2**64, when, "s", [obj]], to_ref=to_ref)
    call = decode(wire)
    ref = Ref(FORM_SENDER, ID_A, iface="Exposed")
    assert call.args == [ref, 2**64, "2026-11-30T12:30:00Z", "s", [ref]]
    assert call.has_refs
    assert asked == [obj, when, obj]  # only values msgpack cannot pack itself


def test_return_round_trips_ok_and_failed() -> None:
    ok = decode(encode_return(5, {"r": Ref(FORM_HOME, ID_B)}))
    assert ok == Return(5, True, {"r": Ref(FORM_HOME, ID_B)}, has_refs=True)
    plain = decode(encode_return(6, [1, "x"]))
    assert plain == Return(6, True, [1, "x"])
    wire = encode_return_error(7, ErrorCode.APPLICATION_ERROR, "ValueError", "bad ü")
    frame = frame_of(wire)
    assert (frame.flags, frame.codec, frame.meta) == (FLAG_FAILED, 0, b"ValueError")
    assert decode(wire) == Return(7, False, None, 2002, "ValueError", "bad ü", 0)


def test_release_round_trips_and_empty_release_is_nothing_or_end_alone() -> None:
    wire = encode_release([(ID_A, 1), (ID_B, 0xFFFFFFFF), (ID_A, 2)], [8, 9], end=True)
    assert decode(wire) == Release(((ID_A, 1), (ID_B, 0xFFFFFFFF), (ID_A, 2)), (8, 9), True)
    assert encode_release() == b""
    end = encode_release(end=True)
    assert end == encode_frame(ObjectsType.RELEASE, 0, b"", b"", FLAG_END, 0)
    assert decode(end) == Release((), (), True)
    assert decode(encode_release(finished=[3])) == Release((), (3,), False)


def test_a_release_longer_than_a_frame_allows_is_split_with_end_on_the_last() -> None:
    ids = [i.to_bytes(16, "big") for i in range(12_000)]
    wire = encode_release([(i, 1) for i in ids], range(1, 9_001), end=True)
    frames = FrameDecoder(max_frame=1 << 20).feed(wire)
    assert len(frames) == 3
    msgs = [decode_message(f, REGISTRY) for f in frames]
    assert [len(m.releases) + len(m.finished) for m in msgs] == [10_000, 10_000, 1_000]
    assert [m.end for m in msgs] == [False, False, True]
    assert [oid for m in msgs for oid, _ in m.releases] == ids
    assert [q for m in msgs for q in m.finished] == list(range(1, 9_001))
    small = encode_release([(i, 1) for i in ids[:100]], per_frame=(512 - 8) // 24)
    assert all(len(f.meta) + len(f.body) <= 512 for f in FrameDecoder(max_frame=512).feed(small))


def test_renew_and_abort() -> None:
    assert encode_renew() == bytes.fromhex("534b0123000000000000000000000000")
    assert decode(encode_renew()) == Renew()
    assert decode(encode_abort(44)) == Abort(44)


def test_response_with_references_decodes_only_where_references_are_accepted() -> None:
    """§3.1: ext 2 is DECODE_ERROR to the core's decoder (a session without objects); the
    objects layer's decoder of a RESPONSE reads it as a placeholder."""
    wire = encode_response_with_refs(
        8, [Ref(FORM_SENDER, ID_A, iface="Counter"), 1], to_ref=None, metadata={"k": "v"}
    )
    frame = frame_of(wire)
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(frame, REGISTRY)
    assert info.value.code == ErrorCode.DECODE_ERROR
    assert "extension type 2" in info.value.message
    assert decode_response_refs(frame) == ([Ref(FORM_SENDER, ID_A, iface="Counter"), 1], True)
    assert decode_response_refs(frame.body) == ([Ref(FORM_SENDER, ID_A, iface="Counter"), 1], True)
    plain = frame_of(encode_response_with_refs(9, 1, to_ref=None))
    assert decode_message(plain, REGISTRY) == Response(9, 1, 1)  # no reference: same bytes
    assert decode_response_refs(plain) == (1, False)
    json_frame = frame_of(encode_frame(MessageType.RESPONSE, 9, b"", b'{"a":1}', 0, 2))
    assert decode_response_refs(json_frame) == ({"a": 1}, False)


def test_decode_response_refs_refuses_with_codes() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_response_refs(frame_of(encode_frame(MessageType.RESPONSE, 9, b"", b"\x91", 0, 9)))
    assert info.value.code == ErrorCode.UNSUPPORTED_CODEC
    for bad in (b"\xc1", b"\xd4\x03\x00", b"\xc7\x01\x02\x00", b"\x92\x01"):
        with pytest.raises(RemoteProtocolError) as info:
            decode_response_refs(bad)
        assert info.value.code == ErrorCode.DECODE_ERROR
    with pytest.raises(RemoteProtocolError) as info:
        decode_response_refs(frame_of(encode_request(1, "m", [])))
    assert info.value.code == ErrorCode.DECODE_ERROR


# --------------------------------------------------------------------------- ext 2 elsewhere

REF_EXT = msgpack.packb(msgpack.ExtType(EXT_REF, encode_ref(Ref(FORM_HOME, ID_A))))


def test_ext_2_is_refused_outside_objects_bodies() -> None:
    request = encode_frame(MessageType.REQUEST, 1, b"m", b"\x91" + REF_EXT, 0, 1)
    assert refused(request).code == ErrorCode.DECODE_ERROR
    item = encode_frame(MessageType.ITEM, 1, b"", REF_EXT, 0, 1)
    assert refused(item).code == ErrorCode.DECODE_ERROR
    metadata = b"\x00" + msgpack.packb({"k": msgpack.ExtType(2, b"\x92\x02\xa1x")})
    call = raw_frame(ObjectsType.CALL, 1, encode_target(NameTarget("n")) + b"m" + metadata, b"\x90")
    assert refused(with_flag(call, FLAG_METADATA)).code == ErrorCode.DECODE_ERROR
    release = raw_frame(ObjectsType.RELEASE, 0, b"", b"\x92\x91" + REF_EXT + b"\x90")
    assert refused(release).code == ErrorCode.DECODE_ERROR
    nested = msgpack.packb([2, msgpack.ExtType(2, encode_ref(Ref(FORM_HOME, ID_A)))])
    with pytest.raises(CodecError):
        decode_ref(nested)


def with_flag(wire: bytes, flag: int) -> bytes:
    out = bytearray(wire)
    out[4] |= flag
    return bytes(out)


def test_json_and_raw_calls_are_unsupported_codec() -> None:
    meta = encode_target(NameTarget("counter")) + b"incr"
    for codec, body in ((2, b"[1]"), (0, b"\x01"), (7, b"\x91\x01")):
        err = refused(raw_frame(ObjectsType.CALL, 4, meta, body, codec=codec))
        assert err.code == ErrorCode.UNSUPPORTED_CODEC, codec
    with pytest.raises(LocalProtocolError) as info:
        encode_call(4, NameTarget("counter"), "incr", [1], codec=JSON)
    assert info.value.code == ErrorCode.UNSUPPORTED_CODEC
    with pytest.raises(LocalProtocolError):
        encode_return(4, 1, JSON)


# --------------------------------------------------------------------------- bad targets

BAD_TARGETS = {
    "empty": b"",
    "unknown kind": b"\x07" + ID_A,
    "object id of 15 bytes": b"\x01" + ID_A[:15],
    "name without length": b"\x03",
    "name of 0 bytes": b"\x03\x00",
    "name truncated": b"\x03\x07count",
    "name not UTF-8": b"\x03\x02\xff\xfe",
    "answer truncated": b"\x02\x00\x00\x00",
    "answer without count": b"\x02\x00\x00\x00\x08",
    "answer question 0": b"\x02\x00\x00\x00\x00\x00",
    "path of 9 steps": b"\x02\x00\x00\x00\x08\x09" + b"\x00\x00\x01" * 9,
    "path truncated": b"\x02\x00\x00\x00\x08\x02\x00\x00\x01",
    "index truncated": b"\x02\x00\x00\x00\x08\x01\x00\x00",
    "key truncated": b"\x02\x00\x00\x00\x08\x01\x01\x05ab",
    "key without length": b"\x02\x00\x00\x00\x08\x01\x01",
    "unknown step": b"\x02\x00\x00\x00\x08\x01\x02\x00\x00",
    "key not UTF-8": b"\x02\x00\x00\x00\x08\x01\x01\x01\xff",
}


@pytest.mark.parametrize("name", sorted(BAD_TARGETS))
def test_a_malformed_target_is_bad_target(name: str) -> None:
    meta = BAD_TARGETS[name]
    with pytest.raises(RemoteProtocolError) as info:
        decode_target(meta)
    assert info.value.code == ErrorCode.BAD_TARGET
    assert info.value.message.startswith("CALL target: ")
    # in a CALL, after DEADLINE's 4 bytes come off (so they are never read as the target)
    wire = raw_frame(ObjectsType.CALL, 3, meta + b"\x00\x00\x75\x30", b"\x90", FLAG_DEADLINE)
    assert refused(wire).code == ErrorCode.BAD_TARGET


def test_a_16_byte_id_cut_by_the_deadline_is_bad_target() -> None:
    """The budget is taken off the end first: an OBJECT id whose last bytes would be the
    budget is a truncated target, never an id that borrows them."""
    meta = b"\x01" + ID_A[:12]
    wire = raw_frame(ObjectsType.CALL, 3, meta + b"\x00\x00\x75\x30", b"\x90", FLAG_DEADLINE)
    assert refused(wire).code == ErrorCode.BAD_TARGET


@pytest.mark.parametrize(
    "target",
    [
        ObjectTarget(ID_A[:15]),
        ObjectTarget(ID_A + b"\x00"),
        NameTarget(""),
        NameTarget("x" * 256),
        NameTarget("\udc80"),
        AnswerTarget(0),
        AnswerTarget(2**32),
        AnswerTarget(1, (0,) * 9),
        AnswerTarget(1, (65536,)),
        AnswerTarget(1, (-1,)),
        AnswerTarget(1, (True,)),
        AnswerTarget(1, ("k" * 256,)),
        AnswerTarget(1, (1.5,)),  # type: ignore[arg-type]
    ],
    ids=repr,
)
def test_encoders_refuse_a_bad_target_before_sending(target: Target) -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_call(1, target, "m")
    assert info.value.code == ErrorCode.BAD_TARGET


# --------------------------------------------------------------------------- CALL rules


def test_call_id_rules() -> None:
    meta = encode_target(NameTarget("n")) + b"m"
    no_id = raw_frame(ObjectsType.CALL, 0, meta, b"\x90")
    assert refused(no_id).code == ErrorCode.DECODE_ERROR
    oneway_with_id = raw_frame(ObjectsType.CALL, 5, meta, b"\x90", FLAG_ONEWAY)
    assert refused(oneway_with_id).code == ErrorCode.DECODE_ERROR
    oneway_keep = raw_frame(ObjectsType.CALL, 0, meta, b"\x90", FLAG_ONEWAY | FLAG_KEEP)
    assert refused(oneway_keep).code == ErrorCode.DECODE_ERROR
    for kwargs in ({"request_id": 0}, {"request_id": 2**32}, {"request_id": 5, "oneway": True}):
        with pytest.raises(LocalProtocolError) as info:
            encode_call(target=NameTarget("n"), method="m", **kwargs)  # type: ignore[arg-type]
        assert info.value.code == ErrorCode.DECODE_ERROR
    with pytest.raises(LocalProtocolError):
        encode_call(0, NameTarget("n"), "m", oneway=True, keep=True)


def test_call_meta_and_body_rules() -> None:
    target = encode_target(ObjectTarget(ID_A))
    cases = {
        "deadline without 4 bytes": (target[:3], b"\x90", FLAG_DEADLINE),
        "metadata without 0x00": (target + b"m", b"\x90", FLAG_METADATA),
        "metadata not a map": (target + b"m\x00\x91\x01", b"\x90", FLAG_METADATA),
        "metadata with a bad key": (target + b"m\x00\x81\xa1K\xa1v", b"\x90", FLAG_METADATA),
        "method not UTF-8": (target + b"\xff", b"\x90", 0),
        "body not an array": (target + b"m", b"\x01", 0),
        "body not msgpack": (target + b"m", b"\xc1", 0),
        "body truncated": (target + b"m", b"\x92\x01", 0),
        "kwargs not a pair": (target + b"m", b"\x91\x90", FLAG_KWARGS),
        "kwargs keys not text": (target + b"m", b"\x92\x90\x81\x01\x02", FLAG_KWARGS),
        "ext 3": (target + b"m", b"\x91\xd4\x03\x00", 0),
        "a malformed reference": (target + b"m", b"\x91\xd5\x02\x91\x07", 0),
        "a container above 65,536": (target + b"m", b"\xdd\x00\x01\x00\x01", 0),
    }
    for name, (meta, body, flags) in cases.items():
        err = refused(raw_frame(ObjectsType.CALL, 3, meta, body, flags))
        assert err.code == ErrorCode.DECODE_ERROR, name


def test_call_encoder_refuses_what_the_receiver_would() -> None:
    target = NameTarget("n")
    with pytest.raises(LocalProtocolError):
        encode_call(1, target, "a\x00b")
    with pytest.raises(LocalProtocolError) as info:
        encode_call(1, target, "m" * 4096)
    assert info.value.code == ErrorCode.DECODE_ERROR and "meta limit" in info.value.message
    with pytest.raises(LocalProtocolError):
        encode_call(1, target, "m", metadata={"BAD": "x"})
    with pytest.raises(CodecError):
        encode_call(1, target, "m", [object()])
    with pytest.raises(CodecError):
        encode_call(1, target, "m", [Ref(FORM_SENDER, ID_A)])  # no iface: not a valid ref
    budget = frame_of(encode_call(1, target, "m", budget_ms=2**40)).meta[-4:]
    assert budget == b"\xff\xff\xff\xff"  # clamped to u32, as REQUEST's


def test_unknown_flags_are_ignored() -> None:
    """§2: bits a receiver does not know are ignored (0x10, 0x20, 0x80 on CALL; all but
    FAILED on RETURN; all but END on RELEASE; any on RENEW and ABORT)."""
    call = encode_call(3, AnswerTarget(2, (1, "k")), "m", [1], budget_ms=5)
    assert decode(with_flag(call, 0x10 | 0x20 | 0x80)) == decode(call)
    ret = encode_return(3, "x")
    assert decode(with_flag(ret, 0x01 | 0x04 | 0x80)) == decode(ret)
    rel = encode_release([(ID_A, 1)])
    assert decode(with_flag(rel, 0xFE)) == decode(rel)
    assert decode(with_flag(encode_renew(), 0xFF)) == Renew()
    assert decode(with_flag(encode_abort(4), 0xFF)) == Abort(4)


# --------------------------------------------------------------------------- RETURN rules


def test_return_that_cannot_be_read_fails_its_call_instead_of_being_refused() -> None:
    """§4.5: an ERROR with the RETURN's id would name a call of the client's; the server's
    call fails with the code instead."""
    bad_body = decode(raw_frame(ObjectsType.RETURN, 4, b"", b"\xc1"))
    assert (bad_body.ok, bad_body.code, bad_body.type) == (False, 2003, "DECODE_ERROR")
    json = decode(raw_frame(ObjectsType.RETURN, 4, b"", b"1", codec=2))
    assert (json.ok, json.code, json.type) == (False, 2004, "UNSUPPORTED_CODEC")
    short = decode(raw_frame(ObjectsType.RETURN, 4, b"T", b"\x07", FLAG_FAILED, 0))
    assert (short.ok, short.code) == (False, ErrorCode.DECODE_ERROR)
    ext3 = decode(raw_frame(ObjectsType.RETURN, 4, b"", b"\xd4\x03\x00"))
    assert (ext3.ok, ext3.code) == (False, ErrorCode.DECODE_ERROR)
    no_id = refused(raw_frame(ObjectsType.RETURN, 0, b"", b"\x01"))
    assert no_id.code == ErrorCode.PROTOCOL_ERROR
    with pytest.raises(LocalProtocolError):
        encode_return(0, 1)
    with pytest.raises(LocalProtocolError):
        encode_return_error(0, 2002, "T", "m")


# --------------------------------------------------------------------------- RELEASE rules


def _release_body(releases: list[Any], finished: list[Any]) -> bytes:
    return raw_frame(ObjectsType.RELEASE, 0, b"", msgpack.packb([releases, finished]))


def test_release_bounds_and_shapes() -> None:
    too_many = _release_body([[ID_A, 1]] * 6_000, list(range(1, 4_002)))
    err = refused(too_many)
    assert err.code == ErrorCode.DECODE_ERROR and "10000" in err.message.replace(",", "")
    one_array_too_long = _release_body([], list(range(1, 10_002)))
    assert refused(one_array_too_long).code == ErrorCode.DECODE_ERROR
    at_bound = _release_body([[ID_A, 1]] * 5_000, list(range(1, 5_001)))
    assert len(decode(at_bound).releases) == 5_000
    bad = {
        "not an array": msgpack.packb({"a": 1}),
        "one element": msgpack.packb([[]]),
        "id of 15 bytes": msgpack.packb([[[ID_A[:15], 1]], []]),
        "id as text": msgpack.packb([[["x" * 16, 1]], []]),
        "count 0": msgpack.packb([[[ID_A, 0]], []]),
        "count 2^32": msgpack.packb([[[ID_A, 2**32]], []]),
        "count true": msgpack.packb([[[ID_A, True]], []]),
        "entry of 3": msgpack.packb([[[ID_A, 1, 1]], []]),
        "question 0": msgpack.packb([[], [0]]),
        "question text": msgpack.packb([[], ["8"]]),
        "truncated": msgpack.packb([[[ID_A, 1]], []])[:-3],
    }
    for name, body in bad.items():
        err = refused(raw_frame(ObjectsType.RELEASE, 0, b"", body))
        assert err.code == ErrorCode.DECODE_ERROR, name
    json_body = raw_frame(ObjectsType.RELEASE, 0, b"", b"[[],[8]]", codec=2)
    assert refused(json_body).code == ErrorCode.DECODE_ERROR
    for args in (([(ID_A[:3], 1)],), ([(ID_A, 0)],), ([], [0]), ([], [2**32])):
        with pytest.raises(LocalProtocolError):
            encode_release(*args)
    with pytest.raises(ValueError):
        encode_release([(ID_A, 1)], per_frame=MAX_RELEASE_ENTRIES + 1)


# --------------------------------------------------------------------------- references


BAD_PAYLOADS = {
    "not an array": msgpack.packb({"form": 1}),
    "empty array": msgpack.packb([]),
    "form as text": msgpack.packb(["1", ID_A, "I"]),
    "unknown form": msgpack.packb([5, ID_A]),
    "form 0": msgpack.packb([0]),
    "form 1 id of 15": msgpack.packb([1, ID_A[:15], "I"]),
    "form 1 id of 17": msgpack.packb([1, ID_A + b"x", "I"]),
    "form 1 id as text": msgpack.packb([1, "a" * 16, "I"]),
    "form 1 empty iface": msgpack.packb([1, ID_A, ""]),
    "form 1 iface of 256": msgpack.packb([1, ID_A, "I" * 256]),
    "form 1 extra element": msgpack.packb([1, ID_A, "I", 0]),
    "form 1 missing iface": msgpack.packb([1, ID_A]),
    "form 2 nil": msgpack.packb([2, None]),
    "form 2 empty name": msgpack.packb([2, ""]),
    "form 2 number": msgpack.packb([2, 7]),
    "form 3 question 0": msgpack.packb([3, 0, []]),
    "form 3 question 2^32": msgpack.packb([3, 2**32, []]),
    "form 3 question true": msgpack.packb([3, True, []]),
    "form 3 path of 9": msgpack.packb([3, 1, [0] * 9]),
    "form 3 path a map": msgpack.packb([3, 1, {"a": 1}]),
    "form 3 step 65536": msgpack.packb([3, 1, [65536]]),
    "form 3 step bool": msgpack.packb([3, 1, [False]]),
    "form 3 step float": msgpack.packb([3, 1, [1.0]]),
    "form 3 key of 256": msgpack.packb([3, 1, ["k" * 256]]),
    "form 4 empty url": msgpack.packb([4, "", TOKEN, "I"]),
    "form 4 url of 1025": msgpack.packb([4, "u" * 1025, TOKEN, "I"]),
    "form 4 token of 8": msgpack.packb([4, "tcp://h:1", TOKEN[:8], "I"]),
    "trailing bytes": msgpack.packb([2, ID_A]) + b"\x00",
    "truncated": msgpack.packb([2, ID_A])[:-1],
    "not UTF-8": b"\x92\x02\xa2\xff\xfe",
    "nested ext": msgpack.packb([2, msgpack.ExtType(1, b"\x01")]),
    "too long": b"\x92\x02\xda" + (5000).to_bytes(2, "big") + b"x" * 5000,
}


@pytest.mark.parametrize("name", sorted(BAD_PAYLOADS))
def test_a_malformed_reference_is_codec_error_and_a_call_decode_error(name: str) -> None:
    payload = BAD_PAYLOADS[name]
    with pytest.raises(CodecError) as info:
        decode_ref(payload)
    assert "reference (ext 2)" in str(info.value)
    ext = msgpack.packb(msgpack.ExtType(EXT_REF, payload))
    call = raw_frame(ObjectsType.CALL, 3, encode_target(NameTarget("n")) + b"m", b"\x91" + ext)
    err = refused(call)
    assert err.code == ErrorCode.DECODE_ERROR and "reference (ext 2)" in err.message


def test_reference_payload_bound() -> None:
    assert len(encode_ref(REFS[4])) <= MAX_REF_PAYLOAD  # the largest form 3
    with pytest.raises(CodecError):
        decode_ref(b"\x00" * (MAX_REF_PAYLOAD + 1))


@pytest.mark.parametrize(
    "ref",
    [
        Ref(FORM_SENDER, ID_A),  # no iface
        Ref(FORM_SENDER, None, iface="I"),
        Ref(FORM_HOME),
        Ref(FORM_HOME, ID_A, name="both"),
        Ref(FORM_PROMISE, question=0),
        Ref(FORM_THIRD, iface="I", url="u"),  # no token
        Ref(9),
    ],
    ids=repr,
)
def test_encode_ref_refuses_a_reference_that_breaks_its_form(ref: Ref) -> None:
    with pytest.raises(CodecError):
        encode_ref(ref)


# --------------------------------------------------------------------------- pack / unpack


@dataclasses.dataclass
class Point:
    x: int
    y: int


def test_pack_keeps_the_codecs_typed_values() -> None:
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    value = [Point(1, 2), u, 2**64, -(2**64), {1, 2}, datetime.date(2026, 11, 30), b"\x00"]
    assert pack(value, None) == MSGPACK.encode(value)
    assert pack(value, lambda obj: None) == MSGPACK.encode(value)
    assert unpack(pack(value, None)) == (MSGPACK.decode(MSGPACK.encode(value)), False)


def test_to_ref_wins_over_the_typed_default_and_a_ref_packs_as_itself() -> None:
    ref = Ref(FORM_SENDER, ID_A, iface="Point")
    packed = pack([Point(1, 2), ref], lambda obj: ref if isinstance(obj, Point) else None)
    assert unpack(packed) == ([ref, ref], True)


def test_an_exception_of_to_ref_propagates_and_the_packer_stays_usable() -> None:
    class TableFull(Exception):
        pass

    def full(obj: object) -> Ref | None:
        raise TableFull("exports")

    with pytest.raises(TableFull):
        pack([1, object()], full)
    assert pack([1, "a"], None) == MSGPACK.encode([1, "a"])
    with pytest.raises(CodecError):
        pack([object()], None)
    assert pack({"k": 2}, None) == MSGPACK.encode({"k": 2})


def test_to_ref_that_packs_itself_does_not_corrupt_the_outer_value() -> None:
    ref = Ref(FORM_SENDER, ID_A, iface="Point")

    def to_ref(obj: object) -> Ref | None:
        assert unpack(pack([Point(3, 4), "inner"], lambda o: None)) == (
            [{"x": 3, "y": 4}, "inner"],
            False,
        )
        return ref

    assert unpack(pack(["a", Point(1, 2), "b"], to_ref)) == (["a", ref, "b"], True)


def test_pack_is_thread_safe_with_a_to_ref_per_call() -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(n: int) -> None:
        ref = Ref(FORM_SENDER, n.to_bytes(16, "big"), iface=f"I{n}")
        try:
            start.wait(timeout=10)
            for i in range(2_000):
                value, seen = unpack(pack([i, Point(n, i)], lambda obj: ref))
                assert value == [i, ref] and seen
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_unpack_keeps_the_codecs_ext_rules() -> None:
    assert unpack(MSGPACK.encode(2**70)) == (2**70, False)
    for bad in (b"\xd4\x03\x00", b"\xc7\x00\x01", b"\xdc\xff\xff" + b"\xc0" * 65535 + b"\xc0"):
        with pytest.raises(CodecError):
            unpack(bad)
    big = b"\xdd" + (65_537).to_bytes(4, "big")
    with pytest.raises(CodecError):
        unpack(big)
    value, seen = unpack(memoryview(b"\x92\x01" + REF_EXT))
    assert value == [1, Ref(FORM_HOME, ID_A)] and seen


# --------------------------------------------------------------------------- sessions


def _open_pair() -> tuple[Connection, Connection]:
    registry = Registry([CORE_MESSAGES, OBJECTS_MESSAGES])
    client = Connection(Role.CLIENT, registry=registry)
    server = Connection(Role.SERVER, registry=registry)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    return client, server


def test_two_cores_carry_objects_messages_in_both_directions() -> None:
    client, server = _open_pair()
    client.send_message(encode_call(8, NameTarget("counter"), "child", budget_ms=100, keep=True))
    client.send_message(encode_renew())
    (call, renew) = server.receive_data(client.data_to_send())
    assert call == Call(8, NameTarget("counter"), "child", [], {}, 1, 100, keep=True)
    assert renew == Renew()
    server.send_message(
        encode_response_with_refs(8, Ref(FORM_SENDER, ID_A, iface="C"), to_ref=None)
    )
    server.send_message(encode_call(1, ObjectTarget(ID_B), "ping", ["hi"]))
    server.send_message(encode_abort(1))
    server.send_message(encode_release([(ID_B, 1)]))
    events = client.receive_data(server.data_to_send())
    # the core's own RESPONSE decoder refuses ext 2 (the objects client decodes it itself)
    # (and its client role turns that into a local ERROR for call 8: the objects client must
    # read RESPONSEs to its calls with decode_response_refs, not take this one)
    assert type(events[0]) is ProtocolViolation and events[0].code == ErrorCode.DECODE_ERROR
    assert type(events[1]) is Error and (events[1].request_id, events[1].code) == (8, 2003)
    assert events[2:] == [
        Call(1, ObjectTarget(ID_B), "ping", ["hi"], {}),
        Abort(1),
        Release(((ID_B, 1),)),
    ]
    client.send_message(encode_return(1, "pong"))
    assert server.receive_data(client.data_to_send()) == [Return(1, True, "pong")]


def test_a_malformed_call_is_answered_with_its_code_and_the_session_goes_on() -> None:
    client, server = _open_pair()
    meta = b"\x02\x00\x00\x00\x08\x09" + b"\x00\x00\x01" * 9  # a path of 9 steps
    client.send_message(raw_frame(ObjectsType.CALL, 5, meta + b"m", b"\x90"))
    events = server.receive_data(client.data_to_send())
    assert events == [ProtocolViolation(ErrorCode.BAD_TARGET, events[0].message, 5)]
    answer = client.receive_data(server.data_to_send())
    assert type(answer[0]) is Error and answer[0].request_id == 5
    assert answer[0].code == ErrorCode.BAD_TARGET
    client.send_message(encode_call(6, NameTarget("n"), "m"))
    assert [type(e) for e in server.receive_data(client.data_to_send())] == [Call]


def test_a_bad_return_sends_nothing_back() -> None:
    client, server = _open_pair()
    client.send_message(raw_frame(ObjectsType.RETURN, 9, b"", b"\xc1"))
    (ret,) = server.receive_data(client.data_to_send())
    assert type(ret) is Return and not ret.ok and ret.code == ErrorCode.DECODE_ERROR
    assert server.data_to_send() == b""


@pytest.mark.parametrize(
    ("sender", "wire"),
    [
        (Role.SERVER, encode_return(1, 1)),
        (Role.SERVER, encode_renew()),
        (Role.CLIENT, encode_abort(1)),
    ],
    ids=["RETURN from a server", "RENEW from a server", "ABORT from a client"],
)
def test_role_rules_close_the_session(sender: Role, wire: bytes) -> None:
    client, server = _open_pair()
    src, dst = (client, server) if sender is Role.CLIENT else (server, client)
    src.send_message(wire)
    events = dst.receive_data(src.data_to_send())
    ended = [e for e in events if type(e) is ConnectionTerminated]
    assert ended and ended[0].code == ErrorCode.PROTOCOL_ERROR


def test_the_objects_range_is_its_own() -> None:
    assert (OBJECTS_MESSAGES.first, OBJECTS_MESSAGES.last) == (0x20, 0x2F)
    assert {s.type for s in OBJECTS_MESSAGES.specs} == set(range(0x20, 0x25))
    sent_by = {s.name: {r.value for r in s.sent_by} for s in OBJECTS_MESSAGES.specs}
    assert sent_by == {
        "CALL": {"client", "server"},
        "RETURN": {"client"},
        "RELEASE": {"client", "server"},
        "RENEW": {"client"},
        "ABORT": {"server"},
    }


# --------------------------------------------------------------------------- properties

OBJECT_TYPES = st.sampled_from([0x20, 0x21, 0x22, 0x23, 0x24])


@settings(max_examples=1500, deadline=None)
@given(
    OBJECT_TYPES,
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 3),
    st.binary(max_size=80),
    st.binary(max_size=120),
)
def test_decoders_raise_only_remote_protocol_error(
    type_: int, flags: int, codec: int, rid: int, meta: bytes, body: bytes
) -> None:
    try:
        decode_message(Frame(type_, rid, flags, codec, meta, body), REGISTRY)
    except RemoteProtocolError as exc:
        assert exc.code in ErrorCode.__members__.values()


def _structured_body() -> st.SearchStrategy[bytes]:
    """msgpack-ish bodies: random bytes, and valid arrays with random ext payloads (ext 2 most
    of all), so that the reference decoder is reached often."""
    ext = st.builds(
        lambda code, data: b"\xc8" + len(data).to_bytes(2, "big") + bytes([code & 0xFF]) + data,
        st.sampled_from([1, 2, 2, 2, 3, -1]),
        st.binary(max_size=40)
        | st.builds(
            lambda items: msgpack.packb(items, use_bin_type=True),
            st.lists(
                st.integers(-2, 2**33)
                | st.binary(max_size=18)
                | st.text(max_size=4)
                | st.lists(st.integers(0, 70_000) | st.text(max_size=3), max_size=10),
                max_size=5,
            ),
        ),
    )
    return st.binary(max_size=60) | st.builds(
        lambda parts: bytes([0x90 | len(parts)]) + b"".join(parts), st.lists(ext, max_size=3)
    )


@settings(max_examples=1500, deadline=None)
@given(st.integers(0, 255), st.binary(max_size=40), _structured_body())
def test_call_and_return_with_random_bodies_raise_only_remote_protocol_error(
    flags: int, meta_tail: bytes, body: bytes
) -> None:
    meta = encode_target(NameTarget("n")) + meta_tail
    for type_, rid in ((0x20, 0 if flags & FLAG_ONEWAY else 3), (0x21, 3)):
        try:
            msg = decode_message(Frame(type_, rid, flags, 1, meta, body), REGISTRY)
        except RemoteProtocolError:
            continue
        assert type(msg) in (Call, Return)


@settings(max_examples=1500, deadline=None)
@given(_structured_body())
def test_unpack_and_decode_ref_raise_only_codec_error(data: bytes) -> None:
    try:
        unpack(data)
    except CodecError:
        pass
    try:
        decode_ref(data[3:])
    except CodecError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 8))
def test_decode_target_raises_only_bad_target(meta: bytes, offset: int) -> None:
    try:
        target, end = decode_target(meta, offset)
    except RemoteProtocolError as exc:
        assert exc.code == ErrorCode.BAD_TARGET
    else:
        assert offset < end <= len(meta)
        assert encode_target(target) == meta[offset:end]  # one encoding per target


STEPS = st.integers(0, 65535) | st.text(max_size=20).filter(lambda s: len(s.encode()) <= 255)
PATHS = st.lists(STEPS, max_size=8).map(tuple)
IDS = st.binary(min_size=16, max_size=16)
NAMES = st.text(min_size=1, max_size=60).filter(lambda s: 1 <= len(s.encode()) <= 255)
TARGET_ST = (
    st.builds(ObjectTarget, IDS)
    | st.builds(NameTarget, NAMES)
    | st.builds(AnswerTarget, st.integers(1, 2**32 - 1), PATHS)
)
REF_ST = (
    st.builds(lambda i, n: Ref(FORM_SENDER, i, iface=n), IDS, NAMES)
    | st.builds(lambda i: Ref(FORM_HOME, i), IDS)
    | st.builds(lambda n: Ref(FORM_HOME, name=n), NAMES)
    | st.builds(
        lambda q, p: Ref(FORM_PROMISE, question=q, path=p), st.integers(1, 2**32 - 1), PATHS
    )
    | st.builds(lambda u, t, n: Ref(FORM_THIRD, iface=n, url=u, token=t), NAMES, IDS, NAMES)
)


@settings(max_examples=300, deadline=None)
@given(TARGET_ST, REF_ST, st.text(max_size=30).filter(lambda s: "\x00" not in s))
def test_calls_round_trip(target: Target, ref: Ref, method: str) -> None:
    call = decode(encode_call(7, target, method, [ref, {"k": [ref]}]))
    assert (call.target, call.method, call.args) == (target, method, [ref, {"k": [ref]}])
    assert call.has_refs


def _fast_or_none(wire: bytes) -> Any:
    frame = frame_of(wire)
    meta = 16
    return fast_call(
        wire, meta, meta + len(frame.meta), len(wire), frame.flags, frame.codec, frame.request_id
    )


def _general(wire: bytes) -> Any:
    try:
        return decode(wire)
    except RemoteProtocolError as exc:
        return exc


VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=600, deadline=None)
@given(
    TARGET_ST,
    st.text(max_size=12),
    st.lists(VALUES, max_size=4),
    st.integers(0, 255),
    st.none() | st.integers(0, 2**32 - 1),
    st.integers(0, 3),
)
def test_the_fast_call_decoder_agrees_with_the_general_one(
    target: Target, method: str, args: list[Any], flags: int, budget: int | None, rid: int
) -> None:
    """The fast decoder (whole frames in the receive buffer) gives the general decoder's Call
    (its size included), or None; it never accepts what the general one refuses."""
    meta = encode_target(target) + method.encode("utf-8", "surrogatepass")
    if budget is not None:
        meta += budget.to_bytes(4, "big")
        flags |= FLAG_DEADLINE
    else:
        flags &= ~FLAG_DEADLINE
    wire = raw_frame(ObjectsType.CALL, rid, meta, msgpack.packb(args), flags)
    fast = _fast_or_none(wire)
    general = _general(wire)
    if fast is not None:
        assert fast == general and fast.size == general.size
    if type(target) is not AnswerTarget or not target.path:
        if rid and not flags & ~(FLAG_DEADLINE | FLAG_KEEP) and type(general) is Call:
            assert fast is not None  # the common case does take the fast path


@settings(max_examples=1500, deadline=None)
@given(
    st.integers(0, 255),
    st.integers(0, 3),
    st.integers(0, 2),
    st.binary(max_size=60),
    _structured_body(),
)
def test_the_fast_call_decoder_on_random_bytes_is_none_or_the_general_answer(
    flags: int, codec: int, rid: int, meta: bytes, body: bytes
) -> None:
    wire = raw_frame(ObjectsType.CALL, rid, meta, body, flags, codec)
    fast = _fast_or_none(wire)
    if fast is not None:
        general = _general(wire)
        assert fast == general and fast.size == general.size


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is not installed (it has wheels for Linux only; `make test` installs it there)",
)
def test_fuzz_target_smoke_run(tmp_path: Path) -> None:
    """fuzz/fuzz_objects.py, briefly (5,000 inputs): it runs, and finds nothing."""
    target = Path(__file__).resolve().parents[2] / "fuzz" / "fuzz_objects.py"
    out = subprocess.run(
        [sys.executable, str(target), "-runs=5000", "-max_len=512"],
        cwd=tmp_path,  # crash files, if any, land here
        capture_output=True,
        text=True,
        timeout=timeout(120),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Done 5000 runs" in out.stderr
    assert not list(tmp_path.glob("crash-*"))


_TARGETS = st.one_of(
    st.binary(min_size=16, max_size=16).map(ObjectTarget),
    st.text(min_size=1, max_size=40).filter(lambda t: len(t.encode()) <= 255).map(NameTarget),
    st.integers(1, 2**32 - 1).map(AnswerTarget),
)


@settings(max_examples=500, deadline=None)
@given(
    st.integers(1, 2**32 - 1),
    _TARGETS,
    st.text(min_size=1, max_size=30).filter(lambda m: "\x00" not in m),
    st.lists(st.integers() | st.binary(max_size=70) | st.text(max_size=10), max_size=4),
    st.none() | st.integers(-5, 2**33),
    st.booleans(),
)
def test_the_quick_call_encoder_writes_the_bytes_encode_call_writes(
    rid: int, target: Target, method: str, args: list[Any], budget: int | None, keep: bool
) -> None:
    """The blocking client's common call (call_meta once, then encode_call_meta; a promise's
    call on a question: answer_meta) is the CALL encode_call writes, byte for byte (budgets out
    of range clamped the same way)."""
    from sockstack.objects.messages import answer_meta, call_meta, encode_call_meta

    try:
        args = [a for a in args if not (type(a) is int and not -(2**63) <= a < 2**64)]
        expected = encode_call(rid, target, method, args, budget_ms=budget, keep=keep)
    except LocalProtocolError:
        with pytest.raises(LocalProtocolError):
            call_meta(target, method)
        return
    meta = call_meta(target, method)
    assert encode_call_meta(rid, meta, args, budget, None, keep) == expected
    if type(target) is AnswerTarget:
        assert answer_meta(target.question, method.encode()) == meta
