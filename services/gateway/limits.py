"""The gateway's request size limit: a body over `max_bytes` is refused with 413 in OpenAI's
error shape, before it is read when Content-Length says so, or as soon as a chunked upload
passes the limit, so no handler ever buffers an oversized body."""

from __future__ import annotations

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from .errors import error_body


class BodySizeLimit:
    """ASGI middleware; add with `app.add_middleware(BodySizeLimit, max_bytes=N)`."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large()(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # FastAPI passes HTTPException through as is
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted_receive, send)

    def _message(self) -> str:
        return f"Request body is larger than {self.max_bytes} bytes."

    def _too_large(self) -> JSONResponse:
        return JSONResponse(error_body(self._message(), "invalid_request_error",
                                       code="request_too_large"), status_code=413)
