"""Issue 11 item 12: every row of the limits tables (README.md "Limits and defaults" and
docs/SECURITY.md §5) is reachable as written: each class, keyword, constant and command-line
option named in the "where to set it" column exists, and each class is exported by
``sockstack`` or named by its full module path."""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

import sockstack
from sockstack.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
CALL = re.compile(r"^([A-Za-z_][\w.]*)\((.*)\)$")
KEYWORD = re.compile(r"^([a-z_]\w*)=\S*$")
# Client methods a row may name by themselves: `call(..., timeout=)`, `subscribe(max_msgs=)`.
CLIENT_METHODS = ("call", "call_many", "subscribe")
WITH_KEYWORDS = (sockstack.Server, sockstack.AsyncClient, sockstack.Client)


def rows(path: Path) -> list[tuple[str, str]]:
    """(limit, where to set it) for each row of the table under the "where to set it" header."""
    out: list[tuple[str, str]] = []
    column = None
    for line in path.read_text().splitlines():
        if not line.startswith("|"):
            column = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if column is None:
            if "where to set it" in cells:
                column = cells.index("where to set it")
            continue
        if set(line) <= set("|-: "):
            continue
        out.append((cells[0], cells[column]))
    return out


def resolve(name: str) -> Any:
    """A class or constant, by its exported name (``ServerLimits``) or full path."""
    if "." not in name:
        assert name in sockstack.__all__, f"{name} is not exported by sockstack"
        return getattr(sockstack, name)
    assert name.startswith("sockstack."), f"{name}: name it by its full path"
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def parameters(obj: Any) -> set[str]:
    return set(inspect.signature(obj).parameters)


def cli_options() -> set[str]:
    options: set[str] = set()
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for a in sub._actions:
                    options.update(a.option_strings)
    return options


def check(item: str, options: set[str]) -> None:
    if item.startswith("--"):
        assert item in options, f"no command has {item}"
        return
    m = CALL.match(item)
    if m:
        name, inside = m.groups()
        if name == "connect":  # connect(url, **options) passes its options to Client
            targets = [sockstack.Client]
        elif name in CLIENT_METHODS:
            targets = [getattr(c, name) for c in (sockstack.AsyncClient, sockstack.Client)]
        else:
            targets = [resolve(name)]
        for part in (p.strip() for p in inside.split(",")):
            if part in ("", "..."):
                continue
            kw = part.split("=")[0].strip()
            if kw == "url":  # connect(url, ...)
                continue
            for target in targets:
                assert kw in parameters(target), f"{item}: {name} takes no {kw}"
        return
    m = KEYWORD.match(item)
    if m:
        kw = m.group(1)
        assert any(kw in parameters(c) for c in WITH_KEYWORDS), f"no Server or client takes {kw}="
        return
    if re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", item):  # a module (logging.config), or a logger
        importlib.import_module(item)  # named after one (sockstack.transport)
        return
    if re.fullmatch(r"[A-Z]\w*", item) or item.startswith("sockstack."):
        resolve(item)
        return
    raise AssertionError(f"cannot check {item!r}: write it as a class call, keyword or option")


@pytest.mark.parametrize("doc", ["README.md", "docs/SECURITY.md"])
def test_every_row_is_reachable_as_written(doc: str) -> None:
    table = rows(ROOT / doc)
    assert len(table) > 30  # the whole table was found
    options = cli_options()
    for limit, where in table:
        for item in re.findall(r"`([^`]+)`", where):
            try:
                check(item, options)
            except AssertionError as exc:
                raise AssertionError(f"{doc}, row {limit!r}: {exc}") from None


def test_the_check_catches_what_the_issue_found() -> None:
    options = cli_options()
    for wrong in ("RateLimitedLog(burst=, interval=)", "Demo(max_keys=)", "--no-such-flag"):
        with pytest.raises(AssertionError):
            check(wrong, options)
    check("RetryPolicy(initial=, factor=, max_interval=, jitter=)", options)  # now exported
