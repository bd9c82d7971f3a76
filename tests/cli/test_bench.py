"""The benchmark suite runs (a small slice of it, to keep the suite fast) and writes its files;
`sockstack inspect` prints its tables, with rich or without it."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

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


def _bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = run(
        [sys.executable, "-m", "bench", "--quick", *args, "--out", str(tmp_path)],
        cwd=ROOT,
        seconds=180,
    )
    assert out.returncode == 0, out.stderr
    data: dict[str, Any] = json.loads((tmp_path / "latest.json").read_text())
    return data


def _rows(data: dict[str, Any], scenario: str, system: str) -> list[dict[str, Any]]:
    return [
        r for r in data["results"] if r["scenario"].startswith(scenario) and r["system"] == system
    ]


def _target(data: dict[str, Any], start: str) -> dict[str, Any]:
    (t,) = [t for t in data["targets"] if t["target"].startswith(start)]
    return t


OBJECT_CALL = "remote object call, sequential 64 B"
OBJECT_CHAIN = "object chain, 10 dependent calls"


def test_bench_objects_sockstack_rows_run_or_skip_with_reason(tmp_path: Path) -> None:
    # The sockstack rows of the remote-object scenarios (issue 13) run when sockstack.objects
    # exists, and are skipped with the reason while it does not; the run succeeds either way.
    data = _bench(tmp_path, "--scenario", "objects", "--scenario", "chain", "--only", "sockstack")
    built = importlib.util.find_spec("sockstack.objects") is not None
    names = ("sockstack.objects", "sockstack.objects, pipelined", "sockstack.objects, one by one")
    if not built:
        assert data["results"] == []
        for name in names:
            assert "sockstack.objects cannot be imported" in data["skipped"][name]
        for start in (
            f"{OBJECT_CALL}, same core: sockstack / Pyro5",
            f"{OBJECT_CALL}, two cores: sockstack / RPyC",
            f"{OBJECT_CHAIN}, two cores: sockstack pipelined / Pyro5 one by one",
        ):
            assert _target(data, start)["measured"] is None
            assert _target(data, start)["met"] is None
        md = (tmp_path / "latest.md").read_text()
        assert "## Skipped" in md and "- sockstack.objects: sockstack.objects cannot" in md
        return
    for scenario, name in ((OBJECT_CALL, names[0]), (OBJECT_CHAIN, names[1])):
        rows = _rows(data, scenario, name)
        assert {r["placement"] for r in rows} == {"same core", "two cores"}
        assert all(r["calls"] > 0 and r["p50_us"] > 0 for r in rows)


def test_bench_objects_peers(tmp_path: Path) -> None:
    # Pyro5 and RPyC (the bench extra) serve the Counter; both scenarios measure them in both
    # placements, and a target against a system that did not run reads "-" (None).
    pytest.importorskip("Pyro5")
    pytest.importorskip("rpyc")
    data = _bench(tmp_path, "--scenario", "objects", "--scenario", "chain", "--only", "objects")
    for scenario, systems in (
        (OBJECT_CALL, ("Pyro5 objects", "RPyC objects")),
        (OBJECT_CHAIN, ("Pyro5 objects, one by one", "RPyC objects, one by one")),
    ):
        for system in systems:
            rows = _rows(data, scenario, system)
            assert {r["placement"] for r in rows} == {"same core", "two cores"}, system
            assert all(r["calls"] > 0 and r["calls_per_s"] > 0 and r["p50_us"] > 0 for r in rows)
    chain_rows = _rows(data, OBJECT_CHAIN, "Pyro5 objects, one by one")
    assert all(r["payload"] == 0 for r in chain_rows)  # chains carry no payload: MB/s is "-"
    md = (tmp_path / "latest.md").read_text()
    assert "| Pyro5 objects, one by one | same core |" in md
    assert "| RPyC objects | two cores |" in md
    ss = bool(_rows(data, OBJECT_CALL, "sockstack.objects"))
    for start in (
        f"{OBJECT_CALL}, same core: sockstack / Pyro5",
        f"{OBJECT_CALL}, two cores: sockstack / RPyC",
    ):
        assert (_target(data, start)["measured"] is not None) == ss


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


def test_bench_batch_and_feature_rows(tmp_path: Path) -> None:
    # Issue 17's rows: call_many in both clients (pipelined), the RPC features' cost per call.
    data = _bench(
        tmp_path, "--scenario", "pipelined", "--scenario", "features", "--only", "sockstack"
    )
    for system in ("sockstack call_many (BATCH requests)", "sockstack call_many, blocking client"):
        (row,) = _rows(data, "pipelined", system)
        assert row["calls"] > 0 and row["calls_per_s"] > 0
        assert row["cpu_s_per_million"] > 0
    (timed,) = _rows(data, "pipelined", "sockstack iter_many, each result timed")
    assert timed["p99_us"] > 0
    features = [r for r in data["results"] if r["scenario"].startswith("RPC features")]
    assert {r["system"] for r in features} == {
        "sockstack, plain call",
        "sockstack, metadata on the call (1 entry)",
        "sockstack, client interceptor (no-op)",
        "sockstack, server interceptor (no-op)",
        "sockstack, plain hints (validated)",
        "sockstack, dataclass hint (converted)",
        "sockstack, plain call (again)",
    }
    assert all(r["calls_per_s"] > 0 for r in features)
