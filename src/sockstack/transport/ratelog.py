"""Rate-limited logging: every bad input is logged, but a flood of them cannot fill the disk.

The standard library's way: a :class:`logging.Filter`, :class:`RateLimitFilter`, on the
``sockstack.transport`` logger (where servers log bad input: malformed frames and datagrams,
refused connections, peers that do not read). It lets ``burst`` records through per
``interval`` seconds; beyond that it counts them, and the next record written says how many
were left out (``... (and 182 similar messages suppressed)``). The figures come from what
operators of NATS and nginx do with per-client error logs (a summary instead of one line per
packet).

Each server, and each UDP endpoint of a server, has its own window: they log through a
:class:`RateLimitedLog` (a :class:`logging.LoggerAdapter`) that tags each record with a key
(``record.sockstack_rate_key``), and the filter keeps one window per key, at most ``max_keys``
of them (the oldest forgotten first); records without a key share one window. Its memory is
bounded by ``max_keys``, and each message written by ``max_length`` characters.

A default filter (20 per 10 s) is put on ``sockstack.transport`` once, when this module is
imported (that is, with ``import sockstack``), and on any other logger once, when the first
:class:`RateLimitedLog` for it is made; only if no :class:`RateLimitFilter` is on that logger
already, and never again: what you do with the logger's filters afterwards stays done. To
choose other figures, configure one through :mod:`logging.config` (it replaces the default:
a :class:`RateLimitedLog` takes the default off as soon as it finds a filter of yours next to
it)::

    logging.config.dictConfig({
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"floods": {"()": "sockstack.transport.ratelog.RateLimitFilter",
                               "burst": 100, "interval": 60}},
        "loggers": {"sockstack.transport": {"filters": ["floods"]}},
    })

or in code: ``logging.getLogger("sockstack.transport").addFilter(RateLimitFilter(burst=100,
interval=60))``. It may also be put on any other logger or on a handler (there it sees the
records of every logger whose records reach that handler).

To turn rate limiting off (every bad datagram and refused connection logged), remove the
filter, any time after ``import sockstack``::

    log = logging.getLogger("sockstack.transport")
    for f in [f for f in log.filters if isinstance(f, RateLimitFilter)]:
        log.removeFilter(f)

A record that carries a summary, or whose message was cut to ``max_length``, is rewritten in
place: ``record.msg`` becomes the final text and ``record.args`` None (the filter formats the
message once). A filter runs on the one record object that is then handed on, so every
handler after it sees the rewritten message: on a logger, all of the logger's handlers and
its ancestors'; on a handler, the handlers that come after it too. Records let through
unchanged (no summary due, not too long) are left as they are.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, MutableMapping
from typing import Any

__all__ = ["RATE_KEY", "RateLimitFilter", "RateLimitedLog"]

RATE_KEY = "sockstack_rate_key"
"""The record attribute that names a record's window (a server's, a UDP endpoint's)."""

_keys = itertools.count(1)


class _Window:
    __slots__ = ("count", "start", "suppressed")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0
        self.suppressed = 0


class RateLimitFilter(logging.Filter):
    """Let at most ``burst`` records through per ``interval`` seconds, per window (see the
    module's notes); the next record let through after some were suppressed says how many.

    ``max_keys`` bounds the windows kept (the least recently used goes first), ``max_length``
    the characters of a message written (longer ones are cut, saying so; 0: no bound);
    ``clock`` gives the time in seconds (monotonic)."""

    def __init__(
        self,
        burst: int = 20,
        interval: float = 10.0,
        *,
        max_keys: int = 1024,
        max_length: int = 4096,
        name: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name)
        if burst < 1 or interval <= 0 or max_keys < 1 or max_length < 0:
            raise ValueError(
                "RateLimitFilter needs burst >= 1, interval > 0, max_keys >= 1, max_length >= 0"
            )
        self.burst = burst
        self.interval = interval
        self.max_keys = max_keys
        self.max_length = max_length
        self.clock = clock
        self._windows: OrderedDict[Any, _Window] = OrderedDict()
        self._lock = threading.Lock()  # loggers call filters from any thread, unlocked

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            return self._filter(record)

    def _filter(self, record: logging.LogRecord) -> bool:
        key = getattr(record, RATE_KEY, None)
        now = self.clock()
        windows = self._windows
        w = windows.get(key)
        if w is None:
            w = windows[key] = _Window(now)
            if len(windows) > self.max_keys:
                windows.popitem(last=False)
        else:
            windows.move_to_end(key)
            if now - w.start >= self.interval:
                w.start = now
                w.count = 0
        if w.count >= self.burst:
            w.suppressed += 1
            return False
        w.count += 1
        summary = w.suppressed
        if not summary and not self.max_length:
            return True
        text = record.getMessage()
        if summary:
            text += f" (and {summary} similar messages suppressed)"
            w.suppressed = 0
        if self.max_length and len(text) > self.max_length:
            cut = len(text) - self.max_length
            text = f"{text[: self.max_length]}... ({cut} characters cut)"
        elif not summary:
            return True  # written as it is
        record.msg, record.args = text, None
        return True

    def suppressed(self, key: Any = None) -> int:
        """Records left out of ``key``'s window since the last one written."""
        w = self._windows.get(key)
        return 0 if w is None else w.suppressed


_DEFAULTED: set[str] = set()
"""Names of the loggers the default filter was considered for (it is, once per logger)."""
_DEFAULT_MARK = "_sockstack_default"


def _rate_filters(logger: logging.Logger) -> list[RateLimitFilter]:
    return [f for f in logger.filters if isinstance(f, RateLimitFilter)]


def _install_default(logger: logging.Logger) -> None:
    """Put the default filter on ``logger``, once per logger, if it has no
    :class:`RateLimitFilter` then (see the module's notes)."""
    if logger.name in _DEFAULTED:
        return
    _DEFAULTED.add(logger.name)
    if not _rate_filters(logger):
        default = RateLimitFilter()
        setattr(default, _DEFAULT_MARK, True)
        logger.addFilter(default)


def _rate_filter(logger: logging.Logger) -> RateLimitFilter | None:
    """The :class:`RateLimitFilter` on ``logger``, a configured one in preference to the
    default, which is then taken off; None when there is none (rate limiting turned off).
    Never adds one."""
    ours: RateLimitFilter | None = None
    theirs: RateLimitFilter | None = None
    for f in _rate_filters(logger):
        if getattr(f, _DEFAULT_MARK, False):
            ours = ours or f
        else:
            theirs = theirs or f
    if theirs is not None:
        if ours is not None:
            logger.removeFilter(ours)
        return theirs
    return ours


_install_default(logging.getLogger("sockstack.transport"))


class RateLimitedLog(logging.LoggerAdapter[logging.Logger]):
    """A logger for bad input with its own window in the logger's :class:`RateLimitFilter`
    (one per server and per UDP endpoint): ``bad_log.warning(msg, *args)``."""

    def __init__(self, logger: logging.Logger) -> None:
        self.key = next(_keys)
        super().__init__(logger, {RATE_KEY: self.key})
        _install_default(logger)

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        # Cheap (a logger has a filter or two); takes the default off next to a filter set up
        # by dictConfig since, and never puts one back.
        _rate_filter(self.logger)
        kwargs["extra"] = {**kwargs.get("extra", {}), RATE_KEY: self.key}
        return msg, kwargs

    @property
    def rate_filter(self) -> RateLimitFilter | None:
        """The filter that limits this log (the logger's :class:`RateLimitFilter`), or None
        when rate limiting is off (the filter removed)."""
        return _rate_filter(self.logger)

    @property
    def burst(self) -> int | None:
        """Records let through per interval; None when rate limiting is off."""
        f = self.rate_filter
        return None if f is None else f.burst

    @property
    def suppressed(self) -> int:
        """Messages of this log left out since the last one written."""
        f = self.rate_filter
        return 0 if f is None else f.suppressed(self.key)
