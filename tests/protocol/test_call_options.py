"""What a call sends beside its arguments (protocol/calls.py): the shared rules both clients
follow for deadlines and metadata (PROTOCOL.md §4)."""

from __future__ import annotations

import pytest

from sockstack import ErrorCode, LocalProtocolError
from sockstack.protocol.calls import (
    CURRENT_CALL,
    FEATURES,
    budget_ms,
    inherited_timeout,
    merge_metadata,
    plan_call,
)
from sockstack.protocol.messages import FEATURE_DEADLINE, FEATURE_METADATA
from sockstack.rpc.context import CallContext


def test_a_budget_is_whole_milliseconds_rounded_down_within_a_u32() -> None:
    assert budget_ms(1.5) == 1500
    assert budget_ms(0.0019) == 1  # never more time than the caller has
    assert budget_ms(0.0004) == 0 and budget_ms(-3) == 0  # late: the server refuses it
    assert budget_ms(1e12) == 0xFFFFFFFF


def test_metadata_defaults_are_overridden_key_by_key() -> None:
    assert merge_metadata(None, None) is None
    assert merge_metadata({}, {}) is None
    assert merge_metadata({"a": "1", "b": "2"}, {"b": b"3"}) == {"a": "1", "b": b"3"}
    with pytest.raises(LocalProtocolError, match="metadata key 'A'") as info:
        merge_metadata({"A": "1"}, None)
    assert info.value.code == ErrorCode.DECODE_ERROR


def test_plan_call_sends_only_what_the_server_announced() -> None:
    md = {"tenant": "acme"}
    assert plan_call(2.0, FEATURES, md, None, 100.0) == (2.0, 2000, md)
    assert plan_call(2.0, FEATURE_DEADLINE, md, None, 100.0) == (2.0, 2000, None)
    assert plan_call(2.0, FEATURE_METADATA, md, {"x": "y"}, 100.0) == (
        2.0,
        None,
        {"tenant": "acme", "x": "y"},
    )
    assert plan_call(2.0, 0, md, None, 100.0) == (2.0, None, None)  # an older server
    with pytest.raises(LocalProtocolError):  # checked even when it would not be sent
        plan_call(2.0, 0, {"Bad": "x"}, None, 100.0)


def test_a_call_made_inside_a_served_call_inherits_its_deadline() -> None:
    served = CallContext("outer", 1, "tcp", ("127.0.0.1", 1), None, deadline=100.5)
    token = CURRENT_CALL.set(served)
    try:
        assert inherited_timeout(10.0, 100.0) == 0.5
        assert inherited_timeout(0.2, 100.0) == 0.2  # its own timeout is shorter: kept
        assert inherited_timeout(10.0, 101.0) == 0.0  # already late
        assert plan_call(10.0, FEATURES, None, None, 100.0) == (0.5, 500, None)
    finally:
        CURRENT_CALL.reset(token)
    assert inherited_timeout(10.0, 100.0) == 10.0  # outside a served call: unchanged
    no_deadline = CallContext("outer", 1, "tcp", "peer")
    token = CURRENT_CALL.set(no_deadline)
    try:
        assert inherited_timeout(10.0, 100.0) == 10.0
    finally:
        CURRENT_CALL.reset(token)


def test_a_context_reports_its_deadline_and_cancellation() -> None:
    ctx = CallContext("m", 7, "udp", ("::1", 5), {"k": "v"}, deadline=None)
    assert ctx.peer == "[::1]:5" and ctx.time_remaining() is None and not ctx.cancelled
    assert dict(ctx.metadata) == {"k": "v"}
    with pytest.raises(TypeError):
        ctx.metadata["k"] = "w"  # type: ignore[index]
    ctx.abort_code = ErrorCode.CANCELLED
    assert ctx.cancelled
    late = CallContext("m", 7, "tcp", "p", None, deadline=0.0)  # monotonic 0: long past
    assert late.cancelled and late.time_remaining() == 0.0
    with pytest.raises(ValueError, match="metadata key"):
        late.set_trailer("No", "x")
    for i in range(64):
        late.set_trailer(f"k{i}", "v")
    late.set_trailer("k0", "again")  # replacing one is not one more
    with pytest.raises(ValueError, match="at most 64"):
        late.set_trailer("k64", "v")
