"""The FastAPI peer of the HTTP benchmark (bench/http.py), written as FastAPI's users write it:
a pydantic body model, ``POST /rpc/add``, served by ``python -m bench.http_apps fastapi``
(uvicorn with httptools and uvloop). The handler is ``async def``: it runs on the event loop, as
the sockstack method marked ``inline`` does (a plain ``def`` would go through FastAPI's thread
pool, and be slower).

FastAPI is in the ``bench`` extra only: the ignores keep mypy quiet where it is not installed
(the bench's unused ignores are allowed, pyproject.toml)."""

from fastapi import FastAPI  # type: ignore[import-not-found]
from pydantic import BaseModel  # type: ignore[import-not-found]

app = FastAPI()


class AddArgs(BaseModel):  # type: ignore[misc]
    a: int
    b: int


@app.post("/rpc/add")  # type: ignore[misc,untyped-decorator]
async def add(args: AddArgs) -> int:
    return args.a + args.b
