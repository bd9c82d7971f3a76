"""Errors over HTTP: RFC 9457 problem details (``application/problem+json``), one per error.

Every error the gateway answers is a problem object carrying the protocol's error code, so a
client reads the same code over HTTP as over TCP or UDP (docs/HTTP.md, "Errors")::

    {"type": "urn:sockstack:error:BAD_ARGUMENTS", "title": "BAD_ARGUMENTS", "status": 422,
     "detail": "add(a: int, b: int) -> int: missing a required argument: 'b'", "code": 2001}

:data:`STATUS` maps each code to its HTTP status; a code it does not name is 500.
"""

from __future__ import annotations

from typing import Any

from sockstack.errors import ErrorCode

__all__ = ["PROBLEM_REF", "STATUS", "HttpProblem", "problem_body", "problem_name", "status_of"]

STATUS: dict[int, int] = {
    ErrorCode.UNKNOWN_METHOD: 404,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNKNOWN_OBJECT: 404,
    ErrorCode.BAD_ARGUMENTS: 422,
    ErrorCode.DECODE_ERROR: 400,
    ErrorCode.BAD_TOPIC: 400,
    ErrorCode.APPLICATION_ERROR: 400,
    ErrorCode.UNSUPPORTED_CODEC: 415,
    ErrorCode.STREAM_MISMATCH: 400,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.FRAME_TOO_LARGE: 413,
    ErrorCode.HEADERS_TOO_LARGE: 431,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.PRECONDITION_FAILED: 412,
    ErrorCode.AUTH_FAILED: 401,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.REFUSED: 403,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.ABANDONED: 503,  # (cut off by the stop; no Retry-After: it may have run in part)
    ErrorCode.TOO_MANY_SUBSCRIPTIONS: 503,
    ErrorCode.RETAINED_STORE_FULL: 507,
    ErrorCode.STORE_FULL: 507,  # (an edge relay's outbox)
    ErrorCode.BAD_RECORD: 422,
    ErrorCode.UNAVAILABLE: 503,  # (an edge sink's database)
    ErrorCode.SLOW_CONSUMER: 503,
    ErrorCode.REPLAY_GAP: 410,  # (inside an event stream: events the buffer no longer holds)
    ErrorCode.CANCELLED: 499,  # (nginx's "client closed request": nobody reads it)
    ErrorCode.FRAME_TIMEOUT: 408,
    ErrorCode.UNEXPECTED_ERROR: 500,
    ErrorCode.BAD_RESULT: 500,
    ErrorCode.RESULT_NOT_ENCODABLE: 500,
    ErrorCode.RESULT_TOO_LARGE: 500,
}
"""HTTP status per error code (docs/HTTP.md has the table)."""

RETRY_AFTER: dict[int, str] = {ErrorCode.OVERLOADED: "1", ErrorCode.SHUTTING_DOWN: "5"}
"""Seconds in ``Retry-After`` for the codes that mean "later, or elsewhere"."""


PROBLEM_REF: dict[str, str] = {"$ref": "#/components/schemas/Problem"}
"""The problem object's schema in ``/openapi.json`` (``components/schemas/Problem``), for the
route modules' own path items."""


def status_of(code: int) -> int:
    return STATUS.get(code, 500)


def problem_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"ERROR_{int(code)}"


def problem_body(
    code: int, detail: str, *, type_name: str | None = None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The problem object of an error. ``type_name``: an APPLICATION_ERROR's declared error
    type (``"OutOfStock"``), kept under ``"error"``."""
    name = problem_name(code)
    body: dict[str, Any] = {
        "type": f"urn:sockstack:error:{name}",
        "title": name,
        "status": status_of(code),
        "detail": detail,
        "code": int(code),
    }
    if type_name and type_name != name:
        body["error"] = type_name
    if extra:
        body.update(extra)
    return body


class HttpProblem(Exception):
    """Raised inside a route to answer with a problem (and, for 405, ``Allow``)."""

    def __init__(
        self,
        code: int,
        detail: str,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        type_name: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.code = int(code)
        self.detail = detail
        self.headers = headers or []
        self.type_name = type_name
        self.extra = extra
