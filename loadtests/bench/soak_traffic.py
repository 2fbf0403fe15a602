"""The soak's traffic (`loadtests/soak.py`): a seeded mix of requests, a closed-loop burst that
measures capacity, Poisson arrivals at a fraction of it, and a final outcome for every request.

The mix draws from the benchmark's own datasets (random token-id prompts on /v1/completions,
shared-prefix chats on /v1/chat/completions) and sends each streamed, non-streamed, or streamed
and closed by the client after a few chunks (a disconnect the server must abort). A request ends
`completed` (a finish_reason and, streamed, `[DONE]`), `failed` (an HTTP error or an SSE error
event: the server said why), `disconnected` (on purpose), or `lost`: a stream cut short, no
finish_reason, a dropped connection, or no answer within the request timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass

import httpx
import numpy as np

from .client import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    chat_body,
    completion_body,
    error_message,
    output_of,
)
from .config import DatasetConfig, LoadConfig
from .datasets import BenchRequest, build_dataset
from .load import arrival_gaps
from .soak_checks import Outcome

MODES = ("stream", "non-stream", "disconnect")
POOL_SIZE = 256  # requests built per dataset at a time; the next pool takes the next seed


@dataclass(frozen=True)
class MixConfig:
    shared_prefix_fraction: float = 0.5
    """Requests from the shared-prefix chat set; the rest are random token-id completions."""
    non_stream_fraction: float = 0.2
    disconnect_fraction: float = 0.02
    """Streamed requests the client closes after `disconnect_after_chunks` output chunks."""
    disconnect_after_chunks: int = 2
    input_len: int = 128
    """Random set: prompt tokens. Shared-prefix set: question words."""
    output_len: int = 32
    range_ratio: float = 0.5
    prefix_len: int = 256
    """Shared-prefix set: words per system prompt."""
    num_prefixes: int = 4
    vocab_size: int = 32000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("shared_prefix_fraction", "non_stream_fraction", "disconnect_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1]")
        if self.non_stream_fraction + self.disconnect_fraction > 1:
            raise ValueError("non_stream_fraction + disconnect_fraction must be at most 1")
        if self.disconnect_after_chunks < 1:
            raise ValueError("disconnect_after_chunks must be at least 1")
        self.dataset("random")  # the datasets' own validation, at construction

    def dataset(self, name: str, pool: int = 0) -> DatasetConfig:
        return DatasetConfig(name=name, num_prompts=POOL_SIZE, input_len=self.input_len,
                             output_len=self.output_len, range_ratio=self.range_ratio,
                             vocab_size=self.vocab_size, num_prefixes=self.num_prefixes,
                             prefix_len=self.prefix_len, seed=self.seed + 7919 * pool)


@dataclass(frozen=True)
class Planned:
    mode: str
    dataset: str
    request: BenchRequest


class RequestMix:
    """An endless, seeded stream of planned requests."""

    def __init__(self, config: MixConfig, stream_seed: int = 0) -> None:
        self.config = config
        self._rng = np.random.default_rng([config.seed, stream_seed])
        self._pools: dict[str, list[BenchRequest]] = {"random": [], "shared-prefix": []}
        self._built = {"random": 0, "shared-prefix": 0}

    def next(self, allow_disconnect: bool = True) -> Planned:
        c = self.config
        dataset = "shared-prefix" if self._rng.random() < c.shared_prefix_fraction else "random"
        draw = self._rng.random()
        if allow_disconnect and draw < c.disconnect_fraction:
            mode = "disconnect"
        elif draw < c.disconnect_fraction + c.non_stream_fraction:
            mode = "non-stream"
        else:
            mode = "stream"
        return Planned(mode, dataset, self._take(dataset))

    def _take(self, dataset: str) -> BenchRequest:
        if not self._pools[dataset]:
            config = self.config.dataset(dataset, self._built[dataset])
            self._built[dataset] += 1
            self._pools[dataset] = [s[0] for s in reversed(build_dataset(config))]
        return self._pools[dataset].pop()


class Sender:
    """Sends planned requests and keeps every Outcome (start_s: monotonic seconds until
    `rebase` turns them into seconds since the soak began)."""

    def __init__(self, client: httpx.AsyncClient, model: str, mix: MixConfig,
                 request_timeout_s: float, temperature: float = 0.0) -> None:
        self.client, self.model, self.mix = client, model, mix
        self.request_timeout_s = request_timeout_s
        self.temperature = temperature
        self.outcomes: list[Outcome] = []

    def in_flight(self) -> int:
        return sum(o.status == "pending" for o in self.outcomes)

    async def send(self, planned: Planned, phase: str) -> Outcome:
        outcome = Outcome(phase, planned.mode, planned.dataset, start_s=time.monotonic())
        self.outcomes.append(outcome)
        try:
            await asyncio.wait_for(self._send(planned, outcome), self.request_timeout_s)
        except TimeoutError:
            _end(outcome, "lost", f"no final outcome within {self.request_timeout_s:g} s")
        except asyncio.CancelledError:
            _end(outcome, "lost", "still running when the soak stopped waiting")
            raise
        except httpx.TimeoutException as exc:
            _end(outcome, "lost", f"{type(exc).__name__}: the server went quiet")
        except httpx.HTTPError as exc:
            _end(outcome, "lost", f"{type(exc).__name__}: {exc}"[:200])
        except json.JSONDecodeError:
            _end(outcome, "lost", "a reply that is not JSON")
        return outcome

    def _body(self, planned: Planned) -> tuple[str, dict]:
        r = planned.request
        options = {"ignore_eos": True, "temperature": self.temperature}
        if r.is_chat:
            messages = [{"role": "system", "content": r.system}] if r.system else []
            messages.append({"role": "user", "content": r.user})
            path, body = CHAT_PATH, chat_body(self.model, messages, r.output_len, **options)
        else:
            path, body = COMPLETIONS_PATH, completion_body(self.model, r.prompt, r.output_len,
                                                           **options)
        if planned.mode == "non-stream":
            body["stream"] = False
            body.pop("stream_options")
        return path, body

    async def _send(self, planned: Planned, outcome: Outcome) -> None:
        path, body = self._body(planned)
        sent_at = time.perf_counter()
        if planned.mode == "non-stream":
            reply = await self.client.post(path, json=body)
            if reply.status_code != 200:
                return _failed(outcome, reply.status_code, reply.text)
            return _read_reply(reply.json(), outcome, time.perf_counter() - sent_at)
        async with self.client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return _failed(outcome, response.status_code, text)
            close_after = (self.mix.disconnect_after_chunks if planned.mode == "disconnect"
                           else None)
            await _read_stream(response, outcome, sent_at, close_after)


def _end(outcome: Outcome, status: str, reason: str = "") -> None:
    if outcome.status == "pending":
        outcome.status, outcome.reason = status, reason


def _failed(outcome: Outcome, status_code: int, body: str) -> None:
    _end(outcome, "failed", f"HTTP {status_code}: {error_message(body)[:160]}")


def _read_reply(payload: dict, outcome: Outcome, e2e_s: float) -> None:
    choices = payload.get("choices") or [{}]
    outcome.finish_reason = choices[0].get("finish_reason")
    if outcome.finish_reason is None:
        return _end(outcome, "lost", "an answer without a finish_reason")
    outcome.e2e_s = e2e_s
    outcome.output_tokens = (payload.get("usage") or {}).get("completion_tokens") or 0
    _end(outcome, "completed")


async def _read_stream(response: httpx.Response, outcome: Outcome, sent_at: float,
                       close_after: int | None) -> None:
    """Reads SSE events to `[DONE]`, or closes the stream after `close_after` output chunks."""
    times: list[float] = []
    usage, done = None, False
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            return _end(outcome, "failed", f"stream error: {error_message(data)[:160]}")
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason
        if output_of(chunk) is not None:
            times.append(time.perf_counter())
        if close_after and len(times) >= close_after and outcome.finish_reason is None:
            return _end(outcome, "disconnected")  # leaving the `with` closes the connection
    if not done:
        return _end(outcome, "lost", "the stream ended before [DONE]")
    if outcome.finish_reason is None or not times:
        return _end(outcome, "lost", "[DONE] without output or a finish_reason")
    outcome.output_tokens = (usage or {}).get("completion_tokens") or len(times)
    outcome.ttft_s, outcome.e2e_s = times[0] - sent_at, times[-1] - sent_at
    if outcome.output_tokens > 1:
        outcome.tpot_s = (outcome.e2e_s - outcome.ttft_s) / (outcome.output_tokens - 1)
    _end(outcome, "completed")


# ---- load shapes -----------------------------------------------------------------------------

async def measure_capacity(sender: Sender, mix: RequestMix, concurrency: int,
                           duration_s: float) -> dict:
    """Closed loop: `concurrency` requests in flight for duration_s (no disconnects). Capacity
    is the completions per second after the first fifth (the ramp), until the loop stops."""
    started = time.monotonic()
    stop_at = started + duration_s
    first = len(sender.outcomes)

    async def loop() -> None:
        while time.monotonic() < stop_at:
            await sender.send(mix.next(allow_disconnect=False), "capacity")

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    outcomes = sender.outcomes[first:]
    steady_from = started + duration_s / 5
    ends = [o.start_s + o.e2e_s for o in outcomes if o.status == "completed"]
    steady = sum(steady_from <= end <= stop_at for end in ends)
    return {"concurrency": concurrency, "duration_s": duration_s, "sent": len(outcomes),
            "completed": len(ends), "failed": sum(o.status != "completed" for o in outcomes),
            "capacity_rps": steady / (stop_at - steady_from),
            "output_tokens_per_s": sum(o.output_tokens for o in outcomes
                                       if o.status == "completed") / (time.monotonic() - started)}


async def send_poisson(sender: Sender, mix: RequestMix, rate: float, duration_s: float,
                       burstiness: float = 1.0, seed: int = 0) -> list[asyncio.Task]:
    """Starts requests at the benchmark's arrival times (gamma gaps; Poisson at burstiness 1)
    until duration_s has passed; returns them still running."""
    load = LoadConfig(request_rate=rate, burstiness=burstiness, seed=seed)
    arrivals = np.cumsum([0.0, *arrival_gaps(int(rate * duration_s * 2) + 100, load)])
    started, tasks = time.monotonic(), []
    for at in arrivals:
        if at >= duration_s:
            break
        await asyncio.sleep(max(0.0, started + at - time.monotonic()))
        tasks.append(asyncio.create_task(sender.send(mix.next(), "soak")))
    await asyncio.sleep(max(0.0, started + duration_s - time.monotonic()))
    return tasks


async def drain(tasks: list[asyncio.Task], timeout_s: float) -> int:
    """Waits for the requests still running; those left at timeout_s are cancelled (their
    outcome: lost). Returns how many were cancelled."""
    if not tasks:
        return 0
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return len(pending)


def rebase(outcomes: list[Outcome], origin: float) -> list[Outcome]:
    """Copies with start_s in seconds since `origin` (the soak phase's first arrival)."""
    return [dataclasses.replace(o, start_s=o.start_s - origin) for o in outcomes]
