"""The bench's edge scenario (bench/edge.py, issue 15) runs in its quick form: readings into a
relay acknowledged on disk, in memory and not at all, raw SQLite inserts of the same rows beside
them, forwarding a backlog to the sink, and the example pipeline's reduction when it is there.
No figure is asserted beyond "measured" (speed belongs in the bench)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.cli.conftest import ROOT, run


def _rows(data: dict[str, Any], scenario: str) -> dict[str, dict[str, Any]]:
    return {r["system"]: r for r in data["results"] if r["scenario"] == scenario}


def test_edge_scenario_quick(tmp_path: Path) -> None:
    from bench.edge import (
        FORWARD,
        INGEST,
        PIPELINE,
        RAW_1000,
        RAW_BATCHED,
        RAW_PACED,
        RAW_RELAY,
        REDUCTION,
        RELAY_BATCHED,
        RELAY_DISK,
        RELAY_FORWARD,
        RELAY_MEMORY,
        RELAY_NONE,
        RELAY_PACED,
    )

    out = run(
        [sys.executable, "-m", "bench", "--quick", "--scenario", "edge", "--out", str(tmp_path)],
        cwd=ROOT,
        seconds=120,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "latest.json").read_text())
    if "fsync would cost nothing" in data["skipped"].get("edge ingest", ""):
        pytest.skip(data["skipped"]["edge ingest"])  # the repository is on a tmpfs
    assert {k: v for k, v in data["skipped"].items() if k != PIPELINE} == {}
    ingest = _rows(data, INGEST)
    assert set(ingest) == {
        RELAY_DISK,
        RELAY_PACED,
        RELAY_MEMORY,
        RELAY_NONE,
        RELAY_BATCHED,
        RAW_RELAY,
        RAW_PACED,
        RAW_BATCHED,
        RAW_1000,
    }
    for row in ingest.values():
        assert row["calls"] > 0 and row["calls_per_s"] > 0, row
        assert row["rows_per_commit"] >= 1, row
    for name in (RELAY_DISK, RELAY_PACED, RELAY_MEMORY, RELAY_BATCHED):
        row = ingest[name]
        assert row["placement"] == "two cores" and row["p50_us"] > 0, row
        assert 0 < row["load_cpu_share"] and row["commits"] > 0, row
    assert ingest[RELAY_NONE]["loss"] == 0  # every reading sent was committed
    assert ingest[RAW_1000]["rows_per_commit"] == 1000
    # Each raw row a ratio uses has the batch size the relay's on-disk run reached (one in
    # flight per device: at most 100 rows a commit).
    for relay, raw in (
        (RELAY_DISK, RAW_RELAY),
        (RELAY_PACED, RAW_PACED),
        (RELAY_BATCHED, RAW_BATCHED),
    ):
        assert ingest[raw]["rows_per_commit"] == max(1, round(ingest[relay]["rows_per_commit"]))
    assert ingest[RELAY_PACED]["rows_per_commit"] <= 100
    (fwd,) = _rows(data, FORWARD).values()
    assert fwd["system"] == RELAY_FORWARD and fwd["calls"] == fwd["backlog"] > 0
    targets = [t for t in data["targets"] if t["target"].startswith("edge ingest, on-disk ack")]
    assert len(targets) == 3
    assert all(t["goal"] == 0.5 and t["measured"] > 0 for t in targets)
    md = (tmp_path / "latest.md").read_text()
    assert f"## {INGEST}" in md and f"- {RELAY_DISK}: " in md and "rows per commit" in md
    example = (ROOT / "examples" / "edge_pipeline.py").exists()
    if example and importlib.util.find_spec("sockstack.edge.pipeline") is not None:
        (red,) = _rows(data, REDUCTION).values()
        assert red["in_msgs"] == 100 * 60 and 0 < red["out_msgs"] < red["in_msgs"]
        assert red["reduction_msgs"] > 1
    else:
        assert "not there yet" in data["skipped"][PIPELINE]
