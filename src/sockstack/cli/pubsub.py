"""``sockstack pub`` and ``sockstack sub``: publish a message; subscribe and print messages."""

from __future__ import annotations

import argparse
import json

from sockstack.cli.common import EXIT_OK, add_client_arguments, client_options, parse_value
from sockstack.clients import connect
from sockstack.errors import CallTimeout

__all__ = ["add_parsers", "run_pub", "run_sub"]


def run_pub(args: argparse.Namespace) -> int:
    with connect(args.url, timeout=args.timeout, **client_options(args)) as client:
        client.publish(args.topic, parse_value(args.value), qos=args.qos, retain=args.retain)
    return EXIT_OK


def run_sub(args: argparse.Namespace) -> int:
    with connect(args.url, **client_options(args)) as client:
        sub = client.subscribe(args.pattern, group=args.group, qos=args.qos)
        seen = 0
        while not args.count or seen < args.count:
            try:
                msg = sub.get(timeout=args.timeout or 365 * 86400.0)
            except CallTimeout:
                break
            print(f"{msg.topic} {json.dumps(msg.value, default=repr)}", flush=True)
            seen += 1
    return EXIT_OK


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pb = sub.add_parser(
        "pub",
        help="publish a message",
        description="Publish VALUE (JSON when it parses, else a string) to TOPIC.",
    )
    add_client_arguments(pb)
    pb.add_argument("topic")
    pb.add_argument("value")
    pb.add_argument("--qos", type=int, choices=[0, 1], default=0, help="0 (default) or 1")
    pb.add_argument("--retain", action="store_true", help="keep as the topic's last message")
    pb.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")

    sb = sub.add_parser(
        "sub",
        help="subscribe and print messages",
        description="Subscribe to PATTERN (* is one token, > the rest) and print one line per "
        "message: the topic, a space, the value as JSON. Stops after --count messages or "
        "--timeout seconds without one.",
    )
    add_client_arguments(sb)
    sb.add_argument("pattern")
    sb.add_argument("--group", help="queue group: members share the messages")
    sb.add_argument("--qos", type=int, choices=[0, 1], default=0, help="0 (default) or 1")
    sb.add_argument("--count", type=int, default=0, help="stop after N messages (0: never)")
    sb.add_argument(
        "--timeout", type=float, default=0.0, help="stop after this many seconds of silence"
    )
