"""The clients users import: each I/O adapter's client, with the client side of the patterns.

The adapters (:mod:`sockstack.asyncio.client`, :mod:`sockstack.sync.client`) make calls and
know no pattern; a pattern that offers client methods (``publish``, ``subscribe``...) writes
them as a mixin in its own folder, over the adapters' pattern API, and is listed here. This is
the one line a pattern adds on the client side, as ``Server(patterns=[...])`` is on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sockstack.asyncio import client as _async
from sockstack.pubsub.client import AsyncPubSub, BlockingPubSub
from sockstack.rpc.proxy import AsyncProxies, BlockingProxies
from sockstack.sync import client as _sync

__all__ = ["AsyncClient", "Client", "connect"]


class AsyncClient(_async.AsyncClient, AsyncPubSub, AsyncProxies):
    __doc__ = _async.AsyncClient.__doc__


class Client(_sync.Client, BlockingPubSub, BlockingProxies):
    __doc__ = _sync.Client.__doc__


def connect(url: str | Sequence[str], **options: Any) -> Client:
    """A blocking :class:`Client` for ``tcp://host:port`` or ``udp://host:port``; TCP connects
    (and completes the handshake) now and raises :class:`ConnectError` if it cannot."""
    return Client(url, **options)
