"""Issue 10 item 8: a plain endpoint on an address other machines can reach, with no secret, is
refused unless asked for (as Mosquitto 2 and Redis's protected mode), library and CLI alike."""

from __future__ import annotations

import pytest

from sockstack import AsyncClient, Server
from sockstack.host.server import refuse_unprotected
from sockstack.transport.urls import Endpoint, is_loopback_host
from tests.cli.conftest import Proc, run
from tests.conftest import Probe


@pytest.mark.parametrize(
    ("kind", "address"),
    [("tcp", "0.0.0.0:0"), ("udp", "0.0.0.0:0"), ("tcp", "[::]:0"), ("tcp", "10.1.2.3:0")],
)
def test_the_library_refuses_an_open_door(kind: str, address: str) -> None:
    with pytest.raises(ValueError, match="without a secret") as info:
        Server(Probe(), **{kind: [address]})  # type: ignore[arg-type]
    assert "--insecure" in str(info.value) and "127.0.0.1" in str(info.value)


def test_loopback_a_secret_tls_or_insecure_pass() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        assert is_loopback_host(host)
    assert not is_loopback_host("0.0.0.0") and not is_loopback_host("example.org")
    refuse_unprotected([Endpoint("tcp", "0.0.0.0", 0)], b"s3cret")
    refuse_unprotected([Endpoint("udp", "0.0.0.0", 0)], None, insecure=True)
    refuse_unprotected([Endpoint("tls", "0.0.0.0", 0)], None)
    Server(Probe(), tcp=["0.0.0.0:0"], secret=b"s3cret")


async def test_an_insecure_server_on_every_address_serves() -> None:
    async with Server(Probe(), tcp=["0.0.0.0:0"], insecure=True) as srv:
        port = srv.endpoint("tcp").port
        async with AsyncClient(f"tcp://127.0.0.1:{port}") as client:  # loopback traffic only
            assert await client.call("add", 2, 3) == 5


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
def test_the_cli_refuses_with_the_reason(workers: list[str]) -> None:
    out = run(["sockstack", "serve", *workers, "--tcp", "0.0.0.0:0"])
    assert out.returncode == 2, out.stderr
    assert "without a secret" in out.stderr and "--insecure" in out.stderr


def test_the_cli_serves_with_insecure() -> None:
    proc = Proc(["sockstack", "serve", "--insecure", "--tcp", "0.0.0.0:0"])
    try:
        port = proc.wait_line(r"serving Demo on tcp://\S+:(\d+)").group(1)
        out = run(["sockstack", "call", f"tcp://127.0.0.1:{port}", "add", "2", "3"])
        assert (out.returncode, out.stdout.strip()) == (0, "5")
    finally:
        assert proc.stop() == 0
