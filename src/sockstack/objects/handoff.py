"""Third-party references (PROTOCOL.md §4.5, form 4): handing on a reference to an object that
lives on another server.

Three parties: **C** hosts the object, **B** holds a proxy of it (B is C's client) and hands it
on to **A** (B's client), in a result or in a callback's arguments. Capability rules hold all
the way: C's ids stay scoped to the session they were given to, so B cannot give A its id;
instead C makes an *introduction*:

1. B calls ``objects.share(ref)`` on its own session on C (``ref``: the export id of its
   proxy, or the registered name it looked up). C answers a fresh random 16-byte **token**
   bound to that object, valid for ``ttl`` (default: the lease, 30 s) and **single use**.
2. B sends A the reference ``[4, url, token, iface]`` (msgpack ext 2, form 4): where C listens,
   the token, the interface.
3. A connects to C (one client per URL, kept by A's client and closed with it) and calls
   ``objects.adopt(token)`` on its own session there: C exports the object to A's session and
   answers its id and interface (counted as a form 1 reference crossing). A now holds an
   ordinary proxy of C's object, on its own connection to C, with its own count and lease.

A token is worth nothing to anyone but the one it was given to: it is 128 random bits, it is
used up by the first ``objects.adopt``, it expires, and it goes when B's session on C ends.

Where each side's work happens:

- **C** (:func:`methods`): the two built-in methods, and the :class:`Introductions` table (per
  session and in total, by count and bytes; TOO_MANY_OBJECTS past a bound).
- **B** (:func:`third_ref`, the exporter's hook): a proxy of another connection met while a
  result is encoded on the event loop raises :class:`Handoff`; the answerer then asks C for the
  tokens off the loop (:func:`answer_later`: a blocking client's ``objects.share`` in the
  loop's executor, an asyncio client's awaited) and encodes the result again. A callback's
  arguments from a plain ``def`` method (a worker thread) share at once, blocking that thread;
  from an ``async def`` method (on the loop), :func:`call_later` does as the answerer does.
  Nothing of this runs for a result without such a proxy.
- **A** (:func:`adopt`, the decoder's hook): the blocking client adopts when it decodes the
  reference (the token is used at once, while it is valid); the asyncio client, in the same
  call, right after (:func:`adopt_all`).
"""

from __future__ import annotations

import asyncio
import contextvars
import secrets
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sockstack.errors import (
    CallError,
    CodecError,
    ConnectError,
    ErrorCode,
    RemoteError,
    RemoteProtocolError,
)
from sockstack.host.dispatch import Handler, ServiceError, make_handler
from sockstack.objects.expose import Exposed
from sockstack.objects.messages import NameTarget, ObjectTarget
from sockstack.objects.refs import FORM_THIRD, ID_SIZE, MAX_URL, Ref
from sockstack.objects.session import ENTRY_OVERHEAD, Session, TooManyObjects

if TYPE_CHECKING:
    from sockstack.objects.client import AsyncObjectClient, AsyncProxy, ObjectClient, Proxy
    from sockstack.objects.pattern import Objects

__all__ = [
    "MAX_INTRODUCTIONS",
    "MAX_PENDING_HANDOFFS",
    "MAX_THIRD_SERVERS",
    "Handoff",
    "Introductions",
    "aclose_thirds",
    "adopt",
    "adopt_all",
    "answer_later",
    "call_later",
    "close_thirds",
    "introductions",
    "methods",
    "third_ref",
]

MAX_INTRODUCTIONS = 1_000
"""Tokens not used yet per session (the session that asked for them)."""
MAX_INTRODUCTION_BYTES = 16 << 20
"""Bytes of one session's tokens (200 each plus the object's shallow size: a token holds its
object, even after the session that asked for it released its own reference)."""
MAX_TOTAL_INTRODUCTIONS = 100_000
MAX_TOTAL_INTRODUCTION_BYTES = 256 << 20
MAX_PENDING_HANDOFFS = 1_000
"""Answers waiting for their tokens at once (in this process); past it a result that needs
one is answered OVERLOADED."""
MAX_THIRD_SERVERS = 64
"""Third servers one object client connects to for the references it is handed."""
MAX_ADOPTED = 1_024
"""Tokens a client remembers having adopted (the same token twice in one result is one
object: one proxy)."""
_MAX_DEPTH = 64


# =========================================================================== C: introductions


@dataclass(slots=True)
class _Intro:
    obj: object
    exposed: Exposed
    session: Session
    expires: float
    size: int


@dataclass(slots=True)
class _Owned:
    tokens: set[bytes]
    bytes: int = 0


class Introductions:
    """The tokens a server has minted and not seen used: each names one object, for one
    ``objects.adopt``, until it expires (``ttl`` seconds) or the session that asked for it
    ends. Sans-I/O: the times are arguments."""

    def __init__(
        self,
        ttl: float,
        max_per_session: int = MAX_INTRODUCTIONS,
        max_session_bytes: int = MAX_INTRODUCTION_BYTES,
        max_total: int = MAX_TOTAL_INTRODUCTIONS,
        max_total_bytes: int = MAX_TOTAL_INTRODUCTION_BYTES,
    ) -> None:
        self.ttl = ttl
        self.max_per_session = max_per_session
        self.max_session_bytes = max_session_bytes
        self.max_total = max_total
        self.max_total_bytes = max_total_bytes
        self.tokens: dict[bytes, _Intro] = {}  # in minting order: the oldest expire first
        self.owned: dict[Session, _Owned] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.tokens)

    def mint(self, session: Session, obj: object, exposed: Exposed, now: float) -> bytes:
        """A new token for ``obj`` (asked by ``session``). :class:`TooManyObjects` past a
        bound."""
        self.purge(now)
        if session.dead:
            raise TooManyObjects("the session has ended")
        owned = self.owned.get(session)
        size = ENTRY_OVERHEAD + sys.getsizeof(obj)
        if owned is not None and len(owned.tokens) >= self.max_per_session:
            raise TooManyObjects(
                f"this session has {self.max_per_session} introductions not used yet (limit)"
            )
        if owned is not None and owned.bytes + size > self.max_session_bytes:
            raise TooManyObjects(
                f"this session's introductions would exceed {self.max_session_bytes} bytes"
            )
        if len(self.tokens) >= self.max_total:
            raise TooManyObjects(f"the server holds {self.max_total} introductions (limit)")
        if self.bytes + size > self.max_total_bytes:
            raise TooManyObjects(
                f"the server's introductions would exceed {self.max_total_bytes} bytes"
            )
        token = secrets.token_bytes(ID_SIZE)
        while token in self.tokens:  # (2^-128)
            token = secrets.token_bytes(ID_SIZE)
        if owned is None:
            owned = self.owned[session] = _Owned(set())
        self.tokens[token] = _Intro(obj, exposed, session, now + self.ttl, size)
        owned.tokens.add(token)
        owned.bytes += size
        self.bytes += size
        return token

    def find(self, token: bytes, now: float) -> _Intro | None:
        """The live introduction ``token`` names (not used yet, not expired), or None."""
        self.purge(now)
        intro = self.tokens.get(token)
        if intro is None:
            return None
        if intro.expires <= now:
            self._drop(token, intro)
            return None
        return intro

    def use(self, token: bytes) -> None:
        """``token`` was adopted: it names nothing from now on."""
        intro = self.tokens.get(token)
        if intro is not None:
            self._drop(token, intro)

    def purge(self, now: float) -> None:
        """Drop the expired tokens (the oldest first: they are in minting order)."""
        tokens = self.tokens
        while tokens:
            token = next(iter(tokens))
            intro = tokens[token]
            if intro.expires > now:
                return
            self._drop(token, intro)

    def drop_session(self, session: Session) -> None:
        """``session`` ended: the tokens it asked for go with it."""
        owned = self.owned.pop(session, None)
        if owned is None:
            return
        for token in owned.tokens:
            intro = self.tokens.pop(token, None)
            if intro is not None:
                self.bytes -= intro.size

    def _drop(self, token: bytes, intro: _Intro) -> None:
        del self.tokens[token]
        self.bytes -= intro.size
        owned = self.owned.get(intro.session)
        if owned is not None:
            owned.tokens.discard(token)
            owned.bytes -= intro.size
            if not owned.tokens:
                del self.owned[intro.session]


_tables: weakref.WeakKeyDictionary[Objects, Introductions] = weakref.WeakKeyDictionary()


def introductions(pattern: Objects) -> Introductions:
    """The introductions of an object server (``pattern``: its :class:`Objects`); set its
    ``ttl`` and bounds there. Made on first use: ``ttl`` the lease."""
    table = _tables.get(pattern)
    if table is None:
        table = _tables[pattern] = Introductions(pattern.limits.lease)
        pattern.on_session_end.append(table.drop_session)
    return table


class _Refusal(ServiceError):
    _sockstack_code: int = ErrorCode.UNEXPECTED_ERROR
    __sockstack_name__ = "UNEXPECTED_ERROR"


_REFUSALS: dict[ErrorCode, type[ServiceError]] = {}


def _refuse(code: ErrorCode, message: str) -> ServiceError:
    cls = _REFUSALS.get(code)
    if cls is None:
        cls = _REFUSALS[code] = type(
            code.name, (_Refusal,), {"_sockstack_code": code, "__sockstack_name__": code.name}
        )
    return cls(message)


def methods(pattern: Objects) -> Mapping[str, Handler]:
    """``objects.share`` and ``objects.adopt`` of ``pattern`` (its ``methods()`` adds them)."""
    table = introductions(pattern)

    def session_here() -> Session:
        session = pattern.current_session()
        if session is None:
            raise _refuse(
                ErrorCode.SESSION_EXPIRED,
                "no session on this connection: call objects.attach first (PROTOCOL.md §4.5)",
            )
        return session

    def share(ref: bytes | str) -> dict[str, Any]:
        """``objects.share(ref)``: a token introducing the object ``ref`` names in the
        caller's session (its export id, or a registered name) to whoever the caller gives it
        to."""
        from sockstack.objects.pattern import _Refused

        session = session_here()
        if type(ref) is bytes:
            entry = session.get(ref) if len(ref) == ID_SIZE else None
            if entry is None:
                raise _refuse(
                    ErrorCode.UNKNOWN_OBJECT,
                    "no such object in this session (never given to it, or released)",
                )
            obj, found = entry.obj, entry.exposed
        elif type(ref) is str:
            try:
                obj, found = pattern._named(session, ref)
            except _Refused as exc:
                raise _refuse(ErrorCode(exc.code), exc.message) from None
        else:
            raise _refuse(ErrorCode.BAD_ARGUMENTS, "ref: an object id (bin 16) or a name (str)")
        try:
            token = table.mint(session, obj, found, pattern._clock())
        except TooManyObjects as exc:
            raise _refuse(ErrorCode.TOO_MANY_OBJECTS, str(exc)) from None
        return {"token": token, "iface": found.iface, "ttl_ms": int(table.ttl * 1000)}

    def adopt(token: bytes) -> dict[str, Any]:
        """``objects.adopt(token)``: the object a token introduces, exported to the caller's
        session (the token is used up)."""
        session = session_here()
        if type(token) is not bytes:
            raise _refuse(ErrorCode.BAD_ARGUMENTS, "token: bin 16")
        intro = table.find(token, pattern._clock()) if len(token) == ID_SIZE else None
        if intro is None:
            raise _refuse(
                ErrorCode.UNKNOWN_OBJECT,
                "token unknown, used already or expired",
            )
        try:
            key = session.export(intro.obj, intro.exposed)
        except TooManyObjects as exc:  # (the token stays: the caller may free room and retry)
            raise _refuse(ErrorCode.TOO_MANY_OBJECTS, str(exc)) from None
        table.use(token)
        return {"id": key, "iface": intro.exposed.iface}

    return {
        "objects.share": make_handler("objects.share", share, inline=True),
        "objects.adopt": make_handler("objects.adopt", adopt, inline=True),
    }


# =========================================================================== B: handing on


class Handoff(Exception):
    """The exporter met a proxy of another server's object on the event loop: its token must
    be asked for first (off the loop). Caught by the answerer; never reaches a user."""

    def __init__(self, proxy: object) -> None:
        super().__init__(
            "a reference to another server's object needs a token from that server first "
            "(handed on by the answerer)"
        )
        self.proxy = proxy


_minted: contextvars.ContextVar[dict[int, Ref] | None] = contextvars.ContextVar(
    "sockstack.objects.minted", default=None
)
_proxy_classes: tuple[type, ...] = ()


def _proxies() -> tuple[type, ...]:
    global _proxy_classes
    if not _proxy_classes:
        from sockstack.objects.client import AsyncProxy, Proxy

        _proxy_classes = (Proxy, AsyncProxy)
    return _proxy_classes


def third_ref(obj: object) -> Ref | None:
    """The exporter's hook, for a value that is not exposed: None unless it is a proxy of
    another server's object; then its form 4 reference (minted already, or now when this thread
    may block), or :class:`Handoff` on an event loop."""
    if not isinstance(obj, _proxies()):
        return None
    minted = _minted.get()
    if minted is not None:
        ref = minted.get(id(obj))
        if ref is None:  # (nested in a typed value the walk does not enter: a dataclass...)
            raise CodecError(
                "a proxy of another server's object where it cannot be handed on (in a list "
                "or a map only)"
            )
        return ref
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # a worker thread: it may wait for the token
        return _share_now(obj)
    raise Handoff(obj)


def _share_arg(proxy: Any) -> bytes | str:
    target = proxy._target
    if type(target) is ObjectTarget:
        return target.id
    if type(target) is NameTarget:
        return target.name
    raise CodecError("this proxy cannot be handed on")


def _third(proxy: Any, answer: Any) -> Ref:
    """The form 4 reference of ``objects.share``'s ``answer`` for ``proxy``."""
    if (
        type(answer) is not dict
        or type(answer.get("token")) is not bytes
        or type(answer.get("iface")) is not str
    ):
        raise RemoteProtocolError(
            "objects.share answered something else than {token, iface, ttl_ms}",
            ErrorCode.DECODE_ERROR,
        )
    url = str(proxy._client.client.endpoint)
    ref = Ref(FORM_THIRD, url=url, token=answer["token"], iface=answer["iface"])
    if len(url.encode()) > MAX_URL or len(ref.token) != ID_SIZE:
        raise CodecError(f"cannot hand on a reference to {url[:80]!r}")
    return ref


def _share_blocking(proxy: Proxy) -> Ref:
    """``objects.share`` for a blocking client's proxy (waits: never on an event loop)."""
    from sockstack.objects.client import Promise, resolve

    if isinstance(proxy, Promise):
        proxy = resolve(proxy)
    proxy._check()
    client: ObjectClient = proxy._client
    t, _, _, _ = client._prepare("objects.share", None)
    return _third(proxy, client.client.call("objects.share", _share_arg(proxy), timeout=t))


async def _share_async(proxy: AsyncProxy) -> Ref:
    """``objects.share`` for an asyncio client's proxy (on that client's loop)."""
    proxy._check()
    client: AsyncObjectClient = proxy._client
    if client.closed:
        raise ConnectError("the object client is closed")
    t = client.timeout
    await client._ensure_attached(time.monotonic() + t, "objects.share")
    answer = await client.client.call("objects.share", _share_arg(proxy), timeout=t)
    return _third(proxy, answer)


def _home_loop(proxy: Any) -> asyncio.AbstractEventLoop:
    loop: asyncio.AbstractEventLoop = proxy._client._channel().loop
    return loop


def _share_now(proxy: Any) -> Ref:
    """Share from a thread that may block (a worker thread running a method)."""
    from sockstack.objects.client import AsyncProxy

    if isinstance(proxy, AsyncProxy):
        fut = asyncio.run_coroutine_threadsafe(_share_async(proxy), _home_loop(proxy))
        return fut.result(proxy._client.timeout + 1.0)
    return _share_blocking(proxy)


def _collect(value: Any, out: dict[int, Any], depth: int = 0) -> None:
    """The proxies of other servers' objects in ``value`` (lists, tuples, maps), by id."""
    if depth > _MAX_DEPTH:
        return
    t = type(value)
    if t is list or t is tuple:
        for v in value:
            _collect(v, out, depth + 1)
    elif t is dict:
        for v in value.values():
            _collect(v, out, depth + 1)
    elif isinstance(value, _proxies()):
        out[id(value)] = value


async def mint_all(value: Any) -> dict[int, Ref]:
    """A form 4 reference for each proxy of another server's object in ``value`` (on the event
    loop; the tokens asked for off it, all at once)."""
    from sockstack.objects.client import AsyncProxy

    found: dict[int, Any] = {}
    _collect(value, found)
    loop = asyncio.get_running_loop()

    async def one(proxy: Any) -> Ref:
        if isinstance(proxy, AsyncProxy):
            home = _home_loop(proxy)
            if home is loop:
                return await _share_async(proxy)
            fut = asyncio.run_coroutine_threadsafe(_share_async(proxy), home)
            return await asyncio.wrap_future(fut)
        return await loop.run_in_executor(None, _share_blocking, proxy)

    refs = await asyncio.gather(*(one(p) for p in found.values()))
    return dict(zip(found, refs, strict=True))


_pending: set[asyncio.Task[Any]] = set()


def _failure(exc: BaseException) -> tuple[int, str, str]:
    """The ERROR a result gets when a reference in it could not be handed on."""
    if isinstance(exc, RemoteError) and exc.code == ErrorCode.TOO_MANY_OBJECTS:
        return (exc.code, "TOO_MANY_OBJECTS", f"handing on a reference: {exc}")
    if isinstance(exc, CallError | CodecError | RemoteProtocolError | OSError):
        return (
            ErrorCode.RESULT_NOT_ENCODABLE,
            "RESULT_NOT_ENCODABLE",
            f"the result holds a reference to another server's object that could not be "
            f"handed on: {exc}",
        )
    return (
        ErrorCode.UNEXPECTED_ERROR,
        "UNEXPECTED_ERROR",
        f"handing on a reference to another server's object: {type(exc).__name__}",
    )


def answer_later(
    answerer: Any, req: Any, outcome: tuple[bool, Any], ctx: Any, made: list[bytes]
) -> None:
    """The answerer's hook (``_Answerer._answer_with`` caught :class:`Handoff`): give back what
    the failed encoding exported, ask for the tokens off the loop, then answer again (or
    answer the failure). Ordering: this answer goes after others already written."""
    for key in made:
        answerer.session.release(key, 1)
    made.clear()
    loop = asyncio.get_running_loop()

    def answer(result: tuple[bool, Any], thirds: dict[int, Ref] | None) -> None:
        token = _minted.set(thirds if thirds is not None else {})
        try:
            answerer._answer(req, result, ctx)
        finally:
            _minted.reset(token)
        answerer.peer.flush()

    if len(_pending) >= MAX_PENDING_HANDOFFS:
        failure = (
            ErrorCode.OVERLOADED,
            "OVERLOADED",
            f"{MAX_PENDING_HANDOFFS} results wait for references to be handed on (limit)",
        )
        loop.call_soon(answer, (False, failure), None)
        return

    async def run() -> None:
        try:
            thirds = await mint_all(outcome[1])
        except Exception as exc:
            answer((False, _failure(exc)), None)
            return
        answer(outcome, thirds)

    task = loop.create_task(run())
    _pending.add(task)
    task.add_done_callback(_pending.discard)


def call_later(values: Sequence[Any], again: Callable[[], Any]) -> Any:
    """The callback's hook (a call to a client's object from the event loop, whose arguments
    hold a proxy of another server's object): an awaitable that asks for the tokens, then
    makes the call again (``again()``, the same call, encoded with them) and awaits it."""

    async def run() -> Any:
        thirds = await mint_all(list(values))
        token = _minted.set(thirds)
        try:
            waiting = again()
        finally:
            _minted.reset(token)
        return await waiting

    return run()


# =========================================================================== A: adopting


class _Thirds:
    """One object client's connections to third servers, by URL, and the tokens it adopted."""

    __slots__ = ("adopted", "clients", "lock")

    def __init__(self) -> None:
        self.clients: dict[str, Any] = {}
        self.adopted: dict[bytes, weakref.ref[Any]] = {}
        self.lock = threading.Lock()

    def remember(self, token: bytes, proxy: Any) -> None:
        adopted = self.adopted
        adopted[token] = weakref.ref(proxy)
        while len(adopted) > MAX_ADOPTED:
            del adopted[next(iter(adopted))]

    def seen(self, token: bytes) -> Any:
        ref = self.adopted.get(token)
        return ref() if ref is not None else None


_thirds: weakref.WeakKeyDictionary[Any, _Thirds] = weakref.WeakKeyDictionary()
_thirds_lock = threading.Lock()


def _thirds_of(client: Any) -> _Thirds:
    with _thirds_lock:
        thirds = _thirds.get(client)
        if thirds is None:
            thirds = _thirds[client] = _Thirds()
        return thirds


def _options(client: Any, url: str) -> dict[str, Any]:
    """How a client connects to a third server: its timeout; its TLS context for a tls://
    URL when it uses TLS itself. Never its shared secret or metadata (they are for the server
    it chose, not for one a server named)."""
    if not url.startswith(("tcp://", "tls://")):
        raise CodecError(f"a third server at {url[:80]!r}: remote objects need tcp:// or tls://")
    options: dict[str, Any] = {"timeout": client.timeout}
    tls = getattr(client.client, "tls", None)
    if url.startswith("tls://") and tls is not None:
        options["tls"] = tls
    return options


_seen_third: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "sockstack.objects.seen_third", default=False
)


def adopt(client: Any, ref: Ref) -> Any:
    """The decoder's hook (a form 4 reference in what ``client`` received): the blocking
    client's proxy of the object on the third server, adopted now; for the asyncio client the
    reference itself, adopted by :func:`adopt_all` in the same call."""
    from sockstack.objects.client import ObjectClient

    if not isinstance(client, ObjectClient):
        _seen_third.set(True)
        return ref
    thirds = _thirds_of(client)
    known = thirds.seen(ref.token)
    if known is not None:
        return known
    with thirds.lock:
        sub, made = _third_client(client, thirds, ref.url, ObjectClient)
        if made:
            thirds.clients[ref.url] = sub
    t, _, _, _ = sub._prepare("objects.adopt", None)
    answer = sub.client.call("objects.adopt", ref.token, timeout=t)
    proxy = sub._import(*_adopted(answer))
    if sub._undescribed:
        sub.describe()
    thirds.remember(ref.token, proxy)
    return proxy


def _third_client(client: Any, thirds: Any, url: str, make: Any) -> tuple[Any, bool]:
    """The client ``client`` keeps for the third server at ``url``: the one it has (True
    with a new one, ``make``'s, to keep); at most MAX_THIRD_SERVERS of them."""
    if client.closed:
        raise ConnectError("the object client is closed")
    sub = thirds.clients.get(url)
    if sub is not None and not sub.closed:
        return sub, False
    if sub is None and len(thirds.clients) >= MAX_THIRD_SERVERS:
        raise ConnectError(f"this client is connected to {MAX_THIRD_SERVERS} third servers (limit)")
    return make(url, **_options(client, url)), True


def _adopted(answer: Any) -> tuple[bytes, str]:
    if (
        type(answer) is not dict
        or type(answer.get("id")) is not bytes
        or len(answer["id"]) != ID_SIZE
        or type(answer.get("iface")) is not str
    ):
        raise RemoteProtocolError(
            "objects.adopt answered something else than {id, iface}", ErrorCode.DECODE_ERROR
        )
    return answer["id"], answer["iface"]


async def adopt_all(client: AsyncObjectClient, value: Any) -> Any:
    """The asyncio client's hook after it decoded a result: ``value`` with each form 4
    reference replaced by a proxy of the object on its third server (adopted now). Costs
    nothing (one context variable read) when the result held none."""
    if not _seen_third.get():
        return value
    _seen_third.set(False)
    return await _adopt_walk(client, value, 0)


async def _adopt_walk(client: AsyncObjectClient, value: Any, depth: int) -> Any:
    if type(value) is Ref and value.form == FORM_THIRD:
        return await _adopt_async(client, value)
    if depth > _MAX_DEPTH:
        return value
    if type(value) is list:
        return [await _adopt_walk(client, v, depth + 1) for v in value]
    if type(value) is dict:
        return {k: await _adopt_walk(client, v, depth + 1) for k, v in value.items()}
    return value


async def _adopt_async(client: AsyncObjectClient, ref: Ref) -> Any:
    from sockstack.objects.client import AsyncObjectClient

    thirds = _thirds_of(client)
    known = thirds.seen(ref.token)
    if known is not None:
        return known
    sub, made = _third_client(client, thirds, ref.url, AsyncObjectClient)
    if made:
        thirds.clients[ref.url] = sub
        try:
            await sub.connect()
        except BaseException:
            if thirds.clients.get(ref.url) is sub:
                del thirds.clients[ref.url]
            raise
    t = sub.timeout
    await sub._ensure_attached(time.monotonic() + t, "objects.adopt")
    answer = await sub.client.call("objects.adopt", ref.token, timeout=t)
    proxy = sub._import(*_adopted(answer))
    await sub._describe_new()
    thirds.remember(ref.token, proxy)
    return proxy


def third_clients(client: Any) -> Mapping[str, Any]:
    """The clients ``client`` opened to third servers, by URL (for inspection)."""
    thirds = _thirds.get(client)
    return dict(thirds.clients) if thirds is not None else {}


def close_thirds(client: Any) -> None:
    """The blocking client's close hook: close its connections to third servers."""
    thirds = _thirds.pop(client, None)
    if thirds is None:
        return
    with thirds.lock:
        subs, thirds.clients = list(thirds.clients.values()), {}
    for sub in subs:
        sub.close()


async def aclose_thirds(client: Any) -> None:
    """The asyncio client's close hook."""
    thirds = _thirds.pop(client, None)
    if thirds is None:
        return
    subs, thirds.clients = list(thirds.clients.values()), {}
    for sub in subs:
        await sub.close()
