"""A pattern in one file: how a new pattern plugs into the host (docs/ARCHITECTURE.md).

REVERSE (type 0x50, in the free range 0x50-0x5F this example claims) asks the server to reverse
some bytes; the server answers with a RESPONSE holding them reversed, over TCP or UDP. The
pattern also serves one method, ``reverse.count``. Nothing outside this file changes::

    server = Server(patterns=[RPC(Demo()), PubSub(), Reverse()], tcp=[...], udp=[...])

    async with AsyncClient(url) as client:
        assert await reverse(client, b"abc") == b"cba"
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sockstack import AsyncClient
from sockstack.errors import ErrorCode, RemoteProtocolError
from sockstack.host.dispatch import Handler, make_handler
from sockstack.host.pattern import DatagramPeer, Pattern, Peer
from sockstack.protocol.codecs import RAW
from sockstack.protocol.events import PatternMessage, Role, message
from sockstack.protocol.frames import Frame, encode_frame, parse_datagram
from sockstack.protocol.messages import encode_error, encode_response
from sockstack.protocol.registry import MessageSet, MessageSpec, Registry

REVERSE = 0x50
MAX_DATA = 1024  # bytes one REVERSE may carry


@message
class ReverseRequest(PatternMessage):
    request_id: int
    data: bytes


def _decode(frame: Frame) -> ReverseRequest:
    if frame.request_id == 0:
        raise RemoteProtocolError("REVERSE needs a request id", ErrorCode.DECODE_ERROR)
    if len(frame.body) > MAX_DATA:
        raise RemoteProtocolError(
            f"REVERSE carries at most {MAX_DATA} bytes", ErrorCode.DECODE_ERROR
        )
    return ReverseRequest(frame.request_id, frame.body)


REVERSE_MESSAGES = MessageSet(
    "reverse",
    0x50,
    0x5F,
    (MessageSpec(REVERSE, "REVERSE", _decode, frozenset({Role.CLIENT}), cls=ReverseRequest),),
)
_ONLY_REVERSE = Registry([REVERSE_MESSAGES], frozen=True)


class Reverse(Pattern):
    """The server side: answers REVERSE on streams and datagrams, counts what it served."""

    name = "reverse"
    messages = REVERSE_MESSAGES
    datagram_types = frozenset({REVERSE})

    def __init__(self) -> None:
        self.served = 0

    def methods(self) -> Mapping[str, Handler]:
        return {"reverse.count": make_handler("reverse.count", self.count, inline=True)}

    def count(self) -> int:
        return self.served

    def stream_message(self, peer: Peer, msg: PatternMessage) -> None:
        assert isinstance(msg, ReverseRequest) and peer.core is not None
        self.served += 1
        peer.core.send_response(msg.request_id, msg.data[::-1], RAW)

    def datagram_received(self, endpoint: DatagramPeer, data: bytes, addr: Any) -> None:
        try:
            msg = _ONLY_REVERSE.decode(parse_datagram(data, 16 + MAX_DATA))
        except RemoteProtocolError as exc:
            endpoint.count_bad()
            endpoint.bad_log.warning("reverse: bad datagram from %s: %s", addr, exc.message)
            reply = encode_error(0, exc.code)
            if len(reply) <= len(data):  # never answer with more bytes than came in
                endpoint.send_datagram(reply, addr)
            return
        assert isinstance(msg, ReverseRequest)
        self.served += 1
        # RAW codec: the answer is exactly as long as the request (no amplification).
        endpoint.send_datagram(encode_response(msg.request_id, msg.data[::-1], RAW), addr)


def encode_reverse(request_id: int, data: bytes) -> bytes:
    return encode_frame(REVERSE, request_id, b"", data)


async def reverse(client: AsyncClient, data: bytes, timeout: float = 5.0) -> bytes:
    """The client side, over the asyncio client's channel API (TCP/TLS)."""
    channel = client.stream_channel("REVERSE")
    _, result = await channel.exchange(lambda rid: encode_reverse(rid, data), "REVERSE", timeout)
    assert isinstance(result, bytes)
    return result
