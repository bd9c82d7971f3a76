"""The clients users import: each I/O adapter's client, with the client side of the patterns.

The adapters (:mod:`sockstack.asyncio.client`, :mod:`sockstack.sync.client`) make calls and
know no pattern; a pattern that offers client methods (``publish``, ``subscribe``...) writes
them as a mixin in its own folder, over the adapters' pattern API, and is listed here. This is
the one line a pattern adds on the client side, as ``Server(patterns=[...])`` is on the host.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Self

from sockstack.asyncio import client as _async
from sockstack.pubsub.client import AsyncPubSub, BlockingPubSub
from sockstack.rpc.proxy import AsyncProxies, BlockingProxies
from sockstack.sync import client as _sync

__all__ = ["AsyncClient", "Client", "connect"]


_BY_NAME = "name://"


def _by_name(url: object) -> bool:
    return isinstance(url, str) and url.startswith(_BY_NAME)


class AsyncClient(_async.AsyncClient, AsyncPubSub, AsyncProxies):
    __doc__ = _async.AsyncClient.__doc__

    def __new__(cls, url: str | Sequence[str], *args: Any, **kwargs: Any) -> Self:
        """``AsyncClient("name://calc", names=URL)`` is an
        :class:`~sockstack.discovery.AsyncServiceClient` (a subclass): the servers announcing
        the service, found at the name service (docs/SCALING.md)."""
        if cls is AsyncClient and _by_name(url):
            from sockstack.discovery.client import AsyncServiceClient

            return object.__new__(AsyncServiceClient)  # type: ignore[return-value]
        return object.__new__(cls)


class Client(_sync.Client, BlockingPubSub, BlockingProxies):
    __doc__ = _sync.Client.__doc__

    def __new__(cls, url: str | Sequence[str], *args: Any, **kwargs: Any) -> Self:
        """``Client("name://calc", names=URL)`` is a
        :class:`~sockstack.discovery.ServiceClient` (a subclass): see :func:`connect`."""
        if cls is Client and _by_name(url):
            from sockstack.discovery.client import ServiceClient

            return object.__new__(ServiceClient)  # type: ignore[return-value]
        return object.__new__(cls)


# The signature a user (and help(), and an editor) sees is __init__'s, not __new__'s catch-all.
def _init_signature(cls: type) -> inspect.Signature:
    init = inspect.signature(cls.__init__)  # type: ignore[misc]
    return init.replace(parameters=list(init.parameters.values())[1:])


AsyncClient.__signature__ = _init_signature(AsyncClient)  # type: ignore[attr-defined]
Client.__signature__ = _init_signature(Client)  # type: ignore[attr-defined]


def connect(url: str | Sequence[str], **options: Any) -> Client:
    """A blocking :class:`Client` for ``tcp://host:port`` or ``udp://host:port``; TCP connects
    (and completes the handshake) now and raises :class:`ConnectError` if it cannot.

    ``name://SERVICE`` (with ``names="tcp://HOST:PORT"``, else ``$SOCKSTACK_NAMES``, else
    ``tcp://127.0.0.1:5055``): a :class:`~sockstack.discovery.ServiceClient` spreading calls
    over every server that announces SERVICE at that name service (docs/SCALING.md); it
    connects to the name service now (:class:`ConnectError` if it cannot)."""
    return Client(url, **options)
