"""The tokenizer gRPC server: validates requests, calls pagewire.tokenizer, answers.

Thin by design: tokenization and incremental detokenization live in pagewire.tokenizer;
exceptions become status codes in services/grpc_errors.py only. Tokenization is CPU work and
runs in a thread, so a long prompt never blocks the event loop (and with it every other call).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from jinja2 import TemplateError
from transformers import AutoConfig

from pagewire.model.llama import ModelSpec
from pagewire.model.model_source import ModelSource, resolve_model
from pagewire.services.grpc_errors import FailedPrecondition, InvalidRequest, grpc_errors
from pagewire.services.grpc_options import KEEPALIVE_SERVER_OPTIONS
from pagewire.services.lifecycle import add_health, run_service
from pagewire.services.tokenizer.config import TokenizerConfig
from pagewire.tokenizer.detokenizer import IncrementalDetokenizer
from pagewire.tokenizer.loader import eos_token_ids, load_tokenizer
from pagewire.tokenizer.token_bytes import TokenBytes
from pagewire.tools.render import for_template, template_knows_tools
from pagewire.v1 import tokenizer_pb2, tokenizer_pb2_grpc

__all__ = ["TokenizerConfig", "TokenizerServicer", "main", "serve"]

logger = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant", "tool")


def _json_list(text: str, field: str) -> list[dict] | None:
    """A JSON list of objects sent as text ("" for none), checked before any template reads
    it. The gateway validated its shape; the template reads only the keys it knows."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(f"`{field}` is not JSON: {exc}") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise InvalidRequest(f"`{field}` must be a JSON list of objects")
    return value
INLINE_DECODE_TOKENS = 32  # a step's few new tokens decode inline; a thread hop costs more
STOP_GRACE_S = 5.0
T = TypeVar("T")


@dataclass(frozen=True)
class ServedTokenizer:
    """What the servicer serves, loaded once at start."""

    source: ModelSource
    tokenizer: Any  # a transformers PreTrainedTokenizerFast
    model_info: tokenizer_pb2.ModelInfo

    @classmethod
    def load(cls, model: str | None, max_model_len: int | None = None) -> ServedTokenizer:
        source = resolve_model(model)
        if source.tokenizer_dir is None:
            raise FileNotFoundError(f"model {source.model_dir} ships no tokenizer")
        tokenizer = load_tokenizer(source)
        spec = ModelSpec.from_hf_config(AutoConfig.from_pretrained(source.model_dir))
        model_info = tokenizer_pb2.ModelInfo(
            model=source.name,
            vocab_size=spec.vocab_size,
            max_model_len=min(spec.max_context, max_model_len or spec.max_context),
            eos_token_ids=sorted(eos_token_ids(source, tokenizer)),
            has_chat_template=tokenizer.chat_template is not None,
            max_token_bytes=max(map(len, TokenBytes(tokenizer)(range(len(tokenizer))))),
        )
        return cls(source, tokenizer, model_info)

    @property
    def num_token_ids(self) -> int:
        """Ids the tokenizer can decode: [0, num_token_ids)."""
        return len(self.tokenizer)


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, served: ServedTokenizer) -> None:
        self._served = served
        self._tokenizer = served.tokenizer
        self._token_bytes = TokenBytes(served.tokenizer)  # per-id cache: ids repeat a lot

    @grpc_errors
    async def Tokenize(self, request, context):
        kind = request.WhichOneof("input")
        if kind is None:
            raise InvalidRequest("TokenizeRequest needs one of `text` or `chat`")
        if kind == "text":
            if not request.text:
                raise InvalidRequest("`text` must not be empty")
            token_ids = await asyncio.to_thread(
                self._tokenizer.encode, request.text, add_special_tokens=request.add_special_tokens
            )
        else:
            messages, tools = self._chat_messages(request.chat)
            try:
                token_ids = await asyncio.to_thread(
                    self._tokenizer.apply_chat_template,
                    messages,
                    tools=tools,
                    tokenize=True,
                    return_dict=False,
                    add_generation_prompt=request.add_generation_prompt,
                )
            except TemplateError as exc:  # the template's own raise_exception(), or a bad use
                raise InvalidRequest(f"the chat template refused the messages: {exc}") from None
        return tokenizer_pb2.TokenizeResponse(token_ids=token_ids)

    @grpc_errors
    async def Detokenize(self, request_iterator, context) -> AsyncIterator[Any]:
        detokenizer: IncrementalDetokenizer | None = None
        finished = False
        async for request in request_iterator:
            if finished:
                raise InvalidRequest("no message may follow the one with `finish`")
            if detokenizer is None:  # the first message carries the prompt, maybe empty
                prompt_token_ids = self._checked_ids(request.prompt_token_ids, "prompt_token_ids")
                detokenizer = IncrementalDetokenizer(
                    self._tokenizer, prompt_token_ids, request.skip_special_tokens
                )
            elif request.prompt_token_ids:
                raise InvalidRequest("`prompt_token_ids` belongs on the first message only")
            token_ids = self._checked_ids(request.token_ids, "token_ids")
            inline = len(token_ids) <= INLINE_DECODE_TOKENS
            text = await _cpu(detokenizer.add_tokens, token_ids, inline=inline)
            if request.finish:
                text += detokenizer.flush()
                finished = True
            yield tokenizer_pb2.DetokenizeResponse(text=text)

    @grpc_errors
    async def TokenBytes(self, request, context):
        token_ids = self._checked_ids(request.token_ids, "token_ids")
        return tokenizer_pb2.TokenBytesResponse(token_bytes=self._token_bytes(token_ids))

    @grpc_errors
    async def GetModelInfo(self, request, context):
        return self._served.model_info

    def _chat_messages(self, chat) -> tuple[list[dict], list[dict] | None]:
        """(messages, tools) for the chat template (pagewire.tools.render)."""
        if self._tokenizer.chat_template is None:
            raise FailedPrecondition(f"model {self._served.source.name} has no chat template")
        if not chat.messages:
            raise InvalidRequest("`chat.messages` must not be empty")
        messages = []
        for index, message in enumerate(chat.messages):
            if message.role not in CHAT_ROLES:
                raise InvalidRequest(
                    f"chat.messages[{index}].role {message.role!r} is not one of "
                    f"{', '.join(CHAT_ROLES)}"
                )
            messages.append({"role": message.role, "content": message.content,
                             "name": message.name or None,
                             "tool_call_id": message.tool_call_id or None,
                             "tool_calls": _json_list(message.tool_calls_json,
                                                      f"chat.messages[{index}].tool_calls_json")})
        tools = _json_list(chat.tools_json, "chat.tools_json")
        return for_template(messages, tools, template_knows_tools(self._tokenizer.chat_template))

    def _checked_ids(self, token_ids: Sequence[int], field: str) -> list[int]:
        ids = list(token_ids)
        limit = self._served.num_token_ids
        bad = next((i for i in ids if i >= limit), None)
        if bad is not None:
            raise InvalidRequest(f"`{field}` holds token id {bad}, outside the vocab [0, {limit})")
        return ids


async def _cpu(fn: Callable[..., T], *args: Any, inline: bool) -> T:
    return fn(*args) if inline else await asyncio.to_thread(fn, *args)


async def serve(config: TokenizerConfig) -> grpc.aio.Server:
    """Loads the tokenizer, starts the server, and returns it running.

    The port it bound (useful with port 0) is `server.bound_port`.
    """
    served = await asyncio.to_thread(ServedTokenizer.load, config.model, config.max_model_len)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share
            *KEEPALIVE_SERVER_OPTIONS,
        ]
    )
    tokenizer_pb2_grpc.add_TokenizerServicer_to_server(TokenizerServicer(served), server)
    await add_health(server, tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name)
    server.bound_port = server.add_insecure_port(config.address)  # raises if it cannot bind
    await server.start()
    logger.info("tokenizer for %s serving on %s:%d", served.source.name, config.host,
                server.bound_port)
    return server


def parse_args(argv: Sequence[str] | None) -> TokenizerConfig:
    defaults = TokenizerConfig.from_env()
    parser = argparse.ArgumentParser(description="pagewire tokenizer service (gRPC)")
    parser.add_argument("--model", default=defaults.model,
                        help="model directory or .gguf file (env PAGEWIRE_MODEL; default: "
                             "the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--host", default=defaults.host,
                        help="interface to listen on (env PAGEWIRE_TOKENIZER_HOST)")
    parser.add_argument("--port", type=int, default=defaults.port,
                        help="port; 0 picks a free one (env PAGEWIRE_TOKENIZER_PORT)")
    parser.add_argument("--max-message-bytes", type=int, default=defaults.max_message_bytes,
                        help="largest gRPC message, in bytes (env "
                             "PAGEWIRE_TOKENIZER_MAX_MESSAGE_BYTES)")
    parser.add_argument("--max-model-len", type=int, default=defaults.max_model_len,
                        help="the workers' context limit, which the gateway enforces (env "
                             "PAGEWIRE_MAX_MODEL_LEN; default: the model's)")
    args = parser.parse_args(argv)
    return TokenizerConfig(model=args.model, host=args.host, port=args.port,
                           max_message_bytes=args.max_message_bytes,
                           max_model_len=args.max_model_len)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    return run_service(lambda: serve(config), lambda server: server.stop(STOP_GRACE_S))


if __name__ == "__main__":
    raise SystemExit(main())
