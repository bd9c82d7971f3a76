"""What devices send a relay, read without I/O: lines (JSON, or StatsD/Graphite-like raw lines)
and the counters kept per source.

- **JSON lines**: one object per line, ``{"stream": "site1/dev42", "seq": 17, "epoch": 3,
  "time": 1767225600.25, "value": 21.5}``; ``device`` is taken for ``stream``; ``time``
  (seconds since the epoch) defaults to the relay's clock; ``seq``/``epoch`` to 0 (not
  numbered); without ``value``, the object's other fields are the value.
- **Raw lines**: StatsD ``name:value|type[|@rate][|#tag:v,...]`` (type c, g, ms, h, s, d) or
  Graphite ``name value [time]``. The value is the number; with tags it is
  ``{"value": number, "tags": {...}}``.

A line is at most ``max_line`` bytes: a longer one is skipped to its end and counted, and the
part kept of an unfinished line never exceeds that bound (per connection). Empty lines are
ignored. Nothing here raises for bad input: :class:`BadInput` carries the reason counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgspec

from sockstack.edge.messages import MAX_STREAM
from sockstack.edge.records import Reading

__all__ = [
    "FRAME_PREFIX",
    "BadInput",
    "LineDecoder",
    "SourceStats",
    "parse_json_line",
    "parse_line",
    "parse_raw_line",
]

FRAME_PREFIX = b"SK\x01"
"""How a sockstack frame starts (magic, version 1): no text line starts so."""
DEFAULT_MAX_LINE = 64 * 1024
_MAX_REASONS = 32
_json = msgspec.json.Decoder().decode
_RESERVED = frozenset(("stream", "device", "seq", "epoch", "time", "value"))
_STATSD_TYPES = frozenset(("c", "g", "ms", "h", "s", "d"))


class BadInput(Exception):
    """A line or frame that is not a reading; the message is the reason counted."""


@dataclass
class SourceStats:
    """Counters of one source (a listener and format, the host's sessions, or a downstream
    relay): what came, what was bad and why, what was dropped and why. Reasons are bounded in
    number (the rest count under "other")."""

    received: int = 0
    bytes: int = 0
    accepted: int = 0
    duplicates: int = 0
    lost: int = 0
    """Readings never received: gaps in a stream's seq (within one epoch)."""
    bad: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)

    def count_bad(self, reason: str) -> None:
        _bump(self.bad, reason)

    def count_dropped(self, reason: str) -> None:
        _bump(self.dropped, reason)

    def as_dict(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "bytes": self.bytes,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "lost": self.lost,
            "bad": dict(self.bad),
            "dropped": dict(self.dropped),
        }


def _bump(counts: dict[str, int], reason: str) -> None:
    if reason not in counts and len(counts) >= _MAX_REASONS:
        reason = "other"
    counts[reason] = counts.get(reason, 0) + 1


class LineDecoder:
    """Splits a byte stream into lines, bounded: ``feed`` returns the complete lines; a line
    longer than ``max_line`` is dropped (``too_long`` counts it) without being buffered."""

    __slots__ = ("_buf", "_skipping", "max_line", "too_long")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = b""
        self._skipping = False
        self.too_long = 0

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished line kept (at most ``max_line``)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        if self._skipping:
            end = data.find(b"\n")
            if end < 0:
                return []
            self._skipping = False
            data = data[end + 1 :]
        if self._buf:
            data = self._buf + data
            self._buf = b""
        lines = data.split(b"\n")
        rest = lines.pop()
        if len(rest) > self.max_line:
            self.too_long += 1
            self._skipping = True
            rest = b""
        self._buf = rest
        if len(data) > self.max_line:  # (a shorter chunk cannot hold a line too long)
            kept = []
            for line in lines:
                if len(line) > self.max_line:
                    self.too_long += 1
                else:
                    kept.append(line)
            lines = kept
        return lines

    def end(self) -> list[bytes]:
        """The stream ended: its last line, if it had no newline."""
        rest, self._buf = self._buf, b""
        return [rest] if rest and not self._skipping else []


def _stream(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise BadInput("no stream")
    if len(name) > MAX_STREAM or len(name.encode()) > MAX_STREAM:
        raise BadInput("stream name too long")
    return name


def _number(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise BadInput(f"{what} is not a finite number")
    return float(x)


def _count(x: Any, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < 1 << 63:
        raise BadInput(f"{what} is not a non-negative integer")
    return x


def parse_json_line(line: bytes, now: float) -> tuple[Reading, int]:
    """A JSON line -> (reading, epoch). Raises :class:`BadInput`."""
    try:
        obj = _json(line)
    except msgspec.DecodeError:
        raise BadInput("not JSON") from None
    if not isinstance(obj, dict):
        raise BadInput("not a JSON object")
    stream = _stream(obj.get("stream", obj.get("device")))
    t = obj.get("time")
    time = now if t is None else _number(t, "time")
    seq = _count(obj.get("seq", 0), "seq")
    epoch = _count(obj.get("epoch", 0), "epoch")
    if epoch >= 1 << 32:
        raise BadInput("epoch is above 2**32 - 1")
    if "value" in obj:
        value = obj["value"]
    else:
        value = {k: v for k, v in obj.items() if k not in _RESERVED}
    return Reading(stream, time, value, seq), epoch


def parse_raw_line(line: bytes, now: float) -> Reading:
    """A StatsD or Graphite line -> reading. Raises :class:`BadInput`."""
    try:
        text = line.decode().strip()
    except UnicodeDecodeError:
        raise BadInput("not UTF-8") from None
    if ":" in text.split("|", 1)[0] and (" " not in text or "|" in text):
        name, _, rest = text.partition(":")
        fields = rest.split("|")
        value = _parse_float(fields[0])
        tags: dict[str, str] = {}
        if len(fields) > 1 and fields[1] not in _STATSD_TYPES:
            raise BadInput("unknown StatsD type")
        for extra in fields[2:]:
            if extra.startswith("#"):
                for tag in extra[1:].split(","):
                    k, _, v = tag.partition(":")
                    if k:
                        tags[k] = v
            elif not extra.startswith("@"):
                raise BadInput("unknown StatsD field")
        if len(tags) > 64:
            raise BadInput("too many tags")
        return Reading(_stream(name), now, {"value": value, "tags": tags} if tags else value)
    parts = text.split()
    if len(parts) not in (2, 3):
        raise BadInput("not a raw line (name:value|type or name value [time])")
    time = now if len(parts) == 2 else _parse_float(parts[2])
    return Reading(_stream(parts[0]), time, _parse_float(parts[1]))


def _parse_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise BadInput("value is not a number") from None
    if not math.isfinite(x):
        raise BadInput("value is not a finite number")
    return x


def parse_line(line: bytes, now: float) -> tuple[Reading, int, str]:
    """A line in either format (JSON when it starts with ``{``) -> (reading, epoch, format)."""
    stripped = line.lstrip()
    if stripped.startswith(b"{"):
        reading, epoch = parse_json_line(stripped, now)
        return reading, epoch, "json"
    return parse_raw_line(stripped, now), 0, "raw"
