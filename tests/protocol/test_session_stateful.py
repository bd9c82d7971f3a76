"""Stateful property test of the session core: a client and a server Connection joined by two
byte pipes that deliver in arbitrary splits, driven by hypothesis through any interleaving of
requests, answers, pings, closes, garbage, end of stream and the passing of time."""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sockstack.errors import LocalProtocolError
from sockstack.protocol.connection import Connection, ConnectionTerminated, State
from sockstack.protocol.messages import Error, Pong, Request, Response, Role


class Session(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        kw: dict[str, Any] = {"now": 0.0, "handshake_timeout": 10.0, "keepalive_interval": 20.0}
        self.client = Connection(Role.CLIENT, **kw)
        self.server = Connection(Role.SERVER, **kw)
        self.to_server = bytearray()
        self.to_client = bytearray()
        self.next_id = 1
        self.sent: set[int] = set()  # request ids the client sent
        self.answered: set[int] = set()  # ids the client got a RESPONSE or ERROR for
        self.received: set[int] = set()  # ids the server got
        self.server_answered: set[int] = set()
        self.terminated = {"client": 0, "server": 0}
        self.garbage = False
        self.eof = False

    # ------------------------------------------------------------------ helpers

    def _collect(self) -> None:
        self.to_server += self.client.data_to_send()
        self.to_client += self.server.data_to_send()

    def _client_events(self, events: list[Any]) -> None:
        for ev in events:
            if type(ev) in (Response, Error) and ev.request_id:
                assert self.garbage or ev.request_id in self.sent, ev
                assert ev.request_id not in self.answered, "answered twice"
                self.answered.add(ev.request_id)
            elif type(ev) is ConnectionTerminated:
                self.terminated["client"] += 1

    def _server_events(self, events: list[Any]) -> None:
        for ev in events:
            if type(ev) is Request:
                assert self.garbage or ev.request_id in self.sent
                self.received.add(ev.request_id)
            elif type(ev) is ConnectionTerminated:
                self.terminated["server"] += 1

    # ------------------------------------------------------------------ rules

    @rule(args=st.lists(st.integers(-(2**63), 2**64 - 1) | st.text(max_size=5), max_size=3))
    def client_request(self, args: list[Any]) -> None:
        try:
            self.client.send_request(self.next_id, "m", args)
        except LocalProtocolError:
            assert self.client.state in (State.CLOSING, State.CLOSED)
            return
        self.sent.add(self.next_id)
        self.next_id += 1
        self._collect()

    @rule(ok=st.booleans())
    def server_answers(self, ok: bool) -> None:
        pending = sorted(self.received - self.server_answered)
        if not pending:
            return
        rid = pending[0]
        self.server_answered.add(rid)
        if ok:
            self.server.send_response(rid, "r")
        else:
            self.server.send_error(rid, 2002, "ValueError", "no")
        self._collect()

    @rule(who=st.sampled_from(["client", "server"]))
    def ping(self, who: str) -> None:
        conn = self.client if who == "client" else self.server
        try:
            conn.send_ping(99)
        except LocalProtocolError:
            pass
        self._collect()

    @rule(who=st.sampled_from(["client", "server"]))
    def close(self, who: str) -> None:
        (self.client if who == "client" else self.server).send_close(1000, "bye")
        self._collect()

    @rule(n=st.integers(1, 64), to_server=st.booleans())
    def deliver(self, n: int, to_server: bool) -> None:
        pipe = self.to_server if to_server else self.to_client
        chunk = bytes(pipe[:n])
        del pipe[:n]
        if not chunk:
            return
        if to_server:
            self._server_events(self.server.receive_data(chunk))
        else:
            self._client_events(self.client.receive_data(chunk))
        self._collect()

    @rule(data=st.binary(min_size=1, max_size=20), to_server=st.booleans())
    def garbage_in(self, data: bytes, to_server: bool) -> None:
        self.garbage = True
        (self.to_server if to_server else self.to_client).extend(data)

    @rule(seconds=st.floats(0.0, 30.0))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        for conn, handle in (
            (self.client, self._client_events),
            (self.server, self._server_events),
        ):
            when = conn.next_timer(self.now)
            if when is not None and when <= self.now:
                handle(conn.handle_timer(self.now))
        self._collect()

    @precondition(lambda self: not self.eof)
    @rule()
    def end_of_stream(self) -> None:
        self.eof = True
        self._server_events(self.server.receive_eof())
        self._client_events(self.client.receive_eof())

    # ------------------------------------------------------------------ invariants

    @invariant()
    def terminated_at_most_once(self) -> None:
        assert self.terminated["client"] <= 1 and self.terminated["server"] <= 1

    @invariant()
    def closed_sessions_stay_closed_and_silent(self) -> None:
        self._collect()  # what was queued before the end (e.g. the final CLOSE) goes out
        for conn in (self.client, self.server):
            if conn.state is State.CLOSED:
                assert conn.receive_data(b"SK\x01\x06" + bytes(12)) == []
                assert conn.data_to_send() == b""

    @invariant()
    def every_answer_was_asked_for(self) -> None:
        if not self.garbage:
            assert self.answered <= self.sent
            assert self.received <= self.sent

    @invariant()
    def eof_ends_both(self) -> None:
        if self.eof:
            assert self.client.state is State.CLOSED and self.server.state is State.CLOSED


Session.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestSession = Session.TestCase


def test_pong_for_every_ping_in_a_clean_session() -> None:
    """A direct check of the property the machine relies on: PING is answered by the core."""
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    client.send_ping(5, b"x")
    server.receive_data(client.data_to_send())
    assert client.receive_data(server.data_to_send()) == [Pong(5, b"x")]
