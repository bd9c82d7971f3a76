"""The dashboard (``/``, ``/dashboard/events``, ``/dashboard/static/...``) over real loopback
HTTP, and end to end in a real headless Chromium (Debian's, driven by Playwright): the page
loads, a client calls, the counter on the page rises; the screenshot is kept in
``test-artifacts/dashboard.png``."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import shutil
import socket
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from sockstack import AsyncClient, Server
from sockstack.demo import Demo
from sockstack.errors import ErrorCode
from sockstack.gateway import Gateway, dashboard
from sockstack.rpc.pattern import RPC
from tests.conftest import timeout
from tests.gateway.support import arequest, gateway

SECRET = "dash-s3cret"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _gateway(server: Server) -> Gateway:
    return next(p for p in server.patterns if isinstance(p, Gateway))


def _dash(server: Server, interval: float) -> dashboard.Dashboard:
    dash = dashboard.of(_gateway(server))
    dash.interval = interval
    return dash


def _sampler_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == dashboard.SAMPLER_TASK]


class EventStream:
    """A Server-Sent Events response read off a raw loopback socket (chunked, as uvicorn sends
    a body of unknown length)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self.buffer = b""
        self.ended = False

    @classmethod
    @asynccontextmanager
    async def open(cls, port: int, path: str) -> AsyncIterator[EventStream]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        stream = cls(reader, writer)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            async with asyncio.timeout(timeout(5)):
                head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            stream.status = int(lines[0].split()[1])
            for line in lines[1:]:
                if line:
                    k, _, v = line.partition(":")
                    stream.headers[k.strip().lower()] = v.strip()
            yield stream
        finally:
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()

    async def _chunk(self) -> bytes:
        size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
        data = await self.reader.readexactly(size + 2)
        return data[:-2]

    async def event(self) -> tuple[str | None, Any]:
        """The next event with data: (its name, its data as JSON); (None, None) at the end."""
        async with asyncio.timeout(timeout(5)):
            while True:
                while b"\n\n" not in self.buffer:
                    chunk = await self._chunk()
                    if not chunk:
                        self.ended = True
                        return None, None
                    self.buffer += chunk
                block, _, self.buffer = self.buffer.partition(b"\n\n")
                name, data = "message", None
                for line in block.decode().split("\n"):
                    field, _, value = line.partition(": ")
                    if field == "event":
                        name = value
                    elif field == "data":
                        data = json.loads(value)
                if data is not None:
                    return name, data

    async def sample(self, until: Any = None) -> dict[str, Any]:
        """The next sample (for which ``until(sample)`` holds, when given)."""
        async with asyncio.timeout(timeout(10)):
            while True:
                name, data = await self.event()
                assert name is not None, "the stream ended"
                if name == "sample" and (until is None or until(data)):
                    return dict(data)


# -------------------------------------------------------------------------- plain HTTP


async def test_page_and_its_files() -> None:
    async with gateway(Demo()) as (_server, port):
        page = await arequest(port, "GET", "/")
        assert page.status == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["cache-control"] == "no-store"
        assert "script-src 'self'" in page.headers["content-security-policy"]
        html = page.body.decode()
        urls = re.findall(r'(?:src|href)="([^"]*)"', html)
        assert urls, html
        assert "http:" not in html and "https:" not in html
        expected = {
            "uPlot.iife.min.js": "text/javascript; charset=utf-8",
            "uPlot.min.css": "text/css; charset=utf-8",
            "dashboard.js": "text/javascript; charset=utf-8",
            "dashboard.css": "text/css; charset=utf-8",
            "uPlot.LICENSE": "text/plain; charset=utf-8",
        }
        seen = set()
        for url in urls:
            if url.startswith("data:"):
                continue
            assert url.startswith("dashboard/static/"), url
            name, _, query = url[len("dashboard/static/") :].partition("?")
            assert re.fullmatch(r"v=[0-9a-f]{12}", query), url  # the content's version
            got = await arequest(port, "GET", "/" + url)
            assert got.status == 200, url
            assert got.headers["content-type"] == expected[name]
            assert got.headers["cache-control"] == "public, max-age=31536000, immutable"
            assert got.body
            seen.add(name)
            if name in ("dashboard.js", "dashboard.css"):  # ours: no URL elsewhere at all
                assert b"http:" not in got.body and b"https:" not in got.body
        assert seen == set(expected)
        vendored = (await arequest(port, "GET", "/dashboard/static/uPlot.iife.min.js")).body
        banner = vendored.split(b"\n", 1)[0]  # /*! https://github.com/leeoniya/uPlot (v...) */
        assert banner.startswith(b"/*!") and banner.endswith(b"*/")
        assert vendored.count(b"http") == banner.count(b"http")  # loads nothing: a comment
        licence = await arequest(port, "GET", "/dashboard/static/uPlot.LICENSE")
        assert b"MIT License" in licence.body
        head = await arequest(port, "HEAD", "/dashboard/static/dashboard.js")
        assert head.status == 200 and head.body == b""

        assert (await arequest(port, "POST", "/", b"")).problem["code"] == (
            ErrorCode.METHOD_NOT_ALLOWED
        )
        for path in (
            "/dashboard/static/nope.js",
            "/dashboard/static/../dashboard.py",
            "/dashboard/static/",
            "/dashboard/other",
            "//",
        ):
            answer = await arequest(port, "GET", path)
            assert answer.status == 404, path
            assert answer.problem["code"] == ErrorCode.NOT_FOUND
        moved = await arequest(port, "GET", "/dashboard?access_token=x")
        assert moved.status == 308 and moved.headers["location"] == "/?access_token=x"
        assert not _sampler_tasks()  # pages and files start no sampler


async def test_events_carry_connections_calls_latency_and_broker() -> None:
    async with gateway(Demo(), broker=True, tcp=["127.0.0.1:0"]) as (server, port):
        dash = _dash(server, 0.05)
        async with EventStream.open(port, "/dashboard/events") as events:
            assert events.status == 200
            assert events.headers["content-type"] == "text/event-stream"
            assert events.headers["cache-control"] == "no-store"
            name, hello = await events.event()
            assert name == "hello"
            assert hello == {"interval": 0.05, "metrics": True, "broker": True}
            first = await events.sample()
            assert first["connections"]["http"] >= 1  # this stream
            async with EventStream.open(port, "/dashboard/events") as second:
                assert (await second.event())[0] == "hello"
                assert (await second.event())[0] == "sample"  # the latest, at once
                assert len(_sampler_tasks()) == 1  # one sampler for every viewer
                assert len(dash.viewers) == 2
            assert first["metrics"] is True and first["broker"]["dropped"] == 0
            async with AsyncClient(str(server.endpoint("tcp")), timeout=timeout(5)) as client:
                for i in range(20):
                    assert await client.call("add", i, 1) == i + 1
                with pytest.raises(Exception, match="no_such"):
                    await client.call("no_such")
                busy = await events.sample(lambda s: s["calls"] >= first["calls"] + 21)
                assert busy["connections"]["tcp"] == 1
            assert busy["errors"] >= first["errors"] + 1
            assert busy["calls_per_s_by_transport"].keys() >= {"tcp"}
            assert busy["latency"]["calls"] >= 1  # (the window of the call that made it rise)
            assert 0 <= busy["latency"]["p50"] <= busy["latency"]["p99"]
            assert dash.seq >= busy["seq"] > first["seq"]
        await asyncio.wait_for(dash.idle.wait(), timeout(5))
        assert not _sampler_tasks()
        assert dash.viewers == set()


async def test_latency_percentiles_are_bucket_estimates() -> None:
    """p50/p90/p99 between two readings of cumulative buckets, interpolated inside the bucket
    each falls in, as Prometheus' histogram_quantile; beyond the last bound: only that bound."""
    inf = float("inf")
    before = [(0.001, 10.0), (0.01, 10.0), (0.1, 10.0), (inf, 10.0)]
    now = [(0.001, 60.0), (0.01, 100.0), (0.1, 109.0), (inf, 110.0)]
    got = dashboard._latency(now, before)
    assert got is not None
    assert got["calls"] == 100
    assert got["p50"] == pytest.approx(0.001)  # the 50th of 100: the top of the first bucket
    assert got["p50_bucket"] == [0.0, 0.001]
    assert got["p90"] == pytest.approx(0.001 + 0.009 * (90 - 50) / 40)
    assert got["p90_bucket"] == [0.001, 0.01]
    assert got["p99"] == pytest.approx(0.01 + 0.09 * (99 - 90) / 9)
    assert got["p99_bucket"] == [0.01, 0.1]
    assert dashboard._latency(now, now) is None  # no call in between
    assert dashboard.quantile(0.999, [(0.1, 1.0), (inf, 10.0)]) == (0.1, 0.1, None)


async def test_with_a_secret_the_token_is_passed_on() -> None:
    async with gateway(Demo(), secret=SECRET) as (server, port):
        _dash(server, 0.05)
        assert (await arequest(port, "GET", "/")).status == 401
        assert (await arequest(port, "GET", "/dashboard/events")).status == 401
        page = await arequest(port, "GET", f"/?access_token={SECRET}")
        assert page.status == 200
        urls = re.findall(r'(?:src|href)="(dashboard/[^"]*)"', page.body.decode())
        assert urls
        for url in urls:
            assert url.endswith(f"&amp;access_token={SECRET}"), url
            assert (await arequest(port, "GET", "/" + url.replace("&amp;", "&"))).status == 200
        odd = await arequest(
            port,
            "GET",
            "/?access_token=%22%3E%3Cscript%3E",
            headers={"authorization": f"Bearer {SECRET}"},
        )  # escaped, never markup
        assert b"<script>" not in odd.body and "%22%3E%3Cscript%3E" in odd.body.decode()
        async with EventStream.open(port, f"/dashboard/events?access_token={SECRET}") as events:
            assert events.status == 200
            assert (await events.event())[0] == "hello"
            assert (await events.sample())["metrics"] is True


async def test_metrics_off_is_said() -> None:
    server = Server(
        patterns=[RPC(Demo()), Gateway(["127.0.0.1:0"], metrics=False)], tcp=["127.0.0.1:0"]
    )
    async with server:
        port = server.endpoint("http").port
        _dash(server, 0.05)
        async with EventStream.open(port, "/dashboard/events") as events:
            name, hello = await events.event()
            assert (name, hello["metrics"], hello["broker"]) == ("hello", False, False)
            sample = await events.sample()
            assert sample["metrics"] is False
            assert "calls" not in sample and "latency" not in sample and "broker" not in sample


async def test_streams_are_bounded_in_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dashboard, "MAX_VIEWERS", 1)
    async with gateway(Demo()) as (server, port):
        _dash(server, 0.05)
        async with EventStream.open(port, "/dashboard/events") as events:
            assert (await events.event())[0] == "hello"
            more = await arequest(port, "GET", "/dashboard/events")
            assert more.status == 503
            assert more.problem["code"] == ErrorCode.OVERLOADED
            assert "retry-after" in more.headers


async def test_drain_ends_the_streams() -> None:
    server = Server(Demo(), http=["127.0.0.1:0"])
    await server.start()
    try:
        dash = _dash(server, 0.02)
        async with EventStream.open(server.endpoint("http").port, "/dashboard/events") as events:
            await events.sample()
            stopping = asyncio.create_task(server.shutdown())
            name, data = await events.event()
            while name == "sample":
                name, data = await events.event()
            assert (name, data) == ("end", {"reason": "the server is draining"})
            assert await events.event() == (None, None)  # the response ends
            await asyncio.wait_for(stopping, timeout(10))
        assert dash.idle.is_set()
        assert not _sampler_tasks()
    finally:
        await server.shutdown()


async def test_a_viewer_that_does_not_read_holds_bounded_memory() -> None:
    """Samples as fast as the loop turns, to a client that never reads (its receive buffer
    small): once the socket and the transport's buffer are full, its queue drops the oldest
    samples; the process's memory (tracemalloc) does not grow with what it missed. When the
    viewers leave, the sampler task is gone."""
    async with gateway(Demo(), broker=True) as (server, port):
        dash = _dash(server, 0)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        me = dash.join()  # an in-process viewer: a tick per sample
        tracemalloc.start()
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, b"GET /dashboard/events HTTP/1.1\r\nHost: x\r\n\r\n")

            async def other_dropped(at_least: int) -> dashboard.Viewer:
                async with asyncio.timeout(timeout(20)):
                    while True:
                        await me.wake.wait()
                        me.wake.clear()
                        me.take()
                        others = [v for v in dash.viewers if v is not me]
                        if others and others[0].dropped >= at_least:
                            return others[0]

            slow = await other_dropped(1)  # stuck: the socket and transport are full
            gc.collect()
            base = tracemalloc.get_traced_memory()[0]
            seq = dash.seq
            slow = await other_dropped(slow.dropped + 3000)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - base
            sample_bytes = len(dashboard._event(b"sample", dash.sample()))
            missed = (dash.seq - seq) * sample_bytes
            assert missed > 1_000_000  # what an unbounded queue would have held
            assert slow.size <= dashboard.VIEWER_BYTES
            assert grown < 300_000, (grown, missed)
        finally:
            tracemalloc.stop()
            sock.close()
            await dash.leave(me)
        await asyncio.wait_for(dash.idle.wait(), timeout(5))
        assert not dash.viewers
        assert not _sampler_tasks()


# -------------------------------------------------------------------------- in a browser


async def test_in_chromium_the_calls_counter_rises(tmp_path: Path) -> None:
    """The page in Debian's Chromium (headless, Playwright pointed at it): it connects, shows
    the calls made by a TCP client, draws its charts, loads nothing from elsewhere and logs no
    error (CSP included)."""
    chromium = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if chromium is None:
        pytest.skip(
            f"{CHROMIUM} is not installed (Debian's chromium package: `make test-deps` installs "
            "it where root and apt are available)"
        )
    from playwright.async_api import async_playwright

    async with gateway(Demo(), broker=True, tcp=["127.0.0.1:0"], secret=SECRET) as (
        server,
        port,
    ):
        dash = _dash(server, 0.1)
        origin = f"http://127.0.0.1:{port}/"
        requested: list[str] = []
        problems: list[str] = []
        wait_ms = timeout(10) * 1000
        async with async_playwright() as pw:
            context = await pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"),
                executable_path=chromium,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 800},
                timeout=wait_ms,
            )
            try:
                page = context.pages[0] if context.pages else await context.new_page()
                page.set_default_timeout(wait_ms)
                page.on("request", lambda r: requested.append(r.url))
                page.on(
                    "console",
                    lambda m: problems.append(m.text) if m.type in ("error", "warning") else None,
                )
                page.on("pageerror", lambda e: problems.append(str(e)))
                await page.goto(f"{origin}?access_token={SECRET}")
                await page.wait_for_selector('#status[data-state="connected"]')
                await page.wait_for_function(
                    "() => document.getElementById('calls-total').dataset.value !== ''"
                )
                before = int(await page.get_attribute("#calls-total", "data-value") or "")

                async with AsyncClient(
                    str(server.endpoint("tcp")), secret=SECRET, timeout=timeout(5)
                ) as client:

                    async def work() -> None:
                        while True:  # cancelled below
                            await client.call("add", 2, 3)
                            await client.call("sleep", 0.002)
                            with suppress(Exception):
                                await client.call("no_such_method")

                    for _ in range(10):
                        assert await client.call("add", 1, 1) == 2
                    worker = asyncio.create_task(work())
                    try:
                        await page.wait_for_function(
                            "n => Number(document.getElementById('calls-total').dataset.value) > n",
                            arg=before,
                        )
                        after = int(await page.get_attribute("#calls-total", "data-value") or "")
                        # a chart with some history, and latency measured
                        await page.wait_for_function(
                            "() => Number(document.getElementById('chart-rates').dataset.points)"
                            " >= 12 && document.getElementById('p99').textContent !== '–'"
                        )
                        tcp = page.locator('#connections td[data-transport="tcp"]')
                        assert int(await tcp.inner_text()) >= 1
                        ARTIFACTS.mkdir(exist_ok=True)
                        shot = ARTIFACTS / "dashboard.png"
                        await page.screenshot(path=str(shot))
                        print(f"screenshot: {shot}")
                    finally:
                        worker.cancel()
                        with suppress(asyncio.CancelledError):
                            await worker
            finally:
                await context.close()
        assert after > before
        assert requested and all(u.startswith(origin) for u in requested), requested
        assert any("/dashboard/events?access_token=" in u for u in requested)
        assert not problems, problems
        await asyncio.wait_for(dash.idle.wait(), timeout(5))
        assert not _sampler_tasks()
