"""An object server: the host with the remote-objects pattern, and names to register.

::

    server = ObjectServer(tcp=["127.0.0.1:5054"])
    server.register("counter", Counter())
    async with server:
        await server.serve_forever()

``host_names=True`` also serves the name service (the object ``names``); ``names=URL``
registers this server's names at the name service there, and keeps them registered while the
server lives (a server killed is gone from the registry within its lease).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sockstack.errors import SessionExpired
from sockstack.host.server import Server
from sockstack.objects.client import ObjectClient
from sockstack.objects.names import Names
from sockstack.objects.pattern import ObjectLimits, Objects

__all__ = ["ObjectServer"]

log = logging.getLogger("sockstack.objects")


class ObjectServer(Server):
    """A :class:`sockstack.Server` serving exposed objects (``objects``: its
    :class:`ObjectLimits`; ``lease``: the lease alone); every other option is the server's."""

    def __init__(
        self,
        *,
        objects: ObjectLimits | None = None,
        lease: float | None = None,
        host_names: bool = False,
        names: str | None = None,
        **options: Any,
    ) -> None:
        if lease is not None:
            objects = ObjectLimits(**{**_fields(objects or ObjectLimits()), "lease": lease})
        self.objects = Objects(objects)
        patterns = [self.objects, *options.pop("patterns", ())]
        super().__init__(patterns=patterns, **options)
        self.names: Names | None = None
        if host_names:
            self.names = Names(self.objects)
            self.objects.register("names", self.names)
        self._registry_url = names
        self._registry: ObjectClient | None = None

    def register(self, name: str, target: object, instance: str | None = None) -> None:
        """Serve ``target`` (an exposed instance, or an exposed class) under ``name``."""
        self.objects.register(name, target, instance)

    def unregister(self, name: str) -> None:
        self.objects.unregister(name)

    async def start(self) -> None:
        await super().start()
        if self._registry_url is not None:
            await asyncio.to_thread(self._register_names)

    def _register_names(self) -> None:
        """Register every name of this server at the name service (``names=URL``)."""
        client = self._registry
        if client is None:
            client = self._registry = ObjectClient(self._registry_url or "")
            client.on_new_session.append(self._reregister)
        self._reregister()

    def _reregister(self) -> None:
        client = self._registry
        if client is None or client.closed:
            return
        registry = client.lookup("names")
        ep = next((e for e in self.endpoints if e.scheme in ("tcp", "tls")), None)
        if ep is None:
            return
        for name in list(self.objects.registered):
            if name == "names":
                continue
            try:
                registry.register(name, f"{ep}/{name}", None, True)
            except SessionExpired:
                return  # a new session: on_new_session registers again
            except Exception as exc:
                log.warning("objects: could not register %r at %s: %s", name, client, exc)

    async def shutdown(self) -> None:
        if self._registry is not None:
            client, self._registry = self._registry, None
            await asyncio.to_thread(client.close)  # the names go with the session, at once
        await super().shutdown()


def _fields(limits: ObjectLimits) -> dict[str, Any]:
    return {f: getattr(limits, f) for f in limits.__slots__}
