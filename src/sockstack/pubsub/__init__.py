"""Publish/subscribe on the sockstack protocol: topics and their index, the broker, and the
clients' subscribe/publish (in sockstack.asyncio.client and sockstack.sync.client)."""

from sockstack.pubsub.broker import Broker, BrokerError, BrokerLimits, SubOptions
from sockstack.pubsub.store import SQLiteStore
from sockstack.pubsub.topics import (
    SubscriptionIndex,
    TopicError,
    matches,
    validate_pattern,
    validate_topic,
)

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerLimits",
    "SQLiteStore",
    "SubOptions",
    "SubscriptionIndex",
    "TopicError",
    "matches",
    "validate_pattern",
    "validate_topic",
]
