"""The servers of the HTTP benchmark (bench/http.py), each one function, ``add(a, b) -> a + b``:

- :class:`Calculator`: the sockstack service, served by ``sockstack serve
  bench.http_apps:Calculator --tcp ... --http ... --broker`` (the gateway answers
  ``POST /rpc/add``), as a user would serve a service of theirs;
- ``fastapi``: FastAPI with a pydantic body model, as its users write it (bench/http_fastapi.py),
  on uvicorn with httptools and uvloop (``python -m bench.http_apps fastapi``);
- ``asgi``: a bare ASGI app on the same uvicorn (msgspec parses the body): what any Python HTTP
  server pays before its own routing, the floor under the two others.

The two uvicorn servers bind 127.0.0.1 on a free port and print ``listening PORT`` (as
bench/peers.py does); both are configured as the gateway configures its own uvicorn: no access
log, no lifespan. Imports of FastAPI and uvicorn are inside the functions: ``sockstack serve``
imports this module only for :class:`Calculator`.
"""

from __future__ import annotations

import argparse
import socket
from typing import Any

from sockstack import Service, method

__all__ = ["ADD_BODY", "Calculator", "main"]

ADD_BODY = b'{"a": 2, "b": 3}'
"""The request body every row sends (``POST /rpc/add``); every server answers ``5``."""


class Calculator(Service):
    """The service the gateway serves: one method, typed as the FastAPI peer's body model."""

    @method(inline=True)
    def add(self, a: int, b: int) -> int:
        """a + b."""
        return a + b


def fastapi_app() -> Any:
    """FastAPI's app (bench/http_fastapi.py: a module of its own, as a FastAPI user writes it;
    FastAPI reads the body model from the handler's annotations)."""
    from bench.http_fastapi import app

    return app


def asgi_app() -> Any:
    """The bare ASGI reference: reads the body, decodes it with msgspec, answers the sum."""
    import msgspec

    decode, encode = msgspec.json.decode, msgspec.json.encode
    headers = [(b"content-type", b"application/json")]
    not_found = {"type": "http.response.start", "status": 404, "headers": []}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if scope["path"] != "/rpc/add" or scope["method"] != "POST":
            await send(not_found)
            await send({"type": "http.response.body", "body": b""})
            return
        args = decode(body)
        out = encode(args["a"] + args["b"])
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    return app


def serve_uvicorn(app: Any) -> None:
    """Serve ``app`` with uvicorn (httptools, uvloop) on a free loopback port until SIGTERM."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    config = uvicorn.Config(
        app,
        http="httptools",
        loop="uvloop",
        lifespan="off",
        log_config=None,
        log_level="warning",
        access_log=False,
        backlog=2048,
    )
    server = uvicorn.Server(config)
    print(f"listening {sock.getsockname()[1]}", flush=True)
    server.run(sockets=[sock])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="The HTTP benchmark's peer servers.")
    p.add_argument("app", choices=["fastapi", "asgi"])
    args = p.parse_args(argv)
    serve_uvicorn(fastapi_app() if args.app == "fastapi" else asgi_app())


if __name__ == "__main__":
    main()
