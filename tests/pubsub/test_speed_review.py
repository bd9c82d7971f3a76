"""A review of issue 17's pub/sub speed paths (the route cache, the shared MSG frame, the
chunked flush, the 16 KiB write_soon): each test shows one thing that must hold."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from sockstack import Server
from sockstack.protocol.frames import FrameDecoder
from sockstack.protocol.messages import CORE_MESSAGES, Hello, Response, decode_message, encode_hello
from sockstack.protocol.registry import Registry
from sockstack.pubsub.messages import PUBSUB_MESSAGES, Msg, encode_sub
from sockstack.rpc.service import Service
from tests.conftest import timeout

_REGISTRY = Registry([CORE_MESSAGES, PUBSUB_MESSAGES])


def _read_frames(sock: socket.socket, enough: Any) -> list[Any]:
    """Frames from ``sock`` until ``enough(frames)`` (bounded by the socket's timeout)."""
    dec = FrameDecoder()
    got: list[Any] = []
    while not enough(got):
        data = sock.recv(65536)
        if not data:
            break
        got += [decode_message(f, _REGISTRY) for f in dec.feed(data)]
    return got


async def test_sub_is_answered_before_its_retained_messages_even_above_16_kib() -> None:
    """PROTOCOL.md §4.1: SUB is answered with RESPONSE, *then* each retained message follows.
    write_soon now writes every 16 KiB in the middle of the read's handling, while the SUB's
    RESPONSE still waits in the session's buffer: with more than 16 KiB retained, MSG frames
    must not overtake it."""
    async with Server(Service(), tcp=["127.0.0.1:0"], broker=True) as srv:
        broker = srv.broker
        assert broker is not None
        n = 40
        for i in range(n):  # 40 KiB retained
            broker.publish(f"r.{i}", b"x" * 1000, 0, True)
        ep = srv.endpoint("tcp")

        def subscriber() -> list[Any]:
            with socket.create_connection((ep.host, ep.port), timeout=timeout(5)) as sock:
                sock.sendall(encode_hello(Hello()) + encode_sub(7, "r.>"))
                return _read_frames(
                    sock,
                    lambda got: (
                        sum(isinstance(m, Msg) for m in got) >= n
                        and any(isinstance(m, Response) for m in got)
                    ),
                )

        frames = await asyncio.to_thread(subscriber)
    kinds = [type(m).__name__ for m in frames if isinstance(m, (Msg, Response))]
    assert kinds.count("Msg") == n and kinds.count("Response") == 1
    assert kinds.index("Response") == 0, f"RESPONSE came after {kinds.index('Response')} MSGs"
