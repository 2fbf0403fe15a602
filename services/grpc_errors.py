"""The one place where pagewire's gRPC services turn exceptions into status codes.

Servicer methods raise the typed errors below (or let a bug escape as any other exception);
`grpc_errors` aborts the call with the matching status. Unknown exceptions become INTERNAL and
are logged with their traceback, never swallowed.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys

import grpc

logger = logging.getLogger(__name__)


class InvalidRequest(ValueError):
    """The request itself is wrong: INVALID_ARGUMENT."""


class FailedPrecondition(RuntimeError):
    """The request is fine but the served model cannot answer it: FAILED_PRECONDITION."""


class NotFound(LookupError):
    """The request names something this server does not hold: NOT_FOUND."""


class Aborted(RuntimeError):
    """The request was aborted (Abort RPC) before this call could finish: CANCELLED."""


class Unavailable(ConnectionError):
    """No worker can serve this now (none live, or the one serving it was lost): UNAVAILABLE."""


def _engine_errors() -> tuple[tuple[type[Exception], grpc.StatusCode], ...]:
    # Imported lazily: the tokenizer service never loads the engine (or torch).
    from pagewire.engine.async_engine import EngineDeadError
    from pagewire.engine.kv_transfer import KVFormatError, KVLayoutMismatch
    from pagewire.engine.llm_engine import InvalidRequestError, OutOfKVBlocksError
    from pagewire.kv_transport.nixl_agent import NixlTransferError
    from pagewire.kv_transport.shared_memory import SharedFileError

    return (
        (SharedFileError, grpc.StatusCode.INVALID_ARGUMENT),
        (NixlTransferError, grpc.StatusCode.ABORTED),
        (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
        (KVLayoutMismatch, grpc.StatusCode.INVALID_ARGUMENT),
        (KVFormatError, grpc.StatusCode.INVALID_ARGUMENT),
        (OutOfKVBlocksError, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (EngineDeadError, grpc.StatusCode.UNAVAILABLE),
    )


_STATUS_BY_ERROR: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Aborted, grpc.StatusCode.CANCELLED),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def _status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    table = _STATUS_BY_ERROR
    if "pagewire.engine.llm_engine" in sys.modules:
        table = table + _engine_errors()
    for error_type, code in table:
        if isinstance(exc, error_type):
            return code, str(exc) or type(exc).__name__
    logger.exception("unexpected error in an RPC")
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
