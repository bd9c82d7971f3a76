"""The cloud sink's storage (edge/sink.py), each test against SQLite and a real PostgreSQL server
(tests/edge/pg.py starts one from Debian's packages; skipped, saying why, where it is absent)."""

from __future__ import annotations

import contextlib
import math
import secrets
import sqlite3
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from sockstack.edge.records import Reading, Row, row_crc, row_from_reading
from sockstack.edge.sink import (
    BadBatch,
    PostgresSink,
    SinkError,
    SinkStore,
    SQLiteSink,
    open_sink,
    value_json,
)
from tests.conftest import timeout
from tests.edge import pg


@pytest.fixture(scope="module")
def pg_server() -> Iterator[pg.PgServer]:
    pytest.importorskip("psycopg", reason="psycopg is not installed (the dev extra has it)")
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(pg.postgres(deadline=timeout(30)))
        except pg.Unavailable as exc:
            pytest.skip(str(exc))
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a test's sink lives: a new SQLite file, or a new schema in the test server."""
    if request.param == "sqlite":
        return str(tmp_path / "cloud.db")
    import psycopg

    server: pg.PgServer = request.getfixturevalue("pg_server")
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return server.url(options=f"-csearch_path={schema}")


@pytest.fixture
def sink(target: str) -> Iterator[SinkStore]:
    store = open_sink(target)
    yield store
    store.close()


def rows(ids: Any, stream: str = "site1/dev1", value: Any = None) -> list[Row]:
    return [
        row_from_reading(i, Reading(stream, 1.7e9 + i, {"n": i} if value is None else value, i))
        for i in ids
    ]


def ids_of(store: SinkStore, origin: str | None = None) -> list[int]:
    return [r[1] for r in store.readings(origin, limit=100_000)]


def test_accept_stores_and_dedupes(sink: SinkStore) -> None:
    assert sink.position("relay-a") == 0
    assert sink.accept("relay-a", rows(range(1, 11))) == 10
    assert sink.accept("relay-a", rows(range(1, 11))) == 10  # the same batch again
    assert sink.accept("relay-a", rows(range(6, 16))) == 15  # overlapping
    assert sink.accept("relay-a", rows(range(3, 5))) == 15  # old rows only
    assert ids_of(sink, "relay-a") == list(range(1, 16))
    assert sink.position("relay-a") == 15
    got = sink.readings("relay-a", limit=2)
    assert got == [
        ("relay-a", 1, "site1/dev1", 1, 1.7e9 + 1, {"n": 1}),
        ("relay-a", 2, "site1/dev1", 2, 1.7e9 + 2, {"n": 2}),
    ]
    # Another origin has its own ids and position.
    assert sink.accept("relay-b", rows(range(1, 4), stream="s2")) == 3
    assert sink.readings(stream="s2") == [r for r in sink.readings("relay-b")]
    o = sink.stats()["origins"]
    assert o["relay-a"]["rows"] == 15 and o["relay-a"]["duplicates"] == 10 + 5 + 2
    assert o["relay-a"]["batches"] == 2 and o["relay-a"]["gaps"] == 0
    assert o["relay-b"]["rows"] == 3
    totals = sink.stats()["totals"]
    assert totals["origins"] == 2 and totals["rows"] == 18 and totals["duplicates"] == 17


def test_bad_crc_refuses_the_whole_batch(sink: SinkStore) -> None:
    sink.accept("r", rows(range(1, 4)))
    batch = rows(range(4, 9))
    batch[2] = batch[2]._replace(body=batch[2].body + b"\x00")  # a byte more: crc no longer holds
    with pytest.raises(BadBatch, match="row 6: checksum"):
        sink.accept("r", batch)
    bad_crc = batch[4]._replace(crc=batch[4].crc ^ 1)
    with pytest.raises(BadBatch, match="checksum"):
        sink.accept("r", [*rows(range(4, 8)), bad_crc])
    assert sink.position("r") == 3
    assert ids_of(sink) == [1, 2, 3]
    stats = sink.stats()
    assert stats["totals"]["refused"] == 2 and stats["origins"]["r"]["rows"] == 3


def test_non_increasing_or_malformed_batches_refused(sink: SinkStore) -> None:
    with pytest.raises(BadBatch, match=r"rise within a batch \(2 after 2\)"):
        sink.accept("r", rows([1, 2, 2, 3]))
    with pytest.raises(BadBatch, match=r"\(1 after 3\)"):
        sink.accept("r", rows([3, 1]))
    r1 = rows([1])[0]
    malformed: list[Any] = [
        [("not", "a", "row")],
        [r1._replace(id=1 << 64)],  # beyond int64: the checksum cannot even be computed
        [r1._replace(stream="dev\udc80")],  # a lone surrogate: no UTF-8 for it
        [r1._replace(body="text")],
    ]
    with pytest.raises(BadBatch, match="sequence of rows, not NoneType"):
        sink.accept("r", None)  # type: ignore[arg-type]
    for batch in malformed:
        with pytest.raises(BadBatch, match="malformed"):
            sink.accept("r", batch)
    for origin in ("", "x" * 65, "a\0b", 42):
        with pytest.raises(BadBatch, match="origin"):
            sink.accept(origin, rows([1]))  # type: ignore[arg-type]
    assert sink.position("r") == 0 and sink.readings() == []
    assert sink.stats()["totals"]["origins"] == 0


def test_gaps_are_stored_and_counted(sink: SinkStore) -> None:
    assert sink.accept("r", rows(range(1, 6))) == 5
    assert sink.accept("r", rows(range(8, 11))) == 10  # 6 and 7 dropped at the relay
    assert sink.accept("r", rows([12, 15])) == 15  # 11, 13 and 14 quarantined there
    o = sink.stats()["origins"]["r"]
    assert (o["gaps"], o["missing"], o["rows"], o["position"]) == (3, 2 + 1 + 2, 10, 15)
    assert ids_of(sink) == [1, 2, 3, 4, 5, 8, 9, 10, 12, 15]
    # A resend across the gap: duplicates, no new gap.
    assert sink.accept("r", rows([9, 10, 12, 15, 16])) == 16
    o = sink.stats()["origins"]["r"]
    assert (o["gaps"], o["duplicates"], o["rows"]) == (3, 4, 11)


def test_concurrent_accepts_of_one_origin_store_each_id_once(target: str) -> None:
    """Eight threads over two stores (two connections or pools on one database) send the same
    batches in order: every id is stored once, the rest counted as duplicates."""
    stores = [open_sink(target), open_sink(target)]
    try:
        batches = [rows(range(b * 50 + 1, b * 50 + 51)) for b in range(12)]
        total = 12 * 50
        start = threading.Barrier(8, timeout=timeout(10))
        errors: list[BaseException] = []
        answers: list[list[int]] = [[] for _ in range(8)]

        def send(n: int) -> None:
            try:
                start.wait()
                for batch in batches:
                    answers[n].append(stores[n % 2].accept("shared", batch, {"in_msgs": n}))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout(30))
        assert not errors and not any(t.is_alive() for t in threads)
        for got in answers:  # each answer covers the batch sent, positions never go back
            assert all(a >= (b + 1) * 50 for b, a in enumerate(got)) and got == sorted(got)
        assert ids_of(stores[0]) == list(range(1, total + 1))
        o = stores[1].stats()["origins"]["shared"]
        assert (o["rows"], o["duplicates"], o["gaps"], o["position"]) == (
            total,
            7 * total,
            0,
            total,
        )
    finally:
        for s in stores:
            s.close()


def test_stats_reduction_ratios(sink: SinkStore) -> None:
    sink.accept("edge1", rows([1]), {"in_msgs": 500, "in_bytes": 40_000, "out_msgs": 100})
    sink.accept(
        "edge1",
        rows([2]),
        {"in_msgs": 1000, "in_bytes": 80_000, "out_msgs": 100, "out_bytes": 10_000},
    )  # the latest counters win
    sink.accept(
        "edge2",
        [],
        {"in_msgs": 300, "out_msgs": 100, "in_bytes": 20_000, "out_bytes": 10_000, "x": "?"},
    )  # stats alone; a counter that is not an integer is left out
    s = sink.stats()
    e1, e2 = s["origins"]["edge1"], s["origins"]["edge2"]
    assert e1["reduction"] == {"msgs": 10.0, "bytes": 8.0}
    assert e1["relay"]["in_msgs"] == 1000 and e1["position"] == 2
    assert e2["reduction"] == {"msgs": 3.0, "bytes": 2.0} and "x" not in e2["relay"]
    assert e2["position"] == 0 and e2["rows"] == 0
    t = s["totals"]
    assert (t["in_msgs"], t["out_msgs"], t["in_bytes"], t["out_bytes"]) == (
        1300,
        200,
        100_000,
        20_000,
    )
    assert t["reduction"] == {"msgs": 6.5, "bytes": 5.0}
    assert s["origins_listed"] == 2 and e1["last_seen"] > 1.7e9
    assert s["backend"] in ("sqlite", "postgresql")
    # Nothing reported: no ratio rather than a guess.
    sink.accept("edge3", rows([1]))
    assert sink.stats()["origins"]["edge3"]["reduction"] == {"msgs": None, "bytes": None}


def test_reopen_keeps_everything(target: str) -> None:
    first = open_sink(target)
    first.accept("r", rows(range(1, 101)), {"in_msgs": 400, "out_msgs": 100})
    first.accept("r", rows(range(90, 121)))
    before = first.stats()
    first.close()
    with pytest.raises(SinkError, match="closed"):
        first.accept("r", rows([121]))
    again = open_sink(target)  # a restarted sink: tables exist, created again idempotently
    try:
        assert again.position("r") == 120
        assert ids_of(again) == list(range(1, 121))
        after = again.stats()
        assert after["origins"]["r"] == before["origins"]["r"]
        assert after["totals"] == before["totals"]
        assert again.accept("r", rows(range(100, 131))) == 130  # resent across the restart
        assert again.stats()["origins"]["r"]["duplicates"] == 11 + 21
    finally:
        again.close()


def _row_with_body(i: int, body: bytes, stream: str = "dev") -> Row:
    return Row(i, stream, i, 1.7e9, body, row_crc(i, stream, i, 1.7e9, body))


def test_values_round_trip_as_json(sink: SinkStore, target: str) -> None:
    values: list[Any] = [
        21.5,
        -3,
        2**63 + 5,  # a msgpack uint64
        "héllo ☃",
        None,
        True,
        [1, "two", 3.0, [4]],
        {"t": 21.5, "h": 40, "tags": {"site": "s1", "ok": False}},
    ]
    batch = [row_from_reading(i + 1, Reading("dev", 1.7e9, v, i)) for i, v in enumerate(values)]
    sink.accept("r", batch)
    assert [r[5] for r in sink.readings("r")] == values
    # What JSON cannot say exactly: its nearest JSON form.
    more = [
        (msgpack.packb(b"\x00\xff"), "AP8="),  # bytes: base64
        (msgpack.packb(float("nan")), None),
        (msgpack.packb({1: "a", 2.5: "b"}), {"1": "a", "2.5": "b"}),
        (msgpack.packb(msgpack.ExtType(5, b"xy")), {"$ext": 5, "data": "eHk="}),
        (b"\xc1", {"$msgpack": "wQ=="}),  # not msgpack (0xc1 is never used): kept raw
    ]
    sink.accept("r", [_row_with_body(20 + i, b) for i, (b, _) in enumerate(more)])
    assert [r[5] for r in sink.readings("r")][len(values) :] == [want for _, want in more]
    assert sink.stats()["origins"]["r"]["undecodable"] == 1
    # NUL: SQLite keeps it; PostgreSQL's text cannot hold it (U+FFFD instead).
    nul = "a\0b"
    sink.accept("r", [row_from_reading(30, Reading("d\0v", 1.7e9, {"s": nul}, 0))])
    last = sink.readings("r")[-1]
    keep = isinstance(sink, SQLiteSink)
    assert last[2] == ("d\0v" if keep else "d\ufffdv")
    assert last[5] == {"s": nul if keep else "a\ufffdb"}
    # Queried where they are, as users would.
    sql = "SELECT id FROM readings WHERE stream = 'dev' AND {} = 's1' ORDER BY id"
    if isinstance(sink, SQLiteSink):
        with sqlite3.connect(target) as con:
            got = con.execute(sql.format("json_extract(value, '$.tags.site')")).fetchall()
    else:
        import psycopg

        with psycopg.connect(target) as conn:
            got = conn.execute(sql.format("value->'tags'->>'site'")).fetchall()
    assert got == [(8,)]


def test_value_json_never_raises() -> None:
    deep = b"\x91" * 5000 + b"\x00"  # arrays nested past the decoder's depth
    assert value_json(deep) == (
        b'{"$msgpack":"' + __import__("base64").b64encode(deep) + b'"}',
        False,
    )
    keyed = msgpack.packb({(1, 2): "x"}, use_bin_type=True)  # an array as a map key
    assert value_json(keyed) == (b'{"[1,2]":"x"}', True)
    assert value_json(msgpack.packb({"k\0": "\0"}), nul=False)[0] == '{"k\ufffd":"\ufffd"}'.encode()


def test_time_not_a_number(sink: SinkStore) -> None:
    """A device's NaN or infinite time is stored (SQLite keeps NaN as NULL, read back NaN)."""
    batch = [
        row_from_reading(1, Reading("d", math.nan, 1)),
        row_from_reading(2, Reading("d", math.inf, 2)),
    ]
    assert sink.accept("r", batch) == 2
    t1, t2 = (r[4] for r in sink.readings("r"))
    assert math.isnan(t1) and t2 == math.inf


def test_memory_per_batch_is_not_kept(sink: SinkStore) -> None:
    """The store keeps nothing in memory per row or per batch: what 40 more batches of 200 rows
    leave allocated is a few KiB (caches of the drivers), not the rows' ~1 MiB."""
    sink.accept("r", rows(range(1, 201)))
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for b in range(1, 41):
            sink.accept("r", rows(range(b * 200 + 1, b * 200 + 201), value={"x": "y" * 100}))
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert grown < 64 * 1024, grown
    assert sink.position("r") == 41 * 200


def test_open_sink_targets(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    s = open_sink(f"sqlite://{path}")  # sqlite:///abs/path
    assert isinstance(s, SQLiteSink) and s.path == str(path)
    s.close()
    s.close()  # twice: nothing more
    assert path.exists()
    with pytest.raises(ValueError, match="unknown sink mysql://"):
        open_sink("mysql://x/y")
    with pytest.raises(ValueError, match="file path"):
        open_sink("sqlite://")
    with pytest.raises(SinkError, match="cannot open the sink"):
        open_sink(str(tmp_path))  # a directory
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(SinkError, match="not a database"):
        open_sink(str(junk))


def test_postgres_refusals_name_the_server_not_the_password(pg_server: pg.PgServer) -> None:
    wrong = pg_server.url().replace(pg_server.password, "wrong-password")
    with pytest.raises(SinkError, match="cannot open the sink postgresql://postgres@127") as exc:
        PostgresSink(wrong, connect_timeout=timeout(5))
    assert "wrong-password" not in str(exc.value) and pg_server.password not in str(exc.value)
    s = open_sink(pg_server.url())
    try:
        stats = s.stats()
        assert stats["fsync"] is True and pg_server.password not in str(stats)
    finally:
        s.close()


def test_postgres_restart_loses_nothing(pg_server: pg.PgServer) -> None:
    """The server restarts under a sink: a broken connection is replaced and the batch tried
    once more at once (then the relay sends it again); the rows sent again are stored once."""
    import psycopg

    with psycopg.connect(pg_server.url(), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA restart")
    s = PostgresSink(pg_server.url(options="-csearch_path=restart"), max_connections=2)
    try:
        assert s.accept("r", rows(range(1, 101))) == 100
        pg_server.restart()
        failures = 0
        for _ in range(3):  # a relay's retries
            try:
                assert s.accept("r", rows(range(51, 151))) == 150
                break
            except SinkError as exc:
                failures += 1
                assert "connection" in str(exc).lower() or "terminat" in str(exc).lower()
        assert failures <= 1 and s.position("r") == 150
        assert ids_of(s, "r") == list(range(1, 151))
        assert s.stats()["origins"]["r"]["duplicates"] == 50
    finally:
        s.close()
