"""The live dashboard: ``GET /`` is a page (HTML, JS and CSS shipped in the package, with the
uPlot chart library vendored beside them: nothing is loaded from outside the machine) that
follows ``GET /dashboard/events``, Server-Sent Events of one sample per interval (docs/HTTP.md,
"Dashboard"): open connections per transport, calls/s and errors/s, latency percentiles and
the broker's drops.

One sampler task serves every viewer: it starts with the first and ends when the last leaves
(or the server drains), so an idle gateway runs nothing. Each viewer's queue is bounded in bytes:
a viewer that reads slowly misses samples (their ``seq`` has a gap), it never grows the server's
memory. Calls, errors and latency come from the host's
:class:`~sockstack.metrics.ServerMetrics` (the gateway's ``metrics``; absent when metrics are
off, and the page says so); latency percentiles are estimated from that histogram's buckets
between two samples, as Prometheus' ``histogram_quantile`` does: only as precise as the buckets
(each sample names the bucket a percentile fell in).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import html
import importlib.resources
import json
import logging
import math
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sockstack.errors import ErrorCode
from sockstack.gateway.http import HttpRequest, not_allowed
from sockstack.gateway.problems import HttpProblem

if TYPE_CHECKING:
    from sockstack.gateway.pattern import Gateway

__all__ = ["MAX_VIEWERS", "VIEWER_BYTES", "Dashboard", "install", "of"]

log = logging.getLogger("sockstack.gateway")

MAX_VIEWERS = 64
"""Event streams open at once (all clients): one more is 503 OVERLOADED."""
VIEWER_BYTES = 16 << 10
"""Bytes of samples queued for one viewer that reads slowly; beyond, the oldest are dropped."""
SAMPLER_TASK = "sockstack-dashboard-sampler"
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
_GET = ("GET", "HEAD")
_RETRY_MS = 2000  # the browser's wait before it reconnects a stream that ended
_STATIC_CACHE = b"public, max-age=31536000, immutable"  # URLs carry the content's hash
_TYPES = {
    "html": b"text/html; charset=utf-8",
    "js": b"text/javascript; charset=utf-8",
    "css": b"text/css; charset=utf-8",
}
_TEXT = b"text/plain; charset=utf-8"
# The page loads only its own files and its own event stream; a script of another origin, an
# inline one, or a connection elsewhere is refused by the browser.
_PAGE_HEADERS = [
    (b"cache-control", b"no-store"),  # it may carry the access token
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        b"img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
]
_dashboards: weakref.WeakKeyDictionary[Gateway, Dashboard] = weakref.WeakKeyDictionary()


def install(gateway: Gateway) -> None:
    """``/`` (the page) and ``/dashboard/...`` (its events and files) on ``gateway``."""
    dash = Dashboard(gateway)
    _dashboards[gateway] = dash
    gateway.routes[""] = dash.page
    gateway.routes["dashboard"] = dash.route


def of(gateway: Gateway) -> Dashboard:
    """The dashboard of ``gateway`` (to set its ``interval``, or to follow it in process)."""
    return _dashboards[gateway]


# ------------------------------------------------------------------------ the package's files


@dataclass(frozen=True, slots=True)
class _Files:
    page: bytes  # index.html with each file's version in its URL, a slot for the access token
    static: dict[str, tuple[bytes, bytes]]  # name -> (content type, content)


@functools.cache
def _files() -> _Files:
    """The page and its files, read from the package once (per process)."""
    folder = importlib.resources.files("sockstack.gateway") / "static" / "dashboard"
    static: dict[str, tuple[bytes, bytes]] = {}
    page = b""
    for entry in folder.iterdir():
        if not entry.is_file():
            continue
        data = entry.read_bytes()
        if entry.name == "index.html":
            page = data
            continue
        suffix = entry.name.rpartition(".")[2] if "." in entry.name else ""
        static[entry.name] = (_TYPES.get(suffix, _TEXT), data)
    for name, (_, data) in static.items():
        version = hashlib.sha256(data).hexdigest()[:12].encode()
        page = page.replace(b"{{v:" + name.encode() + b"}}", b"?v=" + version)
    return _Files(page, static)


# ------------------------------------------------------------------------ viewers and samples


@dataclass(eq=False, slots=True)
class Viewer:
    """One event stream: the samples not yet sent to it, bounded by :data:`VIEWER_BYTES`."""

    queue: deque[bytes] = field(default_factory=deque)
    size: int = 0
    dropped: int = 0
    """Samples dropped because the viewer was reading too slowly."""
    ended: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, data: bytes, *, last: bool = False) -> None:
        q = self.queue
        q.append(data)
        self.size += len(data)
        while self.size > VIEWER_BYTES and len(q) > 1:  # never the newest (nor the end)
            self.size -= len(q.popleft())
            self.dropped += 1
        if last:
            self.ended = True
        self.wake.set()

    def take(self) -> bytes:
        data = b"".join(self.queue)
        self.queue.clear()
        self.size = 0
        return data


@dataclass(slots=True)
class _Totals:
    """The counters since the server started, read at one instant."""

    at: float
    calls: dict[str, float]  # by transport
    errors: dict[str, float]  # by code name
    buckets: list[tuple[float, float]]  # (upper bound, cumulative count) over all series
    broker: dict[str, Any] | None


def _event(kind: bytes, value: Any) -> bytes:
    """One Server-Sent Event: its name, its data as one line of JSON."""
    return b"event: %s\ndata: %s\n\n" % (kind, json.dumps(value, separators=(",", ":")).encode())


def _summed(metric: Any, suffix: str, key: Callable[[dict[str, str]], Any]) -> dict[Any, float]:
    """A metric's samples named ``*suffix``, summed by ``key(labels)`` over its series."""
    out: dict[Any, float] = {}
    for family in metric.collect():
        for s in family.samples:
            if s.name.endswith(suffix):
                k = key(s.labels)
                out[k] = out.get(k, 0.0) + s.value
    return out


def _read_metrics(metrics: Any) -> tuple[dict[str, float], dict[str, float], list[Any]]:
    """Calls by transport, errors by code and the latency buckets summed over every series of
    a :class:`~sockstack.metrics.ServerMetrics` (its own Prometheus metrics, not a scrape)."""
    calls = _summed(metrics.calls, "_total", lambda labels: labels["transport"])
    errors = _summed(metrics.errors, "_total", lambda labels: labels["code"])
    by_bound = _summed(metrics.latency, "_bucket", lambda labels: float(labels["le"]))
    return calls, errors, sorted(by_bound.items())


def quantile(q: float, buckets: list[tuple[float, float]]) -> tuple[float, float, float | None]:
    """The ``q`` quantile of cumulative ``buckets`` ((upper bound, count), the last +Inf), by
    linear interpolation inside the bucket it falls in (Prometheus' ``histogram_quantile``):
    (estimate, the bucket's lower bound, its upper bound or None for +Inf)."""
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank and count > below:
            if math.isinf(upper):
                return lower, lower, None  # above the highest bound: only "at least" is known
            return lower + (upper - lower) * (rank - below) / (count - below), lower, upper
        lower, below = upper, count
    return lower, lower, None


class Dashboard:
    """The dashboard of one gateway: its routes, the viewers and the sampler they share."""

    def __init__(self, gateway: Gateway, interval: float = 1.0) -> None:
        self.gateway = gateway
        self.interval = interval
        """Seconds between samples (set before the first viewer, e.g. small in tests)."""
        self.viewers: set[Viewer] = set()
        self.task: asyncio.Task[None] | None = None
        """The sampler, while any viewer is connected."""
        self.idle = asyncio.Event()
        """Set while no sampler runs."""
        self.idle.set()
        self.seq = 0
        self._last: bytes | None = None  # the latest sample's event, for a viewer that joins
        self._prev: _Totals | None = None

    # ---------------------------------------------------------------- viewers

    def join(self) -> Viewer:
        """A new viewer, sent every sample from now on (and the latest one at once)."""
        if len(self.viewers) >= MAX_VIEWERS:
            raise HttpProblem(
                ErrorCode.OVERLOADED,
                f"{len(self.viewers)} dashboard streams open (limit {MAX_VIEWERS})",
            )
        viewer = Viewer()
        self.viewers.add(viewer)
        if self.task is None:
            self._last = None
            self.idle.clear()
            self.task = asyncio.get_running_loop().create_task(self._run(), name=SAMPLER_TASK)
        elif self._last is not None:
            viewer.offer(self._last)
        return viewer

    async def leave(self, viewer: Viewer) -> None:
        """The viewer is gone; the last one ends the sampler (and waits for it to end)."""
        self.viewers.discard(viewer)
        task = self.task
        if self.viewers or task is None:
            return
        self.task = None
        task.cancel()
        await asyncio.wait((task,))

    # ---------------------------------------------------------------- the sampler

    def hello(self) -> dict[str, Any]:
        """What a viewer is told once: the interval, and whether there are metrics and a broker."""
        host = self.gateway.host
        return {
            "interval": self.interval,
            "metrics": self.gateway.metrics is not None,
            "broker": host is not None and host.broker is not None,
        }

    def _totals(self) -> _Totals:
        metrics = self.gateway.metrics
        calls: dict[str, float] = {}
        errors: dict[str, float] = {}
        buckets: list[tuple[float, float]] = []
        if metrics is not None:
            calls, errors, buckets = _read_metrics(metrics)
        host = self.gateway.host
        broker = host.broker if host is not None else None
        return _Totals(
            time.monotonic(), calls, errors, buckets, broker.stats() if broker is not None else None
        )

    def sample(self) -> dict[str, Any]:
        """One sample: the state now, and rates since the previous sample."""
        host = self.gateway.host
        assert host is not None
        now = self._totals()
        prev = self._prev or now
        self._prev = now
        dt = now.at - prev.at
        self.seq += 1

        def rate(n: float, was: float) -> float:
            return round((n - was) / dt, 3) if dt > 0 else 0.0

        out: dict[str, Any] = {
            "seq": self.seq,
            "time": round(time.time(), 3),
            "dt": round(dt, 4),
            "connections": host.open_connections(),
            "http_in_flight": self.gateway.in_flight,
            "metrics": self.gateway.metrics is not None,
        }
        if out["metrics"]:
            calls, was = sum(now.calls.values()), sum(prev.calls.values())
            errors, was_err = sum(now.errors.values()), sum(prev.errors.values())
            out["calls"] = int(calls)
            out["calls_per_s"] = rate(calls, was)
            out["calls_per_s_by_transport"] = {
                t: rate(n, prev.calls.get(t, 0.0)) for t, n in sorted(now.calls.items())
            }
            out["errors"] = int(errors)
            out["errors_per_s"] = rate(errors, was_err)
            out["errors_by_code"] = {  # in this interval
                c: int(n - prev.errors.get(c, 0.0))
                for c, n in sorted(now.errors.items())
                if n > prev.errors.get(c, 0.0)
            }
            out["latency"] = _latency(now.buckets, prev.buckets)
        b = now.broker
        if b is not None:
            dropped_before = prev.broker["dropped"] if prev.broker else b["dropped"]
            out["broker"] = {
                "dropped": b["dropped"],
                "dropped_per_s": rate(b["dropped"], dropped_before),
                "slow_consumers_disconnected": b["slow_consumers_disconnected"],
                "published": b["published"],
                "delivered": b["delivered"],
                "subscriptions": b["subscriptions"],
                "held_bytes": b["held_bytes"],
            }
        return out

    async def _run(self) -> None:
        try:
            self._prev = None
            with contextlib.suppress(Exception):  # (if it fails, the first sample says why)
                self._prev = self._totals()
            failed = False
            closing = self.gateway.closing
            while self.viewers:
                with contextlib.suppress(TimeoutError):  # a tick, or the drain at once
                    await asyncio.wait_for(closing.wait(), self.interval)
                host = self.gateway.host
                if host is None or host.draining or closing.is_set():
                    self._end("the server is draining")
                    return
                try:
                    data = _event(b"sample", self.sample())
                    failed = False
                except Exception:
                    if not failed:  # once per run of failures, not once per interval
                        log.exception("dashboard: a sample failed")
                    failed = True
                    continue
                self._last = data
                for v in tuple(self.viewers):
                    v.offer(data)
        finally:
            if self.task is asyncio.current_task():
                self.task = None
            if self.task is None:
                self.idle.set()

    def _end(self, reason: str) -> None:
        data = _event(b"end", {"reason": reason})
        for v in tuple(self.viewers):
            v.offer(data, last=True)

    # ---------------------------------------------------------------- routes

    async def page(self, req: HttpRequest) -> None:
        """``GET /``: the page, with the access token it was given passed on to its URLs."""
        if req.method not in _GET:
            raise not_allowed(req, _GET)
        if req.path != "/":
            raise HttpProblem(ErrorCode.NOT_FOUND, f"no resource at {req.path}")
        token = b""
        for k, v in req.query():
            if k == "access_token":
                token = html.escape("&access_token=" + quote(v, safe="")).encode()
        body = _files().page.replace(b"{{token}}", token)
        await req.respond(200, body, _TYPES["html"], _PAGE_HEADERS)

    async def route(self, req: HttpRequest) -> None:
        """``/dashboard/events``, ``/dashboard/static/NAME``; ``/dashboard`` sends to ``/``."""
        if req.method not in _GET:
            raise not_allowed(req, _GET)
        path = req.path
        if path == "/dashboard/events":
            await self._events(req)
            return
        if path.startswith("/dashboard/static/"):
            found = _files().static.get(path[18:])
            if found is None:
                raise HttpProblem(ErrorCode.NOT_FOUND, f"no resource at {path}")
            ctype, data = found
            headers = [(b"cache-control", _STATIC_CACHE), (b"x-content-type-options", b"nosniff")]
            await req.respond(200, data, ctype, headers)
            return
        if path in ("/dashboard", "/dashboard/"):
            qs: bytes = req.scope.get("query_string") or b""
            location = b"/?" + qs if qs else b"/"
            await req.respond(308, b"", None, [(b"location", location)])
            return
        raise HttpProblem(ErrorCode.NOT_FOUND, f"no resource at {path}")

    async def _events(self, req: HttpRequest) -> None:
        host = self.gateway.host
        if host is None or host.draining:
            raise HttpProblem(ErrorCode.SHUTTING_DOWN, "the server is draining")
        headers = [
            (b"content-type", b"text/event-stream"),
            (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"),  # (a proxy in front: do not buffer the stream)
        ]
        if req.method == "HEAD":
            await req.respond(200, b"", None, headers)
            return
        viewer = self.join()
        req.detach()  # long-lived: bounded by MAX_VIEWERS, not by the calls' max_in_flight
        gone = asyncio.ensure_future(_disconnected(req))
        send = req.send
        try:
            await req.start(200, headers)
            first = b"retry: %d\n\n" % _RETRY_MS + _event(b"hello", self.hello())
            await send({"type": "http.response.body", "body": first, "more_body": True})
            while True:
                if viewer.queue:
                    data = viewer.take()
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                    continue
                if viewer.ended or gone.done():
                    break
                viewer.wake.clear()
                woken = asyncio.ensure_future(viewer.wake.wait())
                await asyncio.wait((woken, gone), return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
            if not gone.done():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()
            await self.leave(viewer)


async def _disconnected(req: HttpRequest) -> None:
    """Returns when the client has gone (the request's body, if any, is read and dropped)."""
    receive = req.receive
    while (await receive())["type"] != "http.disconnect":
        pass


def _latency(
    now: Iterable[tuple[float, float]], before: Iterable[tuple[float, float]]
) -> dict[str, Any] | None:
    """p50/p90/p99 of the calls answered between two readings of the histogram (seconds), each
    with the bucket it lies in; None when no call was answered."""
    was = dict(before)
    window = [(bound, n - was.get(bound, 0.0)) for bound, n in now]
    if not window or window[-1][1] <= 0:
        return None
    out: dict[str, Any] = {"calls": int(window[-1][1])}
    for name, q in QUANTILES:
        value, lower, upper = quantile(q, window)
        out[name] = value
        out[name + "_bucket"] = [lower, upper]
    return out
