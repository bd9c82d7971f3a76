"""The sans-I/O protocol core: bytes in, events out. No sockets, no asyncio, no clock.

Layers, bottom up (docs/PROTOCOL.md):

- :mod:`.frames` — framing: the 16-byte header, stream decoder, datagram parser.
- :mod:`.codecs` — presentation: msgpack (default), JSON, raw bytes.
- :mod:`.events` — the typed events and messages the core reports (one union, :data:`Event`).
- :mod:`.registry` — which message types a session decodes; the one hook patterns add theirs by.
- :mod:`.messages` — message layouts: HELLO, WELCOME, REQUEST, RESPONSE, ERROR, PING, PONG, CLOSE.
- :mod:`.connection` — session over a stream: handshake, keepalive, close, as a state machine.
- :mod:`.datagram` — request/response over datagrams: retries and de-duplication.
- :mod:`.calls` — the client's calls: request ids, deadlines, matching answers, failover, backoff.
- :mod:`.auth` — shared-secret authentication of handshakes and datagrams.

This package imports no pattern: publish/subscribe's messages live in :mod:`sockstack.pubsub`.
"""

from sockstack.protocol.codecs import CODECS, JSON, MSGPACK, RAW, Codec, get_codec
from sockstack.protocol.connection import Connection, State
from sockstack.protocol.datagram import (
    CallExpired,
    DatagramClient,
    DatagramServer,
    ReplyCache,
    RetryPolicy,
)
from sockstack.protocol.events import (
    ConnectionTerminated,
    Event,
    HandshakeComplete,
    PatternMessage,
    ProtocolViolation,
)
from sockstack.protocol.frames import (
    DEFAULT_MAX_FRAME,
    HEADER_SIZE,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    MessageType,
    encode_frame,
    parse_datagram,
)
from sockstack.protocol.messages import (
    Close,
    Error,
    Hello,
    Ping,
    Pong,
    Request,
    Response,
    Role,
    Welcome,
    decode_message,
)
from sockstack.protocol.registry import MessageSet, MessageSpec, Registry

__all__ = [
    "CODECS",
    "DEFAULT_MAX_FRAME",
    "HEADER_SIZE",
    "JSON",
    "MSGPACK",
    "PROTOCOL_VERSION",
    "RAW",
    "CallExpired",
    "Close",
    "Codec",
    "Connection",
    "ConnectionTerminated",
    "DatagramClient",
    "DatagramServer",
    "Error",
    "Event",
    "Frame",
    "FrameDecoder",
    "HandshakeComplete",
    "Hello",
    "MessageSet",
    "MessageSpec",
    "MessageType",
    "PatternMessage",
    "Ping",
    "Pong",
    "ProtocolViolation",
    "Registry",
    "ReplyCache",
    "Request",
    "Response",
    "RetryPolicy",
    "Role",
    "State",
    "Welcome",
    "decode_message",
    "encode_frame",
    "get_codec",
    "parse_datagram",
]
