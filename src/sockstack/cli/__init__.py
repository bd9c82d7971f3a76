"""The ``sockstack`` command: ``serve``, ``broker``, ``pub``, ``sub``, ``call``, ``ping`` and
``inspect``.

Exit codes: 0 success; 1 the server answered with an error; 2 bad usage; 3 no connection, lost
connection or timeout. Errors are one line on stderr.

One module per group of commands, each adding its own subcommands to the parser: ``serve``
(serve, broker), ``pubsub`` (pub, sub), ``client`` (call, ping), ``inspect`` (bytes per layer);
``common`` holds what they share (exit codes, usage errors, the client options).
"""

from __future__ import annotations

import argparse
import logging
import sys

from sockstack.cli import client, pubsub, serve
from sockstack.cli import inspect as inspect_command
from sockstack.cli.common import EXIT_CONNECTION, EXIT_REMOTE, EXIT_USAGE, UsageError
from sockstack.errors import CallError, RemoteError, SockstackError
from sockstack.transport.urls import parse_endpoint

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sockstack",
        description="Client/server over TCP and UDP sockets: serve a service, call it, ping it.",
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING... (default INFO)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_parsers(sub)
    pubsub.add_parsers(sub)
    client.add_parsers(sub)
    inspect_command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command in ("serve", "broker"):
            return serve.run_serve(args)
        if args.command == "inspect":
            return inspect_command.run_inspect(args)
        if args.url:
            parse_endpoint(args.url)
        if args.command == "pub":
            return pubsub.run_pub(args)
        if args.command == "sub":
            return pubsub.run_sub(args)
        return client.run_call(args) if args.command == "call" else client.run_ping(args)
    except UsageError as exc:
        print(f"sockstack: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RemoteError as exc:
        print(f"sockstack: remote error: {exc}", file=sys.stderr)
        return EXIT_REMOTE
    except (ValueError, SockstackError) as exc:
        is_usage = isinstance(exc, ValueError) and not isinstance(exc, CallError)
        print(f"sockstack: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if is_usage else EXIT_CONNECTION
    except KeyboardInterrupt:
        return 130
