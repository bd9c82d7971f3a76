"""From a decoded REQUEST to an outcome: method lookup, argument check, execution, error mapping.

Shared by every transport adapter so that TCP and UDP answer the same request the same way.
An outcome is ``(True, result)`` or ``(False, (code, type, message))``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
from collections.abc import Awaitable
from typing import Any

from sockstack.errors import ErrorCode
from sockstack.protocol.messages import Request
from sockstack.rpc.service import Handler, ServiceError, collect_handlers

__all__ = ["DEFAULT_MAX_WORKERS", "Dispatcher", "Outcome"]

log = logging.getLogger("sockstack.server")
Outcome = tuple[bool, Any]
DEFAULT_MAX_WORKERS = 32


class Dispatcher:
    """Runs requests against one service instance."""

    def __init__(
        self,
        service: object,
        *,
        expose_errors: bool = True,
        max_workers: int = DEFAULT_MAX_WORKERS,
        allow_empty: bool = False,
    ) -> None:
        if isinstance(service, type):
            service = service()
        self.service = service
        self.handlers: dict[str, Handler] = collect_handlers(service, allow_empty)
        self.expose_errors = expose_errors
        self.max_workers = max_workers
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self.max_workers, thread_name_prefix="sockstack-handler"
            )
        return self._executor

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _failure(self, req: Request, exc: BaseException) -> Outcome:
        if isinstance(exc, ServiceError) or self.expose_errors:
            message = str(exc)
        else:
            message = "internal error (details are in the server's log)"
        if not isinstance(exc, ServiceError):
            log.error("method %r raised %s", req.method, type(exc).__name__, exc_info=exc)
        return False, (ErrorCode.APPLICATION_ERROR, type(exc).__name__, message)

    def dispatch(self, req: Request) -> Outcome | Awaitable[Outcome]:
        """An outcome at once (unknown method, bad arguments, inline methods), or an awaitable
        that must be awaited on the event loop for threaded and async methods."""
        handler = self.handlers.get(req.method)
        if handler is None:
            return False, (ErrorCode.UNKNOWN_METHOD, "UNKNOWN_METHOD", f"no method {req.method!r}")
        args = req.args
        if not req.kwargs and handler.inline and handler.simple:
            # The common case, inlined: positional arguments within the signature's bounds.
            if handler.min_positional <= len(args) <= handler.max_positional:
                try:
                    return True, handler.func(*args)
                except Exception as exc:
                    return self._failure(req, exc)
        problem = handler.check_arguments(args, req.kwargs)
        if problem is not None:
            return False, (ErrorCode.BAD_ARGUMENTS, "BAD_ARGUMENTS", problem)
        if handler.is_async:
            return self._run_async(handler, req)
        if handler.inline:
            try:
                return True, handler.func(*req.args, **req.kwargs)
            except Exception as exc:
                return self._failure(req, exc)
        return self._run_threaded(handler, req)

    async def _run_async(self, handler: Handler, req: Request) -> Outcome:
        try:
            return True, await handler.func(*req.args, **req.kwargs)
        except Exception as exc:
            return self._failure(req, exc)

    async def _run_threaded(self, handler: Handler, req: Request) -> Outcome:
        loop = asyncio.get_running_loop()
        call = functools.partial(handler.func, *req.args, **req.kwargs)
        try:
            return True, await loop.run_in_executor(self.executor, call)
        except Exception as exc:
            return self._failure(req, exc)
