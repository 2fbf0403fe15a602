"""The one place where the tokenizer service turns exceptions into gRPC status codes.

Servicer methods raise the typed errors below (or let a bug escape as any other exception);
`grpc_errors` aborts the call with the matching status. Unknown exceptions become INTERNAL and
are logged with their traceback, never swallowed.
"""

from __future__ import annotations

import functools
import inspect
import logging

import grpc

logger = logging.getLogger(__name__)


class InvalidRequest(ValueError):
    """The request itself is wrong: INVALID_ARGUMENT."""


class FailedPrecondition(RuntimeError):
    """The request is fine but the served model cannot answer it: FAILED_PRECONDITION."""


_STATUS_BY_ERROR: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
)


def _status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    for error_type, code in _STATUS_BY_ERROR:
        if isinstance(exc, error_type):
            return code, str(exc)
    logger.exception("unexpected error in a tokenizer RPC")
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def grpc_errors(method):
    """Wraps a grpc.aio servicer method (coroutine or async generator) with the mapping."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def streaming(self, request_iterator, context):
            try:
                async for response in method(self, request_iterator, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await context.abort(*_status_of(exc))

        return streaming

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await context.abort(*_status_of(exc))

    return unary
