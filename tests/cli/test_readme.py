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
