"""Protobuf <-> engine types for the worker service. Nothing else: no I/O, no state."""

from __future__ import annotations

from pagewire.outputs import RequestOutput
from pagewire.sampling.params import SamplingParams
from pagewire.sampling.structured import StructuredOutputsParams
from pagewire.services.grpc_errors import InvalidRequest
from pagewire.v1 import common_pb2

_FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}


def sampling_from_proto(options: common_pb2.SamplingOptions) -> SamplingParams:
    """proto3 has no "unset" for plain fields: 0 means the neutral value where 0 is invalid."""
    if options.max_tokens < 1:
        raise InvalidRequest("sampling.max_tokens must be >= 1")
    try:
        structured = None
        if options.HasField("structured"):
            structured = StructuredOutputsParams.from_spec(options.structured.kind,
                                                           options.structured.spec)
        return SamplingParams(
            temperature=options.temperature,
            top_p=options.top_p or 1.0,
            top_k=options.top_k,
            min_p=options.min_p,
            seed=options.seed if options.HasField("seed") else None,
            repetition_penalty=options.repetition_penalty or 1.0,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            max_tokens=options.max_tokens,
            min_tokens=options.min_tokens,
            stop_token_ids=list(options.stop_token_ids),
            ignore_eos=options.ignore_eos,
            logprobs=options.logprobs if options.HasField("logprobs") else None,
            structured_outputs=structured,
        )
    except ValueError as exc:
        raise InvalidRequest(f"sampling: {exc}") from exc


def token_logprobs(token_id: int, entry) -> common_pb2.TokenLogprobs:
    """One output token's {token_id: Logprob} (sampled token and top-n) as a message."""
    ranked = sorted(((lp.rank, tid, lp.logprob) for tid, lp in entry.items() if lp.rank))
    return common_pb2.TokenLogprobs(
        logprob=entry[token_id].logprob,
        top=[common_pb2.TopLogprob(token_id=t, logprob=v) for _, t, v in ranked])


def token_batch(output: RequestOutput, num_sent: int) -> common_pb2.TokenBatch:
    """The tokens of `output` past the first num_sent, as one message."""
    completion = output.outputs[0]
    batch = common_pb2.TokenBatch(token_ids=completion.token_ids[num_sent:])
    if completion.logprobs is not None:
        batch.logprobs.extend(token_logprobs(t, e) for t, e in zip(
            completion.token_ids[num_sent:], completion.logprobs[num_sent:]))
    if output.finished:
        batch.finish_reason = _FINISH[completion.finish_reason]
        if isinstance(completion.stop_reason, int):
            batch.stop_token_id = completion.stop_reason
    if num_sent == 0:
        batch.prompt_tokens = len(output.prompt_token_ids)
        batch.cached_tokens = output.num_cached_tokens
    return batch
