"""The whole serving pipeline in-process on loopback, for integration tests.

Tokenizer + worker(s) + router (found through real Redis) + the gateway under uvicorn, all in one
background event loop; tests talk to it over HTTP (`client()`) and read every worker's own
counters over gRPC (`worker_stats()`) or, in-process, their engines' (`engine_stats()`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading
import uuid

import grpc
import openai
import redis
import uvicorn

from pagewire.config import EngineConfig
from pagewire.engine.llm_engine import EngineStats
from pagewire.services.gateway.config import GatewayConfig
from pagewire.services.gateway.server import uvicorn_config
from pagewire.services.router.server import RouterConfig
from pagewire.services.router.server import serve as serve_router
from pagewire.services.tokenizer.config import TokenizerConfig
from pagewire.services.tokenizer.server import serve as serve_tokenizer
from pagewire.services.worker.config import WorkerConfig
from pagewire.services.worker.server import serve as serve_worker
from pagewire.services.worker.server import stop as stop_worker
from pagewire.v1 import worker_pb2, worker_pb2_grpc
from tests.integration.redis_helpers import REDIS_URL, delete_namespace

ENGINE = EngineConfig(kv_cache_memory_bytes=64 << 20, max_model_len=1024, show_progress=False)


class Stack:
    """The whole serving pipeline in one background loop; `client()` talks to its gateway."""

    def __init__(self, roles: tuple[str, ...], api_key: str | None = None,
                 routing_policy: str = "prefix", redis_url: str = REDIS_URL,
                 router_fields: dict | None = None,
                 kv_transports: tuple[str, ...] | None = None) -> None:
        """kv_transports: what the workers may use (WorkerConfig's default: all)."""
        self._routing_policy = routing_policy
        self._kv_transports = kv_transports
        self._router_fields = router_fields or {}
        self.redis_url = redis_url
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.namespace = f"pwtest-{uuid.uuid4().hex}"
        self._roles, self._api_key = roles, api_key
        self.port = self._run(self._start())

    def _run(self, coroutine, timeout_s: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    async def _start(self) -> int:
        # The gateway enforces the context the workers run, which it learns from the tokenizer.
        self.tokenizer = await serve_tokenizer(TokenizerConfig(port=0,
                                                               max_model_len=ENGINE.max_model_len))
        transports = {} if self._kv_transports is None else \
            {"kv_transports": self._kv_transports}
        self.workers = [await serve_worker(WorkerConfig(
            role=role, port=0, engine=ENGINE, redis_url=self.redis_url,
            redis_namespace=self.namespace, **transports)) for role in self._roles]
        self.router = await serve_router(RouterConfig(port=0, redis_url=self.redis_url,
                                                      policy=self._routing_policy,
                                                      redis_namespace=self.namespace,
                                                      **self._router_fields))
        self.gateway_config = GatewayConfig(
            port=0, tokenizer_address=f"127.0.0.1:{self.tokenizer.bound_port}",
            router_address=f"127.0.0.1:{self.router.bound_port}", api_key=self._api_key,
            request_timeout_s=60)
        return await self.start_gateway(self.gateway_config)

    async def start_gateway(self, config: GatewayConfig) -> int:
        # A request left running (its client gone) must not hold up the stack's shutdown.
        server = uvicorn.Server(uvicorn_config(config, host="127.0.0.1", port=0,
                                              log_level="warning", lifespan="on",
                                              timeout_graceful_shutdown=2))
        self._gateways = [*getattr(self, "_gateways", []), server]
        self._gateway_tasks = [*getattr(self, "_gateway_tasks", []),
                               asyncio.create_task(server.serve())]
        while not server.started:
            await asyncio.sleep(0.02)
        return server.servers[0].sockets[0].getsockname()[1]

    def client(self, port: int | None = None, api_key: str = "x") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{port or self.port}/v1",
                             api_key=api_key, max_retries=0, timeout=60)

    def worker_stats(self) -> list[worker_pb2.WorkerStats]:
        """Every worker's GetStats, asked directly (not the registry's lagging heartbeat), in
        the order of `roles`."""
        async def ask_all():
            stats = []
            for worker in self.workers:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.bound_port}") as channel:
                    stats.append(await worker_pb2_grpc.WorkerStub(channel).GetStats(
                        worker_pb2.StatsRequest(), timeout=10))
            return stats
        return self._run(ask_all())

    def engine_stats(self) -> list[EngineStats]:
        """A copy of every worker's engine counters, taken on its engine thread, in the order
        of `roles` (in-process only: what GetStats does not tell, e.g. prefill work done)."""
        async def copy_all():
            return [await worker.async_engine.call(lambda e: dataclasses.replace(e.stats))
                    for worker in self.workers]
        return self._run(copy_all())

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
            client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
            try:
                delete_namespace(client, self.namespace)
            except redis.RedisError:
                pass  # a test's own Redis may be gone already
            client.close()
            # Each worker holds a model and a KV cache: let a finished stack's memory go, or a
            # whole test session grows by gigabytes (CI runs on 24 GB).
            self.workers, self.tokenizer, self.router = [], None, None
            self._gateways, self._gateway_tasks = [], []
            if not self._thread.is_alive():
                self.loop.close()
            gc.collect()
