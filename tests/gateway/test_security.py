"""The gateway's doors: the shared secret as a bearer token (checked before any work), HTTPS
with the host's TLS context, CORS off by default and on for the origins given, and the refusal
of a plain endpoint open to the network without a secret."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from sockstack import Server, Service, method
from sockstack.errors import ErrorCode
from sockstack.gateway import Gateway
from sockstack.transport.tls import server_context
from tests.gateway.support import arequest, gateway

SECRET = "s3cret-token"


class Counter(Service):
    def __init__(self) -> None:
        self.runs = 0

    @method(readonly=True)
    def add(self, a: int, b: int) -> int:
        self.runs += 1
        return a + b


async def test_the_secret_is_a_bearer_token_checked_before_anything_runs() -> None:
    svc = Counter()
    async with gateway(svc, tcp=["127.0.0.1:0"], secret=SECRET) as (_, port):
        for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": SECRET}):
            r = await arequest(port, "POST", "/rpc/add", [1, 2], headers=headers)
            assert (r.status, r.problem["code"]) == (401, ErrorCode.AUTH_FAILED)
            assert r.headers["www-authenticate"].startswith("Bearer")
        assert svc.runs == 0  # refused before the method ran
        ok = {"authorization": f"Bearer {SECRET}"}
        r = await arequest(port, "POST", "/rpc/add", [1, 2], headers=ok)
        assert (r.status, r.json(), svc.runs) == (200, 3, 1)
        # ?access_token= for GET only (a browser's EventSource cannot send headers)
        r = await arequest(port, "GET", f"/rpc/add?a=1&b=1&access_token={SECRET}")
        assert (r.status, r.json()) == (200, 2)
        r = await arequest(port, "POST", f"/rpc/add?access_token={SECRET}", [1, 2])
        assert r.status == 401
        # the probes answer without it
        assert (await arequest(port, "GET", "/healthz")).status == 200
        assert (await arequest(port, "GET", "/readyz")).status == 200
        assert (await arequest(port, "GET", "/metrics")).status == 401


async def test_a_plain_endpoint_open_to_the_network_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="without a secret"):
        Server(Counter(), http=["0.0.0.0:0"])
    Server(Counter(), http=["0.0.0.0:0"], insecure=True)  # said out loud: allowed


async def test_https_uses_the_hosts_tls_context(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ctx = server_context(tmp_path / "server.pem")
    client = ssl.create_default_context()
    ca.configure_trust(client)
    async with gateway(
        Counter(), tcp=["127.0.0.1:0"], tls_context=ctx, http=["https://127.0.0.1:0"]
    ) as (server, port):
        assert server.endpoint("https").port == port
        r = await arequest(port, "POST", "/rpc/add", [2, 2], context=client)
        assert (r.status, r.json()) == (200, 4)
    with pytest.raises(ValueError, match="tls_context"):
        async with gateway(Counter(), tcp=["127.0.0.1:0"], http=["https://127.0.0.1:0"]):
            pass


async def test_cors_is_off_by_default_and_on_for_the_origins_given() -> None:
    origin = {"origin": "https://app.example"}
    async with gateway(Counter(), tcp=["127.0.0.1:0"]) as (_, port):
        r = await arequest(port, "POST", "/rpc/add", [1, 1], headers=origin)
        assert r.status == 200 and "access-control-allow-origin" not in r.headers
    gw = Gateway(["127.0.0.1:0"], cors=["https://app.example"])
    async with gateway(Counter(), patterns=[gw], tcp=["127.0.0.1:0"], http=()) as (_, port):
        r = await arequest(port, "POST", "/rpc/add", [1, 1], headers=origin)
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert r.headers["vary"] == "Origin"
        pre = {
            **origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type",
        }
        r = await arequest(port, "OPTIONS", "/rpc/add", headers=pre)
        assert r.status == 204
        assert "POST" in r.headers["access-control-allow-methods"]
        assert r.headers["access-control-allow-headers"] == "content-type"
        other = {"origin": "https://evil.example"}
        r = await arequest(port, "POST", "/rpc/add", [1, 1], headers=other)
        assert "access-control-allow-origin" not in r.headers
