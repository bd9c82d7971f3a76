"""The typed events of the protocol core: what ``receive_data`` and ``receive_datagram`` return.

Every event is a small read-only value. Messages (one per frame) and session events (the
handshake ended, the session ended, the peer broke a rule) together form :data:`Event`, a union
a type checker can follow::

    for ev in conn.receive_data(data):
        match ev:
            case Request(): ...
            case ConnectionTerminated(): ...

Patterns (publish/subscribe, remote objects...) add messages of their own: each is a subclass
of :class:`PatternMessage`, registered with its type on a
:class:`~sockstack.protocol.registry.Registry`.

Messages are declared with :func:`message`: frozen for the type checker, plain slotted classes at
run time, because a frozen dataclass costs about 4x more to build (440 ns against 120 ns for a
REQUEST on the machines we measure) and one is built per message on the hot path. So a message
is read-only by contract (mypy refuses an assignment), not enforced at run time, and it is not
hashable (its fields may hold lists and maps): compare messages, do not put them in sets.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, dataclass_transform

from sockstack.errors import ErrorCode
from sockstack.protocol.frames import DEFAULT_MAX_FRAME, PROTOCOL_VERSION

__all__ = [
    "BadItem",
    "Cancel",
    "Close",
    "ConnectionTerminated",
    "Credit",
    "Error",
    "Event",
    "HandshakeComplete",
    "Hello",
    "Item",
    "Message",
    "Metadata",
    "PatternMessage",
    "Ping",
    "Pong",
    "ProtocolViolation",
    "Request",
    "Response",
    "Role",
    "Welcome",
    "message",
]

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def message(cls: type[_T]) -> type[_T]:
    """Declare a message class: read-only to the type checker, cheap to build at run time."""
    return dataclass(slots=True)(cls)


class Role(enum.Enum):
    """Which end of a session: a message type says which role may send it."""

    CLIENT = "client"
    SERVER = "server"


# --------------------------------------------------------------------------- session events


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    version: int
    peer_agent: str
    peer_max_frame: int = DEFAULT_MAX_FRAME


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The session is over. ``code`` is None when the stream ended without a CLOSE frame."""

    code: int | None
    reason: str
    by_peer: bool


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The peer broke the protocol; this side already answered with ERROR or CLOSE ``code``."""

    code: int
    message: str
    request_id: int = 0
    fatal: bool = False


# --------------------------------------------------------------------------- core messages


@message
class Hello:
    """Client -> server, first frame on a stream: the versions it speaks and optional extensions."""

    min_version: int = PROTOCOL_VERSION
    max_version: int = PROTOCOL_VERSION
    max_frame: int = DEFAULT_MAX_FRAME
    agent: str = ""
    extensions: tuple[tuple[int, bytes], ...] = ()


@message
class Welcome:
    """Server -> client: the chosen version, the server's codecs and its frame limit."""

    version: int = PROTOCOL_VERSION
    codecs: tuple[int, ...] = (1, 2, 0)
    max_frame: int = DEFAULT_MAX_FRAME
    agent: str = ""
    extensions: tuple[tuple[int, bytes], ...] = ()


Metadata = Mapping[str, str | bytes]
"""A call's metadata (REQUEST) or trailers (RESPONSE, ERROR): string keys, str or bytes values."""


@message
class Request:
    """REQUEST. ``budget_ms``: the caller's remaining time in milliseconds when it sent the
    frame (flag DEADLINE), None without; ``metadata``: the METADATA map, None without."""

    request_id: int
    method: str
    args: Sequence[Any] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    codec: int = 1
    budget_ms: int | None = None
    metadata: Metadata | None = None
    stream: bool = False
    """Flag STREAM: the caller accepts a streamed result (ITEMs, then the one answer)."""
    upload: bool = False
    """Flag UPLOAD: an argument follows as ITEMs from the caller, then an ITEM with END."""
    size: int = field(default=0, compare=False)
    """The frame's size (meta + body bytes, §2; 0 when not known): what the host counts for the
    bytes of requests in flight."""
    batch: bool = False
    """Flag BATCH (§4.7): ``args`` holds the argument arrays of the calls of a batch."""


@message
class Response:
    request_id: int
    result: Any = None
    codec: int = 1
    metadata: Metadata | None = None
    """The server's trailers (flag METADATA), None without."""


@message
class Error:
    """ERROR frame: the request ``request_id`` (0: none) failed with ``code``."""

    request_id: int
    code: int
    type: str = ""
    message: str = ""
    metadata: Metadata | None = None
    """The server's trailers (flag METADATA), None without."""


@message
class Cancel:
    """CANCEL (client -> server, streams only): stop the call ``request_id`` if it is in flight.
    Not a request: it is never answered (the call it names gets its one answer)."""

    request_id: int


@message
class Item:
    """ITEM: one item of the streamed result of call ``request_id`` (server -> client), or of
    its uploaded argument (client -> server, §4.4). ``size``: the bytes of its body (what flow
    control counts); ``end``: flag END, an upload's last ITEM (no value, size 0)."""

    request_id: int
    value: Any = None
    codec: int = 1
    size: int = 0
    end: bool = False


@message
class Credit:
    """CREDIT: ``granted`` more bytes of ITEM bodies for stream ``request_id`` (client ->
    server), or for upload ``request_id`` (server -> client, §4.4). Not a request: never
    answered."""

    request_id: int
    granted: int = 0


@message
class Ping:
    request_id: int
    payload: bytes = b""


@message
class Pong:
    request_id: int
    payload: bytes = b""


@message
class Close:
    code: int = ErrorCode.NORMAL
    reason: str = ""


class PatternMessage:
    """Base class of the messages a pattern registers (SUB, PUB, MSG...): the core routes them
    to the pattern without knowing their fields."""

    __slots__ = ()


Message = (
    Hello
    | Welcome
    | Request
    | Response
    | Error
    | Ping
    | Pong
    | Close
    | Cancel
    | Item
    | Credit
    | PatternMessage
)
"""One decoded frame."""


@message
class BadItem:
    """A client's ITEM (an upload's, PROTOCOL.md §4.4) that could not be decoded: reported by
    the core to the server's adapter, never answered by the core (the host ends the upload
    ``request_id`` with ``code`` if it is in flight). Not a frame: a client's ERROR frame is
    never mistaken for it."""

    request_id: int
    code: int
    message: str = ""


Event = Message | HandshakeComplete | ConnectionTerminated | ProtocolViolation | BadItem
"""Anything the core reports to its adapter."""
