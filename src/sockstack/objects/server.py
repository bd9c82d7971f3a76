"""An object server: the host with the remote-objects pattern, and names to register.

::

    server = ObjectServer(tcp=["127.0.0.1:5054"])
    server.register("counter", Counter())
    async with server:
        await server.serve_forever()
"""

from __future__ import annotations

from typing import Any

from sockstack.host.server import Server
from sockstack.objects.pattern import ObjectLimits, Objects

__all__ = ["ObjectServer"]


class ObjectServer(Server):
    """A :class:`sockstack.Server` serving exposed objects (``objects``: its
    :class:`ObjectLimits`, e.g. the lease); every other option is the server's."""

    def __init__(
        self, *, objects: ObjectLimits | None = None, lease: float | None = None, **options: Any
    ) -> None:
        if lease is not None:
            objects = ObjectLimits(**{**_fields(objects or ObjectLimits()), "lease": lease})
        self.objects = Objects(objects)
        patterns = [self.objects, *options.pop("patterns", ())]
        super().__init__(patterns=patterns, **options)

    def register(self, name: str, target: object, instance: str | None = None) -> None:
        """Serve ``target`` (an exposed instance, or an exposed class) under ``name``."""
        self.objects.register(name, target, instance)

    def unregister(self, name: str) -> None:
        self.objects.unregister(name)


def _fields(limits: ObjectLimits) -> dict[str, Any]:
    return {f: getattr(limits, f) for f in limits.__slots__}
