"""An edge relay's pre-processing pipeline (issue 15, docs/EDGE.md "Pipeline"), sans-I/O.

A :class:`Pipeline` is a chain of stages: :class:`Filter`, :class:`Map`, :class:`Validate`,
:class:`Dedupe`, :class:`TumblingWindow` and :class:`SlidingWindow` (aggregates by event time),
and user stages: plain functions, sync or ``async``. The readings a stage gives feed the next one
in order; what a stage drops is counted with a reason, never raised: one bad reading never stops
the pipeline. Nothing here reads a clock or touches a socket: the relay passes the wall clock to
:meth:`Pipeline.push` and :meth:`Pipeline.tick`, so the same readings and ticks give the same
outputs.

State (dedupe keys, open windows and their watermarks) is bounded in bytes by
``max_state_bytes`` (past it, new keys and windows are refused, counted as "state full") and is
made crash-consistent by the relay: :meth:`Pipeline.take_changes` gives the rows changed since
the last call, which the relay commits in the transaction that commits the outputs and the input
position; :meth:`Pipeline.restore` rebuilds the state from the committed rows at start.
"""

from __future__ import annotations

import inspect
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import msgspec

from sockstack.edge import sketch as _sk
from sockstack.edge.records import Reading

__all__ = [
    "Dedupe",
    "Filter",
    "Map",
    "Pipeline",
    "SlidingWindow",
    "Stage",
    "TumblingWindow",
    "Validate",
]

MAX_REASONS = 64
"""Distinct drop reasons counted per stage; the rest are counted as "other"."""
MAX_REASON_LENGTH = 80
MAX_WINDOWS_PER_READING = 1000
"""A sliding window's size / slide (the windows one reading goes into) at most this."""

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode
_floor = math.floor
_bucket_key = _sk.bucket_key
_ceil = math.ceil
_log = math.log
_MULT = 1.0 / math.log(_sk.GAMMA)
_INF = math.inf

# Bytes charged to the state budget: deterministic functions of the state (so that a restored
# pipeline refuses exactly what the uninterrupted one would), sized from tracemalloc (the test
# measures them): a dedupe key, an open window (without its percentile buckets), one bucket.
COST_KEY = 180
COST_WINDOW = 420
COST_BUCKET = 90
COST_DELETED = 100  # a closed window waiting for take_changes
COST_CHUNK = 200  # a dedupe chunk of up to 64 keys


class _Budget:
    """The bytes of state a pipeline holds, shared by its stages."""

    __slots__ = ("limit", "live", "pending")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.live = 0  # what the state holds: "state full" is decided on this alone
        self.pending = 0  # deletions waiting for take_changes (bounded by the relay's commits)


class Stage:
    """A pipeline stage. ``apply`` gives the reading to pass on (the same or another), None
    (dropped: the stage counted why) or a list of readings; an exception it raises drops the
    reading with the exception's type name as the reason."""

    kind: ClassVar[str] = "stage"
    is_async: bool = False
    stateful: ClassVar[bool] = False
    ticks: ClassVar[bool] = False

    def __init__(self) -> None:
        self.id = ""
        self.dropped: dict[str, int] = {}
        self._extra = 0  # readings made beyond one per reading taken (fan-out)
        self._budget = _Budget(0)
        self._bound = False

    def _bind(self, index: int, budget: _Budget) -> None:
        if self._bound:
            raise ValueError(f"stage {self!r} is already in a pipeline: make a new one")
        self._bound = True
        self.id = f"{index}:{self.kind}"
        self._budget = budget

    def apply(self, r: Reading) -> Reading | list[Reading] | None:
        raise NotImplementedError

    async def aapply(self, r: Reading) -> Reading | list[Reading] | None:
        return self.apply(r)

    def _drop(self, reason: str) -> None:
        """Count a dropped reading under ``reason`` (at most MAX_REASONS distinct ones)."""
        d = self.dropped
        n = d.get(reason)
        if n is None:
            if len(reason) > MAX_REASON_LENGTH:
                reason = reason[:MAX_REASON_LENGTH]
            n = d.get(reason)
            if n is None:
                if len(d) >= MAX_REASONS - 1 and reason != "other":
                    reason = "other"
                n = d.get(reason, 0)
        d[reason] = n + 1

    def _out(self, n_in: int) -> int:
        """Readings given on, from the number taken (one each, less the dropped)."""
        return n_in - sum(self.dropped.values()) + self._extra

    # state: only the stateful stages override these
    def _rows(self, everything: bool) -> Iterator[tuple[bytes, bytes | None]]:
        return iter(())

    def _restore(self, rows: list[tuple[bytes, bytes]]) -> int:
        return len(rows)

    def _track(self) -> None:
        """Record changes from now on (and give the meta row at the next take_changes, so that
        the committed rows always hold it)."""

    def tick(self, now: float) -> list[Reading]:
        return []

    def _info(self) -> dict[str, Any]:
        return {}


class Filter(Stage):
    """Keep the readings ``pred`` is true for (the others: "filtered")."""

    kind = "filter"

    def __init__(self, pred: Callable[[Reading], Any]) -> None:
        super().__init__()
        self.pred = pred

    def apply(self, r: Reading) -> Reading | None:
        if self.pred(r):
            return r
        self._drop("filtered")
        return None


class Map(Stage):
    """``fn(r)`` gives a Reading, or a value: then ``r`` with that value (None included)."""

    kind = "map"

    def __init__(self, fn: Callable[[Reading], Any]) -> None:
        super().__init__()
        self.fn = fn

    def apply(self, r: Reading) -> Reading:
        v = self.fn(r)
        if isinstance(v, Reading):
            return v
        return Reading(r.stream, r.time, v, r.seq)


class Validate(Stage):
    """``check(r)`` returns True (keep), False (drop with ``reason``) or a str (drop with that
    str as the reason); an exception in it drops with the exception's type name."""

    kind = "validate"

    def __init__(self, check: Callable[[Reading], bool | str], reason: str = "invalid") -> None:
        super().__init__()
        self.check = check
        self.reason = reason

    def apply(self, r: Reading) -> Reading | None:
        ok = self.check(r)
        if ok is True:
            return r
        if isinstance(ok, str):
            self._drop(ok or self.reason)
            return None
        if ok:
            return r
        self._drop(self.reason)
        return None


class _Fn(Stage):
    """A user stage: ``fn(r)`` (or ``async def``) gives a Reading, None (dropped: "dropped by
    <name>"), a list, tuple or generator of Readings (each goes on), or a value (``r`` with it)."""

    kind = "fn"

    def __init__(self, fn: Callable[[Reading], Any]) -> None:
        super().__init__()
        self.fn = fn
        name = getattr(fn, "__name__", None) or type(fn).__name__
        self.name = re.sub(r"[^\w.<>-]", "_", name)[:40] or "fn"
        # an async function, or an object whose __call__ is one
        call = type(fn).__call__ if not inspect.isroutine(fn) else None
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)

    def _bind(self, index: int, budget: _Budget) -> None:
        super()._bind(index, budget)
        self.id = f"{index}:{self.name}"

    def apply(self, r: Reading) -> Reading | list[Reading] | None:
        res = self.fn(r)
        if res.__class__ is Reading:
            return res
        if inspect.isawaitable(res):
            if inspect.iscoroutine(res):
                res.close()  # never awaited: no "never awaited" warning
            self._drop("awaitable in push (use apush)")
            return None
        return self._given(r, res)

    async def aapply(self, r: Reading) -> Reading | list[Reading] | None:
        res = self.fn(r)
        if inspect.isawaitable(res):
            res = await res
        if res.__class__ is Reading:
            return res
        return self._given(r, res)

    def _given(self, r: Reading, res: Any) -> Reading | list[Reading] | None:
        if res is None:
            self._drop(f"dropped by {self.name}")
            return None
        if isinstance(res, Reading):
            return res
        if inspect.isgenerator(res):
            res = list(res)
        if isinstance(res, list | tuple) and all(isinstance(x, Reading) for x in res):
            if not res:
                self._drop(f"dropped by {self.name}")
                return None
            self._extra += len(res) - 1
            return list(res)
        return Reading(r.stream, r.time, res, r.seq)


class _Chunk:
    """Up to CHUNK keys of a Dedupe, in arrival order: one state row (a reading changes one
    row in 64, not one row each: the relay's commits stay light)."""

    __slots__ = ("cid", "keys")

    def __init__(self, cid: int) -> None:
        self.cid = cid
        self.keys: dict[bytes, float] = {}  # key -> event time


CHUNK = 64


class Dedupe(Stage):
    """Drop ("duplicate") a reading whose key was seen within ``horizon`` seconds of event
    time. The key: ``key(r)`` (anything msgpack encodes), by default ``(stream, seq)`` for a
    numbered reading, else ``(stream, time, value)``.

    Keys are kept in arrival order, and let go from the oldest when the newest event time seen
    (the stage's watermark) is more than ``horizon`` past theirs, or when there are more than
    ``max_keys``; past the pipeline's state budget, a new key is refused ("state full"). They
    are persisted in rows of up to 64 keys (row key: msgpack of the chunk's number)."""

    kind = "dedupe"
    stateful = True

    def __init__(
        self,
        key: Callable[[Reading], Any] | None = None,
        horizon: float = 60.0,
        max_keys: int = 100_000,
    ) -> None:
        super().__init__()
        if not (isinstance(horizon, int | float) and 0 < horizon < _INF):
            raise ValueError(f"horizon must be a positive number of seconds, not {horizon!r}")
        if not (isinstance(max_keys, int) and max_keys >= 1):
            raise ValueError(f"max_keys must be an int >= 1, not {max_keys!r}")
        self.key = key
        self.horizon = float(horizon)
        self.max_keys = max_keys
        # keys are let go in batches: when the watermark is horizon * 17/16 past the oldest,
        # those more than horizon behind it go (so a key is kept at least horizon)
        self._slack = self.horizon * (1 + 1 / 16)
        self._index: dict[bytes, _Chunk] = {}
        self._chunks: OrderedDict[int, _Chunk] = OrderedDict()  # oldest first
        self._tail = _Chunk(0)
        self._chunks[0] = self._tail
        self._next_cid = 1
        self._wm = -_INF
        self._front = _INF  # event time of the oldest key (by arrival)
        self._tracking = False
        self._dirty: set[int] = set()
        self._meta_dirty = False

    def apply(self, r: Reading) -> Reading | None:
        t = r.time
        if self.key is None:
            kb = _encode((r.stream, r.seq)) if r.seq else _encode((r.stream, t, r.value))
        else:
            kb = _encode(self.key(r))
        try:
            if not t - t == 0.0:
                raise ValueError
        except (TypeError, ValueError):
            self._drop("bad time")
            return None
        chunk = self._index.get(kb)
        if chunk is not None:
            if abs(t - chunk.keys[kb]) <= self.horizon:
                self._drop("duplicate")
                return None
            self._forget(kb, chunk)  # the same key long apart: new data (a seq that wrapped)
            self._find_front()
        budget = self._budget
        cost = COST_KEY + len(kb)
        if len(self._index) >= self.max_keys:
            self._forget_oldest()
        if budget.live + cost > budget.limit:
            self._expire(t if t > self._wm else self._wm)
            if budget.live + cost > budget.limit:
                self._drop("state full")
                return None
        budget.live += cost
        tail = self._tail
        if len(tail.keys) >= CHUNK:
            tail = self._new_tail()
        tail.keys[kb] = t
        self._index[kb] = tail
        if self._front == _INF:  # the only key
            self._front = t
        if self._tracking:
            self._dirty.add(tail.cid)
        if t > self._wm:
            self._wm = t
            self._meta_dirty = True
            if t - self._slack > self._front:
                self._expire(t)
        return r

    def _new_tail(self) -> _Chunk:
        """A new chunk for new keys (the old tail, full, is charged from now on)."""
        tail = self._tail = _Chunk(self._next_cid)
        self._chunks[tail.cid] = tail
        self._next_cid += 1
        self._budget.live += COST_CHUNK
        self._meta_dirty = True
        return tail

    def _forget(self, kb: bytes, chunk: _Chunk) -> None:
        del self._index[kb]
        del chunk.keys[kb]
        self._budget.live -= COST_KEY + len(kb)
        if not chunk.keys and chunk is not self._tail:
            del self._chunks[chunk.cid]
            self._budget.live -= COST_CHUNK
        if self._tracking:
            self._dirty.add(chunk.cid)

    def _forget_oldest(self) -> None:
        for chunk in self._chunks.values():
            if chunk.keys:
                self._forget(next(iter(chunk.keys)), chunk)
                break
        self._find_front()

    def _find_front(self) -> None:
        """``_front``: the event time of the oldest key (by arrival), +inf when none. It is
        kept exact, not a hint: when keys are let go depends on the state alone (a restored
        pipeline lets go of the same keys as the one that ran on)."""
        for chunk in self._chunks.values():  # the first chunk is empty only when it is the tail
            for t in chunk.keys.values():
                self._front = t
                return
        self._front = _INF

    def _expire(self, wm: float) -> None:
        """Let go of the oldest keys while their event time is more than horizon before
        ``wm``; ``_front`` becomes the event time of the oldest key left."""
        limit = wm - self.horizon
        chunks = self._chunks
        while True:
            chunk = next(iter(chunks.values()))
            old = []
            for kb, t in chunk.keys.items():
                if t >= limit:
                    self._front = t
                    break
                old.append(kb)
            else:
                t = _INF
            for kb in old:
                self._forget(kb, chunk)
            if t < _INF or chunk is self._tail:
                self._front = t
                return

    def _track(self) -> None:
        self._tracking = True
        self._meta_dirty = True

    def _rows(self, everything: bool) -> Iterator[tuple[bytes, bytes | None]]:
        if everything or self._meta_dirty:
            yield b"", _encode((self._wm, self._next_cid, self._tail.cid))
        self._meta_dirty = False
        chunks = self._chunks
        cids: Iterable[int] = list(chunks) if everything else sorted(self._dirty)
        for cid in cids:
            chunk = chunks.get(cid)
            if chunk is None or not chunk.keys:
                if not everything:
                    yield _encode(cid), None
            else:
                flat: list[Any] = []
                for kb, t in chunk.keys.items():
                    flat.append(kb)
                    flat.append(t)
                yield _encode(cid), _encode(flat)
        self._dirty = set()

    def _restore(self, rows: list[tuple[bytes, bytes]]) -> int:
        found: list[tuple[int, list[Any]]] = []
        bad = 0
        tail_cid = -1
        for rowkey, state in rows:
            try:
                if rowkey == b"":
                    wm, next_cid, tail = _decode(state)
                    wm, next_cid, tail = float(wm), int(next_cid), int(tail)
                    self._wm, self._next_cid, tail_cid = wm, next_cid, tail
                    continue
                cid, flat = _decode(rowkey), _decode(state)
                if not isinstance(cid, int) or not isinstance(flat, list) or len(flat) % 2:
                    raise ValueError
                found.append((cid, flat))
            except (msgspec.DecodeError, TypeError, ValueError):
                bad += 1
        found.sort(key=lambda f: f[0])
        self._chunks.clear()
        budget = self._budget
        for cid, flat in found:
            chunk = _Chunk(cid)
            for kb, t in zip(flat[::2], flat[1::2], strict=True):
                if isinstance(kb, bytes) and isinstance(t, int | float) and kb not in self._index:
                    chunk.keys[kb] = float(t)
                    self._index[kb] = chunk
                    budget.live += COST_KEY + len(kb)
                else:
                    bad += 1
            if chunk.keys:
                self._chunks[cid] = chunk
                self._next_cid = max(self._next_cid, cid + 1)
        # the tail (the chunk new keys go to) as it was, empty or not
        if tail_cid not in self._chunks:
            if tail_cid < 0 or (self._chunks and tail_cid < max(self._chunks)):
                tail_cid = self._next_cid  # no meta row: a new tail after the last chunk
            self._chunks[tail_cid] = _Chunk(tail_cid)
            self._next_cid = max(self._next_cid, tail_cid + 1)
        self._tail = self._chunks[tail_cid]
        budget.live += COST_CHUNK * (len(self._chunks) - 1)  # every chunk but the tail
        self._find_front()
        return bad

    def _info(self) -> dict[str, Any]:
        return {"keys": len(self._index)}


class _Acc:
    """One open window of one key: count, sum, min, max, and percentile buckets."""

    __slots__ = ("buckets", "count", "hi", "k", "key", "lo", "rowkey", "total")

    def __init__(self, key: str, k: int, with_buckets: bool) -> None:
        self.key = key
        self.k = k
        self.rowkey = _encode((key, k))
        self.count = 0
        self.total = 0.0
        self.lo = _INF
        self.hi = -_INF
        self.buckets: dict[int, int] | None = {} if with_buckets else None

    def state(self) -> bytes:
        return _encode((self.count, self.total, self.lo, self.hi, self.buckets))


_PERCENTILE = re.compile(r"p(\d{1,2}(?:\.\d+)?|100)")
_AGGREGATES = ("count", "sum", "mean", "min", "max")


class SlidingWindow(Stage):
    """Aggregates by event time (``reading.time``) over windows ``[k*slide, k*slide + size)``,
    grouped by ``key(r)`` (default: the reading's stream), of a number: the value itself, or
    ``value[field]`` for a map (a plain number is taken as it is). Aggregates: count, sum, mean,
    min, max and percentiles "pNN" / "pNN.N" (sketch.py: within 1%).

    A window gives ``Reading(key, end, {"start", "end", "count", <aggregates>...})`` when it
    closes: when the stage's watermark (the newest event time it has seen, over all keys) reaches
    ``end + lateness``, or when :meth:`tick` is given a wall clock ``now`` past it (a device that
    went quiet: the wall clock then counts as a watermark). A reading for a window already closed
    is "late" (counted); "not a number" when there is no number to aggregate."""

    kind = "window"
    stateful = True
    ticks = True

    def __init__(
        self,
        size: float,
        slide: float,
        key: Callable[[Reading], str] | None = None,
        field: str | None = None,
        aggregates: Iterable[str] = ("count", "mean", "min", "max"),
        lateness: float = 0.0,
    ) -> None:
        super().__init__()
        for name, v in (("size", size), ("slide", slide)):
            if not (isinstance(v, int | float) and 0 < v < _INF):
                raise ValueError(f"{name} must be a positive number of seconds, not {v!r}")
        if not (isinstance(lateness, int | float) and 0 <= lateness < _INF):
            raise ValueError(f"lateness must be >= 0 seconds, not {lateness!r}")
        if slide > size:
            raise ValueError(f"slide ({slide}) must not be more than size ({size})")
        if size / slide > MAX_WINDOWS_PER_READING:
            raise ValueError(f"size / slide must be at most {MAX_WINDOWS_PER_READING}")
        self.size = float(size)
        self.slide = float(slide)
        self.key = key
        self.field = field
        self.lateness = float(lateness)
        aggs = [aggregates] if isinstance(aggregates, str) else list(aggregates)
        self.aggregates: list[str] = []
        self._qs: list[tuple[str, float]] = []
        for a in aggs:
            m = _PERCENTILE.fullmatch(a)
            if m:
                self._qs.append((a, float(m.group(1)) / 100.0))
            elif a not in _AGGREGATES:
                raise ValueError(
                    f"unknown aggregate {a!r}: count, sum, mean, min, max or pNN (e.g. p95)"
                )
            if a not in self.aggregates:
                self.aggregates.append(a)
        self._tumbling = self.slide == self.size
        self._open: dict[int, dict[str, _Acc]] = {}  # window index -> key -> window
        self._wm = -_INF
        self._next_close = _INF  # end + lateness of the oldest open window
        self._closed = 0
        self._tracking = False
        self._dirty: dict[bytes, _Acc | None] = {}
        self._wm_dirty = False

    def _out(self, n_in: int) -> int:
        return self._closed

    def apply(self, r: Reading) -> list[Reading] | None:
        v = r.value
        if v.__class__ is dict and self.field is not None:
            v = v.get(self.field)
        tv = v.__class__
        if tv is float:
            x = v
        elif tv is int:
            try:
                x = float(v)
            except OverflowError:
                x = _INF
        else:
            self._drop("not a number")
            return None
        if not x - x == 0.0:
            self._drop("not a number")
            return None
        t = r.time
        try:
            if not t - t == 0.0:
                raise ValueError
        except (TypeError, ValueError):
            self._drop("bad time")
            return None
        if self.key is None:
            key = r.stream
        else:
            key = self.key(r)
            if key.__class__ is not str:
                key = str(key)
        out: list[Reading] | None = None
        if t > self._wm:
            self._wm = t
            self._wm_dirty = True
            if t >= self._next_close:
                out = self._close()
        slide = self.slide
        if self._tumbling:
            k = _floor(t / slide)
            start = k * slide
            if start > t:
                k -= 1
            elif start + slide <= t:
                k += 1
            keys = self._open.get(k)
            acc = None if keys is None else keys.get(key)
            if acc is None:  # a new window (or a closed one: late)
                self._add(k, key, x)
                return out
            # the fast path: a reading for an open window
            buckets = acc.buckets
            if buckets is not None:
                bk = _ceil(_log(x) * _MULT) << 1 if x > 0.0 else _bucket_key(x)
                c = buckets.get(bk)
                if c is not None:
                    buckets[bk] = c + 1
                else:  # a new bucket: charged
                    budget = self._budget
                    if budget.live + COST_BUCKET > budget.limit:
                        self._drop("state full")
                        return out
                    budget.live += COST_BUCKET
                    buckets[bk] = 1
                    if len(buckets) > _sk.MAX_BUCKETS:
                        budget.live -= COST_BUCKET * _sk.collapse(buckets)
            acc.count += 1
            acc.total += x
            if x < acc.lo:
                acc.lo = x
            if x > acc.hi:
                acc.hi = x
            if self._tracking:
                self._dirty[acc.rowkey] = acc
        else:
            added = False
            late = False
            size = self.size
            for k in range(_floor((t - size) / slide), _floor(t / slide) + 2):
                start = k * slide
                if start <= t < start + size:
                    a = self._add(k, key, x)
                    if a is None:
                        late = True
                    elif a:
                        added = True
                    else:
                        return out  # state full, counted
            if not added and late:
                self._drop("late")
        return out

    def _add(self, k: int, key: str, x: float) -> bool | None:
        """Add ``x`` to window ``k`` of ``key``: True; None when the window is closed (late:
        counted here for a tumbling window, by the caller for a sliding one); False when the
        state is full (counted)."""
        if k * self.slide + self.size + self.lateness <= self._wm:
            if self._tumbling:
                self._drop("late")
            return None
        keys = self._open.get(k)
        acc = None if keys is None else keys.get(key)
        budget = self._budget
        if acc is None:
            cost = COST_WINDOW + 2 * len(key)
            if self._qs:
                cost += COST_BUCKET
            if budget.live + cost > budget.limit:
                self._drop("state full")
                return False
            budget.live += cost
            acc = _Acc(key, k, bool(self._qs))
            if keys is None:
                keys = self._open[k] = {}
                end = k * self.slide + self.size + self.lateness
                if end < self._next_close:
                    self._next_close = end
            keys[key] = acc
        buckets = acc.buckets
        if buckets is not None:
            bk = _bucket_key(x)
            c = buckets.get(bk)
            if c is None:
                if acc.count and budget.live + COST_BUCKET > budget.limit:
                    self._drop("state full")
                    return False
                buckets[bk] = 1
                if acc.count:
                    budget.live += COST_BUCKET
                if len(buckets) > _sk.MAX_BUCKETS:
                    budget.live -= COST_BUCKET * _sk.collapse(buckets)
            else:
                buckets[bk] = c + 1
        acc.count += 1
        acc.total += x
        if x < acc.lo:
            acc.lo = x
        if x > acc.hi:
            acc.hi = x
        if self._tracking:
            self._dirty[acc.rowkey] = acc
        return True

    def _close(self) -> list[Reading]:
        """Close every window whose end + lateness the watermark has reached, oldest first,
        each window's keys in sorted order."""
        out: list[Reading] = []
        wm = self._wm
        off = self.size + self.lateness
        budget = self._budget
        for k in sorted(self._open):
            if k * self.slide + off > wm:
                self._next_close = k * self.slide + off
                break
            keys = self._open.pop(k)
            for key in sorted(keys):
                acc = keys[key]
                out.append(self._result(acc))
                freed = COST_WINDOW + 2 * len(key)
                if acc.buckets is not None:
                    freed += COST_BUCKET * len(acc.buckets)
                budget.live -= freed
                if self._tracking:
                    self._dirty[acc.rowkey] = None
                    budget.pending += COST_DELETED + len(acc.rowkey)
        else:
            self._next_close = _INF
        self._closed += len(out)
        return out

    def _result(self, acc: _Acc) -> Reading:
        start = acc.k * self.slide
        end = start + self.size
        value: dict[str, Any] = {"start": start, "end": end, "count": acc.count}
        for a in self.aggregates:
            if a == "sum":
                value[a] = acc.total
            elif a == "mean":
                value[a] = acc.total / acc.count
            elif a == "min":
                value[a] = acc.lo
            elif a == "max":
                value[a] = acc.hi
        if self._qs and acc.buckets is not None:
            qs = _sk.quantiles(acc.buckets, [q for _, q in self._qs], acc.lo, acc.hi)
            for (name, _), q in zip(self._qs, qs, strict=True):
                value[name] = q
        return Reading(acc.key, end, value)

    def tick(self, now: float) -> list[Reading]:
        """Close the windows whose end + lateness the wall clock ``now`` has passed."""
        if not (isinstance(now, int | float) and math.isfinite(now)):
            raise ValueError(f"now must be a finite number of seconds, not {now!r}")
        if now > self._wm:
            self._wm = float(now)
            self._wm_dirty = True
            if now >= self._next_close:
                return self._close()
        return []

    def _track(self) -> None:
        self._tracking = True
        self._wm_dirty = True

    def _meta(self) -> bytes:
        return _encode((self._wm, self.size, self.slide))

    def _rows(self, everything: bool) -> Iterator[tuple[bytes, bytes | None]]:
        if everything or self._wm_dirty:
            yield b"", self._meta()
        self._wm_dirty = False
        if everything:
            for k in sorted(self._open):
                for acc in self._open[k].values():
                    yield acc.rowkey, acc.state()
        else:
            for rowkey, dirty in self._dirty.items():
                yield rowkey, None if dirty is None else dirty.state()
        self._dirty = {}

    def _restore(self, rows: list[tuple[bytes, bytes]]) -> int:
        bad = 0
        windows: list[tuple[str, int, bytes]] = []
        same = True
        for rowkey, state in rows:
            try:
                if rowkey == b"":
                    wm, size, slide = _decode(state)
                    self._wm = float(wm)
                    same = (size, slide) == (self.size, self.slide)
                    continue
                key, k = _decode(rowkey)
                windows.append((str(key), int(k), state))
            except (msgspec.DecodeError, TypeError, ValueError):
                bad += 1
        if not same:
            return bad + len(windows)  # the windows' size or slide changed: not these windows
        budget = self._budget
        for key, k, state in windows:
            try:
                count, total, lo, hi, buckets = _decode(state)
                acc = _Acc(key, k, bool(self._qs))
                acc.count, acc.total = int(count), float(total)
                acc.lo, acc.hi = float(lo), float(hi)
                if acc.count < 1 or not acc.lo <= acc.hi:
                    raise ValueError
                if acc.buckets is not None and isinstance(buckets, dict):
                    acc.buckets = {int(b): int(c) for b, c in buckets.items()}
            except (msgspec.DecodeError, TypeError, ValueError):
                bad += 1
                continue
            self._open.setdefault(k, {})[key] = acc
            budget.live += COST_WINDOW + 2 * len(key)
            if acc.buckets is not None:
                budget.live += COST_BUCKET * max(1, len(acc.buckets))
        if self._open:
            first = min(self._open)
            self._next_close = first * self.slide + self.size + self.lateness
        return bad

    def _info(self) -> dict[str, Any]:
        return {
            "watermark": self._wm if self._wm > -_INF else None,
            "open_windows": sum(len(keys) for keys in self._open.values()),
        }


class TumblingWindow(SlidingWindow):
    """Windows ``[k*size, (k+1)*size)`` side by side: see :class:`SlidingWindow`."""

    def __init__(
        self,
        size: float,
        key: Callable[[Reading], str] | None = None,
        field: str | None = None,
        aggregates: Iterable[str] = ("count", "mean", "min", "max"),
        lateness: float = 0.0,
    ) -> None:
        super().__init__(size, size, key, field, aggregates, lateness)


class Pipeline:
    """A chain of stages (stage objects or plain functions, sync or ``async def``); an empty
    pipeline passes readings through unchanged. See the module's docstring."""

    def __init__(
        self, *stages: Stage | Callable[..., Any], max_state_bytes: int = 64 << 20
    ) -> None:
        if not (isinstance(max_state_bytes, int) and max_state_bytes > 0):
            raise ValueError(f"max_state_bytes must be a positive int, not {max_state_bytes!r}")
        self._budget = _Budget(max_state_bytes)
        built: list[Stage] = []
        for i, s in enumerate(stages):
            if not isinstance(s, Stage):
                if not callable(s):
                    raise TypeError(f"a stage is a Stage or a function, not {s!r}")
                s = _Fn(s)
            s._bind(i, self._budget)
            built.append(s)
        self._stages = tuple(built)
        self._n = len(built)
        self.is_async = any(s.is_async for s in built)
        # tick() runs what windows give through the stages after them: sync ones only
        first_window = next((i for i, s in enumerate(built) if s.ticks), self._n)
        self._tick_async = any(s.is_async for s in built[first_window:])
        self._ticking = tuple((i, s) for i, s in enumerate(built) if s.ticks)
        self._by_id = {s.id: s for s in built}
        self._n_in = 0
        self._n_out = 0
        self._tracking = False
        self._restore_skipped = 0

    @property
    def stages(self) -> tuple[Stage, ...]:
        return self._stages

    @property
    def state_bytes(self) -> int:
        """Bytes of state held now (bounded by max_state_bytes, plus the deletions that wait for
        take_changes)."""
        return self._budget.live + self._budget.pending

    @property
    def max_state_bytes(self) -> int:
        return self._budget.limit

    def push(self, reading: Reading, now: float) -> list[Reading]:
        """The readings that come out of the pipeline for ``reading`` (TypeError when a stage
        is async: use apush). ``now``, the wall clock, is not needed by the built-in stages:
        windows close by event time here and by the wall clock in tick()."""
        self._n_in += 1
        if not self._n:
            self._n_out += 1
            return [reading]
        if self.is_async:
            raise TypeError("this pipeline has an async stage: use apush")
        out: list[Reading] = []
        self._run(0, reading, out)
        self._n_out += len(out)
        return out

    def _run(self, i: int, r: Reading, out: list[Reading]) -> None:
        stages = self._stages
        n = self._n
        while i < n:
            st = stages[i]
            try:
                res = st.apply(r)
            except Exception as e:
                st._drop(type(e).__name__)
                return
            if res is None:
                return
            if res.__class__ is list:
                for x in res:
                    self._run(i + 1, x, out)
                return
            r = res  # type: ignore[assignment]
            i += 1
        out.append(r)

    async def apush(self, reading: Reading, now: float) -> list[Reading]:
        """push() for any stages, awaiting the async ones in order."""
        self._n_in += 1
        out: list[Reading] = []
        await self._arun(0, reading, out)
        self._n_out += len(out)
        return out

    async def _arun(self, i: int, r: Reading, out: list[Reading]) -> None:
        stages = self._stages
        n = self._n
        while i < n:
            st = stages[i]
            try:
                res = await st.aapply(r) if st.is_async else st.apply(r)
            except Exception as e:
                st._drop(type(e).__name__)
                return
            if res is None:
                return
            if isinstance(res, list):
                for x in res:
                    await self._arun(i + 1, x, out)
                return
            r = res
            i += 1
        out.append(r)

    def tick(self, now: float) -> list[Reading]:
        """Close the windows whose end + lateness the wall clock ``now`` (seconds) has passed,
        and run what they give through the stages after them (TypeError when one of those is
        async: use atick)."""
        if self._tick_async:
            raise TypeError("an async stage follows a window: use atick")
        out: list[Reading] = []
        for i, st in self._ticking:
            for x in st.tick(now):
                self._run(i + 1, x, out)
        self._n_out += len(out)
        return out

    async def atick(self, now: float) -> list[Reading]:
        """tick() for any stages."""
        out: list[Reading] = []
        for i, st in self._ticking:
            for x in st.tick(now):
                await self._arun(i + 1, x, out)
        self._n_out += len(out)
        return out

    def take_changes(self) -> list[tuple[str, bytes, bytes | None]]:
        """The state rows changed since the last call: (stage id, key, state, or None for a
        row to delete). The first call gives every row (changes are recorded from then on, or
        from restore())."""
        everything = not self._tracking
        if everything:
            self._tracking = True
            for st in self._stages:
                st._track()
        rows: list[tuple[str, bytes, bytes | None]] = []
        for st in self._stages:
            if st.stateful:
                sid = st.id
                rows.extend((sid, key, state) for key, state in st._rows(everything))
        self._budget.pending = 0
        return rows

    def restore(self, rows: Iterable[tuple[str, bytes, bytes]]) -> None:
        """Rebuild the state from the committed rows (call it at start, before push, on a new
        pipeline). Rows of a stage id this pipeline does not have, and rows that do not decode,
        are skipped and counted (stats()["restore_skipped"])."""
        if self._n_in or self._tracking:
            raise RuntimeError("restore() is for a new pipeline, before push and take_changes")
        per: dict[str, list[tuple[bytes, bytes]]] = {}
        skipped = 0
        for sid, key, state in rows:
            st = self._by_id.get(sid)
            if st is None or not st.stateful or state is None:
                skipped += 1
                continue
            per.setdefault(sid, []).append((bytes(key), bytes(state)))
        for sid, stage_rows in per.items():
            skipped += self._by_id[sid]._restore(stage_rows)
        self._restore_skipped = skipped
        self._tracking = True
        for st in self._stages:
            st._track()

    def stats(self) -> dict[str, Any]:
        """Per stage (by id): readings in and out, dropped by reason, and the stage's state;
        with the pipeline's totals. JSON-able."""
        stages: dict[str, Any] = {}
        n = self._n_in
        dropped = 0
        for st in self._stages:
            out = st._out(n)
            d = dict(st.dropped)
            dropped += sum(d.values())
            stages[st.id] = {"in": n, "out": out, "dropped": d, **st._info()}
            n = out
        return {
            "in": self._n_in,
            "out": self._n_out,
            "dropped": dropped,
            "state_bytes": self.state_bytes,
            "max_state_bytes": self._budget.limit,
            "restore_skipped": self._restore_skipped,
            "stages": stages,
        }
