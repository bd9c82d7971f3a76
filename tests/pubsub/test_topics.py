"""Topics, patterns and the subscription index (pure)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockstack.pubsub.topics import (
    SubscriptionIndex,
    TopicError,
    matches,
    validate_pattern,
    validate_topic,
)

TABLE = [
    # pattern, topic, matches?
    ("a.b.c", "a.b.c", True),
    ("a.b.c", "a.b", False),
    ("a.b", "a.b.c", False),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a.b.d", False),
    ("a.*.c", "a.b.x.c", False),
    ("*", "a", True),
    ("*", "a.b", False),
    ("*.*", "a.b", True),
    ("a.>", "a.b", True),
    ("a.>", "a.b.c.d", True),
    ("a.>", "a", False),
    (">", "a", True),
    (">", "a.b.c", True),
    ("a.*.>", "a.b.c", True),
    ("a.*.>", "a.b", False),
    ("*.b.>", "x.b.y", True),
    ("*.b.>", "x.c.y", False),
    ("sensors.room1.temp", "sensors.room1.temperature", False),
]


@pytest.mark.parametrize(("pattern", "topic", "expected"), TABLE)
def test_wildcard_table(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern, topic) is expected
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("s", pattern)
    assert (index.match(topic.split(".")) == ["s"]) is expected


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "a..b",
        ".a",
        "a.",
        "a.>.b",
        "a.b*",
        "a.>x",
        "a b",
        "a.\tb",
        "x" * 300,
        ".".join("a" * 40),
    ],
)
def test_invalid_patterns(pattern: str) -> None:
    with pytest.raises(TopicError):
        validate_pattern(pattern)


@pytest.mark.parametrize("topic", ["a.*", "a.>", "*", ">", "a..b", "", "a b"])
def test_invalid_topics(topic: str) -> None:
    with pytest.raises(TopicError):
        validate_topic(topic)


_token = st.sampled_from(["a", "b", "c", "dd"])
_topic = st.lists(_token, min_size=1, max_size=4).map(".".join)
_pattern = st.lists(st.sampled_from(["a", "b", "c", "dd", "*"]), min_size=1, max_size=4).flatmap(
    lambda toks: st.sampled_from([".".join(toks), ".".join([*toks, ">"])])
)


@settings(max_examples=200)
@given(st.lists(_pattern, max_size=30), st.lists(_topic, min_size=1, max_size=10), st.data())
def test_index_agrees_with_brute_force(
    patterns: list[str], topics: list[str], data: st.DataObject
) -> None:
    index: SubscriptionIndex[int] = SubscriptionIndex()
    for i, p in enumerate(patterns):
        index.add(i, p)
    removed = set(data.draw(st.sets(st.integers(0, max(0, len(patterns) - 1)))))
    for i in removed:
        index.remove(i)
    for topic in topics:
        want = sorted(i for i, p in enumerate(patterns) if i not in removed and matches(p, topic))
        assert sorted(index.match(topic.split("."))) == want
    for i in range(len(patterns)):
        index.remove(i)
    assert len(index) == 0 and not index._root.children and index._root.star is None


def test_ten_thousand_subscriptions_match_without_scanning() -> None:
    """10,000 subscriptions: a publish looks at the trie nodes on its path (and the wildcard
    branches that apply), not at every subscription. Counted, not timed (timing is the
    benchmark's job)."""
    index: SubscriptionIndex[int] = SubscriptionIndex()
    for i in range(10_000):
        index.add(i, f"dev.{i}.temp" if i % 10 else f"dev.{i}.*")
    index.add(10_000, "dev.>")
    rnd = random.Random(3)
    for _ in range(100):
        i = rnd.randrange(10_000)
        assert sorted(index.match(["dev", str(i), "temp"])) == sorted({i, 10_000})
        assert index.last_visits <= 5, index.last_visits  # root, dev, i, temp or *
