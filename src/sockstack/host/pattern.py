"""What a pattern is to the host: the one interface RPC, publish/subscribe and later patterns
(remote objects, the HTTP gateway, edge relays) plug into.

A pattern is a folder with a subclass of :class:`Pattern`, registered on one host::

    server = Server(patterns=[RPC(Calculator()), PubSub(Broker())], tcp=["127.0.0.1:5050"])

The host owns endpoints (TCP, TLS, UDP), the handshake and authentication, limits,
backpressure, drain and shutdown. A pattern says what it adds:

- :attr:`Pattern.messages` — its message types (a :class:`~sockstack.protocol.registry.MessageSet`
  in the range docs/PROTOCOL.md reserves for it), added to every session's registry. Messages of
  these types arriving on a stream go to :meth:`Pattern.stream_message`.
- :meth:`Pattern.methods` — methods it serves over REQUEST (``broker.stats``), next to the
  other patterns' methods in the host's one :class:`~sockstack.host.dispatch.Dispatcher`.
- :attr:`Pattern.datagram_types` — message types it takes whole from UDP
  (:meth:`Pattern.datagram_received`), after the host checked the datagram's seal.
- hooks for the life of a connection and of the host (:meth:`start`, :meth:`stop`,
  :meth:`connection_made`, :meth:`connection_lost`, :meth:`connection_writable`).

What a pattern sees of a connection is :class:`Peer`; per-connection state a pattern keeps
lives in ``peer.state[pattern.name]``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from sockstack.protocol.events import PatternMessage
from sockstack.protocol.registry import MessageSet

if TYPE_CHECKING:
    from collections.abc import Callable

    from sockstack.host.dispatch import Handler, Outcome
    from sockstack.host.server import ServerLimits
    from sockstack.protocol.connection import Connection
    from sockstack.protocol.events import Request
    from sockstack.rpc.context import CallContext
    from sockstack.transport.ratelog import RateLimitedLog
    from sockstack.transport.urls import Endpoint

__all__ = ["DatagramPeer", "HostContext", "Pattern", "Peer"]


class Peer(Protocol):
    """One stream connection, as a pattern sees it."""

    peer: str
    """The remote address, for logs."""
    core: Connection | None
    """The session core: ``send_response``, ``send_error``, ``send_message`` queue frames."""
    state: dict[str, Any]
    """Per-connection state, one entry per pattern that keeps some (key: the pattern's name)."""

    def flush(self) -> None:
        """Write what the core queued now (otherwise it leaves with the current batch)."""

    def write_soon(self, data: bytes) -> None:
        """Queue encoded frames; everything queued in one loop iteration leaves in one write
        (a burst leaves in 16 KiB writes as it is queued, so the peer reads while the rest is
        made)."""

    def writable(self) -> bool:
        """True while the connection's unsent bytes are below its high-water mark."""

    def close_slow(self, code: int, reason: str) -> None:
        """Close a peer that does not read: CLOSE ``code``, then cut it off after a delay."""

    def hold_reading(self, held: bool) -> None:
        """Stop (``held``) or go on reading the connection, for the pattern's own reasons
        (backpressure from further on: a broker whose link to others is behind); the host's
        reasons to pause (requests in flight, unsent bytes) apply as well."""

    def submit(
        self,
        req: Request,
        handler: Handler,
        answer: Callable[[Request, Outcome, CallContext | None], None],
    ) -> None:
        """Run ``handler`` for ``req`` as the host runs a REQUEST's method: its deadline, CANCEL,
        the in-flight limits, the interceptors and ``current_context()`` all apply. Its outcome
        goes to ``answer(req, outcome, ctx)`` (on the loop), which queues the answer frames
        itself (a pattern that encodes results its own way); the host writes them."""


class DatagramPeer(Protocol):
    """One UDP endpoint of the host, as a pattern sees it."""

    bad_log: RateLimitedLog

    def send_datagram(self, data: bytes, addr: Any) -> None:
        """Send one datagram (sealed when the host has a secret)."""

    def count_bad(self) -> None:
        """Count a refused datagram in the endpoint's statistics."""


class HostContext(Protocol):
    """What the host offers a pattern when it starts."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None: ...
    @property
    def bad_log(self) -> RateLimitedLog: ...
    @property
    def draining(self) -> bool: ...
    @property
    def limits(self) -> ServerLimits: ...
    @property
    def secret(self) -> bytes | None: ...
    @property
    def tls_context(self) -> ssl.SSLContext | None: ...
    def adopt_stream(self, transport: asyncio.Transport, data: bytes) -> None:
        """Serve a connection a pattern's listener accepted as a sockstack session, from the
        bytes it already read."""


class Pattern:
    """Base class of patterns. Override what the pattern uses; every hook has a default."""

    name: str = "pattern"
    """Unique on a host; also the key of the pattern's per-connection state."""
    messages: MessageSet | None = None
    """The message types it adds to the sessions (None: it uses REQUEST alone)."""
    datagram_types: frozenset[int] = frozenset()
    """Message types of datagrams handed whole to :meth:`datagram_received`."""

    def methods(self) -> Mapping[str, Handler]:
        """Methods it serves over REQUEST, by wire name."""
        return {}

    def start(self, host: HostContext) -> None:
        """The host is up (called on its event loop): start timers here."""

    def stop(self) -> None:
        """The host is shutting down: cancel timers, release resources."""

    def stream_message(self, peer: Peer, msg: PatternMessage) -> None:
        """A message of one of its types arrived on a stream (already decoded, and sent by the
        role the type allows). Answer through ``peer.core``."""

    def datagram_received(self, endpoint: DatagramPeer, data: bytes, addr: Any) -> None:
        """A datagram of one of :attr:`datagram_types` arrived (its seal, if any, checked)."""

    def connection_made(self, peer: Peer) -> None:
        """A stream connection's session is open (its handshake done)."""

    def connection_lost(self, peer: Peer) -> None:
        """A stream connection is gone: forget what the pattern kept for it."""

    def cancel(self, peer: Peer, request_id: int) -> bool:
        """CANCEL of ``request_id`` on ``peer``, not a running call of the host's: True when it
        names one of the pattern's calls (a pipelined call still waiting), which the pattern
        then stops and answers."""
        return False

    def connection_writable(self, peer: Peer) -> None:
        """A connection's write buffer went below its high-water mark again."""

    def report_metrics(self) -> Sequence[tuple[str, str, str, float]]:
        """Figures for the Prometheus metrics (``sockstack.metrics``): ``(name, kind, help,
        value)`` with kind ``"counter"`` or ``"gauge"``, read at each scrape, in the metrics
        server's thread (read plain numbers; do not iterate what the loop changes)."""
        return ()

    # A pattern with listeners of its own (the HTTP gateway) uses these three.

    def interceptors(self, given: Sequence[object]) -> Sequence[object]:
        """Interceptors the pattern adds to the host's (after ``given``, the host's own), asked
        once when the host is made (the gateway's metrics, unless the host has some)."""
        return ()

    def endpoints(self) -> Sequence[Endpoint]:
        """The endpoints it listens on, bound in :meth:`start` (they join ``Server.endpoints``);
        a pattern that has them counts as an endpoint of the host."""
        return ()

    def connections(self) -> Mapping[str, int]:
        """Connections open now on its own listeners, by transport (``{"http": 3}``)."""
        return {}

    def drain(self) -> None:
        """The host began to drain: stop accepting, finish what was accepted."""

    async def closed(self) -> None:
        """After :meth:`stop`: wait (bounded by the pattern) until what it served has ended."""
