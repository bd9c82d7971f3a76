"""Issue 11 item 13: the exceptions of topics, the broker and datagram authentication are in
the one tree (sockstack.errors), with codes; the broker's refusals have their own codes."""

from __future__ import annotations

import pytest

from sockstack import ErrorCode, LocalProtocolError, RemoteProtocolError, SockstackError
from sockstack.errors import TopicError
from sockstack.protocol.auth import AuthFailure, DatagramAuth, EpochMismatch
from sockstack.protocol.codecs import MSGPACK
from sockstack.pubsub import BrokerError, validate_pattern, validate_topic
from sockstack.pubsub import TopicError as PubSubTopicError
from sockstack.pubsub.client import prepare_publish


def test_topic_error_is_in_the_tree_and_still_a_value_error() -> None:
    assert PubSubTopicError is TopicError  # the old import path still works
    for bad in (lambda: validate_topic("a.*"), lambda: validate_pattern("a.>.b")):
        with pytest.raises(TopicError) as info:
            bad()
        assert isinstance(info.value, SockstackError)
        assert isinstance(info.value, LocalProtocolError)
        assert isinstance(info.value, ValueError)  # as before: callers catching ValueError
        assert info.value.code == ErrorCode.BAD_TOPIC  # the code the broker answers with
    with pytest.raises(SockstackError, match="wildcards"):
        prepare_publish("a.*", 1, 0, MSGPACK)  # what publish() raises before sending


def test_auth_failure_is_a_remote_protocol_error_with_its_code() -> None:
    auth = DatagramAuth(b"k")
    with pytest.raises(AuthFailure) as info:
        auth.open(b"SK not a sealed datagram at all", 1_700_000_000.0)
    assert isinstance(info.value, RemoteProtocolError) and isinstance(info.value, SockstackError)
    assert info.value.code == ErrorCode.UNAUTHENTICATED
    assert info.value.reason == info.value.message == str(info.value)
    assert issubclass(EpochMismatch, RemoteProtocolError)


def test_broker_error_is_in_the_tree() -> None:
    assert issubclass(BrokerError, SockstackError)


def test_new_codes_follow_the_last_and_are_documented() -> None:
    from pathlib import Path

    assert (ErrorCode.TOO_MANY_SUBSCRIPTIONS, ErrorCode.RETAINED_STORE_FULL) == (2015, 2016)
    doc = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text()
    for code in ErrorCode:
        assert f"| {int(code)} | {code.name} |" in doc  # §7 lists every code
