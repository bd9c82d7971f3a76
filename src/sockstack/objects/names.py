"""A name service for remote objects: names to URLs, each kept while its registrant lives.

Hosted by any object server (``ObjectServer(host_names=True)``: the object ``names``) or alone
(``sockstack names serve --tcp HOST:PORT``). An entry belongs to the session of the client that
registered it: when that session ends (its client closed, or was gone longer than the lease),
its names go with it, so a server killed with SIGKILL disappears from the registry within the
lease (Pyro5 needs ``NS_AUTOCLEAN`` for that, off by default). ``ObjectServer(names=URL)``
registers the server's names there and keeps them registered (re-registering after its session
was lost).

::

    counter = lookup("counter", registry="tcp://127.0.0.1:5055")   # a proxy, as lookup(url)
"""

from __future__ import annotations

from typing import Any

from sockstack.host.dispatch import ServiceError
from sockstack.objects.expose import expose
from sockstack.objects.pattern import Objects
from sockstack.objects.session import Session

__all__ = ["MAX_NAMES", "Names", "UnknownName"]

MAX_NAMES = 10_000
_MAX_URL = 1024
_MAX_META = 16
_MAX_META_TEXT = 256


class UnknownName(ServiceError):
    """No entry has this name (or it went with its registrant)."""


@expose(inline=True)
class Names:
    """The registry: ``register``, ``unregister``, ``lookup``, ``list`` (each a remote call)."""

    def __init__(self, objects: Objects, max_names: int = MAX_NAMES) -> None:
        self._objects = objects
        self._max = max_names
        self._entries: dict[str, tuple[str, dict[str, str], bytes]] = {}
        objects.on_session_end.append(self._session_ended)

    def register(
        self, name: str, url: str, meta: dict[str, str] | None = None, replace: bool = False
    ) -> None:
        """Register ``name`` -> ``url`` (with small string ``meta``), kept while the caller's
        session lives. An existing name is refused unless ``replace`` (or it is the caller's)."""
        session = self._caller()
        if not name or len(name.encode()) > 255:
            raise ValueError("a name is 1-255 bytes")
        if not url or len(url.encode()) > _MAX_URL:
            raise ValueError(f"a URL is 1-{_MAX_URL} bytes")
        meta = dict(meta or {})
        if len(meta) > _MAX_META or any(
            type(k) is not str or type(v) is not str or len(k) + len(v) > _MAX_META_TEXT
            for k, v in meta.items()
        ):
            raise ValueError(f"meta: at most {_MAX_META} string pairs of {_MAX_META_TEXT} chars")
        old = self._entries.get(name)
        if old is not None and not replace and old[2] != session.token:
            raise ServiceError(f"{name!r} is registered already (replace=True to take it over)")
        if old is None and len(self._entries) >= self._max:
            raise ServiceError(f"the registry holds {self._max} names (limit)")
        self._entries[name] = (url, meta, session.token)

    def unregister(self, name: str) -> bool:
        """Remove ``name`` (only its registrant may); False when it was not registered."""
        session = self._caller()
        old = self._entries.get(name)
        if old is None:
            return False
        if old[2] != session.token:
            raise ServiceError(f"{name!r} was registered by another client")
        del self._entries[name]
        return True

    def lookup(self, name: str) -> str:
        """The URL registered as ``name``."""
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownName(f"no object is registered as {name!r}")
        return entry[0]

    def list(self, prefix: str = "") -> dict[str, Any]:
        """The entries whose names start with ``prefix``: {name: {"url": ..., "meta": ...}}."""
        return {
            name: {"url": url, "meta": meta}
            for name, (url, meta, _) in sorted(self._entries.items())
            if name.startswith(prefix)
        }

    def _caller(self) -> Session:
        session = self._objects.current_session()
        if session is None:
            raise ServiceError("the registry is used through remote objects (attach a session)")
        return session

    def _session_ended(self, session: Session) -> None:
        token = session.token
        for name in [n for n, e in self._entries.items() if e[2] == token]:
            del self._entries[name]
