"""Topics and patterns (NATS style), and the subscription index.

A topic is tokens separated by ``.``: ``sensors.room1.temp``. A pattern may use ``*`` for exactly
one token (``sensors.*.temp``) and ``>`` as its last token for one or more tokens
(``sensors.>``). Tokens are non-empty and contain no whitespace, ``*`` or ``>`` (except as the
whole token, in patterns); a topic or pattern is at most 256 bytes and 32 tokens.

:class:`SubscriptionIndex` is a trie over tokens: matching a topic walks at most one path per
wildcard branch, so its cost grows with the topic's length and the wildcards that apply, not with
the number of subscriptions (measured: tests/pubsub/test_topics.py, 10,000 subscriptions).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

from sockstack.errors import TopicError

__all__ = [
    "MAX_TOKENS",
    "MAX_TOPIC_BYTES",
    "SubscriptionIndex",
    "TopicError",
    "check_topic",
    "matches",
    "validate_pattern",
    "validate_topic",
]

MAX_TOPIC_BYTES = 256
MAX_TOKENS = 32
_BAD_CHARS = frozenset(" \t\r\n\x00")

T = TypeVar("T", bound=Hashable)


def _tokens(text: str, what: str) -> list[str]:
    if not text:
        raise TopicError(f"empty {what}")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        raise TopicError(f"{what} longer than {MAX_TOPIC_BYTES} bytes")
    tokens = text.split(".")
    if len(tokens) > MAX_TOKENS:
        raise TopicError(f"{what} has more than {MAX_TOKENS} tokens")
    for t in tokens:
        if not t:
            raise TopicError(f"{what} {text!r} has an empty token")
        if _BAD_CHARS.intersection(t):
            raise TopicError(f"{what} {text!r} contains whitespace or NUL")
    return tokens


def validate_topic(topic: str) -> list[str]:
    """The tokens of a topic one may publish to (no wildcards), or :class:`TopicError`."""
    tokens = _tokens(topic, "topic")
    for t in tokens:
        if "*" in t or ">" in t:
            raise TopicError(f"topic {topic!r}: wildcards are for subscriptions, not publishing")
    return tokens


_CHECKED: dict[str, None] = {}


def check_topic(topic: str) -> None:
    """:func:`validate_topic` with a bounded memory of topics already found valid (publishers
    repeat their topics: this makes the check a dictionary lookup)."""
    if topic in _CHECKED:
        return
    validate_topic(topic)
    if len(_CHECKED) >= 10_000:
        _CHECKED.clear()
    _CHECKED[topic] = None


def validate_pattern(pattern: str) -> list[str]:
    """The tokens of a subscription pattern, or :class:`TopicError`."""
    tokens = _tokens(pattern, "pattern")
    for i, t in enumerate(tokens):
        if t == ">" and i != len(tokens) - 1:
            raise TopicError(f"pattern {pattern!r}: '>' must be the last token")
        if t not in ("*", ">") and ("*" in t or ">" in t):
            raise TopicError(f"pattern {pattern!r}: a wildcard must be a whole token")
    return tokens


def matches(pattern: str, topic: str) -> bool:
    """Whether ``topic`` matches ``pattern`` (the reference the index is tested against)."""
    p, t = pattern.split("."), topic.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(t) > i
        if i >= len(t) or (token != "*" and token != t[i]):
            return False
    return len(p) == len(t)


class _Node(Generic[T]):
    __slots__ = ("children", "exact", "star", "tail")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        self.star: _Node[T] | None = None
        self.exact: set[T] = set()  # subscriptions whose pattern ends here
        self.tail: set[T] = set()  # subscriptions whose pattern ends here with '>'


class SubscriptionIndex(Generic[T]):
    """Patterns -> subscribers, matched per topic without scanning every subscription."""

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self._patterns: dict[T, list[str]] = {}
        self.last_visits = 0

    def __len__(self) -> int:
        return len(self._patterns)

    def add(self, sub: T, pattern: str) -> None:
        tokens = validate_pattern(pattern)
        node = self._root
        for t in tokens:
            if t == ">":
                node.tail.add(sub)
                break
            if t == "*":
                if node.star is None:
                    node.star = _Node()
                node = node.star
            else:
                node = node.children.setdefault(t, _Node())
        else:
            node.exact.add(sub)
        self._patterns[sub] = tokens

    def remove(self, sub: T) -> None:
        tokens = self._patterns.pop(sub, None)
        if tokens is None:
            return
        path: list[tuple[_Node[T], str]] = []
        node = self._root
        for t in tokens:
            if t == ">":
                node.tail.discard(sub)
                break
            path.append((node, t))
            nxt = node.star if t == "*" else node.children.get(t)
            assert nxt is not None
            node = nxt
        else:
            node.exact.discard(sub)
        # Prune branches left empty, bottom up.
        for parent, t in reversed(path):
            child = parent.star if t == "*" else parent.children[t]
            assert child is not None
            if child.exact or child.tail or child.children or child.star is not None:
                break
            if t == "*":
                parent.star = None
            else:
                del parent.children[t]

    def match(self, topic_tokens: list[str]) -> list[T]:
        """Every subscriber whose pattern matches the topic (each once)."""
        out: list[T] = []
        n = len(topic_tokens)
        stack: list[tuple[_Node[T], int]] = [(self._root, 0)]
        visits = 0
        while stack:
            node, i = stack.pop()
            visits += 1
            if node.tail and i < n:
                out.extend(node.tail)
            if i == n:
                out.extend(node.exact)
                continue
            child = node.children.get(topic_tokens[i])
            if child is not None:
                stack.append((child, i + 1))
            if node.star is not None:
                stack.append((node.star, i + 1))
        self.last_visits = visits  # trie nodes this match looked at (for tests and stats)
        return out

    def subscribers(self) -> Iterable[T]:
        return self._patterns.keys()
