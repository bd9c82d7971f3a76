"""A shared secret: in the TCP HELLO, and as an HMAC on every UDP datagram. Wrong or missing
credentials get a distinct code and nothing is served; forged and replayed datagrams never run."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sockstack import (
    AsyncClient,
    CallTimeout,
    ConnectError,
    ErrorCode,
    RemoteError,
    Server,
    connect,
)
from sockstack.protocol.auth import DatagramAuth, token_extension
from sockstack.protocol.datagram import RetryPolicy
from sockstack.protocol.frames import FrameDecoder
from sockstack.protocol.messages import (
    Close,
    Error,
    Hello,
    Response,
    decode_message,
    encode_hello,
    encode_request,
)
from tests.cli.conftest import run, serving
from tests.conftest import Probe, timeout

SECRET = b"correct horse battery staple"


@pytest.fixture
async def guarded(probe: Probe) -> AsyncIterator[Server]:
    srv = Server(probe, tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"], secret=SECRET)
    async with srv:
        yield srv


async def test_tcp_right_secret_is_served(guarded: Server) -> None:
    url = str(guarded.endpoint("tcp"))
    async with AsyncClient(url, secret=SECRET, timeout=timeout(5)) as c:
        assert await c.call("add", 1, 2) == 3
    bc = await asyncio.to_thread(connect, url, secret=SECRET, timeout=timeout(5))
    try:
        assert await asyncio.to_thread(bc.call, "add", 2, 2) == 4
    finally:
        bc.close()


@pytest.mark.parametrize("secret", [None, b"wrong", SECRET + b"x"])
async def test_tcp_wrong_or_missing_secret_is_refused(
    guarded: Server, secret: bytes | None
) -> None:
    url = str(guarded.endpoint("tcp"))
    with pytest.raises(ConnectError, match="AUTH_FAILED"):
        async with AsyncClient(url, secret=secret, timeout=timeout(5), reconnect=False):
            pass
    with pytest.raises(ConnectError, match="AUTH_FAILED"):
        await asyncio.to_thread(connect, url, secret=secret, timeout=timeout(5))


async def test_requests_pipelined_behind_a_bad_hello_never_run(
    guarded: Server, probe: Probe
) -> None:
    ep = guarded.endpoint("tcp")
    reader, writer = await asyncio.open_connection(ep.host, ep.port)
    hello = encode_hello(Hello(extensions=(token_extension(b"guess"),)))
    writer.write(hello + encode_request(1, "count", ["sneaky"]) + encode_request(2, "add", [1, 1]))
    dec = FrameDecoder()
    out = []
    async with asyncio.timeout(timeout(5)):
        while chunk := await reader.read(4096):
            out += [decode_message(f) for f in dec.feed(chunk)]
    writer.close()
    assert len(out) == 1 and isinstance(out[0], Close)  # no WELCOME, no answer
    assert out[0].code == ErrorCode.AUTH_FAILED
    assert probe.runs.get("sneaky") is None


async def test_udp_right_secret_is_served_both_clients(guarded: Server, probe: Probe) -> None:
    url = str(guarded.endpoint("udp"))
    async with AsyncClient(url, secret=SECRET, timeout=timeout(5)) as c:
        assert await asyncio.gather(*(c.call("add", i, i) for i in range(50))) == [
            2 * i for i in range(50)
        ]
    bc = await asyncio.to_thread(connect, url, secret=SECRET, timeout=timeout(5))
    try:
        assert await asyncio.to_thread(bc.call, "count", "udp-ok") == 1
    finally:
        bc.close()


@pytest.mark.parametrize("secret", [None, b"wrong"])
async def test_udp_wrong_or_missing_secret_gets_unauthenticated(
    guarded: Server, probe: Probe, secret: bytes | None
) -> None:
    url = str(guarded.endpoint("udp"))
    async with AsyncClient(url, secret=secret, timeout=timeout(5)) as c:
        with pytest.raises(RemoteError) as info:
            await c.call("count", "denied")
    assert info.value.code == ErrorCode.UNAUTHENTICATED
    bc = await asyncio.to_thread(connect, url, secret=secret, timeout=timeout(5))
    try:
        with pytest.raises(RemoteError) as info:
            await asyncio.to_thread(bc.call, "count", "denied")
        assert info.value.code == ErrorCode.UNAUTHENTICATED
    finally:
        bc.close()
    assert probe.runs.get("denied") is None


class _Raw:
    """A plain UDP socket for hand-made datagrams; answers read with a timeout."""

    def __init__(self, server: Server) -> None:
        ep = server.endpoint("udp")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect((ep.host, ep.port))
        self.sock.settimeout(timeout(1))

    def answer(self) -> bytes | None:
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            return None

    def close(self) -> None:
        self.sock.close()


async def test_forged_replayed_and_stale_datagrams_never_run(guarded: Server, probe: Probe) -> None:
    auth = DatagramAuth(SECRET, epoch=guarded.datagram_auth.epoch)  # sealed for its epoch
    a, b = _Raw(guarded), _Raw(guarded)
    try:

        def scenario() -> dict[str, object]:
            seen: dict[str, object] = {}
            sealed = auth.seal(encode_request(7, "count", ["once"]), time.time())
            a.sock.send(sealed)
            reply = a.answer()
            assert reply is not None
            msg = decode_message(FrameDecoder().feed(auth.open(reply, time.time()))[0])
            seen["first"] = msg
            a.sock.send(sealed)  # the same bytes again, same source: a replay
            seen["replay-same-source"] = a.answer()
            b.sock.send(sealed)  # and from another source
            seen["replay-other-source"] = b.answer()
            forged = bytearray(auth.seal(encode_request(8, "count", ["forged"]), time.time()))
            forged[-30] ^= 0x01  # one bit of the body flipped: the MAC no longer matches
            a.sock.send(bytes(forged))
            seen["forged"] = a.answer()
            stale = auth.seal(encode_request(9, "count", ["stale"]), time.time() - 3600)
            a.sock.send(stale)
            seen["stale"] = a.answer()
            return seen

        seen = await asyncio.to_thread(scenario)
    finally:
        a.close()
        b.close()
    assert seen["first"] == Response(7, 1, 1)
    for case in ("replay-same-source", "replay-other-source", "forged", "stale"):
        reply = seen[case]
        assert isinstance(reply, bytes), case  # refused out loud, with the code
        err = decode_message(FrameDecoder().feed(reply)[0])
        assert isinstance(err, Error) and err.code == ErrorCode.UNAUTHENTICATED, case
    assert probe.runs == {"once": 1}
    assert guarded._datagrams[0].bad_datagrams == 4


async def test_client_ignores_answers_it_cannot_authenticate(guarded: Server) -> None:
    """A client with the secret drops unsealed or mis-sealed answers (here: a fake server
    that answers unsealed), and times out rather than believing them."""
    fake = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fake.bind(("127.0.0.1", 0))
    fake.setblocking(False)
    loop = asyncio.get_running_loop()
    port = fake.getsockname()[1]
    answered = asyncio.Event()

    def on_readable() -> None:
        data, addr = fake.recvfrom(65536)
        rid = int.from_bytes(data[8:12], "big")
        from sockstack.protocol.messages import encode_response

        fake.sendto(encode_response(rid, "believe me"), addr)
        answered.set()

    loop.add_reader(fake.fileno(), on_readable)
    try:
        async with AsyncClient(
            f"udp://127.0.0.1:{port}",
            secret=SECRET,
            timeout=timeout(0.5),
            retry=RetryPolicy(initial=timeout(1)),
        ) as c:
            with pytest.raises(CallTimeout, match="dropped a datagram"):
                await c.call("add", 1, 1)
        assert answered.is_set()
    finally:
        loop.remove_reader(fake.fileno())
        fake.close()


def test_cli_secret_from_file_and_environment(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("s3cret-from-file\n")
    with serving("--secret-file", str(secret_file)) as server:
        for url in server.urls:
            out = run(
                ["sockstack", "call", url, "add", "2", "3", "--secret-file", str(secret_file)]
            )
            assert out.returncode == 0 and out.stdout.strip() == "5", out.stderr
            out = run(
                ["sockstack", "call", url, "add", "2", "3"],
                env={"SOCKSTACK_SECRET": "s3cret-from-file"},
            )
            assert out.returncode == 0 and out.stdout.strip() == "5", out.stderr
            out = run(["sockstack", "call", url, "add", "2", "3"], env={"SOCKSTACK_SECRET": "nope"})
            assert out.returncode != 0
            assert "AUTH_FAILED" in out.stderr or "UNAUTHENTICATED" in out.stderr, out.stderr
    out = run(["sockstack", "serve", "--secret-file", str(tmp_path / "missing")])
    assert out.returncode == 2 and "--secret-file" in out.stderr
