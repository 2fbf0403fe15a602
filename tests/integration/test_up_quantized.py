"""`pagewire up --quantization gguf`: the prefill and decode workers hold the embedded model in
its GGUF blocks, and the KV a prefill worker computes with them decodes on the other worker
to the float32 engine's greedy answers (measured equal offline: tests/engine/
test_gguf_quantized.py), for two requests that share a system prompt."""

from __future__ import annotations

import pytest

from tests.integration.up_process import UpProcess


def test_up_with_gguf_held_quantized_answers_as_float32(llm):
    pytest.importorskip("openai")
    up = UpProcess("--quantization", "gguf", "--kv-cache-bytes", str(64 << 20),
                   "--max-model-len", "1024")
    try:
        up.wait_ready()
        for question in ("What is the capital of France?", "What is the capital of Spain?"):
            up.assert_answers_as(llm, [{"role": "system",
                                        "content": "You answer in one short sentence."},
                                       {"role": "user", "content": question}], 24)
    finally:
        assert up.stop() == 0
