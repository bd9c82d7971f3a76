"""docs/PROTOCOL.md Appendix A (the demo service) and Appendix B (the shared secret) against the
code (issue 11, item 6): every demo method is documented with its parameters as the code
declares them (a method added without a row fails here), the bounds are the code's, the hex
example is what a live demo server answers byte for byte, and each documented error is the one
a live server sends."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import inspect
import json
import re
from pathlib import Path
from typing import Any

import pytest

from sockstack import AsyncClient, ErrorCode, RemoteError, Server
from sockstack.cli.common import load_secret
from sockstack.demo import KEY_OVERHEAD, MAX_BYTES, MAX_KEYS, Demo
from sockstack.protocol.auth import KEY_LABEL
from sockstack.protocol.frames import FrameDecoder
from sockstack.rpc.service import collect_handlers
from sockstack.transport.urls import DEFAULT_TCP_PORT, DEFAULT_UDP_PORT
from tests.conftest import timeout
from tests.protocol.test_vectors import doc_vectors

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def appendix(letter: str) -> str:
    text = DOC.read_text()
    start = text.index(f"\n## Appendix {letter}.")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def _default(value: Any) -> str:
    return "nil" if value is None else json.dumps(value)


def wire_signature(sig: inspect.Signature) -> str:
    """A Python signature as Appendix A writes it: ``key, default=nil``; keyword-only
    parameters after ``*``, and ``*args`` / ``**kwargs`` as such."""
    out: list[str] = []
    star = False
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            out.append(f"*{p.name}")
            star = True
            continue
        if p.kind is p.VAR_KEYWORD:
            out.append(f"**{p.name}")
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            out.append("*")
            star = True
        out.append(p.name if p.default is p.empty else f"{p.name}={_default(p.default)}")
    return ", ".join(out)


def documented_methods() -> dict[str, str]:
    rows = re.findall(r"^\| `([\w.]+)\((.*?)\)` \|", appendix("A"), flags=re.M)
    names = [name for name, _ in rows]
    assert len(names) == len(set(names)), f"a method documented twice: {names}"
    return dict(rows)


def test_every_demo_method_is_documented_with_its_parameters() -> None:
    handlers = collect_handlers(Demo())
    code = {name: wire_signature(h.signature) for name, h in handlers.items()}
    assert documented_methods() == code


def test_the_demo_lists_its_own_methods() -> None:
    """``methods()`` is written out by hand in demo.py: it must name every method served."""
    assert Demo().methods() == sorted(collect_handlers(Demo()))


def test_the_documented_bounds_are_the_code_s() -> None:
    text = appendix("A")
    assert f"at most {MAX_KEYS:,} keys" in text
    assert f"{MAX_BYTES >> 20} MiB ({MAX_BYTES:,} bytes)" in text
    assert f"plus {KEY_OVERHEAD} bytes per key" in text
    demo = Demo()
    assert (demo.max_keys, demo.max_bytes) == (MAX_KEYS, MAX_BYTES)
    assert "from 0 to 60" in text
    ports = f"TCP {DEFAULT_TCP_PORT} and UDP {DEFAULT_UDP_PORT}"
    assert ports in " ".join(text.split())  # where `sockstack serve` serves it by default
    kit_readme = DOC.parent / "conformance" / "README.md"
    assert ports in " ".join(kit_readme.read_text().split())


async def test_the_hex_example_is_what_a_live_demo_server_answers() -> None:
    vectors = doc_vectors()
    hello = vectors["hello"]
    async with Server(Demo(), tcp=["127.0.0.1:0"]) as srv:
        ep = srv.endpoint("tcp")
        reader, writer = await asyncio.open_connection(ep.host, ep.port)
        try:
            writer.write(hello + vectors["demo-set"] + vectors["demo-sleep-kwargs"])
            frames: list[bytes] = []
            dec = FrameDecoder()
            async with asyncio.timeout(timeout(5)):
                while len(frames) < 3:
                    chunk = await reader.read(65536)
                    assert chunk, "closed"
                    frames += [f.serialize() for f in dec.feed(chunk)]
        finally:
            writer.close()
    answers = {int.from_bytes(f[8:12], "big"): f for f in frames[1:]}
    assert answers[1].hex(" ") == vectors["demo-set-answer"].hex(" ")
    assert answers[2].hex(" ") == vectors["demo-sleep-error"].hex(" ")


# (method, args, kwargs, codec) -> the ERROR's (type, code) the appendix documents
APPLICATION = ("ServiceError", ErrorCode.APPLICATION_ERROR)
BAD_ARGUMENTS = ("BAD_ARGUMENTS", ErrorCode.BAD_ARGUMENTS)
ERRORS: list[tuple[str, list[Any], dict[str, Any], str, tuple[str, int]]] = [
    ("add", [1, "a"], {}, "msgpack", APPLICATION),
    ("add", [[1], "a"], {}, "msgpack", APPLICATION),
    ("add", [True, 1], {}, "msgpack", APPLICATION),
    # integers cross within 512 bytes of two's complement (PROTOCOL.md §3.1), not beyond
    ("add", [2**4094, 2**4094], {}, "msgpack", ("RESULT_NOT_ENCODABLE", 2007)),
    ("add", [1e308, 1e308], {}, "json", ("RESULT_NOT_ENCODABLE", 2007)),
    # parameters annotated str / float are checked before the method runs (§3.1)
    ("delete", [1], {}, "msgpack", BAD_ARGUMENTS),
    ("get", [b"k"], {}, "msgpack", BAD_ARGUMENTS),
    ("set", [None, 1], {}, "msgpack", BAD_ARGUMENTS),
    ("sleep", [61], {}, "msgpack", APPLICATION),
    ("sleep", [-0.5], {}, "msgpack", APPLICATION),
    ("sleep", ["1"], {}, "msgpack", BAD_ARGUMENTS),
    ("add", [1], {}, "msgpack", ("BAD_ARGUMENTS", ErrorCode.BAD_ARGUMENTS)),
    ("echo", [1, 2], {}, "msgpack", ("BAD_ARGUMENTS", ErrorCode.BAD_ARGUMENTS)),
    ("get", ["k"], {"nope": 1}, "msgpack", ("BAD_ARGUMENTS", ErrorCode.BAD_ARGUMENTS)),
    ("nope", [], {}, "msgpack", ("UNKNOWN_METHOD", ErrorCode.UNKNOWN_METHOD)),
]


@pytest.fixture
async def demo_url() -> Any:
    async with Server(Demo(max_keys=3), tcp=["127.0.0.1:0"]) as srv:
        yield str(srv.endpoint("tcp"))


async def test_the_documented_results(demo_url: str) -> None:
    async with AsyncClient(demo_url, timeout=timeout(5)) as c:
        assert await c.call("add", 2, 3) == 5
        assert await c.call("add", 2, 0.5) == 2.5
        assert await c.call("add", "a", "b") == "ab"
        assert await c.call("add", [1], [2]) == [1, 2]
        assert await c.call("echo") is None
        assert await c.call("set", "b", 1) is True
        assert await c.call("set", "b", 2) is False
        assert await c.call("set", key="a", value={"x": [1]}) is True
        assert await c.call("keys") == ["a", "b"]
        assert await c.call("get", "a") == {"x": [1]}
        assert await c.call("get", "zz", default=7) == 7
        assert await c.call("delete", "b") is True
        assert await c.call("delete", "b") is False
        assert await c.call("sleep", seconds=0) == 0
        assert isinstance(await c.call("time"), float)
        assert await c.call("methods") == sorted(documented_methods())
        assert await c.call("add", 2**63, 2**63) == 2**64  # beyond 64 bits: ext type 1
        assert await c.call("set", "bin", b"\x00\xff") is True
    async with AsyncClient(demo_url, timeout=timeout(5), codec="json") as c:
        assert await c.call("get", "bin") == "AP8="  # a stored bin in JSON: base64 text


@pytest.mark.parametrize(("name", "args", "kwargs", "codec", "expected"), ERRORS)
async def test_the_documented_errors(
    demo_url: str,
    name: str,
    args: list[Any],
    kwargs: dict[str, Any],
    codec: str,
    expected: tuple[str, int],
) -> None:
    async with AsyncClient(demo_url, timeout=timeout(5)) as c:
        assert await c.call("set", "bin", b"\x00") is True
    async with AsyncClient(demo_url, timeout=timeout(5), codec=codec) as c:
        with pytest.raises(RemoteError) as info:
            await c.call(name, *args, **kwargs)
    assert (info.value.type, info.value.code) == expected


async def test_a_full_store_refuses_a_new_key_and_says_so(demo_url: str) -> None:
    async with AsyncClient(demo_url, timeout=timeout(5)) as c:
        for k in "abc":
            assert await c.call("set", k, 1) is True
        with pytest.raises(RemoteError) as info:
            await c.call("set", "d", 1)
        assert (info.value.type, info.value.code) == APPLICATION
        assert "store is full (3 keys)" in str(info.value)
        assert await c.call("set", "a", 2) is False  # replacing fits
        assert await c.call("keys") == ["a", "b", "c"]


# --------------------------------------------------------------------------- Appendix B


def test_the_secret_example_of_appendix_b(tmp_path: Path) -> None:
    """The example's files give the secret "k", whose datagram key is the one §6.1 prints."""
    text = appendix("B")
    assert "6b 0a" in text and "20 6b 0d 0a" in text
    shown = re.search(r"`key` = `([0-9a-f ]+)\n([0-9a-f ]+)`", DOC.read_text())
    assert shown is not None
    key = bytes.fromhex(shown.group(1) + shown.group(2))
    assert hmac.new(b"k", KEY_LABEL, hashlib.sha256).digest() == key
    assert KEY_LABEL.decode() in text
    for content in (b"k\n", b" k\r\n"):
        f = tmp_path / "secret"
        f.write_bytes(content)
        assert load_secret(argparse.Namespace(secret_file=str(f))) == b"k"


async def test_a_value_beyond_the_byte_bound_is_refused_and_changes_nothing() -> None:
    async with Server(Demo(max_bytes=4096), tcp=["127.0.0.1:0"]) as srv:
        async with AsyncClient(str(srv.endpoint("tcp")), timeout=timeout(5)) as c:
            assert await c.call("set", "a", "x" * 1000) is True
            with pytest.raises(RemoteError) as info:
                await c.call("set", "b", "x" * 4000)
            assert (info.value.type, info.value.code) == APPLICATION
            assert "store is full" in str(info.value) and "of 4096 bytes" in str(info.value)
            assert await c.call("keys") == ["a"]
            assert await c.call("set", "a", "y" * 3000) is False  # the old value is freed first
