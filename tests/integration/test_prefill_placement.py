"""The router's choice of where a disaggregated prompt is computed, through the whole pipeline
(one prefill and one decode worker): by default the prompt is prefilled remotely and its KV
moves, and the router's measures (prefill speed, link bandwidth) show in /cluster and /metrics;
with a local-prefill threshold above the prompt, the decode worker computes it itself and no
KV moves. Either way the answer is the offline engine's."""

from __future__ import annotations

import httpx
import pytest

from pagewire import SamplingParams
from pagewire.cluster.prefill_placement import PlacementConfig
from tests.integration.stack import Stack

PROMPT = ("Describe the smell of fresh bread in a small village bakery early on a winter "
          "morning, in the voice of a sleepy cat.")


def ask(stack: Stack, model: str) -> str:
    reply = stack.client().completions.create(model=model, prompt=PROMPT, max_tokens=8,
                                              temperature=0, extra_body={"ignore_eos": True})
    return reply.choices[0].text


def counter(stack: Stack, name: str, label: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{stack.port}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name) and label in line)


@pytest.mark.parametrize("threshold, decision", [(0, "remote"), (10_000, "local-short")])
def test_the_prompt_is_computed_where_the_router_places_it(llm, threshold, decision):
    expected = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8,
                                                     ignore_eos=True))[0].outputs[0].text
    stack = Stack(("prefill", "decode"), router_fields={
        "placement": PlacementConfig(max_local_prefill_tokens=threshold)})
    try:
        model = stack.client().models.list().data[0].id
        assert ask(stack, model) == ask(stack, model) == expected
        prefill, decode = stack.worker_stats()
        cluster = httpx.get(f"http://127.0.0.1:{stack.port}/cluster", timeout=10).json()
        kv_bytes = counter(stack, "pagewire:kv_transfer_bytes_total", "transport")
        decided = counter(stack, "pagewire:prefill_decisions_total", f'"{decision}"')
    finally:
        stack.stop()
    assert decided == 2 and cluster["prefill_decisions"] == {decision: 2}
    announced = {w["role"]: (w["device"], set(w["kv_transports"])) for w in cluster["workers"]}
    assert announced["prefill"] == ("cpu", set())  # it receives no KV
    assert announced["decode"][0] == "cpu" and {"shm", "grpc"} <= announced["decode"][1]
    if decision == "remote":
        assert prefill.served == 2 and decode.served == 2 and kv_bytes > 0
        (link,) = cluster["kv_links"]
        assert link["transfers"] == 2 and link["bytes_per_s"] > 0
        speeds = {w["role"]: w["prefill_tokens_per_s"] for w in cluster["workers"]}
        assert speeds["prefill"] > 0
    else:
        assert prefill.served == 0 and decode.served == 2 and kv_bytes == 0
        assert cluster["kv_links"] == []
