"""References on the wire (docs/PROTOCOL.md §4.5): msgpack extension type 2, and the bodies
that may hold it.

A reference is **msgpack ext type 2** whose payload is one msgpack array, by form (forms are
relative to the *sender*, as Cap'n Proto's CapDescriptor):

- form 1, ``[1, id: bin 16, iface: str]``: hosted by the sender (its export ``id``);
- form 2, ``[2, id: bin 16]`` or ``[2, name: str]``: hosted by the receiver (coming home), or
  the object registered there under that name;
- form 3, ``[3, question: uint, path: array]``: a promise on the sender's KEEP question (in a
  client's CALL arguments only);
- form 4, ``[4, url: str, token: bin 16, iface: str]``: hosted by a third server, where
  ``objects.adopt(token)`` at ``url`` exports it to the receiver's own session there (a
  single-use token that server minted for the sender: ``objects.share``; see
  :mod:`sockstack.objects.handoff`).

Bounds, checked before anything else is built: ids and tokens exactly 16 bytes, ``iface`` and
names 1-255 bytes of UTF-8, a URL 1-1,024 bytes, a question id 1..2^32-1, a path at most 8 steps
(an int 0..65535 indexes an array, a str of at most 255 bytes keys a map), no other element, a
payload of at most :data:`MAX_REF_PAYLOAD` bytes. Anything else is :class:`CodecError`.

Decoding builds only a :class:`Ref` placeholder: nothing is looked up or connected here. The
receiver resolves it against its session's tables (the objects pattern does).

:func:`pack` and :func:`unpack` are the msgpack codec of :mod:`sockstack.protocol.codecs` (same
typed values, same limits) plus ext 2: ``pack`` emits a reference for every value ``to_ref``
maps to a :class:`Ref` (and for a :class:`Ref` itself), ``unpack`` returns placeholders and says
whether it saw any, so that a receiver walks a value for references only when there are some.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import msgspec

from sockstack.errors import CodecError

# The codecs' msgpack ``default`` (typed values of PROTOCOL.md §3.1: dates, UUIDs, dataclasses,
# big integers...) and Packer buffer size: references must not change how anything else packs.
from sockstack.protocol.codecs import _PACK_BUF, MAX_CONTAINER, refuse_ext
from sockstack.protocol.codecs import _msgpack_default as _typed_default

__all__ = [
    "EXT_REF",
    "FORM_HOME",
    "FORM_PROMISE",
    "FORM_SENDER",
    "FORM_THIRD",
    "ID_SIZE",
    "MAX_NAME",
    "MAX_PATH",
    "MAX_REF_PAYLOAD",
    "MAX_URL",
    "Ref",
    "ToRef",
    "check_path",
    "decode_ref",
    "encode_ref",
    "pack",
    "unpack",
]

EXT_REF = 2
"""msgpack extension type of a reference."""
FORM_SENDER = 1
"""Hosted by the sender: ``[1, id, iface]`` (the receiver imports it, one count per occurrence)."""
FORM_HOME = 2
"""Hosted by the receiver, coming home: ``[2, id]``; or registered there: ``[2, name]``."""
FORM_PROMISE = 3
"""A promise on the sender's KEEP question: ``[3, question, path]``."""
FORM_THIRD = 4
"""Hosted by a third server: ``[4, url, token, iface]`` (the receiver adopts it there)."""

ID_SIZE = 16
"""Bytes of an object id and of a handoff token."""
MAX_NAME = 255
"""Most UTF-8 bytes of an ``iface``, a name, or a path key."""
MAX_URL = 1024
"""Most UTF-8 bytes of a form 4 URL."""
MAX_PATH = 8
"""Most steps of a path (a form 3 reference, an ANSWER target)."""
MAX_STEP_INDEX = 0xFFFF
MAX_QUESTION = 0xFFFFFFFF
MAX_REF_PAYLOAD = 4096
"""Most bytes of an ext 2 payload (the largest valid one, a form 3 with 8 keys of 255 bytes, is
2,066)."""


@dataclass(frozen=True, slots=True)
class Ref:
    """A reference: decoded from ext 2 (a placeholder the receiver resolves), or one to encode.

    Which fields a form uses: 1 ``id`` and ``iface``; 2 ``id`` or ``name`` (one of the two);
    3 ``question`` and ``path``; 4 ``url``, ``token`` and ``iface``. The others keep their
    defaults (and are ignored by :func:`encode_ref`)."""

    form: int
    id: bytes | None = None
    name: str | None = None
    iface: str = ""
    question: int = 0
    path: tuple[int | str, ...] = ()
    url: str = ""
    token: bytes = b""


ToRef = Callable[[object], Ref | None]
"""``to_ref(obj)``: the reference a value crosses as, or None to pack it as data."""


# --------------------------------------------------------------------------- checks


def _text_ok(value: object, lo: int, hi: int) -> bool:
    if type(value) is not str:
        return False
    try:
        n = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: not text that can travel
        return False
    return lo <= n <= hi


def _id_ok(value: object) -> bool:
    return type(value) is bytes and len(value) == ID_SIZE


def check_path(path: object) -> str | None:
    """None when ``path`` is a valid path (a tuple or list of at most 8 steps, each an int
    0..65535 or a str of at most 255 UTF-8 bytes), else what is wrong."""
    if not isinstance(path, tuple | list):
        return f"a path is an array, not {type(path).__name__}"
    if len(path) > MAX_PATH:
        return f"a path of {len(path)} steps (at most {MAX_PATH})"
    for i, step in enumerate(path):
        if type(step) is int:
            if not 0 <= step <= MAX_STEP_INDEX:
                return f"path step {i}: index {step} outside 0..{MAX_STEP_INDEX}"
        elif not _text_ok(step, 0, MAX_NAME):
            return f"path step {i}: {step!r} is neither an index nor a key of at most 255 bytes"
    return None


def _problem(ref: Ref) -> str | None:
    """None when ``ref`` is a valid reference of its form, else what is wrong."""
    form = ref.form
    if form == FORM_SENDER or form == FORM_THIRD:
        if not _text_ok(ref.iface, 1, MAX_NAME):
            return f"iface {ref.iface!r}: 1-{MAX_NAME} bytes of UTF-8"
        if form == FORM_SENDER:
            return None if _id_ok(ref.id) else f"an object id is {ID_SIZE} bytes, not {ref.id!r}"
        if not _text_ok(ref.url, 1, MAX_URL):
            return f"url: 1-{MAX_URL} bytes of UTF-8, not {ref.url[:80]!r}"
        return None if _id_ok(ref.token) else f"a token is {ID_SIZE} bytes, not {ref.token!r}"
    if form == FORM_HOME:
        if (ref.id is None) == (ref.name is None):
            return "form 2 carries an id or a name (exactly one)"
        if ref.id is not None:
            return None if _id_ok(ref.id) else f"an object id is {ID_SIZE} bytes, not {ref.id!r}"
        return None if _text_ok(ref.name, 1, MAX_NAME) else f"name {ref.name!r}: 1-255 bytes"
    if form == FORM_PROMISE:
        if type(ref.question) is not int or not 1 <= ref.question <= MAX_QUESTION:
            return f"question {ref.question!r} outside 1..{MAX_QUESTION}"
        return check_path(ref.path)
    return f"unknown reference form {form!r} (1-4)"


# --------------------------------------------------------------------------- one reference


def encode_ref(ref: Ref) -> bytes:
    """The ext 2 payload of ``ref`` (one msgpack array). :class:`CodecError` if ``ref`` breaks
    its form's rules (nothing is sent)."""
    problem = _problem(ref)
    if problem is not None:
        raise CodecError(f"cannot encode reference {ref!r}: {problem}")
    form = ref.form
    items: list[Any]
    if form == FORM_SENDER:
        items = [1, ref.id, ref.iface]
    elif form == FORM_HOME:
        items = [2, ref.id if ref.id is not None else ref.name]
    elif form == FORM_PROMISE:
        items = [3, ref.question, list(ref.path)]
    else:
        items = [4, ref.url, ref.token, ref.iface]
    packed: bytes = msgpack.packb(items, use_bin_type=True)
    return packed


_FORM_LEN = {FORM_SENDER: 3, FORM_HOME: 2, FORM_PROMISE: 3, FORM_THIRD: 4}


def decode_ref(payload: bytes) -> Ref:
    """The :class:`Ref` an ext 2 payload encodes. :class:`CodecError` naming what is wrong for
    anything malformed or out of bounds (nothing but plain msgpack inside: no ext type)."""
    if len(payload) > MAX_REF_PAYLOAD:
        raise CodecError(f"reference (ext 2) of {len(payload)} bytes (at most {MAX_REF_PAYLOAD})")
    try:
        items = msgpack.unpackb(
            payload,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=MAX_URL,
            max_bin_len=ID_SIZE,
            max_array_len=MAX_PATH,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise CodecError(
            f"reference (ext 2) is not a valid payload: {type(exc).__name__}: {exc}"
        ) from None
    if type(items) is not list or not items or type(items[0]) is not int:
        raise CodecError("reference (ext 2) payload must be an array starting with its form")
    form = items[0]
    want = _FORM_LEN.get(form)
    if want is None:
        raise CodecError(f"reference (ext 2) of unknown form {form} (1-4)")
    if len(items) != want:
        raise CodecError(f"reference (ext 2) form {form} has {want} elements, not {len(items)}")
    if form == FORM_SENDER:
        ref = Ref(form, items[1], iface=items[2])
    elif form == FORM_HOME:
        who = items[1]
        ref = Ref(form, who) if type(who) is bytes else Ref(form, name=who)
    elif form == FORM_PROMISE:
        path = items[2]
        ref = Ref(form, question=items[1], path=tuple(path) if type(path) is list else path)
    else:
        ref = Ref(form, iface=items[3], url=items[1], token=items[2])
    problem = _problem(ref)
    if problem is not None:
        raise CodecError(f"reference (ext 2) form {form}: {problem}")
    return ref


# --------------------------------------------------------------------------- bodies


def _ref_default(to_ref: ToRef | None, value: Any) -> Any:
    """msgpack ``default`` (called only for what msgpack cannot pack itself): a :class:`Ref`,
    or what ``to_ref`` maps to one, as ext 2; anything else as the codecs pack it."""
    if type(value) is Ref:
        return msgpack.ExtType(EXT_REF, encode_ref(value))
    if to_ref is not None and not isinstance(value, int):  # an int here is beyond 64 bits
        ref = to_ref(value)
        if ref is not None:
            return msgpack.ExtType(EXT_REF, encode_ref(ref))
    return _typed_default(value)


def _new_packer(default: Callable[[Any], Any]) -> Any:
    return msgpack.Packer(use_bin_type=True, autoreset=True, buf_size=_PACK_BUF, default=default)


class _Packing:
    """One thread's Packer, and the ``to_ref`` of the pack it is doing (its ``default`` reads
    it): a plain object, so that a pack costs one thread-local lookup."""

    __slots__ = ("busy", "packer", "to_ref")

    def __init__(self) -> None:
        self.packer: Any = _new_packer(self.default)
        self.to_ref: ToRef | None = None
        self.busy = False

    def default(self, value: Any) -> Any:
        return _ref_default(self.to_ref, value)


_local = threading.local()
_ENCODE_ERRORS = (TypeError, ValueError, OverflowError, msgspec.MsgspecError)


def pack(value: Any, to_ref: ToRef | None = None) -> bytes:
    """msgpack bytes of ``value`` with the codecs' typed values (PROTOCOL.md §3.1), where every
    :class:`Ref`, and every value ``to_ref`` maps to one, is a reference (ext 2).

    ``to_ref`` is asked only about values msgpack cannot pack itself (never about ints, text,
    bytes, lists, maps...). Thread-safe: one Packer per thread. Raises :class:`CodecError` when
    a value does not encode; an exception ``to_ref`` raises propagates as it is."""
    try:
        st: _Packing = _local.packing
    except AttributeError:
        st = _local.packing = _Packing()
    if st.busy:  # to_ref packs something itself: the thread's packer is in use
        return _run(_new_packer(functools.partial(_ref_default, to_ref)), value, None)
    st.busy = True
    st.to_ref = to_ref
    try:
        return _run(st.packer, value, st)
    finally:
        st.busy = False
        st.to_ref = None


def _run(packer: Any, value: Any, st: _Packing | None) -> bytes:
    try:
        out: bytes = packer.pack(value)
        return out
    except _ENCODE_ERRORS as exc:
        if st is not None:
            st.packer = _new_packer(st.default)  # a clean one
        raise CodecError(f"msgpack cannot encode this value: {exc}") from None
    except BaseException:
        if st is not None:
            st.packer = _new_packer(st.default)
        raise


def unpack(data: bytes | bytearray | memoryview) -> tuple[Any, bool]:
    """``(value, any_reference_seen)`` of a msgpack body: the codecs' msgpack decoding (same
    container bound, ext types 1 and -1) plus ext 2 as :class:`Ref` placeholders. Raises
    :class:`CodecError` naming what is wrong for bad input."""
    seen = False

    def hook(code: int, payload: bytes) -> Any:
        nonlocal seen
        if code == EXT_REF:
            seen = True
            return decode_ref(payload)
        return refuse_ext(code, payload)

    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            use_list=True,
            ext_hook=hook,
            timestamp=3,
            max_array_len=MAX_CONTAINER,
            max_map_len=MAX_CONTAINER,
        )
    except CodecError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise CodecError(f"body is not valid msgpack: {type(exc).__name__}: {exc}") from None
    return value, seen
