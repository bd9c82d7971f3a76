"""The edge commands as a user runs them: ``sockstack edge``, ``edge status``, ``edge verify``,
``simulate`` (real processes, real files, loopback)."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.cli.conftest import Proc, run


@contextmanager
def relay(store: Path, *options: str) -> Iterator[tuple[Proc, str, str]]:
    """``sockstack edge`` on free ports: yields (proc, tcp URL, udp URL)."""
    proc = Proc(
        ["sockstack", "edge", "--store", str(store), "--listen", "tcp://127.0.0.1:0",
         "--listen", "udp://127.0.0.1:0", *options]
    )  # fmt: skip
    try:
        tcp = proc.wait_line(r"relay listening on (tcp://\S+)").group(1)
        udp = proc.wait_line(r"relay listening on (udp://\S+)").group(1)
        proc.wait_line("Ctrl-C stops")
        yield proc, tcp, udp
    finally:
        assert proc.stop() == 0, proc.stderr()


@pytest.mark.parametrize(
    "args", [["edge"], ["edge", "status"], ["edge", "verify"], ["simulate"]], ids=" ".join
)
def test_help(args: list[str]) -> None:
    out = run(["sockstack", *args, "--help"])
    assert out.returncode == 0 and "usage:" in out.stdout


def test_usage_errors(tmp_path: Path) -> None:
    out = run(["sockstack", "edge", "--listen", "tcp://127.0.0.1:0"])
    assert out.returncode == 2 and "--store" in out.stderr
    out = run(["sockstack", "edge", "--store", str(tmp_path / "e.db")])
    assert out.returncode == 2 and "--listen" in out.stderr
    out = run(["sockstack", "edge", "status", str(tmp_path / "none.db")])
    assert out.returncode == 2 and "no such store" in out.stderr
    out = run(["sockstack", "simulate", "--to", "udp://127.0.0.1:9", "--format", "json",
               "--ack", "disk"])  # fmt: skip
    assert out.returncode == 2 and "only frames" in out.stderr


def test_simulate_status_and_verify(tmp_path: Path) -> None:
    store = tmp_path / "edge.db"
    with relay(store) as (_, tcp, udp):
        out = run(["sockstack", "simulate", "--to", tcp, "--devices", "4", "--rate", "50",
                   "--duration", "0.5", "--ack", "disk", "--json"])  # fmt: skip
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["sent"] == 100 and report["acked"] == {"disk": 100}
        out = run(["sockstack", "simulate", "--to", udp, "--devices", "2", "--rate", "20",
                   "--duration", "0.5", "--format", "json", "--json"])  # fmt: skip
        assert out.returncode == 0 and json.loads(out.stdout)["sent"] == 20
        second = run(["sockstack", "edge", "--store", str(store), "--listen", "tcp://127.0.0.1:0"])
        assert second.returncode == 2 and "in use by another process" in second.stderr
        live = run(["sockstack", "edge", "status", tcp, "--json"])
        assert live.returncode == 0, live.stderr
        stats = json.loads(live.stdout)
        assert stats["totals"]["in_msgs"] >= 100
        status = run(["sockstack", "edge", "status", str(store)])
        assert status.returncode == 0 and "relay running" in status.stdout
        assert re.search(r"backlog +1\d\d rows", status.stdout), status.stdout
        report_only = run(["sockstack", "edge", "verify", str(store)])
        assert report_only.returncode == 0, report_only.stdout
        assert "a relay is running: report only" in report_only.stdout
    con = sqlite3.connect(store)
    with con:  # a flipped byte in one row's body
        con.execute("UPDATE outbox SET body = x'00' WHERE id = 7")
    con.close()
    out = run(["sockstack", "edge", "verify", str(store), "--json"])
    assert out.returncode == 1, out.stdout
    found = json.loads(out.stdout)
    assert found["rows_bad"] == 1 and found["quarantined_now"] == 1 and not found["running"]
    again = run(["sockstack", "edge", "verify", str(store)])
    assert again.returncode == 0 and "1 rows kept" in again.stdout
    status = json.loads(run(["sockstack", "edge", "status", str(store), "--json"]).stdout)
    assert status["quarantine_rows"] == 1 and status["counters"]["quarantined"] == 1
    assert status["running"] is False


def test_make_edge_demo(tmp_path: Path) -> None:
    from tests.cli.conftest import BIN, ROOT, free_port_both

    ports = {f"EDGE_DEMO_{k}_PORT": str(free_port_both()) for k in ("SINK", "UDP", "TCP")}
    out = run(
        ["make", "-o", ".venv/.installed", "edge-demo", f"BIN={BIN}"],
        cwd=ROOT,
        seconds=60,
        env={"EDGE_DEMO_SECONDS": "3", "EDGE_DEMO_DIR": str(tmp_path), **ports},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    status = [line for line in lines if " | " in line and "backlog" in line]
    assert status, out.stdout  # the relay's live status line
    assert re.search(r"in [1-9]\d*", status[-1]), status
    assert any(line.startswith("backlog") for line in lines)  # edge status of the store
    assert "the cloud's view:" in out.stdout
    assert (tmp_path / "edge.db").exists() and (tmp_path / "cloud.db").exists()
