"""Types and validation (issue 12 items 1-2) without sockets: what each Python type becomes in
msgpack and JSON (PROTOCOL.md §3.1, byte for byte), that ``decode_as`` gives the declared type
back and never runs code, the bounds of big integers, and the dispatcher's checks of arguments
against type hints (BAD_ARGUMENTS) and of results against the return annotation (BAD_RESULT)."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, NamedTuple, TypedDict

import msgpack
import pytest

from sockstack import CodecError, ErrorCode, Service, method
from sockstack.host.dispatch import Dispatcher, make_handler
from sockstack.protocol.codecs import EXT_BIGINT, JSON, MAX_BIGINT_BYTES, MSGPACK, decode_as
from sockstack.protocol.events import Request
from sockstack.rpc.pattern import RPC


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass
class Order:
    item: str
    qty: int
    when: datetime


class Point(NamedTuple):
    x: int
    y: int


class Movie(TypedDict):
    title: str
    year: int


PLUS_ONE = timezone(timedelta(hours=1))

# (value, declared type, msgpack bytes, JSON text): PROTOCOL.md §3.1's table, exactly.
REPRESENTATION: list[tuple[Any, Any, bytes, str]] = [
    (
        datetime(2026, 11, 30, 12, 30, tzinfo=PLUS_ONE),
        datetime,
        b"\xb92026-11-30T12:30:00+01:00",
        '"2026-11-30T12:30:00+01:00"',
    ),
    (
        datetime(2026, 11, 30, 12, 30, 0, 5, tzinfo=UTC),
        datetime,
        b"\xbb2026-11-30T12:30:00.000005Z",
        '"2026-11-30T12:30:00.000005Z"',
    ),
    (datetime(2026, 11, 30, 12, 30), datetime, b"\xb32026-11-30T12:30:00", '"2026-11-30T12:30:00"'),
    (date(2026, 11, 30), date, b"\xaa2026-11-30", '"2026-11-30"'),
    (time(8, 5, 1), time, b"\xa808:05:01", '"08:05:01"'),
    (time(8, 5, tzinfo=PLUS_ONE), time, b"\xae08:05:00+01:00", '"08:05:00+01:00"'),
    (timedelta(days=1, seconds=90), timedelta, b"\xa7P1DT90S", '"P1DT90S"'),
    (timedelta(microseconds=-1500), timedelta, b"\xaa-PT0.0015S", '"-PT0.0015S"'),
    (
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        uuid.UUID,
        b"\xd9\x24" + b"12345678-1234-5678-1234-567812345678",
        '"12345678-1234-5678-1234-567812345678"',
    ),
    (Decimal("12.50"), Decimal, b"\xa512.50", '"12.50"'),
    ({3}, set[int], b"\x91\x03", "[3]"),
    (frozenset({"a"}), frozenset[str], b"\x91\xa1a", '["a"]'),
    (b"\x00\xff", bytes, b"\xc4\x02\x00\xff", '"AP8="'),
    (Color.RED, Color, b"\xa3red", '"red"'),
    (Level.HIGH, Level, b"\x02", "2"),
    (
        Order("pen", 2, datetime(2026, 1, 1, tzinfo=UTC)),
        Order,
        b"\x83\xa4item\xa3pen\xa3qty\x02\xa4when\xb42026-01-01T00:00:00Z",
        '{"item":"pen","qty":2,"when":"2026-01-01T00:00:00Z"}',
    ),
    (Point(1, 2), Point, b"\x92\x01\x02", "[1,2]"),
    (
        Movie(title="Up", year=2009),
        Movie,
        b"\x82\xa5title\xa2Up\xa4year\xcd\x07\xd9",
        '{"title":"Up","year":2009}',
    ),
    (2**64, int, b"\xc7\x09\x01\x01" + bytes(8), "18446744073709551616"),
    (-(2**63) - 1, int, b"\xc7\x09\x01\xff\x7f" + b"\xff" * 7, "-9223372036854775809"),
    (2**64 - 1, int, b"\xcf" + b"\xff" * 8, "18446744073709551615"),  # msgpack's own uint64
]
IDS = [
    "aware-datetime",
    "utc-datetime",
    "naive-datetime",
    "date",
    "time",
    "aware-time",
    "timedelta",
    "negative-timedelta",
    "uuid",
    "decimal",
    "set",
    "frozenset",
    "bytes",
    "enum",
    "int-enum",
    "dataclass",
    "namedtuple",
    "typeddict",
    "int-2-64",
    "int-below-int64",
    "uint64",
]


@pytest.mark.parametrize(("value", "type_", "packed", "text"), REPRESENTATION, ids=IDS)
def test_each_type_has_the_documented_representation(
    value: Any, type_: Any, packed: bytes, text: str
) -> None:
    assert MSGPACK.encode(value) == packed
    assert JSON.encode(value) == text.encode()


@pytest.mark.parametrize(("value", "type_", "packed", "text"), REPRESENTATION, ids=IDS)
def test_each_type_comes_back_as_declared(value: Any, type_: Any, packed: bytes, text: str) -> None:
    for codec, data in ((MSGPACK, packed), (JSON, text.encode())):
        back = decode_as(codec.decode(data), type_)
        assert back == value and type(back) is type(value), codec.name
        if isinstance(value, datetime | time):
            assert back.utcoffset() == value.utcoffset()  # the offset survives, not just UTC


def test_without_a_declared_type_the_plain_value_comes() -> None:
    assert MSGPACK.decode(MSGPACK.encode([date(2026, 11, 30), {1}, Color.RED])) == [
        "2026-11-30",
        [1],
        "red",
    ]
    assert MSGPACK.decode(MSGPACK.encode(2**100)) == 2**100  # an int needs no declaration
    assert JSON.decode(JSON.encode(2**100)) == 2**100


def test_the_msgpack_timestamp_is_an_aware_utc_datetime() -> None:
    # type -1, 32-bit form: 2026-11-30T00:00:00Z, as other msgpack libraries send dates
    data = b"\xd6\xff" + (1795996800).to_bytes(4, "big")
    value = MSGPACK.decode(data)
    assert value == datetime(2026, 11, 30, tzinfo=UTC) and value.tzinfo is not None
    assert decode_as(value, datetime) is value


def test_plain_values_encode_exactly_as_before() -> None:
    """Today's wire is unchanged: plain values take msgpack's own path."""
    plain = [None, True, 1, -1, 2**63 - 1, -(2**63), 1.5, "s", b"b", [1], {"k": {1: 2}}]
    assert MSGPACK.encode(plain) == msgpack.packb(plain, use_bin_type=True)
    assert JSON.decode(JSON.encode([1, "x", None])) == [1, "x", None]


def test_big_integer_bounds() -> None:
    top = 2 ** (MAX_BIGINT_BYTES * 8 - 1) - 1
    for n in (top, -top - 1):
        packed = MSGPACK.encode(n)
        assert packed[:2] == b"\xc8\x02" and len(packed) == 4 + MAX_BIGINT_BYTES  # ext 16
        assert MSGPACK.decode(packed) == n
    for n in (top + 1, -top - 2):
        with pytest.raises(CodecError, match="outside the wire's range"):
            MSGPACK.encode(n)
    with pytest.raises(CodecError, match="1 to 512 are accepted"):
        MSGPACK.decode(msgpack.packb(msgpack.ExtType(EXT_BIGINT, b"\x01" * 513)))
    with pytest.raises(CodecError, match="1 to 512 are accepted"):
        MSGPACK.decode(msgpack.packb(msgpack.ExtType(EXT_BIGINT, b"")))
    # JSON: Python's own bound on integer text (4,300 digits) refuses longer numbers
    with pytest.raises(CodecError):
        JSON.decode(b"1" * 5000)


def test_a_hostile_payload_naming_a_class_is_only_data() -> None:
    """Nothing on the wire names a type to build: a map saying "__class__" or "os.system" is a
    map; converted to a declared dataclass it only fills its declared fields."""
    hostile = {"__class__": "os.system", "py/object": "subprocess.Popen", "args": ["rm"]}
    assert MSGPACK.decode(MSGPACK.encode(hostile)) == hostile
    assert JSON.decode(JSON.encode(hostile)) == hostile
    order = decode_as({**hostile, "item": "pen", "qty": 1, "when": "2026-01-01T00:00:00Z"}, Order)
    assert order == Order("pen", 1, datetime(2026, 1, 1, tzinfo=UTC))
    with pytest.raises(CodecError):
        MSGPACK.decode(msgpack.packb(msgpack.ExtType(2, b"os.system")))  # other ext types


def test_decode_as_refuses_with_what_was_expected_and_at_what_path() -> None:
    with pytest.raises(CodecError, match=r"Expected `int`, got `str` - at `\$.qty`"):
        decode_as({"item": "pen", "qty": "2", "when": "2026-01-01T00:00:00Z"}, Order)
    with pytest.raises(CodecError, match="Expected `int`, got `bool`"):
        decode_as(True, int)
    with pytest.raises(CodecError):
        decode_as("2026-13-01", date)
    with pytest.raises(CodecError):
        decode_as("purple", Color)
    assert decode_as({"1": "a"}, dict[int, str], str_keys=True) == {1: "a"}  # JSON map keys


# --------------------------------------------------------------------------- the dispatcher


class Typed(Service):
    @method(inline=True)
    def add(self, a: int, b: int) -> int:
        return a + b

    @method(inline=True)
    def days_until(self, day: date, start: date = date(2026, 11, 1)) -> int:
        return (day - start).days

    @method
    def book(self, order: Order, tags: set[str] | None = None) -> dict[str, Any]:
        assert isinstance(order, Order) and isinstance(order.when, datetime)
        return {"qty": order.qty, "tags": sorted(tags or ())}

    @method
    async def shift(self, when: datetime, by: timedelta) -> datetime:
        return when + by

    @method(inline=True)
    def scale(self, *values: float, factor: Decimal = Decimal(1)) -> list[Decimal]:
        return [Decimal(str(v)) * factor for v in values]

    @method(inline=True)
    def options(self, **flags: bool) -> list[str]:
        return sorted(k for k, v in flags.items() if v)

    @method(inline=True)
    def wrong(self, kind: str) -> int:
        return kind  # type: ignore[return-value]  # the server's bug, on purpose

    @method
    async def wrong_async(self) -> date:
        return 42  # type: ignore[return-value]

    @method(inline=True)
    def untyped(self, a, b):  # type: ignore[no-untyped-def]
        return [a, b]

    @method(inline=True)
    def opaque(self, thing: object, fn: Callable[[], int] | None = None) -> object:
        return thing

    @method(inline=True)
    def loose(self, items: list[Any], anything: Any = None) -> dict[str, Any]:
        return {"n": len(items), "anything": anything}


def run(outcome: Any) -> Any:
    if isinstance(outcome, Awaitable):
        return asyncio.run(_await(outcome))
    return outcome


async def _await(aw: Awaitable[Any]) -> Any:
    return await aw


@pytest.fixture
def dispatcher() -> Dispatcher:
    return Dispatcher(RPC(Typed()).methods())


def call(d: Dispatcher, name: str, *args: Any, codec: int = 1, **kwargs: Any) -> Any:
    return run(d.dispatch(Request(1, name, list(args), kwargs, codec)))


def test_arguments_are_converted_to_the_annotated_types(dispatcher: Dispatcher) -> None:
    assert call(dispatcher, "add", 2, 3) == (True, 5)
    assert call(dispatcher, "days_until", "2026-11-30") == (True, 29)
    assert call(dispatcher, "days_until", day="2026-11-30", start="2026-11-29") == (True, 1)
    order = {"item": "pen", "qty": 2, "when": "2026-11-30T12:00:00+01:00"}
    assert call(dispatcher, "book", order, ["b", "a", "b"]) == (
        True,
        {"qty": 2, "tags": ["a", "b"]},
    )
    assert call(dispatcher, "shift", "2026-11-30T23:00:00+01:00", "PT2H") == (
        True,
        datetime(2026, 12, 1, 1, 0, tzinfo=PLUS_ONE),
    )
    assert call(dispatcher, "scale", 1, 2.5, factor="0.1") == (
        True,
        [Decimal("0.1"), Decimal("0.25")],
    )
    assert call(dispatcher, "options", a=True, b=False) == (True, ["a"])
    assert call(dispatcher, "untyped", "x", b"y") == (True, ["x", b"y"])  # no hints: as before
    assert call(dispatcher, "opaque", {"any": 1}) == (True, {"any": 1})  # not carried: unchecked
    assert call(dispatcher, "loose", [1, "x"], b"?") == (True, {"n": 2, "anything": b"?"})
    ok, (code, _, text) = call(dispatcher, "loose", "not a list")  # Any inside: the rest checked
    assert (ok, code) == (False, ErrorCode.BAD_ARGUMENTS)
    assert text == "loose(): parameter 'items' expects list[Any], got str 'not a list'"


def test_json_map_keys_and_base64_bytes_are_converted() -> None:
    class S(Service):
        @method(inline=True)
        def counts(self, by_id: dict[int, str], blob: bytes) -> int:
            assert all(type(k) is int for k in by_id)
            return len(by_id) + len(blob)

    d = Dispatcher(RPC(S()).methods())
    assert call(d, "counts", {"1": "a", "2": "b"}, "AP8=", codec=2) == (True, 4)
    assert call(d, "counts", {1: "a"}, b"\x00", codec=1) == (True, 2)


@pytest.mark.parametrize(
    ("name", "args", "kwargs", "message"),
    [
        ("add", [2, "x"], {}, "add(): parameter 'b' expects int, got str 'x'"),
        ("add", [True, 1], {}, "add(): parameter 'a' expects int, got bool True"),
        ("add", [1.5, 1], {}, "add(): parameter 'a' expects int, got float 1.5"),
        (
            "days_until",
            ["2026-13-45"],
            {},
            "days_until(): parameter 'day' expects date, got str '2026-13-45' "
            "(Invalid RFC3339 encoded date)",
        ),
        (
            "days_until",
            [],
            {"day": "2026-11-30", "start": 5},
            "days_until(): parameter 'start' expects date, got int 5",
        ),
        (
            "book",
            [{"item": "pen", "qty": "2", "when": "2026-11-30T12:00:00Z"}],
            {},
            "book(): parameter 'order' expects Order, got dict of 3 "
            "(Expected `int`, got `str` - at `$.qty`)",
        ),
        (
            "book",
            [{"item": "pen", "qty": 1, "when": "2026-11-30T12:00:00Z"}, [1]],
            {},
            "book(): parameter 'tags' expects set[str] | None, got list of 1 "
            "(Expected `str`, got `int` - at `$[0]`)",
        ),
        ("scale", [1, "x"], {}, "scale(): parameter 'values' expects float, got str 'x'"),
        ("options", [], {"a": "yes"}, "options(): parameter 'flags' expects bool, got str 'yes'"),
        ("add", ["y" * 100, 1], {}, "add(): parameter 'a' expects int, got str '" + "y" * 36),
    ],
    ids=[
        "str-for-int",
        "bool-for-int",
        "float-for-int",
        "bad-date",
        "keyword",
        "dataclass-field",
        "set-item",
        "var-positional",
        "var-keyword",
        "long-value-cut",
    ],
)
def test_bad_arguments_name_the_parameter_the_type_and_what_came(
    dispatcher: Dispatcher, name: str, args: list[Any], kwargs: dict[str, Any], message: str
) -> None:
    ok, (code, type_name, text) = call(dispatcher, name, *args, **kwargs)
    assert (ok, code, type_name) == (False, ErrorCode.BAD_ARGUMENTS, "BAD_ARGUMENTS")
    assert text.startswith(message), text


def test_bad_arguments_do_not_run_the_method() -> None:
    ran: list[Any] = []

    class S(Service):
        @method
        def f(self, when: datetime) -> None:
            ran.append(when)

    d = Dispatcher(RPC(S()).methods())
    assert call(d, "f", "yesterday")[0] is False
    assert ran == []
    assert call(d, "f", "2026-11-30T00:00:00Z") == (True, None)
    assert ran == [datetime(2026, 11, 30, tzinfo=UTC)]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("wrong", "wrong(): its result expects int, got str 'k'"),
        ("wrong_async", "wrong_async(): its result expects date, got int 42"),
    ],
)
def test_a_result_against_its_annotation_is_the_servers_bug(
    dispatcher: Dispatcher, name: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    args = ["k"] if name == "wrong" else []
    with caplog.at_level(logging.ERROR, logger="sockstack.server"):
        ok, (code, type_name, text) = call(dispatcher, name, *args)
    assert (ok, code, type_name, text) == (False, ErrorCode.BAD_RESULT, "BAD_RESULT", message)
    assert any(message in r.getMessage() for r in caplog.records)  # logged on the server


def test_generator_methods_register_as_streams() -> None:
    """Generator methods stream their items (issue 12 item 6): registered, never inline, their
    return annotation (the iterator) not checked as a result."""

    class Gen(Service):
        @method(inline=True)
        def ticks(self, n: int) -> Iterator[int]:
            yield from range(n)

    class AsyncGen(Service):
        @method
        async def ticks(self, n: int) -> AsyncIterator[int]:
            yield n

    for service, kind in ((Gen(), 1), (AsyncGen(), 2)):
        handler = RPC(service).methods()["ticks"]
        assert (handler.streaming, handler.inline, handler.returns) == (kind, False, None)


def test_plain_hints_keep_the_inline_fast_path() -> None:
    """All-plain annotations are checked by one set lookup of the arguments' types; a method
    with a non-plain one, or none at all, is told apart when registered."""
    h = make_handler("add", Typed().add, inline=True)
    assert h.plain_signatures == frozenset({(int, int)})
    f = make_handler("scale", lambda x, y=1.0: x, inline=True)
    assert f.positional is None and f.plain_signatures is None  # no hints: counted only

    def mixed(a: float, b: str = "") -> None: ...

    m = make_handler("mixed", mixed, inline=True)
    assert m.plain_signatures == frozenset({(float,), (int,), (float, str), (int, str)})
    d = make_handler("days", Typed().days_until, inline=True)
    assert d.plain_signatures is None and d.positional is not None
