"""Two prefill and two decode workers behind one router, the whole pipeline on loopback.

A burst of concurrent greedy requests gets the offline engine's answers and spreads over both
workers of each tier; a client that leaves mid-stream aborts its request, and no worker of either
tier keeps a KV block for it.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from pagewire import SamplingParams
from tests.integration.stack import Stack

ROLES = ("prefill", "prefill", "decode", "decode")
BLOCK_SIZE = 16
# Different from the first token on and longer than one KV block, as real prompts are: no two
# share a cached prefix, so only load can tell the router where each one goes.
PROMPTS = [
    "Explain to a ten-year-old why the sky looks blue during the day and turns red and orange "
    "at sunset, using a simple comparison.",
    "Write a friendly email to a neighbour asking whether they could water the tomato plants "
    "on the balcony while you are away for a week.",
    "List three practical tips for keeping a bicycle chain clean and quiet when you ride to work "
    "every day through rain and mud.",
    "Describe the smell of fresh bread in a small village bakery early on a winter morning, in "
    "the voice of a sleepy cat.",
    "Summarise the rules of chess for someone who has only ever played checkers, focusing on how "
    "each piece is allowed to move.",
    "What should a beginner pack for a two-day hiking trip in the mountains in late spring, when "
    "the weather can change quickly?",
    "Give a short recipe for a vegetable soup that uses carrots, leeks and potatoes, and say how "
    "long each step should take.",
    "Tell the story of a lighthouse keeper who finds a message in a bottle, in exactly four "
    "sentences with a surprising ending.",
]
MAX_TOKENS = 8
LONG_MAX_TOKENS = 900  # a minute of decoding on CPU: only an abort frees the worker in seconds
IDLE_DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def tiers():
    stack = Stack(roles=ROLES)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def model(tiers):
    return tiers.client().models.list().data[0].id


@dataclass
class Burst:
    responses: list
    served: dict[str, list[int]]  # requests each worker counted as served during the burst
    prefilled_tokens: list[int]  # tokens each prefill worker's engine computed during it


@pytest.fixture(scope="module")
def burst(tiers, model) -> Burst:
    """PROMPTS sent all at once through the gateway; what each worker did meanwhile."""
    client = tiers.client()
    for _ in range(2):  # warm every path first, so the burst's requests do arrive together
        client.completions.create(model=model, prompt="Hello", max_tokens=1, temperature=0)
    served_before, prefilled_before = served_by_role(tiers), prefilled_tokens(tiers)

    def complete(prompt: str):
        return client.completions.create(model=model, prompt=prompt, temperature=0,
                                         max_tokens=MAX_TOKENS)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        responses = list(pool.map(complete, PROMPTS))
    served_after = served_by_role(tiers)
    served = {role: [a - b for a, b in zip(served_after[role], served_before[role], strict=True)]
              for role in served_after}
    prefilled = [a - b for a, b in zip(prefilled_tokens(tiers), prefilled_before, strict=True)]
    return Burst(responses, served, prefilled)


def served_by_role(tiers) -> dict[str, list[int]]:
    served: dict[str, list[int]] = {"prefill": [], "decode": []}
    for stats in tiers.worker_stats():
        served[stats.role].append(stats.served)
    return served


def prefilled_tokens(tiers) -> list[int]:
    """Tokens each prefill worker's engine has computed since it started."""
    return [stats.num_computed_tokens
            for role, stats in zip(ROLES, tiers.engine_stats(), strict=True) if role == "prefill"]


def wait_until_idle(tiers, deadline_s: float = IDLE_DEADLINE_S) -> list:
    """Every worker's GetStats once none runs, queues or holds a KV block, or at the deadline.

    kv_blocks_free counts every block with ref_count 0, prefix-cached ones included
    (BlockManager.num_free_blocks), so free == total means no request holds a block."""
    deadline = time.monotonic() + deadline_s
    while True:
        stats = tiers.worker_stats()
        if all(is_idle(s) for s in stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def is_idle(stats) -> bool:
    return stats.running == 0 and stats.waiting == 0 and \
        stats.kv_blocks_free == stats.kv_blocks_total


def test_prompts_share_no_cached_prefix(llm):
    first_blocks = [tuple(llm.get_tokenizer().encode(p)[:BLOCK_SIZE]) for p in PROMPTS]
    assert all(len(block) == BLOCK_SIZE for block in first_blocks)
    assert len(set(first_blocks)) == len(PROMPTS)


def test_concurrent_greedy_answers_equal_offline_engine(burst, llm):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    expected = [o.outputs[0] for o in llm.generate(PROMPTS, params)]
    for prompt, response, offline in zip(PROMPTS, burst.responses, expected, strict=True):
        assert response.choices[0].text == offline.text, prompt
        assert response.usage.completion_tokens == len(offline.token_ids), prompt
        assert response.choices[0].finish_reason == offline.finish_reason, prompt


def test_concurrent_requests_use_both_decode_workers(burst):
    assert sum(burst.served["decode"]) == len(PROMPTS)
    assert all(n >= 1 for n in burst.served["decode"]), \
        f"requests served per decode worker: {burst.served['decode']}"


def test_concurrent_requests_use_both_prefill_workers(burst):
    assert all(n > 0 for n in burst.prefilled_tokens), \
        f"tokens computed per prefill worker: {burst.prefilled_tokens}"


def test_prefill_workers_count_the_requests_they_served(burst):
    assert sum(burst.served["prefill"]) == len(PROMPTS)


def test_burst_spreads_over_decode_workers_while_one_is_busy(tiers, model):
    assert all(is_idle(s) for s in wait_until_idle(tiers))
    client = tiers.client()
    busy = client.completions.create(  # one long request: ~40% of a decode worker's blocks
        model=model, prompt=list(range(300, 900)), max_tokens=LONG_MAX_TOKENS - 600,
        temperature=0, stream=True, extra_body={"ignore_eos": True})
    try:
        next(iter(busy))
        wait_for_router_to_see(tiers, lambda w: w["role"] == "decode" and w["running"] == 1)
        served_before = served_by_role(tiers)["decode"]
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            list(pool.map(lambda p: client.completions.create(
                model=model, prompt=f"Busy. {p}", temperature=0, max_tokens=MAX_TOKENS),
                PROMPTS))
        served = [a - b for a, b in zip(served_by_role(tiers)["decode"], served_before,
                                        strict=True)]
    finally:
        busy.close()
    # Either split is fine; the worker with one running request and room to spare must not
    # be passed over by all eight while the other ends up running all of them.
    assert all(n >= 1 for n in served), f"burst requests served per decode worker: {served}"


def wait_for_router_to_see(tiers, predicate, deadline_s: float = 5.0) -> None:
    """Waits until a worker in the gateway's /cluster (the registry the router routes by)
    matches predicate."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        reply = httpx.get(f"http://127.0.0.1:{tiers.port}/cluster", timeout=5)
        if any(predicate(w) for w in reply.json()["workers"]):
            return
        time.sleep(0.1)
    raise AssertionError(f"no heartbeat matched within {deadline_s} s")


def test_client_disconnect_mid_stream_frees_blocks_on_both_tiers(tiers, model):
    assert all(is_idle(s) for s in wait_until_idle(tiers))
    served_before = served_by_role(tiers)
    stream = tiers.client().completions.create(
        model=model, prompt="Tell me a long story about a lighthouse keeper.",
        max_tokens=LONG_MAX_TOKENS, temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    texts = [next(chunks).choices[0].text for _ in range(3)]
    mid_stream = [s for s in tiers.worker_stats() if s.role == "decode"]
    stream.close()

    # The request was decoding and holding blocks when the client left...
    assert all(texts)
    assert sum(s.running for s in mid_stream) == 1, mid_stream
    assert any(s.kv_blocks_free < s.kv_blocks_total for s in mid_stream), mid_stream
    # ...and within seconds, far sooner than its 900 tokens would take, no worker of either
    # tier runs it or holds a block for it.
    stats = wait_until_idle(tiers)
    for s in stats:
        assert (s.running, s.waiting) == (0, 0), s
        assert s.kv_blocks_free == s.kv_blocks_total, s
    # Aborted is not finished: no decode worker counts it as served (a length finish would).
    assert served_by_role(tiers)["decode"] == served_before["decode"]


# Last in the module: while the bug stands, the request it leaves behind decodes until teardown.
def test_client_disconnect_aborts_a_non_streaming_request(tiers, model):
    assert all(is_idle(s) for s in wait_until_idle(tiers))
    body = {"model": model, "prompt": "Tell me a long story about a lighthouse keeper.",
            "max_tokens": LONG_MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):  # the client gives up and closes the connection
        httpx.post(f"http://127.0.0.1:{tiers.port}/v1/completions", json=body, timeout=1.5)
    stats = wait_until_idle(tiers, deadline_s=5.0)
    assert all(is_idle(s) for s in stats), stats


def test_repeated_system_prompt_prefills_only_the_suffix(tiers, model):
    system = ("You are the help desk of a small museum of clocks. Keep answers short, mention "
              "the room where the clock stands, and invite the visitor to the Sunday tour. ") * 3
    client = tiers.client()

    def ask(question: str):
        before = sum(s.num_computed_tokens for s in tiers.engine_stats()[:2])  # both prefills
        response = client.chat.completions.create(
            model=model, temperature=0, max_tokens=2,
            messages=[{"role": "system", "content": system},
                      {"role": "user", "content": question}])
        computed = sum(s.num_computed_tokens for s in tiers.engine_stats()[:2]) - before
        return response.usage, computed

    first, first_computed = ask("Where is the cuckoo clock?")
    second, second_computed = ask("When does the tour start?")
    assert first_computed == first.prompt_tokens  # nothing cached yet: the whole prompt
    cached = second.prompt_tokens_details.cached_tokens
    assert cached >= 48
    assert second_computed == second.prompt_tokens - cached  # the suffix only
