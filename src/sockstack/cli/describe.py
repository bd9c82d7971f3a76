"""``sockstack describe``: what a server serves, from its built-in ``rpc.describe``.

Readable by default (each method's signature and the first line of its docstring, then the
declared errors); ``--json`` prints the answer as it came (PROTOCOL.md §4.2). A description too
large for one frame or datagram (RESULT_TOO_LARGE, DATAGRAM_TOO_LARGE) is fetched again in
parts: the names first, then each method on its own.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from sockstack.cli.client import left
from sockstack.cli.common import EXIT_OK, add_client_arguments, client_options
from sockstack.cli.serve import _first_sentence
from sockstack.clients import Client, connect
from sockstack.errors import CallTimeout, ErrorCode, RemoteError
from sockstack.rpc.describe import DESCRIBE

__all__ = ["add_parser", "format_description", "run_describe"]

_TOO_LARGE = (ErrorCode.RESULT_TOO_LARGE, ErrorCode.DATAGRAM_TOO_LARGE)


def _fetch(client: Client, names: list[str] | None, deadline: float, args: Any) -> Any:
    """The description (of ``names``, or all), in parts when the whole is too large."""
    params = [names] if names else []
    try:
        return client.request(DESCRIBE, params, timeout=left(deadline, args))
    except RemoteError as exc:
        if exc.code not in _TOO_LARGE:
            raise
    head = client.request(DESCRIBE, [[]], timeout=left(deadline, args))
    names = names or list(head.pop("names"))
    head.pop("names", None)
    for name in names:  # bounded by the server's method count; each alone (or its error)
        part = client.request(DESCRIBE, [[name]], timeout=left(deadline, args))
        head["methods"].extend(part["methods"])
    return head


def _first_line(text: str) -> str:
    """The first sentence of the first paragraph (as ``serve``'s banner shows a method)."""
    return _first_sentence(text or "")


def format_description(d: dict[str, Any], url: str) -> str:
    """The readable form: a header, one line per method (and its doc's first line), errors."""
    methods = d.get("methods", [])
    lines = [f"{d.get('service', '?')} on {url}: {len(methods)} methods"]
    doc = _first_line(d.get("doc", ""))
    if doc:
        lines.append(f"  {doc}")
    lines.append("")
    for m in methods:
        streams = "  (stream: sockstack call prints its items)" if m.get("stream") else ""
        uploads = [p["name"] for p in m.get("params", ()) if p.get("stream")]
        if uploads:
            streams += f"  (upload: {uploads[0]} is an item stream, client.upload())"
        lines.append(f"  {m['name']}{m['signature']}{streams}")
        first = _first_line(m.get("doc", ""))
        if first:
            lines.append(f"      {first}")
    errors = d.get("errors", [])
    if errors:
        lines.append("")
        lines.append("errors:")
        for e in errors:
            first = _first_line(e.get("doc", ""))
            lines.append(f"  {e['name']}" + (f": {first}" if first else ""))
    return "\n".join(lines)


def run_describe(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout  # --timeout bounds the command
    args.method = DESCRIBE  # for left()'s and CallTimeout's messages
    with connect(args.url, timeout=args.timeout, **client_options(args)) as client:
        try:
            d = _fetch(client, args.methods or None, deadline, args)
        except CallTimeout:
            raise CallTimeout(DESCRIBE, args.timeout) from None
        except RemoteError as exc:
            if exc.code == ErrorCode.UNKNOWN_METHOD and not args.methods:
                raise RemoteError(
                    exc.type,
                    f"{exc.message}: the server has no RPC service to describe (or predates "
                    "rpc.describe)",
                    exc.code,
                ) from None
            raise
    if args.json:
        print(json.dumps(d, indent=2, ensure_ascii=False))
    else:
        print(format_description(d, args.url))
    return EXIT_OK


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "describe",
        help="list a server's methods: signatures, docs, errors",
        description="Ask the server at URL for its built-in rpc.describe and print each "
        "method's signature and the first line of its docstring, then the error types the "
        "service declares. --json prints the whole answer (parameters, JSON Schemas of "
        "arguments and results, full docstrings) as JSON.",
    )
    add_client_arguments(p)
    p.add_argument("methods", nargs="*", metavar="METHOD", help="only these methods")
    p.add_argument("--json", action="store_true", help="print the raw answer as JSON")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
