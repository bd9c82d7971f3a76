"""One loop timer that follows what a sans-I/O core asks for (``next_timer()``).

The cores say *when* they next need the clock; :class:`CoreTimer` keeps exactly one
``call_at`` handle at that time, re-armed only when the time changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["CoreTimer"]


class CoreTimer:
    __slots__ = ("_callback", "_handle", "_loop", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self.when: float | None = None
        """The time the callback is set for (loop clock), or None."""

    def set(self, when: float | None) -> None:
        """Run the callback at ``when`` (loop clock), or never for None."""
        if when == self.when:
            return
        if self._handle is not None:
            self._handle.cancel()
        self.when = when
        self._handle = None if when is None else self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self.when = None
        self._callback()

    def cancel(self) -> None:
        self.set(None)

    def close(self) -> None:
        """Cancel for good and let go of the callback: its owner (a connection) holds this
        timer, so keeping the bound method would keep a reference cycle alive after close."""
        self.set(None)
        self._callback = _nothing


def _nothing() -> None:
    pass
