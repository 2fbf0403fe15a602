"""`pagewire up --tensor-parallel-size 2`: a prefill and a decode worker of two ranks each; the
prompt's KV leaves the prefill group with every head (gathered from its ranks) and enters the
decode group (each rank keeping its heads) over gRPC, and the answers are the single-process
engine's greedy ones."""

from __future__ import annotations

import pytest

from pagewire import SamplingParams
from tests.integration.up_process import UpProcess


def test_up_with_tp2_workers_answers_as_one_process(llm):
    openai = pytest.importorskip("openai")
    up = UpProcess("--tensor-parallel-size", "2", "--kv-cache-bytes", str(32 << 20),
                   "--max-model-len", "1024")
    try:
        up.wait_ready()
        client = openai.OpenAI(base_url=up.base_url, api_key="unused")
        messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
        reply = client.chat.completions.create(model="SmolLM2-135M-Instruct",
                                               messages=messages, max_tokens=24,
                                               temperature=0)
        expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=24))
        assert reply.choices[0].message.content == expected[0].outputs[0].text
    finally:
        assert up.stop() == 0
