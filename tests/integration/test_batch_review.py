"""A review of batches of calls (issue 17, PROTOCOL.md §4.7): each test shows one bug found,
named in its docstring (B1, B2...); they fail before the fixes in the review's report."""

from __future__ import annotations

import asyncio
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from sockstack import AsyncClient, RemoteError, Server, Service, connect, method
from sockstack.errors import CallTimeout, ConnectError, ErrorCode
from sockstack.interceptors import ServerInterceptor
from sockstack.protocol.messages import FEATURE_BATCH, FEATURES
from sockstack.rpc.context import CallContext, current_context
from tests.conftest import timeout, url


class Review(Service):
    """Methods that let the tests steer a batch: a first call held at a gate, calls that run
    past the deadline, results far larger than their arguments."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.fast = 0  # calls of ``held`` other than the first, run
        self.target = 0
        self.fast_done = asyncio.Event()
        self.late: list[int] = []  # calls of ``spin``/``spin_checked`` started past the deadline
        self.big = b"B" * 32768
        self.cancelled = 0
        self.all_cancelled = threading.Event()
        self.expect_cancelled = 0
        self.lock = threading.Lock()

    @method
    async def held(self, i: int) -> int:
        """Call 0 waits at the gate; the others count themselves."""
        if i == 0:
            await self.gate.wait()
        else:
            self.fast += 1
            if self.fast == self.target:
                self.fast_done.set()
        return i

    @method(inline=True)
    def ping(self) -> int:
        return 1

    def _spin(self, i: Any) -> Any:
        deadline = current_context().deadline
        assert deadline is not None
        if time.monotonic() >= deadline:
            self.late.append(i)
        if i == 0:  # the first call runs until the batch's deadline has passed
            while time.monotonic() < deadline:
                pass
        return i

    @method(inline=True)
    def spin(self, i: Any) -> Any:  # bare: the dispatcher's quickest path
        return self._spin(i)

    @method(inline=True)
    def spin_checked(self, i: int) -> int:  # annotated: not bare (Dispatcher._batch_from)
        return int(self._spin(i))

    @method(inline=True)
    def big_blob(self) -> Any:  # bare; the same 32 KiB object each call
        return self.big

    @method(inline=True)
    def odd_result(self, i: Any) -> Any:  # call 1's result does not encode
        return object() if i == 1 else i

    @method
    async def forever(self, i: int) -> int:
        """Call 0 answers at once, the others wait until cancelled (counted)."""
        if i == 0:
            return 0
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            with self.lock:
                self.cancelled += 1
                if self.cancelled == self.expect_cancelled:
                    self.all_cancelled.set()
            raise
        return i


@pytest.fixture
async def review() -> AsyncIterator[tuple[Server, Review]]:
    svc = Review()
    srv = Server(svc, tcp=["127.0.0.1:0"])
    await srv.start()
    try:
        yield srv, svc
    finally:
        svc.gate.set()
        await srv.shutdown()


# --------------------------------------------------------------- B1: the client's window


@pytest.mark.parametrize("batch", [True, False], ids=["BATCH", "request-per-call"])
async def test_b1_a_slow_first_call_keeps_calls_within_the_window(
    review: tuple[Server, Review], batch: bool
) -> None:
    """B1: call_many's window counts the calls *answered but not handed out* as free, so while
    the first call is slow the client keeps reading ``calls`` and sending, and keeps every
    answer since the first: memory grows with the whole input, not the window (here 2,000
    calls read for a window of 100 before the first call answers)."""
    server, svc = review
    if not batch:
        server.features = FEATURES & ~FEATURE_BATCH
    window = 100
    # BATCH: 2 requests of 50, the first held by call 0 (so the other's 50 run); a request per
    # call: 99 others run
    svc.target = 50 if batch else 99
    pulled = 0

    def calls() -> Iterator[tuple[int]]:
        nonlocal pulled
        for i in range(2000):
            pulled += 1
            yield (i,)

    async with AsyncClient(url(server, "tcp"), timeout=timeout(30)) as c:
        task = asyncio.ensure_future(c.call_many("held", calls(), window=window))
        await asyncio.wait_for(svc.fast_done.wait(), timeout(10))
        # Answers are read in order on the connection: once these return, the client has read
        # every answer sent before them (and had its turn to send more)
        for _ in range(3):
            assert await c.call("ping") == 1
        read_while_held = pulled
        svc.gate.set()
        assert await asyncio.wait_for(task, timeout(30)) == list(range(2000))
    assert read_while_held <= window, f"{read_while_held} calls read with a window of {window}"


# --------------------------------------------------------------- B2: the batch's deadline


@pytest.mark.parametrize(
    "name, calls, stride",
    [
        ("spin", [(i,) for i in range(300)], 256),  # bare, every call fits: the starmap loop
        ("spin", [(i,) for i in range(299)] + [()], 64),  # bare, one call does not fit
        ("spin_checked", [(i,) for i in range(300)], 1),  # not bare: _batch_from
    ],
    ids=["bare-starmap", "bare-loop", "checked"],
)
async def test_b2_no_call_starts_past_the_deadline_beyond_the_stride(
    review: tuple[Server, Review], name: str, calls: list[tuple[Any, ...]], stride: int
) -> None:
    """B2: PROTOCOL.md §4.7: the server checks the batch's deadline between calls, at least
    every 256 calls; the calls it has not started when it finds the deadline passed do not run
    and fail with DEADLINE_EXCEEDED (CallTimeout here). The first call runs until the deadline
    has passed: at most ``stride - 1`` calls start after it (a bare method's calls are made in
    runs of 256 or 64 between two readings of the clock; any other method's, one)."""
    server, svc = review
    async with AsyncClient(url(server, "tcp")) as c:
        out = await c.call_many(
            name, calls, timeout=timeout(0.3), window=1200, return_exceptions=True
        )
        assert len(out) == len(calls)
        assert await c.call("ping") == 1  # after the batch (inline: it held the loop)
    assert len(svc.late) <= stride - 1, f"{len(svc.late)} calls started after the deadline"
    assert all(isinstance(v, CallTimeout) for v in out[stride:]), out[stride : stride + 3]
    assert svc.late == list(range(1, len(svc.late) + 1))  # the ones right after the first


# --------------------------------------------------------------- B3: the server's memory


async def test_b3_a_batchs_answer_is_not_built_past_the_clients_max_frame(
    review: tuple[Server, Review],
) -> None:
    """B3: the server encodes the whole ``[results, errors]`` before it compares its size with
    the client's max_frame (1 MiB here): 2,000 calls of a method that returns a 32 KiB value
    (a 16 KB request) make it build a 64 MB answer only to refuse it. A batch of 10,000 calls
    of a method returning 1 MiB would ask for 10 GB."""
    server, _ = review
    async with AsyncClient(url(server, "tcp")) as c:
        assert await c.call("ping") == 1
        tracemalloc.start()
        try:
            out = await c.call_many("big_blob", [()] * 2000, window=8000, return_exceptions=True)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert all(isinstance(e, RemoteError) for e in out)  # over the client's max_frame
    assert peak < 8 * 2**20, f"peak {peak >> 20} MiB for answers refused over 1 MiB"


@pytest.mark.parametrize("codec", ["msgpack", "json"])
async def test_b6_a_result_that_does_not_encode_fails_its_call_alone(
    review: tuple[Server, Review], codec: str
) -> None:
    """B6: one call's result that does not encode fails the whole batch request
    (RESULT_NOT_ENCODABLE for every call of it); PROTOCOL.md §4.7 runs each call "exactly as a
    REQUEST with its arguments would run" and lists the errors of the whole batch: this is not
    one of them. Its own REQUEST would fail alone."""
    server, _ = review
    async with AsyncClient(url(server, "tcp"), codec=codec) as c:
        out = await c.call_many("odd_result", [(0,), (1,), (2,)], return_exceptions=True)
        assert out[0] == 0 and out[2] == 2, out
        assert isinstance(out[1], RemoteError) and out[1].code == ErrorCode.RESULT_NOT_ENCODABLE
        many = await c.call_many("odd_result", [(i,) for i in range(600)], return_exceptions=True)
        assert many[:1] + many[2:] == [0, *range(2, 600)]


# --------------------------------------------------------------- B4: bad input from the caller


async def test_b4_one_call_that_is_not_a_sequence_fails_alone(
    review: tuple[Server, Review],
) -> None:
    """B4: a ``calls`` item that is not a sequence of arguments (a dict, a str) is put in the
    BATCH body as it is; the server then refuses the whole request (DECODE_ERROR, logged as
    the client's protocol violation) and every call of that request fails with it, the good
    ones too. A request per call (a server without BATCH) fails that one call alone with a
    TypeError, and so should a batch (or it should raise TypeError before sending)."""
    server, _ = review
    async with AsyncClient(url(server, "tcp")) as c:
        calls: list[Any] = [(1,), {"i": 2}, (3,)]
        try:
            out = await c.call_many("held", calls, return_exceptions=True)
        except TypeError:
            return  # refused before anything is sent: fine too
        assert out[0] == 1 and out[2] == 3, out


# --------------------------------------------------------------- B5: the blocking client


def _leave_early(address: str, svc: Review) -> None:
    with connect(address, timeout=timeout(30)) as c:
        # window 2: requests of one call, two in flight: [0] and [1]
        for value in c.iter_many("forever", [(i,) for i in range(4)], window=2):
            assert value == 0
            break  # call 1 still in flight: nobody waits for it any more
        with pytest.raises(RemoteError) as info:  # fails at once: nobody waits for the others
            c.call_many("forever", [(0,), ("x",), (1,)], window=4)
        assert info.value.code == ErrorCode.BAD_ARGUMENTS
        assert c.call("ping") == 1  # (CANCELs are sent with the next write)
        # before the connection closes (which stops every call of it on the server)
        assert svc.all_cancelled.wait(timeout(10)), f"{svc.cancelled} of 2 calls cancelled"


async def test_b5_leaving_the_blocking_iter_many_cancels_the_calls_in_flight(
    review: tuple[Server, Review],
) -> None:
    """B5: the blocking client's iter_many/call_many leaves its tickets behind when the
    caller stops early or a call raises: no CANCEL is sent (the server runs the calls to the
    end, holding its slots) and their entries stay in the client's table until answered, for
    ever for a call that never ends. The asyncio client sends CANCEL in the same cases."""
    server, svc = review
    # 1 left by the loop; 1 by the raise (the second call_many's request [1], beside [0, "x"])
    svc.expect_cancelled = 2
    await asyncio.to_thread(_leave_early, url(server, "tcp"), svc)


# --------------------------------------------------------------- checked and fine


async def test_ok_interceptors_see_each_call_of_an_async_batch() -> None:
    seen: list[Any] = []

    class Recorder(ServerInterceptor):
        def before(self, ctx: CallContext) -> None:
            seen.append(ctx.method)

    svc = Review()
    svc.gate.set()
    server = Server(svc, tcp=["127.0.0.1:0"], interceptors=[Recorder()])
    await server.start()
    try:
        async with AsyncClient(url(server, "tcp")) as c:
            assert await c.call_many("held", [(i,) for i in range(10)], window=4) == list(range(10))
        assert seen == ["held"] * 10
    finally:
        await server.shutdown()


async def test_ok_window_one_empty_input_and_a_raising_generator(
    review: tuple[Server, Review],
) -> None:
    server, svc = review
    svc.gate.set()

    def broken() -> Iterator[tuple[int]]:
        yield (1,)
        yield (2,)
        raise ZeroDivisionError

    async with AsyncClient(url(server, "tcp")) as c:
        assert await c.call_many("held", [(i,) for i in range(5)], window=1) == list(range(5))
        assert await c.call_many("held", iter([])) == []
        with pytest.raises(ZeroDivisionError):
            await c.call_many("held", broken(), window=1)
        with pytest.raises(ZeroDivisionError):
            await c.call_many("held", broken())
        assert await c.call("ping") == 1


async def test_ok_a_lost_connection_fails_the_calls_in_flight(
    review: tuple[Server, Review],
) -> None:
    server, svc = review
    async with AsyncClient(url(server, "tcp"), reconnect=False) as c:
        task = asyncio.ensure_future(
            c.call_many("held", [(i,) for i in range(40)], window=8, return_exceptions=True)
        )
        svc.target = 4  # (2 BATCH requests of 4: the second one's calls)
        await asyncio.wait_for(svc.fast_done.wait(), timeout(10))
        await c.close()
        with pytest.raises(ConnectError):  # the calls sent failed; the rest cannot be sent
            await asyncio.wait_for(task, timeout(10))


async def test_ok_timeout_fails_a_held_request(review: tuple[Server, Review]) -> None:
    server, _ = review
    async with AsyncClient(url(server, "tcp")) as c:
        out = await c.call_many("held", [(0,), (1,)], timeout=timeout(0.2), return_exceptions=True)
        assert all(isinstance(e, CallTimeout) for e in out)
