"""`sockstack serve` without a service (what `make run` starts) serves a remote object too: the
demo's Counter as "counter", one per client session (issue 13). Live, over loopback TCP."""

from __future__ import annotations

import re

import pytest

from sockstack import RemoteError
from sockstack.errors import ErrorCode
from sockstack.objects import Promise, Proxy, lookup
from tests.cli.conftest import ROOT, command_of, run, serving
from tests.conftest import timeout


def test_the_demo_serves_a_counter_and_its_banner_says_how_to_call_it() -> None:
    with serving("--broker") as proc:
        tcp, _ = proc.urls
        banner = proc.seen
        assert f'remote objects (Python: sockstack.objects.lookup("{tcp}/NAME"), TCP or TLS):' in (
            banner
        )
        assert (
            "  counter  Counter, one per client session: incr(by=1), child(), value (property)"
            in (banner)
        )
        # objects.attach/objects.describe are the object session's: not offered to `call`
        assert not any(re.match(r"^  objects\.", line) for line in banner), banner
        (one_liner,) = [line[5:] for line in banner if line.startswith("try: python -c ")]
        assert f'lookup("{tcp}/counter")' in one_liner

        with lookup(f"{tcp}/counter", timeout=timeout(10)) as counter:
            assert counter.incr(5) == 5
            child = counter.child()
            assert isinstance(child, Promise)  # child() returns a Counter: it pipelines
            assert child.child().incr() == 1
            assert isinstance(counter.child(), Proxy) and counter.value == 5
            with lookup(f"{tcp}/counter", timeout=timeout(10)) as other:
                assert other.incr() == 1  # a counter of its own session

        command, prints = command_of(one_liner)
        assert prints == "5 1 5"
        out = run(["bash", "-c", command], cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == prints


def test_a_service_of_yours_serves_no_demo_object() -> None:
    with serving(str(ROOT / "examples" / "demo_service.py") + ":Calculator") as proc:
        assert not any("remote objects" in line for line in proc.seen), proc.seen
        assert not any(line.startswith("try: python") for line in proc.seen), proc.seen
        with pytest.raises(RemoteError) as err:  # no objects pattern: no objects.attach
            lookup(f"{proc.urls[0]}/counter", timeout=timeout(10))
        assert err.value.code == ErrorCode.UNKNOWN_METHOD
