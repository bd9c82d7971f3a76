"""Which parameter of a method takes an uploaded item stream (PROTOCOL.md §4.4), and what is
refused when the service is registered; how the dispatcher refuses a mismatch without a host;
how rpc.describe marks the parameter. No sockets: the live behaviour is in
tests/integration/test_uploads.py and test_blocking_uploads.py."""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

import pytest

from sockstack import ErrorCode, Service, method
from sockstack.host.dispatch import Dispatcher
from sockstack.protocol import Request
from sockstack.rpc.describe import Description
from sockstack.rpc.service import collect_handlers, make_handler


def total(scale: int, items: Iterator[int]) -> int:
    return scale * sum(items)


def keyword(items: Iterator[str], *, sep: str = ",") -> str:
    return sep.join(items)


async def atotal(scale: int, items: AsyncIterator[int]) -> int:
    return scale


async def aiterable(*, items: AsyncIterator[bytes], n: int) -> int:
    return n


def test_the_item_stream_parameter_is_found_with_its_item_type() -> None:
    h = make_handler("total", total, inline=True)
    assert h.upload is not None and h.upload.name == "items" and h.upload.annotation is int
    assert h.upload.check is not None and h.upload.check.annotation is int
    assert str(h.upload.signature) == "(scale: int) -> int"  # what the REQUEST's arguments bind to
    assert not h.inline  # it waits for items: never on the loop inline
    assert h.positional is not None and len(h.positional) == 1  # scale only
    k = make_handler("keyword", keyword, inline=False)
    assert k.upload is not None and k.upload.name == "items" and k.upload.annotation is str
    assert make_handler("atotal", atotal, inline=False).upload is not None
    a = make_handler("aiterable", aiterable, inline=False)
    assert a.upload is not None and a.upload.annotation is bytes
    assert make_handler("plain", lambda x: x, inline=True).upload is None


def _two(a: Iterator[int], b: Iterator[int]) -> None: ...
def _first(items: Iterator[int], scale: int) -> None: ...
def _positional_only(items: Iterator[int], /) -> None: ...
def _star(items: Iterator[int], *rest: int) -> None: ...
async def _async_with_sync(items: Iterator[int]) -> None: ...
def _sync_with_async(items: AsyncIterator[int]) -> None: ...
def _generator(items: Iterator[int]) -> Iterator[int]:
    yield from items


@pytest.mark.parametrize(
    ("func", "why"),
    [
        (_two, "at most one parameter"),
        (_first, "must be the last positional parameter, or keyword-only"),
        (_positional_only, "must be the last positional parameter, or keyword-only"),
        (_star, "must be the last positional parameter, or keyword-only"),
        (_async_with_sync, "must be annotated AsyncIterator[T] (async def)"),
        (_sync_with_async, "must be annotated Iterator[T] (def)"),
        (_generator, "a generator method cannot take an item stream too"),
    ],
)
def test_a_parameter_the_host_cannot_fill_is_refused_when_registered(func: Any, why: str) -> None:
    with pytest.raises(TypeError, match=re.escape(why)):
        make_handler("m", func, inline=False)


class Sink(Service):
    @method
    def total(self, scale: int, items: Iterator[int]) -> int:
        """Sum, scaled."""
        return scale * sum(items)

    @method
    def plain(self, x: int) -> int:
        return x


def test_the_dispatcher_refuses_mismatches_before_anything_runs() -> None:
    d = Dispatcher(collect_handlers(Sink()))

    def code(req: Request) -> int:
        outcome = d.dispatch(req)
        if inspect.isawaitable(outcome):
            outcome = asyncio.run(outcome)  # type: ignore[arg-type]
        assert isinstance(outcome, tuple) and not outcome[0]
        return int(outcome[1][0])

    assert code(Request(1, "total", [2])) == ErrorCode.STREAM_MISMATCH  # needs upload()
    assert code(Request(1, "plain", [2], upload=True)) == ErrorCode.STREAM_MISMATCH
    both = Request(1, "total", [2], stream=True, upload=True)
    assert code(both) == ErrorCode.STREAM_MISMATCH
    # Outside a host's stream session (no item source): refused, as a stream is.
    assert code(Request(1, "total", [2], upload=True)) == ErrorCode.STREAM_MISMATCH


def test_describe_marks_the_item_stream_parameter() -> None:
    svc = Sink()
    d = Description(svc, collect_handlers(svc))
    params = d.methods["total"]["params"]
    assert [(p["name"], p["stream"]) for p in params] == [("scale", False), ("items", True)]
    assert params[1]["annotation"] == "Iterator[int]"
    assert params[1]["schema"] == {"type": "integer"}  # each item's
    assert d.methods["plain"]["params"][0]["stream"] is False


def test_iterable_parameters_stay_plain_parameters() -> None:
    """Iterable[T] / AsyncIterable[T] say "a list of T" in services written before uploads:
    such methods register and are called as before (not uploads)."""

    def plain_total(xs: Iterable[int]) -> int:
        return sum(xs)

    async def amerge(a: Iterable[int], b: AsyncIterable[int]) -> int:
        return 0

    assert make_handler("plain_total", plain_total, inline=True).upload is None
    assert make_handler("amerge", amerge, inline=False).upload is None
