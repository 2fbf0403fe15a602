"""One streamed request to an OpenAI-compatible server, timed the way vLLM's benchmark times it.

TTFT is the time from sending to the first chunk that carries output (a chat's role-only chunk
does not), ITL the gaps between such chunks, E2E latency the time to the last of them, and the
output length is usage.completion_tokens (stream_options.include_usage), falling back to the
number of chunks. A failed request is returned with its error, never raised.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

COMPLETIONS_PATH = "/v1/completions"
CHAT_PATH = "/v1/chat/completions"


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    start_s: float = 0.0
    """perf_counter() when it was sent."""
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    """From usage; 0 when the server did not report it."""
    output_tokens: int = 0
    cached_tokens: int = 0
    """usage.prompt_tokens_details.cached_tokens (prefix-cache hits), when reported."""
    text: str = ""

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first (0 for a single token, as vLLM)."""
        if self.output_tokens < 2:
            return 0.0
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


def new_client(root_url: str, api_key: str | None = None,
               timeout_s: float = 600.0) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(base_url=root_url, headers=headers,
                             timeout=httpx.Timeout(timeout_s, connect=10.0),
                             limits=httpx.Limits(max_connections=None,
                                                 max_keepalive_connections=None))


async def first_model(client: httpx.AsyncClient) -> str:
    reply = await client.get("/v1/models")
    if reply.status_code != 200:
        raise RuntimeError(f"GET /v1/models: HTTP {reply.status_code}: {reply.text[:300]}")
    models = reply.json().get("data") or []
    if not models:
        raise RuntimeError("GET /v1/models listed no model")
    return models[0]["id"]


def completion_body(model: str, prompt: str | list[int], max_tokens: int, *, ignore_eos: bool,
                    temperature: float = 0.0, extra: dict | None = None) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens}
    return _streamed(body, ignore_eos, temperature, extra)


def chat_body(model: str, messages: list[dict], max_tokens: int, *, ignore_eos: bool,
              temperature: float = 0.0, extra: dict | None = None) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens}
    return _streamed(body, ignore_eos, temperature, extra)


def _streamed(body: dict, ignore_eos: bool, temperature: float, extra: dict | None) -> dict:
    body.update(temperature=temperature, stream=True, stream_options={"include_usage": True})
    if ignore_eos:
        body["ignore_eos"] = True
    return {**body, **(extra or {})}


async def stream_request(client: httpx.AsyncClient, path: str, body: dict) -> RequestResult:
    result = RequestResult(start_s=time.perf_counter())
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                message = error_message((await response.aread()).decode(errors="replace"))
                result.error = f"HTTP {response.status_code}: {message}"
                return result
            await _read_events(response, result)
    except json.JSONDecodeError as exc:
        result.error = f"a chunk that is not JSON: {exc}"
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return result


async def _read_events(response: httpx.Response, result: RequestResult) -> None:
    chunk_times, texts, usage = [], [], None
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            break
        now = time.perf_counter()
        chunk = json.loads(data)
        if "error" in chunk:
            result.error = f"stream error: {error_message(json.dumps(chunk))}"
            return
        usage = chunk.get("usage") or usage
        text = output_of(chunk)
        if text is not None:
            chunk_times.append(now)
            texts.append(text)
    if not chunk_times:
        result.error = "the stream ended without output"
        return
    result.ok = True
    result.ttft_s = chunk_times[0] - result.start_s
    result.latency_s = chunk_times[-1] - result.start_s
    result.itl_s = [b - a for a, b in zip(chunk_times, chunk_times[1:])]
    result.text = "".join(texts)
    result.output_tokens = (usage or {}).get("completion_tokens") or len(chunk_times)
    result.prompt_tokens = (usage or {}).get("prompt_tokens") or 0
    result.cached_tokens = ((usage or {}).get("prompt_tokens_details") or {}).get(
        "cached_tokens") or 0


def output_of(chunk: dict) -> str | None:
    """The output text a chunk carries; None when it carries none (usage, a bare role)."""
    choices = chunk.get("choices") or []
    if not choices:
        return None
    choice = choices[0]
    if "delta" not in choice:
        return choice.get("text") or ""
    delta = choice["delta"] or {}
    if delta.get("role") and not delta.get("content"):
        return None
    return delta.get("content") or ""


def error_message(body: str) -> str:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return body[:300]
    if isinstance(error, dict):
        return str(error.get("message", error))[:300]
    return str(error)[:300] if error else body[:300]
