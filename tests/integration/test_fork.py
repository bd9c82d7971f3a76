"""A client used after ``os.fork()`` (issue 10, item 10).

Parent and child each call with their own name, several times, with their requests in flight
*together*: a rendezvous method on the server answers a round only once both processes' calls
of that round have arrived. A child that shared its parent's TCP/TLS session (or its UDP socket
and request ids, answered from the server's reply cache) would read the other's answers or
none. The blocking client must give each process its own answers; the asyncio client refuses
in the child (ConnectError naming the fork) until ``connect()`` is called there. The parent's
connection must still be the same one, and answer, after the child used and closed its copy.

The server is a subprocess (no thread in this process at fork time); the child reports through
a pipe and ends with ``os._exit``; its exit status is checked. No sleeps: the rendezvous and
the pipes order everything, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import ssl
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from sockstack import AsyncClient, ConnectError, Server, Service, connect, method
from sockstack.transport.tls import server_context
from tests.conftest import timeout

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 5


class Rendezvous(Service):
    """``meet(key, name)`` answers ``name`` once two calls with the same ``key`` have arrived
    (or after ``limit`` seconds, so a broken client fails the test instead of hanging it)."""

    def __init__(self) -> None:
        self.rounds: dict[str, list[Any]] = {}

    @method(inline=True)
    def echo(self, value: Any = None) -> Any:
        return value

    @method
    async def meet(self, key: str, name: str, limit: float = 3.0) -> str:
        entry = self.rounds.setdefault(key, [asyncio.Event(), 0])
        entry[1] += 1
        if entry[1] >= 2:
            entry[0].set()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry[0].wait(), limit)
        return name


def serve_main() -> None:
    """The server subprocess: tcp, udp and tls endpoints; prints their URLs on one line."""
    cert = sys.argv[1]

    async def main() -> None:
        srv = Server(
            Rendezvous(),
            tcp=["127.0.0.1:0"],
            udp=["127.0.0.1:0"],
            tls=["127.0.0.1:0"],
            tls_context=server_context(cert),
        )
        async with srv:
            urls = {s: str(srv.endpoint(s)) for s in ("tcp", "udp", "tls")}
            print(json.dumps(urls), flush=True)
            await srv.serve_forever()

    asyncio.run(main())


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def fork_server(
    ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    cert = tmp_path_factory.mktemp("fork") / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    with open(cert.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from tests.integration.test_fork import serve_main; serve_main()",
                str(cert),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout(20))
        assert ready, "the server subprocess printed no URLs"
        urls: dict[str, str] = json.loads(proc.stdout.readline())
        yield urls
    finally:
        proc.send_signal(signal.SIGTERM)  # ended by its PID
        try:
            proc.wait(timeout(10))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def tls_options(ca: trustme.CA) -> dict[str, ssl.SSLContext]:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return {"tls": ctx}


class Child:
    """A forked child running ``body``; its result comes back as JSON through a pipe."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self.fd = fd
        self.status: int | None = None

    def result(self, seconds: float = 30.0) -> Any:
        """The child's result, once it has exited with status 0 (its error otherwise)."""
        data = b""
        deadline = time.monotonic() + timeout(seconds)
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(left, 0))
            if not ready:
                self.reap()
                raise AssertionError(f"child {self.pid} did not finish within {seconds} s")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                break  # the child exited (or closed its end)
            data += chunk
        self.reap()
        report = json.loads(data or b'{"error": "no report"}')
        assert "error" not in report, f"child failed: {report['error']}"
        assert self.status == 0, f"child exit status {self.status}"
        return report["ok"]

    def reap(self) -> None:
        if self.status is not None:
            return
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:  # still running: end it (by its PID)
            os.kill(self.pid, signal.SIGKILL)
            _, status = os.waitpid(self.pid, 0)
        self.status = os.waitstatus_to_exitcode(status)
        os.close(self.fd)


@contextlib.contextmanager
def forked(body: Callable[[], Any]) -> Iterator[Child]:
    """Fork; the child runs ``body``, writes its result and leaves with ``os._exit``."""
    r, w = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns when other threads exist (earlier tests' executors may still be
        # winding down): the child here runs only this module's code and the client's.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 3
        try:
            os.close(r)
            try:
                out = json.dumps({"ok": body()})
                status = 0
            except BaseException as exc:  # reported to the parent, which fails the test
                out = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
                status = 1
            data = out.encode()
            while data:
                data = data[os.write(w, data) :]
        finally:
            os._exit(status)
    os.close(w)
    child = Child(pid, r)
    try:
        yield child
    finally:
        child.reap()


@pytest.mark.parametrize("scheme", ["tcp", "udp", "tls"])
def test_blocking_client_after_fork_each_process_gets_its_own_answers(
    fork_server: dict[str, str], ca: trustme.CA, scheme: str
) -> None:
    options: dict[str, Any] = tls_options(ca) if scheme == "tls" else {}
    c = connect(fork_server[scheme], timeout=timeout(5), **options)
    assert c.call("echo", "warm") == "warm"
    sock = c.connection.sock
    tag = f"{scheme}-{uuid.uuid4().hex}"

    def child() -> dict[str, Any]:
        answers = [c.call("meet", f"{tag}-{i}", "child") for i in range(ROUNDS)]
        answers += [c.call("echo", f"child-{i}") for i in range(ROUNDS)]
        port = c.connection.sock.getsockname()[1]  # type: ignore[union-attr]
        c.close()  # the child's own session: the parent's must stay open
        return {"answers": answers, "port": port}

    try:
        with forked(child) as kid:
            mine = [c.call("meet", f"{tag}-{i}", "parent") for i in range(ROUNDS)]
            mine += [c.call("echo", f"parent-{i}") for i in range(ROUNDS)]
            theirs = kid.result()  # the child has used, closed and left
        assert mine == ["parent"] * ROUNDS + [f"parent-{i}" for i in range(ROUNDS)]
        assert theirs["answers"] == ["child"] * ROUNDS + [f"child-{i}" for i in range(ROUNDS)]
        # A socket of its own: a source port of its own, never the parent's (UDP: the server's
        # reply cache is keyed by address and request id).
        assert sock is not None and theirs["port"] != sock.getsockname()[1]
        # The parent's session outlived the child's copy: the same socket, still answering.
        assert [c.call("echo", f"after-{i}") for i in range(ROUNDS)] == [
            f"after-{i}" for i in range(ROUNDS)
        ]
        assert c.connection.sock is sock
    finally:
        c.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("where", ["outside the loop", "inside the running loop"])
@pytest.mark.parametrize("scheme", ["tcp", "udp", "tls"])
def test_async_client_after_fork_refuses_then_connects_anew(
    fork_server: dict[str, str], ca: trustme.CA, scheme: str, where: str, loop_kind: str
) -> None:
    options: dict[str, Any] = tls_options(ca) if scheme == "tls" else {}
    tag = f"async-{scheme}-{uuid.uuid4().hex}"
    if loop_kind == "uvloop":
        loop = pytest.importorskip("uvloop").new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    c = AsyncClient(fork_server[scheme], timeout=timeout(5), **options)
    loop.run_until_complete(c.connect())
    assert loop.run_until_complete(c.call("echo", "warm")) == "warm"
    channel = c.channel
    assert channel is not None
    link = channel.stream if channel.kind == "stream" else channel.endpoint  # type: ignore[union-attr]

    def child() -> dict[str, Any]:
        async def main() -> dict[str, Any]:  # in a new event loop, this process's own
            report: dict[str, Any] = {}
            try:
                report["inherited"] = await c.call("echo", "child")
            except ConnectError as exc:
                report["refused"] = str(exc)
            await c.connect()  # a connection of the child's own
            report["answers"] = [await c.call("meet", f"{tag}-{i}", "child") for i in range(ROUNDS)]
            await c.close()
            return report

        return asyncio.run(main())

    async def parent() -> tuple[list[Any], dict[str, Any]]:
        with forked(child) as kid:  # forks here: inside the running loop
            mine = [await c.call("meet", f"{tag}-{i}", "parent") for i in range(ROUNDS)]
            return mine, kid.result()

    try:
        if where == "inside the running loop":
            mine, theirs = loop.run_until_complete(parent())
        else:
            with forked(child) as kid:
                mine = [
                    loop.run_until_complete(c.call("meet", f"{tag}-{i}", "parent"))
                    for i in range(ROUNDS)
                ]
                theirs = kid.result()
        assert "inherited" not in theirs, theirs
        assert "fork" in theirs["refused"] and "connect()" in theirs["refused"], theirs
        assert theirs["answers"] == ["child"] * ROUNDS
        assert mine == ["parent"] * ROUNDS
        # The parent's connection (or UDP socket) is the same one, and answers.
        assert c.channel is channel
        assert link is (channel.stream if channel.kind == "stream" else channel.endpoint)  # type: ignore[union-attr]
        assert [loop.run_until_complete(c.call("echo", f"after-{i}")) for i in range(3)] == [
            f"after-{i}" for i in range(3)
        ]
    finally:
        loop.run_until_complete(c.close())
        loop.close()
