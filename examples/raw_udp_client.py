#!/usr/bin/env python3
"""The course notes' UDP client, with nothing but the standard ``socket`` module.

    socket -> sendto -> recvfrom -> close

A lost datagram is simply lost: this client waits ``--timeout`` seconds and gives up, which is
the gap sockstack's UDP transport fills with retries and de-duplication.

    python examples/raw_udp_client.py --port 5061 hello
"""

from __future__ import annotations

import argparse
import socket
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description="UDP echo client (raw socket).")
    parser.add_argument("message", nargs="+")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5061)
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args()

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # socket
    sock.settimeout(args.timeout)
    try:
        for text in args.message:
            sock.sendto(text.encode(), (args.host, args.port))  # write
            try:
                data, _ = sock.recvfrom(65535)  # read
            except TimeoutError:
                print(
                    f"no answer within {args.timeout} s (datagram or answer lost)", file=sys.stderr
                )
                sys.exit(1)
            print(data.decode())
    finally:
        sock.close()  # close


if __name__ == "__main__":
    main()
