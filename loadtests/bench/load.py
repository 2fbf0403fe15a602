"""Sends a workload: sessions start on an arrival schedule, requests in flight are capped, and a
progress bar counts finished requests.

Arrivals are vLLM's: gaps drawn from a gamma distribution of shape `burstiness` and mean
1 / rate (shape 1 is a Poisson process), seeded; an infinite rate sends everything at once. A
session's turns go one after another, each as soon as the previous reply is complete, so for
multi-turn chat the rate counts conversations started.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass

import httpx
import numpy as np

from .client import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    RequestResult,
    chat_body,
    completion_body,
    stream_request,
)
from .config import BenchConfig, LoadConfig
from .datasets import BenchRequest, Session


def arrival_gaps(num: int, load: LoadConfig) -> list[float]:
    """Seconds to wait after each arrival before the next."""
    if math.isinf(load.request_rate):
        return [0.0] * num
    rng = np.random.default_rng(load.seed)
    scale = 1.0 / (load.request_rate * load.burstiness)
    return rng.gamma(shape=load.burstiness, scale=scale, size=num).tolist()


@dataclass
class Sender:
    """Turns a dataset request (and the chat history before it) into one streamed request."""

    client: httpx.AsyncClient
    model: str
    config: BenchConfig

    async def send(self, request: BenchRequest, history: list[dict]) -> RequestResult:
        options = {"ignore_eos": self.config.ignore_eos, "temperature": self.config.temperature,
                   "extra": self.config.extra_body}
        if request.is_chat:
            system = [{"role": "system", "content": request.system}] if request.system else []
            messages = [*system, *history, {"role": "user", "content": request.user}]
            body = chat_body(self.model, messages, request.output_len, **options)
            result = await stream_request(self.client, CHAT_PATH, body)
        else:
            body = completion_body(self.model, request.prompt, request.output_len, **options)
            result = await stream_request(self.client, COMPLETIONS_PATH, body)
        if result.ok and not result.prompt_tokens:  # the server did not say: the dataset's own
            result.prompt_tokens = request.prompt_len
        return result


async def run_load(sender: Sender, sessions: list[Session], load: LoadConfig,
                   progress) -> tuple[list[RequestResult], float]:
    """Every request's result (sessions in order, turns in order) and the run's duration."""
    slots = (asyncio.Semaphore(load.max_concurrency) if load.max_concurrency
             else contextlib.nullcontext())
    gaps = arrival_gaps(len(sessions), load)
    start = time.perf_counter()
    tasks = []
    for index, session in enumerate(sessions):
        tasks.append(asyncio.create_task(run_session(sender, session, slots, progress)))
        if index + 1 < len(sessions) and gaps[index] > 0:
            await asyncio.sleep(gaps[index])
    per_session = await asyncio.gather(*tasks)
    duration_s = time.perf_counter() - start
    return [result for results in per_session for result in results], duration_s


async def run_session(sender: Sender, session: Session, slots,
                      progress) -> list[RequestResult]:
    history: list[dict] = []
    results = []
    for index, request in enumerate(session):
        async with slots:
            result = await sender.send(request, history)
        results.append(result)
        progress.update(1)
        if not result.ok:
            skipped = len(session) - index - 1
            results += [RequestResult(error="not sent: an earlier turn failed")
                        for _ in range(skipped)]
            progress.update(skipped)
            break
        if request.is_chat:
            history += [{"role": "user", "content": request.user},
                        {"role": "assistant", "content": result.text}]
    return results
