#!/usr/bin/env python3
"""The course notes' UDP server, with nothing but the standard ``socket`` module.

    socket -> bind -> (recvfrom -> sendto)* -> close

No listen, no accept, no connection: each datagram stands alone and carries its sender's
address, and nothing guarantees it arrives ("fewer pixels, not guaranteed to arrive").

    python examples/raw_udp_server.py --port 5061
"""

from __future__ import annotations

import argparse
import socket


def main() -> None:
    parser = argparse.ArgumentParser(description="UDP echo server (raw socket).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5061, help="default 5061 (above 5000)")
    parser.add_argument("--count", type=int, default=0, help="stop after N datagrams (0: never)")
    args = parser.parse_args()

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # socket
    sock.bind((args.host, args.port))  # bind
    print(f"listening on {args.host}:{sock.getsockname()[1]}", flush=True)
    served = 0
    try:
        while args.count == 0 or served < args.count:
            data, addr = sock.recvfrom(65535)  # read, with the sender's address
            sock.sendto(data, addr)  # write back to that address
            served += 1
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()  # close


if __name__ == "__main__":
    main()
