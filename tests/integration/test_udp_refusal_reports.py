"""transport/udperr.py: the kernel names the datagram an ICMP port unreachable answered (Linux
IP_RECVERR), so a refusal is charged to the call it belongs to and no other."""

from __future__ import annotations

import socket
import sys

import pytest

from sockstack.protocol.messages import encode_request
from sockstack.transport.udperr import enable_refusal_reports, refused_request_ids

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="IP_RECVERR is Linux's"
)


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_each_refusal_names_the_request_id_of_the_datagram_it_answered(
    family: int, host: str
) -> None:
    with socket.socket(family, socket.SOCK_DGRAM) as closed:
        closed.bind((host, 0))
        port = closed.getsockname()[1]
    # A port just closed; were it taken meanwhile, the assertions fail loudly, never pass.
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        assert enable_refusal_reports(sock)
        sock.connect((host, port))
        sent = []
        for rid in (101, 102, 103):
            try:
                sock.send(encode_request(rid, "add", [1, 2]))
                sent.append(rid)
            except ConnectionRefusedError:  # reports the previous refusal; this one not sent
                pass
        sock.setblocking(False)
        with pytest.raises(ConnectionRefusedError):
            sock.recv(100)
        assert refused_request_ids(sock) == sent
        assert sent and sent[0] == 101
        assert refused_request_ids(sock) == []  # drained
