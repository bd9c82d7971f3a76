"""Sockets a pattern listens on with listeners of its own (the HTTP gateway, an edge relay),
bound before the host reports itself started, so that an address in use is an error of
``Server.start`` and not of a task nobody awaits."""

from __future__ import annotations

import socket
from collections.abc import Sequence

from sockstack.transport.urls import Endpoint

__all__ = ["bind_all"]


def bind_all(
    endpoints: Sequence[Endpoint], backlog: int, reuse_port: bool = False
) -> list[socket.socket]:
    """One non-blocking socket per endpoint, bound (stream endpoints listening): UDP for
    ``udp`` endpoints, TCP for the others. All or none: on an error the ones made are closed.

    TCP sockets are made with ``IPPROTO_TCP``, not 0: asyncio sets TCP_NODELAY on the
    connections it accepts only then (without, ~40 ms of Nagle and delayed ACK per small
    exchange), and with SO_REUSEADDR (a restarted server binds at once over connections in
    TIME_WAIT). UDP sockets are not: on UDP, SO_REUSEADDR would let another process bind the
    same port and take datagrams."""
    made: list[socket.socket] = []
    try:
        for ep in endpoints:
            family = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
            if ep.scheme == "udp":
                sock = socket.socket(family, socket.SOCK_DGRAM)
            else:
                sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            made.append(sock)
            if ep.scheme != "udp":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((ep.host, ep.port))
            if ep.scheme != "udp":
                sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for s in made:
            s.close()
        raise
    return made
