"""`pagewire up --quantization gguf`: the prefill and decode workers hold the embedded model in
its GGUF blocks, and the KV a prefill worker computes with them decodes on the other worker
to the float32 engine's greedy answers (measured equal offline: tests/engine/
test_gguf_quantized.py), for two requests that share a system prompt."""

from __future__ import annotations

import pytest

from pagewire import SamplingParams
from tests.integration.up_process import UpProcess


def test_up_with_gguf_held_quantized_answers_as_float32(llm):
    openai = pytest.importorskip("openai")
    up = UpProcess("--quantization", "gguf", "--kv-cache-bytes", str(64 << 20),
                   "--max-model-len", "1024")
    try:
        up.wait_ready()
        client = openai.OpenAI(base_url=up.base_url, api_key="unused")
        for question in ("What is the capital of France?", "What is the capital of Spain?"):
            messages = [{"role": "system", "content": "You answer in one short sentence."},
                        {"role": "user", "content": question}]
            reply = client.chat.completions.create(model="SmolLM2-135M-Instruct",
                                                   messages=messages, max_tokens=24,
                                                   temperature=0)
            expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=24))
            assert reply.choices[0].message.content == expected[0].outputs[0].text
    finally:
        assert up.stop() == 0
