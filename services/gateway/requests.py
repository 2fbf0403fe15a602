"""From a validated OpenAI request to what the router needs: sampling options and choice specs.

Checks the operator's limits and the context limit; raises APIError (400) for what this server
will not serve.
"""

from __future__ import annotations

import uuid

from pagewire.sampling.structured import StructuredOutputsParams
from pagewire.v1 import common_pb2

from .config import GatewayConfig
from .constraints import to_proto
from .errors import bad_request
from .generation import ChoiceSpec
from .protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_limits(request: SamplingFields, config: GatewayConfig) -> None:
    """The operator's per-request limits, checked before any work is done."""
    if request.n > config.max_n:
        raise bad_request(f"n is {request.n}; this server returns at most {config.max_n} "
                          "choices per request", param="n")
    stops = request.stop_strings
    if len(stops) > config.max_stop_strings:
        raise bad_request(f"{len(stops)} stop strings; this server accepts at most "
                          f"{config.max_stop_strings}", param="stop")
    longest = max(map(len, stops), default=0)
    if longest > config.max_stop_string_chars:
        raise bad_request(f"a stop string of {longest} characters; this server accepts at most "
                          f"{config.max_stop_string_chars}", param="stop")


def check_text_fits(info, texts: list[str], param: str) -> None:
    """Refuses text that cannot fit the context whatever it tokenizes to, before the tokenizer
    spends seconds on it: n bytes make at least n / max_token_bytes tokens (8 MiB of text
    took 6-16 s of tokenizer CPU to be refused after tokenizing)."""
    if not info.max_token_bytes:  # a tokenizer that does not report it
        return
    num_bytes = sum(len(text.encode()) for text in texts)
    at_least = -(-num_bytes // info.max_token_bytes)
    if at_least > info.max_model_len:
        raise bad_request(f"This model's maximum context length is {info.max_model_len} "
                          f"tokens; the {param} has at least {at_least} tokens.", param=param)


def max_tokens_of(request: SamplingFields, prompt_len: int, max_model_len: int) -> int:
    room = max_model_len - prompt_len
    if room <= 0:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens; the "
                          f"prompt has {prompt_len} tokens.", param="messages"
                          if isinstance(request, ChatCompletionRequest) else "prompt")
    asked = request.max_tokens
    if isinstance(request, ChatCompletionRequest):
        asked = request.max_completion_tokens or asked
    elif asked is None:
        asked = min(DEFAULT_COMPLETION_MAX_TOKENS, room)
    if asked is None:
        return room
    if asked > room:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens; "
                          f"{prompt_len} prompt tokens + {asked} max_tokens exceed it.",
                          param="max_tokens")
    return asked


def logprobs_of(request: SamplingFields) -> int | None:
    """Top logprobs per token the request asks for (0 = the sampled token's only), or None."""
    if isinstance(request, CompletionRequest):
        return request.logprobs
    if request.top_logprobs is not None and not request.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    return (request.top_logprobs or 0) if request.logprobs else None


def choice_specs(request: SamplingFields, request_id: str, max_tokens: int,
                 constraint: StructuredOutputsParams | None = None) -> list[ChoiceSpec]:
    logprobs = logprobs_of(request)
    specs = []
    for index in range(request.n):
        sampling = common_pb2.SamplingOptions(
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=request.top_p or 1.0,
            top_k=max(request.top_k or 0, 0),
            min_p=request.min_p or 0.0,
            repetition_penalty=request.repetition_penalty or 1.0,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            max_tokens=max_tokens,
            ignore_eos=request.ignore_eos,
        )
        if request.seed is not None:
            sampling.seed = request.seed + index
        if logprobs is not None:
            sampling.logprobs = logprobs
        if constraint is not None:
            sampling.structured.CopyFrom(to_proto(constraint))
        specs.append(ChoiceSpec(f"{request_id}-{index}", sampling, tuple(request.stop_strings)))
    return specs
