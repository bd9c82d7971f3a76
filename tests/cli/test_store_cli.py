"""``sockstack broker --store FILE`` and ``sockstack sub --durable NAME``: a durable
subscription and what was published while nobody held it outlive the broker process."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.conftest import Proc, run, serving


def attached(url: str, name: str) -> bool:
    """The broker at ``url`` has the durable subscription ``name`` with a subscriber."""
    done = run(["sockstack", "call", url, "broker.stats"])
    durables = json.loads(done.stdout)["durables"] if done.returncode == 0 else []
    return any(d["name"] == name and d["attached"] for d in durables)


def test_durable_subscription_outlives_the_broker_process(tmp_path: Path) -> None:
    store = str(tmp_path / "broker.db")
    with serving("--store", store, command="broker") as broker:
        url = broker.urls[0]
        # Make the durable subscription (it gets the first message, then goes away).
        sub = Proc(["sockstack", "sub", url, "orders.>", "--durable", "billing", "--count", "1"])
        for _ in range(100):  # (a PUB before its SUB would reach nobody)
            if attached(url, "billing"):
                break
        else:
            raise AssertionError(f"no subscriber attached to billing; sub said {sub.seen}")
        assert run(["sockstack", "pub", url, "orders.0", "0", "--qos", "1"]).returncode == 0
        sub.wait_line(r"^orders\.0 0$")
        assert sub.wait() == 0
        for i in (1, 2, 3):  # published while nobody holds it, acknowledged: stored
            done = run(["sockstack", "pub", url, f"orders.{i}", str(i), "--qos", "1"])
            assert done.returncode == 0, done.stderr
    # A new broker process on the same file: the three wait for `billing`, in order.
    with serving("--store", store, command="broker") as broker:
        url = broker.urls[0]
        got = run(["sockstack", "sub", url, "orders.>", "--durable", "billing", "--count", "3"])
        assert got.returncode == 0, got.stderr
        assert got.stdout.splitlines() == ["orders.1 1", "orders.2 2", "orders.3 3"]
        stats = run(["sockstack", "call", url, "broker.stats"])
        assert stats.returncode == 0, stats.stderr
        durables = json.loads(stats.stdout)["durables"]
        assert [(d["name"], d["pending"]) for d in durables] == [("billing", 0)]


def test_store_refusals_are_clear(tmp_path: Path) -> None:
    store = str(tmp_path / "b.db")
    done = run(["sockstack", "serve", "--store", store])
    assert done.returncode == 2 and "--broker" in done.stderr
    done = run(["sockstack", "serve", "--broker", "--store", store, "--workers", "2"])
    assert done.returncode == 2 and "--workers" in done.stderr
    with serving("--store", store, command="broker"):
        done = run(["sockstack", "broker", "--store", store, "--tcp", "127.0.0.1:0"])
        assert done.returncode == 2 and "in use by another broker" in done.stderr
