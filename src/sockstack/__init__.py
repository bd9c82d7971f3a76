"""sockstack: client/server distributed systems straight on the operating system's Socket API.

Define a service once, serve it over TCP and UDP, call it from asyncio or blocking code::

    from sockstack import Service, method

    class Calculator(Service):
        @method
        def add(self, a: int, b: int) -> int:
            return a + b

Architecture (one folder per layer): ``protocol/`` is the sans-I/O core (framing, codecs,
session); ``transport/`` the asyncio socket adapters; ``rpc/`` services, server and clients.
"""

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
)
from sockstack.pubsub import Broker, BrokerLimits
from sockstack.rpc.blocking import BlockingSubscription, Client, connect
from sockstack.rpc.client import AsyncClient, Backoff, Message, Subscription
from sockstack.rpc.server import Server, ServerLimits, serve
from sockstack.rpc.service import Service, ServiceError, method
from sockstack.transport import tls
from sockstack.transport.loop import run
from sockstack.transport.memory import tune_malloc
from sockstack.transport.tcp import StreamLimits

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Backoff",
    "BlockingSubscription",
    "Broker",
    "BrokerLimits",
    "CallError",
    "CallTimeout",
    "Client",
    "CodecError",
    "ConnectError",
    "ConnectionClosed",
    "ConnectionLost",
    "ErrorCode",
    "FrameTooLarge",
    "InvalidURL",
    "LocalProtocolError",
    "Message",
    "ProtocolError",
    "RemoteError",
    "RemoteProtocolError",
    "Server",
    "ServerLimits",
    "Service",
    "ServiceError",
    "SockstackError",
    "StreamLimits",
    "Subscription",
    "__version__",
    "connect",
    "method",
    "run",
    "serve",
    "tls",
    "tune_malloc",
]
