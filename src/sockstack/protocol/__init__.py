"""The sans-I/O protocol core: bytes in, events out. No sockets, no asyncio, no clock.

Layers, bottom up (docs/PROTOCOL.md):

- :mod:`.frames` — framing: the 16-byte header, stream decoder, datagram parser.
- :mod:`.codecs` — presentation: msgpack (default), JSON, raw bytes.
- :mod:`.messages` — message layouts: HELLO, WELCOME, REQUEST, RESPONSE, ERROR, PING, PONG, CLOSE.
- :mod:`.connection` — session over a stream: handshake, keepalive, close, as a state machine.
- :mod:`.datagram` — request/response over datagrams: retries and de-duplication.
- :mod:`.pubsub` — publish/subscribe messages: SUB, UNSUB, PUB, MSG, ACK.
- :mod:`.auth` — shared-secret authentication of handshakes and datagrams.
"""

from sockstack.protocol.codecs import CODECS, JSON, MSGPACK, RAW, Codec, get_codec
from sockstack.protocol.connection import (
    Connection,
    ConnectionTerminated,
    HandshakeComplete,
    ProtocolViolation,
    State,
)
from sockstack.protocol.datagram import (
    CallExpired,
    DatagramClient,
    DatagramServer,
    ReplyCache,
    RetryPolicy,
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
from sockstack.protocol.pubsub import Ack, Msg, Pub, Sub, Unsub  # registers the pub/sub types

__all__ = [
    "CODECS",
    "DEFAULT_MAX_FRAME",
    "HEADER_SIZE",
    "JSON",
    "MSGPACK",
    "PROTOCOL_VERSION",
    "RAW",
    "Ack",
    "CallExpired",
    "Close",
    "Codec",
    "Connection",
    "ConnectionTerminated",
    "DatagramClient",
    "DatagramServer",
    "Error",
    "Frame",
    "FrameDecoder",
    "HandshakeComplete",
    "Hello",
    "MessageType",
    "Msg",
    "Ping",
    "Pong",
    "ProtocolViolation",
    "Pub",
    "ReplyCache",
    "Request",
    "Response",
    "RetryPolicy",
    "Role",
    "State",
    "Sub",
    "Unsub",
    "Welcome",
    "decode_message",
    "encode_frame",
    "get_codec",
    "parse_datagram",
]
