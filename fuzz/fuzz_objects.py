#!/usr/bin/env python3
"""atheris (libFuzzer) target for remote objects' wire layer (docs/PROTOCOL.md §4.5): the
CALL, RETURN and RELEASE decoders (general and fast), the target decoder, the reference (ext 2)
decoder and the reference-aware msgpack body decoder.

Contract checked: bytes from the network make the message decoders raise only
RemoteProtocolError, ``decode_target`` only RemoteProtocolError with code BAD_TARGET, and
``decode_ref``/``unpack`` only CodecError; the fast CALL decoder returns None or exactly the
general decoder's Call; whatever decodes re-encodes to a frame that decodes to the same message.

    .venv/bin/python fuzz/fuzz_objects.py -runs=1000000 -max_len=1024 .fuzz-corpus-objects

A crash prints the input and saves it as crash-<sha1>; add it to tests/objects/test_wire.py as
a regression test, then fix.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from sockstack.errors import CodecError, ErrorCode, RemoteProtocolError
    from sockstack.objects.messages import (
        OBJECTS_MESSAGES,
        Call,
        Release,
        _fast_call,
        decode_target,
        encode_call,
        encode_release,
    )
    from sockstack.objects.refs import decode_ref, unpack
    from sockstack.protocol.frames import HEADER_SIZE, Frame, parse_datagram
    from sockstack.protocol.registry import Registry

REGISTRY = Registry([OBJECTS_MESSAGES])
TYPES = (0x20, 0x21, 0x22, 0x23, 0x24)


def _check_reencoded(msg: object) -> None:
    """What our encoders make of a decoded CALL (its target, method, metadata, budget and flags:
    arguments may hold typed values that change form, a timestamp becoming text) or RELEASE
    decodes to the same."""
    if type(msg) is Call:
        again = REGISTRY.decode(
            parse_datagram(
                encode_call(
                    msg.request_id,
                    msg.target,
                    msg.method,
                    budget_ms=msg.budget_ms,
                    metadata=msg.metadata,
                    oneway=msg.oneway,
                    keep=msg.keep,
                ),
                1 << 20,
            )
        )
        assert type(again) is Call
        assert (again.target, again.method, again.budget_ms, again.metadata) == (
            msg.target,
            msg.method,
            msg.budget_ms,
            msg.metadata,
        )
        assert (again.oneway, again.keep) == (msg.oneway, msg.keep)
    elif type(msg) is Release and (msg.releases or msg.finished):
        wire = encode_release(msg.releases, msg.finished, msg.end)
        assert REGISTRY.decode(parse_datagram(wire, 1 << 20)) == msg


def one_input(data: bytes) -> None:
    if len(data) < 6:
        return
    mode = data[0] % 4
    if mode == 0:  # a frame of one of the five types: meta length from byte 1
        split = data[5] % (len(data) - 5) if len(data) > 6 else 0
        rest = data[6:]
        frame = Frame(
            TYPES[data[1] % 5], data[2] % 4, data[3], data[4] % 4, rest[:split], rest[split:]
        )
        try:
            msg = REGISTRY.decode(frame)
        except RemoteProtocolError:
            msg = None
        wire = frame.serialize()
        fast = (
            _fast_call(
                wire,
                HEADER_SIZE,
                HEADER_SIZE + len(frame.meta),
                len(wire),
                frame.flags,
                frame.codec,
                frame.request_id,
            )
            if frame.type == 0x20
            else None
        )
        if fast is not None:
            assert fast == msg and fast.size == msg.size, (fast, msg)  # type: ignore[union-attr]
        if msg is not None:
            _check_reencoded(msg)
    elif mode == 1:
        try:
            decode_target(data[1:], data[1] % 4)
        except RemoteProtocolError as exc:
            assert exc.code == ErrorCode.BAD_TARGET
    elif mode == 2:
        try:
            decode_ref(data[1:])
        except CodecError:
            pass
    else:
        try:
            unpack(data[1:])
        except CodecError:
            pass


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
