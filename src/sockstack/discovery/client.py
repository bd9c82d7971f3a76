"""Clients of a service found by name: ``connect("name://calc")`` and its asyncio twin.

The client asks the name service (``names=``, else ``$SOCKSTACK_NAMES``, else
``tcp://127.0.0.1:5055``) which servers announce the service, keeps one connection per live
server, and sends each call to one of them (:mod:`sockstack.discovery.balance`: least in flight
by default, or round-robin). It reads the listing again every ``refresh`` seconds (by default a
quarter of the name service's lease, at most 5 s): a server that announces is used from the
next reading on, one that is gone from the listing is dropped (its calls in flight finish
first). A server whose connection fails or is lost is set aside at once, without waiting for
the listing, and tried again after a backoff.

What a call is promised:

- **Its own answer.** A call runs on one server's connection, whose answers are matched by
  request id: never another call's answer, never an answer from a server it was not sent to.
- **Not sent is sent elsewhere.** A call that could not be sent (no connection: refused, reset
  before the handshake, the connection found closed) or that a server refused before running
  it (``SHUTTING_DOWN``: it is draining) goes to another server, each server at most once a
  call, within the call's timeout.
- **Lost is surfaced.** A call whose connection ended while it was in flight may or may not
  have run: it raises :class:`~sockstack.errors.ConnectionLost`, unless the caller opted in
  (``retry_lost=True`` on the client, or on one :meth:`ServiceClient.request`): then it is sent
  once more to another server (it may run twice: for methods that are safe to repeat).
- A call that times out raises :class:`~sockstack.errors.CallTimeout` as always (not retried).

With the name service unreachable, the client keeps the servers it knows (and logs, rate
limited); when the name service lost our session (it restarted), servers missing from its
listing are kept for one lease, the time they take to announce again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from sockstack.clients import AsyncClient, Client
from sockstack.discovery.balance import Balancer, Member
from sockstack.discovery.common import SCHEME, names_url, service_of
from sockstack.errors import (
    CallError,
    CallTimeout,
    ConnectError,
    ConnectionLost,
    ErrorCode,
    RemoteError,
)
from sockstack.protocol.calls import Backoff
from sockstack.transport.ratelog import RateLimitedLog
from sockstack.transport.settings import DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT

__all__ = ["AsyncServiceClient", "ServiceClient", "aresolve", "resolve"]

log = logging.getLogger("sockstack.discovery")
_MAX_REFRESH = 5.0
_MIN_REFRESH = 0.05


@dataclass(frozen=True, slots=True)
class _NoRetry(Backoff):
    """A member's client connects again once inside a call, then gives up with ConnectError
    (nothing sent): the service client sets the server aside and sends the call elsewhere,
    rather than the call waiting out its timeout on one dead server."""

    def delay(self, attempt: int) -> float:
        raise ConnectError("not connected (the server is set aside and tried again later)")


_NO_RETRY = _NoRetry()


def _refresh_for(lease: float, refresh: float | None) -> float:
    if refresh is not None:
        if refresh <= 0:
            raise ValueError("refresh must be positive")
        return refresh
    return max(_MIN_REFRESH, min(_MAX_REFRESH, lease / 4))


def _not_sent(exc: BaseException) -> bool:
    """The call did not run: it may go to another server."""
    if isinstance(exc, ConnectError):
        return True
    # SHUTTING_DOWN: refused while draining, it did not run (a call cut off past the drain
    # timeout, which may have run in part, is ABANDONED: not sent elsewhere).
    return isinstance(exc, RemoteError) and exc.code == ErrorCode.SHUTTING_DOWN


def _none_left(service: str, names: str, errors: list[str]) -> ConnectError:
    if not errors:
        return ConnectError(f"no server of {service!r} is listed at {names} (nothing was sent)")
    return ConnectError(
        f"no server of {service!r} could take the call (nothing was sent): " + "; ".join(errors)
    )


def _listed(value: object) -> list[Mapping[str, Any]]:
    if not isinstance(value, list):
        raise ValueError(f"the name service answered {type(value).__name__}, not a list")
    return [e for e in value if isinstance(e, Mapping)]


# ---------------------------------------------------------------------------- blocking


class ServiceClient(Client):
    """A blocking client of every server announcing a service (thread-safe). Made by
    ``connect("name://calc", names=URL)`` (or ``Client("name://calc")``, or directly).

    ``policy``: "least" (fewest calls in flight, round-robin among equals) or "round_robin";
    ``refresh``: seconds between readings of the listing; ``match``: only servers whose meta
    holds these pairs (``{"version": "2"}``); ``retry_lost``: send a call lost in flight to
    another server (see the module). Every other option (``timeout``, ``codec``, ``secret``,
    ``tls``, ``metadata``, ``interceptors``...) is each server's client's. Offers ``call``,
    ``request``, ``proxy()``, ``upload``, ``stream`` (one server, not retried), ``ping``,
    ``publish``, ``close`` and ``with``. :meth:`servers` says how the servers stand.
    """

    def __init__(
        self,
        url: str,
        *,
        names: str | None = None,
        policy: str = "least",
        refresh: float | None = None,
        match: Mapping[str, str] | None = None,
        retry_lost: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        codec: str = "msgpack",
        **options: Any,
    ) -> None:
        from sockstack.objects.client import ObjectClient
        from sockstack.protocol.codecs import get_codec

        self.service = service_of(url) if url.startswith(SCHEME) else service_of(SCHEME + url)
        self.names = names_url(names)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.codec = get_codec(codec)
        self.retry_lost = retry_lost
        self.metadata = None
        self.hooks = None
        self._options = {"codec": codec, **options}
        self._balancer = Balancer(policy, match=match)
        self._cond = threading.Condition()
        self._closed = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._grace_until = 0.0
        self._bad = RateLimitedLog(log)
        self._registry = ObjectClient(self.names, timeout=timeout, connect_timeout=connect_timeout)
        try:
            self._registry.on_new_session.append(self._registry_restarted)
            self._lookup = self._registry.lookup("names")
            self.refresh = _refresh_for(self._registry.lease, refresh)
            self._read_listing()  # errors here are the caller's: a wrong URL, no service
        except BaseException:
            self._registry.close()
            raise
        # Connect the servers listed now, within connect_timeout in all (those left over are
        # the thread's): calls made next are spread over all of them from the first on.
        deadline = time.monotonic() + connect_timeout
        with self._cond:
            due = self._balancer.connectable(time.monotonic())
            for m in due:
                m.connecting = True
        for i, m in enumerate(due):
            if time.monotonic() >= deadline:
                with self._cond:
                    for rest in due[i:]:
                        rest.connecting = False
                break
            self._connect_member(m, deadline)
        self._thread = threading.Thread(
            target=self._keep, name=f"sockstack-service-{self.service}", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ the listing

    def _registry_restarted(self) -> None:
        """The name service lost our session (it restarted): its listing is incomplete until
        the servers announce again (within a third of its lease)."""
        self._grace_until = time.monotonic() + self._registry.lease

    def _read_listing(self) -> None:
        listing = _listed(self._lookup.servers(self.service))
        keep = time.monotonic() < self._grace_until
        with self._cond:
            if self._closed:
                return
            added, removed = self._balancer.update(listing, keep_unlisted=keep)
            idle = [m for m in removed if m.in_flight == 0 and not m.connecting]
            self._cond.notify_all()
        for m in added:
            log.debug("%s: server %s listed", self.service, m.url)
        for m in removed:
            log.debug("%s: server %s no longer listed", self.service, m.url)
        for m in idle:
            self._close_member(m)

    def _keep(self) -> None:
        """The client's thread: read the listing every ``refresh`` seconds (or when woken:
        no server left), and connect the servers that are new or due to be tried again."""
        next_read = time.monotonic() + self.refresh
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_read or self._wake.is_set():
                self._wake.clear()
                try:
                    self._read_listing()
                except Exception as exc:  # keep the servers known; try again next time
                    self._bad.warning(
                        "%s: could not read the listing at %s: %s", self.service, self.names, exc
                    )
                next_read = time.monotonic() + self.refresh
            with self._cond:
                due = self._balancer.connectable(time.monotonic())
                for m in due:
                    m.connecting = True
            for m in due:
                if self._stop.is_set():
                    break
                self._connect_member(m, time.monotonic() + self.connect_timeout)
            with self._cond:
                retry = self._balancer.next_retry()
            wait = next_read - time.monotonic()
            if retry is not None:
                wait = min(wait, retry - time.monotonic())
            if self._wake.is_set():
                continue
            self._stop.wait(max(0.01, wait))  # the timer of the next reading or retry

    def _connect_member(self, m: Member, deadline: float) -> bool:
        """Connect ``m`` (it is marked ``connecting`` by the caller); True when it is up."""
        left = max(0.001, deadline - time.monotonic())
        try:
            if m.conn is None:
                conn = Client(
                    m.url,
                    timeout=self.timeout,
                    connect_timeout=min(self.connect_timeout, left),
                    backoff=_NO_RETRY,
                    **self._options,
                )
                m.conn = conn
            else:
                m.conn.connection.ensure(deadline, "connect", left)
        except (CallError, OSError) as exc:
            with self._cond:
                self._balancer.failed(m, time.monotonic())
                close = not m.listed and m.in_flight == 0
                self._cond.notify_all()
            self._bad.info("%s: %s set aside: %s", self.service, m.url, exc)
            if close:
                self._close_member(m)
            return False
        with self._cond:
            self._balancer.connected(m)
            close = not m.listed and m.in_flight == 0
            self._cond.notify_all()
        if close:
            self._close_member(m)
            return False
        return True

    def _close_member(self, m: Member) -> None:
        conn, m.conn = m.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing anyway
                pass

    # ------------------------------------------------------------------ choosing

    def _acquire(self, deadline: float, tried: set[str], errors: list[str]) -> Member:
        """The member the call goes to, its in-flight count taken; ConnectError when none is
        left to try (each member once a call), CallTimeout past the deadline."""
        for _ in range(4 * self._balancer.max_members + 4):  # (each pass tries a member)
            with self._cond:
                while True:
                    if self._closed:
                        raise ConnectError("the client is closed")
                    m = self._balancer.pick(tried)
                    if m is not None:
                        self._balancer.begin(m)
                        return m
                    now = time.monotonic()
                    todo = self._balancer.connectable(now, tried) or self._balancer.connectable(
                        now, tried, due_only=False
                    )
                    if todo:
                        m = todo[0]
                        m.connecting = True
                        break
                    if not self._balancer.any_connecting(tried):
                        self._wake.set()  # read the listing again soon
                        raise _none_left(self.service, self.names, errors)
                    left = deadline - now
                    if left <= 0:
                        raise CallTimeout("connect", 0, "no server of the service connected")
                    self._cond.wait(left)  # another thread is connecting one
            if not self._connect_member(m, deadline):
                tried.add(m.url)
                errors.append(f"{m.url}: not connected")
        raise _none_left(self.service, self.names, errors)

    def _release(self, m: Member) -> None:
        with self._cond:
            close = self._balancer.end(m)
        if close:
            self._close_member(m)

    def _lost(self, m: Member, conn: Any, exc: BaseException) -> None:
        """A call failed for ``m``'s connection (or ``m`` is draining): set it aside now, not
        waiting for the listing; unless another thread has connected it again meanwhile."""
        if conn is None:
            return
        with self._cond:
            draining = isinstance(exc, RemoteError)
            if m.state == "up" and m.conn is conn and (draining or not conn.connection.live):
                self._balancer.failed(m, time.monotonic())
                self._cond.notify_all()
        self._wake.set()

    def _run(
        self,
        what: str,
        timeout: float | None,
        retry_lost: bool | None,
        send: Callable[[Client, float], Any],
    ) -> Any:
        t = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        retry = self.retry_lost if retry_lost is None else retry_lost
        tried: set[str] = set()
        errors: list[str] = []
        while True:
            m = self._acquire(deadline, tried, errors)
            conn = m.conn
            try:
                if conn is None:  # closed meanwhile (the client's close)
                    raise ConnectError("the client is closed")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CallTimeout(what, t)
                return send(conn, left)
            except (ConnectError, ConnectionLost, RemoteError) as exc:
                if isinstance(exc, RemoteError) and exc.code != ErrorCode.SHUTTING_DOWN:
                    raise
                self._lost(m, conn, exc)
                if not _not_sent(exc) and not retry:
                    raise
                tried.add(m.url)
                errors.append(str(exc))
            finally:
                self._release(m)

    # ------------------------------------------------------------------ calls

    def call(self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call ``method`` on one server of the service and wait for its result."""
        return self.request(method, args, kwargs, timeout=timeout)

    def request(
        self,
        method: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        with_metadata: bool = False,
        retry_lost: bool | None = None,
    ) -> Any:
        """Like :meth:`call`, with the arguments as a sequence and a mapping; ``retry_lost``:
        this call's choice (else the client's) for a call lost in flight."""

        def send(conn: Client, left: float) -> Any:
            return conn.request(
                method,
                args,
                kwargs,
                timeout=left,
                metadata=metadata,
                with_metadata=with_metadata,  # type: ignore[call-overload]
            )

        return self._run(method, timeout, retry_lost, send)

    def upload_request(
        self,
        method: str,
        items: Iterable[Any],
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
    ) -> Any:
        """An upload to one server (sent elsewhere only while nothing was sent; never retried
        once lost: its items are gone)."""

        def send(conn: Client, left: float) -> Any:
            return conn.upload_request(method, items, args, kwargs, timeout=left, metadata=metadata)

        return self._run(method, timeout, False, send)

    def stream_request(
        self,
        method: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
    ) -> Any:
        """A streamed call on one server (chosen as a call is; its items all come from it;
        counted in flight while it starts only)."""

        def send(conn: Client, left: float) -> Any:
            return conn.stream_request(method, args, kwargs, timeout=left, metadata=metadata)

        return self._run(method, timeout, False, send)

    def ping(self, timeout: float | None = None) -> float:
        """Round-trip time of one PING/PONG to one server of the service, in seconds."""
        return float(self._run("PING", timeout, True, lambda conn, left: conn.ping(left)))

    def publish(
        self,
        topic: str,
        value: Any,
        *,
        qos: int = 0,
        retain: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Publish through one broker of the service (brokers joined through NATS share it)."""

        def send(conn: Client, left: float) -> None:
            conn.publish(topic, value, qos=qos, retain=retain, timeout=left)

        self._run("PUB " + topic, timeout, False, send)

    def clear_retained(self, topic: str, *, qos: int = 1, timeout: float | None = None) -> None:
        self._run(
            "PUB " + topic,
            timeout,
            False,
            lambda conn, left: conn.clear_retained(topic, qos=qos, timeout=left),
        )

    def stream_connection(self, what: str) -> NoReturn:
        raise ConnectError(
            f"{what} needs one server: a service by name spreads calls over several (for a "
            "subscription, connect to the servers' URLs as a failover list: resolve())"
        )

    @property
    def connection(self) -> NoReturn:  # type: ignore[override]
        raise ConnectError("a service by name has a connection per server: see servers()")

    def servers(self) -> list[dict[str, Any]]:
        """How the servers stand: ``[{"url", "state", "in_flight", "calls", "weight",
        "meta"}]``, state "new", "up" or "down"."""
        with self._cond:
            return [m.view() for m in self._balancer.members.values()]

    def refresh_now(self) -> None:
        """Read the listing now (also done every ``refresh`` seconds)."""
        self._read_listing()

    def close(self) -> None:
        """Close every connection (calls in flight fail with ConnectionLost) and the name
        service's session."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            members = self._balancer.remove_all()
            self._cond.notify_all()
        self._stop.set()
        for m in members:
            self._close_member(m)
        self._registry.close()
        if self._thread is not threading.current_thread():
            self._thread.join(self.connect_timeout + 1.0)

    def _after_fork(self) -> None:  # (not registered: a forked child makes its own)
        pass

    def __repr__(self) -> str:
        return f"<ServiceClient {self.service!r} at {self.names}>"


def resolve(
    service: str, *, names: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> list[str]:
    """The URLs of the servers announcing ``service`` now (``name://`` optional), for a
    failover list: ``connect(resolve("broker"))``. ConnectError when none is listed."""
    from sockstack.objects.client import ObjectClient

    name = service_of(service if service.startswith(SCHEME) else SCHEME + service)
    url = names_url(names)
    with ObjectClient(url, timeout=timeout) as oc:
        listing = _listed(oc.lookup("names").servers(name))
    urls = [str(e["url"]) for e in listing if isinstance(e.get("url"), str)]
    if not urls:
        raise _none_left(name, url, [])
    return urls


# ---------------------------------------------------------------------------- asyncio


class AsyncServiceClient(AsyncClient):
    """The asyncio twin of :class:`ServiceClient`: ``async with AsyncClient("name://calc",
    names=URL) as client: await client.call("add", 2, 3)`` (the same options and promises).
    Single event loop; calls from several tasks at once are spread as the policy says."""

    def __init__(
        self,
        url: str,
        *,
        names: str | None = None,
        policy: str = "least",
        refresh: float | None = None,
        match: Mapping[str, str] | None = None,
        retry_lost: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        codec: str = "msgpack",
        **options: Any,
    ) -> None:
        from sockstack.protocol.codecs import get_codec

        self.service = service_of(url) if url.startswith(SCHEME) else service_of(SCHEME + url)
        self.names = names_url(names)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.codec = get_codec(codec)
        self.retry_lost = retry_lost
        self.metadata = None
        self.hooks = None
        self._options = {"codec": codec, **options}
        self._refresh = refresh
        self.refresh = refresh or _MAX_REFRESH
        self._balancer = Balancer(policy, match=match)
        self._closed = False
        self._changed: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._registry: Any = None
        self._lookup: Any = None
        self._grace_until = 0.0
        self._epoch_seen = 0
        self._bad = RateLimitedLog(log)

    async def connect(self) -> AsyncServiceClient:
        """Connect to the name service and read the listing (ConnectError if it cannot)."""
        from sockstack.objects.client import AsyncObjectClient

        if self._registry is not None:
            return self
        registry = AsyncObjectClient(
            self.names, timeout=self.timeout, connect_timeout=self.connect_timeout
        )
        await registry.connect()
        try:
            self._lookup = registry.lookup("names")
            self.refresh = _refresh_for(registry.lease, self._refresh)
            self._registry = registry
            self._changed = asyncio.Event()
            self._wake = asyncio.Event()
            await self._read_listing()
        except BaseException:
            self._registry = None
            await registry.close()
            raise
        due = self._balancer.connectable(time.monotonic())  # (see ServiceClient.__init__)
        for m in due:
            m.connecting = True
        if due:
            await asyncio.gather(*(self._connect_member(m, self.connect_timeout) for m in due))
        self._task = asyncio.get_running_loop().create_task(self._keep())
        return self

    async def __aenter__(self) -> AsyncServiceClient:
        return await self.connect()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def _read_listing(self) -> None:
        registry = self._registry
        if registry.epoch != self._epoch_seen:  # it lost our session (restarted): see _keep
            self._epoch_seen = registry.epoch
            self._grace_until = time.monotonic() + registry.lease
        listing = _listed(await self._lookup.servers(self.service))
        if self._closed:
            return
        keep = time.monotonic() < self._grace_until
        added, removed = self._balancer.update(listing, keep_unlisted=keep)
        for m in added:
            log.debug("%s: server %s listed", self.service, m.url)
        for m in removed:
            log.debug("%s: server %s no longer listed", self.service, m.url)
            if m.in_flight == 0 and not m.connecting:
                await self._close_member(m)
        self._notify()

    async def _keep(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        next_read = loop.time() + self.refresh
        while not self._closed:
            if loop.time() >= next_read or self._wake.is_set():
                self._wake.clear()
                try:
                    await self._read_listing()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._bad.warning(
                        "%s: could not read the listing at %s: %s", self.service, self.names, exc
                    )
                next_read = loop.time() + self.refresh
            due = self._balancer.connectable(time.monotonic())
            for m in due:
                m.connecting = True
            if due:
                await asyncio.gather(*(self._connect_member(m, self.connect_timeout) for m in due))
            wait = next_read - loop.time()
            retry = self._balancer.next_retry()
            if retry is not None:
                wait = min(wait, retry - time.monotonic())
            if self._wake.is_set():
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.01, wait)):  # the next reading or retry
                    await self._wake.wait()

    async def _connect_member(self, m: Member, timeout: float) -> bool:
        old = m.conn
        stream = getattr(old.channel, "stream", None) if old is not None else None
        if stream is not None and stream.can_send():  # set aside while draining: still open
            self._balancer.connected(m)
            self._notify()
            return True
        try:
            conn = AsyncClient(
                m.url,
                timeout=self.timeout,
                connect_timeout=min(self.connect_timeout, max(0.001, timeout)),
                reconnect=False,
                **self._options,
            )
            await conn.connect()
        except (CallError, OSError) as exc:
            self._balancer.failed(m, time.monotonic())
            self._bad.info("%s: %s set aside: %s", self.service, m.url, exc)
            self._notify()
            if not m.listed and m.in_flight == 0:
                await self._close_member(m)
            return False
        except BaseException:  # cancelled (its caller gave up): tried again later, never wedged
            self._balancer.failed(m, time.monotonic())
            self._notify()
            raise
        m.conn = conn
        self._balancer.connected(m)
        self._notify()
        if old is not None:  # its connection ended: its calls have failed already
            await old.close()
        if self._closed or (not m.listed and m.in_flight == 0):
            await self._close_member(m)
            return False
        return True

    async def _close_member(self, m: Member) -> None:
        conn, m.conn = m.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _acquire(self, deadline: float, tried: set[str], errors: list[str]) -> Member:
        for _ in range(4 * self._balancer.max_members + 4):
            if self._closed or self._registry is None:
                raise ConnectError("the client is closed" if self._closed else "not connected")
            m = self._balancer.pick(tried)
            if m is not None:
                self._balancer.begin(m)
                return m
            now = time.monotonic()
            todo = self._balancer.connectable(now, tried) or self._balancer.connectable(
                now, tried, due_only=False
            )
            if todo:
                m = todo[0]
                m.connecting = True
                if not await self._connect_member(m, deadline - now):
                    tried.add(m.url)
                    errors.append(f"{m.url}: not connected")
                continue
            if not self._balancer.any_connecting(tried):
                if self._wake is not None:
                    self._wake.set()
                raise _none_left(self.service, self.names, errors)
            changed = self._changed
            assert changed is not None
            try:
                async with asyncio.timeout(max(0.0, deadline - now)):
                    await changed.wait()  # another task is connecting one
            except TimeoutError:
                raise CallTimeout("connect", 0, "no server of the service connected") from None
        raise _none_left(self.service, self.names, errors)

    async def _release(self, m: Member) -> None:
        if self._balancer.end(m):
            await self._close_member(m)

    def _lost(self, m: Member, conn: Any, exc: BaseException) -> None:
        if conn is not None and m.state == "up" and m.conn is conn:
            stream = getattr(conn.channel, "stream", None)
            if isinstance(exc, RemoteError) or stream is None or not stream.can_send():
                self._balancer.failed(m, time.monotonic())
                self._notify()
        if self._wake is not None:
            self._wake.set()

    async def _run(
        self,
        what: str,
        timeout: float | None,
        retry_lost: bool | None,
        send: Callable[[AsyncClient, float], Any],
    ) -> Any:
        t = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        retry = self.retry_lost if retry_lost is None else retry_lost
        tried: set[str] = set()
        errors: list[str] = []
        while True:
            m = await self._acquire(deadline, tried, errors)
            conn = m.conn
            try:
                if conn is None:  # closed meanwhile (the client's close)
                    raise ConnectError("the client is closed")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CallTimeout(what, t)
                return await send(conn, left)
            except (ConnectError, ConnectionLost, RemoteError) as exc:
                if isinstance(exc, RemoteError) and exc.code != ErrorCode.SHUTTING_DOWN:
                    raise
                self._lost(m, conn, exc)
                if not _not_sent(exc) and not retry:
                    raise
                tried.add(m.url)
                errors.append(str(exc))
            finally:
                await self._release(m)

    def call(self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call ``method`` on one server of the service; await the result."""
        return self.request(method, args, kwargs, timeout=timeout)

    def request(
        self,
        method: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        with_metadata: bool = False,
        retry_lost: bool | None = None,
    ) -> Any:
        def send(conn: AsyncClient, left: float) -> Any:
            return conn.request(
                method,
                args,
                kwargs,
                timeout=left,
                metadata=metadata,
                with_metadata=with_metadata,  # type: ignore[call-overload]
            )

        return self._run(method, timeout, retry_lost, send)

    async def upload_request(
        self,
        method: str,
        items: Any,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
    ) -> Any:
        def send(conn: AsyncClient, left: float) -> Any:
            return conn.upload_request(method, items, args, kwargs, timeout=left, metadata=metadata)

        return await self._run(method, timeout, False, send)

    def stream_request(
        self,
        method: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
    ) -> Any:
        """Not offered: an asyncio stream starts when it is iterated, after the server was
        chosen; use the servers' URLs (:func:`aresolve`)."""
        raise ConnectError("streams through a service name: not offered by the asyncio client")

    async def ping(self, timeout: float | None = None) -> float:
        async def send(conn: AsyncClient, left: float) -> float:
            return await conn.ping(left)

        return float(await self._run("PING", timeout, True, send))

    async def publish(
        self,
        topic: str,
        value: Any,
        *,
        qos: int = 0,
        retain: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Publish through one broker of the service."""

        async def send(conn: AsyncClient, left: float) -> None:
            await conn.publish(topic, value, qos=qos, retain=retain, timeout=left)

        await self._run("PUB " + topic, timeout, False, send)

    async def clear_retained(
        self, topic: str, *, qos: int = 1, timeout: float | None = None
    ) -> None:
        async def send(conn: AsyncClient, left: float) -> None:
            await conn.clear_retained(topic, qos=qos, timeout=left)

        await self._run("PUB " + topic, timeout, False, send)

    def stream_channel(self, what: str) -> NoReturn:
        raise ConnectError(
            f"{what} needs one server: a service by name spreads calls over several (for a "
            "subscription, connect to the servers' URLs as a failover list: aresolve())"
        )

    @property
    def channel(self) -> None:
        return None

    def servers(self) -> list[dict[str, Any]]:
        """How the servers stand (see :meth:`ServiceClient.servers`)."""
        return [m.view() for m in self._balancer.members.values()]

    async def refresh_now(self) -> None:
        await self._read_listing()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for m in self._balancer.remove_all():
            await self._close_member(m)
        self._notify()
        if self._registry is not None:
            await self._registry.close()

    def __repr__(self) -> str:
        return f"<AsyncServiceClient {self.service!r} at {self.names}>"


async def aresolve(
    service: str, *, names: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> list[str]:
    """:func:`resolve` for asyncio code."""
    from sockstack.objects.client import AsyncObjectClient

    name = service_of(service if service.startswith(SCHEME) else SCHEME + service)
    url = names_url(names)
    async with AsyncObjectClient(url, timeout=timeout) as oc:
        listing = _listed(await oc.lookup("names").servers(name))
    urls = [str(e["url"]) for e in listing if isinstance(e.get("url"), str)]
    if not urls:
        raise _none_left(name, url, [])
    return urls
