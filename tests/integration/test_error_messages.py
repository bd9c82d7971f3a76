"""Connection failures say what is most likely wrong, and never suggest that a call ran when
none was sent (issue 10, item 13): a plain client on a TLS port, a tls:// client on a plain
port, mutual TLS without a client certificate, a server that does not speak sockstack — from
both clients, over real sockets (throwaway certificates from trustme, as in test_tls.py)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import trustme

from sockstack import AsyncClient, ConnectError, ConnectionLost, Server, connect
from sockstack.transport.tls import client_context, server_context, tls_reason
from tests.conftest import Probe, timeout

# Words that tell the caller a call may have run: never right when none was sent.
MAYBE_RAN = "may or may not"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    ca = trustme.CA()
    d = tmp_path_factory.mktemp("pki")
    files = {"ca": d / "ca.pem", "server": d / "server.pem", "client": d / "client.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(files["server"]))
    ca.issue_cert("client@sockstack.test").private_key_and_cert_chain_pem.write_to_path(
        str(files["client"])
    )
    return files


@pytest.fixture
async def servers(pki: dict[str, Path]) -> AsyncIterator[dict[str, str]]:
    """A plain server, a TLS server and a mutual-TLS server, in this loop: their URLs."""
    plain = Server(Probe(), tcp=["127.0.0.1:0"])
    tls = Server(Probe(), tls=["127.0.0.1:0"], tls_context=server_context(pki["server"]))
    mtls = Server(
        Probe(),
        tls=["127.0.0.1:0"],
        tls_context=server_context(pki["server"], client_ca=pki["ca"]),
    )
    for srv in (plain, tls, mtls):
        await srv.start()
    try:
        yield {
            "plain": str(plain.endpoint("tcp")),
            "tls": str(tls.endpoint("tls")),
            "mtls": str(mtls.endpoint("tls")),
        }
    finally:
        for srv in (plain, tls, mtls):
            await srv.shutdown()


async def _async_failure(url: str, ctx: ssl.SSLContext | None) -> BaseException:
    """What connecting the asyncio client (and one call) raises."""
    with pytest.raises(Exception) as info:
        async with AsyncClient(
            url, tls=ctx, timeout=timeout(5), connect_timeout=timeout(5), reconnect=False
        ) as c:
            await c.call("echo", "never sent")
    return info.value


async def _blocking_failure(url: str, ctx: ssl.SSLContext | None) -> BaseException:
    """What connecting the blocking client (and one call) raises."""

    def attempt() -> None:
        with connect(url, tls=ctx, timeout=timeout(5), connect_timeout=timeout(5)) as c:
            c.call("echo", "never sent")

    with pytest.raises(Exception) as info:
        await asyncio.to_thread(attempt)
    return info.value


CLIENTS: dict[str, Callable[[str, ssl.SSLContext | None], object]] = {
    "asyncio": _async_failure,
    "blocking": _blocking_failure,
}


def _nothing_ran(exc: BaseException) -> str:
    """The message of ``exc``, after checking that it says no call ran."""
    text = str(exc)
    assert type(exc) is ConnectError, f"{type(exc).__name__}: {text}"
    assert not isinstance(exc, ConnectionLost)
    assert MAYBE_RAN not in text, text
    assert "code 0" not in text, text  # no code was received: none is shown
    assert text.count("127.0.0.1:") == 1, text  # said once, about one server
    return text


@pytest.mark.parametrize("client", CLIENTS)
async def test_plain_client_on_a_tls_port_is_told_to_use_tls(
    servers: dict[str, str], client: str
) -> None:
    plain_url = servers["tls"].replace("tls://", "tcp://")
    exc = await CLIENTS[client](plain_url, None)  # type: ignore[misc]
    text = _nothing_ran(exc)
    assert "expects TLS" in text and "tls://" in text, text


@pytest.mark.parametrize("client", CLIENTS)
async def test_tls_client_on_a_plain_port_is_told_the_server_does_not_speak_tls(
    servers: dict[str, str], pki: dict[str, Path], client: str
) -> None:
    tls_url = servers["plain"].replace("tcp://", "tls://")
    exc = await CLIENTS[client](tls_url, client_context(pki["ca"]))  # type: ignore[misc]
    text = _nothing_ran(exc)
    assert "does not speak TLS" in text and "tcp://" in text, text


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
@pytest.mark.parametrize("client", CLIENTS)
async def test_mutual_tls_without_a_client_certificate_says_one_is_required(
    servers: dict[str, str], pki: dict[str, Path], client: str, version: ssl.TLSVersion
) -> None:
    # TLS 1.3: the server checks the certificate after the client's handshake is done, and
    # drops the connection before WELCOME. TLS 1.2: it drops it during the handshake.
    ctx = client_context(pki["ca"])
    ctx.maximum_version = version
    exc = await CLIENTS[client](servers["mtls"], ctx)  # type: ignore[misc]
    text = _nothing_ran(exc)
    assert "client certificate" in text, text
    # ... and with one, the same server answers (the message was about the certificate).
    good = client_context(pki["ca"], cert=pki["client"])
    good.maximum_version = version
    async with AsyncClient(servers["mtls"], tls=good, timeout=timeout(5)) as c:
        assert await c.call("echo", 1) == 1


@pytest.fixture
def not_sockstack() -> Iterator[Callable[[bytes], object]]:
    """Servers that answer any connection with fixed bytes and close it (not sockstack)."""
    made: list[asyncio.Server] = []

    async def start(answer: bytes) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(answer)
            await writer.drain()
            writer.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        made.append(srv)
        return f"tcp://127.0.0.1:{srv.sockets[0].getsockname()[1]}"

    yield start
    for srv in made:
        srv.close()


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_server_that_is_not_sockstack_is_named_as_such(
    not_sockstack: Callable[[bytes], object], client: str
) -> None:
    # An HTTP server: 16 bytes and more, whose magic is not sockstack's.
    url = await not_sockstack(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")  # type: ignore[misc]
    text = _nothing_ran(await CLIENTS[client](url, None))  # type: ignore[misc]
    assert "not sockstack" in text and "tls://" in text, text
    # A TLS server's alert record (7 bytes) and the end of the stream: TLS expected.
    url = await not_sockstack(bytes.fromhex("15030100020246"))  # type: ignore[misc]
    text = _nothing_ran(await CLIENTS[client](url, None))  # type: ignore[misc]
    assert "expects TLS" in text, text


async def test_a_call_after_the_connection_ended_without_reconnect_did_not_run(
    probe: Probe,
) -> None:
    """reconnect=False and the connection gone: a new call is never sent, so it fails with
    ConnectError (it did not run), not ConnectionLost (it may have run)."""
    srv = Server(probe, tcp=["127.0.0.1:0"])
    await srv.start()
    try:
        c = AsyncClient(str(srv.endpoint("tcp")), timeout=timeout(5), reconnect=False)
        await c.connect()
        channel = c.channel
        assert channel is not None and channel.kind == "stream"
        assert await c.call("echo", 1) == 1
        stream = channel.stream  # type: ignore[union-attr]
        assert stream is not None
        stream.abort()  # the connection drops with nothing in flight
        await asyncio.wait_for(asyncio.shield(stream.closed), timeout(5))
        with pytest.raises(ConnectError) as info:
            await c.call("echo", 2)
        assert not isinstance(info.value, ConnectionLost)
        assert MAYBE_RAN not in str(info.value) and "not sent" in str(info.value), info.value
        await c.close()
    finally:
        await srv.shutdown()


@pytest.mark.parametrize(
    ("reason", "words"),
    [
        ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "requires a client certificate"),
        ("TLSV1_ALERT_UNKNOWN_CA", "does not trust the CA of the client certificate"),
        ("SSLV3_ALERT_BAD_CERTIFICATE", "refused the client certificate"),
        ("WRONG_VERSION_NUMBER", "does not speak TLS"),
        ("TLSV1_ALERT_PROTOCOL_VERSION", "no TLS version in common"),
    ],
)
def test_tls_alerts_are_explained(reason: str, words: str) -> None:
    """Alerts other TLS servers send (an asyncio server sends none: the live tests above)."""
    exc = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()}")
    exc.reason = reason
    text = tls_reason(exc)
    assert text.startswith(f"{reason}: ") and words in text, text
