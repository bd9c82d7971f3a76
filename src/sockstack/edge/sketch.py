"""A small quantile sketch (DDSketch-style log buckets) for a window's percentiles.

A value ``x`` is counted in the bucket of index ``ceil(log(|x|) / log(gamma))`` with
``gamma = (1 + a) / (1 - a)`` and ``a = RELATIVE_ACCURACY`` (1%); its sign and the bucket index
make one int key, and zero has a key of its own. A bucket answers with ``2 * gamma**i / (gamma +
1)``, within ``a`` of every value it holds. So a quantile ``q`` of ``n`` values is within 1% (of
its own magnitude) of the exact value of rank ``floor(q * (n - 1))`` in sorted order, whatever the
distribution, for negative, zero and positive values alike (Masson, Rim and Lee, "DDSketch", VLDB
2019). The state is a ``dict[int, int]`` (key -> count), which msgpack writes as it is: a sketch of
readings between 15 and 30 has 36 buckets.

Bounded: at most ``MAX_BUCKETS`` keys. The guarantee holds while each sign's magnitudes span a
factor below ``gamma ** MAX_BUCKETS`` (about 8e8); past it, the smallest magnitudes are merged
into a larger bucket (their quantiles lose accuracy first, as DDSketch's collapsing store does).

Written here rather than taken from the ``ddsketch`` package: a window needs the buckets as one
plain dict it can charge byte by byte, persist with msgpack and test a key of before adding to it
(``ddsketch`` serialises with protobuf and grows its stores on its own).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = [
    "GAMMA",
    "MAX_BUCKETS",
    "RELATIVE_ACCURACY",
    "ZERO_KEY",
    "Sketch",
    "bucket_key",
    "collapse",
    "quantiles",
]

RELATIVE_ACCURACY = 0.01
GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
MAX_BUCKETS = 1024
_MULT = 1.0 / math.log(GAMMA)
_ESTIMATE = 2.0 / (GAMMA + 1.0)
ZERO_KEY = 1 << 40
"""The key of zero (bucket indexes of finite floats stay within +-40,000: no collision)."""

_log = math.log
_ceil = math.ceil


def bucket_key(x: float) -> int:
    """The key of a finite float: ``index * 2`` for a positive, ``index * 2 + 1`` for a
    negative, ``ZERO_KEY`` for zero."""
    if x > 0.0:
        return _ceil(_log(x) * _MULT) << 1
    if x < 0.0:
        return (_ceil(_log(-x) * _MULT) << 1) | 1
    return ZERO_KEY


def _value(key: int) -> float:
    """The value a bucket answers with."""
    if key == ZERO_KEY:
        return 0.0
    v = GAMMA ** (key >> 1) * _ESTIMATE
    return -v if key & 1 else v


def _order(key: int) -> tuple[int, int]:
    """Sort key of a bucket key by the values it holds: negatives (largest magnitude first),
    zero, positives (smallest first)."""
    if key == ZERO_KEY:
        return (1, 0)
    if key & 1:
        return (0, -(key >> 1))
    return (2, key >> 1)


def quantiles(buckets: dict[int, int], qs: Sequence[float], lo: float, hi: float) -> list[float]:
    """The quantiles ``qs`` (each in [0, 1]) of the values counted in ``buckets``; ``lo`` and
    ``hi`` are the exact minimum and maximum (answers are clamped to them, q=0 and q=1 are
    exact). NaN for an empty sketch."""
    count = sum(buckets.values())
    if count == 0:
        return [math.nan for _ in qs]
    keys = sorted(buckets, key=_order)
    out: list[float] = []
    for q in qs:
        if q <= 0.0:
            out.append(lo)
            continue
        if q >= 1.0:
            out.append(hi)
            continue
        rank = q * (count - 1)
        seen = 0
        value = hi
        for key in keys:
            seen += buckets[key]
            if seen > rank:
                value = _value(key)
                break
        out.append(min(max(value, lo), hi))
    return out


def collapse(buckets: dict[int, int], limit: int = MAX_BUCKETS) -> int:
    """Merge the smallest magnitudes of the sign with more buckets into one bucket until at most
    ``limit`` buckets remain (7/8 of it, so that collapsing is rare); the number of buckets
    removed."""
    if len(buckets) <= limit:
        return 0
    target = limit - limit // 8
    removed = 0
    while len(buckets) > target:
        pos = sorted(k for k in buckets if k != ZERO_KEY and not k & 1)
        neg = sorted(k for k in buckets if k != ZERO_KEY and k & 1)
        side = pos if len(pos) >= len(neg) else neg
        excess = min(len(buckets) - target, len(side) - 1)
        if excess <= 0:  # pragma: no cover - a sign always has more than half of >= 8 keys
            break
        into = side[excess]
        for key in side[:excess]:
            buckets[into] += buckets.pop(key)
        removed += excess
    return removed


class Sketch:
    """A standalone sketch (the windows keep the same ``dict`` in their own state)."""

    __slots__ = ("buckets", "count", "hi", "lo")

    def __init__(self, values: Iterable[float] = ()) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.lo = math.inf
        self.hi = -math.inf
        for v in values:
            self.add(v)

    def add(self, x: float) -> None:
        """Count ``x`` (a finite float: ValueError otherwise)."""
        x = float(x)
        if not math.isfinite(x):
            raise ValueError(f"not a finite number: {x!r}")
        key = bucket_key(x)
        self.buckets[key] = self.buckets.get(key, 0) + 1
        self.count += 1
        self.lo = min(self.lo, x)
        self.hi = max(self.hi, x)
        collapse(self.buckets)

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0 <= q <= 1), within RELATIVE_ACCURACY (see the module)."""
        return quantiles(self.buckets, [q], self.lo, self.hi)[0]
