"""Issue 11, items 8-10 and 14: the package and the `sockstack` command as a newcomer meets them
(real subprocesses, real sockets on loopback)."""

from __future__ import annotations

import importlib.metadata
import re
import signal
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

import sockstack
from sockstack import connect
from tests.cli.conftest import ROOT, Proc, free_port, run, run_suggestions, serving


@pytest.fixture
def broker() -> Iterator[tuple[str, str]]:
    """`sockstack broker` on free ports: yields (tcp_url, udp_url)."""
    with serving(command="broker") as proc:
        yield proc.urls


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {text!r}"
    return lines[0]


# --- item 9: packaging --------------------------------------------------------------------


def test_version_has_one_source_the_package_metadata() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert importlib.metadata.version("sockstack") == declared == sockstack.__version__
    source = (ROOT / "src" / "sockstack" / "__init__.py").read_text()
    assert declared not in source  # not written a second time
    for command in (["sockstack"], [sys.executable, "-m", "sockstack"]):
        out = run([*command, "--version"])
        assert (out.returncode, out.stdout, out.stderr) == (0, f"sockstack {declared}\n", "")


def test_python_m_sockstack_is_the_command(demo_server: tuple[str, str]) -> None:
    tcp, _ = demo_server
    out = run([sys.executable, "-m", "sockstack", "call", tcp, "add", "2", "3"])
    assert (out.returncode, out.stdout) == (0, "5\n")
    out = run([sys.executable, "-m", "sockstack", "call", tcp, "nope"])
    assert out.returncode == 1 and "UNKNOWN_METHOD" in out.stderr


def test_license_is_mit_and_installed_with_the_metadata() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the sockstack authors" in text
    meta = importlib.metadata.metadata("sockstack")
    assert "MIT" in (meta.get("License-Expression") or meta.get("License") or "")
    assert "LICENSE" in (meta.get_all("License-File") or [])


@pytest.mark.slow
def test_py_typed_is_installed_and_mypy_uses_the_package_types(tmp_path: Path) -> None:
    assert (Path(sockstack.__file__).parent / "py.typed").is_file()
    user = tmp_path / "user.py"
    user.write_text(
        "from sockstack import connect\n"
        "def total(url: str) -> int:\n"
        "    with connect(url) as c:\n"
        "        return int(c.call('add', 2, 3))\n"
        "x: int = connect\n"  # a real type error: mypy must know what connect is
    )
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
        cwd=tmp_path,
        seconds=180,
    )
    assert "py.typed" not in out.stdout and "import-untyped" not in out.stdout, out.stdout
    # The one error is the deliberate one, which mypy can only see with sockstack's types.
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "user.py:5" in errors[0], out.stdout


# --- item 8: the quickstart's service, named by its file --------------------------------------


def test_serve_a_service_by_file_path_from_another_directory(tmp_path: Path) -> None:
    proc = Proc(
        [
            "sockstack",
            "serve",
            str(ROOT / "examples" / "demo_service.py") + ":Calculator",
            "--tcp",
            "127.0.0.1:0",
        ],
        cwd=tmp_path,
    )
    try:
        url = proc.wait_line(r"serving Calculator on (tcp://\S+)").group(1)
        proc.wait_line(r"^\s+add\(a, b\)\s+a \+ b$")  # the banner lists the methods
        assert run(["sockstack", "call", url, "add", "2", "3"]).stdout == "5\n"
    finally:
        assert proc.stop() == 0


# --- item 10: the command's edges -------------------------------------------------------------


def test_output_to_a_closed_pipe_ends_quietly(demo_server: tuple[str, str]) -> None:
    tcp, _ = demo_server
    with connect(tcp) as c:  # more than a pipe holds, so the writer meets the closed pipe
        assert c.call("set", "big", "x" * 300_000) is True
    out = run(
        [
            "bash",
            "-c",
            f"set -o pipefail; sockstack call {tcp} get big | head -c 10; "
            'echo " exit=${PIPESTATUS[0]}"',
        ]
    )
    assert out.stdout == "xxxxxxxxxx exit=141\n"
    assert out.stderr == ""  # no BrokenPipeError traceback, no "Exception ignored"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "def broken(:\n",
            r"cannot import 'bad_service': invalid syntax \(.*bad_service\.py, line 1\)",
        ),
        ("raise RuntimeError('no database')\n", r"it raised RuntimeError: no database"),
        (
            "from sockstack import Service, method\n"
            "class Svc(Service):\n"
            "    def __init__(self, dsn: str) -> None:\n"
            "        self.dsn = dsn\n",
            r"cannot create Svc\(\): missing a required argument: 'dsn'",
        ),
    ],
    ids=["syntax-error", "raises-on-import", "init-needs-arguments"],
)
def test_a_service_that_cannot_load_is_a_usage_error(
    tmp_path: Path, source: str, expected: str
) -> None:
    (tmp_path / "bad_service.py").write_text(source)
    for spec in ("bad_service:Svc", "./bad_service.py:Svc"):
        out = run(["sockstack", "serve", spec, "--tcp", "127.0.0.1:0"], cwd=tmp_path)
        assert out.returncode == 2, out.stderr  # usage, not 1 ("the server answered an error")
        assert re.search(expected, _one_line(out.stderr)), out.stderr
        assert "Traceback" not in out.stderr


def test_log_level_takes_level_names_before_or_after_the_command(
    demo_server: tuple[str, str],
) -> None:
    tcp, _ = demo_server
    out = run(["sockstack", "--log-level", "LOUD", "call", tcp, "add", "1", "2"])
    assert out.returncode == 2 and "invalid choice: 'LOUD'" in out.stderr
    out = run(["sockstack", "call", tcp, "add", "1", "2", "--log-level", "loud"])
    assert out.returncode == 2 and "invalid choice" in out.stderr
    for args in (["--log-level", "debug", "call", tcp], ["call", tcp, "--log-level", "Debug"]):
        out = run(["sockstack", *args, "add", "1", "2"])
        assert (out.returncode, out.stdout) == (0, "3\n"), out.stderr
    # After the command it applies: a WARNING server logs nothing at INFO, even when stopping.
    proc = Proc(["sockstack", "serve", "--tcp", "127.0.0.1:0", "--log-level", "warning"])
    proc.wait_line("Ctrl-C stops")
    assert proc.stop(signal.SIGINT) == 0
    assert " INFO " not in proc.stderr(), proc.stderr()


def test_sub_with_fewer_messages_than_count_fails(broker: tuple[str, str]) -> None:
    tcp, _ = broker
    out = run(["sockstack", "sub", tcp, "nothing.>", "--count", "2", "--timeout", "0.3"])
    assert out.returncode == 3
    assert _one_line(out.stderr) == "sockstack: error: got 0 of 2 messages (0.3 s without one)"
    out = run(["sockstack", "sub", tcp, "nothing.>", "--timeout", "0.2"])  # no --count: done
    assert out.returncode == 0, out.stderr


def test_help_offers_only_what_the_command_takes(broker: tuple[str, str]) -> None:
    assert "--workers" in run(["sockstack", "serve", "--help"]).stdout
    assert "--workers" not in run(["sockstack", "broker", "--help"]).stdout
    out = run(["sockstack", "broker", "--workers", "2"])
    assert out.returncode == 2 and "--workers" in out.stderr
    out = run(["sockstack", "serve", "--broker", "--workers", "2"])
    assert out.returncode == 2 and "no --workers" in out.stderr
    assert "udp://" not in run(["sockstack", "sub", "--help"]).stdout
    assert "udp://" in run(["sockstack", "pub", "--help"]).stdout
    _, udp = broker
    out = run(["sockstack", "sub", udp, "a.>"])
    assert out.returncode == 2 and "use tcp:// or tls://" in _one_line(out.stderr)


def test_pub_to_a_server_without_a_broker_is_an_error(
    demo_server: tuple[str, str], broker: tuple[str, str]
) -> None:
    for url in demo_server:  # the demo alone: no broker
        out = run(["sockstack", "pub", url, "a.b", "1"])
        assert out.returncode == 1, out.stderr
        line = _one_line(out.stderr)
        assert "has no broker" in line and "UNKNOWN_METHOD" in line
    for url in broker:
        out = run(["sockstack", "pub", url, "a.b", "1"])
        assert (out.returncode, out.stderr) == (0, "")


def test_pub_clear_removes_a_retained_message(broker: tuple[str, str]) -> None:
    tcp, _ = broker
    assert run(["sockstack", "pub", tcp, "room.temp", "21.5", "--retain"]).returncode == 0
    out = run(["sockstack", "sub", tcp, "room.>", "--count", "1", "--timeout", "5"])
    assert (out.returncode, out.stdout) == (0, "room.temp 21.5\n")
    assert run(["sockstack", "pub", tcp, "room.temp", "--clear"]).returncode == 0
    with connect(tcp) as client:  # nothing retained any more: the subscription stays empty
        sub = client.subscribe("room.>")
        client.publish("room.marker", 1, qos=1)
        assert sub.get(timeout=5).topic == "room.marker"
    for wrong in (["room.temp"], ["room.temp", "1", "--clear"]):
        out = run(["sockstack", "pub", tcp, *wrong])
        assert out.returncode == 2 and "either VALUE or --clear" in _one_line(out.stderr)


def test_endpoint_errors_say_what_is_missing_and_the_expected_form() -> None:
    out = run(["sockstack", "serve", "--tcp", "5070"])
    assert out.returncode == 2
    assert _one_line(out.stderr) == (
        "sockstack: error: '5070': missing host: expected HOST:PORT, e.g. 127.0.0.1:5070"
    )
    out = run(["sockstack", "call", "tcp://5070", "add"])
    assert (
        out.returncode == 2
        and "missing host" in out.stderr
        and "tcp://127.0.0.1:5070" in (out.stderr)
    )
    out = run(["sockstack", "call", "tcp://127.0.0.1", "add"])
    assert (
        out.returncode == 2 and "missing :port" in out.stderr and "tcp://HOST:PORT" in (out.stderr)
    )


def test_tls_files_are_named_with_the_reason(tmp_path: Path) -> None:
    port = free_port()
    out = run(["sockstack", "serve", "--tls", f"127.0.0.1:{port}", "--cert", "nope.pem"])
    assert out.returncode == 2
    assert _one_line(out.stderr) == "sockstack: error: --cert nope.pem: No such file or directory"
    out = run(["sockstack", "call", f"tls://127.0.0.1:{port}", "x", "--ca", "nope.pem"])
    assert _one_line(out.stderr) == "sockstack: error: --ca nope.pem: No such file or directory"
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    out = run(
        ["sockstack", "serve", "--tls", f"127.0.0.1:{port}", "--cert", "junk.pem"], cwd=tmp_path
    )
    assert out.returncode == 2 and "--cert junk.pem" in _one_line(out.stderr)


@pytest.mark.parametrize(
    "args",
    [
        ["serve"],
        ["serve", "--broker"],
        ["broker"],
        ["serve", str(ROOT / "examples" / "demo_service.py") + ":Calculator"],
    ],
    ids=["demo", "demo-and-broker", "broker", "user-service"],
)
def test_every_command_the_banner_suggests_works(args: list[str]) -> None:
    proc = Proc(["sockstack", *args, "--tcp", "127.0.0.1:0", "--udp", "127.0.0.1:0"])
    try:
        proc.wait_line("Ctrl-C stops")
        banner = proc.seen
        if "broker" not in args:
            assert any(re.match(r"^  \S+\(.*\)", line) for line in banner), banner  # methods
        if args == ["serve"]:  # the demo's methods, all of them, each with its parameters
            for sig in ("add(a, b)", "echo(value=None)", "get(key, default=None)", "keys()"):
                assert any(line.strip().startswith(sig) for line in banner), banner
        run_suggestions(banner, " ".join(args))
    finally:
        assert proc.stop() == 0
