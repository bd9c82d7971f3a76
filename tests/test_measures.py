"""Issue 11 item 14: one percentile definition (the standard library's statistics.quantiles,
method "inclusive") in `sockstack ping` and in the bench, and the bench's process figures from
psutil (a live `sockstack serve --workers 2`)."""

from __future__ import annotations

import os
import random
import socket
import statistics

import pytest
from bench import harness, scenarios

from sockstack.cli.client import _p50_p99
from tests.cli.conftest import ROOT


def test_one_percentile_definition() -> None:
    values = [float(v) for v in range(1, 101)]
    assert harness.percentiles(values, (50, 99)) == pytest.approx([50.5, 99.01])
    rnd = random.Random(3)
    for n in (2, 3, 10, 999, 5000):
        data = [rnd.expovariate(1e-4) for _ in range(n)]
        cuts = statistics.quantiles(data, n=1000, method="inclusive")
        got = harness.percentiles(data, (1, 50, 99, 99.9))
        assert got == pytest.approx([cuts[9], cuts[499], cuts[989], cuts[998]])
        assert _p50_p99(data) == pytest.approx(got[1:3])  # ping's figures are the bench's
    assert harness.percentiles([7.0], (50, 99.9)) == [7.0, 7.0]
    assert _p50_p99([7.0]) == (7.0, 7.0)
    assert harness.stats([100_000, 200_000, 300_000]) == (200.0, 298.0, 299.8)


def test_bench_measures_a_live_server_with_psutil(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    cpus = set(sorted(os.sched_getaffinity(0))[:1])
    srv = scenarios.start_sockstack(cpus, workers=2)
    try:
        assert len(srv.pids) == 3  # the supervisor and its two workers
        assert srv.cpu_seconds() > 0  # each started an interpreter
        assert srv.rss_bytes() >= srv.rss_bytes("VmRSS") > 10 * 2**20
        for kind, port in (
            (socket.SOCK_STREAM, srv.port),
            (socket.SOCK_DGRAM, srv.extra["udp_port"]),
        ):
            with socket.socket(socket.AF_INET, kind) as probe:  # the port is taken: it is theirs
                with pytest.raises(OSError):
                    probe.bind(("127.0.0.1", port))
    finally:
        srv.stop()
    assert all(p.poll() is not None for p in srv.procs)
