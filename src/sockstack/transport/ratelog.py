"""Rate-limited logging: every bad input is logged once, but a flood of them cannot fill the disk.

Up to ``burst`` messages are written per ``interval`` seconds; beyond that they are counted, and
the next message written says how many were left out. The figures come from what operators of
NATS and nginx do with per-client error logs (a summary instead of one line per packet).
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    __slots__ = ("_count", "_suppressed", "_window_start", "burst", "interval", "logger")

    def __init__(self, logger: logging.Logger, burst: int = 20, interval: float = 10.0) -> None:
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self._window_start = -interval
        self._count = 0
        self._suppressed = 0

    @property
    def suppressed(self) -> int:
        """Messages left out since the last one written."""
        return self._suppressed

    def log(self, level: int, msg: str, *args: Any) -> bool:
        """Log unless the burst for this interval is used up; True when written."""
        now = time.monotonic()
        if now - self._window_start >= self.interval:
            self._window_start = now
            self._count = 0
        if self._count >= self.burst:
            self._suppressed += 1
            return False
        self._count += 1
        if self._suppressed:
            msg += " (and %d similar messages suppressed)"
            args = (*args, self._suppressed)
            self._suppressed = 0
        self.logger.log(level, msg, *args)
        return True

    def warning(self, msg: str, *args: Any) -> bool:
        return self.log(logging.WARNING, msg, *args)
