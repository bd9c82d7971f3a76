"""Remote objects as a pattern on the host: CALL, RELEASE, RENEW routed to exposed objects.

::

    Server(patterns=[Objects(registered={"counter": Counter()})], tcp=["127.0.0.1:5054"])

(:class:`~sockstack.objects.server.ObjectServer` is this with a ``register`` method.) It adds
the message types 0x20-0x2F (PROTOCOL.md §4.5) and the ``objects.attach`` method, and keeps a
:class:`~sockstack.objects.session.Session` per client session.

A CALL names its target (an object exported to this session, or a registered name), a member
of the target's exposed class, and arguments; it runs through the host exactly as a REQUEST's
method does (``Peer.submit``: deadline, CANCEL, in-flight limits, interceptors,
``current_context()``), with the instance as the handler's first argument. Its answer is core
RESPONSE/ERROR; a result holding exposed objects carries them as references (msgpack ext 2),
each exported to the session (counted). A CALL whose target or member is unknown is refused
before anything runs (UNKNOWN_OBJECT, UNKNOWN_METHOD; a malformed target, BAD_TARGET).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import threading
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sockstack.errors import (
    CallTimeout,
    CodecError,
    ConnectionLost,
    ErrorCode,
    LocalProtocolError,
    RemoteError,
)
from sockstack.host.dispatch import Handler, Outcome, ServiceError, make_handler
from sockstack.host.pattern import HostContext, Pattern, Peer
from sockstack.objects.expose import Exposed, Member, exposed
from sockstack.objects.handoff import Handoff, answer_later, call_later, third_ref
from sockstack.objects.handoff import methods as handoff_methods
from sockstack.objects.messages import (
    MAX_RELEASE_ENTRIES,
    OBJECTS_MESSAGES,
    AnswerTarget,
    Call,
    NameTarget,
    ObjectTarget,
    Release,
    Renew,
    Return,
    encode_abort,
    encode_call,
    encode_release,
    encode_response_with_refs,
)
from sockstack.objects.refs import FORM_HOME, FORM_PROMISE, FORM_SENDER, Ref, pack
from sockstack.objects.session import Session, Tables, TooManyObjects
from sockstack.protocol.calls import budget_ms, remote_error, served_call
from sockstack.protocol.codecs import MSGPACK
from sockstack.protocol.events import Error, PatternMessage, Request
from sockstack.rpc.context import CallAborted, CallContext, current_context, served_context

__all__ = ["ObjectLimits", "Objects", "RemoteObject"]

log = logging.getLogger("sockstack.objects")
_STATE = "objects"
_SCALARS = frozenset({type(None), bool, int, float, str, bytes})


@dataclass(frozen=True, slots=True)
class ObjectLimits:
    """Bounds of an object server (every one a count and bytes, per session and in total)."""

    lease: float = 30.0
    """Seconds a client's session (its objects) outlives its connection: a client that
    reconnects within it keeps them; after it they are freed."""
    max_objects: int = 10_000
    """Objects exported to one session."""
    max_bytes: int = 64 << 20
    """Bytes of one session's objects (200 per entry plus each object's shallow size)."""
    max_total_objects: int = 1_000_000
    max_total_bytes: int = 1 << 30
    max_sessions: int = 100_000
    """Sessions kept at once, attached or within their lease."""

    def __post_init__(self) -> None:
        if self.lease < 1.0:
            raise ValueError("lease must be at least 1 s (clients renew every lease/3)")


@dataclass(frozen=True, slots=True)
class _Registered:
    name: str
    target: object  # an instance (single), or a class (its instance mode)
    exposed: Exposed
    mode: str


class _Refused(Exception):
    def __init__(self, code: int, message: str, name: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.name = name or ErrorCode(code).name


_CANCELLED = (
    ErrorCode.CANCELLED,
    "CANCELLED",
    "the call was cancelled by the client while it waited for the answer it names; it did not run",
)
_SETTLING = "objects.settling"  # questions answered, their waiters to run (Objects._settled)
_WAITING_IDS = "objects.waiting_ids"  # request id -> the question a waiting call waits for
_LATE_FAILURE = (
    ErrorCode.DEADLINE_EXCEEDED,
    "DEADLINE_EXCEEDED",
    "the call's deadline passed while it waited for the answer it names; it did not run",
)
_QUESTIONS = "objects.questions"
_OUT = "objects.out"  # this server's calls to the client (callbacks) waiting for RETURN
MAX_CALLBACKS = 1_000
"""Calls to one client's objects waiting for their answers at once."""
CALLBACK_TIMEOUT = 10.0
"""Seconds a call to a client's object waits at most (less when the served call has less)."""
_WAITING = "objects.waiting"
_WAITING_BYTES = "objects.waiting_bytes"  # frame bytes of the pipelined calls waiting
MAX_QUESTIONS = 10_000
"""Kept answers (KEEP calls not finished) per connection."""
MAX_WAITERS = 1_000
"""Pipelined calls waiting for their question's answer, per connection."""
_MAX_PATH = 8
_MAX_DEPTH = 64  # arguments nested deeper are refused (BAD_ARGUMENTS), not recursed into


_Refs = dict[tuple[int | str, ...], tuple[object, Exposed | None]]
"""A kept answer's objects by path, from its answer until its RESPONSE is written (the end of
that loop turn: the calls that named it in the same read run on them); then the export ids
the RESPONSE gave them (:meth:`_Question.exported`)."""
_PLACEHOLDER = Ref(FORM_HOME, id=bytes(16))  # (_Answerer._unsendable: packed, never sent)
_PLAIN = "objects.plain"  # the connection's answerer of plain calls (no KEEP, not ONEWAY)
_DEFERRED = "objects.deferred"  # answers written at the end of this loop turn (_Answerer)


class _Question:
    """A KEEP call: its answer's objects by path (or its failure), and the calls waiting."""

    __slots__ = (
        "arrived",
        "done",
        "failure",
        "finished",
        "keys",
        "pinned",
        "pins",
        "qid",
        "refs",
        "waiters",
    )

    finished: bool
    """FINISH came: dropped once answered, and its RESPONSE carries nil (the client gave up
    its references: none are exported for it)."""

    def __init__(self, qid: int = 0) -> None:
        self.qid = qid
        self.pins = 0  # calls waiting (on any question) that name this one: kept until 0
        self.pinned: list[list[_Question]] = []  # for each waiter: the questions it pins
        self.done = False
        self.failure: tuple[int, str, str] | None = None
        self.refs: _Refs = {}
        self.waiters: list[Call] = []
        self.arrived: list[float] = []  # when each waiter came (its deadline counts from it)
        self.finished = False
        self.keys: dict[tuple[int | str, ...], bytes] | None = None

    def exported(self, ids: dict[int, bytes] | None) -> None:
        """Its RESPONSE went, exporting its objects (``ids``: ``id(obj)`` -> export id; None:
        not sent): from now on it names them by those ids, held by the client's counts (a
        reference the client released is gone from the answer too)."""
        refs, self.refs = self.refs, {}
        self.keys = {}
        for path, (obj, found) in refs.items():
            if found is None:  # the caller's own object: kept as it is (not exported)
                self.refs[path] = (obj, None)
                continue
            key = ids.get(id(obj)) if ids else None
            if key is not None:
                self.keys[path] = key


def _questions(peer: Peer) -> dict[int, _Question]:
    questions = peer.state.get(_QUESTIONS)
    if questions is None:
        questions = peer.state[_QUESTIONS] = {}
    return questions


def _kept(
    session: Session, q: _Question, qid: int, path: tuple[int | str, ...], code: int
) -> tuple[object, Exposed | None]:
    """The object at ``path`` in answered question ``q`` (Exposed None: the caller's own
    object); ``_Refused`` ``code`` if there is none, the question's error if it failed."""
    if q.failure is not None:
        fcode, name, message = q.failure
        raise _Refused(fcode, message, name)
    keys = q.keys
    got: tuple[object, Exposed | None] | None = q.refs.get(path)
    if got is None and keys is not None:  # its RESPONSE went: by the ids it gave
        key = keys.get(path)
        entry = session.get(key) if key is not None else None
        got = (entry.obj, entry.exposed) if entry is not None else None
    if got is None:
        raise _Refused(code, f"the answer to question {qid} holds no object at {list(path)}")
    return got


def _unpin(questions: dict[int, _Question], pins: list[_Question]) -> None:
    """A waiting call ran (or was stopped): the questions it named may go if finished."""
    for p in pins:
        p.pins -= 1
        if not p.pins and p.finished and p.done and questions.get(p.qid) is p:
            del questions[p.qid]


def _named_questions(call: Call) -> list[int]:
    """The questions a CALL names: its target's, and its promise arguments' (form 3)."""
    out: list[int] = []
    if type(call.target) is AnswerTarget:
        out.append(call.target.question)
    if call.has_refs:
        out.extend(
            r.question
            for r in _call_refs(call)
            if r.form == FORM_PROMISE and r.question is not None
        )
    return out


def _call_refs(call: Call) -> list[Ref]:
    """The references in a CALL's arguments (64 levels deep at most, as _resolve)."""
    out: list[Ref] = []
    _refs_in(call.args, out, 0)
    _refs_in(call.kwargs, out, 0)
    return out


def _refs_in(value: Any, out: list[Ref], depth: int) -> None:
    t = type(value)
    if t is Ref:
        out.append(value)
    elif depth <= _MAX_DEPTH:
        if t is list:
            for v in value:
                _refs_in(v, out, depth + 1)
        elif t is dict:
            for v in value.values():
                _refs_in(v, out, depth + 1)


def _unanswered(value: Any, questions: Mapping[int, _Question], depth: int = 0) -> _Question | None:
    """A kept question not answered yet that a promise (form 3) in ``value`` names."""
    t = type(value)
    if t is Ref:
        if value.form == FORM_PROMISE and value.question is not None:
            q = questions.get(value.question)
            if q is not None and not q.done:
                return q
        return None
    if depth > _MAX_DEPTH:
        return None  # (refused by _resolve)
    if t is list:
        for v in value:
            q = _unanswered(v, questions, depth + 1)
            if q is not None:
                return q
    elif t is dict:
        for v in value.values():
            q = _unanswered(v, questions, depth + 1)
            if q is not None:
                return q
    return None


def _paths(value: Any, path: tuple[int | str, ...], out: _Refs) -> None:
    """Each exposed object in ``value`` by its path (list indexes, map keys), 8 steps deep."""
    t = type(value)
    if t in _SCALARS:
        return
    if t is list or t is tuple:
        if len(path) < _MAX_PATH:
            for i, v in enumerate(value[:65536]):
                _paths(v, (*path, i), out)
    elif t is dict:
        if len(path) < _MAX_PATH:
            for k, v in value.items():
                if type(k) is str and len(k.encode()) <= 255:
                    _paths(v, (*path, k), out)
    elif t is RemoteObject:
        out[path] = (value, None)  # the caller's own object (PROMISE_ELSEWHERE to call it)
    else:
        found = exposed(t)
        if found is not None:
            out[path] = (value, found)


class Objects(Pattern):
    """Serve exposed objects: those registered by name, and those their methods return."""

    name = _STATE
    messages = OBJECTS_MESSAGES

    def __init__(self, limits: ObjectLimits | None = None) -> None:
        self.limits = lim = limits or ObjectLimits()
        self.tables = Tables(
            lim.max_objects, lim.max_bytes, lim.max_total_objects, lim.max_total_bytes
        )
        self.registered: dict[str, _Registered] = {}
        self._ifaces: dict[str, Exposed] = {}  # every exposed class served, by wire name
        self._descriptions: dict[type, dict[str, Any]] = {}  # (bounded by the classes served)
        self.sessions: dict[bytes, Session] = {}  # by token
        self._peers: dict[str, Peer] = {}  # open connections by their address (attach)
        self._host: HostContext | None = None
        # Crossings of clients' objects whose RemoteObjects were dropped, RELEASEd to their
        # clients from the loop (GC runs on any thread): (session, id) appended anywhere.
        self._remotes_dropped: collections.deque[tuple[Session, bytes]] = collections.deque()
        self._remotes_flush = False
        self._timer: asyncio.TimerHandle | None = None
        self._clock: Callable[[], float] = time.monotonic
        self._loop_thread = 0
        self.callback_timeout = CALLBACK_TIMEOUT
        self._rid = 0  # the last id of this server's calls to clients
        self._rid_lock = threading.Lock()
        self.on_session_end: list[Callable[[Session], None]] = []
        """Called with each session freed (ended, or its lease ran out): e.g. the name service
        drops the names it registered."""

    # ------------------------------------------------------------------ registration

    def register(self, name: str, target: object, instance: str | None = None) -> None:
        """Serve ``target`` under ``name``: an exposed instance (shared by every caller), or
        an exposed class (``instance``: "single", "session" or "percall"; default the class's
        ``@expose(instance=...)``)."""
        if not name or len(name.encode()) > 255 or "\x00" in name:
            raise ValueError(f"a registered name is 1-255 bytes without NUL: {name!r}")
        cls = target if isinstance(target, type) else type(target)
        found = exposed(cls)
        if found is None:
            raise ValueError(f"{cls.__name__} is not exposed: decorate it with @expose")
        if isinstance(target, type):
            mode = instance or found.instance
        else:
            if instance not in (None, "single"):
                raise ValueError("an instance is shared: register the class for other modes")
            mode = "single"
        if mode == "single" and isinstance(target, type):
            target = target()
        self.registered[name] = _Registered(name, target, found, mode)
        self._ifaces[found.iface] = found

    def unregister(self, name: str) -> None:
        self.registered.pop(name, None)

    # ------------------------------------------------------------------ host hooks

    def methods(self) -> Mapping[str, Handler]:
        return {
            "objects.attach": make_handler("objects.attach", self._attach, inline=True),
            "objects.describe": make_handler("objects.describe", self._describe, inline=True),
            **handoff_methods(self),  # objects.share, objects.adopt (third-party references)
        }

    def _describe(self, ifaces: list[str]) -> dict[str, Any]:
        """``objects.describe``: the named interfaces this server has exported or registered
        (each: methods, properties, oneway, refs); unknown names are left out."""
        if type(ifaces) is not list or len(ifaces) > 1024:
            raise _BadArguments("ifaces: a list of at most 1,024 interface names")
        out = {}
        for name in set(ifaces):
            found = self._ifaces.get(name) if type(name) is str else None
            if found is not None:
                out[name] = self._described(found)
        return out

    def _described(self, found: Exposed) -> dict[str, Any]:
        """:func:`describe`, once per class (type hints are read once)."""
        desc = self._descriptions.get(found.cls)
        if desc is None:
            desc = self._descriptions[found.cls] = describe(found)
        return desc

    def start(self, host: HostContext) -> None:
        self._host = host
        self._loop_thread = threading.get_ident()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for session in self.sessions.values():
            session.clear()
        self.sessions.clear()

    def connection_made(self, peer: Peer) -> None:
        self._peers[peer.peer] = peer

    def connection_lost(self, peer: Peer) -> None:
        if self._peers.get(peer.peer) is peer:
            del self._peers[peer.peer]
        out = peer.state.pop(_OUT, None)
        if out:
            for fut in out.values():
                _fail(fut, ConnectionLost(f"{peer.peer}: the client's connection ended"))
        session = peer.state.pop(_STATE, None)
        if isinstance(session, Session) and session.peer is peer:
            session.peer = None
            session.expires = self._clock() + self.limits.lease
            self._arm()

    def stream_message(self, peer: Peer, msg: PatternMessage) -> None:
        if type(msg) is Call:
            self._call(peer, msg)
        elif type(msg) is Release:
            session = peer.state.get(_STATE)
            if isinstance(session, Session):
                for key, count in msg.releases:
                    session.release(key, count)
            if msg.finished:
                self._finish(peer, msg.finished)
            if isinstance(session, Session):
                if msg.end:
                    self._end(peer, session)
        elif type(msg) is Renew:
            pass  # an attached session does not expire: the frame only shows the client lives
        elif type(msg) is Return:
            self._returned(peer, msg)

    # ------------------------------------------------------------------ sessions

    def _session(self, peer: Peer) -> Session:
        session = peer.state.get(_STATE)
        if isinstance(session, Session):
            return session
        raise _Refused(
            ErrorCode.SESSION_EXPIRED,
            "no session on this connection: call objects.attach first (PROTOCOL.md §4.5)",
        )

    def _new_session(self, peer: Peer) -> Session:
        if len(self.sessions) >= self.limits.max_sessions:
            self._expire()
        if len(self.sessions) >= self.limits.max_sessions:
            raise _Refused(
                ErrorCode.TOO_MANY_OBJECTS,
                f"the server keeps {self.limits.max_sessions} sessions (limit)",
            )
        session = Session(self.tables)
        session.peer = peer
        self.sessions[session.token] = session
        peer.state[_STATE] = session
        return session

    def _attach(self, token: bytes | None = None) -> dict[str, Any]:
        """``objects.attach``: this connection's session (a new one, or the one ``token``
        names, moved here from the connection it had), its token, lease and names."""
        ctx = current_context()
        peer = self._peers.get(ctx.peer)
        if peer is None:
            raise _NotHere("objects.attach: remote objects need a TCP or TLS connection")
        resumed = False
        session: Session
        if token is not None:
            if type(token) is not bytes:
                raise TypeError("token must be bytes")
            found = self.sessions.get(token)
            if found is None or not found.matches(token):
                raise _session_expired()
            session = found
            here = peer.state.get(_STATE)
            if here is not session:
                if isinstance(here, Session) and here.peer is peer:
                    self._drop_session(here)
                old = session.peer
                if old is not None and old is not peer:
                    old.state.pop(_STATE, None)  # a half-open old connection: detached
                session.peer = peer
                session.expires = None
                peer.state[_STATE] = session
                if self._remotes_dropped:  # what it dropped while the client was away
                    host = self._host
                    if host is not None and host.loop is not None:
                        host.loop.call_soon(self._release_remotes)
            resumed = True
        else:
            current = peer.state.get(_STATE)
            if isinstance(current, Session):
                session = current
            else:
                try:
                    session = self._new_session(peer)
                except _Refused as exc:
                    raise _TooMany(exc.message) from None
        return {
            "session": session.token,
            "lease_ms": int(self.limits.lease * 1000),
            "resumed": resumed,
            "names": {name: r.exposed.iface for name, r in self.registered.items()},
            "ifaces": {
                r.exposed.iface: self._described(r.exposed) for r in self.registered.values()
            },
        }

    def _end(self, peer: Peer, session: Session) -> None:
        peer.state.pop(_STATE, None)
        questions = peer.state.pop(_QUESTIONS, None)  # its kept answers end with it
        peer.state.pop(_WAITING_IDS, None)
        for q in (questions or {}).values():  # the calls still waiting on them: answered
            for call in q.waiters:
                if not call.oneway:
                    _send_error(
                        peer,
                        call.request_id,
                        ErrorCode.SESSION_EXPIRED,
                        "SESSION_EXPIRED",
                        "the session ended while the call waited for the answer it names; "
                        "it did not run",
                    )
        peer.state.pop(_WAITING, None)
        peer.state.pop(_WAITING_BYTES, None)
        self._drop_session(session)

    def _drop_session(self, session: Session) -> None:
        self.sessions.pop(session.token, None)
        session.peer = None
        session.dead = True  # a call still running answers: nothing it returns is kept
        session.clear()
        for hook in self.on_session_end:
            try:
                hook(session)
            except Exception:
                log.exception("objects: a session-end hook failed")

    def current_session(self) -> Session | None:
        """The session of the call being served (inside a method this pattern runs), or
        None."""
        try:
            ctx = current_context()
        except LookupError:
            return None
        peer = self._peers.get(ctx.peer)
        session = peer.state.get(_STATE) if peer is not None else None
        return session if isinstance(session, Session) else None

    def _arm(self) -> None:
        host = self._host
        if self._timer is None and host is not None and host.loop is not None:
            tick = min(1.0, self.limits.lease / 4)
            self._timer = host.loop.call_later(tick, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._expire():
            self._arm()

    def _expire(self) -> bool:
        """Free the sessions whose lease ran out; True while detached ones remain."""
        now = self._clock()
        waiting = False
        for session in list(self.sessions.values()):
            if session.expires is None:
                continue
            if session.expires <= now:
                self._drop_session(session)
            else:
                waiting = True
        return waiting

    # ------------------------------------------------------------------ calls

    def _call(self, peer: Peer, call: Call, waited: bool = False) -> None:
        """Run ``call`` (``waited``: again, now that the question it names has its answer)."""
        oneway = call.oneway
        keep = call.keep and not oneway
        asked = waited  # its question is registered (a refused repeat must not fail the first)
        session: Session | None = None
        created: list[RemoteObject] = []  # the client's objects made of its arguments so far
        resolved = not call.has_refs
        try:
            if keep and not waited:
                self._ask(peer, call.request_id)
                asked = True
            session = self._session(peer)
            if type(call.target) is AnswerTarget:
                got = self._answered(peer, session, call)
                if got is None:
                    return  # waits for its question's answer
                obj, found = got
            else:
                obj, found = self._target(session, call)
            member = found.members.get(call.method)
            if member is None:
                raise _Refused(
                    ErrorCode.UNKNOWN_METHOD,
                    f"{found.iface} has no exposed member {call.method!r}",
                )
            # (a member's oneway is for its callers, who do not wait: a CALL without the flag
            # still gets its one answer)
            args, kwargs = call.args, call.kwargs
            if call.has_refs:
                questions = peer.state.get(_QUESTIONS) or {}
                q = _unanswered(args, questions) or _unanswered(kwargs, questions)
                if q is not None:  # a promise among the arguments: run once it is answered
                    self._wait_for(peer, q, call)
                    return
                args = self._resolve(session, args, questions=questions, created=created)
                kwargs = self._resolve(session, kwargs, questions=questions, created=created)
                resolved = True
            if member.kind == "property" and (args or kwargs):
                raise _Refused(
                    ErrorCode.BAD_ARGUMENTS,
                    f"{found.iface}.{member.name} is a property: no arguments",
                )
        except _Refused as exc:
            if not resolved and session is not None:  # its arguments' client objects: back
                self._give_back(session, call, created)
            if oneway:
                log.info("oneway call %r refused: %s", call.method, exc.message)
            else:
                _send_error(peer, call.request_id, exc.code, exc.name, exc.message)
            if keep and asked:  # (after its ERROR) pipelined calls on it fail the same way
                self._settled(peer, call.request_id, None, (exc.code, exc.name, exc.message))
            return
        req = Request(
            call.request_id,
            f"{found.iface}.{member.name}",
            [obj, *args],
            kwargs,
            call.codec,
            call.budget_ms,
            call.metadata,
            False,
            False,
            call.size,
        )
        answerer: _Answerer | None
        if oneway or keep:
            answerer = _Answerer(self, peer, session, member, oneway, keep)
        else:  # (a plain call's answerer keeps nothing of the call: one per session here)
            answerer = peer.state.get(_PLAIN)
            if answerer is None or answerer.session is not session:
                answerer = peer.state[_PLAIN] = _Answerer(self, peer, session, member, False)
        peer.submit(req, member.handler, answerer)

    # ------------------------------------------------------------------ pipelining

    def _ask(self, peer: Peer, qid: int) -> None:
        """A KEEP call arrived: its answer is kept for calls that name it (AnswerTarget)."""
        questions = _questions(peer)
        if qid in questions:
            raise _Refused(ErrorCode.BAD_TARGET, f"question {qid} is still kept: finish it first")
        if len(questions) >= MAX_QUESTIONS:
            raise _Refused(
                ErrorCode.TOO_MANY_OBJECTS,
                f"{MAX_QUESTIONS} kept answers on this connection (limit): finish some",
            )
        questions[qid] = _Question(qid)

    def _answered(self, peer: Peer, session: Session, call: Call) -> tuple[object, Exposed] | None:
        """The object a pipelined call targets, or None when it must wait for its question
        (queued: run when the answer comes, in arrival order)."""
        target = call.target
        assert type(target) is AnswerTarget
        q = _questions(peer).get(target.question)
        if q is None:
            raise _Refused(
                ErrorCode.BAD_TARGET,
                f"question {target.question} is not a kept call of this connection (or was "
                "finished)",
            )
        if not q.done:
            self._wait_for(peer, q, call)
            return None
        got = _kept(session, q, target.question, target.path, ErrorCode.BAD_TARGET)
        if got[1] is None:
            raise _Refused(
                ErrorCode.PROMISE_ELSEWHERE,
                f"the answer to question {target.question} holds, at {list(target.path)}, an "
                "object of the caller's own: call it there",
            )
        return got  # type: ignore[return-value]  # (its Exposed: checked above)

    def _wait_for(self, peer: Peer, q: _Question, call: Call) -> None:
        """Queue ``call`` until question ``q`` is answered (then it runs, in arrival order);
        bounded per connection in calls and in bytes (OVERLOADED)."""
        waiting = peer.state.get(_WAITING, 0)
        if waiting >= MAX_WAITERS:
            raise _Refused(
                ErrorCode.OVERLOADED,
                f"{MAX_WAITERS} pipelined calls wait on this connection (limit)",
            )
        held = peer.state.get(_WAITING_BYTES, 0)
        bound = self._host.limits.max_in_flight_bytes if self._host is not None else 1 << 25
        if held + call.size > bound:
            raise _Refused(
                ErrorCode.OVERLOADED,
                f"pipelined calls waiting on this connection hold {held} bytes "
                f"(limit {bound}: max_in_flight_bytes)",
            )
        peer.state[_WAITING] = waiting + 1
        peer.state[_WAITING_BYTES] = held + call.size
        # Every question the call names stays kept until it runs (a FINISH meanwhile: once it
        # ran), whichever one it waits for.
        pins: list[_Question] = []
        questions = peer.state.get(_QUESTIONS) or {}
        for named in _named_questions(call):
            p = questions.get(named)
            if p is not None:
                p.pins += 1
                pins.append(p)
        q.waiters.append(call)
        q.arrived.append(self._clock())
        q.pinned.append(pins)
        if call.request_id:  # (CANCEL finds it here)
            peer.state.setdefault(_WAITING_IDS, {})[call.request_id] = q

    def cancel(self, peer: Peer, request_id: int) -> bool:
        """CANCEL of a pipelined call still waiting for its question: it does not run; it is
        answered ERROR CANCELLED as a running call is (and, a KEEP call, the calls on it fail
        the same way)."""
        ids = peer.state.get(_WAITING_IDS)
        q = ids.pop(request_id, None) if ids else None
        if q is None:
            return False
        for i, call in enumerate(q.waiters):
            if call.request_id == request_id:
                del q.waiters[i]
                del q.arrived[i]
                _unpin(peer.state.get(_QUESTIONS) or {}, q.pinned.pop(i))
                break
        else:
            return False
        peer.state[_WAITING] = max(0, peer.state.get(_WAITING, 0) - 1)
        peer.state[_WAITING_BYTES] = max(0, peer.state.get(_WAITING_BYTES, 0) - call.size)
        session = peer.state.get(_STATE)
        if call.has_refs and isinstance(session, Session):
            self._give_back(session, call, [])
        _send_error(peer, request_id, *_CANCELLED)
        if call.keep:
            self._settled(peer, request_id, None, _CANCELLED)
        return True

    def _settled(
        self, peer: Peer, qid: int, value: Any, failure: tuple[int, str, str] | None
    ) -> None:
        """Question ``qid`` has its answer: keep its objects by path (or its failure), then run
        the calls that waited for it. Iterative: a waiter that is a question itself is settled
        after this one's waiters ran (a chain of a thousand links needs no deep stack)."""
        questions = _questions(peer)
        q = questions.get(qid)
        if q is None or q.done:
            return
        if not q.waiters:  # nothing waits for it (a chain's calls came after its answer)
            self._settle_one(peer, qid, value, failure)
            return
        pending: collections.deque[tuple[int, Any, tuple[int, str, str] | None]] | None = (
            peer.state.get(_SETTLING)
        )
        if pending is not None:  # inside a settle: after the current one
            pending.append((qid, value, failure))
            return
        pending = peer.state[_SETTLING] = collections.deque([(qid, value, failure)])
        try:
            while pending:
                self._settle_one(peer, *pending.popleft())
        finally:
            peer.state.pop(_SETTLING, None)

    def _settle_one(
        self, peer: Peer, qid: int, value: Any, failure: tuple[int, str, str] | None
    ) -> None:
        questions = _questions(peer)
        q = questions.get(qid)
        if q is None or q.done:
            return
        q.done = True
        if failure is not None:
            q.failure = failure
        elif type(value) not in _SCALARS:
            _paths(value, (), q.refs)
        waiters, q.waiters = q.waiters, []
        arrived, q.arrived = q.arrived, []
        pinned, q.pinned = q.pinned, []
        if waiters:
            ids = peer.state.get(_WAITING_IDS)
            if ids:
                for c in waiters:
                    ids.pop(c.request_id, None)
            peer.state[_WAITING] = max(0, peer.state.get(_WAITING, 0) - len(waiters))
            held = sum(c.size for c in waiters)
            peer.state[_WAITING_BYTES] = max(0, peer.state.get(_WAITING_BYTES, 0) - held)
            now = self._clock()
            for call, t0, pins in zip(waiters, arrived, pinned, strict=True):
                budget = call.budget_ms
                late = False
                if budget is not None:  # its budget counts from its arrival, as a REQUEST's
                    left = budget - int((now - t0) * 1000)
                    late = left <= 0
                    if not late:
                        call = dataclasses.replace(call, budget_ms=left)
                if late:
                    self._late(peer, call)
                else:
                    self._call(peer, call, waited=True)  # (pins again if it waits again)
                _unpin(questions, pins)
        if q.finished and not q.pins and questions.get(qid) is q:  # (its waiters ran on it)
            del questions[qid]

    def _late(self, peer: Peer, call: Call) -> None:
        """A pipelined call whose deadline passed while it waited: it does not run."""
        session = peer.state.get(_STATE)
        if call.has_refs and isinstance(session, Session):
            self._give_back(session, call, [])
        if not call.oneway:
            _send_error(peer, call.request_id, *_LATE_FAILURE)
        if call.keep:  # (after its ERROR) calls waiting on it fail the same way
            self._settled(peer, call.request_id, None, _LATE_FAILURE)

    def _finish(self, peer: Peer, qids: Sequence[int]) -> None:
        questions = peer.state.get(_QUESTIONS)
        if not questions:
            return
        for qid in qids:
            q = questions.get(qid)
            if q is None:
                continue
            q.finished = True  # its answer not sent yet: nil (_Answerer)
            if q.done and not q.pins:
                del questions[qid]
            # else dropped once answered and no waiting call names it (they still run)

    def _target(self, session: Session, call: Call) -> tuple[object, Exposed]:
        target = call.target
        if type(target) is ObjectTarget:
            entry = session.get(target.id)
            if entry is None:
                raise _Refused(
                    ErrorCode.UNKNOWN_OBJECT,
                    "no such object in this session (never given to it, or released)",
                )
            return entry.obj, entry.exposed
        if type(target) is NameTarget:
            return self._named(session, target.name)
        if type(target) is AnswerTarget:
            raise _Refused(ErrorCode.BAD_TARGET, "calls on a call's answer are not served here")
        raise _Refused(ErrorCode.BAD_TARGET, "unknown target")

    def _named(self, session: Session, name: str) -> tuple[object, Exposed]:
        reg = self.registered.get(name)
        if reg is None:
            raise _Refused(ErrorCode.UNKNOWN_OBJECT, f"no object registered as {name!r}")
        if reg.mode == "single":
            return reg.target, reg.exposed
        if reg.mode == "percall":
            return _instantiate(reg), reg.exposed
        held = session.instances.get(name)
        if held is not None and held[0] is reg:
            return held[1], reg.exposed
        obj = _instantiate(reg)  # (a name registered again: a new instance of the new one)
        try:
            session.keep_instance(name, reg, obj)
        except TooManyObjects as exc:
            raise _Refused(ErrorCode.TOO_MANY_OBJECTS, str(exc)) from None
        return obj, reg.exposed

    def _resolve(
        self,
        session: Session,
        value: Any,
        depth: int = 0,
        questions: Mapping[int, _Question] | None = None,
        created: list[RemoteObject] | None = None,
    ) -> Any:
        """``value`` with the references in it replaced by the objects they name (this
        session's exports, or registered names). BAD_ARGUMENTS for a reference that names
        nothing here, or values nested deeper than 64 levels."""
        if depth > _MAX_DEPTH:
            raise _Refused(
                ErrorCode.BAD_ARGUMENTS, f"arguments nested deeper than {_MAX_DEPTH} levels"
            )
        if type(value) is Ref:
            if value.form == FORM_HOME:
                if value.id is not None:
                    entry = session.get(value.id)
                    if entry is None:
                        raise _Refused(
                            ErrorCode.BAD_ARGUMENTS,
                            "an argument names an object this session does not hold",
                        )
                    return entry.obj
                if value.name is not None:
                    try:
                        return self._named(session, value.name)[0]
                    except _Refused as exc:
                        raise _Refused(ErrorCode.BAD_ARGUMENTS, exc.message) from None
            if value.form == FORM_SENDER and value.id is not None:
                robj = RemoteObject(self, session, value.id, value.iface)  # a callback
                if created is not None:
                    created.append(robj)
                return robj
            if value.form == FORM_PROMISE and value.question is not None:
                q = questions.get(value.question) if questions else None
                if q is None or not q.done:
                    raise _Refused(
                        ErrorCode.BAD_ARGUMENTS,
                        f"an argument names question {value.question}, not a kept call of "
                        "this connection (or finished)",
                    )
                # (the caller's own object at that path: passed as it is, a RemoteObject)
                return _kept(session, q, value.question, value.path, ErrorCode.BAD_ARGUMENTS)[0]
            raise _Refused(
                ErrorCode.BAD_ARGUMENTS,
                "an argument is a reference this server cannot take (its own objects and the "
                "caller's)",
            )
        if type(value) is list:
            return [self._resolve(session, v, depth + 1, questions, created) for v in value]
        if type(value) is dict:
            return {
                k: self._resolve(session, v, depth + 1, questions, created)
                for k, v in value.items()
            }
        return value

    def _give_back(self, session: Session, call: Call, created: list[RemoteObject]) -> None:
        """A CALL that will not run: each crossing of the client's objects it carried goes
        back to the client (RELEASE), but those already made RemoteObjects (they give
        themselves back when dropped)."""
        ids = [r.id for r in _call_refs(call) if r.form == FORM_SENDER and r.id is not None]
        for robj in created:
            try:
                ids.remove(robj._id)
            except ValueError:
                pass
        for key in ids:
            self._remote_dropped(session, key)

    # ------------------------------------------------------------------ callbacks

    def _callback(
        self, robj: RemoteObject, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Call ``method`` of a client's object over its session's connection (CALL from the
        server, answered with RETURN). From a worker thread: blocks for the answer. On the
        event loop (an ``async def`` method): returns an awaitable of it."""
        session = robj._session
        peer = session.peer
        host = self._host
        if peer is None or host is None or host.loop is None:
            raise ConnectionLost("the client's connection is gone: its objects cannot be called")
        loop = host.loop
        timeout = self.callback_timeout
        served = served_call()
        if served is not None and served.deadline is not None:
            timeout = max(0.0, min(timeout, served.deadline - time.monotonic()))
        on_loop = threading.get_ident() == self._loop_thread
        out: dict[int, Any] = peer.state.setdefault(_OUT, {})
        if len(out) >= MAX_CALLBACKS:
            raise RemoteError(
                "OVERLOADED",
                f"{MAX_CALLBACKS} calls to this client are waiting (limit)",
                ErrorCode.OVERLOADED,
            )
        fut: Any = loop.create_future() if on_loop else concurrent.futures.Future()
        rid = self._next_rid(out, fut)
        made: list[bytes] = []

        to_ref = self._exporter(session, made)
        budget = budget_ms(timeout)
        try:
            frame = encode_call(
                rid,
                ObjectTarget(robj._id),
                method,
                list(args),
                kwargs or None,
                budget_ms=budget,
                to_ref=to_ref,
            )
        except BaseException as exc:
            out.pop(rid, None)
            for key in made:
                session.release(key, 1)
            if type(exc) is Handoff and on_loop:  # another server's object: its token first
                again = functools.partial(self._callback, robj, method, args, kwargs)
                return call_later([list(args), kwargs], again)
            raise
        what = f"{robj._iface}.{method}"

        def send() -> None:
            core = peer.core
            if core is None or out.get(rid) is not fut:
                _fail(fut, ConnectionLost("the client's connection is gone"))
                return
            try:
                core.send_message(frame)
            except LocalProtocolError as exc:
                out.pop(rid, None)
                _fail(fut, exc)
                return
            peer.flush()

        def abort() -> None:
            if out.pop(rid, None) is not None and peer.core is not None:
                try:
                    peer.core.send_message(encode_abort(rid))
                    peer.flush()
                except LocalProtocolError:
                    pass

        if on_loop:
            send()

            async def wait() -> Any:
                try:
                    return await asyncio.wait_for(fut, timeout)
                except TimeoutError:
                    abort()
                    raise CallTimeout(what, timeout) from None

            return wait()
        # A worker thread waits: its slot goes back to the pool meanwhile (the client decides
        # when this ends: it must not take the workers other calls need), and the served
        # call's CANCEL (or deadline) ends the wait.
        ctx = served_context(served)
        remove = None
        if ctx is not None:

            def stopped(code: int) -> None:  # (on the loop, or here if stopped already)
                _fail(fut, CallAborted(code))
                loop.call_soon_threadsafe(abort)

            remove = ctx.on_abort(stopped)
        waiting = getattr(host, "dispatcher", None)
        try:
            with waiting.waiting() if waiting is not None else contextlib.nullcontext():
                loop.call_soon_threadsafe(send)
                try:
                    return fut.result(timeout)
                except concurrent.futures.TimeoutError:
                    loop.call_soon_threadsafe(abort)
                    raise CallTimeout(what, timeout) from None
        except RemoteError as exc:
            if exc.code == ErrorCode.OVERLOADED and out.get(rid) is fut:
                # Refused before it was sent (no slot for one more wait): nothing of it stays.
                out.pop(rid, None)
                for key in made:
                    session.release(key, 1)
            raise
        finally:
            if remove is not None:
                remove()

    def _exporter(
        self, session: Session, made: list[bytes], ids: dict[int, bytes] | None = None
    ) -> Callable[[object], Ref | None]:
        """The references of what crosses to ``session`` (msgpack ext 2): an exposed object is
        exported to it (``made`` gets its id, to give back if the frame is not sent; ``ids``,
        when given, maps ``id(obj)`` to it); the client's own object goes home."""
        ifaces = self._ifaces

        def to_ref(obj: object) -> Ref | None:
            if type(obj) is RemoteObject:  # the client's own object, going home
                return Ref(FORM_HOME, id=obj._id) if obj._session is session else None
            found = exposed(type(obj))
            if found is None:
                return third_ref(obj)  # another server's object: handed on (handoff.py)
            if found.iface not in ifaces:
                ifaces[found.iface] = found  # (bounded by the exposed classes in the code)
            key = session.export(obj, found)
            made.append(key)
            if ids is not None:
                ids[id(obj)] = key
            return Ref(FORM_SENDER, id=key, iface=found.iface)

        return to_ref

    def _remote_dropped(self, session: Session, key: bytes) -> None:
        if session.dead:
            return
        self._remotes_dropped.append((session, key))
        if self._remotes_flush:
            return
        host = self._host
        loop = host.loop if host is not None else None
        if loop is None or loop.is_closed():
            return
        self._remotes_flush = True
        try:
            loop.call_soon_threadsafe(self._release_remotes)
        except RuntimeError:  # the loop closed meanwhile
            self._remotes_flush = False

    def _release_remotes(self, only: Session | None = None) -> None:
        """RELEASE to each client the crossings of its objects this server dropped (a session
        not attached now keeps them until it is: ``only``, when it attaches)."""
        self._remotes_flush = False
        counts: dict[Session, dict[bytes, int]] = {}
        dropped = self._remotes_dropped
        for _ in range(len(dropped)):
            session, key = dropped.popleft()
            if session.dead:
                continue
            per = counts.setdefault(session, {})
            per[key] = per.get(key, 0) + 1
        for session, per in counts.items():
            peer = session.peer
            core = peer.core if peer is not None else None
            if core is None:
                for key, n in per.items():  # later, once attached
                    dropped.extend([(session, key)] * n)
                continue
            items = list(per.items())
            for i in range(0, len(items), MAX_RELEASE_ENTRIES):
                core.send_message(encode_release(items[i : i + MAX_RELEASE_ENTRIES]))
            peer.flush()

    def _next_rid(self, out: dict[int, Any], fut: Any) -> int:
        """A fresh id for a call to a client, reserved for ``fut`` (worker threads choose them
        at once: under a lock)."""
        with self._rid_lock:
            rid = self._rid
            for _ in range(MAX_CALLBACKS + 2):
                rid = rid % 0xFFFFFFFF + 1
                if rid not in out:
                    break
            self._rid = rid
            out[rid] = fut
            return rid

    def _returned(self, peer: Peer, msg: Return) -> None:
        """A client's RETURN: the answer to one of this server's calls (a late one, after its
        ABORT or timeout, is dropped)."""
        out = peer.state.get(_OUT)
        fut = out.pop(msg.request_id, None) if out else None
        if fut is None:
            return
        session = peer.state.get(_STATE)
        if not msg.ok:
            err = remote_error(Error(msg.request_id, msg.code, msg.type, msg.message))
            _fail(fut, err)
            return
        value = msg.result
        if msg.has_refs and isinstance(session, Session):
            try:
                value = self._resolve(session, value)
            except _Refused as exc:
                _fail(fut, RemoteError(exc.name, exc.message, exc.code))
                return
        if not fut.done():
            fut.set_result(value)


def _send_error(peer: Peer, rid: int, code: int, name: str, message: str) -> None:
    """ERROR for a call refused here, after the answers written at the end of this loop turn
    if there are some (answers leave in order)."""
    deferred = peer.state.get(_DEFERRED)
    if deferred is not None:
        deferred.append(functools.partial(_send_error_now, peer, rid, code, name, message))
    else:
        _send_error_now(peer, rid, code, name, message)


def _send_error_now(peer: Peer, rid: int, code: int, name: str, message: str) -> None:
    core = peer.core
    if core is not None:
        core.send_error(rid, code, name, message)


def _fail(fut: Any, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


class RemoteObject:
    """A client's object, as a method on the server sees it (passed as an argument): its
    exposed methods called over the client's connection. From a plain ``def`` method (a worker
    thread) a call blocks; from an ``async def`` method it is awaited. Bounded by the served
    call's deadline and ``callback_timeout`` (10 s); a call that times out is aborted."""

    __slots__ = ("_id", "_iface", "_pattern", "_session")

    def __init__(self, pattern: Objects, session: Session, key: bytes, iface: str) -> None:
        self._pattern = pattern
        self._session = session
        self._id = key
        self._iface = iface

    def __del__(self) -> None:
        # One crossing of the client's object given back (RELEASE to the client): dropped by
        # the garbage collector, on whatever thread; sent from the event loop.
        try:
            self._pattern._remote_dropped(self._session, self._id)
        except Exception:  # (interpreter shutdown, a half-made object)
            pass

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        pattern, me = self._pattern, self

        def call(*args: Any, **kwargs: Any) -> Any:
            return pattern._callback(me, name, args, kwargs)

        return call

    def __repr__(self) -> str:
        return f"<the client's {self._iface or 'object'}>"


def _instantiate(reg: _Registered) -> object:
    cls = reg.target
    assert isinstance(cls, type)
    try:
        return cls()
    except Exception as exc:
        raise _Refused(
            ErrorCode.UNEXPECTED_ERROR, f"{reg.name}: {cls.__name__}() failed: {exc}"
        ) from None


class _Expired(ServiceError):
    """objects.attach with a token no session has (any more): ERROR SESSION_EXPIRED."""

    _sockstack_code = ErrorCode.SESSION_EXPIRED
    __sockstack_name__ = "SESSION_EXPIRED"


class _TooMany(ServiceError):
    _sockstack_code = ErrorCode.TOO_MANY_OBJECTS
    __sockstack_name__ = "TOO_MANY_OBJECTS"


class _BadArguments(ServiceError):
    _sockstack_code = ErrorCode.BAD_ARGUMENTS
    __sockstack_name__ = "BAD_ARGUMENTS"


class _NotHere(ServiceError):
    _sockstack_code = ErrorCode.UNKNOWN_METHOD
    __sockstack_name__ = "UNKNOWN_METHOD"


def _session_expired() -> Exception:
    return _Expired("the session is unknown or its lease ran out")


class _Answerer:
    """The answer to one CALL: RESPONSE with its result (references exported to the session)
    or ERROR; nothing for a oneway call (a failure is logged).

    A KEEP call's answer is written at the end of this loop turn, and every answer after it on
    the connection too (in order): a FINISH read in the same turn (a client's promise dropped
    before its answer came: the pipelined calls after it are in the same write) makes its
    RESPONSE nil, with nothing exported that the client would only give back. The calls that
    waited for the question run at once (on the objects the question keeps)."""

    __slots__ = ("keep", "member", "oneway", "pattern", "peer", "question", "session")

    def __init__(
        self,
        pattern: Objects,
        peer: Peer,
        session: Session,
        member: Member,
        oneway: bool,
        keep: bool = False,
    ) -> None:
        self.pattern = pattern
        self.peer = peer
        self.session = session
        self.member = member
        self.oneway = oneway
        self.keep = keep
        self.question: _Question | None = None

    def __call__(self, req: Request, outcome: Outcome, ctx: CallContext | None) -> None:
        peer = self.peer
        deferred: list[Callable[[], None]] | None = peer.state.get(_DEFERRED)
        if deferred is None and not self.keep and not self.oneway and outcome[0]:
            # The common answer, at once: a scalar result, no trailers to send.
            value = outcome[1]
            core = peer.core
            if (
                type(value) in _SCALARS
                and core is not None
                and (ctx is None or (req.budget_ms is None and req.metadata is None))
            ):
                try:
                    core.send_response(req.request_id, value, MSGPACK)
                    return
                except (CodecError, LocalProtocolError):
                    pass  # (said by the general path)
        if self.keep:
            self.question = _questions(peer).get(req.request_id)
            if outcome[0] and not self.oneway:
                # The calls on its promise run before its answer is written (end of this
                # turn): an answer that could not be written fails them now, as it would.
                problem = self._unsendable(outcome[1])
                if problem is not None:
                    log.warning("method %r: %s", req.method, problem[2])
                    outcome = (False, problem)
        if deferred is None and (self.keep and not self.oneway):
            host = self.pattern._host
            loop = host.loop if host is not None else None
            if loop is not None:
                deferred = peer.state[_DEFERRED] = []
                loop.call_soon(self._write_deferred, peer)
        if deferred is not None and not self.oneway:
            deferred.append(functools.partial(self._answer, req, outcome, ctx))
        else:
            self._answer(req, outcome, ctx)
        if self.keep:  # after its answer (queued): pipelined calls' answers come after it
            failure = None if outcome[0] else outcome[1]
            value = outcome[1] if failure is None else None
            self.pattern._settled(peer, req.request_id, value, failure)

    def _unsendable(self, value: Any) -> tuple[int, str, str] | None:
        """Why ``value`` could not be answered (its objects past the session's bounds, a value
        the codec refuses), or None; nothing exported (the answer exports when written)."""
        if type(value) in _SCALARS:
            return None
        objs: list[object] = []
        if exposed(type(value)) is not None:
            objs.append(value)
        else:

            def placeholder(obj: object) -> Ref | None:
                if type(obj) is RemoteObject:
                    return _PLACEHOLDER
                if exposed(type(obj)) is not None:
                    objs.append(obj)
                    return _PLACEHOLDER
                try:
                    return third_ref(obj)
                except Handoff:
                    return _PLACEHOLDER

            try:
                pack(value, placeholder)
            except CodecError as exc:
                return (ErrorCode.RESULT_NOT_ENCODABLE, "RESULT_NOT_ENCODABLE", str(exc))
        why = self.session.room_for(objs)
        if why is not None:
            return (ErrorCode.TOO_MANY_OBJECTS, "TOO_MANY_OBJECTS", why)
        return None

    @staticmethod
    def _write_deferred(peer: Peer) -> None:
        deferred = peer.state.pop(_DEFERRED, None)
        if not deferred:
            return
        for answer in deferred:
            answer()
        peer.flush()

    def _answer(self, req: Request, outcome: Outcome, ctx: CallContext | None) -> None:
        q = self.question
        ids: dict[int, bytes] | None = None
        try:
            ids = self._answer_with(req, outcome, ctx, q)
        finally:
            if q is not None and q.keys is None and not q.finished:
                q.exported(ids)  # (a FINISHed one keeps its objects for the calls it pins)

    def _answer_with(
        self, req: Request, outcome: Outcome, ctx: CallContext | None, q: _Question | None
    ) -> dict[int, bytes] | None:
        """Answer; for a KEEP call, the ids its objects were exported under (None: its
        RESPONSE was not written; the calls that name it later fail as it did)."""
        ok, value = outcome
        if self.oneway:
            if not ok:
                log.info("oneway call %r failed: %s", req.method, value[2])
            return None
        core = self.peer.core
        if core is None:
            return None  # the connection is gone: nobody to answer
        trailers = None
        if ctx is not None and (req.budget_ms is not None or req.metadata is not None):
            trailers = ctx.trailers
        if ok:
            if q is not None and q.finished:  # the client gave its references up: none sent
                value = None
            made: list[bytes] = []
            ids: dict[int, bytes] | None = {} if q is not None and q.refs else None
            try:
                frame = self._response(req.request_id, value, trailers, made, ids)
                core.send_message(frame)
                return ids
            except Handoff:  # another server's object: answered once it has its token
                answer_later(self, req, outcome, ctx, made)
                return None
            except TooManyObjects as exc:
                value = (ErrorCode.TOO_MANY_OBJECTS, "TOO_MANY_OBJECTS", str(exc))
            except CodecError as exc:
                value = (ErrorCode.RESULT_NOT_ENCODABLE, "RESULT_NOT_ENCODABLE", str(exc))
            except LocalProtocolError as exc:
                value = (ErrorCode.RESULT_TOO_LARGE, "RESULT_TOO_LARGE", exc.message)
            for key in made:  # not sent: what it exported for the client is not the client's
                self.session.release(key, 1)
            log.warning("method %r: %s", req.method, value[2])
            if q is not None and q.failure is None:  # later calls on it fail as it did
                q.failure = value
        code, type_name, message = value
        core.send_error(req.request_id, code, type_name, message, metadata=trailers)
        return None

    def _response(
        self,
        rid: int,
        value: Any,
        trailers: Mapping[str, str | bytes] | None,
        made: list[bytes],
        ids: dict[int, bytes] | None = None,
    ) -> bytes:
        if type(value) in _SCALARS:
            return encode_response_with_refs(rid, value, to_ref=None, metadata=trailers or None)
        to_ref = self.pattern._exporter(self.session, made, ids)
        return encode_response_with_refs(rid, value, to_ref=to_ref, metadata=trailers or None)


def describe(found: Exposed) -> dict[str, Any]:
    """An exposed class for clients: its members, each a method or a property, which are
    oneway, and which return a remote object (``refs``: method -> the exposed class's name; a
    client may pipeline calls on their results)."""
    refs = {}
    for name, m in found.members.items():
        iface = _result_iface(m)
        if iface is not None and m.kind == "method" and not m.oneway:
            refs[name] = iface
    return {
        "methods": sorted(n for n, m in found.members.items() if m.kind == "method"),
        "properties": sorted(n for n, m in found.members.items() if m.kind == "property"),
        "oneway": sorted(n for n, m in found.members.items() if m.oneway),
        "refs": refs,
    }


def _result_iface(member: Member) -> str | None:
    """The exposed class a member's return annotation names (``X`` or ``X | None``)."""
    try:
        hints = typing.get_type_hints(member.handler.func)
    except Exception:
        return None
    ret = hints.get("return")
    options = (
        typing.get_args(ret)
        if typing.get_origin(ret) in (typing.Union, types.UnionType)
        else (ret,)
    )
    for t in options:
        if isinstance(t, type) and t is not type(None):
            found = exposed(t)
            return found.iface if found is not None else None
    return None
