"""A server on its own event loop in a background thread, for tests whose own thread is a
blocking client's (it can be interrupted by a signal, and it blocks as a user's would), and
the small tools those tests share: TLS client options, a function run in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import trustme

from sockstack import Server, ServerLimits
from sockstack.transport.tls import server_context
from tests.conftest import timeout

S = TypeVar("S")


class Served(Generic[S]):
    """A running server and its service; ``url("tcp")`` etc. name its endpoints."""

    def __init__(self, service: S, server: Server, loop: asyncio.AbstractEventLoop) -> None:
        self.service = service
        self.server = server
        self.loop = loop

    def url(self, scheme: str) -> str:
        return str(self.server.endpoint(scheme))

    def run(self, coro: Any) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout(10))


@contextlib.contextmanager
def serving_in_thread(
    service: S, cert: Path, on_stop: Callable[[], None] | None = None, **options: Any
) -> Iterator[Served[S]]:
    """``service`` served on 127.0.0.1 over TCP, UDP and TLS (``cert``) from a background
    thread's loop (short drain and close timeouts); ``options`` go to :class:`Server`.
    ``on_stop`` runs first when the block ends (e.g. to release calls still held)."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        options.setdefault(
            "limits", ServerLimits(drain_timeout=timeout(2), close_timeout=timeout(2))
        )
        srv = Server(
            service,
            tcp=["127.0.0.1:0"],
            udp=["127.0.0.1:0"],
            tls=["127.0.0.1:0"],
            tls_context=server_context(cert),
            **options,
        )
        try:
            loop.run_until_complete(srv.start())
            box["server"] = srv
        finally:
            started.set()
        loop.run_forever()
        loop.run_until_complete(srv.shutdown())
        loop.close()

    thread = threading.Thread(target=run, name="test-server", daemon=True)
    thread.start()
    assert started.wait(timeout(10)) and "server" in box, "the server did not start"
    try:
        yield Served(service, box["server"], loop)
    finally:
        if on_stop is not None:
            on_stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout(20))
        assert not thread.is_alive(), "the server thread did not stop"


def server_cert(ca: trustme.CA, directory: Path) -> Path:
    """A certificate for 127.0.0.1 signed by ``ca``, with its key, in one PEM file."""
    path = directory / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(path))
    return path


def options(scheme: str, ca: trustme.CA, **more: Any) -> dict[str, Any]:
    """A blocking or asyncio client's options for ``scheme`` (TLS: trust ``ca``)."""
    if scheme == "tls":
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        more["tls"] = ctx
    return more


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """``fn()`` in a daemon thread; :func:`result` joins it and returns or raises."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # reported by the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def result(thread: threading.Thread, box: dict[str, Any]) -> Any:
    thread.join(timeout(30))
    assert not thread.is_alive(), "the thread still runs"
    if "error" in box:
        raise box["error"]
    return box["value"]
