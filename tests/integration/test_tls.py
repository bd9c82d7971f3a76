"""TLS over TCP with throwaway certificates (trustme; nothing committed): round trips from both
clients, untrusted certificates refused, mutual TLS, the CLI."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from sockstack import AsyncClient, ConnectError, Server, ServerLimits, StreamLimits, connect
from sockstack.transport.tls import client_context, server_context
from tests.cli.conftest import Proc, run
from tests.conftest import Probe, timeout


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pki(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEM files: the CA, a server certificate for 127.0.0.1 and localhost, a client
    certificate from the same CA, and a client certificate from another CA."""
    d = tmp_path_factory.mktemp("pki")
    files = {"ca": d / "ca.pem", "server": d / "server.pem", "client": d / "client.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(
        str(files["server"])
    )
    ca.issue_cert("client@sockstack.test").private_key_and_cert_chain_pem.write_to_path(
        str(files["client"])
    )
    stranger = trustme.CA().issue_cert("mallory@sockstack.test")
    files["stranger"] = d / "stranger.pem"
    stranger.private_key_and_cert_chain_pem.write_to_path(str(files["stranger"]))
    return files


async def _server(probe: Probe, ctx: ssl.SSLContext) -> Server:
    limits = ServerLimits(stream=StreamLimits(handshake_timeout=timeout(2)))
    srv = Server(probe, tls=["127.0.0.1:0"], tls_context=ctx, limits=limits)
    await srv.start()
    return srv


@pytest.fixture
async def tls_server(probe: Probe, pki: dict[str, Path]) -> AsyncIterator[Server]:
    srv = await _server(probe, server_context(pki["server"]))
    try:
        yield srv
    finally:
        await srv.shutdown()


@pytest.fixture
async def mtls_server(probe: Probe, pki: dict[str, Path]) -> AsyncIterator[Server]:
    srv = await _server(probe, server_context(pki["server"], client_ca=pki["ca"]))
    try:
        yield srv
    finally:
        await srv.shutdown()


async def test_round_trip_async_and_blocking(tls_server: Server, pki: dict[str, Path]) -> None:
    url = str(tls_server.endpoint("tls"))
    assert url.startswith("tls://127.0.0.1:")
    ctx = client_context(pki["ca"])
    async with AsyncClient(url, tls=ctx, timeout=timeout(5)) as c:
        assert await c.call("add", 2, 3) == 5
        big = b"t" * 300_000  # several TLS records, and the large-frame paths
        assert await c.call("echo", big) == big

    def blocking() -> list[object]:
        with connect(url, tls=ctx, timeout=timeout(5)) as bc:
            return [bc.call("add", 1, 2), bc.call("echo", big), bc.ping() is not None]

    assert await asyncio.to_thread(blocking) == [3, big, True]


async def test_untrusted_certificate_is_refused(tls_server: Server) -> None:
    url = str(tls_server.endpoint("tls"))
    other = ssl.create_default_context()
    trustme.CA().configure_trust(other)
    with pytest.raises(ConnectError, match="TLS: CERTIFICATE_VERIFY_FAILED"):
        async with AsyncClient(url, tls=other, timeout=timeout(5)):
            pass
    with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        async with AsyncClient(url, timeout=timeout(5)):  # the system's CAs: not ours
            pass
    with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        await asyncio.to_thread(connect, url, tls=other, timeout=timeout(5))


async def test_wrong_host_name_is_refused(ca: trustme.CA, probe: Probe, tmp_path: Path) -> None:
    pem = tmp_path / "elsewhere.pem"
    ca.issue_cert("elsewhere.example").private_key_and_cert_chain_pem.write_to_path(str(pem))
    srv = await _server(probe, server_context(pem))
    try:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        with pytest.raises(ConnectError, match="TLS"):
            async with AsyncClient(str(srv.endpoint("tls")), tls=ctx, timeout=timeout(5)):
                pass
    finally:
        await srv.shutdown()


async def test_mutual_tls(mtls_server: Server, pki: dict[str, Path]) -> None:
    url = str(mtls_server.endpoint("tls"))
    good = client_context(pki["ca"], cert=pki["client"])
    async with AsyncClient(url, tls=good, timeout=timeout(5)) as c:
        assert await c.call("add", 20, 22) == 42
    for ctx in (client_context(pki["ca"]), client_context(pki["ca"], cert=pki["stranger"])):
        with pytest.raises(ConnectError):
            async with AsyncClient(url, tls=ctx, timeout=timeout(5), reconnect=False) as c:
                await c.call("add", 1, 1)
        with pytest.raises((ConnectError, OSError)):
            await asyncio.to_thread(
                lambda ctx=ctx: connect(url, tls=ctx, timeout=timeout(5)).call("add", 1, 1)
            )


async def test_plain_client_on_a_tls_port_fails_fast(tls_server: Server) -> None:
    plain = str(tls_server.endpoint("tls")).replace("tls://", "tcp://")
    with pytest.raises(ConnectError):
        async with AsyncClient(plain, timeout=timeout(5), connect_timeout=timeout(5)):
            pass


def test_cli_serve_and_call_over_tls(pki: dict[str, Path]) -> None:
    server = Proc(
        [
            "sockstack",
            "serve",
            "--tls",
            "127.0.0.1:0",  # the banner names the port: nothing picked first, nothing raced
            "--cert",
            str(pki["server"]),
            "--client-ca",
            str(pki["ca"]),
        ]
    )
    try:
        port = server.wait_line(r"serving Demo on tls://127\.0\.0\.1:(\d+)").group(1)
        url = f"tls://127.0.0.1:{port}"
        out = run(
            [
                "sockstack",
                "call",
                url,
                "add",
                "2",
                "3",
                "--ca",
                str(pki["ca"]),
                "--cert",
                str(pki["client"]),
            ]
        )
        assert out.returncode == 0 and out.stdout.strip() == "5", out.stderr
        out = run(["sockstack", "call", url, "add", "2", "3", "--ca", str(pki["ca"])])
        assert out.returncode == 3, out.stdout  # no client certificate: refused
        out = run(
            [
                "sockstack",
                "ping",
                url,
                "--count",
                "3",
                "--ca",
                str(pki["ca"]),
                "--cert",
                str(pki["client"]),
            ]
        )
        assert out.returncode == 0 and "3 pings" in out.stdout, out.stderr
    finally:
        assert server.stop() == 0
    out = run(["sockstack", "serve", "--tls", "127.0.0.1:0"])
    assert out.returncode == 2 and "--cert" in out.stderr


async def test_metrics_count_tls_calls_bytes_and_connections(
    probe: Probe, pki: dict[str, Path]
) -> None:
    """The metrics interceptor over TLS (issue 12 item 5): calls under transport "tls", bytes
    counted through the TLS transport (before encryption), the connection counted while open."""
    from prometheus_client import generate_latest

    from sockstack.metrics import ServerMetrics

    metrics = ServerMetrics()
    srv = Server(
        probe,
        tls=["127.0.0.1:0"],
        tls_context=server_context(pki["server"]),
        interceptors=[metrics],
    )
    await srv.start()
    big = b"t" * 300_000
    try:
        async with AsyncClient(
            str(srv.endpoint("tls")), tls=client_context(pki["ca"]), timeout=timeout(5)
        ) as c:
            assert await c.call("echo", big) == big
            assert srv.open_connections() == {"tcp": 0, "tls": 1}
    finally:
        await srv.shutdown()
    text = generate_latest(metrics.registry).decode()
    assert 'sockstack_server_calls_total{method="echo",transport="tls"} 1.0' in text
    assert srv.traffic is not None
    received, sent = srv.traffic["tls"]
    assert received > len(big) and sent > len(big)
    assert srv.traffic["tcp"] == [0, 0]
