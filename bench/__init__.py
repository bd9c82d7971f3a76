"""The benchmark suite: sockstack side by side with raw sockets and peer libraries, one run.

``python -m bench [--quick]`` from the repository root (or ``make bench``, which also installs
the peers) measures every scenario, prints the tables, and writes ``latest.json``, ``latest.md``
and ``latest.png`` under ``bench/results/``. A repository tool, not part of the installed
package: it needs the ``bench`` extra (rich, matplotlib, the peers).

- :mod:`.harness` — starting pinned server processes, sampling CPU and memory, timing loops.
- :mod:`.peers` — the baseline and peer echo servers (uvloop, pyzmq, gRPC, Pyro5, NATS responder).
- :mod:`.scenarios` — clients and scenario measurements.
- :mod:`.runner` — which systems run in which scenario and placement.
- :mod:`.report` — rich tables, targets as ratios, JSON, Markdown, chart.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

__all__ = ["main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bench.runner import SCENARIOS

    p.add_argument("--quick", action="store_true", help="small counts: under a minute")
    p.add_argument(
        "--out", default="bench/results", help="where results go (default bench/results)"
    )
    p.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        help="run only this scenario (repeatable; default all)",
    )
    p.add_argument("--only", default="", help="run only systems whose name contains this text")
    p.add_argument(
        "--readme",
        default="",
        help="README file whose bench section (between markers) gets the new tables",
    )


def run(args: argparse.Namespace) -> int:
    from bench.report import print_tables, write_all
    from bench.runner import run_all
    from sockstack.transport.memory import tune_malloc

    # The bench process runs every client: tune it as `sockstack serve` tunes servers, so all
    # clients (raw sockets and peers included) allocate on equal terms.
    tune_malloc()
    t0 = time.monotonic()
    result = run_all(args.quick, args.scenario, args.only)
    print_tables(result)
    written = write_all(result, Path(args.out), Path(args.readme) if args.readme else None)
    print(f"wrote {', '.join(str(p) for p in written)} in {time.monotonic() - t0:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run the benchmark suite (see docs/PERFORMANCE.md): tables on the terminal, "
        "JSON, Markdown and a PNG chart under --out. Peers that are not installed are skipped "
        "and listed; `make bench` installs them.",
    )
    add_arguments(p)
    return run(p.parse_args(argv))
