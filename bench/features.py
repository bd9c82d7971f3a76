"""What the RPC features cost a call when used (issue 17): sequential blocking calls over TCP
loopback, client and server processes on the same core, 4 arguments (64 bytes of msgpack), an
inline method. One row per feature, each against the plain call measured in the same round:

- **plain call**: no metadata, no interceptor, a method without hints (the deadline, the
  client's timeout, is on every call: it is not optional);
- **metadata**: one entry (``tenant``) on each call, read by nothing;
- **client interceptor**: a no-op ``ClientInterceptor`` on the client;
- **server interceptor**: the same calls to a server with a no-op ``ServerInterceptor``;
- **plain hints**, **dataclass hint**: validation and conversion from type hints (the "type
  hints" table has these too, with a method of plain hints and one of a dataclass).

    python -m bench.features [--count N]
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
from typing import Any

from bench.codec_choice import ORDER, PLAIN_ARGS, _Hints, per_call

__all__ = ["ROWS", "live_rows"]

ROWS = (
    "plain call",
    "metadata on the call (1 entry)",
    "client interceptor (no-op)",
    "server interceptor (no-op)",
    "plain hints (validated)",
    "dataclass hint (converted)",
    "plain call (again)",
)


def _serve(port_q: mp.Queue, cpu: int, intercepted: bool) -> None:  # type: ignore[type-arg]
    import asyncio

    from sockstack import Server
    from sockstack.interceptors import ServerInterceptor

    os.sched_setaffinity(0, {cpu})
    interceptors = [ServerInterceptor()] if intercepted else []

    async def serve() -> None:
        async with Server(_Hints.build(), tcp=["127.0.0.1:0"], interceptors=interceptors) as srv:
            port_q.put(str(srv.endpoint("tcp")))
            await srv.serve_forever()

    asyncio.run(serve())


def live_rows(count: int) -> list[tuple[str, float]]:
    """(row, ns per call) for :data:`ROWS`, in that order: one round."""
    from sockstack import connect
    from sockstack.interceptors import ClientInterceptor

    cpu = min(os.sched_getaffinity(0))
    mine = os.sched_getaffinity(0)
    procs = []
    targets = []
    try:
        for intercepted in (False, True):
            q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
            proc = mp.Process(target=_serve, args=(q, cpu, intercepted), daemon=True)
            proc.start()
            procs.append(proc)
            targets.append(q.get(timeout=20))
        os.sched_setaffinity(0, {cpu})
        plain_url, intercepted_url = targets
        out: list[tuple[str, float]] = []
        with (
            connect(plain_url, timeout=10) as c,
            connect(plain_url, timeout=10, interceptors=[ClientInterceptor()]) as ci,
            connect(intercepted_url, timeout=10) as si,
        ):
            for client in (c, ci, si):  # warm up: a server process's first calls are slower
                for _ in range(count // 4):
                    client.call("untyped", *PLAIN_ARGS)
            md = {"tenant": "acme"}
            calls: list[Any] = [
                functools.partial(c.call, "untyped", *PLAIN_ARGS),
                functools.partial(c.request, "untyped", PLAIN_ARGS, metadata=md),
                functools.partial(ci.call, "untyped", *PLAIN_ARGS),
                functools.partial(si.call, "untyped", *PLAIN_ARGS),
                functools.partial(c.call, "plain", *PLAIN_ARGS),
                functools.partial(c.call, "typed", ORDER),
                functools.partial(c.call, "untyped", *PLAIN_ARGS),
            ]
            for label, call in zip(ROWS, calls, strict=True):
                out.append((label, per_call(call, count)))
        return out
    finally:
        os.sched_setaffinity(0, mine)
        for proc in procs:
            proc.terminate()
            proc.join(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=20_000)
    count = min(p.parse_args().count, 1_000_000)
    for name, ns in live_rows(count):
        print(f"{ns / 1000:8.2f} µs  {name}")


if __name__ == "__main__":
    main()
