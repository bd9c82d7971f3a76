#!/usr/bin/env python3
"""Why sockstack's adapters use asyncio Protocols rather than streams: a measurement.

Runs a length-prefixed echo server in a child process, once written with asyncio streams and
once with an asyncio Protocol, each on the standard loop and on uvloop, and times sequential
64-byte round trips from a blocking client. Client and server are pinned to the same CPU
(os.sched_setaffinity) so that the figures compare like with like. Bounded: --count round trips
per row (default 20,000).

    python bench/transport_choice.py [--count N]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import struct
import time

LENGTH = struct.Struct(">I")


async def _streams_server(port_q: mp.Queue) -> None:  # type: ignore[type-arg]
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(4)
                payload = await reader.readexactly(LENGTH.unpack(header)[0])
                writer.write(header + payload)
        except asyncio.IncompleteReadError:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port_q.put(server.sockets[0].getsockname()[1])
    await server.serve_forever()


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        out = []
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = LENGTH.unpack_from(buf, pos)
            if len(buf) - pos - 4 < n:
                break
            out.append(bytes(buf[pos : pos + 4 + n]))
            pos += 4 + n
        del buf[:pos]
        if out:
            self.transport.write(b"".join(out))  # type: ignore[attr-defined]


async def _protocol_server(port_q: mp.Queue) -> None:  # type: ignore[type-arg]
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Echo, "127.0.0.1", 0)
    port_q.put(server.sockets[0].getsockname()[1])
    await server.serve_forever()


def _serve(kind: str, use_uvloop: bool, cpu: int, port_q: mp.Queue) -> None:  # type: ignore[type-arg]
    os.sched_setaffinity(0, {cpu})
    main = _streams_server if kind == "streams" else _protocol_server
    if use_uvloop:
        import uvloop

        uvloop.run(main(port_q))
    else:
        asyncio.run(main(port_q))


def measure(kind: str, use_uvloop: bool, count: int, cpu: int) -> float:
    q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    proc = mp.Process(target=_serve, args=(kind, use_uvloop, cpu, q), daemon=True)
    proc.start()
    try:
        port = q.get(timeout=10)
        os.sched_setaffinity(0, {cpu})
        msg = LENGTH.pack(64) + b"x" * 64
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(min(1000, count)):  # warm-up
                s.sendall(msg)
                s.recv(1024)
            start = time.perf_counter()
            for _ in range(count):
                s.sendall(msg)
                got = 0
                while got < len(msg):
                    got += len(s.recv(1024))
            return count / (time.perf_counter() - start)
    finally:
        proc.terminate()
        proc.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--cpu", type=int, default=0, help="CPU both sides are pinned to")
    args = parser.parse_args()
    print(f"sequential 64 B round trips/s, client and server pinned to CPU {args.cpu}")
    for kind in ("streams", "protocol"):
        for use_uvloop in (False, True):
            rate = measure(kind, use_uvloop, args.count, args.cpu)
            loop_name = "uvloop" if use_uvloop else "asyncio"
            print(f"  {kind:9s} {loop_name:8s} {rate:10,.0f}")


if __name__ == "__main__":
    main()
