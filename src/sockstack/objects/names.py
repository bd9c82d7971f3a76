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

**Services.** Beside one name for one URL, several servers may announce the same *service*
(``announce("calc", url, meta)``): one entry per registrant session and URL, each going with
its session as names do, and each also going one lease after it was last announced (an
announcer announces again every third of the lease): a registrant whose host is cut off, whose
connection therefore has not ended here, is gone within the lease all the same.
``servers("calc")`` lists the live ones; clients that balance calls
over them (``connect("name://calc")``, :mod:`sockstack.discovery`) read it. Everything the
registry holds is bounded: names, entries per service and in all, meta per entry, and the
bytes of all of it together.
"""

from __future__ import annotations

import builtins
import time
from dataclasses import dataclass
from typing import Any

from sockstack.host.dispatch import ServiceError
from sockstack.objects.expose import expose
from sockstack.objects.pattern import Objects
from sockstack.objects.session import Session

__all__ = [
    "ENTRY_OVERHEAD",
    "MAX_BYTES",
    "MAX_NAMES",
    "MAX_SERVERS",
    "MAX_SERVICE_ENTRIES",
    "Names",
    "UnknownName",
]

MAX_NAMES = 10_000
MAX_SERVERS = 256
"""Entries one service may hold (servers announcing it)."""
MAX_SERVICE_ENTRIES = 10_000
"""Service entries in all, over every service."""
MAX_BYTES = 16 * 1024 * 1024
"""What names and service entries may hold together, counted as :func:`_size` does."""
ENTRY_OVERHEAD = 256
"""Bytes counted per entry beside its text (the dict slots, the tuple, the key)."""
_MAX_URL = 1024
_MAX_META = 16
_MAX_META_TEXT = 256


@dataclass(slots=True)
class _Served:
    """One server's entry under a service: its URL, its meta, its registrant, its size, and
    when it was last announced (``time.monotonic()``)."""

    url: str
    meta: dict[str, str]
    token: bytes
    size: int
    seen: float


def _check_name(what: str, name: object) -> str:
    if type(name) is not str or not name or len(name.encode()) > 255:
        raise ValueError(f"a {what} is 1-255 bytes of text")
    return name


def _check_url(url: object) -> str:
    if type(url) is not str or not url or len(url.encode()) > _MAX_URL:
        raise ValueError(f"a URL is 1-{_MAX_URL} bytes")
    return url


def _check_meta(meta: object) -> dict[str, str]:
    if meta is None:
        return {}
    if (
        not isinstance(meta, dict)
        or len(meta) > _MAX_META
        or any(
            type(k) is not str or type(v) is not str or len(k) + len(v) > _MAX_META_TEXT
            for k, v in meta.items()
        )
    ):
        raise ValueError(f"meta: at most {_MAX_META} string pairs of {_MAX_META_TEXT} chars")
    return dict(meta)


def _size(name: str, url: str, meta: dict[str, str]) -> int:
    """What an entry is counted as: its text in bytes (meta in characters, at most 4 bytes
    each in UTF-8: counted as such) and :data:`ENTRY_OVERHEAD`."""
    text = sum(4 * (len(k) + len(v)) for k, v in meta.items())
    return ENTRY_OVERHEAD + len(name.encode()) + len(url.encode()) + text


class UnknownName(ServiceError):
    """No entry has this name (or it went with its registrant)."""


@expose(inline=True)
class Names:
    """The registry: ``register``, ``unregister``, ``lookup``, ``list`` (one name, one URL),
    ``announce``, ``withdraw``, ``servers``, ``services`` (many servers under a service name);
    each a remote call. Run on the server's loop (inline), so no lock."""

    def __init__(
        self,
        objects: Objects,
        max_names: int = MAX_NAMES,
        *,
        max_servers: int = MAX_SERVERS,
        max_service_entries: int = MAX_SERVICE_ENTRIES,
        max_bytes: int = MAX_BYTES,
        ttl: float | None = None,
    ) -> None:
        self._objects = objects
        self.ttl = objects.limits.lease if ttl is None else ttl
        """Seconds a service entry lives after it was last announced (default: the lease)."""
        self._max = max_names
        self._max_servers = max_servers
        self._max_service_entries = max_service_entries
        self._max_bytes = max_bytes
        self._entries: dict[str, tuple[str, dict[str, str], bytes]] = {}
        self._sizes: dict[str, int] = {}
        # service -> (registrant token, URL) -> entry; in the order they were announced
        self._services: dict[str, dict[tuple[bytes, str], _Served]] = {}
        self._by_session: dict[bytes, set[tuple[str, str]]] = {}  # token -> (service, URL)
        self._service_entries = 0
        self.bytes = 0
        """What names and service entries hold now, as counted against ``max_bytes``."""
        objects.on_session_end.append(self._session_ended)

    def register(
        self, name: str, url: str, meta: dict[str, str] | None = None, replace: bool = False
    ) -> None:
        """Register ``name`` -> ``url`` (with small string ``meta``), kept while the caller's
        session lives. An existing name is refused unless ``replace`` (or it is the caller's)."""
        session = self._caller()
        name = _check_name("name", name)
        url = _check_url(url)
        meta = _check_meta(meta)
        old = self._entries.get(name)
        if old is not None and not replace and old[2] != session.token:
            raise ServiceError(f"{name!r} is registered already (replace=True to take it over)")
        if old is None and len(self._entries) >= self._max:
            raise ServiceError(f"the registry holds {self._max} names (limit)")
        size = _size(name, url, meta)
        self._room(size - self._sizes.get(name, 0))
        self._entries[name] = (url, meta, session.token)
        self.bytes += size - self._sizes.get(name, 0)
        self._sizes[name] = size

    def unregister(self, name: str) -> bool:
        """Remove ``name`` (only its registrant may); False when it was not registered."""
        session = self._caller()
        old = self._entries.get(name)
        if old is None:
            return False
        if old[2] != session.token:
            raise ServiceError(f"{name!r} was registered by another client")
        self._drop_name(name)
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

    # ------------------------------------------------------------------ services

    def announce(self, service: str, url: str, meta: dict[str, str] | None = None) -> None:
        """Announce a server of ``service`` at ``url`` (with small string ``meta``: a
        ``weight``, a ``version``...), kept while the caller's session lives. The same caller
        announcing the same URL again replaces its meta; other callers' entries stay beside."""
        session = self._caller()
        service = _check_name("service name", service)
        url = _check_url(url)
        meta = _check_meta(meta)
        key = (session.token, url)
        self._purge(service)
        entries = self._services.get(service)
        old = entries.get(key) if entries is not None else None
        if old is None:
            if entries is not None and len(entries) >= self._max_servers:
                raise ServiceError(f"{service!r} has {self._max_servers} servers (limit)")
            if self._service_entries >= self._max_service_entries:
                raise ServiceError(
                    f"the registry holds {self._max_service_entries} service entries (limit)"
                )
        size = _size(service, url, meta)
        self._room(size - (old.size if old is not None else 0))
        if entries is None:
            entries = self._services[service] = {}
        if old is not None:
            self.bytes -= old.size
        else:
            self._service_entries += 1
            self._by_session.setdefault(session.token, set()).add((service, url))
        entries[key] = _Served(url, meta, session.token, size, time.monotonic())
        self.bytes += size

    def withdraw(self, service: str, url: str | None = None) -> int:
        """Remove the caller's entries of ``service`` (the one at ``url``, else all of them):
        how many went. Another caller's entries are not the caller's to remove."""
        session = self._caller()
        entries = self._services.get(service) if type(service) is str else None
        if entries is None:
            return 0
        urls = [u for t, u in entries if t == session.token and (url is None or u == url)]
        for u in urls:
            self._drop_served(service, session.token, u)
        return len(urls)

    def servers(self, service: str) -> builtins.list[dict[str, Any]]:
        """The live entries of ``service``, in the order they were announced: ``[{"url": ...,
        "meta": {...}}, ...]`` (empty when none: a service is not an error to ask for). The
        same URL announced by two registrants (workers sharing a port) is listed once."""
        if type(service) is str:
            self._purge(service)
        entries = self._services.get(service) if type(service) is str else None
        if not entries:
            return []
        seen: set[str] = set()
        out = []
        for served in entries.values():
            if served.url not in seen:
                seen.add(served.url)
                out.append({"url": served.url, "meta": dict(served.meta)})
        return out

    def services(self, prefix: str = "") -> dict[str, int]:
        """The services announced now whose names start with ``prefix``: {service: entries}."""
        for name in [n for n in self._services if n.startswith(prefix)]:
            self._purge(name)
        return {
            name: len(entries)
            for name, entries in sorted(self._services.items())
            if name.startswith(prefix)
        }

    # ------------------------------------------------------------------ bookkeeping

    def _room(self, more: int) -> None:
        if more > 0 and self.bytes + more > self._max_bytes:
            raise ServiceError(f"the registry would exceed {self._max_bytes} bytes (limit)")

    def _purge(self, service: str) -> None:
        """Drop the entries of ``service`` not announced again within :attr:`ttl`."""
        entries = self._services.get(service)
        if not entries:
            return
        old = time.monotonic() - self.ttl
        for token, url in [k for k, e in entries.items() if e.seen < old]:
            self._drop_served(service, token, url)

    def _drop_name(self, name: str) -> None:
        del self._entries[name]
        self.bytes -= self._sizes.pop(name, 0)

    def _drop_served(self, service: str, token: bytes, url: str) -> None:
        entries = self._services.get(service)
        if entries is None:
            return
        served = entries.pop((token, url), None)
        if served is None:
            return
        self.bytes -= served.size
        self._service_entries -= 1
        if not entries:
            del self._services[service]
        keys = self._by_session.get(token)
        if keys is not None:
            keys.discard((service, url))
            if not keys:
                del self._by_session[token]

    def _caller(self) -> Session:
        session = self._objects.current_session()
        if session is None:
            raise ServiceError("the registry is used through remote objects (attach a session)")
        return session

    def _session_ended(self, session: Session) -> None:
        token = session.token
        for name in [n for n, e in self._entries.items() if e[2] == token]:
            self._drop_name(name)
        for service, url in list(self._by_session.get(token, ())):
            self._drop_served(service, token, url)
