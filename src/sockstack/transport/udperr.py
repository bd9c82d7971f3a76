"""Which of our datagrams an ICMP "port unreachable" answered (Linux ``IP_RECVERR``).

A connected UDP socket reports ECONNREFUSED when an ICMP port unreachable came back for one of
its datagrams, on its next operation, without saying which datagram: and a ``send`` that
reports it does not send its own datagram. With ``IP_RECVERR`` (``IPV6_RECVERR``) set, Linux
also queues each error with the start of the datagram that caused it, readable with
``recvmsg(..., MSG_ERRQUEUE)``: its request id (header offset 8) names the call exactly. The
clients fail a call for refusals only on that evidence (docs: the clients' modules); where the
option does not exist, a refusal is not attributed and calls end at their timeout as before.
"""

from __future__ import annotations

import socket
import sys

from sockstack.protocol.frames import HEADER_SIZE, peek_request_id

__all__ = ["enable_refusal_reports", "refused_request_ids"]

_IP_RECVERR = 11  # linux/in.h
_IPV6_RECVERR = 25  # linux/in6.h
_MAX_REPORTS = 256  # drained per call: bounded work however many errors are queued


def enable_refusal_reports(sock: socket.socket) -> bool:
    """Ask the kernel to queue each ICMP error with the datagram it answered (Linux). False
    where it cannot: refusals are then not attributed to calls."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
    except OSError:
        return False
    return True


def refused_request_ids(sock: socket.socket) -> list[int]:
    """The request ids of the sockstack datagrams the queued ICMP errors answered, oldest
    first (an id twice when two of its datagrams were refused); other errors are dropped."""
    ids: list[int] = []
    for _ in range(_MAX_REPORTS):
        try:
            data, _anc, _flags, _addr = sock.recvmsg(
                HEADER_SIZE, 512, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT
            )
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break
        rid = peek_request_id(data)
        if rid is not None:
            ids.append(rid)
    return ids
