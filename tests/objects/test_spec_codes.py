"""Client input the spec gives a code (PROTOCOL.md §4.5) is answered with it, without a server
traceback logged; a plain CALL to a oneway method gets its one answer."""

from __future__ import annotations

import pytest

from sockstack import AsyncClient, CallTimeout, RemoteError
from sockstack.errors import ErrorCode
from sockstack.objects import ObjectLimits, ObjectServer
from sockstack.objects.client import _AsyncClient
from sockstack.objects.messages import NameTarget, encode_call
from tests.conftest import timeout
from tests.objects.test_session_spec import Counter


async def test_refusals_have_their_codes_and_log_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    srv = ObjectServer(
        tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"], objects=ObjectLimits(max_sessions=1)
    )
    srv.register("counter", Counter())
    async with srv:
        tcp = f"tcp://127.0.0.1:{srv.endpoint('tcp').port}"
        udp = f"udp://127.0.0.1:{srv.endpoint('udp').port}"
        async with _AsyncClient(tcp) as a, _AsyncClient(tcp) as b:
            await a.call("objects.attach")
            with pytest.raises(RemoteError) as err:  # a second session, past max_sessions
                await b.call("objects.attach")
            assert err.value.code == ErrorCode.TOO_MANY_OBJECTS, err.value
            with pytest.raises(RemoteError) as err:
                await a.call("objects.describe", ["x"] * 1025)
            assert err.value.code == ErrorCode.BAD_ARGUMENTS, err.value
        async with AsyncClient(udp) as u:
            with pytest.raises(RemoteError) as err:
                await u.call("objects.attach")
            assert err.value.code == ErrorCode.UNKNOWN_METHOD, err.value
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_a_call_without_oneway_to_a_oneway_method_gets_its_one_answer() -> None:
    srv = ObjectServer(tcp=["127.0.0.1:0"])
    srv.register("counter", Counter())
    async with srv:
        async with _AsyncClient(f"tcp://127.0.0.1:{srv.endpoint('tcp').port}") as c:
            await c.call("objects.attach")
            channel = c.stream_channel("note")
            try:
                await channel.exchange(
                    lambda rid: encode_call(rid, NameTarget("counter"), "note", ["x"]),
                    "note",
                    timeout(2),
                )
            except CallTimeout:
                pytest.fail("§4.5: a client's CALL gets exactly one RESPONSE or ERROR; none came")


async def test_a_repeated_keep_id_is_refused_without_failing_the_first() -> None:
    """Question 5 still running when a KEEP with id 5 comes again: the repeat is refused
    (BAD_TARGET), and the first question's answer still serves the calls made on it."""
    import asyncio

    from sockstack.objects import expose
    from sockstack.objects.messages import AnswerTarget
    from sockstack.protocol.events import Error, Response
    from sockstack.protocol.messages import encode_request
    from tests.integration.test_deadlines_metadata import RawStream

    gate = asyncio.Event()

    @expose
    class Slow:
        async def wait(self) -> int:
            await gate.wait()
            return 7

    srv = ObjectServer(tcp=["127.0.0.1:0"])
    srv.register("slow", Slow())
    async with srv:
        raw = await RawStream.open(srv)
        try:
            raw.send(encode_request(1, "objects.attach", []))
            assert type(await raw.answer()) is Response
            keep = encode_call(5, NameTarget("slow"), "wait", [], keep=True)
            raw.send(keep, keep)  # the same id again while question 5 runs
            again = await raw.answer()
            assert type(again) is Error and again.code == ErrorCode.BAD_TARGET
            raw.send(encode_call(6, AnswerTarget(5), "wait", []))  # waits for question 5
            gate.set()
            first = await raw.answer()
            assert type(first) is Response and first.request_id == 5 and first.result == 7
            on_first = await raw.answer()  # the first answer stands (a number: no object)
            assert type(on_first) is Error and on_first.request_id == 6
            assert "holds no object" in on_first.message, on_first.message
        finally:
            await raw.close()
