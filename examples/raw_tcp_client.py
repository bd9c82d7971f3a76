#!/usr/bin/env python3
"""The course notes' TCP client, with nothing but the standard ``socket`` module.

socket -> connect -> sendall -> recv -> close

python examples/raw_tcp_client.py --port 5060 hello
"""

from __future__ import annotations

import argparse
import socket
import struct

LENGTH = struct.Struct(">I")


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise ConnectionError("server closed the connection")
        chunks += chunk
    return bytes(chunks)


def echo(sock: socket.socket, message: bytes) -> bytes:
    sock.sendall(LENGTH.pack(len(message)) + message)  # write
    (size,) = LENGTH.unpack(recv_exactly(sock, LENGTH.size))  # read
    return recv_exactly(sock, size)


def main() -> None:
    parser = argparse.ArgumentParser(description="Length-prefixed TCP echo client (raw socket).")
    parser.add_argument("message", nargs="+")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5060)
    args = parser.parse_args()

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # socket
    sock.settimeout(5.0)
    sock.connect((args.host, args.port))  # connect
    try:
        for text in args.message:
            print(echo(sock, text.encode()).decode())
    finally:
        sock.close()  # close


if __name__ == "__main__":
    main()
