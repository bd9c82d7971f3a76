"""What both clients (asyncio and blocking) are configured with, set in one place."""

from __future__ import annotations

import ssl
from collections.abc import Sequence

from sockstack.errors import CallError, ConnectError, ConnectionLost
from sockstack.protocol.auth import NO_EPOCH, TRAILER_SIZE, DatagramAuth
from sockstack.protocol.calls import Backoff
from sockstack.protocol.codecs import Codec, get_codec
from sockstack.protocol.datagram import DatagramClient, RetryPolicy
from sockstack.protocol.messages import CORE_MESSAGES
from sockstack.protocol.registry import Registry
from sockstack.transport.secret import normalize_secret
from sockstack.transport.tls import client_context
from sockstack.transport.urls import Endpoint, parse_endpoints

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "DEFAULT_TIMEOUT", "ClientSettings", "udp_refused"]

DEFAULT_TIMEOUT = 10.0
"""Seconds a call may take, by default, in either client."""
DEFAULT_CONNECT_TIMEOUT = 5.0
"""Seconds to connect (and, over TCP, complete the handshake), by default. Never more than the
client's call ``timeout``: a call's timeout bounds the whole call, connecting included."""


def udp_refused(ep: Endpoint) -> CallError:
    """What a UDP call fails with when ICMP port unreachable answered every datagram of it
    that left (the kernel names each refused datagram: transport/udperr.py): nothing of it
    reached a server, so it did not run."""
    return ConnectError(
        f"{ep}: connection refused (no server listens on that port: the host answered ICMP "
        "port unreachable to each datagram of the call); the call did not run"
    )


def udp_gone(ep: Endpoint) -> CallError:
    """What a UDP call fails with when its latest datagrams were refused (ICMP port
    unreachable) but an earlier one was not: that one may have reached a server that has gone
    since, as a TCP call's server can die with the call in flight."""
    return ConnectionLost(
        f"{ep}: connection refused: no server listens on that port any more; an earlier "
        "datagram of the call reached one, so it may or may not have run"
    )


def refusal_verdict(sent: int, refused: int, unsent: int, ping: bool) -> bool | None:
    """What the refusals the kernel named for one UDP call say (both clients' rule): True when
    it did not run (it sent two datagrams at least, the second on its schedule, and every one
    that left was refused; or it is a PING, one untracked datagram), False when it may have
    run (two refused after an earlier one was not: its server went away), None while it must
    wait (one refusal: the server may be starting). ``sent``: datagrams the call queued;
    ``unsent``: those whose send reported an earlier refusal instead of leaving."""
    if (sent >= 2 and refused >= sent - unsent) or (ping and not sent):
        return True
    if refused >= 2:
        return False
    return None


class ClientSettings:
    """The options every client shares; each client's ``__init__`` documents them."""

    endpoints: list[Endpoint]
    endpoint: Endpoint
    timeout: float
    connect_timeout: float
    codec: Codec
    backoff: Backoff
    retry: RetryPolicy | None
    max_datagram: int
    tls: ssl.SSLContext | None
    secret: bytes | None
    registry: Registry

    def _configure(
        self,
        url: str | Sequence[str],
        *,
        timeout: float,
        connect_timeout: float,
        codec: str,
        backoff: Backoff | None,
        retry: RetryPolicy | None,
        max_datagram: int,
        tls: ssl.SSLContext | None,
        secret: str | bytes | None,
    ) -> None:
        # One rule for every secret (sockstack.transport.secret): str or bytes, surrounding
        # ASCII whitespace removed, empty refused (ValueError).
        self.secret = normalize_secret(secret)
        self.endpoints = parse_endpoints(url)
        self.endpoint = self.endpoints[0]
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        # tls:// URLs: the given context, else one that verifies against the system's CAs.
        self.tls = tls if tls is not None or self.endpoint.scheme != "tls" else client_context()
        self.codec = get_codec(codec)
        self.backoff = backoff or Backoff()
        self.retry = retry
        self.max_datagram = max_datagram
        # The message types this client's sessions decode; a pattern's client side adds its
        # own (publish/subscribe adds MSG when the client first subscribes).
        self.registry = Registry([CORE_MESSAGES])

    def datagram_core(self) -> DatagramClient:
        """A fresh UDP core with this client's limits (the seal's trailer counted with a
        secret): one per socket, and a new one in a forked child."""
        return DatagramClient(
            max_datagram=self.max_datagram,
            retry=self.retry,
            registry=self.registry,
            overhead=TRAILER_SIZE if self.secret is not None else 0,
        )

    def first_connect_timeout(self) -> float:
        """Seconds the first connection (TCP, TLS and the HELLO/WELCOME handshake) may take:
        ``connect_timeout``, and never more than the call ``timeout``. The clients connect
        before their first call, which then has its own whole ``timeout``; ``sockstack call
        --timeout S`` takes one deadline for both (connect and call within S)."""
        return min(self.connect_timeout, self.timeout)

    def datagram_auth(self) -> DatagramAuth | None:
        """The seal for this client's datagrams (None without a secret); the server's epoch is
        learnt from its first answer (PROTOCOL.md §6.1)."""
        return None if self.secret is None else DatagramAuth(self.secret, epoch=NO_EPOCH)
