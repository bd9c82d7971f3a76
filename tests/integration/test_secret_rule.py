"""One rule for the shared secret everywhere (sockstack.transport.secret): bytes, or text as its
UTF-8 encoding; surrounding ASCII whitespace (space, tab, CR, LF) removed wherever it comes from
(a file, $SOCKSTACK_SECRET, Python's str or bytes); empty refused (ValueError, CLI exit 2)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sockstack import AsyncClient, ConnectError, Server, connect
from sockstack.transport.secret import normalize_secret
from tests.cli.conftest import BIN, run, serving
from tests.conftest import Probe, timeout


def test_the_rule() -> None:
    assert normalize_secret(None) is None
    assert normalize_secret("text") == b"text"
    assert normalize_secret(b" \t s3cret\r\n") == b"s3cret"
    assert normalize_secret("  clé\n") == "clé".encode()
    assert normalize_secret(bytearray(b"a b\n")) == b"a b"  # inner whitespace is kept
    assert normalize_secret(b"\x0bx\x0c") == b"\x0bx\x0c"  # only space, tab, CR, LF go
    for empty in ("", b"", "\n", b" \t\r\n"):
        with pytest.raises(ValueError, match="empty"):
            normalize_secret(empty)
    with pytest.raises(TypeError, match="str or bytes"):
        normalize_secret(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("empty", ["", b"\n"])
def test_python_api_refuses_an_empty_secret(empty: str | bytes) -> None:
    with pytest.raises(ValueError, match="empty"):
        Server(Probe(), tcp=["127.0.0.1:0"], secret=empty)
    with pytest.raises(ValueError, match="empty"):
        AsyncClient("tcp://127.0.0.1:1", secret=empty)
    with pytest.raises(ValueError, match="empty"):
        connect("udp://127.0.0.1:1", secret=empty)


async def test_str_and_bytes_with_whitespace_are_the_same_secret() -> None:
    # The server is given text with a newline; clients give bytes, text, padded bytes.
    async with Server(Probe(), tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"], secret="s3cret\n") as srv:
        assert srv.secret == b"s3cret"
        for scheme in ("tcp", "udp"):
            url = str(srv.endpoint(scheme))
            for secret in (b"s3cret", "s3cret", b"  s3cret\r\n", "\ts3cret "):
                async with AsyncClient(url, secret=secret, timeout=timeout(5)) as c:
                    assert await c.call("add", 2, 3) == 5
        with pytest.raises(ConnectError, match="AUTH_FAILED"):
            async with AsyncClient(
                str(srv.endpoint("tcp")), secret="s3cret!", timeout=timeout(5), reconnect=False
            ):
                pass


def test_cli_server_and_python_client_share_a_secret_file(tmp_path: Path) -> None:
    """The issue's case: `--secret-file f` on the server, `connect(url,
    secret=open(f).read().encode())` in Python, the file ending in a newline."""
    f = tmp_path / "secret"
    f.write_text("correct horse battery staple\n")
    with serving("--secret-file", str(f)) as server:
        for url in server.urls:
            with open(f) as fh:
                text = fh.read()
            with connect(url, secret=text.encode(), timeout=timeout(5)) as c:
                assert c.call("add", 2, 3) == 5
            with connect(url, secret=text, timeout=timeout(5)) as c:
                assert c.call("add", 2, 3) == 5
            # The environment variable with a trailing newline (as `$(cat f)` would not strip
            # a CR, or an exported value with one) is the same secret.
            out = run(
                ["sockstack", "call", url, "add", "2", "3"],
                env={"SOCKSTACK_SECRET": "correct horse battery staple\r\n"},
            )
            assert out.returncode == 0 and out.stdout.strip() == "5", out.stderr


def test_cli_refuses_an_empty_secret(tmp_path: Path) -> None:
    blank = tmp_path / "blank"
    blank.write_text(" \n\n")
    out = run(["sockstack", "serve", "--tcp", "127.0.0.1:0", "--secret-file", str(blank)])
    assert out.returncode == 2 and "empty" in out.stderr and str(blank) in out.stderr
    out = run(
        ["sockstack", "call", "tcp://127.0.0.1:1", "add", "1", "2"], env={"SOCKSTACK_SECRET": "\n"}
    )
    assert out.returncode == 2 and "SOCKSTACK_SECRET" in out.stderr, out.stderr


def test_text_that_utf8_cannot_encode_is_a_clear_error() -> None:
    # "\udce9" is how os.environ / os.fsdecode give the byte e9 of a non-UTF-8 value.
    for make in (
        lambda: normalize_secret("\udce9t\udce9"),
        lambda: Server(Probe(), tcp=["127.0.0.1:0"], secret="\udce9"),
        lambda: connect("tcp://127.0.0.1:1", secret="x\udce9"),
    ):
        with pytest.raises(ValueError, match="UTF-8 cannot encode") as info:
            make()
        assert not isinstance(info.value, UnicodeError)  # not the codec's bare error
        assert "empty" not in str(info.value)
        assert "\udce9" not in str(info.value)  # no part of the secret in the message


def test_cli_takes_a_secret_that_is_not_utf8(tmp_path: Path) -> None:
    # SOCKSTACK_SECRET=$'\xe9t\xe9' (Latin-1 "été") against a server given those bytes in a file.
    secret = b"\xe9t\xe9"
    f = tmp_path / "secret"
    f.write_bytes(secret + b"\n")
    with serving("--secret-file", str(f)) as server:
        urls = server.urls
        env = dict(os.environb)
        env[b"PATH"] = b"%s%s%s" % (os.fsencode(BIN), os.pathsep.encode(), env.get(b"PATH", b""))
        env[b"SOCKSTACK_SECRET"] = secret
        for url in urls:
            out = subprocess.run(
                ["sockstack", "call", url, "add", "2", "3"],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout(30),
            )
            assert out.returncode == 0 and out.stdout.strip() == "5", out.stderr
            with connect(url, secret=secret, timeout=timeout(5)) as c:  # Python, as bytes
                assert c.call("add", 2, 3) == 5
        env[b"SOCKSTACK_SECRET"] = b"\xe9t\xe8"  # another secret: refused, not "empty"
        out = subprocess.run(
            ["sockstack", "call", urls[0], "add", "2", "3"],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout(30),
        )
        assert out.returncode != 0 and "AUTH_FAILED" in out.stderr, out.stderr
