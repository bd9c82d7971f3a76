"""Servers announce themselves under a service name at the name service.

::

    server = Server(Calculator(), tcp=["0.0.0.0:5050"])
    await server.start()
    announcer = await announce(server, "calc", names="tcp://ns:5055")
    ...
    await announcer.aclose()        # the entry goes at once (a killed server's within the lease)

Any sockstack server announces this way (an RPC service, a broker, an object server): the
announcement is a URL, and what is served there is the server's business. The
:class:`Announcer` holds a session with the name service (a blocking
:class:`~sockstack.objects.ObjectClient` and its keeper thread, which renews it every third of
the lease and reconnects); its entry lives as long as that session, and as long as it is
announced again within the lease (its thread does so every third of it). When the session is
lost (the name service restarted, or this process was cut off longer than the lease), the
client attaches a new one and the announcer announces again. When the name service cannot be reached
at the start, it keeps trying in the background (backoff up to 5 s) and logs.

The URL announced is the server's first TCP (or TLS) endpoint; an endpoint bound to every
address (``0.0.0.0``, ``::``) is announced with the address this host uses to reach the name
service (give ``url=`` to choose another, e.g. behind NAT).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import threading
from collections.abc import Mapping
from typing import Any

from sockstack.discovery.common import names_url
from sockstack.errors import SessionExpired
from sockstack.host.server import Server
from sockstack.protocol.calls import Backoff
from sockstack.transport.ratelog import RateLimitedLog
from sockstack.transport.urls import Endpoint, parse_endpoint

__all__ = ["Announcer", "add_announce_arguments", "announce", "announce_from_args", "url_of"]

log = logging.getLogger("sockstack.discovery")
_UNSPECIFIED = ("0.0.0.0", "::", "")


class Announcer:
    """Keeps ``service`` -> ``url`` (with ``meta``) announced at the name service ``names``
    while it lives. :meth:`start` announces (or, when the name service cannot be reached,
    keeps trying in the background); :meth:`close` withdraws at once."""

    def __init__(
        self,
        service: str,
        url: str,
        *,
        names: str | None = None,
        meta: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        backoff: Backoff | None = None,
        **options: Any,
    ) -> None:
        if not service or len(service.encode()) > 255 or "/" in service:
            raise ValueError("a service name is 1-255 bytes, no '/'")
        self.service = service
        self.url = url
        self.names = names_url(names)
        self.meta = dict(meta or {})
        self.timeout = timeout
        self._options = options
        self._backoff = backoff or Backoff(initial=0.25, factor=2.0, max_delay=5.0)
        self._client: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._announced = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = RateLimitedLog(log)

    @property
    def announced(self) -> bool:
        """True once the name service has taken the entry (cleared when it is withdrawn)."""
        return self._announced.is_set()

    def wait_announced(self, timeout: float) -> bool:
        return self._announced.wait(timeout)

    def start(self) -> Announcer:
        """Announce now (blocking, within ``timeout``); if the name service cannot be reached,
        log it and keep trying in the background. A thread then announces again every third
        of the name service's lease (an entry not announced within the lease goes)."""
        connected = self._connect()
        self._thread = threading.Thread(
            target=self._run,
            args=(connected,),
            name=f"sockstack-announce-{self.service}",
            daemon=True,
        )
        self._thread.start()
        return self

    def _connect(self) -> bool:
        from sockstack.objects.client import ObjectClient

        try:
            client = ObjectClient(self.names, timeout=self.timeout, **self._options)
        except Exception as exc:
            self._log.warning("announce %s: name service %s: %s", self.service, self.names, exc)
            return False
        with self._lock:
            if self._stop.is_set():
                client.close()
                return True
            self._client = client
        client.on_new_session.append(self._again)
        self._again()
        return True

    def _run(self, connected: bool) -> None:
        attempt = 0
        while not connected:
            if self._stop.wait(self._backoff.delay(attempt)):  # the backoff's timer
                return
            connected = self._connect()
            attempt += 1
        while True:
            client = self._client
            if client is None or self._stop.wait(client.lease / 3):  # the heartbeat's timer
                return
            self._again()

    def _again(self) -> None:
        """Announce (again: the entry's lease starts over; after a new session, the old
        one's entry went with it)."""
        client = self._client
        if client is None or client.closed:
            return
        try:
            client.lookup("names").announce(self.service, self.url, self.meta)
        except SessionExpired:
            return  # a new session: on_new_session announces again
        except Exception as exc:
            if client.closed:
                return
            self._announced.clear()
            self._log.warning("announce %s at %s: %s", self.service, self.names, exc)
            return
        if not self._announced.is_set():
            log.info("announced %s as %s at %s", self.url, self.service, self.names)
        self._announced.set()

    def close(self) -> None:
        """End the session: the entry goes at once."""
        self._stop.set()
        with self._lock:
            client, self._client = self._client, None
        self._announced.clear()
        if client is not None:
            client.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.timeout)

    async def astart(self) -> Announcer:
        """:meth:`start` from asyncio code (in a thread: it blocks while it connects)."""
        return await asyncio.to_thread(self.start)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> Announcer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Announcer {self.service!r} {self.url} at {self.names}>"


def url_of(server: Server, names: str | None = None) -> str:
    """The URL to announce for ``server`` (started): its first TCP or TLS endpoint, an
    unspecified address replaced by the one this host reaches the name service from."""
    ep = next((e for e in server.endpoints if e.scheme in ("tcp", "tls")), None)
    if ep is None:
        raise ValueError("announcing needs a TCP or TLS endpoint (clients by name use them)")
    if ep.host in _UNSPECIFIED:
        ep = Endpoint(ep.scheme, _route_to(names_url(names), ep.host == "::"), ep.port)
    return str(ep)


def _route_to(names: str, v6: bool) -> str:
    """The local address the kernel would send from to reach the name service (a UDP socket
    connected there sends nothing)."""
    ns = parse_endpoint(names)
    family = socket.AF_INET6 if ns.is_ipv6 or (v6 and ":" in ns.host) else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((ns.host, ns.port))
            return str(s.getsockname()[0])
        except OSError:
            return socket.gethostname()


async def announce(
    server: Server,
    service: str,
    *,
    names: str | None = None,
    meta: Mapping[str, str] | None = None,
    url: str | None = None,
    **options: Any,
) -> Announcer:
    """Announce a started ``server`` as ``service`` (see the module); close the announcer
    (``await announcer.aclose()``) before or when the server stops."""
    announcer = Announcer(service, url or url_of(server, names), names=names, meta=meta, **options)
    return await announcer.astart()


# ---------------------------------------------------------------------------- command line


def add_announce_arguments(parser: argparse.ArgumentParser) -> None:
    """``--announce NAME``, ``--names URL``, ``--announce-url URL``, ``--meta KEY=VALUE``."""
    parser.add_argument(
        "--announce",
        metavar="NAME",
        help="announce this server under the service NAME at the name service (clients call "
        "it as name://NAME; docs/SCALING.md)",
    )
    parser.add_argument(
        "--names",
        metavar="URL",
        help="the name service for --announce (default $SOCKSTACK_NAMES, else "
        "tcp://127.0.0.1:5055)",
    )
    parser.add_argument(
        "--announce-url",
        metavar="URL",
        help="the URL to announce (default: the first TCP/TLS endpoint; an address of "
        "0.0.0.0 is replaced by this host's address towards the name service)",
    )
    parser.add_argument(
        "--meta",
        action="append",
        metavar="KEY=VALUE",
        help="meta announced with --announce, repeatable (weight=N: N times the calls)",
    )


def announce_from_args(server: Server, args: argparse.Namespace) -> Announcer | None:
    """The announcer ``--announce`` asks for (None without it), started in the background:
    call it once the server listens (``on_ready``), and ``close()`` it after the server
    stopped. ValueError for a bad option."""
    service = getattr(args, "announce", None)
    if not service:
        return None
    meta = {}
    for item in getattr(args, "meta", None) or ():
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--meta {item!r}: expected KEY=VALUE")
        meta[key] = value
    names = getattr(args, "names", None)
    url = getattr(args, "announce_url", None) or url_of(server, names)
    announcer = Announcer(service, url, names=names, meta=meta)
    # Not on the loop: the first announce blocks while it connects.
    threading.Thread(
        target=announcer.start, name=f"sockstack-announce-{service}", daemon=True
    ).start()
    # The banner follows the first announce (bounded): a client started after it finds this
    # server. A name service that does not answer yet is retried in the background.
    if not announcer.wait_announced(5.0):
        log.warning("announce %s: not announced yet at %s; retrying", service, names)
    return announcer
