"""``sockstack serve --http``: one process and ``--workers 2`` sharing the port, the banner's
dashboard line, an open HTTP door refused without a secret, ``--help``."""

from __future__ import annotations

import pytest

from tests.cli.conftest import Proc, run
from tests.gateway.support import request


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
def test_serve_http_answers_calls(workers: list[str]) -> None:
    proc = Proc(["sockstack", "serve", *workers, "--tcp", "127.0.0.1:0", "--http", "127.0.0.1:0"])
    try:
        port = int(proc.wait_line(r"serving Demo on http://127\.0\.0\.1:(\d+)").group(1))
        if not workers:
            proc.wait_line(r"dashboard: http://127\.0\.0\.1:\d+/")
        for _ in range(4):  # new connections: with two workers, the kernel spreads them
            r = request(port, "POST", "/rpc/add", {"a": 2, "b": 3})
            assert (r.status, r.json()) == (200, 5)
    finally:
        assert proc.stop() == 0


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
def test_an_open_http_door_is_refused_without_a_secret(workers: list[str]) -> None:
    out = run(["sockstack", "serve", *workers, "--http", "0.0.0.0:0"])
    assert out.returncode == 2, out.stderr
    assert "without a secret" in out.stderr


def test_help_names_the_http_options() -> None:
    out = run(["sockstack", "serve", "--help"])
    assert out.returncode == 0
    assert "--http HOST:PORT" in out.stdout and "--cors ORIGIN" in out.stdout
