"""Prometheus metrics (issue 12 item 5): ``sockstack serve --metrics 127.0.0.1:0`` serves
/metrics over loopback HTTP (the bound port is in the banner), and its counters move with real
calls over TCP and UDP; unknown method names collapse into one label value."""

from __future__ import annotations

import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sockstack import RemoteError, connect
from tests.cli.conftest import run, serving
from tests.conftest import timeout


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=timeout(10)) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_endpoint_counts_calls_errors_bytes_and_connections() -> None:
    with serving("--metrics", "127.0.0.1:0") as proc:
        line = next(s for s in proc.seen if s.startswith("metrics on "))
        m = re.fullmatch(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", line)
        assert m, line
        url = m.group(1)
        tcp, udp = proc.urls
        before = scrape(url)
        assert value(before, "sockstack_server_calls_total", transport="tcp", method="add") == 0
        with connect(tcp) as c:
            for _ in range(3):
                assert c.call("add", 2, 3) == 5
            with pytest.raises(RemoteError):
                c.call("add", 1)  # BAD_ARGUMENTS
            for name in ("nope1", "nope2", "nope3"):
                with pytest.raises(RemoteError):
                    c.call(name)
            during = scrape(url)  # the connection is still open
        with connect(udp) as c:
            assert c.call("add", 1, 1) == 2
        after = scrape(url)

    assert value(during, "sockstack_server_open_connections", transport="tcp") == 1
    assert value(after, "sockstack_server_open_connections", transport="tcp") == 0
    calls = "sockstack_server_calls_total"
    errors = "sockstack_server_errors_total"
    assert value(after, calls, transport="tcp", method="add") == 4
    assert value(after, calls, transport="udp", method="add") == 1
    assert value(after, errors, transport="tcp", method="add", code="BAD_ARGUMENTS") == 1
    # Three unknown names: one label value, never one series per name a client sends.
    assert value(after, calls, transport="tcp", method="(unknown)") == 3
    assert value(after, errors, transport="tcp", method="(unknown)", code="UNKNOWN_METHOD") == 3
    assert not any(dict(k[1]).get("method", "").startswith("nope") for k in after)
    hist = "sockstack_server_call_seconds_count"
    assert value(after, hist, transport="tcp", method="add") == 4
    assert (
        value(
            after, "sockstack_server_call_seconds_bucket", transport="tcp", method="add", le="+Inf"
        )
        == 4
    )
    for transport in ("tcp", "udp"):
        for direction in ("received", "sent"):
            name = f"sockstack_server_{direction}_bytes_total"
            assert value(after, name, transport=transport) > value(
                before, name, transport=transport
            )


def test_metrics_with_workers_is_a_usage_error() -> None:
    out = run(["sockstack", "serve", "--workers", "2", "--metrics", "127.0.0.1:0"])
    assert out.returncode == 2, out
    assert "--metrics" in out.stderr and "--workers" in out.stderr


def test_metrics_bad_address_is_a_usage_error() -> None:
    out = run(["sockstack", "serve", "--tcp", "127.0.0.1:0", "--metrics", "nowhere"])
    assert out.returncode == 2, out
    assert "--metrics nowhere" in out.stderr
