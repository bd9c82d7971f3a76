"""Which message types a session understands: the one hook through which a pattern adds its own.

The core decodes the session and call messages (types 0x01-0x0F) itself. A pattern declares its
messages as a :class:`MessageSet` inside the range docs/PROTOCOL.md reserves for it, and the host
(or a client) adds that set to the :class:`Registry` its sessions use::

    registry = Registry([PUBSUB_MESSAGES])       # what publish/subscribe adds
    conn = Connection(Role.SERVER, registry=registry)

A :class:`MessageSpec` says how to decode a frame of its type, which role may send it, and
optionally a *fast* decoder that reads a whole frame straight from the receive buffer (no
:class:`~sockstack.protocol.frames.Frame` object) for high-rate messages such as PUB and MSG.
The fast decoder returns None to send the frame through the general path, which then reports the
exact error: a fast path never decides that input is bad.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sockstack.errors import ErrorCode, RemoteProtocolError
from sockstack.protocol.events import Message, PatternMessage, Role
from sockstack.protocol.frames import Frame

__all__ = ["BOTH", "FastDecode", "MessageSet", "MessageSpec", "Registry"]

FastDecode = Callable[[bytes, int, int, int, int, int, int], Message | None]
"""``fast(data, meta_start, body_start, end, flags, codec, request_id)``: the message of the whole
frame at ``data[meta_start - 16 : end]`` (header already checked against the limits), or None to
use the general path."""

BOTH = frozenset({Role.CLIENT, Role.SERVER})


@dataclass(frozen=True, slots=True)
class MessageSpec:
    """One message type: how a frame of it becomes a message, and who may send it."""

    type: int
    name: str
    decode: Callable[[Frame], Message]
    sent_by: frozenset[Role]
    fast: FastDecode | None = None
    cls: builtins.type[PatternMessage] | None = None
    """The class ``decode`` returns, for a pattern's messages: a host routes them by class."""


@dataclass(frozen=True, slots=True)
class MessageSet:
    """The message types one pattern owns, all inside its reserved range ``first..last``."""

    name: str
    first: int
    last: int
    specs: tuple[MessageSpec, ...]

    def __post_init__(self) -> None:
        for spec in self.specs:
            if not self.first <= spec.type <= self.last:
                raise ValueError(
                    f"{self.name}: type 0x{spec.type:02x} ({spec.name}) is outside its range "
                    f"0x{self.first:02x}-0x{self.last:02x}"
                )


class Registry:
    """The message types a session decodes. Shared by every session of a host (or client):
    a set added later is seen by the sessions already open."""

    __slots__ = ("_fast", "_frozen", "_sets", "specs")

    def __init__(self, sets: Iterable[MessageSet] = (), *, frozen: bool = False) -> None:
        """``frozen``: refuse later additions (the defaults sessions share when given none)."""
        self.specs: dict[int, MessageSpec] = {}
        self._sets: list[MessageSet] = []
        # Fast decoders by the role of the peer that sends them: a session looks up its peer's.
        self._fast: dict[Role, dict[int, FastDecode]] = {Role.CLIENT: {}, Role.SERVER: {}}
        self._frozen = False
        for s in sets:
            self.add(s)
        self._frozen = frozen

    @property
    def sets(self) -> tuple[MessageSet, ...]:
        return tuple(self._sets)

    def add(self, mset: MessageSet) -> None:
        """Register a pattern's messages. Adding the same set twice is a no-op; a set whose range
        overlaps another's is refused (two patterns cannot own one type)."""
        if mset in self._sets:
            return
        if self._frozen:
            raise ValueError(
                f"cannot add {mset.name}: this registry is shared and frozen (give the session "
                "a Registry of its own)"
            )
        for other in self._sets:
            if mset.first <= other.last and other.first <= mset.last:
                raise ValueError(
                    f"{mset.name} (0x{mset.first:02x}-0x{mset.last:02x}) overlaps {other.name} "
                    f"(0x{other.first:02x}-0x{other.last:02x})"
                )
        self._sets.append(mset)
        for spec in mset.specs:
            self.specs[spec.type] = spec
            if spec.fast is not None:
                for role in spec.sent_by:
                    self._fast[role][spec.type] = spec.fast

    def fast_from(self, role: Role) -> dict[int, FastDecode]:
        """The fast decoders of messages ``role`` sends (a live view: later sets appear)."""
        return self._fast[role]

    def name(self, type_: int) -> str:
        spec = self.specs.get(type_)
        return spec.name if spec is not None else f"0x{type_:02x}"

    def decode(self, frame: Frame) -> Message:
        """Decode a frame of a registered type. Raises :class:`RemoteProtocolError` whose
        ``code`` says what was wrong (``UNKNOWN_TYPE``, ``DECODE_ERROR``...)."""
        spec = self.specs.get(frame.type)
        if spec is None:
            raise RemoteProtocolError(
                f"unknown message type 0x{frame.type:02x}", ErrorCode.UNKNOWN_TYPE
            )
        return spec.decode(frame)
