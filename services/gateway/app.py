"""The gateway's FastAPI app: OpenAI-compatible routes over the tokenizer and router services.

Handlers only validate, tokenize, fan out one router call per choice and shape the answer; they
never compute on tokens themselves.
"""

from __future__ import annotations

import hmac
import json
import logging
from contextlib import asynccontextmanager

import grpc
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from pagewire.tools.calls import ToolChoice
from pagewire.v1 import tokenizer_pb2

from .answers import Answer, LogprobShaper, collect, stream
from .backend import Backend
from .config import GatewayConfig
from .constraints import constraint_of, tool_choice_of
from .errors import APIError, install_error_handlers
from .generation import merge_choices, run_choice
from .limits import BodySizeLimit
from .metrics import GatewayMetrics
from .protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ErrorResponse,
    SamplingFields,
)
from .requests import (
    check_limits,
    check_text_fits,
    choice_specs,
    logprobs_of,
    max_tokens_of,
    new_request_id,
)
from .tool_output import ToolOutput

logger = logging.getLogger(__name__)

# What the OpenAPI schema says every route may answer besides its success (no FastAPI 422:
# validation errors are 400s in OpenAI's shape).
ERROR_RESPONSES = {"4XX": {"model": ErrorResponse, "description": "The request was refused"},
                   "5XX": {"model": ErrorResponse, "description": "The server or a worker failed"}}
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "A JSON chunk; `[DONE]` ends the stream"}}}
ANSWER_RESPONSES = {200: {"description": "One JSON answer, or an SSE stream when `stream` is set",
                          "content": {"text/event-stream": {"schema": SSE_EVENT}}}}
METRICS_RESPONSES = {200: {"description": "Prometheus text format",
                           "content": {"text/plain": {"schema": {"type": "string"}}}}}


def create_app(config: GatewayConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        backend = Backend(config.tokenizer_address, config.router_address)
        try:
            app.state.backend = backend
            app.state.metrics = GatewayMetrics()
            app.state.model_info = await backend.model_info()
            yield
        finally:
            await backend.close()

    app = FastAPI(title="pagewire", lifespan=lifespan, responses=ERROR_RESPONSES)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    auth = Depends(_api_key_checker(config.api_key))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[auth])
    async def models(request: Request) -> dict:
        info = request.app.state.model_info
        return {"object": "list", "data": [{"id": info.model, "object": "model", "created": 0,
                                            "owned_by": "pagewire",
                                            "max_model_len": info.max_model_len}]}

    @app.get("/metrics", dependencies=[auth], responses=METRICS_RESPONSES)
    async def metrics(request: Request) -> Response:
        """Prometheus text: this gateway's request series and every live worker's load."""
        try:
            cluster = await request.app.state.backend.cluster()
        except grpc.aio.AioRpcError as exc:  # request series still count; workers unknown
            logger.warning("/metrics without worker series: router %s", exc.code().name)
            cluster = None
        return Response(request.app.state.metrics.render(cluster),
                        media_type=CONTENT_TYPE_LATEST)

    @app.get("/cluster", dependencies=[auth])
    async def cluster(request: Request) -> dict:
        """Every live worker and its load, as the router sees it."""
        info = await request.app.state.backend.cluster()
        return {"prefix_index_available": info.prefix_index_available, "workers": [
            {"id": w.id, "role": w.role, "address": w.address, "running": w.running,
             "waiting": w.waiting, "kv_blocks_free": w.kv_blocks_free,
             "kv_blocks_total": w.kv_blocks_total, "served": w.served,
             "prefill_tokens_per_s": w.prefill_tokens_per_s, "device": w.device,
             "kv_transports": list(w.kv_transports),
             "spec_decode": {"drafts": w.spec_num_drafts,
                             "draft_tokens": w.spec_num_draft_tokens,
                             "accepted_tokens": w.spec_num_accepted_tokens,
                             "accepted_per_position": list(w.spec_accepted_per_position)}}
            for w in info.workers], "kv_links": [
            {"prefill_id": link.prefill_id, "decode_id": link.decode_id,
             "transport": link.transport, "bytes_per_s": link.bytes_per_s,
             "transfers": link.transfers} for link in info.links],
            "prefill_decisions": dict(info.prefill_decisions)}

    @app.post("/v1/completions", dependencies=[auth], responses=ANSWER_RESPONSES)
    async def completions(body: CompletionRequest, request: Request):
        backend = request.app.state.backend
        _check_model(request, body.model)
        check_limits(body, config)
        if isinstance(body.prompt, str):
            check_text_fits(request.app.state.model_info, [body.prompt], "prompt")
            prompt_ids = await backend.tokenize_text(body.prompt)
        else:
            prompt_ids = _checked_token_ids(request, body.prompt)
        return await _serve(request, body, prompt_ids, config, ToolChoice("none"), chat=False)

    @app.post("/v1/chat/completions", dependencies=[auth], responses=ANSWER_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        backend = request.app.state.backend
        _check_model(request, body.model)
        check_limits(body, config)
        if not request.app.state.model_info.has_chat_template:
            raise APIError(400, "this model has no chat template", param="messages")
        check_text_fits(request.app.state.model_info, [m.text for m in body.messages],
                        "messages")
        tool_choice = tool_choice_of(body)
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        prompt_ids = await backend.tokenize_chat([_chat_message(m) for m in body.messages],
                                                 tools)
        return await _serve(request, body, prompt_ids, config, tool_choice, chat=True)

    return app


def _api_key_checker(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(),
                                                                 api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return check


def _template_role(role: str) -> str:
    # OpenAI's newer name for the system role; chat templates know only "system".
    return "system" if role == "developer" else role


def _chat_message(message: ChatMessage) -> tokenizer_pb2.ChatMessage:
    calls = [call.model_dump() for call in message.tool_calls or []]
    return tokenizer_pb2.ChatMessage(
        role=_template_role(message.role), content=message.text, name=message.name or "",
        tool_call_id=message.tool_call_id or "", tool_calls_json=json.dumps(calls) if calls
        else "")


def _check_model(request: Request, model: str) -> None:
    served = request.app.state.model_info.model
    if model != served:
        raise APIError(404, f"The model `{model}` does not exist (this server serves "
                       f"`{served}`).", param="model", code="model_not_found")


def _checked_token_ids(request: Request, token_ids: list[int]) -> list[int]:
    vocab_size = request.app.state.model_info.vocab_size
    if any(token_id >= vocab_size for token_id in token_ids):
        raise APIError(400, f"prompt token ids must be below the vocabulary size {vocab_size}",
                       param="prompt")
    return token_ids


async def _serve(request: Request, body: SamplingFields, prompt_ids: list[int],
                 config: GatewayConfig, tool_choice: ToolChoice, chat: bool):
    info = request.app.state.model_info
    max_tokens = max_tokens_of(body, len(prompt_ids), info.max_model_len)
    request_id = new_request_id("chatcmpl" if chat else "cmpl")
    specs = choice_specs(body, request_id, max_tokens, constraint_of(body, tool_choice))
    shape = LogprobShaper(chat, body.n) if logprobs_of(body) is not None else None
    tools = None if tool_choice.mode == "none" else ToolOutput(tool_choice,
                                                                config.tool_call_parser)
    answer = Answer(request_id, info.model, chat, body.n, body.include_usage, shape, tools)
    backend, metrics = request.app.state.backend, request.app.state.metrics
    events = merge_choices([
        run_choice(backend, index, spec, prompt_ids, config.request_timeout_s, answer.usage,
                   metrics.choice())
        for index, spec in enumerate(specs)])
    return await (stream if body.stream else collect)(request, events, answer)
