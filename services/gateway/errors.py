"""The gateway's one place where errors become OpenAI-shaped HTTP responses.

Every bad input must come back as a 4xx `{"error": {...}}`; gRPC failures from downstream map to
400/503/504. Only a bug in the gateway itself may become a 500.
"""

from __future__ import annotations

import logging

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error the client should see as-is."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_GRPC_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (503, "server_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.CANCELLED: (503, "server_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


def from_grpc(exc: grpc.aio.AioRpcError) -> APIError:
    status, type_ = _GRPC_STATUS.get(exc.code(), (500, "server_error"))
    return APIError(status, exc.details() or exc.code().name, type_, code=exc.code().name.lower())


def _response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code),
                        status_code=exc.status)


def _validation_param(error: dict) -> str | None:
    loc = [str(part) for part in error.get("loc", ()) if part not in ("body",)]
    # A string-or-list field names the form it was read as ("prompt.list.0"): kept, it helps.
    return ".".join(loc) or None


async def _on_api_error(_: Request, exc: APIError) -> JSONResponse:
    return _response(exc)


async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":  # its location is a character offset, not a field
        error = first.get("ctx", {}).get("error", "")
        return _response(APIError(400, f"The body is not valid JSON: {error} at character "
                                       f"{first['loc'][-1]}.", code="invalid_json"))
    param = _validation_param(first)
    message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
    return _response(APIError(400, message, param=param, code="invalid_value"))


async def _on_grpc(_: Request, exc: grpc.aio.AioRpcError) -> JSONResponse:
    logger.warning("downstream call failed: %s %s", exc.code(), exc.details())
    return _response(from_grpc(exc))


async def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return _response(APIError(exc.status_code, str(exc.detail), type_))


async def _on_bug(_: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises after answering, so the traceback still reaches the server's log.
    return _response(APIError(500, f"internal error: {type(exc).__name__}", "server_error"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(grpc.aio.AioRpcError, _on_grpc)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_bug)
