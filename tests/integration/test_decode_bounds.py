"""Issue 10 item 5: what one request may make the server decode and bind is bounded, so that a
connection pipelining huge bodies cannot hold the event loop: a map or array above
MAX_CONTAINER elements is refused from its header (DECODE_ERROR) before any element is decoded,
and keyword arguments beyond a method's parameters are refused by counting (BAD_ARGUMENTS),
before the signature is bound."""

from __future__ import annotations

import asyncio

from sockstack import AsyncClient, ErrorCode, Server
from sockstack.protocol.codecs import MAX_CONTAINER
from sockstack.protocol.frames import FrameDecoder
from sockstack.protocol.messages import Error, Hello, decode_message, encode_hello, encode_request
from tests.conftest import Probe, timeout

N = 20  # pipelined requests of ~0.9 MB each


async def test_huge_bodies_are_refused_without_decoding_and_others_are_served() -> None:
    async with Server(Probe(), tcp=["127.0.0.1:0"]) as srv:
        ep = srv.endpoint("tcp")
        huge = {f"k{i:06d}": i for i in range(MAX_CONTAINER + 10_000)}  # the 90,000-ish
        many = {f"k{i:06d}": i for i in range(MAX_CONTAINER - 1)}  # within the element bound
        reader, writer = await asyncio.open_connection(ep.host, ep.port)
        writer.write(encode_hello(Hello()))
        for rid in range(1, N + 1):
            kwargs = huge if rid % 2 else many
            writer.write(encode_request(rid, "echo", [], kwargs))
        answers: dict[int, Error] = {}

        async def collect() -> None:
            dec = FrameDecoder(1 << 20)
            while len(answers) < N:
                data = await reader.read(1 << 20)
                assert data, "the server closed the connection"
                for f in dec.feed(data):
                    msg = decode_message(f)
                    if isinstance(msg, Error):
                        answers[msg.request_id] = msg

        collecting = asyncio.ensure_future(collect())
        async with AsyncClient(str(ep), timeout=timeout(10)) as good:
            calls = 0
            async with asyncio.timeout(timeout(60)):
                while not collecting.done():  # a good client is served all along
                    assert await good.call("add", calls, 1) == calls + 1
                    calls += 1
                await collecting
        writer.close()
        for rid, err in answers.items():
            if rid % 2:  # refused from the map's header: nothing was decoded
                assert err.code == ErrorCode.DECODE_ERROR and "max_map_len" in err.message
            else:  # decoded, then refused by counting: the signature was never bound
                assert err.code == ErrorCode.BAD_ARGUMENTS
                assert f"{MAX_CONTAINER - 1} keyword arguments for at most 1" in err.message
