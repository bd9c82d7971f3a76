"""The raw-socket examples run as the course notes describe them."""

from __future__ import annotations

import socket
import sys

from tests.cli.conftest import ROOT, Proc, free_port, run

EX = ROOT / "examples"


def test_raw_tcp_pair() -> None:
    server = Proc([sys.executable, str(EX / "raw_tcp_server.py"), "--port", "0", "--clients", "1"])
    port = server.wait_line(r"listening on 127\.0\.0\.1:(\d+)").group(1)
    out = run([sys.executable, str(EX / "raw_tcp_client.py"), "--port", port, "hello", "sockets"])
    assert (out.returncode, out.stdout) == (0, "hello\nsockets\n")
    assert server.wait() == 0  # it served its one client and left the accept loop


def test_raw_udp_pair() -> None:
    server = Proc([sys.executable, str(EX / "raw_udp_server.py"), "--port", "0", "--count", "2"])
    port = server.wait_line(r"listening on 127\.0\.0\.1:(\d+)").group(1)
    out = run([sys.executable, str(EX / "raw_udp_client.py"), "--port", port, "hello", "datagrams"])
    assert (out.returncode, out.stdout) == (0, "hello\ndatagrams\n")
    assert server.wait() == 0


def test_raw_udp_client_reports_loss() -> None:
    port = str(free_port(socket.SOCK_DGRAM))
    out = run(
        [
            sys.executable,
            str(EX / "raw_udp_client.py"),
            "--port",
            port,
            "--timeout",
            "0.2",
            "anyone?",
        ]
    )
    assert out.returncode == 1 and "no answer" in out.stderr


def test_examples_have_help() -> None:
    for script in sorted(EX.glob("raw_*.py")):
        out = run([sys.executable, str(script), "--help"])
        assert out.returncode == 0 and "usage:" in out.stdout
