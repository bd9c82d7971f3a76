"""``sockstack describe`` (issue 12 item 7) against a live ``sockstack serve``, and the typed
proxy checked by mypy as a user's code is."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from tests.cli.conftest import ROOT, run, serving

SHOP = '''
from sockstack import Service, method


class OutOfStock(Exception):
    """Nothing left of the item. More words."""


class Shop(Service):
    """Sells things."""

    errors = (OutOfStock,)

    @method
    def buy(self, item: str, qty: int = 1) -> list[str]:
        """Buy ``qty`` of ``item``. Then pay.

        More."""
        return [item] * qty
'''

# 200 methods with long docstrings: the whole description does not fit a datagram.
BIG = "from sockstack import Service, method\n\n\nclass Big(Service):\n" + "".join(
    f"    @method\n    def m{i:03}(self, a: int) -> int:\n        '''{'x' * 600}'''\n"
    "        return a\n\n"
    for i in range(200)
)


def test_help() -> None:
    out = run(["sockstack", "describe", "--help"])
    assert out.returncode == 0 and out.stdout.startswith("usage: sockstack describe")
    assert "--json" in out.stdout and "METHOD" in out.stdout


def test_describe_the_demo_over_tcp_and_udp() -> None:
    with serving() as proc:
        for url in proc.urls:
            out = run(["sockstack", "describe", url])
            assert out.returncode == 0, out.stderr
            lines = out.stdout.splitlines()
            assert lines[0] == f"Demo on {url}: 10 methods"
            assert (
                "  count(n: int, interval: float = 0) -> AsyncIterator[int]"
                "  (stream: sockstack call prints its items)"
            ) in lines
            i = lines.index("  sleep(seconds: float) -> float")
            assert lines[i + 1] == (
                "      Wait seconds (at most 60) on the server without blocking it; returns them."
            )
            assert "  get(key: str, default: Any = None) -> Any" in lines
            assert "errors:" not in lines  # the demo declares none
            raw = json.loads(run(["sockstack", "describe", url, "--json"]).stdout)
            assert [m["name"] for m in raw["methods"]][:3] == ["add", "count", "delete"]
            count = raw["methods"][1]
            assert count["stream"] == {"annotation": "int", "schema": {"type": "integer"}}
            assert raw["methods"][0]["stream"] is None
            assert raw["methods"][0]["params"][0]["name"] == "a"
            some = run(["sockstack", "describe", url, "keys", "time"]).stdout.splitlines()
            assert some[0] == f"Demo on {url}: 2 methods"
            assert "  keys() -> list[str]" in some and "  time() -> float" in some
        bad = run(["sockstack", "describe", proc.urls[0], "nope"])
        assert bad.returncode == 1 and "no method 'nope'" in bad.stderr, bad.stderr


def test_describe_a_service_with_errors(tmp_path: Path) -> None:
    (tmp_path / "shop.py").write_text(SHOP)
    with serving(str(tmp_path / "shop.py") + ":Shop", cwd=tmp_path) as proc:
        out = run(["sockstack", "describe", proc.urls[0]])
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"Shop on {proc.urls[0]}: 1 methods",
        "  Sells things.",
        "",
        "  buy(item: str, qty: int = 1) -> list[str]",
        "      Buy qty of item.",
        "",
        "errors:",
        "  OutOfStock: Nothing left of the item.",
    ]


def test_a_description_larger_than_a_datagram_comes_in_parts(tmp_path: Path) -> None:
    (tmp_path / "big.py").write_text(BIG)
    with serving(str(tmp_path / "big.py") + ":Big", cwd=tmp_path) as proc:
        out = run(["sockstack", "describe", proc.urls[1], "--json"], seconds=60)
    assert out.returncode == 0, out.stderr
    raw = json.loads(out.stdout)
    assert [m["name"] for m in raw["methods"]] == [f"m{i:03}" for i in range(200)]
    assert len(out.stdout) > 100_000  # more than one datagram could carry
    assert "names" not in raw


USER = """
from typing import Protocol

from sockstack import AsyncClient, connect
from sockstack.demo import Demo


class Calc(Protocol):
    async def add(self, a: int, b: int) -> int: ...


def blocking(url: str) -> list[str]:
    with connect(url) as c:
        demo = c.proxy(Demo)
        demo.set("k", 1)
        return demo.keys()


async def asynchronous(url: str) -> int:
    async with AsyncClient(url) as c:
        calc = c.proxy(Calc)
        return await calc.add(2, 3)


def untyped(url: str) -> object:
    with connect(url) as c:
        return c.proxy().anything(1, x=2)


def wrong(url: str) -> None:
    with connect(url) as c:
        c.proxy(Demo).delete(3)


async def wrong_async(url: str) -> str:
    async with AsyncClient(url) as c:
        return await c.proxy(Calc).add(2, "x")
"""


@pytest.mark.slow
def test_mypy_checks_the_arguments_of_a_typed_proxy(tmp_path: Path) -> None:
    user = tmp_path / "user.py"
    user.write_text(textwrap.dedent(USER))
    out = run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--follow-imports=silent",
            str(user),
        ],
        cwd=ROOT,
        seconds=180,
    )
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    lines = USER.splitlines()
    wrong = lines.index("        c.proxy(Demo).delete(3)") + 1
    wrong_async = lines.index('        return await c.proxy(Calc).add(2, "x")') + 1
    # Only the wrong calls (the second twice: its argument, its result); the others pass.
    assert len(errors) == 3, out.stdout
    assert f'user.py:{wrong}: error: Argument 1 to "delete" of "Demo"' in out.stdout
    assert f'user.py:{wrong_async}: error: Argument 2 to "add" of "Calc"' in out.stdout
    # ...and the result type: add returns int, returned where str is declared.
    assert f"user.py:{wrong_async}: error: Incompatible return value" in out.stdout
