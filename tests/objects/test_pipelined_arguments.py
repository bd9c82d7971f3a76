"""Promises passed as arguments, and CANCEL of a pipelined call that waits, live over loopback
TCP (PROTOCOL.md §4.5: form 3 references; CANCEL as for a running call)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from sockstack.errors import ErrorCode, RemoteError
from sockstack.objects import ObjectClient
from sockstack.objects.messages import AnswerTarget, NameTarget, encode_call
from tests.conftest import timeout
from tests.objects.test_review import MARKS, entered, gate, keep_call, serving


def _waiting(peer: Any) -> int:
    """Pipelined calls waiting on ``peer`` (read on the server's loop)."""
    return int(peer.state.get("objects.waiting", 0))


def test_a_promise_passed_before_its_answer_runs_the_call_once_it_is_there() -> None:
    with serving() as served, ObjectClient(served.url, timeout=timeout(10)) as oc:
        thing = oc.lookup("thing")
        assert thing.incr() == 1  # (described: gated_child returns a promise)
        promise = thing.gated_child("arg")  # its answer held on the server by the gate
        assert entered("arg").wait(timeout(10))
        peer = served.peers()[0]
        results: dict[str, Any] = {}
        caller = threading.Thread(
            target=lambda: results.__setitem__("same", thing.same(promise)), daemon=True
        )
        caller.start()
        # The call went at once (form 3), and waits on the server for the question:
        served.eventually(lambda: _waiting(peer) == 1)
        assert "same" not in results
        gate("arg").set()
        caller.join(timeout(10))
        assert results["same"] is True
        assert served.on_loop(lambda: _waiting(peer)) == 0


def test_cancel_stops_a_pipelined_call_that_waits() -> None:
    MARKS.clear()
    with serving() as served, ObjectClient(served.url, timeout=timeout(10)) as oc:
        conn = oc._conn()
        question = keep_call(oc, "gated_child", ["cancel"])
        assert entered("cancel").wait(timeout(10))
        peer = served.peers()[0]
        waiting = conn.start_exchange(
            lambda rid: encode_call(rid, AnswerTarget(question.request_id), "mark", ["no"]),
            "mark",
            timeout(10),
        )
        served.eventually(lambda: _waiting(peer) == 1)
        conn._cancel(waiting.request_id)
        with pytest.raises(RemoteError) as err:
            waiting.result()
        assert err.value.code == ErrorCode.CANCELLED
        assert served.on_loop(lambda: _waiting(peer)) == 0
        gate("cancel").set()
        question.result()  # the question itself is answered; the cancelled call never ran
        assert oc.lookup("thing").incr() >= 1
        assert MARKS == []


def test_cancel_of_a_waiting_keep_call_fails_the_calls_on_it() -> None:
    with serving() as served, ObjectClient(served.url, timeout=timeout(10)) as oc:
        conn = oc._conn()
        first = keep_call(oc, "gated_child", ["chain"])
        assert entered("chain").wait(timeout(10))
        peer = served.peers()[0]
        second = conn.start_exchange(  # KEEP, on the first: waits
            lambda rid: encode_call(rid, AnswerTarget(first.request_id), "child", [], keep=True),
            "child",
            timeout(10),
        )
        third = conn.start_exchange(  # on the second
            lambda rid: encode_call(rid, AnswerTarget(second.request_id), "incr", []),
            "incr",
            timeout(10),
        )
        served.eventually(lambda: _waiting(peer) == 2)
        conn._cancel(second.request_id)
        with pytest.raises(RemoteError) as err:
            second.result()
        assert err.value.code == ErrorCode.CANCELLED
        gate("chain").set()
        first.result()
        with pytest.raises(RemoteError) as err:
            third.result()
        assert err.value.code == ErrorCode.CANCELLED  # the question's own error


def test_a_promise_argument_naming_an_unknown_question_is_bad_arguments() -> None:
    from sockstack.objects.refs import FORM_PROMISE, Ref

    with serving() as served, ObjectClient(served.url, timeout=timeout(10)) as oc:
        with pytest.raises(RemoteError) as err:
            oc._conn().exchange(
                lambda rid: encode_call(
                    rid, NameTarget("thing"), "same", [Ref(FORM_PROMISE, question=99, path=())]
                ),
                "same",
                timeout(10),
            )
        assert err.value.code == ErrorCode.BAD_ARGUMENTS
        assert oc.lookup("thing").incr() == 1  # the session goes on
