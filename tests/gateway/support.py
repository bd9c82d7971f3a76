"""What the gateway's tests share: a host with the gateway on port 0, and a blocking HTTP
client (the standard library's http.client, over a real loopback socket) run off the loop."""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sockstack import Server
from tests.conftest import timeout


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names (the last of repeated ones)
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def problem(self) -> dict[str, Any]:
        assert self.headers.get("content-type") == "application/problem+json", self
        problem: dict[str, Any] = json.loads(self.body)
        assert problem["status"] == self.status
        assert problem["type"] == f"urn:sockstack:error:{problem['title']}"
        return problem


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | str | Any = None,
    headers: Mapping[str, str] | None = None,
    *,
    host: str = "127.0.0.1",
    context: Any = None,
) -> Answer:
    """One request on a new connection (blocking). A ``body`` that is not bytes or str is sent
    as JSON."""
    h = dict(headers or {})
    if body is not None and not isinstance(body, bytes | str):
        body = json.dumps(body)
        h.setdefault("content-type", "application/json")
    if context is not None:
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=timeout(10), context=context
        )
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout(10))
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
    finally:
        conn.close()


async def arequest(port: int, method: str, path: str, body: Any = None, **kw: Any) -> Answer:
    return await asyncio.to_thread(request, port, method, path, body, **kw)


@asynccontextmanager
async def gateway(*args: Any, **kwargs: Any) -> AsyncIterator[tuple[Server, int]]:
    """``Server(*args, http=["127.0.0.1:0"], **kwargs)`` started; yields it and its HTTP port."""
    kwargs.setdefault("http", ["127.0.0.1:0"])
    server = Server(*args, **kwargs)
    await server.start()
    try:
        web = next(e for e in server.endpoints if e.scheme in ("http", "https"))
        yield server, web.port
    finally:
        await server.shutdown()
