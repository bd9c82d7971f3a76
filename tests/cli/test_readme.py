"""The README's quickstart, run as written (on free ports instead of 5050/5051)."""

from __future__ import annotations

import re
import shlex
import socket
import sys
from pathlib import Path

from tests.cli.conftest import ROOT, Proc, free_port, run

README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    """The fenced code blocks whose info string is ``lang`` ("" for bare fences), in order."""
    found: list[str] = []
    current: list[str] | None = None
    current_lang = ""
    for line in README.splitlines():
        if line.startswith("```"):
            if current is None:
                current, current_lang = [], line[3:].strip()
            else:
                if current_lang == lang:
                    found.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return found


def test_setup_commands_are_the_two_make_targets() -> None:
    first = blocks("")[0]
    assert [line.split()[:2] for line in first.strip().splitlines()] == [
        ["make", "run"],
        ["make", "test"],
    ]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_quickstart(tmp_path: Path) -> None:
    service_src, client_src = blocks("python")[:2]
    assert service_src.startswith("# demo_service.py\n")
    (tmp_path / "demo_service.py").write_text(service_src)
    tcp_port, udp_port = str(free_port()), str(free_port(socket.SOCK_DGRAM))

    def ports(text: str) -> str:
        return text.replace("5050", tcp_port).replace("5051", udp_port)

    commands = [c for c in blocks("")[1].strip().splitlines() if c.startswith("sockstack ")]
    assert commands[0].startswith("sockstack serve demo_service:Calculator")
    server = Proc(shlex.split(ports(commands[0])), cwd=tmp_path)
    try:
        server.wait_line(rf"serving Calculator on udp://127\.0\.0\.1:{udp_port}")
        for line in commands[1:]:
            command, _, comment = line.partition("#")
            out = run(shlex.split(ports(command)), cwd=tmp_path)
            assert out.returncode == 0, out.stderr
            expected = re.match(r"\s*prints (.*)", comment)
            if expected:
                assert out.stdout.strip() == expected.group(1).strip()
            else:
                assert re.search(r"min .* p50 .* p99 .* max", out.stdout)
        script = tmp_path / "client.py"
        script.write_text(ports(client_src))
        out = run([sys.executable, str(script)], cwd=tmp_path, seconds=60)
        assert out.returncode == 0, out.stderr
    finally:
        assert server.stop() == 0


def test_pubsub_quickstart(tmp_path: Path) -> None:
    commands = [c for c in blocks("shell")[0].strip().splitlines() if c.startswith("sockstack ")]
    client_src = blocks("python")[2]
    tcp_port, udp_port = str(free_port()), str(free_port(socket.SOCK_DGRAM))

    def ports(text: str) -> str:
        return text.replace("5052", tcp_port).replace("5053", udp_port)

    assert commands[0].startswith("sockstack broker")
    broker = Proc(shlex.split(ports(commands[0])), cwd=tmp_path)
    try:
        broker.wait_line(rf"serving broker on udp://127\.0\.0\.1:{udp_port}")
        sub_cmd, _, _ = commands[1].partition("#")
        subscriber = Proc(shlex.split(ports(sub_cmd)), cwd=tmp_path)
        try:
            # `sub` returns from subscribe() before it prints anything: wait for the broker to
            # have it, then publish.
            _wait_for_subscription(ports(f"tcp://127.0.0.1:{tcp_port}"))
            for line in commands[2:]:
                out = run(shlex.split(ports(line.partition("#")[0])), cwd=tmp_path)
                assert out.returncode == 0, out.stderr
            subscriber.wait_line(r"^sensors\.room1\.temp 21\.5$")
            subscriber.wait_line(r"^sensors\.room2\.temp 19$")
            assert subscriber.wait() == 0  # --count 2: done
        finally:
            subscriber.stop()
        script = tmp_path / "pubsub.py"
        script.write_text(ports(client_src))
        out = run([sys.executable, str(script)], cwd=tmp_path, seconds=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "sensors.room1.temp 21.5"
    finally:
        assert broker.stop() == 0


def _wait_for_subscription(url: str) -> None:
    import time

    from sockstack import connect
    from tests.conftest import timeout

    deadline = time.monotonic() + timeout(10)
    with connect(url) as c:
        while c.call("broker.stats")["subscriptions"] < 1:  # bounded by the deadline
            assert time.monotonic() < deadline, "the subscriber never subscribed"
            time.sleep(0.01)
