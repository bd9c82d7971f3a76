"""sockstack: client/server distributed systems straight on the operating system's Socket API.

Define a service once, serve it over TCP and UDP, call it from asyncio or blocking code::

    from sockstack import Service, method

    class Calculator(Service):
        @method
        def add(self, a: int, b: int) -> int:
            return a + b

Architecture (docs/ARCHITECTURE.md): ``protocol/`` is the sans-I/O core that owns the wire;
``asyncio/`` and ``sync/`` are the I/O adapters (clients); ``host/`` is the server every pattern
plugs into; ``rpc/`` and ``pubsub/`` are patterns; ``transport/`` holds URLs, TLS and the loop.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version

from sockstack.asyncio.stream import StreamLimits
from sockstack.clients import AsyncClient, Client, connect
from sockstack.errors import (
    CallError,
    CallTimeout,
    CodecError,
    ConnectError,
    ConnectionClosed,
    ConnectionLost,
    ErrorCode,
    FrameTooLarge,
    InvalidURL,
    LocalProtocolError,
    ProtocolError,
    RemoteError,
    RemoteProtocolError,
    SockstackError,
    TopicError,
    register_error,
)
from sockstack.host.pattern import Pattern
from sockstack.host.server import Server, ServerLimits, serve
from sockstack.interceptors import (
    ClientCall,
    ClientInterceptor,
    Failure,
    Refused,
    ServerInterceptor,
)
from sockstack.protocol.calls import Backoff, Reply
from sockstack.protocol.codecs import decode_as
from sockstack.protocol.datagram import RetryPolicy
from sockstack.pubsub import Broker, BrokerLimits
from sockstack.pubsub.client import BlockingSubscription, Message, Subscription
from sockstack.pubsub.pattern import PubSub
from sockstack.rpc.context import CallContext, current_context
from sockstack.rpc.pattern import RPC
from sockstack.rpc.service import Service, ServiceError, method
from sockstack.transport import tls
from sockstack.transport.loop import run
from sockstack.transport.memory import tune_malloc

try:  # one place for the version: the package metadata (pyproject.toml's [project] version)
    __version__ = _distribution_version("sockstack")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "RPC",
    "AsyncClient",
    "Backoff",
    "BlockingSubscription",
    "Broker",
    "BrokerLimits",
    "CallContext",
    "CallError",
    "CallTimeout",
    "Client",
    "ClientCall",
    "ClientInterceptor",
    "CodecError",
    "ConnectError",
    "ConnectionClosed",
    "ConnectionLost",
    "ErrorCode",
    "Failure",
    "FrameTooLarge",
    "InvalidURL",
    "LocalProtocolError",
    "Message",
    "Pattern",
    "ProtocolError",
    "PubSub",
    "Refused",
    "RemoteError",
    "RemoteProtocolError",
    "Reply",
    "RetryPolicy",
    "Server",
    "ServerInterceptor",
    "ServerLimits",
    "Service",
    "ServiceError",
    "SockstackError",
    "StreamLimits",
    "Subscription",
    "TopicError",
    "__version__",
    "connect",
    "current_context",
    "decode_as",
    "method",
    "register_error",
    "run",
    "serve",
    "tls",
    "tune_malloc",
]
