"""The client side of remote objects: one session per connection, its imports, and proxies.

:func:`lookup` connects (a blocking client of its own), attaches a session and returns a
:class:`Proxy` of a registered name; calls on it are CALL frames (PROTOCOL.md §4.5) answered
with RESPONSE/ERROR. A result that holds references comes back with a proxy for each (one
proxy per remote object, however often it crosses). What this client holds is counted per
object; a proxy dropped by the garbage collector (or :func:`release`) queues a RELEASE with its
count, sent with the next call (or at close): the server frees what no client holds. Nothing
is sent from the garbage collector itself (a finalizer only appends to a queue).

When the connection drops and comes back, the next call first re-attaches the session with its
token: within the server's lease the objects are still there and proxies go on working; after
it, the call raises :class:`~sockstack.errors.SessionExpired`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import inspect
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from sockstack.asyncio.client import AsyncClient, StreamChannel
from sockstack.errors import (
    CallTimeout,
    CodecError,
    ConnectError,
    ConnectionLost,
    ErrorCode,
    LocalProtocolError,
    RemoteError,
    RemoteProtocolError,
    SessionExpired,
    wire_name,
)
from sockstack.host.dispatch import ServiceError
from sockstack.objects import handoff
from sockstack.objects.expose import exposed
from sockstack.objects.messages import (
    OBJECTS_MESSAGES,
    AnswerTarget,
    Call,
    NameTarget,
    ObjectTarget,
    Release,
    Target,
    answer_meta,
    call_meta,
    decode_response_refs,
    encode_call,
    encode_call_meta,
    encode_release,
    encode_renew,
    encode_return,
    encode_return_error,
)
from sockstack.objects.refs import FORM_HOME, FORM_PROMISE, FORM_SENDER, FORM_THIRD, Ref
from sockstack.protocol.calls import budget_ms, deadline_passed
from sockstack.protocol.codecs import MSGPACK
from sockstack.protocol.connection import Connection
from sockstack.protocol.events import Response
from sockstack.protocol.frames import Frame, MessageType
from sockstack.protocol.messages import (
    CORE_MESSAGES,
    FEATURE_DEADLINE,
    FLAG_METADATA,
    split_meta,
)
from sockstack.protocol.registry import MessageSet, MessageSpec, Registry
from sockstack.sync.client import Client, StreamConnection, Ticket
from sockstack.transport.urls import parse_endpoint

__all__ = [
    "AsyncObjectClient",
    "AsyncPromise",
    "AsyncProxy",
    "Batch",
    "ObjectClient",
    "Pending",
    "Promise",
    "Proxy",
    "alookup",
    "batch",
    "close",
    "lookup",
    "release",
    "resolve",
]

_SCALARS = frozenset({type(None), bool, int, float, str, bytes})  # (no reference in them)
_SLOW: Any = object()  # ObjectClient._quick: take the general path
_PID = [os.getpid()]  # this process's id (set again in a forked child: no system call per call)
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))
_DUE = 64  # RELEASE entries due that a promise's CALL takes with it (else the next call)
MAX_EXPORTS = 10_000
"""This client's own objects the server may hold (callbacks), per session."""
CALLBACK_THREADS = 4
MAX_QUEUED_CALLBACKS = 1_000
log = logging.getLogger("sockstack.objects")


def _decode_response_refs(f: Frame) -> Response:
    """RESPONSE on an object session: a msgpack body may hold references (ext 2)."""
    if f.codec != 1:
        return _CORE_RESPONSE.decode(f)  # type: ignore[return-value]
    metadata = None
    if f.flags & FLAG_METADATA:
        metadata = split_meta(f.meta, FLAG_METADATA, "RESPONSE")[1]
    value, _ = decode_response_refs(f.body)
    return Response(f.request_id, value, 1, metadata)


_CORE_RESPONSE: MessageSpec = next(
    s for s in CORE_MESSAGES.specs if s.type == int(MessageType.RESPONSE)
)
OBJECT_SESSION_MESSAGES = MessageSet(
    "session",
    CORE_MESSAGES.first,
    CORE_MESSAGES.last,
    tuple(
        dataclasses.replace(s, decode=_decode_response_refs, fast=None)
        if s.type == int(MessageType.RESPONSE)
        else s
        for s in CORE_MESSAGES.specs
    ),
)
"""The core's messages with RESPONSE decoded as an object session reads it (references)."""


def object_registry() -> Registry:
    return Registry([OBJECT_SESSION_MESSAGES, OBJECTS_MESSAGES])


class _Client(Client):
    """A blocking client whose sessions decode object messages and references."""

    def _configure(self, *args: Any, **kwargs: Any) -> None:
        super()._configure(*args, **kwargs)
        self.registry = object_registry()


class _Import:
    __slots__ = ("count", "generation", "proxy")

    def __init__(self, proxy: Any, generation: int) -> None:
        self.count = 0
        self.proxy: weakref.ref[Any] = weakref.ref(proxy)
        self.generation = generation


class _Held:
    """What a client holds of its session, whichever the I/O: one entry per remote object (its
    count and its proxy), the queue of dropped proxies and the RELEASEs not sent yet, the token,
    the lease, and the names and interfaces the server described."""

    proxy_type: type[Proxy] | type[AsyncProxy]

    def _init_held(self, timeout: float) -> None:
        self.timeout = timeout
        self._lock = threading.RLock()
        self._imports: dict[bytes, _Import] = {}
        self._generation = 0
        # (id, generation) of proxies the garbage collector dropped: only appended to there
        self._dropped: collections.deque[tuple[bytes, int]] = collections.deque()
        self._unsent: list[tuple[bytes, int]] = []  # RELEASEs that did not reach the session
        self._finished: list[int] = []  # KEEP questions to FINISH (with the next RELEASE)
        self._undescribed: set[str] = set()  # interfaces of proxies made, not described yet
        self._exports: dict[bytes, object] = {}  # this client's objects the server may call
        self.on_new_session: list[Callable[[], None]] = []
        """Called (blocking client: in the thread that found out) after the session expired
        and a new one was attached: e.g. to register names again."""
        self._export_ids: dict[int, bytes] = {}  # id(obj) -> its id
        self._export_counts: dict[bytes, int] = {}  # crossings the server has not given back
        # promises dropped before they were resolved: their answers' references to give back
        self._dropped_promises: collections.deque[_PromiseBox] = collections.deque()
        self._waiting_promises: list[_PromiseBox] = []  # dropped, answer not come yet
        self._answers_seen = 0
        self._token: bytes | None = None
        self._attached: object = None  # the connection the session is attached on
        self.lease = 30.0
        self.names: dict[str, str] = {}
        self.ifaces: dict[str, dict[str, Any]] = {}
        self.closed = False
        self._last_send = 0.0
        self._pid = os.getpid()
        self._metas: dict[tuple[Target, str], bytes] = {}  # call_meta() by target, method
        self._names: dict[str, bytes] = {}  # method names checked by call_meta(), in UTF-8
        self.epoch = 0
        """+1 each time the session is replaced (expired): proxies of an older one are dead."""

    def _took(self, info: Mapping[str, Any]) -> None:
        """objects.attach's answer."""
        if self._token is not None and not info.get("resumed"):
            self._forget_imports()
        self._token = info["session"]
        self.lease = info["lease_ms"] / 1000.0
        self.names.update(info.get("names", {}))
        self.ifaces.update(info.get("ifaces", {}))

    def _forget_imports(self) -> None:
        """The session is gone: what this client held of it is gone with it (its proxies
        raise :class:`~sockstack.errors.SessionExpired` from now on)."""
        with self._lock:
            self._imports.clear()
            self._dropped.clear()
            self._unsent.clear()
            self._finished.clear()
            self._dropped_promises.clear()
            self._waiting_promises.clear()
            # (what it gave the old session: nobody there may call it any more)
            self._exports.clear()
            self._export_ids.clear()
            self._export_counts.clear()
            self._generation += 1
            self.epoch += 1

    def _check_epoch(self, target: Target, epoch: int) -> None:
        if epoch != self.epoch and type(target) is ObjectTarget:
            raise _expired()

    def _frame(
        self,
        target: Target,
        method: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        budget: int | None,
        oneway: bool,
        keep: bool = False,
    ) -> Callable[[int], bytes]:
        kw = dict(kwargs) if kwargs else None
        if any(isinstance(a, Promise) for a in args) or (
            kw and any(isinstance(v, Promise) for v in kw.values())
        ):  # a promise as an argument: its question (form 3), or its object once it came
            args = [self._promised(a) if isinstance(a, Promise) else a for a in args]
            if kw:
                kw = {k: self._promised(v) if isinstance(v, Promise) else v for k, v in kw.items()}

        def frame(rid: int) -> bytes:
            return encode_call(
                0 if oneway else rid,
                target,
                method,
                list(args),
                kw,
                budget_ms=budget,
                oneway=oneway,
                keep=keep,
                to_ref=self._to_ref,
            )

        return frame

    def _promised(self, promise: Promise) -> Any:
        """A promise passed as an argument: the reference to its question (form 3: the server
        runs the call once the answer is there, without a round trip here) while its answer
        has not come on this connection; else its object (waits for it)."""
        if (
            promise._client is self
            and promise._value is _UNSET
            and not promise._box.ticket.done()
            and promise._box.conn_core is self._stream.core
        ):
            return Ref(FORM_PROMISE, question=promise._box.ticket.request_id, path=())
        return resolve(promise)

    def _to_ref(self, obj: object) -> Ref | None:
        if type(obj) is self.proxy_type:
            assert isinstance(obj, Proxy | AsyncProxy)
            if obj._client is not self:
                raise CodecError("a proxy of another connection cannot be passed here")
            target = obj._target
            if type(target) is ObjectTarget:
                return Ref(FORM_HOME, id=target.id)
            if type(target) is NameTarget:
                return Ref(FORM_HOME, name=target.name)
            return None
        found = exposed(type(obj))
        if found is None:
            return None
        return Ref(FORM_SENDER, id=self._export(obj), iface=found.iface)  # a callback object

    def _export(self, obj: object) -> bytes:
        """The id this client's own exposed object crosses under, its crossings counted: kept
        until the server gives every crossing back (RELEASE, when it dropped them) or the
        session ends."""
        with self._lock:
            key = self._export_ids.get(id(obj))
            if key is not None:
                self._export_counts[key] += 1
            else:
                if len(self._exports) >= MAX_EXPORTS:
                    raise CodecError(
                        f"this client already gave the server {MAX_EXPORTS} of its objects"
                    )
                key = secrets.token_bytes(16)
                self._exports[key] = obj
                self._export_ids[id(obj)] = key
                self._export_counts[key] = 1
                wake = getattr(self, "_wake", None)
                if wake is not None:  # the keeper starts reading (callbacks may come idle)
                    wake.set()
            return key

    def _on_release(self, msg: Release) -> None:
        """The server's RELEASE: crossings of this client's objects it dropped; an object whose
        every crossing came back is no longer held for it (an unknown id, or a count past
        what crossed, is ignored)."""
        with self._lock:
            for key, count in msg.releases:
                left = self._export_counts.get(key)
                if left is None:
                    continue
                if left > count:
                    self._export_counts[key] = left - count
                    continue
                del self._export_counts[key]
                obj = self._exports.pop(key, None)
                if obj is not None and self._export_ids.get(id(obj)) == key:
                    del self._export_ids[id(obj)]

    def _callback_target(self, call: Call) -> tuple[Any, Any, list[Any], dict[str, Any]] | bytes:
        """The server's call of one of this client's objects: (the function, the object, its
        arguments), or the RETURN frame that refuses it."""
        rid = call.request_id
        target = call.target
        obj = self._exports.get(target.id) if type(target) is ObjectTarget else None
        if obj is None:
            return encode_return_error(
                rid, ErrorCode.UNKNOWN_OBJECT, "UNKNOWN_OBJECT", "no such object in this client"
            )
        found = exposed(type(obj))
        member = found.members.get(call.method) if found is not None else None
        if member is None:
            return encode_return_error(
                rid,
                ErrorCode.UNKNOWN_METHOD,
                "UNKNOWN_METHOD",
                f"{type(obj).__name__} exposes no member {call.method!r}",
            )
        try:
            args = self._home(call.args) if call.has_refs else call.args
            kwargs = self._home(call.kwargs) if call.has_refs else call.kwargs
        except CodecError as exc:
            return encode_return_error(rid, ErrorCode.BAD_ARGUMENTS, "BAD_ARGUMENTS", str(exc))
        return member.handler.func, obj, args, kwargs

    def _return_frame(self, call: Call, result: Any, exc: BaseException | None) -> bytes:
        rid = call.request_id
        if exc is None:
            try:
                return encode_return(rid, result, to_ref=self._to_ref)
            except Exception as failed:
                exc = failed
        if isinstance(exc, ServiceError):
            return encode_return_error(
                rid, ErrorCode.APPLICATION_ERROR, wire_name(type(exc)), str(exc)
            )
        log.warning("callback %r raised %r", call.method, exc)
        return encode_return_error(rid, ErrorCode.UNEXPECTED_ERROR, type(exc).__name__, str(exc))

    def _callback_outcome(self, call: Call) -> bytes:
        """Run the server's call of one of this client's objects (in this thread): the RETURN
        frame to send."""
        got = self._callback_target(call)
        if isinstance(got, bytes):
            return got
        func, obj, args, kwargs = got
        try:
            result = func(obj, *args, **kwargs)
            if inspect.isawaitable(result):
                result = asyncio.run(_awaited(result))
        except Exception as exc:
            return self._return_frame(call, None, exc)
        return self._return_frame(call, result, None)

    def _home(self, value: Any) -> Any:
        """Arguments of a server's call: this client's own objects for their references
        (form 2), proxies for the server's (form 1)."""
        if type(value) is Ref:
            if value.form == FORM_HOME and value.id is not None:
                obj = self._exports.get(value.id)
                if obj is None:
                    raise CodecError("an argument names an object this client does not have")
                return obj
            return self._proxies(value)
        if type(value) is list:
            return [self._home(v) for v in value]
        if type(value) is dict:
            return {k: self._home(v) for k, v in value.items()}
        return value

    def _proxies(self, value: Any) -> Any:
        """``value`` with each reference replaced by its proxy (counted), or by this client's
        own object for a reference to it (form 2)."""
        if type(value) is Ref:
            if value.form == FORM_HOME and value.id is not None:
                obj = self._exports.get(value.id)
                if obj is not None:
                    return obj
            if value.form == FORM_THIRD:  # another server's object: adopted there
                return handoff.adopt(self, value)
            if value.form != FORM_SENDER or value.id is None:
                raise RemoteProtocolError(
                    "the server sent a reference of a form it may not send", ErrorCode.DECODE_ERROR
                )
            return self._import(value.id, value.iface)
        if type(value) is list:
            return [self._proxies(v) for v in value]
        if type(value) is dict:
            return {k: self._proxies(v) for k, v in value.items()}
        return value

    def _import(self, key: bytes, iface: str) -> Any:
        with self._lock:
            entry = self._imports.get(key)
            proxy = entry.proxy() if entry is not None else None
            if entry is None or proxy is None:
                if iface not in self.ifaces:
                    self._undescribed.add(iface)
                proxy = self.proxy_type(self, ObjectTarget(key), iface, key)
                self._generation += 1
                if entry is None:
                    entry = self._imports[key] = _Import(proxy, self._generation)
                else:  # its old proxy was dropped, its RELEASE not sent: this one takes over
                    entry.proxy = weakref.ref(proxy)
                    entry.generation = self._generation
                weakref.finalize(proxy, self._dropped.append, (key, entry.generation))
            entry.count += 1
            return proxy

    def _take_releases(self) -> list[tuple[bytes, int]]:
        """RELEASEs due: the entries whose proxies were dropped (and not taken over since),
        and the references in the answers of promises dropped unresolved."""
        out: list[tuple[bytes, int]] = []
        if self._unsent:
            out, self._unsent = self._unsent, []
        if self._dropped_promises or (
            self._waiting_promises and self._answers_seen != self._answers_now()
        ):
            out.extend(self._promises_given_back())
        dropped = self._dropped
        if not dropped:
            return out
        with self._lock:
            while dropped:
                key, generation = dropped.popleft()
                entry = self._imports.get(key)
                if entry is None or entry.generation != generation:
                    continue
                del self._imports[key]
                out.append((key, entry.count))
        return out

    _early_finish = False
    """FINISH a dropped promise's question before its answer came (the server then answers
    it nil: nothing to give back). Only where every call naming a promise is written before
    the promise can be dropped (the blocking client)."""

    def _answers_now(self) -> int:
        """A number that changes when answers came (the dropped promises waiting for theirs
        are looked at again only then); here a new one each time."""
        self._answers_seen += 1
        return self._answers_seen + 1

    def _promises_given_back(self) -> list[tuple[bytes, int]]:
        """The references in the answers of promises dropped before they were resolved (never
        imported: given back as they came), and their questions finished."""
        with self._lock:  # (two threads must not give the same answers back twice)
            return self._given_back_now()

    def _given_back_now(self) -> list[tuple[bytes, int]]:
        now = self._answers_now()  # (read first: an answer that comes meanwhile, seen next time)
        boxes: list[_PromiseBox] = []
        if now != self._answers_seen:  # answers came: look at those waiting again
            boxes, self._waiting_promises = self._waiting_promises, []
        self._answers_seen = now
        while self._dropped_promises:
            boxes.append(self._dropped_promises.popleft())
        counts: dict[bytes, int] = {}
        early = self._early_finish
        for box in boxes:
            if box.resolved:
                continue
            ticket = box.ticket
            if early and not box.finished:
                box.finished = True
                self._finished.append(ticket.request_id)
            if not ticket.done():
                self._waiting_promises.append(box)  # its answer has not come: later
                continue
            try:
                result = ticket.result()
            except Exception:
                result = None  # failed: no references to give back
            for key in _sender_refs(result):
                counts[key] = counts.get(key, 0) + 1
            if not box.finished:
                self._finished.append(ticket.request_id)
        return list(counts.items())

    def _take_finished(self) -> list[int]:
        out, self._finished = self._finished, []
        return out

    def _given_back(self, proxy: Proxy | AsyncProxy) -> tuple[bytes, int] | None:
        """``proxy`` released by the user: its entry, to send a RELEASE for."""
        key = proxy._id
        proxy._released = True
        if key is None or proxy._client is not self:
            return None
        with self._lock:
            entry = self._imports.pop(key, None)
        return None if entry is None else (key, entry.count)

    @property
    def held(self) -> int:
        """Remote objects this client holds now."""
        return len(self._imports)

    def _named(self, name: str) -> Any:
        return self.proxy_type(self, NameTarget(name), self.names.get(name, ""), None)


class ObjectClient(_Held):
    """One connection to an object server and the session on it, for blocking code
    (thread-safe). :func:`lookup` makes one for a proxy; make one to hold several."""

    _early_finish = True

    def _answers_now(self) -> int:
        return self._conn().settled

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        connect_timeout: float | None = None,
        **options: Any,
    ) -> None:
        if connect_timeout is not None:
            options["connect_timeout"] = connect_timeout
        self._init_held(timeout)
        self.client = _Client(url, timeout=timeout, **options)
        self._callbacks: concurrent.futures.ThreadPoolExecutor | None = None
        self._queued = 0  # server calls waiting for a callback thread (under _queue_lock)
        self._queue_lock = threading.Lock()  # (the reading thread adds, callback threads take)
        try:
            self._stream = self._conn()
            self._stream.routes[Call] = self._on_server_call
            self._stream.routes[Release] = self._on_release
            self._attach(time.monotonic() + timeout)
        except BaseException:
            self.client.close()
            raise
        self._stop = threading.Event()
        self._wake = threading.Event()
        # RENEW every lease/3 while idle: the server sees the client alive (its keepalive does
        # not close an idle blocking client's connection), and a connection that dropped is
        # re-attached within the lease even when no call comes.
        self._keeper = threading.Thread(
            target=self._keep, name="sockstack-objects-renew", daemon=True
        )
        self._keeper.start()

    def _on_server_call(self, call: Call) -> None:
        """A CALL from the server (a callback), on the reading thread: run it on a callback
        thread (user code never runs on the thread that reads), RETURN from there."""
        if self._queued >= MAX_QUEUED_CALLBACKS:
            self._send_return(
                encode_return_error(
                    call.request_id,
                    ErrorCode.OVERLOADED,
                    "OVERLOADED",
                    f"{MAX_QUEUED_CALLBACKS} calls from the server wait in this client (limit)",
                )
            )
            return
        if self._callbacks is None:
            self._callbacks = concurrent.futures.ThreadPoolExecutor(
                CALLBACK_THREADS, thread_name_prefix="sockstack-callback"
            )
        with self._queue_lock:
            self._queued += 1
        try:
            self._callbacks.submit(self._run_callback, call)
        except RuntimeError:  # shut down: closing
            with self._queue_lock:
                self._queued -= 1

    def _run_callback(self, call: Call) -> None:
        with self._queue_lock:
            self._queued -= 1
        self._send_return(self._callback_outcome(call))

    def _send_return(self, frame: bytes) -> None:
        try:
            self._conn().send_frame(frame, "RETURN", self.timeout)
        except Exception as exc:  # the server's call fails with its own timeout
            log.debug("objects: RETURN to %s not sent: %s", self.client.endpoint, exc)

    def _wait_or_read(self) -> bool:
        """Until the next RENEW is due (True) or the client stops (False). While it holds
        objects the server may call, this thread reads when no call of another thread does
        (callbacks come while the client is idle too)."""
        if not self._exports:
            self._wake.wait(self.lease / 3)  # (set by stop, and by the first export)
            self._wake.clear()
            if not self._exports or self._stop.is_set():
                return not self._stop.is_set()
        try:
            self._conn().read_until(self._stop.is_set, self.lease / 3, "callbacks")
        except CallTimeout:
            return not self._stop.is_set()
        except Exception:  # a dropped connection: re-attached below, or at the next call
            return not self._stop.wait(min(1.0, self.lease / 3))
        return not self._stop.is_set()

    def _keep(self) -> None:
        while self._wait_or_read():
            if self.closed or _PID[0] != self._pid:
                return
            if time.monotonic() - self._last_send < self.lease / 3:
                continue
            for _ in range(2):  # a RENEW on a connection found dead: re-attach, once, now
                try:
                    deadline = time.monotonic() + self.timeout
                    self._ensure_attached(deadline, "RENEW")
                    conn = self._conn()
                    self._send_releases(conn, self.timeout)
                    conn.send_frame(encode_renew(), "RENEW", self.timeout)
                    self._last_send = time.monotonic()
                    break
                except Exception as exc:  # the next call (or tick) tries again, and reports
                    log.debug("objects: RENEW to %s failed: %s", self.client.endpoint, exc)

    # ------------------------------------------------------------------ session

    def _conn(self) -> StreamConnection:
        stream: StreamConnection | None = getattr(self, "_stream", None)
        return stream if stream is not None else self.client.stream_connection("remote objects")

    def _attach(self, deadline: float) -> None:
        """Attach (or re-attach, with the token) a session on the current connection."""
        left = max(0.001, deadline - time.monotonic())
        info = self.client.call("objects.attach", self._token, timeout=left)
        self._took(info)
        self._attached = self._conn().core

    def _ensure_attached(self, deadline: float, what: str) -> None:
        conn = self._stream
        if conn.core is not None and conn.core is self._attached and conn.live:
            return
        with self._lock:
            conn.ensure(deadline, what, max(0.001, deadline - time.monotonic()))
            if conn.core is self._attached:
                return
            try:
                self._attach(deadline)
            except RemoteError as exc:
                if exc.code == ErrorCode.SESSION_EXPIRED:
                    self._token = None
                    self._forget_imports()
                    self._attach(deadline)  # a new session: registered names work again
                    for hook in list(self.on_new_session):
                        try:
                            hook()
                        except Exception:
                            log.exception("objects: an on_new_session hook failed")
                    raise _expired() from None
                raise

    # ------------------------------------------------------------------ calls

    def lookup(self, name: str) -> Proxy:
        """A proxy of the object registered as ``name`` (its instance mode applies)."""
        proxy: Proxy = self._named(name)
        return proxy

    def call(
        self,
        target: Target,
        method: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        oneway: bool = False,
    ) -> Any:
        t, deadline, conn, budget = self._prepare(method, timeout)
        frame = self._frame(target, method, args, kwargs, budget, oneway)
        if oneway:
            conn.send_frame(frame(0), method, t)
            return None
        return self._sent(conn, method, t, deadline, frame)

    def _sent(
        self,
        conn: StreamConnection,
        method: str,
        t: float,
        deadline: float,
        frame: Callable[[int], bytes],
    ) -> Any:
        """Send the CALL ``frame`` builds and wait for its answer (proxies made of it)."""
        try:
            result = conn.call(method, (), None, MSGPACK, t, frame=frame)
        except RemoteError as exc:
            if exc.code == ErrorCode.DEADLINE_EXCEEDED:  # as the client's own timer (RPC too)
                raise deadline_passed(method, t) from None
            if exc.code != ErrorCode.SESSION_EXPIRED or conn.core is self._attached:
                raise
            # The connection was replaced under the call (it reconnected): the server refused
            # it before running it. Attach the session there, then send it once more.
            self._ensure_attached(deadline, method)
            left = max(0.001, deadline - time.monotonic())
            result = conn.call(method, (), None, MSGPACK, left, frame=frame)
        if type(result) in _SCALARS:
            return result
        value = self._proxies(result)
        if self._undescribed:
            self.describe()
        return value

    def _quick(self, target: Target, method: str, args: tuple[Any, ...]) -> Any:
        """:meth:`call` for the common call (positional arguments, the client's timeout, not
        oneway), when nothing else is due first (no RELEASE to send, attached, not forked,
        no promise among the arguments); else :data:`_SLOW`."""
        conn = self._stream
        core = conn.core
        if (
            core is None
            or core is not self._attached
            or not conn.live
            or self.closed
            or self._unsent
            or self._dropped
            or self._dropped_promises
            or self._finished
            or self._waiting_promises
            or _PID[0] != self._pid
        ):
            return _SLOW
        for a in args:
            if type(a) is Promise:
                return _SLOW
        meta = self._meta(target, method)
        if meta is None:
            return _SLOW  # (the general path says what is wrong)
        t = self.timeout
        budget = _budget(core, t)
        now = time.monotonic()
        self._last_send = now
        to_ref = self._to_ref

        def frame(rid: int) -> bytes:
            return encode_call_meta(rid, meta, args, budget, to_ref)

        return self._sent(conn, method, t, now + t, frame)

    def describe(self) -> None:
        """Ask the server about the interfaces of proxies not described yet (their
        properties, and which methods return remote objects)."""
        names, self._undescribed = sorted(self._undescribed), set()
        if names:
            self._not_forked()
            self.ifaces.update(self.client.call("objects.describe", names))

    def _prepare(
        self, what: str, timeout: float | None, send_releases: bool = True
    ) -> tuple[float, float, StreamConnection, int | None]:
        """Before a request of this client: (its timeout, deadline, the connection with the
        session attached and the RELEASEs due sent (unless ``send_releases`` is false: the
        caller sends them with its request), the DEADLINE budget to send or None)."""
        if self.closed:
            raise ConnectError("the object client is closed")
        self._not_forked()
        t = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        self._last_send = deadline - t
        self._ensure_attached(deadline, what)
        conn = self._conn()
        if send_releases:
            self._send_releases(conn, t)
        return t, deadline, conn, _budget(conn.core, t)

    def _not_forked(self) -> None:
        if _PID[0] != self._pid:
            raise ConnectError(
                "this object client was made in the parent process: its session is the "
                "parent's (make a new one in the child)"
            )

    def _send_releases(self, conn: StreamConnection, timeout: float) -> None:
        releases = self._take_releases()
        finished = self._take_finished()
        if not releases and not finished:
            return
        core = conn.core
        try:
            # (held: it leaves with the request that follows, in one segment)
            conn.send_frame(encode_release(releases, finished), "RELEASE", timeout, hold=True)
        except (ConnectError, ConnectionLost):
            self._unsent.extend(releases)  # sent with the next call
            return  # (questions end with their connection: nothing to finish there)
        if core is not self._attached or conn.core is not core:  # not to this session
            self._unsent.extend(releases)

    def _send_batch(self, calls: Sequence[Pending], timeout: float | None) -> None:
        t, _, conn, budget = self._prepare("batch", timeout)
        frames = [
            self._frame(target, method, args, kwargs, budget, False)
            for target, method, args, kwargs in (p._call for p in calls)
        ]
        for pending, ticket in zip(calls, conn.start_exchanges(frames, "batch", t), strict=True):
            pending._ticket = ticket

    def promise(
        self,
        target: Target,
        method: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        iface: str,
    ) -> Promise:
        """Call ``method``, whose result is a remote object, without waiting: a
        :class:`Promise` of it at once (CALL with KEEP). Calls on the promise go out at once
        and the server runs them when the result is there: a chain costs one round trip."""
        t, _, conn, budget = self._prepare(method, None, send_releases=False)
        call = self._keep_frame(target, method, args, kwargs, budget)
        # The RELEASE due goes with the next call that waits (its FINISHes of promises dropped
        # unanswered reach the server before it writes their answers: nil, nothing to give
        # back); here only when many are due.
        releases: list[tuple[bytes, int]] = []
        finished: list[int] = []
        if (
            len(self._dropped_promises) + len(self._finished) + len(self._dropped) > _DUE
            or self._unsent
        ):
            releases = self._take_releases()
            finished = self._take_finished()
        frame = call
        if releases or finished:  # the RELEASE due, in the same write, before the CALL
            before = encode_release(releases, finished)

            def frame(rid: int) -> bytes:
                return before + call(rid)

        # Held (MSG_MORE): calls made in a row on promises leave together, with the call that
        # waits, at any wait on the connection, or 200 ms at most after.
        core = conn.core
        try:
            ticket = conn.start_exchange(frame, method, t, hold=True)
        except (ConnectError, ConnectionLost):
            self._unsent.extend(releases)  # sent with the next call
            raise  # (its questions end with that connection: nothing to finish there)
        except BaseException:  # not sent (an argument that does not encode...): due still
            self._unsent.extend(releases)
            self._finished.extend(finished)
            raise
        if releases and (core is not self._attached or conn.core is not core):
            self._unsent.extend(releases)  # (not to this session)
        return Promise(self, ticket, iface)

    def _meta(self, target: Target, method: str) -> bytes | None:
        """``call_meta(target, method)``, kept (1,024 at most); None when it is refused."""
        key = (target, method)
        meta = self._metas.get(key)
        if meta is None:
            if len(self._metas) >= 1024:
                self._metas.clear()
            try:
                meta = self._metas[key] = call_meta(target, method)
            except LocalProtocolError:
                return None
        return meta

    def _keep_frame(
        self,
        target: Target,
        method: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        budget: int | None,
    ) -> Callable[[int], bytes]:
        """A promise's CALL (KEEP): the common one (positional arguments, none a promise, a
        target met before or a question without steps) from a cached meta, as
        :meth:`_quick`; else :meth:`_frame`."""
        if kwargs or any(type(a) is Promise for a in args):
            return self._frame(target, method, args, kwargs, budget, False, keep=True)
        meta: bytes | None
        if type(target) is AnswerTarget and not target.path:
            name = self._names.get(method)
            if name is None and self._meta(AnswerTarget(1), method) is not None:  # (checked)
                if len(self._names) >= 1024:
                    self._names.clear()
                name = self._names[method] = method.encode("utf-8")
            meta = None if name is None else answer_meta(target.question, name)
        else:
            meta = self._meta(target, method)
        if meta is None:  # (the general path says what is wrong)
            return self._frame(target, method, args, kwargs, budget, False, keep=True)
        to_ref = self._to_ref

        def frame(rid: int) -> bytes:
            return encode_call_meta(rid, meta, args, budget, to_ref, True)

        return frame

    def release(self, proxy: Proxy) -> None:
        """Give ``proxy``'s object back now (the proxy stops working)."""
        entry = self._given_back(proxy)
        if entry is None or self.closed or _PID[0] != self._pid:
            return
        conn = self._conn()
        core = conn.core
        if core is None or core is not self._attached or not conn.live:
            self._unsent.append(entry)  # with the next call (or RENEW), once re-attached
            return
        try:
            conn.send_frame(encode_release([entry]), "RELEASE", self.timeout)
        except (ConnectError, ConnectionLost):
            self._unsent.append(entry)
            return
        if conn.core is not core:  # it reconnected to send it: not this session's
            self._unsent.append(entry)

    def close(self) -> None:
        """End the session (the server frees everything of it at once) and the connection."""
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        self._wake.set()
        if self._callbacks is not None:
            self._callbacks.shutdown(wait=False, cancel_futures=True)
        if _PID[0] != self._pid:
            return  # the parent's session: not this process's to end
        try:
            conn = self._conn()
            if conn.live and conn.core is self._attached:
                conn.send_frame(encode_release(end=True), "RELEASE", self.timeout)
        except Exception:
            pass  # closing anyway
        finally:
            self.client.close()
            handoff.close_thirds(self)

    def __enter__(self) -> ObjectClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Method:
    __slots__ = ("_name", "_proxy")

    def __init__(self, proxy: Proxy, name: str) -> None:
        self._proxy = proxy
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        p = self._proxy
        client = p._client
        if (
            not kwargs
            and type(client) is ObjectClient
            and not p._released
            and p._epoch == client.epoch
        ):  # the common call: described, neither a promise's nor oneway
            desc = client.ifaces.get(p._iface)
            name = self._name
            if (
                desc is not None
                and name not in desc.get("refs", ())
                and name not in desc.get("oneway", ())
            ):
                value = client._quick(p._call_target(), name, args)
                if value is not _SLOW:
                    return value
        p._check()
        name = self._name
        desc = p._desc()
        if desc is not None:
            iface = desc.get("refs", {}).get(name)
            if iface is not None and isinstance(p._client, ObjectClient):
                return p._client.promise(p._call_target(), name, args, kwargs, iface)
        return p._client.call(p._call_target(), name, args, kwargs, oneway=name in p._oneway())

    def __repr__(self) -> str:
        return f"<remote method {self._proxy._iface}.{self._name}>"


class Proxy:
    """A remote object: its exposed methods are called as methods, its properties read as
    attributes. One proxy per remote object on a connection; compared by identity. Cannot be
    pickled (it means something only on its connection)."""

    __slots__ = (
        "__weakref__",
        "_client",
        "_epoch",
        "_id",
        "_iface",
        "_owns",
        "_released",
        "_target",
    )

    def __init__(self, client: Any, target: Target, iface: str, key: bytes | None) -> None:
        self._client: Any = client
        self._epoch: int = client.epoch
        self._target = target
        self._iface = iface
        self._id = key
        self._owns = False  # closes its client at the end of a with block (lookup(url))
        self._released = False

    def _check(self) -> None:
        if self._released:
            raise ValueError("this proxy was released")
        self._client._check_epoch(self._target, self._epoch)

    def _call_target(self) -> Target:
        return self._target

    def _desc(self) -> dict[str, Any] | None:
        desc: dict[str, Any] | None = self._client.ifaces.get(self._iface)
        return desc

    def _oneway(self) -> Sequence[str]:
        desc = self._desc()
        return desc.get("oneway", ()) if desc else ()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        desc = self._desc()
        if desc is not None and name in desc.get("properties", ()):
            self._check()
            return self._client.call(self._call_target(), name)
        if desc is not None and name not in desc.get("methods", ()):
            raise AttributeError(f"{self._iface} exposes no member {name!r}")
        return _Method(self, name)

    def __reduce__(self) -> Any:
        raise TypeError("a remote object's proxy cannot be pickled (it lives on its connection)")

    def __repr__(self) -> str:
        what = self._target.name if type(self._target) is NameTarget else "object"
        return f"<remote {self._iface or '?'} {what} via {self._client.client.endpoint}>"

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owns:
            self._client.close()
        else:
            release(self)


class _PromiseBox:
    """What a dropped promise leaves behind: its ticket, and whether it was resolved (then
    its references were imported and are counted as any proxy's)."""

    __slots__ = ("conn_core", "finished", "resolved", "ticket")

    def __init__(self, ticket: Ticket, conn_core: object = None) -> None:
        self.ticket = ticket
        self.resolved = False
        self.finished = False  # its question's FINISH queued
        self.conn_core = conn_core  # the session core its question was asked on


class Promise(Proxy):
    """The remote object a call will return, before it came (issue 13's promise pipelining,
    Cap'n Proto's idea): calls on it go out at once, naming the call's answer, and the server
    runs them as soon as the answer is there, so ``counter.child().child().incr()`` is one
    round trip. :func:`resolve` waits for the object (a :class:`Proxy`); an attribute that is
    a property, or a method whose result is not an object, waits for its own answer. A failed
    call fails every call made on its promise with the same error."""

    __slots__ = ("_box", "_value")

    def __init__(self, client: ObjectClient, ticket: Ticket, iface: str) -> None:
        super().__init__(client, AnswerTarget(ticket.request_id), iface, None)
        self._box = _PromiseBox(ticket, client._stream.core)
        self._value: Any = _UNSET

    def __del__(self) -> None:
        # (not weakref.finalize: a promise is made per pipelined call, and this costs less)
        try:
            self._client._dropped_promises.append(self._box)
        except AttributeError:  # (never fully made)
            pass

    def _call_target(self) -> Target:
        """The answer's object once it came (a call on it needs no kept question: it works on
        another connection too); until then the question. A failed call's error is raised."""
        if self._value is _UNSET and not self._box.ticket.done():
            return self._target
        value = self._resolve()
        if not isinstance(value, Proxy):
            raise TypeError(f"the call returned {type(value).__name__}, not a remote object")
        return value._call_target()

    def _resolve(self) -> Any:
        if self._value is not _UNSET:
            return self._value
        box = self._box
        client = self._client
        try:
            result = box.ticket.result()
        except RemoteError as exc:
            box.resolved = True
            client._finished.append(box.ticket.request_id)
            if exc.code == ErrorCode.DEADLINE_EXCEEDED:
                raise deadline_passed(box.ticket._what, box.ticket._timeout) from None
            raise
        with client._lock:
            if box.resolved:  # another thread resolved it meanwhile
                return self._value
            box.resolved = True
            self._value = client._proxies(result)
            client._finished.append(box.ticket.request_id)
        if client._undescribed:
            client.describe()
        return self._value

    def __repr__(self) -> str:
        state = "resolved" if self._value is not _UNSET else "pending"
        via = self._client.client.endpoint
        return f"<promise of a remote {self._iface or '?'} ({state}) via {via}>"


_UNSET: Any = object()


def resolve(value: Any) -> Any:
    """The remote object a :class:`Promise` stands for, once its call answered (a
    :class:`Proxy`; waits for it); any other value as it is."""
    if isinstance(value, Promise):
        return value._resolve()
    return value


def _sender_refs(value: Any) -> list[bytes]:
    """The ids of the references (form 1) in a decoded answer, once per occurrence."""
    if type(value) is Ref:
        return [value.id] if value.form == FORM_SENDER and value.id is not None else []
    if type(value) is list:
        return [k for v in value for k in _sender_refs(v)]
    if type(value) is dict:
        return [k for v in value.values() for k in _sender_refs(v)]
    return []


class Pending:
    """A call of a :func:`batch`: its result once the batch was sent (:meth:`result`)."""

    __slots__ = ("_call", "_client", "_ticket")

    def __init__(self, client: ObjectClient, call: tuple[Target, str, Sequence[Any], Any]) -> None:
        self._client = client
        self._call = call
        self._ticket: Ticket | None = None

    def result(self) -> Any:
        """The call's result (references as proxies); raises what the call raised."""
        if self._ticket is None:
            raise RuntimeError("the batch was not sent yet: leave its with block first")
        try:
            result = self._ticket.result()
        except RemoteError as exc:
            if exc.code == ErrorCode.DEADLINE_EXCEEDED:
                raise deadline_passed(self._call[1], self._ticket._timeout) from None
            raise
        value = self._client._proxies(result)
        if self._client._undescribed:
            self._client.describe()
        return value


class _BatchMethod:
    __slots__ = ("_batch", "_name")

    def __init__(self, batch: Batch, name: str) -> None:
        self._batch = batch
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Pending:
        return self._batch._add(self._name, args, kwargs)


class Batch:
    """Calls on one proxy recorded, sent in one write when the ``with`` block ends (one round
    trip for all), each answered on its own: ``with batch(counter) as b: a = b.incr(1)``, then
    ``a.result()``. A failed call does not stop the others (unlike Pyro5's batches)."""

    def __init__(self, proxy: Proxy, timeout: float | None = None) -> None:
        if not isinstance(proxy._client, ObjectClient):
            raise TypeError("batch() takes a proxy of a blocking ObjectClient")
        self._proxy = proxy
        self._client: ObjectClient = proxy._client
        self._timeout = timeout
        self._calls: list[Pending] = []

    def __getattr__(self, name: str) -> _BatchMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return _BatchMethod(self, name)

    def _add(self, method: str, args: Sequence[Any], kwargs: Any) -> Pending:
        self._proxy._check()
        pending = Pending(self._client, (self._proxy._call_target(), method, args, kwargs))
        self._calls.append(pending)
        return pending

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None and self._calls:
            self._client._send_batch(self._calls, self._timeout)


def batch(proxy: Proxy, timeout: float | None = None) -> Batch:
    """Record calls on ``proxy``, sent together at the end of the ``with`` block."""
    return Batch(proxy, timeout)


class _AsyncMethod:
    __slots__ = ("_name", "_proxy")

    def __init__(self, proxy: AsyncProxy, name: str) -> None:
        self._proxy = proxy
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        p = self._proxy
        p._check()
        name = self._name
        desc = p._desc()
        client: AsyncObjectClient = p._client
        iface = desc.get("refs", {}).get(name) if desc is not None else None
        if iface is not None:
            return client.promise(p, name, args, kwargs, iface)  # at once, as the blocking one
        call: Coroutine[Any, Any, Any] = client.call(
            p, name, args, kwargs, oneway=name in p._oneway()
        )
        return call

    def __repr__(self) -> str:
        return f"<remote method {self._proxy._iface}.{self._name} (await it)>"


class _TaskTicket:
    """An asyncio promise's call, as a dropped promise's clean-up reads it (as a Ticket)."""

    __slots__ = ("qid", "task")

    def __init__(self, task: asyncio.Task[Any], qid: asyncio.Future[int]) -> None:
        self.task = task
        self.qid = qid

    @property
    def request_id(self) -> int:
        return self.qid.result() if self.qid.done() and not self.qid.exception() else 0

    def done(self) -> bool:
        return self.task.done()

    def result(self) -> Any:
        return self.task.result()


class AsyncPromise:
    """:class:`Promise` for asyncio code: ``await promise`` gives the :class:`AsyncProxy`;
    calls on it go out at once (in order, right after the call they name), so
    ``await counter.child().child().incr()`` is one round trip."""

    __slots__ = ("__weakref__", "_box", "_client", "_iface", "_qid", "_task", "_value")

    def __init__(
        self,
        client: AsyncObjectClient,
        task: asyncio.Task[Any],
        qid: asyncio.Future[int],
        iface: str,
    ) -> None:
        self._client = client
        self._task = task
        self._qid = qid
        self._iface = iface
        self._value: Any = _UNSET
        self._box = box = _PromiseBox(_TaskTicket(task, qid))  # type: ignore[arg-type]
        weakref.finalize(self, client._dropped_promises.append, box)

    def _desc(self) -> dict[str, Any] | None:
        desc: dict[str, Any] | None = self._client.ifaces.get(self._iface)
        return desc

    def _oneway(self) -> Sequence[str]:
        desc = self._desc()
        return desc.get("oneway", ()) if desc else ()

    def _check(self) -> None:
        pass

    async def _target(self) -> Target:
        """The answer's object once it came, else the question (waits until it was sent)."""
        if self._task.done():
            value = await self
            if not isinstance(value, Proxy):
                raise TypeError(f"the call returned {type(value).__name__}, not a remote object")
            return value._target
        return AnswerTarget(await asyncio.shield(self._qid))

    def __await__(self) -> Any:
        return self._resolve().__await__()

    async def _resolve(self) -> Any:
        if self._value is not _UNSET:
            return self._value
        box = self._box
        client = self._client
        try:
            result = await self._task
        except BaseException:
            if not box.resolved:
                box.resolved = True
                if self._qid.done() and not self._qid.exception():
                    client._finished.append(self._qid.result())
            raise
        if not box.resolved:
            box.resolved = True
            self._value = client._proxies(result)
            client._finished.append(self._qid.result())
            await client._describe_new()
        return self._value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        desc = self._desc()
        if desc is not None and name in desc.get("properties", ()):
            return self._client.call(self, name)
        if desc is not None and name not in desc.get("methods", ()):
            raise AttributeError(f"{self._iface} exposes no member {name!r}")
        return _AsyncMethod(self, name)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        state = "resolved" if self._value is not _UNSET else "pending"
        return f"<asyncio promise of a remote {self._iface or '?'} ({state})>"


class AsyncProxy(Proxy):
    """A remote object for asyncio code: ``await proxy.method(...)``, ``await proxy.prop``."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        desc = self._desc()
        if desc is not None and name in desc.get("properties", ()):
            self._check()
            return self._client.call(self, name)
        if desc is not None and name not in desc.get("methods", ()):
            raise AttributeError(f"{self._iface} exposes no member {name!r}")
        return _AsyncMethod(self, name)

    def __enter__(self) -> Proxy:
        raise TypeError("use `async with` (an asyncio proxy)")

    async def __aenter__(self) -> AsyncProxy:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._owns:
            await self._client.close()
        else:
            await self._client.release(self)


class _AsyncClient(AsyncClient):
    """An asyncio client whose sessions decode object messages and references."""

    def _configure(self, *args: Any, **kwargs: Any) -> None:
        super()._configure(*args, **kwargs)
        self.registry = object_registry()


class AsyncObjectClient(_Held):
    """One connection to an object server and the session on it, for asyncio code:
    ``async with AsyncObjectClient(url) as oc: counter = oc.lookup("counter")``."""

    def __init__(self, url: str, *, timeout: float = 10.0, **options: Any) -> None:
        self._init_held(timeout)
        self.client = _AsyncClient(url, timeout=timeout, **options)
        self._renew: asyncio.Task[None] | None = None

    async def connect(self) -> AsyncObjectClient:
        await self.client.connect()
        self._tasks: set[asyncio.Task[None]] = set()
        try:
            self._channel().routes[Call] = self._on_server_call
            self._channel().routes[Release] = self._on_release
            await self._attach(time.monotonic() + self.timeout)
        except BaseException:
            await self.client.close()
            raise
        self._renew = asyncio.get_running_loop().create_task(self._keep())
        return self

    async def __aenter__(self) -> AsyncObjectClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _channel(self) -> StreamChannel:
        return self.client.stream_channel("remote objects")

    async def _attach(self, deadline: float) -> None:
        left = max(0.001, deadline - time.monotonic())
        info = await self.client.call("objects.attach", self._token, timeout=left)
        self._took(info)
        self._attached = self._channel().stream

    async def _ensure_attached(self, deadline: float, what: str) -> None:
        channel = self._channel()
        stream = channel.stream
        if stream is not None and stream is self._attached and stream.can_send():
            return
        await channel.wait_connected(what, max(0.001, deadline - time.monotonic()))
        if channel.stream is self._attached:
            return
        try:
            await self._attach(deadline)
        except RemoteError as exc:
            if exc.code == ErrorCode.SESSION_EXPIRED:
                self._token = None
                self._forget_imports()
                await self._attach(deadline)
                raise _expired() from None
            raise

    async def _keep(self) -> None:
        """RENEW every lease/3 while idle (see :class:`ObjectClient`)."""
        while not self.closed:
            await asyncio.sleep(self.lease / 3)
            if self.closed:
                return
            if time.monotonic() - self._last_send < self.lease / 3:
                continue
            try:
                await self._ensure_attached(time.monotonic() + self.timeout, "RENEW")
                channel = self._channel()
                self._send_releases(channel)
                channel.send_soon(encode_renew())
                self._last_send = time.monotonic()
            except Exception as exc:
                log.debug("objects: RENEW to %s failed: %s", self.client.endpoint, exc)

    def lookup(self, name: str) -> AsyncProxy:
        """A proxy of the object registered as ``name`` (its instance mode applies)."""
        proxy: AsyncProxy = self._named(name)
        return proxy

    def _on_server_call(self, call: Call) -> None:
        """A CALL from the server (a callback): an ``async def`` runs on this loop, a plain
        ``def`` in the loop's default executor (never on the loop itself); RETURN when done."""
        if len(self._tasks) >= MAX_QUEUED_CALLBACKS:
            self._channel().send_soon(
                encode_return_error(
                    call.request_id,
                    ErrorCode.OVERLOADED,
                    "OVERLOADED",
                    f"{MAX_QUEUED_CALLBACKS} calls from the server run in this client (limit)",
                )
            )
            return
        task = asyncio.get_running_loop().create_task(self._run_callback(call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_callback(self, call: Call) -> None:
        got = self._callback_target(call)
        if isinstance(got, bytes):
            frame = got
        else:
            func, obj, args, kwargs = got
            try:
                args, kwargs = await handoff.adopt_all(self, [args, kwargs])  # (third servers')
                if inspect.iscoroutinefunction(func):
                    result = await func(obj, *args, **kwargs)
                else:
                    loop = asyncio.get_running_loop()
                    result = await loop.run_in_executor(
                        None, functools.partial(func, obj, *args, **kwargs)
                    )
            except Exception as exc:
                frame = self._return_frame(call, None, exc)
            else:
                frame = self._return_frame(call, result, None)
        if not self.closed:
            self._channel().send_soon(frame)

    def promise(
        self,
        on: AsyncProxy | AsyncPromise,
        method: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        iface: str,
    ) -> AsyncPromise:
        """Call ``method`` (its result a remote object) on ``on`` without waiting: an
        :class:`AsyncPromise` at once, its CALL (with KEEP) sent as soon as the loop runs, right
        after the call it names (when ``on`` is a promise itself)."""
        if self.closed:
            raise ConnectError("the object client is closed")
        loop = asyncio.get_running_loop()
        qid: asyncio.Future[int] = loop.create_future()
        task = loop.create_task(self.call(on, method, args, kwargs, keep=qid))
        task.add_done_callback(_retrieved)  # a promise never awaited: its failure is no news
        qid.add_done_callback(_retrieved)
        return AsyncPromise(self, task, qid, iface)

    async def _describe_new(self) -> None:
        if self._undescribed:
            names, self._undescribed = sorted(self._undescribed), set()
            self.ifaces.update(await self.client.call("objects.describe", names))

    async def call(
        self,
        target: Target | AsyncProxy | AsyncPromise,
        method: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        oneway: bool = False,
        keep: asyncio.Future[int] | None = None,
    ) -> Any:
        if self.closed:
            if keep is not None and not keep.done():
                keep.set_exception(ConnectError("the object client is closed"))
            raise ConnectError("the object client is closed")
        try:
            if isinstance(target, AsyncPromise):
                target = await target._target()
            elif isinstance(target, Proxy):
                target._client._check_epoch(target._target, target._epoch)
                target = target._target
        except BaseException as exc:
            if keep is not None and not keep.done():
                keep.set_exception(exc)
            raise
        t = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        self._last_send = deadline - t
        await self._ensure_attached(deadline, method)
        channel = self._channel()
        self._send_releases(channel)
        stream = channel.stream
        budget = _budget(stream.core if stream is not None else None, t)
        frame = self._frame(target, method, args, kwargs, budget, oneway, keep=keep is not None)
        if keep is not None:
            frame = _noting(frame, keep)
        if oneway:
            if not channel.send_soon(frame(0)):
                raise ConnectError(f"{self.client.endpoint}: not connected; {method} not sent")
            return None
        try:
            _, result = await channel.exchange(frame, method, t)
        except RemoteError as exc:
            if exc.code == ErrorCode.DEADLINE_EXCEEDED:
                raise deadline_passed(method, t) from None
            if exc.code != ErrorCode.SESSION_EXPIRED or channel.stream is self._attached:
                raise
            await self._ensure_attached(deadline, method)
            left = max(0.001, deadline - time.monotonic())
            _, result = await channel.exchange(frame, method, left)
        if keep is not None:
            return result  # the promise imports it when awaited (or gives it back, dropped)
        value = await handoff.adopt_all(self, self._proxies(result))
        await self._describe_new()
        return value

    def _send_releases(self, channel: StreamChannel) -> None:
        releases = self._take_releases()
        finished = self._take_finished()
        if not releases and not finished:
            return
        stream = channel.stream
        frame = encode_release(releases, finished)
        if stream is not self._attached or not channel.send_soon(frame):
            self._unsent.extend(releases)

    async def release(self, proxy: AsyncProxy) -> None:
        """Give ``proxy``'s object back now (the proxy stops working)."""
        entry = self._given_back(proxy)
        if entry is None or self.closed:
            return
        channel = self._channel()
        if channel.stream is not self._attached or not channel.send_soon(encode_release([entry])):
            self._unsent.append(entry)  # with the next call (or RENEW), once re-attached

    async def close(self) -> None:
        """End the session (the server frees everything of it at once) and the connection."""
        if self.closed:
            return
        self.closed = True
        if self._renew is not None:
            self._renew.cancel()
        for task in list(getattr(self, "_tasks", ())):
            task.cancel()
        try:
            channel = self._channel()
            if channel.stream is self._attached:
                channel.send_soon(encode_release(end=True))
        except Exception:
            pass  # closing anyway
        finally:
            await self.client.close()
            await handoff.aclose_thirds(self)


async def alookup(
    url: str, *, registry: str | None = None, timeout: float = 10.0, **options: Any
) -> AsyncProxy:
    """:func:`lookup` for asyncio code: ``async with await alookup(url) as counter:``."""
    if registry is not None:
        async with AsyncObjectClient(registry, timeout=timeout, **options) as names:
            url = await names.lookup("names").lookup(url)
    base, name = _split(url)
    client = AsyncObjectClient(base, timeout=timeout, **options)
    await client.connect()
    proxy = client.lookup(name)
    proxy._owns = True
    return proxy


def lookup(
    url: str, *, registry: str | None = None, timeout: float = 10.0, **options: Any
) -> Proxy:
    """A proxy of the object registered as NAME at ``tcp://host:port/NAME`` (or ``tls://``),
    on a connection of its own, closed at the end of a ``with`` block (or by
    :func:`close`). With ``registry`` (a name service's URL), ``url`` is the NAME to look up
    there."""
    if registry is not None:
        with ObjectClient(registry, timeout=timeout, **options) as names:
            url = names.lookup("names").lookup(url)
    base, name = _split(url)
    client = ObjectClient(base, timeout=timeout, **options)
    try:
        proxy = client.lookup(name)
    except BaseException:
        client.close()
        raise
    proxy._owns = True
    return proxy


def release(proxy: Proxy) -> None:
    """Give the proxy's object back to its server now (it stops working)."""
    if proxy._id is None:
        proxy._released = True
        return
    proxy._client.release(proxy)


def close(proxy: Proxy) -> None:
    """Close the connection ``proxy`` came from (every proxy of it stops working)."""
    proxy._client.close()


def _split(url: str) -> tuple[str, str]:
    scheme, sep, rest = url.partition("://")
    if not sep or "/" not in rest:
        raise ValueError(f"expected tcp://host:port/NAME (or tls://), got {url!r}")
    hostport, _, name = rest.partition("/")
    if not name:
        raise ValueError(f"no object name in {url!r}: tcp://host:port/NAME")
    base = f"{scheme}://{hostport}"
    parse_endpoint(base)  # ValueError for a bad URL, before connecting
    if scheme not in ("tcp", "tls"):
        raise ValueError("remote objects need tcp:// or tls:// (a session over a connection)")
    return base, name


def _budget(core: Connection | None, timeout: float) -> int | None:
    """The DEADLINE budget a request carries: to a server that announced DEADLINE only."""
    if core is not None and core.peer_features & FEATURE_DEADLINE:
        return budget_ms(timeout)
    return None


def _retrieved(fut: asyncio.Future[Any]) -> None:
    """Mark a promise's failure as seen (it is raised where the promise is awaited, and by the
    calls made on it): asyncio does not log it as "never retrieved"."""
    if not fut.cancelled():
        fut.exception()


def _noting(frame: Callable[[int], bytes], kept: asyncio.Future[int]) -> Callable[[int], bytes]:
    """``frame``, noting the request id it is built with in ``kept`` (a promise's question:
    the calls on the promise go once it is known, after this one)."""

    def build(rid: int) -> bytes:
        data = frame(rid)
        if not kept.done():
            kept.set_result(rid)
        return data

    return build


async def _awaited(result: Any) -> Any:
    return await result


def _expired() -> Exception:
    return SessionExpired("the session expired: the server freed its objects")


ObjectClient.proxy_type = Proxy
AsyncObjectClient.proxy_type = AsyncProxy
