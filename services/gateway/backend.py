"""The gateway's gRPC clients: tokenizer and router stubs over channels opened once per app.

Translates between Python values and protobuf messages; holds no request state of its own.
"""

from __future__ import annotations

import asyncio
import json

import grpc

from pagewire.services.grpc_options import CHANNEL_OPTIONS
from pagewire.services.tokenizer.config import DEFAULT_MAX_MESSAGE_BYTES
from pagewire.v1 import common_pb2, router_pb2, router_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc

MODEL_INFO_TIMEOUT_S = 10.0
TOKENIZE_TIMEOUT_S = 30.0


class Backend:
    """Tokenizer and router stubs; `close()` closes both channels."""

    def __init__(self, tokenizer_address: str, router_address: str) -> None:
        # A prompt body of a few MiB tokenizes to more than gRPC's default 4 MiB of ids: take
        # what the tokenizer may send, so the context check answers it (400), not a 503.
        self._tokenizer_channel = grpc.aio.insecure_channel(tokenizer_address, options=[
            ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            *CHANNEL_OPTIONS])
        self._router_channel = grpc.aio.insecure_channel(
            router_address, options=CHANNEL_OPTIONS)
        self.tokenizer = tokenizer_pb2_grpc.TokenizerStub(self._tokenizer_channel)
        self.router = router_pb2_grpc.RouterStub(self._router_channel)
        self._token_bytes: dict[int, bytes] = {}

    async def model_info(self) -> tokenizer_pb2.ModelInfo:
        return await self.tokenizer.GetModelInfo(
            tokenizer_pb2.ModelInfoRequest(), timeout=MODEL_INFO_TIMEOUT_S, wait_for_ready=True)

    async def tokenize_text(self, text: str) -> list[int]:
        response = await self.tokenizer.Tokenize(
            tokenizer_pb2.TokenizeRequest(text=text, add_special_tokens=True),
            timeout=TOKENIZE_TIMEOUT_S)
        return list(response.token_ids)

    async def tokenize_chat(self, messages: list[tokenizer_pb2.ChatMessage],
                            tools: list[dict] | None = None) -> list[int]:
        chat = tokenizer_pb2.ChatMessages(messages=messages,
                                          tools_json=json.dumps(tools) if tools else "")
        response = await self.tokenizer.Tokenize(
            tokenizer_pb2.TokenizeRequest(chat=chat, add_generation_prompt=True),
            timeout=TOKENIZE_TIMEOUT_S)
        return list(response.token_ids)

    def generate(self, request_id: str, prompt_token_ids: list[int],
                 sampling: common_pb2.SamplingOptions, timeout_s: float):
        """The router's token stream; cancelling the call aborts the request downstream."""
        return self.router.Generate(router_pb2.RouteRequest(
            request_id=request_id, prompt_token_ids=prompt_token_ids, sampling=sampling,
            timeout_ms=int(timeout_s * 1000)), timeout=timeout_s)

    async def abort(self, request_id: str) -> None:
        """Ends a request early (a stop string matched)."""
        try:
            await self.router.Abort(common_pb2.AbortRequest(request_id=request_id), timeout=5.0)
        except grpc.aio.AioRpcError:  # best effort: cancelling the Generate call aborts too
            pass

    async def cluster(self) -> router_pb2.ClusterInfo:
        return await self.router.GetCluster(router_pb2.ClusterRequest(), timeout=5.0)

    async def token_bytes(self, token_ids: list[int]) -> list[bytes]:
        """Each id's bytes; asked of the tokenizer once per id, then cached (vocab-sized)."""
        missing = sorted(set(token_ids) - self._token_bytes.keys())
        if missing:
            response = await self.tokenizer.TokenBytes(
                tokenizer_pb2.TokenBytesRequest(token_ids=missing), timeout=TOKENIZE_TIMEOUT_S)
            self._token_bytes.update(zip(missing, response.token_bytes))
        return [self._token_bytes[token_id] for token_id in token_ids]

    def detokenizer(self, prompt_token_ids: list[int]) -> Detokenizer:
        return Detokenizer(self.tokenizer, prompt_token_ids)

    async def close(self) -> None:
        await self._tokenizer_channel.close()
        await self._router_channel.close()


class Detokenizer:
    """One Detokenize stream: each `step` sends new token ids and returns the new text."""

    def __init__(self, stub: tokenizer_pb2_grpc.TokenizerStub, prompt_token_ids: list[int]):
        self._call = stub.Detokenize(timeout=None)
        self._prompt_token_ids = prompt_token_ids
        self._started = False

    async def step(self, token_ids: list[int], finish: bool) -> str:
        request = tokenizer_pb2.DetokenizeRequest(token_ids=token_ids, finish=finish)
        if not self._started:
            request.prompt_token_ids.extend(self._prompt_token_ids)
            request.skip_special_tokens = True
            self._started = True
        try:
            await self._call.write(request)
        except asyncio.InvalidStateError:
            pass  # the call ended (the tokenizer went away): read() raises its status
        response = await self._call.read()
        if response is grpc.aio.EOF:  # an error like any other gRPC failure, for the caller
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE,
                                       details="the detokenizer stream ended early")
        return response.text

    def close(self) -> None:
        self._call.cancel()  # no-op when the stream already ended
