"""The benchmark suite runs (a small slice of it, to keep the suite fast) and writes its files;
`sockstack inspect` prints its tables, with rich or without it."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import ROOT, run


def test_bench_slice_writes_results(tmp_path: Path) -> None:
    # The suite is a repository tool (bench/ at the root), not part of the installed package.
    out = run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--scenario",
            "seq-udp",
            "--only",
            "sockstack",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
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


# `sockstack inspect` without rich (not a runtime dependency): rich made unimportable in a fresh
# interpreter, as on a machine where only `pip install sockstack` ran.
_WITHOUT_RICH = (
    "import sys; sys.modules['rich'] = None; from sockstack.cli import main; sys.exit(main())"
)


def _figures(text: str) -> list[str]:
    return re.findall(r"\d[\d,.]*%?", text)


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "--payload", "64"],
        ["inspect", "--publish", "sensors.room1.temp", "--payload", "64"],
    ],
    ids=["call", "publish"],
)
def test_inspect_without_rich(args: list[str]) -> None:
    plain = run([sys.executable, "-c", _WITHOUT_RICH, *args])
    assert plain.returncode == 0, plain.stderr
    assert "Traceback" not in plain.stderr
    if args[1] == "--publish":
        assert "sockstack meta (topic)" in plain.stdout
        assert "subscription id + topic" in plain.stdout
        assert "37.6%" in plain.stdout
    else:
        assert "efficiency (payload / total)" in plain.stdout
        assert "40.8%" in plain.stdout  # 64 / 157 for a TCP request, as with rich
    # Every figure rich prints, in the same order, and the same row labels.
    pytest.importorskip("rich")
    rich = run(["sockstack", *args])
    assert rich.returncode == 0, rich.stderr
    assert _figures(plain.stdout) == _figures(rich.stdout)
    labels = [line.split("  ")[0] for line in plain.stdout.splitlines() if "  " in line]
    for label in labels:
        if label.strip("- "):
            assert label.strip() in rich.stdout
