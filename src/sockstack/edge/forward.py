"""Forwarding: the outbox's rows go upstream in order, in batches, one batch in flight, removed
only when the upstream answers that it holds them durably.

The upstream is a sink (``sockstack serve --sink``) or another relay (fog), reached by RPC:
``edge.forward(origin, rows, stats)`` -> ``{"through": id, "level": 2}`` (docs/PROTOCOL.md
§4.6). Rows carry their ids and checksums; the upstream skips ids it already has (a batch sent
again after a lost answer or a crash), so what reaches the sink is exactly once. While the
upstream is down the forwarder waits with jittered backoff (the outbox keeps everything); when it
is back, the backlog drains at once, oldest first, at most ``max_rate`` rows a second when one
is set (so that a long backlog leaves the uplink room for live traffic elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sockstack.edge.records import Row
from sockstack.edge.store import Outbox
from sockstack.errors import CallError, ErrorCode, RemoteError
from sockstack.protocol.calls import Backoff

__all__ = ["ForwardSettings", "Forwarder"]

log = logging.getLogger("sockstack.edge.forward")


@dataclass(frozen=True)
class ForwardSettings:
    """How a relay forwards (docs/EDGE.md, "Forwarding")."""

    batch_rows: int = 1000
    batch_bytes: int = 512 * 1024
    """A batch's rows and bytes at most (a batch is one RPC: under the frame limit, 1 MiB)."""
    max_rate: float | None = None
    """Rows a second at most while draining a backlog (None: as fast as the upstream takes)."""
    timeout: float = 15.0
    """Seconds an upstream has to store a batch."""
    backoff: Backoff = field(default_factory=lambda: Backoff(0.1, 2.0, 10.0))
    """Waits between attempts while the upstream is down (jittered)."""


class Forwarder:
    """Sends ``store``'s rows to ``upstream`` (URLs) until stopped."""

    def __init__(
        self,
        store: Outbox,
        upstream: Sequence[str],
        settings: ForwardSettings | None = None,
        *,
        secret: str | bytes | None = None,
        stats: Callable[[], dict[str, int]] = dict,
        acked: Callable[[int], None] = lambda through: None,
    ) -> None:
        self.store = store
        self.upstream = list(upstream)
        self.settings = settings or ForwardSettings()
        self.secret = secret
        self._stats = stats
        self._acked = acked
        self.through = 0
        """Rows up to this id are acknowledged upstream."""
        self.sent_rows = 0
        self.sent_batches = 0
        self.failures = 0
        self.connected = False
        self.last_error = ""
        self._new = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._rate: list[tuple[float, int]] = []  # (monotonic time, rows) of recent batches

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.store.on_commit(self._committed)
        self._task = loop.create_task(self._run(), name="sockstack-edge-forward")

    def _committed(self, batch: Any) -> None:
        if batch.last_id >= batch.first_id > 0:
            self._new.set()

    def rate(self) -> float:
        """Rows a second forwarded over the last ten seconds."""
        now = time.monotonic()
        recent = [(t, n) for t, n in self._rate if now - t <= 10.0]
        self._rate = recent
        return sum(n for _, n in recent) / 10.0

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        from sockstack.clients import AsyncClient

        s = self.settings
        client = AsyncClient(self.upstream, secret=self.secret, timeout=s.timeout)
        attempt = 0
        try:
            while True:
                try:
                    attempt = await self._once(client, attempt)
                except Exception as exc:  # a bug or a store error: logged, never the end
                    self.failures += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.exception("forwarding failed")
                    await asyncio.sleep(s.backoff.delay(attempt))
                    attempt += 1
        finally:
            await client.close()

    async def _once(self, client: Any, attempt: int) -> int:
        """One batch read and sent (or a wait for rows); returns the next attempt number."""
        s = self.settings
        rows, examined = await self.store.read(self.through, s.batch_rows, s.batch_bytes)
        if not rows and examined > self.through:  # only damaged rows (quarantined): past them
            self.through = examined
            self.store.forwarded(examined)
            return attempt
        if not rows:
            self._new.clear()
            rows, _ = await self.store.read(self.through, s.batch_rows, s.batch_bytes)
            if not rows:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._new.wait()
                return attempt
        started = time.monotonic()
        try:
            through = await self._send(client, rows)
        except (CallError, OSError) as exc:
            self.connected = isinstance(exc, RemoteError)  # (it answered: the link is up)
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, RemoteError) and exc.code == ErrorCode.BAD_RECORD:
                log.error("upstream refused a batch as damaged: %s", exc)
            else:
                log.info("upstream unavailable (%s): retrying", exc)
            await asyncio.sleep(s.backoff.delay(attempt))
            return attempt + 1
        self.connected = True
        self.last_error = ""
        done = [r for r in rows if r.id <= through]
        self.through = max(self.through, through, rows[-1].id)
        self.sent_rows += len(done)
        self.sent_batches += 1
        self._rate.append((time.monotonic(), len(done)))
        self.store.forwarded(self.through)
        self._acked(self.through)
        if s.max_rate and len(rows) >= s.batch_rows:  # a backlog: pace the drain
            wait = len(rows) / s.max_rate - (time.monotonic() - started)
            if wait > 0:
                await asyncio.sleep(wait)
        return 0

    async def _send(self, client: Any, rows: list[Row]) -> int:
        if client.channel is None:  # not connected yet (or never could be): try now
            await client.connect()
        result = await client.call(
            "edge.forward",
            self.store.origin,
            [list(r) for r in rows],
            self._stats(),
            timeout=self.settings.timeout,
        )
        if not isinstance(result, dict) or not isinstance(result.get("through"), int):
            raise RemoteError("BAD_RESULT", f"edge.forward answered {result!r}")
        return int(result["through"])
