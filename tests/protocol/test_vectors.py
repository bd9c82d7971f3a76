"""The conformance kit, docs/conformance/vectors.json, against docs/PROTOCOL.md and this
implementation: every hex block of PROTOCOL.md (§8, §6.1, the appendices) is a JSON entry with
the same bytes and vice versa; our encoders produce each entry's bytes from its decoded fields;
decoding each entry's bytes (as a stream and as a datagram) gives its header and its fields;
the sealed ones seal, open and refuse exactly as documented.

Adding a vector of a type listed in ``TYPES`` is one hex block in PROTOCOL.md and one JSON entry
(``python -m tests.protocol.test_vectors NAME`` prints the entry this implementation derives
from the block, to check by hand against the spec); a new message type adds one ``TypeCodec``.
The JSON format is described in docs/conformance/README.md."""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from sockstack.edge.messages import EDGE_MESSAGES, Data, Readings, encode_data, encode_readings
from sockstack.errors import ErrorCode, RemoteProtocolError
from sockstack.objects.messages import FLAG_END as FLAG_RELEASE_END
from sockstack.objects.messages import (
    FLAG_FAILED,
    FLAG_KEEP,
    FLAG_ONEWAY,
    OBJECTS_MESSAGES,
    Abort,
    AnswerTarget,
    Call,
    NameTarget,
    ObjectTarget,
    Release,
    Renew,
    Return,
    Target,
    decode_response_refs,
    encode_abort,
    encode_call,
    encode_release,
    encode_renew,
    encode_response_with_refs,
    encode_return,
    encode_return_error,
)
from sockstack.objects.refs import FORM_HOME, FORM_PROMISE, FORM_SENDER, FORM_THIRD, Ref
from sockstack.protocol.auth import (
    FLAG_AUTH,
    KEY_LABEL,
    NO_EPOCH,
    TRAILER_SIZE,
    AuthFailure,
    DatagramAuth,
    refusal_of,
    trailer_of,
)
from sockstack.protocol.codecs import CODECS
from sockstack.protocol.frames import Frame, FrameDecoder, MessageType, parse_datagram
from sockstack.protocol.messages import (
    CORE_MESSAGES,
    FLAG_BATCH,
    FLAG_DEADLINE,
    FLAG_END,
    FLAG_KWARGS,
    FLAG_METADATA,
    FLAG_STREAM,
    FLAG_UPLOAD,
    Cancel,
    Close,
    Credit,
    Error,
    Hello,
    Item,
    Ping,
    Pong,
    Request,
    Response,
    Welcome,
    decode_message,
    encode_cancel,
    encode_close,
    encode_credit,
    encode_error,
    encode_hello,
    encode_item,
    encode_item_end,
    encode_ping,
    encode_pong,
    encode_request,
    encode_response,
    encode_welcome,
    split_meta,
)
from sockstack.protocol.registry import Registry
from sockstack.pubsub.messages import (
    FLAG_REDELIVERED,
    FLAG_RETAIN,
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

REGISTRY = Registry([CORE_MESSAGES, PUBSUB_MESSAGES, OBJECTS_MESSAGES, EDGE_MESSAGES])

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "PROTOCOL.md"
KIT = ROOT / "docs" / "conformance" / "vectors.json"


def doc_vectors() -> dict[str, bytes]:
    """Every ```hex name=NAME block of PROTOCOL.md: its bytes (text after # is commentary)."""
    text = DOC.read_text()
    out: dict[str, bytes] = {}
    for name, block in re.findall(r"```hex name=(\S+)\n(.*?)```", text, flags=re.S):
        assert name not in out, f"two hex blocks named {name}"
        hex_text = " ".join(line.split("#", 1)[0] for line in block.splitlines())
        out[name] = bytes.fromhex(hex_text)
    return out


def doc_sections() -> dict[str, str]:
    """The section each hex block is in: "8", "6.1", "A" (the nearest heading above it)."""
    out: dict[str, str] = {}
    section = ""
    for line in DOC.read_text().splitlines():
        heading = re.match(r"#{2,3} (?:Appendix )?([0-9A-Z][0-9.]*?)\.? ", line)
        if heading:
            section = heading.group(1)
        block = re.match(r"```hex name=(\S+)", line)
        if block:
            out[block.group(1)] = section
    return out


def kit() -> dict[str, dict[str, Any]]:
    data = json.loads(KIT.read_text())
    assert data["format"] == 1 and data["protocol_version"] == 1
    entries: dict[str, dict[str, Any]] = {}
    for entry in data["vectors"]:
        assert entry["name"] not in entries, f"two entries named {entry['name']}"
        entries[entry["name"]] = entry
    return entries


# --------------------------------------------------------------------------- JSON values

# In "fields", a byte string is {"$bin": "<hex>"}, a reference (msgpack ext 2, PROTOCOL.md §4.5)
# {"$ref": {"form": n, ...its elements by name}}; every other value is plain JSON.

_REF_KEYS = {
    FORM_SENDER: ("id", "iface"),
    FORM_HOME: ("id", "name"),
    FORM_PROMISE: ("question", "path"),
    FORM_THIRD: ("url", "token", "iface"),
}


def _ref_of(obj: dict[str, Any]) -> Ref:
    fields = {k: from_json(v) for k, v in obj.items() if k != "form"}
    if "path" in fields:
        fields["path"] = tuple(fields["path"])
    return Ref(obj["form"], **fields)


def _ref_json(ref: Ref) -> dict[str, Any]:
    out: dict[str, Any] = {"form": ref.form}
    for key in _REF_KEYS[ref.form]:
        value = getattr(ref, key)
        if value is not None:
            out[key] = to_json(value)
    return {"$ref": out}


def has_ref(value: Any) -> bool:
    if type(value) is Ref:
        return True
    if isinstance(value, dict):
        return any(has_ref(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(has_ref(v) for v in value)
    return False


def from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        if set(value) == {"$ref"}:
            return _ref_of(value["$ref"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def to_json(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bin": bytes(value).hex()}
    if type(value) is Ref:
        return _ref_json(value)
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def _same(a: Any, b: Any) -> bool:
    """Equal, with the types JSON keeps apart kept apart (1 is not 1.0 nor true)."""
    return json.dumps(to_json(a), sort_keys=True) == json.dumps(to_json(b), sort_keys=True)


# --------------------------------------------------------------------------- per type

CODEC_NAMES = {0: "raw", 1: "msgpack", 2: "json"}
# flag bits by type name; AUTH (0x02) on any sealed datagram
FLAG_NAMES: dict[str, dict[int, str]] = {
    "REQUEST": {
        FLAG_KWARGS: "KWARGS",
        FLAG_DEADLINE: "DEADLINE",
        FLAG_METADATA: "METADATA",
        FLAG_STREAM: "STREAM",
        FLAG_UPLOAD: "UPLOAD",
        FLAG_BATCH: "BATCH",
    },
    "ITEM": {FLAG_END: "END"},
    "RESPONSE": {FLAG_METADATA: "METADATA"},
    "ERROR": {FLAG_METADATA: "METADATA"},
    "PUB": {FLAG_RETAIN: "RETAIN"},
    "CALL": {
        FLAG_KWARGS: "KWARGS",
        FLAG_ONEWAY: "ONEWAY",
        FLAG_DEADLINE: "DEADLINE",
        FLAG_METADATA: "METADATA",
        FLAG_KEEP: "KEEP",
    },
    "RETURN": {FLAG_FAILED: "FAILED"},
    "RELEASE": {FLAG_RELEASE_END: "END"},
    "MSG": {FLAG_RETAIN: "RETAINED", FLAG_REDELIVERED: "REDELIVERED"},
}


def flag_names(type_name: str, flags: int) -> list[str]:
    names = {FLAG_AUTH: "AUTH", **FLAG_NAMES.get(type_name, {})}
    out = [names.get(bit, f"0x{bit:02x}") for bit in (1, 2, 4, 8, 16, 32, 64, 128) if flags & bit]
    return out


def _payload(value: Any, codec: int) -> bytes:
    """A PUB or MSG payload: opaque bytes on the wire, the value encoded with the header's
    codec (raw: the bytes themselves)."""
    return CODECS[codec].encode(value)


def _with_codec(fn: Callable[..., Any], codec: int, *args: Any, **kwargs: Any) -> Any:
    """Call a builder or encoder, passing the header's codec when it takes one (so that a
    type that gains a codec parameter needs no change here)."""
    if "codec" in inspect.signature(fn).parameters:
        kwargs["codec"] = codec
    return fn(*args, **kwargs)


@dataclass(frozen=True)
class TypeCodec:
    """How one message type's fields map to this implementation's message and bytes."""

    build: Callable[[dict[str, Any], dict[str, Any]], Any]  # (header, fields) -> message
    encode: Callable[[Any, dict[str, Any]], bytes]  # (message, header) -> frame bytes
    fields: Callable[[Any, Frame], dict[str, Any]]  # (decoded message, frame) -> fields


def _ext(exts: list[dict[str, Any]]) -> tuple[tuple[int, bytes], ...]:
    return tuple((e["type"], e["value"]) for e in exts)


def _ext_fields(exts: tuple[tuple[int, bytes], ...]) -> list[dict[str, Any]]:
    return [{"type": t, "value": v} for t, v in exts]


def _optional(**fields: Any) -> dict[str, Any]:
    """The fields a flag brings (DEADLINE: ``budget_ms``, METADATA: ``metadata``), present only
    when the flag is set."""
    return {k: v for k, v in fields.items() if v is not None}


def target_json(target: Target) -> dict[str, Any]:
    if type(target) is ObjectTarget:
        return {"kind": "object", "id": to_json(target.id)}
    if type(target) is NameTarget:
        return {"kind": "name", "name": target.name}
    assert type(target) is AnswerTarget
    return {"kind": "answer", "question": target.question, "path": list(target.path)}


def target_of(obj: dict[str, Any]) -> Target:
    if obj["kind"] == "object":
        return ObjectTarget(from_json(obj["id"]))
    if obj["kind"] == "name":
        return NameTarget(obj["name"])
    return AnswerTarget(obj["question"], tuple(obj["path"]))


def _encode_response(m: Response) -> bytes:
    """RESPONSE bytes; one whose result holds a reference is an objects session's (§4.5)."""
    if has_ref(m.result):
        return encode_response_with_refs(m.request_id, m.result, to_ref=None, metadata=m.metadata)
    return encode_response(m.request_id, m.result, CODECS[m.codec], metadata=m.metadata)


def read(frame: Frame, refs: bool = False) -> Any:
    """The message of a frame, as a session decodes it; ``refs``: a RESPONSE on a session that
    attached objects (§4.5), whose body may hold references (ext 2)."""
    if refs and frame.type == MessageType.RESPONSE:
        value, _ = decode_response_refs(frame)
        metadata = split_meta(frame.meta, frame.flags, "RESPONSE")[1] if frame.meta else None
        return Response(frame.request_id, value, frame.codec, metadata)
    return decode_message(frame, REGISTRY)


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"UNKNOWN_{code}"


TYPES: dict[str, TypeCodec] = {
    "HELLO": TypeCodec(
        lambda h, f: Hello(
            f["min_version"], f["max_version"], f["max_frame"], f["agent"], _ext(f["extensions"])
        ),
        lambda m, h: encode_hello(m),
        lambda m, fr: {
            "agent": m.agent,
            "min_version": m.min_version,
            "max_version": m.max_version,
            "max_frame": m.max_frame,
            "extensions": _ext_fields(m.extensions),
        },
    ),
    "WELCOME": TypeCodec(
        lambda h, f: Welcome(
            f["version"], tuple(f["codecs"]), f["max_frame"], f["agent"], _ext(f["extensions"])
        ),
        lambda m, h: encode_welcome(m),
        lambda m, fr: {
            "agent": m.agent,
            "version": m.version,
            "codecs": list(m.codecs),
            "max_frame": m.max_frame,
            "extensions": _ext_fields(m.extensions),
        },
    ),
    "REQUEST": TypeCodec(
        lambda h, f: Request(
            h["request_id"],
            f["method"],
            tuple(f["args"]) if h["codec"] == 0 else f["args"],
            f["kwargs"],
            h["codec"],
            f.get("budget_ms"),
            f.get("metadata"),
            bool(h["flags"] & FLAG_STREAM),
            bool(h["flags"] & FLAG_UPLOAD),
            0,
            bool(h["flags"] & FLAG_BATCH),
        ),
        lambda m, h: encode_request(
            m.request_id,
            m.method,
            list(m.args),
            m.kwargs or None,
            CODECS[m.codec],
            budget_ms=m.budget_ms,
            metadata=m.metadata,
            stream=m.stream,
            upload=m.upload,
            batch=m.batch,
        ),
        lambda m, fr: {
            "method": m.method,
            "args": list(m.args),
            "kwargs": m.kwargs,
            **_optional(budget_ms=m.budget_ms, metadata=m.metadata),
        },
    ),
    "RESPONSE": TypeCodec(
        lambda h, f: Response(h["request_id"], f["result"], h["codec"], f.get("metadata")),
        lambda m, h: _encode_response(m),
        lambda m, fr: {"result": m.result, **_optional(metadata=m.metadata)},
    ),
    "ERROR": TypeCodec(
        lambda h, f: Error(
            h["request_id"], f["code"], f["error_type"], f["message"], f.get("metadata")
        ),
        lambda m, h: encode_error(m.request_id, m.code, m.type, m.message, metadata=m.metadata),
        lambda m, fr: {
            "code": m.code,
            "code_name": _code_name(m.code),
            "error_type": m.type,
            "message": m.message,
            **_optional(metadata=m.metadata),
        },
    ),
    "CANCEL": TypeCodec(
        lambda h, f: Cancel(h["request_id"]),
        lambda m, h: encode_cancel(m.request_id),
        lambda m, fr: {},
    ),
    "ITEM": TypeCodec(
        lambda h, f: Item(
            h["request_id"], f.get("item"), h["codec"], h["body_len"], bool(f.get("end"))
        ),
        lambda m, h: (
            encode_item_end(m.request_id, CODECS[m.codec])
            if m.end
            else encode_item(m.request_id, m.value, CODECS[m.codec])
        ),
        lambda m, fr: {"end": True} if m.end else {"item": m.value},
    ),
    "CREDIT": TypeCodec(
        lambda h, f: Credit(h["request_id"], f["granted"]),
        lambda m, h: encode_credit(m.request_id, m.granted),
        lambda m, fr: {"granted": m.granted},
    ),
    "PING": TypeCodec(
        lambda h, f: Ping(h["request_id"], f["payload"]),
        lambda m, h: encode_ping(m.request_id, m.payload),
        lambda m, fr: {"payload": m.payload},
    ),
    "PONG": TypeCodec(
        lambda h, f: Pong(h["request_id"], f["payload"]),
        lambda m, h: encode_pong(m.request_id, m.payload),
        lambda m, fr: {"payload": m.payload},
    ),
    "CLOSE": TypeCodec(
        lambda h, f: Close(f["code"], f["reason"]),
        lambda m, h: encode_close(m.code, m.reason),
        lambda m, fr: {"code": m.code, "code_name": _code_name(m.code), "reason": m.reason},
    ),
    "SUB": TypeCodec(
        lambda h, f: _with_codec(Sub, h["codec"], f["subscription"], f["pattern"], f["options"]),
        lambda m, h: _with_codec(encode_sub, h["codec"], m.sid, m.pattern, m.options),
        lambda m, fr: {"subscription": m.sid, "pattern": m.pattern, "options": m.options},
    ),
    "UNSUB": TypeCodec(
        lambda h, f: Unsub(f["subscription"]),
        lambda m, h: _with_codec(encode_unsub, h["codec"], m.sid),
        lambda m, fr: {"subscription": m.sid},
    ),
    "PUB": TypeCodec(
        lambda h, f: Pub(
            h["request_id"], f["topic"], _payload(f["payload"], h["codec"]), h["codec"], f["retain"]
        ),
        lambda m, h: encode_pub(m.topic, m.payload, m.request_id, m.codec, m.retain),
        lambda m, fr: {
            "topic": m.topic,
            "payload": CODECS[m.codec].decode(m.payload),
            "qos": 1 if m.request_id else 0,
            "retain": m.retain,
        },
    ),
    "MSG": TypeCodec(
        lambda h, f: Msg(
            f["delivery"],
            f["subscription"],
            f["topic"],
            _payload(f["payload"], h["codec"]),
            h["codec"],
            f["retained"],
            f["redelivered"],
        ),
        lambda m, h: encode_msg(
            m.delivery_id,
            m.sid,
            m.topic.encode(),
            m.payload,
            m.codec,
            (FLAG_RETAIN if m.retained else 0) | (FLAG_REDELIVERED if m.redelivered else 0),
        ),
        lambda m, fr: {
            "delivery": m.delivery_id,
            "subscription": m.sid,
            "topic": m.topic,
            "payload": CODECS[m.codec].decode(m.payload),
            "retained": m.retained,
            "redelivered": m.redelivered,
        },
    ),
    "ACK": TypeCodec(
        lambda h, f: Ack(f["delivery"]),
        lambda m, h: _with_codec(encode_ack, h["codec"], m.delivery_id),
        lambda m, fr: {"delivery": m.delivery_id},
    ),
    "DATA": TypeCodec(
        lambda h, f: Data(
            h["request_id"],
            f["stream"],
            f["epoch"],
            f["seq"],
            f["time"],
            _payload(f["value"], h["codec"]),
            h["codec"],
            f["level"],
        ),
        lambda m, h: encode_data(
            m.request_id,
            m.stream,
            m.value,
            seq=m.seq,
            epoch=m.epoch,
            time=m.time,
            codec=m.codec,
            level=m.level,
        ),
        lambda m, fr: {
            "stream": m.stream,
            "epoch": m.epoch,
            "seq": m.seq,
            "time": m.time,
            "value": CODECS[m.codec].decode(m.value),
            "level": m.level,
        },
    ),
    "READINGS": TypeCodec(
        lambda h, f: Readings(
            h["request_id"],
            [(*r[:4], msgspec.Raw(CODECS[1].encode(r[4]))) for r in f["readings"]],
            f["level"],
            len(CODECS[1].encode(f["readings"])),
        ),
        lambda m, h: encode_readings(
            m.request_id,
            [(r[0], r[1], r[2], r[3], CODECS[1].decode(bytes(r[4]))) for r in m.items],
            level=m.level,
        ),
        lambda m, fr: {
            "readings": [[r[0], r[1], r[2], r[3], CODECS[1].decode(bytes(r[4]))] for r in m.items],
            "level": m.level,
        },
    ),
    "CALL": TypeCodec(
        lambda h, f: Call(
            h["request_id"],
            target_of(f["target"]),
            f["method"],
            f["args"],
            f["kwargs"],
            h["codec"],
            f.get("budget_ms"),
            f.get("metadata"),
            bool(h["flags"] & FLAG_ONEWAY),
            bool(h["flags"] & FLAG_KEEP),
            has_ref(f["args"]) or has_ref(f["kwargs"]),
        ),
        lambda m, h: encode_call(
            m.request_id,
            m.target,
            m.method,
            m.args,
            m.kwargs or None,
            CODECS[m.codec],
            budget_ms=m.budget_ms,
            metadata=m.metadata,
            oneway=m.oneway,
            keep=m.keep,
        ),
        lambda m, fr: {
            "target": target_json(m.target),
            "method": m.method,
            "args": m.args,
            "kwargs": m.kwargs,
            **_optional(budget_ms=m.budget_ms, metadata=m.metadata),
        },
    ),
    "RETURN": TypeCodec(
        lambda h, f: (
            Return(h["request_id"], False, None, f["code"], f["error_type"], f["message"], 0)
            if h["flags"] & FLAG_FAILED
            else Return(h["request_id"], True, f["result"], has_refs=has_ref(f["result"]))
        ),
        lambda m, h: (
            encode_return(m.request_id, m.result)
            if m.ok
            else encode_return_error(m.request_id, m.code, m.type, m.message)
        ),
        lambda m, fr: (
            {"result": m.result}
            if m.ok
            else {
                "code": m.code,
                "code_name": _code_name(m.code),
                "error_type": m.type,
                "message": m.message,
            }
        ),
    ),
    "RELEASE": TypeCodec(
        lambda h, f: Release(
            tuple((r["id"], r["count"]) for r in f["releases"]),
            tuple(f["finished"]),
            bool(h["flags"] & FLAG_RELEASE_END),
        ),
        lambda m, h: encode_release(m.releases, m.finished, m.end),
        lambda m, fr: {
            "releases": [{"id": oid, "count": n} for oid, n in m.releases],
            "finished": list(m.finished),
        },
    ),
    "RENEW": TypeCodec(lambda h, f: Renew(), lambda m, h: encode_renew(), lambda m, fr: {}),
    "ABORT": TypeCodec(
        lambda h, f: Abort(h["request_id"]),
        lambda m, h: encode_abort(m.request_id),
        lambda m, fr: {},
    ),
}


# --------------------------------------------------------------------------- reading an entry


def header_of(frame: Frame) -> dict[str, Any]:
    """A decoded frame's header as an entry states it."""
    name = REGISTRY.specs[frame.type].name
    return {
        "type": frame.type,
        "type_name": name,
        "flags": frame.flags,
        "flag_names": flag_names(name, frame.flags),
        "codec": frame.codec,
        "codec_name": CODEC_NAMES[frame.codec],
        "meta_len": len(frame.meta),
        "request_id": frame.request_id,
        "body_len": len(frame.body),
    }


def sealed_header(wire: bytes) -> dict[str, Any]:
    """The header of a sealed datagram as sent (AUTH set; the lengths exclude the trailer)."""
    frame = parse_datagram(wire[:-TRAILER_SIZE], 1 << 20)
    assert frame.flags & FLAG_AUTH
    return header_of(frame)


def inner_frame(entry: dict[str, Any]) -> bytes:
    """The frame an entry's fields describe: its bytes, or for a sealed datagram the frame
    inside (AUTH cleared, trailer removed), as the client side opens it."""
    wire = bytes.fromhex(entry["hex"])
    if "seal" not in entry:
        return wire
    seal = entry["seal"]
    auth = DatagramAuth(seal["secret"].encode(), epoch=NO_EPOCH)
    return auth.open(wire, seal["time_ms"] / 1000, track=False)


def decode_entry(name: str, wire: bytes) -> dict[str, Any]:
    """What this implementation reads in ``wire``: an entry without seal data."""
    frame = parse_datagram(wire, 1 << 20)
    try:
        msg = read(frame)
    except RemoteProtocolError:  # a RESPONSE with references: an objects session's (§4.5)
        msg = read(frame, refs=True)
    spec = REGISTRY.specs[frame.type]
    return {
        "name": name,
        "hex": wire.hex(),
        "header": header_of(frame),
        "fields": to_json(TYPES[spec.name].fields(msg, frame)),
    }


ENTRIES = kit()
SEALED = sorted(n for n, e in ENTRIES.items() if "seal" in e)
PLAIN = sorted(n for n, e in ENTRIES.items() if "seal" not in e)


# --------------------------------------------------------------------------- (a) doc <-> JSON


def test_every_hex_block_of_the_spec_is_a_kit_entry_and_every_entry_a_block() -> None:
    documented = doc_vectors()
    assert sorted(documented) == sorted(ENTRIES)
    for name, wire in documented.items():
        assert wire.hex(" ") == bytes.fromhex(ENTRIES[name]["hex"]).hex(" "), name


def test_every_message_type_has_a_vector() -> None:
    assert {ENTRIES[n]["header"]["type"] for n in PLAIN} == set(REGISTRY.specs)
    assert set(TYPES) == {spec.name for spec in REGISTRY.specs.values()}


def test_entries_are_complete_and_say_the_same_as_their_bytes() -> None:
    """Each entry has the keys the README lists, fields of its type only, and a header object
    that restates its first 16 bytes."""
    for name, entry in ENTRIES.items():
        assert set(entry) - {"seal", "refuses"} == {"name", "section", "hex", "header", "fields"}
        wire = bytes.fromhex(entry["hex"])
        if "seal" in entry:
            assert entry["header"] == sealed_header(wire), name
        else:
            assert entry["header"] == header_of(parse_datagram(wire, 1 << 20)), name
    assert {n: e["section"] for n, e in ENTRIES.items()} == doc_sections()


README = ROOT / "docs" / "conformance" / "README.md"


def test_the_readme_documents_every_key_of_the_file() -> None:
    """docs/conformance/README.md describes the format: every key the file uses is named there,
    and every type has its row of fields."""
    data = json.loads(KIT.read_text())
    keys = set(data)
    for entry in data["vectors"]:
        keys |= set(entry) | set(entry["header"]) | set(entry["fields"])
        keys |= set(entry.get("seal", {})) | set(entry.get("refuses", {}))
        for ext in entry["fields"].get("extensions", []):
            keys |= set(ext)
    text = README.read_text()
    missing = sorted(k for k in keys if f"`{k}`" not in text)
    assert not missing, f"keys of vectors.json the README does not describe: {missing}"
    for name in TYPES:
        assert re.search(rf"^\| [A-Z, ]*\b{name}\b[A-Z, ]* \| ", text, flags=re.M), name


# --------------------------------------------------------------------------- (b) encode, (c) decode


@pytest.mark.parametrize("name", PLAIN)
def test_our_encoder_produces_the_bytes_from_the_fields(name: str) -> None:
    entry = ENTRIES[name]
    header, fields = entry["header"], from_json(entry["fields"])
    codec = TYPES[header["type_name"]]
    encoded = codec.encode(codec.build(header, fields), header)
    assert encoded.hex(" ") == bytes.fromhex(entry["hex"]).hex(" ")


@pytest.mark.parametrize("name", PLAIN)
def test_decoding_the_bytes_gives_the_fields(name: str) -> None:
    """As one stream read, and as one datagram: the same header and fields as the entry, and
    the same message as the one built from the fields."""
    entry = ENTRIES[name]
    wire = bytes.fromhex(entry["hex"])
    header, fields = entry["header"], from_json(entry["fields"])
    codec = TYPES[header["type_name"]]
    (streamed,) = FrameDecoder().feed(wire)
    byte_by_byte = FrameDecoder()
    trickled = [f for i in range(len(wire)) for f in byte_by_byte.feed(wire[i : i + 1])]
    assert trickled == [streamed]
    refs = has_ref(fields)
    for frame in (streamed, parse_datagram(wire, 1 << 20)):
        if refs and frame.type == MessageType.RESPONSE:
            # §3.1: ext 2 is accepted in a RESPONSE only on a session that attached objects
            with pytest.raises(RemoteProtocolError) as info:
                decode_message(frame, REGISTRY)
            assert info.value.code == ErrorCode.DECODE_ERROR
        msg = read(frame, refs)
        assert header_of(frame) == header
        assert _same(codec.fields(msg, frame), fields), (codec.fields(msg, frame), fields)
        assert msg == codec.build(header, fields)


# --------------------------------------------------------------------------- sealed datagrams


@pytest.mark.parametrize("name", SEALED)
def test_sealed_vector_seals_and_opens_as_documented(name: str) -> None:
    """§6.1: the key derives from the secret; sealing the fields' frame for the epoch and time
    gives the bytes (MAC included); the client side opens them back to that frame."""
    entry = ENTRIES[name]
    seal = entry["seal"]
    secret = seal["secret"].encode()
    assert hmac.new(secret, KEY_LABEL, hashlib.sha256).hexdigest() == seal["key"]
    wire = bytes.fromhex(entry["hex"])
    frame = bytes.fromhex(seal["frame_hex"])
    inner = header_of(parse_datagram(frame, 1 << 20))
    assert inner == {
        **entry["header"],
        "flags": entry["header"]["flags"] & ~FLAG_AUTH,
        "flag_names": [n for n in entry["header"]["flag_names"] if n != "AUTH"],
    }
    codec = TYPES[inner["type_name"]]
    fields = from_json(entry["fields"])
    assert codec.encode(codec.build(inner, fields), inner) == frame  # (b), the frame
    auth = DatagramAuth(secret, epoch=bytes.fromhex(seal["epoch"]))
    assert auth.seal(frame, seal["time_ms"] / 1000).hex(" ") == wire.hex(" ")  # (b), sealed
    assert wire[-16:].hex() == seal["mac"]
    assert trailer_of(wire) == (bytes.fromhex(seal["epoch"]), seal["time_ms"])
    opened = inner_frame(entry)  # (c), as a client opens it
    assert opened == frame
    if "refuses" not in entry:  # and as the server of that epoch does, 10 s later
        server = DatagramAuth(secret, epoch=bytes.fromhex(seal["epoch"]))
        assert server.open(wire, seal["time_ms"] / 1000 + 10) == frame
    msg = decode_message(parse_datagram(opened, 1 << 20), REGISTRY)
    assert _same(codec.fields(msg, parse_datagram(opened, 1 << 20)), fields)
    if "frame" in seal:  # the frame inside is another vector
        assert bytes.fromhex(ENTRIES[seal["frame"]]["hex"]) == frame


@pytest.mark.parametrize("name", [n for n in SEALED if "refuses" in ENTRIES[n]])
def test_sealed_refusal_is_what_a_server_with_that_epoch_answers(name: str) -> None:
    """§6.1: a server whose epoch is the entry's, receiving the refused vector at the given
    time, refuses it with exactly these bytes, which name its epoch and the refused datagram's
    time; a client reads them as such."""
    entry = ENTRIES[name]
    seal, refuses = entry["seal"], entry["refuses"]
    refused = bytes.fromhex(ENTRIES[refuses["vector"]]["hex"])
    server = DatagramAuth(seal["secret"].encode(), epoch=bytes.fromhex(seal["epoch"]))
    with pytest.raises(AuthFailure) as info:
        server.open(refused, refuses["received_ms"] / 1000)
    assert info.value.answer is not None
    assert info.value.answer.hex(" ") == bytes.fromhex(entry["hex"]).hex(" ")
    wire = bytes.fromhex(entry["hex"])
    assert refusal_of(wire, inner_frame(entry)) == (
        bytes.fromhex(seal["epoch"]),
        ENTRIES[refuses["vector"]]["seal"]["time_ms"],
    )
    assert seal["time_ms"] == ENTRIES[refuses["vector"]]["seal"]["time_ms"]


@pytest.mark.parametrize("name", ["unsub", "ack"])
def test_unsub_and_ack_of_old_peers_with_codec_1_decode_the_same(name: str) -> None:
    """PROTOCOL.md §4.1: UNSUB and ACK have no body; codec 0 is sent, and the codec byte 1 that
    earlier revisions showed (and older peers send) is accepted: same message, codec aside."""
    wire = bytearray(doc_vectors()[name])
    assert wire[5] == 0
    (frame,) = FrameDecoder().feed(bytes(wire))
    sent = decode_message(frame, REGISTRY)
    wire[5] = 1
    (frame,) = FrameDecoder().feed(bytes(wire))
    old = decode_message(frame, REGISTRY)
    assert old == (Unsub(7, 1) if name == "unsub" else sent)
    assert isinstance(old, Unsub if name == "unsub" else Ack)


# --------------------------------------------------------------------------- a new entry


def main(argv: list[str]) -> int:
    """Print the entry this implementation derives from PROTOCOL.md's hex block ``argv[0]``
    (without "section" and seal data): a draft to check by hand, never to paste unread."""
    if len(argv) != 1:
        print("usage: python -m tests.protocol.test_vectors NAME", file=sys.stderr)
        return 2
    wire = doc_vectors()[argv[0]]
    print(json.dumps(decode_entry(argv[0], wire), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
