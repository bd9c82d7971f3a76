"""Every ```shell and ```python block of README.md, run as written from the repository root.

The rules, all of them here:

- Every fenced block is ```shell, ```python or ```text (a layout tree, an output sample:
  not code). A bare fence or another language fails the test, so nothing escapes it.
- The README's ports (``:5050``, ``--tcp 127.0.0.1:5060``...) become free ports, the same free
  port for the same README port everywhere, and ``/tmp/sockstack-tls`` a temporary directory.
  Nothing else in a line changes.
- A shell block runs line by line (``bash -c LINE``, cwd the repository root, the test's
  virtualenv first on PATH as after ``. .venv/bin/activate``), each bounded by a timeout. A
  line must exit 0; ``# prints X`` after it means its output is exactly X.
- Lines starting a long-running command (``sockstack serve``/``broker``/``edge --...``, ``make
  run``) start in
  the background, as in a second terminal, and the test waits for their banner; they keep
  running through the later blocks of the same README section (its python blocks call them)
  and are stopped with SIGINT (Ctrl-C) by their process group's PID when the section ends.
  ``sockstack sub`` starts in the background too and must end by itself (``--count``) with
  exactly the messages the block's ``pub`` lines published.
- ``make run`` runs as ``make -o .venv/.installed run BIN=<this virtualenv> HOST_PORTS=<free
  ports>``: the environment under test is installed already (no reinstall, no network), and
  the ports are free ones. Every ``try:`` line of its banner is then run against it.
- A python block runs as a script (cwd the repository root); ``print(...)  # X`` lines say
  what it prints, in order. A block whose first line is ``# path`` shows that file of the
  repository: it must be the file's exact content.
- SKIPPED lists the lines not run, each with its reason.
"""

from __future__ import annotations

import re
import shlex
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cli.conftest import (
    BIN,
    ROOT,
    Proc,
    command_of,
    free_port_both,
    run,
    run_suggestions,
    subscriptions,
    wait_subscriptions,
)

README = (ROOT / "README.md").read_text()
LANGS = ("shell", "python", "text")

SKIPPED = {
    "make test": "the whole suite, of which this test is a part",
    "make lint": "ruff and mypy over the tree: a step of its own (minutes)",
    "make fuzz": "200,000 fuzzing runs: minutes; the suite has a smoke run (tests/protocol)",
    "make mutate": "mutation testing: hours",
    "make bench": "the benchmark suite: installs peer servers, many minutes",
}
BACKGROUND = (
    "sockstack serve",
    "sockstack broker",
    "sockstack edge --",
    "sockstack names serve",
    "sockstack sub",
    "make run",
)
TLS_DIR = "/tmp/sockstack-tls"
EDGE_DIR = "/tmp/sockstack-edge"


@dataclass
class Block:
    lang: str
    text: str
    line: int  # of the opening fence, 1-based
    section: str


@dataclass
class Section:
    """Background processes of the README section being run, stopped when it ends."""

    servers: list[Proc] = field(default_factory=list)


def parse_blocks(text: str = README) -> list[Block]:
    found: list[Block] = []
    section = ""
    current: list[str] | None = None
    lang, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if current is None and line.startswith("#"):
            section = line.lstrip("#").strip()
        if line.startswith("```"):
            if current is None:
                current, lang, start = [], line[3:].strip(), number
            else:
                found.append(Block(lang, "\n".join(current) + "\n", start, section))
                current = None
        elif current is not None:
            current.append(line)
    assert current is None, "README.md has an unclosed code fence"
    return found


BLOCKS = parse_blocks()


class Substitution:
    """README ports -> free ports (one each, consistent over the whole README); the TLS
    directory -> a temporary one."""

    def __init__(self, tmp: Path) -> None:
        self.ports: dict[str, str] = {}
        self.tls_dir = tmp / "tls"
        self.edge_dir = tmp / "edge"

    def __call__(self, text: str) -> str:
        def port(m: re.Match[str]) -> str:
            if m.group(2) not in self.ports:
                self.ports[m.group(2)] = str(free_port_both())
            return m.group(1) + self.ports[m.group(2)]

        text = re.sub(r"((?:127\.0\.0\.1|localhost|\]|0\.0\.0\.0):)(5\d\d\d|8080)\b", port, text)
        return text.replace(TLS_DIR, str(self.tls_dir)).replace(EDGE_DIR, str(self.edge_dir))


def test_every_block_is_shell_python_or_text() -> None:
    bad = [f"line {b.line}: {b.lang or '(bare fence)'}" for b in BLOCKS if b.lang not in LANGS]
    assert not bad, f"code blocks must be ```shell, ```python or ```text: {bad}"
    assert sum(b.lang in ("shell", "python") for b in BLOCKS) >= 6


def test_setup_commands_are_the_two_make_targets() -> None:
    first = BLOCKS[0]
    assert first.lang == "shell"
    assert [line.split()[:2] for line in first.text.strip().splitlines()] == [
        ["make", "run"],
        ["make", "test"],
    ]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def _sections() -> list[tuple[str, list[Block]]]:
    out: list[tuple[str, list[Block]]] = []
    for b in BLOCKS:
        if b.lang not in ("shell", "python"):
            continue
        if not out or out[-1][0] != b.section:
            out.append((b.section, []))
        out[-1][1].append(b)
    return out


SECTIONS = _sections()


@pytest.mark.slow
@pytest.mark.parametrize(
    "section", SECTIONS, ids=[re.sub(r"\W+", "-", s).strip("-").lower() for s, _ in SECTIONS]
)
def test_readme_section_runs_as_written(section: tuple[str, list[Block]], tmp_path: Path) -> None:
    sub = Substitution(tmp_path)
    state = Section()
    try:
        for block in section[1]:
            if block.lang == "shell":
                _run_shell(block, sub, state)
            else:
                _run_python(block, sub, tmp_path)
    finally:
        codes: list[tuple[object, int | str]] = []
        for p in state.servers:  # each stopped, even if one before it would not stop
            try:
                codes.append((p.popen.args, p.stop(signal.SIGINT, seconds=20)))
            except AssertionError as exc:  # killed after the bound: report it below
                codes.append((p.popen.args, str(exc)))
    # Ctrl-C: sockstack drains and exits 0; make reports its child's interruption.
    assert all(code == 0 or (isinstance(code, int) and "make" in str(a)) for a, code in codes), (
        codes
    )


def _run_shell(block: Block, sub: Substitution, state: Section) -> None:
    subscribers: list[tuple[Proc, int]] = []
    streams: list[tuple[Proc, int]] = []
    published: list[str] = []
    for raw in block.text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        line = sub(raw)
        command, prints = command_of(line)
        where = f"README line {block.line}: {raw.strip()}"
        if any(command.startswith(k) for k in SKIPPED):
            continue
        if command.startswith("make run"):
            ports = [
                sub.ports.setdefault(p, str(free_port_both())) for p in ("5050", "5051", "8080")
            ]
            host_ports = (
                f"--tcp 127.0.0.1:{ports[0]} --udp 127.0.0.1:{ports[1]} --http 127.0.0.1:{ports[2]}"
            )
            args = ["make", "-o", ".venv/.installed", "run", f"BIN={BIN}"]
            proc = Proc([*args, f"HOST_PORTS={host_ports}"], cwd=ROOT, group=True)
            state.servers.append(proc)
            _wait_banner(proc, where)
            run_suggestions(proc.seen, where)
        elif command.startswith(
            ("sockstack serve", "sockstack broker", "sockstack edge --", "sockstack names serve")
        ):
            proc = Proc(["bash", "-c", f"exec {command}"], cwd=ROOT, group=True)
            state.servers.append(proc)
            _wait_banner(proc, where)
        elif command.startswith("curl -sN"):  # an event stream, ended by ?count=N
            words = shlex.split(command)
            url = next(w for w in words if "/topics/" in w)
            base = "http://" + url.split("://")[-1].split("/")[0]
            count = int(url.rsplit("count=", 1)[1])
            before = _http_subscriptions(base)
            proc = Proc(["bash", "-c", f"exec {command}"], cwd=ROOT, group=True)
            streams.append((proc, count))
            _wait_http_subscriptions(base, before + 1, proc, where)
        elif command.startswith("sockstack sub"):
            words = shlex.split(command)
            count = int(words[words.index("--count") + 1])
            url = words[2]
            before = subscriptions(url)
            proc = Proc(["bash", "-c", f"exec {command}"], cwd=ROOT, group=True)
            subscribers.append((proc, count))
            wait_subscriptions(url, before + 1, proc, where)
        else:
            out = run(["bash", "-c", command], cwd=ROOT, seconds=60)
            assert out.returncode == 0, f"{where}: exit {out.returncode}: {out.stderr}"
            if prints is not None:
                assert out.stdout.strip() == prints, f"{where}: printed {out.stdout!r}"
            if command.startswith("sockstack pub"):
                words = shlex.split(command)
                published.append(f"{words[3]} {_as_json(words[4])}")
    for proc, count in subscribers:
        lines = [proc.wait_line(r"^.+$").group(0) for _ in range(count)]
        assert proc.wait(20) == 0, proc.stderr()
        assert sorted(lines) == sorted(published[:count]), (lines, published)
    for proc, count in streams:  # each ended by itself after its messages
        events = [proc.wait_line(r"^event: message$").group(0) for _ in range(count)]
        assert proc.wait(20) == 0, proc.stderr()
        assert len(events) == count


def _http_subscriptions(base: str) -> int:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{base}/rpc/broker.stats", timeout=10) as r:
        return int(json.load(r)["subscriptions"])


def _wait_http_subscriptions(base: str, at_least: int, proc: Proc, where: str) -> None:
    """Until the broker behind ``base`` counts ``at_least`` subscriptions (an event stream
    prints nothing until a message comes), or the bounded deadline."""
    import time

    from tests.conftest import timeout

    deadline = time.monotonic() + timeout(20)
    while _http_subscriptions(base) < at_least:  # bounded by the deadline
        assert proc.popen.poll() is None, f"{where}: curl exited: {proc.stderr()}"
        assert time.monotonic() < deadline, f"{where}: the event stream never subscribed"
        time.sleep(0.01)


def _as_json(value: str) -> str:
    import json

    from sockstack.cli.common import parse_value

    return json.dumps(parse_value(value))


def _wait_banner(proc: Proc, where: str) -> None:
    try:
        proc.wait_line(r"Ctrl-C stops", seconds=60)
    except AssertionError as exc:
        raise AssertionError(f"{where}: no banner ({exc}); stderr: {proc.stderr()}") from None


def _run_python(block: Block, sub: Substitution, tmp_path: Path) -> None:
    where = f"README line {block.line}"
    first, _, rest = block.text.partition("\n")
    shown = re.fullmatch(r"# (\S+\.py)", first)
    if shown:  # the README shows a file of the repository: it must be that file, exactly
        assert (ROOT / shown.group(1)).read_text() == rest, f"{where}: differs from the file"
    script = tmp_path / f"readme_{block.line}.py"
    script.write_text(sub(block.text))
    out = run([sys.executable, str(script)], cwd=ROOT, seconds=120)
    assert out.returncode == 0, f"{where}: exit {out.returncode}: {out.stderr}"
    expected = re.findall(r"^\s*print\(.*\)\s+# (.*)$", block.text, re.M)
    assert out.stdout.splitlines() == [e.strip() for e in expected], f"{where}: {out.stdout!r}"
