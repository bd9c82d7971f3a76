"""The edge relay's pre-processing pipeline (sockstack.edge.pipeline): each stage, windows by
event time (closed by the watermark and by tick, lateness), percentiles within the sketch's
documented error, restore from the committed rows, bounds in bytes, async and user stages."""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sockstack.edge.pipeline import (
    MAX_REASONS,
    Dedupe,
    Filter,
    Map,
    Pipeline,
    SlidingWindow,
    TumblingWindow,
    Validate,
)
from sockstack.edge.records import Reading
from sockstack.edge.sketch import RELATIVE_ACCURACY, Sketch, quantiles

ROOT = Path(__file__).resolve().parents[2]


def R(stream: str, time: float, value: Any = 1.0, seq: int = 0) -> Reading:
    return Reading(stream, time, value, seq)


def pushed(p: Pipeline, *readings: Reading) -> list[Reading]:
    out: list[Reading] = []
    for r in readings:
        out += p.push(r, 0.0)
    return out


def dropped(p: Pipeline, index: int) -> dict[str, int]:
    stage: dict[str, int] = list(p.stats()["stages"].values())[index]["dropped"]
    return stage


# --- the simple stages ---------------------------------------------------------------------


def test_empty_pipeline_passes_readings_unchanged() -> None:
    p = Pipeline()
    r = R("a", 1.0, {"x": [1, 2]}, 7)
    assert p.push(r, 0.0) == [r] and p.tick(1e12) == []
    assert p.take_changes() == [] and p.state_bytes == 0
    assert p.stats()["in"] == p.stats()["out"] == 1


def test_filter_map_validate() -> None:
    def check(r: Reading) -> bool | str:
        if r.value == 3:
            return "three"
        if r.value == 4:
            raise KeyError("boom")
        return r.value != 5

    p = Pipeline(
        Filter(lambda r: r.value != 0),
        Map(lambda r: r.value + 1),  # a value: the reading with it
        Map(lambda r: R(r.stream.upper(), r.time, r.value, r.seq)),  # a Reading
        Validate(check),
    )
    out = pushed(p, *(R("a", float(i), i, i) for i in range(6)))
    assert out == [R("A", 1.0, 2, 1), R("A", 5.0, 6, 5)]
    stats = p.stats()
    assert stats["stages"]["0:filter"] == {"in": 6, "out": 5, "dropped": {"filtered": 1}}
    assert stats["stages"]["3:validate"]["dropped"] == {"three": 1, "KeyError": 1, "invalid": 1}
    assert (stats["in"], stats["out"], stats["dropped"]) == (6, 2, 4)
    json.dumps(stats)  # JSON-able


def test_drop_reasons_are_bounded() -> None:
    p = Pipeline(Validate(lambda r: f"reason {r.value} " + "x" * 500))
    pushed(p, *(R("a", 1.0, i) for i in range(1000)))
    reasons = dropped(p, 0)
    assert len(reasons) == MAX_REASONS and reasons["other"] == 1000 - (MAX_REASONS - 1)
    assert max(len(k) for k in reasons) <= 80 and sum(reasons.values()) == 1000


def test_user_stages_and_their_exceptions() -> None:
    def double(r: Reading) -> list[Reading]:
        return [r, R(r.stream, r.time, r.value)]

    def gen(r: Reading) -> Iterator[Reading]:
        yield R(r.stream, r.time, r.value * 10)

    def picky(r: Reading) -> Any:
        if r.value == 1:
            return None
        if r.value == 2:
            raise ZeroDivisionError
        if r.value == 3:
            return {"wrapped": 3}  # a value: the reading with it
        return r

    p = Pipeline(picky, double, gen)
    out = pushed(p, *(R("a", 0.0, v) for v in range(5)))
    assert [r.value for r in out] == [0, 0, 40, 40]
    assert dropped(p, 0) == {"dropped by picky": 1, "ZeroDivisionError": 1}
    assert dropped(p, 2) == {"TypeError": 2}  # {"wrapped": 3} * 10: counted, the pipeline went on
    stages = p.stats()["stages"]
    assert stages["1:double"] == {"in": 3, "out": 6, "dropped": {}}
    assert stages["2:gen"] == {"in": 6, "out": 4, "dropped": {"TypeError": 2}}


async def test_async_stage() -> None:
    async def enrich(r: Reading) -> Reading | None:
        if r.value < 0:
            return None
        return R(r.stream, r.time, {"v": r.value, "site": "s1"})

    p = Pipeline(Filter(lambda r: r.value != 99), enrich)
    assert p.is_async and not Pipeline(lambda r: r).is_async
    with pytest.raises(TypeError, match="apush"):
        p.push(R("a", 0.0, 1), 0.0)
    assert await p.apush(R("a", 0.0, 1), 0.0) == [R("a", 0.0, {"v": 1, "site": "s1"})]
    assert await p.apush(R("a", 0.0, -1), 0.0) == []
    assert dropped(p, 1) == {"dropped by enrich": 1}

    # an async stage after a window: tick() refuses, atick() runs it
    async def count(r: Reading) -> int:
        return int(r.value["count"])

    w = Pipeline(TumblingWindow(10.0, aggregates=("count",)), count)
    assert await w.apush(R("a", 1.0, 5.0), 0.0) == []
    with pytest.raises(TypeError, match="atick"):
        w.tick(100.0)
    assert await w.atick(100.0) == [R("a", 10.0, 1)]
    # before the window, tick() is fine
    b = Pipeline(enrich, TumblingWindow(10.0, field="v", aggregates=("count",)))
    await b.apush(R("a", 1.0, 5.0), 0.0)
    assert [r.value["count"] for r in b.tick(100.0)] == [1]


def test_sync_stage_returning_a_coroutine_in_push_is_dropped() -> None:
    async def later(r: Reading) -> Reading:
        return r

    p = Pipeline(lambda r: later(r))
    assert not p.is_async and p.push(R("a", 0.0), 0.0) == []
    assert dropped(p, 0) == {"awaitable in push (use apush)": 1}


def test_a_stage_object_belongs_to_one_pipeline() -> None:
    f = Filter(lambda r: True)
    Pipeline(f)
    with pytest.raises(ValueError, match="already in a pipeline"):
        Pipeline(f)


# --- dedupe --------------------------------------------------------------------------------


def test_dedupe_by_seq_and_by_content() -> None:
    p = Pipeline(Dedupe(horizon=10.0))
    out = pushed(
        p,
        R("a", 1.0, 5.0, seq=1),
        R("a", 1.0, 5.0, seq=1),  # a retransmission
        R("b", 1.0, 5.0, seq=1),  # another device
        R("a", 2.0, 6.0, seq=2),
        R("a", 3.0, {"t": 1}),  # no seq: by (stream, time, value)
        R("a", 3.0, {"t": 1}),
        R("a", 3.0, {"t": 2}),
    )
    assert [(r.stream, r.seq, r.value) for r in out] == [
        ("a", 1, 5.0),
        ("b", 1, 5.0),
        ("a", 2, 6.0),
        ("a", 0, {"t": 1}),
        ("a", 0, {"t": 2}),
    ]
    assert dropped(p, 0) == {"duplicate": 2}


def test_dedupe_horizon_and_max_keys() -> None:
    p = Pipeline(Dedupe(horizon=10.0, max_keys=1000))
    assert pushed(p, R("a", 0.0, seq=1), R("a", 5.0, seq=2), R("a", 9.0, seq=1)) != []
    assert dropped(p, 0) == {"duplicate": 1}
    # the same seq again more than horizon later: new data (a counter that wrapped)
    assert pushed(p, R("a", 100.0, seq=1)) == [R("a", 100.0, seq=1)]
    assert p.stats()["stages"]["0:dedupe"]["keys"] == 1  # the old keys were let go

    small = Pipeline(Dedupe(key=lambda r: r.value, max_keys=3))
    pushed(small, *(R("a", 0.0, v) for v in [1, 2, 3, 4, 1, 4]))
    assert dropped(small, 0) == {"duplicate": 1}  # 1 was let go for 4; 4 is still kept


def test_dedupe_bad_time_and_key_errors_are_counted() -> None:
    p = Pipeline(Dedupe(key=lambda r: r.value["id"]))
    pushed(p, R("a", math.nan, {"id": 1}), R("a", 1.0, {}), R("a", "x", {"id": 2}))  # type: ignore[arg-type]
    assert dropped(p, 0) == {"bad time": 2, "KeyError": 1}


# --- windows -------------------------------------------------------------------------------


def test_tumbling_window_closes_by_watermark() -> None:
    p = Pipeline(TumblingWindow(10.0, aggregates=("count", "sum", "mean", "min", "max")))
    out = pushed(p, R("a", 1.0, 1.0), R("b", 2.0, 10), R("a", 9.5, 3.0), R("b", 9.9, 20.0))
    assert out == []
    out = pushed(p, R("a", 10.0, 100.0))  # the watermark reaches 10: [0, 10) closes
    window = {"start": 0.0, "end": 10.0, "count": 2}
    assert out == [
        R("a", 10.0, {**window, "sum": 4.0, "mean": 2.0, "min": 1.0, "max": 3.0}),
        R("b", 10.0, {**window, "sum": 30.0, "mean": 15.0, "min": 10.0, "max": 20.0}),
    ]
    # b's late reading is counted, not aggregated
    assert pushed(p, R("b", 5.0, 1.0)) == []
    assert dropped(p, 0) == {"late": 1}


def test_lateness_keeps_a_window_open() -> None:
    p = Pipeline(TumblingWindow(10.0, aggregates=("count",), lateness=3.0))
    assert pushed(p, R("a", 5.0), R("a", 12.0), R("a", 9.0)) == []  # 9.0: 3 s late, allowed
    out = pushed(p, R("a", 13.0))  # watermark 13 = end + lateness
    assert [r.value for r in out] == [{"start": 0.0, "end": 10.0, "count": 2}]
    assert pushed(p, R("a", 9.9)) == [] and dropped(p, 0) == {"late": 1}


def test_tick_closes_the_windows_of_a_device_gone_quiet() -> None:
    p = Pipeline(
        TumblingWindow(10.0, aggregates=("count",), lateness=2.0),
        Map(lambda r: r.value["count"]),  # what a tick closes goes through the stages after
    )
    pushed(p, R("a", 1.0), R("a", 2.0), R("b", 11.0))  # watermark 11: [0, 10) stays open
    assert p.tick(11.9) == []  # wall clock before end + lateness
    assert p.tick(12.0) == [R("a", 10.0, 2)]
    assert p.tick(1000.0) == [R("b", 20.0, 1)]
    # the wall clock counts as a watermark: a reading for a window it closed is late
    assert pushed(p, R("b", 19.0)) == [] and dropped(p, 0) == {"late": 1}
    assert p.stats()["stages"]["0:window"]["out"] == 2


def test_window_value_field_key_and_not_a_number() -> None:
    p = Pipeline(
        TumblingWindow(
            10.0, key=lambda r: r.stream.split("/")[0], field="temp", aggregates=("max",)
        )
    )
    pushed(
        p,
        R("s1/d1", 1.0, {"temp": 20.5, "hum": 3}),
        R("s1/d2", 2.0, 22),  # a plain number is taken as it is
        R("s1/d2", 3.0, {"hum": 3}),  # no temp
        R("s1/d2", 3.0, "hot"),
        R("s1/d2", 3.0, {"temp": True}),
        R("s1/d2", 3.0, {"temp": math.inf}),
        R("s1/d2", 3.0, {"temp": 10**400}),
        R("s2/d1", 4.0, {"temp": -1.5}),
    )
    assert dropped(p, 0) == {"not a number": 5}
    assert [(r.stream, r.value["count"], r.value["max"]) for r in p.tick(100.0)] == [
        ("s1", 2, 22.0),
        ("s2", 1, -1.5),
    ]


def test_window_arguments_are_checked() -> None:
    for bad in (
        lambda: TumblingWindow(0),
        lambda: SlidingWindow(10, 20),
        lambda: SlidingWindow(10, 0.001),
        lambda: TumblingWindow(10, aggregates=("median",)),
        lambda: TumblingWindow(10, aggregates=("p101",)),
        lambda: TumblingWindow(10, lateness=-1),
        lambda: Dedupe(horizon=0),
    ):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError):
        TumblingWindow(1).tick(math.nan)


def brute_windows(
    readings: list[tuple[float, float]], size: float, slide: float
) -> dict[float, tuple[int, float, float, float]]:
    """(count, sum, min, max) per window start, computed the obvious way."""
    found: dict[float, list[float]] = {}
    for t, v in readings:
        for k in range(-1000, 1000):
            if k * slide <= t < k * slide + size:
                found.setdefault(k * slide, []).append(v)
    return {s: (len(vs), sum(vs), min(vs), max(vs)) for s, vs in found.items()}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 400).map(lambda i: i / 8), st.integers(-50, 50)),
        min_size=1,
        max_size=60,
    ),
    st.sampled_from([(4.0, 1.0), (4.0, 2.0), (3.0, 2.0), (2.5, 0.5), (5.0, 5.0)]),
)
def test_sliding_windows_overlap_like_the_definition(
    data: list[tuple[float, int]], shape: tuple[float, float]
) -> None:
    size, slide = shape
    data.sort()  # in order: no reading is late
    p = Pipeline(SlidingWindow(size, slide, aggregates=("count", "sum", "min", "max")))
    out = pushed(p, *(R("a", t, v) for t, v in data)) + p.tick(1e9)
    got = {r.value["start"]: tuple(r.value[a] for a in ("count", "sum", "min", "max")) for r in out}
    assert got == brute_windows([(t, float(v)) for t, v in data], size, slide)
    assert [r.value["start"] for r in out] == sorted(got)  # closed in order
    assert all(r.time == r.value["end"] == r.value["start"] + size for r in out)


def test_sliding_window_late_for_some_windows_only() -> None:
    p = Pipeline(SlidingWindow(4.0, 2.0, aggregates=("count",)))
    pushed(p, R("a", 1.0), R("a", 4.5))  # watermark 4.5: [0, 4) closed, [2, 6) open
    pushed(p, R("a", 3.0))  # goes to [2, 6) only: not counted as late
    pushed(p, R("a", 1.5))  # its windows [-2, 2) and [0, 4) are closed: late
    out = {r.value["start"]: r.value["count"] for r in p.tick(100.0)}
    assert out == {2.0: 2, 4.0: 1}
    assert dropped(p, 0) == {"late": 1}


# --- percentiles ---------------------------------------------------------------------------


def exact(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[math.floor(q * (len(s) - 1))]


magnitudes = st.one_of(st.floats(1e-6, 1e6, allow_nan=False), st.just(0.0), st.floats(-1e6, -1e-6))


@settings(max_examples=150, deadline=None)
@given(st.lists(magnitudes, min_size=1, max_size=200), st.sampled_from([0.5, 0.9, 0.95, 0.99]))
def test_sketch_quantiles_within_the_documented_error(values: list[float], q: float) -> None:
    sk = Sketch(values)
    want = exact(values, q)
    assert abs(sk.quantile(q) - want) <= RELATIVE_ACCURACY * abs(want) + 1e-12
    assert sk.quantile(0.0) == min(values) and sk.quantile(1.0) == max(values)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1000, 1000), min_size=1, max_size=100))
def test_window_percentiles_within_the_documented_error(values: list[float]) -> None:
    p = Pipeline(TumblingWindow(10.0, aggregates=("p50", "p90", "p95", "p99", "p99.9")))
    pushed(p, *(R("a", 1.0, v) for v in values))
    (out,) = p.tick(100.0)
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99), ("p99.9", 0.999)):
        want = exact(values, q)
        assert abs(out.value[name] - want) <= RELATIVE_ACCURACY * abs(want) + 1e-9


def test_sketch_stays_small_over_any_range() -> None:
    values = [10.0 ** (e / 10) for e in range(-3000, 3001)]  # 1e-300 .. 1e300
    sk = Sketch(values)
    assert len(sk.buckets) <= 1024
    # the smallest magnitudes were merged: the high quantiles keep their accuracy
    want = exact(values, 0.99)
    assert abs(sk.quantile(0.99) - want) <= RELATIVE_ACCURACY * want
    assert math.isnan(quantiles({}, [0.5], 0.0, 0.0)[0])


# --- state: take_changes and restore --------------------------------------------------------


def build_stateful(max_state_bytes: int = 64 << 20) -> Pipeline:
    def numeric(r: Reading) -> bool | str:
        return isinstance(r.value, int | float) or "not numeric"

    return Pipeline(
        Validate(numeric),
        Dedupe(horizon=2.0, max_keys=40),
        TumblingWindow(2.0, aggregates=("count", "sum", "p50", "p95"), lateness=1.0),
        Map(lambda r: r.value["count"] + r.value["p95"] / 1000),
        SlidingWindow(4.0, 1.0, key=lambda r: r.stream[0], aggregates=("count", "max")),
        max_state_bytes=max_state_bytes,
    )


push_events = st.tuples(
    st.just("push"),
    st.sampled_from(["a1", "a2", "b1", "c1"]),
    st.integers(-48, 80).map(lambda d: d / 32),  # time step, out of order at times
    st.one_of(st.integers(-100, 100).map(float), st.just("bad"), st.just(math.nan)),
    st.integers(0, 6),  # seq (0: none), repeats make duplicates
)
events = st.lists(
    st.integers(0, 4).flatmap(  # one tick in five events
        lambda i: (
            st.tuples(st.just("tick"), st.integers(0, 12).map(lambda d: d / 2))
            if i == 0
            else push_events
        )
    ),
    min_size=20,  # long enough for keys to expire, windows to close, state to fill
    max_size=150,
)


def run_events(
    p: Pipeline, evs: list[Any], clock: list[float], db: dict[Any, bytes] | None
) -> list[Reading]:
    out: list[Reading] = []
    for ev in evs:
        if ev[0] == "push":
            _, stream, dt, value, seq = ev
            clock[0] += dt
            out += p.push(R(stream, clock[0], value, seq), 0.0)
        else:
            clock[1] = max(clock[1], clock[0]) + ev[1]
            out += p.tick(clock[1])
        if db is not None:  # a group commit after each event
            for sid, key, state in p.take_changes():
                if state is None:
                    db.pop((sid, key), None)
                else:
                    db[sid, key] = state
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events, st.data(), st.sampled_from([64 << 20, 6000, 2500, 1500]))
def test_restore_from_committed_rows_continues_as_if_uninterrupted(
    evs: list[Any], data: st.DataObject, budget: int
) -> None:
    split = data.draw(st.integers(0, len(evs)))
    whole = build_stateful(budget)
    whole_db: dict[Any, bytes] = {}
    want = run_events(whole, evs, [100.0, 100.0], whole_db)

    first = build_stateful(budget)
    db: dict[Any, bytes] = {}
    clock = [100.0, 100.0]
    got = run_events(first, evs[:split], clock, db)
    again = build_stateful(budget)  # the relay restarted: its pipeline from the committed rows
    again.restore([(sid, key, state) for (sid, key), state in db.items()])
    assert again.stats()["restore_skipped"] == 0
    got += run_events(again, evs[split:], clock, db)
    assert got == want
    assert db == whole_db  # the same state committed
    assert again.state_bytes == whole.state_bytes  # and charged

    # a pipeline that never gave its changes gives all its state at the first call: the same
    lazy = build_stateful(budget)
    assert run_events(lazy, evs, [100.0, 100.0], None) == want
    assert {(sid, k): s for sid, k, s in lazy.take_changes() if s is not None} == whole_db
    fresh = build_stateful(budget)
    fresh.restore([(sid, key, state) for (sid, key), state in db.items()])
    assert all(whole_db[sid, k] == s for sid, k, s in fresh.take_changes())  # meta rows only
    assert fresh.state_bytes == whole.state_bytes


def test_take_changes_is_incremental() -> None:
    p = build_stateful()
    first = p.take_changes()  # the first call: every row (meta rows of the stateful stages)
    assert {sid for sid, _, _ in first} == {"1:dedupe", "2:window", "4:window"}
    assert p.take_changes() == []
    pushed(p, *(R("a1", 100.0 + i / 10, 1.0, i + 1) for i in range(10)))
    rows = p.take_changes()
    # one dedupe chunk for 10 keys, one open window, the watermarks
    assert sorted((sid, state is None) for sid, _, state in rows) == [
        ("1:dedupe", False),
        ("1:dedupe", False),
        ("2:window", False),
        ("2:window", False),
    ]
    assert sum(len(k) + len(s or b"") for _, k, s in rows) < 400
    pushed(p, R("a1", 103.0, 1.0, 11))  # closes [100, 102): its row is deleted
    rows = p.take_changes()
    assert ("2:window", False) in {(sid, s is None) for sid, _, s in rows}
    assert any(sid == "2:window" and s is None for sid, _, s in rows)

    # dedupe keys go 64 to a row: a burst of 300 new keys rewrites a handful of rows
    d = Pipeline(Dedupe(max_keys=10_000))
    d.take_changes()
    pushed(d, *(R(f"dev{i % 30}", 1.0, 1.0, i + 1) for i in range(300)))
    rows = d.take_changes()
    assert len(rows) == 1 + 5 and all(s is not None for _, _, s in rows)


def test_restore_skips_what_it_cannot_use() -> None:
    p = build_stateful()
    p.restore(
        [
            ("9:gone", b"x", b"y"),  # no such stage
            ("1:dedupe", b"\x01", b"\xc1"),  # not msgpack
            ("2:window", b"\x92\xa1a\x01", b"\x91\x01"),  # wrong shape
        ]
    )
    assert p.stats()["restore_skipped"] == 3
    assert p.push(R("a", 1.0, 1.0), 0.0) == []
    with pytest.raises(RuntimeError):
        p.restore([])


def test_restore_ignores_windows_of_another_size() -> None:
    a = Pipeline(TumblingWindow(10.0))
    a.push(R("a", 1.0), 0.0)
    b = Pipeline(TumblingWindow(5.0))
    b.restore([(sid, k, s) for sid, k, s in a.take_changes() if s is not None])
    assert b.stats()["restore_skipped"] == 1 and b.tick(100.0) == []


# --- bounds --------------------------------------------------------------------------------


def test_state_full_is_counted_and_freed_as_windows_close() -> None:
    p = Pipeline(TumblingWindow(10.0, aggregates=("count", "p99")), max_state_bytes=20_000)
    pushed(p, *(R(f"dev{i}", 1.0) for i in range(100)))
    full = dropped(p, 0)["state full"]
    assert 50 < full < 100 and p.state_bytes <= 20_000
    assert len(p.tick(100.0)) == 100 - full and p.state_bytes < 1000
    pushed(p, *(R(f"dev{i}", 101.0) for i in range(10)))
    assert dropped(p, 0)["state full"] == full  # room again


def test_memory_is_bounded_with_many_keys() -> None:
    limit = 1 << 20
    p = Pipeline(
        Dedupe(horizon=1e9, max_keys=10**9),
        TumblingWindow(10.0, aggregates=("count", "mean", "p95")),
        max_state_bytes=limit,
    )
    p.take_changes()  # tracking, as a relay does
    readings = [R(f"device-{i}", 1.0, float(i % 97), 1) for i in range(40_000)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i, r in enumerate(readings):
            p.push(r, 0.0)
            if i % 1000 == 0:
                p.take_changes()
        p.take_changes()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    stats = p.stats()
    full = stats["stages"]["0:dedupe"]["dropped"]["state full"]
    assert full > 30_000 and p.state_bytes <= limit
    assert grown < limit * 1.2, grown  # what is charged covers what is held


# --- the example ---------------------------------------------------------------------------


def test_example_pipeline() -> None:
    spec = importlib.util.spec_from_file_location(
        "edge_pipeline", ROOT / "examples" / "edge_pipeline.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    p: Pipeline = mod.build()
    t0 = 1_700_000_000.0
    readings = [R("dev1", t0 + i, {"temp": 20.0 + i % 3, "hum": 40}, i + 1) for i in range(12)]
    readings += [R("dev1", t0 + 3, {"temp": 21.0}, 4)]  # a retransmission
    readings += [R("dev2", t0 + 1, 19.5), R("dev2", t0 + 2, "warm"), R("dev2", t0 + 3, 900.0)]
    out = pushed(p, *readings) + p.tick(t0 + 100)
    assert [(r.stream, r.time, r.value["count"]) for r in out] == [
        ("dev1", t0 + 10, 10),
        ("dev2", t0 + 10, 1),
        ("dev1", t0 + 20, 2),
    ]
    assert set(out[0].value) == {"start", "end", "count", "mean", "min", "max", "p95"}
    stages = p.stats()["stages"]
    assert stages["0:validate"]["dropped"] == {"not a number": 1, "out of range": 1}
    assert stages["1:dedupe"]["dropped"] == {"duplicate": 1}
