"""The ``sockstack`` command: ``serve``, ``broker``, ``pub``, ``sub``, ``call``, ``ping``,
``describe``, ``inspect``, ``names``, ``edge`` and ``simulate``; ``python -m sockstack`` is the
same command.

Exit codes: 0 success; 1 the server answered with an error; 2 bad usage (including a service
that cannot be loaded); 3 no connection, lost connection or timeout; 141 (128 + SIGPIPE) when
whoever reads our output stopped reading (``sockstack call ... | head -c 10``), silently, as
other Unix tools end. Errors are one line on stderr.

One module per group of commands, each adding its own subcommands to the parser: ``serve``
(serve, broker), ``pubsub`` (pub, sub), ``client`` (call, ping), ``describe`` (a server's
methods), ``inspect`` (bytes per layer), ``names`` (remote objects' name service), ``edge``
(relays: edge, edge status, edge verify, simulate);
``common`` holds what they share (exit codes, usage errors, the client options).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from sockstack.cli import client, describe, edge, names, pubsub, serve
from sockstack.cli import inspect as inspect_command
from sockstack.cli.common import (
    EXIT_CONNECTION,
    EXIT_PIPE,
    EXIT_REMOTE,
    EXIT_USAGE,
    LOG_LEVELS,
    CommandFailed,
    UsageError,
    log_level,
)
from sockstack.errors import CallError, RemoteError, SockstackError
from sockstack.transport.urls import parse_endpoint

__all__ = ["build_parser", "main"]


def _add_log_level(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--log-level",
        type=log_level,
        choices=LOG_LEVELS,
        # On a subcommand the option is absent from the namespace unless given, so that the
        # value given before the subcommand is kept.
        default=argparse.SUPPRESS if default is None else default,
        metavar="LEVEL",
        help=f"{', '.join(LOG_LEVELS)} (any case; default INFO)",
    )


def build_parser() -> argparse.ArgumentParser:
    from sockstack import __version__

    p = argparse.ArgumentParser(
        prog="sockstack",
        description="Client/server over TCP and UDP sockets: serve a service, call it, ping it.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_log_level(p, "INFO")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_parsers(sub)
    pubsub.add_parsers(sub)
    client.add_parsers(sub)
    describe.add_parser(sub)
    inspect_command.add_parser(sub)
    names.add_parser(sub)
    edge.add_parsers(sub)
    for subparser in sub.choices.values():  # --log-level after the subcommand too
        _add_log_level(subparser, None)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code = _run(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, rather than at exit
        return code
    except BrokenPipeError:
        # The reader of our stdout is gone (`| head`): end quietly, as Unix tools do, and keep
        # the interpreter's last flush from failing on the same pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_PIPE
    except CommandFailed as exc:
        print(f"sockstack: {exc}", file=sys.stderr)
        return exc.code
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


def _run(args: argparse.Namespace) -> int:
    if args.command in ("serve", "broker"):
        return serve.run_serve(args)
    if args.command == "inspect":
        return inspect_command.run_inspect(args)
    if args.command == "names":
        return names.run_names(args)
    if args.command == "edge":
        return edge.run_edge(args)
    if args.command == "simulate":
        return edge.run_simulate(args)
    if args.url and not (args.command in ("call", "ping") and args.url.startswith("name://")):
        parse_endpoint(args.url)  # (name://SERVICE: a service found by name, docs/SCALING.md)
    if args.command == "pub":
        return pubsub.run_pub(args)
    if args.command == "sub":
        return pubsub.run_sub(args)
    if args.command == "describe":
        return describe.run_describe(args)
    return client.run_call(args) if args.command == "call" else client.run_ping(args)
