"""The benchmark suite runs (a small slice of it, to keep the suite fast) and writes its files."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.conftest import run


def test_bench_slice_writes_results(tmp_path: Path) -> None:
    out = run(
        [
            "sockstack",
            "bench",
            "--quick",
            "--scenario",
            "seq-udp",
            "--only",
            "sockstack",
            "--out",
            str(tmp_path),
        ],
        seconds=120,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "latest.json").read_text())
    rows = [r for r in data["results"] if r["system"] == "sockstack UDP"]
    assert {r["placement"] for r in rows} == {"same core", "two cores"}
    assert all(r["calls"] > 0 and r["calls_per_s"] > 0 and r["p50_us"] > 0 for r in rows)
    md = (tmp_path / "latest.md").read_text()
    assert "## sequential UDP 64 B" in md and "| sockstack UDP | same core |" in md
    assert "sequential UDP 64 B" in out.stdout  # the rich table


def test_inspect_command() -> None:
    out = run(["sockstack", "inspect", "--payload", "64"])
    assert out.returncode == 0, out.stderr
    assert "efficiency (payload / total)" in out.stdout
    assert "40.8%" in out.stdout  # 64 / 157 for a TCP request: the model in the docs


def test_inspect_publish() -> None:
    out = run(["sockstack", "inspect", "--publish", "sensors.room1.temp", "--payload", "64"])
    assert out.returncode == 0, out.stderr
    assert "sockstack meta (topic)" in out.stdout and "subscription id + topic" in out.stdout
    # PUB: 18 Ethernet + 20 IPv4 + 32 TCP + 16 header + 18 topic + 2 msgpack + 64 = 170 bytes
    assert "37.6%" in out.stdout
