"""RPC as a pattern: a service's ``@method``s, served by the host over REQUEST/RESPONSE.

::

    Server(patterns=[RPC(Calculator())], tcp=["127.0.0.1:5050"], udp=["127.0.0.1:5051"])

REQUEST, RESPONSE and ERROR are core messages (every pattern may serve methods), so RPC adds no
message types: it contributes its service's methods to the host's dispatcher, and the built-in
``rpc.describe`` (:mod:`sockstack.rpc.describe`): the names under ``rpc.`` are the pattern's own,
so a service cannot expose a method there.
"""

from __future__ import annotations

from collections.abc import Mapping

from sockstack.host.dispatch import Handler
from sockstack.host.pattern import Pattern
from sockstack.rpc.describe import DESCRIBE, describe_handler
from sockstack.rpc.service import collect_handlers

__all__ = ["RPC"]


class RPC(Pattern):
    """Serve ``service`` (an instance, or a class to instantiate with no arguments)."""

    name = "rpc"

    def __init__(self, service: object, *, allow_empty: bool = False) -> None:
        if isinstance(service, type):
            service = service()
        self.service = service
        handlers = collect_handlers(service, allow_empty)
        for name in handlers:
            if name.startswith("rpc."):
                raise ValueError(
                    f"method {name!r}: names under 'rpc.' are reserved for the built-in "
                    f"methods ({DESCRIBE}); expose it under another name"
                )
        self._handlers = {**handlers, DESCRIBE: describe_handler(service, handlers)}

    def methods(self) -> Mapping[str, Handler]:
        return self._handlers
