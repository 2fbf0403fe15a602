"""Router + prefill worker + decode worker on loopback, found through the real Redis."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest

from pagewire import SamplingParams
from pagewire.config import EngineConfig
from pagewire.services.router.server import RouterConfig
from pagewire.services.router.server import serve as serve_router
from pagewire.services.worker.config import WorkerConfig
from pagewire.services.worker.server import serve as serve_worker
from pagewire.services.worker.server import stop as stop_worker
from pagewire.v1 import common_pb2, router_pb2, router_pb2_grpc

ENGINE = EngineConfig(kv_cache_memory_bytes=64 << 20, max_model_len=1024, show_progress=False)
REDIS = "redis://127.0.0.1:6379/0"
SYSTEM = ("You are the support assistant of a bicycle shop. Answer in two sentences, name the "
          "part involved, and always end by offering a free safety check at the shop. ") * 2
GREEDY = common_pb2.SamplingOptions(temperature=0, max_tokens=12, ignore_eos=True)


def run(scenario, namespace, roles=("prefill", "decode"), engine=ENGINE):
    async def main():
        workers = [await serve_worker(WorkerConfig(
            role=role, port=0, engine=engine, redis_url=REDIS, redis_namespace=namespace))
            for role in roles]
        router = await serve_router(RouterConfig(port=0, redis_url=REDIS,
                                                 redis_namespace=namespace))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{router.bound_port}")
        try:
            return await scenario(router_pb2_grpc.RouterStub(channel))
        finally:
            await channel.close()
            await router.stop(0)
            for worker in workers:
                await stop_worker(worker, 0)
    return asyncio.run(main())


async def generate(router, rid, prompt_ids):
    return [b async for b in router.Generate(router_pb2.RouteRequest(
        request_id=rid, prompt_token_ids=prompt_ids, sampling=GREEDY))]


def test_routed_request_equals_offline_and_reuses_the_prefix(llm, namespace):
    tok = llm.get_tokenizer()
    first_ids = tok.encode(SYSTEM + "My chain slips.")
    second_ids = tok.encode(SYSTEM + "My brakes squeak.")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm.reset_prefix_cache()
    expected = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": first_ids}, {"prompt_token_ids": second_ids}], params)]

    async def scenario(router):
        first = await generate(router, "one", first_ids)
        second = await generate(router, "two", second_ids)
        cluster = await router.GetCluster(router_pb2.ClusterRequest())
        return first, second, cluster

    first, second, cluster = run(scenario, namespace)
    assert [t for b in first for t in b.token_ids] == expected[0]
    assert [t for b in second for t in b.token_ids] == expected[1]
    assert first[0].cached_tokens == 0
    assert second[0].cached_tokens >= 32  # the shared system prompt hit the prefill cache
    assert sorted(w.role for w in cluster.workers) == ["decode", "prefill"]
    assert cluster.prefix_index_available


def test_no_workers_is_unavailable_and_bad_input_is_invalid(namespace):
    async def scenario(router):
        codes = []
        for prompt in ([1, 2, 3], []):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await generate(router, "x", prompt)
            codes.append(error.value.code())
        return codes

    assert run(scenario, namespace, roles=()) == [grpc.StatusCode.UNAVAILABLE,
                                                  grpc.StatusCode.INVALID_ARGUMENT]


def test_fp8_kv_crosses_from_prefill_to_decode_worker(namespace):
    """Workers with fp8 caches push fp8 blocks (half of bf16's bytes) and decode exactly as one
    offline engine with an fp8 cache does."""
    from pagewire import LLM

    engine = dataclasses.replace(ENGINE, kv_cache_dtype="fp8")
    llm = LLM(kv_cache_memory_bytes=engine.kv_cache_memory_bytes, max_model_len=1024,
              kv_cache_dtype="fp8", show_progress=False)
    prompt_ids = llm.get_tokenizer().encode(SYSTEM + "My tyre is flat.")
    expected = llm.generate({"prompt_token_ids": prompt_ids}, SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0].token_ids

    async def scenario(router):
        return await generate(router, "fp8", prompt_ids)

    batches = run(scenario, namespace, engine=engine)
    assert [t for b in batches for t in b.token_ids] == expected
