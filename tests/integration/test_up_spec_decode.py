"""Speculative decoding through `pagewire up` (1P1D: the decode worker speculates): greedy
answers equal the offline engine's without speculation, and /metrics counts the drafts."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from pagewire import SamplingParams
from tests.integration.up_process import UpProcess

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
         "prompt_lookup_min": 2}
CODE = ("def area(width, height):\n    return width * height\n\n"
        "def perimeter(width, height):\n    return 2 * (width + height)\n")


def test_up_with_ngram_speculation_answers_as_greedy_without_it(llm):
    openai = pytest.importorskip("openai")
    up = UpProcess("--speculative-config", json.dumps(NGRAM), "--kv-cache-bytes",
                   str(128 << 20), "--max-model-len", "2048")
    try:
        up.wait_ready()
        client = openai.OpenAI(base_url=up.base_url, api_key="unused")
        messages = [{"role": "user", "content": "Repeat exactly, then stop: " + CODE}]
        reply = client.chat.completions.create(model="SmolLM2-135M-Instruct",
                                               messages=messages, max_tokens=48,
                                               temperature=0)
        expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=48))
        assert reply.choices[0].message.content == expected[0].outputs[0].text
        prompt = CODE + "\n# again:\n" + CODE[:30]
        stream = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt,
                                           max_tokens=40, temperature=0, stream=True)
        text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
        expected = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40))
        assert text == expected[0].outputs[0].text
        deadline = time.monotonic() + 10  # the worker's next heartbeat carries its counters
        while True:
            metrics = httpx.get(up.base_url.removesuffix("/v1") + "/metrics", timeout=10).text
            accepted = re.search(r'^pagewire:spec_decode_num_accepted_tokens_total\{[^}]*'
                                 r'role="decode"[^}]*\} (\S+)', metrics, re.M)
            if (accepted and float(accepted.group(1)) > 0) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert accepted and float(accepted.group(1)) > 0, metrics[-2000:]
        assert "pagewire:spec_decode_num_accepted_tokens_per_pos_total" in metrics
    finally:
        assert up.stop() == 0
