"""The OpenAI-compatible gateway on loopback, driven by the official `openai` client.

Tokenizer + worker(s) + router (found through real Redis) + the gateway under uvicorn, all in one
background event loop; the offline engine is the oracle for greedy text.
"""

from __future__ import annotations

import asyncio
import threading
import uuid

import httpx
import openai
import pytest
import redis
import uvicorn

from pagewire import SamplingParams
from pagewire.config import EngineConfig
from pagewire.services.gateway.app import create_app
from pagewire.services.gateway.config import GatewayConfig
from pagewire.services.router.server import RouterConfig
from pagewire.services.router.server import serve as serve_router
from pagewire.services.tokenizer.config import TokenizerConfig
from pagewire.services.tokenizer.server import serve as serve_tokenizer
from pagewire.services.worker.config import WorkerConfig
from pagewire.services.worker.server import serve as serve_worker
from pagewire.services.worker.server import stop as stop_worker
from tests.integration.redis_helpers import REDIS_URL, delete_namespace

ENGINE = EngineConfig(kv_cache_memory_bytes=64 << 20, max_model_len=1024, show_progress=False)
SYSTEM = ("You are the support assistant of a bicycle shop. Answer in two sentences, name the "
          "part involved, and always end by offering a free safety check at the shop. ") * 2
CHAT = [{"role": "user", "content": "Name three colours."}]


class Stack:
    """The whole serving pipeline in one background loop; `client()` talks to its gateway."""

    def __init__(self, roles: tuple[str, ...], api_key: str | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.namespace = f"pwtest-{uuid.uuid4().hex}"
        self._roles, self._api_key = roles, api_key
        self.port = self._run(self._start())

    def _run(self, coroutine, timeout_s: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    async def _start(self) -> int:
        self.tokenizer = await serve_tokenizer(TokenizerConfig(port=0))
        self.workers = [await serve_worker(WorkerConfig(
            role=role, port=0, engine=ENGINE, redis_url=REDIS_URL,
            redis_namespace=self.namespace)) for role in self._roles]
        self.router = await serve_router(RouterConfig(port=0, redis_url=REDIS_URL,
                                                      redis_namespace=self.namespace))
        self.gateway_config = GatewayConfig(
            port=0, tokenizer_address=f"127.0.0.1:{self.tokenizer.bound_port}",
            router_address=f"127.0.0.1:{self.router.bound_port}", api_key=self._api_key,
            request_timeout_s=60)
        return await self.start_gateway(self.gateway_config)

    async def start_gateway(self, config: GatewayConfig) -> int:
        server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=0,
                                               log_level="warning", lifespan="on"))
        self._gateways = [*getattr(self, "_gateways", []), server]
        self._gateway_tasks = [*getattr(self, "_gateway_tasks", []),
                               asyncio.create_task(server.serve())]
        while not server.started:
            await asyncio.sleep(0.02)
        return server.servers[0].sockets[0].getsockname()[1]

    def client(self, port: int | None = None, api_key: str = "x") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{port or self.port}/v1",
                             api_key=api_key, max_retries=0, timeout=60)

    def stop(self) -> None:
        async def stop_all():
            for server in self._gateways:
                server.should_exit = True
            await asyncio.gather(*self._gateway_tasks)
            await self.router.stop(0)
            for worker in self.workers:
                await stop_worker(worker, 0)
            await self.tokenizer.stop(0)
        try:
            self._run(stop_all())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
            delete_namespace(client, self.namespace)
            client.close()


@pytest.fixture(scope="module")
def stack():
    stack = Stack(roles=("both",))
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def client(stack):
    return stack.client()


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_models_lists_the_served_model(client, model):
    models = client.models.list().data
    assert [m.id for m in models] == [model]


def test_greedy_chat_equals_offline_engine(client, model, llm):
    expected = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
    response = client.chat.completions.create(model=model, messages=CHAT, temperature=0,
                                              max_tokens=12)
    assert response.choices[0].message.content == expected
    assert response.choices[0].message.role == "assistant"
    assert response.usage.completion_tokens <= 12
    assert response.usage.prompt_tokens > 0


def test_streaming_equals_non_streaming_and_reports_usage(client, model):
    kwargs = dict(model=model, messages=CHAT, temperature=0, max_tokens=12)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        whole.choices[0].finish_reason


def test_streaming_completion_ends_with_done(stack, model):
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{stack.port}/v1/completions", json=body,
                      timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.status_code == 200
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_shared_system_prompt_reports_cached_tokens(client, model):
    for question in ("My chain slips.", "My brakes squeak."):
        response = client.chat.completions.create(
            model=model, temperature=0, max_tokens=2,
            messages=[{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": question}])
    assert response.usage.prompt_tokens_details.cached_tokens > 0


def test_stop_string_ends_the_text(client, model):
    prompt = "Count: 1, 2, 3, 4, 5, 6, 7, 8,"
    free = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=16,
                                     extra_body={"ignore_eos": True})
    text = free.choices[0].text
    assert len(text) >= 4
    stop = text[2:4]
    stopped = client.completions.create(model=model, prompt=prompt, temperature=0,
                                        max_tokens=16, stop=[stop])
    assert stopped.choices[0].text == text[:text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=model, prompt=prompt, temperature=0,
                                         max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == stopped.choices[0].text


def test_n_gives_that_many_choices(client, model):
    response = client.completions.create(model=model, prompt="Hello", max_tokens=4, n=2,
                                         temperature=1.0, seed=7)
    assert sorted(c.index for c in response.choices) == [0, 1]
    assert all(c.text is not None for c in response.choices)
    streamed = client.completions.create(model=model, prompt="Hello", max_tokens=4, n=2,
                                         temperature=1.0, seed=7, stream=True)
    texts = ["", ""]
    for chunk in streamed:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == [c.text for c in sorted(response.choices, key=lambda c: c.index)]


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": 5}, "temperature"),
    ({"extra_body": {"n": 9}}, "n"),
    ({"extra_body": {"max_tokens": "many"}}, "max_tokens"),
    ({"extra_body": {"bogus_field": 1}}, "bogus_field"),
    ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
])
def test_bad_input_is_400_in_openai_shape(client, model, kwargs, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=model, prompt="Hi", **kwargs)
    assert error.value.status_code == 400
    body = error.value.body
    assert set(body) >= {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error"
    assert body["param"].split(".")[0] == param


def test_wrong_message_type_is_400(client, model):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": 3}])
    assert error.value.body["param"].startswith("messages")


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert error.value.body["code"] == "model_not_found"


def test_too_long_prompt_is_400_and_server_keeps_serving(client, model):
    max_model_len = client.models.list().data[0].model_extra["max_model_len"]
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=model, prompt=[1] * (max_model_len + 1), max_tokens=1)
    assert "context length" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt=[1] * 8, max_tokens=max_model_len)
    ok = client.completions.create(model=model, prompt="Hi", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_api_key_is_enforced(stack, model):
    import dataclasses
    config = dataclasses.replace(stack.gateway_config, api_key="sekret")
    port = stack._run(stack.start_gateway(config))
    with pytest.raises(openai.AuthenticationError) as error:
        stack.client(port, api_key="wrong").models.list()
    assert error.value.body["code"] == "invalid_api_key"
    assert stack.client(port, api_key="sekret").models.list().data[0].id == model


def test_prefill_decode_pair_serves_chat(llm):
    expected = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    pair = Stack(roles=("prefill", "decode"))
    try:
        client = pair.client()
        model = client.models.list().data[0].id
        response = client.chat.completions.create(model=model, messages=CHAT, temperature=0,
                                                  max_tokens=8)
        assert response.choices[0].message.content == expected
    finally:
        pair.stop()


def test_client_disconnect_aborts_the_request(stack, client, model):
    import grpc

    from pagewire.v1 import router_pb2, router_pb2_grpc

    stream = client.completions.create(model=model, prompt="Tell a story", max_tokens=900,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()

    async def running_after_close() -> int:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.router.bound_port}") as channel:
            router = router_pb2_grpc.RouterStub(channel)
            for _ in range(100):
                cluster = await router.GetCluster(router_pb2.ClusterRequest())
                running = sum(w.running + w.waiting for w in cluster.workers)
                if running == 0:
                    return 0
                await asyncio.sleep(0.1)
            return running
    assert stack._run(running_after_close()) == 0


def test_cluster_lists_live_workers(stack):
    reply = httpx.get(f"http://127.0.0.1:{stack.port}/cluster", timeout=10)
    assert reply.status_code == 200
    workers = reply.json()["workers"]
    assert workers and {"id", "role", "address", "running", "waiting", "kv_blocks_free",
                        "kv_blocks_total", "served"} <= set(workers[0])
    assert all(w["kv_blocks_free"] <= w["kv_blocks_total"] for w in workers)
