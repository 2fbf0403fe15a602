"""Every RPC of every gRPC service fed malformed input on loopback: empty and oversized fields,
unknown request ids, token ids outside the vocabulary, wrong KV sizes, a KV layout from another
model, truncated and misordered KV streams. Each call ends with a status and a message, and the
service keeps serving: a normal call works after every case, and no KV block stays taken.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagewire.v1 import (
    common_pb2,
    router_pb2,
    router_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
OUT_OF_VOCAB = 2**32 - 1
TIMEOUT_S = 30
GREEDY = common_pb2.SamplingOptions(temperature=0, max_tokens=2, ignore_eos=True)
PROMPT = list(range(100, 139))  # 39 tokens: 3 blocks of 16


@dataclass
class Stubs:
    tokenizer: tokenizer_pb2_grpc.TokenizerStub
    router: router_pb2_grpc.RouterStub
    prefill: worker_pb2_grpc.WorkerStub
    decode: worker_pb2_grpc.WorkerStub
    decode_address: str
    kv_layout: object  # the decode worker's KVLayout


@pytest.fixture(scope="module")
def stubs(stack):
    prefill, decode = stack.workers
    addresses = [f"127.0.0.1:{server.bound_port}" for server in
                 (stack.tokenizer, stack.router, prefill, decode)]
    channels = [grpc.insecure_channel(address) for address in addresses]
    yield Stubs(tokenizer_pb2_grpc.TokenizerStub(channels[0]),
                router_pb2_grpc.RouterStub(channels[1]),
                worker_pb2_grpc.WorkerStub(channels[2]), worker_pb2_grpc.WorkerStub(channels[3]),
                addresses[3], decode.async_engine.engine.kv_layout)
    for channel in channels:
        channel.close()


def rid() -> str:
    return f"bad-{uuid.uuid4().hex[:8]}"


def sampling(**fields) -> common_pb2.SamplingOptions:
    return common_pb2.SamplingOptions(**{"max_tokens": 2, **fields})


def tokens(stream) -> list[int]:
    return [t for batch in stream for t in batch.token_ids]


def assert_status(call: Callable[[], object], code, fragment: str) -> None:
    """code: a status, or a tuple of the statuses that are fine."""
    with pytest.raises(grpc.RpcError) as error:
        call()
    assert error.value.code() in (code if isinstance(code, tuple) else (code,)), \
        error.value.details()
    assert fragment in error.value.details()


# ---- tokenizer ----------------------------------------------------------------------------------

def detokenize(stub, *messages):
    return list(stub.Detokenize(iter(messages), timeout=TIMEOUT_S))


T = tokenizer_pb2
TOKENIZER_CASES = {
    "Tokenize without input": (lambda t: t.Tokenize(T.TokenizeRequest()), "one of"),
    "Tokenize empty text": (lambda t: t.Tokenize(T.TokenizeRequest(text="")), "empty"),
    "Tokenize no messages": (lambda t: t.Tokenize(T.TokenizeRequest(chat=T.ChatMessages())),
                             "empty"),
    "Tokenize unknown role": (lambda t: t.Tokenize(T.TokenizeRequest(chat=T.ChatMessages(
        messages=[T.ChatMessage(role="wizard", content="Hi")]))), "wizard"),
    "Detokenize prompt id out of vocab": (lambda t: detokenize(t, T.DetokenizeRequest(
        prompt_token_ids=[OUT_OF_VOCAB])), str(OUT_OF_VOCAB)),
    "Detokenize token id out of vocab": (lambda t: detokenize(t, T.DetokenizeRequest(
        token_ids=[1, OUT_OF_VOCAB])), str(OUT_OF_VOCAB)),
    "Detokenize prompt on a later message": (lambda t: detokenize(
        t, T.DetokenizeRequest(token_ids=[1]), T.DetokenizeRequest(prompt_token_ids=[1])),
        "first message only"),
    "Detokenize after finish": (lambda t: detokenize(
        t, T.DetokenizeRequest(finish=True), T.DetokenizeRequest(token_ids=[1])), "finish"),
    "TokenBytes out of vocab": (lambda t: t.TokenBytes(T.TokenBytesRequest(
        token_ids=[5, OUT_OF_VOCAB])), str(OUT_OF_VOCAB)),
}


@pytest.mark.parametrize("case", TOKENIZER_CASES)
def test_tokenizer_refuses_malformed_input(stubs, case):
    call, fragment = TOKENIZER_CASES[case]
    assert_status(lambda: call(stubs.tokenizer), INVALID, fragment)
    assert stubs.tokenizer.Tokenize(T.TokenizeRequest(text="Hi"), timeout=TIMEOUT_S).token_ids


def test_tokenizer_answers_empty_requests_with_empty_answers(stubs):
    assert detokenize(stubs.tokenizer) == []
    assert list(stubs.tokenizer.TokenBytes(T.TokenBytesRequest(), timeout=TIMEOUT_S)
                .token_bytes) == []
    assert stubs.tokenizer.GetModelInfo(T.ModelInfoRequest(), timeout=TIMEOUT_S).vocab_size


# ---- router -------------------------------------------------------------------------------------

def route(router, **fields):
    request = router_pb2.RouteRequest(**{"request_id": rid(), "sampling": GREEDY, **fields})
    return tokens(router.Generate(request, timeout=TIMEOUT_S))


ROUTER_CASES = {
    "no request id": (lambda r: route(r, request_id="", prompt_token_ids=[1]), INVALID,
                      "required"),
    "empty prompt": (lambda r: route(r), INVALID, "required"),
    "token id out of vocab": (lambda r: route(r, prompt_token_ids=[OUT_OF_VOCAB]), INVALID,
                              "vocabulary"),
    "no sampling options": (lambda r: route(r, prompt_token_ids=[1], sampling=None), INVALID,
                            "max_tokens"),
    "top_p out of range": (lambda r: route(r, prompt_token_ids=[1], sampling=sampling(top_p=5)),
                           INVALID, "top_p"),
    "prompt past the context": (lambda r: route(r, prompt_token_ids=[1] * 5000), INVALID,
                                "context"),
    "a deadline of 1 ms": (lambda r: route(r, prompt_token_ids=PROMPT, timeout_ms=1,
                                           sampling=sampling(max_tokens=200, ignore_eos=True)),
                           grpc.StatusCode.DEADLINE_EXCEEDED, ""),
}


@pytest.mark.parametrize("case", ROUTER_CASES)
def test_router_refuses_malformed_input(stubs, case):
    call, code, fragment = ROUTER_CASES[case]
    assert_status(lambda: call(stubs.router), code, fragment)
    assert len(route(stubs.router, prompt_token_ids=[1, 2, 3])) == 2


def test_router_abort_of_an_unknown_request_finds_nothing(stubs):
    for request_id in ("", "never-sent"):
        reply = stubs.router.Abort(common_pb2.AbortRequest(request_id=request_id),
                                   timeout=TIMEOUT_S)
        assert not reply.found
    assert stubs.router.GetCluster(router_pb2.ClusterRequest(), timeout=TIMEOUT_S).workers


# ---- workers: Generate, Prefill, Decode, Abort --------------------------------------------------

def generate(worker, **fields):
    request = worker_pb2.GenerateRequest(**{"request_id": rid(), "sampling": GREEDY, **fields})
    return tokens(worker.Generate(request, timeout=TIMEOUT_S))


def prefill(worker, address: str = "", **fields):
    return worker.Prefill(worker_pb2.PrefillRequest(**{
        "request_id": rid(), "prompt_token_ids": PROMPT, "sampling": GREEDY,
        "decode_worker_address": address, "timeout_ms": 5000, **fields}), timeout=TIMEOUT_S)


def decode(worker, **fields):
    return list(worker.Decode(worker_pb2.DecodeRequest(**{
        "request_id": rid(), "prompt_token_ids": PROMPT, "sampling": GREEDY,
        "transfer_timeout_ms": 300, **fields}), timeout=TIMEOUT_S))


FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
# A decode worker the prefill worker cannot reach: the request ends, whichever way it is told.
UNREACHABLE = (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
WORKER_CASES = {
    "Generate without request id": (lambda s: generate(s.decode, request_id="",
                                                       prompt_token_ids=[1]), INVALID, "empty"),
    "Generate empty prompt": (lambda s: generate(s.decode), INVALID, "empty"),
    "Generate token id out of vocab": (lambda s: generate(
        s.decode, prompt_token_ids=[OUT_OF_VOCAB]), INVALID, "vocabulary"),
    "Generate prompt past the context": (lambda s: generate(
        s.decode, prompt_token_ids=[1] * 3_000_000), INVALID, "context"),
    "Generate without sampling": (lambda s: generate(s.decode, prompt_token_ids=[1],
                                                     sampling=None), INVALID, "max_tokens"),
    "Generate NaN temperature": (lambda s: generate(
        s.decode, prompt_token_ids=[1], sampling=sampling(temperature=float("nan"))), INVALID,
        "finite"),
    "Generate 1000 logprobs": (lambda s: generate(
        s.decode, prompt_token_ids=[1], sampling=sampling(logprobs=1000)), INVALID, "logprobs"),
    "Generate min_tokens over max_tokens": (lambda s: generate(
        s.decode, prompt_token_ids=[1], sampling=sampling(min_tokens=10)), INVALID,
        "min_tokens"),
    "Prefill on a decode worker": (lambda s: prefill(s.decode), FAILED_PRECONDITION, "role"),
    "Prefill without request id": (lambda s: prefill(s.prefill, s.decode_address,
                                                     request_id=""), INVALID, "empty"),
    "Prefill empty prompt": (lambda s: prefill(s.prefill, s.decode_address,
                                               prompt_token_ids=[]), INVALID, "empty"),
    "Prefill without decode address": (lambda s: prefill(s.prefill), INVALID, "address"),
    "Prefill with no reservation there": (lambda s: prefill(
        s.prefill, s.decode_address, decode_block_ids=[0, 1, 2]), grpc.StatusCode.NOT_FOUND,
        "no reservation"),
    "Prefill naming fewer blocks than its prompt fills": (lambda s: prefill(
        s.prefill, s.decode_address, decode_block_ids=[0]), INVALID, "do not hold 39 tokens"),
    "Prefill to a closed port": (lambda s: prefill(s.prefill, "127.0.0.1:1"), UNREACHABLE,
                                 "127.0.0.1:1"),
    "Prefill to a garbage address": (lambda s: prefill(s.prefill, "::not an address::"),
                                     UNREACHABLE, "not an address"),
    "Prefill skipping more blocks than it has": (lambda s: prefill(
        s.prefill, s.decode_address, skip_blocks=100), INVALID, "skip_blocks"),
    "Decode on a prefill worker": (lambda s: decode(s.prefill), FAILED_PRECONDITION, "role"),
    "Decode empty prompt": (lambda s: decode(s.decode, prompt_token_ids=[]), INVALID, "empty"),
    "Decode token id out of vocab": (lambda s: decode(s.decode, prompt_token_ids=[OUT_OF_VOCAB]),
                                     INVALID, "vocabulary"),
    "Decode whose KV never comes": (lambda s: decode(s.decode),
                                    grpc.StatusCode.DEADLINE_EXCEEDED, "no KV arrived"),
    "Abort without request id": (lambda s: s.decode.Abort(common_pb2.AbortRequest(),
                                                          timeout=TIMEOUT_S), INVALID, "empty"),
}


@pytest.mark.parametrize("case", WORKER_CASES)
def test_worker_refuses_malformed_input(stubs, case):
    call, code, fragment = WORKER_CASES[case]
    assert_status(lambda: call(stubs), code, fragment)
    assert_workers_serve(stubs)


def test_worker_refuses_a_request_id_already_running(stubs):
    running_id = rid()
    running = stubs.decode.Generate(worker_pb2.GenerateRequest(
        request_id=running_id, prompt_token_ids=[1, 2, 3],
        sampling=sampling(max_tokens=500, ignore_eos=True)), timeout=TIMEOUT_S)
    next(running)
    assert_status(lambda: generate(stubs.decode, request_id=running_id, prompt_token_ids=[1]),
                  INVALID, "already in use")
    assert stubs.decode.Abort(common_pb2.AbortRequest(request_id=running_id)).found
    assert not stubs.decode.Abort(common_pb2.AbortRequest(request_id="never-sent")).found
    assert_workers_serve(stubs)


# ---- workers: PushKV ----------------------------------------------------------------------------

def header(stubs: Stubs, request_id: str, **fields) -> worker_pb2.KVHeader:
    layout = stubs.kv_layout
    return worker_pb2.KVHeader(**{
        "request_id": request_id, "model": layout.model, "dtype": layout.dtype,
        "block_size": layout.block_size, "num_layers": layout.num_layers,
        "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
        "num_tokens": len(PROMPT), "num_blocks": 3, "first_token_id": 5, **fields})


def blocks(stubs: Stubs, count: float) -> worker_pb2.KVChunk:
    size = int(count * stubs.kv_layout.block_bytes)
    return worker_pb2.KVChunk(blocks=worker_pb2.KVBlocks(data=bytes(size)))


def truncated(stubs: Stubs, request_id: str):
    yield worker_pb2.KVChunk(header=header(stubs, request_id))
    yield blocks(stubs, 1)
    raise ConnectionResetError("the sender dies mid-transfer")


NOT_FOUND, DEADLINE = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED
ANY = None  # the push's own status does not matter: its Decode's does
# What is pushed into a live reservation -> (PushKV status, the waiting Decode's status, message)
PUSH_CASES = {
    "a layout from another model": (lambda s, r: [worker_pb2.KVChunk(header=header(
        s, r, model="Llama-3-8B", num_layers=32, num_kv_heads=8, head_dim=128))],
        INVALID, INVALID, "KV layout mismatch"),
    "an unknown dtype": (lambda s, r: [worker_pb2.KVChunk(header=header(s, r, dtype="int8"))],
                         INVALID, INVALID, "int8"),
    "more bytes than declared": (lambda s, r: [worker_pb2.KVChunk(header=header(s, r)),
                                               blocks(s, 4)], INVALID, INVALID, "over"),
    "fewer bytes than declared": (lambda s, r: [worker_pb2.KVChunk(header=header(s, r)),
                                                blocks(s, 2.5)], INVALID, DEADLINE, ""),
    "4 billion blocks declared": (lambda s, r: [worker_pb2.KVChunk(header=header(
        s, r, num_blocks=2**32 - 1))], INVALID, DEADLINE, ""),
    "a second header": (lambda s, r: [worker_pb2.KVChunk(header=header(s, r))] * 2,
                        INVALID, INVALID, "second KV header"),
    "KV for fewer tokens than the prompt": (lambda s, r: [worker_pb2.KVChunk(header=header(
        s, r, num_tokens=10)), blocks(s, 3)], ANY, INVALID, "do not hold 10 tokens"),
    "no blocks for no tokens": (lambda s, r: [worker_pb2.KVChunk(header=header(
        s, r, num_tokens=0, num_blocks=0))], ANY, INVALID, "covers 0 tokens"),
    "blocks skipped that were not reserved": (lambda s, r: [worker_pb2.KVChunk(header=header(
        s, r, skip_blocks=1, num_blocks=2)), blocks(s, 2)], ANY, INVALID, "skips 1 blocks"),
    "a first token out of the vocabulary": (lambda s, r: [worker_pb2.KVChunk(header=header(
        s, r, first_token_id=OUT_OF_VOCAB)), blocks(s, 3)], ANY, INVALID, "vocabulary"),
    "a stream cut after one block": (truncated, ANY, DEADLINE, "no KV arrived"),
}


@pytest.mark.parametrize("case", PUSH_CASES)
def test_decode_worker_refuses_malformed_kv(stubs, case):
    chunks, push_code, decode_code, fragment = PUSH_CASES[case]
    request_id = rid()
    waiting = stubs.decode.Decode(worker_pb2.DecodeRequest(
        request_id=request_id, prompt_token_ids=PROMPT, sampling=GREEDY,
        transfer_timeout_ms=500), timeout=TIMEOUT_S)
    assert next(waiting).HasField("reserved")
    try:
        list(stubs.decode.PushKV(iter(chunks(stubs, request_id)), timeout=TIMEOUT_S))
        assert push_code is ANY, f"PushKV accepted {case}"
    except grpc.RpcError as error:
        assert push_code in (ANY, error.code()), error.details()
        assert error.details()
    assert_status(lambda: list(waiting), decode_code, fragment)
    assert_workers_serve(stubs)


PUSH_WITHOUT_RESERVATION = {
    "an empty stream": ([], INVALID, "empty KV transfer"),
    "blocks before the header": ([worker_pb2.KVChunk(blocks=worker_pb2.KVBlocks(data=b"x"))],
                                 INVALID, "before the KV header"),
    "an empty chunk": ([worker_pb2.KVChunk()], INVALID, "before the KV header"),
    "an unknown request id": ([worker_pb2.KVChunk(header=worker_pb2.KVHeader(
        request_id="nobody"))], NOT_FOUND, "nobody"),
    "no request id": ([worker_pb2.KVChunk(header=worker_pb2.KVHeader())], NOT_FOUND,
                      "no reservation"),
}


@pytest.mark.parametrize("case", PUSH_WITHOUT_RESERVATION)
def test_push_without_a_reservation_is_refused(stubs, case):
    chunks, code, fragment = PUSH_WITHOUT_RESERVATION[case]
    assert_status(lambda: list(stubs.decode.PushKV(iter(chunks), timeout=TIMEOUT_S)), code,
                  fragment)
    assert_status(lambda: list(stubs.prefill.PushKV(iter(chunks), timeout=TIMEOUT_S)),
                  FAILED_PRECONDITION, "role")
    assert_workers_serve(stubs)


def assert_workers_serve(stubs: Stubs) -> None:
    """Both workers generate, and once idle hold no block for anyone."""
    for worker in (stubs.prefill, stubs.decode):
        assert len(generate(worker, prompt_token_ids=[1, 2, 3])) == 2
        stats = worker.GetStats(worker_pb2.StatsRequest(), timeout=TIMEOUT_S)
        assert stats.kv_blocks_free == stats.kv_blocks_total, stats
        assert stats.running == 0 and stats.waiting == 0


def test_messages_over_a_service_limit_are_refused_and_it_keeps_serving(stubs):
    huge_text = "x" * (65 << 20)  # the tokenizer takes 64 MiB
    assert_status(lambda: stubs.tokenizer.Tokenize(T.TokenizeRequest(text=huge_text),
                                                   timeout=TIMEOUT_S),
                  grpc.StatusCode.RESOURCE_EXHAUSTED, "")
    many_ids = [1] * (5 << 20)  # 5 MiB of ids; the router takes gRPC's default 4 MiB
    assert_status(lambda: route(stubs.router, prompt_token_ids=many_ids),
                  grpc.StatusCode.RESOURCE_EXHAUSTED, "")
    assert stubs.tokenizer.Tokenize(T.TokenizeRequest(text="Hi"), timeout=TIMEOUT_S).token_ids
    assert len(route(stubs.router, prompt_token_ids=[1, 2, 3])) == 2


def test_health_of_an_unknown_service_is_not_found(stack):
    for server in (stack.tokenizer, stack.router, *stack.workers):
        with grpc.insecure_channel(f"127.0.0.1:{server.bound_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=TIMEOUT_S)
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S).status == \
                health_pb2.HealthCheckResponse.SERVING
