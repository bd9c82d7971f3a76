"""``sockstack pub`` and ``sockstack sub``: publish a message; subscribe and print messages."""

from __future__ import annotations

import argparse
import json
import time

from sockstack.cli.common import (
    EXIT_CONNECTION,
    EXIT_OK,
    EXIT_REMOTE,
    CommandFailed,
    UsageError,
    add_client_arguments,
    client_options,
    parse_value,
)
from sockstack.clients import connect
from sockstack.errors import CallTimeout, ErrorCode, RemoteError

__all__ = ["add_parsers", "run_pub", "run_sub"]


def run_pub(args: argparse.Namespace) -> int:
    """Publish, then (at QoS 0) make one round trip on the same connection or socket to
    ``broker.stats``: nothing answers a QoS 0 PUB, so a server without a broker would drop the
    message unseen. Over TCP the answer also proves the server has read the PUB (frames are
    handled in order); over UDP the PUB datagram itself may still be lost."""
    if args.clear == (args.value is not None):
        raise UsageError("pub: give either VALUE or --clear")
    if args.clear and args.url.lower().startswith("udp"):
        raise UsageError(
            "pub --clear is answered by the broker (QoS 1), over a connection: use tcp:// or tls://"
        )
    deadline: float = time.monotonic() + args.timeout  # --timeout bounds connect + all

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CallTimeout("PUB " + args.topic, args.timeout)
        return remaining

    with connect(args.url, timeout=args.timeout, **client_options(args)) as client:
        if args.clear:  # answered: the broker has cleared it
            client.clear_retained(args.topic, qos=1, timeout=left())
            return EXIT_OK
        value = parse_value(args.value)
        client.publish(args.topic, value, qos=args.qos, retain=args.retain, timeout=left())
        if not args.qos:
            try:
                client.call("broker.stats", timeout=left())
            except RemoteError as exc:
                if exc.code != ErrorCode.UNKNOWN_METHOD:
                    raise
                raise CommandFailed(
                    f"remote error: {args.url} has no broker ({exc}): the message went nowhere; "
                    "publish to `sockstack broker` or `sockstack serve --broker`",
                    EXIT_REMOTE,
                ) from None
    return EXIT_OK


def run_sub(args: argparse.Namespace) -> int:
    if args.url.lower().startswith("udp"):
        raise UsageError(
            f"sub {args.url}: a subscription lives on a connection: use tcp:// or tls:// "
            "(udp:// takes QoS 0 publishes only)"
        )
    if args.count < 0 or args.timeout < 0:
        raise UsageError("--count and --timeout must not be negative")
    with connect(args.url, **client_options(args)) as client:
        if args.durable and (args.group or args.qos == 0):
            raise UsageError("--durable is QoS 1 and has no --group")
        if args.durable:
            sub = client.subscribe(args.pattern, durable=args.durable)
        else:
            sub = client.subscribe(args.pattern, group=args.group, qos=args.qos or 0)
        seen = 0
        while not args.count or seen < args.count:
            try:
                msg = sub.get(timeout=args.timeout or 365 * 86400.0)
            except CallTimeout:
                if args.count:
                    raise CommandFailed(
                        f"error: got {seen} of {args.count} messages "
                        f"({args.timeout:g} s without one)",
                        EXIT_CONNECTION,
                    ) from None
                break  # no --count: silence for --timeout is the way it ends
            print(f"{msg.topic} {json.dumps(msg.value, default=repr)}", flush=True)
            seen += 1
    return EXIT_OK


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pb = sub.add_parser(
        "pub",
        help="publish a message",
        description="Publish VALUE (JSON when it parses, else a string) to TOPIC. At QoS 0 the "
        "command then calls broker.stats on the same connection: a server without a broker "
        "is an error (exit 1) instead of a message gone unseen.",
    )
    add_client_arguments(pb)
    pb.add_argument("topic")
    pb.add_argument("value", nargs="?", help="JSON when it parses, else a string")
    pb.add_argument(
        "--clear",
        action="store_true",
        help="instead of a VALUE: clear TOPIC's retained message (answered at QoS 1)",
    )
    pb.add_argument("--qos", type=int, choices=[0, 1], default=0, help="0 (default) or 1")
    pb.add_argument("--retain", action="store_true", help="keep as the topic's last message")
    pb.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")

    sb = sub.add_parser(
        "sub",
        help="subscribe and print messages",
        description="Subscribe to PATTERN (* is one token, > the rest) and print one line per "
        "message: the topic, a space, the value as JSON. Stops after --count messages (exit 0) or "
        "--timeout seconds without one (exit 3 if fewer than --count arrived, else 0).",
    )
    add_client_arguments(sb, udp=False)
    sb.add_argument("pattern")
    sb.add_argument("--group", help="queue group: members share the messages")
    sb.add_argument("--qos", type=int, choices=[0, 1], default=None, help="0 (default) or 1")
    sb.add_argument(
        "--durable",
        metavar="NAME",
        help="a durable subscription (QoS 1): the broker keeps NAME and the messages published "
        "while nobody holds it, and gives them to the next `sub --durable NAME`, in order "
        "(docs/SCALING.md); each is acknowledged once printed",
    )
    sb.add_argument("--count", type=int, default=0, help="stop after N messages (0: never)")
    sb.add_argument(
        "--timeout", type=float, default=0.0, help="stop after this many seconds of silence"
    )
