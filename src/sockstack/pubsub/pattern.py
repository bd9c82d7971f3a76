"""Publish/subscribe as a pattern on the host: SUB, UNSUB, PUB and ACK routed to a broker.

::

    Server(patterns=[RPC(Calculator()), PubSub(Broker())], tcp=["127.0.0.1:5050"])

It adds the message types 0x10-0x1F (:data:`~sockstack.pubsub.messages.PUBSUB_MESSAGES`), the
``broker.stats`` method, QoS 0 PUB datagrams over UDP (never answered), the broker's once-a-second
tick (QoS 1 redelivery), and forgets a connection's subscriptions when it goes.

SUB, UNSUB and QoS 1 PUB are answered with RESPONSE (result nil) in the codec of the frame they
answer (msgpack ``c0``, JSON ``null``, raw: no bytes; a codec byte the broker does not have, on
a frame without a body: raw), or with ERROR. A bad ACK gets ERROR UNKNOWN_DELIVERY with request
id 0: an ACK is not a request, and its delivery id (the broker's) must not be taken for a
request id of the client's (PROTOCOL.md §4.1).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from sockstack.errors import ErrorCode, RemoteProtocolError
from sockstack.host.dispatch import Handler, make_handler
from sockstack.host.pattern import DatagramPeer, HostContext, Pattern, Peer
from sockstack.protocol.codecs import CODECS, RAW, Codec
from sockstack.protocol.events import PatternMessage
from sockstack.protocol.frames import parse_datagram
from sockstack.protocol.registry import Registry
from sockstack.pubsub.broker import Broker, BrokerError
from sockstack.pubsub.messages import PUBSUB_MESSAGES, Ack, Pub, PubSubType, Sub, Unsub
from sockstack.transport.urls import format_peer

__all__ = ["PubSub"]

TICK = 1.0  # seconds between QoS 1 redelivery checks
_ONLY_PUBSUB = Registry(
    [PUBSUB_MESSAGES], frozen=True
)  # decodes the PUB datagrams handed to this pattern


class PubSub(Pattern):
    """Host ``broker`` (a new :class:`Broker` with default limits when None)."""

    name = "pubsub"
    messages = PUBSUB_MESSAGES
    datagram_types = frozenset({int(PubSubType.PUB)})

    def __init__(self, broker: Broker | None = None) -> None:
        self.broker = broker if broker is not None else Broker()
        self._host: HostContext | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._held: set[Peer] = set()  # publishers not read while the link is behind
        self._release_pending = False  # a when_drained callback is registered
        self._max_datagram = 65507

    def methods(self) -> Mapping[str, Handler]:
        return {
            "broker.stats": make_handler(
                "broker.stats", self.broker.stats, inline=True, readonly=True
            )
        }

    # ------------------------------------------------------------------ life

    def start(self, host: HostContext) -> None:
        self._host = host
        self._max_datagram = host.limits.max_datagram
        assert host.loop is not None
        self._timer = host.loop.call_later(TICK, self._tick)
        store = self.broker.store
        if store is not None:
            store.start()

    def _tick(self) -> None:
        host = self._host
        if host is not None and host.loop is not None and not host.draining:
            self.broker.tick()
            self._timer = host.loop.call_later(TICK, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def closed(self) -> None:
        store = self.broker.store
        if store is not None:
            await store.close()  # what is staged is committed first

    def connection_lost(self, peer: Peer) -> None:
        self.broker.peer_gone(peer)
        self._held.discard(peer)

    def connection_writable(self, peer: Peer) -> None:
        self.broker.peer_writable(peer)

    # ------------------------------------------------------------------ messages

    def stream_message(self, peer: Peer, msg: PatternMessage) -> None:
        broker = self.broker
        if type(msg) is Pub and not msg.request_id:
            try:  # QoS 0 publishing, the bulk of pub/sub traffic: straight to the broker
                broker.publish(msg.topic, msg.payload, msg.codec, msg.retain)
            except BrokerError as exc:
                self._refuse(peer, 0, exc)
            link = broker.link
            if link is not None and getattr(link, "backlogged", False):
                self._hold(peer, link)
            return
        core = peer.core
        assert core is not None
        rid = 0  # an ACK's refusal keeps 0: it answers no request
        try:
            if isinstance(msg, Pub):
                rid = msg.request_id
                codec = CODECS[msg.codec]
                link = broker.link
                if (
                    link is not None
                    and getattr(link, "holds_durables", False)
                    and (msg.payload or not msg.retain)  # (a clear: nothing to keep there)
                ):
                    # QoS 1 through a link that keeps messages (JetStream): accepted once
                    # kept there, and committed to this broker's store if it has one.
                    answer = _Answer(self, peer, rid, codec)
                    broker.publish(msg.topic, msg.payload, msg.codec, msg.retain, answer.link)
                    answer.after_store(broker.store)
                    return
                broker.publish(msg.topic, msg.payload, msg.codec, msg.retain)
                store = broker.store
                if store is not None and store.pending_commit():
                    # QoS 1 with a store: accepted once what it changed there is committed
                    # (fsync'd with sync=full), in the next group commit.
                    store.after_commit(lambda ok: self._accepted(peer, rid, codec, ok))
                else:
                    core.send_response(rid, None, codec)  # QoS 1: accepted
            elif isinstance(msg, Sub):
                rid = msg.sid
                sub = broker.subscribe(peer, msg.sid, msg.pattern, msg.options)
                # Answered before the retained messages that follow it.
                core.send_response(msg.sid, None, CODECS.get(msg.codec, RAW))
                broker.deliver_retained(sub)
            elif isinstance(msg, Ack):
                broker.ack(peer, msg.delivery_id)
            elif isinstance(msg, Unsub):
                rid = msg.sid
                broker.unsubscribe(peer, msg.sid)
                core.send_response(msg.sid, None, CODECS.get(msg.codec, RAW))
        except BrokerError as exc:
            self._refuse(peer, rid, exc)

    def _hold(self, peer: Peer, link: Any) -> None:
        """The link to other brokers is behind: read no more from this publisher until it
        caught up (TCP backpressure to the publisher, rather than dropping its messages)."""
        if peer in self._held:
            return
        self._held.add(peer)
        peer.hold_reading(True)
        if not self._release_pending:
            self._release_pending = True
            link.when_drained(self._release_held)

    def _release_held(self) -> None:
        self._release_pending = False
        held, self._held = self._held, set()
        for peer in held:
            peer.hold_reading(False)

    def _accepted(self, peer: Peer, rid: int, codec: Codec, ok: bool, why: str = "") -> None:
        core = peer.core
        if core is None:
            return
        if ok:
            core.send_response(rid, None, codec)
        else:  # routed, maybe delivered, but not kept: the publisher may send it again
            core.send_error(
                rid,
                ErrorCode.UNAVAILABLE,
                ErrorCode.UNAVAILABLE.name,
                why
                or "the broker's store failed to commit this message (see the broker's log): "
                "it was routed to the subscribers connected now but is not kept",
            )
        peer.flush()

    def _refuse(self, peer: Peer, rid: int, exc: BrokerError) -> None:
        if self._host is not None:
            self._host.bad_log.warning(
                "client %s: %s [%s]", peer.peer, exc.message, ErrorCode.describe(exc.code)
            )
        assert peer.core is not None
        peer.core.send_error(rid, exc.code, ErrorCode(exc.code).name, exc.message)

    def datagram_received(self, endpoint: DatagramPeer, data: bytes, addr: Any) -> None:
        """QoS 0 over UDP: a PUB datagram is routed and never answered."""
        try:
            pub = _ONLY_PUBSUB.decode(parse_datagram(data, self._max_datagram))
            assert isinstance(pub, Pub)
            self.broker.publish(pub.topic, pub.payload, pub.codec, pub.retain)
        except (RemoteProtocolError, BrokerError) as exc:
            endpoint.count_bad()
            endpoint.bad_log.warning("udp server %s: PUB refused: %s", format_peer(addr), exc)


class _Answer:
    """A QoS 1 PUB's answer when two must agree: the link keeping it (JetStream) and this
    broker's store committing it (when it has one and the publish changed it). RESPONSE once
    both did, ERROR UNAVAILABLE as soon as one failed; exactly one answer."""

    __slots__ = ("codec", "pattern", "peer", "rid", "waiting")

    def __init__(self, pattern: PubSub, peer: Peer, rid: int, codec: Codec) -> None:
        self.pattern, self.peer, self.rid, self.codec = pattern, peer, rid, codec
        self.waiting = 2  # the link and the store

    def link(self, ok: bool, why: str) -> None:
        self._one(ok, why)

    def after_store(self, store: Any) -> None:
        if store is not None and store.pending_commit():
            store.after_commit(lambda ok: self._one(ok, ""))
        else:
            self._one(True, "")

    def _one(self, ok: bool, why: str) -> None:
        if self.waiting <= 0:
            return
        if not ok:
            self.waiting = 0
            self.pattern._accepted(self.peer, self.rid, self.codec, False, why)
            return
        self.waiting -= 1
        if not self.waiting:
            self.pattern._accepted(self.peer, self.rid, self.codec, True)
