#!/usr/bin/env python3
"""The course notes' TCP server, with nothing but the standard ``socket`` module.

    socket -> bind -> listen -> accept -> (recv -> sendall)* -> close

Each message is framed by a 4-byte big-endian length (TCP is a byte stream: without a length,
the reader cannot tell where one message ends). The server echoes every message back. It serves
one client at a time, which is what the plain flow gives; sockstack exists for the rest.

    python examples/raw_tcp_server.py --port 5060
"""

from __future__ import annotations

import argparse
import socket
import struct

LENGTH = struct.Struct(">I")
MAX_MESSAGE = 1 << 20


def recv_exactly(conn: socket.socket, n: int) -> bytes | None:
    """Read exactly n bytes, or None if the peer closed first."""
    chunks = bytearray()
    while len(chunks) < n:
        chunk = conn.recv(n - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def handle(conn: socket.socket) -> None:
    while True:
        header = recv_exactly(conn, LENGTH.size)  # read
        if header is None:
            return
        (size,) = LENGTH.unpack(header)
        if size > MAX_MESSAGE:
            return  # refuse, from the header alone, before reading the payload
        payload = recv_exactly(conn, size)
        if payload is None:
            return
        conn.sendall(header + payload)  # write


def main() -> None:
    parser = argparse.ArgumentParser(description="Length-prefixed TCP echo server (raw socket).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5060, help="default 5060 (above 5000)")
    parser.add_argument("--clients", type=int, default=0, help="stop after N clients (0: never)")
    args = parser.parse_args()

    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # socket
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((args.host, args.port))  # bind
    server.listen()  # listen
    print(f"listening on {args.host}:{server.getsockname()[1]}", flush=True)
    served = 0
    try:
        while args.clients == 0 or served < args.clients:
            conn, _addr = server.accept()  # accept: where server and client meet
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                handle(conn)
            served += 1  # close (leaving the with block)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()
