"""Logprobs and /metrics through the disaggregated pipeline (prefill → KV transfer → decode).

The first token's logprobs are computed on the prefill worker and travel with the KV; the rest
come from the decode worker. The offline engine is the oracle for their values.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagewire import SamplingParams
from tests.integration.stack import Stack

PROMPT = "The three primary colours are"
CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def stack():
    stack = Stack(roles=("prefill", "decode"))
    yield stack
    stack.stop()


def test_chat_logprobs_equal_the_offline_engine(client, model, llm):
    expected = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=6, logprobs=3,
                                             ignore_eos=True))[0].outputs[0]
    response = client.chat.completions.create(model=model, messages=CHAT, temperature=0,
                                              max_tokens=6, logprobs=True, top_logprobs=3,
                                              extra_body={"ignore_eos": True})
    content = response.choices[0].logprobs.content
    assert len(content) == len(expected.token_ids) == 6
    for entry, token_id, offline in zip(content, expected.token_ids, expected.logprobs):
        assert entry.logprob == pytest.approx(offline[token_id].logprob, abs=2e-3)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy takes the most likely
        ranked = sorted((lp.rank, lp.logprob) for lp in offline.values() if lp.rank)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            [lp for _, lp in ranked], abs=2e-3)
    text = b"".join(bytes(entry.bytes) for entry in content).decode()
    assert text == response.choices[0].message.content


def test_streamed_chat_logprobs_equal_non_streamed(client, model):
    kwargs = dict(model=model, messages=CHAT, temperature=0, max_tokens=5, logprobs=True,
                  top_logprobs=2)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [entry for chunk in client.chat.completions.create(**kwargs, stream=True)
                if chunk.choices and chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole], abs=2e-3)


def test_chat_without_logprobs_has_none(client, model):
    response = client.chat.completions.create(model=model, messages=CHAT, max_tokens=2)
    assert response.choices[0].logprobs is None


def test_sampled_token_logprob_is_its_own_not_the_top_one(client, model):
    response = client.completions.create(model=model, prompt=PROMPT, max_tokens=12,
                                         temperature=2.0, seed=3, logprobs=5)
    logprobs = response.choices[0].logprobs
    off_top = 0
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs,
                                   logprobs.top_logprobs):
        assert top[token] == pytest.approx(logprob)
        off_top += logprob < max(top.values())
    assert off_top > 0  # at temperature 2 some sampled token is not the most likely


def test_completion_logprobs_table(client, model):
    response = client.completions.create(model=model, prompt=PROMPT, max_tokens=6,
                                         temperature=0, logprobs=2,
                                         extra_body={"ignore_eos": True})
    choice = response.choices[0]
    table = choice.logprobs
    assert len(table.tokens) == len(table.token_logprobs) == len(table.top_logprobs) == 6
    assert "".join(table.tokens) == choice.text
    assert table.text_offset == [sum(len(t) for t in table.tokens[:i]) for i in range(6)]
    assert all(len(top) == 2 and token in top for token, top in zip(table.tokens,
                                                                    table.top_logprobs))
    assert all(lp <= 0 for lp in table.token_logprobs)


@pytest.mark.parametrize("create, kwargs, param", [
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"logprobs": -1}, "logprobs"),
])
def test_bad_logprobs_are_400(client, model, create, kwargs, param):
    with pytest.raises(openai.BadRequestError) as error:
        if create == "chat":
            client.chat.completions.create(model=model, messages=CHAT, **kwargs)
        else:
            client.completions.create(model=model, prompt=PROMPT, **kwargs)
    assert error.value.body["param"] == param


def scrape(stack) -> dict[str, list]:
    reply = httpx.get(f"http://127.0.0.1:{stack.port}/metrics", timeout=10)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(reply.text)}


def value(samples, name: str, **labels) -> float:
    return sum(s.value for s in samples if s.name == name and
               all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_count_requests_tokens_prefix_hits_and_kv_transfers(stack, client, model):
    before = scrape(stack)
    for _ in range(2):  # the second one hits the prefix cache
        client.completions.create(model=model, prompt=PROMPT * 8, max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    after = scrape(stack)

    def grew(family, name, **labels):
        return value(after[family], name, **labels) - value(before.get(family, []), name,
                                                            **labels)

    assert grew("pagewire:request_success", "pagewire:request_success_total",
                finished_reason="length") == 2
    assert grew("pagewire:time_to_first_token_seconds",
                "pagewire:time_to_first_token_seconds_count") == 2
    assert grew("pagewire:e2e_request_latency_seconds",
                "pagewire:e2e_request_latency_seconds_count") == 2
    assert grew("pagewire:time_per_output_token_seconds",
                "pagewire:time_per_output_token_seconds_count") == 6  # 3 tokens after each first
    assert grew("pagewire:generation_tokens", "pagewire:generation_tokens_total") == 8
    prompt_tokens = grew("pagewire:prompt_tokens", "pagewire:prompt_tokens_total")
    assert prompt_tokens > 64
    assert 0 < grew("pagewire:prefix_cache_hits", "pagewire:prefix_cache_hits_total") < \
        prompt_tokens
    assert grew("pagewire:kv_transfer_bytes", "pagewire:kv_transfer_bytes_total") > 0
    assert grew("pagewire:kv_transfer_seconds", "pagewire:kv_transfer_seconds_count") == 2


def test_metrics_show_every_worker_with_its_role(stack):
    metrics = scrape(stack)
    roles = {s.labels["role"] for s in metrics["pagewire:kv_blocks_total"]}
    assert roles == {"prefill", "decode"}
    for sample in metrics["pagewire:kv_cache_usage_perc"]:
        assert 0 <= sample.value <= 1
    assert value(metrics["pagewire:prefix_index_available"],
                 "pagewire:prefix_index_available") == 1
    assert {s.labels["role"] for s in metrics["pagewire:num_requests_running"]} == roles


def test_metrics_count_a_client_disconnect_as_abort(stack, client, model):
    before = value(scrape(stack).get("pagewire:request_success", []),
                   "pagewire:request_success_total", finished_reason="abort")
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=500,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if value(scrape(stack)["pagewire:request_success"], "pagewire:request_success_total",
                 finished_reason="abort") == before + 1:
            return
        time.sleep(0.1)
    pytest.fail("a client disconnect was not counted as an abort")
