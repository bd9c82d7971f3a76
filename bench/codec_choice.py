#!/usr/bin/env python3
"""Why sockstack's codecs are msgpack-python plus msgspec's converter: a measurement.

Times, in one process, what a call costs the presentation layer (encode the arguments, decode
them, check them against the method's types) in three ways, for two calls:

- a 64-byte positional call ``put(key: str, n: int, x: float, blob: bytes)``;
- a call with a dataclass argument holding an aware ``datetime`` (``book(order: Order)``).

Ways: **msgpack + hand-written checks** (today's codec; ``isinstance`` per parameter, a
hand-written dict-to-dataclass with ``datetime.fromisoformat``), **msgpack + msgspec.convert**
(today's codec; the annotations checked and converted by msgspec: what sockstack does), and
**msgspec typed** (``msgspec.msgpack.Decoder(tuple[...])``: decoding and checking in one pass,
as if msgspec were the codec). JSON likewise with the stdlib ``json`` and ``msgspec.json``.

Then the server's side: ``Dispatcher.dispatch`` of an inline method without hints, with plain
hints (int/str...), and with a dataclass parameter, per call; and the same three methods
called live, sequentially, from the blocking client over TCP loopback (the server in a thread
of this process: client and server share the interpreter, so compare the rows, not the
absolute figures with ``make bench``'s).

    python bench/codec_choice.py [--count N]      # N calls per row (default 200,000; live: N/10)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from typing import Any

import msgpack
import msgspec

from sockstack.host.dispatch import Dispatcher, make_handler
from sockstack.protocol.codecs import JSON, MSGPACK, decode_as
from sockstack.protocol.events import Request


@dataclasses.dataclass
class Order:
    item: str
    qty: int
    when: dt.datetime


PLAIN_ARGS = ["k" * 22, 123456, 2.5, b"x" * 24]  # 64 bytes of msgpack
ORDER = Order("widget", 3, dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC))


def per_call(fn: Callable[[], Any], count: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(count):
            fn()
        best = min(best, (time.perf_counter() - t0) / count)
    return best * 1e9  # ns


def hand_plain(args: list[Any]) -> None:
    k, n, x, b = args
    if not (type(k) is str and type(n) is int and type(x) in (int, float) and type(b) is bytes):
        raise TypeError("bad arguments")


def hand_order(args: list[Any]) -> Order:
    (m,) = args
    if not isinstance(m, dict) or set(m) != {"item", "qty", "when"}:
        raise TypeError("order expects a map")
    if type(m["item"]) is not str or type(m["qty"]) is not int:
        raise TypeError("bad field")
    return Order(m["item"], m["qty"], dt.datetime.fromisoformat(m["when"]))


def rows(count: int) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    mp_plain = MSGPACK.encode(PLAIN_ARGS)
    assert len(mp_plain) == 64, len(mp_plain)
    ms_enc, ms_dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
    ms_typed = msgspec.msgpack.Decoder(tuple[str, int, float, bytes])
    ms_order = msgspec.msgpack.Decoder(tuple[Order])
    js_enc, js_order = msgspec.json.Encoder(), msgspec.json.Decoder(tuple[Order])
    js_typed_plain = msgspec.json.Decoder(tuple[str, int, float, bytes])
    plain_types = (str, int, float, bytes)

    def mp_hand() -> None:
        hand_plain(MSGPACK.decode(MSGPACK.encode(PLAIN_ARGS)))

    def mp_convert() -> None:
        args = MSGPACK.decode(MSGPACK.encode(PLAIN_ARGS))
        for a, t in zip(args, plain_types, strict=True):
            decode_as(a, t)

    def mp_raw() -> None:
        MSGPACK.decode(MSGPACK.encode(PLAIN_ARGS))

    def ms_untyped() -> None:
        ms_dec.decode(ms_enc.encode(PLAIN_ARGS))

    def ms_checked() -> None:
        ms_typed.decode(ms_enc.encode(PLAIN_ARGS))

    out += [
        ("64 B call, msgpack: encode+decode, no check", per_call(mp_raw, count)),
        ("64 B call, msgpack + hand-written isinstance checks", per_call(mp_hand, count)),
        ("64 B call, msgpack + msgspec.convert per parameter", per_call(mp_convert, count)),
        ("64 B call, msgspec msgpack: encode+decode, no check", per_call(ms_untyped, count)),
        ("64 B call, msgspec msgpack typed decoder", per_call(ms_checked, count)),
    ]

    def mp_order_hand() -> None:
        hand_order(MSGPACK.decode(MSGPACK.encode([ORDER])))

    def mp_order_convert() -> None:
        decode_as(MSGPACK.decode(MSGPACK.encode([ORDER]))[0], Order)

    def ms_order_typed() -> None:
        ms_order.decode(ms_enc.encode([ORDER]))

    def js_order_hand() -> None:
        hand_order(JSON.decode(JSON.encode([ORDER])))

    def js_order_convert() -> None:
        decode_as(JSON.decode(JSON.encode([ORDER]))[0], Order)

    def js_order_typed() -> None:
        js_order.decode(js_enc.encode([ORDER]))

    def js_plain_stdlib() -> None:
        args = JSON.decode(JSON.encode(PLAIN_ARGS))
        for a, t in zip(args, plain_types, strict=True):
            decode_as(a, t)

    def js_plain_typed() -> None:
        js_typed_plain.decode(js_enc.encode(PLAIN_ARGS))

    out += [
        ("dataclass+datetime, msgpack + hand-written conversion", per_call(mp_order_hand, count)),
        ("dataclass+datetime, msgpack + msgspec.convert", per_call(mp_order_convert, count)),
        ("dataclass+datetime, msgspec msgpack typed decoder", per_call(ms_order_typed, count)),
        ("dataclass+datetime, json + hand-written conversion", per_call(js_order_hand, count)),
        ("dataclass+datetime, json + msgspec.convert", per_call(js_order_convert, count)),
        ("dataclass+datetime, msgspec json typed decoder", per_call(js_order_typed, count)),
        ("64 B call, json + msgspec.convert per parameter", per_call(js_plain_stdlib, count)),
        ("64 B call, msgspec json typed decoder", per_call(js_plain_typed, count)),
    ]
    assert msgpack.unpackb(mp_plain) == PLAIN_ARGS
    assert json.loads(JSON.encode([1])) == [1]
    return out


def _untyped(key, n, x, blob):  # type: ignore[no-untyped-def]
    return n


def _plain(key: str, n: int, x: float, blob: bytes) -> int:
    return n


def _typed(order: Order) -> int:
    return order.qty


def dispatch_rows(count: int) -> list[tuple[str, float]]:
    d = Dispatcher(
        {
            "untyped": make_handler("untyped", _untyped, inline=True),
            "plain": make_handler("plain", _plain, inline=True),
            "typed": make_handler("typed", _typed, inline=True),
        }
    )
    plain_req = Request(1, "plain", MSGPACK.decode(MSGPACK.encode(PLAIN_ARGS)), {}, 1)
    untyped_req = Request(1, "untyped", plain_req.args, {}, 1)
    typed_req = Request(1, "typed", MSGPACK.decode(MSGPACK.encode([ORDER])), {}, 1)
    for req in (plain_req, untyped_req, typed_req):
        assert d.dispatch(req)[0] is True, d.dispatch(req)  # type: ignore[index]
    return [
        ("dispatch, inline method without hints", per_call(lambda: d.dispatch(untyped_req), count)),
        ("dispatch, inline method, plain hints", per_call(lambda: d.dispatch(plain_req), count)),
        ("dispatch, inline method, dataclass hint", per_call(lambda: d.dispatch(typed_req), count)),
    ]


class _Hints:
    """The live rows' service (built in the server process)."""

    @staticmethod
    def build() -> Any:
        from sockstack import Service, method

        class Hints(Service):
            @method(inline=True)
            def untyped(self, key, n, x, blob):  # type: ignore[no-untyped-def]
                return n

            @method(inline=True)
            def plain(self, key: str, n: int, x: float, blob: bytes) -> int:
                return n

            @method(inline=True)
            def typed(self, order: Order) -> int:
                return order.qty

        return Hints()


def _serve(port_q: mp.Queue, cpu: int) -> None:  # type: ignore[type-arg]
    import asyncio

    from sockstack import Server

    os.sched_setaffinity(0, {cpu})

    async def serve() -> None:
        async with Server(_Hints.build(), tcp=["127.0.0.1:0"]) as srv:
            port_q.put(str(srv.endpoint("tcp")))
            await srv.serve_forever()

    asyncio.run(serve())


def live_rows(count: int) -> list[tuple[str, float]]:
    """Sequential calls from the blocking client to a server process on the same CPU."""
    from sockstack import connect

    cpu = min(os.sched_getaffinity(0))
    port_q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    proc = mp.Process(target=_serve, args=(port_q, cpu), daemon=True)
    proc.start()
    out: list[tuple[str, float]] = []
    mine = os.sched_getaffinity(0)
    try:
        target = port_q.get(timeout=20)
        os.sched_setaffinity(0, {cpu})
        with connect(target, timeout=10) as c:
            for _ in range(count):  # warm up: the server process's first calls are slower
                c.call("untyped", *PLAIN_ARGS)
            for label, name, args in (
                ("live call, method without hints", "untyped", PLAIN_ARGS),
                ("live call, plain hints", "plain", PLAIN_ARGS),
                ("live call, dataclass hint", "typed", [ORDER]),
                ("live call, method without hints (again)", "untyped", PLAIN_ARGS),
            ):
                out.append((label, per_call(functools.partial(c.call, name, *args), count)))
    finally:
        os.sched_setaffinity(0, mine)
        proc.terminate()
        proc.join(10)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=200_000)
    count = min(p.parse_args().count, 10_000_000)
    print(f"msgpack {msgpack.version}, msgspec {msgspec.__version__}; best of 3 x {count:,}")
    for name, ns in rows(count) + dispatch_rows(count) + live_rows(max(count // 10, 1)):
        print(f"{ns:8.0f} ns  {name}")


if __name__ == "__main__":
    main()
