"""The bench's HTTP scenarios (bench/http.py, issue 14) run: a small slice of each, in this
process. wrk against the sockstack gateway and FastAPI in one cell each way gives rows and the
ratios to FastAPI; the fan-out to 100 subscribers delivers every message, over sockstack TCP
and over SSE. No figure is asserted beyond "measured" (speed belongs in the bench)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import ROOT, run

pytestmark = [
    pytest.mark.skipif(
        shutil.which("wrk") is None, reason="wrk is not installed (make bench-deps installs it)"
    ),
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in ("fastapi", "uvicorn", "httptools")),
        reason="fastapi, uvicorn or httptools not installed (the bench and http extras)",
    ),
]


def _quiet(_line: str) -> None:
    pass


def test_http_calls_slice_measures_both_and_the_ratios() -> None:
    from bench.http import (
        FASTAPI,
        GATEWAY,
        SYSTEMS,
        CallsPlan,
        calls_scenario,
        http_targets,
        measure_calls,
    )
    from bench.scenarios import SAME, SPLIT

    plan = CallsPlan(seconds=1, warmup=1, rounds=1, cells=((SPLIT, 50), (SAME, 1)))
    skipped: dict[str, str] = {}
    systems = [s for s in SYSTEMS if s.name in (GATEWAY, FASTAPI)]
    rows = measure_calls(systems, plan, _quiet, skipped)
    assert skipped == {}
    cells = {(r.scenario, r.placement, r.system): r for r in rows}
    assert len(cells) == 4
    for (scenario, placement), system in (
        ((calls_scenario(50), "two cores"), GATEWAY),
        ((calls_scenario(50), "two cores"), FASTAPI),
        ((calls_scenario(1), "same core"), GATEWAY),
        ((calls_scenario(1), "same core"), FASTAPI),
    ):
        r = cells[scenario, placement, system]
        assert r.calls > 0 and r.rate > 0, r
        assert r.p50_us and r.p99_us and r.p999_us and r.p50_us <= r.p99_us <= r.p999_us
        assert "errors" not in r.extra, r.extra  # every answer was 200 (wrk counts the others)
        assert r.cpu_s_per_m and r.peak_rss_mb
    gateway = cells[calls_scenario(50), "two cores", GATEWAY]
    assert gateway.extra["vs_fastapi_rate"] > 0 and gateway.extra["vs_fastapi_p99"] > 0
    measured = {what: (ratio, goal, higher) for what, ratio, goal, higher in http_targets(rows)}
    head = "sockstack gateway / FastAPI"
    assert measured[f"{calls_scenario(50)}, two cores: {head} req/s"][1:] == (2.0, True)
    assert measured[f"{calls_scenario(50)}, two cores: {head} p99"][1:] == (0.5, False)
    for what in (
        f"{calls_scenario(50)}, two cores: {head} req/s",
        f"{calls_scenario(1)}, same core: {head} p99",
    ):
        ratio = measured[what][0]
        assert ratio is not None and ratio > 0
    # Cells this slice did not measure have no ratio (the report shows "-").
    assert measured[f"{calls_scenario(1)}, two cores: {head} req/s"][0] is None


def test_fanout_over_tcp_delivers_every_message_to_100_subscribers() -> None:
    from bench.http import TCP_SUBS, FanoutPlan, measure_fanout

    plan = FanoutPlan(subscribers=100, messages=50, rounds=1, cap=10.0)
    skipped: dict[str, str] = {}
    (row,) = measure_fanout(plan, _quiet, "tcp subscribers", skipped)
    assert skipped == {}
    assert row.system == TCP_SUBS and row.placement == "two cores"
    assert row.calls == 100 * 50 and row.extra["loss"] == 0 and row.note == "no loss"
    assert row.rate > 0


def test_fanout_over_sse_to_100_subscribers() -> None:
    from bench.http import SSE, FanoutPlan, measure_fanout

    plan = FanoutPlan(subscribers=100, messages=50, rounds=1, cap=10.0)
    skipped: dict[str, str] = {}
    rows = measure_fanout(plan, _quiet, "sse", skipped)
    if not rows and "404" in skipped.get(SSE, ""):
        pytest.skip(f"the gateway has no SSE endpoint yet: {skipped[SSE]}")
    assert skipped == {}
    (row,) = rows
    assert row.system == SSE
    assert row.calls == 100 * 50 and row.extra["loss"] == 0, row.note
    assert row.rate > 0


def test_scenarios_are_registered(tmp_path: Path) -> None:
    # `python -m bench --scenario http --scenario sse-fanout` is accepted; with --only matching
    # no system it measures nothing and still writes its files.
    out = run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--scenario",
            "http",
            "--scenario",
            "sse-fanout",
            "--only",
            "no such system",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        seconds=60,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "latest.json").read_text())
    assert data["results"] == []
    assert "http:" in out.stdout and "sse-fanout:" in out.stdout
